//! The scheduler of a run: each step a weighted choice among what can happen now (a client
//! request, a disk completion, the end of a reactor loop iteration, the commit timer, power
//! loss, a clean restart, bit rot); draining until every request is answered; and the check
//! after every crash that each sector holds what the crash may leave. A run ends healed: no
//! more faults, a last flush, then power loss.

use super::client::Request;
use super::disk::SimDisk;
use super::{Sim, SimFailure, SimReport, SECTOR, VOLUMES};
use crate::layout::CHUNK_SIZE;
use crate::store::{DiskOp, QUIET};
use std::os::unix::fs::FileExt;

/// Client requests in flight at most.
const QUEUE_DEPTH: usize = 12;

impl Sim {
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

    pub(super) fn run(mut self) -> Result<SimReport, SimFailure> {
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
