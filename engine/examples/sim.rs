//! The long form of the deterministic simulation (the short form runs in `cargo test`).
//!
//!     cargo run --release -p torus-engine --example sim -- --seeds 5000
//!     cargo run --release -p torus-engine --example sim -- --seed 1234 --steps 3000 --faults crash,torn
//!     cargo run --release -p torus-engine --example sim -- --seeds 50 --canary   # must fail
//!
//! Seeds run on every CPU; the first failure prints its replay command and the run exits 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use torus_engine::testing::sim::{self, Faults, SimConfig, SimReport};

const USAGE: &str =
    "usage: sim [--seed N | --seeds COUNT [--first N]] [--steps N] [--faults LIST] [--canary]

  --seed N       run one seed (replay a failure)
  --seeds COUNT  run COUNT seeds from --first (default 0), on every CPU
  --steps N      scheduler steps per seed (default 3000)
  --faults LIST  all (default), none, or a comma-separated list of crash, torn, misdirect,
                 read-error, bit-rot, write-error, sync-error, device-full
  --canary       acknowledge flushes before they are durable: the run must find lost writes";

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut first, mut count, mut steps, mut faults, mut canary) =
        (0u64, 100u64, 3000u32, Faults::all(), false);
    let number = |v: Option<String>, name: &str| -> u64 {
        v.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("sim: {name} needs a number\n{USAGE}");
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
            "--steps" => steps = number(args.next(), "--steps") as u32,
            "--faults" => {
                faults = Faults::parse(&args.next().unwrap_or_default()).unwrap_or_else(|e| {
                    eprintln!("sim: {e}");
                    std::process::exit(2)
                })
            }
            "--canary" => canary = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("sim: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }
    let started = std::time::Instant::now();
    let next = AtomicU64::new(first);
    let failed = AtomicBool::new(false);
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
                match sim::run(SimConfig {
                    seed,
                    steps,
                    faults,
                    canary,
                }) {
                    Ok(r) => total.lock().unwrap().add(&r),
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
    print_report(&r, faults, steps, started.elapsed());
    let failed = failed.load(Ordering::Relaxed);
    if canary {
        // The canary must fail: acknowledged-but-not-durable flushes lose writes on power loss.
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

fn print_report(r: &SimReport, faults: Faults, steps: u32, took: std::time::Duration) {
    println!(
        "seeds passed: {} × up to {steps} steps ({} steps, {} disk operations) with faults {faults}, in {:.1} s",
        r.runs,
        r.steps,
        r.disk_ops,
        took.as_secs_f64()
    );
    println!(
        "faults injected: crashes {}, torn writes {}, misdirected writes {}, read errors {}, bit flips {}, write errors {}, fsync errors {}, device full {}; clean restarts {}",
        r.crashes, r.torn_writes, r.misdirected_writes, r.read_errors, r.bit_flips, r.write_errors, r.sync_errors, r.device_full, r.clean_restarts
    );
    println!(
        "writes acknowledged {} ({} MiB), flushes acknowledged {} (answered EIO after a disk error {}), snapshots and deletions acknowledged {}, reads checked {} ({} MiB verified); wrong-data reads 0, stale reads 0",
        r.writes_acked,
        r.bytes_acked >> 20,
        r.flushes_acked,
        r.flushes_failed,
        r.volume_ops_acked,
        r.reads_checked,
        r.bytes_verified >> 20
    );
    println!(
        "damage detected: reads answered EIO {}, opens refused naming the damage {}; writes refused ENOSPC {}",
        r.reads_eio, r.refused_opens, r.writes_enospc
    );
    println!(
        "checkpoints made durable {} ({} in the background while commits went on)",
        r.checkpoints, r.checkpoints_background
    );
}
