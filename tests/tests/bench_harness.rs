//! The benchmark harness cannot rot silently: `torus-bench compare --quick --dry-run` checks
//! its tools and prints its plan, and a tiny real run of one workload (fio held to CPU 0)
//! produces the results files with a row for torus.

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

/// `torus-bench compare --quick --dry-run` checks its tools and prints its plan (with the
/// randwrite-4k-qd32 workload), then says it is a dry run.
#[test]
fn bench_dry_run_prints_the_plan() {
    require_tool("fio", "fio");
    let out = run_ok(
        Command::new(bin("torus-bench")).args(["compare", "--quick", "--dry-run"]),
        Duration::from_secs(60),
    );
    assert!(
        out.contains("plan:") && out.contains("randwrite-4k-qd32") && out.contains("dry run"),
        "{out}"
    );
}

/// A 1-second run of randwrite-4k-qd32 over 32 MiB against the disk, torus and torus-3x (three
/// nodes and etcd), fio held to CPU 0, prints rows for torus and torus-3x and writes results.json
/// (three cells with IOPS above 0, fio's CPUs, torus's RSS per GiB written), results.md (with the
/// RSS per GiB written) and the three PNG charts (IOPS, p50 and p99 latency).
#[test]
fn bench_tiny_run_writes_results() {
    require_tool("fio", "fio");
    require_tool("etcd", "etcd-server");
    let dir = TempDir::new("bench");
    let out = run_ok(
        Command::new(bin("torus-bench")).args([
            "compare",
            "--repeats",
            "1",
            "--runtime",
            "1",
            "--size-mib",
            "32",
            "--targets",
            "disk,torus,torus-3x",
            "--workloads",
            "randwrite-4k-qd32",
            "--fio-cpus",
            "0",
            "--out",
            &dir.path().display().to_string(),
        ]),
        Duration::from_secs(300),
    );
    assert!(out.contains("| randwrite-4k-qd32 | torus |"), "{out}");
    assert!(out.contains("| randwrite-4k-qd32 | torus-3x |"), "{out}");
    let results = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("bench-results-")
        })
        .expect("results folder");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(results.path().join("results.json")).unwrap(),
    )
    .unwrap();
    // Every fio ran on CPU 0 only, and the results say so.
    assert!(out.contains("fio on CPUs 0 only"), "{out}");
    assert_eq!(json["machine"]["fio_cpus"], "0", "{json}");
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3);
    assert!(
        cells
            .iter()
            .all(|c| c["iops_median"].as_f64().unwrap() > 0.0),
        "{json}"
    );
    assert!(
        json["torus_rss_mib_per_gib_written"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{json}"
    );
    let md = std::fs::read_to_string(results.path().join("results.md")).unwrap();
    assert!(md.contains("RSS per GiB written"), "{md}");
    for chart in ["iops.png", "latency-p50.png", "latency-p99.png"] {
        let png = std::fs::read(results.path().join(chart))
            .unwrap_or_else(|e| panic!("{chart}: {e} (fonts-dejavu-core installed?)"));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5000,
            "{chart} is not a real chart"
        );
    }
}
