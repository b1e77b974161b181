//! fio's own nbd engine writes 256 MiB of 4 KiB random blocks at queue depth 32 with crc32c
//! verification; after a clean restart, and after `kill -9`, the same job with
//! `--verify_only` finds every block intact. On a store small enough that its journal fills
//! several times under the load, the checkpoints written in the background meanwhile lose
//! nothing either.

use torus_tests::*;

fn fio(uri: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--size=256M", "--randseed=4242"];
    args.extend_from_slice(extra);
    fio_verify(uri, &args)
}

fn write_then_verify(kill: bool) {
    require_tool("fio", "fio");
    let dir = TempDir::new(if kill { "fio-kill" } else { "fio-restart" });
    let mut node = Torusd::start(dir.path(), &[]);
    let uri = node.uri("default");
    let job = fio(&uri, &["--end_fsync=1"]);
    assert_eq!(
        job["write"]["io_bytes"],
        256u64 << 20,
        "fio wrote everything"
    );
    if kill {
        node.kill9();
        node.spawn();
    } else {
        node.restart();
    }
    let job = fio(&uri, &["--verify_only=1"]);
    assert_eq!(
        job["read"]["io_bytes"],
        256u64 << 20,
        "fio verified everything: {job}"
    );
    node.stop();
}

/// fio's nbd engine writes 4 KiB random blocks at QD32 over 256 MiB with
/// `--verify=crc32c --end_fsync=1`; after a clean restart `--verify_only` finds every block intact.
#[test]
fn fio_verify_survives_clean_restart() {
    write_then_verify(false);
}

/// The same job, then `kill -9` after its end fsync: `--verify_only` finds every block intact.
#[test]
fn fio_verify_survives_kill_9_after_end_fsync() {
    write_then_verify(true);
}

/// On a 256 MiB one-core store, three passes over a 128 MiB volume, each with its own data (fio
/// seeds 71, 72 and 73), while checkpoints are written in the background (it fails with fewer than
/// 2 of them; it prints how many); then `kill -9` and `--verify_only` of the last pass.
#[test]
fn checkpoints_written_in_the_background_under_load_lose_nothing() {
    require_tool("fio", "fio");
    let dir = TempDir::new("fio-checkpoints");
    // 256 MiB, one core: a journal of 512 pages, a checkpoint every 170 pages used (each
    // commit takes a page at least: 30-46 checkpoints over these 98,304 writes here).
    let mut node = Torusd::start(
        dir.path(),
        &[
            "--size",
            "256M",
            "--cores",
            "1",
            "--default-volume-size",
            "128M",
        ],
    );
    let uri = node.uri("default");
    let before = metric_total(&node, "torus_checkpoints_total");
    // Three passes over every block, each with its own data (a block left from an earlier
    // pass fails the last pass's verification).
    for seed in ["--randseed=71", "--randseed=72", "--randseed=73"] {
        fio_verify(&uri, &["--size=128M", seed, "--end_fsync=1"]);
    }
    let during = metric_total(&node, "torus_checkpoints_total") - before;
    eprintln!("{during} checkpoints written under the load");
    assert!(during >= 2, "only {during} checkpoint(s) under the load");
    node.kill9();
    node.spawn();
    let job = fio_verify(&uri, &["--size=128M", "--randseed=73", "--verify_only=1"]);
    assert_eq!(
        job["read"]["io_bytes"],
        128u64 << 20,
        "fio verified everything: {job}"
    );
    node.stop();
}
