//! One core's shard of the block store: the block map, the slot allocator, the journal and the
//! checkpoint of one region, driven by io_uring completions on that core only.
//!
//! Invariants:
//! - Redirect-on-write: a write goes to free slots; the map is changed only when the data
//!   write has completed, so a block reads wholly old or wholly new.
//! - A slot replaced by a newer write stays allocated until the journal commit that records the
//!   replacement is durable, and until no read in flight still targets it.
//! - A commit is `fdatasync` (the data the records point at), then journal pages (or a full
//!   checkpoint, copy A then copy B, each synced), then `fdatasync`. One commit at a time.
//!   FLUSH and FUA replies wait for the commit that follows their write. Concurrent flushes
//!   share a commit (group commit).
//! - Writes to a block are serialized by a per-block lock, so a read-modify-write of a partial
//!   block never loses a neighbour's bytes.
//! - After a failed data write, journal write or fdatasync the region is poisoned: every later
//!   write and flush answers EIO rather than acknowledging data that may be lost.
//! - Every block read is checked against the crc32c recorded when it was written; a mismatch
//!   answers EIO and is logged with the volume, block and slot. It is never served.

use crate::block_map::{BlockMap, Entry};
use crate::buffer::AlignedBuf;
use crate::checkpoint;
use crate::error::{BlockError, EngineError};
use crate::journal::{self, Record, ScanEnd, RECORDS_PER_PAGE};
use crate::layout::{Region, BLOCK_SIZE, PAGE_SIZE};
use crate::request::{Arrived, Completion, Output, PieceKind, ReplyTo};
use crate::slot_allocator::SlotAllocator;
use hdrhistogram::Histogram;
use io_uring::{opcode, squeue, types};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

std::thread_local! {
    /// Set by the simulator, which injects faults by the thousand: the store's log lines about
    /// them would drown its report.
    pub(crate) static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A line on stderr about this store (damage found, a poisoned region), unless `QUIET`.
macro_rules! log {
    ($($arg:tt)*) => {
        if !QUIET.with(|q| q.get()) {
            eprintln!($($arg)*);
        }
    };
}

/// A commit is started at once when this many records wait (about 48 journal pages).
const PENDING_RECORDS_COMMIT: usize = 8192;
/// Journal pages used since the last checkpoint beyond which a commit writes a checkpoint
/// instead: a third of the ring, so that the journal since the *previous* checkpoint (kept for
/// the case where the newest checkpoint copy is damaged) never exceeds two thirds of it.
const fn checkpoint_threshold(journal_pages: u64) -> u64 {
    journal_pages / 3
}

/// The ring file index of the backing store (registered with `register_files`).
pub(crate) const BACKING_FILE: types::Fixed = types::Fixed(0);

/// What a store-owned io_uring operation was for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreIo {
    /// Read of a run of blocks of a read task: `first` index into the piece's blocks.
    DataRead {
        task: usize,
        first: u32,
        count: u32,
    },
    /// Read of an edge block for a read-modify-write.
    EdgeRead {
        task: usize,
        index: u32,
    },
    DataWrite {
        task: usize,
        expected: u32,
    },
    /// A vectored write of several tasks' data to consecutive slots.
    BatchWrite {
        batch: usize,
    },
    Commit {
        expected: u32,
    },
    /// A step of the checkpoint written in the background (`Build`).
    Checkpoint {
        expected: u32,
    },
}

/// One operation on the backing store as the store asks for it. The reactor turns it into an
/// io_uring entry on the registered backing file; the simulator (`sim`) performs it on a
/// simulated disk. Whatever memory it points at stays valid until its completion.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DiskOp {
    /// `fixed`: the buffer lies in the registered read pool (buffer index 0).
    Read {
        offset: u64,
        ptr: *mut u8,
        len: u32,
        fixed: bool,
    },
    Write {
        offset: u64,
        ptr: *const u8,
        len: u32,
    },
    Writev {
        offset: u64,
        iovecs: *const libc::iovec,
        count: u32,
    },
    /// `fdatasync` of the backing store.
    SyncData,
}

impl DiskOp {
    /// The io_uring entry for this operation on the ring's registered backing file.
    pub(crate) fn entry(self) -> squeue::Entry {
        match self {
            DiskOp::Read {
                offset,
                ptr,
                len,
                fixed: true,
            } => opcode::ReadFixed::new(BACKING_FILE, ptr, len, 0)
                .offset(offset)
                .build(),
            DiskOp::Read {
                offset, ptr, len, ..
            } => opcode::Read::new(BACKING_FILE, ptr, len)
                .offset(offset)
                .build(),
            DiskOp::Write { offset, ptr, len } => opcode::Write::new(BACKING_FILE, ptr, len)
                .offset(offset)
                .build(),
            DiskOp::Writev {
                offset,
                iovecs,
                count,
            } => opcode::Writev::new(BACKING_FILE, iovecs, count)
                .offset(offset)
                .build(),
            DiskOp::SyncData => opcode::Fsync::new(BACKING_FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// A data write small enough to be written synchronously by an otherwise idle core.
    pub(crate) fn small_write(&self) -> bool {
        matches!(*self, DiskOp::Write { len, .. } if len <= SYNC_WRITE_MAX)
    }

    /// Runs a write with a plain system call on `fd` (the backing file), returning what its
    /// io_uring completion would have: bytes written or a negative errno.
    pub(crate) fn write_now(&self, fd: i32) -> i32 {
        loop {
            // SAFETY: the buffers are owned by the store task until its completion is handled,
            // which is after this call returns.
            let r = match *self {
                DiskOp::Write { offset, ptr, len } => unsafe {
                    libc::pwrite64(fd, ptr as *const libc::c_void, len as usize, offset as i64)
                },
                DiskOp::Writev {
                    offset,
                    iovecs,
                    count,
                } => unsafe { libc::pwritev64(fd, iovecs, count as i32, offset as i64) },
                _ => unreachable!("write_now of a non-write"),
            };
            if r >= 0 {
                return r as i32;
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return -errno;
            }
        }
    }
}

/// Largest write a core writes synchronously when it has nothing else in flight.
pub(crate) const SYNC_WRITE_MAX: u32 = 64 * 1024;

/// Submission of backing-store operations: the reactor's ring, or the simulator.
pub(crate) trait IoSubmit {
    fn submit_store(&mut self, op: DiskOp, io: StoreIo);
    /// Told of every piece the store starts (the reactor watches for requests that arrived
    /// while it was blocked in a synchronous write).
    fn piece_arrived(&mut self) {}
}

/// A data write waiting for the end of the loop iteration, when writes to consecutive slots
/// (from any tasks) are merged into one vectored write: slots are handed out in order, so a
/// burst of small random writes becomes a few large sequential ones.
struct PendingWrite {
    task: usize,
    slot: u32,
    len: u32,
    ptr: *const u8,
}

/// Writes merged into one `writev`: the iovecs must live until it completes.
struct WriteBatch {
    members: Vec<(usize, u32)>,
    iovecs: Vec<libc::iovec>,
    total: u32,
}

/// Most writes merged into one operation, and most bytes (a larger write only adds latency).
const WRITE_BATCH_MEMBERS_MAX: usize = 64;
const WRITE_BATCH_BYTES_MAX: u32 = 1 << 20;

struct Task {
    arrived: Arrived,
    first_block: u64,
    block_count: u32,
    head: usize,
    buf: Option<AlignedBuf>,
    /// For reads: the entries the read expects; for edge reads, the same.
    expected: Vec<Option<Entry>>,
    new_slots: Vec<u32>,
    crcs: Vec<u32>,
    outstanding: u32,
    failed: Option<BlockError>,
    locked: bool,
    /// Blocks reserved against the volume's quota (settled when the write completes).
    reserved: u64,
    /// Block map entries this write may add (its blocks unmapped when it was issued), counted
    /// in `entries_pending` until it completes.
    entries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    SyncData,
    WriteJournal,
    SyncJournal,
    WriteCheckpointA,
    SyncCheckpointA,
    WriteCheckpointB,
    SyncCheckpointB,
}

struct Commit {
    stage: Stage,
    waiters: Vec<ReplyTo>,
    frees: Vec<u32>,
    buf: Option<AlignedBuf>,
    journal_pages: u64,
    checkpoint: bool,
    outstanding: u32,
    failed: bool,
}

/// Chunks of the block map a background checkpoint encodes per step (at most 2048 entries,
/// some tens of µs), between the core's other work.
const BUILD_CHUNKS_PER_STEP: usize = 64;
/// A background checkpoint is written this much at a time, so that the core's data writes
/// are not queued behind tens of MiB at once.
const BUILD_WRITE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BuildStage {
    Encoding,
    /// Encoded; waits for the commit of the records it holds to be durable.
    Encoded,
    WriteA,
    SyncA,
    WriteB,
    SyncB,
}

/// A checkpoint written in the background: the block map frozen when a commit took its
/// records (`BlockMap::freeze`), encoded a step at a time between the core's other work, then
/// written (copy A, sync, copy B, sync) while journal commits go on. It covers the journal
/// up to `journal_start`, the first page after that commit's; recovery replays the pages
/// from there. Until it is durable the previous checkpoint and the journal after it still
/// are the whole picture: no page they need is overwritten (`retain_from`).
struct Build {
    seq: u64,
    journal_start: u64,
    buf: AlignedBuf,
    entries: u64,
    encoded: u64,
    crc: u32,
    stage: BuildStage,
    /// The commit that journaled the records the frozen map holds is durable.
    base_durable: bool,
    waiters: Vec<ReplyTo>,
    /// Bytes of the copy being written that are written.
    written: usize,
    /// A write or sync of it is in flight: the buffer must outlive it.
    in_flight: bool,
    /// Given up while an operation was in flight: dropped when it completes.
    abandoned: bool,
}

#[derive(Default)]
pub struct StoreCounters {
    pub reads: u64,
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub commits: u64,
    pub checkpoints: u64,
    /// Of `checkpoints`, those written in the background while commits went on.
    pub checkpoints_background: u64,
    pub checksum_errors: u64,
    pub io_errors: u64,
    pub write_ops: u64,
}

pub(crate) struct Store {
    core: usize,
    path: PathBuf,
    region: Region,
    map: BlockMap,
    alloc: SlotAllocator,
    locks: HashMap<(u32, u64), VecDeque<usize>>,
    tasks: Slab<Task>,
    pending_writes: Vec<PendingWrite>,
    batches: Slab<WriteBatch>,
    /// Registered read buffers, when the ring accepted them.
    pub(crate) read_pool: Option<std::sync::Arc<crate::buffer_pool::BufferPool>>,
    pub(crate) quotas: std::sync::Arc<crate::quota::Quotas>,
    pending_records: Vec<Record>,
    pending_frees: Vec<u32>,
    readers: HashMap<u32, u32>,
    /// References to drop from slots still being read, by slot (a shared slot can lose
    /// several at once).
    deferred_frees: HashMap<u32, u32>,
    flush_waiters: Vec<ReplyTo>,
    space_waiters: VecDeque<usize>,
    commit: Option<Commit>,
    build: Option<Build>,
    force_checkpoint: bool,
    /// Answered when the checkpoint asked for (`checkpoint_now`) is durable.
    checkpoint_waiters: Vec<ReplyTo>,
    journal_next_seq: u64,
    checkpoint_seq: u64,
    checkpoint_journal_start: u64,
    retain_from: u64,
    poisoned: bool,
    /// Most block map entries a checkpoint of this region can hold. Snapshots and clones share
    /// slots, so the map can hold more entries than there are slots; a write of new blocks or
    /// a clone that would pass this answers ENOSPC instead of writing a checkpoint that
    /// overflows its pages.
    entries_max: u64,
    /// Entries that writes in flight may still add.
    entries_pending: u64,
    /// Test-only fault (`TORUS_TESTING_ACK_FLUSH_EARLY=1` in `torusd-testing`, or the
    /// simulator's canary): answer FLUSH before committing, so the durability test's canary
    /// can prove that it detects lost writes. Always false without the `testing` feature.
    ack_flush_early: bool,
    pub timer_armed: bool,
    pub out: Vec<(ReplyTo, Completion)>,
    pub counters: StoreCounters,
    pub latency_read_us: Histogram<u64>,
    pub latency_write_us: Histogram<u64>,
}

/// Whether a write (`expected` bytes) or a sync (`expected` 0) completed in full.
fn completed(expected: u32, result: i32) -> bool {
    if expected == 0 {
        result == 0
    } else {
        result == expected as i32
    }
}

fn pread_aligned(
    file: &File,
    offset: u64,
    len: usize,
    path: &Path,
) -> Result<AlignedBuf, EngineError> {
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| EngineError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
    Ok(buf)
}

fn pwrite_aligned(
    file: &File,
    offset: u64,
    buf: &AlignedBuf,
    path: &Path,
) -> Result<(), EngineError> {
    file.write_all_at(buf, offset)
        .map_err(|source| EngineError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        })
}

/// Writes an empty checkpoint into both copies of a freshly formatted region.
pub(crate) fn format_region(file: &File, region: &Region, path: &Path) -> Result<(), EngineError> {
    let cp = checkpoint::encode(1, 0, &[]);
    pwrite_aligned(file, region.checkpoint_a * PAGE_SIZE as u64, &cp, path)?;
    pwrite_aligned(file, region.checkpoint_b * PAGE_SIZE as u64, &cp, path)?;
    // A zeroed first journal page, in case the file held an older store.
    let zero = AlignedBuf::zeroed(PAGE_SIZE);
    pwrite_aligned(file, region.journal_byte_offset(0), &zero, path)?;
    pwrite_aligned(file, region.journal_b_byte_offset(0), &zero, path)
}

impl Store {
    /// Recovers one region: the newest valid checkpoint copy, then the journal after it. Ends
    /// with a fresh checkpoint so that the next run starts from a clean journal.
    pub(crate) fn open(
        core: usize,
        file: &File,
        path: &Path,
        region: Region,
    ) -> Result<Store, EngineError> {
        let damaged = |what: String| EngineError::Damaged { core, what };
        let max_entries = region.checkpoint_entries_max();
        let mut candidates = Vec::new();
        for (name, start) in [("A", region.checkpoint_a), ("B", region.checkpoint_b)] {
            let header = pread_aligned(file, start * PAGE_SIZE as u64, PAGE_SIZE, path)?;
            match checkpoint::decode_header(&header, max_entries) {
                Some(h) => candidates.push((h, name, start)),
                None => log!("torus: core {core}: checkpoint copy {name} is damaged or unwritten; using the other copy"),
            }
        }
        candidates.sort_by_key(|(h, _, _)| std::cmp::Reverse(h.seq));
        let mut chosen = None;
        for (h, name, start) in candidates {
            let body_len = (h.pages() - 1) as usize * PAGE_SIZE;
            let body = if body_len == 0 {
                AlignedBuf::zeroed(0)
            } else {
                pread_aligned(file, (start + 1) * PAGE_SIZE as u64, body_len, path)?
            };
            match checkpoint::decode_body(&h, if body_len == 0 { &[] } else { &body }) {
                Some(entries) => {
                    chosen = Some((h, entries));
                    break;
                }
                None => log!("torus: core {core}: checkpoint copy {name} (seq {}) fails its checksum; trying the other copy", h.seq),
            }
        }
        let (header, entries) = chosen.ok_or_else(|| {
            damaged(
                "both checkpoint copies are damaged: the block map cannot be vouched for".into(),
            )
        })?;

        let mut map = BlockMap::default();
        for (volume, block, e) in entries {
            if e.slot as u64 >= region.slot_count {
                return Err(damaged(format!(
                    "checkpoint maps volume {volume} block {block} to slot {} past the region",
                    e.slot
                )));
            }
            map.insert(volume, block, e);
        }
        let mut repaired_from_b = 0u64;
        let (pages, end) = journal::scan(header.journal_start, region.journal_pages, |seq| {
            let read = |offset| {
                pread_aligned(file, offset, PAGE_SIZE, path)
                    .map(|b| b.to_vec())
                    .unwrap_or_else(|_| vec![0; PAGE_SIZE])
            };
            let a = read(region.journal_byte_offset(seq));
            if journal::decode_page(&a).is_some_and(|p| p.seq == seq) {
                return a;
            }
            let b = read(region.journal_b_byte_offset(seq));
            if journal::decode_page(&b).is_some_and(|p| p.seq == seq) {
                if journal::page_written(&a) {
                    repaired_from_b += 1;
                }
                return b;
            }
            a
        });
        if repaired_from_b > 0 {
            log!("torus: core {core}: {repaired_from_b} journal page(s) damaged in ring A were read from ring B");
        }
        if let ScanEnd::Damaged { bad_seq, later_seq } = end {
            return Err(damaged(format!(
                "journal page {bad_seq} is damaged although page {later_seq} of a later commit is intact: acknowledged writes cannot be vouched for"
            )));
        }
        let mut last_seq = header.journal_start;
        for page in pages {
            last_seq = page.seq + 1;
            for r in page.records {
                match r {
                    Record::Map {
                        volume,
                        block,
                        slot,
                        crc,
                    } => {
                        if slot as u64 >= region.slot_count {
                            return Err(damaged(format!(
                                "journal page {} maps to slot {slot} past the region",
                                page.seq
                            )));
                        }
                        map.insert(volume, block, Entry { slot, crc });
                    }
                    Record::Unmap { volume, block } => {
                        map.remove(volume, block);
                    }
                    Record::DropVolume { volume } => {
                        map.drop_volume(volume);
                    }
                    Record::Clone { from, to } => {
                        map.drop_volume(to);
                        map.clone_volume(from, to);
                    }
                }
            }
        }
        let mut alloc = SlotAllocator::new(region.slot_count as u32);
        let mut families: HashMap<u32, Vec<u32>> = HashMap::new();
        for v in map.volumes() {
            families
                .entry(crate::layout::family(v))
                .or_default()
                .push(v);
        }
        for (volume, block, e) in map.iter() {
            if !alloc.mark_used(e.slot) {
                // Snapshots and clones share slots with their origin (one family); a slot
                // mapped by two unrelated volumes is damage.
                if !family_shares(&map, &families, volume, block, e.slot) {
                    return Err(damaged(format!(
                        "slot {} is mapped twice (volume {volume} block {block})",
                        e.slot
                    )));
                }
                alloc.share(e.slot);
            }
        }
        if let ScanEnd::TornTail { first_bad_seq } = end {
            log!("torus: core {core}: journal ends in a torn commit at page {first_bad_seq}; dropped its unacknowledged tail");
        }
        // Start the next journal a whole lap later, so that no page left from before the crash
        // can ever be taken for a page of the new run.
        let next_seq = last_seq.max(header.journal_start) + region.journal_pages;
        let seq = header.seq + 1;
        // Every open writes this checkpoint: it is what moves the journal start a lap ahead.
        let entries: Vec<_> = map.iter().collect();
        let cp = checkpoint::encode(seq, next_seq, &entries);
        for copy in [region.checkpoint_a, region.checkpoint_b] {
            pwrite_aligned(file, copy * PAGE_SIZE as u64, &cp, path)?;
            file.sync_data().map_err(|source| EngineError::Io {
                op: "fdatasync",
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(Store {
            core,
            path: path.to_owned(),
            region,
            map,
            alloc,
            locks: HashMap::new(),
            tasks: Slab::new(),
            pending_writes: Vec::new(),
            batches: Slab::new(),
            read_pool: None,
            quotas: Default::default(),
            pending_records: Vec::new(),
            pending_frees: Vec::new(),
            readers: HashMap::new(),
            deferred_frees: HashMap::new(),
            flush_waiters: Vec::new(),
            space_waiters: VecDeque::new(),
            commit: None,
            build: None,
            force_checkpoint: false,
            checkpoint_waiters: Vec::new(),
            journal_next_seq: next_seq,
            checkpoint_seq: seq,
            checkpoint_journal_start: next_seq,
            retain_from: next_seq,
            poisoned: false,
            entries_max: region.checkpoint_entries_max(),
            entries_pending: 0,
            #[cfg(feature = "testing")]
            ack_flush_early: std::env::var_os("TORUS_TESTING_ACK_FLUSH_EARLY").is_some(),
            #[cfg(not(feature = "testing"))]
            ack_flush_early: false,
            timer_armed: false,
            out: Vec::new(),
            counters: StoreCounters::default(),
            latency_read_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("histogram bounds"),
            latency_write_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("histogram bounds"),
        })
    }

    pub fn slots_free(&self) -> u64 {
        self.alloc.free_count() as u64
    }
    pub fn slots_total(&self) -> u64 {
        self.alloc.slot_count() as u64
    }
    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    /// Mapped blocks in the flagged placement groups as (volume, block, crc32c), sorted.
    pub fn list_blocks(&self, pgs: &[bool], pg_count: u32) -> Vec<(u32, u64, u32)> {
        let mut out: Vec<(u32, u64, u32)> = self
            .map
            .iter()
            .filter(|(volume, block, _)| {
                let pg = crate::layout::placement_group(
                    *volume,
                    block * BLOCK_SIZE as u64 / crate::layout::CHUNK_SIZE,
                    pg_count,
                );
                pgs.get(pg as usize).copied().unwrap_or(false)
            })
            .map(|(volume, block, e)| (volume, block, e.crc))
            .collect();
        out.sort_unstable();
        out
    }
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }
    pub fn idle(&self) -> bool {
        self.tasks.is_empty()
            && self.commit.is_none()
            && self.build.is_none()
            && self.flush_waiters.is_empty()
    }
    /// A background checkpoint has encoding left to do (`checkpoint_step`).
    pub fn wants_step(&self) -> bool {
        self.build
            .as_ref()
            .is_some_and(|b| b.stage == BuildStage::Encoding && !b.abandoned)
    }
    pub fn has_pending_records(&self) -> bool {
        !self.pending_records.is_empty() || !self.pending_frees.is_empty()
    }
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }
    pub fn commit_running(&self) -> bool {
        self.commit.is_some()
    }

    /// Test-only fault (the simulator's canary): answer FLUSH before committing.
    #[cfg(feature = "testing")]
    pub(crate) fn set_ack_flush_early(&mut self, on: bool) {
        self.ack_flush_early = on;
    }

    fn reply(&mut self, reply: ReplyTo, output: Result<Output, BlockError>) {
        let token = reply.token();
        self.out.push((reply, Completion { token, output }));
    }

    /// Entry point for a piece that arrived at this core.
    pub(crate) fn start(&mut self, io: &mut impl IoSubmit, arrived: Arrived) {
        io.piece_arrived();
        let piece = &arrived.piece;
        let first_block = piece.offset / BLOCK_SIZE as u64;
        let end = piece.offset + piece.len as u64;
        let block_count = if piece.len == 0 {
            0
        } else {
            (end.div_ceil(BLOCK_SIZE as u64) - first_block) as u32
        };
        let head = (piece.offset % BLOCK_SIZE as u64) as usize;
        match piece.kind {
            PieceKind::Flush => {
                self.counters.flushes += 1;
                if self.poisoned {
                    self.reply(arrived.reply, Err(BlockError::Io));
                    return;
                }
                if self.ack_flush_early {
                    #[cfg(feature = "testing")]
                    log!("torus: core {}: TORUS_TESTING_ACK_FLUSH_EARLY is set: this FLUSH is acknowledged before it is durable", self.core);
                    self.reply(arrived.reply, Ok(Output::Done));
                    return;
                }
                self.flush_waiters.push(arrived.reply);
                self.kick_commit(io);
                return;
            }
            PieceKind::Status => {
                let mapped = (0..block_count)
                    .map(|i| self.map.get(piece.volume, first_block + i as u64).is_some())
                    .collect();
                self.reply(arrived.reply, Ok(Output::Status { mapped }));
                return;
            }
            _ => {}
        }
        let task = Task {
            arrived,
            first_block,
            block_count,
            head,
            buf: None,
            expected: Vec::new(),
            new_slots: Vec::new(),
            crcs: Vec::new(),
            outstanding: 0,
            failed: None,
            locked: false,
            reserved: 0,
            entries: 0,
        };
        let tid = self.tasks.insert(task);
        if matches!(self.tasks[tid].arrived.piece.kind, PieceKind::Read) {
            self.start_read(io, tid);
        } else {
            self.start_write(io, tid);
        }
    }

    fn start_read(&mut self, io: &mut impl IoSubmit, tid: usize) {
        let t = &mut self.tasks[tid];
        let volume = t.arrived.piece.volume;
        let expected: Vec<Option<Entry>> = (0..t.block_count)
            .map(|i| self.map.get(volume, t.first_block + i as u64))
            .collect();
        let len = t.block_count as usize * BLOCK_SIZE;
        let mut buf = match self
            .read_pool
            .as_ref()
            .and_then(|p| AlignedBuf::from_pool(p, len))
        {
            Some(mut b) => {
                // A pool buffer holds an earlier read: zero what no disk read will overwrite.
                for (i, e) in expected.iter().enumerate() {
                    if e.is_none() {
                        b[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0);
                    }
                }
                b
            }
            None => AlignedBuf::zeroed(len),
        };
        let fixed = buf.is_registered();
        let mut i = 0u32;
        let mut ops = 0;
        while i < t.block_count {
            let Some(e) = expected[i as usize] else {
                i += 1;
                continue;
            };
            let mut count = 1u32;
            while i + count < t.block_count
                && expected[(i + count) as usize].map(|n| n.slot) == Some(e.slot + count)
            {
                count += 1;
            }
            for k in 0..count {
                *self.readers.entry(e.slot + k).or_insert(0) += 1;
            }
            // SAFETY: the buffer lives in the task until every operation on it has completed.
            let ptr = unsafe { buf.as_mut_ptr().add(i as usize * BLOCK_SIZE) };
            let offset = self.region.slot_byte_offset(e.slot);
            let entry = DiskOp::Read {
                offset,
                ptr,
                len: count * BLOCK_SIZE as u32,
                fixed,
            };
            io.submit_store(
                entry,
                StoreIo::DataRead {
                    task: tid,
                    first: i,
                    count,
                },
            );
            ops += 1;
            i += count;
        }
        t.expected = expected;
        t.buf = Some(buf);
        t.outstanding = ops;
        if ops == 0 {
            self.finish_read(tid);
        }
    }

    fn finish_read(&mut self, tid: usize) {
        let t = self.tasks.remove(tid);
        self.counters.reads += 1;
        self.counters.bytes_read += t.arrived.piece.len as u64;
        let _ = self
            .latency_read_us
            .record(t.arrived.at.elapsed().as_micros().max(1) as u64);
        let output = match t.failed {
            Some(e) => Err(e),
            None => Ok(Output::Read {
                data: t.buf.expect("read buffer"),
                head: t.head,
            }),
        };
        self.reply(t.arrived.reply, output);
    }

    fn read_done(&mut self, tid: usize, first: u32, count: u32, result: i32) {
        let t = &mut self.tasks[tid];
        let volume = t.arrived.piece.volume;
        let buf = t.buf.as_ref().expect("read buffer");
        for k in first..first + count {
            let e = t.expected[k as usize].expect("read only mapped blocks");
            let n = self.readers.get_mut(&e.slot).expect("reader counted");
            *n -= 1;
            if *n == 0 {
                self.readers.remove(&e.slot);
                for _ in 0..self.deferred_frees.remove(&e.slot).unwrap_or(0) {
                    self.alloc.release(e.slot);
                }
            }
            if result != (count as usize * BLOCK_SIZE) as i32 {
                continue;
            }
            let data = &buf[k as usize * BLOCK_SIZE..(k as usize + 1) * BLOCK_SIZE];
            let crc = crc32c::crc32c(data);
            if crc != e.crc {
                self.counters.checksum_errors += 1;
                log!(
                    "torus: core {}: volume {volume} block {}: checksum mismatch in slot {} of {} (stored {:08x}, read {:08x}); answering EIO",
                    self.core,
                    t.first_block + k as u64,
                    e.slot,
                    self.path.display(),
                    e.crc,
                    crc
                );
                t.failed = Some(BlockError::Io);
            }
        }
        if result != (count as usize * BLOCK_SIZE) as i32 {
            self.counters.io_errors += 1;
            log!(
                "torus: core {}: read of {count} blocks of volume {volume} failed: {}",
                self.core,
                describe_result(result)
            );
            t.failed = Some(BlockError::Io);
        }
        t.outstanding -= 1;
        if t.outstanding == 0 {
            self.finish_read(tid);
        }
    }

    /// Takes the per-block locks of a write task, or queues it behind the first holder.
    fn lock(&mut self, tid: usize) -> bool {
        let t = &self.tasks[tid];
        let volume = t.arrived.piece.volume;
        for i in 0..t.block_count {
            if let Some(q) = self.locks.get_mut(&(volume, t.first_block + i as u64)) {
                q.push_back(tid);
                return false;
            }
        }
        for i in 0..t.block_count {
            self.locks
                .insert((volume, t.first_block + i as u64), VecDeque::new());
        }
        self.tasks[tid].locked = true;
        true
    }

    fn unlock(&mut self, io: &mut impl IoSubmit, tid: usize) {
        let t = &mut self.tasks[tid];
        if !t.locked {
            return;
        }
        t.locked = false;
        let volume = t.arrived.piece.volume;
        let mut woken = Vec::new();
        for i in 0..t.block_count {
            if let Some(q) = self.locks.remove(&(volume, t.first_block + i as u64)) {
                woken.extend(q);
            }
        }
        for w in woken {
            if self.tasks.contains(w) && !self.tasks[w].locked {
                self.start_write(io, w);
            }
        }
    }

    /// The volume's quota, when it has one this core counts.
    fn quota(&self, volume: u32) -> Option<std::sync::Arc<crate::quota::Quota>> {
        self.quotas.get(volume).filter(|q| q.counting(self.core))
    }

    /// Reserves, against the volume's quota, the blocks a write will newly map. The blocks are
    /// locked, so which of them are new cannot change before it completes; a write waiting
    /// for space keeps its reservation. False: that would pass the quota.
    fn reserve_quota(&mut self, tid: usize) -> bool {
        let t = &self.tasks[tid];
        if t.reserved > 0 {
            return true;
        }
        let (volume, first, count) = (t.arrived.piece.volume, t.first_block, t.block_count);
        let Some(q) = self.quota(volume) else {
            return true;
        };
        let new = (0..count as u64)
            .filter(|i| self.map.get(volume, first + i).is_none())
            .count() as u64;
        if new == 0 {
            return true;
        }
        if !q.reserve(new) {
            return false;
        }
        self.tasks[tid].reserved = new;
        true
    }

    fn fail_task(&mut self, io: &mut impl IoSubmit, tid: usize, e: BlockError) {
        self.unlock(io, tid);
        let t = self.tasks.remove(tid);
        if t.reserved > 0 {
            if let Some(q) = self.quota(t.arrived.piece.volume) {
                q.sub(t.reserved);
            }
        }
        self.reply(t.arrived.reply, Err(e));
    }

    fn start_write(&mut self, io: &mut impl IoSubmit, tid: usize) {
        if self.poisoned {
            self.fail_task(io, tid, BlockError::Io);
            return;
        }
        if !self.tasks[tid].locked && !self.lock(tid) {
            return;
        }
        let t = &mut self.tasks[tid];
        let piece = &t.arrived.piece;
        let volume = piece.volume;
        let tail = (piece.offset + piece.len as u64) % BLOCK_SIZE as u64;
        let partial = t.head != 0 || tail != 0;
        if let (PieceKind::Zero { .. }, false) = (&piece.kind, partial) {
            self.zero_blocks(io, tid);
            return;
        }
        if !self.reserve_quota(tid) {
            self.fail_task(io, tid, BlockError::NoSpace);
            return;
        }
        let t = &mut self.tasks[tid];
        let piece = &t.arrived.piece;
        let aligned_source = match &piece.kind {
            PieceKind::Write { data_offset, .. } => !partial && data_offset % PAGE_SIZE == 0,
            _ => false,
        };
        if aligned_source {
            self.issue_writes(io, tid);
            return;
        }
        let mut buf = AlignedBuf::zeroed(t.block_count as usize * BLOCK_SIZE);
        let mut edges = vec![];
        if t.head != 0 {
            edges.push(0);
        }
        if tail != 0 && (t.block_count > 1 || t.head == 0) {
            edges.push(t.block_count - 1);
        }
        t.expected = vec![None; t.block_count as usize];
        let mut ops = 0;
        for index in edges {
            if let Some(e) = self.map.get(volume, t.first_block + index as u64) {
                t.expected[index as usize] = Some(e);
                // SAFETY: the buffer lives in the task until the read completes.
                let ptr = unsafe { buf.as_mut_ptr().add(index as usize * BLOCK_SIZE) };
                let entry = DiskOp::Read {
                    offset: self.region.slot_byte_offset(e.slot),
                    ptr,
                    len: BLOCK_SIZE as u32,
                    fixed: false,
                };
                io.submit_store(entry, StoreIo::EdgeRead { task: tid, index });
                ops += 1;
            }
        }
        t.buf = Some(buf);
        t.outstanding = ops;
        if ops == 0 {
            self.merge_and_write(io, tid);
        }
    }

    fn edge_read_done(&mut self, io: &mut impl IoSubmit, tid: usize, index: u32, result: i32) {
        let t = &mut self.tasks[tid];
        let e = t.expected[index as usize].expect("edge read of a mapped block");
        if result != BLOCK_SIZE as i32 {
            self.counters.io_errors += 1;
            t.failed = Some(BlockError::Io);
        } else {
            let buf = t.buf.as_ref().expect("merge buffer");
            let data = &buf[index as usize * BLOCK_SIZE..(index as usize + 1) * BLOCK_SIZE];
            if crc32c::crc32c(data) != e.crc {
                self.counters.checksum_errors += 1;
                log!(
                    "torus: core {}: volume {} block {}: checksum mismatch in slot {} during read-modify-write; answering EIO",
                    self.core,
                    t.arrived.piece.volume,
                    t.first_block + index as u64,
                    e.slot
                );
                t.failed = Some(BlockError::Io);
            }
        }
        t.outstanding -= 1;
        if t.outstanding == 0 {
            if let Some(e) = t.failed {
                self.fail_task(io, tid, e);
            } else {
                self.merge_and_write(io, tid);
            }
        }
    }

    fn merge_and_write(&mut self, io: &mut impl IoSubmit, tid: usize) {
        let t = &mut self.tasks[tid];
        let len = t.arrived.piece.len as usize;
        let head = t.head;
        let buf = t.buf.as_mut().expect("merge buffer");
        match &t.arrived.piece.kind {
            PieceKind::Write {
                data, data_offset, ..
            } => buf[head..head + len].copy_from_slice(&data[*data_offset..*data_offset + len]),
            PieceKind::Zero { .. } => buf[head..head + len].fill(0),
            _ => unreachable!("only writes are merged"),
        }
        self.issue_writes(io, tid);
    }

    fn issue_writes(&mut self, io: &mut impl IoSubmit, tid: usize) {
        if self.poisoned {
            // No commit will free space, nor vouch for the data.
            return self.fail_task(io, tid, BlockError::Io);
        }
        let count = self.tasks[tid].block_count as usize;
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            match self.alloc.allocate() {
                Some(s) => slots.push(s),
                None => break,
            }
        }
        if slots.len() < count {
            for s in slots {
                self.alloc.release(s);
            }
            let space_coming = !self.pending_frees.is_empty()
                || self.commit.as_ref().is_some_and(|c| !c.frees.is_empty())
                || !self.deferred_frees.is_empty();
            if space_coming {
                self.space_waiters.push_back(tid);
                self.kick_commit(io);
            } else {
                self.fail_task(io, tid, BlockError::NoSpace);
            }
            return;
        }
        let t = &self.tasks[tid];
        let volume = t.arrived.piece.volume;
        let new_entries = (0..count as u64)
            .filter(|i| self.map.get(volume, t.first_block + i).is_none())
            .count() as u64;
        if self.map.mapped_blocks() + self.entries_pending + new_entries > self.entries_max {
            for s in slots {
                self.alloc.release(s);
            }
            log!("torus: core {}: the block map is full ({} entries: snapshots share slots, and a checkpoint holds no more); answering ENOSPC", self.core, self.entries_max);
            self.fail_task(io, tid, BlockError::NoSpace);
            return;
        }
        self.entries_pending += new_entries;
        let t = &mut self.tasks[tid];
        t.entries = new_entries;
        let source: *const u8 = match (&t.buf, &t.arrived.piece.kind) {
            (Some(b), _) => b.as_ptr(),
            // SAFETY: data_offset + len is inside the buffer (checked by the frontend), and the
            // Arc in the task keeps it alive until the write completes.
            (
                None,
                PieceKind::Write {
                    data, data_offset, ..
                },
            ) => unsafe { data.as_ptr().add(*data_offset) },
            _ => unreachable!("write without a source"),
        };
        // SAFETY: source is valid for count blocks, as above.
        let bytes = unsafe { std::slice::from_raw_parts(source, count * BLOCK_SIZE) };
        t.crcs = bytes.chunks_exact(BLOCK_SIZE).map(crc32c::crc32c).collect();
        let mut i = 0;
        let mut ops = 0;
        while i < count {
            let mut run = 1;
            while i + run < count && slots[i + run] == slots[i] + run as u32 {
                run += 1;
            }
            let len = (run * BLOCK_SIZE) as u32;
            // SAFETY: as above; the pointer stays valid until completion.
            let ptr = unsafe { source.add(i * BLOCK_SIZE) };
            self.pending_writes.push(PendingWrite {
                task: tid,
                slot: slots[i],
                len,
                ptr,
            });
            ops += 1;
            i += run;
        }
        t.new_slots = slots;
        t.outstanding = ops;
    }

    fn write_done(&mut self, io: &mut impl IoSubmit, tid: usize, expected: u32, result: i32) {
        let t = &mut self.tasks[tid];
        if result != expected as i32 {
            log!(
                "torus: core {}: data write to {} failed: {}; region poisoned, refusing further writes",
                self.core,
                self.path.display(),
                describe_result(result)
            );
            self.counters.io_errors += 1;
            self.poisoned = true;
            t.failed = Some(BlockError::Io);
        }
        t.outstanding -= 1;
        if t.outstanding > 0 {
            return;
        }
        self.entries_pending -= std::mem::take(&mut t.entries);
        let t = &mut self.tasks[tid];
        if let Some(e) = t.failed {
            // The new slots stay allocated: the region is poisoned and their contents unknown.
            self.fail_task(io, tid, e);
            return;
        }
        let volume = t.arrived.piece.volume;
        let mut mapped_new = 0u64;
        for (i, (&slot, &crc)) in t.new_slots.iter().zip(&t.crcs).enumerate() {
            let block = t.first_block + i as u64;
            match self.map.insert(volume, block, Entry { slot, crc }) {
                Some(old) => self.pending_frees.push(old.slot),
                None => mapped_new += 1,
            }
            self.pending_records.push(Record::Map {
                volume,
                block,
                slot,
                crc,
            });
        }
        let reserved = std::mem::take(&mut t.reserved);
        if reserved != mapped_new {
            if let Some(q) = self.quota(volume) {
                q.add(mapped_new);
                q.sub(reserved);
            }
        }
        let t = &mut self.tasks[tid];
        self.counters.writes += 1;
        self.counters.bytes_written += t.arrived.piece.len as u64;
        let _ = self
            .latency_write_us
            .record(t.arrived.at.elapsed().as_micros().max(1) as u64);
        self.complete_write(io, tid);
    }

    fn zero_blocks(&mut self, io: &mut impl IoSubmit, tid: usize) {
        let t = &self.tasks[tid];
        let volume = t.arrived.piece.volume;
        let mut unmapped = 0;
        for i in 0..t.block_count {
            let block = t.first_block + i as u64;
            if let Some(old) = self.map.remove(volume, block) {
                self.pending_frees.push(old.slot);
                self.pending_records.push(Record::Unmap { volume, block });
                unmapped += 1;
            }
        }
        if let Some(q) = self.quota(volume) {
            q.sub(unmapped);
        }
        self.counters.zeroes += 1;
        self.complete_write(io, tid);
    }

    fn complete_write(&mut self, io: &mut impl IoSubmit, tid: usize) {
        self.unlock(io, tid);
        let t = self.tasks.remove(tid);
        let fua = matches!(
            t.arrived.piece.kind,
            PieceKind::Write { fua: true, .. } | PieceKind::Zero { fua: true }
        );
        if fua {
            self.flush_waiters.push(t.arrived.reply);
            self.kick_commit(io);
        } else {
            self.reply(t.arrived.reply, Ok(Output::Done));
        }
        if self.pending_records.len() >= PENDING_RECORDS_COMMIT {
            self.kick_commit(io);
        }
    }

    /// Removes every block of a volume. The answer goes out once the removal is durable.
    pub(crate) fn drop_volume(&mut self, io: &mut impl IoSubmit, volume: u32, reply: ReplyTo) {
        let slots = self.map.drop_volume(volume);
        if let Some(q) = self.quota(volume) {
            q.sub(slots.len() as u64);
        }
        self.pending_frees.extend(slots);
        self.pending_records.push(Record::DropVolume { volume });
        self.flush_waiters.push(reply);
        self.kick_commit(io);
    }

    /// Maps every block of `from` in `to` too (a snapshot or a clone; `to` is emptied first, so
    /// a restore is the same operation). The answer goes out once it is durable.
    pub(crate) fn clone_volume(
        &mut self,
        io: &mut impl IoSubmit,
        from: u32,
        to: u32,
        reply: ReplyTo,
    ) {
        let after = self.map.mapped_blocks() - self.map.mapped_blocks_of(to)
            + self.map.mapped_blocks_of(from)
            + self.entries_pending;
        if after > self.entries_max {
            log!("torus: core {}: a clone of volume {from} would need {after} block map entries, more than a checkpoint holds ({}); answering ENOSPC", self.core, self.entries_max);
            self.reply(reply, Err(BlockError::NoSpace));
            return;
        }
        let dropped = self.map.drop_volume(to);
        let shared = self.map.clone_volume(from, to);
        if let Some(q) = self.quota(to) {
            q.sub(dropped.len() as u64);
            q.add(shared.len() as u64);
        }
        self.pending_frees.extend(dropped);
        for slot in shared {
            self.alloc.share(slot);
        }
        self.pending_records.push(Record::Clone { from, to });
        self.flush_waiters.push(reply);
        self.kick_commit(io);
    }

    /// Blocks of each volume whose slot no other volume maps: the space deleting it frees.
    pub fn exclusive_blocks(&self) -> Vec<(u32, u64)> {
        let mut out: std::collections::BTreeMap<u32, u64> = Default::default();
        for (volume, _, e) in self.map.iter() {
            if self.alloc.references(e.slot) == 1 {
                *out.entry(volume).or_insert(0) += 1;
            }
        }
        out.into_iter().collect()
    }

    /// Asks for a checkpoint at the next commit (used at shutdown) and starts it.
    pub(crate) fn checkpoint_now(&mut self, io: &mut impl IoSubmit, reply: ReplyTo) {
        self.force_checkpoint = true;
        self.checkpoint_waiters.push(reply);
        self.kick_commit(io);
    }

    /// Starts a commit when one is due and none is running.
    pub(crate) fn kick_commit(&mut self, io: &mut impl IoSubmit) {
        if self.commit.is_some() {
            return;
        }
        if self.flush_waiters.is_empty()
            && self.pending_records.is_empty()
            && self.pending_frees.is_empty()
            && !self.force_checkpoint
        {
            return;
        }
        if self.poisoned {
            let waiters = std::mem::take(&mut self.flush_waiters);
            let asked = std::mem::take(&mut self.checkpoint_waiters);
            for w in waiters.into_iter().chain(asked) {
                self.reply(w, Err(BlockError::Io));
            }
            self.force_checkpoint = false;
            // Writes waiting for space a commit would have freed.
            let waiting: Vec<usize> = self.space_waiters.drain(..).collect();
            for tid in waiting {
                self.fail_task(io, tid, BlockError::Io);
            }
            return;
        }
        let ring = self.region.journal_pages;
        let pages = self.pending_records.len().div_ceil(RECORDS_PER_PAGE) as u64;
        let used = self.journal_next_seq - self.checkpoint_journal_start;
        let due = self.force_checkpoint || used + pages > checkpoint_threshold(ring);
        let fits = self.journal_next_seq + pages <= self.retain_from + ring;
        if self.build.is_some() && !fits {
            // The checkpoint under way frees journal pages when it is durable (`finish_build`
            // starts this commit then).
            return;
        }
        // Due and free to start: in the background when the records fit in the journal;
        // otherwise (the journal too full to take them) the records go into a checkpoint
        // written before anything else commits.
        let background = due && self.build.is_none() && fits;
        let checkpoint = due && self.build.is_none() && !fits;
        let mut waiters = std::mem::take(&mut self.flush_waiters);
        if checkpoint {
            waiters.append(&mut self.checkpoint_waiters);
            self.force_checkpoint = false;
        }
        let records = std::mem::take(&mut self.pending_records);
        let frees = std::mem::take(&mut self.pending_frees);
        let buf = if checkpoint {
            let entries: Vec<_> = self.map.iter().collect();
            Some(checkpoint::encode(
                self.checkpoint_seq + 1,
                self.journal_next_seq,
                &entries,
            ))
        } else if pages > 0 {
            let mut buf = AlignedBuf::zeroed(pages as usize * PAGE_SIZE);
            for (i, chunk) in records.chunks(RECORDS_PER_PAGE).enumerate() {
                let seq = self.journal_next_seq + i as u64;
                journal::encode_page(
                    &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                    seq,
                    self.journal_next_seq,
                    chunk,
                );
            }
            Some(buf)
        } else {
            None
        };
        if background {
            // The map now holds exactly what the journal will up to this commit's pages.
            let entries = self.map.freeze();
            self.force_checkpoint = false;
            self.build = Some(Build {
                seq: self.checkpoint_seq + 1,
                journal_start: self.journal_next_seq + pages,
                buf: checkpoint::buffer_for(entries),
                entries,
                encoded: 0,
                crc: 0,
                stage: BuildStage::Encoding,
                base_durable: false,
                waiters: std::mem::take(&mut self.checkpoint_waiters),
                written: 0,
                in_flight: false,
                abandoned: false,
            });
        }
        self.commit = Some(Commit {
            stage: Stage::SyncData,
            waiters,
            frees,
            buf,
            journal_pages: if checkpoint { 0 } else { pages },
            checkpoint,
            outstanding: 0,
            failed: false,
        });
        self.commit_sync(io, Stage::SyncData);
    }

    /// Encodes the next part of the background checkpoint; once all of it is encoded and the
    /// commit it follows is durable, starts writing it.
    pub(crate) fn checkpoint_step(&mut self, io: &mut impl IoSubmit) {
        let Some(b) = self.build.as_mut() else {
            return;
        };
        if b.stage != BuildStage::Encoding || b.abandoned {
            return;
        }
        if self.poisoned {
            return self.give_up_build();
        }
        let from = b.encoded;
        let mut overflow = false;
        let done = self
            .map
            .frozen_next(BUILD_CHUNKS_PER_STEP, |volume, block, e| {
                if b.encoded < b.entries {
                    checkpoint::put_entry(&mut b.buf, b.encoded, volume, block, e);
                    b.encoded += 1;
                } else {
                    overflow = true;
                }
            });
        b.crc = crc32c::crc32c_append(b.crc, checkpoint::entry_bytes(&b.buf, from, b.encoded));
        if !done {
            return;
        }
        if overflow || b.encoded != b.entries {
            log!(
                "torus: core {}: background checkpoint gave up: the frozen map handed out {} of {} entries{}",
                self.core,
                b.encoded,
                b.entries,
                if overflow { " and more" } else { "" }
            );
            // The next commit that finds one due starts another.
            return self.give_up_build_with(true);
        }
        checkpoint::put_header(&mut b.buf, b.seq, b.journal_start, b.entries, b.crc);
        b.stage = BuildStage::Encoded;
        self.start_build_write(io);
    }

    /// Writes copy A once the checkpoint is encoded and its base commit is durable.
    fn start_build_write(&mut self, io: &mut impl IoSubmit) {
        let Some(b) = self.build.as_mut() else {
            return;
        };
        if b.stage != BuildStage::Encoded || !b.base_durable || b.abandoned {
            return;
        }
        if self.poisoned {
            return self.give_up_build();
        }
        self.build_write(io, BuildStage::WriteA);
    }

    /// Writes the next part of copy A (`WriteA`) or copy B (`WriteB`).
    fn build_write(&mut self, io: &mut impl IoSubmit, stage: BuildStage) {
        let start_page = if stage == BuildStage::WriteA {
            self.region.checkpoint_a
        } else {
            self.region.checkpoint_b
        };
        let b = self.build.as_mut().expect("checkpoint under way");
        b.stage = stage;
        b.in_flight = true;
        let len = (b.buf.len() - b.written).min(BUILD_WRITE_BYTES);
        let entry = DiskOp::Write {
            offset: start_page * PAGE_SIZE as u64 + b.written as u64,
            // SAFETY: within the buffer, which the build keeps until this write completes.
            ptr: unsafe { b.buf.as_ptr().add(b.written) },
            len: len as u32,
        };
        io.submit_store(
            entry,
            StoreIo::Checkpoint {
                expected: len as u32,
            },
        );
    }

    fn build_sync(&mut self, io: &mut impl IoSubmit, stage: BuildStage) {
        let b = self.build.as_mut().expect("checkpoint under way");
        b.stage = stage;
        b.in_flight = true;
        io.submit_store(DiskOp::SyncData, StoreIo::Checkpoint { expected: 0 });
    }

    fn build_io_done(&mut self, io: &mut impl IoSubmit, expected: u32, result: i32) {
        let ok = completed(expected, result);
        // Kept until its operation completes, even when given up meanwhile.
        let b = self
            .build
            .as_mut()
            .expect("checkpoint with an operation in flight");
        b.in_flight = false;
        if b.abandoned {
            self.build = None;
            self.kick_commit(io);
            return;
        }
        let stage = b.stage;
        if !ok {
            log!(
                "torus: core {}: checkpoint step {stage:?} on {} failed: {}; region poisoned, refusing further writes",
                self.core,
                self.path.display(),
                describe_result(result)
            );
            self.counters.io_errors += 1;
            self.poisoned = true;
        }
        if self.poisoned {
            return self.give_up_build();
        }
        // The next part of the copy being written, or its sync.
        if matches!(stage, BuildStage::WriteA | BuildStage::WriteB) {
            let b = self.build.as_mut().expect("checkpoint under way");
            b.written += expected as usize;
            if b.written < b.buf.len() {
                return self.build_write(io, stage);
            }
            b.written = 0;
        }
        match stage {
            BuildStage::WriteA => self.build_sync(io, BuildStage::SyncA),
            BuildStage::SyncA => self.build_write(io, BuildStage::WriteB),
            BuildStage::WriteB => self.build_sync(io, BuildStage::SyncB),
            BuildStage::SyncB => self.finish_build(io),
            BuildStage::Encoding | BuildStage::Encoded => {
                unreachable!("no checkpoint I/O while encoding")
            }
        }
    }

    fn finish_build(&mut self, io: &mut impl IoSubmit) {
        let b = self.build.take().expect("checkpoint under way");
        self.counters.checkpoints += 1;
        self.counters.checkpoints_background += 1;
        self.checkpoint_seq = b.seq;
        self.retain_from = self.checkpoint_journal_start;
        self.checkpoint_journal_start = b.journal_start;
        for w in b.waiters {
            self.reply(w, Ok(Output::Done));
        }
        // A commit may have waited for the journal pages this frees, or another checkpoint
        // have been asked for.
        self.kick_commit(io);
    }

    /// The region is poisoned: the checkpoint under way is not written; who asked for it
    /// hears EIO.
    fn give_up_build(&mut self) {
        self.give_up_build_with(false);
    }

    /// Drops the checkpoint under way; who asked for it hears EIO, or done when `ok` (the
    /// journal still holds everything).
    fn give_up_build_with(&mut self, ok: bool) {
        let Some(b) = self.build.as_mut() else {
            return;
        };
        let waiters = std::mem::take(&mut b.waiters);
        if b.in_flight {
            b.abandoned = true;
        } else {
            self.build = None;
        }
        self.map.thaw();
        for w in waiters {
            self.reply(
                w,
                if ok {
                    Ok(Output::Done)
                } else {
                    Err(BlockError::Io)
                },
            );
        }
    }

    fn commit_sync(&mut self, io: &mut impl IoSubmit, stage: Stage) {
        let c = self.commit.as_mut().expect("commit running");
        c.stage = stage;
        c.outstanding = 1;
        io.submit_store(DiskOp::SyncData, StoreIo::Commit { expected: 0 });
    }

    fn commit_write_checkpoint(&mut self, io: &mut impl IoSubmit, stage: Stage, start_page: u64) {
        let c = self.commit.as_mut().expect("commit running");
        c.stage = stage;
        c.outstanding = 1;
        let buf = c.buf.as_ref().expect("checkpoint buffer");
        let entry = DiskOp::Write {
            offset: start_page * PAGE_SIZE as u64,
            ptr: buf.as_ptr(),
            len: buf.len() as u32,
        };
        io.submit_store(
            entry,
            StoreIo::Commit {
                expected: buf.len() as u32,
            },
        );
    }

    fn commit_write_journal(&mut self, io: &mut impl IoSubmit) {
        let ring = self.region.journal_pages;
        let first = self.journal_next_seq;
        let c = self.commit.as_mut().expect("commit running");
        assert!(
            first + c.journal_pages <= self.retain_from + ring,
            "journal would overwrite pages still needed"
        );
        c.stage = Stage::WriteJournal;
        let buf = c.buf.as_ref().expect("journal pages");
        let mut done = 0u64;
        let mut ops = 0;
        while done < c.journal_pages {
            let seq = first + done;
            let until_wrap = ring - seq % ring;
            let n = until_wrap.min(c.journal_pages - done);
            let len = (n as usize * PAGE_SIZE) as u32;
            // SAFETY: the buffer is kept in the commit until its writes complete.
            let ptr = unsafe { buf.as_ptr().add(done as usize * PAGE_SIZE) };
            // The same pages go to ring A and ring B; the sync after them covers both.
            for offset in [
                self.region.journal_byte_offset(seq),
                self.region.journal_b_byte_offset(seq),
            ] {
                let entry = DiskOp::Write { offset, ptr, len };
                io.submit_store(entry, StoreIo::Commit { expected: len });
                ops += 1;
            }
            done += n;
        }
        c.outstanding = ops;
    }

    fn commit_io_done(&mut self, io: &mut impl IoSubmit, expected: u32, result: i32) {
        let c = self.commit.as_mut().expect("commit running");
        let ok = completed(expected, result);
        if !ok {
            log!(
                "torus: core {}: commit step {:?} on {} failed: {}; region poisoned, refusing further writes",
                self.core,
                c.stage,
                self.path.display(),
                describe_result(result)
            );
            self.counters.io_errors += 1;
            c.failed = true;
        }
        // Poisoned meanwhile (say a failed fdatasync of the background checkpoint, which drops
        // dirty pages as Linux does): this commit's own sync no longer vouches for its data.
        if self.poisoned {
            c.failed = true;
        }
        c.outstanding -= 1;
        if c.outstanding > 0 {
            return;
        }
        if c.failed {
            self.poisoned = true;
            self.give_up_build();
            let c = self.commit.take().expect("commit running");
            for w in c.waiters {
                self.reply(w, Err(BlockError::Io));
            }
            let waiters: Vec<usize> = self.space_waiters.drain(..).collect();
            for tid in waiters {
                self.fail_task(io, tid, BlockError::Io);
            }
            // Flushes that arrived while it ran fail too (kick_commit answers them EIO now);
            // left waiting for the next commit they would never be answered.
            self.kick_commit(io);
            return;
        }
        let (stage, checkpoint, has_buf) = (c.stage, c.checkpoint, c.buf.is_some());
        match stage {
            Stage::SyncData if checkpoint => {
                self.commit_write_checkpoint(io, Stage::WriteCheckpointA, self.region.checkpoint_a)
            }
            Stage::SyncData if has_buf => self.commit_write_journal(io),
            Stage::SyncData => self.finish_commit(io),
            Stage::WriteJournal => self.commit_sync(io, Stage::SyncJournal),
            Stage::SyncJournal => self.finish_commit(io),
            Stage::WriteCheckpointA => self.commit_sync(io, Stage::SyncCheckpointA),
            Stage::SyncCheckpointA => {
                self.commit_write_checkpoint(io, Stage::WriteCheckpointB, self.region.checkpoint_b)
            }
            Stage::WriteCheckpointB => self.commit_sync(io, Stage::SyncCheckpointB),
            Stage::SyncCheckpointB => self.finish_commit(io),
        }
    }

    fn finish_commit(&mut self, io: &mut impl IoSubmit) {
        let c = self.commit.take().expect("commit running");
        self.counters.commits += 1;
        // A background checkpoint begins with the commit that journals the records its frozen
        // map holds (commits run one at a time): the first to finish after it began is that one.
        if let Some(b) = self.build.as_mut().filter(|b| !b.base_durable) {
            b.base_durable = true;
            self.start_build_write(io);
        }
        if c.checkpoint {
            self.counters.checkpoints += 1;
            self.checkpoint_seq += 1;
            self.retain_from = self.checkpoint_journal_start;
            self.checkpoint_journal_start = self.journal_next_seq;
        } else {
            self.journal_next_seq += c.journal_pages;
        }
        for slot in c.frees {
            if self.readers.contains_key(&slot) {
                *self.deferred_frees.entry(slot).or_insert(0) += 1;
            } else {
                self.alloc.release(slot);
            }
        }
        for w in c.waiters {
            self.reply(w, Ok(Output::Done));
        }
        let waiters: Vec<usize> = self.space_waiters.drain(..).collect();
        for tid in waiters {
            self.issue_writes(io, tid);
        }
        if !self.flush_waiters.is_empty()
            || (self.force_checkpoint && self.build.is_none())
            || self.pending_records.len() >= PENDING_RECORDS_COMMIT
        {
            self.kick_commit(io);
        }
    }

    /// Submits the data writes queued in this loop iteration, merging writes to consecutive
    /// slots into one vectored write. Called by the reactor before every submit.
    pub(crate) fn flush_writes(&mut self, io: &mut impl IoSubmit) {
        if self.pending_writes.is_empty() {
            return;
        }
        let mut writes = std::mem::take(&mut self.pending_writes);
        writes.sort_unstable_by_key(|w| w.slot);
        let mut i = 0;
        while i < writes.len() {
            let mut n = 1;
            let mut bytes = writes[i].len;
            let mut next_slot = writes[i].slot + writes[i].len / BLOCK_SIZE as u32;
            while i + n < writes.len()
                && n < WRITE_BATCH_MEMBERS_MAX
                && writes[i + n].slot == next_slot
                && bytes + writes[i + n].len <= WRITE_BATCH_BYTES_MAX
            {
                bytes += writes[i + n].len;
                next_slot += writes[i + n].len / BLOCK_SIZE as u32;
                n += 1;
            }
            let offset = self.region.slot_byte_offset(writes[i].slot);
            if n == 1 {
                let w = &writes[i];
                let entry = DiskOp::Write {
                    offset,
                    ptr: w.ptr,
                    len: w.len,
                };
                io.submit_store(
                    entry,
                    StoreIo::DataWrite {
                        task: w.task,
                        expected: w.len,
                    },
                );
            } else {
                let group = &writes[i..i + n];
                let batch = WriteBatch {
                    members: group.iter().map(|w| (w.task, w.len)).collect(),
                    iovecs: group
                        .iter()
                        .map(|w| libc::iovec {
                            iov_base: w.ptr as *mut libc::c_void,
                            iov_len: w.len as usize,
                        })
                        .collect(),
                    total: bytes,
                };
                let key = self.batches.insert(batch);
                let b = &self.batches[key];
                // SAFETY: the iovecs live in `batches` and every buffer they point at lives in
                // its task, until this write completes.
                let entry = DiskOp::Writev {
                    offset,
                    iovecs: b.iovecs.as_ptr(),
                    count: b.iovecs.len() as u32,
                };
                io.submit_store(entry, StoreIo::BatchWrite { batch: key });
            }
            i += n;
            self.counters.write_ops += 1;
        }
    }

    /// Routes a completion of a store-owned operation.
    pub(crate) fn on_io(&mut self, io: &mut impl IoSubmit, what: StoreIo, result: i32) {
        match what {
            StoreIo::DataRead { task, first, count } => self.read_done(task, first, count, result),
            StoreIo::EdgeRead { task, index } => self.edge_read_done(io, task, index, result),
            StoreIo::DataWrite { task, expected } => self.write_done(io, task, expected, result),
            StoreIo::BatchWrite { batch } => {
                let b = self.batches.remove(batch);
                let ok = result == b.total as i32;
                for (task, len) in b.members {
                    let member_result = if ok {
                        len as i32
                    } else if result < 0 {
                        result
                    } else {
                        -libc::EIO
                    };
                    self.write_done(io, task, len, member_result);
                }
            }
            StoreIo::Commit { expected } => self.commit_io_done(io, expected, result),
            StoreIo::Checkpoint { expected } => self.build_io_done(io, expected, result),
        }
    }
}

/// Names an io_uring result for a log line: a negative errno or a short transfer.
pub(crate) fn describe_result(result: i32) -> String {
    if result < 0 {
        std::io::Error::from_raw_os_error(-result).to_string()
    } else {
        format!("short transfer of {result} bytes")
    }
}

/// True when `slot` is mapped, by another volume of `volume`'s family (a snapshot or clone
/// sharing it), at the same block: the only legitimate double mapping.
fn family_shares(
    map: &BlockMap,
    families: &HashMap<u32, Vec<u32>>,
    volume: u32,
    block: u64,
    slot: u32,
) -> bool {
    families
        .get(&crate::layout::family(volume))
        .into_iter()
        .flatten()
        .filter(|v| **v != volume)
        .any(|v| map.get(*v, block).is_some_and(|e| e.slot == slot))
}
