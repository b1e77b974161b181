//! Formatting a region and opening one: the newest checkpoint copy that passes its checksum,
//! then the journal after it (a page damaged in ring A is read from ring B), replayed into the
//! block map; the slot allocator rebuilt from the map. Ends with a fresh checkpoint, in both
//! copies, that starts the journal a whole lap later.
//!
//! Invariant: an open either vouches for every acknowledged write or refuses with the damage
//! named (`EngineError::Damaged`): both checkpoint copies damaged, a damaged journal page
//! followed by an intact later commit, a slot past the region or mapped twice outside one
//! family. A torn tail (the last commit, never acknowledged) is dropped.

use super::{Store, StoreCounters};
use crate::block_map::{BlockMap, Entry};
use crate::buffer::AlignedBuf;
use crate::checkpoint;
use crate::error::EngineError;
use crate::journal::{self, Record, ScanEnd};
use crate::layout::{Region, PAGE_SIZE};
use crate::slot_allocator::SlotAllocator;
use hdrhistogram::Histogram;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn pread_aligned(
    file: &File,
    offset: u64,
    len: usize,
    path: &Path,
) -> Result<AlignedBuf, EngineError> {
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| EngineError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
    Ok(buf)
}

fn pwrite_aligned(
    file: &File,
    offset: u64,
    buf: &AlignedBuf,
    path: &Path,
) -> Result<(), EngineError> {
    file.write_all_at(buf, offset)
        .map_err(|source| EngineError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        })
}

/// Writes an empty checkpoint into both copies of a freshly formatted region.
pub(crate) fn format_region(file: &File, region: &Region, path: &Path) -> Result<(), EngineError> {
    let cp = checkpoint::encode(1, 0, &[]);
    pwrite_aligned(file, region.checkpoint_a * PAGE_SIZE as u64, &cp, path)?;
    pwrite_aligned(file, region.checkpoint_b * PAGE_SIZE as u64, &cp, path)?;
    // A zeroed first journal page, in case the file held an older store.
    let zero = AlignedBuf::zeroed(PAGE_SIZE);
    pwrite_aligned(file, region.journal_byte_offset(0), &zero, path)?;
    pwrite_aligned(file, region.journal_b_byte_offset(0), &zero, path)
}

impl Store {
    /// Recovers one region: the newest valid checkpoint copy, then the journal after it. Ends
    /// with a fresh checkpoint so that the next run starts from a clean journal.
    pub(crate) fn open(
        core: usize,
        file: &File,
        path: &Path,
        region: Region,
    ) -> Result<Store, EngineError> {
        let damaged = |what: String| EngineError::Damaged { core, what };
        let max_entries = region.checkpoint_entries_max();
        let mut candidates = Vec::new();
        for (name, start) in [("A", region.checkpoint_a), ("B", region.checkpoint_b)] {
            let header = pread_aligned(file, start * PAGE_SIZE as u64, PAGE_SIZE, path)?;
            match checkpoint::decode_header(&header, max_entries) {
                Some(h) => candidates.push((h, name, start)),
                None => log!("torus: core {core}: checkpoint copy {name} is damaged or unwritten; using the other copy"),
            }
        }
        candidates.sort_by_key(|(h, _, _)| std::cmp::Reverse(h.seq));
        let mut chosen = None;
        for (h, name, start) in candidates {
            let body_len = (h.pages() - 1) as usize * PAGE_SIZE;
            let body = if body_len == 0 {
                AlignedBuf::zeroed(0)
            } else {
                pread_aligned(file, (start + 1) * PAGE_SIZE as u64, body_len, path)?
            };
            match checkpoint::decode_body(&h, if body_len == 0 { &[] } else { &body }) {
                Some(entries) => {
                    chosen = Some((h, entries));
                    break;
                }
                None => log!("torus: core {core}: checkpoint copy {name} (seq {}) fails its checksum; trying the other copy", h.seq),
            }
        }
        let (header, entries) = chosen.ok_or_else(|| {
            damaged(
                "both checkpoint copies are damaged: the block map cannot be vouched for".into(),
            )
        })?;

        let mut map = BlockMap::default();
        for (volume, block, e) in entries {
            if e.slot as u64 >= region.slot_count {
                return Err(damaged(format!(
                    "checkpoint maps volume {volume} block {block} to slot {} past the region",
                    e.slot
                )));
            }
            map.insert(volume, block, e);
        }
        let mut repaired_from_b = 0u64;
        let (pages, end) = journal::scan(header.journal_start, region.journal_pages, |seq| {
            let read = |offset| {
                pread_aligned(file, offset, PAGE_SIZE, path)
                    .map(|b| b.to_vec())
                    .unwrap_or_else(|_| vec![0; PAGE_SIZE])
            };
            let a = read(region.journal_byte_offset(seq));
            if journal::decode_page(&a).is_some_and(|p| p.seq == seq) {
                return a;
            }
            let b = read(region.journal_b_byte_offset(seq));
            if journal::decode_page(&b).is_some_and(|p| p.seq == seq) {
                if journal::page_written(&a) {
                    repaired_from_b += 1;
                }
                return b;
            }
            a
        });
        if repaired_from_b > 0 {
            log!("torus: core {core}: {repaired_from_b} journal page(s) damaged in ring A were read from ring B");
        }
        if let ScanEnd::Damaged { bad_seq, later_seq } = end {
            return Err(damaged(format!(
                "journal page {bad_seq} is damaged although page {later_seq} of a later commit is intact: acknowledged writes cannot be vouched for"
            )));
        }
        let mut last_seq = header.journal_start;
        for page in pages {
            last_seq = page.seq + 1;
            for r in page.records {
                match r {
                    Record::Map {
                        volume,
                        block,
                        slot,
                        crc,
                    } => {
                        if slot as u64 >= region.slot_count {
                            return Err(damaged(format!(
                                "journal page {} maps to slot {slot} past the region",
                                page.seq
                            )));
                        }
                        map.insert(volume, block, Entry { slot, crc });
                    }
                    Record::Unmap { volume, block } => {
                        map.remove(volume, block);
                    }
                    Record::DropVolume { volume } => {
                        map.drop_volume(volume);
                    }
                    Record::Clone { from, to } => {
                        map.drop_volume(to);
                        map.clone_volume(from, to);
                    }
                }
            }
        }
        let mut alloc = SlotAllocator::new(region.slot_count as u32);
        let mut families: HashMap<u32, Vec<u32>> = HashMap::new();
        for v in map.volumes() {
            families
                .entry(crate::layout::family(v))
                .or_default()
                .push(v);
        }
        for (volume, block, e) in map.iter() {
            if !alloc.mark_used(e.slot) {
                // Snapshots and clones share slots with their origin (one family); a slot
                // mapped by two unrelated volumes is damage.
                if !family_shares(&map, &families, volume, block, e.slot) {
                    return Err(damaged(format!(
                        "slot {} is mapped twice (volume {volume} block {block})",
                        e.slot
                    )));
                }
                alloc.share(e.slot);
            }
        }
        if let ScanEnd::TornTail { first_bad_seq } = end {
            log!("torus: core {core}: journal ends in a torn commit at page {first_bad_seq}; dropped its unacknowledged tail");
        }
        // Start the next journal a whole lap later, so that no page left from before the crash
        // can ever be taken for a page of the new run.
        let next_seq = last_seq.max(header.journal_start) + region.journal_pages;
        let seq = header.seq + 1;
        // Every open writes this checkpoint: it is what moves the journal start a lap ahead.
        let entries: Vec<_> = map.iter().collect();
        let cp = checkpoint::encode(seq, next_seq, &entries);
        for copy in [region.checkpoint_a, region.checkpoint_b] {
            pwrite_aligned(file, copy * PAGE_SIZE as u64, &cp, path)?;
            file.sync_data().map_err(|source| EngineError::Io {
                op: "fdatasync",
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(Store {
            core,
            path: path.to_owned(),
            region,
            map,
            alloc,
            locks: HashMap::new(),
            tasks: Slab::new(),
            pending_writes: Vec::new(),
            spare_writes: Vec::new(),
            spare_vecs: Vec::new(),
            batches: Slab::new(),
            read_pool: None,
            quotas: Default::default(),
            pending_records: Vec::new(),
            pending_frees: Vec::new(),
            readers: HashMap::new(),
            deferred_frees: HashMap::new(),
            flush_waiters: Vec::new(),
            space_waiters: VecDeque::new(),
            commit: None,
            build: None,
            force_checkpoint: false,
            checkpoint_waiters: Vec::new(),
            journal_next_seq: next_seq,
            checkpoint_seq: seq,
            checkpoint_journal_start: next_seq,
            retain_from: next_seq,
            poisoned: false,
            entries_max: region.checkpoint_entries_max(),
            entries_pending: 0,
            #[cfg(feature = "testing")]
            ack_flush_early: std::env::var_os("TORUS_TESTING_ACK_FLUSH_EARLY").is_some(),
            #[cfg(not(feature = "testing"))]
            ack_flush_early: false,
            timer_armed: false,
            out: Vec::new(),
            counters: StoreCounters::default(),
            latency_read_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("histogram bounds"),
            latency_write_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("histogram bounds"),
        })
    }
}

/// True when `slot` is mapped, by another volume of `volume`'s family (a snapshot or clone
/// sharing it), at the same block: the only legitimate double mapping.
fn family_shares(
    map: &BlockMap,
    families: &HashMap<u32, Vec<u32>>,
    volume: u32,
    block: u64,
    slot: u32,
) -> bool {
    families
        .get(&crate::layout::family(volume))
        .into_iter()
        .flatten()
        .filter(|v| **v != volume)
        .any(|v| map.get(*v, block).is_some_and(|e| e.slot == slot))
}
