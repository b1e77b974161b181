//! torusblk on this machine, whose kernel has neither nbd nor ublk_drv: every way it can be
//! misused or meet a missing driver ends in one clear line and a non-zero exit. (The devices
//! themselves are tested against a real kernel in tests/vm/run.sh.)

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

fn fails_with(args: &[&str], expect: &str) {
    let out = run(
        Command::new(bin("torusblk")).args(args),
        Duration::from_secs(20),
    );
    assert!(!out.status.success(), "torusblk {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(expect),
        "torusblk {args:?}: expected {expect:?} in:\n{err}"
    );
    assert!(
        err.trim().lines().count() <= 3,
        "torusblk {args:?}: too wordy:\n{err}"
    );
}

/// `torusblk --help` names both frontends, nbd and ublk, and `torusblk nbd --help` names --server,
/// --connections, --timeout, --dead-conn-timeout and --disconnect.
#[test]
fn help_names_both_frontends() {
    let out = run_ok(
        Command::new(bin("torusblk")).arg("--help"),
        Duration::from_secs(10),
    );
    assert!(out.contains("nbd") && out.contains("ublk"), "{out}");
    let out = run_ok(
        Command::new(bin("torusblk")).args(["nbd", "--help"]),
        Duration::from_secs(10),
    );
    for flag in [
        "--server",
        "--connections",
        "--timeout",
        "--dead-conn-timeout",
        "--disconnect",
    ] {
        assert!(
            out.contains(flag),
            "torusblk nbd --help does not mention {flag}:\n{out}"
        );
    }
}

/// On a kernel without nbd or ublk_drv: misuse (a non-NBD device, `--connections 0`, a bad ublk id,
/// a ublk id this node does not serve), no torusd, an unknown export or volume, and each missing
/// driver (`modprobe nbd`, `modprobe ublk_drv`) end in a short error of at most three lines that
/// names the problem, and a non-zero exit. A refused ublk device leaves the volume deletable.
#[test]
fn misuse_and_missing_drivers_are_clear_errors() {
    fails_with(&["nbd", "-d", "/dev/sda"], "not an NBD device");
    fails_with(&["nbd", "default", "/dev/loop0"], "not an NBD device");
    fails_with(&["nbd", "default", "--connections", "0"], "--connections");
    fails_with(&["ublk", "-d", "xyz"], "not a ublk device");
    // No torusd: the NBD handshake or the admin API says where it looked.
    let port = free_port();
    fails_with(
        &["nbd", "default", "--server", &format!("127.0.0.1:{port}")],
        &format!("127.0.0.1:{port}"),
    );
    fails_with(
        &[
            "ublk",
            "default",
            "--admin",
            &format!("http://127.0.0.1:{port}"),
        ],
        "cannot reach torusd",
    );

    let dir = TempDir::new("torusblk");
    let t = Torusd::start(dir.path(), &[]);
    let nbd = format!("127.0.0.1:{}", t.nbd_port);
    let admin = format!("http://127.0.0.1:{}", t.admin_port);
    // The export is negotiated first: a wrong name is named.
    fails_with(&["nbd", "nosuch", "--server", &nbd], "no such export");
    // Then the kernel: this one has no nbd driver.
    fails_with(&["nbd", "default", "--server", &nbd], "modprobe nbd");
    fails_with(&["ublk", "nosuch", "--admin", &admin], "no volume named");
    fails_with(&["ublk", "default", "--admin", &admin], "modprobe ublk_drv");
    fails_with(
        &["ublk", "-d", "7", "--admin", &admin],
        "not served by this node",
    );
    // A refused ublk device leaves the volume free: it can still be deleted.
    let out = run(
        Command::new(bin("torusctl")).args(["--server", &admin, "volume", "delete", "default"]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
