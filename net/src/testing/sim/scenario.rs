//! Scripted scenarios: the simulated world and the cluster's own code of a seed's run, with the
//! faults and the client's requests given step by step instead of drawn from a seed. A bug that
//! needs one sequence of faults (a write on two holders, one of them cut off, the other killed
//! before it flushes) is pinned by that sequence, which keeps holding when a change to the
//! cluster moves its events by a few milliseconds; a seed's replay does not.
//!
//! The script waits for what it needs (a node marked down in etcd's map, every PG clean) rather
//! than for a time, and a process it kills loses every write since its last flush. After the
//! script, the run heals and checks as a seed's run does (`Sim::heal_and_check`): every node up,
//! every PG clean, every replica holding what the client's model says.

use super::client::{self, Kind};
use super::store::pg_of_block;
use super::{on_paused_clock, Sim, SimConfig, SimFailure, SimReport};
use crate::map::ClusterMap;
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// How long a script's wait for an answer or a state gives up after.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// What a script drives: the nodes (`n0`, `n1`, … by index), the network, etcd's map, and the
/// client (one volume, writer lock on one node).
#[derive(Clone)]
pub struct Stage(Sim);

/// Runs `script` on `nodes` nodes (3 or 4; with 4 and `down_out`, the leader marks out a node
/// down for `DOWN_OUT_SECONDS`), then heals and checks. `name` is the test that replays it.
pub fn scenario(
    name: &str,
    nodes: usize,
    down_out: bool,
    script: impl AsyncFnOnce(Stage) -> Result<(), String>,
) -> Result<SimReport, SimFailure> {
    assert!((3..=4).contains(&nodes), "3 or 4 nodes");
    let mut sim = Sim::new(SimConfig {
        seed: 1,
        seconds: 0,
        nodes,
        faults: false,
        canary: false,
    });
    sim.down_out = down_out;
    sim.label = name.to_owned();
    sim.replay = format!(
        "TORUS_SIM_LOG=1 cargo test --release -p torus-net --test cluster_scenarios -- --exact {name}"
    );
    sim.w.lock().lose_unflushed = true;
    let w = sim.w.clone();
    on_paused_clock(w, async move {
        for i in 0..nodes {
            sim.start(i);
        }
        if let Err(why) = script(Stage(sim.clone())).await {
            return Err(sim.failure(format!("the script stopped: {why}")));
        }
        sim.heal_and_check().await
    })
}

impl Stage {
    pub fn nodes(&self) -> usize {
        self.0.cfg.nodes
    }

    /// The map in etcd now.
    pub fn map(&self) -> ClusterMap {
        self.0.etcd_map()
    }

    /// The node holding the leader key, if any.
    pub fn leader(&self) -> Option<usize> {
        let mut s = self.0.w.lock();
        let (name, _) = s.kv.get("leader")?;
        s.index(std::str::from_utf8(&name).ok()?)
    }

    /// The nodes holding a slot of `pg` in etcd's map, in slot order.
    pub fn holders(&self, pg: u32) -> Vec<usize> {
        let map = self.map();
        let s = self.0.w.lock();
        map.pgs[pg as usize]
            .iter()
            .filter_map(|slot| s.index(&slot.node))
            .collect()
    }

    /// How long node `i`'s lease has left in etcd, if etcd has its key (it is registered).
    pub fn lease_left(&self, i: usize) -> Option<Duration> {
        self.0.w.lock().kv.lease_left(&format!("nodes/n{i}"))
    }

    /// The newest map epoch node `i`'s process (the one etcd's map names) has recorded a
    /// flush at in etcd (0: none).
    pub fn flushed(&self, i: usize) -> u64 {
        let name = format!("n{i}");
        let Some(inc) = self.map().nodes.get(&name).map(|n| n.info.incarnation) else {
            return 0;
        };
        let mut s = self.0.w.lock();
        let Some((id, _)) = s.kv.get(&format!("ids/{name}")) else {
            return 0;
        };
        let key = format!("flushed/{}", String::from_utf8_lossy(&id));
        let record: Vec<(u64, u64)> =
            s.kv.get(&key)
                .and_then(|(v, _)| serde_json::from_slice(&v).ok())
                .unwrap_or_default();
        record
            .iter()
            .find(|(i, _)| *i == inc)
            .map_or(0, |&(_, epoch)| epoch)
    }

    /// The revision of etcd's last change to `key`, if etcd has it.
    pub fn revision(&self, key: &str) -> Option<i64> {
        self.0.w.lock().kv.get(key).map(|(_, rev)| rev)
    }

    /// True when node `i`'s process has joined (its cluster code runs).
    pub fn running(&self, i: usize) -> bool {
        self.0.w.lock().nodes[i].cluster.is_some()
    }

    /// The epoch of the map node `i`'s process has installed, if it runs.
    pub fn epoch_at(&self, i: usize) -> Option<u64> {
        let c = self.0.w.lock().nodes[i].cluster.clone()?;
        Some(c.map().epoch)
    }

    /// The PG a block of the client's volume is in.
    pub fn pg_of(&self, block: u64) -> u32 {
        pg_of_block(block)
    }

    /// The client's blocks (the ones it writes and the final check compares).
    pub fn blocks(&self) -> Vec<u64> {
        client::blocks()
    }

    pub fn log(&self, line: &str) {
        self.0.log(format!("scenario: {line}"));
    }

    /// `kill -9` of node `i`: it loses every write since its last flush.
    pub fn kill(&self, i: usize) {
        self.log(&format!("kill n{i}"));
        self.0.kill(i);
    }

    /// Starts node `i` again (a new process on the same disk).
    pub fn start(&self, i: usize) {
        self.log(&format!("start n{i}"));
        self.0.start(i);
    }

    /// Cuts node `i` off from every other node and from etcd, or joins it again.
    pub fn isolate(&self, i: usize, on: bool) {
        self.log(&format!(
            "{} n{i}",
            if on { "isolate" } else { "reconnect" }
        ));
        self.0.isolate(i, on);
    }

    /// Cuts node `i` off from etcd only (its peers still reach it), or joins it again.
    pub fn cut_etcd(&self, i: usize, on: bool) {
        self.log(&format!(
            "{} n{i} from etcd",
            if on { "cut" } else { "reconnect" }
        ));
        self.0.w.lock().nodes[i].etcd_cut = on;
    }

    /// Makes each of node `i`'s etcd calls take `ms` milliseconds longer (a slow link to
    /// etcd; under the etcd client's 3 s timeout, so the calls still succeed).
    pub fn slow_etcd(&self, i: usize, ms: u64) {
        self.log(&format!("n{i}'s etcd calls take {ms} ms longer"));
        self.0.w.lock().nodes[i].etcd_slow = Duration::from_millis(ms);
    }

    /// How many times etcd has answered node `i`'s listing of the registered nodes (the
    /// leader's, each tick).
    pub fn nodes_listed(&self, i: usize) -> u64 {
        self.0.w.lock().nodes[i].nodes_listed
    }

    pub async fn sleep_ms(&self, ms: u64) {
        sleep(Duration::from_millis(ms)).await;
    }

    /// Waits until `f` holds, looking every millisecond.
    pub async fn until(&self, what: &str, f: impl Fn(&Stage) -> bool) -> Result<(), String> {
        if !self.wait(Duration::from_millis(1), f).await {
            return Err(format!("{what}: not within {} s", WAIT_LIMIT.as_secs()));
        }
        self.log(&format!("{what} (map {})", self.map().epoch));
        Ok(())
    }

    /// Looks at `f` every `every` until it holds (true) or `WAIT_LIMIT` has passed (false).
    async fn wait(&self, every: Duration, f: impl Fn(&Stage) -> bool) -> bool {
        let start = Instant::now();
        while !f(self) {
            if start.elapsed() > WAIT_LIMIT {
                return false;
            }
            sleep(every).await;
        }
        true
    }

    /// Waits until etcd's map marks node `i` down.
    pub async fn until_down(&self, i: usize) -> Result<(), String> {
        let name = format!("n{i}");
        self.until(&format!("n{i} is down"), |s| !s.map().up(&name))
            .await
    }

    /// Waits until each of `nodes` runs the map that is in etcd now (or a newer one).
    pub async fn until_installed(&self, nodes: &[usize]) -> Result<(), String> {
        let epoch = self.map().epoch;
        self.until(&format!("{nodes:?} run map {epoch}"), |s| {
            nodes.iter().all(|&i| s.epoch_at(i) >= Some(epoch))
        })
        .await
    }

    /// Makes node `i` the leader: the leader is killed and started again until `i` takes the
    /// key (at most ten times), then the script goes on once every PG is clean.
    pub async fn make_leader(&self, i: usize) -> Result<(), String> {
        for _ in 0..10 {
            match self.leader() {
                Some(l) if l == i => return self.until_clean().await,
                Some(l) => {
                    self.kill(l);
                    self.until("another leader", |s| s.leader().is_some_and(|k| k != l))
                        .await?;
                    self.start(l);
                }
                None => self.sleep_ms(100).await,
            }
            self.until_clean().await?;
        }
        Err(format!("n{i} never took the leader key"))
    }

    /// Waits until every PG is clean and every node runs etcd's map as the process it names.
    pub async fn until_clean(&self) -> Result<(), String> {
        if !self
            .wait(Duration::from_millis(10), |s| s.0.clean_everywhere())
            .await
        {
            return Err(format!(
                "not clean within {} s: {:?}",
                WAIT_LIMIT.as_secs(),
                self.map().health()
            ));
        }
        self.log("every PG is clean");
        Ok(())
    }

    /// Attaches the client to node `i`, which takes the volume's writer lock.
    pub async fn attach(&self, i: usize) -> Result<(), String> {
        let (gen, cluster) = {
            let s = self.0.w.lock();
            let n = &s.nodes[i];
            match (n.gen, n.cluster.clone()) {
                (Some(gen), Some(c)) => (gen, c),
                _ => return Err(format!("n{i} is not running")),
            }
        };
        self.0.attach_to(i, gen, cluster).await
    }

    /// Writes the next version of `block` through the client's node and waits for the
    /// answer: the version, or the error.
    pub async fn write(&self, block: u64) -> Result<u64, String> {
        let (op, v) = self
            .0
            .client
            .lock()
            .begin_write(block)
            .ok_or("not one of the client's blocks")?;
        self.send(op, Some(client::piece_for(Kind::Write(v), block)))
            .await?;
        if self.0.client.lock().model[&block].possible == [v] {
            self.log(&format!("version {v} of block {block} acknowledged"));
            Ok(v)
        } else {
            Err(format!("the write of version {v} of block {block} failed"))
        }
    }

    /// A flush through the client's node, waited for.
    pub async fn flush(&self) -> Result<(), String> {
        let (op, before) = {
            let mut c = self.0.client.lock();
            let op = c.next_op;
            c.next_op += 1;
            c.begin_flush(op);
            (op, c.flushes_acked)
        };
        self.send(op, None).await?;
        if self.0.client.lock().flushes_acked > before {
            self.log("flush acknowledged");
            Ok(())
        } else {
            Err("the flush failed".to_owned())
        }
    }

    /// Hands request `op` to the client's node and waits until it is answered.
    async fn send(&self, op: u64, piece: Option<torus_engine::Piece>) -> Result<(), String> {
        let Some((node, gen, cluster)) = self.0.client.lock().at.clone() else {
            return Err("the client is not attached".to_owned());
        };
        client::submit(&self.0.w, &self.0.client, op, piece, node, gen, cluster);
        let answered = |s: &Stage| !s.0.client.lock().in_flight.contains_key(&op);
        if !self.wait(Duration::from_millis(1), answered).await {
            return Err(format!("request {op}: no answer"));
        }
        Ok(())
    }
}
