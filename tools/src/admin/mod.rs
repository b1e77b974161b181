//! The admin HTTP API of a node (`torusctl` speaks it) and `/metrics` in Prometheus text
//! format. It runs on its own thread; it reaches the cores only through their mailboxes.
//!
//! ```text
//! GET    /v1/volumes                    list, with size, used bytes and clients
//! POST   /v1/volumes                    {"name": "db", "size_bytes": 2147483648}
//! DELETE /v1/volumes/NAME               refused (409) while clients are connected
//! POST   /v1/volumes/NAME/resize        {"size_bytes": ..., "force": false}
//! POST   /v1/volumes/NAME/quota         {"quota_bytes": ... or null}
//! POST   /v1/volumes/NAME/scrub         read every replica on every node, repair bad copies
//!                                       (`?local=1`: this node only)
//! GET    /v1/status                     node health, capacity, cores (and the cluster's PGs)
//! GET    /v1/peers                      cluster nodes: address, capacity, used, state, heartbeat
//! POST   /v1/peers/NAME/remove          drain a node out of the cluster
//! POST   /v1/peers/NAME/lost            give up on a node down for good: lost PGs stop
//!                                       waiting for it (writes only it had are lost)
//! GET    /v1/snapshots[?volume=NAME]    snapshots, with the space each alone holds
//! POST   /v1/snapshots                  {"name": "db@before-upgrade"}
//! DELETE /v1/snapshots/VOLUME@SNAP      frees the blocks no volume or other snapshot maps
//! POST   /v1/snapshots/VOLUME@SNAP/restore   the volume reads as the snapshot (no clients)
//! POST   /v1/clones                     {"snapshot": "db@snap", "name": "db-test"}
//! POST   /v1/volumes/-/clone-local      {"from": ID, "to": ID}: this node's engine only (the
//!                                       cluster's snapshot and clone call it on every node)
//! GET    /v1/ublk                       ublk devices this node serves
//! POST   /v1/ublk                       {"volume": "db"}: serve it as /dev/ublkbN
//! DELETE /v1/ublk/ID                    stop and remove /dev/ublkbID
//! GET    /metrics                       Prometheus text
//! ```
//!
//! - `routes.rs`: the table above, each route calling one volume service of `Node`
//!   (`crate::node`, which decides what happens to a volume, alone or in a cluster).
//! - `views.rs`: the JSON bodies of requests and answers, shared with `torusctl`.
//! - `metrics.rs`: `/metrics`.
//!
//! This file serves the requests, each on its own thread, and maps a service's refusal to
//! its status code (`node_error`).

mod metrics;
mod routes;
pub mod views;

pub use crate::node::Node;
pub use views::{
    CloneLocal, CreateClone, CreateSnapshot, CreateUblk, CreateVolume, ResizeVolume, SetQuota,
    SnapshotView, StatusView, UblkView, VolumeView,
};

use crate::node::NodeError;
use serde::Serialize;
use std::io::Read;
use std::sync::Arc;
use torus_net::metadata::MetadataError;

/// Largest request body accepted by the admin API.
const BODY_MAX: u64 = 64 * 1024;

struct Answer {
    code: u16,
    body: String,
    content_type: &'static str,
}

fn json(code: u16, value: &impl Serialize) -> Answer {
    Answer {
        code,
        body: serde_json::to_string_pretty(value).expect("serializable"),
        content_type: "application/json",
    }
}

fn error(code: u16, message: impl std::fmt::Display) -> Answer {
    json(code, &serde_json::json!({ "error": message.to_string() }))
}

fn metadata_error(e: MetadataError) -> Answer {
    match e {
        MetadataError::Exists(_) => error(409, e),
        MetadataError::NotFound(_) => error(404, e),
        MetadataError::InvalidName(_) | MetadataError::InvalidSize(_) => error(400, e),
        MetadataError::Unsupported(_) => error(409, e),
        _ => error(500, e),
    }
}

/// The status code of each kind of refusal.
fn node_error(e: NodeError) -> Answer {
    match e {
        NodeError::Metadata(e) => metadata_error(e),
        NodeError::Invalid(_) => error(400, e),
        NodeError::NotFound(_) => error(404, e),
        NodeError::Conflict(_) => error(409, e),
        NodeError::Failed(_) => error(500, e),
        NodeError::Unavailable(_) => error(503, e),
    }
}

/// Requests the admin API works on at once; more are answered 503. Each runs on its own
/// thread: a cluster snapshot asked of one node calls other nodes' admin APIs, which may call
/// back (a single-threaded server would wait on itself).
const ADMIN_CONCURRENCY: usize = 32;

/// Serves the admin API until `server.unblock()` is called.
pub fn serve(node: Arc<Node>, server: Arc<tiny_http::Server>) -> std::thread::JoinHandle<()> {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("torus-admin".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                use std::sync::atomic::Ordering;
                if busy.fetch_add(1, Ordering::SeqCst) >= ADMIN_CONCURRENCY {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    respond(
                        request,
                        error(503, "too many admin requests at once; retry"),
                    );
                    continue;
                }
                let node = node.clone();
                let done = busy.clone();
                let spawned = std::thread::Builder::new()
                    .name("torus-admin-req".into())
                    .spawn(move || {
                        answer(&node, request);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .expect("spawn admin thread")
}

fn answer(node: &Node, mut request: tiny_http::Request) {
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(BODY_MAX + 1)
        .read_to_end(&mut body);
    let answer = if read.is_err() || body.len() as u64 > BODY_MAX {
        error(413, "request body too large or unreadable")
    } else {
        routes::handle(node, request.method(), request.url(), &body)
    };
    respond(request, answer);
}

fn respond(request: tiny_http::Request, answer: Answer) {
    let header =
        tiny_http::Header::from_bytes("Content-Type", answer.content_type).expect("static header");
    let response = tiny_http::Response::from_string(answer.body)
        .with_status_code(answer.code)
        .with_header(header);
    let _ = request.respond(response);
}
