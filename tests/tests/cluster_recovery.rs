//! Replicas made right again in a cluster of real `torusd` processes against a real etcd: a
//! replica catching up under sub-block writes ends exact, a corrupt local copy is answered from
//! another replica and repaired by the scrub, a replica that lost writes is found by the scrub,
//! and a placement group that lost every clean holder comes back with what the catching-up
//! node wrote.

use std::process::Command;
use std::time::Duration;
use torus_tests::cluster::*;
use torus_tests::*;

const T: Duration = Duration::from_secs(600);

/// Sub-block writes while a replica is catching up (slowed to 2 MiB/s) must leave it exactly
/// like the others: the test keeps a byte-for-byte model and reads it back from that replica
/// alone.
#[test]
fn partial_writes_during_catch_up_leave_the_replica_exact() {
    use torus_tests::nbd::Client;
    const REGION: usize = 8 << 20;
    let seed = seed();
    eprintln!("seed {seed} (TORUS_TEST_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["a", "b", "c"].iter().map(|n| TempDir::new(n)).collect();
    let mut a = cluster_node(dirs[0].path(), &etcd, "a", 1);
    let mut b = cluster_node_with(
        dirs[1].path(),
        &etcd.url,
        "b",
        1,
        "127.0.0.1",
        &[],
        &["--recovery-rate", "2M"],
    );
    let mut c = cluster_node(dirs[2].path(), &etcd, "c", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "128M", "--replicas", "3"]);
    let mut model = vec![0u8; REGION];
    rng.fill(&mut model);
    let mut client = Client::connect(a.nbd_port, "vol").unwrap();
    for (i, block) in model.chunks(64 << 10).enumerate() {
        assert_eq!(client.write((i * (64 << 10)) as u64, block, 0).unwrap(), 0);
    }
    assert_eq!(client.flush().unwrap(), 0);
    let partial = |client: &mut Client, rng: &mut Rng, model: &mut Vec<u8>, n: usize| {
        for i in 0..n {
            let len = 1 + rng.below(9000) as usize;
            let at = rng.below((REGION - len) as u64) as usize;
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            assert_eq!(client.write(at as u64, &data, 0).unwrap(), 0);
            model[at..at + len].copy_from_slice(&data);
            if i % 100 == 99 {
                assert_eq!(client.flush().unwrap(), 0);
            }
        }
        assert_eq!(client.flush().unwrap(), 0);
    };
    b.kill9();
    // b misses these: a partial mix in the model region, and 24 MiB elsewhere so that its
    // catch-up takes a while at 2 MiB/s.
    partial(&mut client, &mut rng, &mut model, 300);
    drop(client);
    fio(&a.uri("vol"), "32M", "24M", &["--end_fsync=1"]);
    let mut client = Client::connect(a.nbd_port, "vol").unwrap();
    b.spawn();
    // While b catches up.
    partial(&mut client, &mut rng, &mut model, 3000);
    let out = a.torusctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "after the partial writes: {}",
        text.lines().find(|l| l.starts_with("pgs")).unwrap_or("")
    );
    client.disconnect();
    wait_clean(&a, Duration::from_secs(180));
    a.kill9();
    c.kill9();
    let mut reader = Client::connect(b.nbd_port, "vol").unwrap();
    for (i, want) in model.chunks(1 << 20).enumerate() {
        let got = reader
            .read((i << 20) as u64, 1 << 20)
            .unwrap()
            .expect("read from b");
        if got != want {
            let first = got.iter().zip(want).position(|(x, y)| x != y).unwrap();
            panic!(
                "b differs from the model at byte {} (seed {seed})",
                (i << 20) + first
            );
        }
    }
    fio(&b.uri("vol"), "32M", "24M", &["--verify_only=1"]);
}

/// 64 bits flipped in one node's data slots while it is stopped: every read through that node is
/// still answered with the right data, from the other replicas. `torusctl scrub` then checks all
/// 8192 blocks written and finds and repairs each bad one (at most 64: a flip in a slot no longer
/// mapped harms nothing), fio verifies through every node, and with the other two nodes killed that
/// node alone serves every block.
#[test]
fn a_corrupt_local_copy_is_answered_from_another_replica() {
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(seed());
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["a", "b", "c"].iter().map(|n| TempDir::new(n)).collect();
    let mut a = cluster_node(dirs[0].path(), &etcd, "a", 1);
    let _b = cluster_node(dirs[1].path(), &etcd, "b", 1);
    let _c = cluster_node(dirs[2].path(), &etcd, "c", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M", "--replicas", "3"]);
    fio(&a.uri("vol"), "0", "32M", &["--end_fsync=1"]);
    let metrics = run_ok(
        Command::new(require_tool("curl", "curl")).args(["-s", &format!("{}/metrics", a.admin())]),
        T,
    );
    let used: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("torus_slots_total{core=\"0\"} "))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        - metrics
            .lines()
            .find_map(|l| l.strip_prefix("torus_slots_free{core=\"0\"} "))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap();
    a.stop();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dirs[0].path().join("torus-data/blocks"))
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let le = |at: usize| u64::from_le_bytes(sb[at..at + 8].try_into().unwrap());
    // Data slots of core 0 start after two superblock pages, two checkpoint copies and two
    // journal rings.
    let first_slot = 2 + 2 * le(64) + 2 * le(72);
    let mut flipped = std::collections::BTreeSet::new();
    while flipped.len() < 64 {
        let slot = rng.below(used);
        if flipped.insert(slot) {
            flip_bits(
                &f,
                (first_slot + slot) * 4096 + rng.below(4096),
                1 << rng.below(8),
            );
        }
    }
    drop(f);
    a.spawn();
    wait_clean(&a, Duration::from_secs(60));
    fio(&a.uri("vol"), "0", "32M", &["--verify_only=1"]);
    let log = a.log_text();
    let answered = log.matches("answered from node").count();
    eprintln!("64 flips: {answered} reads answered from another replica");
    assert!(answered > 0, "{log}");

    // A scrub finds the bad copies (each flip is in a different slot; flips in slots no
    // longer mapped harm nothing) and rewrites them from the other replicas.
    let out = a.torusctl_ok(&["scrub", "vol"]);
    eprintln!("{out}");
    let row = out.lines().find(|l| l.starts_with("a ")).expect("a's row");
    let cols: Vec<u64> = row
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(
        cols[0], 8192,
        "a checked every block of the 32 MiB written: {out}"
    );
    assert!(cols[1] >= answered as u64 && cols[1] <= 64, "{out}");
    assert_eq!(cols[2], 0, "no replica diverged: {out}");
    assert_eq!(cols[1], cols[3], "every bad block repaired: {out}");
    // fio verifies through every node.
    fio(&_b.uri("vol"), "0", "32M", &["--verify_only=1"]);
    fio(&_c.uri("vol"), "0", "32M", &["--verify_only=1"]);
    // Repaired for real: with b and c gone, a alone serves every block.
    drop(_b);
    drop(_c);
    let before = a.log_text().matches("answered from node").count();
    fio(&a.uri("vol"), "0", "32M", &["--verify_only=1"]);
    assert_eq!(
        a.log_text().matches("answered from node").count(),
        before,
        "a still needed other replicas after the scrub"
    );
}

/// A replica that acknowledged writes it never applied (a lying disk, injected with
/// TORUS_TESTING_REPLICA_DROPS_WRITES) is found by the scrub's comparison of replicas and
/// rewritten from the others; afterwards it alone serves every block right.
#[test]
fn a_replica_that_lost_writes_is_found_and_repaired_by_scrub() {
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["a", "b", "c"].iter().map(|n| TempDir::new(n)).collect();
    let mut a = cluster_node(dirs[0].path(), &etcd, "a", 1);
    let mut b = cluster_node(dirs[1].path(), &etcd, "b", 1);
    let c = cluster_node_env(
        dirs[2].path(),
        &etcd.url,
        "c",
        1,
        "127.0.0.1",
        &[],
        &[],
        &[("TORUS_TESTING_REPLICA_DROPS_WRITES", "9")],
    );
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M", "--replicas", "3"]);
    fio(&a.uri("vol"), "0", "16M", &["--end_fsync=1"]);

    let rows = |out: &str| -> Vec<(String, Vec<u64>)> {
        out.lines()
            .skip(1)
            .filter(|l| !l.starts_with(' '))
            .map(|l| {
                let mut w = l.split_whitespace();
                let node = w.next().unwrap().to_string();
                (node, w.map(|v| v.parse().unwrap()).collect())
            })
            .collect()
    };
    let out = a.torusctl(&["scrub", "vol"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    assert!(out.status.success(), "every difference repaired: {text}");
    for (node, cols) in rows(&text) {
        let (bad, diverged, repaired) = (cols[1], cols[2], cols[3]);
        assert_eq!(bad, 0, "{text}");
        assert_eq!(diverged, repaired, "{text}");
        if node == "c" {
            assert!(diverged > 50, "c's lost writes found: {text}");
        } else {
            assert_eq!(diverged, 0, "only c lost writes: {text}");
        }
    }
    let again = a.torusctl_ok(&["scrub", "vol"]);
    for (_, cols) in rows(&again) {
        assert_eq!(cols[2], 0, "replicas identical after the repair: {again}");
    }
    // c alone now serves every block right.
    a.kill9();
    b.kill9();
    fio(&c.uri("vol"), "0", "16M", &["--verify_only=1"]);
}

/// Every clean holder of the placement groups goes down while a third node is still catching
/// up (slowed to 64 KiB/s): that node took every write since it came back, the others may have
/// lost theirs. The first clean holder back copies what it wrote meanwhile (`Op::Dirty`, reads
/// with `FLAG_DIRTY`) before it serves; then both regions verify. This runs the revival's copy
/// end to end on real processes; here a and b kept the unflushed writes anyway (taking the
/// copy out leaves the test passing), so that the copy is needed is shown by the simulator.
#[test]
fn a_lost_placement_group_comes_back_with_what_the_catching_up_node_wrote() {
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["a", "b", "c"].iter().map(|n| TempDir::new(n)).collect();
    let mut a = cluster_node(dirs[0].path(), &etcd, "a", 2);
    let mut b = cluster_node(dirs[1].path(), &etcd, "b", 1);
    let slow = ["--recovery-rate", "64K"];
    let mut c = cluster_node_with(dirs[2].path(), &etcd.url, "c", 1, "127.0.0.1", &[], &slow);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M"]);
    c.kill9();
    fio(&a.uri("vol"), "0", "64M", &["--end_fsync=1"]);
    c.spawn();
    // c is back and stale (64 MiB to copy at 64 KiB/s): it takes every new write.
    wait_status_says(&a, "recovering:  c:", Duration::from_secs(30));
    // Not flushed: a and b may lose these writes when they are killed; c, catching up, holds
    // them and remembers them as dirty.
    fio(&a.uri("vol"), "128M", "32M", &[]);
    // The clean holders go down together; c stays up, so every PG is down.
    for pid in [a.pid(), b.pid()] {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    a.kill9();
    b.kill9();
    std::thread::sleep(Duration::from_secs(5));
    b.spawn();
    a.spawn();
    wait_status_says(&a, " 0 down", Duration::from_secs(60));
    let logs = a.log_text() + &b.log_text();
    assert!(
        logs.contains("placement groups lost with every clean holder are clean here again"),
        "no revival in the logs"
    );
    fio(&b.uri("vol"), "0", "64M", &["--verify_only=1"]);
    fio(&a.uri("vol"), "128M", "32M", &["--verify_only=1"]);
    drop(c);
}
