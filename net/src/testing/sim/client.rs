//! The client and its model of every block. The client holds the volume's writer lock on one
//! node (`Cluster::take_writer`) and writes, reads and flushes 4 KiB blocks through that
//! node's router, as a frontend does, a few requests at a time. The model checks each answer:
//! a read returns the last acknowledged write or one whose outcome is unknown (never older
//! data, never data no write put there); after a power loss of every node, what the last
//! completed flush covered or something written after it.

use super::store::{block_data, values_of};
use super::world::{on_core, World, CORES, VOLUME};
use crate::cluster::Cluster;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use torus_engine::{
    Completion, CompletionSink, Piece, PieceKind, ReplyTo, Sink, BLOCK_SIZE, CHUNK_SIZE,
};

/// Blocks the client uses: `SUB` blocks in each of `CHUNKS` chunks.
pub(super) const CHUNKS: u64 = 16;
const SUB: u64 = 4;
pub(super) const QUEUE_DEPTH: usize = 4;

pub(super) fn blocks() -> Vec<u64> {
    let per_chunk = CHUNK_SIZE / BLOCK_SIZE as u64;
    (0..CHUNKS)
        .flat_map(|c| (0..SUB).map(move |s| c * per_chunk + s * 7))
        .collect()
}

/// What a block may read as now.
#[derive(Debug, Clone, Default)]
pub(super) struct BlockModel {
    /// Values a read may return (0: never written).
    pub possible: Vec<u64>,
    /// Every version written.
    pub history: Vec<u64>,
    /// What the block may hold durably as of the last completed flush (`possible` when it
    /// was issued), and every version written since that flush was issued: after a power
    /// loss of every node the block holds one of these.
    base: Vec<u64>,
    after_base: Vec<u64>,
    /// The same, for the flush in flight.
    next_base: Option<(Vec<u64>, Vec<u64>)>,
    pub writing: bool,
}

impl BlockModel {
    fn new() -> BlockModel {
        BlockModel {
            possible: vec![0],
            base: vec![0],
            ..BlockModel::default()
        }
    }

    pub fn issue(&mut self, v: u64) {
        self.possible.push(v);
        self.history.push(v);
        self.after_base.push(v);
        if let Some((_, after)) = &mut self.next_base {
            after.push(v);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write(u64),
    Flush,
}

/// Where the client is attached: node, process generation, the cluster there.
pub(super) type Attached = (usize, u64, Arc<Cluster>);

pub(super) struct Client {
    pub model: BTreeMap<u64, BlockModel>,
    /// Requests in flight: op → (kind, block, what the block could read as when issued).
    pub in_flight: BTreeMap<u64, (Kind, u64, Vec<u64>)>,
    pub at: Option<Attached>,
    pub next_op: u64,
    pub next_version: u64,
    pub flushing: bool,
    pub failure: Option<String>,
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    pub errors: u64,
}

pub(super) type ClientRef = Arc<Mutex<Client>>;

impl Client {
    pub fn new() -> Client {
        Client {
            model: blocks()
                .into_iter()
                .map(|b| (b, BlockModel::new()))
                .collect(),
            in_flight: BTreeMap::new(),
            at: None,
            next_op: 1,
            next_version: 1,
            flushing: false,
            failure: None,
            writes_acked: 0,
            reads_checked: 0,
            flushes_acked: 0,
            errors: 0,
        }
    }

    /// The connection is gone: requests outstanding on it stay of unknown outcome.
    pub fn detach(&mut self) -> Option<Attached> {
        self.in_flight.clear();
        self.flushing = false;
        for m in self.model.values_mut() {
            m.writing = false;
            m.next_base = None;
        }
        self.at.take()
    }

    /// Every node lost power at once: only what a completed flush covered is sure to be there.
    pub fn power_loss(&mut self) {
        for m in self.model.values_mut() {
            let mut possible = m.base.clone();
            possible.extend(&m.after_base);
            possible.sort_unstable();
            possible.dedup();
            m.possible = possible;
        }
    }

    /// A write of the next version of `block` is sent (a block the client does not use:
    /// `None`): its request number and version.
    pub fn begin_write(&mut self, block: u64) -> Option<(u64, u64)> {
        let (op, v) = (self.next_op, self.next_version);
        let m = self.model.get_mut(&block)?;
        m.issue(v);
        m.writing = true;
        self.next_op += 1;
        self.next_version += 1;
        self.in_flight
            .insert(op, (Kind::Write(v), block, Vec::new()));
        Some((op, v))
    }

    /// Flush `op` is sent: what each block holds now is what it makes durable.
    pub fn begin_flush(&mut self, op: u64) {
        self.flushing = true;
        for m in self.model.values_mut() {
            m.next_base = Some((m.possible.clone(), Vec::new()));
        }
        self.in_flight.insert(op, (Kind::Flush, 0, Vec::new()));
    }

    fn done(&mut self, op: u64, c: Completion) {
        let Some((kind, block, before)) = self.in_flight.remove(&op) else {
            return;
        };
        let ok = c.output.is_ok();
        match kind {
            Kind::Flush => {
                self.flushing = false;
                if !ok {
                    self.errors += 1;
                    return;
                }
                self.flushes_acked += 1;
                for m in self.model.values_mut() {
                    if let Some((base, after)) = m.next_base.take() {
                        m.base = base;
                        m.after_base = after;
                    }
                }
            }
            Kind::Write(v) => {
                let m = self.model.get_mut(&block).expect("a block");
                m.writing = false;
                if !ok {
                    self.errors += 1;
                    return;
                }
                self.writes_acked += 1;
                m.possible = vec![v];
            }
            Kind::Read => {
                let Ok(out) = &c.output else {
                    self.errors += 1;
                    return;
                };
                self.reads_checked += 1;
                let got = values_of(out).first().copied().unwrap_or(u64::MAX);
                let m = &self.model[&block];
                if !m.possible.contains(&got) && !before.contains(&got) && self.failure.is_none() {
                    let what = if m.history.contains(&got) || got == 0 {
                        "a stale read"
                    } else {
                        "wrong data"
                    };
                    self.failure = Some(format!(
                        "{what}: block {block} read as version {got}, expected one of {:?}",
                        m.possible
                    ));
                }
            }
        }
    }
}

/// A request's answer reaches the client.
struct Answer {
    client: ClientRef,
    op: u64,
}

impl CompletionSink for Answer {
    fn complete(&self, c: Completion) {
        self.client.lock().done(self.op, c);
    }
}

/// Issues requests until `QUEUE_DEPTH` are in flight (a flush now and then); at most that
/// many in one step, as requests answered at once make room again.
pub(super) fn issue(w: &World, client: &ClientRef) {
    for _ in 0..QUEUE_DEPTH {
        let (op, piece, node, gen, cluster) = {
            let mut c = client.lock();
            let Some((node, gen, cluster)) = c.at.clone() else {
                return;
            };
            if c.in_flight.len() >= QUEUE_DEPTH || c.failure.is_some() {
                return;
            }
            let op = c.next_op;
            c.next_op += 1;
            let (roll, pick) = {
                let mut s = w.lock();
                (s.rng.below(100), s.rng.below(c.model.len() as u64) as usize)
            };
            if roll < 5 && !c.flushing {
                c.begin_flush(op);
                (op, None, node, gen, cluster)
            } else {
                let block = *c.model.keys().nth(pick).expect("a block");
                let kind = if roll < 60 && !c.model[&block].writing {
                    let v = c.next_version;
                    c.next_version += 1;
                    let m = c.model.get_mut(&block).expect("a block");
                    m.writing = true;
                    m.issue(v);
                    Kind::Write(v)
                } else {
                    Kind::Read
                };
                let before = c.model[&block].possible.clone();
                c.in_flight.insert(op, (kind, block, before));
                (op, Some(piece_for(kind, block)), node, gen, cluster)
            }
        };
        submit(w, client, op, piece, node, gen, cluster);
    }
}

pub(super) fn piece_for(kind: Kind, block: u64) -> Piece {
    let offset = block * BLOCK_SIZE as u64;
    let kind = match kind {
        Kind::Write(v) => PieceKind::Write {
            data: Arc::new(block_data(&[v])),
            data_offset: 0,
            fua: false,
        },
        _ => PieceKind::Read,
    };
    Piece {
        volume: VOLUME,
        offset,
        len: BLOCK_SIZE as u32,
        kind,
    }
}

/// Hands a request to the attached node's router from one of its cores, as a frontend does.
pub(super) fn submit(
    w: &World,
    client: &ClientRef,
    op: u64,
    piece: Option<Piece>,
    node: usize,
    gen: u64,
    cluster: Arc<Cluster>,
) {
    let core = w.lock().rng.below(CORES as u64) as usize;
    let reply = ReplyTo::Sink {
        sink: Sink(Arc::new(Answer {
            client: client.clone(),
            op,
        })),
        token: op,
    };
    let router = cluster.router();
    on_core(w, node, gen, core, move || match piece {
        Some(p) => router.route(p, reply),
        None => router.flush(VOLUME, reply),
    });
}
