//! What the cluster shows: the rows of `torusctl peers` and the cluster half of `torusctl
//! status`, the stats each node publishes with its heartbeat (`NodeStats`), catch-up progress
//! (`Recovery`) and reads repaired from another replica.
//!
//! The views read the map fresh from etcd: a stale map here must not hide a problem.

use super::Cluster;
use crate::map::{ClusterMap, NodeInfo, PgHealth};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a node publishes about itself besides its `NodeInfo` (changes often, so it does not
/// live in the map).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStats {
    pub used_bytes: u64,
    pub heartbeat_unix_ms: u64,
    pub recovery: Recovery,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recovery {
    pub pgs_stale: u64,
    pub pgs_done: u64,
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    pub blocks_compared: u64,
}

/// One row of `torusctl peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub peer_addr: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub incarnation: u64,
    pub capacity_bytes: u64,
    pub used_bytes: Option<u64>,
    /// up, down or removing.
    pub state: String,
    pub last_heartbeat_ms_ago: Option<u64>,
    /// For a node that is down: how long, as the map records it.
    #[serde(default)]
    pub down_for_ms: Option<u64>,
    pub pgs_held: u32,
    pub recovery: Option<Recovery>,
}

/// The cluster half of `torusctl status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    pub epoch: u64,
    pub leader: Option<String>,
    pub nodes_up: usize,
    pub nodes: usize,
    pub pgs: PgHealth,
    pub pg_count: u32,
    pub replicas_max: u32,
    /// Catch-up progress of nodes that are copying.
    pub recovering: Vec<(String, Recovery)>,
    /// Nodes the map still counts as up whose heartbeat is overdue: (name, ms since).
    #[serde(default)]
    pub silent: Vec<(String, u64)>,
    /// Membership changes the leader has not put in the map yet.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Nodes down (not being drained): how long, as the map records it, and this node's
    /// `--down-out-after` (None: off).
    #[serde(default)]
    pub down: Vec<(String, u64)>,
    #[serde(default)]
    pub down_out_after_ms: Option<u64>,
}

impl Cluster {
    pub fn recovery(&self) -> Recovery {
        self.recovery.lock().clone()
    }

    pub fn health(&self) -> PgHealth {
        self.map().health()
    }

    /// Reads whose local copy failed and that another replica answered.
    pub fn repaired_reads(&self) -> u64 {
        self.repaired_reads.load(Ordering::Relaxed)
    }

    /// Fresh from etcd (a stale map here must not hide a problem).
    pub(super) fn fresh_map(&self) -> Arc<ClusterMap> {
        if let Ok((Some(m), _)) = self.block_on(self.kv.map()) {
            self.install_map(m);
        }
        self.map()
    }

    fn all_stats(&self) -> HashMap<String, NodeStats> {
        self.block_on(self.kv.list("stats/"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
            .collect()
    }

    pub fn peers(&self) -> Vec<PeerView> {
        let map = self.fresh_map();
        let stats = self.all_stats();
        let now = self.host.now_ms();
        map.nodes
            .iter()
            .map(|(name, n)| {
                let s = stats.get(name);
                PeerView {
                    name: name.clone(),
                    peer_addr: n.info.peer_addr.clone(),
                    admin_addr: n.info.admin_addr.clone(),
                    nbd_addr: n.info.nbd_addr.clone(),
                    incarnation: n.info.incarnation,
                    capacity_bytes: n.info.capacity_bytes,
                    used_bytes: s.map(|s| s.used_bytes),
                    state: if n.removing {
                        "removing"
                    } else if n.up {
                        "up"
                    } else {
                        "down"
                    }
                    .into(),
                    last_heartbeat_ms_ago: s.map(|s| now.saturating_sub(s.heartbeat_unix_ms)),
                    down_for_ms: n.down_for_ms(now),
                    pgs_held: map
                        .pgs
                        .iter()
                        .filter(|slots| slots.iter().any(|s| &s.node == name))
                        .count() as u32,
                    recovery: s.map(|s| s.recovery.clone()).filter(|r| r.pgs_stale > 0),
                }
            })
            .collect()
    }

    pub fn status(&self) -> ClusterStatus {
        let map = self.fresh_map();
        let stats = self.all_stats();
        let leader = self
            .block_on(self.kv.get("leader"))
            .ok()
            .flatten()
            .map(|(v, _)| String::from_utf8_lossy(&v).into_owned());
        let now = self.host.now_ms();
        let overdue = (self.cfg.lease_ttl / 3 * 2).as_millis() as u64 + 500;
        let silent = map
            .nodes
            .iter()
            .filter(|(_, n)| n.up)
            .filter_map(|(name, _)| {
                let since = stats
                    .get(name)
                    .map_or(u64::MAX, |s| now.saturating_sub(s.heartbeat_unix_ms));
                (since > overdue && since != u64::MAX).then(|| (name.clone(), since))
            })
            .collect();
        let live: HashMap<String, NodeInfo> = self
            .block_on(self.kv.list("nodes/"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
            .collect();
        let mut pending = Vec::new();
        for (name, n) in &map.nodes {
            match live.get(name) {
                None if n.up => pending.push(format!(
                    "node {name}: its lease is gone; not yet marked down"
                )),
                Some(info) if !n.up || info.incarnation != n.info.incarnation => {
                    pending.push(format!("node {name}: (re)started; not yet in the map"))
                }
                _ => {}
            }
        }
        for (name, info) in &live {
            let drained = map.removed.get(name) == Some(&info.incarnation);
            if !map.nodes.contains_key(name) && !drained {
                pending.push(format!("node {name}: joined; not yet in the map"));
            }
        }
        // Lost PGs that wait for a node down: a last clean holder, or a holder demoted while
        // it ran (`map::Demoted`), which may have writes their restarted holders lost.
        let mut waits: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (pg, lost) in &map.last_clean {
            let holders = lost.holders.iter().map(|(n, _)| n);
            let demoted = map.demoted.get(pg).into_iter().flatten().map(|d| &d.node);
            for name in holders.chain(demoted) {
                if map.nodes.get(name).is_some_and(|n| !n.up) {
                    waits.entry(name.clone()).or_default().insert(*pg);
                }
            }
        }
        for (name, pgs) in waits {
            pending.push(format!(
                "node {name}: {} lost placement groups may wait for it (start it again; if it is gone for good, torusctl peer lost {name} goes on without it)",
                pgs.len()
            ));
        }
        let down = map
            .down_nodes(now)
            .map(|(name, ms)| (name.clone(), ms))
            .collect();
        ClusterStatus {
            pending,
            silent,
            down,
            down_out_after_ms: self.cfg.down_out_after.map(|d| d.as_millis() as u64),
            node: self.me.clone(),
            epoch: map.epoch,
            leader,
            nodes_up: map.nodes.values().filter(|n| n.up).count(),
            nodes: map.nodes.len(),
            pgs: map.health(),
            pg_count: map.pg_count,
            replicas_max: map.replicas_max,
            recovering: stats
                .into_iter()
                .filter(|(_, s)| s.recovery.pgs_stale > 0)
                .map(|(k, s)| (k, s.recovery))
                .collect(),
        }
    }

    /// Nodes a new volume can be replicated on.
    pub fn node_count(&self) -> usize {
        self.fresh_map()
            .nodes
            .values()
            .filter(|n| !n.removing)
            .count()
    }
}
