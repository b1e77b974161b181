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
//!
//! This folder, one concern per file; each adds the methods of its concern to `Sim`, whose
//! fields stay private to this module:
//!
//! - `mod.rs`: `Sim` (the store, its disk, the model and the clock of one run), opening the
//!   store on the simulated disk, and `run`.
//! - `config.rs`: what a run is asked to do: the fault kinds (`Faults`), the seed and steps
//!   (`SimConfig`) and the command that replays them.
//! - `report.rs`: what runs did (`SimReport`) and the first failure (`SimFailure`).
//! - `rng.rs`: the seeded generator every choice is drawn from (`Rng`, shared with the
//!   replication simulator).
//! - `disk.rs`: the simulated disk (`SimDisk`: what reads see and what survives power loss)
//!   and the faults injected as its operations complete.
//! - `model.rs`: the model of every 512-byte sector: the versions it may hold, and the bytes
//!   that name a version.
//! - `client.rs`: the client's requests: reads, writes, write-zeroes, FUA, flushes,
//!   snapshots and deletions of a volume.
//! - `check.rs`: every answer checked against the model, and the model updated by it.
//! - `driver.rs`: the scheduler's steps (a request, a disk completion, the end of a loop
//!   iteration, the commit timer, power loss, a clean restart, bit rot), draining, and the
//!   check after a crash.

mod check;
mod client;
mod config;
mod disk;
mod driver;
mod model;
mod report;
mod rng;

pub use config::{Faults, SimConfig};
pub use report::{SimFailure, SimReport};
pub use rng::Rng;

use crate::error::EngineError;
use crate::layout::{checkpoint_pages_for, Region, BLOCK_SIZE, PAGE_SIZE};
use crate::store::{Store, QUIET};
use client::Request;
use disk::SimDisk;
use model::Sector;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

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
}

/// Runs one seed.
pub fn run(config: SimConfig) -> Result<SimReport, SimFailure> {
    let result = Sim::new(config).run();
    QUIET.with(|q| q.set(false));
    result
}
