//! The targets a comparison runs fio against: the raw disk, one torus node, three torus nodes
//! with their etcd, qemu-nbd and nbdkit. Each is started on free loopback ports over a file
//! in the work folder and stopped when dropped.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use torus_testkit::free_port;

pub struct Target {
    pub name: String,
    /// fio arguments that select the target.
    pub fio: Vec<String>,
    pub server: Option<Child>,
    /// More processes of the target (the other nodes of a cluster, etcd): their CPU counts.
    pub others: Vec<Child>,
    /// The admin API ports of its torus nodes (a cluster's: a, b, c).
    pub admins: Vec<u16>,
}

impl Target {
    /// Processes whose CPU time is the target's cost.
    pub fn pids(&self) -> Vec<u32> {
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
    // Ready when it answers /health: it listens before it can serve.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !torus_testkit::etcd_healthy(client) {
        if Instant::now() > deadline {
            bail!("etcd on port {client} did not answer /health within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start_torusd(&dir.join(name), size, Some((&url, name)))?);
    }
    let admin = nodes[0].2;
    let port = nodes[0].1;
    let admins: Vec<u16> = nodes.iter().map(|n| n.2).collect();
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
        admins,
    })
}

/// Waits until `what` listens on `port`.
fn wait_port(port: u16, what: &str) -> Result<()> {
    if !torus_testkit::wait_port(port, Duration::from_secs(30)) {
        bail!("{what} did not listen on port {port}");
    }
    Ok(())
}

pub fn torus_bin(name: &str) -> Result<PathBuf> {
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

pub fn start_targets(names: &[&str], work: &Path, size: u64) -> Result<Vec<Target>> {
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
                    admins: Vec::new(),
                }
            }
            "torus" => {
                let (child, port, admin) = start_torusd(&work.join("torus"), size, None)?;
                Target {
                    name: name.into(),
                    fio: vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{port}/default"),
                    ],
                    server: Some(child),
                    others: Vec::new(),
                    admins: vec![admin],
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
                    admins: Vec::new(),
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
                    admins: Vec::new(),
                }
            }
            other => bail!("unknown target {other:?} (disk, torus, torus-3x, qemu-nbd, nbdkit)"),
        };
        targets.push(t);
    }
    Ok(targets)
}
