//! `torusd --nbd-stdin`: one NBD connection on stdin/stdout, as libnbd's `connect_command`
//! (and nbdkit's `-s`) use it, and the mode a fuzzer drives the whole connection with: a valid
//! session's bytes, then seeded mutations of them, each run to the end. Every run must exit 0
//! with its writes durable, never panic or hang, and the store must serve a good session after.
//!
//! Long form: `TORUS_STDIN_FUZZ_RUNS=2000 cargo test --release -p torus-tests --test nbd_stdin`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use torus_tests::nbd::{
    go_data, request, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    IHAVEOPT, OPT_GO,
};
use torus_tests::*;

fn torusd_stdin(dir: &std::path::Path) -> Command {
    let mut c = Command::new(bin("torusd"));
    c.args([
        "--nbd-stdin",
        "--sparse",
        "--data-dir",
        dir.join("d").to_str().unwrap(),
        "--size",
        "256M",
        "--default-volume-size",
        "64M",
        "--cores",
        "2",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    c
}

/// Runs one connection whose client side is `input`; returns (exit ok, stdout, stderr).
fn run_session(dir: &std::path::Path, input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = torusd_stdin(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start torusd --nbd-stdin");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = {
        let mut c = child;
        let status = wait_timeout(&mut c, Duration::from_secs(30));
        let status = status.unwrap_or_else(|| {
            let _ = c.kill();
            panic!("torusd --nbd-stdin did not exit within 30 s (a hang)")
        });
        let mut stdout = Vec::new();
        let mut stderr = String::new();
        use std::io::Read;
        c.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
        c.stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status.success(), stdout, stderr)
    };
    let _ = feeder.join();
    out
}

/// Fixed newstyle, OPT_GO "default", then `requests`, then disconnect.
fn session(requests: &[Vec<u8>]) -> Vec<u8> {
    let go = go_data("default");
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(go.len() as u32).to_be_bytes());
    b.extend_from_slice(&go);
    for r in requests {
        b.extend_from_slice(r);
    }
    b.extend(request(CMD_DISC, 0, 99, 0, 0, &[]));
    b
}

/// Write, trim, write zeroes, flush, a read past the end (an error reply). Requests in flight
/// together are not ordered (NBD), so what the write left is read by the next session.
fn writing_session(payload: &[u8]) -> Vec<u8> {
    session(&[
        request(CMD_WRITE, 0, 1, 1 << 20, payload.len() as u32, payload),
        request(CMD_TRIM, 0, 3, 2 << 20, 8192, &[]),
        request(CMD_WRITE_ZEROES, 0, 4, 3 << 20, 4096, &[]),
        request(CMD_FLUSH, 0, 5, 0, 0, &[]),
        request(CMD_READ, 0, 6, 64 << 20, 4096, &[]), // past the end
    ])
}

fn reading_session(len: u32) -> Vec<u8> {
    session(&[request(CMD_READ, 0, 2, 1 << 20, len, &[])])
}

/// `torusd --nbd-stdin` launched by libnbd's connect_command serves a session (a 64 MiB `default`)
/// whose writes a second session reads.
#[test]
fn libnbd_connect_command_serves_a_session_and_it_persists() {
    let dir = TempDir::new("stdin-libnbd");
    let python = std::path::Path::new("/usr/bin/python3");
    assert!(
        python.exists(),
        "/usr/bin/python3 is missing (Debian package python3-libnbd)"
    );
    let argv: Vec<String> = {
        let c = torusd_stdin(dir.path());
        std::iter::once(c.get_program().to_string_lossy().to_string())
            .chain(c.get_args().map(|a| a.to_string_lossy().to_string()))
            .collect()
    };
    let script = r#"
import nbd, sys, json
argv = json.loads(sys.argv[1])
h = nbd.NBD()
h.set_export_name("default")
h.connect_command(argv)
assert h.get_size() == 64 << 20, h.get_size()
if sys.argv[2] == "write":
    h.pwrite(bytes(range(256)) * 16, 4096 * 5)
    h.flush()
assert h.pread(4096, 4096 * 5) == bytes(range(256)) * 16
h.shutdown()
print("ok")
"#;
    let argv = serde_json::to_string(&argv).unwrap();
    for phase in ["write", "read"] {
        let out = run_ok(
            Command::new(python).args(["-c", script, &argv, phase]),
            Duration::from_secs(60),
        );
        assert_eq!(out.trim(), "ok", "{phase}");
    }
}

/// A whole session's bytes (handshake, write, trim, write zeroes, flush, a read past the end,
/// disconnect) and 200 seeded mutations of it (bit flips, changed bytes, cuts, duplicated spans,
/// random bytes; TORUS_STDIN_FUZZ_RUNS for more) each run to the end: exit 0, no panic, no hang
/// (30 s), and the store serves the valid session after: its write reads back.
#[test]
fn mutated_sessions_never_panic_hang_or_harm_the_store() {
    let dir = TempDir::new("stdin-fuzz");
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let session = writing_session(&payload);
    let reads = reading_session(payload.len() as u32);
    let holds_payload = |out: &[u8]| out.windows(payload.len()).any(|w| w == payload.as_slice());

    // The valid sessions: exit 0, and what the first wrote the second reads.
    let (ok, _, err) = run_session(dir.path(), &session);
    assert!(ok && !err.contains("panicked"), "writing session: {err}");
    let (ok, out, err) = run_session(dir.path(), &reads);
    assert!(ok, "reading session: {err}");
    assert!(
        holds_payload(&out),
        "the read's payload is not in the replies"
    );

    let runs: usize = std::env::var("TORUS_STDIN_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng(seed());
    for run in 0..runs {
        let mut input = session.clone();
        // A few byte flips, a cut, a duplicated span or random bytes spliced in.
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(input.len() as u64) as usize;
            match rng.below(5) {
                0 => input[at] ^= 1 << rng.below(8),
                1 => input[at] = rng.below(256) as u8,
                2 => input.truncate(at),
                3 => {
                    let end = (at + 1 + rng.below(64) as usize).min(input.len());
                    let span = input[at..end].to_vec();
                    input.splice(at..at, span);
                }
                _ => {
                    let mut junk = vec![0u8; 1 + rng.below(48) as usize];
                    rng.fill(&mut junk);
                    input.splice(at..at, junk);
                }
            }
            if input.is_empty() {
                break;
            }
        }
        let (ok, _, err) = run_session(dir.path(), &input);
        assert!(
            ok && !err.contains("panicked"),
            "run {run} (seed {}): torusd failed on a mutated session:\n{err}",
            seed()
        );
    }
    // The store is intact: the valid session writes the payload again and it reads back.
    let (ok, _, err) = run_session(dir.path(), &session);
    assert!(ok, "{err}");
    let (ok, out, err) = run_session(dir.path(), &reads);
    assert!(ok, "{err}");
    assert!(
        holds_payload(&out),
        "the store no longer serves a good session"
    );
    eprintln!("{runs} mutated sessions ran to the end; none panicked or hung");
}
