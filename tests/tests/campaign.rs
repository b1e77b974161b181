//! Process-level fault campaign: three real `torusd` nodes (c in its own network namespace,
//! joined by a veth pair) against a real etcd, a replicas=3 volume, and two verifying
//! workloads through node a while one nemesis at a time hits b or c:
//!
//! - a recording client that keeps every acknowledged write (versioned 4 KiB blocks) and
//!   checks every read against it, at QD1 with flushes;
//! - fio `--verify=crc32c` writing a region of its own.
//!
//! Nemeses, never more than one node down: kill -9 of b, kill -9 of c, SIGSTOP/SIGCONT of b
//! (longer than the lease), c cut off (veth link down), c one-way (nftables drops what c
//! sends), 20 % packet loss to and from c (nftables; this kernel has no sch_netem for
//! `tc netem`), 16 bit flips in b's data slots while it is stopped. After each: recovery
//! within a bound (every PG clean), then everything written is read back and checked, fio
//! verifies its region, and the scrub compares every replica: no block may differ.
//!
//! Short form in `cargo test` (one round). Long form:
//! `TORUS_CAMPAIGN_ROUNDS=5 cargo test --release -p torus-tests --test campaign -- --nocapture`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use torus_tests::nbd::Client;
use torus_tests::*;

const BLOCK: usize = 4096;
/// The recording client's region: the first 32 MiB of the volume.
const BLOCKS: u64 = 8192;
/// How long a nemesis holds (the lease is 3 s in tests).
const HOLD: Duration = Duration::from_secs(6);
const CLEAN_LIMIT: Duration = Duration::from_secs(120);

fn content(version: u64, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    let mut x = version.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block;
    for (i, w) in v.chunks_mut(8).enumerate() {
        let word = if i == 0 {
            version
        } else if i == 1 {
            block
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        w.copy_from_slice(&word.to_le_bytes());
    }
    v
}

/// What a block may hold: the last acknowledged version (0: never written, zeroes), and
/// versions whose write failed or whose answer was lost with the connection.
#[derive(Clone, Default)]
struct Block {
    known: u64,
    maybe: Vec<u64>,
}

#[derive(Default)]
struct Model {
    blocks: Vec<Block>,
    next_version: u64,
    writes_acked: u64,
    bytes_acked: u64,
    write_errors: u64,
    reads_checked: u64,
    bytes_verified: u64,
    reconnects: u64,
    /// Longest time one request took (a stall while the cluster noticed the fault).
    max_stall: Duration,
    failures: Vec<String>,
}

impl Model {
    fn new() -> Model {
        Model {
            blocks: vec![Block::default(); BLOCKS as usize],
            next_version: 1,
            ..Default::default()
        }
    }

    /// Checks `data` read from `first`; returns a description of the first wrong block.
    fn check(&mut self, first: u64, data: &[u8]) -> Result<(), String> {
        for (i, got) in data.chunks(BLOCK).enumerate() {
            let b = first + i as u64;
            let m = &self.blocks[b as usize];
            let version = u64::from_le_bytes(got[0..8].try_into().unwrap());
            let ok = if got.iter().all(|&x| x == 0) {
                m.known == 0 || m.maybe.contains(&0)
            } else {
                (version == m.known || m.maybe.contains(&version))
                    && got == content(version, b).as_slice()
            };
            if !ok {
                let what = if got.iter().all(|&x| x == 0) || version < m.known {
                    "stale (an acknowledged write is missing)"
                } else {
                    "wrong data"
                };
                return Err(format!(
                    "block {b}: {what}: read version {version}, expected {} (or one of {:?})",
                    m.known, m.maybe
                ));
            }
        }
        self.reads_checked += 1;
        self.bytes_verified += data.len() as u64;
        Ok(())
    }
}

fn connect(port: u16) -> Client {
    let t = Instant::now();
    loop {
        match Client::connect(port, "vol") {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "cannot reconnect to a: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The recording client: writes, flushes and checked reads through `port` until `stop`.
fn record(port: u16, model: Arc<Mutex<Model>>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed);
    let mut client = connect(port);
    while !stop.load(Ordering::Relaxed) {
        let roll = rng.below(100);
        let first = rng.below(BLOCKS);
        let n = (1 + rng.below(8)).min(BLOCKS - first);
        let t = Instant::now();
        let outcome: std::io::Result<()> = if roll < 80 {
            let version = {
                let mut m = model.lock().unwrap();
                m.next_version += 1;
                m.next_version
            };
            let mut data = Vec::with_capacity(n as usize * BLOCK);
            for b in first..first + n {
                data.extend_from_slice(&content(version, b));
            }
            let r = client.write(first * BLOCK as u64, &data, 0);
            let mut m = model.lock().unwrap();
            match r {
                Ok(0) => {
                    m.writes_acked += 1;
                    m.bytes_acked += data.len() as u64;
                    for b in first..first + n {
                        m.blocks[b as usize] = Block {
                            known: version,
                            maybe: Vec::new(),
                        };
                    }
                    Ok(())
                }
                other => {
                    if other.is_ok() {
                        m.write_errors += 1;
                    }
                    for b in first..first + n {
                        m.blocks[b as usize].maybe.push(version);
                    }
                    other.map(|_| ())
                }
            }
        } else if roll < 90 {
            match client.flush() {
                Ok(0) => Ok(()),
                Ok(e) => {
                    model.lock().unwrap().write_errors += 1;
                    eprintln!("campaign: flush answered error {e}");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            match client.read(first * BLOCK as u64, (n as usize * BLOCK) as u32) {
                Ok(Ok(data)) => {
                    let mut m = model.lock().unwrap();
                    if let Err(what) = m.check(first, &data) {
                        m.failures.push(what);
                        return;
                    }
                    Ok(())
                }
                Ok(Err(e)) => {
                    model
                        .lock()
                        .unwrap()
                        .failures
                        .push(format!("read of blocks {first}+{n} answered error {e}"));
                    return;
                }
                Err(e) => Err(e),
            }
        };
        let took = t.elapsed();
        let mut m = model.lock().unwrap();
        m.max_stall = m.max_stall.max(took);
        if outcome.is_err() {
            m.reconnects += 1;
            drop(m);
            client = connect(port);
        }
    }
    let _ = client.flush();
    client.disconnect();
}

/// Reads the whole region back through `port` and checks it.
fn verify_all(port: u16, model: &Mutex<Model>) {
    let mut client = connect(port);
    let step = 16u64;
    let mut first = 0;
    while first < BLOCKS {
        let data = client
            .read(first * BLOCK as u64, (step as usize * BLOCK) as u32)
            .expect("read")
            .unwrap_or_else(|e| panic!("read of blocks {first}+{step} answered error {e}"));
        if let Err(what) = model.lock().unwrap().check(first, &data) {
            panic!("after the nemesis: {what}");
        }
        first += step;
    }
    client.disconnect();
}

fn signal(node: &Torusd, sig: i32) {
    // SAFETY: plain syscall on a pid we started.
    assert_eq!(unsafe { libc::kill(node.pid(), sig) }, 0);
}

#[derive(Clone, Copy, Debug)]
enum Nemesis {
    KillB,
    KillC,
    StopB,
    CutC,
    OneWayC,
    LossC,
    BitFlipsB,
}

const NEMESES: [Nemesis; 7] = [
    Nemesis::KillB,
    Nemesis::KillC,
    Nemesis::StopB,
    Nemesis::CutC,
    Nemesis::OneWayC,
    Nemesis::LossC,
    Nemesis::BitFlipsB,
];

struct Outcome {
    nemesis: Nemesis,
    writes_acked: u64,
    bytes_verified: u64,
    max_stall: Duration,
    clean_after: Duration,
    scrub_bad: u64,
}

/// Flips `count` bits in distinct data slots among the first `used` of core 0.
fn flip_slots(data_file: &std::path::Path, used: u64, count: usize, rng: &mut Rng) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data_file)
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let le = |at: usize| u64::from_le_bytes(sb[at..at + 8].try_into().unwrap());
    let first_slot = 2 + 2 * le(64) + 2 * le(72);
    let mut done = std::collections::BTreeSet::new();
    while done.len() < count {
        let slot = rng.below(used);
        if done.insert(slot) {
            flip_bits(
                &f,
                (first_slot + slot) * 4096 + rng.below(4096),
                1 << rng.below(8),
            );
        }
    }
}

/// One round of the seven nemeses (the module doc lists them), about 75 s; TORUS_CAMPAIGN_ROUNDS
/// for more. After each, every PG is clean within 120 s, no write or flush failed, everything
/// written reads back right, fio verifies its regions, and the scrub finds no replicas that differ
/// (and bad blocks only after the bit flips).
#[test]
fn one_nemesis_at_a_time_loses_nothing() {
    let rounds: usize = std::env::var("TORUS_CAMPAIGN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(seed());
    let ns = NetNs::create("k");
    let etcd = Etcd::start_on(&[&ns.host_ip]);
    let dirs: Vec<TempDir> = ["a", "b", "c"].iter().map(|n| TempDir::new(n)).collect();
    let a = cluster_node_with(dirs[0].path(), &etcd.url, "a", 1, &ns.host_ip, &[], &[]);
    let mut b = cluster_node_with(dirs[1].path(), &etcd.url, "b", 1, &ns.host_ip, &[], &[]);
    // c's admin API listens on its namespace address, so the scrub can reach it.
    let c_admin = format!("{}:{}", ns.ns_ip, free_port());
    let mut c = ns_cluster_node(
        dirs[2].path(),
        &etcd,
        &ns,
        "c",
        &["--admin-listen", &c_admin],
    );
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M", "--replicas", "3"]);
    let port = a.nbd_port;
    let model = Arc::new(Mutex::new(Model::new()));
    let mut outcomes = Vec::new();
    let mut fio_regions = Vec::new();

    for round in 0..rounds {
        for (i, &nemesis) in NEMESES.iter().enumerate() {
            let before = {
                let m = model.lock().unwrap();
                (m.writes_acked, m.bytes_verified)
            };
            model.lock().unwrap().max_stall = Duration::ZERO;
            let stop = Arc::new(AtomicBool::new(false));
            let recorder = {
                let (model, stop) = (model.clone(), stop.clone());
                let seed = rng.next_u64();
                std::thread::spawn(move || record(port, model, stop, seed))
            };
            // fio writes and verifies a region of its own (8 MiB each, from 64 MiB on).
            let region = 64 + 8 * ((round * NEMESES.len() + i) % 24) as u64;
            let fio_job = {
                let uri = a.uri("vol");
                std::thread::spawn(move || {
                    fio_verify(
                        &uri,
                        &[
                            &format!("--offset={region}M"),
                            "--size=8M",
                            "--iodepth=8",
                            "--end_fsync=1",
                        ],
                    )
                })
            };
            std::thread::sleep(Duration::from_secs(1));
            eprintln!("campaign: round {round}: {nemesis:?}");
            match nemesis {
                Nemesis::KillB => {
                    b.kill9();
                    std::thread::sleep(HOLD);
                    b.spawn();
                }
                Nemesis::KillC => {
                    c.kill9();
                    std::thread::sleep(HOLD);
                    c.spawn();
                }
                Nemesis::StopB => {
                    signal(&b, libc::SIGSTOP);
                    std::thread::sleep(HOLD);
                    signal(&b, libc::SIGCONT);
                }
                Nemesis::CutC => {
                    ns.link(false);
                    std::thread::sleep(HOLD);
                    ns.link(true);
                }
                Nemesis::OneWayC => {
                    nft(Some(&ns.name), "table inet torus_nemesis {\n chain out {\n type filter hook output priority 0; policy drop;\n oifname \"lo\" accept\n }\n}\n");
                    std::thread::sleep(HOLD);
                    nft(Some(&ns.name), "delete table inet torus_nemesis");
                }
                Nemesis::LossC => {
                    nft(Some(&ns.name), "table inet torus_nemesis {\n chain out {\n type filter hook output priority 0;\n numgen random mod 100 < 20 drop\n }\n chain in {\n type filter hook input priority 0;\n numgen random mod 100 < 20 drop\n }\n}\n");
                    std::thread::sleep(HOLD);
                    nft(Some(&ns.name), "delete table inet torus_nemesis");
                }
                Nemesis::BitFlipsB => {
                    b.stop();
                    flip_slots(
                        &dirs[1].path().join("torus-data/blocks"),
                        4096,
                        16,
                        &mut rng,
                    );
                    b.spawn();
                }
            }
            let healed = Instant::now();
            wait_clean(&a, CLEAN_LIMIT);
            let clean_after = healed.elapsed();
            stop.store(true, Ordering::Relaxed);
            recorder.join().expect("recording client");
            fio_job.join().expect("fio during the nemesis");
            fio_regions.push(region);
            {
                let m = model.lock().unwrap();
                assert!(m.failures.is_empty(), "{nemesis:?}: {:?}", m.failures);
                assert_eq!(m.write_errors, 0, "{nemesis:?}: writes or flushes failed");
            }
            // Everything written so far reads back right, fio's regions verify, and every
            // replica holds the same blocks.
            verify_all(port, &model);
            for r in &fio_regions {
                fio_verify(
                    &a.uri("vol"),
                    &[&format!("--offset={r}M"), "--size=8M", "--verify_only=1"],
                );
            }
            let out = a.torusctl(&["scrub", "vol"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !out.status.success() {
                let tail = |t: &Torusd| {
                    let log = t.log_text();
                    log[log.len().saturating_sub(3000)..].to_string()
                };
                panic!(
                    "{nemesis:?}: scrub not clean:\n{text}\n--- b:\n{}\n--- c:\n{}",
                    tail(&b),
                    tail(&c)
                );
            }
            let mut bad = 0;
            for row in text.lines().skip(1).filter(|l| !l.starts_with(' ')) {
                let cols: Vec<u64> = row
                    .split_whitespace()
                    .skip(1)
                    .map(|v| v.parse().unwrap())
                    .collect();
                assert_eq!(cols[2], 0, "{nemesis:?}: replicas differ:\n{text}");
                bad += cols[1];
            }
            if !matches!(nemesis, Nemesis::BitFlipsB) {
                assert_eq!(bad, 0, "{nemesis:?}: bad blocks without bit flips:\n{text}");
            }
            let m = model.lock().unwrap();
            let o = Outcome {
                nemesis,
                writes_acked: m.writes_acked - before.0,
                bytes_verified: m.bytes_verified - before.1,
                max_stall: m.max_stall,
                clean_after,
                scrub_bad: bad,
            };
            eprintln!(
                "campaign: {:?}: {} writes acknowledged, {} MiB verified, longest request {:?}, clean {:?} after healing, scrub repaired {}",
                o.nemesis,
                o.writes_acked,
                o.bytes_verified >> 20,
                o.max_stall,
                o.clean_after,
                o.scrub_bad
            );
            outcomes.push(o);
        }
    }
    let m = model.lock().unwrap();
    let mut stalls: Vec<Duration> = outcomes.iter().map(|o| o.max_stall).collect();
    let mut cleans: Vec<Duration> = outcomes.iter().map(|o| o.clean_after).collect();
    stalls.sort();
    cleans.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    eprintln!(
        "campaign summary: {} nemeses ({} rounds); writes acknowledged {} ({} MiB); reads checked {} ({} MiB verified); reconnects {}; wrong or stale reads 0, lost writes 0; longest request p50 {:?} p99 {:?}; clean after healing p50 {:?} p99 {:?}; bit flips repaired by scrub {}",
        outcomes.len(),
        rounds,
        m.writes_acked,
        m.bytes_acked >> 20,
        m.reads_checked,
        m.bytes_verified >> 20,
        m.reconnects,
        pct(&stalls, 0.5),
        pct(&stalls, 0.99),
        pct(&cleans, 0.5),
        pct(&cleans, 0.99),
        outcomes.iter().map(|o| o.scrub_bad).sum::<u64>()
    );
    drop(c);
}
