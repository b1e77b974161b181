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

/// One chunk of the map, and the checkpoint generation it was last seen by (see `freeze`).
#[derive(Clone)]
struct Chunk {
    entries: ChunkEntries,
    seen: u64,
}

type Key = (u32, u64);

/// The map as it was when a checkpoint began, handed out chunk by chunk while the map goes on
/// changing: a chunk about to change before its turn is saved first (copy on write).
struct Frozen {
    keys: Vec<Key>,
    next: usize,
    saved: HashMap<Key, Box<Chunk>, BuildHasherDefault<KeyHasher>>,
    entries: u64,
}

#[derive(Default)]
pub struct BlockMap {
    chunks: HashMap<Key, Box<Chunk>, BuildHasherDefault<KeyHasher>>,
    mapped: u64,
    /// Checkpoint generation: bumped by `freeze`. A chunk whose `seen` is older is still owed
    /// to the frozen view.
    generation: u64,
    frozen: Option<Frozen>,
}

impl BlockMap {
    pub fn get(&self, volume: u32, block: u64) -> Option<Entry> {
        let chunk = self.chunks.get(&(volume, block / CHUNK_BLOCKS))?;
        let e = chunk.entries[(block % CHUNK_BLOCKS) as usize];
        (e.slot != UNMAPPED).then_some(e)
    }

    /// A chunk is about to change: if the frozen view still owes it, keep its old contents.
    fn before_change(frozen: &mut Option<Frozen>, generation: u64, key: Key, chunk: &mut Chunk) {
        if let Some(f) = frozen {
            if chunk.seen != generation {
                chunk.seen = generation;
                f.saved.insert(key, Box::new(chunk.clone()));
            }
        }
    }

    /// Maps a block, returning the entry it replaced.
    pub fn insert(&mut self, volume: u32, block: u64, entry: Entry) -> Option<Entry> {
        debug_assert!(entry.slot != UNMAPPED);
        let key = (volume, block / CHUNK_BLOCKS);
        let generation = self.generation;
        let chunk = self.chunks.entry(key).or_insert_with(|| {
            Box::new(Chunk {
                entries: [EMPTY; CHUNK_BLOCKS as usize],
                seen: generation,
            })
        });
        Self::before_change(&mut self.frozen, generation, key, chunk);
        let old = std::mem::replace(&mut chunk.entries[(block % CHUNK_BLOCKS) as usize], entry);
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
        let i = (block % CHUNK_BLOCKS) as usize;
        if chunk.entries[i].slot == UNMAPPED {
            return None;
        }
        Self::before_change(&mut self.frozen, self.generation, key, chunk);
        let old = std::mem::replace(&mut chunk.entries[i], EMPTY);
        self.mapped -= 1;
        if chunk.entries.iter().all(|e| e.slot == UNMAPPED) {
            self.chunks.remove(&key);
        }
        Some(old)
    }

    /// Removes every block of a volume, returning their slots.
    pub fn drop_volume(&mut self, volume: u32) -> Vec<u32> {
        let keys: Vec<Key> = self
            .chunks
            .keys()
            .filter(|k| k.0 == volume)
            .copied()
            .collect();
        let mut slots = Vec::new();
        for key in keys {
            let chunk = self.chunks.remove(&key).expect("key listed above");
            slots.extend(
                chunk
                    .entries
                    .iter()
                    .filter(|e| e.slot != UNMAPPED)
                    .map(|e| e.slot),
            );
            if let Some(f) = &mut self.frozen {
                if chunk.seen != self.generation {
                    f.saved.insert(key, chunk);
                }
            }
        }
        self.mapped -= slots.len() as u64;
        slots
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.mapped
    }

    /// Maps every block of `from` in `to` as well (to the same slots); `to` must hold nothing.
    /// Returns the slots now shared.
    pub fn clone_volume(&mut self, from: u32, to: u32) -> Vec<u32> {
        let chunks: Vec<(u64, ChunkEntries)> = self
            .chunks
            .iter()
            .filter(|(k, _)| k.0 == from)
            .map(|(k, c)| (k.1, c.entries))
            .collect();
        let mut slots = Vec::new();
        for (chunk, entries) in chunks {
            slots.extend(
                entries
                    .iter()
                    .filter(|e| e.slot != UNMAPPED)
                    .map(|e| e.slot),
            );
            // New to the map: not owed to a frozen view.
            let new = Box::new(Chunk {
                entries,
                seen: self.generation,
            });
            let old = self.chunks.insert((to, chunk), new);
            debug_assert!(old.is_none(), "clone into a volume that holds blocks");
        }
        self.mapped += slots.len() as u64;
        slots
    }

    /// Every mapping, for a checkpoint: (volume, block, entry).
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64, Entry)> + '_ {
        self.chunks
            .iter()
            .flat_map(|(&key, chunk)| mappings(key, &chunk.entries))
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
            .map(|(_, c)| c.entries.iter().filter(|e| e.slot != UNMAPPED).count() as u64)
            .sum()
    }

    /// Fixes the map as it is now for a checkpoint written a little at a time (`frozen_next`)
    /// while the map goes on changing; returns how many mappings it holds. Costs one key per
    /// chunk now, and a copy of each chunk that changes before its turn. A view not yet
    /// finished is replaced.
    pub fn freeze(&mut self) -> u64 {
        self.generation += 1;
        self.frozen = Some(Frozen {
            keys: self.chunks.keys().copied().collect(),
            next: 0,
            saved: Default::default(),
            entries: self.mapped,
        });
        self.mapped
    }

    /// Hands the next chunks (at most `max_chunks`) of the frozen view to `out`, as
    /// (volume, block, entry). Returns true when the view is finished (and gone).
    pub fn frozen_next(&mut self, max_chunks: usize, mut out: impl FnMut(u32, u64, Entry)) -> bool {
        let Some(f) = &mut self.frozen else {
            return true;
        };
        let end = (f.next + max_chunks).min(f.keys.len());
        for &key in &f.keys[f.next..end] {
            if let Some(old) = f.saved.remove(&key) {
                mappings(key, &old.entries).for_each(|(v, b, e)| out(v, b, e));
            } else if let Some(chunk) = self.chunks.get_mut(&key) {
                chunk.seen = self.generation;
                mappings(key, &chunk.entries).for_each(|(v, b, e)| out(v, b, e));
            } else {
                // Gone without being saved: only an empty chunk can be, and none is kept.
                debug_assert!(false, "frozen chunk {key:?} lost");
            }
        }
        f.next = end;
        if end == f.keys.len() {
            self.frozen = None;
            return true;
        }
        false
    }

    /// Mappings the frozen view held when it was made (None: no view).
    pub fn frozen_entries(&self) -> Option<u64> {
        self.frozen.as_ref().map(|f| f.entries)
    }

    /// Drops the frozen view (its checkpoint was given up).
    pub fn thaw(&mut self) {
        self.frozen = None;
    }
}

/// The mapped entries of one chunk, as (volume, block, entry).
fn mappings(key: Key, entries: &ChunkEntries) -> impl Iterator<Item = (u32, u64, Entry)> + '_ {
    let (volume, chunk) = key;
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.slot != UNMAPPED)
        .map(move |(i, e)| (volume, chunk * CHUNK_BLOCKS + i as u64, *e))
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

    /// A frozen view hands out exactly the map as it was when frozen, whatever changes
    /// (inserts, removes that empty a chunk, drops, clones over dropped volumes) come between
    /// its steps; the live map is unharmed.
    #[test]
    fn a_frozen_view_is_the_map_at_freeze_time() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for round in 0..200 {
            let mut m = BlockMap::default();
            let mut model: std::collections::BTreeMap<(u32, u64), Entry> = Default::default();
            let apply = |m: &mut BlockMap,
                         model: &mut std::collections::BTreeMap<(u32, u64), Entry>,
                         op: u64,
                         v: u32,
                         b: u64,
                         slot: u32| {
                match op {
                    0..=5 => {
                        let e = Entry {
                            slot,
                            crc: slot ^ 5,
                        };
                        assert_eq!(m.insert(v, b, e), model.insert((v, b), e));
                    }
                    6..=8 => assert_eq!(m.remove(v, b), model.remove(&(v, b))),
                    9 => {
                        m.drop_volume(v);
                        model.retain(|k, _| k.0 != v);
                    }
                    _ => {
                        let to = 3 - v; // volumes 1 and 2
                        m.drop_volume(to);
                        m.clone_volume(v, to);
                        model.retain(|k, _| k.0 != to);
                        let copied: Vec<_> = model
                            .iter()
                            .filter(|(k, _)| k.0 == v)
                            .map(|(k, e)| ((to, k.1), *e))
                            .collect();
                        model.extend(copied);
                    }
                }
            };
            for i in 0..next(400) {
                let (op, v, b) = (next(11), 1 + next(2) as u32, next(200));
                apply(&mut m, &mut model, op.min(8), v, b, i as u32);
            }
            let frozen = model.clone();
            assert_eq!(m.freeze(), frozen.len() as u64, "round {round}");
            let mut seen = Vec::new();
            let mut i = 1000;
            loop {
                for _ in 0..next(20) {
                    let (op, v, b) = (next(11), 1 + next(2) as u32, next(200));
                    apply(&mut m, &mut model, op, v, b, i);
                    i += 1;
                }
                if m.frozen_next(1 + next(3) as usize, |v, b, e| seen.push(((v, b), e))) {
                    break;
                }
            }
            seen.sort_by_key(|(k, _)| *k);
            assert_eq!(
                seen,
                frozen.into_iter().collect::<Vec<_>>(),
                "round {round}"
            );
            let mut live: Vec<_> = m.iter().map(|(v, b, e)| ((v, b), e)).collect();
            live.sort_by_key(|(k, _)| *k);
            assert_eq!(live, model.into_iter().collect::<Vec<_>>(), "round {round}");
            assert_eq!(m.frozen_entries(), None);
        }
    }
}
