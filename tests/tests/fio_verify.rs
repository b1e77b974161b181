//! fio's own nbd engine writes 256 MiB of 4 KiB random blocks at queue depth 32 with crc32c
//! verification; after a clean restart, and after `kill -9`, the same job with
//! `--verify_only` finds every block intact.

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

#[test]
fn fio_verify_survives_clean_restart() {
    write_then_verify(false);
}

#[test]
fn fio_verify_survives_kill_9_after_end_fsync() {
    write_then_verify(true);
}
