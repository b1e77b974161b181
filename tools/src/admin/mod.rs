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
//! POST   /v1/peers/NAME/lost            {"accept_data_loss": true}: give up on a node down
//!                                       for good: lost PGs stop waiting for it (writes only it
//!                                       had are lost)
//! GET    /v1/snapshots[?volume=NAME]    snapshots, with the space each alone holds
//! POST   /v1/snapshots                  {"name": "db@before-upgrade"}
//! DELETE /v1/snapshots/VOLUME@SNAP      frees the blocks no volume or other snapshot maps
//! POST   /v1/snapshots/VOLUME@SNAP/restore   the volume reads as the snapshot (no clients)
//! POST   /v1/clones                     {"snapshot": "db@snap", "name": "db-test"}
//! POST   /v1/volumes/-/clone-local      {"from": ID, "to": ID}: this node's engine only (the
//!                                       cluster's snapshot and clone call it on every node;
//!                                       other nodes only, with the node token)
//! GET    /v1/ublk                       ublk devices this node serves
//! POST   /v1/ublk                       {"volume": "db"}: serve it as /dev/ublkbN
//! DELETE /v1/ublk/ID                    stop and remove /dev/ublkbID
//! GET    /metrics                       Prometheus text (no token needed)
//! GET    /healthz                       "ok" while the node serves (no token needed)
//! ```
//!
//! Every other route needs a token (`auth.rs`: who may call what, the `ROUTES` table).
//!
//! - `routes.rs`: the table above, each route calling one volume service of `Node`
//!   (`crate::node`, which decides what happens to a volume, alone or in a cluster).
//! - `views.rs`: the JSON bodies of requests and answers, shared with `torusctl`.
//! - `metrics.rs`: `/metrics`.
//!
//! - `auth.rs`: the tokens, the route table with who may call each route, Host and Origin.
//! - `server.rs`: the HTTP server and its limits (connections, headers, bodies, time).
//!
//! This file maps a service's refusal to its status code (`node_error`).

pub mod auth;
mod metrics;
mod routes;
mod server;
pub mod views;

pub use auth::{Credentials, Token};
pub use server::AdminServer;

pub use crate::node::Node;
pub use views::{
    CloneLocal, CreateClone, CreateSnapshot, CreateUblk, CreateVolume, ResizeVolume, SetQuota,
    SnapshotView, StatusView, UblkView, VolumeView,
};

use crate::node::NodeError;
use serde::Serialize;
use torus_net::metadata::MetadataError;

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
