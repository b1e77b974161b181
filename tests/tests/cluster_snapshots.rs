//! Snapshots and clones on a three-node cluster (real etcd, real torusd, replicas=3): a
//! snapshot is the same on every replica even when taken while the volume is being written
//! (through another node than the writer), clones and restores work through any node, a node
//! that was down while a snapshot was taken copies it when it catches up; dump, load, TRIM,
//! resize and quotas work through any node; deleting everything frees the space on every
//! node.

use std::process::Command;
use std::time::{Duration, Instant};
use torus_tests::*;

const T: Duration = Duration::from_secs(300);

/// Three nodes (2, 1, 2 cores), replicas=3: a snapshot asked of b with no writer reads A through
/// every node while the volume takes B; one asked of b while fio writes through a has the same
/// sha256 through all three nodes (fails when the writer's pause is taken out); a clone made and
/// written through c reads right through a, and the snapshot stays A; a restore through b reads A
/// everywhere; c killed, a snapshot taken, c back: after catch-up it serves the snapshot with the
/// same sha256; a dump through b loaded through c reads the same through a; a discard, a resize
/// through c seen through a; an 8 MiB quota refuses a write through b with ENOSPC; deleting
/// everything brings every node's used space to 0. Prints how long the snapshot under load took.
#[test]
fn cluster_snapshots_are_identical_on_every_replica() {
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["sa", "sb", "sc"].iter().map(|n| TempDir::new(n)).collect();
    let a = cluster_node(dirs[0].path(), &etcd, "a", 2);
    let b = cluster_node(dirs[1].path(), &etcd, "b", 1);
    let mut c = cluster_node(dirs[2].path(), &etcd, "c", 2);
    let nodes = |a: &Torusd, b: &Torusd, c: &Torusd, v: &str| -> Vec<String> {
        vec![a.uri(v), b.uri(v), c.uri(v)]
    };
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M", "--replicas", "3"]);
    qemu_io(&a.uri("vol"), &["write -P 0xaa 0 64M"]);

    // No writer: taken by the node asked.
    b.torusctl_ok(&["snapshot", "create", "vol@s0"]);
    qemu_io(&a.uri("vol"), &["write -P 0xbb 0 32M"]);
    for uri in nodes(&a, &b, &c, "vol@s0") {
        qemu_io(&uri, &["read -P 0xaa 0 64M"]);
    }
    for uri in nodes(&a, &b, &c, "vol") {
        qemu_io(&uri, &["read -P 0xbb 0 32M", "read -P 0xaa 32M 32M"]);
    }

    // While fio writes through a, a snapshot asked of b is taken by a (the writer), with its
    // writes held back meanwhile: every replica's copy is the same.
    let uri = a.uri("vol");
    let writer = std::thread::spawn(move || {
        let out = run(
            Command::new(require_tool("fio", "fio")).args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=256M",
                "--time_based",
                "--runtime=6",
            ]),
            T,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    b.torusctl_ok(&["snapshot", "create", "vol@live"]);
    eprintln!("snapshot under load took {:?}", t.elapsed());
    writer.join().unwrap();
    let sums: Vec<String> = nodes(&a, &b, &c, "vol@live")
        .iter()
        .map(|u| sha256_over_nbd(u))
        .collect();
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "replicas differ: {sums:?}"
    );

    // A clone of s0, written through c, read through a; s0 unchanged.
    c.torusctl_ok(&["clone", "vol@s0", "c0"]);
    qemu_io(&c.uri("c0"), &["write -P 0xcc 0 1M"]);
    qemu_io(&a.uri("c0"), &["read -P 0xcc 0 1M", "read -P 0xaa 1M 63M"]);
    qemu_io(&b.uri("vol@s0"), &["read -P 0xaa 0 64M"]);

    // Restore through b: every node reads A again.
    b.torusctl_ok(&["snapshot", "restore", "vol@s0"]);
    for uri in nodes(&a, &b, &c, "vol") {
        qemu_io(&uri, &["read -P 0xaa 0 64M"]);
    }

    // c is down while s2 is taken; it copies s2 when it catches up.
    qemu_io(&a.uri("vol"), &["write -P 0xdd 0 8M"]);
    c.kill9();
    a.torusctl_ok(&["snapshot", "create", "vol@s2"]);
    qemu_io(&a.uri("vol"), &["write -P 0xee 0 8M"]);
    let want = sha256_over_nbd(&a.uri("vol@s2"));
    c.spawn();
    wait_clean(&a, Duration::from_secs(120));
    assert_eq!(sha256_over_nbd(&c.uri("vol@s2")), want);
    qemu_io(
        &c.uri("vol@s2"),
        &["read -P 0xdd 0 8M", "read -P 0xaa 8M 56M"],
    );

    // Dump through b, load through c, the same through a; TRIM gives the space back on every
    // node; resize through c is seen through a.
    let img = dirs[0].path().join("vol.img");
    b.torusctl_ok(&["dump", "vol", img.to_str().unwrap()]);
    c.torusctl_ok(&["load", img.to_str().unwrap(), "copy"]);
    assert_eq!(
        sha256_over_nbd(&a.uri("copy")),
        sha256_over_nbd(&a.uri("vol"))
    );
    qemu_io(&a.uri("copy"), &["discard 0 256M"]);
    c.torusctl_ok(&["volume", "resize", "vol", "512M"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let size = run_ok(
            Command::new(require_tool("nbdinfo", "libnbd-bin")).args(["--size", &a.uri("vol")]),
            T,
        );
        if size.trim() == (512u64 << 20).to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "a still sees {size}");
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io(
        &a.uri("vol"),
        &["read -P 0xee 0 8M", "write -P 0x99 300M 1M"],
    );

    // A quota holds on every node: writes through b past it answer ENOSPC.
    a.torusctl_ok(&["volume", "create", "qv", "64M", "--quota", "8M"]);
    std::thread::sleep(Duration::from_millis(1500)); // every node's poller applies it
    qemu_io(&b.uri("qv"), &["write -P 0x12 0 8M"]);
    let out = run(
        Command::new("qemu-io").args(["-f", "raw", &b.uri("qv"), "-c", "write -P 0x13 32M 4K"]),
        T,
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("No space left on device"), "{text}");
    qemu_io(&c.uri("qv"), &["read -P 0x12 0 8M", "read -P 0 32M 4K"]);

    // Deleting everything frees the space on every node.
    for s in ["vol@s0", "vol@live", "vol@s2"] {
        b.torusctl_ok(&["snapshot", "delete", s]);
    }
    for v in ["c0", "vol", "copy", "qv"] {
        a.torusctl_ok(&["volume", "delete", v]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p: serde_json::Value =
            serde_json::from_str(&a.torusctl_ok(&["peers", "--json"])).unwrap();
        let used: Vec<u64> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["used_bytes"].as_u64().unwrap_or(u64::MAX))
            .collect();
        if used.iter().all(|u| *u == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "space not freed: {p}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
