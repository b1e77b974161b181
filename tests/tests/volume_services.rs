//! Volume services on one node through torusctl and real clients: dump and load (holes
//! skipped, checksums equal through NBD), resize (nbdinfo sees it, data kept), and thin
//! provisioning (TRIM gives the space back).

use std::process::{Command, Stdio};
use std::time::Duration;
use torus_tests::*;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn ctl(node: &Torusd, args: &[&str]) -> std::process::Output {
    let out = node.torusctl(args);
    assert!(
        out.status.success(),
        "torusctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn status(node: &Torusd) -> serde_json::Value {
    let out = node.admin_get("/v1/status");
    serde_json::from_str(&out).unwrap()
}

/// Bytes the node's cores read for clients, summed over cores.
fn bytes_read(node: &Torusd) -> u64 {
    let text = run_ok(
        Command::new("curl").args(["-s", &format!("{}/metrics", node.admin())]),
        T,
    );
    text.lines()
        .filter(|l| l.starts_with("torus_read_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A 1 GiB volume with 100 MiB written in ten 10 MiB extents, each 512 bytes off a block boundary:
/// `torusctl dump` reads 100-101 MiB (the node's read counter) and makes a 1 GiB file allocating at
/// most 110 MiB with the same sha256 as nbdcopy of the volume. `load` into a new volume (sized from
/// the file) gives the same sha256 through NBD and uses at most 101 MiB; `load` from stdin with a
/// size gives the same sha256. A snapshot dumps to stdout with holes written. A file larger than
/// the volume and an unknown volume are clear errors.
#[test]
fn dump_and_load_skip_holes_and_round_trip() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("curl", "curl");
    let dir = TempDir::new("dump-load");
    let node = Torusd::start(dir.path(), &[]);
    ctl(&node, &["volume", "create", "src", "1G"]);
    let src = node.uri("src");
    // 10 % written, in ten places, each starting 512 bytes off a 4 KiB block.
    let mut cmds = Vec::new();
    for i in 0..10u64 {
        cmds.push(format!(
            "write -P {} {} 10M",
            0x10 + i,
            i * 100 * MIB + i * 4096 + 512
        ));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&src, &refs);
    let want = sha256_over_nbd(&src);

    let image = dir.path().join("src.img");
    let before = bytes_read(&node);
    let out = ctl(&node, &["dump", "src", image.to_str().unwrap()]);
    let read = bytes_read(&node) - before;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("dumped src"), "{said}");
    // About 100 MiB of work for a 1 GiB volume with 10 % written (blocks are 4 KiB, so each
    // unaligned extent reads up to two blocks more).
    assert!(
        (100 * MIB..=101 * MIB).contains(&read),
        "dump read {read} bytes"
    );
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 110 * MIB,
        "dump file allocates {} bytes",
        meta.blocks() * 512
    );
    let file_sha = run_ok(Command::new("sha256sum").arg(&image), T);
    assert_eq!(&file_sha[..64], want);

    // Load into a new volume (created from the file's size), then from stdin with a size.
    let out = ctl(&node, &["load", image.to_str().unwrap(), "copy"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("created volume copy") && said.contains("loaded"),
        "{said}"
    );
    assert_eq!(sha256_over_nbd(&node.uri("copy")), want);
    // Thin: only the data was written.
    let list =
        String::from_utf8_lossy(&ctl(&node, &["volume", "list", "--json"]).stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let copy = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "copy")
        .unwrap();
    assert!(copy["used_bytes"].as_u64().unwrap() <= 101 * MIB, "{copy}");

    let mut load = Command::new(bin("torusctl"))
        .args(["--server", &node.admin(), "load", "-", "piped", "1G"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::copy(
        &mut std::fs::File::open(&image).unwrap(),
        load.stdin.as_mut().unwrap(),
    )
    .unwrap();
    drop(load.stdin.take());
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_over_nbd(&node.uri("piped")), want);

    // A snapshot dumps too, and a dump to stdout writes the holes.
    ctl(&node, &["snapshot", "create", "src@s"]);
    qemu_io(&src, &["write -P 0x77 0 1M"]);
    let sum = sha256_of_output(Command::new(bin("torusctl")).args([
        "--server",
        &node.admin(),
        "dump",
        "src@s",
        "-",
    ]));
    assert_eq!(sum, want);

    // Errors: a file larger than the volume, stdin without a size, no such volume.
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let out = node.torusctl(&["load", big.to_str().unwrap(), "copy"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit"));
    let out = node.torusctl(&["dump", "nosuch", image.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 512 MiB written then discarded leaves at most 1 MiB used. Resize 512 MiB -> 1 GiB: a connection
/// opened before the resize is refused past the old end, then writes there after it;
/// `nbdinfo --size` says 1 GiB, data below the old end reads back, the new half reads zeroes and
/// takes writes.
#[test]
fn resize_and_trim_give_space_and_size() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("curl", "curl");
    let dir = TempDir::new("resize-trim");
    let node = Torusd::start(dir.path(), &[]);
    ctl(&node, &["volume", "create", "v", "512M"]);
    let uri = node.uri("v");
    qemu_io(&uri, &["write -P 0x5a 0 512M"]);
    let used = status(&node)["used_bytes"].as_u64().unwrap();
    assert!(used >= 512 * MIB, "used {used}");
    // TRIM all of it: the space comes back.
    qemu_io(&uri, &["discard 0 512M"]);
    let used = status(&node)["used_bytes"].as_u64().unwrap();
    assert!(used <= MIB, "used {used} after trimming everything");
    // Resize to twice the size: new connections see it, and so does one that was open (it
    // may write past the old end at once); data below the old end is intact.
    qemu_io(&uri, &["write -P 0x6b 0 8M", "write -P 0x6c 504M 8M"]);
    let mut open = torus_tests::nbd::Client::connect(node.nbd_port, "v").unwrap();
    assert_ne!(
        open.write(600 * MIB, &[7u8; 4096], 0).unwrap(),
        0,
        "past the end before the resize"
    );
    ctl(&node, &["volume", "resize", "v", "1G"]);
    assert_eq!(open.write(600 * MIB, &[7u8; 4096], 0).unwrap(), 0);
    assert_eq!(
        open.read(600 * MIB, 4096).unwrap().unwrap(),
        vec![7u8; 4096]
    );
    open.disconnect();
    qemu_io(&uri, &["discard 600M 4K"]);
    let info = run_ok(Command::new("nbdinfo").args(["--size", &uri]), T);
    assert_eq!(info.trim(), (1u64 << 30).to_string());
    qemu_io(
        &uri,
        &[
            "read -P 0x6b 0 8M",
            "read -P 0x6c 504M 8M",
            "read -P 0 512M 512M",
            "write -P 0x6d 1016M 8M",
        ],
    );
    qemu_io(&uri, &["read -P 0x6d 1016M 8M"]);
}

/// qemu-io's output for commands expected to fail.
fn qemu_io_fails(uri: &str, cmd: &str, expect: &str) {
    let out = run(
        Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]),
        T,
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(expect), "{cmd}: expected {expect:?}: {text}");
}

/// A 16 MiB quota on a 256 MiB volume: a write past it answers ENOSPC and writes nothing,
/// overwrites go through, a discard makes room; the quota survives a restart, can be raised and
/// removed; a quota that is not a multiple of 4 KiB is refused.
#[test]
fn a_quota_refuses_writes_past_it_and_survives_a_restart() {
    require_tool("qemu-io", "qemu-utils");
    let dir = TempDir::new("quota");
    let mut node = Torusd::start(dir.path(), &[]);
    let out = ctl(&node, &["volume", "create", "q", "256M", "--quota", "16M"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("quota 16 MiB"));
    let uri = node.uri("q");
    qemu_io(&uri, &["write -P 0x11 0 16M"]);
    qemu_io_fails(&uri, "write -P 0x22 32M 4K", "No space left on device");
    // Overwrites go through; nothing past the quota was written.
    qemu_io(
        &uri,
        &[
            "write -P 0x33 0 1M",
            "read -P 0 32M 4K",
            "read -P 0x11 1M 15M",
        ],
    );
    // Trimming makes room.
    qemu_io(
        &uri,
        &[
            "discard 0 4M",
            "write -P 0x44 32M 4M",
            "read -P 0x44 32M 4M",
        ],
    );
    let list = String::from_utf8_lossy(&ctl(&node, &["volume", "list"]).stdout).to_string();
    assert!(list.contains("16 MiB"), "{list}");
    // The quota is kept across a restart, and can be raised or removed.
    node.restart();
    qemu_io_fails(&uri, "write -P 0x55 64M 4K", "No space left on device");
    ctl(&node, &["volume", "quota", "q", "32M"]);
    qemu_io(&uri, &["write -P 0x55 64M 8M"]);
    ctl(&node, &["volume", "quota", "q", "none"]);
    qemu_io(&uri, &["write -P 0x66 128M 64M"]);
    let out = node.torusctl(&["volume", "quota", "q", "1000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4 KiB"));
}
