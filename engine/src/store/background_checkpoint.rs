//! The checkpoint written in the background: the block map frozen when a commit took its
//! records, encoded a step at a time between the core's other work (`checkpoint_step`), then
//! written a part at a time (copy A, sync, copy B, sync) while journal commits go on.
//!
//! Invariant: until it is durable the previous checkpoint and the journal after it are still
//! the whole picture, so no journal page they need is overwritten (`retain_from`); a build
//! given up (the region poisoned, the frozen map inconsistent) leaves them so, and its buffer
//! is kept until any operation on it has completed.

use super::io::{completed, describe_result};
use super::{DiskOp, IoSubmit, Store, StoreIo};
use crate::buffer::AlignedBuf;
use crate::checkpoint;
use crate::error::BlockError;
use crate::layout::PAGE_SIZE;
use crate::request::{Output, ReplyTo};

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
pub(super) struct Build {
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

impl Store {
    /// Begins a background checkpoint covering the journal up to `journal_start` (the first
    /// page after the commit being started), from the map as it is now.
    pub(super) fn start_build(&mut self, journal_start: u64) {
        // The map now holds exactly what the journal will up to this commit's pages.
        let entries = self.map.freeze();
        self.force_checkpoint = false;
        self.build = Some(Build {
            seq: self.checkpoint_seq + 1,
            journal_start,
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

    /// A background checkpoint has encoding left to do (`checkpoint_step`).
    pub fn wants_step(&self) -> bool {
        self.build
            .as_ref()
            .is_some_and(|b| b.stage == BuildStage::Encoding && !b.abandoned)
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

    /// A commit finished. A background checkpoint begins with the commit that journals the
    /// records its frozen map holds (commits run one at a time): the first to finish after it
    /// began is that one.
    pub(super) fn build_base_durable(&mut self, io: &mut impl IoSubmit) {
        if let Some(b) = self.build.as_mut().filter(|b| !b.base_durable) {
            b.base_durable = true;
            self.start_build_write(io);
        }
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

    pub(super) fn build_io_done(&mut self, io: &mut impl IoSubmit, expected: u32, result: i32) {
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
    pub(super) fn give_up_build(&mut self) {
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
}
