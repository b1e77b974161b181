//! The journal: a ring of 4 KiB pages of checksummed records, one ring per core.
//!
//! A record makes a write visible (`Map`), a trim (`Unmap`), a deletion (`DropVolume`), or a
//! snapshot or clone (`Clone`: every block of one volume mapped in another, to the same slots).
//! Pages are written only by a commit, which first makes the data the records point at
//! durable (fdatasync), then writes the pages, then fdatasyncs again. Commits are serial, so
//! every page of commit k is durable before any page of commit k+1 is written.
//!
//! Page header: magic u32, crc32c u32 (of the page with this field zero), page sequence u64,
//! first page sequence of its commit u64, record count u16, format version u16, then records
//! of 24 bytes: kind u8, 3 zero bytes, volume u32, block u64, slot u32, data crc32c u32.
//!
//! Recovery reads pages from the checkpoint's start sequence while each page is valid and
//! carries the expected sequence. At the first invalid page it looks further: a valid page of a
//! *later commit* means the invalid page was acknowledged and then damaged (an error), while an
//! invalid page followed only by pages of its own commit is a torn tail (dropped).

use crate::layout::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, PAGE_SIZE};

pub const JOURNAL_MAGIC: u32 = u32::from_le_bytes(*b"TJNL");
pub const JOURNAL_VERSION: u16 = 1;
pub const PAGE_HEADER_SIZE: usize = 32;
pub const RECORD_SIZE: usize = 24;
pub const RECORDS_PER_PAGE: usize = (PAGE_SIZE - PAGE_HEADER_SIZE) / RECORD_SIZE;
const _: () = assert!(PAGE_HEADER_SIZE + RECORDS_PER_PAGE * RECORD_SIZE <= PAGE_SIZE);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Map {
        volume: u32,
        block: u64,
        slot: u32,
        crc: u32,
    },
    Unmap {
        volume: u32,
        block: u64,
    },
    DropVolume {
        volume: u32,
    },
    /// Every block `from` maps at this point, mapped in `to` too (stored as volume = from,
    /// block = to).
    Clone {
        from: u32,
        to: u32,
    },
}

const KIND_MAP: u8 = 1;
const KIND_UNMAP: u8 = 2;
const KIND_DROP_VOLUME: u8 = 3;
const KIND_CLONE: u8 = 4;

impl Record {
    fn encode(&self, out: &mut [u8]) {
        out[..RECORD_SIZE].fill(0);
        let (kind, volume, block, slot, crc) = match *self {
            Record::Map {
                volume,
                block,
                slot,
                crc,
            } => (KIND_MAP, volume, block, slot, crc),
            Record::Unmap { volume, block } => (KIND_UNMAP, volume, block, 0, 0),
            Record::DropVolume { volume } => (KIND_DROP_VOLUME, volume, 0, 0, 0),
            Record::Clone { from, to } => (KIND_CLONE, from, to as u64, 0, 0),
        };
        out[0] = kind;
        put_u32(out, 4, volume);
        put_u64(out, 8, block);
        put_u32(out, 16, slot);
        put_u32(out, 20, crc);
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let volume = get_u32(b, 4);
        let block = get_u64(b, 8);
        match b[0] {
            KIND_MAP => Some(Record::Map {
                volume,
                block,
                slot: get_u32(b, 16),
                crc: get_u32(b, 20),
            }),
            KIND_UNMAP => Some(Record::Unmap { volume, block }),
            KIND_DROP_VOLUME => Some(Record::DropVolume { volume }),
            KIND_CLONE if block <= u32::MAX as u64 => Some(Record::Clone {
                from: volume,
                to: block as u32,
            }),
            _ => None,
        }
    }
}

/// Encodes up to RECORDS_PER_PAGE records into one page.
pub fn encode_page(page: &mut [u8], seq: u64, commit_first_seq: u64, records: &[Record]) {
    assert!(records.len() <= RECORDS_PER_PAGE);
    assert_eq!(page.len(), PAGE_SIZE);
    page.fill(0);
    put_u32(page, 0, JOURNAL_MAGIC);
    put_u64(page, 8, seq);
    put_u64(page, 16, commit_first_seq);
    put_u16(page, 24, records.len() as u16);
    put_u16(page, 26, JOURNAL_VERSION);
    for (i, r) in records.iter().enumerate() {
        let at = PAGE_HEADER_SIZE + i * RECORD_SIZE;
        r.encode(&mut page[at..at + RECORD_SIZE]);
    }
    let crc = page_crc(page);
    put_u32(page, 4, crc);
}

fn page_crc(page: &[u8]) -> u32 {
    let c = crc32c::crc32c(&page[..4]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &page[8..])
}

#[derive(Debug, PartialEq, Eq)]
pub struct DecodedPage {
    pub seq: u64,
    pub commit_first_seq: u64,
    pub records: Vec<Record>,
}

/// True when the page carries the journal magic (it was written at some time).
pub fn page_written(page: &[u8]) -> bool {
    page.len() >= 4 && get_u32(page, 0) == JOURNAL_MAGIC
}

/// Decodes a page; None when it is not a valid journal page (torn, damaged, or never written).
pub fn decode_page(page: &[u8]) -> Option<DecodedPage> {
    if page.len() != PAGE_SIZE
        || get_u32(page, 0) != JOURNAL_MAGIC
        || page_crc(page) != get_u32(page, 4)
    {
        return None;
    }
    if get_u16(page, 26) != JOURNAL_VERSION {
        return None;
    }
    let count = get_u16(page, 24) as usize;
    if count > RECORDS_PER_PAGE {
        return None;
    }
    let seq = get_u64(page, 8);
    let commit_first_seq = get_u64(page, 16);
    if commit_first_seq > seq {
        return None;
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let at = PAGE_HEADER_SIZE + i * RECORD_SIZE;
        records.push(Record::decode(&page[at..at + RECORD_SIZE])?);
    }
    Some(DecodedPage {
        seq,
        commit_first_seq,
        records,
    })
}

/// How a journal scan ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Next page was never written or belongs to an older lap: a clean end.
    Clean,
    /// Pages of the last commit were torn by a crash: dropped.
    TornTail { first_bad_seq: u64 },
    /// A page is invalid although a later commit was made durable after it.
    Damaged { bad_seq: u64, later_seq: u64 },
}

/// Scans the ring starting at `start_seq`. `read_page(seq)` returns the page stored at the
/// ring position of that sequence. Returns the valid pages in order and how the scan ended.
pub fn scan(
    start_seq: u64,
    ring_pages: u64,
    mut read_page: impl FnMut(u64) -> Vec<u8>,
) -> (Vec<DecodedPage>, ScanEnd) {
    let mut pages = Vec::new();
    let mut seq = start_seq;
    loop {
        if seq - start_seq >= ring_pages {
            return (pages, ScanEnd::Clean);
        }
        let raw = read_page(seq);
        let written = get_u32(&raw, 0) == JOURNAL_MAGIC;
        match decode_page(&raw) {
            Some(p) if p.seq == seq => {
                pages.push(p);
                seq += 1;
            }
            Some(p) if p.seq > seq => {
                // A page claiming a later sequence in this position is damage.
                return (
                    pages,
                    ScanEnd::Damaged {
                        bad_seq: seq,
                        later_seq: p.seq,
                    },
                );
            }
            other => {
                // Unwritten, invalid, or a page of an older lap: normally the end. Look ahead:
                // a page of a later commit in this lap means this page was made durable and
                // then lost (damaged, or its write went elsewhere in both rings).
                let bad_seq = seq;
                let older_lap = other.is_some();
                let mut look = seq + 1;
                while look - start_seq < ring_pages {
                    match decode_page(&read_page(look)) {
                        Some(p) if p.seq == look => {
                            if p.commit_first_seq > bad_seq {
                                return (
                                    pages,
                                    ScanEnd::Damaged {
                                        bad_seq,
                                        later_seq: look,
                                    },
                                );
                            }
                            look += 1;
                        }
                        _ => break,
                    }
                }
                let end = if (older_lap || !written) && look == seq + 1 {
                    ScanEnd::Clean
                } else {
                    ScanEnd::TornTail {
                        first_bad_seq: bad_seq,
                    }
                };
                return (pages, end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(pages: &[(u64, u64, Vec<Record>)], ring: u64) -> Vec<Vec<u8>> {
        let mut r = vec![vec![0u8; PAGE_SIZE]; ring as usize];
        for (seq, first, recs) in pages {
            encode_page(&mut r[(*seq % ring) as usize], *seq, *first, recs);
        }
        r
    }

    fn rec(block: u64) -> Record {
        Record::Map {
            volume: 1,
            block,
            slot: block as u32,
            crc: 7,
        }
    }

    #[test]
    fn page_roundtrip_and_every_bit_flip_is_detected() {
        let recs = vec![
            rec(1),
            Record::Unmap {
                volume: 2,
                block: 9,
            },
            Record::DropVolume { volume: 4 },
        ];
        let mut page = vec![0u8; PAGE_SIZE];
        encode_page(&mut page, 10, 9, &recs);
        assert_eq!(
            decode_page(&page),
            Some(DecodedPage {
                seq: 10,
                commit_first_seq: 9,
                records: recs
            })
        );
        for byte in (0..PAGE_SIZE).step_by(97) {
            let mut p = page.clone();
            p[byte] ^= 0x10;
            assert_eq!(decode_page(&p), None, "flip at byte {byte} not detected");
        }
    }

    #[test]
    fn scan_stops_cleanly_at_an_unwritten_page() {
        let r = ring_with(&[(0, 0, vec![rec(1)]), (1, 1, vec![rec(2)])], 8);
        let (pages, end) = scan(0, 8, |s| r[(s % 8) as usize].clone());
        assert_eq!(pages.len(), 2);
        assert_eq!(end, ScanEnd::Clean);
    }

    #[test]
    fn scan_stops_at_an_older_lap() {
        let r = ring_with(
            &[
                (4, 4, vec![rec(1)]),
                (5, 4, vec![rec(2)]),
                (6, 6, vec![]),
                (7, 6, vec![]),
                (8, 8, vec![]),
                (1, 1, vec![]),
            ],
            4,
        );
        let (pages, end) = scan(7, 4, |s| r[(s % 4) as usize].clone());
        assert_eq!(pages.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(end, ScanEnd::Clean);
    }

    #[test]
    fn a_page_lost_in_both_rings_before_a_later_commit_is_damage() {
        // Position 1 should hold page 9 (commit 9) but still holds page 5 of the lap before:
        // page 10 of a later commit shows page 9 was durable, so this is no clean end.
        let r = ring_with(
            &[
                (5, 4, vec![rec(2)]),
                (7, 6, vec![]),
                (8, 8, vec![]),
                (10, 10, vec![rec(3)]),
            ],
            4,
        );
        let (pages, end) = scan(7, 4, |s| r[(s % 4) as usize].clone());
        assert_eq!(pages.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(
            end,
            ScanEnd::Damaged {
                bad_seq: 9,
                later_seq: 10
            }
        );
    }

    #[test]
    fn torn_page_inside_the_last_commit_is_a_tail() {
        // commit 3..=5, page 4 torn, page 5 of the same commit durable
        let mut r = ring_with(
            &[
                (2, 2, vec![rec(1)]),
                (3, 3, vec![rec(2)]),
                (4, 3, vec![rec(3)]),
                (5, 3, vec![rec(4)]),
            ],
            16,
        );
        r[4][100] ^= 1;
        let (pages, end) = scan(2, 16, |s| r[(s % 16) as usize].clone());
        assert_eq!(pages.len(), 2);
        assert_eq!(end, ScanEnd::TornTail { first_bad_seq: 4 });
    }

    #[test]
    fn damaged_page_before_a_later_commit_is_damage() {
        let mut r = ring_with(
            &[
                (2, 2, vec![rec(1)]),
                (3, 3, vec![rec(2)]),
                (4, 4, vec![rec(3)]),
            ],
            16,
        );
        r[3][200] ^= 1;
        let (pages, end) = scan(2, 16, |s| r[(s % 16) as usize].clone());
        assert_eq!(pages.len(), 1);
        assert_eq!(
            end,
            ScanEnd::Damaged {
                bad_seq: 3,
                later_seq: 4
            }
        );
    }
}
