//! The write path: a write (or write-zeroes) takes the per-block locks of its blocks, reserves
//! what it newly maps against the volume's quota, reads the edge blocks of a partial write
//! and merges them, writes to freshly allocated slots (redirect-on-write), and changes the
//! map once the data is written. Writes gathered in a loop iteration go out in `flush_writes`,
//! those to consecutive slots merged into one vectored write.
//!
//! Invariants: the map changes only after the data write has completed, so a block reads
//! wholly old or wholly new; the slot it replaces is freed only by the commit that records the
//! replacement (`pending_frees`). Writes to one block are serialized by its lock, so a
//! read-modify-write never loses a neighbour's bytes. A failed data write poisons the region.

use super::commit::PENDING_RECORDS_COMMIT;
use super::io::describe_result;
use super::{DiskOp, IoSubmit, Store, StoreIo};
use crate::block_map::Entry;
use crate::buffer::AlignedBuf;
use crate::error::BlockError;
use crate::journal::Record;
use crate::layout::{BLOCK_SIZE, PAGE_SIZE};
use crate::request::{Output, PieceKind};
use std::collections::VecDeque;

/// Emptied task `Vec`s a core keeps for reuse (`Store::keep_vec`): a few KiB at most.
const SPARE_VECS: usize = 64;

/// A data write waiting for the end of the loop iteration, when writes to consecutive slots
/// (from any tasks) are merged into one vectored write: slots are handed out in order, so a
/// burst of small random writes becomes a few large sequential ones.
pub(super) struct PendingWrite {
    task: usize,
    slot: u32,
    len: u32,
    ptr: *const u8,
}

/// Writes merged into one `writev`: the iovecs must live until it completes.
pub(super) struct WriteBatch {
    members: Vec<(usize, u32)>,
    iovecs: Vec<libc::iovec>,
    total: u32,
}

/// Most writes merged into one operation, and most bytes (a larger write only adds latency).
const WRITE_BATCH_MEMBERS_MAX: usize = 64;
const WRITE_BATCH_BYTES_MAX: u32 = 1 << 20;

impl Store {
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
    pub(super) fn quota(&self, volume: u32) -> Option<std::sync::Arc<crate::quota::Quota>> {
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

    /// An empty `Vec` for a task's slots or checksums, from a finished task if one is kept.
    fn spare_vec(&mut self) -> Vec<u32> {
        self.spare_vecs.pop().unwrap_or_default()
    }

    /// Keeps a finished task's `Vec` for the next write (up to `SPARE_VECS` of them).
    fn keep_vec(&mut self, mut v: Vec<u32>) {
        if self.spare_vecs.len() < SPARE_VECS && v.capacity() > 0 {
            v.clear();
            self.spare_vecs.push(v);
        }
    }

    pub(super) fn fail_task(&mut self, io: &mut impl IoSubmit, tid: usize, e: BlockError) {
        self.unlock(io, tid);
        let mut t = self.tasks.remove(tid);
        self.keep_vec(std::mem::take(&mut t.new_slots));
        self.keep_vec(std::mem::take(&mut t.crcs));
        if t.reserved > 0 {
            if let Some(q) = self.quota(t.arrived.piece.volume) {
                q.sub(t.reserved);
            }
        }
        self.reply(t.arrived.reply, Err(e));
    }

    pub(super) fn start_write(&mut self, io: &mut impl IoSubmit, tid: usize) {
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

    pub(super) fn edge_read_done(
        &mut self,
        io: &mut impl IoSubmit,
        tid: usize,
        index: u32,
        result: i32,
    ) {
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

    pub(super) fn issue_writes(&mut self, io: &mut impl IoSubmit, tid: usize) {
        if self.poisoned {
            // No commit will free space, nor vouch for the data.
            return self.fail_task(io, tid, BlockError::Io);
        }
        let count = self.tasks[tid].block_count as usize;
        let mut slots = self.spare_vec();
        slots.reserve(count);
        for _ in 0..count {
            match self.alloc.allocate() {
                Some(s) => slots.push(s),
                None => break,
            }
        }
        if slots.len() < count {
            for &s in &slots {
                self.alloc.release(s);
            }
            self.keep_vec(slots);
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
            for &s in &slots {
                self.alloc.release(s);
            }
            self.keep_vec(slots);
            log!("torus: core {}: the block map is full ({} entries: snapshots share slots, and a checkpoint holds no more); answering ENOSPC", self.core, self.entries_max);
            self.fail_task(io, tid, BlockError::NoSpace);
            return;
        }
        self.entries_pending += new_entries;
        let mut crcs = self.spare_vec();
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
        crcs.extend(bytes.chunks_exact(BLOCK_SIZE).map(crc32c::crc32c));
        t.crcs = crcs;
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

    pub(super) fn write_done(
        &mut self,
        io: &mut impl IoSubmit,
        tid: usize,
        expected: u32,
        result: i32,
    ) {
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
        let mut t = self.tasks.remove(tid);
        self.keep_vec(std::mem::take(&mut t.new_slots));
        self.keep_vec(std::mem::take(&mut t.crcs));
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

    /// Submits the data writes queued in this loop iteration, merging writes to consecutive
    /// slots into one vectored write. Called by the reactor before every submit.
    pub(crate) fn flush_writes(&mut self, io: &mut impl IoSubmit) {
        if self.pending_writes.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut self.spare_writes);
        let mut writes = std::mem::replace(&mut self.pending_writes, spare);
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
        writes.clear();
        self.spare_writes = writes;
    }

    /// A vectored write of several tasks' data completed: each member is done as if written
    /// alone, with its share of the result (or the error).
    pub(super) fn batch_write_done(&mut self, io: &mut impl IoSubmit, batch: usize, result: i32) {
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
}
