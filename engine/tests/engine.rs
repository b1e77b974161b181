//! The engine through its public API: writes survive a clean stop and a reopen, partial
//! blocks are merged, zeroes unmap, a flipped bit in a data slot answers EIO, never data.

use std::sync::Arc;
use torus_engine::*;

fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        path: dir.join("blocks"),
        create_size: 64 << 20,
        cores: 2,
        fill: torus_engine::Fill::Sparse,
    }
}

fn write(e: &Engine, volume: u32, offset: u64, data: &[u8]) {
    let mut buf = AlignedBuf::zeroed(data.len());
    buf[..data.len()].copy_from_slice(data);
    let buf = Arc::new(buf);
    // cut at chunk boundaries like a frontend does
    let mut done = 0usize;
    while done < data.len() {
        let off = offset + done as u64;
        let n = ((CHUNK_SIZE - off % CHUNK_SIZE) as usize).min(data.len() - done);
        let piece = Piece {
            volume,
            offset: off,
            len: n as u32,
            kind: PieceKind::Write {
                data: buf.clone(),
                data_offset: done,
                fua: false,
            },
        };
        assert!(matches!(e.run_piece(piece), Ok(Output::Done)));
        done += n;
    }
}

fn read(e: &Engine, volume: u32, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let mut out = Vec::new();
    while out.len() < len {
        let off = offset + out.len() as u64;
        let n = ((CHUNK_SIZE - off % CHUNK_SIZE) as usize).min(len - out.len());
        match e.run_piece(Piece {
            volume,
            offset: off,
            len: n as u32,
            kind: PieceKind::Read,
        })? {
            Output::Read { data, head } => out.extend_from_slice(&data[head..head + n]),
            _ => panic!("read answered without data"),
        }
    }
    Ok(out)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("torus-engine-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes survive a clean stop and a reopen; a partial-block write is merged with the rest of its
/// block; a zeroed range (whole and partial blocks) reads back as zeroes; another volume and a
/// dropped one read zeroes.
#[test]
fn writes_survive_stop_and_reopen_and_partial_blocks_merge() {
    let dir = tempdir("reopen");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let a = pattern(1, 1 << 20);
    write(&e, 1, 0, &a);
    // partial writes inside and across blocks and chunks
    let b = pattern(2, 70000);
    write(&e, 1, 1_000_000 - 131_072 + 17, &b);
    write(&e, 1, 1536, &pattern(3, 512));
    let mut expect = a.clone();
    let at = 1_000_000 - 131_072 + 17;
    expect[at..at + 70000].copy_from_slice(&b);
    expect[1536..2048].copy_from_slice(&pattern(3, 512));
    assert_eq!(read(&e, 1, 0, 1 << 20).unwrap(), expect);
    // zeroes: whole blocks unmapped, partial ones rewritten
    let z = Piece {
        volume: 1,
        offset: 4096 * 3 + 100,
        len: 4096 * 2,
        kind: PieceKind::Zero { fua: false },
    };
    assert!(e.run_piece(z).is_ok());
    expect[4096 * 3 + 100..4096 * 5 + 100].fill(0);
    assert_eq!(read(&e, 1, 0, 1 << 20).unwrap(), expect);
    // another volume does not see it, unwritten reads as zeroes
    assert_eq!(read(&e, 2, 0, 8192).unwrap(), vec![0; 8192]);
    e.stop().unwrap();

    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    assert_eq!(read(&e, 1, 0, 1 << 20).unwrap(), expect);
    e.drop_volume(1).unwrap();
    assert_eq!(read(&e, 1, 0, 4096).unwrap(), vec![0; 4096]);
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Overwrite churn beyond the store's capacity frees the replaced slots; a full store answers
/// ENOSPC and takes writes again once space is freed.
#[test]
fn overwrites_free_space_and_disk_full_answers_enospc() {
    let dir = tempdir("full");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let capacity = e.capacity_bytes();
    // Overwrite the same 1 MiB many times over the capacity: redirect-on-write must recycle.
    for round in 0..(capacity / (1 << 20) * 2) {
        write(&e, 1, 0, &pattern(round as u8, 1 << 20));
    }
    e.flush().unwrap();
    // Fill the store: some write must answer NoSpace, and what was written stays readable.
    let mut full = false;
    let mut offset = 1 << 20;
    while offset < 2 * capacity {
        let mut buf = AlignedBuf::zeroed(CHUNK_SIZE as usize);
        buf.fill(7);
        let p = Piece {
            volume: 1,
            offset,
            len: CHUNK_SIZE as u32,
            kind: PieceKind::Write {
                data: Arc::new(buf),
                data_offset: 0,
                fua: false,
            },
        };
        match e.run_piece(p) {
            Ok(_) => offset += CHUNK_SIZE,
            Err(BlockError::NoSpace) => {
                full = true;
                break;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(full, "writing twice the capacity never ran out of space");
    let last = (capacity / (1 << 20) * 2 - 1) as u8;
    assert_eq!(read(&e, 1, 0, 1 << 20).unwrap(), pattern(last, 1 << 20));
    // Freeing space lets writes resume.
    e.drop_volume(1).unwrap();
    write(&e, 1, 0, &pattern(9, 4096));
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A flipped bit in a data slot answers EIO, never the data, and counts one checksum error.
#[test]
fn flipped_bit_in_a_data_slot_answers_eio_not_data() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir("flip");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let sb = *e.superblock();
    write(&e, 1, 0, &pattern(5, 4096));
    e.stop().unwrap();
    // The first slot of the region owning the block.
    let probe = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let core = probe.shared().core_for(1, 0);
    probe.stop().unwrap();
    let region = sb.geometry.region(core);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("blocks"))
        .unwrap();
    let at = region.slots * 4096 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    assert_eq!(read(&e, 1, 0, 4096), Err(BlockError::Io));
    let stats = e.stats();
    assert_eq!(stats.iter().map(|s| s.checksum_errors).sum::<u64>(), 1);
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reused read buffers never leak an earlier read's data: over 300 rounds, unwritten blocks read as
/// zeroes.
#[test]
fn reused_read_buffers_never_leak_earlier_data() {
    // Read buffers come from a registered pool and are reused: a read of unwritten blocks
    // must still answer zeroes, not what the buffer held for an earlier read.
    let dir = tempdir("pool");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let secret = pattern(77, 128 * 1024);
    write(&e, 1, 0, &secret);
    for round in 0..300 {
        assert_eq!(read(&e, 1, 0, 128 * 1024).unwrap(), secret, "round {round}");
        // same chunk size, other volume and other chunks: nothing written there
        assert!(
            read(&e, 2, 0, 128 * 1024).unwrap().iter().all(|&b| b == 0),
            "round {round}: stale bytes leaked"
        );
        let mixed = read(&e, 1, 64 * 1024, 128 * 1024).unwrap();
        assert_eq!(&mixed[..64 * 1024], &secret[64 * 1024..], "round {round}");
        assert!(
            mixed[64 * 1024..].iter().all(|&b| b == 0),
            "round {round}: stale bytes leaked"
        );
    }
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn free_slots(e: &Engine) -> u64 {
    e.stats().iter().map(|s| s.slots_free).sum()
}

/// Snapshots share blocks with their volume, survive a reopen, and deleting one frees only the
/// blocks it alone holds. A clone of a snapshot takes its own writes, and a restore shares the
/// snapshot's slots.
#[test]
fn snapshots_share_blocks_survive_reopen_and_free_only_their_own_space() {
    let dir = tempdir("snapshot");
    let volume = 3;
    let snap = volume | 1 << 24; // same family
    let clone = volume | 2 << 24;
    let size = 2 << 20;
    let blocks = (size / BLOCK_SIZE) as u64;
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let empty = free_slots(&e);
    let a = pattern(1, size);
    write(&e, volume, 0, &a);
    e.clone_volume(volume, snap).unwrap();
    // Sharing costs no space.
    assert_eq!(free_slots(&e), empty - blocks);
    // Overwrite half of the volume: the snapshot keeps A, the volume reads B there.
    let b = pattern(2, size / 2);
    write(&e, volume, 0, &b);
    e.clone_volume(snap, clone).unwrap();
    write(&e, clone, 4096, &pattern(3, 4096));
    let mut expect_volume = a.clone();
    expect_volume[..size / 2].copy_from_slice(&b);
    let mut expect_clone = a.clone();
    expect_clone[4096..8192].copy_from_slice(&pattern(3, 4096));
    let check = |e: &Engine| {
        assert_eq!(read(e, volume, 0, size).unwrap(), expect_volume);
        assert_eq!(read(e, snap, 0, size).unwrap(), a);
        assert_eq!(read(e, clone, 0, size).unwrap(), expect_clone);
        // volume: B (its own) + A's second half (shared); snap: all of A; clone: A but one
        // block, plus one block of its own.
        assert_eq!(free_slots(e), empty - blocks - blocks / 2 - 1);
    };
    check(&e);
    // A clean stop writes a checkpoint holding the shared slots; reopening counts the shares
    // (a slot mapped twice by unrelated volumes would be refused as damage).
    e.stop().unwrap();
    drop(e);
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    check(&e);
    let exclusive = e.exclusive_blocks()[&snap];
    // Only one block of A is held by the snapshot alone (the volume overwrote A's first half,
    // the clone shares all of it but the block it overwrote).
    assert_eq!(exclusive, 1);
    // Restore: the volume reads A again, sharing the snapshot's slots.
    e.clone_volume(snap, volume).unwrap();
    assert_eq!(read(&e, volume, 0, size).unwrap(), a);
    assert_eq!(free_slots(&e), empty - blocks - 1);
    // Deleting the snapshot frees nothing the volume or the clone still map...
    e.drop_volume(snap).unwrap();
    assert_eq!(read(&e, volume, 0, size).unwrap(), a);
    assert_eq!(free_slots(&e), empty - blocks - 1);
    // ...and deleting the rest frees everything.
    e.drop_volume(volume).unwrap();
    e.drop_volume(clone).unwrap();
    assert_eq!(free_slots(&e), empty);
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A quota refuses new blocks past it, never overwrites or trims; trims give room back, and the
/// quota can be raised or removed.
#[test]
fn a_quota_refuses_new_blocks_past_it_but_not_overwrites_or_trims() {
    let dir = tempdir("quota");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let v = 5;
    // Blocks written before the quota count against it.
    write(&e, v, 0, &pattern(1, 256 << 10));
    e.set_quota(v, Some(1 << 20)).unwrap();
    assert_eq!(e.quota_usage(v), Some((256 << 10, 1 << 20)));
    write(&e, v, 256 << 10, &pattern(2, 768 << 10));
    assert_eq!(e.quota_usage(v).unwrap().0, 1 << 20);
    let refused = |offset: u64| {
        let mut buf = AlignedBuf::zeroed(4096);
        buf.fill(9);
        e.run_piece(Piece {
            volume: v,
            offset,
            len: 4096,
            kind: PieceKind::Write {
                data: Arc::new(buf),
                data_offset: 0,
                fua: false,
            },
        })
    };
    // A new block past the quota: NoSpace, nothing changed.
    assert!(matches!(refused(4 << 20), Err(BlockError::NoSpace)));
    assert_eq!(read(&e, v, 4 << 20, 4096).unwrap(), vec![0; 4096]);
    // Overwrites (even partial) go through.
    write(&e, v, 1000, &pattern(3, 70000));
    // Trimming gives room back.
    e.run_piece(Piece {
        volume: v,
        offset: 0,
        len: 128 << 10,
        kind: PieceKind::Zero { fua: false },
    })
    .unwrap();
    assert_eq!(e.quota_usage(v).unwrap().0, (1 << 20) - (128 << 10));
    assert!(refused(4 << 20).is_ok());
    // Other volumes are not limited; raising the limit lets more in; removing it, anything.
    write(&e, v + 1, 0, &pattern(4, 2 << 20));
    e.set_quota(v, Some(2 << 20)).unwrap();
    write(&e, v, 8 << 20, &pattern(5, 512 << 10));
    e.set_quota(v, None).unwrap();
    write(&e, v, 16 << 20, &pattern(6, 2 << 20));
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `len` bytes of `volume` from `offset` in 1 MiB pieces; stops at the first ENOSPC and
/// returns how many bytes were written.
fn fill(e: &Engine, volume: u32, offset: u64, len: u64, seed: u8) -> u64 {
    let mut done = 0;
    while done < len {
        let n = (1u64 << 20).min(len - done) as usize;
        let data = pattern(seed, n);
        let mut buf = AlignedBuf::zeroed(n);
        buf.copy_from_slice(&data);
        let buf = Arc::new(buf);
        let mut at = 0;
        while at < n {
            let off = offset + done + at as u64;
            let m = ((CHUNK_SIZE - off % CHUNK_SIZE) as usize).min(n - at);
            let piece = Piece {
                volume,
                offset: off,
                len: m as u32,
                kind: PieceKind::Write {
                    data: buf.clone(),
                    data_offset: at,
                    fua: false,
                },
            };
            match e.run_piece(piece) {
                Ok(_) => at += m,
                Err(BlockError::NoSpace) => return done + at as u64,
                Err(other) => panic!("write answered {other:?}"),
            }
        }
        done += n as u64;
    }
    done
}

/// A write or snapshot that would make the block map outgrow the checkpoint answers ENOSPC, and the
/// store still opens (a snapshot of a store more than half full once wrote a checkpoint past its
/// pages).
#[test]
fn a_block_map_that_snapshots_would_overflow_answers_enospc_and_the_store_opens() {
    // Snapshots share slots, so the block map can hold more entries than there are slots, but
    // a checkpoint holds about as many entries as slots. Found by the simulator: a snapshot of
    // a store more than half full wrote a checkpoint past its pages, and the store no longer
    // opened ("both checkpoint copies are damaged"). Now the clone, or a write of new blocks,
    // that would pass the limit answers ENOSPC.
    let dir = tempdir("mapfull");
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    let capacity = e.capacity_bytes();
    let (big, big_snap) = (5, 5 | 1 << 24);
    let _written = fill(&e, big, 0, ((capacity * 6 / 10) >> 20) << 20, 1);
    assert_eq!(e.clone_volume(big, big_snap), Err(BlockError::NoSpace));
    e.drop_volume(big_snap).unwrap();
    e.drop_volume(big).unwrap();
    // 40 % written: the snapshot fits (80 % of the entries); new blocks then run out of map
    // entries while slots are still free.
    let (vol, snap) = (6, 6 | 1 << 24);
    let part = ((capacity * 4 / 10) >> 20) << 20;
    assert_eq!(fill(&e, vol, 0, part, 2), part);
    e.clone_volume(vol, snap).unwrap();
    let more = fill(&e, vol, part, capacity, 3);
    assert!(
        more < capacity - part,
        "new blocks never ran out of map entries"
    );
    assert!(
        free_slots(&e) * BLOCK_SIZE as u64 > capacity / 20,
        "ENOSPC came from the block map, with slots still free"
    );
    e.stop().unwrap();
    let e = Engine::open(&config(&dir), |_| Box::new(NoService)).unwrap();
    assert_eq!(read(&e, snap, 0, 1 << 20).unwrap(), pattern(2, 1 << 20));
    assert_eq!(
        read(&e, vol, part, 1 << 20).unwrap(),
        pattern(3, 1 << 20),
        "the new blocks written before ENOSPC survive"
    );
    e.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
