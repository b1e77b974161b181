//! On-disk layout of one node's backing store, and its superblock.
//!
//! ```text
//! page 0, 1      superblock, two identical copies (a damaged one is told apart by its crc)
//! region 0       core 0: checkpoint A | checkpoint B | journal ring A | journal ring B | data slots
//! region 1       core 1: ...
//! ```
//!
//! Everything is addressed in 4 KiB pages. The number of regions is fixed when the store is
//! formatted: it is the number of cores that own a shard of the block space. All integers are
//! little-endian. The superblock carries a magic, a format version and a crc32c.
//!
//! The journal is written twice (rings A and B, same sequence numbers): a page damaged in one
//! ring is read from the other, so a bit flip in the journal is never taken for a torn tail.

use crate::error::EngineError;
use std::path::Path;

pub const PAGE_SIZE: usize = 4096;
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per chunk: a chunk (128 KiB of a volume) is the unit of placement.
pub const CHUNK_BLOCKS: u64 = 32;
pub const CHUNK_SIZE: u64 = CHUNK_BLOCKS * BLOCK_SIZE as u64;
pub const FORMAT_VERSION: u32 = 1;
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TORUSSB\0";
pub const SUPERBLOCK_COPIES: u64 = 2;
/// Placement groups per node; fixed at format time. `core = pg % cores`.
pub const PG_COUNT_DEFAULT: u32 = 256;
/// Bytes one checkpoint entry takes (volume u32, block u64, slot u32, crc u32).
pub const CHECKPOINT_ENTRY_SIZE: u64 = 20;
/// Each journal ring is 1/128 of a region, between these bounds (pages).
pub const JOURNAL_PAGES_MIN: u64 = 256;
pub const JOURNAL_PAGES_MAX: u64 = 16384;
/// The smallest region that still holds a useful number of slots.
pub const REGION_SLOTS_MIN: u64 = 256;

/// Geometry of the store, as written in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cores: u32,
    pub pg_count: u32,
    pub total_pages: u64,
    pub region_pages: u64,
    pub slots_per_region: u64,
    pub checkpoint_pages: u64,
    pub journal_pages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub geometry: Geometry,
    pub node_id: [u8; 16],
    pub created_unix: u64,
}

/// Where one core's parts start, in pages from the start of the backing store.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub core: usize,
    pub checkpoint_a: u64,
    pub checkpoint_b: u64,
    pub checkpoint_pages: u64,
    pub journal: u64,
    pub journal_b: u64,
    pub journal_pages: u64,
    pub slots: u64,
    pub slot_count: u64,
}

impl Region {
    pub fn slot_byte_offset(&self, slot: u32) -> u64 {
        debug_assert!((slot as u64) < self.slot_count);
        (self.slots + slot as u64) * PAGE_SIZE as u64
    }
    /// Most block map entries a checkpoint copy holds (its pages after the header).
    pub fn checkpoint_entries_max(&self) -> u64 {
        (self.checkpoint_pages - 1) * PAGE_SIZE as u64 / CHECKPOINT_ENTRY_SIZE
    }
    /// Where the page with this sequence number lives in ring A.
    pub fn journal_byte_offset(&self, page_seq: u64) -> u64 {
        (self.journal + page_seq % self.journal_pages) * PAGE_SIZE as u64
    }
    /// Where the page with this sequence number lives in ring B.
    pub fn journal_b_byte_offset(&self, page_seq: u64) -> u64 {
        (self.journal_b + page_seq % self.journal_pages) * PAGE_SIZE as u64
    }
}

pub(crate) fn checkpoint_pages_for(slots: u64) -> u64 {
    1 + (slots * CHECKPOINT_ENTRY_SIZE).div_ceil(PAGE_SIZE as u64)
}

impl Geometry {
    /// Lay out `total_bytes` for `cores` regions. Errors when the store is too small.
    pub fn compute(total_bytes: u64, cores: u32, path: &Path) -> Result<Geometry, EngineError> {
        assert!(cores > 0);
        let total_pages = total_bytes / PAGE_SIZE as u64;
        let too_small = || EngineError::TooSmall {
            path: path.to_owned(),
            size: total_bytes,
            min: min_bytes(cores),
        };
        let region_pages = total_pages
            .checked_sub(SUPERBLOCK_COPIES)
            .ok_or_else(too_small)?
            / cores as u64;
        let journal_pages = (region_pages / 128).clamp(JOURNAL_PAGES_MIN, JOURNAL_PAGES_MAX);
        let room = region_pages
            .checked_sub(2 * journal_pages)
            .ok_or_else(too_small)?;
        // slots + 2 * checkpoint_pages(slots) <= room; start from an estimate and step down.
        let mut slots = room * PAGE_SIZE as u64 / (PAGE_SIZE as u64 + 2 * CHECKPOINT_ENTRY_SIZE);
        while slots > 0 && slots + 2 * checkpoint_pages_for(slots) > room {
            slots -= 1;
        }
        // Slots are numbered with u32 in the journal and the map.
        slots = slots.min(u32::MAX as u64 - 1);
        if slots < REGION_SLOTS_MIN {
            return Err(too_small());
        }
        Ok(Geometry {
            cores,
            pg_count: PG_COUNT_DEFAULT,
            total_pages,
            region_pages,
            slots_per_region: slots,
            checkpoint_pages: checkpoint_pages_for(slots),
            journal_pages,
        })
    }

    pub fn region(&self, core: usize) -> Region {
        assert!(core < self.cores as usize);
        let start = SUPERBLOCK_COPIES + core as u64 * self.region_pages;
        Region {
            core,
            checkpoint_a: start,
            checkpoint_b: start + self.checkpoint_pages,
            checkpoint_pages: self.checkpoint_pages,
            journal: start + 2 * self.checkpoint_pages,
            journal_b: start + 2 * self.checkpoint_pages + self.journal_pages,
            journal_pages: self.journal_pages,
            slots: start + 2 * self.checkpoint_pages + 2 * self.journal_pages,
            slot_count: self.slots_per_region,
        }
    }

    /// Bytes of volume data this store can hold.
    pub fn capacity_bytes(&self) -> u64 {
        self.slots_per_region * self.cores as u64 * BLOCK_SIZE as u64
    }
}

pub fn min_bytes(cores: u32) -> u64 {
    let per_region =
        2 * JOURNAL_PAGES_MIN + REGION_SLOTS_MIN + 2 * checkpoint_pages_for(REGION_SLOTS_MIN);
    (SUPERBLOCK_COPIES + per_region * cores as u64) * PAGE_SIZE as u64
}

// Superblock encoding: fixed offsets inside one page.
const SB_MAGIC: usize = 0; // [u8; 8]
const SB_VERSION: usize = 8; // u32
const SB_PAGE_SIZE: usize = 12; // u32
const SB_NODE_ID: usize = 16; // [u8; 16]
const SB_CORES: usize = 32; // u32
const SB_PG_COUNT: usize = 36; // u32
const SB_TOTAL_PAGES: usize = 40; // u64
const SB_REGION_PAGES: usize = 48; // u64
const SB_SLOTS: usize = 56; // u64
const SB_CHECKPOINT_PAGES: usize = 64; // u64
const SB_JOURNAL_PAGES: usize = 72; // u64
const SB_CREATED: usize = 80; // u64
const SB_CRC: usize = 88; // u32, crc32c of bytes [0, SB_CRC)
const SB_LEN: usize = 92;
const _: () = assert!(SB_LEN <= PAGE_SIZE);

#[derive(Debug, PartialEq, Eq)]
pub enum SuperblockDecode {
    Ok(Superblock),
    NotTorus,
    BadChecksum,
    Version(u32),
}

impl Superblock {
    pub fn encode(&self) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        let g = &self.geometry;
        p[SB_MAGIC..SB_MAGIC + 8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut p, SB_VERSION, FORMAT_VERSION);
        put_u32(&mut p, SB_PAGE_SIZE, PAGE_SIZE as u32);
        p[SB_NODE_ID..SB_NODE_ID + 16].copy_from_slice(&self.node_id);
        put_u32(&mut p, SB_CORES, g.cores);
        put_u32(&mut p, SB_PG_COUNT, g.pg_count);
        put_u64(&mut p, SB_TOTAL_PAGES, g.total_pages);
        put_u64(&mut p, SB_REGION_PAGES, g.region_pages);
        put_u64(&mut p, SB_SLOTS, g.slots_per_region);
        put_u64(&mut p, SB_CHECKPOINT_PAGES, g.checkpoint_pages);
        put_u64(&mut p, SB_JOURNAL_PAGES, g.journal_pages);
        put_u64(&mut p, SB_CREATED, self.created_unix);
        let crc = crc32c::crc32c(&p[..SB_CRC]);
        put_u32(&mut p, SB_CRC, crc);
        p
    }

    pub fn decode(p: &[u8]) -> SuperblockDecode {
        assert!(p.len() >= SB_LEN);
        if p[SB_MAGIC..SB_MAGIC + 8] != SUPERBLOCK_MAGIC {
            return SuperblockDecode::NotTorus;
        }
        if crc32c::crc32c(&p[..SB_CRC]) != get_u32(p, SB_CRC) {
            return SuperblockDecode::BadChecksum;
        }
        let version = get_u32(p, SB_VERSION);
        if version != FORMAT_VERSION || get_u32(p, SB_PAGE_SIZE) != PAGE_SIZE as u32 {
            return SuperblockDecode::Version(version);
        }
        let mut node_id = [0u8; 16];
        node_id.copy_from_slice(&p[SB_NODE_ID..SB_NODE_ID + 16]);
        let geometry = Geometry {
            cores: get_u32(p, SB_CORES),
            pg_count: get_u32(p, SB_PG_COUNT),
            total_pages: get_u64(p, SB_TOTAL_PAGES),
            region_pages: get_u64(p, SB_REGION_PAGES),
            slots_per_region: get_u64(p, SB_SLOTS),
            checkpoint_pages: get_u64(p, SB_CHECKPOINT_PAGES),
            journal_pages: get_u64(p, SB_JOURNAL_PAGES),
        };
        // A checksummed superblock with impossible geometry is still refused.
        let sane = geometry.cores > 0
            && geometry.cores <= 1024
            && geometry.pg_count > 0
            && geometry.journal_pages > 0
            && geometry.slots_per_region > 0
            && geometry.slots_per_region < u32::MAX as u64
            && geometry.checkpoint_pages == checkpoint_pages_for(geometry.slots_per_region)
            && 2 * geometry.checkpoint_pages
                + 2 * geometry.journal_pages
                + geometry.slots_per_region
                <= geometry.region_pages
            && SUPERBLOCK_COPIES + geometry.region_pages.saturating_mul(geometry.cores as u64)
                <= geometry.total_pages;
        if !sane {
            return SuperblockDecode::BadChecksum;
        }
        SuperblockDecode::Ok(Superblock {
            geometry,
            node_id,
            created_unix: get_u64(p, SB_CREATED),
        })
    }
}

pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Which placement group a chunk of a volume belongs to (splitmix64 of both).
/// A volume id's low 24 bits name its *family*: a volume and the snapshots and clones made
/// from it, which share blocks and so must share placement. The high 8 bits number the
/// members of a family (0 for the volume itself).
pub const FAMILY_MASK: u32 = 0x00FF_FFFF;

/// The family a volume id belongs to (see `FAMILY_MASK`).
pub fn family(volume_id: u32) -> u32 {
    volume_id & FAMILY_MASK
}

pub fn placement_group(volume_id: u32, chunk_index: u64, pg_count: u32) -> u32 {
    let mut z = (family(volume_id) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk_index;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % pg_count as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_inside_the_store() {
        for &(bytes, cores) in &[
            (64u64 << 20, 1u32),
            (1 << 30, 2),
            (10 << 30, 4),
            (3 << 40, 64),
        ] {
            let g = Geometry::compute(bytes, cores, Path::new("x")).unwrap();
            let last = g.region(cores as usize - 1);
            assert!(last.slots + last.slot_count <= g.total_pages);
            assert!(
                g.checkpoint_pages * PAGE_SIZE as u64
                    >= PAGE_SIZE as u64 + g.slots_per_region * CHECKPOINT_ENTRY_SIZE
            );
        }
    }

    #[test]
    fn tiny_store_is_refused() {
        assert!(Geometry::compute(1 << 20, 2, Path::new("x")).is_err());
        assert!(Geometry::compute(min_bytes(2), 2, Path::new("x")).is_ok());
    }

    #[test]
    fn superblock_roundtrip_and_damage() {
        let g = Geometry::compute(1 << 30, 2, Path::new("x")).unwrap();
        let sb = Superblock {
            geometry: g,
            node_id: [7; 16],
            created_unix: 42,
        };
        let mut p = sb.encode();
        assert_eq!(Superblock::decode(&p), SuperblockDecode::Ok(sb));
        p[50] ^= 1;
        assert_eq!(Superblock::decode(&p), SuperblockDecode::BadChecksum);
        p[0] = b'X';
        assert_eq!(Superblock::decode(&p), SuperblockDecode::NotTorus);
    }

    #[test]
    fn placement_spreads_chunks_over_groups() {
        let mut counts = [0u32; 16];
        for c in 0..16_000 {
            counts[placement_group(3, c, 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }
}
