//! A node's store in the simulation, one per core, with the engine's contract: a write is
//! durable once a flush of its core that followed it completes; a crash keeps or loses each
//! write since. (The engine itself runs on a simulated disk in `torus_engine::testing::sim`.)
//!
//! A block holds a version number (its first eight bytes; the client writes whole blocks);
//! a listing's checksum is derived from it.

use super::world::{CORES, PGS, VOLUME};
use std::collections::BTreeMap;
use std::sync::Arc;
use torus_engine::layout::placement_group;
use torus_engine::{AlignedBuf, BlockError, Output, Piece, PieceKind, BLOCK_SIZE, CHUNK_SIZE};

pub(super) fn pg_of_block(block: u64) -> u32 {
    placement_group(VOLUME, block * BLOCK_SIZE as u64 / CHUNK_SIZE, PGS)
}

pub(super) fn core_of(volume: u32, offset: u64) -> usize {
    (placement_group(volume, offset / CHUNK_SIZE, PGS) as usize) % CORES
}

/// A block's contents: `v` in its first eight bytes.
pub(super) fn block_data(values: &[u64]) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(values.len() * BLOCK_SIZE);
    for (i, v) in values.iter().enumerate() {
        buf[i * BLOCK_SIZE..i * BLOCK_SIZE + 8].copy_from_slice(&v.to_le_bytes());
    }
    buf
}

pub(super) fn value_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

#[derive(Default)]
pub(super) struct CoreStore {
    durable: BTreeMap<(u32, u64), u64>,
    /// Writes since the last flush, in order (None: unmapped).
    volatile: Vec<((u32, u64), Option<u64>)>,
}

impl CoreStore {
    pub fn get(&self, key: (u32, u64)) -> Option<u64> {
        for (k, v) in self.volatile.iter().rev() {
            if *k == key {
                return *v;
            }
        }
        self.durable.get(&key).copied()
    }

    fn put(&mut self, key: (u32, u64), v: Option<u64>) {
        self.volatile.push((key, v));
    }

    pub fn flush(&mut self) {
        for (k, v) in self.volatile.drain(..) {
            match v {
                Some(v) => self.durable.insert(k, v),
                None => self.durable.remove(&k),
            };
        }
    }

    /// The process died: each write since the last flush is kept if `keep` says so.
    pub fn crash(&mut self, mut keep: impl FnMut() -> bool) {
        for (k, v) in std::mem::take(&mut self.volatile) {
            if keep() {
                match v {
                    Some(v) => self.durable.insert(k, v),
                    None => self.durable.remove(&k),
                };
            }
        }
    }

    /// Every block now, (volume, block) → version.
    pub fn blocks(&self) -> BTreeMap<(u32, u64), u64> {
        let mut all = self.durable.clone();
        for (k, v) in &self.volatile {
            match v {
                Some(v) => all.insert(*k, *v),
                None => all.remove(k),
            };
        }
        all
    }

    /// (volume, block, checksum) of the PGs asked for.
    pub fn list(&self, pgs: &[bool]) -> Vec<(u32, u64, u32)> {
        self.blocks()
            .into_iter()
            .filter(|((_, b), _)| pgs.get(pg_of_block(*b) as usize).copied().unwrap_or(false))
            .map(|((vol, b), v)| (vol, b, (v ^ (v >> 32)) as u32))
            .collect()
    }

    /// Does what a piece asks; `canary`: a flush that makes nothing durable.
    pub fn apply(&mut self, p: &Piece, canary: bool) -> Result<Output, BlockError> {
        let whole = p.offset.is_multiple_of(BLOCK_SIZE as u64)
            && (p.len as usize).is_multiple_of(BLOCK_SIZE);
        if !whole && !matches!(p.kind, PieceKind::Flush) {
            return Err(BlockError::Invalid);
        }
        let first = p.offset / BLOCK_SIZE as u64;
        let blocks = first..first + (p.len as usize / BLOCK_SIZE) as u64;
        match &p.kind {
            PieceKind::Write {
                data,
                data_offset,
                fua,
            } => {
                for (i, b) in blocks.enumerate() {
                    let v = value_at(data, data_offset + i * BLOCK_SIZE);
                    self.put((p.volume, b), (v != 0).then_some(v));
                }
                if *fua && !canary {
                    self.flush();
                }
                Ok(Output::Done)
            }
            PieceKind::Zero { fua } => {
                for b in blocks {
                    self.put((p.volume, b), None);
                }
                if *fua && !canary {
                    self.flush();
                }
                Ok(Output::Done)
            }
            PieceKind::Read => {
                let values: Vec<u64> = blocks
                    .map(|b| self.get((p.volume, b)).unwrap_or(0))
                    .collect();
                Ok(Output::Read {
                    data: block_data(&values),
                    head: 0,
                })
            }
            PieceKind::Status => Ok(Output::Status {
                mapped: blocks.map(|b| self.get((p.volume, b)).is_some()).collect(),
            }),
            PieceKind::Flush => {
                if !canary {
                    self.flush();
                }
                Ok(Output::Done)
            }
        }
    }
}

/// A read's data as versions, one per block.
pub(super) fn values_of(o: &Output) -> Vec<u64> {
    match o {
        Output::Read { data, head } => (0..(data.len() - head) / BLOCK_SIZE)
            .map(|i| value_at(data, head + i * BLOCK_SIZE))
            .collect(),
        _ => Vec::new(),
    }
}

#[allow(dead_code)]
pub(super) fn shared_data(values: &[u64]) -> Arc<AlignedBuf> {
    Arc::new(block_data(values))
}
