//! Listening sockets (TCP and Unix) and the hand-off of negotiated connections to cores.
//!
//! Each accepted socket gets a short-lived handshake thread (at most `HANDSHAKES_MAX` at once,
//! `HANDSHAKES_PER_SOURCE` from one address; more are refused by closing), which negotiates on a blocking socket with a deadline and then
//! sends the socket to a core, chosen round-robin. From then on only that core touches it.

use super::handshake::{negotiate, Outcome};
use super::transmission::NewConnection;
use crate::exports::Exports;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use torus_engine::source_slots::{Full, SourceSlots};
use torus_engine::{Message, Shared};

/// Handshakes in progress at once; a flood of idle sockets cannot exhaust threads.
pub const HANDSHAKES_MAX: usize = 64;
/// Handshakes in progress at once from one address: one host opening sockets and sending
/// nothing cannot take the slots every other client needs.
pub const HANDSHAKES_PER_SOURCE: usize = 8;
/// NBD connections have TCP keepalive (`torus_engine::socket::keepalive`): one whose client
/// host vanished without a reset (power lost, a cut link) is closed within about 25 s instead
/// of holding its volume's writer lock for good; with replies unacknowledged, after this.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct NbdServer {
    pub exports: Arc<Exports>,
    shared: Arc<Shared>,
    next_core: AtomicUsize,
    /// Handshakes in progress, in all and per client address (TCP only).
    handshakes: Arc<SourceSlots>,
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
            handshakes: SourceSlots::new(HANDSHAKES_MAX, HANDSHAKES_PER_SOURCE),
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
                        torus_engine::socket::keepalive(&s, Some(USER_TIMEOUT));
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
                let slot = match server.handshakes.take(source) {
                    Ok(slot) => slot,
                    Err(Full::All) => {
                        eprintln!(
                            "torus: nbd: too many handshakes in progress; closing a new connection"
                        );
                        continue;
                    }
                    Err(Full::Source) => continue,
                };
                let srv = server.clone();
                // The slot goes back when the thread ends (or is not started).
                let _ = std::thread::Builder::new()
                    .name("torus-nbd-handshake".into())
                    .spawn(move || {
                        let _slot = slot;
                        srv.negotiate_and_hand_off(accepted);
                    });
            })
            .expect("spawn accept thread")
    }
}

enum Accepted {
    Tcp(std::net::TcpStream, SocketAddr),
    Unix(std::os::unix::net::UnixStream, String),
}

/// Wakes a blocked `accept` so the accept thread sees `stop_accepting`.
pub fn poke(listener_addr: &str) {
    if let Ok(addr) = listener_addr.parse::<SocketAddr>() {
        let _ = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200));
    } else {
        let _ = std::os::unix::net::UnixStream::connect(listener_addr);
    }
}
