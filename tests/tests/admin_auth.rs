//! Who may use a node's admin API, and what one client cannot take from the others: every
//! route but `/metrics` and `/healthz` needs the admin token, node-to-node routes refuse it,
//! web pages (`Origin`, a foreign `Host`) are refused, `peer lost` wants its confirmation in
//! the request, and slow or idle connections from one address leave torusctl served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use torus_tests::*;
use torus_tools::admin::auth::{Access, ROUTES};

/// One request on a new connection, headers as given; the status code and the body.
fn request(node: &Torusd, method: &str, path: &str, headers: &[String]) -> (u16, String) {
    let addr = node.admin().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = if method == "GET" { "" } else { "{}" };
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|h| h.starts_with("Host:")) {
        text.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        text.push_str(&format!("{h}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(text.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

fn bearer(node: &Torusd) -> String {
    let token = std::fs::read_to_string(node.token_file()).expect("the token file");
    format!("Authorization: Bearer {}", token.trim())
}

/// Every route of the table (`ROUTES`) without a token: 401, except the two public ones; with
/// a wrong token: 401; the node-to-node route with the admin token: 403. With the token, no
/// route answers "no such endpoint" (the table and the router agree). The token file is the
/// owner's only and survives a restart.
#[test]
fn every_admin_route_without_the_token_is_refused() {
    let dir = TempDir::new("admin-auth");
    let mut node = Torusd::start(&dir.0, &[]);
    let token = bearer(&node);
    let wrong = format!("Authorization: Bearer {}", "0".repeat(64));
    for (method, pattern, access) in ROUTES {
        let path = pattern.replace("{name}", "nosuch").replace("{id}", "7");
        let (code, body) = request(&node, method, &path, &[]);
        match access {
            Access::Public => assert_eq!(code, 200, "{method} {path}: {body}"),
            _ => assert_eq!(code, 401, "{method} {path} without a token: {body}"),
        }
        if *access != Access::Public {
            let (code, body) = request(&node, method, &path, std::slice::from_ref(&wrong));
            assert_eq!(code, 401, "{method} {path} with a wrong token: {body}");
        }
        let (code, body) = request(&node, method, &path, std::slice::from_ref(&token));
        match access {
            Access::Node => assert_eq!(code, 403, "{method} {path} with the admin token: {body}"),
            _ => assert!(
                !body.contains("no such endpoint"),
                "{method} {path}: the router does not know a route of the table: {body}"
            ),
        }
    }
    let (code, _) = request(&node, "GET", "/v1/nosuch", &[]);
    assert_eq!(code, 401, "an unknown path needs the token too");
    let mode = std::fs::metadata(node.token_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read_to_string(node.token_file()).unwrap();
    node.restart();
    assert_eq!(std::fs::read_to_string(node.token_file()).unwrap(), before);
    assert!(node.torusctl_ok(&["volume", "list"]).contains("default"));
    node.stop();
}

/// A web page cannot reach the API through a browser on the node's host: a request with an
/// `Origin` header, or with a `Host` that names something other than the node (DNS
/// rebinding), is refused even with the token. `peer lost` is refused without
/// `{"accept_data_loss": true}` in the request, and nothing changes.
#[test]
fn web_pages_and_unconfirmed_data_loss_are_refused() {
    let dir = TempDir::new("admin-origin");
    let mut node = Torusd::start(&dir.0, &[]);
    let token = bearer(&node);
    let (code, body) = request(
        &node,
        "GET",
        "/v1/volumes",
        &[token.clone(), "Origin: http://evil.example".into()],
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = request(
        &node,
        "GET",
        "/v1/volumes",
        &[token.clone(), "Host: evil.example:4321".into()],
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = request(
        &node,
        "POST",
        "/v1/peers/n2/lost",
        std::slice::from_ref(&token),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("accept_data_loss"), "{body}");
    let (code, _) = request(&node, "GET", "/v1/volumes", std::slice::from_ref(&token));
    assert_eq!(code, 200);
    node.stop();
}

/// 200 connections from one address (127.0.0.2) that send half a request and then nothing,
/// and 200 more that send nothing: torusctl, from another address, is answered at once, and
/// the node closes what is over its cap of 64 from one address; after the header timeout
/// (10 s) it has closed the slow ones too.
#[test]
fn slow_connections_from_one_address_leave_torusctl_served() {
    let dir = TempDir::new("admin-slowloris");
    let mut node = Torusd::start(&dir.0, &[]);
    let addr: SocketAddr = node.admin().trim_start_matches("http://").parse().unwrap();
    let mut held = Vec::new();
    for i in 0..400 {
        let mut s = connect_from("127.0.0.2", addr);
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
        }
        held.push(s);
    }
    let started = Instant::now();
    assert!(node.torusctl_ok(&["volume", "list"]).contains("default"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "torusctl took {took:?}");
    // The node closed every connection over the per-address cap.
    std::thread::sleep(Duration::from_millis(500));
    let open = held.iter_mut().map(still_open).filter(|&o| o).count();
    assert!(
        open <= 64,
        "{open} of 400 connections from one address still open"
    );
    std::thread::sleep(Duration::from_secs(11));
    let slow_open = held
        .iter_mut()
        .step_by(2)
        .map(still_open)
        .filter(|&o| o)
        .count();
    assert_eq!(
        slow_open, 0,
        "half-sent requests still open past the header timeout"
    );
    drop(held);
    node.stop();
}
