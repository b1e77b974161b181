//! Bit flips in the allocated parts of the backing store while torusd is stopped: every block
//! then reads back correct or as EIO, never as wrong data, and the log names each damaged
//! block. A flipped superblock copy and a flipped checkpoint copy are survived through the
//! other copy.

use std::os::unix::fs::FileExt;
use torus_tests::nbd::{Client, EIO};
use torus_tests::*;

const BLOCKS: u64 = 8192;
const FLIPS: usize = 64;

fn content(block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    Rng(block ^ 0xF11F).fill(&mut b);
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(v)
}

fn metric(text: &str, name: &str, core: usize) -> u64 {
    let key = format!("{name}{{core=\"{core}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {key} missing"))
}

/// 64 bit flips in allocated data slots, one in a superblock copy and one in a checkpoint copy,
/// while torusd is stopped. Of the 8192 blocks written, exactly the 64 damaged ones answer EIO and
/// the log names them; no block reads wrong data. The damaged superblock and checkpoint copies are
/// reported and the other copies are used.
#[test]
fn flipped_bits_read_as_eio_never_as_wrong_data() {
    let seed = seed();
    eprintln!("bitflip seed: {seed} (replay with TORUS_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = TempDir::new("bitflip");
    let mut node = Torusd::start(dir.path(), &[]);
    let mut c = Client::connect(node.nbd_port, "default").unwrap();
    for block in 0..BLOCKS {
        assert_eq!(c.write(block * 4096, &content(block), 0).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    require_tool("curl", "curl");
    let metrics = run_ok(
        std::process::Command::new("curl")
            .arg("-sf")
            .arg(format!("{}/metrics", node.admin())),
        std::time::Duration::from_secs(30),
    );
    node.stop();

    let path = dir.path().join("torus-data/blocks");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let l = layout(&f);
    // Allocated slots: a fresh store allocates each region's slots from 0 upwards.
    let allocated: Vec<u64> = (0..l.cores)
        .map(|core| {
            metric(&metrics, "torus_slots_total", core) - metric(&metrics, "torus_slots_free", core)
        })
        .collect();
    let mut damaged_slots = std::collections::BTreeSet::new();
    while damaged_slots.len() < FLIPS {
        let core = rng.below(l.cores as u64) as usize;
        let slot = rng.below(allocated[core]);
        if !damaged_slots.insert((core, slot)) {
            continue;
        }
        // Data slots start right after journal ring B.
        flip_bits(
            &f,
            (l.ring(core, 2) + slot) * 4096 + rng.below(4096),
            1 << rng.below(8),
        );
    }
    // One superblock copy and one checkpoint copy (core 0, copy A header) damaged too.
    flip_bits(&f, rng.below(92), 1 << rng.below(8));
    flip_bits(&f, 2 * 4096 + 16 + rng.below(8), 1 << rng.below(8));
    f.sync_all().unwrap();
    drop(f);

    node.spawn();
    let mut c = Client::connect(node.nbd_port, "default").unwrap();
    let mut eio = 0;
    for block in 0..BLOCKS {
        match c.read(block * 4096, 4096).unwrap() {
            Ok(data) => assert!(
                data == content(block),
                "block {block} read back WRONG DATA (seed {seed})"
            ),
            Err(e) => {
                assert_eq!(e, EIO, "block {block}: unexpected error {e}");
                eio += 1;
            }
        }
    }
    c.disconnect();
    node.stop();
    let log = node.log_text();
    let named = log
        .lines()
        .filter(|l| l.contains("checksum mismatch"))
        .count();
    eprintln!("bitflip: {FLIPS} flips in data slots, {eio} blocks answered EIO, {named} named in the log, wrong data: 0");
    assert_eq!(
        eio, FLIPS,
        "every flipped block must be detected (seed {seed})"
    );
    assert!(named >= FLIPS, "the log names each damaged block:\n{log}");
    assert!(
        log.contains("superblock copy 0"),
        "the damaged superblock copy is reported:\n{log}"
    );
    assert!(
        log.contains("checkpoint copy A"),
        "the damaged checkpoint copy is reported:\n{log}"
    );
}

struct Layout {
    cores: usize,
    region_pages: u64,
    checkpoint_pages: u64,
    journal_pages: u64,
}

fn layout(f: &std::fs::File) -> Layout {
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    Layout {
        cores: le(&sb, 32, 4) as usize,
        region_pages: le(&sb, 48, 8),
        checkpoint_pages: le(&sb, 64, 8),
        journal_pages: le(&sb, 72, 8),
    }
}

impl Layout {
    fn ring(&self, core: usize, copy: u64) -> u64 {
        2 + core as u64 * self.region_pages + 2 * self.checkpoint_pages + copy * self.journal_pages
    }
}

/// Journal pages (seq, commit_first_seq, position) that carry the journal magic in ring A.
fn journal_pages(f: &std::fs::File, l: &Layout, core: usize) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut page = vec![0u8; 4096];
    for i in 0..l.journal_pages {
        f.read_exact_at(&mut page, (l.ring(core, 0) + i) * 4096)
            .unwrap();
        if &page[0..4] == b"TJNL" {
            out.push((le(&page, 8, 8), le(&page, 16, 8), i));
        }
    }
    out
}

fn write_blocks(port: u16, range: std::ops::Range<u64>, flush_every: u64) {
    let mut c = Client::connect(port, "default").unwrap();
    for block in range {
        assert_eq!(c.write(block * 4096, &content(block), 0).unwrap(), 0);
        if block % flush_every == flush_every - 1 {
            assert_eq!(c.flush().unwrap(), 0);
        }
    }
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
}

/// After `kill -9`, every written journal page of ring A damaged: all 2048 blocks read back right
/// from ring B, and the log says so. The same page damaged in both rings with a later commit
/// intact: torusd refuses to start and says a journal page is damaged.
#[test]
fn journal_damage_in_one_ring_is_read_from_the_other_and_in_both_refuses_to_start() {
    let dir = TempDir::new("journal-flip");
    let mut node = Torusd::start(dir.path(), &[]);
    write_blocks(node.nbd_port, 0..2048, 64);
    node.kill9(); // no clean stop: what was written lives in the journal
    let path = dir.path().join("torus-data/blocks");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let l = layout(&f);
    // Damage every written page of ring A on every core.
    let mut flipped = 0;
    for core in 0..l.cores {
        for (_, _, pos) in journal_pages(&f, &l, core) {
            flip_bits(&f, (l.ring(core, 0) + pos) * 4096 + 100, 0x20);
            flipped += 1;
        }
    }
    f.sync_all().unwrap();
    assert!(flipped > 0, "the test wrote no journal pages");
    node.spawn();
    let mut c = Client::connect(node.nbd_port, "default").unwrap();
    for block in 0..2048 {
        assert!(
            c.read(block * 4096, 4096).unwrap().unwrap() == content(block),
            "block {block} wrong after ring A damage"
        );
    }
    c.disconnect();
    assert!(
        node.log_text().contains("read from ring B"),
        "the repair is reported:\n{}",
        node.log_text()
    );

    // Now damage the same page in both rings, with a later commit intact after it.
    write_blocks(node.nbd_port, 2048..4096, 64);
    node.kill9();
    let mut victim = None;
    for core in 0..l.cores {
        let mut pages = journal_pages(&f, &l, core);
        pages.sort();
        let last_commit = pages.last().map(|p| p.1).unwrap_or(0);
        if let Some(p) = pages.iter().rev().find(|p| p.1 < last_commit) {
            victim = Some((core, p.2));
            break;
        }
    }
    let (core, pos) = victim.expect("a journal page followed by a later commit");
    for copy in 0..2 {
        flip_bits(&f, (l.ring(core, copy) + pos) * 4096 + 200, 0x01);
    }
    f.sync_all().unwrap();
    let out = run(
        std::process::Command::new(bin("torusd"))
            .args([
                "--cores",
                "2",
                "--nbd-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--admin-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .current_dir(dir.path()),
        std::time::Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "torusd started on a journal it cannot vouch for"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") && err.contains("journal page"),
        "{err}"
    );
    eprintln!("journal: {flipped} pages damaged in ring A read from ring B; a page damaged in both refused: {}", err.trim());
}
