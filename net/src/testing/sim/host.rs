//! A node's process in the simulation, as the cluster sees it (`Host`): `CORES` cores, each
//! with its store (`store.rs`), answering after a moment in the order asked; links over the
//! simulated network; tasks on the simulation's tokio runtime, aborted when the process
//! dies; the simulated wall clock; the cut record on the node's disk; the shared log.
//!
//! A process that died (its generation is not the node's any more) does nothing: its
//! messages are dropped, its tasks are not started.

use super::net::SimLink;
use super::store::core_of;
use super::world::{current, later, World, CORES, EPOCH_MS, PGS};
use crate::cluster::Host;
use crate::kv::BoxFuture;
use crate::peer::{FlushRecorder, PeerLink};
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use torus_engine::{Completion, Message, ReplyTo};

pub(super) struct SimHost {
    pub world: World,
    pub node: usize,
    pub gen: u64,
}

impl Host for SimHost {
    fn cores(&self) -> usize {
        CORES
    }

    fn pg_count(&self) -> u32 {
        PGS
    }

    fn core_for(&self, volume: u32, offset: u64) -> usize {
        core_of(volume, offset)
    }

    fn current_core(&self) -> Option<usize> {
        current(self.node, self.gen)
    }

    fn run_on_core(&self, core: usize, f: Box<dyn FnOnce() + Send>) {
        if self.current_core() == Some(core) {
            return f();
        }
        later(&self.world, self.node, self.gen, core, Duration::ZERO, f);
    }

    fn to_core(&self, core: usize, message: Message) {
        let mut s = self.world.lock();
        if !s.alive(self.node, self.gen) {
            return;
        }
        let canary = s.canary;
        let delay = Duration::from_micros(s.rng.range(10, 200));
        let store = &mut s.nodes[self.node].cores[core];
        match message {
            Message::Piece(piece, reply) => {
                let output = store.apply(&piece, canary);
                if let Some(b) = s.trace_block {
                    let first = piece.offset / torus_engine::BLOCK_SIZE as u64;
                    let n = (piece.len as usize / torus_engine::BLOCK_SIZE) as u64;
                    if (first..first + n).contains(&b) && piece.volume == super::world::VOLUME {
                        let now = s.nodes[self.node].cores[core].get((piece.volume, b));
                        let kind = match &piece.kind {
                            torus_engine::PieceKind::Write { .. } => "write",
                            torus_engine::PieceKind::Zero { .. } => "zero",
                            torus_engine::PieceKind::Read => "read",
                            torus_engine::PieceKind::Status => "status",
                            torus_engine::PieceKind::Flush => "flush",
                        };
                        let line = format!(
                            "n{}/{} store: {kind} of block {b}: now {now:?}",
                            self.node, self.gen
                        );
                        s.log(line);
                    }
                }
                drop(s);
                let c = Completion {
                    token: reply.token(),
                    output,
                };
                let (w, node, gen) = (self.world.clone(), self.node, self.gen);
                later(&self.world, node, gen, core, delay, move || {
                    SimHost {
                        world: w,
                        node,
                        gen,
                    }
                    .deliver(reply, c)
                });
            }
            Message::ListBlocks { pgs, reply } => {
                let list = store.list(&pgs);
                drop(s);
                later(&self.world, self.node, self.gen, core, delay, move || {
                    reply(list)
                });
            }
            _ => {}
        }
    }

    fn deliver(&self, reply: ReplyTo, c: Completion) {
        match reply {
            ReplyTo::Sink { sink, .. } => sink.0.complete(c),
            ReplyTo::Once(f) => (f.0)(c),
            ReplyTo::Channel { sender, .. } => {
                let _ = sender.send(c);
            }
            ReplyTo::Core { .. } => {
                self.log("a completion for a core's connection, which the simulation has none of")
            }
        }
    }

    fn link(
        &self,
        addr: &str,
        _me: &str,
        core: u32,
        recorder: Arc<dyn FlushRecorder>,
    ) -> Arc<dyn PeerLink> {
        let id = self.world.lock().id();
        Arc::new(SimLink {
            world: self.world.clone(),
            id,
            from: self.node,
            gen: self.gen,
            addr: addr.to_owned(),
            core,
            recorder,
            closed: AtomicBool::new(false),
        })
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        let mut s = self.world.lock();
        if !s.alive(self.node, self.gen) {
            return;
        }
        let h = tokio::spawn(task);
        let tasks = &mut s.nodes[self.node].tasks;
        tasks.retain(|t| !t.is_finished());
        tasks.push(h.abort_handle());
    }

    fn blocking(&self, f: Box<dyn FnOnce() + Send>) -> BoxFuture<'static, ()> {
        f();
        Box::pin(async {})
    }

    fn now_ms(&self) -> u64 {
        EPOCH_MS + self.world.lock().now_us() / 1000
    }

    fn read_cut_record(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.world.lock().nodes[self.node].cut_record.clone())
    }

    fn write_cut_record(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.world.lock();
        if s.alive(self.node, self.gen) {
            s.nodes[self.node].cut_record = Some(bytes.to_vec());
            s.report.cut_records += 1;
        }
        Ok(())
    }

    fn remove_cut_record(&self) -> io::Result<()> {
        let mut s = self.world.lock();
        if s.alive(self.node, self.gen) {
            s.nodes[self.node].cut_record = None;
        }
        Ok(())
    }

    fn cut_record_name(&self) -> String {
        format!("n{}'s cut record", self.node)
    }

    fn log(&self, line: &str) {
        let mut s = self.world.lock();
        let name = s.nodes[self.node].name.clone();
        s.log(format!("{name}/{}: {line}", self.gen));
        // What the cluster says it did, counted.
        let number = |l: &str| {
            l.split(' ')
                .find_map(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let r = &mut s.report;
        if line.starts_with("published the flush") {
            r.cut_records_published += 1;
        } else if line.contains("lost with every clean holder are clean here again") {
            r.revivals += 1;
        } else if line.contains("placement groups whole from") {
            r.revivals_whole += 1;
        } else if line.starts_with("reviving lost placement groups:") {
            r.revivals_waited += 1;
        } else if line.contains(", marked out;") {
            r.marked_out += 1;
        } else if line.starts_with("freed ") {
            r.blocks_freed += number(line);
        }
    }
}
