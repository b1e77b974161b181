//! Durability under `kill -9`: clients write versioned, checksummed 4 KiB blocks and FLUSH
//! every few writes; torusd is killed at a random moment, three times in a row on the same
//! data. After each restart every block must read back as its last flushed version or a later
//! one that was sent: never older, never torn, never a block that was not written there.
//!
//! The seed is printed; `TORUS_TEST_SEED=N` replays the same workload and kill times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use torus_tests::nbd::{Client, FLAG_FUA};
use torus_tests::*;

const BLOCKS: u64 = 4096; // 16 MiB of the volume: blocks are overwritten often
const CONNECTIONS: u64 = 4;
const FLUSH_EVERY: u64 = 8;

#[derive(Default, Clone, Copy, Debug)]
struct BlockState {
    /// Every version up to this one was acknowledged and then covered by an acknowledged FLUSH
    /// (or written with FUA): the block must read back at least this version.
    durable: u64,
    /// The highest version ever sent.
    sent: u64,
}

fn content(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    Rng(block.wrapping_mul(0x9E37_79B9) ^ version.rotate_left(32)).fill(&mut b[16..4092]);
    let crc = crc32c::crc32c(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Writes until the connection breaks; returns how many writes were acknowledged.
fn writer(
    port: u16,
    conn: u64,
    seed: u64,
    state: Arc<Mutex<HashMap<u64, BlockState>>>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let Ok(mut c) = Client::connect(port, "default") else {
        return 0;
    };
    let mut rng = Rng(seed ^ conn);
    let mut acked_since_flush: Vec<(u64, u64)> = Vec::new();
    let mut acked = 0;
    while !stop.load(Ordering::Relaxed) {
        let block = rng.below(BLOCKS / CONNECTIONS) * CONNECTIONS + conn;
        let version = {
            let mut s = state.lock().unwrap();
            let e = s.entry(block).or_default();
            e.sent += 1;
            e.sent
        };
        let fua = rng.below(16) == 0;
        match c.write(
            block * 4096,
            &content(block, version),
            if fua { FLAG_FUA } else { 0 },
        ) {
            Ok(0) => {}
            Ok(e) => panic!("write of block {block} failed with NBD error {e}"),
            Err(_) => return acked,
        }
        acked += 1;
        if fua {
            let mut s = state.lock().unwrap();
            let e = s.get_mut(&block).unwrap();
            e.durable = e.durable.max(version);
        } else {
            acked_since_flush.push((block, version));
        }
        if acked % FLUSH_EVERY == 0 {
            match c.flush() {
                Ok(0) => {
                    let mut s = state.lock().unwrap();
                    for (b, v) in acked_since_flush.drain(..) {
                        let e = s.get_mut(&b).unwrap();
                        e.durable = e.durable.max(v);
                    }
                }
                Ok(e) => panic!("flush failed with NBD error {e}"),
                Err(_) => return acked,
            }
        }
    }
    acked
}

/// 4 connections write versioned, checksummed 4 KiB blocks over 16 MiB, with FLUSH every 8 writes
/// and FUA on about 1 write in 16. `kill -9` at a random moment, three times on the same data.
/// Every block reads back at its last flushed version or a later one that was sent, never torn and
/// never another block's data. It needs over 1000 acknowledged writes. The canary below must fail
/// it.
#[test]
fn kill_9_never_loses_a_flushed_write_nor_tears_a_block() {
    run_rounds(&[]);
}

/// The canary: with FLUSH acknowledged before the journal is written, the same test must
/// find lost writes. If it does not, the test above proves nothing.
#[test]
fn canary_flush_acknowledged_early_loses_writes() {
    // Outside catch_unwind: a missing torusd-testing must fail the canary, not pass it.
    bin(TORUSD_TESTING);
    let lost = std::panic::catch_unwind(|| run_rounds(&[("TORUS_TESTING_ACK_FLUSH_EARLY", "1")]));
    assert!(lost.is_err(), "with flushes acknowledged early the durability test still passed: it cannot see lost writes");
}

fn run_rounds(env: &[(&str, &str)]) {
    let seed = seed();
    eprintln!("durability seed: {seed} (replay with TORUS_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = TempDir::new("durability");
    let mut node = Torusd::start_with_env(dir.path(), &[], env);
    let state: Arc<Mutex<HashMap<u64, BlockState>>> = Arc::default();
    let mut total_acked = 0;
    let mut blocks_checked = 0;
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..CONNECTIONS)
            .map(|conn| {
                let (state, stop, port) = (state.clone(), stop.clone(), node.nbd_port);
                let s = seed.wrapping_add(round * 1000);
                std::thread::spawn(move || writer(port, conn, s, state, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            total_acked += w.join().expect("writer panicked");
        }
        node.spawn();
        let mut c = Client::connect(node.nbd_port, "default").unwrap();
        let mut recovered = Vec::new();
        let s = state.lock().unwrap();
        for block in 0..BLOCKS {
            let e = s.get(&block).copied().unwrap_or_default();
            let data = c.read(block * 4096, 4096).unwrap().unwrap_or_else(|err| {
                panic!("round {round}: block {block} read failed with {err}")
            });
            if data.iter().all(|&b| b == 0) {
                assert_eq!(e.durable, 0, "round {round}: block {block} reads as zeroes but version {} was flushed (seed {seed})", e.durable);
                continue;
            }
            let crc = crc32c::crc32c(&data[..4092]);
            assert_eq!(
                crc.to_le_bytes(),
                data[4092..],
                "round {round}: block {block} is torn (seed {seed})"
            );
            let got_block = u64::from_le_bytes(data[0..8].try_into().unwrap());
            let version = u64::from_le_bytes(data[8..16].try_into().unwrap());
            assert_eq!(
                got_block, block,
                "round {round}: block {block} holds block {got_block}'s data (seed {seed})"
            );
            assert!(version >= e.durable, "round {round}: block {block} went back to version {version}, {} was flushed (seed {seed})", e.durable);
            assert!(version <= e.sent, "round {round}: block {block} has version {version} that was never sent (seed {seed})");
            assert_eq!(
                data,
                content(block, version),
                "round {round}: block {block} version {version} differs (seed {seed})"
            );
            blocks_checked += 1;
            // What a restarted node serves is durable: it must never go back from here.
            recovered.push((block, version));
        }
        c.disconnect();
        drop(s);
        let mut s = state.lock().unwrap();
        for (block, version) in recovered.drain(..) {
            s.get_mut(&block).expect("written block").durable = version;
        }
        drop(s);
        // the version a block holds now is its floor for the next round
        eprintln!("round {round}: ok");
    }
    eprintln!("durability: {total_acked} writes acknowledged, {blocks_checked} block reads verified, 3 kills, bytes lost: 0");
    assert!(
        total_acked > 1000,
        "too few writes to mean anything: {total_acked}"
    );
    node.stop();
}
