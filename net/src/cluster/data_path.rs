//! The data path: every piece from this node's frontends (through the engine's `Router`) and
//! every `C*` request from a peer is routed by the map to its PG's primary
//! (`replication::route`).
//!
//! Reads go to the primary; writes go to the primary, which writes locally and forwards to
//! every other replica that is up — the same core index on each, one batched frame per peer —
//! and answers when all have it. A piece whose primary is another node travels there as a
//! `C*` request. Whatever fails with "ask again" (the primary moved, a peer died, too few
//! replicas up) is retried against a fresh map until the request's deadline, then answered
//! with EIO; a PG with no replica up answers EIO, never zeros.
//!
//! Invariant: everything about a PG is decided on the core that owns it, so its writes reach
//! the local store and each replica's connection in one order, and replicas apply overlapping
//! writes in the order the primary did (`submit`). A request forwarded by a peer is tried once
//! and answered "ask again": the peer owns its retries (`retry_later`).

use super::store::{clone_piece, deliver, sink};
use super::{Cluster, Host};
use crate::map::ClusterMap;
use crate::peer::{Answered, Callback, Outgoing, Reply, Responder};
use crate::replication::{self, Copies, Route, WritePlan};
use crate::wire::{self, Data, Entry, Op, Status};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::{
    AlignedBuf, BlockError, Completion, CompletionSink, Output, Piece, PieceKind, ReplyTo, Router,
    Sink, BLOCK_SIZE,
};

/// How long a client request keeps retrying (primary moving, a node being declared dead)
/// before it answers EIO. Longer than the default lease so a node loss is ridden out.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Same for a request coordinated on behalf of another node (that node retries it again).
pub(super) const PEER_REQUEST_DEADLINE: Duration = Duration::from_secs(4);
pub(super) const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Where a request's answer goes, once (nothing is allocated for it).
pub(super) enum Done {
    /// A piece of this node's frontends: answered to `reply` through `host`; a write is
    /// counted out of the volume's writes in first (`WritesIn`).
    Frontend {
        host: Arc<dyn Host>,
        reply: ReplyTo,
        write: Option<Arc<AtomicU64>>,
    },
    /// A peer's request: answered on its connection (`len`: the bytes a read answers).
    Peer { respond: Responder, len: usize },
}

impl Done {
    pub(super) fn call(self, r: Result<Output, Status>) {
        match self {
            Done::Frontend { host, reply, write } => {
                if let Some(count) = write {
                    count.fetch_sub(1, Ordering::SeqCst);
                }
                deliver(&*host, reply, r.map_err(BlockError::from))
            }
            Done::Peer { respond, len } => super::handler::reply_output(respond, r, len),
        }
    }
}

pub(super) struct Request {
    pub(super) piece: Piece,
    pub(super) done: Done,
    pub(super) deadline: Instant,
    pub(super) from_peer: bool,
    /// Writer epoch the write carries (the fencing token of the volume's writer lock).
    pub(super) writer: u64,
}

/// The wire request for a piece: `coordinate` asks the receiver to act as the PG's primary
/// (`C*` ops), otherwise a replica applies it to its own store. None for a flush.
fn to_wire(p: &Piece, coordinate: bool, epoch: u64, writer: u64) -> Option<(Entry, Option<Data>)> {
    let fua_flag = |fua: bool| if fua { wire::FLAG_FUA } else { 0 };
    let (op, flags, data) = match &p.kind {
        PieceKind::Read => (if coordinate { Op::CRead } else { Op::Read }, 0, None),
        PieceKind::Status => (if coordinate { Op::CStatus } else { Op::Status }, 0, None),
        PieceKind::Zero { fua } => (
            if coordinate { Op::CZero } else { Op::Zero },
            fua_flag(*fua),
            None,
        ),
        PieceKind::Write {
            data,
            data_offset,
            fua,
        } => (
            if coordinate { Op::CWrite } else { Op::Write },
            fua_flag(*fua),
            Some(Data {
                buf: data.clone(),
                start: *data_offset,
                len: p.len as usize,
            }),
        ),
        PieceKind::Flush => return None,
    };
    let entry = Entry {
        op: op as u8,
        flags,
        volume: p.volume,
        offset: p.offset,
        len: p.len,
        epoch,
        writer,
        ..Entry::default()
    };
    Some((entry, data))
}

/// A read's answer from a peer, in a buffer of its own (the frame's buffer holds others).
pub(super) fn read_output(d: &Data) -> Output {
    let mut buf = AlignedBuf::zeroed(d.len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
    buf[..d.len].copy_from_slice(&d.buf[d.start..d.start + d.len]);
    Output::Read { data: buf, head: 0 }
}

fn is_partial(p: &Piece) -> bool {
    !p.offset.is_multiple_of(BLOCK_SIZE as u64) || !(p.len as usize).is_multiple_of(BLOCK_SIZE)
}

/// Whole blocks a piece covers entirely.
fn full_blocks(p: &Piece) -> std::ops::Range<u64> {
    let first = p.offset.div_ceil(BLOCK_SIZE as u64);
    let end = (p.offset + p.len as u64) / BLOCK_SIZE as u64;
    first..end.max(first)
}

/// The engine's router: frontends' pieces enter the cluster here.
pub(super) struct ClusterRouter(pub(super) Arc<Cluster>);

impl Router for ClusterRouter {
    fn route(&self, piece: Piece, reply: ReplyTo) {
        self.0.route(piece, reply);
    }

    fn flush(&self, _volume: u32, reply: ReplyTo) {
        self.0.flush_all(reply);
    }
}

/// One coordinated write's copies answering: the local store's completion and each replica's
/// reply reach this one receiver, which none of them allocates for; the last answers the
/// write (`Cluster::copy_answered`).
struct Coordinated {
    cluster: Arc<Cluster>,
    epoch: u64,
    copies: Copies<Request>,
}

impl Coordinated {
    fn answer(&self, s: Status) {
        self.cluster.copy_answered(&self.copies, self.epoch, s)
    }
}

impl Answered for Coordinated {
    fn answered(&self, reply: Reply) {
        self.answer(reply.status)
    }
}

/// The local copy's completion (the store's answer).
impl CompletionSink for Coordinated {
    fn complete(&self, c: Completion) {
        self.cluster.local_done(self.epoch);
        self.answer(Status::of(&c.output))
    }
}

impl Cluster {
    /// A piece from this node's frontends enters the cluster; writes of a paused volume wait.
    pub(super) fn route(self: &Arc<Self>, piece: Piece, reply: ReplyTo) {
        let host = self.host.clone();
        let volume = piece.volume;
        let is_write = matches!(piece.kind, PieceKind::Write { .. } | PieceKind::Zero { .. });
        let write = if is_write {
            // Counted in, then checked for a pause (see `WritesIn`).
            let count = self.writes_in.counts.get(volume);
            count.fetch_add(1, Ordering::SeqCst);
            if self.writes_in.paused.load(Ordering::SeqCst) > 0 {
                let mut p = self.pause.lock();
                if p.paused.contains(&volume) {
                    count.fetch_sub(1, Ordering::SeqCst);
                    p.parked.push((piece, reply));
                    return;
                }
            }
            Some(count)
        } else {
            None
        };
        let done = Done::Frontend { host, reply, write };
        self.submit(Request {
            piece,
            done,
            deadline: Instant::now() + REQUEST_DEADLINE,
            from_peer: false,
            writer: self.writer_epoch(volume),
        });
    }

    /// Asks again after a moment, until the request's deadline. A request forwarded by a peer
    /// is tried once and answered "ask again": the peer owns its retries. (Were it retried
    /// here too, a write the peer had given up on and sent again elsewhere could land after a
    /// newer write to the same block.)
    fn retry_later(self: &Arc<Self>, req: Request) {
        // A write whose writer lock this node no longer holds (its client left, or took the
        // lock again under a new epoch) is not sent again: replicas would fence it anyway.
        let is_write = matches!(
            req.piece.kind,
            PieceKind::Write { .. } | PieceKind::Zero { .. }
        );
        if is_write && !req.from_peer && self.writer_epoch(req.piece.volume) != req.writer {
            return req.done.call(Err(Status::Fenced));
        }
        if req.from_peer || Instant::now() >= req.deadline || self.stopping.load(Ordering::Acquire)
        {
            return req.done.call(Err(Status::Retry));
        }
        let me = self.clone();
        self.host.spawn(Box::pin(async move {
            tokio::time::sleep(RETRY_DELAY).await;
            me.submit(req);
        }));
    }

    pub(super) fn submit(self: &Arc<Self>, req: Request) {
        // Everything about a PG is decided on the core that owns it: its writes reach the local
        // store and each replica's connection in one order, so replicas apply overlapping
        // writes in the order the primary did.
        let owner = self.host.core_for(req.piece.volume, req.piece.offset);
        if self.host.current_core() != Some(owner) {
            let me = self.clone();
            return self
                .host
                .run_on_core(owner, Box::new(move || me.submit(req)));
        }
        let Some(vol) = self.volume(req.piece.volume) else {
            if req.from_peer || Instant::now() >= req.deadline {
                return req.done.call(Err(Status::NoVolume));
            }
            // Created on another node a moment ago: look again before giving up.
            let me = self.clone();
            self.host.spawn(Box::pin(async move {
                let _ = me.refresh_volumes().await;
                if me.volume(req.piece.volume).is_none() {
                    return req.done.call(Err(Status::NoVolume));
                }
                me.submit(req);
            }));
            return;
        };
        if !self.lease_fresh() {
            return self.retry_later(req);
        }
        let map = self.map();
        let pg = self.pg_of(req.piece.volume, req.piece.offset);
        let is_write = matches!(
            req.piece.kind,
            PieceKind::Write { .. } | PieceKind::Zero { .. }
        );
        let route = replication::route(
            &map,
            &self.me,
            self.incarnation,
            pg,
            vol.replicas,
            is_write,
            req.from_peer,
            self.writer_epoch(vol.id) > 0,
        );
        match route {
            Route::Read => {}
            Route::Write(plan) => return self.coordinate(req, map.epoch, plan, pg),
            Route::Retry => return self.retry_later(req),
            Route::Refuse => return req.done.call(Err(Status::Retry)),
            Route::Forward(primary) => return self.forward(req, &map, primary, pg),
        }
        match req.piece.kind {
            PieceKind::Read => {
                // A local copy that fails its checksum (or its read) is answered from another
                // clean replica; the log names it.
                let done = req.done;
                let (volume, offset, len) = (req.piece.volume, req.piece.offset, req.piece.len);
                let me = self.clone();
                let replicas = vol.replicas;
                self.send_local(
                    req.piece,
                    sink(move |c| match c.output {
                        Err(BlockError::Io) => {
                            let map = me.map();
                            let others: Vec<String> = map
                                .nodes
                                .keys()
                                .filter(|n| **n != me.me && map.clean_holder(pg, replicas, n))
                                .cloned()
                                .collect();
                            me.read_elsewhere(volume, offset, len, pg, others, done)
                        }
                        other => done.call(other.map_err(Status::from)),
                    }),
                );
            }
            PieceKind::Status => {
                let done = req.done;
                self.send_local(
                    req.piece,
                    sink(move |c| done.call(c.output.map_err(Status::from))),
                );
            }
            // Writes were planned by `route`; a flush is not routed to one PG.
            _ => req.done.call(Err(Status::Einval)),
        }
    }

    /// Reads from the first of `others` (clean replicas) that answers; EIO when none does.
    fn read_elsewhere(
        self: &Arc<Self>,
        volume: u32,
        offset: u64,
        len: u32,
        pg: u32,
        mut others: Vec<String>,
        done: Done,
    ) {
        if others.is_empty() {
            self.host.log(&format!("volume {volume} bytes {offset}+{len}: the local copy cannot be vouched for and no other replica is up: EIO"));
            return done.call(Err(Status::Eio));
        }
        let node = others.remove(0);
        let map = self.map();
        let Some(link) = self.link(&map, &node, pg) else {
            return self.read_elsewhere(volume, offset, len, pg, others, done);
        };
        let me = self.clone();
        link.send(Outgoing {
            entry: Entry {
                op: Op::Read as u8,
                volume,
                offset,
                len,
                epoch: map.epoch,
                ..Entry::default()
            },
            data: None,
            group: 0,
            done: Callback::once(move |r| match (r.status, r.data) {
                (Status::Ok, Some(d)) if d.len == len as usize => {
                    me.log(&format!("volume {volume} bytes {offset}+{len}: the local copy fails its checksum; answered from node {node}"));
                    me.repaired_reads.fetch_add(1, Ordering::Relaxed);
                    done.call(Ok(read_output(&d)))
                }
                _ => me.read_elsewhere(volume, offset, len, pg, others, done),
            }),
        });
    }

    /// Sends a piece to its primary on another node.
    fn forward(self: &Arc<Self>, req: Request, map: &ClusterMap, primary: &str, pg: u32) {
        let Some(link) = self.link(map, primary, pg) else {
            return self.retry_later(req);
        };
        let Some((entry, data)) = to_wire(&req.piece, true, map.epoch, req.writer) else {
            return req.done.call(Err(Status::Einval));
        };
        let me = self.clone();
        link.send(Outgoing {
            entry,
            data,
            group: 0,
            done: Callback::once(move |r| match r.status {
                Status::Ok => {
                    let output = match (&req.piece.kind, r.data) {
                        (PieceKind::Read, Some(d)) if d.len == req.piece.len as usize => {
                            read_output(&d)
                        }
                        (PieceKind::Read, _) => return req.done.call(Err(Status::Eio)),
                        (PieceKind::Status, Some(d)) => Output::Status {
                            mapped: d.buf[d.start..d.start + d.len]
                                .iter()
                                .map(|&b| b != 0)
                                .collect(),
                        },
                        (PieceKind::Status, None) => return req.done.call(Err(Status::Eio)),
                        _ => Output::Done,
                    };
                    req.done.call(Ok(output))
                }
                Status::Retry => me.retry_later(req),
                s => req.done.call(Err(s)),
            }),
        });
    }

    /// The coordinator's write: local and every replica in `plan`; answers when all have it.
    fn coordinate(self: &Arc<Self>, req: Request, epoch: u64, plan: WritePlan<'_>, pg: u32) {
        // The local copy is fenced like the others: a request of a replaced writer (still
        // being retried here after its client moved to another node) must not overwrite
        // newer data here while every replica refuses it.
        let admitted = replication::admit_write(
            epoch,
            epoch,
            &self.fence,
            req.piece.volume,
            Some(pg),
            req.writer,
        );
        match admitted {
            Ok(()) => {}
            Err(Status::Retry) => {
                self.check_claims(epoch, req.piece.volume, req.writer);
                return self.retry_later(req);
            }
            Err(s) => return req.done.call(Err(s)),
        }
        if !self.enter_inflight(epoch) {
            return self.retry_later(req);
        }
        let remote = plan.remote;
        let writer = req.writer;
        let local_piece = clone_piece(&req.piece);
        // A replica catching up needs whole blocks (it cannot merge a partial write into a
        // block it has not copied yet): send what the primary holds after its own write.
        let read_back = plan.stale_target && is_partial(&req.piece) && !remote.is_empty();
        // The local write and one per remote replica, answering to one shared receiver.
        let coord = Arc::new(Coordinated {
            cluster: self.clone(),
            epoch,
            copies: Copies::new(remote.len() + 1, req),
        });
        let call = {
            let coord = coord.clone();
            move |s: Status| coord.answer(s)
        };
        let send_remote = {
            let coord = coord.clone();
            move |piece: &Piece, remote: &[&str]| {
                let map = coord.cluster.map();
                // The copies' replies are awaited together (one wake-up for all of them).
                let group = crate::peer::new_group();
                for node in remote {
                    let Some(link) = coord.cluster.link(&map, node, pg) else {
                        coord.answer(Status::Retry);
                        continue;
                    };
                    let (entry, data) =
                        to_wire(piece, false, epoch, writer).expect("only writes are coordinated");
                    link.send(Outgoing {
                        entry,
                        data,
                        group,
                        done: Callback::Shared(coord.clone()),
                    });
                }
            }
        };
        if read_back {
            // Rare (a partial write while a replica catches up): the names are kept past
            // this call.
            let remote: Vec<String> = remote.iter().map(|n| n.to_string()).collect();
            let me = self.clone();
            let call2 = call.clone();
            let fua = matches!(
                local_piece.kind,
                PieceKind::Write { fua: true, .. } | PieceKind::Zero { fua: true }
            );
            let volume = local_piece.volume;
            let first = local_piece.offset / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
            let end = (local_piece.offset + local_piece.len as u64).div_ceil(BLOCK_SIZE as u64)
                * BLOCK_SIZE as u64;
            self.send_local(
                local_piece,
                sink(move |c| {
                    me.local_done(epoch);
                    let s = Status::of(&c.output);
                    if s != Status::Ok {
                        for _ in 0..remote.len() {
                            call2(s);
                        }
                        return call2(s);
                    }
                    me.send_local(
                        Piece {
                            volume,
                            offset: first,
                            len: (end - first) as u32,
                            kind: PieceKind::Read,
                        },
                        sink(move |c| match c.output {
                            Ok(Output::Read { data, head }) => {
                                let full = Piece {
                                    volume,
                                    offset: first,
                                    len: (end - first) as u32,
                                    kind: PieceKind::Write {
                                        data: Arc::new(data),
                                        data_offset: head,
                                        fua,
                                    },
                                };
                                let names: Vec<&str> = remote.iter().map(String::as_str).collect();
                                send_remote(&full, &names);
                                call2(Status::Ok);
                            }
                            other => {
                                let s = other.err().map_or(Status::Eio, Status::from);
                                for _ in 0..remote.len() {
                                    call2(s);
                                }
                                call2(s);
                            }
                        }),
                    );
                }),
            );
            return;
        }
        self.send_local_tracked(
            clone_piece(&local_piece),
            epoch,
            ReplyTo::Sink {
                sink: Sink(coord),
                token: 0,
            },
        );
        send_remote(&local_piece, &remote);
    }

    /// One copy of a coordinated write answered; the last one answers the write.
    pub(super) fn copy_answered(self: &Arc<Self>, copies: &Copies<Request>, epoch: u64, s: Status) {
        let Some((worst, req)) = copies.add(s) else {
            return;
        };
        self.inflight_done(epoch);
        match worst {
            Status::Ok => req.done.call(Ok(Output::Done)),
            Status::Retry => self.retry_later(req),
            s => req.done.call(Err(s)),
        }
    }

    /// A coordinated local write: while its PG is being scrubbed here, the blocks it touches
    /// are remembered so the scrub does not overwrite them with a replica's older copy.
    fn send_local_tracked(&self, piece: Piece, epoch: u64, reply: ReplyTo) {
        let pg = self.pg_of(piece.volume, piece.offset);
        // On the PG's core: a scrub or catch-up that starts tracking the PG does so here too
        // (`track_dirty`), so this write is either on the store's queue before what it reads
        // next, or sees the PG tracked.
        if !self.dirty_pgs.contains(pg) {
            return self.send_local(piece, reply);
        }
        let mut dirty = self.dirty.lock();
        if let Some(set) = dirty.get_mut(&pg) {
            let first = piece.offset / BLOCK_SIZE as u64;
            let end = (piece.offset + piece.len as u64).div_ceil(BLOCK_SIZE as u64);
            for b in first..end {
                set.insert((piece.volume, b), epoch);
            }
        }
        self.send_local(piece, reply);
    }

    /// Starts remembering the blocks coordinated writes make to `pgs` (a scrub or catch-up
    /// about to read them), each on its PG's own core, where its coordinated writes run.
    pub(super) async fn track_dirty(self: &Arc<Self>, pgs: Vec<u32>) {
        let cores = self.host.cores();
        let mut waits = Vec::new();
        for core in 0..cores {
            let mine: Vec<u32> = pgs
                .iter()
                .copied()
                .filter(|pg| *pg as usize % cores == core)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let me = self.clone();
            self.host.run_on_core(
                core,
                Box::new(move || {
                    let mut dirty = me.dirty.lock();
                    for pg in mine {
                        dirty.entry(pg).or_default();
                        me.dirty_pgs.insert(pg);
                    }
                    let _ = tx.send(());
                }),
            );
            waits.push(rx);
        }
        for rx in waits {
            let _ = rx.await;
        }
    }

    /// A replica write from a coordinator whose map had `epoch`, counted in flight under that
    /// epoch by the caller (`enter_inflight`) until done; `done` gets the store's answer.
    pub(super) fn apply_replica(
        self: &Arc<Self>,
        piece: Piece,
        epoch: u64,
        done: impl FnOnce(Status) + Send + 'static,
    ) {
        self.seen_epoch.fetch_max(epoch, Ordering::AcqRel);
        let me = self.clone();
        let reply = sink(move |c| {
            me.local_done(epoch);
            me.inflight_done(epoch);
            done(Status::of(&c.output))
        });
        let pg = self.pg_of(piece.volume, piece.offset);
        // A newer map than ours may already say we are stale: count as not clean.
        let clean = replication::replica_is_clean(
            &self.map.load(),
            epoch,
            pg,
            &self.me,
            self.incarnation,
            self.recovering.contains(pg),
        );
        if clean {
            return self.send_local(piece, reply);
        }
        // A copy for a PG this node freed, under a map it has not seen yet: the PG holds data
        // here again, to be freed again if it turns out not to stay.
        if !replication::holds(&self.map(), &self.me, pg) {
            self.let_go.lock().remove(&pg);
        }
        // Not clean here: remember what newer data arrived, so catch-up leaves it alone. The
        // piece is queued under the same lock catch-up uses, so the core sees them in order.
        let mut dirty = self.dirty.lock();
        self.dirty_pgs.insert(pg);
        let set = dirty.entry(pg).or_default();
        for b in full_blocks(&piece) {
            set.insert((piece.volume, b), epoch);
        }
        self.send_local(piece, reply);
    }
}
