//! The cluster's data path and control loops on one node.
//!
//! Data path. Frontends on this node hand every piece to `Cluster` (it is the engine's
//! `Router`). A piece of a volume belongs to a placement group; the map names the PG's primary
//! (its first clean replica that is up). Reads go to the primary; writes go to the primary,
//! which writes locally and forwards to every other replica that is up — the same core index
//! on each, one batched frame per peer — and answers when all have it. A piece whose primary
//! is another node travels there as a `C*` request. Whatever fails with "ask again" (the
//! primary moved, a peer died, too few replicas up) is retried against a fresh map until the
//! request's deadline, then answered with EIO; a PG with no replica up answers EIO, never
//! zeros.
//!
//! Control loops (tokio, off the cores): the node's lease and heartbeat, the map and volume
//! pollers, the leader (who reconciles the map with the live nodes), and catch-up: a node
//! holding stale slots copies from each PG's primary only the blocks whose checksums differ.
//!
//! This folder, one concern per file; each adds the methods of its concern to `Cluster`, whose
//! fields stay private to this module:
//!
//! - `mod.rs`: `Cluster` and its config; joining the cluster (`Cluster::start`: the node's
//!   store owns its name, its registration on a lease, the peer listener, the control loops)
//!   and leaving it; the links to other nodes.
//! - `data_path.rs`: routing a piece to its PG's primary, forwarding, the coordinated write
//!   and the replica write.
//! - `store.rs`: this node's own store, reached through its cores' mailboxes.
//! - `durability.rs`: flushes and their records in etcd, the writes in flight by map epoch,
//!   and the fence of a node cut off from etcd past its lease.
//! - `membership.rs`: the lease and heartbeat, the map and volume pollers, installing a map,
//!   an operator giving up on or removing a node.
//! - `leader.rs`: the leader's loop: the map reconciled with the live nodes, nodes down too
//!   long marked out.
//! - `recovery.rs`: catch-up, revival of lost PGs, letting go of PGs that moved away.
//! - `scrub.rs`: a volume's copies here checked and compared with the other replicas.
//! - `writer.rs`: a volume's writer lock and its fence; the pause for a snapshot.
//! - `error.rs`: `ClusterError`, what goes wrong in all of the above but the data path (whose
//!   outcomes are wire `Status` codes).
//! - `handler.rs`: requests from other nodes.
//! - `faults.rs` (with the `testing` feature only): fault switches `torusd-testing` reads.
//! - `host.rs`: `Host`, what the cluster needs from its process (cores, store, links, tasks,
//!   clock, log), and torusd's (`Process`); the cluster's metadata is a `Kv` (`kv.rs`).
//! - `status.rs`: what `torusctl status` and `torusctl peers` show, and the stats a node
//!   publishes.

mod claims;
mod data_path;
mod durability;
mod error;
#[cfg(feature = "testing")]
mod faults;
mod handler;
mod host;
mod inflight;
mod leader;
mod membership;
mod pg_set;
mod recovery;
mod scrub;
mod secrets;
mod status;
mod store;
mod writer;

pub use error::ClusterError;
pub use host::{wall_ms as now_ms, Host, Process};
pub use scrub::ScrubReport;
pub use status::{ClusterStatus, NodeStats, PeerView, Recovery};

use crate::counted::Mutex;
use crate::etcd::{Etcd, EtcdError};
use crate::kv::Kv;
use crate::map::{ClusterMap, NodeInfo};
use crate::metadata::VolumeRecord;
use crate::peer::{self, FlushRecorder, Handler, PeerLink};
use crate::replication::{self, Fence};
use arc_swap::ArcSwap;
use data_path::ClusterRouter;
use durability::{flush_records, Recorder};
use handler::ClusterHandler;
use inflight::InFlight;
use pg_set::PgSet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::layout::placement_group;
use torus_engine::{Router, Shared, CHUNK_SIZE};
use writer::{Pause, WritesIn};

/// Blocks (volume, block) of one PG written while it was not clean here, with the map epoch
/// of each write.
type DirtyBlocks = BTreeMap<(u32, u64), u64>;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_name: String,
    pub peer_addr: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub lease_ttl: Duration,
    pub replicas_max: u32,
    /// Catch-up copy rate limit, bytes per second.
    pub recovery_rate: u64,
    /// This node's store: its id (a node name stays with it) and capacity.
    pub node_id: [u8; 16],
    pub capacity_bytes: u64,
    /// A node down this long is marked out by the leader (its PGs get their replicas back on
    /// the other nodes); None: never.
    pub down_out_after: Option<Duration>,
    /// Where this node keeps the record of a flush made while cut off from etcd past its
    /// lease, for its next process to publish (`Cluster::fence_cut_off`); beside its store.
    pub cut_record_path: std::path::PathBuf,
}

/// Links by node, then by the node's core.
type Links = BTreeMap<String, BTreeMap<u32, Arc<dyn PeerLink>>>;

/// Node-level hooks the cluster needs from torusd (run with `Host::blocking`).
pub trait Local: Send + Sync + 'static {
    /// Used bytes on this node's store.
    fn used_bytes(&self) -> u64;
    /// The volume list changed (create, delete, resize anywhere in the cluster).
    fn volumes_changed(&self, list: &crate::etcd::VolumeList);
}

pub struct Cluster {
    pub cfg: ClusterConfig,
    pub me: String,
    pub incarnation: u64,
    kv: Arc<dyn Kv>,
    host: Arc<dyn Host>,
    /// torusd's runtime, for `block_on` (set by `start`).
    rt: std::sync::OnceLock<tokio::runtime::Handle>,
    local: Arc<dyn Local>,
    info: NodeInfo,
    /// The map and the volume table: snapshots, read without a lock and replaced whole
    /// (`install_map` one at a time, under `map_install`; `refresh_volumes`).
    map: ArcSwap<ClusterMap>,
    map_install: Mutex<()>,
    volumes: ArcSwap<BTreeMap<u32, Arc<VolumeRecord>>>,
    /// Links by node, then by the node's core: a snapshot, replaced (under `links_change`)
    /// when a link is opened or closed.
    links: ArcSwap<Links>,
    links_change: Mutex<()>,
    lease: AtomicU64,
    /// When the last keep-alive that succeeded was sent, in nanoseconds since `born` (see
    /// `lease_fresh`).
    lease_ok: AtomicU64,
    /// When the last map fetch that succeeded was sent, the same way.
    map_ok: AtomicU64,
    /// When this process joined: the base of `lease_ok` and `map_ok`.
    born: Instant,
    /// Highest writer epoch seen per volume; older writers are fenced.
    fence: Fence,
    /// Volumes whose writer epoch a peer claimed newer than `fence` knows, being looked up
    /// in etcd (`check_claims`).
    verifying: Mutex<BTreeSet<u32>>,
    /// Wakes the map loop: a peer wrote under a newer map than this node's.
    map_wanted: tokio::sync::Notify,
    /// Writer locks this node holds: volume → epoch
    /// (its epoch, and the lock's value this session took it with).
    writing: Mutex<BTreeMap<u32, (u64, Vec<u8>)>>,
    /// The epochs of `writing`, as a snapshot for the data path (replaced with `writing`).
    writer_epochs: ArcSwap<BTreeMap<u32, u64>>,
    /// Sessions of the writer lock this process has started (`writer_value`).
    writer_sessions: AtomicU64,
    /// Blocks written by replica writes while this node is not clean for their PG: catch-up
    /// must not overwrite them with what it copies.
    /// Per PG, the blocks written here while it was not clean or being scrubbed, each with
    /// the map epoch of the write (see `replication::DirtyEpochs`).
    dirty: Mutex<BTreeMap<u32, DirtyBlocks>>,
    /// The PGs `dirty` has an entry for, changed with it: a coordinated write looks here
    /// first, without a lock (`send_local_tracked`; scrub and catch-up add theirs on the
    /// PG's core, `track_dirty`).
    dirty_pgs: PgSet,
    /// Since when the dirty blocks are valid (see `replication::DirtyEpochs`).
    dirty_epochs: Mutex<replication::DirtyEpochs>,
    /// Writes in flight here (coordinated or applied as a replica; `enter_inflight`).
    inflight: InFlight,
    recovery: Mutex<Recovery>,
    /// PGs being caught up or scrubbed here.
    recovering: PgSet,
    repaired_reads: AtomicU64,
    stopping: AtomicBool,
    /// As leader: nodes whose marking out was refused (said once).
    out_refused: Mutex<BTreeSet<String>>,
    /// PGs this node holds no slot of and whose blocks it has freed (this process).
    let_go: Mutex<BTreeSet<u32>>,
    /// Writes held back while a snapshot of their volume is taken.
    pause: Mutex<Pause>,
    writes_in: WritesIn,
    /// The newest map epoch this process has seen (installed, or in a write it applied), and
    /// the newest one a flush of it is recorded at in etcd (`flush_local`; its entry in
    /// `flushed_record`, kept apart as an atomic for the check every flush makes). The record
    /// (under `flushed_key`) keeps earlier processes' too: a revival asks what the process
    /// that was the clean holder recorded (`replication::revival_source`). Records are made
    /// one at a time (`record_lock`).
    seen_epoch: AtomicU64,
    flushed_epoch: AtomicU64,
    flushed_key: String,
    flushed_record: Mutex<Vec<(u64, u64)>>,
    record_lock: tokio::sync::Mutex<()>,
    /// Replica writes (and coordinated ones) under maps older than this are refused: set
    /// when this node is cut off from etcd past its lease (`fence_cut_off`).
    write_floor: AtomicU64,
    /// The lease this node held when it set `write_floor`: only that lease turning out alive
    /// makes the fence premature (one granted since means the old one did expire).
    fenced_lease: AtomicU64,
    /// The last reason a revival waited, said once.
    revival_wait: Mutex<String>,
    /// This cluster, for tasks started from `&self`.
    this: std::sync::OnceLock<std::sync::Weak<Cluster>>,
}

impl Cluster {
    /// Joins (or creates) the cluster in torusd: registers this node on a lease, installs the
    /// router, listens for peers and starts the control loops.
    pub fn start(
        cfg: ClusterConfig,
        etcd: Etcd,
        rt: &tokio::runtime::Runtime,
        shared: Arc<Shared>,
        local: Arc<dyn Local>,
        peer_listener: std::net::TcpListener,
    ) -> Result<Arc<Cluster>, EtcdError> {
        let host = Arc::new(Process {
            shared: shared.clone(),
            rt: rt.handle().clone(),
            cut_record_path: cfg.cut_record_path.clone(),
        });
        let cluster = rt.block_on(Cluster::join(cfg, Arc::new(etcd), host, local))?;
        let _ = cluster.rt.set(rt.handle().clone());
        let _ = shared.router.set(cluster.router());
        peer_listener
            .set_nonblocking(true)
            .map_err(|e| EtcdError::Corrupt {
                key: "peer listener".into(),
                why: e.to_string(),
            })?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(peer_listener).map_err(|e| EtcdError::Corrupt {
                key: "peer listener".into(),
                why: e.to_string(),
            })?
        };
        rt.spawn(peer::listen(
            listener,
            cluster.handler(),
            cluster.recorder(),
            shared,
        ));
        Ok(cluster)
    }

    /// Joins (or creates) the cluster on any host: registers this node on a lease and starts
    /// the control loops. Frontends reach it through `router`, peers through `handler`.
    pub async fn join(
        cfg: ClusterConfig,
        kv: Arc<dyn Kv>,
        host: Arc<dyn Host>,
        local: Arc<dyn Local>,
    ) -> Result<Arc<Cluster>, EtcdError> {
        let (node_id, capacity_bytes) = (cfg.node_id, cfg.capacity_bytes);
        let incarnation =
            host.now_ms() ^ (u64::from_le_bytes(node_id[..8].try_into().expect("8")) << 20);
        let info = NodeInfo {
            name: cfg.node_name.clone(),
            peer_addr: cfg.peer_addr.clone(),
            admin_addr: cfg.admin_addr.clone(),
            nbd_addr: cfg.nbd_addr.clone(),
            cores: host.cores() as u32,
            capacity_bytes,
            incarnation,
        };
        let node_key = format!("nodes/{}", cfg.node_name);
        let id_hex: String = node_id.iter().map(|b| format!("{b:02x}")).collect();
        let flushed_key = format!("flushed/{id_hex}");
        // A name held by a different store is another node: refuse. The same store
        // (restarted within the lease) takes its name back.
        if let Some((bytes, _)) = kv.get(&format!("ids/{}", cfg.node_name)).await? {
            if bytes != id_hex.as_bytes() {
                return Err(EtcdError::Corrupt {
                    key: node_key.clone(),
                    why: format!(
                        "node name {:?} belongs to another node's store; pick another --node-name",
                        cfg.node_name
                    ),
                });
            }
        } else {
            kv.put(
                &format!("ids/{}", cfg.node_name),
                id_hex.clone().into_bytes(),
                None,
            )
            .await?;
        }
        let flushed_record = flush_records(&*kv, &*host, &flushed_key).await?;
        let lease = kv.lease_grant(cfg.lease_ttl).await?;
        kv.put(
            &node_key,
            serde_json::to_vec(&info).expect("json"),
            Some(lease),
        )
        .await?;
        let (map, _) = kv.map().await?;
        let map = map.unwrap_or_else(|| ClusterMap::new(cfg.replicas_max));
        if map.pg_count != host.pg_count() {
            return Err(EtcdError::Corrupt {
                key: "map".into(),
                why: format!(
                    "the cluster has {} placement groups, this store {}",
                    map.pg_count,
                    host.pg_count()
                ),
            });
        }
        let pg_count = host.pg_count();
        let fence = Fence::new(pg_count);
        let cluster = Arc::new(Cluster {
            me: cfg.node_name.clone(),
            cfg,
            incarnation,
            kv,
            host,
            rt: std::sync::OnceLock::new(),
            local,
            info,
            map: ArcSwap::from_pointee(map),
            map_install: Mutex::new(()),
            volumes: ArcSwap::from_pointee(BTreeMap::new()),
            links: ArcSwap::from_pointee(BTreeMap::new()),
            links_change: Mutex::new(()),
            lease: AtomicU64::new(lease as u64),
            lease_ok: AtomicU64::new(0),
            map_ok: AtomicU64::new(0),
            born: Instant::now(),
            fence,
            verifying: Mutex::new(BTreeSet::new()),
            map_wanted: tokio::sync::Notify::new(),
            writing: Mutex::new(BTreeMap::new()),
            writer_epochs: ArcSwap::from_pointee(BTreeMap::new()),
            writer_sessions: AtomicU64::new(0),
            dirty: Mutex::new(BTreeMap::new()),
            dirty_pgs: PgSet::new(pg_count),
            dirty_epochs: Mutex::new(replication::DirtyEpochs::default()),
            inflight: InFlight::default(),
            recovery: Mutex::new(Recovery::default()),
            recovering: PgSet::new(pg_count),
            repaired_reads: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            out_refused: Mutex::new(BTreeSet::new()),
            let_go: Mutex::new(BTreeSet::new()),
            pause: Mutex::new(Pause::default()),
            writes_in: WritesIn::default(),
            seen_epoch: AtomicU64::new(0),
            flushed_epoch: AtomicU64::new(0),
            flushed_key,
            flushed_record: Mutex::new(flushed_record),
            record_lock: tokio::sync::Mutex::new(()),
            write_floor: AtomicU64::new(0),
            fenced_lease: AtomicU64::new(0),
            revival_wait: Mutex::new(String::new()),
            this: std::sync::OnceLock::new(),
        });
        let _ = cluster.this.set(Arc::downgrade(&cluster));
        cluster.refresh_volumes().await?;
        cluster.load_fences().await?;
        let c = cluster.clone();
        cluster
            .host
            .spawn(Box::pin(async move { c.heartbeat_loop().await }));
        let c = cluster.clone();
        cluster
            .host
            .spawn(Box::pin(async move { c.map_loop().await }));
        let c = cluster.clone();
        cluster
            .host
            .spawn(Box::pin(async move { c.leader_loop().await }));
        let c = cluster.clone();
        cluster
            .host
            .spawn(Box::pin(async move { c.volume_loop().await }));
        let c = cluster.clone();
        cluster
            .host
            .spawn(Box::pin(async move { c.recovery_loop().await }));
        Ok(cluster)
    }

    /// How this node's frontends reach the cluster (the engine's `Router`).
    pub fn router(self: &Arc<Self>) -> Arc<dyn Router> {
        Arc::new(ClusterRouter(self.clone()))
    }

    /// How requests from other nodes reach the cluster (the peer layer's `Handler`).
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(ClusterHandler(self.clone()))
    }

    /// Leaves the cluster on shutdown: revokes the lease so the others notice at once.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let lease = self.lease.load(Ordering::Acquire) as i64;
        let _ = self.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), self.kv.lease_revoke(lease)).await
        });
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.load_full()
    }

    fn volume(&self, id: u32) -> Option<Arc<VolumeRecord>> {
        self.volumes.load().get(&id).cloned()
    }

    /// Nanoseconds from `born` to `t` (0 for an instant before it).
    fn since_born(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_nanos() as u64
    }

    fn pg_of(&self, volume: u32, offset: u64) -> u32 {
        placement_group(volume, offset / CHUNK_SIZE, self.host.pg_count())
    }

    fn link(&self, map: &ClusterMap, node: &str, pg: u32) -> Option<Arc<dyn PeerLink>> {
        let n = map.nodes.get(node)?;
        let core = pg % n.info.cores.max(1);
        let usable = |links: &Links| {
            links
                .get(node)
                .and_then(|by_core| by_core.get(&core))
                .filter(|l| !l.dead() && l.addr() == n.info.peer_addr)
                .cloned()
        };
        if let Some(l) = usable(&self.links.load()) {
            return Some(l);
        }
        let _change = self.links_change.lock();
        let current = self.links.load_full();
        if let Some(l) = usable(&current) {
            return Some(l);
        }
        if let Some(l) = current.get(node).and_then(|by_core| by_core.get(&core)) {
            // The node came back listening elsewhere (restarted with another --peer-listen):
            // its old link would go on dialing the old address.
            l.close();
        }
        let l = self
            .host
            .link(&n.info.peer_addr, &self.me, core, self.recorder());
        let mut next = (*current).clone();
        next.entry(node.to_owned())
            .or_default()
            .insert(core, l.clone());
        self.links.store(Arc::new(next));
        Some(l)
    }

    /// How the peer layer flushes this node when a connection fails (`Recorder`).
    pub fn recorder(&self) -> Arc<dyn FlushRecorder> {
        let this = self.this.get().cloned().unwrap_or_default();
        Arc::new(Recorder(this, self.host.clone()))
    }

    /// Waits for `f` on torusd's runtime, for callers off it (the admin API's threads).
    /// Only in torusd (`start`): a simulation calls the async methods.
    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt
            .get()
            .expect("block_on is for torusd's threads (Cluster::start)")
            .block_on(f)
    }

    /// Changes the map in etcd (`Kv::update_map`).
    async fn update_map(
        &self,
        mut change: impl FnMut(&mut ClusterMap) -> bool + Send,
    ) -> Result<Option<ClusterMap>, EtcdError> {
        self.kv.update_map(self.cfg.replicas_max, &mut change).await
    }

    /// One line of this node's log.
    fn log(&self, line: &str) {
        self.host.log(line)
    }
}
