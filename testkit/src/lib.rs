//! What the process-level tests (`tests/`) and the benchmarks (`benches/`) both need to drive
//! real processes: loopback ports nobody uses, a process's CPU time and memory read from
//! `/proc`, finding a tool on `PATH`, and whether etcd is ready. One copy, so a test and a
//! benchmark measure a process the same way.

pub mod alloc;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A loopback port free now and not given out before by this process: the kernel may hand the
/// same ephemeral port to two binds in a row when the first was just released again, and a
/// node's admin and peer ports once came out the same.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind a loopback port")
            .local_addr()
            .expect("a bound socket has an address")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits up to `limit` until something accepts connections on the loopback `port`.
pub fn wait_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// User plus system CPU time of a process so far, in clock ticks (`/proc/PID/stat`); `None`
/// once it has gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second, for `cpu_ticks`.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// User plus system CPU time of a process so far, in seconds (0 once it has gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid).unwrap_or(0) as f64 / ticks_per_second() as f64
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident set size of a process now, in bytes (0 once it has gone).
pub fn rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:").unwrap_or(0) * 1024
}

/// The most a process has held resident so far, in bytes (0 once it has gone).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:").unwrap_or(0) * 1024
}

/// A tool's path: the first `PATH` folder that has it, then `/usr/sbin` and `/sbin` (where
/// Debian puts `losetup` and `mkfs.ext4`, which a non-root `PATH` may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.exists());
    found
}

/// True when etcd on loopback `port` answers `GET /health` with its health true. A port that
/// accepts is not enough: etcd listens before it can serve, and a node whose first call
/// times out there exits.
pub fn etcd_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_of_this_process_are_plausible_and_of_a_gone_one_empty() {
        let me = std::process::id();
        assert!(rss_bytes(me) > 0);
        assert!(peak_rss_bytes(me) >= rss_bytes(me));
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(cpu_ticks(me).unwrap() > 0);
        assert_eq!(cpu_ticks(u32::MAX), None);
        assert_eq!(rss_bytes(u32::MAX), 0);
    }

    #[test]
    fn ports_are_not_given_twice_and_a_listener_is_seen() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        let l = TcpListener::bind(("127.0.0.1", a)).unwrap();
        assert!(wait_port(a, Duration::from_secs(1)));
        drop(l);
        assert!(!wait_port(b, Duration::from_millis(100)));
        assert!(which("sh").is_some());
        assert!(which("no-such-tool-here").is_none());
    }
}
