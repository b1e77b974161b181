//! Deterministic simulation of the replication protocol, driven by one seed.
//!
//! Three or four nodes, a simulated etcd and a simulated network run on one thread. Every
//! decision the cluster makes is taken by the code the cluster runs: the map (`reconcile`,
//! `targets`, `mark_clean`) and the protocol's decisions in `replication` (routing, the write
//! plan, the tally of a write's copies, fencing, what a replica remembers as dirty, when a
//! listing may be answered, what catch-up copies, unmaps and skips). What is modelled is the
//! glue around them, as `cluster/` does it: leases and heartbeats, the leader's reconcile,
//! map polling, retries until a request's deadline, forwarding to the primary, reads answered
//! from another replica, flushes of every node, catch-up rounds, the writer lock.
//!
//! The network is TCP between each pair of nodes: each connection delivers in order, with a
//! delay the seed picks; messages on different connections overtake each other. Faults:
//! connection resets that lose what is in flight (a request delivered whose reply is lost is
//! sent again: a duplicate), long delays, symmetric and one-way partitions between two nodes,
//! a node cut off from everything (etcd too), `kill -9` of a node (its unflushed writes are
//! each kept or lost), a power loss of every node at once, and the writer moving to another
//! node. At most one fault at a time, never more than replicas − 1 nodes down. With four
//! nodes, one down (killed or cut off) for `DOWN_OUT` is marked out by the leader
//! (`ClusterMap::mark_out`): its PGs are copied to the others, and it rejoins when it returns.
//!
//! Each node's store is a model with the engine's contract (a write is durable once a flush
//! that followed it completes); the engine itself runs on its simulated disk in
//! `torus_engine::testing::sim`. A client writes, reads and flushes 4 KiB blocks, and a model of every
//! block checks each answer: a read returns the last acknowledged write or one whose outcome
//! is unknown (never older data, never data no write put there); after a power loss of every
//! node, what the last completed flush covered or something written after it. After the
//! faults heal every PG must be clean again within a bound, and every replica must hold
//! exactly the blocks the model says, byte for byte.
//!
//! A failure's message holds the command that replays the seed. The canary (nodes acknowledge
//! a flush without making anything durable) must fail: it shows the model sees a lost write.

use crate::map::{ClusterMap, NodeInfo};
use crate::replication::{self, Fence, Route, Tally, Wanted};
use crate::wire::status;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use torus_engine::layout::placement_group;
use torus_engine::testing::sim::Rng;
use torus_engine::{BLOCK_SIZE, CHUNK_SIZE};

/// Simulated time is in microseconds.
const MS: u64 = 1000;
const SEC: u64 = 1000 * MS;
const LEASE_TTL: u64 = 3 * SEC;
const HEARTBEAT: u64 = 500 * MS;
const MAP_POLL: u64 = 200 * MS;
const LEADER_TICK: u64 = 500 * MS;
const RECOVERY_TICK: u64 = 500 * MS;
const OP_TIMEOUT: u64 = 8 * SEC;
const RETRY_DELAY: u64 = 100 * MS;
const REQUEST_DEADLINE: u64 = 30 * SEC;
const PEER_REQUEST_DEADLINE: u64 = 4 * SEC;
/// The leader marks out a node down this long (`--down-out-after`; with four nodes).
const DOWN_OUT: u64 = DOWN_OUT_SECONDS * SEC;
pub const DOWN_OUT_SECONDS: u64 = 4;
const LIST_WAIT: u64 = 10 * SEC;
/// A PG must be clean again this long after the faults healed.
const CONVERGE_BOUND: u64 = 120 * SEC;
const VOLUME: u32 = 1;
const REPLICAS: u32 = 3;
const PGS: u32 = 8;
/// Blocks the client uses: `SUB` blocks in each of `CHUNKS` chunks.
const CHUNKS: u64 = 16;
const SUB: u64 = 4;
const QUEUE_DEPTH: usize = 4;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Simulated seconds of client load and faults (then healing and the final checks).
    pub seconds: u64,
    /// 3 or 4.
    pub nodes: usize,
    pub faults: bool,
    /// Nodes acknowledge flushes without making anything durable: the run must fail.
    pub canary: bool,
}

impl SimConfig {
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p torus-net --example cluster_sim -- --seed {} --seconds {} --nodes {}{}{}",
            self.seed,
            self.seconds,
            self.nodes,
            if self.faults { "" } else { " --no-faults" },
            if self.canary { " --canary" } else { "" }
        )
    }
}

/// Faults injected, by kind.
pub const FAULT_KINDS: [&str; 11] = [
    "kill",
    "power-loss",
    "isolate",
    "partition",
    "one-way",
    "resets",
    "delay",
    "writer-move",
    "drain",
    "cascade",
    "duplicates",
];

#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub seeds: u64,
    pub sim_seconds: u64,
    pub events: u64,
    pub messages: u64,
    pub faults: [u64; 11],
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    /// Requests answered with an error (unavailable, not wrong).
    pub errors: u64,
    pub blocks_copied: u64,
    pub catch_up_rounds: u64,
    /// Rounds reviving PGs lost with every clean holder.
    pub revivals: u64,
    /// Of those, revivals that copied whole PGs from another holder's copy, which covers
    /// more (`replication::revival_source`), and revivals that waited for one to come back.
    pub revivals_whole: u64,
    pub revivals_waited: u64,
    /// Flushes whose map epoch was recorded (the first after each new map a node sees).
    pub flush_records: u64,
    /// Flushes recorded on a node's own disk after its lease ran out (`Cluster::fence_cut_off`),
    /// and records of them published by the next process.
    pub cut_records: u64,
    pub cut_records_published: u64,
    /// Nodes the leader marked out after being down `DOWN_OUT`.
    pub marked_out: u64,
    pub map_epochs: u64,
    /// Blocks compared across replicas at the end of a run.
    pub blocks_verified: u64,
    /// Longest time from healing to every PG clean, microseconds.
    pub converge_max: u64,
    /// Blocks freed by nodes that no longer held their PG.
    pub blocks_freed: u64,
}

impl SimReport {
    pub fn add(&mut self, o: &SimReport) {
        self.seeds += o.seeds;
        self.sim_seconds += o.sim_seconds;
        self.events += o.events;
        self.messages += o.messages;
        for (a, b) in self.faults.iter_mut().zip(o.faults) {
            *a += b;
        }
        self.writes_acked += o.writes_acked;
        self.reads_checked += o.reads_checked;
        self.flushes_acked += o.flushes_acked;
        self.errors += o.errors;
        self.blocks_copied += o.blocks_copied;
        self.catch_up_rounds += o.catch_up_rounds;
        self.revivals += o.revivals;
        self.revivals_whole += o.revivals_whole;
        self.revivals_waited += o.revivals_waited;
        self.flush_records += o.flush_records;
        self.cut_records += o.cut_records;
        self.cut_records_published += o.cut_records_published;
        self.marked_out += o.marked_out;
        self.map_epochs += o.map_epochs;
        self.blocks_verified += o.blocks_verified;
        self.converge_max = self.converge_max.max(o.converge_max);
        self.blocks_freed += o.blocks_freed;
    }

    pub fn faults_line(&self) -> String {
        FAULT_KINDS
            .iter()
            .zip(self.faults)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug)]
pub struct SimFailure {
    pub message: String,
    pub replay: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nreplay: {}", self.message, self.replay)
    }
}

fn pg_of(block: u64) -> u32 {
    placement_group(VOLUME, block * BLOCK_SIZE as u64 / CHUNK_SIZE, PGS)
}

/// A node's store: the engine's contract. Writes land in `volatile` (in order) until a flush
/// moves them to `durable`; a crash keeps or loses each unflushed write.
#[derive(Default)]
struct Store {
    durable: BTreeMap<u64, u64>,
    volatile: Vec<(u64, Option<u64>)>,
}

impl Store {
    fn get(&self, block: u64) -> Option<u64> {
        for (b, v) in self.volatile.iter().rev() {
            if *b == block {
                return *v;
            }
        }
        self.durable.get(&block).copied()
    }
    fn put(&mut self, block: u64, v: Option<u64>) {
        self.volatile.push((block, v));
    }
    fn flush(&mut self) {
        for (b, v) in self.volatile.drain(..) {
            match v {
                Some(v) => self.durable.insert(b, v),
                None => self.durable.remove(&b),
            };
        }
    }
    fn crash(&mut self, rng: &mut Rng) {
        for (b, v) in std::mem::take(&mut self.volatile) {
            if rng.chance(0.5) {
                match v {
                    Some(v) => self.durable.insert(b, v),
                    None => self.durable.remove(&b),
                };
            }
        }
    }
    /// (volume, block, checksum) of the PGs asked for, sorted; the version stands for the crc.
    fn list(&self, pgs: &BTreeSet<u32>) -> Vec<(u32, u64, u32)> {
        let mut all: BTreeMap<u64, u64> = self.durable.clone();
        for (b, v) in &self.volatile {
            match v {
                Some(v) => all.insert(*b, *v),
                None => all.remove(b),
            };
        }
        all.into_iter()
            .filter(|(b, _)| pgs.contains(&pg_of(*b)))
            .map(|(b, v)| (VOLUME, b, (v ^ (v >> 32)) as u32))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write(u64),
}

/// Who asked for a routed request.
#[derive(Debug, Clone)]
enum Origin {
    Client(u64),
    Peer(Responder),
}

#[derive(Debug, Clone)]
struct Req {
    origin: Origin,
    block: u64,
    kind: Kind,
    deadline: u64,
    from_peer: bool,
    writer: u64,
}

/// Where an answer goes back: the connection (client node, server node) and its generation.
#[derive(Debug, Clone, Copy)]
struct Responder {
    client: usize,
    server: usize,
    gen: u64,
    id: u64,
}

#[derive(Debug, Clone)]
enum Body {
    Write {
        block: u64,
        version: u64,
        epoch: u64,
        writer: u64,
    },
    CWrite {
        block: u64,
        version: u64,
        epoch: u64,
        writer: u64,
    },
    /// `dirty`: blocks the server wrote while catching up (a revival copies them).
    Read {
        block: u64,
        n: u32,
        dirty: bool,
    },
    Dirty {
        pgs: BTreeSet<u32>,
    },
    CRead {
        block: u64,
        epoch: u64,
    },
    Flush,
    List {
        pgs: BTreeSet<u32>,
        epoch: u64,
    },
}

#[derive(Debug, Clone, Default)]
struct Answer {
    status: u16,
    values: Vec<Option<u64>>,
    list: Vec<(u32, u64, u32)>,
}

fn answer(status: u16) -> Answer {
    Answer {
        status,
        ..Answer::default()
    }
}

#[derive(Debug)]
enum Msg {
    Request { r: Responder, body: Body },
    Reply { r: Responder, a: Answer },
}

/// What to do with an answer (from a peer or from the local store).
#[derive(Debug)]
enum Cont {
    Forwarded(Req),
    Copy(u64),
    LocalRead(Req),
    ReplicaApply(Responder, u64),
    Serve(Responder),
    FlushPart(u64),
    List(u64),
    DirtyList(u64),
    Nothing,
    CopyRead(u64, u64, u32),
    RoundFlush(u64),
}

struct Coord {
    tally: Tally,
    req: Req,
    epoch: u64,
}

struct FlushAll {
    tally: Tally,
    op: u64,
    deadline: u64,
}

struct Round {
    id: u64,
    /// The node copied from.
    source: usize,
    pgs: Vec<(u32, usize)>,
    map: ClusterMap,
    waiting: usize,
    failed: bool,
    unmap: Vec<u64>,
    /// A revival of lost PGs (`map::LostPg`): the sources still to copy dirty blocks from
    /// after `source`.
    revive: Option<Vec<usize>>,
    /// A revival's sources to copy whole PGs from first (`replication::revival_source`),
    /// with those PGs and this node's slots in them.
    full: Vec<(usize, Vec<(u32, usize)>)>,
    /// The PGs the listing being answered is about.
    listing: Vec<(u32, usize)>,
}

struct Pending {
    server: usize,
    sent: u64,
    cont: Cont,
}

struct Node {
    name: String,
    alive: bool,
    inc: u64,
    map: ClusterMap,
    lease_ok: u64,
    map_ok: u64,
    lease: u64,
    fence: Fence,
    writer: u64,
    store: Store,
    inflight: BTreeMap<u64, usize>,
    dirty: BTreeMap<u32, BTreeMap<u64, u64>>,
    /// Since when its dirty blocks are valid (`replication::DirtyEpochs`).
    dirty_epochs: replication::DirtyEpochs,
    recovering: BTreeSet<u32>,
    /// PGs whose blocks this node freed after they moved away (`Cluster::let_go`).
    let_go: BTreeSet<u32>,
    /// A `let_go` between its listing and its freeing (the recovery loop waits for it).
    freeing: bool,
    round: Option<Round>,
    /// By incarnation, the newest map epoch that process's flushes are recorded at (in etcd:
    /// it outlives the process; `replication::revival_source`), and the newest map epoch this
    /// process has seen, installed or in a write it applied.
    flushed: BTreeMap<u64, u64>,
    seen: u64,
    /// Replica writes under maps older than this are refused: set when the lease ran out
    /// (`Cluster::fence_cut_off`), so a flush then covers every write this process can have
    /// taken part in under the maps it has seen.
    floor: u64,
    /// The lease it held when it set `floor`.
    fenced_lease: u64,
    /// On its disk: the flush record of such a flush, which the next process publishes.
    cut_record: Option<(u64, u64)>,
    pending: BTreeMap<u64, Pending>,
    coords: HashMap<u64, Coord>,
    flushes: HashMap<u64, FlushAll>,
    next: u64,
}

enum Event {
    Deliver {
        to: usize,
        msg: Msg,
    },
    Local {
        node: usize,
        inc: u64,
        cont: Cont,
        a: Answer,
    },
    Retry {
        node: usize,
        inc: u64,
        req: Req,
    },
    Heartbeat(usize, u64),
    MapPoll(usize, u64),
    Recovery(usize, u64),
    ListWait {
        node: usize,
        inc: u64,
        r: Responder,
        pgs: BTreeSet<u32>,
        epoch: u64,
        until: u64,
    },
    FlushRetry {
        node: usize,
        inc: u64,
        op: u64,
        deadline: u64,
    },
    /// The second half of `let_go`: the listed blocks are freed (a write may have come in
    /// between, as between the cluster's listing and its zeroing).
    LetGoFree {
        node: usize,
        inc: u64,
        fresh: BTreeSet<u32>,
        blocks: Vec<u64>,
    },
    Timeouts,
    Leader,
    Client,
    Nemesis,
    Restart(usize),
    /// A cascade (fault `cascade`): once the map marks `cut` down, `victim` dies within
    /// `window`, and comes back after `hold`.
    Cascade {
        cut: usize,
        victim: usize,
        window: u64,
        hold: u64,
    },
    Crash(usize),
}

/// The fault in force (at most one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Isolated(usize),
    Partition(usize, usize),
    OneWay(usize, usize),
    Resets,
    Delay(usize),
}

/// What a block may read as now.
#[derive(Debug, Clone)]
struct BlockModel {
    /// Values a read may return (0: never written).
    possible: Vec<u64>,
    /// Every version written.
    history: Vec<u64>,
    /// What the block may hold durably as of the last completed flush (`possible` when it was
    /// issued), and every version written since that flush was issued: after a power loss of
    /// every node the block holds one of these.
    base: Vec<u64>,
    after_base: Vec<u64>,
    /// The same, for the flush in flight.
    next_base: Option<(Vec<u64>, Vec<u64>)>,
    writing: bool,
}

impl BlockModel {
    fn issue(&mut self, v: u64) {
        self.possible.push(v);
        self.history.push(v);
        self.after_base.push(v);
        if let Some((_, after)) = &mut self.next_base {
            after.push(v);
        }
    }
}

struct Etcd {
    map: ClusterMap,
    /// Node → (incarnation, lease id, expiry).
    leases: BTreeMap<String, (u64, u64, u64)>,
    /// The writer lock (a key on the holder's lease): holder node, lease id.
    writer: Option<(String, u64)>,
    /// The last writer epoch, recorded for good (`fence/VOLUME`).
    fence: u64,
    revision: u64,
}

struct Client {
    at: Option<(usize, u64)>,
    attach_at: u64,
    /// op → what, which block, and for a read what the block could hold when it was issued.
    in_flight: BTreeMap<u64, (Kind, u64, Vec<u64>)>,
    flush: Option<u64>,
    next_op: u64,
    next_version: u64,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    nodes: Vec<Node>,
    etcd: Etcd,
    /// (client node, server node) → generation; deliveries of an older one are dropped.
    conns: HashMap<(usize, usize), u64>,
    /// Last delivery time per direction (from, to, connection): TCP keeps order.
    last: HashMap<(usize, usize, usize, usize), u64>,
    fault: Fault,
    fault_until: u64,
    model: BTreeMap<u64, BlockModel>,
    client: Client,
    report: SimReport,
    loading: bool,
    failure: Option<String>,
}

fn info(name: &str, inc: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        peer_addr: String::new(),
        admin_addr: String::new(),
        nbd_addr: String::new(),
        cores: 1,
        capacity_bytes: 4 << 30,
        incarnation: inc,
    }
}

fn small_map() -> ClusterMap {
    let mut m = ClusterMap::new(REPLICAS);
    m.pg_count = PGS;
    m.pgs = vec![Vec::new(); PGS as usize];
    m
}

impl Sim {
    fn new(cfg: SimConfig) -> Sim {
        let nodes = (0..cfg.nodes)
            .map(|i| Node {
                name: format!("n{i}"),
                alive: true,
                inc: 1,
                map: small_map(),
                lease_ok: 0,
                map_ok: 0,
                lease: i as u64 + 1,
                fence: Fence::default(),
                writer: 0,
                store: Store::default(),
                inflight: BTreeMap::new(),
                dirty: BTreeMap::new(),
                dirty_epochs: replication::DirtyEpochs::default(),
                recovering: BTreeSet::new(),
                let_go: BTreeSet::new(),
                freeing: false,
                round: None,
                flushed: BTreeMap::new(),
                floor: 0,
                fenced_lease: 0,
                cut_record: None,
                seen: 0,
                pending: BTreeMap::new(),
                coords: HashMap::new(),
                flushes: HashMap::new(),
                next: 1,
            })
            .collect();
        let mut model = BTreeMap::new();
        for c in 0..CHUNKS {
            for k in 0..SUB {
                model.insert(
                    c * (CHUNK_SIZE / BLOCK_SIZE as u64) + k,
                    BlockModel {
                        possible: vec![0],
                        history: Vec::new(),
                        base: vec![0],
                        after_base: Vec::new(),
                        next_base: None,
                        writing: false,
                    },
                );
            }
        }
        let mut etcd = Etcd {
            map: small_map(),
            leases: BTreeMap::new(),
            writer: None,
            fence: 0,
            revision: 100,
        };
        // The cluster starts formed and clean, as after `torusd` started on every node.
        let live: BTreeMap<String, NodeInfo> = (0..cfg.nodes)
            .map(|i| (format!("n{i}"), info(&format!("n{i}"), 1)))
            .collect();
        etcd.map.reconcile(&live);
        for i in 0..cfg.nodes {
            let pgs: Vec<u32> = (0..PGS).collect();
            let epoch = etcd.map.epoch;
            etcd.map.mark_clean(&format!("n{i}"), 1, epoch, &pgs);
            etcd.leases
                .insert(format!("n{i}"), (1, i as u64 + 1, LEASE_TTL));
        }
        let mut sim = Sim {
            rng: Rng(cfg.seed ^ 0x5EED_C1A5_7E55),
            cfg,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes,
            etcd,
            conns: HashMap::new(),
            last: HashMap::new(),
            fault: Fault::None,
            fault_until: 0,
            model,
            client: Client {
                at: None,
                attach_at: 0,
                in_flight: BTreeMap::new(),
                flush: None,
                next_op: 1,
                next_version: 1,
            },
            report: SimReport::default(),
            loading: true,
            failure: None,
        };
        for i in 0..sim.cfg.nodes {
            sim.nodes[i].map = sim.etcd.map.clone();
            sim.start_ticks(i);
        }
        sim.at(LEADER_TICK, Event::Leader);
        sim.at(SEC, Event::Timeouts);
        sim.at(0, Event::Client);
        if sim.cfg.faults {
            sim.at(SEC, Event::Nemesis);
        }
        sim
    }

    fn at(&mut self, delay: u64, e: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), e);
    }

    fn start_ticks(&mut self, i: usize) {
        let inc = self.nodes[i].inc;
        let j = self.rng.below(100 * MS);
        self.at(j, Event::Heartbeat(i, inc));
        let j = self.rng.below(MAP_POLL);
        self.at(j, Event::MapPoll(i, inc));
        let j = self.rng.below(RECOVERY_TICK);
        self.at(j, Event::Recovery(i, inc));
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.failure = Some(format!("at {:.3} s: {what}", self.now as f64 / SEC as f64));
        }
    }

    // ---- the network ----

    fn reaches_etcd(&self, i: usize) -> bool {
        self.nodes[i].alive && self.fault != Fault::Isolated(i)
    }

    fn blocked(&self, from: usize, to: usize) -> bool {
        match self.fault {
            Fault::Isolated(n) => from == n || to == n,
            Fault::Partition(a, b) => (from == a && to == b) || (from == b && to == a),
            Fault::OneWay(a, b) => from == a && to == b,
            _ => false,
        }
    }

    fn gen(&self, client: usize, server: usize) -> u64 {
        self.conns.get(&(client, server)).copied().unwrap_or(0)
    }

    /// Closes a connection: what is in flight on it is lost, and the client side fails every
    /// request it holds on it with RETRY (as the peer service does).
    fn reset(&mut self, client: usize, server: usize) {
        *self.conns.entry((client, server)).or_insert(0) += 1;
        let ids: Vec<u64> = self.nodes[client]
            .pending
            .iter()
            .filter(|(_, p)| p.server == server)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let p = self.nodes[client].pending.remove(&id).expect("listed");
            self.cont(client, p.cont, answer(status::RETRY));
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        self.report.messages += 1;
        let r = match &msg {
            Msg::Request { r, .. } | Msg::Reply { r, .. } => *r,
        };
        if r.gen != self.gen(r.client, r.server) || !self.nodes[to].alive {
            return;
        }
        if self.blocked(from, to) {
            return; // silently lost: the sender's timeout notices
        }
        if self.fault == Fault::Resets && self.rng.chance(0.02) {
            // The request arrives but the connection dies before its answer: sent again.
            if matches!(msg, Msg::Reply { .. }) {
                self.report.faults[10] += 1;
            }
            return self.reset(r.client, r.server);
        }
        let mut delay = self.rng.range(20, 300);
        if self.rng.chance(0.01) {
            delay += self.rng.below(20 * MS);
        }
        if self.fault == Fault::Delay(from) || self.fault == Fault::Delay(to) {
            delay += self.rng.below(400 * MS);
        }
        let key = (from, to, r.client, r.server);
        let when = (self.now + delay).max(self.last.get(&key).copied().unwrap_or(0));
        self.last.insert(key, when);
        self.seq += 1;
        self.events
            .insert((when, self.seq), Event::Deliver { to, msg });
    }

    fn request(&mut self, from: usize, to: usize, body: Body, cont: Cont) {
        let id = self.nodes[from].next;
        self.nodes[from].next += 1;
        let gen = self.gen(from, to);
        self.nodes[from].pending.insert(
            id,
            Pending {
                server: to,
                sent: self.now,
                cont,
            },
        );
        let r = Responder {
            client: from,
            server: to,
            gen,
            id,
        };
        self.send(from, to, Msg::Request { r, body });
    }

    fn respond(&mut self, r: Responder, a: Answer) {
        self.send(r.server, r.client, Msg::Reply { r, a });
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    // ---- a node's local store ----

    fn local(&mut self, i: usize, cont: Cont, a: Answer) {
        let inc = self.nodes[i].inc;
        let d = self.rng.range(10, 200);
        self.at(
            d,
            Event::Local {
                node: i,
                inc,
                cont,
                a,
            },
        );
    }

    /// With TORUS_SIM_TRACE=BLOCK (or `all`), prints what happens (to that block).
    fn trace(&self, block: Option<u64>, what: impl FnOnce() -> String) {
        static TRACE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let Some(t) = TRACE.get_or_init(|| std::env::var("TORUS_SIM_TRACE").ok()) else {
            return;
        };
        if t == "all" || block.is_none() || block.map(|b| b.to_string()).as_deref() == Some(t) {
            eprintln!("{:>10.6} {}", self.now as f64 / SEC as f64, what());
        }
    }

    fn local_write(&mut self, i: usize, block: u64, v: Option<u64>, cont: Cont) {
        self.trace(Some(block), || {
            format!(
                "n{i} store block {block} = {v:?} ({cont:?}) map {} pg {}",
                self.nodes[i].map.epoch,
                pg_of(block)
            )
        });
        self.nodes[i].store.put(block, v);
        self.local(i, cont, answer(status::OK));
    }

    fn local_read(&mut self, i: usize, block: u64, n: u32, cont: Cont) {
        let values = (0..n as u64)
            .map(|k| self.nodes[i].store.get(block + k))
            .collect();
        self.local(
            i,
            cont,
            Answer {
                status: status::OK,
                values,
                list: Vec::new(),
            },
        );
    }

    /// Cluster::flush_local: the store's flush, then, if this process has seen a newer map
    /// since its last recorded flush, the record of that epoch in etcd before the flush is
    /// answered (`replication::revival_source`).
    fn local_flush(&mut self, i: usize, cont: Cont) {
        if !self.cfg.canary {
            self.nodes[i].store.flush();
        }
        let n = &self.nodes[i];
        let seen = n.seen;
        if n.flushed.get(&n.inc).is_none_or(|&f| f < seen) {
            if !self.reaches_etcd(i) {
                return self.local(i, cont, answer(status::RETRY));
            }
            let n = &mut self.nodes[i];
            n.flushed.insert(n.inc, seen);
            self.report.flush_records += 1;
        }
        self.local(i, cont, answer(status::OK));
    }

    fn lease_fresh(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        let limit = LEASE_TTL * 8 / 10;
        self.now.saturating_sub(n.lease_ok) < limit && self.now.saturating_sub(n.map_ok) < limit
    }

    fn inflight_done(&mut self, i: usize, epoch: u64) {
        let inflight = &mut self.nodes[i].inflight;
        if let Some(n) = inflight.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                inflight.remove(&epoch);
            }
        }
    }

    // ---- the data path (cluster/data_path.rs: submit, forward, coordinate, read_elsewhere) ----

    fn retry_later(&mut self, i: usize, req: Req) {
        let zombie = matches!(req.kind, Kind::Write(_)) && self.nodes[i].writer != req.writer;
        if !req.from_peer && zombie {
            return self.done(i, req, answer(status::FENCED));
        }
        if req.from_peer || self.now >= req.deadline {
            return self.done(i, req, answer(status::RETRY));
        }
        let inc = self.nodes[i].inc;
        self.at(RETRY_DELAY, Event::Retry { node: i, inc, req });
    }

    fn done(&mut self, i: usize, req: Req, a: Answer) {
        match req.origin {
            Origin::Client(op) => {
                if self.client.at == Some((i, self.nodes[i].inc)) {
                    self.client_done(op, a);
                }
            }
            Origin::Peer(r) => self.respond(r, a),
        }
    }

    fn submit(&mut self, i: usize, req: Req) {
        if !self.lease_fresh(i) {
            return self.retry_later(i, req);
        }
        let pg = pg_of(req.block);
        let n = &self.nodes[i];
        let route = replication::route(
            &n.map,
            &n.name,
            n.inc,
            pg,
            REPLICAS,
            matches!(req.kind, Kind::Write(_)),
            req.from_peer,
            n.writer > 0,
        );
        match route {
            Route::Retry => self.retry_later(i, req),
            Route::Refuse => self.done(i, req, answer(status::RETRY)),
            Route::Forward(primary) => {
                let Some(p) = self.node_index(&primary) else {
                    return self.retry_later(i, req);
                };
                let epoch = self.nodes[i].map.epoch;
                let body = match req.kind {
                    Kind::Read => Body::CRead {
                        block: req.block,
                        epoch,
                    },
                    Kind::Write(version) => Body::CWrite {
                        block: req.block,
                        version,
                        epoch,
                        writer: req.writer,
                    },
                };
                self.request(i, p, body, Cont::Forwarded(req));
            }
            Route::Read => {
                let block = req.block;
                self.local_read(i, block, 1, Cont::LocalRead(req));
            }
            Route::Write(plan) => {
                let Kind::Write(version) = req.kind else {
                    unreachable!("route plans writes only")
                };
                self.coordinate(i, req, version, plan.remote);
            }
        }
    }

    fn coordinate(&mut self, i: usize, req: Req, version: u64, remote: Vec<String>) {
        let epoch = self.nodes[i].map.epoch;
        let pg = pg_of(req.block);
        let admitted = replication::admit_write(
            epoch,
            epoch,
            &mut self.nodes[i].fence,
            VOLUME,
            Some(pg),
            req.writer,
        );
        match admitted {
            Ok(()) => {}
            Err(status::RETRY) => return self.retry_later(i, req),
            Err(s) => return self.done(i, req, answer(s)),
        }
        *self.nodes[i].inflight.entry(epoch).or_insert(0) += 1;
        let id = self.nodes[i].next;
        self.nodes[i].next += 1;
        let (block, writer) = (req.block, req.writer);
        self.nodes[i].coords.insert(
            id,
            Coord {
                tally: Tally::new(remote.len() + 1),
                req,
                epoch,
            },
        );
        // send_local_tracked: a PG being caught up or scrubbed here remembers the block.
        if let Some(set) = self.nodes[i].dirty.get_mut(&pg_of(block)) {
            set.insert(block, epoch);
        }
        self.local_write(i, block, Some(version), Cont::Copy(id));
        for name in remote {
            match self.node_index(&name) {
                Some(to) => self.request(
                    i,
                    to,
                    Body::Write {
                        block,
                        version,
                        epoch,
                        writer,
                    },
                    Cont::Copy(id),
                ),
                None => self.cont(i, Cont::Copy(id), answer(status::RETRY)),
            }
        }
    }

    fn cont(&mut self, i: usize, cont: Cont, a: Answer) {
        match cont {
            Cont::Forwarded(req) if a.status == status::RETRY => self.retry_later(i, req),
            Cont::Forwarded(req) => self.done(i, req, a),
            Cont::Copy(id) => {
                let Some(c) = self.nodes[i].coords.get_mut(&id) else {
                    return;
                };
                let Some(worst) = c.tally.add(a.status) else {
                    return;
                };
                let c = self.nodes[i].coords.remove(&id).expect("present");
                self.inflight_done(i, c.epoch);
                match worst {
                    status::RETRY => self.retry_later(i, c.req),
                    s => self.done(i, c.req, answer(s)),
                }
            }
            Cont::LocalRead(req) => self.done(i, req, a),
            Cont::ReplicaApply(r, epoch) => {
                self.inflight_done(i, epoch);
                self.respond(r, a);
            }
            Cont::Serve(r) => self.respond(r, a),
            Cont::FlushPart(id) => {
                let Some(f) = self.nodes[i].flushes.get_mut(&id) else {
                    return;
                };
                let Some(worst) = f.tally.add(a.status) else {
                    return;
                };
                let f = self.nodes[i].flushes.remove(&id).expect("present");
                match worst {
                    status::OK => self.flush_done(i, f.op, answer(status::OK)),
                    status::RETRY if self.now < f.deadline => {
                        let inc = self.nodes[i].inc;
                        let (op, deadline) = (f.op, f.deadline);
                        self.at(
                            RETRY_DELAY * 3,
                            Event::FlushRetry {
                                node: i,
                                inc,
                                op,
                                deadline,
                            },
                        );
                    }
                    s => self.flush_done(i, f.op, answer(s)),
                }
            }
            Cont::List(id) => self.round_listed(i, id, a),
            Cont::DirtyList(id) => self.revive_listed(i, id, a),
            Cont::Nothing => {}
            Cont::CopyRead(id, block, n) => self.round_copied(i, id, block, n, a),
            Cont::RoundFlush(id) => self.round_flushed(i, id, a),
        }
    }

    fn flush_all(&mut self, i: usize, op: u64, deadline: u64) {
        let ups: Vec<usize> = (0..self.nodes.len())
            .filter(|&k| self.nodes[i].map.up(&self.nodes[k].name))
            .collect();
        if ups.is_empty() {
            return self.flush_done(i, op, answer(status::OK));
        }
        let id = self.nodes[i].next;
        self.nodes[i].next += 1;
        let tally = Tally::new(ups.len());
        let f = FlushAll {
            tally,
            op,
            deadline,
        };
        self.nodes[i].flushes.insert(id, f);
        for k in ups {
            if k == i {
                self.local_flush(i, Cont::FlushPart(id));
            } else {
                self.request(i, k, Body::Flush, Cont::FlushPart(id));
            }
        }
    }

    fn flush_done(&mut self, i: usize, op: u64, a: Answer) {
        if self.client.at == Some((i, self.nodes[i].inc)) {
            self.client_done(op, a);
        }
    }

    /// A peer's request arrives (ClusterHandler::handle).
    fn serve(&mut self, i: usize, r: Responder, body: Body) {
        let map_epoch = self.nodes[i].map.epoch;
        match body {
            Body::Write {
                block,
                version,
                epoch,
                writer,
            } => {
                let n = &mut self.nodes[i];
                let pg = pg_of(block);
                if let Err(s) = replication::admit_write(
                    map_epoch.max(n.floor),
                    epoch,
                    &mut n.fence,
                    VOLUME,
                    Some(pg),
                    writer,
                ) {
                    return self.respond(r, answer(s));
                }
                // apply_replica
                *n.inflight.entry(epoch).or_insert(0) += 1;
                let pg = pg_of(block);
                let clean = replication::replica_is_clean(
                    &n.map,
                    epoch,
                    pg,
                    &n.name,
                    n.inc,
                    n.recovering.contains(&pg),
                );
                if !clean {
                    // Cluster::apply_replica: a copy for a PG freed here, under a newer map.
                    if !replication::holds(&n.map, &n.name, pg) {
                        n.let_go.remove(&pg);
                    }
                    n.dirty.entry(pg).or_default().insert(block, epoch);
                }
                n.seen = n.seen.max(epoch);
                self.local_write(i, block, Some(version), Cont::ReplicaApply(r, epoch));
            }
            Body::CWrite {
                block,
                version,
                epoch,
                writer,
            } => {
                if epoch < map_epoch {
                    return self.respond(r, answer(status::RETRY));
                }
                if !self.nodes[i].fence.admit(VOLUME, writer) {
                    return self.respond(r, answer(status::FENCED));
                }
                let req = Req {
                    origin: Origin::Peer(r),
                    block,
                    kind: Kind::Write(version),
                    deadline: self.now + PEER_REQUEST_DEADLINE,
                    from_peer: true,
                    writer,
                };
                self.submit(i, req);
            }
            Body::CRead { block, epoch } => {
                if epoch < map_epoch {
                    return self.respond(r, answer(status::RETRY));
                }
                let req = Req {
                    origin: Origin::Peer(r),
                    block,
                    kind: Kind::Read,
                    deadline: self.now + PEER_REQUEST_DEADLINE,
                    from_peer: true,
                    writer: 0,
                };
                self.submit(i, req);
            }
            Body::Read { block, n, dirty } => {
                let pg = pg_of(block);
                let serves = if dirty {
                    let valid = self.valid_dirty(i, pg);
                    (block..block + n as u64).all(|b| valid.contains(&b))
                } else {
                    let me = &self.nodes[i];
                    replication::serves_copies(&me.map, &me.name, me.inc, [pg].into_iter())
                };
                if !serves {
                    return self.respond(r, answer(status::RETRY));
                }
                self.local_read(i, block, n, Cont::Serve(r))
            }
            Body::Dirty { pgs } => {
                let mut list = Vec::new();
                for pg in pgs {
                    list.extend(self.valid_dirty(i, pg).into_iter().map(|b| (VOLUME, b, 0)));
                }
                self.respond(
                    r,
                    Answer {
                        status: status::OK,
                        values: Vec::new(),
                        list,
                    },
                );
            }
            Body::Flush => self.local_flush(i, Cont::Serve(r)),
            Body::List { pgs, epoch } => self.serve_list(i, r, pgs, epoch, self.now + LIST_WAIT),
        }
    }

    /// Blocks of `pg` written here while catching up, since this node has been up without a
    /// break (`Cluster::valid_dirty`).
    fn valid_dirty(&self, i: usize, pg: u32) -> Vec<u64> {
        let n = &self.nodes[i];
        n.dirty
            .get(&pg)
            .into_iter()
            .flatten()
            .filter(|(_, epoch)| **epoch >= n.dirty_epochs.valid_from)
            .map(|(b, _)| *b)
            .collect()
    }

    fn serve_list(&mut self, i: usize, r: Responder, pgs: BTreeSet<u32>, epoch: u64, until: u64) {
        let n = &self.nodes[i];
        let oldest = n.inflight.keys().next().copied();
        if replication::list_ready(n.map.epoch, epoch, oldest) {
            if !replication::serves_copies(&n.map, &n.name, n.inc, pgs.iter().copied()) {
                return self.respond(r, answer(status::RETRY));
            }
            let list = n.store.list(&pgs);
            return self.respond(
                r,
                Answer {
                    status: status::OK,
                    values: Vec::new(),
                    list,
                },
            );
        }
        if self.now > until {
            return self.respond(r, answer(status::RETRY));
        }
        let inc = n.inc;
        self.at(
            10 * MS,
            Event::ListWait {
                node: i,
                inc,
                r,
                pgs,
                epoch,
                until,
            },
        );
    }

    // ---- control loops (cluster/membership.rs, leader.rs, recovery.rs: heartbeat, map poll, leader, catch-up) ----

    fn install_map(&mut self, i: usize, map: ClusterMap) {
        if map.epoch > self.nodes[i].map.epoch {
            self.trace(None, || {
                format!("n{i} installs map {} {:?}", map.epoch, map.health())
            });
            // As `Cluster::install_map`: the map first, then the flush, which records its epoch
            // (it covers every write received under older maps).
            let lost = replication::lost_a_node(&self.nodes[i].map, &map);
            self.nodes[i].seen = self.nodes[i].seen.max(map.epoch);
            self.nodes[i].map = map;
            if lost {
                self.local_flush(i, Cont::Nothing);
            }
            // A PG held here again is freed again when it moves away later.
            let n = &mut self.nodes[i];
            let (map, me) = (&n.map, &n.name);
            n.let_go.retain(|&pg| !replication::holds(map, me, pg));
            // Requests waiting on a node no longer up fail now (their links are closed).
            for k in 0..self.nodes.len() {
                if k != i && !self.nodes[i].map.up(&self.nodes[k].name) {
                    self.reset(i, k);
                }
            }
        }
        let n = &mut self.nodes[i];
        let names_me = replication::names_me(&n.map, &n.name, n.inc);
        let (up_since, after_break) = n
            .map
            .nodes
            .get(&n.name)
            .map_or((0, false), |m| (m.up_since, m.after_break));
        if n.dirty_epochs.observe(names_me, up_since, after_break) {
            for set in n.dirty.values_mut() {
                set.retain(|_, epoch| *epoch >= up_since);
            }
        }
        let (map, name, inc, recovering) = (&n.map, &n.name, n.inc, &n.recovering);
        n.dirty
            .retain(|pg, _| replication::keep_dirty(map, *pg, name, inc, recovering.contains(pg)));
    }

    fn leader(&mut self) {
        if (0..self.nodes.len()).any(|i| self.reaches_etcd(i)) {
            let now = self.now;
            self.etcd.leases.retain(|_, (_, _, expires)| *expires > now);
            let live: BTreeMap<String, NodeInfo> = self
                .etcd
                .leases
                .iter()
                .map(|(name, (inc, _, _))| (name.clone(), info(name, *inc)))
                .collect();
            if self.etcd.map.reconcile_at(&live, now / MS) {
                self.report.map_epochs += 1;
            }
            self.mark_out_long_down();
        }
        self.at(LEADER_TICK, Event::Leader);
    }

    /// Cluster::mark_out_long_down: a node down `DOWN_OUT` is marked out when the map allows,
    /// counted from the time the map records it went down (`reconcile_at`).
    fn mark_out_long_down(&mut self) {
        let now_ms = self.now / MS;
        let due: Vec<String> = self
            .etcd
            .map
            .down_nodes(now_ms)
            .filter(|&(_, ms)| ms >= DOWN_OUT / MS)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            if self.etcd.map.mark_out(&name).is_ok() {
                self.report.marked_out += 1;
                self.report.map_epochs += 1;
                self.trace(None, || format!("leader marks {name} out"));
            }
        }
    }

    /// Cluster::let_go_of_moved_pgs: lists the blocks of the PGs this node holds no slot of
    /// once no write of an older map is in flight here; `let_go_free` frees them a little
    /// later, keeping a PG that came back or whose block a write reached meanwhile.
    fn let_go(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let (map, me) = (&n.map, &n.name);
        n.let_go.retain(|&pg| !replication::holds(map, me, pg));
        let gone = &n.let_go;
        let fresh: BTreeSet<u32> = replication::let_go_candidates(map, me, |pg| gone.contains(&pg))
            .into_iter()
            .collect();
        let oldest = n.inflight.keys().next().copied();
        if fresh.is_empty() || !replication::list_ready(map.epoch, map.epoch, oldest) {
            return;
        }
        let blocks = n
            .store
            .list(&fresh)
            .into_iter()
            .map(|(_, b, _)| b)
            .collect();
        n.freeing = true;
        let inc = n.inc;
        // Listing every core's blocks takes a while; now and then much longer (busy cores).
        let delay = if self.rng.chance(0.1) {
            self.rng.range(2 * MS, 100 * MS)
        } else {
            self.rng.range(10, 2 * MS)
        };
        self.at(
            delay,
            Event::LetGoFree {
                node: i,
                inc,
                fresh,
                blocks,
            },
        );
    }

    fn let_go_free(&mut self, i: usize, fresh: BTreeSet<u32>, blocks: Vec<u64>) {
        let n = &mut self.nodes[i];
        n.freeing = false;
        let mut kept = BTreeSet::new();
        let mut freed = 0;
        for block in blocks {
            let pg = pg_of(block);
            let written = n.dirty.get(&pg).is_some_and(|d| d.contains_key(&block));
            if replication::keep_moved(&n.map, &n.name, pg, written) {
                kept.insert(pg);
                continue;
            }
            n.store.put(block, None);
            freed += 1;
        }
        n.let_go.extend(fresh.difference(&kept));
        self.report.blocks_freed += freed;
        if freed > 0 {
            self.trace(None, || {
                format!("n{i} frees {freed} blocks of PGs that moved away")
            });
        }
    }

    fn recovery(&mut self, i: usize) {
        let n = &self.nodes[i];
        let me_ok = n
            .map
            .nodes
            .get(&n.name)
            .is_some_and(|m| m.up && m.info.incarnation == n.inc);
        if n.round.is_some() || n.freeing || !me_ok || !self.lease_fresh(i) {
            return;
        }
        let reviving = n.map.reviving(&n.name, n.inc);
        if !reviving.is_empty() {
            return self.revive(i, reviving);
        }
        let turn = self.report.catch_up_rounds as usize;
        let Some((source, pgs)) = replication::recovery_round(&n.map, &n.name, turn) else {
            return self.let_go(i);
        };
        let Some(s) = self.node_index(&source) else {
            return;
        };
        let id = self.nodes[i].next;
        self.nodes[i].next += 1;
        let map = self.nodes[i].map.clone();
        let n = &mut self.nodes[i];
        for (pg, _) in &pgs {
            n.recovering.insert(*pg);
            n.dirty.entry(*pg).or_default();
        }
        let set: BTreeSet<u32> = pgs.iter().map(|p| p.0).collect();
        let epoch = map.epoch;
        let pgs_listed = pgs.clone();
        n.round = Some(Round {
            id,
            source: s,
            pgs,
            map,
            waiting: 0,
            failed: false,
            unmap: Vec::new(),
            revive: None,
            full: Vec::new(),
            listing: pgs_listed,
        });
        self.report.catch_up_rounds += 1;
        self.request(i, s, Body::List { pgs: set, epoch }, Cont::List(id));
    }

    /// Cluster::revive: copy whole PGs from the copy that covers the most where that is not
    /// this node's (`replication::revival_source`; it waits while that copy is down), then
    /// each source's dirty blocks of the lost PGs, then flush and mark them revived. With
    /// TORUS_SIM_REVIVE_OWN_DISK set, every revival starts from this node's own disk, as
    /// before fix 14 (README, Reliability): the runs that then fail show what the choice is
    /// for.
    fn revive(&mut self, i: usize, reviving: Vec<(u32, Vec<String>)>) {
        let map = self.nodes[i].map.clone();
        let me = self.nodes[i].name.clone();
        let mut full: BTreeMap<usize, Vec<(u32, usize)>> = BTreeMap::new();
        let nodes = &self.nodes;
        let flushed = |name: &str, inc: u64| {
            nodes
                .iter()
                .find(|n| n.name == name)
                .and_then(|n| n.flushed.get(&inc).copied())
                .unwrap_or(0)
        };
        let own_disk = std::env::var_os("TORUS_SIM_REVIVE_OWN_DISK").is_some();
        let choices: Vec<(u32, Result<Option<String>, String>)> = reviving
            .iter()
            .filter(|_| !own_disk)
            .map(|(pg, _)| (*pg, replication::revival_source(&map, *pg, &me, flushed)))
            .collect();
        for (pg, source) in choices {
            match source {
                Ok(None) => {}
                Ok(Some(z)) => {
                    let Some(k) = self.node_index(&z) else {
                        continue;
                    };
                    let slot = map.slot_of(pg, &me).unwrap_or(0);
                    full.entry(k).or_default().push((pg, slot));
                }
                Err(why) => {
                    self.trace(None, || format!("n{i} revival waits: {why}"));
                    self.report.revivals_waited += 1;
                    return;
                }
            }
        }
        let mut sources: Vec<usize> = reviving
            .iter()
            .flat_map(|(_, from)| from.iter())
            .filter(|s| map.up(s))
            .filter_map(|s| self.node_index(s))
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let id = self.nodes[i].next;
        self.nodes[i].next += 1;
        let pgs: Vec<(u32, usize)> = reviving.iter().map(|(pg, _)| (*pg, 0)).collect();
        let full: Vec<(usize, Vec<(u32, usize)>)> = full.into_iter().collect();
        self.trace(None, || {
            format!("n{i} revives PGs {pgs:?} from {sources:?}, whole PGs from {full:?}")
        });
        self.report.revivals += 1;
        self.report.revivals_whole += u64::from(!full.is_empty());
        self.nodes[i].round = Some(Round {
            id,
            source: i,
            pgs,
            map,
            waiting: 0,
            failed: false,
            unmap: Vec::new(),
            revive: Some(sources),
            full,
            listing: Vec::new(),
        });
        self.revive_next(i, id);
    }

    fn revive_next(&mut self, i: usize, id: u64) {
        let round = self.nodes[i].round.as_mut().expect("a round");
        if let Some((source, pgs)) = round.full.pop() {
            round.source = source;
            let set: BTreeSet<u32> = pgs.iter().map(|p| p.0).collect();
            round.listing = pgs;
            let epoch = round.map.epoch;
            return self.request(i, source, Body::List { pgs: set, epoch }, Cont::List(id));
        }
        let Some(source) = round.revive.as_mut().and_then(|s| s.pop()) else {
            return self.round_unmap(i);
        };
        round.source = source;
        let pgs: BTreeSet<u32> = round.pgs.iter().map(|p| p.0).collect();
        self.request(i, source, Body::Dirty { pgs }, Cont::DirtyList(id));
    }

    fn revive_listed(&mut self, i: usize, id: u64, a: Answer) {
        if self.round_of(i, id).is_none() {
            return;
        }
        if a.status != status::OK {
            return self.round_end(i);
        }
        let blocks: Vec<(u32, u64)> = a.list.iter().map(|&(v, b, _)| (v, b)).collect();
        let runs = replication::copy_runs(&blocks);
        let round = self.nodes[i].round.as_mut().expect("checked");
        round.waiting = runs.len();
        let source = round.source;
        if runs.is_empty() {
            return self.revive_next(i, id);
        }
        for (_, block, n) in runs {
            let body = Body::Read {
                block,
                n,
                dirty: true,
            };
            self.request(i, source, body, Cont::CopyRead(id, block, n));
        }
    }

    fn round_of(&mut self, i: usize, id: u64) -> Option<&mut Round> {
        self.nodes[i].round.as_mut().filter(|r| r.id == id)
    }

    fn round_end(&mut self, i: usize) {
        if let Some(round) = self.nodes[i].round.take() {
            for (pg, _) in &round.pgs {
                self.nodes[i].recovering.remove(pg);
            }
        }
    }

    fn round_listed(&mut self, i: usize, id: u64, a: Answer) {
        if self.round_of(i, id).is_none() {
            return;
        }
        if a.status != status::OK {
            return self.round_end(i);
        }
        let round = self.nodes[i].round.as_ref().expect("checked");
        let set: BTreeSet<u32> = round.listing.iter().map(|p| p.0).collect();
        let wanted = Wanted::new(
            &round.map,
            &self.nodes[round.source].name,
            &round.listing,
            HashMap::from([(VOLUME, REPLICAS)]),
        );
        let local = self.nodes[i].store.list(&set);
        let (fetch, unmap) = replication::catch_up_plan(&a.list, &local, &wanted);
        let runs = replication::copy_runs(&fetch);
        self.trace(None, || {
            format!(
                "n{i} catch-up round {id} from n{} PGs {:?}: listed {} here {}, fetch {:?} unmap {:?} dirty {:?}",
                round.source, round.pgs, a.list.len(), local.len(), fetch, unmap, self.nodes[i].dirty
            )
        });
        let source = round.source;
        let round = self.nodes[i].round.as_mut().expect("checked");
        round.unmap = unmap.into_iter().map(|(_, b)| b).collect();
        round.waiting = runs.len();
        if runs.is_empty() {
            return self.round_copied_all(i, id);
        }
        for (_, block, n) in runs {
            let body = Body::Read {
                block,
                n,
                dirty: false,
            };
            self.request(i, source, body, Cont::CopyRead(id, block, n));
        }
    }

    fn round_copied(&mut self, i: usize, id: u64, block: u64, n: u32, a: Answer) {
        let Some(round) = self.round_of(i, id) else {
            return;
        };
        round.waiting -= 1;
        if a.status != status::OK || a.values.len() != n as usize {
            round.failed = true;
        } else {
            let pg = pg_of(block);
            let spans = {
                let set = self.nodes[i].dirty.get(&pg);
                replication::clean_spans(n, |k| {
                    set.is_some_and(|s| s.contains_key(&(block + k as u64)))
                })
            };
            for (s, e) in spans {
                for k in s..e {
                    let b = block + k as u64;
                    self.trace(Some(b), || {
                        format!(
                            "n{i} catch-up copies block {b} = {:?}",
                            a.values[k as usize]
                        )
                    });
                    self.nodes[i].store.put(b, a.values[k as usize]);
                    self.report.blocks_copied += 1;
                }
            }
        }
        let round = self.nodes[i].round.as_ref().expect("checked");
        if round.waiting > 0 {
            return;
        }
        if round.failed {
            return self.round_end(i);
        }
        self.round_copied_all(i, id);
    }

    /// A catch-up round unmaps and flushes; a revival unmaps what the whole-PG source lacked
    /// (before copying dirty blocks from the others) and goes on.
    fn round_copied_all(&mut self, i: usize, id: u64) {
        if self.nodes[i]
            .round
            .as_ref()
            .is_some_and(|r| r.revive.is_some())
        {
            self.unmap_listed(i);
            return self.revive_next(i, id);
        }
        self.round_unmap(i);
    }

    fn round_unmap(&mut self, i: usize) {
        let id = self.unmap_listed(i);
        self.local_flush(i, Cont::RoundFlush(id));
    }

    fn unmap_listed(&mut self, i: usize) -> u64 {
        let round = self.nodes[i].round.as_mut().expect("a round");
        let id = round.id;
        for b in std::mem::take(&mut round.unmap) {
            // unmap_local: not if a newer write reached the block meanwhile.
            let dirty = self.nodes[i]
                .dirty
                .get(&pg_of(b))
                .is_some_and(|s| s.contains_key(&b));
            if !dirty {
                self.trace(Some(b), || format!("n{i} catch-up unmaps block {b}"));
                self.nodes[i].store.put(b, None);
            }
        }
        id
    }

    fn round_flushed(&mut self, i: usize, id: u64, a: Answer) {
        if self.round_of(i, id).is_none() {
            return;
        }
        if a.status == status::OK && self.reaches_etcd(i) {
            let round = self.nodes[i].round.as_ref().expect("checked");
            let list: Vec<u32> = round.pgs.iter().map(|p| p.0).collect();
            let (name, inc) = (self.nodes[i].name.clone(), self.nodes[i].inc);
            let listed_at = round.map.epoch;
            let marked = if round.revive.is_some() {
                self.etcd.map.mark_revived(&name, inc, &list)
            } else {
                self.etcd.map.mark_clean(&name, inc, listed_at, &list)
            };
            if marked {
                self.report.map_epochs += 1;
                let m = self.etcd.map.clone();
                self.install_map(i, m);
            }
        }
        self.round_end(i);
    }

    // ---- the client ----

    fn attach(&mut self) {
        let alive: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.reaches_etcd(i))
            .collect();
        if alive.is_empty() {
            return;
        }
        let i = alive[self.rng.below(alive.len() as u64) as usize];
        let name = self.nodes[i].name.clone();
        let (inc, lease) = (self.nodes[i].inc, self.nodes[i].lease);
        let free = match &self.etcd.writer {
            None => true,
            Some((holder, id)) => self
                .etcd
                .leases
                .get(holder)
                .is_none_or(|(_, l, exp)| l != id || *exp <= self.now),
        };
        if !free {
            return;
        }
        self.etcd.revision += 1;
        let epoch = self.etcd.revision;
        self.etcd.writer = Some((name, lease));
        self.etcd.fence = epoch;
        self.nodes[i].fence.admit(VOLUME, epoch);
        self.nodes[i].writer = epoch;
        self.client.at = Some((i, inc));
    }

    fn detach(&mut self) {
        // Outstanding requests are lost with the connection: their outcome stays unknown.
        self.client.in_flight.clear();
        self.client.flush = None;
        if let Some((i, inc)) = self.client.at.take() {
            if self.nodes[i].inc == inc {
                self.nodes[i].writer = 0;
            }
            if self.reaches_etcd(i) {
                self.etcd.writer = None;
            }
        }
        for m in self.model.values_mut() {
            m.writing = false;
        }
        self.client.attach_at = self.now + self.rng.range(50 * MS, SEC);
    }

    fn client_step(&mut self) {
        if self.failure.is_some() {
            return;
        }
        if let Some((i, inc)) = self.client.at {
            if !self.nodes[i].alive || self.nodes[i].inc != inc {
                self.detach();
            }
        }
        if self.client.at.is_none() && self.now >= self.client.attach_at {
            self.attach();
        }
        if let Some((i, _)) = self.client.at {
            while self.loading && self.client.in_flight.len() < QUEUE_DEPTH {
                let op = self.client.next_op;
                self.client.next_op += 1;
                let roll = self.rng.below(100);
                if roll < 5 && self.client.flush.is_none() {
                    self.client.flush = Some(op);
                    for m in self.model.values_mut() {
                        m.next_base = Some((m.possible.clone(), Vec::new()));
                    }
                    self.client
                        .in_flight
                        .insert(op, (Kind::Read, u64::MAX, Vec::new()));
                    let deadline = self.now + REQUEST_DEADLINE;
                    self.flush_all(i, op, deadline);
                    continue;
                }
                let blocks: Vec<u64> = self.model.keys().copied().collect();
                let block = blocks[self.rng.below(blocks.len() as u64) as usize];
                let kind = if roll < 60 && !self.model[&block].writing {
                    let v = self.client.next_version;
                    self.client.next_version += 1;
                    let m = self.model.get_mut(&block).expect("a block");
                    m.writing = true;
                    m.issue(v);
                    Kind::Write(v)
                } else {
                    Kind::Read
                };
                // A read overlapping a write may see either.
                let before = self.model[&block].possible.clone();
                self.client.in_flight.insert(op, (kind, block, before));
                let writer = self.nodes[i].writer;
                let req = Req {
                    origin: Origin::Client(op),
                    block,
                    kind,
                    deadline: self.now + REQUEST_DEADLINE,
                    from_peer: false,
                    writer,
                };
                self.submit(i, req);
                if self.client.at.is_none() {
                    break;
                }
            }
        }
        let d = self.rng.range(2 * MS, 20 * MS);
        self.at(d, Event::Client);
    }

    fn client_done(&mut self, op: u64, a: Answer) {
        let Some((kind, block, before)) = self.client.in_flight.remove(&op) else {
            return;
        };
        self.trace(Some(block), || {
            format!(
                "client op {op} {kind:?} block {block}: status {} {:?}",
                a.status, a.values
            )
        });
        if self.client.flush == Some(op) {
            self.client.flush = None;
            if a.status == status::OK {
                self.report.flushes_acked += 1;
                for m in self.model.values_mut() {
                    if let Some((base, after)) = m.next_base.take() {
                        m.base = base;
                        m.after_base = after;
                    }
                }
            } else {
                self.report.errors += 1;
            }
            return;
        }
        let m = self.model.get_mut(&block).expect("a block");
        match kind {
            Kind::Write(v) => {
                m.writing = false;
                if a.status != status::OK {
                    self.report.errors += 1;
                    return;
                }
                self.report.writes_acked += 1;
                m.possible = vec![v];
            }
            Kind::Read => {
                if a.status != status::OK {
                    self.report.errors += 1;
                    return;
                }
                self.report.reads_checked += 1;
                let got = a.values.first().copied().flatten().unwrap_or(0);
                if !m.possible.contains(&got) && !before.contains(&got) {
                    let what = if m.history.contains(&got) || got == 0 {
                        "a stale read"
                    } else {
                        "wrong data"
                    };
                    let possible = m.possible.clone();
                    self.fail(format!(
                        "{what}: block {block} read as version {got}, expected one of {possible:?}"
                    ));
                }
            }
        }
    }

    /// Every node lost power at once: only what a completed flush covered is sure to be there.
    fn power_loss_model(&mut self) {
        for m in self.model.values_mut() {
            let mut possible = m.base.clone();
            possible.extend(&m.after_base);
            possible.sort_unstable();
            possible.dedup();
            m.possible = possible;
        }
    }

    // ---- faults ----

    fn crash(&mut self, i: usize) {
        self.trace(None, || format!("n{i} crashes"));
        let n = &mut self.nodes[i];
        n.alive = false;
        n.store.crash(&mut self.rng);
        n.pending.clear();
        n.coords.clear();
        n.flushes.clear();
        n.round = None;
        n.seen = 0;
        n.recovering.clear();
        n.dirty.clear();
        n.inflight.clear();
        for k in 0..self.nodes.len() {
            *self.conns.entry((i, k)).or_insert(0) += 1;
            self.reset(k, i);
        }
        // Its peers see their connections to it close and flush (peer/, the FlushRecorder).
        for k in 0..self.nodes.len() {
            let talked = self
                .last
                .keys()
                .any(|&(from, to, _, _)| (from, to) == (k, i) || (from, to) == (i, k));
            if k != i && self.nodes[k].alive && talked {
                self.local_flush(k, Cont::Nothing);
            }
        }
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].alive {
            // A process still running (drained out of the map) is stopped first.
            self.crash(i);
        }
        self.trace(None, || format!("n{i} restarts"));
        let n = &mut self.nodes[i];
        n.alive = true;
        // Before it registers, what the process before it recorded on disk alone.
        if let Some((inc, epoch)) = n.cut_record.take() {
            let f = n.flushed.entry(inc).or_insert(0);
            *f = (*f).max(epoch);
            self.report.cut_records_published += 1;
        }
        n.floor = 0;
        n.inc += 1;
        n.fence = Fence::default();
        n.fence.admit(VOLUME, self.etcd.fence);
        n.writer = 0;
        n.map = small_map();
        n.dirty_epochs = replication::DirtyEpochs::default();
        n.let_go.clear();
        n.freeing = false;
        n.lease_ok = self.now;
        self.etcd.revision += 1;
        n.lease = self.etcd.revision;
        let (name, inc, lease) = (n.name.clone(), n.inc, n.lease);
        self.etcd
            .leases
            .insert(name, (inc, lease, self.now + LEASE_TTL));
        self.start_ticks(i);
    }

    fn nemesis(&mut self) {
        if !self.loading {
            return;
        }
        if self.fault != Fault::None || self.nodes.iter().any(|n| !n.alive) {
            if self.now >= self.fault_until {
                self.fault = Fault::None;
            }
            return self.at(100 * MS, Event::Nemesis);
        }
        // Let the cluster become clean between faults now and then (else faults overlap
        // with catch-up, which is wanted too).
        let n = self.nodes.len();
        let a = self.rng.below(n as u64) as usize;
        let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
        let kind = self.rng.below(10) as usize;
        let hold = if kind == 9 {
            self.rng.range(4 * SEC, 10 * SEC)
        } else {
            self.rng.range(500 * MS, 8 * SEC)
        };
        self.report.faults[kind] += 1;
        self.trace(None, || {
            format!(
                "nemesis: {} (a n{a}, b n{b}) for {} ms",
                FAULT_KINDS[kind],
                hold / MS
            )
        });
        match kind {
            0 => {
                self.crash(a);
                self.at(hold, Event::Restart(a));
            }
            1 => {
                for k in 0..n {
                    self.crash(k);
                }
                self.power_loss_model();
                for k in 0..n {
                    let d = self.rng.range(100 * MS, 3 * SEC);
                    self.at(d, Event::Restart(k));
                }
            }
            2 => self.fault = Fault::Isolated(a),
            3 => self.fault = Fault::Partition(a, b),
            4 => self.fault = Fault::OneWay(a, b),
            5 => self.fault = Fault::Resets,
            6 => self.fault = Fault::Delay(a),
            7 => self.detach(),
            8 => self.drain(a),
            _ => {
                // A node cut off long enough to be marked down, and another killed soon after
                // that map (before it flushed and recorded it, or just after): the restarted
                // one may lack writes only the cut-off one has (`map::Demoted`).
                self.fault = Fault::Isolated(a);
                let window = self.rng.range(50 * MS, 600 * MS);
                let down = self.rng.range(500 * MS, 6 * SEC);
                let e = Event::Cascade {
                    cut: a,
                    victim: b,
                    window,
                    hold: down,
                };
                self.at(LEASE_TTL, e);
            }
        }
        self.fault_until = self.now + hold;
        let quiet = self.rng.range(200 * MS, 4 * SEC);
        self.at(hold + quiet, Event::Nemesis);
    }

    /// `torusctl peer remove` of node `a` (`ClusterMap::start_removing`; refused with fewer
    /// nodes than replicas left): its PGs move to the others, then it leaves the map. Its
    /// process keeps running outside the map until it is started again.
    fn drain(&mut self, a: usize) {
        let name = self.nodes[a].name.clone();
        match self.etcd.map.start_removing(&name) {
            Ok(true) => {
                self.report.map_epochs += 1;
                self.trace(None, || format!("{name} is drained"));
            }
            Ok(false) => {}
            Err(why) => self.trace(None, || format!("removing {name} refused: {why}")),
        }
    }

    /// Replies overdue by the request timeout close their connection (the peer service's tick).
    fn timeouts(&mut self) {
        for i in 0..self.nodes.len() {
            let overdue: BTreeSet<usize> = self.nodes[i]
                .pending
                .values()
                .filter(|p| self.now - p.sent > OP_TIMEOUT)
                .map(|p| p.server)
                .collect();
            for s in overdue {
                self.reset(i, s);
            }
        }
        self.at(500 * MS, Event::Timeouts);
    }

    fn step(&mut self) -> bool {
        let Some(((t, _), e)) = self.events.pop_first() else {
            return false;
        };
        self.now = t;
        self.report.events += 1;
        match e {
            Event::Deliver { to, msg } => {
                if !self.nodes[to].alive {
                    return true;
                }
                match msg {
                    Msg::Request { r, body } => {
                        if r.gen == self.gen(r.client, r.server) {
                            self.serve(to, r, body);
                        }
                    }
                    Msg::Reply { r, a } => {
                        if r.gen != self.gen(r.client, r.server) {
                            return true;
                        }
                        if let Some(p) = self.nodes[to].pending.remove(&r.id) {
                            self.cont(to, p.cont, a);
                        }
                    }
                }
            }
            Event::Local { node, inc, cont, a } => {
                if self.nodes[node].alive && self.nodes[node].inc == inc {
                    self.cont(node, cont, a);
                }
            }
            Event::Retry { node, inc, req } => {
                if self.nodes[node].alive && self.nodes[node].inc == inc {
                    self.submit(node, req);
                }
            }
            Event::Heartbeat(i, inc) => {
                if self.nodes[i].alive && self.nodes[i].inc == inc {
                    if self.reaches_etcd(i) {
                        let name = self.nodes[i].name.clone();
                        let lease = self.nodes[i].lease;
                        let alive = self
                            .etcd
                            .leases
                            .get(&name)
                            .is_some_and(|(_, l, exp)| *l == lease && *exp > self.now);
                        if !alive {
                            // The lease expired (with the keys on it): the process registers
                            // again on a new one (same incarnation; the map marked it stale).
                            self.etcd.revision += 1;
                            self.nodes[i].lease = self.etcd.revision;
                            self.nodes[i].dirty_epochs.lease_lost();
                        }
                        let lease = self.nodes[i].lease;
                        self.etcd
                            .leases
                            .insert(name, (inc, lease, self.now + LEASE_TTL));
                        let n = &mut self.nodes[i];
                        if alive && n.floor > n.map.epoch && n.fenced_lease == lease {
                            // The lease outlived the fence: it was premature (the map may stay
                            // as it is), so its claim goes before writes are taken again.
                            n.cut_record = None;
                            n.floor = 0;
                        }
                        n.lease_ok = self.now;
                    } else if self.now - self.nodes[i].lease_ok >= LEASE_TTL {
                        // Cluster::fence_cut_off.
                        let n = &mut self.nodes[i];
                        if n.floor <= n.seen {
                            n.floor = n.seen + 1;
                            n.fenced_lease = n.lease;
                            if !self.cfg.canary {
                                n.store.flush();
                            }
                            n.cut_record = Some((n.inc, n.floor));
                            self.report.cut_records += 1;
                        }
                    }
                    self.at(HEARTBEAT, Event::Heartbeat(i, inc));
                }
            }
            Event::MapPoll(i, inc) => {
                if self.nodes[i].alive && self.nodes[i].inc == inc {
                    if self.reaches_etcd(i) {
                        let m = self.etcd.map.clone();
                        self.install_map(i, m);
                        self.nodes[i].map_ok = self.now;
                    }
                    self.at(MAP_POLL, Event::MapPoll(i, inc));
                }
            }
            Event::Recovery(i, inc) => {
                if self.nodes[i].alive && self.nodes[i].inc == inc {
                    self.recovery(i);
                    self.at(RECOVERY_TICK, Event::Recovery(i, inc));
                }
            }
            Event::ListWait {
                node,
                inc,
                r,
                pgs,
                epoch,
                until,
            } => {
                if self.nodes[node].alive && self.nodes[node].inc == inc {
                    self.serve_list(node, r, pgs, epoch, until);
                }
            }
            Event::FlushRetry {
                node,
                inc,
                op,
                deadline,
            } => {
                if self.nodes[node].alive && self.nodes[node].inc == inc {
                    self.flush_all(node, op, deadline);
                }
            }
            Event::LetGoFree {
                node,
                inc,
                fresh,
                blocks,
            } => {
                if self.nodes[node].alive && self.nodes[node].inc == inc {
                    self.let_go_free(node, fresh, blocks);
                }
            }
            Event::Timeouts => self.timeouts(),
            Event::Leader => self.leader(),
            Event::Client => self.client_step(),
            Event::Nemesis => self.nemesis(),
            Event::Restart(i) => {
                if !self.nodes[i].alive {
                    self.restart(i);
                }
            }
            Event::Cascade {
                cut,
                victim,
                window,
                hold,
            } => {
                if self.etcd.map.up(&self.nodes[cut].name) {
                    if self.fault == Fault::Isolated(cut) {
                        let e = Event::Cascade {
                            cut,
                            victim,
                            window,
                            hold,
                        };
                        self.at(20 * MS, e);
                    }
                } else {
                    let d = self.rng.range(0, window);
                    self.at(d, Event::Crash(victim));
                    self.at(d + hold, Event::Restart(victim));
                }
            }
            Event::Crash(i) => {
                if self.nodes[i].alive {
                    self.crash(i);
                }
            }
        }
        true
    }

    fn run_until(&mut self, until: u64) -> Result<(), SimFailure> {
        while self
            .events
            .first_key_value()
            .is_some_and(|((t, _), _)| *t <= until)
        {
            self.step();
            if self.failure.is_some() {
                return Err(self.failed());
            }
        }
        self.now = self.now.max(until);
        Ok(())
    }

    fn failed(&self) -> SimFailure {
        SimFailure {
            message: format!(
                "seed {}: {}",
                self.cfg.seed,
                self.failure.clone().unwrap_or_default()
            ),
            replay: self.cfg.replay_command(),
        }
    }

    fn clean_everywhere(&self) -> bool {
        let h = self.etcd.map.health();
        h.clean == PGS
            && self.nodes.iter().all(|n| {
                n.alive
                    && n.map.epoch == self.etcd.map.epoch
                    && n.round.is_none()
                    && self
                        .etcd
                        .map
                        .nodes
                        .get(&n.name)
                        .is_some_and(|m| m.up && m.info.incarnation == n.inc)
            })
    }

    fn run(mut self) -> Result<SimReport, SimFailure> {
        let load_end = self.cfg.seconds * SEC;
        self.run_until(load_end)?;
        // Heal: no more load or faults; every node up again.
        self.loading = false;
        self.fault = Fault::None;
        for i in 0..self.nodes.len() {
            // A drained node that left the map is started again and joins as a new one.
            let left = !self.etcd.map.nodes.contains_key(&self.nodes[i].name);
            if !self.nodes[i].alive || left {
                self.restart(i);
            }
        }
        let healed = self.now;
        while !self.clean_everywhere() || !self.client.in_flight.is_empty() {
            // A node whose draining ends now is started again too.
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive && !self.etcd.map.nodes.contains_key(&self.nodes[i].name) {
                    self.restart(i);
                }
            }
            if self.now > healed + CONVERGE_BOUND {
                self.fail(format!(
                    "not clean {} s after the faults healed: PGs {:?}, requests in flight {}",
                    CONVERGE_BOUND / SEC,
                    self.etcd.map.health(),
                    self.client.in_flight.len()
                ));
                return Err(self.failed());
            }
            let t = self.now + 100 * MS;
            self.run_until(t)?;
        }
        self.report.converge_max = self.now - healed;
        if self.client.at.is_none() {
            self.client.attach_at = self.now;
            while self.client.at.is_none() {
                let t = self.now + 100 * MS;
                self.run_until(t)?;
                self.attach();
            }
        }
        // Blocks whose last write's outcome is unknown are written again (as a client
        // retries a failed write), so each has one value to check.
        let (i, _) = self.client.at.expect("attached");
        let unknown: Vec<u64> = self
            .model
            .iter()
            .filter(|(_, m)| m.possible.len() > 1)
            .map(|(b, _)| *b)
            .collect();
        for block in unknown {
            let v = self.client.next_version;
            self.client.next_version += 1;
            let op = self.client.next_op;
            self.client.next_op += 1;
            let m = self.model.get_mut(&block).expect("a block");
            m.issue(v);
            self.client
                .in_flight
                .insert(op, (Kind::Write(v), block, Vec::new()));
            let writer = self.nodes[i].writer;
            self.submit(
                i,
                Req {
                    origin: Origin::Client(op),
                    block,
                    kind: Kind::Write(v),
                    deadline: self.now + REQUEST_DEADLINE,
                    from_peer: false,
                    writer,
                },
            );
        }
        let deadline = self.now + REQUEST_DEADLINE + SEC;
        while !self.client.in_flight.is_empty() && self.now < deadline {
            let t = self.now + 10 * MS;
            self.run_until(t)?;
        }
        let unresolved: Vec<u64> = self
            .model
            .iter()
            .filter(|(_, m)| m.possible.len() > 1)
            .map(|(b, _)| *b)
            .collect();
        if !unresolved.is_empty() {
            self.fail(format!(
                "writes after healing did not succeed for blocks {unresolved:?}"
            ));
            return Err(self.failed());
        }
        // Every replica holds exactly what the model says.
        for (&block, m) in &self.model {
            let want = m.possible[0];
            let pg = pg_of(block);
            for slot in self.etcd.map.pgs[pg as usize]
                .iter()
                .take(REPLICAS as usize)
            {
                let k = self.node_index(&slot.node).expect("a node");
                let got = self.nodes[k].store.get(block).unwrap_or(0);
                if got != want {
                    let what = format!(
                        "after healing, node {} holds version {got} of block {block} (PG {pg}), the model says {want}",
                        slot.node
                    );
                    self.failure = Some(what);
                    return Err(self.failed());
                }
                self.report.blocks_verified += 1;
            }
        }
        // A node keeps no block of a PG it holds no slot of: once no write of an older map is
        // in flight (a copy sent into a partition waits for its timeout), a few recovery
        // ticks after the last map, what moved away is freed (`let_go`).
        let until = self.now + OP_TIMEOUT + SEC;
        while self.now < until && self.nodes.iter().any(|n| !n.inflight.is_empty()) {
            let t = self.now + 100 * MS;
            self.run_until(t)?;
        }
        let t = self.now + 3 * RECOVERY_TICK;
        self.run_until(t)?;
        let all: BTreeSet<u32> = (0..PGS).collect();
        for k in 0..self.nodes.len() {
            let name = self.nodes[k].name.clone();
            if !self.etcd.map.nodes.contains_key(&name) {
                continue; // drained after healing: out of the map, its data its own
            }
            let kept: Vec<(u64, u32)> = self.nodes[k]
                .store
                .list(&all)
                .into_iter()
                .map(|(_, b, _)| (b, pg_of(b)))
                .filter(|&(_, pg)| !replication::holds(&self.etcd.map, &name, pg))
                .collect();
            if let Some(&(block, pg)) = kept.first() {
                self.failure = Some(format!(
                    "after healing, node {name} still keeps {} blocks of PGs it holds no slot of (block {block}, PG {pg})",
                    kept.len()
                ));
                return Err(self.failed());
            }
        }
        self.report.seeds = 1;
        self.report.sim_seconds = self.now / SEC;
        Ok(self.report)
    }
}

/// Runs one seed: a report, or the first failure with the command that replays it.
pub fn run(cfg: SimConfig) -> Result<SimReport, SimFailure> {
    assert!((3..=4).contains(&cfg.nodes), "3 or 4 nodes");
    Sim::new(cfg).run()
}
