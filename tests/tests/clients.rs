//! Real clients nobody here wrote, against a real torusd: nbdinfo, qemu-io, nbdcopy, and
//! torusctl for volume management.

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

const T: Duration = Duration::from_secs(120);

/// nbdinfo sees the 1 GiB `default` volume, the block sizes (512 / 4096 / 32 MiB) and the flags
/// (multi-conn, flush, FUA, trim, zero). The empty export name is `default`, and an unknown export
/// is refused with an error that names it.
#[test]
fn nbdinfo_shows_the_default_volume_and_block_sizes() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdinfo");
    let mut node = Torusd::start(dir.path(), &[]);
    assert!(
        node.stdout.contains(&node.uri("default")),
        "ready line names the URI: {}",
        node.stdout
    );
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(node.uri("default")),
        T,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 1u64 << 30);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    // The empty export name is the volume `default`.
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://127.0.0.1:{}", node.nbd_port)),
        T,
    );
    assert_eq!(out.trim(), (1u64 << 30).to_string());
    // An unknown export is refused with a clear error.
    let out = run(Command::new("nbdinfo").arg(node.uri("nope")), T);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.stop();
}

/// qemu-io writes patterns at unaligned offsets (512 B at 1536, 100 KiB at 7 KiB, 70000 B at
/// 1000000) over a 2 MiB background; they read back after a restart. `write -z` and `discard` read
/// back as zeroes and leave their neighbours alone.
#[test]
fn qemu_io_unaligned_patterns_zeroes_and_discard() {
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("qemu-io");
    let mut node = Torusd::start(dir.path(), &[]);
    let uri = node.uri("default");
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", &uri]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = run_ok(&mut c, T);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.contains("error") && !out.contains("failed"), "{out}");
        out
    };
    // background of 0x11 over the first 2 MiB, then unaligned writes on top
    io(&["write -P 0x11 0 2M"]);
    io(&[
        "write -P 0xab 1536 512",
        "write -P 0xcd 7K 100K",
        "write -P 0xef 1000000 70000",
    ]);
    node.restart();
    io(&[
        "read -P 0x11 0 1536",
        "read -P 0xab 1536 512",
        "read -P 0x11 2048 5120",
        "read -P 0xcd 7K 100K",
        "read -P 0x11 109568 890432",
        "read -P 0xef 1000000 70000",
        "read -P 0x11 1070000 1027152",
    ]);
    // write -z and discard read back as zeroes, also unaligned, and leave neighbours alone
    io(&[
        "write -z 4096 8192",
        "write -z 20000 3000",
        "discard 65536 65536",
    ]);
    io(&[
        "read -P 0 4096 8192",
        "read -P 0 20000 3000",
        "read -P 0 65536 65536",
        "read -P 0xcd 12288 7712",
        "read -P 0xcd 23000 4000",
        "read -P 0x11 131072 4096",
    ]);
    node.stop();
}

/// nbdcopy of a 64 MiB image with holes, in and out, is identical, and `nbdinfo --map` shows the
/// holes and the data (base:allocation).
#[test]
fn nbdcopy_image_in_and_out_matches() {
    require_tool("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("nbdcopy");
    let mut node = Torusd::start(dir.path(), &[]);
    let image = dir.path().join("in.img");
    let mut data = vec![0u8; 64 << 20];
    let mut rng = Rng(seed());
    // random data with holes, so block status and zero detection get exercised
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            rng.fill(chunk);
        }
    }
    std::fs::write(&image, &data).unwrap();
    assert!(node
        .torusctl(&["volume", "create", "img", "64M"])
        .status
        .success());
    run_ok(Command::new("nbdcopy").arg(&image).arg(node.uri("img")), T);
    let back = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(node.uri("img")).arg(&back), T);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "image read back differs"
    );
    // base:allocation: holes are reported (nbdinfo --map)
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(node.uri("img")), T);
    assert!(
        map.contains("hole") || map.contains("zero"),
        "no holes in the map: {map}"
    );
    assert!(map.contains("data"), "no data in the map: {map}");
    node.stop();
}

/// torusctl creates, lists, resizes and deletes volumes, and a volume survives a restart. A
/// duplicate name is refused in one clear line and an unknown size unit is refused too, each with a
/// non-zero exit. Shrinking needs --force. Delete is refused while a client is connected.
#[test]
fn torusctl_creates_lists_resizes_and_deletes_volumes() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("torusctl");
    let mut node = Torusd::start(dir.path(), &[]);
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "torusctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(node.torusctl(&["volume", "create", "db", "2G"]));
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(node.uri("db")), T);
    assert_eq!(size.trim(), (2u64 << 30).to_string());
    let list = ok(node.torusctl(&["volume", "list"]));
    assert!(
        list.contains("db") && list.contains("2 GiB") && list.contains("default"),
        "{list}"
    );
    // errors: one clear line, non-zero exit
    let dup = node.torusctl(&["volume", "create", "db", "1G"]);
    assert!(!dup.status.success());
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.contains("already exists") && err.lines().count() == 1,
        "{err}"
    );
    let bad = node.torusctl(&["volume", "create", "x", "12Q"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown unit"));
    // resize: grow is seen by new connections; shrink needs --force
    ok(node.torusctl(&["volume", "resize", "db", "4G"]));
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(node.uri("db")), T);
    assert_eq!(size.trim(), (4u64 << 30).to_string());
    let shrink = node.torusctl(&["volume", "resize", "db", "1G"]);
    assert!(
        !shrink.status.success() && String::from_utf8_lossy(&shrink.stderr).contains("--force")
    );
    // delete is refused while a client is connected
    let client = torus_tests::nbd::Client::connect(node.nbd_port, "db").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let refused = node.torusctl(&["volume", "delete", "db"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("client(s) connected"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    client.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    ok(node.torusctl(&["volume", "delete", "db"]));
    let list = ok(node.torusctl(&["volume", "list"]));
    assert!(!list.contains("db"), "{list}");
    assert!(!run(Command::new("nbdinfo").arg(node.uri("db")), T)
        .status
        .success());
    // status is healthy, /metrics answers in Prometheus text
    ok(node.torusctl(&["status"]));
    // volumes survive a restart
    ok(node.torusctl(&["volume", "create", "keep", "8M"]));
    node.restart();
    let list = ok(node.torusctl(&["volume", "list"]));
    assert!(list.contains("keep"), "{list}");
    node.stop();
}
