//! The group commit: the records and frees gathered since the last commit are made durable
//! together, answering every FLUSH, FUA write, drop and clone that waited for them.
//!
//! A commit is `fdatasync` (the data the records point at), then journal pages written to
//! ring A and ring B (or, when the journal is too full, a full checkpoint: copy A then copy B,
//! each synced), then `fdatasync`. One commit at a time. A checkpoint that is due is written in
//! the background (`background_checkpoint.rs`) while commits go on. Slots replaced by the
//! commit's records are freed only once it is durable, and not while a read still targets
//! them. A failed step poisons the region: its waiters, and every later flush, hear EIO.

use super::io::{completed, describe_result};
use super::{DiskOp, IoSubmit, Store, StoreIo};
use crate::buffer::AlignedBuf;
use crate::checkpoint;
use crate::error::BlockError;
use crate::journal::{self, RECORDS_PER_PAGE};
use crate::layout::PAGE_SIZE;
use crate::request::{Output, ReplyTo};

/// A commit is started at once when this many records wait (about 48 journal pages).
pub(super) const PENDING_RECORDS_COMMIT: usize = 8192;
/// Journal pages used since the last checkpoint beyond which a commit writes a checkpoint
/// instead: a third of the ring, so that the journal since the *previous* checkpoint (kept for
/// the case where the newest checkpoint copy is damaged) never exceeds two thirds of it.
const fn checkpoint_threshold(journal_pages: u64) -> u64 {
    journal_pages / 3
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

pub(super) struct Commit {
    stage: Stage,
    waiters: Vec<ReplyTo>,
    pub(super) frees: Vec<u32>,
    buf: Option<AlignedBuf>,
    journal_pages: u64,
    checkpoint: bool,
    outstanding: u32,
    failed: bool,
}

impl Store {
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
            self.start_build(self.journal_next_seq + pages);
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

    pub(super) fn commit_io_done(&mut self, io: &mut impl IoSubmit, expected: u32, result: i32) {
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
        self.build_base_durable(io);
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
}
