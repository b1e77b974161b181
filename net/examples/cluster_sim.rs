//! The long form of the replication protocol's deterministic simulation (the short form runs
//! in `cargo test -p torus-net`).
//!
//!     cargo run --release -p torus-net --example cluster_sim -- --seeds 2000
//!     cargo run --release -p torus-net --example cluster_sim -- --seed 1234 --seconds 60 --nodes 4
//!     cargo run --release -p torus-net --example cluster_sim -- --seeds 50 --canary   # must fail
//!
//! Seeds run on every CPU; the first failure prints its replay command and the run exits 1
//! (with `--keep-going`, every failure is printed, the others still run, and the failing seeds
//! are listed at the end).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use torus_net::testing::sim::{self, SimConfig, SimReport};

const USAGE: &str = "usage: cluster_sim [--seed N | --seeds COUNT [--first N]] [--seconds S] [--nodes 3|4] [--no-faults] [--canary] [--keep-going]

  --seed N       run one seed (replay a failure)
  --seeds COUNT  run COUNT seeds from --first (default 0), on every CPU
  --seconds S    simulated seconds of load and faults per seed (default 30), then healing
  --nodes N      3 or 4 nodes (default: 3 for even seeds, 4 for odd ones)
  --no-faults    load only
  --keep-going   run every seed even after a failure; list the failing seeds at the end
  --canary       nodes acknowledge flushes without making anything durable: must fail";

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut first, mut count, mut seconds, mut nodes, mut faults, mut canary) =
        (0u64, 100u64, 30u64, 0usize, true, false);
    let mut keep_going = false;
    let number = |v: Option<String>, name: &str| -> u64 {
        v.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("cluster_sim: {name} needs a number\n{USAGE}");
            std::process::exit(2)
        })
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                first = number(args.next(), "--seed");
                count = 1;
            }
            "--seeds" => count = number(args.next(), "--seeds"),
            "--first" => first = number(args.next(), "--first"),
            "--seconds" => seconds = number(args.next(), "--seconds"),
            "--nodes" => {
                nodes = number(args.next(), "--nodes") as usize;
                if !(3..=4).contains(&nodes) {
                    eprintln!("cluster_sim: --nodes is 3 or 4");
                    std::process::exit(2)
                }
            }
            "--no-faults" => faults = false,
            "--canary" => canary = true,
            "--keep-going" => keep_going = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("cluster_sim: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }
    let started = std::time::Instant::now();
    let next = AtomicU64::new(first);
    let failed = AtomicBool::new(false);
    let failing = Mutex::new(Vec::new());
    let total = Mutex::new(SimReport::default());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count || failed.load(Ordering::Relaxed) {
                    return;
                }
                let cfg = SimConfig {
                    seed,
                    seconds,
                    nodes: if nodes == 0 {
                        3 + (seed % 2) as usize
                    } else {
                        nodes
                    },
                    faults,
                    canary,
                };
                match sim::run(cfg) {
                    Ok(r) => total.lock().unwrap().add(&r),
                    Err(f) if keep_going => {
                        println!("FAIL {f}");
                        failing.lock().unwrap().push(seed);
                    }
                    Err(f) => {
                        if !failed.swap(true, Ordering::Relaxed) {
                            println!("FAIL {f}");
                        }
                    }
                }
            });
        }
    });
    let r = total.into_inner().unwrap();
    print_report(&r, started.elapsed());
    let mut failing = failing.into_inner().unwrap();
    failing.sort_unstable();
    if keep_going {
        println!("failing seeds: {} {failing:?}", failing.len());
    }
    let failed = failed.load(Ordering::Relaxed) || !failing.is_empty();
    if canary {
        if failed {
            println!("canary: caught, as it must be");
        } else {
            println!("canary: NOT caught — the model cannot see a lost write");
            std::process::exit(1);
        }
    } else if failed {
        std::process::exit(1);
    }
}

fn print_report(r: &SimReport, took: std::time::Duration) {
    println!(
        "seeds passed: {} ({} simulated seconds, {} events, {} messages), in {:.1} s",
        r.seeds,
        r.sim_seconds,
        r.events,
        r.messages,
        took.as_secs_f64()
    );
    println!("faults injected: {}", r.faults_line());
    println!(
        "writes acknowledged {}, flushes acknowledged {}, reads checked {}, requests answered with an error (unavailable) {}; wrong-data reads 0, stale reads 0",
        r.writes_acked, r.flushes_acked, r.reads_checked, r.errors
    );
    println!(
        "map epochs {}, catch-up rounds {}, revivals of PGs lost with every clean holder {} ({} copying whole PGs from another holder's copy that covers more; {} waits for one), flush epochs recorded {} (and {} on a node's own disk while cut off past its lease, {} of them published by its next process), nodes marked out after {} s down {}, blocks copied {}, blocks freed after their PG moved away {}; after healing every PG clean within {:.1} s (max), {} block replicas compared with the model: all identical, and no node keeps a block of a PG it holds no slot of",
        r.map_epochs,
        r.catch_up_rounds,
        r.revivals,
        r.revivals_whole,
        r.revivals_waited,
        r.flush_records,
        r.cut_records,
        r.cut_records_published,
        torus_net::testing::sim::DOWN_OUT_SECONDS,
        r.marked_out,
        r.blocks_copied,
        r.blocks_freed,
        r.converge_max as f64 / 1e6,
        r.blocks_verified
    );
}
