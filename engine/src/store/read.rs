//! The read path: the blocks of a piece looked up in the map, runs of consecutive slots read
//! with one operation each (into a registered pool buffer when there is one), unmapped blocks
//! answered as zeros.
//!
//! Invariants: every block read is checked against the crc32c recorded when it was written;
//! a mismatch answers EIO and is logged with the volume, block and slot, never served. A slot
//! being read is counted in `readers`, so a commit that frees it defers the free
//! (`deferred_frees`) until the last read of it completes.

use super::io::describe_result;
use super::{DiskOp, IoSubmit, Store, StoreIo};
use crate::block_map::Entry;
use crate::buffer::AlignedBuf;
use crate::error::BlockError;
use crate::layout::BLOCK_SIZE;
use crate::request::Output;

impl Store {
    pub(super) fn start_read(&mut self, io: &mut impl IoSubmit, tid: usize) {
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

    pub(super) fn read_done(&mut self, tid: usize, first: u32, count: u32, result: i32) {
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
}
