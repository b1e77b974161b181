//! Listening sockets (TCP and Unix) and the hand-off of negotiated connections to cores.
//!
//! Each accepted socket gets a short-lived handshake thread (at most `HANDSHAKES_MAX` at once,
//! `HANDSHAKES_PER_SOURCE` from one address; more are refused by closing), which negotiates on a blocking socket with a deadline and then
//! sends the socket to a core, chosen round-robin. From then on only that core touches it.

use super::handshake::{negotiate, Outcome};
use super::transmission::NewConnection;
use crate::exports::Exports;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use torus_engine::{Message, Shared};

/// Handshakes in progress at once; a flood of idle sockets cannot exhaust threads.
pub const HANDSHAKES_MAX: usize = 64;
/// Handshakes in progress at once from one address: one host opening sockets and sending
/// nothing cannot take the slots every other client needs.
pub const HANDSHAKES_PER_SOURCE: usize = 8;
/// TCP keepalive on NBD connections: one whose client host vanished without a reset (power
/// lost, a cut link) is closed after about `KEEPALIVE_IDLE + KEEPALIVE_INTERVAL *
/// KEEPALIVE_PROBES` (25 s) instead of holding its volume's writer lock for good; with replies
/// unacknowledged, after `USER_TIMEOUT`.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct NbdServer {
    pub exports: Arc<Exports>,
    shared: Arc<Shared>,
    next_core: AtomicUsize,
    handshakes: AtomicUsize,
    /// Handshakes in progress per client address (TCP only).
    by_source: Mutex<HashMap<IpAddr, usize>>,
    stopping: AtomicBool,
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

impl NbdServer {
    pub fn new(exports: Arc<Exports>, shared: Arc<Shared>) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports,
            shared,
            next_core: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            by_source: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        })
    }

    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn hand_off(&self, fd: OwnedFd, outcome: Outcome, peer: String) {
        match outcome {
            Outcome::Transmission(negotiated) => {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let cores = self.shared.mailboxes.len();
                let core = self.next_core.fetch_add(1, Ordering::Relaxed) % cores;
                self.shared.mailboxes[core].send(Message::Service(Box::new(NewConnection {
                    fd,
                    negotiated,
                    peer,
                })));
            }
            Outcome::Closed(reason) => {
                if !reason.contains("early eof") && !reason.contains("aborted") {
                    eprintln!("torus: nbd {peer}: {reason}");
                }
            }
        }
    }

    fn negotiate_and_hand_off(&self, accepted: Accepted) {
        match accepted {
            Accepted::Tcp(mut s, peer) => {
                let outcome = negotiate(&mut s, &self.exports);
                let _ = s.set_read_timeout(None);
                let _ = s.set_write_timeout(None);
                self.hand_off(OwnedFd::from(s), outcome, peer.to_string());
            }
            Accepted::Unix(mut s, peer) => {
                let outcome = negotiate(&mut s, &self.exports);
                let _ = s.set_read_timeout(None);
                let _ = s.set_write_timeout(None);
                self.hand_off(OwnedFd::from(s), outcome, peer);
            }
        }
    }

    /// Takes a handshake slot for a connection from `source` (None: the Unix socket), or
    /// refuses it when all are taken or that address has its share.
    fn begin_handshake(&self, source: Option<IpAddr>) -> bool {
        if self.handshakes.fetch_add(1, Ordering::SeqCst) >= HANDSHAKES_MAX {
            self.handshakes.fetch_sub(1, Ordering::SeqCst);
            eprintln!("torus: nbd: too many handshakes in progress; closing a new connection");
            return false;
        }
        if let Some(ip) = source {
            let mut by = self.by_source.lock();
            let n = by.entry(ip).or_insert(0);
            if *n >= HANDSHAKES_PER_SOURCE {
                drop(by);
                self.handshakes.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
            *n += 1;
        }
        true
    }

    fn end_handshake(&self, source: Option<IpAddr>) {
        if let Some(ip) = source {
            let mut by = self.by_source.lock();
            if let Some(n) = by.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by.remove(&ip);
                }
            }
        }
        self.handshakes.fetch_sub(1, Ordering::SeqCst);
    }

    /// Negotiates on a connected stream (one end of a socket pair: `torusd --nbd-stdin`) on
    /// this thread and hands it to a core like an accepted socket.
    pub fn serve_stream(&self, stream: std::os::unix::net::UnixStream, peer: &str) {
        self.negotiate_and_hand_off(Accepted::Unix(stream, peer.to_string()));
    }

    /// Accepts connections until `stop_accepting`; runs on its own thread.
    pub fn serve(self: &Arc<Self>, listener: Listener) -> JoinHandle<()> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("torus-nbd-accept".into())
            .spawn(move || loop {
                let accepted = match &listener {
                    Listener::Tcp(l) => l.accept().map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        keepalive(&s);
                        Accepted::Tcp(s, a)
                    }),
                    Listener::Unix(l, p) => l
                        .accept()
                        .map(|(s, _)| Accepted::Unix(s, p.display().to_string())),
                };
                if server.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let accepted = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("torus: nbd accept on {}: {e}", listener.describe());
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    }
                };
                let source = match &accepted {
                    Accepted::Tcp(_, a) => Some(a.ip()),
                    Accepted::Unix(..) => None,
                };
                if !server.begin_handshake(source) {
                    continue;
                }
                let srv = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("torus-nbd-handshake".into())
                    .spawn(move || {
                        srv.negotiate_and_hand_off(accepted);
                        srv.end_handshake(source);
                    });
                if spawned.is_err() {
                    server.end_handshake(source);
                }
            })
            .expect("spawn accept thread")
    }
}

enum Accepted {
    Tcp(std::net::TcpStream, SocketAddr),
    Unix(std::os::unix::net::UnixStream, String),
}

/// Turns on TCP keepalive and a user timeout (see `KEEPALIVE_IDLE`); a socket that refuses
/// keeps working without them.
fn keepalive(socket: &std::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let s = socket2::SockRef::from(socket);
    let _ = s.set_tcp_keepalive(&ka);
    let _ = s.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Wakes a blocked `accept` so the accept thread sees `stop_accepting`.
pub fn poke(listener_addr: &str) {
    if let Ok(addr) = listener_addr.parse::<SocketAddr>() {
        let _ = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200));
    } else {
        let _ = std::os::unix::net::UnixStream::connect(listener_addr);
    }
}
