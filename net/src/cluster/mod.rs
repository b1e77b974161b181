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

use crate::etcd::{Etcd, EtcdError};
use crate::map::{ClusterMap, GiveUp, NodeInfo, PgHealth};
use crate::metadata::VolumeRecord;
use crate::peer::{self, Handler, Link, Outgoing, Responder};
use crate::replication::{self, worse, Fence, Route, Tally, Wanted, WritePlan};
#[cfg(feature = "testing")]
use crate::testing::faults::replica_drops_this_write;
use crate::wire::{self, status, Data, Entry, Op};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::current_core;
use torus_engine::layout::placement_group;
use torus_engine::{
    AlignedBuf, BlockError, Completion, CompletionSink, Message, Output, Piece, PieceKind, ReplyTo,
    Router, Shared, Sink, BLOCK_SIZE, CHUNK_SIZE,
};

/// How long a client request keeps retrying (primary moving, a node being declared dead)
/// before it answers EIO. Longer than the default lease so a node loss is ridden out.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Same for a request coordinated on behalf of another node (that node retries it again).
const PEER_REQUEST_DEADLINE: Duration = Duration::from_secs(4);
const RETRY_DELAY: Duration = Duration::from_millis(100);
const MAP_POLL: Duration = Duration::from_millis(200);
const VOLUME_POLL: Duration = Duration::from_secs(1);
const LEADER_TICK: Duration = Duration::from_millis(500);
/// Reads of a catch-up round in flight at once.
const RECOVERY_READS_IN_FLIGHT: usize = 32;
/// Processes of this store whose recorded flush is kept (`Cluster::flushed_record`): a PG lost
/// with one of them as its last clean holder waits for a revival that asks for it.
const FLUSH_RECORDS_KEPT: usize = 64;

/// Blocks (volume, block) of one PG written while it was not clean here, with the map epoch
/// of each write.
type DirtyBlocks = HashMap<(u32, u64), u64>;

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

type Done = Box<dyn FnOnce(Result<Output, u16>) + Send>;

struct Request {
    piece: Piece,
    done: Done,
    deadline: Instant,
    from_peer: bool,
    /// Writer epoch the write carries (the fencing token of the volume's writer lock).
    writer: u64,
}

/// Node-level hooks the cluster needs from torusd.
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
    pub etcd: Etcd,
    rt: tokio::runtime::Handle,
    shared: Arc<Shared>,
    local: Arc<dyn Local>,
    info: NodeInfo,
    map: RwLock<Arc<ClusterMap>>,
    volumes: RwLock<HashMap<u32, VolumeRecord>>,
    /// Links by node, then by the node's core.
    links: Mutex<HashMap<String, HashMap<u32, Arc<Link>>>>,
    lease: AtomicU64,
    lease_ok: Mutex<Instant>,
    /// When the last map fetch that succeeded was sent (see `lease_fresh`).
    map_ok: Mutex<Instant>,
    /// Highest writer epoch seen per volume; older writers are fenced.
    fence: Mutex<Fence>,
    /// Writer locks this node holds: volume → epoch.
    writing: Mutex<HashMap<u32, u64>>,
    /// Blocks written by replica writes while this node is not clean for their PG: catch-up
    /// must not overwrite them with what it copies.
    /// Per PG, the blocks written here while it was not clean or being scrubbed, each with
    /// the map epoch of the write (see `replication::DirtyEpochs`).
    dirty: Mutex<HashMap<u32, DirtyBlocks>>,
    /// Since when the dirty blocks are valid (see `replication::DirtyEpochs`).
    dirty_epochs: Mutex<replication::DirtyEpochs>,
    /// Writes in flight here (coordinated or applied as a replica; `enter_inflight`).
    inflight: Mutex<InFlight>,
    recovery: Mutex<Recovery>,
    recovering: Mutex<HashSet<u32>>,
    repaired_reads: AtomicU64,
    stopping: AtomicBool,
    /// As leader: nodes whose marking out was refused (said once).
    out_refused: Mutex<HashSet<String>>,
    /// PGs this node holds no slot of and whose blocks it has freed (this process).
    let_go: Mutex<HashSet<u32>>,
    /// Writes held back while a snapshot of their volume is taken.
    pause: Mutex<Pause>,
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

/// Volumes whose new writes wait (a snapshot is being taken), and the writes each volume has
/// in flight from this node's frontends.
#[derive(Default)]
struct Pause {
    paused: HashSet<u32>,
    inflight: HashMap<u32, u64>,
    parked: Vec<(Piece, ReplyTo)>,
}

/// The node named by a writer lock's value (`writer_value`: "NODE LEASE").
fn holder_node(value: &[u8]) -> String {
    let v = String::from_utf8_lossy(value);
    v.split(' ').next().unwrap_or("").to_string()
}

/// Milliseconds since the Unix epoch (0 before it): the clock the map's times are in.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type OnCompletion = Box<dyn FnOnce(Completion) + Send>;

struct FnSink(Mutex<Option<OnCompletion>>);

impl CompletionSink for FnSink {
    fn complete(&self, c: Completion) {
        if let Some(f) = self.0.lock().take() {
            f(c)
        }
    }
}

/// The cluster of this process, for flushes started where it is not at hand (a peer's
/// connection closing, peer.rs): they are recorded too (`Cluster::flush_local`).
static FLUSH_RECORDER: Mutex<Option<std::sync::Weak<Cluster>>> = Mutex::new(None);

/// Flushes every core, recorded as `Cluster::flush_local` does when a cluster runs here.
pub(crate) fn flush_recorded(shared: &Shared) {
    let cluster = FLUSH_RECORDER.lock().as_ref().and_then(|w| w.upgrade());
    match cluster {
        Some(c) => c.flush_local(Box::new(|_| {})),
        None => flush_cores(shared, Box::new(|_| {})),
    }
}

/// Writes in flight on a node, by the map epoch they started under.
#[derive(Default)]
struct InFlight {
    /// Until answered (coordinated: until every replica answered).
    writes: BTreeMap<u64, u64>,
    /// Until the local copy is done (`fence_cut_off` waits for these).
    local: BTreeMap<u64, u64>,
}

fn count_down(counts: &mut BTreeMap<u64, u64>, epoch: u64) {
    if let Some(n) = counts.get_mut(&epoch) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&epoch);
        }
    }
}

/// Writes `bytes` to `path` so that it survives a power loss: a temporary file, synced, then
/// renamed over it, and the directory synced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `record` (this store's flush records, by incarnation) with process `inc`'s at `epoch` at
/// least, the oldest processes' dropped past `FLUSH_RECORDS_KEPT`.
fn with_flush(mut record: Vec<(u64, u64)>, inc: u64, epoch: u64) -> Vec<(u64, u64)> {
    let epoch = record
        .iter()
        .find(|(i, _)| *i == inc)
        .map_or(epoch, |&(_, e)| e.max(epoch));
    record.retain(|&(i, _)| i != inc);
    record.push((inc, epoch));
    let keep = record.len().saturating_sub(FLUSH_RECORDS_KEPT);
    record.drain(..keep);
    record
}

/// This store's flush records as etcd has them (under `key`), with, before this process
/// registers, the one a previous process left on its disk when it was cut off from etcd
/// (`Cluster::fence_cut_off`) published: a revival that asks what that process's disk has
/// then sees it. The file goes once etcd has it; one that cannot be read is reported and
/// left alone.
async fn flush_records(
    etcd: &Etcd,
    key: &str,
    path: &std::path::Path,
) -> Result<Vec<(u64, u64)>, EtcdError> {
    let record: Vec<(u64, u64)> = match etcd.get(key).await? {
        None => Vec::new(),
        Some((v, _)) => serde_json::from_slice(&v).map_err(|e| EtcdError::Corrupt {
            key: key.to_owned(),
            why: format!("not a list of (incarnation, map epoch): {e}"),
        })?,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(record),
        Err(e) => {
            eprintln!("torusd: reading {}: {e}; not published", path.display());
            return Ok(record);
        }
    };
    let Ok((inc, epoch)) = serde_json::from_slice::<(u64, u64)>(&bytes) else {
        eprintln!(
            "torusd: {} is not a flush record (incarnation, map epoch); not published",
            path.display()
        );
        return Ok(record);
    };
    let record = with_flush(record, inc, epoch);
    etcd.put(key, serde_json::to_vec(&record).expect("json"), None)
        .await?;
    eprintln!("torusd: published the flush its previous process made while cut off (map {epoch})");
    let _ = std::fs::remove_file(path);
    Ok(record)
}

/// Flushes every core of a node; `done` gets the worst status.
pub(crate) fn flush_cores(shared: &Shared, done: Box<dyn FnOnce(u16) + Send>) {
    let cores = shared.mailboxes.len();
    let state = Arc::new(Mutex::new((Tally::new(cores), Some(done))));
    for m in &shared.mailboxes {
        let state = state.clone();
        let flush = Piece {
            volume: 0,
            offset: 0,
            len: 0,
            kind: PieceKind::Flush,
        };
        m.send(Message::Piece(
            flush,
            sink(move |c| {
                let mut st = state.lock();
                let Some(worst) = st.0.add(c.output.map_or_else(status_of, |_| status::OK)) else {
                    return;
                };
                if let Some(done) = st.1.take() {
                    drop(st);
                    done(worst);
                }
            }),
        ));
    }
}

fn sink(f: impl FnOnce(Completion) + Send + 'static) -> ReplyTo {
    ReplyTo::Sink {
        sink: Sink(Arc::new(FnSink(Mutex::new(Some(Box::new(f)))))),
        token: 0,
    }
}

fn status_of(e: BlockError) -> u16 {
    match e {
        BlockError::Io => status::EIO,
        BlockError::NoSpace => status::ENOSPC,
        BlockError::Invalid => status::EINVAL,
        BlockError::NoVolume => status::NOVOLUME,
        BlockError::ShuttingDown => status::SHUTDOWN,
    }
}

fn error_of(s: u16) -> BlockError {
    match s {
        status::ENOSPC => BlockError::NoSpace,
        status::EINVAL => BlockError::Invalid,
        status::NOVOLUME => BlockError::NoVolume,
        status::SHUTDOWN => BlockError::ShuttingDown,
        _ => BlockError::Io,
    }
}

/// Delivers an answer to whoever asked, from any thread.
fn deliver(shared: &Shared, reply: ReplyTo, output: Result<Output, BlockError>) {
    let c = Completion {
        token: reply.token(),
        output,
    };
    match reply {
        ReplyTo::Core { core, .. } => shared.mailboxes[core].send(Message::Done(c)),
        ReplyTo::Channel { sender, .. } => {
            let _ = sender.send(c);
        }
        ReplyTo::Sink { sink, .. } => sink.0.complete(c),
    }
}

fn clone_piece(p: &Piece) -> Piece {
    Piece {
        volume: p.volume,
        offset: p.offset,
        len: p.len,
        kind: match &p.kind {
            PieceKind::Read => PieceKind::Read,
            PieceKind::Status => PieceKind::Status,
            PieceKind::Flush => PieceKind::Flush,
            PieceKind::Zero { fua } => PieceKind::Zero { fua: *fua },
            PieceKind::Write {
                data,
                data_offset,
                fua,
            } => PieceKind::Write {
                data: data.clone(),
                data_offset: *data_offset,
                fua: *fua,
            },
        },
    }
}

/// The wire request for a piece: `coordinate` asks the receiver to act as the PG's primary
/// (`C*` ops), otherwise a replica applies it to its own store. None for a flush.
fn to_wire(p: &Piece, coordinate: bool, epoch: u64, writer: u64) -> Option<(Entry, Option<Data>)> {
    let fua_flag = |fua: bool| if fua { wire::FLAG_FUA } else { 0 };
    let (op, flags, data) = match &p.kind {
        PieceKind::Read => (if coordinate { Op::CRead } else { Op::Read }, 0, None),
        PieceKind::Status => (if coordinate { Op::CStatus } else { Op::Status }, 0, None),
        PieceKind::Zero { fua } => (
            if coordinate { Op::CZero } else { Op::Zero },
            fua_flag(*fua),
            None,
        ),
        PieceKind::Write {
            data,
            data_offset,
            fua,
        } => (
            if coordinate { Op::CWrite } else { Op::Write },
            fua_flag(*fua),
            Some(Data {
                buf: data.clone(),
                start: *data_offset,
                len: p.len as usize,
            }),
        ),
        PieceKind::Flush => return None,
    };
    let entry = Entry {
        op: op as u8,
        flags,
        volume: p.volume,
        offset: p.offset,
        len: p.len,
        epoch,
        writer,
        ..Entry::default()
    };
    Some((entry, data))
}

/// A read's answer from a peer, in a buffer of its own (the frame's buffer holds others).
fn read_output(d: &Data) -> Output {
    let mut buf = AlignedBuf::zeroed(d.len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
    buf[..d.len].copy_from_slice(&d.buf[d.start..d.start + d.len]);
    Output::Read { data: buf, head: 0 }
}

/// Answers a peer's request with what a piece produced.
fn reply_output(respond: Responder, output: Result<Output, u16>, len: usize) {
    match output {
        Ok(Output::Read { data, head }) => respond.reply(
            status::OK,
            Some(Data {
                buf: Arc::new(data),
                start: head,
                len,
            }),
        ),
        Ok(Output::Status { mapped }) => {
            let mut buf = AlignedBuf::zeroed(mapped.len().div_ceil(4096).max(1) * 4096);
            for (i, m) in mapped.iter().enumerate() {
                buf[i] = *m as u8;
            }
            respond.reply(
                status::OK,
                Some(Data {
                    buf: Arc::new(buf),
                    start: 0,
                    len: mapped.len(),
                }),
            )
        }
        Ok(Output::Done) => respond.reply(status::OK, None),
        Err(s) => respond.reply(s, None),
    }
}

fn is_partial(p: &Piece) -> bool {
    !p.offset.is_multiple_of(BLOCK_SIZE as u64) || !(p.len as usize).is_multiple_of(BLOCK_SIZE)
}

/// Whole blocks a piece covers entirely.
fn full_blocks(p: &Piece) -> std::ops::Range<u64> {
    let first = p.offset.div_ceil(BLOCK_SIZE as u64);
    let end = (p.offset + p.len as u64) / BLOCK_SIZE as u64;
    first..end.max(first)
}

impl Cluster {
    /// Joins (or creates) the cluster: registers this node on a lease, installs the router,
    /// listens for peers and starts the control loops.
    pub fn start(
        cfg: ClusterConfig,
        etcd: Etcd,
        rt: &tokio::runtime::Runtime,
        shared: Arc<Shared>,
        local: Arc<dyn Local>,
        peer_listener: std::net::TcpListener,
    ) -> Result<Arc<Cluster>, EtcdError> {
        let handle = rt.handle().clone();
        let (node_id, capacity_bytes) = (cfg.node_id, cfg.capacity_bytes);
        let incarnation =
            now_ms() ^ (u64::from_le_bytes(node_id[..8].try_into().expect("8")) << 20);
        let info = NodeInfo {
            name: cfg.node_name.clone(),
            peer_addr: cfg.peer_addr.clone(),
            admin_addr: cfg.admin_addr.clone(),
            nbd_addr: cfg.nbd_addr.clone(),
            cores: shared.mailboxes.len() as u32,
            capacity_bytes,
            incarnation,
        };
        let node_key = format!("nodes/{}", cfg.node_name);
        let id_hex: String = node_id.iter().map(|b| format!("{b:02x}")).collect();
        let flushed_key = format!("flushed/{id_hex}");
        let (lease, flushed_record) = rt.block_on(async {
            // A name held by a different store is another node: refuse. The same store
            // (restarted within the lease) takes its name back.
            if let Some((bytes, _)) = etcd.get(&format!("ids/{}", cfg.node_name)).await? {
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
                etcd.put(&format!("ids/{}", cfg.node_name), id_hex.clone().into_bytes(), None)
                    .await?;
            }
            let flushed = flush_records(&etcd, &flushed_key, &cfg.cut_record_path).await?;
            let lease = etcd.lease_grant(cfg.lease_ttl).await?;
            etcd.put(&node_key, serde_json::to_vec(&info).expect("json"), Some(lease))
                .await?;
            Ok((lease, flushed))
        })?;
        let (map, _) = rt.block_on(etcd.map())?;
        let map = map.unwrap_or_else(|| ClusterMap::new(cfg.replicas_max));
        if map.pg_count != shared.geometry.pg_count {
            return Err(EtcdError::Corrupt {
                key: "map".into(),
                why: format!(
                    "the cluster has {} placement groups, this store {}",
                    map.pg_count, shared.geometry.pg_count
                ),
            });
        }
        let cluster = Arc::new(Cluster {
            me: cfg.node_name.clone(),
            cfg,
            incarnation,
            etcd,
            rt: handle,
            shared: shared.clone(),
            local,
            info,
            map: RwLock::new(Arc::new(map)),
            volumes: RwLock::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            lease: AtomicU64::new(lease as u64),
            lease_ok: Mutex::new(Instant::now()),
            map_ok: Mutex::new(Instant::now()),
            fence: Mutex::new(Fence::default()),
            writing: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            dirty_epochs: Mutex::new(replication::DirtyEpochs::default()),
            inflight: Mutex::new(InFlight::default()),
            recovery: Mutex::new(Recovery::default()),
            recovering: Mutex::new(HashSet::new()),
            repaired_reads: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            out_refused: Mutex::new(HashSet::new()),
            let_go: Mutex::new(HashSet::new()),
            pause: Mutex::new(Pause::default()),
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
        *FLUSH_RECORDER.lock() = Some(Arc::downgrade(&cluster));
        rt.block_on(cluster.refresh_volumes())?;
        rt.block_on(cluster.load_fences())?;
        let _ = shared
            .router
            .set(Arc::new(ClusterRouter(cluster.clone())) as Arc<dyn Router>);
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
        let handler: Arc<dyn Handler> = Arc::new(ClusterHandler(cluster.clone()));
        rt.spawn(async move {
            // Connections that have not sent their hello yet are few and small: at most
            // HELLO_WAITING of them, each holding at most wire::HELLO_MAX bytes for at most
            // the hello timeout. Past that, new ones are closed at once.
            let waiting = Arc::new(tokio::sync::Semaphore::new(peer::HELLO_WAITING));
            let mut refused = 0u64;
            let mut said = peer::LogEvery::default();
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    continue;
                };
                let Ok(permit) = waiting.clone().try_acquire_owned() else {
                    refused += 1;
                    if said.ready() {
                        eprintln!(
                            "torusd: peer connection from {from} closed: {} connections are already waiting to say hello ({refused} closed so far)",
                            peer::HELLO_WAITING
                        );
                    }
                    continue;
                };
                let (handler, shared) = (handler.clone(), shared.clone());
                tokio::spawn(async move {
                    peer::accept(stream, handler, shared).await;
                    drop(permit);
                });
            }
        });
        let c = cluster.clone();
        rt.spawn(async move { c.heartbeat_loop().await });
        let c = cluster.clone();
        rt.spawn(async move { c.map_loop().await });
        let c = cluster.clone();
        rt.spawn(async move { c.leader_loop().await });
        let c = cluster.clone();
        rt.spawn(async move { c.volume_loop().await });
        let c = cluster.clone();
        rt.spawn(async move { c.recovery_loop().await });
        Ok(cluster)
    }

    /// Leaves the cluster on shutdown: revokes the lease so the others notice at once.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let lease = self.lease.load(Ordering::Acquire) as i64;
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), self.etcd.lease_revoke(lease)).await
        });
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().clone()
    }

    pub fn recovery(&self) -> Recovery {
        self.recovery.lock().clone()
    }

    pub fn health(&self) -> PgHealth {
        self.map().health()
    }

    /// True while this node's lease is surely alive in etcd and its map is current: `lease_ok`
    /// is when the last successful keep-alive was sent, `map_ok` when the last map fetch that
    /// succeeded was; a margin covers clock rate differences. (A node back from a partition
    /// renews its lease before it fetches the map that says it is down; until then its old
    /// map would have it serve reads from data that missed writes.)
    fn lease_fresh(&self) -> bool {
        let limit = self.cfg.lease_ttl.mul_f64(0.8);
        self.lease_ok.lock().elapsed() < limit && self.map_ok.lock().elapsed() < limit
    }

    fn volume(&self, id: u32) -> Option<VolumeRecord> {
        self.volumes.read().get(&id).cloned()
    }

    fn pg_of(&self, volume: u32, offset: u64) -> u32 {
        placement_group(volume, offset / CHUNK_SIZE, self.shared.geometry.pg_count)
    }

    fn link(&self, map: &ClusterMap, node: &str, pg: u32) -> Option<Arc<Link>> {
        let n = map.nodes.get(node)?;
        let core = pg % n.info.cores.max(1);
        let mut links = self.links.lock();
        if let Some(l) = links.get(node).and_then(|by_core| by_core.get(&core)) {
            if !l.dead() && l.addr() == n.info.peer_addr {
                return Some(l.clone());
            }
            // The node came back listening elsewhere (restarted with another --peer-listen):
            // its old link would go on dialing the old address.
            l.close();
        }
        let l = Arc::new(Link::open(
            &self.rt,
            &self.shared,
            n.info.peer_addr.clone(),
            self.me.clone(),
            core,
        ));
        links
            .entry(node.to_owned())
            .or_default()
            .insert(core, l.clone());
        Some(l)
    }

    fn send_local(&self, piece: Piece, reply: ReplyTo) {
        let core = self.shared.core_for(piece.volume, piece.offset);
        self.shared.mailboxes[core].send(Message::Piece(piece, reply));
    }

    /// `send_local`, answered on a channel: true when the store did it.
    fn send_local_ok(&self, piece: Piece) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_local(
            piece,
            sink(move |c| {
                let _ = tx.send(c.output.is_ok());
            }),
        );
        rx
    }

    /// The map epoch of the oldest write in flight here (coordinated or applied as a replica).
    fn oldest_in_flight(&self) -> Option<u64> {
        self.inflight.lock().writes.keys().next().copied()
    }

    /// Asks again after a moment, until the request's deadline. A request forwarded by a peer
    /// is tried once and answered "ask again": the peer owns its retries. (Were it retried
    /// here too, a write the peer had given up on and sent again elsewhere could land after a
    /// newer write to the same block.)
    fn retry_later(self: &Arc<Self>, req: Request) {
        // A write whose writer lock this node no longer holds (its client left, or took the
        // lock again under a new epoch) is not sent again: replicas would fence it anyway.
        let is_write = matches!(
            req.piece.kind,
            PieceKind::Write { .. } | PieceKind::Zero { .. }
        );
        if is_write && !req.from_peer && self.writer_epoch(req.piece.volume) != req.writer {
            return (req.done)(Err(status::FENCED));
        }
        if req.from_peer || Instant::now() >= req.deadline || self.stopping.load(Ordering::Acquire)
        {
            return (req.done)(Err(status::RETRY));
        }
        let me = self.clone();
        self.rt.spawn(async move {
            tokio::time::sleep(RETRY_DELAY).await;
            me.submit(req);
        });
    }

    fn submit(self: &Arc<Self>, req: Request) {
        // Everything about a PG is decided on the core that owns it: its writes reach the local
        // store and each replica's connection in one order, so replicas apply overlapping
        // writes in the order the primary did.
        let owner = self.shared.core_for(req.piece.volume, req.piece.offset);
        if current_core() != Some(owner) {
            let me = self.clone();
            return peer::run_on_core(&self.shared, owner, Box::new(move || me.submit(req)));
        }
        let Some(vol) = self.volume(req.piece.volume) else {
            if req.from_peer || Instant::now() >= req.deadline {
                return (req.done)(Err(status::NOVOLUME));
            }
            // Created on another node a moment ago: look again before giving up.
            let me = self.clone();
            self.rt.spawn(async move {
                let _ = me.refresh_volumes().await;
                if me.volume(req.piece.volume).is_none() {
                    return (req.done)(Err(status::NOVOLUME));
                }
                me.submit(req);
            });
            return;
        };
        if !self.lease_fresh() {
            return self.retry_later(req);
        }
        let map = self.map();
        let pg = self.pg_of(req.piece.volume, req.piece.offset);
        let is_write = matches!(
            req.piece.kind,
            PieceKind::Write { .. } | PieceKind::Zero { .. }
        );
        let route = replication::route(
            &map,
            &self.me,
            self.incarnation,
            pg,
            vol.replicas,
            is_write,
            req.from_peer,
            self.writer_epoch(vol.id) > 0,
        );
        match route {
            Route::Read => {}
            Route::Write(plan) => return self.coordinate(req, map.epoch, plan, pg),
            Route::Retry => return self.retry_later(req),
            Route::Refuse => return (req.done)(Err(status::RETRY)),
            Route::Forward(primary) => return self.forward(req, &map, &primary, pg),
        }
        match req.piece.kind {
            PieceKind::Read => {
                // A local copy that fails its checksum (or its read) is answered from another
                // clean replica; the log names it.
                let done = req.done;
                let (volume, offset, len) = (req.piece.volume, req.piece.offset, req.piece.len);
                let me = self.clone();
                let replicas = vol.replicas;
                self.send_local(
                    req.piece,
                    sink(move |c| match c.output {
                        Err(BlockError::Io) => {
                            let map = me.map();
                            let others: Vec<String> = map
                                .nodes
                                .keys()
                                .filter(|n| **n != me.me && map.clean_holder(pg, replicas, n))
                                .cloned()
                                .collect();
                            me.read_elsewhere(volume, offset, len, pg, others, done)
                        }
                        other => done(other.map_err(status_of)),
                    }),
                );
            }
            PieceKind::Status => {
                let done = req.done;
                self.send_local(req.piece, sink(move |c| done(c.output.map_err(status_of))));
            }
            // Writes were planned by `route`; a flush is not routed to one PG.
            _ => (req.done)(Err(status::EINVAL)),
        }
    }

    /// Reads from the first of `others` (clean replicas) that answers; EIO when none does.
    fn read_elsewhere(
        self: &Arc<Self>,
        volume: u32,
        offset: u64,
        len: u32,
        pg: u32,
        mut others: Vec<String>,
        done: Done,
    ) {
        if others.is_empty() {
            eprintln!("torusd: volume {volume} bytes {offset}+{len}: the local copy cannot be vouched for and no other replica is up: EIO");
            return done(Err(status::EIO));
        }
        let node = others.remove(0);
        let map = self.map();
        let Some(link) = self.link(&map, &node, pg) else {
            return self.read_elsewhere(volume, offset, len, pg, others, done);
        };
        let me = self.clone();
        link.send(Outgoing {
            entry: Entry {
                op: Op::Read as u8,
                volume,
                offset,
                len,
                epoch: map.epoch,
                ..Entry::default()
            },
            data: None,
            group: 0,
            done: Box::new(move |r| match (r.status, r.data) {
                (status::OK, Some(d)) if d.len == len as usize => {
                    eprintln!("torusd: volume {volume} bytes {offset}+{len}: the local copy fails its checksum; answered from node {node}");
                    me.repaired_reads.fetch_add(1, Ordering::Relaxed);
                    done(Ok(read_output(&d)))
                }
                _ => me.read_elsewhere(volume, offset, len, pg, others, done),
            }),
        });
    }

    /// Reads whose local copy failed and that another replica answered.
    pub fn repaired_reads(&self) -> u64 {
        self.repaired_reads.load(Ordering::Relaxed)
    }

    /// The epoch of the writer lock this node holds on `volume` (0: none).
    fn writer_epoch(&self, volume: u32) -> u64 {
        self.writing.lock().get(&volume).copied().unwrap_or(0)
    }

    fn writer_value(&self) -> Vec<u8> {
        format!("{} {}", self.me, self.lease.load(Ordering::Acquire)).into_bytes()
    }

    /// Takes the writer lock of a volume (one writing node per volume), waiting up to a lease
    /// for a holder that may have died. Its create revision is the fencing epoch that every
    /// write from this node carries from now on.
    pub fn acquire_writer(&self, volume: u32) -> Result<u64, String> {
        let deadline = Instant::now() + self.cfg.lease_ttl + Duration::from_secs(1);
        let key = format!("writers/{volume}");
        loop {
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let mine = self.writer_value();
            match self.block_on(self.etcd.acquire(&key, mine.clone(), lease)) {
                Ok((holder, epoch)) if holder == mine => {
                    // Recorded for good (the lock's key goes with its lease): a node that
                    // restarts fences every older writer from the start (`load_fences`).
                    let recorded = self.block_on(self.etcd.put(
                        &format!("fence/{volume}"),
                        epoch.to_string().into_bytes(),
                        None,
                    ));
                    if let Err(e) = recorded {
                        self.block_on(async { self.etcd.release(&key, mine).await.ok() });
                        return Err(format!("cannot record the volume's writer epoch: {e}"));
                    }
                    self.fence.lock().admit(volume, epoch as u64);
                    self.writing.lock().insert(volume, epoch as u64);
                    return Ok(epoch as u64);
                }
                Ok((holder, _)) => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "volume is open for writing on node {}; a volume has one writing node at a time",
                            holder_node(&holder)
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(format!("cannot take the volume's writer lock: {e}")),
            }
        }
    }

    /// Gives up the writer lock (the last connection here closed).
    pub fn release_writer(&self, volume: u32) {
        self.writing.lock().remove(&volume);
        let value = self.writer_value();
        let _ = self.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(3),
                self.etcd.release(&format!("writers/{volume}"), value),
            )
            .await
        });
    }

    /// Sends a piece to its primary on another node.
    fn forward(self: &Arc<Self>, req: Request, map: &ClusterMap, primary: &str, pg: u32) {
        let Some(link) = self.link(map, primary, pg) else {
            return self.retry_later(req);
        };
        let Some((entry, data)) = to_wire(&req.piece, true, map.epoch, req.writer) else {
            return (req.done)(Err(status::EINVAL));
        };
        let me = self.clone();
        link.send(Outgoing {
            entry,
            data,
            group: 0,
            done: Box::new(move |r| match r.status {
                status::OK => {
                    let output = match (&req.piece.kind, r.data) {
                        (PieceKind::Read, Some(d)) if d.len == req.piece.len as usize => {
                            read_output(&d)
                        }
                        (PieceKind::Read, _) => return (req.done)(Err(status::EIO)),
                        (PieceKind::Status, Some(d)) => Output::Status {
                            mapped: d.buf[d.start..d.start + d.len]
                                .iter()
                                .map(|&b| b != 0)
                                .collect(),
                        },
                        (PieceKind::Status, None) => return (req.done)(Err(status::EIO)),
                        _ => Output::Done,
                    };
                    (req.done)(Ok(output))
                }
                status::RETRY => me.retry_later(req),
                s => (req.done)(Err(s)),
            }),
        });
    }

    /// The coordinator's write: local and every replica in `plan`; answers when all have it.
    fn coordinate(self: &Arc<Self>, req: Request, epoch: u64, plan: WritePlan, pg: u32) {
        // The local copy is fenced like the others: a request of a replaced writer (still
        // being retried here after its client moved to another node) must not overwrite
        // newer data here while every replica refuses it.
        let admitted = replication::admit_write(
            epoch,
            epoch,
            &mut self.fence.lock(),
            req.piece.volume,
            Some(pg),
            req.writer,
        );
        match admitted {
            Ok(()) => {}
            Err(status::RETRY) => return self.retry_later(req),
            Err(s) => return (req.done)(Err(s)),
        }
        if !self.enter_inflight(epoch) {
            return self.retry_later(req);
        }
        let remote = plan.remote;
        let writer = req.writer;
        let local_piece = clone_piece(&req.piece);
        // A replica catching up needs whole blocks (it cannot merge a partial write into a
        // block it has not copied yet): send what the primary holds after its own write.
        let read_back = plan.stale_target && is_partial(&req.piece) && !remote.is_empty();
        // The local write and one per remote replica.
        let state = Arc::new(Mutex::new((Tally::new(remote.len() + 1), Some(req))));
        let call: Arc<dyn Fn(u16) + Send + Sync> = {
            let me = self.clone();
            let state = state.clone();
            Arc::new(move |s: u16| {
                let mut st = state.lock();
                let Some(worst) = st.0.add(s) else {
                    return;
                };
                let req = st.1.take().expect("finished once");
                drop(st);
                me.inflight_done(epoch);
                match worst {
                    status::OK => (req.done)(Ok(Output::Done)),
                    status::RETRY => me.retry_later(req),
                    s => (req.done)(Err(s)),
                }
            })
        };
        let send_remote = {
            let me = self.clone();
            let call = call.clone();
            move |piece: &Piece, remote: &[String]| {
                let map = me.map();
                // The copies' replies are awaited together (one wake-up for all of them).
                let group = crate::peer::new_group();
                for node in remote {
                    let Some(link) = me.link(&map, node, pg) else {
                        call(status::RETRY);
                        continue;
                    };
                    let (entry, data) =
                        to_wire(piece, false, epoch, writer).expect("only writes are coordinated");
                    let call = call.clone();
                    link.send(Outgoing {
                        entry,
                        data,
                        group,
                        done: Box::new(move |r| call(r.status)),
                    });
                }
            }
        };
        if read_back {
            let me = self.clone();
            let call2 = call.clone();
            let fua = matches!(
                local_piece.kind,
                PieceKind::Write { fua: true, .. } | PieceKind::Zero { fua: true }
            );
            let volume = local_piece.volume;
            let first = local_piece.offset / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
            let end = (local_piece.offset + local_piece.len as u64).div_ceil(BLOCK_SIZE as u64)
                * BLOCK_SIZE as u64;
            self.send_local(
                local_piece,
                sink(move |c| {
                    me.local_done(epoch);
                    let s = c.output.map_or_else(status_of, |_| status::OK);
                    if s != status::OK {
                        for _ in 0..remote.len() {
                            call2(s);
                        }
                        return call2(s);
                    }
                    me.send_local(
                        Piece {
                            volume,
                            offset: first,
                            len: (end - first) as u32,
                            kind: PieceKind::Read,
                        },
                        sink(move |c| match c.output {
                            Ok(Output::Read { data, head }) => {
                                let full = Piece {
                                    volume,
                                    offset: first,
                                    len: (end - first) as u32,
                                    kind: PieceKind::Write {
                                        data: Arc::new(data),
                                        data_offset: head,
                                        fua,
                                    },
                                };
                                send_remote(&full, &remote);
                                call2(status::OK);
                            }
                            other => {
                                let s = other.err().map_or(status::EIO, status_of);
                                for _ in 0..remote.len() {
                                    call2(s);
                                }
                                call2(s);
                            }
                        }),
                    );
                }),
            );
            return;
        }
        let call_local = call.clone();
        let me = self.clone();
        self.send_local_tracked(
            clone_piece(&local_piece),
            epoch,
            sink(move |c| {
                me.local_done(epoch);
                call_local(c.output.map_or_else(status_of, |_| status::OK))
            }),
        );
        send_remote(&local_piece, &remote);
    }

    /// Counts a write under map `epoch` in flight here (`serve_list`, `fence_cut_off`), unless
    /// it is under the write floor (false). Under one lock with the floor's setting: a write
    /// the fence does not find in flight finds the floor.
    /// Its local copy is counted too, until `local_done`.
    fn enter_inflight(&self, epoch: u64) -> bool {
        let mut inflight = self.inflight.lock();
        if epoch < self.write_floor.load(Ordering::Acquire) {
            return false;
        }
        *inflight.writes.entry(epoch).or_insert(0) += 1;
        *inflight.local.entry(epoch).or_insert(0) += 1;
        true
    }

    fn inflight_done(&self, epoch: u64) {
        count_down(&mut self.inflight.lock().writes, epoch);
    }

    /// The local copy of a write under map `epoch` is done (or will not be made).
    fn local_done(&self, epoch: u64) {
        count_down(&mut self.inflight.lock().local, epoch);
    }

    /// Flushes every node that is up, so every acknowledged write is durable on all of them.
    fn flush_all(self: &Arc<Self>, reply: ReplyTo) {
        let me = self.clone();
        self.rt.spawn(async move {
            let deadline = Instant::now() + REQUEST_DEADLINE;
            loop {
                let map = me.map();
                let nodes: Vec<String> = map
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.up)
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut waits = Vec::new();
                for node in nodes {
                    let (tx, rx) = tokio::sync::oneshot::channel::<u16>();
                    if node == me.me {
                        me.flush_local(Box::new(move |s| {
                            let _ = tx.send(s);
                        }));
                    } else if let Some(link) = me.link(&map, &node, 0) {
                        link.send(Outgoing {
                            entry: Entry {
                                op: Op::Flush as u8,
                                epoch: map.epoch,
                                ..Entry::default()
                            },
                            data: None,
                            group: 0,
                            done: Box::new(move |r| {
                                let _ = tx.send(r.status);
                            }),
                        });
                    }
                    waits.push(rx);
                }
                let mut worst = status::OK;
                for w in waits {
                    worst = worse(worst, w.await.unwrap_or(status::RETRY));
                }
                match worst {
                    status::OK => return deliver(&me.shared, reply, Ok(Output::Done)),
                    status::RETRY if Instant::now() < deadline => {
                        tokio::time::sleep(RETRY_DELAY * 3).await;
                    }
                    s => return deliver(&me.shared, reply, Err(error_of(s))),
                }
            }
        });
    }

    /// Flushes every core, then, if this process has seen a newer map since its last recorded
    /// flush, records that epoch in etcd before answering (RETRY when it cannot): a revival
    /// compares these records to find the disk with the most (`replication::revival_source`).
    /// The first flush after each new map pays one etcd write.
    fn flush_local(&self, done: Box<dyn FnOnce(u16) + Send>) {
        let seen = self.seen_epoch.load(Ordering::Acquire);
        let me = self.this.get().and_then(|w| w.upgrade());
        flush_cores(
            &self.shared,
            Box::new(move |s| match me {
                Some(me) if s == status::OK => me.record_flush(seen, done),
                _ => done(s),
            }),
        );
    }

    fn record_flush(self: Arc<Self>, seen: u64, done: Box<dyn FnOnce(u16) + Send>) {
        if self.flushed_epoch.load(Ordering::Acquire) >= seen {
            return done(status::OK);
        }
        let me = self.clone();
        self.rt.spawn(async move {
            let _one = me.record_lock.lock().await;
            if me.flushed_epoch.load(Ordering::Acquire) >= seen {
                return done(status::OK);
            }
            let record = with_flush(me.flushed_record.lock().clone(), me.incarnation, seen);
            let put = me
                .etcd
                .put(
                    &me.flushed_key,
                    serde_json::to_vec(&record).expect("json"),
                    None,
                )
                .await;
            match put {
                Ok(()) => {
                    *me.flushed_record.lock() = record;
                    me.flushed_epoch.store(seen, Ordering::Release);
                    done(status::OK)
                }
                Err(e) => {
                    eprintln!("torusd: recording a flush at map {seen} in etcd: {e}");
                    done(status::RETRY)
                }
            }
        });
    }

    /// Flushes every core of this node and waits: true when all succeeded.
    async fn flushed_here(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_local(Box::new(move |s| {
            let _ = tx.send(s);
        }));
        rx.await.unwrap_or(status::EIO) == status::OK
    }

    /// A replica write from a coordinator whose map had `epoch`, counted in flight under that
    /// epoch by the caller (`enter_inflight`) until done.
    fn apply_replica(self: &Arc<Self>, piece: Piece, epoch: u64, reply: ReplyTo) {
        self.seen_epoch.fetch_max(epoch, Ordering::AcqRel);
        let me = self.clone();
        let reply = sink(move |c| {
            me.local_done(epoch);
            me.inflight_done(epoch);
            match reply {
                ReplyTo::Sink { sink, .. } => sink.0.complete(c),
                other => deliver(&me.shared, other, c.output),
            }
        });
        let pg = self.pg_of(piece.volume, piece.offset);
        // A newer map than ours may already say we are stale: count as not clean.
        let clean = replication::replica_is_clean(
            &self.map.read(),
            epoch,
            pg,
            &self.me,
            self.incarnation,
            self.recovering.lock().contains(&pg),
        );
        if clean {
            return self.send_local(piece, reply);
        }
        // A copy for a PG this node freed, under a map it has not seen yet: the PG holds data
        // here again, to be freed again if it turns out not to stay.
        if !replication::holds(&self.map(), &self.me, pg) {
            self.let_go.lock().remove(&pg);
        }
        // Not clean here: remember what newer data arrived, so catch-up leaves it alone. The
        // piece is queued under the same lock catch-up uses, so the core sees them in order.
        let mut dirty = self.dirty.lock();
        let set = dirty.entry(pg).or_default();
        for b in full_blocks(&piece) {
            set.insert((piece.volume, b), epoch);
        }
        self.send_local(piece, reply);
    }

    /// A coordinated local write: while its PG is being scrubbed here, the blocks it touches
    /// are remembered so the scrub does not overwrite them with a replica's older copy.
    fn send_local_tracked(&self, piece: Piece, epoch: u64, reply: ReplyTo) {
        let pg = self.pg_of(piece.volume, piece.offset);
        let mut dirty = self.dirty.lock();
        if let Some(set) = dirty.get_mut(&pg) {
            let first = piece.offset / BLOCK_SIZE as u64;
            let end = (piece.offset + piece.len as u64).div_ceil(BLOCK_SIZE as u64);
            for b in first..end {
                set.insert((piece.volume, b), epoch);
            }
        }
        self.send_local(piece, reply);
    }

    /// Reads every block of `volume` this node holds as a clean replica (each read checks the
    /// block's crc32c) and rewrites each bad one from another clean replica.
    pub async fn scrub_local(self: &Arc<Self>, volume: u32) -> ScrubReport {
        let mut report = ScrubReport {
            node: self.me.clone(),
            ..ScrubReport::default()
        };
        let Some(vol) = self.volume(volume) else {
            report.problems.push("no such volume here".into());
            return report;
        };
        if let Ok((Some(m), _)) = self.etcd.map().await {
            self.install_map(m);
        }
        let map = self.map();
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        let mut pgs = Vec::new();
        {
            let mut rec = self.recovering.lock();
            let mut dirty = self.dirty.lock();
            let mut busy = 0;
            let mut not_clean = 0;
            for pg in 0..map.pg_count {
                if map.slot_of(pg, &self.me).is_none() {
                    continue;
                }
                if !map.clean_holder(pg, vol.replicas, &self.me) {
                    not_clean += 1;
                } else if rec.contains(&pg) {
                    busy += 1;
                } else {
                    bitmap[pg as usize] = true;
                    rec.insert(pg);
                    dirty.entry(pg).or_default();
                    pgs.push(pg);
                }
            }
            if not_clean > 0 {
                report.problems.push(format!(
                    "{not_clean} PGs not scrubbed here: this node is catching up on them"
                ));
            }
            if busy > 0 {
                report.problems.push(format!(
                    "{busy} PGs not scrubbed here: a catch-up or another scrub holds them"
                ));
            }
        }
        let blocks: Vec<u64> = self
            .list_local(&bitmap)
            .await
            .into_iter()
            .filter(|(v, _, _)| *v == volume)
            .map(|(_, b, _)| b)
            .collect();
        // Runs of consecutive blocks within a chunk: one read each; a failed run is read
        // again block by block to find the bad ones.
        let chunk_blocks = CHUNK_SIZE / BLOCK_SIZE as u64;
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for b in blocks {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 as u64 == b && r.0 / chunk_blocks == b / chunk_blocks => {
                    r.1 += 1
                }
                _ => runs.push((b, 1)),
            }
        }
        let mut bad = Vec::new();
        for (first, n) in runs {
            report.blocks_checked += n as u64;
            if self.read_local(volume, first, n).await {
                continue;
            }
            for b in first..first + n as u64 {
                if !self.read_local(volume, b, 1).await {
                    bad.push(b);
                }
            }
        }
        report.bad_found = bad.len() as u64;
        for b in bad {
            let pg = self.pg_of(volume, b * BLOCK_SIZE as u64);
            let others: Vec<String> = map
                .nodes
                .keys()
                .filter(|n| **n != self.me && map.clean_holder(pg, vol.replicas, n))
                .cloned()
                .collect();
            let mut fixed = false;
            for node in others {
                if self.copy_run(&map, &node, volume, b, 1, 0).await.is_ok() {
                    fixed = true;
                    break;
                }
            }
            if fixed {
                report.repaired += 1;
                eprintln!("torusd: scrub: volume {volume} block {b} failed its checksum here; rewritten from a replica");
            } else {
                report.problems.push(format!(
                    "block {b}: bad here and no replica could supply it"
                ));
            }
        }
        self.compare_replicas(&map, &vol, volume, &pgs, &mut report)
            .await;
        if !self.flushed_here().await {
            report
                .problems
                .push("flush after the repairs failed".into());
        }
        let mut rec = self.recovering.lock();
        for pg in pgs {
            rec.remove(&pg);
        }
        report
    }

    /// The scrub's second half: this node's block list (volume, block, crc32c) for the PGs it
    /// scrubs against each other clean holder's. A block whose crc here differs from what most
    /// holders have (with two holders: from the PG primary's) is rewritten from one of them,
    /// or unmapped when they hold zeroes; an unmapped block reads as zeroes, so it equals a
    /// mapped block of zeroes. Blocks written during the scrub are left alone.
    async fn compare_replicas(
        &self,
        map: &ClusterMap,
        vol: &VolumeRecord,
        volume: u32,
        pgs: &[u32],
        report: &mut ScrubReport,
    ) {
        let zero_crc = crc32c::crc32c(&[0u8; BLOCK_SIZE]);
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        for &pg in pgs {
            bitmap[pg as usize] = true;
        }
        let of_volume = |list: Vec<(u32, u64, u32)>| -> BTreeMap<u64, u32> {
            list.into_iter()
                .filter(|(v, _, _)| *v == volume)
                .map(|(_, b, crc)| (b, crc))
                .collect()
        };
        let here = of_volume(self.list_local(&bitmap).await);
        // Each other node that is a clean holder of some of these PGs, with its list for them.
        let mut others: Vec<(String, Vec<bool>, BTreeMap<u64, u32>)> = Vec::new();
        for node in map.nodes.keys().filter(|n| **n != self.me) {
            let mut theirs = vec![false; pg_count];
            let mut any = false;
            for &pg in pgs {
                if map.clean_holder(pg, vol.replicas, node) {
                    theirs[pg as usize] = true;
                    any = true;
                }
            }
            if !any {
                continue;
            }
            // A link torn down a moment ago (the node restarted) answers RETRY once.
            let mut listed = self.list_remote(map, node, &theirs).await;
            for _ in 0..10 {
                if listed.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                listed = self.list_remote(map, node, &theirs).await;
            }
            match listed {
                Ok(list) => others.push((node.clone(), theirs, of_volume(list))),
                Err(e) => report.problems.push(format!(
                    "could not compare with {node}: {e}; its copies were not checked against these"
                )),
            }
        }
        let mut blocks: std::collections::BTreeSet<u64> = here.keys().copied().collect();
        for (_, _, list) in &others {
            blocks.extend(list.keys().copied());
        }
        for b in blocks {
            let pg = self.pg_of(volume, b * BLOCK_SIZE as u64);
            if !bitmap[pg as usize] {
                continue;
            }
            let mine = here.get(&b).copied().unwrap_or(zero_crc);
            let holders: Vec<(&String, u32)> = others
                .iter()
                .filter(|(_, pgs, _)| pgs[pg as usize])
                .map(|(n, _, list)| (n, list.get(&b).copied().unwrap_or(zero_crc)))
                .collect();
            if holders.iter().all(|(_, crc)| *crc == mine) {
                continue;
            }
            if self
                .dirty
                .lock()
                .get(&pg)
                .is_some_and(|d| d.contains_key(&(volume, b)))
            {
                continue; // written during the scrub: the write itself went to every replica
            }
            // The value most holders (this one included) have; on a tie, the primary's.
            let agree = |crc: u32| 1 + holders.iter().filter(|(_, c)| *c == crc).count();
            let mut best = mine;
            for (_, crc) in &holders {
                if agree(*crc) > agree(best) {
                    best = *crc;
                }
            }
            if agree(best) * 2 == holders.len() + 1 {
                let primary = map.targets(pg, vol.replicas).primary;
                if let Some((_, crc)) = holders.iter().find(|(n, _)| Some(*n) == primary.as_ref()) {
                    best = *crc;
                } else {
                    best = mine;
                }
            }
            if best == mine {
                continue; // the other holder is the odd one out: its own scrub repairs it
            }
            report.diverged += 1;
            let fixed = if best == zero_crc {
                self.unmap_local(volume, b).await
            } else {
                let source = holders
                    .iter()
                    .find(|(_, c)| *c == best)
                    .map(|(n, _)| (*n).clone())
                    .expect("a holder has the chosen value");
                self.copy_run(map, &source, volume, b, 1, 0).await.is_ok()
            };
            if fixed {
                report.repaired += 1;
                eprintln!("torusd: scrub: volume {volume} block {b} differed from the other replicas here; rewritten from them");
            } else {
                report.problems.push(format!(
                    "block {b}: differs from the other replicas and could not be rewritten"
                ));
            }
        }
    }

    /// Unmaps one block here (it reads as zeroes) for a catch-up or a scrub, unless a write
    /// reached it since they began: checked and sent under the dirty lock, so a write cannot
    /// slip in between and be undone. False when the engine refused.
    async fn unmap_local(&self, volume: u32, block: u64) -> bool {
        let rx = {
            let dirty = self.dirty.lock();
            let pg = self.pg_of(volume, block * BLOCK_SIZE as u64);
            if dirty
                .get(&pg)
                .is_some_and(|d| d.contains_key(&(volume, block)))
            {
                return true;
            }
            self.send_local_ok(Piece {
                volume,
                offset: block * BLOCK_SIZE as u64,
                len: BLOCK_SIZE as u32,
                kind: PieceKind::Zero { fua: false },
            })
        };
        rx.await.unwrap_or(false)
    }

    /// True when a local read of `n` blocks from `block` passes its checksums.
    async fn read_local(&self, volume: u32, block: u64, n: u32) -> bool {
        self.send_local_ok(Piece {
            volume,
            offset: block * BLOCK_SIZE as u64,
            len: n * BLOCK_SIZE as u32,
            kind: PieceKind::Read,
        })
        .await
        .unwrap_or(false)
    }

    fn validate(self: &Arc<Self>, e: &Entry, data: &Option<Data>) -> Result<VolumeRecord, u16> {
        let Some(vol) = self.volume(e.volume) else {
            // Perhaps created a moment ago: look again; the sender asks again meanwhile.
            let me = self.clone();
            self.rt.spawn(async move {
                let _ = me.refresh_volumes().await;
            });
            return Err(status::RETRY);
        };
        let end = e.offset.checked_add(e.len as u64).ok_or(status::EINVAL)?;
        let in_chunk = e.len > 0
            && e.len as u64 <= CHUNK_SIZE
            && e.offset / CHUNK_SIZE == (end - 1) / CHUNK_SIZE;
        if !in_chunk {
            return Err(status::EINVAL);
        }
        if end > vol.size_bytes {
            // Grown a moment ago through another node: look again; the sender asks again
            // meanwhile (a request really past the end never leaves the frontend).
            let me = self.clone();
            self.rt.spawn(async move {
                let _ = me.refresh_volumes().await;
            });
            return Err(status::RETRY);
        }
        let wants_data = e.op == Op::Write as u8 || e.op == Op::CWrite as u8;
        let has = data.as_ref().map_or(0, |d| d.len);
        if wants_data != (has > 0) || (wants_data && has != e.len as usize) {
            return Err(status::EINVAL);
        }
        Ok(vol)
    }

    /// A starting node's fence: the last writer epoch recorded per volume (and that of any
    /// writer lock held now), so a request of a replaced writer that arrives after a restart
    /// is refused here as on every other replica.
    async fn load_fences(&self) -> Result<(), EtcdError> {
        let recorded = self.etcd.list("fence/").await?;
        let held = self.etcd.list("writers/").await?;
        let mut fence = self.fence.lock();
        for (k, v, _) in recorded {
            let epoch = String::from_utf8_lossy(&v).parse::<u64>().ok();
            if let (Ok(volume), Some(epoch)) = (k.parse::<u32>(), epoch) {
                fence.admit(volume, epoch);
            }
        }
        for (k, _, created) in held {
            if let Ok(volume) = k.parse::<u32>() {
                fence.admit(volume, created as u64);
            }
        }
        Ok(())
    }

    async fn refresh_volumes(&self) -> Result<(), EtcdError> {
        let list = self.etcd.volumes().await?;
        let changed = {
            let mut v = self.volumes.write();
            let new: HashMap<u32, VolumeRecord> =
                list.volumes.iter().map(|r| (r.id, r.clone())).collect();
            let changed = *v != new;
            *v = new;
            changed
        };
        if changed {
            let local = self.local.clone();
            let _ = tokio::task::spawn_blocking(move || local.volumes_changed(&list)).await;
        }
        Ok(())
    }

    async fn volume_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(VOLUME_POLL).await;
            let _ = self.refresh_volumes().await;
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let every = self.cfg.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let sent = Instant::now();
            let renewed = matches!(self.etcd.keep_alive_once(lease).await, Ok(true));
            if !renewed && self.lease_ok.lock().elapsed() >= self.cfg.lease_ttl {
                self.fence_cut_off().await;
            }
            if renewed {
                self.lift_cut_off_fence();
                *self.lease_ok.lock() = sent;
            } else if let Ok(None) = self.etcd.get(&format!("nodes/{}", self.me)).await {
                // etcd answers but our key is gone: the lease expired while we were cut off,
                // and the others took us out. Register again; we come back stale and catch up.
                eprintln!("torusd: our lease expired; registering again (stale until caught up)");
                self.dirty_epochs.lock().lease_lost();
                if let Ok(l) = self.etcd.lease_grant(self.cfg.lease_ttl).await {
                    let key = format!("nodes/{}", self.me);
                    let info = serde_json::to_vec(&self.info).expect("json");
                    if self.etcd.put(&key, info, Some(l)).await.is_ok() {
                        self.lease.store(l as u64, Ordering::Release);
                        *self.lease_ok.lock() = Instant::now();
                    }
                }
            }
            let local = self.local.clone();
            let used = tokio::task::spawn_blocking(move || local.used_bytes())
                .await
                .unwrap_or(0);
            let stats = NodeStats {
                used_bytes: used,
                heartbeat_unix_ms: now_ms(),
                recovery: self.recovery(),
            };
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let _ = self
                .etcd
                .put(
                    &format!("stats/{}", self.me),
                    serde_json::to_vec(&stats).expect("json"),
                    Some(lease),
                )
                .await;
        }
    }

    /// Cut off from etcd past its lease, this node is being taken out of the map: no write
    /// under a map it has seen can be acknowledged with it any more, and it refuses those from
    /// now on (`write_floor`). It then flushes and records, on its own disk (etcd cannot be
    /// reached), that the flush covers every write of those maps: as a flush record, the
    /// newest epoch seen plus one. Its next process publishes it (`flush_records`), so a
    /// revival knows this disk has more than a holder that recorded a flush under the same
    /// map before these writes. Once per map seen.
    async fn fence_cut_off(&self) {
        let seen = self.seen_epoch.load(Ordering::Acquire);
        if self.write_floor.load(Ordering::Acquire) > seen {
            return;
        }
        {
            let _inflight = self.inflight.lock();
            self.write_floor.fetch_max(seen + 1, Ordering::AcqRel);
            let lease = self.lease.load(Ordering::Acquire);
            self.fenced_lease.store(lease, Ordering::Release);
        }
        // Writes admitted before the floor may still be on their way to the disk.
        let deadline = Instant::now() + self.cfg.lease_ttl;
        while self
            .inflight
            .lock()
            .local
            .first_key_value()
            .is_some_and(|(&e, _)| e <= seen)
        {
            if Instant::now() >= deadline {
                eprintln!("torusd: cut off from etcd past the lease: refusing writes under map {seen} and older; local writes still in flight, so no flush is recorded on disk");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        flush_cores(
            &self.shared,
            Box::new(move |s| {
                let _ = tx.send(s);
            }),
        );
        if rx.await.unwrap_or(status::EIO) != status::OK {
            eprintln!("torusd: cut off from etcd past the lease: refusing writes under map {seen} and older; the flush failed, so none is recorded on disk");
            return;
        }
        let record = (self.incarnation, seen + 1);
        let path = self.cfg.cut_record_path.clone();
        let wrote = tokio::task::spawn_blocking(move || {
            write_durably(&path, &serde_json::to_vec(&record).expect("json"))
        })
        .await;
        match wrote {
            Ok(Ok(())) => eprintln!(
                "torusd: cut off from etcd past the lease: refusing writes under map {seen} and older; flushed, and recorded that on disk"
            ),
            Ok(Err(e)) => eprintln!(
                "torusd: recording a flush made while cut off in {}: {e}",
                self.cfg.cut_record_path.display()
            ),
            Err(_) => {}
        }
    }

    /// The lease is still alive after all (the fence came early: the map may not change):
    /// the record of the fence goes first, then writes are taken again.
    fn lift_cut_off_fence(&self) {
        let floor = self.write_floor.load(Ordering::Acquire);
        let same_lease =
            self.fenced_lease.load(Ordering::Acquire) == self.lease.load(Ordering::Acquire);
        if floor == 0 || floor <= self.map().epoch || !same_lease {
            return;
        }
        let path = &self.cfg.cut_record_path;
        match std::fs::remove_file(path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!(
                    "torusd: removing {}: {e}; still refusing old writes",
                    path.display()
                );
                return;
            }
        }
        self.write_floor.store(0, Ordering::Release);
        eprintln!("torusd: the lease outlived the cut; taking writes again");
    }

    fn install_map(&self, map: ClusterMap) {
        let mut cur = self.map.write();
        let newer = map.epoch > cur.epoch;
        let lost = newer && replication::lost_a_node(&cur, &map);
        if newer {
            self.seen_epoch.fetch_max(map.epoch, Ordering::AcqRel);
            *cur = Arc::new(map);
        }
        drop(cur);
        if lost {
            self.flush_local(Box::new(|s| {
                if s != status::OK {
                    eprintln!("torusd: flush after a node left the map failed (status {s})");
                }
            }));
        }
        if newer {
            // A PG held here again is freed again when it moves away later: the PGs let go
            // of are otherwise forgotten only between catch-up rounds, and a PG can come here
            // and go away again while this node catches up.
            let map = self.map();
            self.let_go
                .lock()
                .retain(|&pg| !replication::holds(&map, &self.me, pg));
        }
        if newer {
            // Requests waiting on a node that is no longer up fail now and are sent again
            // under this map, instead of waiting for the link's timeout (a stopped or cut-off
            // node keeps its TCP connections open).
            let map = self.map();
            let mut links = self.links.lock();
            let gone: Vec<String> = links.keys().filter(|n| !map.up(n)).cloned().collect();
            for node in gone {
                for link in links
                    .remove(&node)
                    .into_iter()
                    .flat_map(|l| l.into_values())
                {
                    link.close();
                }
            }
        }
        // Forget dirty blocks of PGs that are clean here and not being caught up, and all of
        // them when this node was down in a map since they were recorded (it missed writes:
        // a block it holds is not newer than its source's just because it was written here).
        let map = self.map();
        let recovering = self.recovering.lock().clone();
        let names_me = replication::names_me(&map, &self.me, self.incarnation);
        let (up_since, after_break) = map
            .nodes
            .get(&self.me)
            .map_or((0, false), |n| (n.up_since, n.after_break));
        let mut dirty = self.dirty.lock();
        if self
            .dirty_epochs
            .lock()
            .observe(names_me, up_since, after_break)
        {
            for set in dirty.values_mut() {
                set.retain(|_, epoch| *epoch >= up_since);
            }
        }
        let (me, inc) = (&self.me, self.incarnation);
        dirty.retain(|pg, _| replication::keep_dirty(&map, *pg, me, inc, recovering.contains(pg)));
    }

    async fn map_loop(self: Arc<Self>) {
        loop {
            let sent = Instant::now();
            if let Ok((Some(map), _)) = self.etcd.map().await {
                self.install_map(map);
                *self.map_ok.lock() = sent;
            }
            tokio::time::sleep(MAP_POLL).await;
        }
    }

    async fn leader_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(LEADER_TICK).await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let Ok((holder, _)) = self
                .etcd
                .acquire("leader", self.me.clone().into_bytes(), lease)
                .await
            else {
                continue;
            };
            if holder != self.me.as_bytes() {
                continue;
            }
            let Ok(nodes) = self.etcd.list("nodes/").await else {
                continue;
            };
            let live: BTreeMap<String, NodeInfo> = nodes
                .into_iter()
                .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
                .collect();
            if let Ok(Some(map)) = self
                .etcd
                .update_map(self.cfg.replicas_max, |m| m.reconcile_at(&live, now_ms()))
                .await
            {
                eprintln!(
                    "torusd: map epoch {}: {} nodes up, PGs {:?}",
                    map.epoch,
                    map.nodes.values().filter(|n| n.up).count(),
                    map.health()
                );
                self.install_map(map);
            }
            if let Some(after) = self.cfg.down_out_after {
                self.mark_out_long_down(after).await;
            }
        }
    }

    /// As leader: marks out each node down for `after` or more, so its PGs get their replicas
    /// back on the other nodes. Counted from the time the map records (`reconcile_at`, set
    /// by whichever leader first saw it down, in this same loop before this call).
    async fn mark_out_long_down(&self, after: Duration) {
        let due: Vec<String> = self
            .map()
            .down_nodes(now_ms())
            .filter(|&(_, ms)| ms >= after.as_millis() as u64)
            .map(|(name, _)| name.clone())
            .collect();
        self.out_refused.lock().retain(|n| due.contains(n));
        for name in due {
            let mut why = None;
            let marked = self
                .etcd
                .update_map(self.cfg.replicas_max, |m| match m.mark_out(&name) {
                    Ok(()) => true,
                    Err(w) => {
                        why = Some(w);
                        false
                    }
                })
                .await;
            match (marked, why) {
                (Ok(Some(map)), _) => {
                    eprintln!(
                        "torusd: map epoch {}: node {name} down for over {after:?}, marked out; its placement groups get their replicas back on the other nodes",
                        map.epoch
                    );
                    self.install_map(map);
                }
                (_, Some(why)) if self.out_refused.lock().insert(name.clone()) => {
                    eprintln!(
                        "torusd: node {name} down for over {after:?} but not marked out: {why}"
                    );
                }
                _ => {}
            }
        }
    }

    async fn recovery_loop(self: Arc<Self>) {
        let mut busy = false;
        let mut turn = 0;
        loop {
            if !busy {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            busy = false;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let map = self.map();
            let Some(me) = map.nodes.get(&self.me) else {
                continue;
            };
            if !me.up || me.info.incarnation != self.incarnation || !self.lease_fresh() {
                continue;
            }
            self.recovery.lock().pgs_stale = map.stale_slots(&self.me).len() as u64;
            let reviving = map.reviving(&self.me, self.incarnation);
            if !reviving.is_empty() {
                match self.clone().revive(&map, &reviving).await {
                    Ok(()) => {
                        let list: Vec<u32> = reviving.iter().map(|p| p.0).collect();
                        let (me, inc) = (self.me.clone(), self.incarnation);
                        if let Ok(Some(m)) = self
                            .etcd
                            .update_map(self.cfg.replicas_max, |m| m.mark_revived(&me, inc, &list))
                            .await
                        {
                            eprintln!("torusd: {} placement groups lost with every clean holder are clean here again", list.len());
                            self.install_map(m);
                            busy = true;
                        }
                    }
                    Err(why) => {
                        let mut last = self.revival_wait.lock();
                        if *last != why {
                            eprintln!("torusd: reviving lost placement groups: {why}; retrying");
                            *last = why;
                        }
                    }
                }
                continue;
            }
            // One source (the PG's primary) per round.
            turn += 1;
            let Some((source, pgs)) = replication::recovery_round(&map, &self.me, turn) else {
                self.let_go_of_moved_pgs(&map).await;
                continue;
            };
            let listed_at = map.epoch;
            match self.clone().catch_up(&map, &source, &pgs).await {
                Ok(()) => {
                    let list: Vec<u32> = pgs.iter().map(|p| p.0).collect();
                    let inc = self.incarnation;
                    let me = self.me.clone();
                    if let Ok(Some(m)) = self
                        .etcd
                        .update_map(self.cfg.replicas_max, |m| {
                            m.mark_clean(&me, inc, listed_at, &list)
                        })
                        .await
                    {
                        {
                            let mut r = self.recovery.lock();
                            r.pgs_done += list.len() as u64;
                            r.pgs_stale = r.pgs_stale.saturating_sub(list.len() as u64);
                        }
                        self.install_map(m);
                        busy = true;
                    }
                }
                Err(why) => eprintln!("torusd: catch-up from {source}: {why}; retrying"),
            }
            let mut rec = self.recovering.lock();
            for (pg, _) in &pgs {
                rec.remove(pg);
            }
        }
    }

    /// A restarted last clean holder of lost PGs first copies each whole PG from the holder
    /// that surely has more than this store's disk, if any (`replication::revival_source`: by
    /// the flushes each process recorded, and the holders demoted while they ran; it waits
    /// while the best one is down), then, from each holder that stayed up since the loss, the
    /// blocks that holder wrote while catching up (see `map::LostPg`); a holder that is down
    /// now is skipped.
    async fn revive(
        self: Arc<Self>,
        map: &ClusterMap,
        pgs: &[(u32, Vec<String>)],
    ) -> Result<(), String> {
        // The flushes recorded by this store's processes and by the other candidates'.
        let mut records = HashMap::new();
        records.insert(self.me.clone(), self.flushed_record.lock().clone());
        for (pg, _) in pgs {
            let holders = map.last_clean.get(pg).into_iter().flat_map(|l| &l.holders);
            let demoted = map.demoted.get(pg).into_iter().flatten();
            for node in holders.map(|h| &h.0).chain(demoted.map(|d| &d.node)) {
                if !records.contains_key(node) {
                    let r = self.flush_record_of(node).await?;
                    records.insert(node.clone(), r);
                }
            }
        }
        let flushed = |node: &str, inc: u64| {
            records
                .get(node)
                .and_then(|r| r.iter().find(|r| r.0 == inc))
                .map_or(0, |r| r.1)
        };
        let mut whole: BTreeMap<String, Vec<(u32, usize)>> = BTreeMap::new();
        for (pg, _) in pgs {
            if let Some(source) = replication::revival_source(map, *pg, &self.me, flushed)? {
                let slot = map.slot_of(*pg, &self.me).unwrap_or(0);
                whole.entry(source).or_default().push((*pg, slot));
            }
        }
        for (source, list) in &whole {
            eprintln!(
                "torusd: copying {} lost placement groups whole from {source}, whose copy has more than this store's disk",
                list.len()
            );
            let done = self.clone().catch_up(map, source, list).await;
            let mut rec = self.recovering.lock();
            for (pg, _) in list {
                rec.remove(pg);
            }
            drop(rec);
            done?;
        }
        let mut by_source: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
        for (pg, from) in pgs {
            for source in from.iter().filter(|s| map.up(s)) {
                by_source
                    .entry(source)
                    .or_insert_with(|| vec![false; map.pg_count as usize])[*pg as usize] = true;
            }
        }
        for (source, bitmap) in by_source {
            let dirty = self.list_remote_op(map, source, &bitmap, Op::Dirty).await?;
            let blocks: Vec<(u32, u64)> = dirty.iter().map(|&(v, b, _)| (v, b)).collect();
            for (v, b, n) in replication::copy_runs(&blocks) {
                self.copy_run(map, source, v, b, n, wire::FLAG_DIRTY)
                    .await?;
            }
        }
        if !self.flushed_here().await {
            return Err("local flush failed".into());
        }
        Ok(())
    }

    /// The flushes `node`'s processes recorded (`Cluster::flushed_record`), from etcd.
    async fn flush_record_of(&self, node: &str) -> Result<Vec<(u64, u64)>, String> {
        let id = self
            .etcd
            .get(&format!("ids/{node}"))
            .await
            .map_err(|e| format!("reading the store id of {node}: {e}"))?;
        let Some((id, _)) = id else {
            return Ok(Vec::new());
        };
        let key = format!("flushed/{}", String::from_utf8_lossy(&id));
        match self.etcd.get(&key).await {
            Err(e) => Err(format!("reading {key}: {e}")),
            Ok(None) => Ok(Vec::new()),
            Ok(Some((v, _))) => {
                serde_json::from_slice(&v).map_err(|e| format!("{key} is not a flush record: {e}"))
            }
        }
    }

    /// Copies into this node what it lacks of `pgs` from `source`, comparing checksums.
    async fn catch_up(
        self: Arc<Self>,
        map: &ClusterMap,
        source: &str,
        pgs: &[(u32, usize)],
    ) -> Result<(), String> {
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        {
            let mut rec = self.recovering.lock();
            let mut dirty = self.dirty.lock();
            for (pg, _) in pgs {
                bitmap[*pg as usize] = true;
                rec.insert(*pg);
                dirty.entry(*pg).or_default();
            }
        }
        // The volumes as etcd has them now: one created while this node was cut off must be
        // known here before its blocks are compared, or they would be skipped as not wanted
        // and the PG marked clean without them.
        self.refresh_volumes()
            .await
            .map_err(|e| format!("reading the volumes: {e}"))?;
        let volumes: HashMap<u32, u32> = self
            .volumes
            .read()
            .values()
            .map(|v| (v.id, v.replicas))
            .collect();
        let remote = self.list_remote(map, source, &bitmap).await?;
        if let Some(&(v, _, _)) = remote.iter().find(|(v, _, _)| !volumes.contains_key(v)) {
            return Err(format!(
                "{source} lists blocks of volume {v}, not known here yet"
            ));
        }
        let wanted = Wanted::new(map, source, pgs, volumes);
        let local = self.list_local(&bitmap).await;
        let (fetch, unmap) = replication::catch_up_plan(&remote, &local, &wanted);
        self.recovery.lock().blocks_compared += remote.len() as u64;
        let runs = replication::copy_runs(&fetch);
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(RECOVERY_READS_IN_FLIGHT));
        let failed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (v, b, n) in runs {
            if failed.load(Ordering::Acquire) {
                break;
            }
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            // Throttle: stay under the configured rate.
            let copied = self.recovery.lock().bytes_copied as f64;
            let allowed = self.cfg.recovery_rate as f64 * started.elapsed().as_secs_f64();
            if copied > allowed + (8 << 20) as f64 {
                tokio::time::sleep(Duration::from_secs_f64(
                    (copied - allowed) / self.cfg.recovery_rate as f64,
                ))
                .await;
            }
            let me = self.clone();
            let failed = failed.clone();
            let source = source.to_owned();
            let map = map.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = me.copy_run(&map, &source, v, b, n, 0).await {
                    if !failed.swap(true, Ordering::AcqRel) {
                        eprintln!("torusd: catch-up read of volume {v} block {b}: {e}");
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        if failed.load(Ordering::Acquire) {
            return Err("a read from the source failed".into());
        }
        for (v, b) in unmap {
            if !self.unmap_local(v, b).await {
                return Err(format!("unmapping volume {v} block {b} failed"));
            }
        }
        if !self.flushed_here().await {
            return Err("local flush failed".into());
        }
        Ok(())
    }

    /// Copies `n` blocks from `source` (read with `flags`), leaving alone those a newer write
    /// reached here meanwhile.
    async fn copy_run(
        &self,
        map: &ClusterMap,
        source: &str,
        volume: u32,
        block: u64,
        n: u32,
        flags: u8,
    ) -> Result<(), String> {
        let pg = self.pg_of(volume, block * BLOCK_SIZE as u64);
        let link = self.link(map, source, pg).ok_or("source left the map")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        link.send(Outgoing {
            entry: Entry {
                op: Op::Read as u8,
                flags,
                volume,
                offset: block * BLOCK_SIZE as u64,
                len: n * BLOCK_SIZE as u32,
                epoch: map.epoch,
                ..Entry::default()
            },
            data: None,
            group: 0,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        let r = rx.await.map_err(|_| "link dropped")?;
        if r.status != status::OK {
            return Err(format!("status {}", r.status));
        }
        let d = r.data.ok_or("no data")?;
        if d.len != (n as usize) * BLOCK_SIZE {
            return Err("short read".into());
        }
        let mut waits = Vec::new();
        {
            let dirty = self.dirty.lock();
            let set = dirty.get(&pg);
            let spans = replication::clean_spans(n, |i| {
                set.is_some_and(|s| s.contains_key(&(volume, block + i as u64)))
            });
            for (i, j) in spans {
                waits.push(self.send_local_ok(Piece {
                    volume,
                    offset: (block + i as u64) * BLOCK_SIZE as u64,
                    len: (j - i) * BLOCK_SIZE as u32,
                    kind: PieceKind::Write {
                        data: d.buf.clone(),
                        data_offset: d.start + i as usize * BLOCK_SIZE,
                        fua: false,
                    },
                }));
            }
        }
        for w in waits {
            if !w.await.unwrap_or(false) {
                return Err("local write failed".into());
            }
        }
        let mut rec = self.recovery.lock();
        rec.blocks_copied += n as u64;
        rec.bytes_copied += d.len as u64;
        Ok(())
    }

    async fn list_remote(
        &self,
        map: &ClusterMap,
        source: &str,
        bitmap: &[bool],
    ) -> Result<Vec<(u32, u64, u32)>, String> {
        self.list_remote_op(map, source, bitmap, Op::List).await
    }

    /// A listing of the PGs in `bitmap` from `source`: its blocks (`Op::List`) or the blocks
    /// it wrote while catching up (`Op::Dirty`).
    async fn list_remote_op(
        &self,
        map: &ClusterMap,
        source: &str,
        bitmap: &[bool],
        op: Op,
    ) -> Result<Vec<(u32, u64, u32)>, String> {
        let link = self.link(map, source, 0).ok_or("source left the map")?;
        let mut buf = AlignedBuf::zeroed(bitmap.len().div_ceil(4096) * 4096);
        for (i, &b) in bitmap.iter().enumerate() {
            buf[i] = b as u8;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        link.send(Outgoing {
            entry: Entry {
                op: op as u8,
                epoch: map.epoch,
                len: bitmap.len() as u32,
                ..Entry::default()
            },
            data: Some(Data {
                buf: Arc::new(buf),
                start: 0,
                len: bitmap.len(),
            }),
            group: 0,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        let r = rx.await.map_err(|_| "link dropped")?;
        if r.status != status::OK {
            return Err(format!("listing failed with status {}", r.status));
        }
        let Some(d) = r.data else {
            return Ok(Vec::new());
        };
        Ok(decode_list(&d.buf[d.start..d.start + d.len]))
    }

    /// Frees the blocks this node still keeps of PGs it holds no slot of under `map` (they
    /// moved to another node when one joined or left, or this node came back from being
    /// marked out with a smaller share), once no write of an older map is in flight here
    /// (later ones to such a PG are refused for their epoch). A PG that comes back to this
    /// node comes back stale and is caught up like any other, so nothing dropped is missed.
    async fn let_go_of_moved_pgs(&self, map: &ClusterMap) {
        let fresh: Vec<u32> = {
            let mut gone = self.let_go.lock();
            gone.retain(|&pg| !replication::holds(map, &self.me, pg));
            replication::let_go_candidates(map, &self.me, |pg| gone.contains(&pg))
        };
        let oldest = self.oldest_in_flight();
        if fresh.is_empty() || !replication::list_ready(self.map().epoch, map.epoch, oldest) {
            return;
        }
        let mut bitmap = vec![false; map.pg_count as usize];
        for &pg in &fresh {
            bitmap[pg as usize] = true;
        }
        let blocks: Vec<(u32, u64)> = self
            .list_local(&bitmap)
            .await
            .into_iter()
            .map(|(v, b, _)| (v, b))
            .collect();
        let mut waits = Vec::new();
        let mut kept = HashSet::new();
        let mut zeroed = 0u64;
        for (volume, first, n) in replication::copy_runs(&blocks) {
            // Under the lock a replica write to a PG held here (stale) is recorded and queued
            // with: a PG taken back since `map` (a write may already be on its way) is kept.
            let pg = self.pg_of(volume, first * BLOCK_SIZE as u64);
            let dirty = self.dirty.lock();
            let written = dirty
                .get(&pg)
                .is_some_and(|d| (first..first + n as u64).any(|b| d.contains_key(&(volume, b))));
            let taken_back = replication::keep_moved(&self.map(), &self.me, pg, written);
            if taken_back {
                kept.insert(pg);
                continue;
            }
            waits.push(self.send_local_ok(Piece {
                volume,
                offset: first * BLOCK_SIZE as u64,
                len: n * BLOCK_SIZE as u32,
                kind: PieceKind::Zero { fua: false },
            }));
            drop(dirty);
            zeroed += n as u64;
        }
        let mut freed = true;
        for w in waits {
            freed &= w.await.unwrap_or(false);
        }
        if !freed {
            return eprintln!(
                "torusd: freeing blocks of placement groups that moved away failed; retrying"
            );
        }
        if zeroed > 0 {
            eprintln!(
                "torusd: freed {zeroed} blocks of {} placement groups no longer held here",
                fresh.len() - kept.len()
            );
        }
        self.let_go
            .lock()
            .extend(fresh.into_iter().filter(|pg| !kept.contains(pg)));
    }

    async fn list_local(&self, bitmap: &[bool]) -> Vec<(u32, u64, u32)> {
        let mut waits = Vec::new();
        for m in &self.shared.mailboxes {
            let (tx, rx) = tokio::sync::oneshot::channel();
            m.send(Message::ListBlocks {
                pgs: bitmap.to_vec(),
                reply: Box::new(move |v| {
                    let _ = tx.send(v);
                }),
            });
            waits.push(rx);
        }
        let mut all = Vec::new();
        for w in waits {
            all.extend(w.await.unwrap_or_default());
        }
        all.sort_unstable();
        all
    }

    /// Answers a block listing once every write that started under an older map has finished
    /// here (coordinated here or applied as a replica; later ones are refused for their old
    /// epoch), so the listing holds every write the asking node did not receive itself.
    async fn serve_list(self: Arc<Self>, e: Entry, data: Option<Data>, respond: Responder) {
        let Some(d) = data else {
            return respond.reply(status::EINVAL, None);
        };
        let pg_count = self.shared.geometry.pg_count as usize;
        if d.len != pg_count {
            return respond.reply(status::EINVAL, None);
        }
        let bitmap: Vec<bool> = d.buf[d.start..d.start + d.len]
            .iter()
            .map(|&b| b != 0)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let oldest = self.oldest_in_flight();
            let ready = replication::list_ready(self.map().epoch, e.epoch, oldest);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return respond.reply(status::RETRY, None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pgs = (0..bitmap.len() as u32).filter(|&pg| bitmap[pg as usize]);
        if !replication::serves_copies(&self.map(), &self.me, self.incarnation, pgs) {
            return respond.reply(status::RETRY, None);
        }
        let list = self.list_local(&bitmap).await;
        match encode_list(&list) {
            Ok(data) => respond.reply(status::OK, data),
            Err(s) => respond.reply(s, None),
        }
    }

    /// The valid dirty blocks of `pg` here: written while catching up, under a map in which
    /// this node had been up without a break since.
    fn valid_dirty(&self, pg: u32) -> Vec<(u32, u64)> {
        let up_since = self.dirty_epochs.lock().valid_from;
        let dirty = self.dirty.lock();
        let mut out: Vec<(u32, u64)> = dirty
            .get(&pg)
            .into_iter()
            .flatten()
            .filter(|(_, epoch)| **epoch >= up_since)
            .map(|(k, _)| *k)
            .collect();
        out.sort_unstable();
        out
    }

    /// True when every block of the byte range is a valid dirty block here (`Op::Dirty`).
    fn holds_dirty(&self, pg: u32, volume: u32, offset: u64, len: u32) -> bool {
        let up_since = self.dirty_epochs.lock().valid_from;
        let dirty = self.dirty.lock();
        let Some(set) = dirty.get(&pg) else {
            return false;
        };
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len as u64).div_ceil(BLOCK_SIZE as u64);
        offset.is_multiple_of(BLOCK_SIZE as u64)
            && (first..end).all(|b| set.get(&(volume, b)).is_some_and(|e| *e >= up_since))
    }

    /// Answers `Op::Dirty`: the valid dirty blocks of the PGs in the bitmap.
    fn serve_dirty(&self, data: Option<Data>, respond: Responder) {
        let Some(d) = data else {
            return respond.reply(status::EINVAL, None);
        };
        if d.len != self.shared.geometry.pg_count as usize {
            return respond.reply(status::EINVAL, None);
        }
        let mut list = Vec::new();
        for (pg, &on) in d.buf[d.start..d.start + d.len].iter().enumerate() {
            if on != 0 {
                list.extend(
                    self.valid_dirty(pg as u32)
                        .into_iter()
                        .map(|(v, b)| (v, b, 0)),
                );
            }
        }
        match encode_list(&list) {
            Ok(data) => respond.reply(status::OK, data),
            Err(s) => respond.reply(s, None),
        }
    }
}

fn encode_list(list: &[(u32, u64, u32)]) -> Result<Option<Data>, u16> {
    let bytes = list.len() * 16;
    if bytes > wire::BODY_MAX - (64 << 10) {
        return Err(status::EINVAL);
    }
    let mut buf = AlignedBuf::zeroed(bytes.div_ceil(4096).max(1) * 4096);
    for (i, (v, b, c)) in list.iter().enumerate() {
        buf[i * 16..i * 16 + 4].copy_from_slice(&v.to_le_bytes());
        buf[i * 16 + 4..i * 16 + 12].copy_from_slice(&b.to_le_bytes());
        buf[i * 16 + 12..i * 16 + 16].copy_from_slice(&c.to_le_bytes());
    }
    Ok((bytes > 0).then(|| Data {
        buf: Arc::new(buf),
        start: 0,
        len: bytes,
    }))
}

fn decode_list(b: &[u8]) -> Vec<(u32, u64, u32)> {
    b.chunks_exact(16)
        .map(|c| {
            (
                u32::from_le_bytes(c[0..4].try_into().expect("4")),
                u64::from_le_bytes(c[4..12].try_into().expect("8")),
                u32::from_le_bytes(c[12..16].try_into().expect("4")),
            )
        })
        .collect()
}

/// The engine's router: frontends' pieces enter the cluster here.
struct ClusterRouter(Arc<Cluster>);

impl Router for ClusterRouter {
    fn route(&self, piece: Piece, reply: ReplyTo) {
        self.0.route(piece, reply);
    }

    fn flush(&self, _volume: u32, reply: ReplyTo) {
        self.0.flush_all(reply);
    }
}

/// Requests from other nodes.
struct ClusterHandler(Arc<Cluster>);

impl Handler for ClusterHandler {
    fn cores(&self) -> u32 {
        self.0.shared.mailboxes.len() as u32
    }

    fn handle(&self, _from: &str, _core: u32, e: Entry, data: Option<Data>, respond: Responder) {
        let c = &self.0;
        let Some(op) = Op::from_u8(e.op) else {
            return respond.reply(status::EINVAL, None);
        };
        let fua = e.flags & wire::FLAG_FUA != 0;
        let piece_of = |kind: PieceKind| Piece {
            volume: e.volume,
            offset: e.offset,
            len: e.len,
            kind,
        };
        match op {
            Op::Write | Op::Zero => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                let map_epoch = c.map().epoch;
                let pg = c.pg_of(e.volume, e.offset);
                if !c.enter_inflight(e.epoch) {
                    return respond.reply(status::RETRY, None);
                }
                let admitted = replication::admit_write(
                    map_epoch,
                    e.epoch,
                    &mut c.fence.lock(),
                    e.volume,
                    Some(pg),
                    e.writer,
                );
                if let Err(s) = admitted {
                    c.local_done(e.epoch);
                    c.inflight_done(e.epoch);
                    return respond.reply(s, None);
                }
                if data.is_some() && replica_drops_this_write() {
                    c.local_done(e.epoch);
                    c.inflight_done(e.epoch);
                    return respond.reply(status::OK, None);
                }
                let kind = match data {
                    Some(d) => PieceKind::Write {
                        data: d.buf,
                        data_offset: d.start,
                        fua,
                    },
                    None => PieceKind::Zero { fua },
                };
                c.apply_replica(
                    piece_of(kind),
                    e.epoch,
                    sink(move |done| {
                        respond.reply(done.output.map_or_else(status_of, |_| status::OK), None)
                    }),
                );
            }
            Op::Read | Op::Status => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                let pg = c.pg_of(e.volume, e.offset);
                let serves = if op == Op::Read && e.flags & wire::FLAG_DIRTY != 0 {
                    c.holds_dirty(pg, e.volume, e.offset, e.len)
                } else {
                    replication::serves_copies(&c.map(), &c.me, c.incarnation, [pg].into_iter())
                };
                if !serves {
                    return respond.reply(status::RETRY, None);
                }
                let kind = if op == Op::Read {
                    PieceKind::Read
                } else {
                    PieceKind::Status
                };
                let len = e.len as usize;
                c.send_local(
                    piece_of(kind),
                    sink(move |done| reply_output(respond, done.output.map_err(status_of), len)),
                );
            }
            Op::Flush => c.flush_local(Box::new(move |s| respond.reply(s, None))),
            Op::List => {
                let me = c.clone();
                c.rt.spawn(me.serve_list(e, data, respond));
            }
            Op::Dirty => c.serve_dirty(data, respond),
            Op::CWrite | Op::CZero | Op::CRead | Op::CStatus => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                // Sent under an older map: the sender may have been cut off since (a request
                // delivered late by TCP after a partition healed). It asks again with a fresh
                // map if it is still alive.
                let map_epoch = c.map().epoch;
                if e.epoch < map_epoch {
                    return respond.reply(status::RETRY, None);
                }
                let is_write = matches!(op, Op::CWrite | Op::CZero);
                if is_write && !c.fence.lock().admit(e.volume, e.writer) {
                    return respond.reply(status::FENCED, None);
                }
                let kind = match op {
                    Op::CRead => PieceKind::Read,
                    Op::CStatus => PieceKind::Status,
                    Op::CZero => PieceKind::Zero { fua },
                    _ => {
                        let d = data.expect("validated");
                        PieceKind::Write {
                            data: d.buf,
                            data_offset: d.start,
                            fua,
                        }
                    }
                };
                let len = e.len as usize;
                c.submit(Request {
                    piece: piece_of(kind),
                    done: Box::new(move |r| reply_output(respond, r, len)),
                    deadline: Instant::now() + PEER_REQUEST_DEADLINE,
                    from_peer: true,
                    writer: e.writer,
                });
            }
            Op::Hello | Op::Reply => respond.reply(status::EINVAL, None),
        }
    }
}

/// Test-only fault: never without the `testing` feature (see `testing::faults`).
#[cfg(not(feature = "testing"))]
fn replica_drops_this_write() -> bool {
    false
}

/// What a scrub found on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub node: String,
    pub blocks_checked: u64,
    pub bad_found: u64,
    /// Blocks whose crc32c here differed from the other replicas'.
    #[serde(default)]
    pub diverged: u64,
    pub repaired: u64,
    pub problems: Vec<String>,
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
    /// A piece from this node's frontends enters the cluster; writes of a paused volume wait.
    fn route(self: &Arc<Self>, piece: Piece, reply: ReplyTo) {
        let shared = self.shared.clone();
        let volume = piece.volume;
        let is_write = matches!(piece.kind, PieceKind::Write { .. } | PieceKind::Zero { .. });
        let done: Done = if is_write {
            let mut p = self.pause.lock();
            if p.paused.contains(&volume) {
                p.parked.push((piece, reply));
                return;
            }
            *p.inflight.entry(volume).or_insert(0) += 1;
            drop(p);
            let me = self.clone();
            Box::new(move |r| {
                {
                    let mut p = me.pause.lock();
                    if let Some(n) = p.inflight.get_mut(&volume) {
                        *n -= 1;
                        if *n == 0 {
                            p.inflight.remove(&volume);
                        }
                    }
                }
                deliver(&shared, reply, r.map_err(error_of))
            })
        } else {
            Box::new(move |r| deliver(&shared, reply, r.map_err(error_of)))
        };
        self.submit(Request {
            piece,
            done,
            deadline: Instant::now() + REQUEST_DEADLINE,
            from_peer: false,
            writer: self.writer_epoch(volume),
        });
    }

    /// Holds back new writes to `volume` from this node and waits until those in flight are
    /// answered (each by every replica): the point at which a snapshot is the same on every
    /// replica. `resume_writes` must follow.
    pub fn pause_writes(self: &Arc<Self>, volume: u32, limit: Duration) -> Result<(), String> {
        self.pause.lock().paused.insert(volume);
        let deadline = Instant::now() + limit;
        while self.pause.lock().inflight.contains_key(&volume) {
            if Instant::now() > deadline {
                self.resume_writes(volume);
                return Err(format!(
                    "writes to the volume did not drain within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn resume_writes(self: &Arc<Self>, volume: u32) {
        let parked: Vec<(Piece, ReplyTo)> = {
            let mut p = self.pause.lock();
            p.paused.remove(&volume);
            let (mine, rest) = std::mem::take(&mut p.parked)
                .into_iter()
                .partition(|(piece, _)| piece.volume == volume);
            p.parked = rest;
            mine
        };
        for (piece, reply) in parked {
            self.route(piece, reply);
        }
    }

    /// The node holding `volume`'s writer lock, if any.
    pub fn writer_holder(&self, volume: u32) -> Result<Option<String>, String> {
        let got = self
            .block_on(self.etcd.get(&format!("writers/{volume}")))
            .map_err(|e| format!("read the writer lock: {e}"))?;
        Ok(got.map(|(v, _)| holder_node(&v)))
    }

    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Fresh from etcd (a stale map here must not hide a problem).
    fn fresh_map(&self) -> Arc<ClusterMap> {
        if let Ok((Some(m), _)) = self.block_on(self.etcd.map()) {
            self.install_map(m);
        }
        self.map()
    }

    fn all_stats(&self) -> HashMap<String, NodeStats> {
        self.block_on(self.etcd.list("stats/"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
            .collect()
    }

    pub fn peers(&self) -> Vec<PeerView> {
        let map = self.fresh_map();
        let stats = self.all_stats();
        let now = now_ms();
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
            .block_on(self.etcd.get("leader"))
            .ok()
            .flatten()
            .map(|(v, _)| String::from_utf8_lossy(&v).into_owned());
        let now = now_ms();
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
            .block_on(self.etcd.list("nodes/"))
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

    /// Gives up on a node that is down for good (`ClusterMap::give_up`).
    pub fn give_up_peer(&self, name: &str) -> Result<GiveUp, String> {
        let mut out = Err(String::new());
        let r = self.block_on(self.etcd.update_map(self.cfg.replicas_max, |m| {
            let epoch = m.epoch;
            match m.give_up(name) {
                Ok(g) => {
                    out = Ok(g);
                    m.epoch != epoch
                }
                Err(w) => {
                    out = Err(w);
                    false
                }
            }
        }));
        r.map_err(|e| e.to_string())?;
        out
    }

    /// Starts draining a node: its PGs move to the others, then it leaves the map.
    pub fn remove_peer(&self, name: &str) -> Result<(), String> {
        let replicas_max = self.cfg.replicas_max;
        let mut why = None;
        let r = self.block_on(self.etcd.update_map(
            replicas_max,
            |m| match m.start_removing(name) {
                Ok(changed) => changed,
                Err(w) => {
                    why = Some(w);
                    false
                }
            },
        ));
        if let Some(w) = why {
            return Err(w);
        }
        r.map(|_| ()).map_err(|e| e.to_string())
    }
}
