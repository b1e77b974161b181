//! Bad input from clients, in raw bytes: every handshake and transmission case of
//! TESTING.md gets the reply it should or a closed connection, and a good client is served
//! right after. A client that floods requests and never reads replies cannot grow the
//! server's memory without bound.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use torus_tests::nbd::*;
use torus_tests::*;

/// A good client writes and reads back: the server is alive and serving.
fn good_client_served(port: u16) {
    let mut c = Client::connect(port, "default").expect("good client connects");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(c.write(1 << 20, &data, 0).unwrap(), 0);
    assert_eq!(c.read(1 << 20, 4096).unwrap().unwrap(), data);
    c.disconnect();
}

/// True when the server closed the connection (EOF or reset) within the timeout.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn opened(port: u16) -> TcpStream {
    let mut s = connect(port);
    greet(&mut s, 1 | 2).unwrap();
    s
}

fn transmission(port: u16) -> Client {
    Client::connect(port, "default").unwrap()
}

/// Raw handshake bytes: unknown client flags, bad option magic, EOF at every byte of a good
/// handshake, a reset, a client dripping a byte a second, a 4 GiB option (ERR_TOO_BIG, then
/// closed), a 5000-byte export name, a name longer than its option, an unknown option (ERR_UNSUP,
/// and the connection goes on), unknown exports (ERR_UNKNOWN to OPT_GO; OPT_EXPORT_NAME closes the
/// connection), data on OPT_ABORT, an endless option stream (cut off). After the bad names and
/// options the same connection lists only `default` and its GO succeeds. A good client is served
/// between the cases, while the dripper drips, and at the end.
#[test]
fn handshake_bad_input() {
    let dir = TempDir::new("bad-handshake");
    let mut node = Torusd::start(dir.path(), &[]);
    let port = node.nbd_port;
    let mut tried = 0;

    // unknown client flags
    let mut s = connect(port);
    greet(&mut s, 1 | 2 | 0x80).unwrap();
    assert!(
        closed(&mut s),
        "unknown client flags: connection must close"
    );
    tried += 1;

    // wrong option magic
    let mut s = opened(port);
    s.write_all(&[0xde; 16]).unwrap();
    assert!(closed(&mut s), "bad option magic: connection must close");
    tried += 1;

    // EOF at every byte of a complete good handshake
    let mut full = Vec::new();
    full.extend_from_slice(&3u32.to_be_bytes());
    full.extend_from_slice(&IHAVEOPT.to_be_bytes());
    full.extend_from_slice(&OPT_GO.to_be_bytes());
    let go = go_data("default");
    full.extend_from_slice(&(go.len() as u32).to_be_bytes());
    full.extend_from_slice(&go);
    for cut in 0..full.len() {
        let mut s = connect(port);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&full[..cut]).unwrap();
        drop(s);
        tried += 1;
    }
    // a reset instead of EOF
    let s = connect(port);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a valid linger struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    drop(s);
    tried += 1;
    good_client_served(port);

    // a client that drips one byte a second does not hold up others
    let dripper = std::thread::spawn(move || {
        let mut s = connect(port);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        let start = Instant::now();
        for b in full.iter().take(6) {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        start.elapsed()
    });
    good_client_served(port);
    tried += 1;

    // option length of 4 GiB: refused without reading (or allocating) it
    let mut s = opened(port);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).unwrap();
    let r = read_option_reply(&mut s).unwrap();
    assert_eq!(r.kind, REP_ERR_TOO_BIG);
    assert!(closed(&mut s));
    tried += 1;

    // export name over 4096 bytes; name length larger than the option; unknown option;
    // unknown export; then a GO on the same connection still works
    let mut s = opened(port);
    send_option(&mut s, OPT_GO, &go_data(&"x".repeat(5000))).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().kind, REP_ERR_INVALID);
    let mut bad = go_data("default");
    bad[3] = 200;
    send_option(&mut s, OPT_GO, &bad).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().kind, REP_ERR_INVALID);
    send_option(&mut s, 4242, b"whatever").unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().kind, REP_ERR_UNSUP);
    send_option(&mut s, OPT_GO, &go_data("no-such-volume")).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().kind, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_LIST, &[]).unwrap();
    let mut names = Vec::new();
    loop {
        let r = read_option_reply(&mut s).unwrap();
        if r.kind == REP_ACK {
            break;
        }
        names.push(String::from_utf8_lossy(&r.data[4..]).into_owned());
    }
    assert_eq!(names, vec!["default"]);
    send_option(&mut s, OPT_GO, &go_data("")).unwrap();
    loop {
        let r = read_option_reply(&mut s).unwrap();
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, 3, "info replies before the ACK");
    }
    tried += 5;

    // data on OPT_ABORT: acknowledged (or just closed), never a hang
    let mut s = opened(port);
    send_option(&mut s, OPT_ABORT, b"junk").unwrap();
    assert!(closed(&mut s));
    tried += 1;

    // an endless stream of options is cut off
    let mut s = opened(port);
    let mut sent = 0;
    let mut cut = false;
    for _ in 0..10_000 {
        if send_option(&mut s, 4242, &[]).is_err() {
            cut = true;
            break;
        }
        sent += 1;
        if read_option_reply(&mut s).is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "an endless option stream was never cut off ({sent} options)"
    );
    tried += 1;

    // OPT_EXPORT_NAME for an unknown export closes
    let mut s = opened(port);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope").unwrap();
    assert!(closed(&mut s));
    tried += 1;

    good_client_served(port);
    let dripped = dripper.join().unwrap();
    assert!(
        dripped >= Duration::from_secs(5),
        "the dripper was served alongside others"
    );
    eprintln!("handshake bad inputs tried: {tried}");
    node.stop();
}

/// Raw requests: bad magic closes the connection; a short header and EOF inside a payload harm
/// nothing. Unknown commands and flags, DF without structured replies, FLUSH with an offset or a
/// length, past-the-end and overflowing ranges, zero length, block status without a context and a
/// read over the maximum are each answered EINVAL, and the connection goes on. A one-byte unaligned
/// write is served. Duplicate cookies are both answered. A payload over 32 MiB is answered EINVAL
/// and the connection closes. DISC with 16 writes in flight answers all 16 first. A client that
/// floods 1 MiB reads and never reads its replies grows the server's RSS by less than 200 MiB. A
/// good client is served after the first cases and after the flood.
#[test]
fn transmission_bad_input() {
    let dir = TempDir::new("bad-transmission");
    let mut node = Torusd::start(dir.path(), &[]);
    let port = node.nbd_port;
    let size = 1u64 << 30;
    let mut tried = 0;

    // bad request magic: disconnect
    let mut c = transmission(port);
    c.s.write_all(&[0x11; 28]).unwrap();
    assert!(closed(&mut c.s));
    tried += 1;

    // short header, then EOF; EOF inside a write payload
    let mut c = transmission(port);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    let mut c = transmission(port);
    c.send(CMD_WRITE, 0, 9, 0, 65536, &[1u8; 1000]).unwrap();
    drop(c);
    tried += 2;
    good_client_served(port);

    let mut c = transmission(port);
    let mut expect = |c: &mut Client,
                      cmd: u16,
                      flags: u16,
                      offset: u64,
                      len: u32,
                      payload: &[u8],
                      errno: u32,
                      what: &str| {
        c.send(cmd, flags, 77, offset, len, payload).unwrap();
        let (e, cookie) = c
            .reply()
            .unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        assert_eq!((e, cookie), (errno, 77), "{what}");
        tried += 1;
    };
    expect(&mut c, 99, 0, 0, 4096, &[], EINVAL, "unknown command");
    expect(
        &mut c,
        CMD_READ,
        0x4000,
        0,
        4096,
        &[],
        EINVAL,
        "unknown flags",
    );
    expect(
        &mut c,
        CMD_READ,
        4,
        0,
        4096,
        &[],
        EINVAL,
        "DF without structured replies",
    );
    expect(
        &mut c,
        CMD_FLUSH,
        0,
        4096,
        0,
        &[],
        EINVAL,
        "FLUSH with an offset",
    );
    expect(
        &mut c,
        CMD_FLUSH,
        0,
        0,
        512,
        &[],
        EINVAL,
        "FLUSH with a length",
    );
    expect(
        &mut c,
        CMD_READ,
        0,
        size - 4096,
        8192,
        &[],
        EINVAL,
        "read past the end",
    );
    expect(
        &mut c,
        CMD_READ,
        0,
        u64::MAX - 100,
        4096,
        &[],
        EINVAL,
        "offset+length overflows u64",
    );
    expect(&mut c, CMD_READ, 0, 0, 0, &[], EINVAL, "zero-length read");
    expect(
        &mut c,
        CMD_WRITE,
        0,
        size - 4096,
        8192,
        &[0u8; 8192],
        EINVAL,
        "write past the end (payload skipped)",
    );
    expect(
        &mut c,
        CMD_WRITE,
        0x100,
        0,
        4096,
        &[0u8; 4096],
        EINVAL,
        "write with unknown flags (payload skipped)",
    );
    expect(
        &mut c,
        CMD_TRIM,
        0,
        size,
        4096,
        &[],
        EINVAL,
        "trim past the end",
    );
    expect(
        &mut c,
        CMD_BLOCK_STATUS,
        0,
        0,
        4096,
        &[],
        EINVAL,
        "block status without a negotiated context",
    );
    expect(
        &mut c,
        CMD_READ,
        0,
        0,
        64 << 20,
        &[],
        EINVAL,
        "read over the maximum payload",
    );
    // unaligned to the minimum block size, down to one byte: served, not refused
    expect(&mut c, CMD_WRITE, 0, 12345, 1, &[0xab], 0, "one-byte write");
    let back = c.read(12344, 3).unwrap().unwrap();
    assert_eq!(
        back,
        vec![0, 0xab, 0],
        "one-byte write lands where it should"
    );
    // duplicate cookies: both answered
    c.send(CMD_READ, 0, 5, 0, 512, &[]).unwrap();
    c.send(CMD_READ, 0, 5, 512, 512, &[]).unwrap();
    for _ in 0..2 {
        let (e, cookie) = c.reply().unwrap();
        assert_eq!((e, cookie), (0, 5));
        let mut b = vec![0u8; 512];
        c.s.read_exact(&mut b).unwrap();
    }
    tried += 1;
    // the connection still works after all of that
    assert_eq!(c.write(8192, &[3u8; 4096], 0).unwrap(), 0);
    assert_eq!(c.read(8192, 4096).unwrap().unwrap(), vec![3u8; 4096]);
    // payload over the maximum: EINVAL and the connection closes
    c.send(CMD_WRITE, 0, 66, 0, (32 << 20) + 4096, &[]).unwrap();
    let (e, cookie) = c.reply().unwrap();
    assert_eq!((e, cookie), (EINVAL, 66));
    assert!(closed(&mut c.s));
    tried += 1;

    // DISC with requests in flight: they are finished, then the connection closes
    let mut c = transmission(port);
    for i in 0..16u64 {
        c.send(CMD_WRITE, 0, i, i * 65536, 65536, &[i as u8; 65536])
            .unwrap();
    }
    c.send(CMD_DISC, 0, 99, 0, 0, &[]).unwrap();
    let mut answered = 0;
    while let Ok((e, _)) = c.reply() {
        assert_eq!(e, 0);
        answered += 1;
    }
    assert_eq!(
        answered, 16,
        "DISC: every request in flight answered before the close"
    );
    let mut c = transmission(port);
    assert_eq!(
        c.read(15 * 65536, 65536).unwrap().unwrap(),
        vec![15u8; 65536]
    );
    c.disconnect();
    tried += 1;

    // a client that floods requests and never reads replies: memory stays bounded
    let rss_before = rss_bytes(node.pid());
    let flood = std::thread::spawn(move || {
        let mut c = transmission(port);
        c.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut sent = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            if c.send(CMD_READ, 0, sent, (sent % 512) << 20, 1 << 20, &[])
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        (sent, c)
    });
    std::thread::sleep(Duration::from_secs(5));
    let rss_flooded = rss_bytes(node.pid());
    good_client_served(port);
    let (sent, c) = flood.join().unwrap();
    drop(c);
    tried += 1;
    let growth = rss_flooded.saturating_sub(rss_before);
    eprintln!(
        "flood: {sent} requests of 1 MiB sent, replies never read; server RSS grew by {} MiB",
        growth >> 20
    );
    assert!(
        growth < 200 << 20,
        "server memory grew by {} MiB under a flood",
        growth >> 20
    );
    good_client_served(port);
    eprintln!("transmission bad inputs tried: {tried}");
    node.stop();
}

/// 200 connections of random valid and invalid requests and noise: the server stays up, serves a
/// good client every 10 connections and afterwards, and its RSS grows by less than 200 MiB. It
/// prints its seed.
#[test]
fn random_bytes_after_the_handshake_never_take_the_server_down() {
    // Garbage in the transmission phase: many connections, each a random mix of valid and
    // invalid requests and raw noise. The server may close any of them, but it must stay up
    // and serve a good client afterwards, and its memory must stay bounded.
    let seed = seed();
    eprintln!("transmission garbage seed: {seed} (replay with TORUS_TEST_SEED={seed})");
    let dir = TempDir::new("garbage");
    let mut node = Torusd::start(dir.path(), &[]);
    let port = node.nbd_port;
    let rss_before = rss_bytes(node.pid());
    let mut rng = Rng(seed);
    let mut sent_bytes = 0usize;
    for conn in 0..200 {
        let mut c = transmission(port);
        c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(20) {
            match rng.below(4) {
                0 => {
                    // noise
                    let mut b = vec![0u8; rng.below(300) as usize];
                    rng.fill(&mut b);
                    stream.extend(b);
                }
                _ => {
                    // a request with random fields and the right magic
                    let cmd = rng.below(10) as u16;
                    let len = if rng.below(2) == 0 {
                        rng.below(70000) as u32
                    } else {
                        rng.next_u64() as u32
                    };
                    let offset = if rng.below(2) == 0 {
                        rng.below(1 << 31)
                    } else {
                        rng.next_u64()
                    };
                    stream.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                    stream.extend_from_slice(&(rng.below(64) as u16).to_be_bytes());
                    stream.extend_from_slice(&cmd.to_be_bytes());
                    stream.extend_from_slice(&rng.next_u64().to_be_bytes());
                    stream.extend_from_slice(&offset.to_be_bytes());
                    stream.extend_from_slice(&len.to_be_bytes());
                    if cmd == CMD_WRITE {
                        let mut b = vec![0u8; (len as usize).min(70000)];
                        rng.fill(&mut b);
                        stream.extend(b);
                    }
                }
            }
        }
        sent_bytes += stream.len();
        let _ = c.s.write_all(&stream);
        if conn % 10 == 0 {
            good_client_served(port);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    good_client_served(port);
    let growth = rss_bytes(node.pid()).saturating_sub(rss_before);
    eprintln!(
        "garbage: 200 connections, {} KiB of random requests and noise; RSS grew {} MiB",
        sent_bytes >> 10,
        growth >> 20
    );
    assert!(
        growth < 200 << 20,
        "server memory grew by {} MiB",
        growth >> 20
    );
    node.stop();
}
