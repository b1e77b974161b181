//! What one NBD client cannot take from the others: sockets from one address that never
//! finish their handshake, and a connection whose client host vanished without a reset.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use torus_tests::nbd::Client;
use torus_tests::*;

/// 200 connections from one address (127.0.0.2) that send nothing: the node keeps at most 8
/// of them in handshake (`HANDSHAKES_PER_SOURCE`) and closes the rest at once, so `nbdinfo`
/// from another address is answered at once; after the handshake deadline (10 s) it has
/// closed those 8 too.
#[test]
fn idle_sockets_from_one_address_leave_other_clients_served() {
    let dir = TempDir::new("nbd-slow");
    let mut node = Torusd::start(&dir.0, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{}", node.nbd_port).parse().unwrap();
    let mut held: Vec<_> = (0..200).map(|_| connect_from("127.0.0.2", addr)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let size = run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin")).args(["--size", &node.uri("default")]),
        Duration::from_secs(30),
    );
    assert_eq!(size.trim(), "1073741824");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "nbdinfo took {took:?}");
    let open = held.iter_mut().map(still_open).filter(|&o| o).count();
    assert!(
        open <= 8,
        "{open} of 200 idle sockets from one address still open"
    );
    std::thread::sleep(Duration::from_secs(11));
    let open = held.iter_mut().map(still_open).filter(|&o| o).count();
    assert_eq!(
        open, 0,
        "idle sockets still open past the handshake deadline"
    );
    node.stop();
}

/// nftables rules that drop every packet to and from one local TCP port, removed on drop.
struct Blackhole(String);

impl Blackhole {
    fn port(port: u16) -> Blackhole {
        let table = format!("torus_blackhole_{}", std::process::id());
        let script = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  tcp sport {port} drop\n  tcp dport {port} drop\n }}\n}}\n"
        );
        nft(None, &script);
        Blackhole(table)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        nft(None, &format!("delete table inet {}", self.0));
    }
}

/// A client attached to the volume whose host then vanishes without a reset (every packet to
/// and from its port dropped): TCP keepalive closes the connection within about 25 s (10 s
/// idle, three probes 5 s apart), so it does not hold its place (and, on a cluster, the
/// volume's writer lock) until torusd restarts.
#[test]
fn a_client_whose_host_vanished_is_closed_by_keepalive() {
    let dir = TempDir::new("nbd-keepalive");
    let mut node = Torusd::start(&dir.0, &[]);
    let client = Client::connect(node.nbd_port, "default").expect("attach");
    let port = client.s.local_addr().unwrap().port();
    let connections = |n: &Torusd| metric_total(n, "torus_nbd_connections");
    assert_eq!(connections(&node), 1);
    let hole = Blackhole::port(port);
    let started = Instant::now();
    while connections(&node) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the vanished client's connection is still open after 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = started.elapsed();
    eprintln!("the vanished client's connection closed after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "closed after {took:?}: not by keepalive"
    );
    drop(hole);
    drop(client);
    node.stop();
}
