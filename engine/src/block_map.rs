//! The map from (volume, block) to the slot that holds its newest acknowledged data, and the
//! crc32c of that data. One per core, covering only the chunks that core owns.
//!
//! Chunks are allocated on first write (thin provisioning), 32 entries of 8 bytes each:
//! about 2.3 MiB of memory per GiB written, with the hash table's overhead.

use crate::layout::CHUNK_BLOCKS;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub const UNMAPPED: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub crc: u32,
}

const EMPTY: Entry = Entry {
    slot: UNMAPPED,
    crc: 0,
};

type ChunkEntries = [Entry; CHUNK_BLOCKS as usize];

/// A cheap hasher for (u32, u64) keys: the keys are ours, not an attacker's.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64)
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}

#[derive(Default)]
pub struct BlockMap {
    chunks: HashMap<(u32, u64), Box<ChunkEntries>, BuildHasherDefault<KeyHasher>>,
    mapped: u64,
}

impl BlockMap {
    pub fn get(&self, volume: u32, block: u64) -> Option<Entry> {
        let chunk = self.chunks.get(&(volume, block / CHUNK_BLOCKS))?;
        let e = chunk[(block % CHUNK_BLOCKS) as usize];
        (e.slot != UNMAPPED).then_some(e)
    }

    /// Maps a block, returning the entry it replaced.
    pub fn insert(&mut self, volume: u32, block: u64, entry: Entry) -> Option<Entry> {
        debug_assert!(entry.slot != UNMAPPED);
        let chunk = self
            .chunks
            .entry((volume, block / CHUNK_BLOCKS))
            .or_insert_with(|| Box::new([EMPTY; CHUNK_BLOCKS as usize]));
        let old = std::mem::replace(&mut chunk[(block % CHUNK_BLOCKS) as usize], entry);
        if old.slot == UNMAPPED {
            self.mapped += 1;
            None
        } else {
            Some(old)
        }
    }

    /// Unmaps a block, returning the entry it had.
    pub fn remove(&mut self, volume: u32, block: u64) -> Option<Entry> {
        let key = (volume, block / CHUNK_BLOCKS);
        let chunk = self.chunks.get_mut(&key)?;
        let old = std::mem::replace(&mut chunk[(block % CHUNK_BLOCKS) as usize], EMPTY);
        if old.slot == UNMAPPED {
            return None;
        }
        self.mapped -= 1;
        if chunk.iter().all(|e| e.slot == UNMAPPED) {
            self.chunks.remove(&key);
        }
        Some(old)
    }

    /// Removes every block of a volume, returning their slots.
    pub fn drop_volume(&mut self, volume: u32) -> Vec<u32> {
        let keys: Vec<(u32, u64)> = self
            .chunks
            .keys()
            .filter(|k| k.0 == volume)
            .copied()
            .collect();
        let mut slots = Vec::new();
        for key in keys {
            let chunk = self.chunks.remove(&key).expect("key listed above");
            slots.extend(chunk.iter().filter(|e| e.slot != UNMAPPED).map(|e| e.slot));
        }
        self.mapped -= slots.len() as u64;
        slots
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.mapped
    }

    /// Every mapping, for a checkpoint: (volume, block, entry).
    /// Maps every block of `from` in `to` as well (to the same slots); `to` must hold nothing.
    /// Returns the slots now shared.
    pub fn clone_volume(&mut self, from: u32, to: u32) -> Vec<u32> {
        let chunks: Vec<(u64, Box<ChunkEntries>)> = self
            .chunks
            .iter()
            .filter(|(k, _)| k.0 == from)
            .map(|(k, c)| (k.1, c.clone()))
            .collect();
        let mut slots = Vec::new();
        for (chunk, entries) in chunks {
            slots.extend(
                entries
                    .iter()
                    .filter(|e| e.slot != UNMAPPED)
                    .map(|e| e.slot),
            );
            let old = self.chunks.insert((to, chunk), entries);
            debug_assert!(old.is_none(), "clone into a volume that holds blocks");
        }
        self.mapped += slots.len() as u64;
        slots
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u64, Entry)> + '_ {
        self.chunks.iter().flat_map(|(&(volume, chunk), entries)| {
            entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.slot != UNMAPPED)
                .map(move |(i, e)| (volume, chunk * CHUNK_BLOCKS + i as u64, *e))
        })
    }

    pub fn volumes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.chunks.keys().map(|k| k.0).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn mapped_blocks_of(&self, volume: u32) -> u64 {
        self.chunks
            .iter()
            .filter(|(k, _)| k.0 == volume)
            .map(|(_, c)| c.iter().filter(|e| e.slot != UNMAPPED).count() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replace_remove_and_drop() {
        let mut m = BlockMap::default();
        assert_eq!(m.insert(1, 40, Entry { slot: 3, crc: 9 }), None);
        assert_eq!(
            m.insert(1, 40, Entry { slot: 4, crc: 8 }),
            Some(Entry { slot: 3, crc: 9 })
        );
        m.insert(1, 41, Entry { slot: 5, crc: 0 });
        m.insert(2, 41, Entry { slot: 6, crc: 0 });
        assert_eq!(m.mapped_blocks(), 3);
        assert_eq!(m.remove(1, 41).map(|e| e.slot), Some(5));
        assert_eq!(m.get(1, 41), None);
        let mut dropped = m.drop_volume(1);
        dropped.sort();
        assert_eq!(dropped, vec![4]);
        assert_eq!(m.mapped_blocks(), 1);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(2, 41, Entry { slot: 6, crc: 0 })]
        );
    }
}
