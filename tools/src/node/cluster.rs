//! Every place the volume services do something different on a cluster than on a node that
//! runs alone, so the services themselves (`volumes.rs`, `snapshots.rs`) read the same in both:
//!
//! - the replica count of a new volume (exactly 1 alone; up to the cluster's nodes and its
//!   `--replicas-max` on a cluster);
//! - the volume's writer lock: at most one node writes a volume, the one its clients connect
//!   through. A change that must not race a write (delete, restore) waits for another node's
//!   clients to leave and holds the lock while it runs; a snapshot is taken by the lock's
//!   holder with its writes held back;
//! - work done on every node through its admin API: copying a block map
//!   (`POST /v1/volumes/-/clone-local`) and scrubbing (`POST /v1/volumes/NAME/scrub?local=1`).
//!
//! On a node that runs alone, each of these is done on its own engine, or refused with a reason.

use super::{Node, NodeError, SnapshotTaken};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_net::cluster::{Cluster, ScrubReport};
use torus_net::metadata::MetadataError;

/// How long a delete waits for another node to let go of the volume's writer lock, for a
/// client that has just left through it.
const WRITER_LET_GO: Duration = Duration::from_secs(2);

/// How long a snapshot holds the volume's writes back, at most, while every node copies the
/// block map.
const SNAPSHOT_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Time given to the volume's writer to take a snapshot passed to it (it copies the block
/// map on every node).
const SNAPSHOT_FORWARD_TIMEOUT: Duration = Duration::from_secs(300);

/// Time given to one node to copy a block map.
const CLONE_LOCAL_TIMEOUT: Duration = Duration::from_secs(120);

/// Time given to one node to scrub its replicas of a volume (it reads every block).
const SCRUB_LOCAL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Holds this node's writes to the volume back, for at most `SNAPSHOT_PAUSE_MAX`.
fn pause_writes(c: &Arc<Cluster>, volume_id: u32) -> Result<(), NodeError> {
    c.pause_writes(volume_id, SNAPSHOT_PAUSE_MAX)
        .map_err(|e| NodeError::Unavailable(e.to_string()))
}

impl Node {
    /// The replica count a new volume gets: `asked`, checked, or the default (1 alone; on a
    /// cluster one per node up to `--replicas-max`).
    pub(super) fn replicas_for(&self, asked: Option<u32>) -> Result<u32, NodeError> {
        match &self.cluster {
            None => {
                let replicas = asked.unwrap_or(1);
                if replicas != 1 {
                    return Err(NodeError::Invalid(format!("--replicas {replicas}: this node runs alone (no --etcd), so a volume has exactly 1 replica")));
                }
                Ok(replicas)
            }
            Some(c) => {
                let nodes = c.node_count() as u32;
                let max = c.cfg.replicas_max;
                let replicas = asked.unwrap_or(nodes.min(max));
                if replicas == 0 || replicas > max {
                    return Err(NodeError::Invalid(format!(
                        "--replicas {replicas}: use 1 to {max} (the cluster's --replicas-max)"
                    )));
                }
                if replicas > nodes {
                    return Err(NodeError::Invalid(format!("--replicas {replicas}: the cluster has {nodes} node(s); add nodes or ask for fewer replicas")));
                }
                Ok(replicas)
            }
        }
    }

    /// On a cluster, a node with clients of the volume holds its writer lock: waits
    /// `WRITER_LET_GO` for another node to let go of it, then refuses. Alone, nothing to wait
    /// for.
    pub(super) fn wait_for_other_writer(
        &self,
        volume_id: u32,
        name: &str,
    ) -> Result<(), NodeError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let since = Instant::now();
        loop {
            match c.writer_holder(volume_id) {
                Ok(Some(node)) if node != c.me => {
                    if since.elapsed() < WRITER_LET_GO {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    return Err(NodeError::Conflict(format!("volume {name:?} has clients connected through node {node}; disconnect them first")));
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(NodeError::Unavailable(e.to_string())),
            }
        }
    }

    /// Runs `work` holding the volume's writer lock on a cluster, so that no node writes the
    /// volume or lets a client attach meanwhile; alone, runs it. Fails without running `work`
    /// when the lock cannot be taken.
    pub(super) fn holding_writer<T>(
        &self,
        volume_id: u32,
        work: impl FnOnce() -> T,
    ) -> Result<T, NodeError> {
        let Some(c) = &self.cluster else {
            return Ok(work());
        };
        c.acquire_writer(volume_id)
            .map_err(|e| NodeError::Conflict(e.to_string()))?;
        let done = work();
        c.release_writer(volume_id);
        Ok(done)
    }

    /// `engine.clone_volume(from, to)` on this node, and on a cluster on every node that is
    /// not down (a node that is down copies the new volume's blocks when it catches up, as it
    /// does every write it missed). A node that cannot be reached is waited for until its
    /// lease expires and it counts as down; a node that answers with an error fails the whole.
    pub(super) fn clone_everywhere(&self, from: u32, to: u32) -> Result<(), String> {
        let Some(c) = &self.cluster else {
            return self
                .engine
                .clone_volume(from, to)
                .map_err(|e| e.to_string());
        };
        let deadline = Instant::now() + c.cfg.lease_ttl * 2 + Duration::from_secs(2);
        for p in c.peers() {
            if p.state == "down" {
                continue;
            }
            if p.name == c.me {
                self.engine
                    .clone_volume(from, to)
                    .map_err(|e| format!("node {}: {e}", p.name))?;
                continue;
            }
            let url = format!("http://{}/v1/volumes/-/clone-local", p.admin_addr);
            loop {
                let sent = self
                    .to_node(CLONE_LOCAL_TIMEOUT, &url)
                    .send_json(serde_json::json!({ "from": from, "to": to }));
                match sent {
                    Ok(_) => break,
                    Err(ureq::Error::Status(code, r)) => {
                        let body = r.into_string().unwrap_or_default();
                        return Err(format!("node {}: HTTP {code}: {body}", p.name));
                    }
                    Err(e) => {
                        let down = c
                            .peers()
                            .iter()
                            .any(|q| q.name == p.name && q.state == "down");
                        if down {
                            break; // it catches up when it returns
                        }
                        if Instant::now() > deadline {
                            return Err(format!("node {} is up in the map but unreachable ({e}); retry once it is reachable or marked down", p.name));
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
        }
        Ok(())
    }

    /// On a cluster a snapshot is taken where the volume's writes come from: by the node
    /// holding its writer lock (the request is passed to it), with that node's writes to the
    /// volume held back until every node has copied the block map; with no writer, this node
    /// takes the lock for the while, so no other node starts writing. Alone, it is taken here.
    pub(super) fn snapshot_where_written(
        &self,
        volume_id: u32,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotTaken, NodeError> {
        let Some(c) = &self.cluster else {
            return self.snapshot_here(volume, name).map(SnapshotTaken::Here);
        };
        let holder = c
            .writer_holder(volume_id)
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        match holder {
            Some(node) if node != c.me => {
                let Some(p) = c.peers().into_iter().find(|p| p.name == node) else {
                    return Err(NodeError::Unavailable(format!("volume {volume:?} is written through node {node}, which is not in the cluster map")));
                };
                let url = format!("http://{}/v1/snapshots", p.admin_addr);
                match self
                    .to_node(SNAPSHOT_FORWARD_TIMEOUT, &url)
                    .send_json(serde_json::json!({ "name": name }))
                {
                    // The writer's answer, success or error, is this request's answer.
                    Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(SnapshotTaken::ByWriter {
                        code: r.status(),
                        body: r.into_string().unwrap_or_default(),
                    }),
                    Err(e) => Err(NodeError::Unavailable(format!(
                        "node {node} (the volume's writer): {e}"
                    ))),
                }
            }
            Some(_) => {
                pause_writes(c, volume_id)?;
                self.snapshot_then_resume(c, volume_id, volume, name)
            }
            None => {
                c.acquire_writer(volume_id)
                    .map_err(|e| NodeError::Conflict(e.to_string()))?;
                // A refused pause returns with the lock still held.
                pause_writes(c, volume_id)?;
                let taken = self.snapshot_then_resume(c, volume_id, volume, name);
                // A client that attached here meanwhile keeps the lock (released when its
                // last connection closes).
                if self
                    .exports
                    .get(volume)
                    .is_none_or(|v| v.connections() == 0)
                {
                    c.release_writer(volume_id);
                }
                taken
            }
        }
    }

    /// Takes the snapshot here while this node's writes to the volume are held back, then
    /// lets them go.
    fn snapshot_then_resume(
        &self,
        c: &Arc<Cluster>,
        volume_id: u32,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotTaken, NodeError> {
        let taken = self.snapshot_here(volume, name);
        c.resume_writes(volume_id);
        taken.map(SnapshotTaken::Here)
    }

    /// A POST to another node's admin API, with the cluster's node token.
    fn to_node(&self, timeout: Duration, url: &str) -> ureq::Request {
        let request = ureq::AgentBuilder::new().timeout(timeout).build().post(url);
        match &self.node_token {
            Some(t) => request.set("Authorization", &format!("Bearer {}", t.as_str())),
            None => request,
        }
    }

    /// Reads every replica of the volume on every node that is up and repairs bad copies from
    /// good ones; `local_only`: this node's replicas only. Needs a cluster.
    pub fn scrub(&self, name: &str, local_only: bool) -> Result<Vec<ScrubReport>, NodeError> {
        let Some(c) = &self.cluster else {
            return Err(NodeError::Invalid("scrub rewrites a bad copy from another replica, so it needs a cluster (--etcd); on a single node every read already checks its block's crc32c".into()));
        };
        let Some(v) = self.metadata.volume(name) else {
            return Err(MetadataError::NotFound(name.to_owned()).into());
        };
        if local_only {
            return Ok(vec![c.block_on(c.scrub_local(v.id))]);
        }
        let mut reports: Vec<ScrubReport> = Vec::new();
        for p in c.peers() {
            if p.state != "up" {
                reports.push(ScrubReport {
                    node: p.name.clone(),
                    problems: vec![format!("node is {}: not scrubbed", p.state)],
                    ..ScrubReport::default()
                });
                continue;
            }
            if p.name == c.me {
                reports.push(c.block_on(c.scrub_local(v.id)));
                continue;
            }
            let url = format!("http://{}/v1/volumes/{name}/scrub?local=1", p.admin_addr);
            match self
                .to_node(SCRUB_LOCAL_TIMEOUT, &url)
                .call()
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_json::<Vec<ScrubReport>>().map_err(|e| e.to_string()))
            {
                Ok(r) => reports.extend(r),
                Err(e) => reports.push(ScrubReport {
                    node: p.name.clone(),
                    problems: vec![format!("scrub request failed: {e}")],
                    ..ScrubReport::default()
                }),
            }
        }
        Ok(reports)
    }
}
