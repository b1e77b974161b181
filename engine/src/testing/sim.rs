//! Deterministic simulation of one core's store on a simulated disk, driven by one seed.
//!
//! The real `Store` (write path, group commit, journal rings, checkpoints, recovery) runs
//! single-threaded against `SimDisk`, an in-memory disk that completes operations in an order
//! the seed chooses and has the faults real disks have: power loss (writes not yet covered by
//! a completed fdatasync lost, kept or torn at 512-byte sectors), misdirected writes, latent
//! read errors, bit rot, failed writes, failed fdatasync (which drops dirty pages, as Linux
//! does) and a full device. A client sends reads, writes (partial blocks too), write-zeroes,
//! FUA writes and flushes, and a model of every 512-byte sector checks every answer:
//!
//! - a read returns what the last acknowledged write put there, or a write still in flight;
//! - after a crash every sector holds what a completed flush (or FUA write) made durable, or
//!   something written after it: never older data (a *stale* read), never bytes no write put
//!   there (*wrong data*);
//! - data the disk damaged is answered EIO, never served; EIO without an injected fault that
//!   explains it is a failure too;
//! - a store that refuses to open after injected damage names it (counted, not a failure);
//!   refusing without one is a failure; every request is answered (no hang).
//!
//! `run` returns a report or the first failure, whose message holds the command that replays
//! the seed. The canary (flush acknowledged before it is durable) must fail: that is what shows
//! the model can see a lost write.

use crate::buffer::AlignedBuf;
use crate::error::{BlockError, EngineError};
use crate::layout::{checkpoint_pages_for, Region, BLOCK_SIZE, CHUNK_SIZE, PAGE_SIZE};
use crate::request::{Arrived, Output, Piece, PieceKind, ReplyTo};
use crate::store::{DiskOp, IoSubmit, Store, StoreIo, QUIET};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

const SECTOR: usize = 512;
/// Set on the version of a write-zeroes: its sectors read as zeroes.
const ZERO_FLAG: u64 = 1 << 63;
/// A sector whose contents were lost to detected damage: any well-formed content or EIO.
const UNKNOWN: u64 = u64::MAX;
/// A snapshot/clone of volume 1 (same family: low 24 bits) takes and drops its blocks.
const CLONE: u32 = (1 << 24) | 1;
const VOLUMES: [u32; 3] = [1, 2, CLONE];
/// Tags of clone and drop operations (a write's tag is its version).
const OP_TAG: u64 = 1 << 62;
/// Client requests in flight at most.
const QUEUE_DEPTH: usize = 12;

/// The fault kinds a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub crash: bool,
    pub torn: bool,
    pub misdirect: bool,
    pub read_error: bool,
    pub bit_rot: bool,
    pub write_error: bool,
    pub sync_error: bool,
    pub device_full: bool,
}

const FAULT_NAMES: [&str; 8] = [
    "crash",
    "torn",
    "misdirect",
    "read-error",
    "bit-rot",
    "write-error",
    "sync-error",
    "device-full",
];

impl Faults {
    pub fn all() -> Faults {
        Faults::parse("all").expect("all")
    }

    pub fn none() -> Faults {
        Faults::parse("none").expect("none")
    }

    fn flags(&self) -> [bool; 8] {
        [
            self.crash,
            self.torn,
            self.misdirect,
            self.read_error,
            self.bit_rot,
            self.write_error,
            self.sync_error,
            self.device_full,
        ]
    }

    /// `all`, `none`, or a comma-separated list of `crash,torn,misdirect,read-error,bit-rot,
    /// write-error,sync-error,device-full`.
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut on = [false; 8];
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => on = [true; 8],
                "none" => on = [false; 8],
                w => match FAULT_NAMES.iter().position(|n| *n == w) {
                    Some(i) => on[i] = true,
                    None => {
                        return Err(format!(
                            "unknown fault kind {w:?} (known: all, none, {})",
                            FAULT_NAMES.join(", ")
                        ))
                    }
                },
            }
        }
        Ok(Faults {
            crash: on[0],
            torn: on[1],
            misdirect: on[2],
            read_error: on[3],
            bit_rot: on[4],
            write_error: on[5],
            sync_error: on[6],
            device_full: on[7],
        })
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<&str> = FAULT_NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else if on.len() == FAULT_NAMES.len() {
            f.write_str("all")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    /// Scheduler steps (a step submits a request, completes a disk operation, fires the commit
    /// timer, crashes, ...).
    pub steps: u32,
    pub faults: Faults,
    /// Acknowledge flushes before they are durable: the run must then fail.
    pub canary: bool,
}

impl SimConfig {
    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p torus-engine --example sim -- --seed {} --steps {} --faults {}{}",
            self.seed,
            self.steps,
            self.faults,
            if self.canary { " --canary" } else { "" }
        )
    }
}

/// What one run (or many, added up) did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub runs: u64,
    pub steps: u64,
    pub crashes: u64,
    pub clean_restarts: u64,
    pub torn_writes: u64,
    pub misdirected_writes: u64,
    pub read_errors: u64,
    pub bit_flips: u64,
    pub write_errors: u64,
    pub sync_errors: u64,
    pub device_full: u64,
    pub writes_acked: u64,
    pub bytes_acked: u64,
    pub flushes_acked: u64,
    /// Snapshots (clone of volume 1 onto its family member) and deletions acknowledged.
    pub volume_ops_acked: u64,
    /// Checkpoints made durable: in the background (`Build`) and all kinds.
    pub checkpoints_background: u64,
    pub checkpoints: u64,
    /// Flushes answered EIO (a write or fdatasync had failed: never acknowledged).
    pub flushes_failed: u64,
    pub reads_checked: u64,
    pub bytes_verified: u64,
    /// Reads answered EIO because injected damage hit their data (detected, not served).
    pub reads_eio: u64,
    /// Writes refused for lack of free slots.
    pub writes_enospc: u64,
    /// Opens refused after injected damage (the store named the damage).
    pub refused_opens: u64,
    pub disk_ops: u64,
}

impl SimReport {
    pub fn add(&mut self, o: &SimReport) {
        self.runs += o.runs;
        self.steps += o.steps;
        self.crashes += o.crashes;
        self.clean_restarts += o.clean_restarts;
        self.torn_writes += o.torn_writes;
        self.misdirected_writes += o.misdirected_writes;
        self.read_errors += o.read_errors;
        self.bit_flips += o.bit_flips;
        self.write_errors += o.write_errors;
        self.sync_errors += o.sync_errors;
        self.device_full += o.device_full;
        self.writes_acked += o.writes_acked;
        self.bytes_acked += o.bytes_acked;
        self.flushes_acked += o.flushes_acked;
        self.flushes_failed += o.flushes_failed;
        self.volume_ops_acked += o.volume_ops_acked;
        self.checkpoints_background += o.checkpoints_background;
        self.checkpoints += o.checkpoints;
        self.reads_checked += o.reads_checked;
        self.bytes_verified += o.bytes_verified;
        self.reads_eio += o.reads_eio;
        self.writes_enospc += o.writes_enospc;
        self.refused_opens += o.refused_opens;
        self.disk_ops += o.disk_ops;
    }
}

#[derive(Debug)]
pub struct SimFailure {
    pub config: SimConfig,
    pub step: u64,
    pub what: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {}\nreplay: {}",
            self.config.seed,
            self.step,
            self.what,
            self.config.replay_command()
        )
    }
}

/// SplitMix64: small, fast and the same everywhere (the replication simulator draws from it
/// too).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: plain syscall; the fd it returns is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// A completed write not yet covered by a completed fdatasync.
struct Dirty {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

struct InFlight {
    op: DiskOp,
    io: StoreIo,
    /// For a sync: dirty writes with a lower sequence number completed before it was
    /// submitted, and are what it makes durable.
    sync_mark: u64,
}

/// The disk: what reads see (`current`) and what survives power loss (`durable`).
struct SimDisk {
    current: File,
    durable: File,
    size: u64,
    dirty: Vec<Dirty>,
    dirty_seq: u64,
    inflight: Vec<InFlight>,
}

impl IoSubmit for SimDisk {
    fn submit_store(&mut self, op: DiskOp, io: StoreIo) {
        self.inflight.push(InFlight {
            op,
            io,
            sync_mark: self.dirty_seq,
        });
    }
}

impl SimDisk {
    fn new(size: u64) -> SimDisk {
        let current = memfd(c"torus-sim-current");
        let durable = memfd(c"torus-sim-durable");
        current.set_len(size).expect("size memfd");
        durable.set_len(size).expect("size memfd");
        SimDisk {
            current,
            durable,
            size,
            dirty: Vec::new(),
            dirty_seq: 0,
            inflight: Vec::new(),
        }
    }

    fn write_current(&mut self, offset: u64, data: &[u8]) {
        self.current
            .write_all_at(data, offset)
            .expect("memfd write");
        self.dirty.push(Dirty {
            seq: self.dirty_seq,
            offset,
            data: data.to_vec(),
        });
        self.dirty_seq += 1;
    }

    /// `current` = `durable` + the dirty writes still held, in order.
    fn rebuild_current(&mut self) {
        let mut image = vec![0u8; self.size as usize];
        self.durable
            .read_exact_at(&mut image, 0)
            .expect("memfd read");
        for d in &self.dirty {
            let at = d.offset as usize;
            image[at..at + d.data.len()].copy_from_slice(&d.data);
        }
        self.current.write_all_at(&image, 0).expect("memfd write");
    }

    /// The bytes a write operation carries (read from the store's buffers).
    fn gather(op: &DiskOp) -> (u64, Vec<u8>) {
        match *op {
            // SAFETY: the store keeps the buffer alive until the operation completes.
            DiskOp::Write { offset, ptr, len } => (
                offset,
                unsafe { std::slice::from_raw_parts(ptr, len as usize) }.to_vec(),
            ),
            DiskOp::Writev {
                offset,
                iovecs,
                count,
            } => {
                let mut data = Vec::new();
                // SAFETY: the iovecs and the buffers they name live until completion.
                for iov in unsafe { std::slice::from_raw_parts(iovecs, count as usize) } {
                    data.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
                    });
                }
                (offset, data)
            }
            _ => unreachable!("not a write"),
        }
    }
}

/// One version of a sector: a write's, or what the sector held before the model knew more.
/// Times are the simulation's logical clock.
#[derive(Debug, Clone, Copy)]
struct Rec {
    version: u64,
    /// The operation that wrote it: a write's version, or a clone's or drop's OP_TAG | token.
    tag: u64,
    submitted: u64,
    /// When it was answered (acknowledged or failed); None while in flight.
    ended: Option<u64>,
    acked: bool,
    /// Acknowledged and then covered by a completed flush, or a FUA write.
    durable: bool,
}

/// One 512-byte sector of a volume: the versions it may hold. NBD orders nothing between
/// requests in flight at the same time, so a version is ruled out only by a write submitted
/// after it ended: for reads, an acknowledged one; after a crash, a durable one.
#[derive(Clone)]
struct Sector(Vec<Rec>);

impl Sector {
    fn known(version: u64) -> Sector {
        Sector(vec![Rec {
            version,
            tag: 0,
            submitted: 0,
            ended: Some(0),
            acked: true,
            durable: true,
        }])
    }

    /// Versions a read submitted now may return.
    fn readable(&self) -> Vec<u64> {
        let last = self.0.iter().filter(|r| r.acked).map(|r| r.submitted).max();
        self.0
            .iter()
            .filter(|r| match (r.ended, last) {
                (Some(end), Some(last)) => end > last || r.acked && r.submitted == last,
                _ => true,
            })
            .map(|r| r.version)
            .collect()
    }

    /// Versions a crash may leave.
    fn survivable(&self) -> Vec<u64> {
        self.0.iter().map(|r| r.version).collect()
    }

    /// Drops versions a durable write submitted after them has ruled out for good.
    fn prune(&mut self) {
        if let Some(last) = self
            .0
            .iter()
            .filter(|r| r.durable)
            .map(|r| r.submitted)
            .max()
        {
            self.0.retain(|r| match r.ended {
                Some(end) => end > last || r.durable && r.submitted == last,
                None => true,
            });
        }
    }

    /// A completed flush submitted at `flush_submitted` made these durable.
    fn flushed(&mut self, flush_submitted: u64) {
        let mut any = false;
        for r in &mut self.0 {
            if r.acked && !r.durable && r.ended.is_some_and(|e| e < flush_submitted) {
                r.durable = true;
                any = true;
            }
        }
        if any {
            self.prune();
        }
    }
}

/// What a sector's bytes say.
#[derive(Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Version(u64),
    Garbage,
}

fn fill_sector(out: &mut [u8], version: u64, volume: u32, sector: u64) {
    out[0..8].copy_from_slice(&version.to_le_bytes());
    out[8..12].copy_from_slice(&volume.to_le_bytes());
    out[12..20].copy_from_slice(&sector.to_le_bytes());
    let mut r = Rng(version ^ (sector << 20) ^ ((volume as u64) << 56));
    for chunk in out[20..].chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// What a sector read at `sector` of any volume holds (a clone holds its origin's sectors, so
/// the volume written is taken from the bytes; a version names one write, hence one volume).
fn decode_sector(bytes: &[u8], sector: u64) -> Content {
    if bytes.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    let version = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let volume = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let mut expect = [0u8; SECTOR];
    fill_sector(&mut expect, version, volume, sector);
    if expect[..] == bytes[..] {
        Content::Version(version)
    } else {
        Content::Garbage
    }
}

fn content_of(version: u64) -> Content {
    if version == 0 || version & ZERO_FLAG != 0 {
        Content::Zero
    } else {
        Content::Version(version)
    }
}

#[derive(Debug)]
enum Request {
    Write {
        volume: u32,
        first: u64,
        sectors: u64,
        version: u64,
        fua: bool,
    },
    Read {
        volume: u32,
        first: u64,
        allowed: Vec<Vec<u64>>,
        /// Read by the check after a crash: a sector's first read since then.
        after_crash: bool,
    },
    Flush {
        mark: u64,
    },
    /// `clone_volume(1, CLONE)` or `drop_volume(CLONE)`: every sector of CLONE got a version
    /// tagged `tag`; answered once durable.
    Volume {
        tag: u64,
    },
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    region: Region,
    disk: SimDisk,
    store: Option<Store>,
    volume_sectors: u64,
    sectors: BTreeMap<u32, Vec<Sector>>,
    requests: BTreeMap<u64, Request>,
    next_token: u64,
    next_version: u64,
    /// Logical clock: one tick per request submitted or answered.
    now: u64,
    step: u64,
    /// Damage was injected since the store was formatted: EIO and a refused open may be right.
    damaged: bool,
    report: SimReport,
    reply: crossbeam_channel::Sender<crate::request::Completion>,
    /// TORUS_SIM_TRACE=1: every answer and event on stderr.
    trace: bool,
}

type Check = Result<(), String>;

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = Rng(config.seed);
        // A small region, so that slots run out, the journal wraps and checkpoints come often.
        let slots = 256 + 64 * rng.below(4);
        let journal_pages = 6 + rng.below(20);
        let cp = checkpoint_pages_for(slots);
        let region = Region {
            core: 0,
            checkpoint_a: 0,
            checkpoint_b: cp,
            checkpoint_pages: cp,
            journal: 2 * cp,
            journal_b: 2 * cp + journal_pages,
            journal_pages,
            slots: 2 * cp + 2 * journal_pages,
            slot_count: slots,
        };
        let size = (region.slots + slots) * PAGE_SIZE as u64;
        // Volumes of 24 to 160 blocks each: together from far below the slot count to above it.
        let volume_blocks = 24 + 8 * rng.below(18);
        let volume_sectors = volume_blocks * (BLOCK_SIZE / SECTOR) as u64;
        let sectors = VOLUMES
            .iter()
            .map(|&v| (v, vec![Sector::known(0); volume_sectors as usize]))
            .collect();
        Sim {
            config,
            rng,
            region,
            disk: SimDisk::new(size),
            store: None,
            volume_sectors,
            sectors,
            requests: BTreeMap::new(),
            next_token: 1,
            next_version: 1,
            now: 0,
            step: 0,
            damaged: false,
            report: SimReport {
                runs: 1,
                ..Default::default()
            },
            reply: crossbeam_channel::unbounded().0,
            trace: std::env::var_os("TORUS_SIM_TRACE").is_some(),
        }
    }

    fn fail<T>(&self, what: impl Into<String>) -> Result<T, SimFailure> {
        Err(SimFailure {
            config: self.config,
            step: self.step,
            what: what.into(),
        })
    }

    fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("store open")
    }

    /// Opens (formats first when new) the store on the current image. Ok(false): the store
    /// refused to open after injected damage — the run ends there.
    fn open(&mut self, format: bool) -> Result<bool, SimFailure> {
        let path = PathBuf::from("sim");
        if format {
            crate::store::format_region(&self.disk.current, &self.region, &path)
                .expect("format on memfd");
        }
        match Store::open(0, &self.disk.current, &path, self.region) {
            Ok(mut store) => {
                store.set_ack_flush_early(self.config.canary);
                self.store = Some(store);
                // Opening wrote and synced a checkpoint: that is durable.
                let mut image = vec![0u8; self.disk.size as usize];
                self.disk
                    .current
                    .read_exact_at(&mut image, 0)
                    .expect("read");
                self.disk.durable.write_all_at(&image, 0).expect("write");
                Ok(true)
            }
            Err(EngineError::Damaged { what, .. }) if self.damaged => {
                if self.trace {
                    eprintln!("[{}] the store refused to open: {what}", self.step);
                }
                self.report.refused_opens += 1;
                Ok(false)
            }
            Err(e) => self.fail(format!("the store refused to open: {e}")),
        }
    }

    /// Clones volume 1 onto CLONE, or drops CLONE; only while nothing else writes either, and
    /// (for a clone) while every sector of volume 1 has one version a read could return.
    fn submit_volume_op(&mut self, clone: bool) {
        let busy = self.requests.values().any(|r| match r {
            Request::Write { volume, .. } => *volume == 1 || *volume == CLONE,
            Request::Volume { .. } => true,
            _ => false,
        });
        if busy {
            return;
        }
        let versions: Vec<u64> = if clone {
            let mut v = Vec::with_capacity(self.volume_sectors as usize);
            for sector in &self.sectors[&1] {
                match sector.readable()[..] {
                    [one] => v.push(one),
                    _ => return,
                }
            }
            v
        } else {
            let zero = self.next_version | ZERO_FLAG;
            self.next_version += 1;
            vec![zero; self.volume_sectors as usize]
        };
        self.now += 1;
        let (token, reply) = self.new_reply();
        let tag = OP_TAG | token;
        let now = self.now;
        for (sector, version) in self
            .sectors
            .get_mut(&CLONE)
            .expect("clone volume")
            .iter_mut()
            .zip(versions)
        {
            sector.0.push(Rec {
                version,
                tag,
                submitted: now,
                ended: None,
                acked: false,
                durable: false,
            });
        }
        if self.trace {
            eprintln!(
                "[{}] submit {} (tag {tag:#x})",
                self.step,
                if clone {
                    "clone 1 -> CLONE"
                } else {
                    "drop CLONE"
                }
            );
        }
        self.requests.insert(token, Request::Volume { tag });
        let store = self.store.as_mut().expect("store open");
        if clone {
            store.clone_volume(&mut self.disk, 1, CLONE, reply);
        } else {
            store.drop_volume(&mut self.disk, CLONE, reply);
        }
    }

    /// A token for a new request, and where the store sends its answer.
    fn new_reply(&mut self) -> (u64, ReplyTo) {
        let token = self.next_token;
        self.next_token += 1;
        let reply = ReplyTo::Channel {
            sender: self.reply.clone(),
            token,
        };
        (token, reply)
    }

    fn submit(&mut self, piece: Piece, request: Request) {
        if self.trace && !matches!(request, Request::Read { .. }) {
            eprintln!("[{}] submit {request:?}", self.step);
        }
        self.now += 1;
        let (token, reply) = self.new_reply();
        self.requests.insert(token, request);
        let arrived = Arrived {
            piece,
            reply,
            at: Instant::now(),
        };
        let store = self.store.as_mut().expect("store open");
        store.start(&mut self.disk, arrived);
    }

    /// A random range of one volume inside one chunk: whole blocks mostly, sometimes
    /// unaligned sectors (a read-modify-write).
    fn random_range(&mut self) -> (u32, u64, u64) {
        let volume = VOLUMES[self.rng.below(VOLUMES.len() as u64) as usize];
        let per_block = (BLOCK_SIZE / SECTOR) as u64;
        let chunk_sectors = CHUNK_SIZE / SECTOR as u64;
        let (first, count) = if self.rng.chance(0.7) {
            let blocks = self.volume_sectors / per_block;
            let b = self.rng.below(blocks);
            let n = 1 + self.rng.below(8);
            (b * per_block, n * per_block)
        } else {
            let s = self.rng.below(self.volume_sectors);
            (s, 1 + self.rng.below(20))
        };
        // Clip to the volume and to the chunk.
        let chunk_end = (first / chunk_sectors + 1) * chunk_sectors;
        let end = (first + count).min(self.volume_sectors).min(chunk_end);
        (volume, first, end - first)
    }

    fn submit_write(&mut self, zero: bool) {
        let (volume, first, sectors) = self.random_range();
        let fua = self.rng.chance(0.1);
        let version = self.next_version | if zero { ZERO_FLAG } else { 0 };
        self.next_version += 1;
        for s in first..first + sectors {
            self.sectors.get_mut(&volume).expect("volume")[s as usize]
                .0
                .push(Rec {
                    version,
                    tag: version,
                    submitted: self.now,
                    ended: None,
                    acked: false,
                    durable: false,
                });
        }
        let len = sectors as usize * SECTOR;
        let kind = if zero {
            PieceKind::Zero { fua }
        } else {
            let mut data = AlignedBuf::zeroed(len);
            for (i, out) in data.chunks_mut(SECTOR).enumerate() {
                fill_sector(out, version, volume, first + i as u64);
            }
            PieceKind::Write {
                data: Arc::new(data),
                data_offset: 0,
                fua,
            }
        };
        self.submit(
            Piece {
                volume,
                offset: first * SECTOR as u64,
                len: len as u32,
                kind,
            },
            Request::Write {
                volume,
                first,
                sectors,
                version,
                fua,
            },
        );
    }

    fn submit_read(&mut self, volume: u32, first: u64, sectors: u64, after_crash: bool) {
        let model = &self.sectors[&volume];
        let allowed = (first..first + sectors)
            .map(|s| {
                let sector = &model[s as usize];
                if after_crash {
                    sector.survivable()
                } else {
                    sector.readable()
                }
            })
            .collect();
        self.submit(
            Piece {
                volume,
                offset: first * SECTOR as u64,
                len: (sectors as usize * SECTOR) as u32,
                kind: PieceKind::Read,
            },
            Request::Read {
                volume,
                first,
                allowed,
                after_crash,
            },
        );
    }

    fn submit_flush(&mut self) {
        let mark = self.now;
        self.submit(
            Piece {
                volume: VOLUMES[0],
                offset: 0,
                len: 0,
                kind: PieceKind::Flush,
            },
            Request::Flush { mark },
        );
    }

    /// Takes the store's answers and checks them against the model.
    fn collect(&mut self) -> Result<(), SimFailure> {
        let out = std::mem::take(&mut self.store().out);
        for (_, completion) in out {
            let Some(request) = self.requests.remove(&completion.token) else {
                return self.fail(format!("answer to unknown request {}", completion.token));
            };
            if let Err(what) = self.check(request, completion.output) {
                return self.fail(what);
            }
        }
        Ok(())
    }

    /// A write or fdatasync failed on the disk (in this run): the region is poisoned and
    /// writes and flushes rightly answer EIO until the store is opened again.
    fn disk_failed(&self) -> bool {
        self.report.write_errors + self.report.sync_errors + self.report.device_full > 0
    }

    fn check(&mut self, request: Request, output: Result<Output, BlockError>) -> Check {
        if self.trace {
            match &request {
                Request::Read {
                    volume,
                    first,
                    allowed,
                    ..
                } => eprintln!(
                    "[{}] read v{volume} {first}+{} -> {}",
                    self.step,
                    allowed.len(),
                    if output.is_ok() {
                        "ok".to_string()
                    } else {
                        format!("{output:?}")
                    }
                ),
                r => eprintln!("[{}] {r:?} -> {output:?}", self.step),
            }
        }
        match request {
            Request::Write {
                volume,
                first,
                sectors,
                version,
                fua,
            } => {
                self.now += 1;
                let now = self.now;
                let acked = match &output {
                    Ok(Output::Done) => {
                        self.report.writes_acked += 1;
                        self.report.bytes_acked += sectors * SECTOR as u64;
                        Some(true)
                    }
                    Err(BlockError::NoSpace) => {
                        self.report.writes_enospc += 1;
                        None
                    }
                    // A partial write reads its edges: damage there fails it too.
                    Err(BlockError::Io) if self.disk_failed() || self.damaged => Some(false),
                    other => return Err(format!("write answered {other:?}")),
                };
                let model = self.sectors.get_mut(&volume).expect("volume");
                for s in first..first + sectors {
                    let sector = &mut model[s as usize];
                    let i = sector
                        .0
                        .iter()
                        .position(|r| r.tag == version)
                        .expect("write in the sector's versions");
                    match acked {
                        // ENOSPC harms nothing: the write never happened.
                        None => {
                            sector.0.remove(i);
                        }
                        Some(acked) => {
                            let r = &mut sector.0[i];
                            r.ended = Some(now);
                            r.acked = acked;
                            if acked && fua {
                                r.durable = true;
                                sector.prune();
                            }
                        }
                    }
                }
                Ok(())
            }
            Request::Volume { tag } => {
                self.now += 1;
                let now = self.now;
                let acked = match output {
                    Ok(Output::Done) => true,
                    Err(BlockError::Io) if self.disk_failed() || self.damaged => false,
                    // No room in the block map for the clone: nothing happened.
                    Err(BlockError::NoSpace) => {
                        self.report.writes_enospc += 1;
                        for sector in self.sectors.get_mut(&CLONE).expect("clone volume") {
                            sector.0.retain(|r| r.tag != tag);
                        }
                        return Ok(());
                    }
                    other => return Err(format!("clone or drop answered {other:?}")),
                };
                self.report.volume_ops_acked += acked as u64;
                for sector in self.sectors.get_mut(&CLONE).expect("clone volume") {
                    if let Some(r) = sector.0.iter_mut().find(|r| r.tag == tag) {
                        r.ended = Some(now);
                        r.acked = acked;
                        // Answered once its journal record is durable.
                        r.durable = acked;
                        if acked {
                            sector.prune();
                        }
                    }
                }
                Ok(())
            }
            Request::Flush { mark } => {
                match output {
                    Ok(Output::Done) => {
                        self.report.flushes_acked += 1;
                        for model in self.sectors.values_mut() {
                            for sector in model.iter_mut() {
                                sector.flushed(mark);
                            }
                        }
                    }
                    Err(BlockError::Io) if self.disk_failed() => self.report.flushes_failed += 1,
                    other => return Err(format!("flush answered {other:?}")),
                }
                Ok(())
            }
            Request::Read {
                volume,
                first,
                allowed,
                after_crash,
            } => {
                let sectors = allowed.len() as u64;
                let (data, head) = match output {
                    Ok(Output::Read { data, head }) => (data, head),
                    Err(BlockError::Io) if self.damaged => {
                        self.report.reads_eio += 1;
                        if after_crash {
                            let model = self.sectors.get_mut(&volume).expect("volume");
                            for s in first..first + sectors {
                                model[s as usize] = Sector::known(UNKNOWN);
                            }
                        }
                        return Ok(());
                    }
                    other => {
                        return Err(format!(
                        "read of volume {volume} sectors {first}+{sectors} answered {other:?}{}",
                        if self.damaged {
                            ""
                        } else {
                            " with no damage injected"
                        }
                    ))
                    }
                };
                self.report.reads_checked += 1;
                for (i, allowed) in allowed.iter().enumerate() {
                    let s = first + i as u64;
                    let at = head + i * SECTOR;
                    let got = decode_sector(&data[at..at + SECTOR], s);
                    let ok = match &got {
                        Content::Garbage => false,
                        _ if allowed.contains(&UNKNOWN) => true,
                        got => allowed.iter().any(|&v| content_of(v) == *got),
                    };
                    if !ok {
                        // Older than every version allowed: an acknowledged write was lost.
                        let older = |v: u64| allowed.iter().all(|a| *a & !ZERO_FLAG > v);
                        let kind = match &got {
                            Content::Version(v) if older(*v) => "stale read (a write was lost)",
                            Content::Zero if older(0) => "stale read (a write was lost)",
                            _ => "wrong data",
                        };
                        return Err(format!(
                            "{kind}: volume {volume} sector {s} holds {got:?}, allowed {allowed:?}{}",
                            if after_crash { " (first read after a crash)" } else { "" }
                        ));
                    }
                    if after_crash {
                        let durable = match got {
                            Content::Version(v) => v,
                            _ => 0,
                        };
                        self.sectors.get_mut(&volume).expect("volume")[s as usize] =
                            Sector::known(durable);
                    }
                }
                self.report.bytes_verified += sectors * SECTOR as u64;
                Ok(())
            }
        }
    }

    fn trace_fault(&self, what: &str, offset: u64, len: usize) {
        if self.trace {
            let page = offset / PAGE_SIZE as u64;
            let r = &self.region;
            let area = if page < r.journal {
                "checkpoint"
            } else if page < r.slots {
                "journal"
            } else {
                "slots"
            };
            eprintln!("[{}] {what} at page {page} ({area}) len {len}", self.step);
        }
    }

    /// Completes one disk operation, maybe with a fault.
    fn complete_disk_op(&mut self, index: usize, faults_on: bool) -> Result<(), SimFailure> {
        let f = if faults_on {
            self.config.faults
        } else {
            Faults::none()
        };
        let op = self.disk.inflight.remove(index);
        self.report.disk_ops += 1;
        let result = match op.op {
            DiskOp::Read {
                offset, ptr, len, ..
            } => {
                if f.read_error && self.rng.chance(0.004) {
                    self.report.read_errors += 1;
                    self.trace_fault("read error", offset, len as usize);
                    self.damaged = true;
                    -libc::EIO
                } else {
                    // SAFETY: the store keeps the buffer alive until the operation completes.
                    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
                    self.disk
                        .current
                        .read_exact_at(buf, offset)
                        .expect("memfd read");
                    len as i32
                }
            }
            DiskOp::Write { .. } | DiskOp::Writev { .. } => {
                let (offset, data) = SimDisk::gather(&op.op);
                let len = data.len() as i32;
                if f.write_error && self.rng.chance(0.002) {
                    // Some sectors may have reached the disk before it failed.
                    self.report.write_errors += 1;
                    self.trace_fault("write error", offset, data.len());
                    self.damaged = true;
                    let part = self.rng.below(data.len() as u64 / SECTOR as u64 + 1) as usize;
                    if part > 0 {
                        self.disk.write_current(offset, &data[..part * SECTOR]);
                    }
                    -libc::EIO
                } else if f.device_full && self.rng.chance(0.002) {
                    self.report.device_full += 1;
                    self.trace_fault("device full", offset, data.len());
                    -libc::ENOSPC
                } else if f.misdirect && self.rng.chance(0.002) {
                    self.report.misdirected_writes += 1;
                    self.trace_fault("misdirected write", offset, data.len());
                    self.damaged = true;
                    let pages = (self.disk.size - data.len() as u64) / PAGE_SIZE as u64;
                    let to = self.rng.below(pages + 1) * PAGE_SIZE as u64;
                    self.disk.write_current(to, &data);
                    len
                } else {
                    self.disk.write_current(offset, &data);
                    len
                }
            }
            DiskOp::SyncData => {
                if f.sync_error && self.rng.chance(0.004) {
                    // Linux marks the pages clean anyway: some dirty data is simply gone.
                    self.report.sync_errors += 1;
                    self.trace_fault("fdatasync error", 0, 0);
                    self.damaged = true;
                    let mut kept = Vec::new();
                    for d in std::mem::take(&mut self.disk.dirty) {
                        if d.seq >= op.sync_mark || self.rng.chance(0.5) {
                            kept.push(d);
                        }
                    }
                    self.disk.dirty = kept;
                    self.disk.rebuild_current();
                    -libc::EIO
                } else {
                    let mut kept = Vec::new();
                    for d in std::mem::take(&mut self.disk.dirty) {
                        if d.seq < op.sync_mark {
                            self.disk
                                .durable
                                .write_all_at(&d.data, d.offset)
                                .expect("write");
                        } else {
                            kept.push(d);
                        }
                    }
                    self.disk.dirty = kept;
                    0
                }
            }
        };
        let store = self.store.as_mut().expect("store open");
        store.on_io(&mut self.disk, op.io, result);
        self.collect()
    }

    /// Power loss: every write not covered by a completed sync is kept, lost or torn; the
    /// store is dropped and opened again from what survived.
    fn crash(&mut self) -> Result<bool, SimFailure> {
        self.report.crashes += 1;
        if let Some(store) = &self.store {
            self.report.checkpoints += store.counters.checkpoints;
            self.report.checkpoints_background += store.counters.checkpoints_background;
        }
        if self.trace {
            eprintln!(
                "[{}] crash ({} dirty writes, {} in flight)",
                self.step,
                self.disk.dirty.len(),
                self.disk.inflight.len()
            );
        }
        let faults = self.config.faults;
        // Writes in flight may have reached the disk.
        for op in std::mem::take(&mut self.disk.inflight) {
            if matches!(op.op, DiskOp::Write { .. } | DiskOp::Writev { .. }) && self.rng.chance(0.5)
            {
                let (offset, data) = SimDisk::gather(&op.op);
                self.disk.write_current(offset, &data);
            }
        }
        self.store = None;
        for d in std::mem::take(&mut self.disk.dirty) {
            let roll = self.rng.below(10);
            if roll < 4 {
                self.disk
                    .durable
                    .write_all_at(&d.data, d.offset)
                    .expect("write");
            } else if roll < 6 && faults.torn && d.data.len() > SECTOR {
                self.report.torn_writes += 1;
                for (i, s) in d.data.chunks(SECTOR).enumerate() {
                    if self.rng.chance(0.5) {
                        let at = d.offset + (i * SECTOR) as u64;
                        self.disk.durable.write_all_at(s, at).expect("write");
                    }
                }
            }
        }
        self.disk.rebuild_current();
        // Requests in flight are never answered; what they wrote stays possible.
        self.requests.clear();
        if !self.open(false)? {
            return Ok(false);
        }
        self.verify_after_crash()?;
        Ok(true)
    }

    /// Reads every sector once after a crash: each must hold a version the crash may leave.
    fn verify_after_crash(&mut self) -> Result<(), SimFailure> {
        let chunk_sectors = CHUNK_SIZE / SECTOR as u64;
        for volume in VOLUMES {
            let mut first = 0;
            while first < self.volume_sectors {
                let n = chunk_sectors.min(self.volume_sectors - first);
                self.submit_read(volume, first, n, true);
                first += n;
                self.drain(false)?;
            }
        }
        Ok(())
    }

    /// Runs the disk, without faults, until every request is answered.
    fn drain(&mut self, faults_on: bool) -> Result<(), SimFailure> {
        let mut rounds = 0u64;
        self.collect()?;
        while !self.requests.is_empty() {
            rounds += 1;
            if rounds > 1_000_000 {
                return self.fail("requests still unanswered after a million disk operations");
            }
            let store = self.store.as_mut().expect("store open");
            store.flush_writes(&mut self.disk);
            self.arm_timer();
            if self.requests.is_empty() {
                break;
            }
            let stepping = self.store().wants_step();
            if stepping && (self.disk.inflight.is_empty() || self.rng.below(4) == 0) {
                let store = self.store.as_mut().expect("store open");
                store.checkpoint_step(&mut self.disk);
                self.collect()?;
            } else if !self.disk.inflight.is_empty() {
                let i = self.rng.below(self.disk.inflight.len() as u64) as usize;
                self.complete_disk_op(i, faults_on)?;
            } else if self.store().timer_armed {
                self.fire_timer()?;
            } else {
                let waiting: Vec<String> = self
                    .requests
                    .iter()
                    .take(3)
                    .map(|(t, r)| match r {
                        Request::Read {
                            volume,
                            first,
                            allowed,
                            ..
                        } => {
                            format!(
                                "{t}: read volume {volume} sectors {first}+{}",
                                allowed.len()
                            )
                        }
                        r => format!("{t}: {r:?}"),
                    })
                    .collect();
                return self.fail(format!(
                    "hang: {} request(s) unanswered ({}) with no disk operation in flight",
                    self.requests.len(),
                    waiting.join("; ")
                ));
            }
        }
        Ok(())
    }

    /// The reactor arms the background commit timer when records wait and no commit runs.
    fn arm_timer(&mut self) {
        let store = self.store();
        if store.has_pending_records() && !store.timer_armed && !store.commit_running() {
            store.timer_armed = true;
        }
    }

    fn fire_timer(&mut self) -> Result<(), SimFailure> {
        let store = self.store.as_mut().expect("store open");
        store.timer_armed = false;
        store.kick_commit(&mut self.disk);
        self.collect()
    }

    /// Everything answered, then a checkpoint (what a clean shutdown does), then reopen.
    fn clean_restart(&mut self) -> Result<bool, SimFailure> {
        self.drain(false)?;
        let (token, reply) = self.new_reply();
        self.now += 1;
        let mark = self.now;
        self.requests.insert(token, Request::Flush { mark });
        let store = self.store.as_mut().expect("store open");
        store.checkpoint_now(&mut self.disk, reply);
        self.collect()?;
        self.drain(false)?;
        self.report.clean_restarts += 1;
        self.report.crashes -= 1; // counted as a restart, not a crash
        self.crash()
    }

    fn run(mut self) -> Result<SimReport, SimFailure> {
        QUIET.with(|q| q.set(true));
        if !self.open(true)? {
            return self.fail("a freshly formatted store refused to open");
        }
        let f = self.config.faults;
        let crash_weight = if f.crash { 10 } else { 0 };
        let rot_weight = if f.bit_rot { 10 } else { 0 };
        for step in 0..self.config.steps as u64 {
            self.step = step;
            self.arm_timer();
            let poisoned = self.store().poisoned();
            let can_submit = self.requests.len() < QUEUE_DEPTH;
            // Weighted choice among what can happen now.
            let weights = [
                if can_submit { 300 } else { 0 },               // a client request
                (self.disk.inflight.len() as u64).min(1) * 500, // a disk completion
                120,                                            // end of a loop iteration
                if self.store().timer_armed { 40 } else { 0 },  // the commit timer
                crash_weight + if poisoned { 2000 } else { 0 }, // power loss
                3,                                              // clean restart
                rot_weight,                                     // bit rot
            ];
            let total: u64 = weights.iter().sum();
            let mut pick = self.rng.below(total);
            let mut choice = 0;
            for (i, w) in weights.iter().enumerate() {
                if pick < *w {
                    choice = i;
                    break;
                }
                pick -= w;
            }
            let alive = match choice {
                0 => {
                    match self.rng.below(100) {
                        0..=44 => self.submit_write(false),
                        45..=51 => self.submit_write(true),
                        52..=87 => {
                            let (volume, first, n) = self.random_range();
                            self.submit_read(volume, first, n, false);
                        }
                        88..=95 => self.submit_flush(),
                        96..=97 => self.submit_volume_op(true),
                        _ => self.submit_volume_op(false),
                    }
                    self.collect()?;
                    true
                }
                1 => {
                    let i = self.rng.below(self.disk.inflight.len() as u64) as usize;
                    self.complete_disk_op(i, true)?;
                    true
                }
                2 => {
                    // End of a loop iteration: a step of a background checkpoint, then the
                    // writes gathered.
                    let store = self.store.as_mut().expect("store open");
                    store.checkpoint_step(&mut self.disk);
                    store.flush_writes(&mut self.disk);
                    self.collect()?;
                    true
                }
                3 => {
                    self.fire_timer()?;
                    true
                }
                4 => self.crash()?,
                5 => self.clean_restart()?,
                _ => {
                    // A bit flips somewhere in the store's area, on the platter.
                    self.report.bit_flips += 1;
                    self.damaged = true;
                    let at = self.rng.below(self.disk.size);
                    self.trace_fault("bit flip", at, 1);
                    let bit = 1u8 << self.rng.below(8);
                    for file in [&self.disk.durable, &self.disk.current] {
                        let mut b = [0u8];
                        file.read_exact_at(&mut b, at).expect("read");
                        b[0] ^= bit;
                        file.write_all_at(&b, at).expect("write");
                    }
                    true
                }
            };
            if !alive {
                self.report.steps = step + 1;
                return Ok(self.report);
            }
        }
        // Heal: no more faults; everything answered, a last flush, then power loss: every
        // acknowledged write must be there.
        self.step = self.config.steps as u64;
        self.drain(false)?;
        if self.store().poisoned() && !self.crash()? {
            self.report.steps = self.step;
            return Ok(self.report);
        }
        self.submit_flush();
        self.drain(false)?;
        self.crash()?;
        self.report.steps = self.step;
        Ok(self.report)
    }
}

/// Runs one seed.
pub fn run(config: SimConfig) -> Result<SimReport, SimFailure> {
    let result = Sim::new(config).run();
    QUIET.with(|q| q.set(false));
    result
}
