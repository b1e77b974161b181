//! Snapshots and clones on one node, through torusctl and real NBD clients (qemu-io): a
//! snapshot keeps pattern A while the volume takes pattern B, is served read-only as
//! VOLUME@SNAPSHOT, a clone of it takes writes without changing it, restore brings A back,
//! and deleting frees exactly the space only the deleted one held. All of it across a clean
//! restart and a kill -9 (the clone records are replayed from the journal).

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

const T: Duration = Duration::from_secs(60);

fn ctl_fails(node: &Torusd, args: &[&str], expect: &str) {
    let out = node.torusctl(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "torusctl {args:?} succeeded");
    assert!(
        err.contains(expect),
        "torusctl {args:?}: expected {expect:?} in {err}"
    );
}

fn used(node: &Torusd) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &node.admin_get("/v1/status").into_bytes(),
    ))
    .unwrap();
    v["used_bytes"].as_u64().unwrap()
}

fn held(node: &Torusd, snap: &str) -> u64 {
    let out = node.torusctl_ok(&["snapshot", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == snap)
        .unwrap_or_else(|| panic!("{snap} not listed: {out}"))["held_bytes"]
        .as_u64()
        .unwrap()
}

const MIB: u64 = 1 << 20;

/// qemu-io writes pattern A (64 MiB); `snapshot create db@a` takes no space; pattern B over half:
/// the volume reads B+A, db@a reads A and is read-only (qemu-io cannot open it for writing; a raw
/// client's WRITE, WRITE_ZEROES and TRIM are each answered EPERM and the connection goes on), db@a
/// holds exactly the 32 MiB overwritten; a clone reads A, takes writes, and the snapshot stays A;
/// all of it after a clean restart, and after kill -9 with a second snapshot, db@b, taken after the
/// restart (only the journal holds it); restore is refused while the volume has a client, then the
/// volume reads A; deleting db@b frees exactly its held bytes, deleting the shared db@a nothing;
/// after deleting everything used space is 0. Refused: a duplicate, an unknown volume, a name
/// without @, a clone of a volume, a resize of a snapshot.
#[test]
fn snapshot_clone_restore_and_space() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("curl", "curl");
    let dir = TempDir::new("snapshots");
    let mut node = Torusd::start(dir.path(), &[]);
    node.torusctl_ok(&["volume", "create", "db", "256M"]);
    let db = node.uri("db");
    qemu_io(&db, &["write -P 0xaa 0 64M"]);
    let base = used(&node);
    assert!(base >= 64 * MIB, "used {base}");

    let out = node.torusctl_ok(&["snapshot", "create", "db@a"]);
    assert!(out.contains("db@a"), "{out}");
    assert_eq!(used(&node), base, "a snapshot must cost no space");
    qemu_io(&db, &["write -P 0xbb 0 32M"]);
    assert_eq!(used(&node), base + 32 * MIB);
    // The snapshot alone holds the 32 MiB of A the volume overwrote.
    assert_eq!(held(&node, "db@a"), 32 * MIB);

    let snap = node.uri("db@a");
    qemu_io(&db, &["read -P 0xbb 0 32M", "read -P 0xaa 32M 32M"]);
    qemu_io(&snap, &["read -P 0xaa 0 64M"]);
    // Read-only: the export says so, and qemu-io cannot open it for writing.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &snap, "-c", "write -P 0xcc 0 4K"]);
    let out = run(&mut c, T);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() || text.contains("Permission denied"),
        "{text}"
    );
    assert!(text.contains("Permission denied"), "{text}");
    // A raw client that writes anyway: WRITE, WRITE_ZEROES and TRIM are each answered EPERM
    // (the connection goes on), and the snapshot still reads A.
    {
        use torus_tests::nbd::*;
        let mut raw = Client::connect(node.nbd_port, "db@a").unwrap();
        assert_eq!(raw.write(0, &[0xcc; 4096], 0).unwrap(), EPERM);
        for (cookie, cmd) in [(10, CMD_WRITE_ZEROES), (11, CMD_TRIM)] {
            raw.send(cmd, 0, cookie, 0, 4096, &[]).unwrap();
            assert_eq!(raw.reply().unwrap(), (EPERM, cookie), "command {cmd}");
        }
        assert_eq!(raw.read(0, 4096).unwrap().unwrap(), vec![0xaa; 4096]);
        raw.disconnect();
    }
    qemu_io(&snap, &["read -P 0xaa 0 4K"]);

    // Clone: writable, starts as the snapshot, does not change it.
    node.torusctl_ok(&["clone", "db@a", "db-test"]);
    let clone = node.uri("db-test");
    qemu_io(&clone, &["read -P 0xaa 0 64M", "write -P 0xcc 0 1M"]);
    qemu_io(&clone, &["read -P 0xcc 0 1M", "read -P 0xaa 1M 63M"]);
    qemu_io(&snap, &["read -P 0xaa 0 64M"]);

    // Everything survives a clean restart (checkpoint) and a kill -9 (journal replay).
    node.restart();
    qemu_io(&db, &["read -P 0xbb 0 32M", "read -P 0xaa 32M 32M"]);
    qemu_io(&snap, &["read -P 0xaa 0 64M"]);
    node.torusctl_ok(&["snapshot", "create", "db@b"]);
    qemu_io(&db, &["write -P 0xdd 0 4M"]);
    node.kill9();
    node.spawn();
    qemu_io(
        &node.uri("db@b"),
        &["read -P 0xbb 0 32M", "read -P 0xaa 32M 32M"],
    );
    qemu_io(&db, &["read -P 0xdd 0 4M", "read -P 0xbb 4M 28M"]);
    qemu_io(&clone, &["read -P 0xcc 0 1M", "read -P 0xaa 1M 63M"]);

    // Listing and refusals.
    let list = node.torusctl_ok(&["snapshot", "list", "db"]);
    assert!(list.contains("db@a") && list.contains("db@b"), "{list}");
    let vols = node.torusctl_ok(&["volume", "list"]);
    assert!(vols.contains("db-test") && !vols.contains("db@a"), "{vols}");
    ctl_fails(&node, &["snapshot", "create", "db@a"], "already exists");
    ctl_fails(
        &node,
        &["snapshot", "create", "nosuch@x"],
        "no volume named",
    );
    ctl_fails(&node, &["snapshot", "create", "db"], "VOLUME@SNAPSHOT");
    ctl_fails(&node, &["clone", "db", "x"], "not a snapshot");
    ctl_fails(&node, &["volume", "resize", "db@a", "512M"], "snapshot");

    // Restore: refused while a client is connected, then the volume reads A again.
    let _c = connect_export(node.nbd_port, "db");
    std::thread::sleep(Duration::from_millis(300));
    ctl_fails(
        &node,
        &["snapshot", "restore", "db@a"],
        "client(s) connected",
    );
    drop(_c);
    std::thread::sleep(Duration::from_millis(300));
    node.torusctl_ok(&["snapshot", "restore", "db@a"]);
    qemu_io(&db, &["read -P 0xaa 0 64M"]);

    // Space: deleting a snapshot frees exactly what it alone held.
    let before = used(&node);
    let held_b = held(&node, "db@b");
    assert!(held_b >= 28 * MIB, "db@b holds {held_b}");
    node.torusctl_ok(&["snapshot", "delete", "db@b"]);
    assert_eq!(used(&node), before - held_b);
    // db@a is shared with the restored volume and the clone: deleting it frees nothing.
    let before = used(&node);
    assert_eq!(held(&node, "db@a"), 0);
    node.torusctl_ok(&["snapshot", "delete", "db@a"]);
    assert_eq!(used(&node), before);
    qemu_io(&db, &["read -P 0xaa 0 64M"]);
    qemu_io(&clone, &["read -P 0xcc 0 1M", "read -P 0xaa 1M 63M"]);
    node.torusctl_ok(&["volume", "delete", "db"]);
    node.torusctl_ok(&["volume", "delete", "db-test"]);
    assert_eq!(used(&node), 0);
    node.stop();
}

/// An NBD connection to `export` that stays open (counts as a client) until dropped.
fn connect_export(port: u16, export: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = connect(port);
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut msg = Vec::new();
    msg.extend_from_slice(&1u32.to_be_bytes()); // fixed newstyle
    msg.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    msg.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
    msg.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&msg).unwrap();
    // Read option replies until the ACK.
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        if kind == 1 {
            return s;
        }
        assert!(kind & (1 << 31) == 0, "export {export} refused");
    }
}
