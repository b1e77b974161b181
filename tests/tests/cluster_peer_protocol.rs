//! The node-to-node protocol of real `torusd` processes, spoken raw: bad frames close the
//! connection and harm nothing, connection limits hold, and a write from a stale writer is
//! answered FENCED (one writing node per volume).

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use torus_tests::cluster::*;
use torus_tests::*;

const T: Duration = Duration::from_secs(600);

/// A raw peer frame: the 32-byte header (magic, `version`, body length `len`, entry `count`,
/// the body's crc32c, the header's crc32c, a wrong one unless `fix_crc`), then `body`.
fn frame(version: u16, len: u32, count: u32, body: &[u8], fix_crc: bool) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[0..4].copy_from_slice(&0x4652_5054u32.to_le_bytes());
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&count.to_le_bytes());
    h[16..20].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let crc = if fix_crc {
        crc32c::crc32c(&h[..28])
    } else {
        0xdead_beef
    };
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(body);
    h
}

/// A peer connection to `addr` that has said hello as node `name`.
fn hello_as(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = vec![0u8; 48];
    hello[0] = 1; // HELLO
    hello[28..32].copy_from_slice(&(name.len() as u32).to_le_bytes()); // data_len
    hello.resize(4096, 0);
    hello.extend_from_slice(name.as_bytes());
    s.write_all(&frame(1, hello.len() as u32, 1, &hello, true))
        .unwrap();
    s
}

/// A frame of one WRITE of 4096 bytes of `fill` at offset 0 of `volume`, request `id`, sent
/// under map `map_epoch` by writer `writer`.
fn write_frame(volume: u32, id: u64, map_epoch: u64, writer: u64, fill: u8) -> Vec<u8> {
    let mut w = vec![0u8; 48];
    w[0] = 2; // WRITE
    w[4..8].copy_from_slice(&volume.to_le_bytes());
    w[8..16].copy_from_slice(&id.to_le_bytes());
    w[24..28].copy_from_slice(&4096u32.to_le_bytes()); // len
    w[28..32].copy_from_slice(&4096u32.to_le_bytes()); // data_len
    w[32..40].copy_from_slice(&map_epoch.to_le_bytes());
    w[40..48].copy_from_slice(&writer.to_le_bytes());
    w.resize(4096, 0);
    w.extend_from_slice(&[fill; 4096]);
    frame(1, w.len() as u32, 1, &w, true)
}

/// The status of the first entry of the next frame on `s`, which must be a reply.
fn reply_status(s: &mut TcpStream) -> u16 {
    let mut h = [0u8; 32];
    std::io::Read::read_exact(s, &mut h).unwrap();
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(s, &mut body).unwrap();
    assert_eq!(body[0], 64, "a reply");
    u16::from_le_bytes([body[2], body[3]])
}

/// Peer-protocol bad input (bad magic, header checksum, version, length over the limit, body
/// checksum, entries past the body, random bytes, a write before the hello) closes the connection
/// and the node goes on serving; so do bad magic and a bad body checksum after a hello. A hello
/// claiming a 1 MiB body is refused from its header, within 5 s. Of 80 connections that never say
/// hello 64 wait and 16 are closed at once. Of 70 connections from one node the 6 oldest are
/// closed, and at least 64 connections have TCP keepalive on (`ss -o`). The log names the cases.
#[test]
fn bad_peer_frames_close_the_connection_and_harm_nothing() {
    let etcd = Etcd::start();
    let dir = TempDir::new("peer-bad");
    let a = cluster_node(dir.path(), &etcd, "solo", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "64M", "--replicas", "1"]);
    let p = peers(&a);
    let addr = p[0]["peer_addr"].as_str().unwrap().to_owned();
    let mut hello_body = vec![0u8; 48];
    hello_body[0] = 1; // HELLO
    hello_body[28..32].copy_from_slice(&4u32.to_le_bytes()); // data_len
    hello_body.resize(4096, 0);
    hello_body.extend_from_slice(b"evil");
    let hello = frame(1, hello_body.len() as u32, 1, &hello_body, true);
    let mut bad_body = hello.clone();
    let n = bad_body.len();
    bad_body[n - 1] ^= 1;
    let mut bad_magic = hello.clone();
    bad_magic[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad magic", bad_magic),
        ("bad header checksum", frame(1, 0, 0, &[], false)),
        ("unknown version", frame(7, 0, 0, &[], true)),
        ("length over the limit", frame(1, 1 << 30, 0, &[], true)),
        ("body checksum", bad_body),
        ("entries past the body", frame(1, 8, 5, &[0u8; 8], true)),
        (
            "random bytes",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        (
            "write with no hello",
            frame(
                1,
                48,
                1,
                &{
                    let mut e = vec![0u8; 48];
                    e[0] = 2;
                    e
                },
                true,
            ),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(&bytes);
        // The node closes the connection: a read returns EOF (or reset), not a hang.
        let mut buf = [0u8; 64];
        let r = std::io::Read::read(&mut s, &mut buf);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "{what}: connection still open ({r:?})"
        );
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut),
            "{what}: no close within 15 s"
        );
    }
    // A hello that claims a 1 MiB body (under the frame limit, over the hello's) is refused
    // from its header, not waited for.
    let t = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&frame(1, 1 << 20, 1, &[], true)).unwrap();
    let r = std::io::Read::read(&mut s, &mut [0u8; 64]);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "long hello: still open ({r:?})"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "long hello: closed after {:?}",
        t.elapsed()
    );
    // Connections that never say hello: 64 may wait, the rest are closed at once.
    let silent: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = silent
        .iter()
        .filter(|s| {
            // Non-blocking: all are looked at now, long before the hello timeout.
            s.set_nonblocking(true).unwrap();
            matches!(std::io::Read::read(&mut &**s, &mut [0u8; 8]), Ok(0))
        })
        .count();
    assert_eq!(closed, 16, "of 80 silent connections");
    drop(silent);
    // Their places free up as the node sees them close: a valid hello is taken again.
    let t = Instant::now();
    loop {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&hello).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        s.set_nonblocking(true).unwrap();
        match std::io::Read::read(&mut s, &mut [0u8; 8]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            _ => assert!(
                t.elapsed() < Duration::from_secs(10),
                "hellos still refused"
            ),
        }
    }
    // One node's connections to a core past 64: its oldest are closed (its side gave up on
    // them), the newest kept.
    let mut many_hello = hello_body[..4096].to_vec();
    many_hello.extend_from_slice(b"many");
    let many_hello = frame(1, many_hello.len() as u32, 1, &many_hello, true);
    let many: Vec<TcpStream> = (0..70)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&many_hello).unwrap();
            // One at a time, so the core takes them in this order.
            std::thread::sleep(Duration::from_millis(20));
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed: Vec<usize> = many
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.set_nonblocking(true).unwrap();
            !matches!(std::io::Read::read(&mut &**s, &mut [0u8; 8]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        closed,
        (0..6).collect::<Vec<_>>(),
        "closed of 70 from one node"
    );
    // Served connections have TCP keepalive on, so one whose node went silent is closed.
    let port = addr.rsplit(':').next().unwrap();
    let ss = Command::new(require_tool("ss", "iproute2"))
        .args([
            "-tno",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(
        ss.lines()
            .filter(|l| l.contains("timer:(keepalive"))
            .count()
            >= 64,
        "{ss}"
    );
    drop(many);
    // After a valid hello the connection belongs to a core, which decodes the frames: a bad
    // one there closes it just the same.
    let mut write = vec![0u8; 48];
    write[0] = 2;
    let mut magic_after_hello = frame(1, 48, 1, &write, true);
    magic_after_hello[0] ^= 0xff;
    let mut body_after_hello = frame(1, 48, 1, &write, true);
    body_after_hello[40] ^= 1;
    for (what, bytes) in [
        ("bad magic after the hello", magic_after_hello),
        ("body checksum after the hello", body_after_hello),
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(&hello).unwrap();
        let _ = s.write_all(&bytes);
        let mut buf = [0u8; 64];
        let r = std::io::Read::read(&mut s, &mut buf);
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut),
            "{what}: connection still open ({r:?})"
        );
    }
    // A valid hello followed by garbage entries: answered or closed, never a crash.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&hello).unwrap();
    let mut e = vec![0u8; 48];
    e[0] = 2; // WRITE with no data, unknown volume, huge offset
    e[4..8].copy_from_slice(&99u32.to_le_bytes());
    e[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    s.write_all(&frame(1, 48, 1, &e, true)).unwrap();
    drop(s);
    let log = a.log_text();
    assert!(
        log.contains("bad magic") && log.contains("checksum"),
        "{log}"
    );
    assert!(
        log.contains("peer node evil: bad magic") && log.contains("peer node evil: body checksum"),
        "{log}"
    );
    assert!(
        log.contains("node many opened more than 64 connections; its oldest closed"),
        "{log}"
    );
    assert!(
        log.contains("over the 8192-byte limit") && log.contains("already waiting to say hello"),
        "{log}"
    );
    // Still serving.
    let out = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).arg(a.uri("vol")),
        T,
    );
    assert!(out.contains("67108864"), "{out}");
}

/// One writing node per volume: a second node's connection is refused, and a raw peer write with an
/// older writer epoch is answered FENCED. Deleting the volume through the other node is refused
/// while the writer's client is connected (naming the writer's node). Once that client has gone,
/// the other node may open the volume and delete it.
#[test]
fn one_writing_node_per_volume_and_stale_writers_are_fenced() {
    let etcd = Etcd::start();
    let dirs: Vec<TempDir> = ["a", "b"].iter().map(|n| TempDir::new(n)).collect();
    let a = cluster_node(dirs[0].path(), &etcd, "a", 1);
    let b = cluster_node(dirs[1].path(), &etcd, "b", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "64M"]);
    let vols = a.torusctl_ok(&["volume", "list", "--json"]);
    assert!(vols.contains("\"replicas\": 2"), "{vols}");
    let mut writer = torus_tests::nbd::Client::connect(a.nbd_port, "vol").unwrap();
    for i in 0..64u64 {
        assert_eq!(writer.write(i * 4096, &[7u8; 4096], 0).unwrap(), 0);
    }
    assert_eq!(writer.flush().unwrap(), 0);
    // A second node cannot open the volume while a has it.
    let out = Command::new(require_tool("nbdinfo", "libnbd-bin"))
        .arg(b.uri("vol"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "second writer admitted");
    let log = b.log_text();
    assert!(log.contains("one writing node"), "{log}");
    // A write carrying an older writer epoch than b has seen is refused by b.
    let p = peers(&a);
    let b_addr = p
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "b")
        .unwrap()["peer_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut s = hello_as(&b_addr, "rogue");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Volume 1, a map epoch newer than any, writer epoch 1: stale.
    s.write_all(&write_frame(1, 99, u64::MAX, 1, 9)).unwrap();
    assert_eq!(reply_status(&mut s), 5, "FENCED");
    // Deleting it through b, which has no client of it, is refused while a client is
    // connected through a, and names a.
    let out = b.torusctl(&["volume", "delete", "vol"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("node a"),
        "delete through b while a has a client: {err}"
    );
    // The volume still reads what a wrote.
    let data = writer.read(0, 4096).unwrap().unwrap();
    assert_eq!(data, vec![7u8; 4096]);
    writer.disconnect();
    // With a gone, b may write.
    std::thread::sleep(Duration::from_millis(500));
    let out = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).arg(b.uri("vol")),
        T,
    );
    assert!(out.contains("67108864"), "{out}");
    // With no client anywhere, b deletes it, and a no longer serves it.
    std::thread::sleep(Duration::from_millis(500));
    b.torusctl_ok(&["volume", "delete", "vol"]);
    let t = Instant::now();
    while a.torusctl_ok(&["volume", "list"]).contains("vol") {
        assert!(t.elapsed() < Duration::from_secs(10), "a still lists vol");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A peer that claims epochs past anything real (map and writer epoch `u64::MAX`) changes
/// nothing: its write is answered RETRY (the node looks in etcd and finds neither), and the
/// volume's real writer goes on writing. Before, the node took the forged writer epoch as the
/// volume's newest and answered every real write FENCED (EIO) until it restarted.
#[test]
fn a_forged_writer_and_map_epoch_leave_real_writes_working() {
    let etcd = Etcd::start();
    let dir = TempDir::new("peer-forged");
    let a = cluster_node(dir.path(), &etcd, "solo", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "64M", "--replicas", "1"]);
    let mut writer = torus_tests::nbd::Client::connect(a.nbd_port, "vol").unwrap();
    assert_eq!(writer.write(0, &[7u8; 4096], 0).unwrap(), 0);
    let addr = peers(&a)[0]["peer_addr"].as_str().unwrap().to_owned();
    let mut s = hello_as(&addr, "forger");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let vols: serde_json::Value =
        serde_json::from_str(&a.torusctl_ok(&["volume", "list", "--json"])).unwrap();
    let id = vols[0]["id"].as_u64().unwrap() as u32;
    for (request, map_epoch) in [(1u64, u64::MAX), (2, 1)] {
        s.write_all(&write_frame(id, request, map_epoch, u64::MAX, 9))
            .unwrap();
        let status = reply_status(&mut s);
        assert_ne!(
            status, 0,
            "map epoch {map_epoch}: the forged write was applied"
        );
    }
    // Time for the node's look in etcd.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..16u64 {
        assert_eq!(
            writer.write(i * 4096, &[8u8; 4096], 0).unwrap(),
            0,
            "a real write after the forged ones"
        );
    }
    assert_eq!(writer.flush().unwrap(), 0);
    assert_eq!(writer.read(0, 4096).unwrap().unwrap(), vec![8u8; 4096]);
    writer.disconnect();
}

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A peer that sends reads (1 GiB of them, in eight frames of 1024 reads of 128 KiB) and never
/// reads the replies holds at most `SERVE_READ_BYTES` (32 MiB) of the node's memory, plus the
/// frame being sent: the node answers RETRY past that and stops reading the connection, and
/// goes on serving everyone else. Before, a reply left the count when it was queued, not sent,
/// and the queue had no bound: the node's memory grew by the whole 1 GiB.
#[test]
fn a_peer_that_never_reads_its_replies_holds_a_bounded_amount_of_memory() {
    let etcd = Etcd::start();
    let dir = TempDir::new("peer-reads");
    let a = cluster_node(dir.path(), &etcd, "solo", 1);
    wait_clean(&a, Duration::from_secs(60));
    a.torusctl_ok(&["volume", "create", "vol", "256M", "--replicas", "1"]);
    let vols: serde_json::Value =
        serde_json::from_str(&a.torusctl_ok(&["volume", "list", "--json"])).unwrap();
    let id = vols[0]["id"].as_u64().unwrap() as u32;
    let addr = peers(&a)[0]["peer_addr"].as_str().unwrap().to_owned();
    let before = rss(a.pid());
    let mut s = hello_as(&addr, "reader");
    // Written from another thread: once the node stops reading, the writes block.
    let sender = std::thread::spawn(move || {
        let chunk = 128u64 << 10;
        for f in 0..8u64 {
            let mut body = Vec::with_capacity(1024 * 48);
            for i in 0..1024u64 {
                let mut e = vec![0u8; 48];
                e[0] = 5; // READ
                e[4..8].copy_from_slice(&id.to_le_bytes());
                e[8..16].copy_from_slice(&(f * 1024 + i + 1).to_le_bytes());
                e[16..24].copy_from_slice(&((i % 2048) * chunk).to_le_bytes());
                e[24..28].copy_from_slice(&(chunk as u32).to_le_bytes());
                e[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
                body.extend_from_slice(&e);
            }
            if s.write_all(&frame(1, body.len() as u32, 1024, &body, true))
                .is_err()
            {
                break;
            }
        }
        s
    });
    std::thread::sleep(Duration::from_secs(5));
    let grown = rss(a.pid()).saturating_sub(before);
    eprintln!("torusd grew by {} MiB", grown >> 20);
    assert!(
        grown < 96 << 20,
        "torusd grew by {} MiB for a peer that reads no replies",
        grown >> 20
    );
    // Still serving others.
    let out = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).arg(a.uri("vol")),
        T,
    );
    assert!(out.contains("268435456"), "{out}");
    drop(sender);
}
