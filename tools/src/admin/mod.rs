//! The admin HTTP API of a node (`torusctl` speaks it) and `/metrics` in Prometheus text
//! format. It runs on its own thread; it reaches the cores only through their mailboxes.
//!
//! ```text
//! GET    /v1/volumes                    list, with size, used bytes and clients
//! POST   /v1/volumes                    {"name": "db", "size_bytes": 2147483648}
//! DELETE /v1/volumes/NAME               refused (409) while clients are connected
//! POST   /v1/volumes/NAME/resize        {"size_bytes": ..., "force": false}
//! POST   /v1/volumes/NAME/quota         {"quota_bytes": ... or null}
//! POST   /v1/volumes/NAME/scrub         read every replica on every node, repair bad copies
//!                                       (`?local=1`: this node only)
//! GET    /v1/status                     node health, capacity, cores (and the cluster's PGs)
//! GET    /v1/peers                      cluster nodes: address, capacity, used, state, heartbeat
//! POST   /v1/peers/NAME/remove          drain a node out of the cluster
//! POST   /v1/peers/NAME/lost            give up on a node down for good: lost PGs stop
//!                                       waiting for it (writes only it had are lost)
//! GET    /v1/snapshots[?volume=NAME]    snapshots, with the space each alone holds
//! POST   /v1/snapshots                  {"name": "db@before-upgrade"}
//! DELETE /v1/snapshots/VOLUME@SNAP      frees the blocks no volume or other snapshot maps
//! POST   /v1/snapshots/VOLUME@SNAP/restore   the volume reads as the snapshot (no clients)
//! POST   /v1/clones                     {"snapshot": "db@snap", "name": "db-test"}
//! POST   /v1/volumes/-/clone-local      {"from": ID, "to": ID}: this node's engine only (the
//!                                       cluster's snapshot and clone call it on every node)
//! GET    /v1/ublk                       ublk devices this node serves
//! POST   /v1/ublk                       {"volume": "db"}: serve it as /dev/ublkbN
//! DELETE /v1/ublk/ID                    stop and remove /dev/ublkbID
//! GET    /metrics                       Prometheus text
//! ```

use crate::size::human;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;
use torus_engine::{CoreStats, Engine};
use torus_frontend::exports::{Exports, Volume};
use torus_frontend::nbd::transmission::FrontendStats;
use torus_frontend::ublk::{DeviceView, UblkTarget};
use torus_net::cluster::{Cluster, ClusterStatus, ScrubReport};
use torus_net::metadata::{split_snapshot, Metadata, MetadataError, VolumeRecord};

/// Largest request body accepted by the admin API.
const BODY_MAX: u64 = 64 * 1024;

pub struct Node {
    pub engine: Arc<Engine>,
    pub metadata: Arc<dyn Metadata>,
    pub exports: Arc<Exports>,
    pub frontend: Arc<FrontendStats>,
    pub started: Instant,
    pub nbd_urls: Vec<String>,
    pub cluster: Option<Arc<Cluster>>,
    pub ublk: Arc<UblkTarget>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UblkView {
    pub id: u32,
    pub volume: String,
    pub device: String,
    pub queues: u16,
    pub depth: u16,
}

impl From<DeviceView> for UblkView {
    fn from(d: DeviceView) -> UblkView {
        UblkView {
            id: d.id,
            volume: d.volume,
            device: d.path,
            queues: d.queues,
            depth: d.depth,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SnapshotView {
    pub name: String,
    pub volume: String,
    pub id: u32,
    pub size_bytes: u64,
    /// What deleting it would free: blocks no volume or other snapshot shares.
    pub held_bytes: u64,
    pub created_unix: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateSnapshot {
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CloneLocal {
    pub from: u32,
    pub to: u32,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateClone {
    pub snapshot: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateUblk {
    pub volume: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VolumeView {
    pub name: String,
    pub id: u32,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub clients: usize,
    pub replicas: u32,
    pub created_unix: u64,
    /// Most bytes the volume may hold on a node; writes past it answer ENOSPC.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SetQuota {
    /// None removes the quota.
    pub quota_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateVolume {
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub replicas: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ResizeVolume {
    pub size_bytes: u64,
    #[serde(default)]
    pub force: bool,
}

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

struct Answer {
    code: u16,
    body: String,
    content_type: &'static str,
}

fn json(code: u16, value: &impl Serialize) -> Answer {
    Answer {
        code,
        body: serde_json::to_string_pretty(value).expect("serializable"),
        content_type: "application/json",
    }
}

fn error(code: u16, message: impl std::fmt::Display) -> Answer {
    json(code, &serde_json::json!({ "error": message.to_string() }))
}

fn metadata_error(e: MetadataError) -> Answer {
    match e {
        MetadataError::Exists(_) => error(409, e),
        MetadataError::NotFound(_) => error(404, e),
        MetadataError::InvalidName(_) | MetadataError::InvalidSize(_) => error(400, e),
        MetadataError::Unsupported(_) => error(409, e),
        _ => error(500, e),
    }
}

impl Node {
    fn used_by_volume(stats: &[CoreStats]) -> std::collections::HashMap<u32, u64> {
        let mut used = std::collections::HashMap::new();
        for s in stats {
            for &(v, blocks) in &s.volumes {
                *used.entry(v).or_insert(0) += blocks * torus_engine::BLOCK_SIZE as u64;
            }
        }
        used
    }

    pub fn volume_views(&self) -> Vec<VolumeView> {
        let stats = self.engine.stats();
        let used = Self::used_by_volume(&stats);
        self.metadata
            .volumes()
            .into_iter()
            .filter(|v| !v.is_snapshot())
            .map(|v| VolumeView {
                clients: self
                    .exports
                    .get(&v.name)
                    .map(|e| e.connections())
                    .unwrap_or(0),
                used_bytes: used.get(&v.id).copied().unwrap_or(0),
                name: v.name,
                id: v.id,
                size_bytes: v.size_bytes,
                replicas: v.replicas,
                quota_bytes: v.quota_bytes,
                created_unix: v.created_unix,
            })
            .collect()
    }

    fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: Option<u32>,
    ) -> Result<VolumeView, Answer> {
        let replicas = match &self.cluster {
            None => {
                let replicas = replicas.unwrap_or(1);
                if replicas != 1 {
                    return Err(error(400, format!("--replicas {replicas}: this node runs alone (no --etcd), so a volume has exactly 1 replica")));
                }
                replicas
            }
            Some(c) => {
                let nodes = c.node_count() as u32;
                let max = c.cfg.replicas_max;
                let replicas = replicas.unwrap_or(nodes.min(max));
                if replicas == 0 || replicas > max {
                    return Err(error(
                        400,
                        format!(
                            "--replicas {replicas}: use 1 to {max} (the cluster's --replicas-max)"
                        ),
                    ));
                }
                if replicas > nodes {
                    return Err(error(400, format!("--replicas {replicas}: the cluster has {nodes} node(s); add nodes or ask for fewer replicas")));
                }
                replicas
            }
        };
        let v = self
            .metadata
            .create_volume(name, size_bytes, replicas)
            .map_err(metadata_error)?;
        if self.exports.get(&v.name).is_none() {
            self.exports
                .insert(Volume::new(&v.name, v.id, v.size_bytes, v.is_snapshot()));
        }
        Ok(VolumeView {
            name: v.name,
            id: v.id,
            size_bytes: v.size_bytes,
            used_bytes: 0,
            clients: 0,
            replicas,
            created_unix: v.created_unix,
            quota_bytes: None,
        })
    }

    /// Serves again an export taken away by `remove_unless_attached` (the operation failed,
    /// or it only needed the volume free for a while).
    fn put_back(&self, removed: Option<Arc<Volume>>) {
        if let Some(v) = removed {
            self.exports
                .insert(Volume::new(&v.name, v.id, v.size(), v.read_only));
        }
    }

    fn delete_volume(&self, name: &str) -> Answer {
        let Some(vol) = self.metadata.volume(name) else {
            return metadata_error(MetadataError::NotFound(name.to_owned()));
        };
        // On a cluster, a node with clients of the volume holds its writer lock (given 2 s to
        // let go of it, for a client that has just left).
        if let Some(c) = &self.cluster {
            let since = std::time::Instant::now();
            loop {
                match c.writer_holder(vol.id) {
                    Ok(Some(node)) if node != c.me => {
                        if since.elapsed() < std::time::Duration::from_secs(2) {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            continue;
                        }
                        return error(
                            409,
                            format!("volume {name:?} has clients connected through node {node}; disconnect them first"),
                        );
                    }
                    Ok(_) => break,
                    Err(e) => return error(503, e),
                }
            }
        }
        let removed = match self.exports.remove_unless_attached(name) {
            Ok(v) => v,
            Err(clients) => {
                return error(
                    409,
                    format!(
                        "volume {name:?} has {clients} client(s) connected; disconnect them first"
                    ),
                );
            }
        };
        // Held while the volume goes, so that no node lets a client attach meanwhile.
        if let Some(c) = &self.cluster {
            if let Err(e) = c.acquire_writer(vol.id) {
                self.put_back(removed);
                return error(409, e);
            }
        }
        let deleted = self.metadata.delete_volume(name);
        if let Some(c) = &self.cluster {
            c.release_writer(vol.id);
        }
        let record = match deleted {
            Ok(r) => r,
            Err(e) => {
                self.put_back(removed);
                return metadata_error(e);
            }
        };
        // The name is gone from the metadata first: if this node stops before the blocks are
        // dropped, the next start drops them as orphans.
        match self.engine.drop_volume(record.id) {
            Ok(()) => json(200, &serde_json::json!({ "deleted": name })),
            Err(e) => error(500, format!("volume {name:?} deleted, but freeing its blocks failed: {e} (they are freed at the next start)")),
        }
    }

    fn snapshot_views(&self, volume: Option<&str>) -> Vec<SnapshotView> {
        let held = self.engine.exclusive_blocks();
        self.metadata
            .volumes()
            .into_iter()
            .filter(|v| v.is_snapshot())
            .filter(|v| volume.is_none_or(|name| v.origin.as_deref() == Some(name)))
            .map(|v| SnapshotView {
                volume: v.origin.clone().unwrap_or_default(),
                held_bytes: held.get(&v.id).copied().unwrap_or(0) * torus_engine::BLOCK_SIZE as u64,
                name: v.name,
                id: v.id,
                size_bytes: v.size_bytes,
                created_unix: v.created_unix,
            })
            .collect()
    }

    /// A new member of `origin`'s family sharing all its blocks: a snapshot (`VOL@SNAP`) of
    /// a volume, or a clone of a snapshot.
    fn create_member(&self, origin: &str, name: &str) -> Result<VolumeRecord, Answer> {
        let Some(o) = self.metadata.volume(origin) else {
            return Err(metadata_error(MetadataError::NotFound(origin.to_owned())));
        };
        let record = self
            .metadata
            .create_member(origin, name, &mut |r| {
                self.clone_everywhere(o.id, r.id)
                    .map_err(|e| format!("copying the block map of {origin:?}: {e}"))
            })
            .map_err(metadata_error)?;
        self.exports.insert(Volume::new(
            &record.name,
            record.id,
            record.size_bytes,
            record.is_snapshot(),
        ));
        Ok(record)
    }

    /// `engine.clone_volume(from, to)` on this node, and on a cluster on every node that is
    /// not down (a node that is down copies the new volume's blocks when it catches up, as it
    /// does every write it missed). A node that cannot be reached is waited for until its
    /// lease expires and it counts as down; a node that answers with an error fails the whole.
    fn clone_everywhere(&self, from: u32, to: u32) -> Result<(), String> {
        let Some(c) = &self.cluster else {
            return self
                .engine
                .clone_volume(from, to)
                .map_err(|e| e.to_string());
        };
        let deadline =
            std::time::Instant::now() + c.cfg.lease_ttl * 2 + std::time::Duration::from_secs(2);
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
                let sent = ureq::AgentBuilder::new()
                    .timeout(std::time::Duration::from_secs(120))
                    .build()
                    .post(&url)
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
                        if std::time::Instant::now() > deadline {
                            return Err(format!("node {} is up in the map but unreachable ({e}); retry once it is reachable or marked down", p.name));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(250));
                    }
                }
            }
        }
        Ok(())
    }

    fn clone_local(&self, c: CloneLocal) -> Answer {
        if torus_engine::layout::family(c.from) != torus_engine::layout::family(c.to) {
            return error(400, "clone across volume families");
        }
        match self.engine.clone_volume(c.from, c.to) {
            Ok(()) => json(200, &serde_json::json!({ "cloned": c.to })),
            Err(e) => error(500, e),
        }
    }

    /// On a cluster a snapshot is taken where the volume's writes come from: by the node
    /// holding its writer lock (the request is passed to it), with that node's writes to the
    /// volume held back until every node has copied the block map; with no writer, this node
    /// takes the lock for the while, so no other node starts writing.
    fn create_snapshot(&self, name: &str) -> Answer {
        let volume = match split_snapshot(name) {
            Ok((v, _)) => v,
            Err(e) => return metadata_error(e),
        };
        let Some(vol) = self.metadata.volume(volume) else {
            return metadata_error(MetadataError::NotFound(volume.to_owned()));
        };
        if vol.is_snapshot() {
            return error(400, "a snapshot of a snapshot: clone it first");
        }
        let Some(c) = &self.cluster else {
            return self.snapshot_here(volume, name);
        };
        let holder = match c.writer_holder(vol.id) {
            Ok(h) => h,
            Err(e) => return error(503, e),
        };
        match holder {
            Some(node) if node != c.me => {
                let Some(p) = c.peers().into_iter().find(|p| p.name == node) else {
                    return error(503, format!("volume {volume:?} is written through node {node}, which is not in the cluster map"));
                };
                let url = format!("http://{}/v1/snapshots", p.admin_addr);
                match ureq::AgentBuilder::new()
                    .timeout(std::time::Duration::from_secs(300))
                    .build()
                    .post(&url)
                    .send_json(serde_json::json!({ "name": name }))
                {
                    // The writer's answer, success or error, is this request's answer.
                    Ok(r) | Err(ureq::Error::Status(_, r)) => Answer {
                        code: r.status(),
                        body: r.into_string().unwrap_or_default(),
                        content_type: "application/json",
                    },
                    Err(e) => error(503, format!("node {node} (the volume's writer): {e}")),
                }
            }
            Some(_) => {
                if let Err(e) = c.pause_writes(vol.id, std::time::Duration::from_secs(30)) {
                    return error(503, e);
                }
                let answer = self.snapshot_here(volume, name);
                c.resume_writes(vol.id);
                answer
            }
            None => {
                if let Err(e) = c.acquire_writer(vol.id) {
                    return error(409, e);
                }
                if let Err(e) = c.pause_writes(vol.id, std::time::Duration::from_secs(30)) {
                    return error(503, e);
                }
                let answer = self.snapshot_here(volume, name);
                c.resume_writes(vol.id);
                // A client that attached here meanwhile keeps the lock (released when its
                // last connection closes).
                if self
                    .exports
                    .get(volume)
                    .is_none_or(|v| v.connections() == 0)
                {
                    c.release_writer(vol.id);
                }
                answer
            }
        }
    }

    fn snapshot_here(&self, volume: &str, name: &str) -> Answer {
        match self.create_member(volume, name) {
            Ok(_) => match self
                .snapshot_views(Some(volume))
                .into_iter()
                .find(|s| s.name == name)
            {
                Some(v) => json(201, &v),
                None => error(500, "snapshot made but not listed"),
            },
            Err(a) => a,
        }
    }

    fn create_clone(&self, c: CreateClone) -> Answer {
        if !c.snapshot.contains('@') {
            return error(400, format!("{:?} is not a snapshot (VOLUME@SNAPSHOT): clone a snapshot, so the clone's starting point is fixed", c.snapshot));
        }
        if c.name.contains('@') {
            return error(
                400,
                format!("{:?}: a clone is a volume; its name has no @", c.name),
            );
        }
        match self.create_member(&c.snapshot, &c.name) {
            Ok(v) => json(
                201,
                &VolumeView {
                    name: v.name,
                    id: v.id,
                    size_bytes: v.size_bytes,
                    used_bytes: 0,
                    clients: 0,
                    replicas: v.replicas,
                    created_unix: v.created_unix,
                    quota_bytes: None,
                },
            ),
            Err(a) => a,
        }
    }

    fn delete_snapshot(&self, name: &str) -> Answer {
        if let Err(e) = split_snapshot(name) {
            return metadata_error(e);
        }
        self.delete_volume(name)
    }

    /// The volume's blocks become the snapshot's (shared); refused while it has clients.
    fn restore_snapshot(&self, name: &str) -> Answer {
        let volume = match split_snapshot(name) {
            Ok((v, _)) => v,
            Err(e) => return metadata_error(e),
        };
        let (Some(snap), Some(vol)) = (self.metadata.volume(name), self.metadata.volume(volume))
        else {
            return error(
                404,
                format!("no snapshot named {name:?} (or its volume is gone)"),
            );
        };
        if torus_engine::layout::family(snap.id) != torus_engine::layout::family(vol.id) {
            return error(
                409,
                format!(
                    "{name:?} was taken of an earlier volume named {volume:?}; clone it instead"
                ),
            );
        }
        // Taking the export away keeps clients out while the map changes under it.
        let removed = match self.exports.remove_unless_attached(volume) {
            Ok(v) => v,
            Err(clients) => {
                return error(409, format!("volume {volume:?} has {clients} client(s) connected; disconnect them before restoring"));
            }
        };
        // On a cluster no node may be writing it: hold its writer lock for the while.
        let locked = match &self.cluster {
            Some(c) => match c.acquire_writer(vol.id) {
                Ok(_) => true,
                Err(e) => {
                    self.put_back(removed);
                    return error(409, e);
                }
            },
            None => false,
        };
        let result = self.clone_everywhere(snap.id, vol.id);
        if let (true, Some(c)) = (locked, &self.cluster) {
            c.release_writer(vol.id);
        }
        self.put_back(removed);
        match result {
            Ok(()) => json(
                200,
                &serde_json::json!({ "restored": volume, "from": name }),
            ),
            Err(e) => error(500, format!("restore {volume:?} from {name:?}: {e}")),
        }
    }

    /// Sets a volume's quota in the metadata and on this node's engine (the other nodes of a
    /// cluster apply it when their volume poller sees it, within a second).
    fn set_quota(&self, name: &str, quota: Option<u64>, code: u16) -> Answer {
        if let Some(q) = quota {
            if q == 0 || q % torus_engine::BLOCK_SIZE as u64 != 0 {
                return error(400, format!("quota {q}: use a positive multiple of 4 KiB"));
            }
        }
        if self.metadata.volume(name).is_some_and(|v| v.is_snapshot()) {
            return error(400, format!("{name:?} is a snapshot: it takes no writes"));
        }
        let v = match self.metadata.set_quota(name, quota) {
            Ok(v) => v,
            Err(e) => return metadata_error(e),
        };
        if let Err(e) = self.engine.set_quota(v.id, quota) {
            return error(500, format!("apply the quota of {name:?}: {e}"));
        }
        match self.volume_views().into_iter().find(|x| x.name == name) {
            Some(view) => json(code, &view),
            None => error(500, "volume vanished"),
        }
    }

    fn resize_volume(&self, name: &str, r: ResizeVolume) -> Answer {
        let Some(v) = self.metadata.volume(name) else {
            return metadata_error(MetadataError::NotFound(name.to_owned()));
        };
        if v.is_snapshot() {
            return error(400, format!("{name:?} is a snapshot: snapshots keep their size (clone it to get a volume you can resize)"));
        }
        if r.size_bytes < v.size_bytes && !r.force {
            return error(409, format!("shrinking {name:?} from {} to {} drops the data past the new end; repeat with --force", human(v.size_bytes), human(r.size_bytes)));
        }
        match self.metadata.resize_volume(name, r.size_bytes) {
            Ok(v) => {
                if let Some(e) = self.exports.get(name) {
                    e.set_size(v.size_bytes);
                }
                json(
                    200,
                    &serde_json::json!({ "name": name, "size_bytes": v.size_bytes, "note": "new NBD connections see the new size" }),
                )
            }
            Err(e) => metadata_error(e),
        }
    }

    fn scrub(&self, name: &str, local_only: bool) -> Answer {
        let Some(c) = &self.cluster else {
            return error(400, "scrub rewrites a bad copy from another replica, so it needs a cluster (--etcd); on a single node every read already checks its block's crc32c");
        };
        let Some(v) = self.metadata.volume(name) else {
            return metadata_error(MetadataError::NotFound(name.to_owned()));
        };
        if local_only {
            return json(200, &vec![c.block_on(c.scrub_local(v.id))]);
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
            let agent = ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(3600))
                .build();
            match agent
                .post(&url)
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
        json(200, &reports)
    }

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

    pub fn metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.engine.stats();
        let mut out = String::new();
        let mut counter =
            |name: &str,
             help: &str,
             kind: &str,
             values: &mut dyn Iterator<Item = (String, u64)>| {
                let _ = writeln!(
                    out,
                    "# HELP torus_{name} {help}\n# TYPE torus_{name} {kind}"
                );
                for (labels, v) in values {
                    let _ = writeln!(out, "torus_{name}{{{labels}}} {v}");
                }
            };
        macro_rules! per_core {
            ($name:expr, $help:expr, $kind:expr, $field:ident) => {
                counter(
                    $name,
                    $help,
                    $kind,
                    &mut stats
                        .iter()
                        .map(|s| (format!("core=\"{}\"", s.core), s.$field)),
                )
            };
        }
        per_core!(
            "reads_total",
            "Read pieces completed by the core that owns them.",
            "counter",
            reads
        );
        per_core!("writes_total", "Write pieces completed.", "counter", writes);
        per_core!(
            "zeroes_total",
            "Trim and write-zeroes pieces completed.",
            "counter",
            zeroes
        );
        per_core!("flushes_total", "Flushes answered.", "counter", flushes);
        per_core!(
            "read_bytes_total",
            "Bytes read by clients.",
            "counter",
            bytes_read
        );
        per_core!(
            "written_bytes_total",
            "Bytes written by clients.",
            "counter",
            bytes_written
        );
        per_core!(
            "commits_total",
            "Journal commits (group commit: one for many flushes).",
            "counter",
            commits
        );
        per_core!(
            "checkpoints_total",
            "Checkpoints written.",
            "counter",
            checkpoints
        );
        per_core!(
            "checksum_errors_total",
            "Blocks whose crc32c did not match on read (answered EIO).",
            "counter",
            checksum_errors
        );
        per_core!(
            "io_errors_total",
            "Failed disk operations.",
            "counter",
            io_errors
        );
        per_core!(
            "disk_write_ops_total",
            "Data writes sent to the disk; consecutive slots of many pieces merge into one.",
            "counter",
            disk_write_ops
        );
        per_core!(
            "disk_sync_write_ops_total",
            "Of those, written with pwrite by a core with nothing else in flight (queue depth 1).",
            "counter",
            sync_write_ops
        );
        per_core!(
            "queue_depth",
            "Pieces in flight on the core.",
            "gauge",
            pieces_in_flight
        );
        per_core!(
            "slots_total",
            "Data slots (4 KiB) of the core's region.",
            "gauge",
            slots_total
        );
        per_core!("slots_free", "Free data slots.", "gauge", slots_free);
        let f = &self.frontend.per_core[..self.engine.cores().min(self.frontend.per_core.len())];
        counter(
            "nbd_connections",
            "Open NBD connections owned by the core.",
            "gauge",
            &mut f
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("core=\"{i}\""), c.connections.load(Relaxed))),
        );
        counter(
            "nbd_requests_in_flight",
            "NBD requests received and not yet answered.",
            "gauge",
            &mut f
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("core=\"{i}\""), c.requests_in_flight.load(Relaxed))),
        );
        counter(
            "nbd_requests_total",
            "NBD requests received.",
            "counter",
            &mut f
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("core=\"{i}\""), c.requests.load(Relaxed))),
        );
        counter(
            "nbd_bad_requests_total",
            "NBD requests refused as malformed.",
            "counter",
            &mut f
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("core=\"{i}\""), c.bad_requests.load(Relaxed))),
        );
        let used = Self::used_by_volume(&stats);
        let volumes = self.metadata.volumes();
        counter(
            "volume_size_bytes",
            "Provisioned size of each volume.",
            "gauge",
            &mut volumes
                .iter()
                .map(|v| (format!("volume=\"{}\"", v.name), v.size_bytes)),
        );
        counter(
            "volume_used_bytes",
            "Bytes of each volume that hold data.",
            "gauge",
            &mut volumes.iter().map(|v| {
                (
                    format!("volume=\"{}\"", v.name),
                    used.get(&v.id).copied().unwrap_or(0),
                )
            }),
        );
        const BOUNDS_US: [u64; 12] = [
            50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
        ];
        let _ = writeln!(out, "# HELP torus_latency_us Time from a piece reaching its core to its answer, in microseconds.\n# TYPE torus_latency_us histogram");
        for s in &stats {
            for (op, h) in [("read", &s.latency_read_us), ("write", &s.latency_write_us)] {
                for b in BOUNDS_US {
                    let n = h
                        .iter_recorded()
                        .filter(|v| v.value_iterated_to() <= b)
                        .map(|v| v.count_at_value())
                        .sum::<u64>();
                    let _ = writeln!(
                        out,
                        "torus_latency_us_bucket{{core=\"{}\",op=\"{op}\",le=\"{b}\"}} {n}",
                        s.core
                    );
                }
                let _ = writeln!(
                    out,
                    "torus_latency_us_bucket{{core=\"{}\",op=\"{op}\",le=\"+Inf\"}} {}",
                    s.core,
                    h.len()
                );
                let sum: f64 = h.mean() * h.len() as f64;
                let _ = writeln!(
                    out,
                    "torus_latency_us_sum{{core=\"{}\",op=\"{op}\"}} {}",
                    s.core, sum as u64
                );
                let _ = writeln!(
                    out,
                    "torus_latency_us_count{{core=\"{}\",op=\"{op}\"}} {}",
                    s.core,
                    h.len()
                );
            }
        }
        if let Some(c) = &self.cluster {
            let p = &torus_net::peer::COUNTERS;
            for (name, help, v) in [
                (
                    "torus_peer_frames_sent_total",
                    "Frames sent to other nodes (each one send)",
                    &p.frames_sent,
                ),
                (
                    "torus_peer_entries_sent_total",
                    "Requests and replies sent to other nodes",
                    &p.entries_sent,
                ),
                (
                    "torus_peer_bytes_sent_total",
                    "Bytes sent to other nodes",
                    &p.bytes_sent,
                ),
                (
                    "torus_peer_frames_received_total",
                    "Frames received from other nodes",
                    &p.frames_received,
                ),
                (
                    "torus_peer_entries_received_total",
                    "Requests and replies received from other nodes",
                    &p.entries_received,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                    v.load(Relaxed)
                );
            }
            let _ = writeln!(out, "# HELP torus_reads_answered_by_replica_total Reads whose local copy failed its checksum, answered from another replica\n# TYPE torus_reads_answered_by_replica_total counter\ntorus_reads_answered_by_replica_total {}", c.repaired_reads());
            let h = c.health();
            let _ = writeln!(
                out,
                "# HELP torus_pgs Placement groups by state\n# TYPE torus_pgs gauge"
            );
            for (state, n) in [
                ("clean", h.clean),
                ("degraded", h.degraded),
                ("recovering", h.recovering),
                ("down", h.down),
            ] {
                let _ = writeln!(out, "torus_pgs{{state=\"{state}\"}} {n}");
            }
            let map = c.map();
            let _ = writeln!(out, "# HELP torus_map_epoch Cluster map epoch this node has\n# TYPE torus_map_epoch gauge\ntorus_map_epoch {}", map.epoch);
            let now_ms = torus_net::cluster::now_ms();
            let _ = writeln!(out, "# HELP torus_node_down_seconds How long each node the cluster map counts as down has been down, as the map records it\n# TYPE torus_node_down_seconds gauge");
            for (name, n) in &map.nodes {
                if let Some(ms) = n.down_for_ms(now_ms) {
                    let _ = writeln!(
                        out,
                        "torus_node_down_seconds{{node=\"{}\"}} {:.1}",
                        label_value(name),
                        ms as f64 / 1000.0
                    );
                }
            }
        }
        out
    }

    fn handle(&self, method: &tiny_http::Method, url: &str, body: &[u8]) -> Answer {
        use tiny_http::Method::*;
        let path = url.split('?').next().unwrap_or("");
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (Get, ["metrics"]) => Answer {
                code: 200,
                body: self.metrics(),
                content_type: "text/plain; version=0.0.4",
            },
            (Get, ["v1", "status"]) => {
                let s = self.status();
                json(200, &s)
            }
            (Get, ["v1", "volumes"]) => json(200, &self.volume_views()),
            (Get, ["v1", "peers"]) => match &self.cluster {
                Some(c) => json(200, &c.peers()),
                None => error(400, "this node runs alone (no --etcd): it has no peers"),
            },
            (Post, ["v1", "peers", name, "lost"]) => match &self.cluster {
                Some(c) => match c.give_up_peer(name) {
                    Ok(g) => json(200, &g),
                    Err(e) => error(409, e),
                },
                None => error(400, "this node runs alone (no --etcd): it has no peers"),
            },
            (Post, ["v1", "peers", name, "remove"]) => match &self.cluster {
                Some(c) => match c.remove_peer(name) {
                    Ok(()) => json(200, &serde_json::json!({ "removing": name })),
                    Err(e) => error(409, e),
                },
                None => error(400, "this node runs alone (no --etcd): it has no peers"),
            },
            (Post, ["v1", "volumes"]) => match serde_json::from_slice::<CreateVolume>(body) {
                Ok(c) => match self.create_volume(&c.name, c.size_bytes, c.replicas) {
                    Ok(v) => match c.quota_bytes {
                        None => json(201, &v),
                        Some(q) => self.set_quota(&v.name, Some(q), 201),
                    },
                    Err(a) => a,
                },
                Err(e) => error(400, format!("bad request body: {e}")),
            },
            (Delete, ["v1", "volumes", name]) => self.delete_volume(name),
            (Post, ["v1", "volumes", name, "quota"]) => {
                match serde_json::from_slice::<SetQuota>(body) {
                    Ok(q) => self.set_quota(name, q.quota_bytes, 200),
                    Err(e) => error(400, format!("bad request body: {e}")),
                }
            }
            (Post, ["v1", "volumes", name, "scrub"]) => self.scrub(name, url.contains("local=1")),
            (Post, ["v1", "volumes", name, "resize"]) => {
                match serde_json::from_slice::<ResizeVolume>(body) {
                    Ok(r) => self.resize_volume(name, r),
                    Err(e) => error(400, format!("bad request body: {e}")),
                }
            }
            (Get, ["v1", "snapshots"]) => {
                let volume = url
                    .split_once("volume=")
                    .map(|(_, v)| v.split('&').next().unwrap_or(""));
                json(200, &self.snapshot_views(volume))
            }
            (Post, ["v1", "snapshots"]) => match serde_json::from_slice::<CreateSnapshot>(body) {
                Ok(c) => self.create_snapshot(&c.name),
                Err(e) => error(400, format!("bad request body: {e}")),
            },
            (Delete, ["v1", "snapshots", name]) => self.delete_snapshot(name),
            (Post, ["v1", "snapshots", name, "restore"]) => self.restore_snapshot(name),
            (Post, ["v1", "volumes", "-", "clone-local"]) => {
                match serde_json::from_slice::<CloneLocal>(body) {
                    Ok(c) => self.clone_local(c),
                    Err(e) => error(400, format!("bad request body: {e}")),
                }
            }
            (Post, ["v1", "clones"]) => match serde_json::from_slice::<CreateClone>(body) {
                Ok(c) => self.create_clone(c),
                Err(e) => error(400, format!("bad request body: {e}")),
            },
            (Get, ["v1", "ublk"]) => json(
                200,
                &self
                    .ublk
                    .list()
                    .into_iter()
                    .map(UblkView::from)
                    .collect::<Vec<_>>(),
            ),
            (Post, ["v1", "ublk"]) => match serde_json::from_slice::<CreateUblk>(body) {
                Ok(c) => match self.ublk.create(&c.volume) {
                    Ok(d) => json(201, &UblkView::from(d)),
                    Err(e) => error(409, e),
                },
                Err(e) => error(400, format!("bad request body: {e}")),
            },
            (Delete, ["v1", "ublk", id]) => match id.parse::<u32>() {
                Ok(id) => match self.ublk.remove(id) {
                    Ok(()) => json(200, &serde_json::json!({ "removed": id })),
                    Err(e) => error(409, e),
                },
                Err(_) => error(400, format!("{id:?} is not a ublk device id")),
            },
            _ => error(404, format!("no such endpoint: {method} {path}")),
        }
    }
}

/// Requests the admin API works on at once; more are answered 503. Each runs on its own
/// thread: a cluster snapshot asked of one node calls other nodes' admin APIs, which may call
/// back (a single-threaded server would wait on itself).
const ADMIN_CONCURRENCY: usize = 32;

/// Serves the admin API until `server.unblock()` is called.
pub fn serve(node: Arc<Node>, server: Arc<tiny_http::Server>) -> std::thread::JoinHandle<()> {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("torus-admin".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                use std::sync::atomic::Ordering;
                if busy.fetch_add(1, Ordering::SeqCst) >= ADMIN_CONCURRENCY {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    respond(
                        request,
                        error(503, "too many admin requests at once; retry"),
                    );
                    continue;
                }
                let node = node.clone();
                let done = busy.clone();
                let spawned = std::thread::Builder::new()
                    .name("torus-admin-req".into())
                    .spawn(move || {
                        answer(&node, request);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .expect("spawn admin thread")
}

fn answer(node: &Node, mut request: tiny_http::Request) {
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(BODY_MAX + 1)
        .read_to_end(&mut body);
    let answer = if read.is_err() || body.len() as u64 > BODY_MAX {
        error(413, "request body too large or unreadable")
    } else {
        node.handle(request.method(), request.url(), &body)
    };
    respond(request, answer);
}

fn respond(request: tiny_http::Request, answer: Answer) {
    let header =
        tiny_http::Header::from_bytes("Content-Type", answer.content_type).expect("static header");
    let response = tiny_http::Response::from_string(answer.body)
        .with_status_code(answer.code)
        .with_header(header);
    let _ = request.respond(response);
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
