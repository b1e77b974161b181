//! The on-disk format is frozen by fixtures: a data dir written by each released format
//! version is kept in `tests/fixtures/` and must open and read back exactly. The v1 fixture
//! was left by `kill -9`, so its journal (both rings) holds writes that a checkpoint does not.
//!
//! Regenerate (only when adding a new format version, never to make this test pass):
//!   cargo test --release -p torus-tests --test format_fixtures -- --ignored make_format_v1_fixture

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use torus_tests::nbd::Client;
use torus_tests::*;

const BLOCKS: u64 = 80;

fn content(block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    Rng(block ^ 0xF0F0).fill(&mut b);
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format-v1")
}

/// Regenerates the v1 fixture (ignored; only when adding a format version, never to make the test
/// pass).
#[test]
#[ignore]
fn make_format_v1_fixture() {
    let dir = TempDir::new("make-fixture");
    let mut node = Torusd::start(dir.path(), &["--size", "8M", "--default-volume-size", "1M"]);
    let mut c = Client::connect(node.nbd_port, "default").unwrap();
    for block in 0..BLOCKS {
        assert_eq!(c.write(block * 4096, &content(block), 0).unwrap(), 0);
        if block % 16 == 15 {
            assert_eq!(c.flush().unwrap(), 0);
        }
    }
    assert_eq!(c.flush().unwrap(), 0);
    node.kill9();
    let out = fixture_dir();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        dir.path().join("torus-data/metadata.json"),
        out.join("metadata.json"),
    )
    .unwrap();
    let gz = run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "gzip -9 -c {} > {}/blocks.gz",
            dir.path().join("torus-data/blocks").display(),
            out.display()
        )),
        Duration::from_secs(60),
    );
    let _ = gz;
}

/// A data dir written by format v1 (left by `kill -9`, so its journal holds data) is kept in
/// tests/fixtures/ and must open and read back exactly: a 1 MiB volume, 80 written blocks, zeroes
/// after them.
#[test]
fn opens_format_v1_fixture() {
    let fixture = fixture_dir();
    assert!(
        fixture.join("blocks.gz").exists(),
        "fixture missing: {}",
        fixture.display()
    );
    let dir = TempDir::new("fixture-v1");
    let data = dir.path().join("torus-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(fixture.join("metadata.json"), data.join("metadata.json")).unwrap();
    run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "gzip -dc {} > {}",
            fixture.join("blocks.gz").display(),
            data.join("blocks").display()
        )),
        Duration::from_secs(60),
    );
    let mut node = Torusd::start(dir.path(), &[]);
    let mut c = Client::connect(node.nbd_port, "default").unwrap();
    assert_eq!(c.size, 1 << 20);
    for block in 0..BLOCKS {
        assert!(
            c.read(block * 4096, 4096).unwrap().unwrap() == content(block),
            "fixture block {block} differs"
        );
    }
    assert_eq!(
        c.read(BLOCKS * 4096, 4096).unwrap().unwrap(),
        vec![0u8; 4096]
    );
    c.disconnect();
    node.stop();
}
