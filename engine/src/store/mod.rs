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
//!
//! This folder, one concern per file; each adds the methods of its concern to `Store`, whose
//! fields stay private to this module:
//!
//! - `mod.rs`: `Store`, its tasks and counters; the entry point of a piece (`start`) and of a
//!   completion (`on_io`), which hand each to the file of its concern.
//! - `io.rs`: the operations the store asks of its backing store (`DiskOp`), what each was for
//!   (`StoreIo`), the seam that performs them (`IoSubmit`: the reactor's ring, or the
//!   simulator), and what their results mean.
//! - `recovery.rs`: formatting a region, and opening one: the newest valid checkpoint copy,
//!   the journal replayed after it, the damage that refuses an open.
//! - `read.rs`: the read path: runs of mapped blocks read, each block checked against its
//!   crc32c.
//! - `write.rs`: the write path: per-block locks, the quota, read-modify-write of partial
//!   blocks, slots allocated for redirect-on-write, writes to consecutive slots merged into
//!   one vectored write, and the map changed once the data is written.
//! - `volumes.rs`: whole volumes: dropping, cloning (snapshots, clones, restores), and what
//!   a volume holds (`exclusive_blocks`, `list_blocks`).
//! - `commit.rs`: the group commit: data synced, then journal pages (or a full checkpoint)
//!   written and synced, slots freed and waiters answered once durable.
//! - `background_checkpoint.rs`: the checkpoint encoded a step at a time from the frozen map
//!   and written while journal commits go on.

std::thread_local! {
    /// Set by the simulator, which injects faults by the thousand: the store's log lines about
    /// them would drown its report.
    pub(crate) static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A line on stderr about this store (damage found, a poisoned region), unless `QUIET`.
macro_rules! log {
    ($($arg:tt)*) => {
        if !$crate::store::QUIET.with(|q| q.get()) {
            eprintln!($($arg)*);
        }
    };
}

mod background_checkpoint;
mod commit;
mod io;
mod read;
mod recovery;
mod volumes;
mod write;

pub(crate) use io::{DiskOp, IoSubmit, StoreIo};
pub(crate) use recovery::format_region;

use crate::block_map::{BlockMap, Entry};
use crate::buffer::AlignedBuf;
use crate::error::BlockError;
use crate::journal::Record;
use crate::layout::{Region, BLOCK_SIZE};
use crate::request::{Arrived, Completion, Output, PieceKind, ReplyTo};
use crate::slot_allocator::SlotAllocator;
use background_checkpoint::Build;
use commit::Commit;
use hdrhistogram::Histogram;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use write::{PendingWrite, WriteBatch};

/// A piece in progress on this core: a read, or a write (or write-zeroes) from its block locks
/// to its answer.
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
    /// The other half of `pending_writes`' double buffer (`flush_writes`), kept for its
    /// capacity.
    spare_writes: Vec<PendingWrite>,
    /// Emptied `new_slots` and `crcs` of finished tasks, kept for their capacity (at most
    /// `SPARE_VECS`): a write allocates none of its own.
    spare_vecs: Vec<Vec<u32>>,
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

impl Store {
    pub fn slots_free(&self) -> u64 {
        self.alloc.free_count() as u64
    }
    pub fn slots_total(&self) -> u64 {
        self.alloc.slot_count() as u64
    }
    pub fn map(&self) -> &BlockMap {
        &self.map
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

    /// Routes a completion of a store-owned operation.
    pub(crate) fn on_io(&mut self, io: &mut impl IoSubmit, what: StoreIo, result: i32) {
        match what {
            StoreIo::DataRead { task, first, count } => self.read_done(task, first, count, result),
            StoreIo::EdgeRead { task, index } => self.edge_read_done(io, task, index, result),
            StoreIo::DataWrite { task, expected } => self.write_done(io, task, expected, result),
            StoreIo::BatchWrite { batch } => self.batch_write_done(io, batch, result),
            StoreIo::Commit { expected } => self.commit_io_done(io, expected, result),
            StoreIo::Checkpoint { expected } => self.build_io_done(io, expected, result),
        }
    }
}
