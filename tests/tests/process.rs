//! How torusd behaves as a process: defaults in an empty directory, --help, clear one-line
//! errors, no CPU when idle, a clean exit on SIGTERM with requests in flight.

use std::process::Command;
use std::time::Duration;
use torus_tests::*;

/// `torusd --help` names every flag, and `torusctl --help` names its `volume` and `status`
/// commands.
#[test]
fn help_explains_every_flag() {
    let out = run_ok(
        Command::new(bin("torusd")).arg("--help"),
        Duration::from_secs(10),
    );
    for flag in [
        "--data-dir",
        "--size",
        "--device",
        "--cores",
        "--nbd-listen",
        "--nbd-socket",
        "--admin-listen",
        "--peer-listen",
        "--etcd",
        "--node-name",
        "--default-volume-size",
        "--sparse",
        "--down-out-after",
    ] {
        assert!(out.contains(flag), "--help does not mention {flag}:\n{out}");
    }
    let out = run_ok(
        Command::new(bin("torusctl")).arg("--help"),
        Duration::from_secs(10),
    );
    assert!(out.contains("volume") && out.contains("status"), "{out}");
}

/// A user's mistake is a clear message on stderr and a non-zero exit: a bad size is one line naming
/// --size, a size too small says "too small", and torusctl with no torusd says "cannot reach
/// torusd" in one line.
/// A release torusd holds no test-only code: no `TORUS_TESTING_` fault switch and no symbol of
/// the simulations (`testing::sim`). The switches are built only into `torusd-testing` (the
/// `testing` feature), where the same search must find them.
#[test]
fn release_torusd_has_no_test_only_code() {
    let holds = |name: &str, needle: &[u8]| {
        let bytes = std::fs::read(bin(name)).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    };
    assert!(
        !holds("torusd", b"TORUS_TESTING_"),
        "torusd reads a fault switch"
    );
    assert!(
        !holds("torusd", b"testing3sim"),
        "torusd holds simulation code"
    );
    assert!(holds(TORUSD_TESTING, b"TORUS_TESTING_ACK_FLUSH_EARLY"));
    assert!(holds(TORUSD_TESTING, b"TORUS_TESTING_REPLICA_DROPS_WRITES"));
}

#[test]
fn user_errors_are_one_clear_line() {
    let dir = TempDir::new("errors");
    let out = run(
        Command::new(bin("torusd"))
            .args(["--size", "12Q"])
            .current_dir(dir.path()),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--size"), "{err}");
    let out = run(
        Command::new(bin("torusd"))
            .args(["--size", "1M"])
            .current_dir(dir.path()),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too small"), "{err}");
    // no torusd: torusctl says where it looked
    let out = run(
        Command::new(bin("torusctl")).args([
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
            "volume",
            "list",
        ]),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach torusd") && err.trim().lines().count() == 1,
        "{err}"
    );
}

/// A second torusd on the same data dir is refused ("in use by another torusd").
#[test]
fn a_second_torusd_on_the_same_data_dir_is_refused() {
    let dir = TempDir::new("lock");
    let mut node = Torusd::start(dir.path(), &[]);
    let out = run(
        Command::new(bin("torusd"))
            .args([
                "--nbd-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--admin-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .current_dir(dir.path()),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another torusd"));
    node.stop();
}

/// In an empty directory torusd creates torus-data/ (blocks, metadata.json) and a 1 GiB `default`
/// volume, which its ready line names.
#[test]
fn defaults_create_the_data_dir_and_a_1g_default_volume() {
    let dir = TempDir::new("defaults");
    let mut node = Torusd::start(dir.path(), &[]);
    assert!(dir.path().join("torus-data/blocks").exists());
    assert!(dir.path().join("torus-data/metadata.json").exists());
    assert!(node.stdout.contains("'default' (1 GiB)"), "{}", node.stdout);
    node.stop();
}

/// Offset of the first hole at or after 0 (the file's size when it has none). On ext4 and xfs
/// an extent reserved by fallocate and never written counts as a hole.
fn first_hole(path: &std::path::Path) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: plain syscall on a valid fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(
        hole >= 0,
        "lseek SEEK_HOLE: {}",
        std::io::Error::last_os_error()
    );
    (hole as u64, f.metadata().unwrap().len())
}

/// A new 256 MiB store file is written with zeros once (no hole left, SEEK_HOLE; the progress line
/// reaches 100%). Its data (8 MiB of fio) verifies after a restart that does not fill it again;
/// `--sparse` skips the fill.
#[test]
fn a_new_store_file_is_written_with_zeros_once_unless_sparse() {
    let dir = TempDir::new("fill");
    let mut node = Torusd::start_filled(dir.path(), &["--size", "256M"]);
    let log = node.log_text();
    assert!(
        log.contains("writing zeros over it once") && log.contains("(100%)"),
        "{log}"
    );
    let blocks = dir.path().join("torus-data/blocks");
    let (hole, size) = first_hole(&blocks);
    assert_eq!(
        hole, size,
        "the new store file still has unwritten space at {hole}"
    );
    // The data survives and an existing store is not filled again.
    let uri = node.uri("default");
    fio_verify(&uri, &["--size=8M"]);
    node.stop();
    std::fs::remove_file(&node.log).unwrap();
    node.spawn();
    assert!(
        !node.log_text().contains("writing zeros"),
        "{}",
        node.log_text()
    );
    fio_verify(&uri, &["--size=8M", "--verify_only=1"]);
    node.stop();
    // --sparse reserves the space (a full filesystem shows at start) without writing it.
    let sparse = TempDir::new("sparse");
    let mut node = Torusd::start(sparse.path(), &["--size", "256M"]);
    assert!(
        !node.log_text().contains("writing zeros"),
        "{}",
        node.log_text()
    );
    node.stop();
}

/// The `Cpus_allowed_list` of a `/proc/.../status` file, e.g. `0-3,6`.
fn cpus_allowed(status: impl AsRef<std::path::Path>) -> String {
    std::fs::read_to_string(status)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// Under `taskset -c N`, N the last CPU the test may use, both reactors stay on CPU N (they went to
/// CPUs 0 and 1 before).
#[test]
fn reactors_stay_on_the_cpus_torusd_was_given() {
    // The last CPU this test may use: with two or more, not the one a reactor would take
    // when the mask is ignored (core 0 on CPU 0).
    let list = cpus_allowed("/proc/self/status");
    let last = list
        .split(',')
        .next_back()
        .and_then(|r| r.split('-').next_back())
        .unwrap()
        .to_string();
    let taskset = require_tool("taskset", "util-linux");
    let dir = TempDir::new("affinity");
    let taskset = taskset.to_str().unwrap();
    let mut node =
        Torusd::start_wrapped(dir.path(), &["--cores", "2"], &[], &[taskset, "-c", &last]);
    let mut reactors = 0;
    for t in std::fs::read_dir(format!("/proc/{}/task", node.pid())).unwrap() {
        let t = t.unwrap().path();
        // Short-lived threads may be gone between the listing and the read.
        let Ok(comm) = std::fs::read_to_string(t.join("comm")) else {
            continue;
        };
        if !comm.starts_with("torus-core-") {
            continue;
        }
        reactors += 1;
        let cpus = cpus_allowed(t.join("status"));
        assert_eq!(cpus, last, "{} runs on CPUs {cpus}", comm.trim());
    }
    assert_eq!(reactors, 2);
    node.stop();
}

/// After one client's write, an idle torusd uses at most 1 tick of CPU in 5 s.
#[test]
fn idle_torusd_uses_no_measurable_cpu() {
    let dir = TempDir::new("idle");
    let mut node = Torusd::start(dir.path(), &[]);
    // one client did some work and left; then the node must go quiet
    let mut c = torus_tests::nbd::Client::connect(node.nbd_port, "default").unwrap();
    assert_eq!(c.write(0, &[7u8; 4096], 0).unwrap(), 0);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(node.pid());
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(node.pid()) - before;
    // 1 tick = 10 ms: at most 1 tick in 5 s is under 0.2 % of a core.
    assert!(used <= 1, "idle torusd used {used} ticks of CPU in 5 s");
    node.stop();
}

/// After 3 GiB of 1 MiB writes at QD8 (a 1 GiB volume written three times) the node's peak resident
/// memory is at most 100 MiB (it was 130 MiB and more before large buffers were kept for reuse); it
/// prints its peak.
#[test]
fn resident_memory_stays_bounded_after_a_large_sequential_write() {
    // 1 GiB in 1 MiB writes at QD8, three times over: at most 8 MiB of payload is in flight.
    // glibc kept the freed 1 MiB buffers in the core's arena: 130-475 MiB resident after
    // this. Now: the 16 MiB read pool, at most 64 MiB of buffers kept
    // for reuse, what is in flight, and the rest of the node.
    let dir = TempDir::new("rss");
    let mut node = Torusd::start(dir.path(), &["--size", "3G", "--default-volume-size", "1G"]);
    run_ok(
        Command::new(require_tool("fio", "fio")).args([
            "--name=seq",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{}/default", node.nbd_port),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--size=1G",
            "--loops=3",
        ]),
        Duration::from_secs(300),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("torusd peaked at {} MiB resident", peak_kib >> 10);
    assert!(
        peak_kib <= 100 << 10,
        "torusd peaked at {} MiB resident",
        peak_kib >> 10
    );
    node.stop();
}

/// Eight rounds of SIGTERM with 64 writes of 64 KiB and a flush in flight: every reply sent is a
/// success, torusd exits 0, and every acknowledged write is there after a restart. (This caught a
/// shutdown race: a piece could reach a core after its final checkpoint.)
#[test]
fn sigterm_finishes_requests_in_flight_and_exits_0() {
    // Several rounds: a shutdown race (a piece reaching a core after its final checkpoint)
    // shows up only now and then, so one round is not enough to catch it.
    let dir = TempDir::new("sigterm");
    let mut node = Torusd::start(dir.path(), &[]);
    for round in 0..8u8 {
        let mut c = torus_tests::nbd::Client::connect(node.nbd_port, "default").unwrap();
        // 64 writes in flight, then SIGTERM before reading any reply
        let block = vec![round.wrapping_add(0x5a); 65536];
        for i in 0..64u64 {
            c.send(torus_tests::nbd::CMD_WRITE, 0, i, i * 65536, 65536, &block)
                .unwrap();
        }
        c.send(torus_tests::nbd::CMD_FLUSH, 0, 1000, 0, 0, &[])
            .unwrap();
        // Wait for the first answer, so the server is surely working on this batch (on a busy
        // machine SIGTERM could otherwise arrive before it read any request), then SIGTERM
        // with the rest in flight.
        let (err, first) = c.reply().unwrap();
        assert_eq!(err, 0, "round {round}: request {first} failed");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(node.pid(), libc::SIGTERM) };
        // Every request the server had received is answered (successfully) before it closes
        // the connection; requests still in the socket may be dropped unanswered.
        let mut answered = vec![first];
        while let Ok((err, cookie)) = c.reply() {
            assert_eq!(
                err, 0,
                "round {round}: request {cookie} failed during shutdown"
            );
            answered.push(cookie);
        }
        assert!(
            !answered.is_empty(),
            "round {round}: nothing was answered before the close"
        );
        let mut child = node.child.take().unwrap();
        let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("torusd exits");
        assert!(status.success(), "round {round}: {status}");
        node.spawn();
        let mut c = torus_tests::nbd::Client::connect(node.nbd_port, "default").unwrap();
        for cookie in answered.into_iter().filter(|&c| c < 64) {
            let got = c.read(cookie * 65536, 65536).unwrap().unwrap();
            assert!(
                got == block,
                "round {round}: acknowledged write {cookie} lost across a clean stop"
            );
        }
        c.disconnect();
    }
    node.stop();
}

/// A non-root torusd (uid 65534 when the test runs as root) under an 8 MiB memlock limit must
/// shrink or drop its registered read buffers; it serves as usual (a 128 KiB write reads back 100
/// times) and exits 0 on SIGTERM.
#[test]
fn runs_without_root_within_the_memlock_limit() {
    // A non-root process has 8 MiB of locked memory here: the registered read buffers must
    // shrink or fall back, and the node must serve as usual.
    require_tool("setpriv", "util-linux");
    let dir = TempDir::new("nonroot");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let nbd = free_port();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // A copy of the binary in the test's own directory: the checkout may sit below a
    // directory the unprivileged user cannot enter (mktemp -d makes 0700 ones).
    let torusd = dir.path().join("torusd");
    std::fs::copy(bin("torusd"), &torusd).unwrap();
    std::fs::set_permissions(&torusd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = format!(
        "ulimit -l 8192 2>/dev/null; exec {} --size 1G --cores 2 --nbd-listen 127.0.0.1:{nbd} --admin-listen 127.0.0.1:{}",
        torusd.display(),
        free_port()
    );
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            &script,
        ]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    let log = dir.path().join("torusd.log");
    let mut child = cmd
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", nbd)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "non-root torusd did not start: {:?}\n{}",
            child.try_wait(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = torus_tests::nbd::Client::connect(nbd, "default").unwrap();
    let data = vec![0x6bu8; 131072];
    assert_eq!(c.write(0, &data, 0).unwrap(), 0);
    for _ in 0..100 {
        assert_eq!(c.read(0, 131072).unwrap().unwrap(), data);
    }
    c.disconnect();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status}");
}

/// fio 4 KiB random writes at `qd` over 64 MiB, then reads them back and checks them.
fn fio_verified_writes(node: &Torusd, qd: u32) {
    run_ok(
        Command::new(require_tool("fio", "fio")).args([
            "--name=syncw",
            "--ioengine=nbd",
            &format!("--uri={}", node.uri("default")),
            "--rw=randwrite",
            "--bs=4k",
            &format!("--iodepth={qd}"),
            "--size=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]),
        Duration::from_secs(300),
    );
}

/// On one core, fio's verified 4 KiB random writes over 64 MiB are written at least 90 % with
/// pwrite at QD1 and at most a third at QD2 (a request arriving during such a write sends the next
/// ones through the ring); with TORUS_SYNC_WRITES=0 none. It prints the counts.
#[test]
fn lone_writes_skip_the_ring_and_a_deeper_queue_keeps_it() {
    // An idle core writes a lone small write with pwrite (the device's interrupt wakes it, not
    // a filesystem completion worker). A client with two writes going must not have one wait
    // behind the other: a request that arrives during such a write sends the next 1024 small
    // writes through the ring. Without that check, 97 % of the QD2 writes below were written
    // synchronously (and QD2 ran 16 % slower than through the ring).
    let dir = TempDir::new("syncw");
    let mut node = Torusd::start(dir.path(), &["--cores", "1"]);
    fio_verified_writes(&node, 1);
    let (sync1, all1) = (
        metric_total(&node, "torus_disk_sync_write_ops_total"),
        metric_total(&node, "torus_disk_write_ops_total"),
    );
    eprintln!("QD1: {sync1} of {all1} disk writes synchronous");
    assert!(all1 >= 16384 / 2, "{all1} disk writes for 16384 pieces");
    assert!(
        sync1 * 10 >= all1 * 9,
        "QD1: only {sync1} of {all1} writes synchronous"
    );
    fio_verified_writes(&node, 2);
    let sync2 = metric_total(&node, "torus_disk_sync_write_ops_total") - sync1;
    let all2 = metric_total(&node, "torus_disk_write_ops_total") - all1;
    eprintln!("QD2: {sync2} of {all2} disk writes synchronous");
    assert!(
        sync2 * 3 <= all2,
        "QD2: {sync2} of {all2} writes synchronous"
    );
    node.stop();

    // Turned off, every write goes through the ring; the data is the same.
    let dir = TempDir::new("syncw-off");
    let mut node =
        Torusd::start_with_env(dir.path(), &["--cores", "1"], &[("TORUS_SYNC_WRITES", "0")]);
    fio_verified_writes(&node, 1);
    assert_eq!(metric_total(&node, "torus_disk_sync_write_ops_total"), 0);
    assert!(metric_total(&node, "torus_disk_write_ops_total") >= 16384 / 2);
    node.stop();
}

/// The limits of a process, as `/proc/PID/limits` says: (soft, hard) for the line `name`.
fn limit(pid: i32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    let words: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (words[0].to_owned(), words[1].to_owned())
}

/// Started with a soft limit of 256 open files (a shell's default is 1024), torusd raises it to
/// its hard limit before it opens anything: every client and peer holds a descriptor.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = TempDir::new("nofile");
    let mut node = Torusd::start_wrapped(
        &dir.0,
        &[],
        &[],
        &["bash", "-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""],
    );
    let (soft, hard) = limit(node.pid(), "Max open files");
    assert_eq!(soft, hard, "soft limit {soft}, hard {hard}");
    assert_ne!(soft, "256");
    node.stop();
}
