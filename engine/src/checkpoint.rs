//! Checkpoints: the whole block map of one core, written twice (copy A, then copy B), so that
//! recovery reads one checkpoint and the journal written after it instead of the whole journal.
//!
//! Header page: magic u32, crc32c u32 (of the header page with this field zero), version u16,
//! 6 zero bytes, checkpoint sequence u64, journal start sequence u64, entry count u64, crc32c of
//! the entry bytes u32. Entries follow from the second page: volume u32, block u64, slot u32,
//! data crc32c u32 (20 bytes each), little-endian.
//!
//! The journal start is the first journal page written after the checkpoint. Journal pages are
//! not overwritten until the *next* checkpoint is durable, so the older copy with the journal
//! that follows it is still a complete picture if the newer copy is damaged.

use crate::block_map::Entry;
use crate::buffer::AlignedBuf;
use crate::layout::{
    get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, CHECKPOINT_ENTRY_SIZE, PAGE_SIZE,
};

pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"TCKP");
pub const CHECKPOINT_VERSION: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub seq: u64,
    pub journal_start: u64,
    pub entry_count: u64,
    pub body_crc: u32,
}

impl CheckpointHeader {
    /// Pages the whole checkpoint (header and entries) occupies.
    pub fn pages(&self) -> u64 {
        1 + (self.entry_count * CHECKPOINT_ENTRY_SIZE).div_ceil(PAGE_SIZE as u64)
    }
}

/// Serializes a checkpoint into an aligned buffer ready to be written.
pub fn encode(seq: u64, journal_start: u64, entries: &[(u32, u64, Entry)]) -> AlignedBuf {
    let mut buf = buffer_for(entries.len() as u64);
    for (i, (volume, block, e)) in entries.iter().enumerate() {
        put_entry(&mut buf, i as u64, *volume, *block, *e);
    }
    let body_crc = crc32c::crc32c(entry_bytes(&buf, 0, entries.len() as u64));
    put_header(&mut buf, seq, journal_start, entries.len() as u64, body_crc);
    buf
}

/// A zeroed buffer for a checkpoint of `entries` mappings (header page, then the entries).
pub fn buffer_for(entries: u64) -> AlignedBuf {
    AlignedBuf::zeroed(PAGE_SIZE + (entries * CHECKPOINT_ENTRY_SIZE) as usize)
}

/// Puts mapping number `i` into a checkpoint buffer.
pub fn put_entry(buf: &mut [u8], i: u64, volume: u32, block: u64, e: Entry) {
    let at = PAGE_SIZE + (i * CHECKPOINT_ENTRY_SIZE) as usize;
    put_u32(buf, at, volume);
    put_u64(buf, at + 4, block);
    put_u32(buf, at + 12, e.slot);
    put_u32(buf, at + 16, e.crc);
}

/// The bytes of mappings `from..to` in a checkpoint buffer (to checksum them a part at a time).
pub fn entry_bytes(buf: &[u8], from: u64, to: u64) -> &[u8] {
    &buf[PAGE_SIZE + (from * CHECKPOINT_ENTRY_SIZE) as usize
        ..PAGE_SIZE + (to * CHECKPOINT_ENTRY_SIZE) as usize]
}

/// Writes the header page once every entry is in: `body_crc` is the crc32c of all of them.
pub fn put_header(buf: &mut [u8], seq: u64, journal_start: u64, entries: u64, body_crc: u32) {
    let header = &mut buf[..PAGE_SIZE];
    put_u32(header, 0, CHECKPOINT_MAGIC);
    put_u16(header, 8, CHECKPOINT_VERSION);
    put_u64(header, 16, seq);
    put_u64(header, 24, journal_start);
    put_u64(header, 32, entries);
    put_u32(header, 40, body_crc);
    let crc = header_crc(header);
    put_u32(header, 4, crc);
}

fn header_crc(page: &[u8]) -> u32 {
    let c = crc32c::crc32c(&page[..4]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &page[8..PAGE_SIZE])
}

/// Decodes a header page. None if it is not a valid checkpoint header (or never written).
pub fn decode_header(page: &[u8], max_entries: u64) -> Option<CheckpointHeader> {
    if page.len() < PAGE_SIZE
        || get_u32(page, 0) != CHECKPOINT_MAGIC
        || header_crc(page) != get_u32(page, 4)
    {
        return None;
    }
    if get_u16(page, 8) != CHECKPOINT_VERSION {
        return None;
    }
    let h = CheckpointHeader {
        seq: get_u64(page, 16),
        journal_start: get_u64(page, 24),
        entry_count: get_u64(page, 32),
        body_crc: get_u32(page, 40),
    };
    (h.entry_count <= max_entries).then_some(h)
}

/// Decodes the entries; None if the body fails its checksum.
pub fn decode_body(h: &CheckpointHeader, body: &[u8]) -> Option<Vec<(u32, u64, Entry)>> {
    let len = (h.entry_count * CHECKPOINT_ENTRY_SIZE) as usize;
    if body.len() < len || crc32c::crc32c(&body[..len]) != h.body_crc {
        return None;
    }
    Some(
        (0..h.entry_count as usize)
            .map(|i| {
                let at = i * CHECKPOINT_ENTRY_SIZE as usize;
                (
                    get_u32(body, at),
                    get_u64(body, at + 4),
                    Entry {
                        slot: get_u32(body, at + 12),
                        crc: get_u32(body, at + 16),
                    },
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_flips_in_header_or_body_are_detected() {
        let entries: Vec<_> = (0..500u64)
            .map(|i| {
                (
                    1u32,
                    i * 3,
                    Entry {
                        slot: i as u32,
                        crc: i as u32 * 7,
                    },
                )
            })
            .collect();
        let buf = encode(9, 1234, &entries);
        let h = decode_header(&buf[..PAGE_SIZE], 10_000).unwrap();
        assert_eq!((h.seq, h.journal_start, h.entry_count), (9, 1234, 500));
        assert_eq!(h.pages() as usize * PAGE_SIZE, buf.len());
        assert_eq!(decode_body(&h, &buf[PAGE_SIZE..]).unwrap(), entries);
        let mut bad = buf[..].to_vec();
        bad[PAGE_SIZE + 333] ^= 4;
        assert!(decode_body(&h, &bad[PAGE_SIZE..]).is_none());
        bad[20] ^= 1;
        assert!(decode_header(&bad[..PAGE_SIZE], 10_000).is_none());
        assert!(
            decode_header(&buf[..PAGE_SIZE], 10).is_none(),
            "more entries than slots"
        );
    }
}
