//! Helpers for the process-level tests: find the built binaries, start and stop `torusd` on
//! free ports in a temporary directory, run the real clients, and speak raw NBD.
//!
//! A test that needs an external tool fails with a message naming the package when the tool
//! is missing: nothing is skipped silently.

pub mod cluster;
mod etcd;
pub mod fuzzing;
pub mod nbd;
pub mod nft;
pub mod sockets;

pub use etcd::Etcd;
pub use nft::nft;
pub use sockets::{connect_from, still_open};

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory of the binaries built with this test (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    let build = if name == TORUSD_TESTING {
        "cargo build --release -p torus-tools --features testing --bin torusd-testing"
    } else {
        "cargo build --release --workspace"
    };
    assert!(
        p.exists(),
        "{} is not built: run `{build}` first (the test command does)",
        p.display()
    );
    p
}

/// torusd with the test-only fault switches (`TORUS_TESTING_*`), which a release torusd does
/// not have. `Torusd` runs it whenever its environment sets one of them.
pub const TORUSD_TESTING: &str = "torusd-testing";

/// The torusd binary for this environment: `torusd-testing` when it turns on a fault switch.
pub fn torusd_for(env: &[(String, String)]) -> PathBuf {
    if env.iter().any(|(k, _)| k.starts_with("TORUS_TESTING_")) {
        bin(TORUSD_TESTING)
    } else {
        bin("torusd")
    }
}

/// Fails the test when a tool is missing, naming the Debian package that has it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    torus_testkit::which(tool).unwrap_or_else(|| {
        panic!("{tool} is not installed (Debian package {package}); the test command installs it: bash .ci/run")
    })
}

/// A loop device over a file, detached when dropped.
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(file: &Path, direct_io: bool) -> LoopDevice {
        require_tool("losetup", "mount");
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let dev = run_ok(cmd.arg(file), Duration::from_secs(60));
        LoopDevice(dev.trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// XORs one byte of a file with `mask` (a bit flip when mask has one bit set).
pub fn flip_bits(f: &std::fs::File, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    assert_ne!(mask, 0);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
}

pub use torus_testkit::free_port;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let base = std::env::var("TORUS_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        // Unique per process and call: tests run in parallel threads of one process.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let d = base.join(format!(
            "torus-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("TORUS_KEEP_TEST_DIRS").is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running torusd.
pub struct Torusd {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub nbd_port: u16,
    pub admin_port: u16,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdout: String,
    pub log: PathBuf,
    /// Runs torusd through this command (e.g. `ip netns exec NS`).
    pub wrapper: Vec<String>,
    /// Let torusd write zeros over a new store file (its default); otherwise the harness
    /// passes `--sparse`, which keeps the many stores the tests create quick to make.
    pub fill_store: bool,
}

impl Torusd {
    /// Starts torusd in `dir` (its data dir is `dir/torus-data`) with a 2 GiB store.
    pub fn start(dir: &Path, extra: &[&str]) -> Torusd {
        Torusd::start_with_env(dir, extra, &[])
    }

    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Torusd {
        Torusd::start_wrapped(dir, extra, env, &[])
    }

    pub fn start_wrapped(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Torusd {
        let mut t = Torusd::unstarted(dir, extra, env, wrapper);
        t.spawn();
        t
    }

    /// Like `start`, but without `--sparse`: the store file is made as torusd makes it by
    /// default.
    pub fn start_filled(dir: &Path, extra: &[&str]) -> Torusd {
        let mut t = Torusd::unstarted(dir, extra, &[], &[]);
        t.fill_store = true;
        t.spawn();
        t
    }

    fn unstarted(dir: &Path, extra: &[&str], env: &[(&str, &str)], wrapper: &[&str]) -> Torusd {
        Torusd {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            dir: dir.to_owned(),
            nbd_port: free_port(),
            admin_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            stdout: String::new(),
            log: dir.join("torusd.log"),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            fill_store: false,
        }
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut args = vec![
            "--nbd-listen".to_string(),
            format!("127.0.0.1:{}", self.nbd_port),
        ];
        if !self.extra.iter().any(|a| a == "--admin-listen") {
            args.extend([
                "--admin-listen".to_string(),
                format!("127.0.0.1:{}", self.admin_port),
            ]);
        }
        if !self.extra.iter().any(|a| a == "--size") {
            args.extend(["--size".to_string(), "2G".to_string()]);
        }
        if !self.fill_store {
            args.push("--sparse".to_string());
        }
        // Two reactors even on a small machine, so cross-core mailboxes are always exercised.
        if !self.extra.iter().any(|a| a == "--cores") {
            args.extend(["--cores".to_string(), "2".to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        let mut command = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(torusd_for(&self.env));
                c
            }
            None => Command::new(torusd_for(&self.env)),
        };
        let mut child = command
            .args(&args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start torusd");
        // The one line on stdout says the node is ready.
        let (line, mut stdout) = ready_line(&mut child, &self.log);
        self.stdout = line;
        // Keep draining stdout so torusd never blocks on it.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }

    pub fn admin(&self) -> String {
        match self.extra.iter().position(|a| a == "--admin-listen") {
            Some(i) => format!("http://{}", self.extra[i + 1]),
            None => format!("http://127.0.0.1:{}", self.admin_port),
        }
    }

    /// The admin token file torusd writes in its data dir.
    pub fn token_file(&self) -> PathBuf {
        let data = match self.extra.iter().position(|a| a == "--data-dir") {
            Some(i) => self.dir.join(&self.extra[i + 1]),
            None => self.dir.join("torus-data"),
        };
        data.join("admin.token")
    }

    /// `curl` of an admin API path with the admin token: its body.
    pub fn admin_get(&self, path: &str) -> String {
        let token = std::fs::read_to_string(self.token_file()).expect("the admin token file");
        run_ok(
            Command::new(require_tool("curl", "curl"))
                .arg("-sf")
                .arg("-H")
                .arg(format!("Authorization: Bearer {}", token.trim()))
                .arg(format!("{}{path}", self.admin())),
            Duration::from_secs(30),
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM, and the exit status must be 0.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "torusd did not stop within 60 s of SIGTERM; log:\n{}",
                self.log_text()
            )
        });
        assert!(
            status.success(),
            "torusd exited with {status} on SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn torusctl(&self, args: &[&str]) -> Output {
        Command::new(bin("torusctl"))
            .arg("--server")
            .arg(self.admin())
            .arg("--token-file")
            .arg(self.token_file())
            .args(args)
            .output()
            .expect("run torusctl")
    }

    /// Runs torusctl against this node, asserting it succeeded; returns its stdout.
    pub fn torusctl_ok(&self, args: &[&str]) -> String {
        let out = self.torusctl(args);
        assert!(
            out.status.success(),
            "torusctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Torusd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads torusd's one stdout line, which it prints once it serves, failing the test with
/// torusd's log (`log`) if it exits first or takes over 60 s. Returns the line and the rest of
/// stdout, which the caller must keep draining.
pub fn ready_line(child: &mut Child, log: &Path) -> (String, std::process::ChildStdout) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let mut stdout = child.stdout.take().expect("torusd's stdout is piped");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        assert!(
            Instant::now() < deadline,
            "torusd did not become ready; log:\n{}",
            log_text()
        );
        match stdout.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => panic!(
                "torusd exited before it was ready: {:?}; log:\n{}",
                child.try_wait(),
                log_text()
            ),
        }
    }
    (String::from_utf8_lossy(&line).into_owned(), stdout)
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command with a time limit; returns its output, failing the test on timeout.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, limit) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{desc} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect to 127.0.0.1:{port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// CPU time (user + system) of a process, in clock ticks.
/// User plus system CPU time of a running process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    torus_testkit::cpu_ticks(pid as u32).expect("the process is running")
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: i32) -> u64 {
    torus_testkit::rss_bytes(pid as u32)
}

/// A small deterministic generator (splitmix64), so failures replay from their seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn seed() -> u64 {
    std::env::var("TORUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Starts a cluster node named `name` in `dir` against `etcd`, with a short lease so tests
/// see failures within seconds.
pub fn cluster_node(dir: &Path, etcd: &Etcd, name: &str, cores: u32) -> Torusd {
    cluster_node_with(dir, &etcd.url, name, cores, "127.0.0.1", &[], &[])
}

/// A cluster node with its peer address on `peer_ip`, run through `wrapper`, with more args.
pub fn cluster_node_with(
    dir: &Path,
    etcd_url: &str,
    name: &str,
    cores: u32,
    peer_ip: &str,
    wrapper: &[&str],
    extra: &[&str],
) -> Torusd {
    cluster_node_env(dir, etcd_url, name, cores, peer_ip, wrapper, extra, &[])
}

/// `cluster_node_with`, with environment variables for torusd (test-only faults).
#[allow(clippy::too_many_arguments)]
pub fn cluster_node_env(
    dir: &Path,
    etcd_url: &str,
    name: &str,
    cores: u32,
    peer_ip: &str,
    wrapper: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Torusd {
    let peer = format!("{peer_ip}:{}", free_port());
    let cores = cores.to_string();
    let mut args = vec![
        "--etcd",
        etcd_url,
        "--node-name",
        name,
        "--peer-listen",
        &peer,
        "--lease-ttl",
        "3s",
        "--cores",
        &cores,
    ];
    args.extend_from_slice(extra);
    Torusd::start_wrapped(dir, &args, env, wrapper)
}

/// A one-core cluster node run inside `ns`: its peer address is the namespace end of the veth
/// pair, and it reaches `etcd` (started with `Etcd::start_on(&[&ns.host_ip])`) at the host end.
pub fn ns_cluster_node(dir: &Path, etcd: &Etcd, ns: &NetNs, name: &str, extra: &[&str]) -> Torusd {
    let etcd_url = format!(
        "http://{}:{}",
        ns.host_ip,
        etcd.url.rsplit(':').next().expect("etcd url has a port")
    );
    let wrapper = ns.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    cluster_node_with(dir, &etcd_url, name, 1, &ns.ns_ip, &wrapper, extra)
}

/// A network namespace joined to the host by a veth pair: host end `10.N.0.1`, namespace end
/// `10.N.0.2`. Deleted when dropped.
pub struct NetNs {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let ipb = require_tool("ip", "iproute2");
    let out = Command::new(ipb).args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn create(tag: &str) -> NetNs {
        let id = std::process::id() % 10000;
        let n = 100 + (std::process::id() % 100) as u8;
        let name = format!("torus-{tag}-{id}");
        let host_if = format!("th{tag}{id}");
        let ns_if = format!("tn{tag}{id}");
        let host_ip = format!("10.{n}.0.1");
        let ns_ip = format!("10.{n}.0.2");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs {
            name,
            host_ip,
            ns_ip,
            host_if,
        }
    }

    /// Takes the link down (the namespace is cut off) or brings it back.
    pub fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }

    pub fn wrapper(&self) -> Vec<String> {
        vec![
            require_tool("ip", "iproute2").display().to_string(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Polls `torusctl status` on `node` until it exits 0 (every PG clean); panics after `limit`.
pub fn wait_clean(node: &Torusd, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = node.torusctl(&["status"]);
        if out.status.success() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "cluster not clean within {limit:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until `torusctl status` through `node` prints `says` (whatever its exit code).
pub fn wait_status_says(node: &Torusd, says: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = node.torusctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(says) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "status did not say {says:?} within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// fio's nbd engine writing (or, with `--verify_only=1`, checking) 4 KiB random blocks at QD32
/// with crc32c verification, plus `args`; returns the job's JSON, after asserting no error.
pub fn fio_verify(uri: &str, args: &[&str]) -> serde_json::Value {
    let mut c = Command::new(require_tool("fio", "fio"));
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
    ]);
    c.args(args);
    let out = run_ok(&mut c, Duration::from_secs(600));
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("fio json")..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    job.clone()
}

/// Sum over the cores of a per-core counter from `/metrics`.
pub fn metric_total(node: &Torusd, name: &str) -> u64 {
    let text = run_ok(
        Command::new(require_tool("curl", "curl"))
            .arg("-sf")
            .arg(format!("{}/metrics", node.admin())),
        Duration::from_secs(30),
    );
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs qemu-io commands on an NBD URI (read-only for a snapshot, `VOLUME@SNAPSHOT`), asserting
/// that every one succeeded and every pattern matched; returns its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(require_tool("qemu-io", "qemu-utils"));
    if uri.contains('@') {
        c.arg("-r");
    }
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c, Duration::from_secs(300));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {uri} {cmds:?}: {text}"
    );
    text
}

/// sha256 of what `producer` writes to stdout; the producer must succeed.
pub fn sha256_of_output(producer: &mut Command) -> String {
    let mut child = producer.stdout(Stdio::piped()).spawn().unwrap();
    let out = Command::new("sha256sum")
        .stdin(child.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(child.wait().unwrap().success(), "{producer:?} failed");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// sha256 of a whole export, read with nbdcopy.
pub fn sha256_over_nbd(uri: &str) -> String {
    sha256_of_output(Command::new(require_tool("nbdcopy", "libnbd-bin")).args([uri, "-"]))
}
