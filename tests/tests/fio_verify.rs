//! fio's own nbd engine writes 256 MiB of 4 KiB random blocks at queue depth 32 with crc32c
//! verification; after a clean restart, and after `kill -9`, the same job with
//! `--verify_only` finds every block intact.

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

const T: Duration = Duration::from_secs(600);

fn fio(uri: &str, extra: &[&str]) -> serde_json::Value {
    let mut c = Command::new("fio");
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=256M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=4242",
        "--output-format=json",
    ]);
    c.args(extra);
    let out = run_ok(&mut c, T);
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("fio json")..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    job.clone()
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

#[test]
fn fio_verify_survives_clean_restart() {
    write_then_verify(false);
}

#[test]
fn fio_verify_survives_kill_9_after_end_fsync() {
    write_then_verify(true);
}
