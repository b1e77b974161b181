//! torus-bench: fio against torus and its peers on the same filesystem, interleaved and
//! repeated, reported as medians with min–max and ratios.
//!
//! Targets: `disk` (fio's own io_uring engine, O_DIRECT, on a file: the limit), `torus`
//! (single node, fio's nbd engine), `torus-3x` (three nodes on this machine with a replicas=3
//! volume, fio through one of them; CPU counts all three; needs etcd), `qemu-nbd` (--cache=none --aio=io_uring on a file),
//! `nbdkit` (file plugin; it answers writes from the page cache). Each target's region is
//! written once before anything is measured, so reads hit written data.
//!
//!   cargo run --release -p torus-bench -- compare            # 3 repeats of 10 s per cell
//!   cargo run --release -p torus-bench -- compare --quick    # 1 repeat of 3 s
//!   cargo run --release -p torus-bench -- compare --dry-run  # print the plan, run nothing
//!
//! Writes results.json, results.md and charts (iops.png, latency-p50.png, latency-p99.png;
//! text in DejaVu Sans from Debian's fonts-dejavu-core) into a new results folder.

mod charts;
mod counts;
mod fio;
mod targets;

use anyhow::{bail, Result};
use charts::charts;
use clap::{Parser, Subcommand};
use fio::{median_of, run_fio, sample, Cell, Sample, Workload, WORKLOADS};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use targets::{start_targets, torus_bin};
use torus_testkit::{cpu_seconds, which};

#[derive(Parser)]
#[command(
    name = "torus-bench",
    about = "Benchmark torus against the raw disk and peer NBD servers with fio"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the comparison and write results.json and results.md into a results folder.
    Compare(CompareArgs),
    /// Allocations and cluster locks per replicated 4 KiB write, from a counters build of
    /// torusd (run through benches/write_path_counts.sh, which builds and places it).
    Counts(CountsArgs),
}

#[derive(clap::Args, Clone)]
struct CountsArgs {
    /// Writes per queue depth.
    #[arg(long, default_value_t = 20000)]
    ios: u64,
    /// Queue depths (comma separated).
    #[arg(long, default_value = "1,32")]
    depths: String,
    /// Where the nodes' data goes.
    #[arg(long, default_value = ".")]
    work: PathBuf,
}

#[derive(clap::Args, Clone)]
struct CompareArgs {
    /// Repeats of every cell (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds per cell.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Size of the region every target is tested on, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// One repeat of 3 s per cell over 256 MiB (well under two minutes).
    #[arg(long)]
    quick: bool,
    /// Print the plan and check the tools, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Targets to run (comma separated): disk,torus,torus-3x,qemu-nbd,nbdkit. Default: all,
    /// with torus-3x (three nodes, replicas=3, etcd) only when etcd is installed.
    #[arg(long)]
    targets: Option<String>,
    /// Workloads to run (comma separated); see --dry-run for the names.
    #[arg(long)]
    workloads: Option<String>,
    /// Where the results folder goes (on the filesystem under test).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Run every measured fio on these CPUs only (fio's --cpus_allowed, say `0`), for every
    /// target alike. Default: wherever the kernel's scheduler puts it. Every torusd runs its
    /// first core on its first allowed CPU, so `0` puts fio beside the node it talks to.
    #[arg(long, value_name = "LIST")]
    fio_cpus: Option<String>,
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn compare(a: CompareArgs) -> Result<()> {
    let (repeats, runtime, size_mib) = if a.quick {
        (1, 3, 256)
    } else {
        (a.repeats.max(1), a.runtime.max(1), a.size_mib)
    };
    let default_targets = if which("etcd").is_some() {
        "disk,torus,torus-3x,qemu-nbd,nbdkit"
    } else {
        "disk,torus,qemu-nbd,nbdkit"
    };
    let targets: Vec<&str> = a
        .targets
        .as_deref()
        .unwrap_or(default_targets)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let workloads: Vec<Workload> = match &a.workloads {
        Some(w) => {
            let names: Vec<&str> = w.split(',').map(str::trim).collect();
            for n in &names {
                if !WORKLOADS.iter().any(|x| x.name == *n) {
                    bail!(
                        "unknown workload {n:?}; known: {}",
                        WORKLOADS
                            .iter()
                            .map(|w| w.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            WORKLOADS
                .iter()
                .copied()
                .filter(|x| names.contains(&x.name))
                .collect()
        }
        None => WORKLOADS.to_vec(),
    };
    let mut missing = Vec::new();
    for (tool, pkg, needed) in [
        ("fio", "fio", true),
        ("qemu-nbd", "qemu-utils", targets.contains(&"qemu-nbd")),
        ("nbdkit", "nbdkit", targets.contains(&"nbdkit")),
        ("etcd", "etcd-server", targets.contains(&"torus-3x")),
    ] {
        if needed && which(tool).is_none() {
            missing.push(format!("{tool} (Debian package {pkg})"));
        }
    }
    if targets.contains(&"torus") {
        torus_bin("torusd")?;
    }
    if !missing.is_empty() {
        bail!("missing: {}", missing.join(", "));
    }
    let cells = repeats * workloads.len() * targets.len();
    let eta =
        Duration::from_secs((cells as u64) * (runtime + 1) + targets.len() as u64 * size_mib / 200);
    println!("plan: {} workloads x {} targets x {repeats} repeats of {runtime} s over {size_mib} MiB; about {} min", workloads.len(), targets.len(), eta.as_secs().div_ceil(60));
    for w in &workloads {
        println!("  workload {}", w.name);
    }
    if let Some(cpus) = &a.fio_cpus {
        println!("  fio on CPUs {cpus} only (--cpus_allowed)");
    }
    if a.dry_run {
        println!("dry run: nothing started");
        return Ok(());
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let results = a.out.join(format!("bench-results-{stamp}"));
    let work = results.join("work");
    std::fs::create_dir_all(&work)?;
    let size = size_mib << 20;
    let machine = serde_json::json!({
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": version("uname", "-r"),
        "filesystem": Command::new("stat").args(["-f", "-c", "%T"]).arg(&work).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "fio": version("fio", "--version"),
        "qemu-nbd": version("qemu-nbd", "--version"),
        "nbdkit": version("nbdkit", "--version"),
        "fio_cpus": a.fio_cpus.clone().unwrap_or_else(|| "any (the scheduler's choice)".into()),
    });
    println!("machine: {machine}");
    let targets = start_targets(&targets, &work, size)?;
    // Precondition: write every target's region once, sequentially.
    for t in &targets {
        println!("preparing {}: writing {size_mib} MiB", t.name);
        run_fio(
            t,
            &[
                "--name=fill".into(),
                "--rw=write".into(),
                "--bs=1m".into(),
                "--iodepth=8".into(),
                format!("--size={size}"),
            ],
        )?;
    }
    let mut samples: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    let started = Instant::now();
    let mut done = 0;
    for r in 0..repeats {
        for w in &workloads {
            for t in &targets {
                let mut extra = vec![
                    format!("--name={}", w.name),
                    format!("--rw={}", w.rw),
                    format!("--bs={}", w.bs),
                    format!("--iodepth={}", w.iodepth),
                    format!("--size={size}"),
                    format!("--runtime={runtime}"),
                    "--time_based=1".into(),
                    "--randrepeat=0".into(),
                    "--norandommap=1".into(),
                ];
                if let Some(m) = w.mix_read {
                    extra.push(format!("--rwmixread={m}"));
                }
                if let Some(cpus) = &a.fio_cpus {
                    extra.push(format!("--cpus_allowed={cpus}"));
                }
                let pids = t.pids();
                let cpu_before: f64 = pids.iter().copied().map(cpu_seconds).sum();
                let job = run_fio(t, &extra)?;
                let cpu = pids.iter().copied().map(cpu_seconds).sum::<f64>() - cpu_before;
                let s = sample(&job, cpu);
                done += 1;
                let left = started
                    .elapsed()
                    .mul_f64((cells - done) as f64 / done as f64);
                println!("[{done}/{cells}, ~{}s left] repeat {} {:<18} {:<9} {:>9.0} IOPS {:>8.1} MiB/s p50 {:>7.1} us p99 {:>8.1} us", left.as_secs(), r + 1, w.name, t.name, s.iops, s.mib_s, s.lat_p50_us, s.lat_p99_us);
                samples
                    .entry((w.name.to_string(), t.name.clone()))
                    .or_default()
                    .push(s);
            }
        }
    }
    let mut rss = serde_json::Map::new();
    for t in &targets {
        if let Some(c) = &t.server {
            rss.insert(
                t.name.clone(),
                serde_json::json!(torus_testkit::peak_rss_bytes(c.id()) / 1024),
            );
        }
    }
    let mut out_cells = Vec::new();
    for w in &workloads {
        for t in &targets {
            let s = samples
                .remove(&(w.name.to_string(), t.name.clone()))
                .unwrap_or_default();
            let ios: f64 = s.iter().map(|x| x.ios).sum();
            let cpu: f64 = s.iter().map(|x| x.server_cpu_s).sum();
            let of = |f: fn(&Sample) -> f64| median_of(&s, f);
            out_cells.push(Cell {
                workload: w.name.into(),
                target: t.name.clone(),
                iops_median: of(|x| x.iops),
                iops_min: s.iter().map(|x| x.iops).fold(f64::INFINITY, f64::min),
                iops_max: s.iter().map(|x| x.iops).fold(0.0, f64::max),
                mib_s_median: of(|x| x.mib_s),
                lat_p50_us_median: of(|x| x.lat_p50_us),
                lat_p99_us_median: of(|x| x.lat_p99_us),
                server_cpu_s_per_100k_ios: t
                    .server
                    .as_ref()
                    .map(|_| cpu / ios.max(1.0) * 100_000.0),
                samples: s,
            });
        }
    }
    drop(targets);
    let mut md = String::new();
    md.push_str(&format!("{repeats} repeat(s) of {runtime} s per cell over {size_mib} MiB, targets interleaved. Medians (min–max).\n\n"));
    md.push_str("| workload | target | IOPS | MiB/s | p50 µs | p99 µs | server CPU s / 100k I/O | torus ÷ target |\n|---|---|---|---|---|---|---|---|\n");
    for w in &workloads {
        let torus = out_cells
            .iter()
            .find(|c| c.workload == w.name && c.target == "torus")
            .map(|c| c.iops_median);
        for c in out_cells.iter().filter(|c| c.workload == w.name) {
            let ratio = match (torus, c.target.as_str()) {
                (Some(_), "torus") | (None, _) => "".to_string(),
                (Some(t), _) => format!("{:.2}×", t / c.iops_median.max(1e-9)),
            };
            md.push_str(&format!(
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.1} | {:.1} | {:.1} | {} | {} |\n",
                c.workload,
                c.target,
                c.iops_median,
                c.iops_min,
                c.iops_max,
                c.mib_s_median,
                c.lat_p50_us_median,
                c.lat_p99_us_median,
                c.server_cpu_s_per_100k_ios
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "–".into()),
                ratio
            ));
        }
    }
    md.push_str(&format!(
        "\nPeak RSS (KiB): {}\n",
        serde_json::Value::Object(rss.clone())
    ));
    // Everything written to torus: the fill plus every measured write.
    let torus_written: f64 = size as f64
        + out_cells
            .iter()
            .filter(|c| c.target == "torus")
            .flat_map(|c| c.samples.iter())
            .map(|x| x.bytes_written)
            .sum::<f64>();
    let torus_rss_per_gib = rss
        .get("torus")
        .and_then(|v| v.as_u64())
        .map(|kib| kib as f64 / 1024.0 / (torus_written / (1u64 << 30) as f64));
    if let Some(r) = torus_rss_per_gib {
        md.push_str(&format!(
            "\ntorus peak RSS per GiB written: {r:.1} MiB ({:.1} GiB written in all)\n",
            torus_written / (1u64 << 30) as f64
        ));
    }
    md.push_str(&format!("\nMachine: {machine}\n"));
    std::fs::write(results.join("results.md"), &md)?;
    std::fs::write(
        results.join("results.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "machine": machine, "peak_rss_kib": rss, "torus_rss_mib_per_gib_written": torus_rss_per_gib, "cells": out_cells }),
        )?,
    )?;
    match charts(&results, &out_cells) {
        Ok(files) => println!(
            "charts: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => eprintln!("torus-bench: no charts: {e:#}"),
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("\n{md}\nresults in {}", results.display());
    Ok(())
}

fn main() {
    let args = Args::parse();
    let r = match args.command {
        Cmd::Compare(a) => compare(a),
        Cmd::Counts(a) => a
            .depths
            .split(',')
            .map(|d| d.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::from)
            .and_then(|depths| {
                let work = a.work.join(format!("torus-counts-{}", std::process::id()));
                std::fs::create_dir_all(&work)?;
                let r = counts::counts(&work, a.ios, &depths);
                let _ = std::fs::remove_dir_all(&work);
                r
            }),
    };
    if let Err(e) = r {
        eprintln!("torus-bench: {e:#}");
        std::process::exit(1);
    }
}
