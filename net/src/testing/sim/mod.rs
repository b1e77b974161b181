//! Deterministic simulation of the cluster, driven by one seed: three or four nodes each run
//! the cluster's own code (`Cluster`: its data path, leader, catch-up, revival, flushes and
//! fences, the writer lock) on a simulated etcd (`kv.rs`), network (`net.rs`) and process
//! (`host.rs`: cores, store, tasks, wall clock), all on one thread under tokio's paused clock.
//! Every random choice (delays, faults, the client's requests) comes from the seed, so a seed
//! replays the same run.
//!
//! Faults, one at a time: `kill -9` of a node (its unflushed writes each kept or lost), a
//! power loss of every node at once, a node cut off from everything (etcd too), symmetric and
//! one-way partitions between two nodes, connection resets, long delays, the writer moving to
//! another node, a node drained out of the map, and a cascade (a node cut off long enough to
//! be marked down, then another killed). With four nodes, a node down for
//! `DOWN_OUT_SECONDS` is marked out by the leader and its PGs copied to the others.
//!
//! A client (`client.rs`) writes, reads and flushes through one node's router and checks
//! every answer against its model of each block. After the faults heal, every PG must be
//! clean again within a bound, every replica must hold exactly the blocks the model says,
//! and no node may keep blocks of a PG it holds no slot of.
//!
//! A failure's message holds the command that replays the seed and the end of the nodes'
//! logs (`TORUS_SIM_LOG=1` prints all of it). The canary (nodes acknowledge a flush without
//! making anything durable) must fail: it shows the checks see a lost write.
//!
//! This folder: `report.rs` (config and results), `world.rs` (the shared state), `kv.rs`,
//! `net.rs`, `host.rs`, `store.rs`, `client.rs`, and this driver with its nemesis.

mod client;
mod host;
mod kv;
mod net;
mod report;
mod scenario;
mod store;
mod world;

pub use report::{SimConfig, SimFailure, SimReport, DOWN_OUT_SECONDS, FAULT_KINDS};
pub use scenario::{scenario, Stage};

use crate::cluster::{Cluster, ClusterConfig, Local};
use crate::etcd::VolumeList;
use crate::map::ClusterMap;
use crate::metadata::VolumeRecord;
use crate::replication;
use client::{Client, ClientRef, Kind};
use host::SimHost;
use kv::SimKv;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use store::{core_of, pg_of_block, CoreStore};
use tokio::time::{sleep, Instant};
use torus_engine::testing::sim::Rng;
use torus_engine::{BLOCK_SIZE, CHUNK_SIZE};
use world::{NodeState, State, World, CORES, PGS, REPLICAS, VOLUME};

const MS: u64 = 1;
const SEC: u64 = 1000;
pub(super) const LEASE_TTL: Duration = Duration::from_secs(3);
/// A PG must be clean again this long after the faults healed.
const CONVERGE_BOUND: Duration = Duration::from_secs(120);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct NoLocal;

impl Local for NoLocal {
    fn used_bytes(&self) -> u64 {
        0
    }
    fn volumes_changed(&self, _: &VolumeList) {}
}

#[derive(Clone)]
struct Sim {
    cfg: SimConfig,
    w: World,
    client: ClientRef,
    /// With four nodes, the leader marks out a node down for `DOWN_OUT_SECONDS` (a scenario
    /// may turn this off).
    down_out: bool,
    /// What a failure is called ("seed N", or a scenario's name) and the command that replays
    /// it.
    label: String,
    replay: String,
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
            .map(|i| NodeState {
                name: format!("n{i}"),
                gen: None,
                cluster: None,
                handler: None,
                tasks: Vec::new(),
                cores: (0..CORES).map(|_| CoreStore::default()).collect(),
                cut_record: None,
                etcd_cut: false,
                etcd_slow: Duration::ZERO,
                nodes_listed: 0,
            })
            .collect();
        let mut state = State {
            rng: Rng(cfg.seed),
            start: Instant::now(),
            nodes,
            kv: kv::KvState::default(),
            blocked: BTreeSet::new(),
            slow: None,
            conns: BTreeMap::new(),
            next_id: 0,
            log: VecDeque::new(),
            report: SimReport::default(),
            verbose: std::env::var_os("TORUS_SIM_LOG").is_some(),
            canary: cfg.canary,
            lose_unflushed: false,
            trace_block: std::env::var("TORUS_SIM_TRACE_BLOCK")
                .ok()
                .and_then(|b| b.parse().ok()),
        };
        let volume = VolumeRecord {
            name: "v".into(),
            id: VOLUME,
            size_bytes: client::CHUNKS * CHUNK_SIZE,
            created_unix: 0,
            replicas: REPLICAS,
            origin: None,
            quota_bytes: None,
        };
        state
            .kv
            .put("map", serde_json::to_vec(&small_map()).expect("json"), 0);
        state
            .kv
            .put("volumes/v", serde_json::to_vec(&volume).expect("json"), 0);
        state.kv.put("volumes/=next", b"2".to_vec(), 0);
        Sim {
            w: Arc::new(Mutex::new(state)),
            client: Arc::new(Mutex::new(Client::new())),
            down_out: true,
            label: format!("seed {}", cfg.seed),
            replay: cfg.replay_command(),
            cfg,
        }
    }

    fn config(&self, i: usize) -> ClusterConfig {
        let name = format!("n{i}");
        ClusterConfig {
            node_name: name.clone(),
            peer_addr: name,
            admin_addr: String::new(),
            nbd_addr: String::new(),
            lease_ttl: LEASE_TTL,
            replicas_max: REPLICAS,
            recovery_rate: 1 << 30,
            node_id: [i as u8 + 1; 16],
            capacity_bytes: 4 << 30,
            down_out_after: (self.cfg.nodes == 4 && self.down_out)
                .then(|| Duration::from_secs(DOWN_OUT_SECONDS)),
            cut_record_path: Default::default(),
        }
    }

    fn log(&self, line: String) {
        self.w.lock().log(line);
    }

    /// Starts node `i`'s process (a new generation) and has it join; a join that fails (etcd
    /// out of reach) is tried again.
    fn start(&self, i: usize) {
        let gen = {
            let mut s = self.w.lock();
            let gen = s.id();
            s.nodes[i].gen = Some(gen);
            s.log(format!("n{i}/{gen} starts"));
            gen
        };
        let (w, cfg) = (self.w.clone(), self.config(i));
        tokio::spawn(async move {
            loop {
                let kv = Arc::new(SimKv {
                    world: w.clone(),
                    node: i,
                    gen,
                });
                let host = Arc::new(SimHost {
                    world: w.clone(),
                    node: i,
                    gen,
                });
                match Cluster::join(cfg.clone(), kv, host, Arc::new(NoLocal)).await {
                    Ok(c) => {
                        let mut s = w.lock();
                        if s.alive(i, gen) {
                            s.nodes[i].handler = Some(c.handler());
                            s.nodes[i].cluster = Some(c);
                        }
                        return;
                    }
                    Err(e) => {
                        w.lock().log(format!("n{i}/{gen}: join failed: {e}"));
                        sleep(ms(500)).await;
                        if !w.lock().alive(i, gen) {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// `kill -9` of node `i`: its tasks stop, its connections reset, each unflushed write is
    /// kept or lost.
    fn kill(&self, i: usize) {
        let conns = net::conns_of(&self.w, i);
        {
            let mut s = self.w.lock();
            let Some(gen) = s.nodes[i].gen.take() else {
                return;
            };
            s.log(format!("n{i}/{gen} killed"));
            if let Some(c) = s.nodes[i].cluster.take() {
                let r = c.recovery();
                s.report.blocks_copied += r.blocks_copied;
                s.report.catch_up_rounds += r.pgs_done;
            }
            s.nodes[i].handler = None;
            for t in std::mem::take(&mut s.nodes[i].tasks) {
                t.abort();
            }
            let State {
                rng,
                nodes,
                lose_unflushed,
                ..
            } = &mut *s;
            for core in &mut nodes[i].cores {
                core.crash(|| !*lose_unflushed && rng.chance(0.5));
            }
        }
        for c in conns {
            net::tear_down(&self.w, c, true);
        }
    }

    fn alive(&self, i: usize) -> bool {
        self.w.lock().nodes[i].gen.is_some()
    }

    fn isolate(&self, i: usize, on: bool) {
        let mut s = self.w.lock();
        s.nodes[i].etcd_cut = on;
        for k in 0..self.cfg.nodes {
            if k != i {
                for pair in [(i, k), (k, i)] {
                    if on {
                        s.blocked.insert(pair);
                    } else {
                        s.blocked.remove(&pair);
                    }
                }
            }
        }
    }

    fn heal_network(&self) {
        let mut s = self.w.lock();
        s.blocked.clear();
        s.slow = None;
        for n in &mut s.nodes {
            n.etcd_cut = false;
            n.etcd_slow = Duration::ZERO;
        }
    }

    fn rand(&self, lo: u64, hi: u64) -> u64 {
        self.w.lock().rng.range(lo, hi)
    }

    /// `torusctl peer remove` of node `a` (refused with fewer nodes than replicas left): its
    /// PGs move to the others, then it leaves the map; its process keeps running outside it.
    fn drain(&self, a: usize) {
        let name = format!("n{a}");
        let mut s = self.w.lock();
        let Some((bytes, _)) = s.kv.get("map") else {
            return;
        };
        let Ok(mut map) = serde_json::from_slice::<ClusterMap>(&bytes) else {
            return;
        };
        match map.start_removing(&name) {
            Ok(true) => {
                s.kv.put("map", serde_json::to_vec(&map).expect("json"), 0);
                s.log(format!("{name} is drained"));
            }
            Ok(false) => {}
            Err(why) => s.log(format!("removing {name} refused: {why}")),
        }
    }

    async fn nemesis(&self, until: Instant) {
        let n = self.cfg.nodes;
        while Instant::now() < until {
            sleep(ms(self.rand(200 * MS, 4 * SEC))).await;
            if Instant::now() >= until || self.client.lock().failure.is_some() {
                return;
            }
            let (a, b, kind) = {
                let mut s = self.w.lock();
                let a = s.rng.below(n as u64) as usize;
                let b = (a + 1 + s.rng.below(n as u64 - 1) as usize) % n;
                (a, b, s.rng.below(10) as usize)
            };
            let hold = if kind == 9 {
                self.rand(4 * SEC, 10 * SEC)
            } else {
                self.rand(500 * MS, 8 * SEC)
            };
            {
                let mut s = self.w.lock();
                s.report.faults[kind] += 1;
                s.log(format!(
                    "nemesis: {} (a n{a}, b n{b}) for {hold} ms",
                    FAULT_KINDS[kind]
                ));
            }
            match kind {
                0 => {
                    self.kill(a);
                    sleep(ms(hold)).await;
                    self.start(a);
                }
                1 => {
                    for k in 0..n {
                        self.kill(k);
                    }
                    self.client.lock().power_loss();
                    sleep(ms(self.rand(100 * MS, 3 * SEC))).await;
                    for k in 0..n {
                        self.start(k);
                    }
                }
                2 => {
                    self.isolate(a, true);
                    sleep(ms(hold)).await;
                    self.isolate(a, false);
                }
                3 | 4 => {
                    {
                        let mut s = self.w.lock();
                        s.blocked.insert((a, b));
                        if kind == 3 {
                            s.blocked.insert((b, a));
                        }
                    }
                    sleep(ms(hold)).await;
                    self.heal_network();
                }
                5 => {
                    for c in net::all_conns(&self.w) {
                        net::tear_down(&self.w, c, true);
                    }
                }
                6 => {
                    let extra = ms(self.rand(100 * MS, 2 * SEC));
                    self.w.lock().slow = Some((a, extra));
                    sleep(ms(hold)).await;
                    self.heal_network();
                }
                7 => self.detach().await,
                8 => self.drain(a),
                _ => {
                    // A node cut off long enough to be marked down, and another killed soon
                    // after that map (before it flushed and recorded it, or just after): the
                    // restarted one may lack writes only the cut-off one has.
                    self.isolate(a, true);
                    sleep(LEASE_TTL + ms(self.rand(50 * MS, 600 * MS))).await;
                    self.kill(b);
                    sleep(ms(self.rand(500 * MS, 6 * SEC))).await;
                    self.start(b);
                    sleep(ms(hold)).await;
                    self.isolate(a, false);
                }
            }
            // A drained node out of the map is started again and joins as a new one.
            self.restart_drained();
        }
    }

    fn restart_drained(&self) {
        let gone: Vec<usize> = {
            let mut s = self.w.lock();
            let map: Option<ClusterMap> =
                s.kv.get("map")
                    .and_then(|(b, _)| serde_json::from_slice(&b).ok());
            let Some(map) = map else { return };
            (0..self.cfg.nodes)
                .filter(|&i| !map.nodes.contains_key(&format!("n{i}")))
                .collect()
        };
        for i in gone {
            if self.alive(i) && self.w.lock().nodes[i].cluster.is_some() {
                self.kill(i);
                self.start(i);
            }
        }
    }

    /// The client leaves its node, which gives up its writer lock (as torusd does when a
    /// volume's last connection closes, before another connection can take it); it attaches
    /// again later.
    async fn detach(&self) {
        let old = self.client.lock().detach();
        if let Some((node, gen, cluster)) = old {
            if self.w.lock().alive(node, gen) {
                // A process that dies meanwhile never answers.
                let _ = tokio::time::timeout(LEASE_TTL, cluster.give_up_writer(VOLUME)).await;
            }
        }
    }

    /// Attaches the client to a node that is up and reaches etcd, taking the writer lock.
    async fn attach(&self) -> bool {
        let candidates: Vec<(usize, u64, Arc<Cluster>)> = {
            let s = self.w.lock();
            s.nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.etcd_cut)
                .filter_map(|(i, n)| Some((i, n.gen?, n.cluster.clone()?)))
                .collect()
        };
        if candidates.is_empty() {
            return false;
        }
        let pick = self.w.lock().rng.below(candidates.len() as u64) as usize;
        let (node, gen, cluster) = candidates[pick].clone();
        match self.attach_to(node, gen, cluster).await {
            Ok(()) => true,
            Err(why) => {
                self.log(format!("client: n{node}: {why}"));
                false
            }
        }
    }

    /// Attaches the client to process `gen` of node `node`, taking the writer lock there.
    async fn attach_to(&self, node: usize, gen: u64, cluster: Arc<Cluster>) -> Result<(), String> {
        // A process that dies meanwhile never answers: the client gives up on it.
        let limit = LEASE_TTL + Duration::from_secs(2);
        match tokio::time::timeout(limit, cluster.take_writer(VOLUME)).await {
            Ok(Ok(epoch)) => {
                if !self.w.lock().alive(node, gen) {
                    return Err("the process died".to_owned());
                }
                self.log(format!("client attached to n{node} (writer epoch {epoch})"));
                self.client.lock().at = Some((node, gen, cluster));
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".to_owned()),
        }
    }

    async fn load(&self, until: Instant) {
        let mut tick = Instant::now();
        while Instant::now() < until && self.client.lock().failure.is_none() {
            if tick.elapsed() >= Duration::from_secs(1) {
                tick = Instant::now();
                let n = self.w.lock().conns.len();
                self.log(format!("tick: {n} connections"));
            }
            let at = self.client.lock().at.clone();
            match at {
                Some((node, gen, _)) if !self.w.lock().alive(node, gen) => self.detach().await,
                None => {
                    if !self.attach().await {
                        sleep(ms(self.rand(50 * MS, SEC))).await;
                    }
                }
                Some(_) => client::issue(&self.w, &self.client),
            }
            sleep(ms(self.rand(2 * MS, 20 * MS))).await;
        }
    }

    fn failure(&self, what: String) -> SimFailure {
        let log: Vec<String> = self.w.lock().log.iter().cloned().collect();
        SimFailure {
            message: format!(
                "{}: {what}\nlast log lines:\n{}",
                self.label,
                log[log.len().saturating_sub(60)..].join("\n")
            ),
            replay: self.replay.clone(),
        }
    }

    fn etcd_map(&self) -> ClusterMap {
        let mut s = self.w.lock();
        s.kv.get("map")
            .and_then(|(b, _)| serde_json::from_slice(&b).ok())
            .unwrap_or_else(small_map)
    }

    fn clean_everywhere(&self) -> bool {
        let map = self.etcd_map();
        let s = self.w.lock();
        map.health().clean == PGS
            && s.nodes.iter().all(|n| {
                n.cluster.as_ref().is_some_and(|c| {
                    c.map().epoch == map.epoch
                        && map
                            .nodes
                            .get(&n.name)
                            .is_some_and(|m| m.up && m.info.incarnation == c.incarnation)
                })
            })
    }

    async fn run(self) -> Result<SimReport, SimFailure> {
        for i in 0..self.cfg.nodes {
            self.start(i);
        }
        let end = Instant::now() + Duration::from_secs(self.cfg.seconds);
        if self.cfg.faults {
            tokio::join!(self.load(end), self.nemesis(end));
        } else {
            self.load(end).await;
        }
        self.heal_and_check().await
    }

    /// After the load and the faults: every node up and reachable again, every PG clean
    /// within a bound, every block's last write settled, every replica as the model says, and
    /// nothing kept of PGs a node holds no slot of.
    async fn heal_and_check(&self) -> Result<SimReport, SimFailure> {
        if let Some(f) = self.client.lock().failure.clone() {
            return Err(self.failure(f));
        }
        // Heal: no more faults; every node up again.
        self.heal_network();
        self.restart_drained();
        for i in 0..self.cfg.nodes {
            if !self.alive(i) {
                self.start(i);
            }
        }
        let healed = Instant::now();
        while !self.clean_everywhere() {
            self.restart_drained();
            if healed.elapsed() > CONVERGE_BOUND {
                return Err(self.failure(format!(
                    "not clean {} s after the faults healed: PGs {:?}",
                    CONVERGE_BOUND.as_secs(),
                    self.etcd_map().health()
                )));
            }
            sleep(ms(100)).await;
        }
        self.w.lock().report.converge_max = healed.elapsed().as_micros() as u64;
        // Blocks whose last write's outcome is unknown are written again (as a client
        // retries a failed write), so each has one value to check.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let unknown: Vec<u64> = {
                let c = self.client.lock();
                if !c.in_flight.is_empty() {
                    Vec::new()
                } else {
                    c.model
                        .iter()
                        .filter(|(_, m)| m.possible.len() > 1)
                        .map(|(b, _)| *b)
                        .collect()
                }
            };
            let idle = self.client.lock().in_flight.is_empty();
            if idle && unknown.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!(
                    "writes after healing did not succeed for blocks {unknown:?}"
                )));
            }
            let at = self.client.lock().at.clone();
            match at {
                Some((node, gen, _)) if !self.w.lock().alive(node, gen) => self.detach().await,
                None => {
                    self.attach().await;
                }
                Some((node, gen, cluster)) => {
                    for block in unknown {
                        let (op, v) = self.client.lock().begin_write(block).expect("a block");
                        let piece = client::piece_for(Kind::Write(v), block);
                        client::submit(
                            &self.w,
                            &self.client,
                            op,
                            Some(piece),
                            node,
                            gen,
                            cluster.clone(),
                        );
                    }
                }
            }
            sleep(ms(50)).await;
            if let Some(f) = self.client.lock().failure.clone() {
                return Err(self.failure(f));
            }
        }
        // The rewrites may have landed under a map newer than the one found clean (a node
        // whose lease ran out meanwhile is caught up again): clean again before comparing.
        let settled = Instant::now();
        while !self.clean_everywhere() {
            // A drain that ended meanwhile: that node is started again too.
            self.restart_drained();
            if settled.elapsed() > CONVERGE_BOUND {
                return Err(self.failure(format!(
                    "not clean {} s after the last writes: PGs {:?}",
                    CONVERGE_BOUND.as_secs(),
                    self.etcd_map().health()
                )));
            }
            sleep(ms(100)).await;
        }
        self.verify()?;
        // A node keeps no block of a PG it holds no slot of: after a few recovery rounds
        // (and once writes sent into a partition have timed out), what moved away is freed.
        sleep(crate::peer::OP_TIMEOUT + Duration::from_secs(3)).await;
        self.nothing_kept()?;
        let mut s = self.w.lock();
        let mut report = std::mem::take(&mut s.report);
        for n in &s.nodes {
            if let Some(c) = &n.cluster {
                let r = c.recovery();
                report.blocks_copied += r.blocks_copied;
                report.catch_up_rounds += r.pgs_done;
            }
        }
        let c = self.client.lock();
        report.writes_acked = c.writes_acked;
        report.reads_checked = c.reads_checked;
        report.flushes_acked = c.flushes_acked;
        report.errors = c.errors;
        report.flush_records = s.kv.flush_records;
        report.map_epochs = self.etcd_map_epoch(&mut s);
        report.seeds = 1;
        report.sim_seconds = (Instant::now() - s.start).as_secs();
        Ok(report)
    }

    fn etcd_map_epoch(&self, s: &mut State) -> u64 {
        s.kv.get("map")
            .and_then(|(b, _)| serde_json::from_slice::<ClusterMap>(&b).ok())
            .map_or(0, |m| m.epoch)
    }

    /// Every replica holds exactly what the model says.
    fn verify(&self) -> Result<(), SimFailure> {
        let map = self.etcd_map();
        let c = self.client.lock();
        let mut s = self.w.lock();
        for (&block, m) in &c.model {
            let want = m.possible[0];
            let pg = pg_of_block(block);
            for slot in map.pgs[pg as usize].iter().take(REPLICAS as usize) {
                let k = s.index(&slot.node).expect("a node");
                let core = core_of(VOLUME, block * BLOCK_SIZE as u64);
                let got = s.nodes[k].cores[core].get((VOLUME, block)).unwrap_or(0);
                if got != want {
                    let what = format!(
                        "after healing, node {} holds version {got} of block {block} (PG {pg}), the model says {want}",
                        slot.node
                    );
                    drop((c, s));
                    return Err(self.failure(what));
                }
                s.report.blocks_verified += 1;
            }
        }
        Ok(())
    }

    fn nothing_kept(&self) -> Result<(), SimFailure> {
        let map = self.etcd_map();
        let s = self.w.lock();
        for n in &s.nodes {
            if !map.nodes.contains_key(&n.name) {
                continue;
            }
            let kept: Vec<(u64, u32)> = n
                .cores
                .iter()
                .flat_map(|c| c.blocks().into_keys())
                .map(|(_, b)| (b, pg_of_block(b)))
                .filter(|&(_, pg)| !replication::holds(&map, &n.name, pg))
                .collect();
            if let Some(&(block, pg)) = kept.first() {
                let what = format!(
                    "after healing, node {} still keeps {} blocks of PGs it holds no slot of (block {block}, PG {pg})",
                    n.name,
                    kept.len()
                );
                drop(s);
                return Err(self.failure(what));
            }
        }
        Ok(())
    }
}

/// Runs one seed: a report, or the first failure with the command that replays it.
pub fn run(cfg: SimConfig) -> Result<SimReport, SimFailure> {
    assert!((3..=4).contains(&cfg.nodes), "3 or 4 nodes");
    let sim = Sim::new(cfg);
    let w = sim.w.clone();
    on_paused_clock(w, sim.run())
}

/// Runs a simulation to its end on one thread under tokio's paused clock.
fn on_paused_clock(
    w: World,
    run: impl std::future::Future<Output = Result<SimReport, SimFailure>>,
) -> Result<SimReport, SimFailure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let out = rt.block_on(run);
    // Tasks of every process still running are dropped with the runtime, and the processes
    // with the world (a cluster holds its host, which holds the world).
    drop(rt);
    let mut s = w.lock();
    s.conns.clear();
    for n in &mut s.nodes {
        n.cluster = None;
        n.handler = None;
    }
    out
}
