//! Node health (`GET /v1/status`): the cores that answered, poisoned regions, checksum
//! mismatches, capacity and use, and on a cluster the state of its placement groups and
//! nodes, each trouble as one line of `problems` (healthy when there is none).

use super::Node;
use serde::{Deserialize, Serialize};
use torus_net::cluster::ClusterStatus;

/// What `GET /v1/status` answers.
#[derive(Serialize, Deserialize, Debug)]
pub struct StatusView {
    pub healthy: bool,
    pub mode: String,
    pub cores: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub volumes: usize,
    pub connections: u64,
    pub uptime_seconds: u64,
    pub problems: Vec<String>,
    pub nbd: Vec<String>,
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

impl Node {
    pub fn status(&self) -> StatusView {
        let stats = self.engine.stats();
        let mut problems = Vec::new();
        if stats.len() < self.engine.cores() {
            problems.push(format!(
                "{} of {} cores did not answer",
                self.engine.cores() - stats.len(),
                self.engine.cores()
            ));
        }
        for s in &stats {
            if s.poisoned {
                problems.push(format!(
                    "core {}: an I/O error poisoned its region; writes are refused",
                    s.core
                ));
            }
            if s.checksum_errors > 0 {
                problems.push(format!(
                    "core {}: {} checksum mismatches found on read",
                    s.core, s.checksum_errors
                ));
            }
        }
        let used = stats
            .iter()
            .map(|s| (s.slots_total - s.slots_free) * torus_engine::BLOCK_SIZE as u64)
            .sum();
        let cluster = self.cluster.as_ref().map(|c| c.status());
        let mode = match &cluster {
            None => "single node (embedded metadata)".to_string(),
            Some(c) => {
                let p = c.pgs;
                if p.down > 0 {
                    problems.push(format!(
                        "{} PGs have no replica up: their I/O fails",
                        p.down
                    ));
                }
                if p.degraded > 0 {
                    problems.push(format!(
                        "{} PGs degraded (fewer clean replicas than wanted)",
                        p.degraded
                    ));
                }
                problems.extend(c.pending.iter().cloned());
                for (node, ms) in &c.down {
                    let span = crate::size::span;
                    problems.push(match c.down_out_after_ms {
                        None => format!(
                            "node {node}: down for {} (never marked out: --down-out-after off)",
                            span(*ms)
                        ),
                        Some(after) if *ms < after => format!(
                            "node {node}: down for {}; marked out in {} if it stays down",
                            span(*ms),
                            span(after - ms)
                        ),
                        Some(_) => format!(
                            "node {node}: down for {}, past --down-out-after; not marked out yet (the leader's log says why)",
                            span(*ms)
                        ),
                    });
                }
                for (node, ms) in &c.silent {
                    problems.push(format!(
                        "node {node}: no heartbeat for {:.1} s (declared down when its lease expires)",
                        *ms as f64 / 1000.0
                    ));
                }
                if p.recovering > 0 {
                    problems.push(format!(
                        "{} PGs recovering (a replica is catching up)",
                        p.recovering
                    ));
                }
                format!(
                    "cluster node {} ({} of {} nodes up, map epoch {})",
                    c.node, c.nodes_up, c.nodes, c.epoch
                )
            }
        };
        StatusView {
            healthy: problems.is_empty(),
            mode,
            cluster,
            cores: self.engine.cores(),
            capacity_bytes: self.engine.capacity_bytes(),
            used_bytes: used,
            volumes: self.metadata.volumes().len(),
            connections: self
                .frontend
                .per_core
                .iter()
                .map(|c| c.connections.load(std::sync::atomic::Ordering::Relaxed))
                .sum(),
            uptime_seconds: self.started.elapsed().as_secs(),
            problems,
            nbd: self.nbd_urls.clone(),
        }
    }
}
