//! The simulated world every node shares: the nodes' processes and disks, etcd, the network,
//! the seed's random numbers, the log. One lock (`Shared`) guards it; nothing calls into a
//! node's cluster code while holding it (the cluster calls back into the world).

use super::net::Conn;
use super::report::SimReport;
use super::store::CoreStore;
use crate::cluster::Cluster;
use crate::peer::Handler;
use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::testing::sim::Rng;

pub(super) const CORES: usize = 2;
pub(super) const PGS: u32 = 8;
pub(super) const VOLUME: u32 = 1;
pub(super) const REPLICAS: u32 = 3;
/// The wall clock at the start of every run (`Host::now_ms`), milliseconds.
pub(super) const EPOCH_MS: u64 = 1_800_000_000_000;
const LOG_KEPT: usize = 300;

pub(super) type World = Arc<Mutex<State>>;

pub(super) struct State {
    pub rng: Rng,
    pub start: Instant,
    pub nodes: Vec<NodeState>,
    pub kv: super::kv::KvState,
    /// Directed pairs (from, to) whose messages are lost.
    pub blocked: BTreeSet<(usize, usize)>,
    /// A node whose messages (both ways) take this much longer.
    pub slow: Option<(usize, Duration)>,
    pub conns: BTreeMap<u64, Conn>,
    pub next_id: u64,
    pub log: VecDeque<String>,
    pub report: SimReport,
    /// Prints the log as it goes (`TORUS_SIM_LOG=1`).
    pub verbose: bool,
    pub canary: bool,
    /// A process killed loses every write since its last flush (a scenario's choice; a seed's
    /// run keeps or loses each at random).
    pub lose_unflushed: bool,
    /// Logs every store operation on this block (`TORUS_SIM_TRACE_BLOCK`).
    pub trace_block: Option<u64>,
}

/// One node: its process (while up) and what survives it (the disk).
pub(super) struct NodeState {
    pub name: String,
    /// The running process's generation; `None` while down.
    pub gen: Option<u64>,
    pub cluster: Option<Arc<Cluster>>,
    pub handler: Option<Arc<dyn Handler>>,
    pub tasks: Vec<tokio::task::AbortHandle>,
    pub cores: Vec<CoreStore>,
    pub cut_record: Option<Vec<u8>>,
    /// Cut off from etcd.
    pub etcd_cut: bool,
    /// How much longer each of its etcd calls takes (a slow link to etcd).
    pub etcd_slow: Duration,
    /// How many times etcd has answered its listing of the registered nodes.
    pub nodes_listed: u64,
}

impl State {
    pub fn now_us(&self) -> u64 {
        (Instant::now() - self.start).as_micros() as u64
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn alive(&self, node: usize, gen: u64) -> bool {
        self.nodes[node].gen == Some(gen)
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn log(&mut self, line: String) {
        let line = format!("{:>10.3} {line}", self.now_us() as f64 / 1e6);
        if self.verbose {
            eprintln!("{line}");
        }
        if self.log.len() == LOG_KEPT {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    /// A message's delay on the wire from `a` to `b`.
    pub fn delay(&mut self, a: usize, b: usize) -> Duration {
        let mut d = Duration::from_micros(self.rng.range(30, 400));
        if let Some((n, extra)) = self.slow {
            if n == a || n == b {
                d += extra;
            }
        }
        d
    }
}

thread_local! {
    /// The (node, process generation, core) whose core the running code is on.
    static ON_CORE: Cell<Option<(usize, u64, usize)>> = const { Cell::new(None) };
}

pub(super) fn current(node: usize, gen: u64) -> Option<usize> {
    match ON_CORE.with(|c| c.get()) {
        Some((n, g, core)) if n == node && g == gen => Some(core),
        _ => None,
    }
}

/// Runs `f` as core `core` of a node's process, if that process still runs.
pub(super) fn on_core(w: &World, node: usize, gen: u64, core: usize, f: impl FnOnce()) {
    if !w.lock().alive(node, gen) {
        return;
    }
    let before = ON_CORE.with(|c| c.replace(Some((node, gen, core))));
    f();
    ON_CORE.with(|c| c.set(before));
}

/// Runs `f` on core `core` of a node's process after `after` (a completion), or as soon as
/// the core gets to it (`Duration::ZERO`: a mailbox, first in first out).
pub(super) fn later(
    w: &World,
    node: usize,
    gen: u64,
    core: usize,
    after: Duration,
    f: impl FnOnce() + Send + 'static,
) {
    let w = w.clone();
    tokio::spawn(async move {
        if !after.is_zero() {
            tokio::time::sleep(after).await;
        }
        on_core(&w, node, gen, core, f);
    });
}
