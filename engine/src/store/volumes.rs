//! Whole volumes on this core: dropping one, cloning one onto another of its family (a
//! snapshot, a clone, a restore: the slots are shared, not copied), and what volumes hold
//! (`exclusive_blocks`, `list_blocks`).
//!
//! Invariant: a drop or a clone is answered once its journal record is durable; a clone that
//! would give the map more entries than a checkpoint holds answers ENOSPC and changes nothing.

use super::{IoSubmit, Store};
use crate::error::BlockError;
use crate::journal::Record;
use crate::layout::BLOCK_SIZE;
use crate::request::ReplyTo;

impl Store {
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
}
