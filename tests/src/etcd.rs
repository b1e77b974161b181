//! A real etcd for the cluster tests: on free loopback ports, in a temporary directory,
//! stopped when dropped.

use crate::{free_port, require_tool, TempDir};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real etcd on free loopback ports in a temporary directory, stopped when dropped.
pub struct Etcd {
    child: Child,
    pub url: String,
    _dir: TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_on(&[])
    }

    /// Also listens on these addresses (e.g. the host end of a veth pair). Ready when it
    /// answers `/health` (a TCP connect alone can succeed with nothing listening: a loopback
    /// connection whose source port is the port it dials connects to itself). An etcd that
    /// exits first (its port taken meanwhile by another process's connection) is started
    /// again on other ports, twice at most; its log is printed.
    pub fn start_on(extra_ips: &[&str]) -> Etcd {
        let etcd = require_tool("etcd", "etcd-server");
        for attempt in 1..=3 {
            let dir = TempDir::new("etcd");
            let client = free_port();
            let peer = free_port();
            let url = format!("http://127.0.0.1:{client}");
            let mut listen = url.clone();
            for ip in extra_ips {
                listen.push_str(&format!(",http://{ip}:{client}"));
            }
            let log_path = dir.path().join("etcd.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(&etcd)
                .args([
                    "--data-dir",
                    dir.path().join("data").to_str().unwrap(),
                    "--listen-client-urls",
                    &listen,
                    "--advertise-client-urls",
                    &url,
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &format!("default=http://127.0.0.1:{peer}"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start etcd");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    eprintln!(
                        "etcd on port {client} exited ({status}) before it was ready (attempt {attempt} of 3); its log ends:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                    break;
                }
                if torus_testkit::etcd_healthy(client) {
                    return Etcd {
                        child,
                        url,
                        _dir: dir,
                    };
                }
                assert!(Instant::now() < deadline, "etcd did not start within 30 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("etcd exited before it was ready three times");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
