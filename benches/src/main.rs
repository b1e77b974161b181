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

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    mix_read: Option<u32>,
}

const WORKLOADS: [Workload; 7] = [
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        mix_read: None,
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        mix_read: None,
    },
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        mix_read: None,
    },
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        mix_read: None,
    },
    Workload {
        name: "randrw70-4k-qd32",
        rw: "randrw",
        bs: "4k",
        iodepth: 32,
        mix_read: Some(70),
    },
    Workload {
        name: "seqwrite-1m-qd8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        mix_read: None,
    },
    Workload {
        name: "seqread-1m-qd8",
        rw: "read",
        bs: "1m",
        iodepth: 8,
        mix_read: None,
    },
];

#[derive(Serialize, Clone, Debug, Default)]
struct Sample {
    iops: f64,
    mib_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    server_cpu_s: f64,
    ios: f64,
    bytes_written: f64,
}

struct Target {
    name: String,
    /// fio arguments that select the target.
    fio: Vec<String>,
    server: Option<Child>,
    /// More processes of the target (the other nodes of a cluster, etcd): their CPU counts.
    others: Vec<Child>,
}

impl Target {
    /// Processes whose CPU time is the target's cost.
    fn pids(&self) -> Vec<u32> {
        self.server
            .iter()
            .chain(self.others.iter())
            .map(|c| c.id())
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for c in self.others.iter_mut().chain(self.server.iter_mut()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = matches!(c.try_wait(), Ok(Some(_)));
                if !exited {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // (It returned after the first child before: the others were left running.)
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Starts torusd (cluster mode when `etcd` is given); returns the child and its NBD port.
fn start_torusd(dir: &Path, size: u64, etcd: Option<(&str, &str)>) -> Result<(Child, u16, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port();
    let admin = free_port();
    let mut c = Command::new(torus_bin("torusd")?);
    c.args(["--data-dir", &dir.join("data").display().to_string()])
        .args(["--size", &format!("{}", size * 2 + (1 << 30))])
        .args(["--default-volume-size", &format!("{size}")])
        .args([
            "--nbd-listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ]);
    if let Some((url, name)) = etcd {
        c.args(["--etcd", url, "--node-name", name])
            .args(["--peer-listen", &format!("127.0.0.1:{}", free_port())]);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("torusd.log"))?))
        .spawn()
        .context("start torusd")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    wait_port(port, "torusd")?;
    Ok((child, port, admin))
}

fn torusctl(admin: u16, args: &[&str]) -> Result<std::process::Output> {
    Command::new(torus_bin("torusctl")?)
        .args(["--server", &format!("http://127.0.0.1:{admin}")])
        .args(args)
        .output()
        .context("run torusctl")
}

/// Three torusd nodes on this machine with a replicas=3 volume, and the etcd they share.
fn start_cluster(work: &Path, size: u64) -> Result<Target> {
    let dir = work.join("torus-3x");
    std::fs::create_dir_all(&dir)?;
    let client = free_port();
    let peer = free_port();
    let url = format!("http://127.0.0.1:{client}");
    let etcd = Command::new("etcd")
        .args(["--data-dir", &dir.join("etcd").display().to_string()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("etcd.log"))?))
        .spawn()
        .context("start etcd (Debian package etcd-server)")?;
    let mut others = vec![etcd];
    wait_port(client, "etcd")?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start_torusd(&dir.join(name), size, Some((&url, name)))?);
    }
    let admin = nodes[0].2;
    let port = nodes[0].1;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !torusctl(admin, &["status"])?.status.success() {
        if Instant::now() > deadline {
            bail!("the three-node cluster did not become clean within 120 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = torusctl(
        admin,
        &[
            "volume",
            "create",
            "bench",
            &size.to_string(),
            "--replicas",
            "3",
        ],
    )?;
    if !out.status.success() {
        bail!(
            "create the bench volume: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut children: Vec<Child> = nodes.into_iter().map(|n| n.0).collect();
    let server = children.remove(0);
    others.extend(children);
    Ok(Target {
        name: "torus-3x".into(),
        fio: vec![
            "--ioengine=nbd".into(),
            format!("--uri=nbd://127.0.0.1:{port}/bench"),
        ],
        server: Some(server),
        others,
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
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

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn torus_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            p.display()
        );
    }
    Ok(p)
}

fn start_targets(names: &[&str], work: &Path, size: u64) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    for &name in names {
        let t = match name {
            "disk" => {
                let f = work.join("disk.img");
                Target {
                    name: name.into(),
                    fio: vec![
                        "--ioengine=io_uring".into(),
                        "--direct=1".into(),
                        format!("--filename={}", f.display()),
                    ],
                    server: None,
                    others: Vec::new(),
                }
            }
            "torus" => {
                let (child, port, _) = start_torusd(&work.join("torus"), size, None)?;
                Target {
                    name: name.into(),
                    fio: vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{port}/default"),
                    ],
                    server: Some(child),
                    others: Vec::new(),
                }
            }
            "torus-3x" => start_cluster(work, size)?,
            "qemu-nbd" => {
                let f = work.join("qemu-nbd.img");
                std::fs::File::create(&f)?.set_len(size)?;
                let port = free_port();
                let child = Command::new("qemu-nbd")
                    .args([
                        "--cache=none",
                        "--aio=io_uring",
                        "-f",
                        "raw",
                        "--persistent",
                        "--shared=8",
                        "-b",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                    ])
                    .arg(&f)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .context("start qemu-nbd (Debian package qemu-utils)")?;
                wait_port(port, "qemu-nbd")?;
                Target {
                    name: name.into(),
                    fio: vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{port}/"),
                    ],
                    server: Some(child),
                    others: Vec::new(),
                }
            }
            "nbdkit" => {
                let f = work.join("nbdkit.img");
                std::fs::File::create(&f)?.set_len(size)?;
                let port = free_port();
                let child = Command::new("nbdkit")
                    .args([
                        "--foreground",
                        "--exit-with-parent",
                        "-i",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "file",
                    ])
                    .arg(format!("file={}", f.display()))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .context("start nbdkit (Debian package nbdkit)")?;
                wait_port(port, "nbdkit")?;
                Target {
                    name: name.into(),
                    fio: vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{port}/"),
                    ],
                    server: Some(child),
                    others: Vec::new(),
                }
            }
            other => bail!("unknown target {other:?} (disk, torus, torus-3x, qemu-nbd, nbdkit)"),
        };
        targets.push(t);
    }
    Ok(targets)
}

fn run_fio(target: &Target, extra: &[String]) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .args(&target.fio)
        .args(extra)
        .arg("--output-format=json")
        .output()
        .context("run fio (Debian package fio)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio on {} failed: {}{}",
            target.name,
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').context("fio printed no json")?..])?;
    let job = json["jobs"][0].clone();
    if job["error"] != 0 {
        bail!("fio on {} reported error {}", target.name, job["error"]);
    }
    Ok(job)
}

fn sample(job: &serde_json::Value, cpu_s: f64) -> Sample {
    let mut s = Sample::default();
    let mut lat = Vec::new();
    for dir in ["read", "write"] {
        let d = &job[dir];
        s.iops += d["iops"].as_f64().unwrap_or(0.0);
        s.mib_s += d["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        s.ios += d["total_ios"].as_f64().unwrap_or(0.0);
        if dir == "write" {
            s.bytes_written += d["io_bytes"].as_f64().unwrap_or(0.0);
        }
        if d["total_ios"].as_f64().unwrap_or(0.0) > 0.0 {
            let p = &d["clat_ns"]["percentile"];
            lat.push((
                p["50.000000"].as_f64().unwrap_or(0.0) / 1000.0,
                p["99.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            ));
        }
    }
    s.lat_p50_us = lat.iter().map(|l| l.0).fold(0.0, f64::max);
    s.lat_p99_us = lat.iter().map(|l| l.1).fold(0.0, f64::max);
    s.server_cpu_s = cpu_s;
    s
}

/// Median of one field over the repeats of a cell (the upper one of an even count).
fn median_of(samples: &[Sample], field: fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(field).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[derive(Serialize)]
struct Cell {
    workload: String,
    target: String,
    samples: Vec<Sample>,
    iops_median: f64,
    iops_min: f64,
    iops_max: f64,
    mib_s_median: f64,
    lat_p50_us_median: f64,
    lat_p99_us_median: f64,
    server_cpu_s_per_100k_ios: Option<f64>,
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
            rss.insert(t.name.clone(), serde_json::json!(peak_rss_kib(c.id())));
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

/// Font for chart text: DejaVu Sans from Debian's fonts-dejavu-core.
const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const CHART_COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(90, 90, 90),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(148, 103, 189),
];

/// A grouped bar chart: one group per workload, one bar per target.
fn bar_chart(
    path: &Path,
    title: &str,
    unit: &str,
    workloads: &[String],
    targets: &[String],
    value: impl Fn(&str, &str) -> f64,
) -> Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = workloads
        .iter()
        .flat_map(|w| targets.iter().map(move |t| (w, t)))
        .map(|(w, t)| value(w, t))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..workloads.len() as f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(workloads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < workloads.len() {
                workloads[i].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc(unit)
        .label_style(("sans-serif", 15))
        .draw()?;
    let n = targets.len() as f64;
    for (ti, t) in targets.iter().enumerate() {
        let color = CHART_COLORS[ti % CHART_COLORS.len()];
        chart
            .draw_series(workloads.iter().enumerate().map(|(wi, w)| {
                let x0 = wi as f64 + 0.1 + 0.8 * ti as f64 / n;
                let x1 = x0 + 0.8 / n * 0.9;
                Rectangle::new([(x0, 0.0), (x1, value(w, t))], color.filled())
            }))?
            .label(t.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// iops.png and latency.png (p50 and p99) in the results folder. Needs the DejaVu font.
fn charts(results: &Path, cells: &[Cell]) -> Result<Vec<PathBuf>> {
    let font = std::fs::read(CHART_FONT)
        .with_context(|| format!("read {CHART_FONT} (Debian package fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{CHART_FONT} is not a usable font"))?;
    let mut workloads: Vec<String> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    for c in cells {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload.clone());
        }
        if !targets.contains(&c.target) {
            targets.push(c.target.clone());
        }
    }
    let find = |w: &str, t: &str| cells.iter().find(|c| c.workload == w && c.target == t);
    let iops = results.join("iops.png");
    bar_chart(
        &iops,
        "IOPS by workload (median)",
        "IOPS",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.iops_median).unwrap_or(0.0),
    )?;
    let p50 = results.join("latency-p50.png");
    bar_chart(
        &p50,
        "Completion latency p50 (median of runs)",
        "µs",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.lat_p50_us_median).unwrap_or(0.0),
    )?;
    let p99 = results.join("latency-p99.png");
    bar_chart(
        &p99,
        "Completion latency p99 (median of runs)",
        "µs",
        &workloads,
        &targets,
        |w, t| find(w, t).map(|c| c.lat_p99_us_median).unwrap_or(0.0),
    )?;
    Ok(vec![iops, p50, p99])
}

fn main() {
    let args = Args::parse();
    let r = match args.command {
        Cmd::Compare(a) => compare(a),
    };
    if let Err(e) = r {
        eprintln!("torus-bench: {e:#}");
        std::process::exit(1);
    }
}
