//! torus-engine: the per-core io_uring reactors and the on-disk block store of one node.
//!
//! `Engine::open` formats or recovers the backing store (a file or a block device, opened with
//! `O_DIRECT`), starts one pinned reactor thread per region, and hands back a handle through
//! which frontends and tools send work to the cores' mailboxes. See `layout` for the disk
//! format, `store` for the write path and its invariants, `reactor` for the event loop.

pub mod block_map;
pub mod buffer;
pub mod buffer_pool;
pub mod checkpoint;
pub mod error;
pub mod journal;
pub mod layout;
pub mod mailbox;
pub mod metrics;
pub mod quota;
pub mod reactor;
pub mod request;
pub mod slot_allocator;
pub mod socket;
pub mod source_slots;
pub mod spare_buffers;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use buffer::AlignedBuf;
pub use error::{BlockError, EngineError};
pub use layout::{Geometry, Superblock, BLOCK_SIZE, CHUNK_SIZE};
pub use mailbox::Message;
pub use metrics::CoreStats;
pub use reactor::{current_core, CoreContext, CoreService, NoService, Shared};
pub use request::{
    Completion, CompletionSink, OnceReply, Output, Piece, PieceKind, ReplyTo, Router, Sink,
};
pub use spare_buffers::SpareBuffers;

use layout::{SuperblockDecode, PAGE_SIZE, SUPERBLOCK_COPIES};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct EngineConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Size of a backing file to create (ignored for an existing store or a device).
    pub create_size: u64,
    /// Regions (and reactor threads) for a new store; an existing store keeps its own count.
    pub cores: u32,
    /// How a new backing file's blocks are prepared (ignored for a device or an existing store).
    pub fill: Fill,
}

/// How the blocks of a new backing file are prepared before the store is formatted on it.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Reserved with `fallocate` and never written: ready at once. On ext4 and xfs each block
    /// is then an unwritten extent until its first write, and that first write costs an extent
    /// conversion (a journal transaction, completed by a kernel worker): slower writes until
    /// the store has been written over once.
    Sparse,
    /// Reserved, then written with zeros once, so that every later write is a plain overwrite.
    /// `progress(written, total)` is called about once a second and at the end.
    Zeros { progress: fn(u64, u64) },
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The filesystem type (`statfs` f_type) of an open file.
fn fs_type(file: &File) -> Option<i64> {
    // SAFETY: statfs is plain data; fstatfs fills it for a valid fd and the result is checked.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    (r == 0).then_some(st.f_type as i64)
}

/// Bytes per write while filling a new file with zeros, and writes in flight.
const FILL_CHUNK: usize = 8 << 20;
const FILL_THREADS: u64 = 4;

/// Writes zeros over all of `file` (`size` bytes): `FILL_THREADS` threads, each writing every
/// `FILL_THREADS`th chunk, so the device has several writes in flight.
fn fill_with_zeros(file: &File, size: u64, progress: fn(u64, u64)) -> std::io::Result<()> {
    let written = std::sync::atomic::AtomicU64::new(0);
    let chunks = size.div_ceil(FILL_CHUNK as u64);
    let report = parking_lot::Mutex::new(std::time::Instant::now());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..FILL_THREADS.min(chunks.max(1)))
            .map(|t| {
                let (written, report) = (&written, &report);
                s.spawn(move || -> std::io::Result<()> {
                    let zeros = AlignedBuf::zeroed(FILL_CHUNK);
                    let mut chunk = t;
                    while chunk < chunks {
                        let at = chunk * FILL_CHUNK as u64;
                        let n = (size - at).min(FILL_CHUNK as u64) as usize;
                        file.write_all_at(&zeros[..n], at)?;
                        let done = written
                            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed)
                            + n as u64;
                        let mut last = report.lock();
                        if last.elapsed() >= Duration::from_secs(1) {
                            *last = std::time::Instant::now();
                            progress(done, size);
                        }
                        chunk += FILL_THREADS;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("fill thread panicked"))
    })?;
    progress(size, size);
    Ok(())
}

pub struct Engine {
    shared: Arc<Shared>,
    threads: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    superblock: Superblock,
    path: PathBuf,
    _file: File,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn random_node_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f
            .read_exact_at(&mut id, 0)
            .or_else(|_| std::io::Read::read_exact(&mut &f, &mut id));
    }
    id
}

/// Reads the superblock of an existing store, or None if the store is new (all zero).
fn read_superblock(file: &File, path: &Path) -> Result<Option<Superblock>, EngineError> {
    let mut buf = AlignedBuf::zeroed(PAGE_SIZE * SUPERBLOCK_COPIES as usize);
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err("read superblock of", path))?;
    let mut not_torus = 0;
    let mut version = None;
    for copy in 0..SUPERBLOCK_COPIES as usize {
        match Superblock::decode(&buf[copy * PAGE_SIZE..(copy + 1) * PAGE_SIZE]) {
            SuperblockDecode::Ok(sb) => {
                if copy > 0 {
                    eprintln!(
                        "torus: {}: superblock copy 0 is damaged; using copy {copy}",
                        path.display()
                    );
                }
                return Ok(Some(sb));
            }
            SuperblockDecode::NotTorus => not_torus += 1,
            SuperblockDecode::BadChecksum => eprintln!(
                "torus: {}: superblock copy {copy} fails its checksum",
                path.display()
            ),
            SuperblockDecode::Version(v) => version = Some(v),
        }
    }
    if let Some(found) = version {
        return Err(EngineError::Version {
            path: path.to_owned(),
            found,
            supported: layout::FORMAT_VERSION,
        });
    }
    if not_torus == SUPERBLOCK_COPIES as usize {
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        return Err(EngineError::NotTorus {
            path: path.to_owned(),
        });
    }
    Err(EngineError::SuperblockDamaged {
        path: path.to_owned(),
    })
}

impl Engine {
    /// Opens (recovering) or creates the store and starts one reactor per region.
    /// `service(core)` makes the frontend that runs on each core.
    pub fn open(
        config: &EngineConfig,
        mut service: impl FnMut(usize) -> Box<dyn CoreService>,
    ) -> Result<Engine, EngineError> {
        let path = config.path.as_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err("open", path))?;
        let meta = file.metadata().map_err(io_err("stat", path))?;
        let is_device = meta.file_type().is_block_device();
        let mut size = if is_device {
            device_size(&file).map_err(io_err("size of", path))?
        } else {
            meta.len()
        };
        if !is_device && size == 0 {
            size = config.create_size / PAGE_SIZE as u64 * PAGE_SIZE as u64;
            file.set_len(size).map_err(io_err("size", path))?;
            // Reserve the space now so that a full filesystem shows at start, not mid-write.
            // SAFETY: plain syscall on a valid fd.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                let _ = std::fs::remove_file(path);
                return Err(EngineError::Io {
                    op: "reserve space for",
                    path: path.to_owned(),
                    source: e,
                });
            }
        }
        let superblock = match read_superblock(&file, path)? {
            Some(sb) => sb,
            None => {
                let geometry = Geometry::compute(size, config.cores.max(1), path)?;
                if let (false, Fill::Zeros { progress }) = (is_device, config.fill) {
                    // In memory (tmpfs, ramfs) there are no extents to convert, and zeros
                    // written would only take memory.
                    let in_memory =
                        fs_type(&file).is_some_and(|t| t == TMPFS_MAGIC || t == RAMFS_MAGIC);
                    if !in_memory {
                        fill_with_zeros(&file, size, progress)
                            .map_err(io_err("write zeros over", path))?;
                    }
                }
                let sb = Superblock {
                    geometry,
                    node_id: random_node_id(),
                    created_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                };
                for core in 0..geometry.cores as usize {
                    store::format_region(&file, &geometry.region(core), path)?;
                }
                let mut page = AlignedBuf::zeroed(PAGE_SIZE * SUPERBLOCK_COPIES as usize);
                let encoded = sb.encode();
                for copy in 0..SUPERBLOCK_COPIES as usize {
                    page[copy * PAGE_SIZE..(copy + 1) * PAGE_SIZE].copy_from_slice(&encoded);
                }
                file.sync_all().map_err(io_err("fsync", path))?;
                file.write_all_at(&page, 0)
                    .map_err(io_err("write superblock of", path))?;
                file.sync_all().map_err(io_err("fsync", path))?;
                sb
            }
        };
        let geometry = superblock.geometry;
        if geometry.total_pages * PAGE_SIZE as u64 > size {
            return Err(EngineError::TooSmall {
                path: path.to_owned(),
                size,
                min: geometry.total_pages * PAGE_SIZE as u64,
            });
        }
        let mut mailboxes = Vec::new();
        let mut receivers = Vec::new();
        for core in 0..geometry.cores as usize {
            let (m, r) =
                mailbox::Mailbox::new().map_err(|source| EngineError::Ring { core, source })?;
            mailboxes.push(m);
            receivers.push(r);
        }
        let shared = Arc::new(Shared {
            mailboxes,
            geometry,
            router: std::sync::OnceLock::new(),
            quotas: Arc::new(quota::Quotas::default()),
        });
        // Core i runs on the i-th CPU this process may use (`taskset -c 2,3 torusd` keeps the
        // reactors on CPUs 2 and 3), round robin when there are more cores than CPUs.
        let cpus = reactor::allowed_cpus();
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        for (core, receiver) in receivers.into_iter().enumerate() {
            let file = file.try_clone().map_err(io_err("dup", path))?;
            let path = path.to_owned();
            let shared = shared.clone();
            let svc = service(core);
            let ready = ready_tx.clone();
            let region = geometry.region(core);
            let cpu = cpus.get(core % cpus.len().max(1)).copied();
            let handle = std::thread::Builder::new()
                .name(format!("torus-core-{core}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        reactor::pin_to_cpu(cpu);
                    }
                    let started =
                        store::Store::open(core, &file, &path, region).and_then(|store| {
                            reactor::Reactor::new(
                                core,
                                store,
                                shared,
                                receiver,
                                svc,
                                file.as_raw_fd(),
                            )
                        });
                    match started {
                        Ok(r) => {
                            let _ = ready.send(Ok(()));
                            r.run();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                    drop(file);
                })
                .map_err(|source| EngineError::Ring { core, source })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut first_error = None;
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        let engine = Engine {
            shared,
            threads: parking_lot::Mutex::new(threads),
            superblock,
            path: path.to_owned(),
            _file: file,
        };
        if let Some(e) = first_error {
            let _ = engine.stop();
            return Err(e);
        }
        Ok(engine)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cores(&self) -> usize {
        self.shared.mailboxes.len()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.superblock.geometry.capacity_bytes()
    }

    /// Sends a message to one core.
    pub fn send(&self, core: usize, message: Message) {
        self.shared.mailboxes[core].send(message);
    }

    /// Statistics of every core (a core that does not answer within a second is skipped).
    pub fn stats(&self) -> Vec<CoreStats> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for m in &self.shared.mailboxes {
            m.send(Message::Stats(tx.clone()));
        }
        let mut out: Vec<CoreStats> = (0..self.cores())
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(1)).ok())
            .collect();
        out.sort_by_key(|s| s.core);
        out
    }

    /// Per volume, the blocks no other volume (snapshot, clone) shares, over every core: the
    /// space deleting it would free. Walks every core's map.
    pub fn exclusive_blocks(&self) -> std::collections::HashMap<u32, u64> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for m in &self.shared.mailboxes {
            m.send(Message::ExclusiveBlocks(tx.clone()));
        }
        let mut out = std::collections::HashMap::new();
        for _ in 0..self.cores() {
            let Ok(per_core) = rx.recv_timeout(Duration::from_secs(10)) else {
                break;
            };
            for (volume, blocks) in per_core {
                *out.entry(volume).or_insert(0) += blocks;
            }
        }
        out
    }

    /// Sends one message to every core and waits for every answer; the first error wins.
    /// A core that is gone (shutting down) counts as `ShuttingDown`.
    fn broadcast(&self, message: impl Fn(ReplyTo) -> Message) -> Result<(), BlockError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for m in &self.shared.mailboxes {
            m.send(message(ReplyTo::Channel {
                sender: tx.clone(),
                token: 0,
            }));
        }
        drop(tx);
        let mut result = Ok(());
        for _ in 0..self.cores() {
            match rx.recv() {
                Ok(c) => {
                    if let Err(e) = c.output {
                        result = result.and(Err(e));
                    }
                }
                Err(_) => return result.and(Err(BlockError::ShuttingDown)),
            }
        }
        result
    }

    /// Removes every block of a volume on every core; returns once that is durable.
    pub fn drop_volume(&self, volume: u32) -> Result<(), BlockError> {
        self.broadcast(|reply| Message::DropVolume(volume, reply))
    }

    /// Maps every block `from` holds now in `to` as well, on every core, sharing the slots
    /// (`to` is emptied first): a snapshot, a clone, or a restore. Both must be of one
    /// family (`layout::family`), so that their blocks live on the same cores. Returns once
    /// durable.
    pub fn clone_volume(&self, from: u32, to: u32) -> Result<(), BlockError> {
        assert_eq!(
            layout::family(from),
            layout::family(to),
            "clone across families"
        );
        self.broadcast(|reply| Message::CloneVolume { from, to, reply })
    }

    /// Limits how many bytes `volume` may map on this node (None: no limit). Writes that would
    /// map more are answered `NoSpace`. Returns once every core counts the volume.
    pub fn set_quota(&self, volume: u32, bytes: Option<u64>) -> Result<(), BlockError> {
        let Some(bytes) = bytes else {
            self.shared.quotas.remove(volume);
            return Ok(());
        };
        let blocks = bytes / BLOCK_SIZE as u64;
        if self.shared.quotas.set(volume, blocks, self.cores()) {
            self.broadcast(|reply| Message::CountQuota(volume, reply))?;
        }
        Ok(())
    }

    /// Blocks counted against `volume`'s quota on this node, with its limit.
    pub fn quota_usage(&self, volume: u32) -> Option<(u64, u64)> {
        let q = self.shared.quotas.get(volume)?;
        Some((
            q.used.load(std::sync::atomic::Ordering::Acquire) * BLOCK_SIZE as u64,
            q.limit.load(std::sync::atomic::Ordering::Acquire) * BLOCK_SIZE as u64,
        ))
    }

    /// Runs one piece from outside the cores and waits for its answer (tools and tests).
    pub fn run_piece(&self, piece: Piece) -> Result<Output, BlockError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let core = self.shared.core_for(piece.volume, piece.offset);
        self.send(
            core,
            Message::Piece(
                piece,
                ReplyTo::Channel {
                    sender: tx,
                    token: 0,
                },
            ),
        );
        rx.recv().map_err(|_| BlockError::ShuttingDown)?.output
    }

    /// Flushes every core and waits.
    pub fn flush(&self) -> Result<(), BlockError> {
        self.broadcast(|reply| {
            Message::Piece(
                Piece {
                    volume: 0,
                    offset: 0,
                    len: 0,
                    kind: PieceKind::Flush,
                },
                reply,
            )
        })
    }

    /// Finishes in-flight work, closes connections, writes a checkpoint on every core and stops
    /// the reactors. Returns the first checkpoint error.
    pub fn stop(&self) -> Result<(), BlockError> {
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return Ok(());
        }
        // Phase 1: every core closes its connections once their requests are answered. Only
        // when all are drained can no piece reach a core after its final checkpoint.
        let drained = self.broadcast(Message::Drain);
        // Phase 2: checkpoint and stop.
        let result = self.broadcast(Message::Shutdown);
        for t in threads {
            let _ = t.join();
        }
        drained.and(result)
    }
}

fn device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}
