//! The routes of the admin API (the table is in `mod.rs`): each one parses its request body,
//! calls one service of the `Node` and answers its result as JSON with the route's status
//! code, or its refusal through `node_error`. Nothing here decides what happens to a volume.

use super::metrics;
use super::views::{
    CloneLocal, CreateClone, CreateSnapshot, CreateUblk, CreateVolume, GiveUpPeer, ResizeVolume,
    SetQuota, UblkView,
};
use super::{error, json, node_error, Answer};
use crate::node::{Node, SnapshotTaken};
use torus_net::cluster::Cluster;

/// The answer to one request.
pub(super) fn handle(node: &Node, method: &str, url: &str, body: &[u8]) -> Answer {
    let path = url.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["metrics"]) => Answer {
            code: 200,
            body: metrics::render(node),
            content_type: "text/plain; version=0.0.4",
        },
        ("GET", ["v1", "status"]) => {
            let s = node.status();
            json(200, &s)
        }
        ("GET", ["v1", "volumes"]) => json(200, &node.volume_views()),
        ("GET", ["v1", "peers"]) => on_cluster(node, |c| json(200, &c.peers())),
        ("POST", ["v1", "peers", name, "lost"]) => {
            match serde_json::from_slice::<GiveUpPeer>(body) {
                Ok(GiveUpPeer {
                    accept_data_loss: true,
                }) => on_cluster(node, |c| match c.give_up_peer(name) {
                    Ok(g) => json(200, &g),
                    Err(e) => error(409, e),
                }),
                _ => error(
                    400,
                    format!("giving up on node {name} loses the writes only it had: send {{\"accept_data_loss\": true}} to confirm (torusctl peer lost {name} --accept-data-loss)"),
                ),
            }
        }
        ("POST", ["v1", "peers", name, "remove"]) => {
            on_cluster(node, |c| match c.remove_peer(name) {
                Ok(()) => json(200, &serde_json::json!({ "removing": name })),
                Err(e) => error(409, e),
            })
        }
        ("POST", ["v1", "volumes"]) => match serde_json::from_slice::<CreateVolume>(body) {
            Ok(c) => match node.create_volume(&c.name, c.size_bytes, c.replicas) {
                Ok(v) => match c.quota_bytes {
                    None => json(201, &v),
                    Some(q) => set_quota(node, &v.name, Some(q), 201),
                },
                Err(e) => node_error(e),
            },
            Err(e) => error(400, format!("bad request body: {e}")),
        },
        ("DELETE", ["v1", "volumes", name]) => match node.delete_volume(name) {
            Ok(()) => json(200, &serde_json::json!({ "deleted": name })),
            Err(e) => node_error(e),
        },
        ("POST", ["v1", "volumes", name, "quota"]) => {
            match serde_json::from_slice::<SetQuota>(body) {
                Ok(q) => set_quota(node, name, q.quota_bytes, 200),
                Err(e) => error(400, format!("bad request body: {e}")),
            }
        }
        ("POST", ["v1", "volumes", name, "scrub"]) => {
            match node.scrub(name, url.contains("local=1")) {
                Ok(reports) => json(200, &reports),
                Err(e) => node_error(e),
            }
        }
        ("POST", ["v1", "volumes", name, "resize"]) => {
            match serde_json::from_slice::<ResizeVolume>(body) {
                Ok(r) => match node.resize_volume(name, r.size_bytes, r.force) {
                    Ok(v) => json(
                        200,
                        &serde_json::json!({ "name": name, "size_bytes": v.size_bytes, "note": "new NBD connections see the new size" }),
                    ),
                    Err(e) => node_error(e),
                },
                Err(e) => error(400, format!("bad request body: {e}")),
            }
        }
        ("GET", ["v1", "snapshots"]) => {
            let volume = url
                .split_once("volume=")
                .map(|(_, v)| v.split('&').next().unwrap_or(""));
            json(200, &node.snapshot_views(volume))
        }
        ("POST", ["v1", "snapshots"]) => match serde_json::from_slice::<CreateSnapshot>(body) {
            Ok(c) => match node.create_snapshot(&c.name) {
                Ok(SnapshotTaken::Here(v)) => json(201, &v),
                Ok(SnapshotTaken::ByWriter { code, body }) => Answer {
                    code,
                    body,
                    content_type: "application/json",
                },
                Err(e) => node_error(e),
            },
            Err(e) => error(400, format!("bad request body: {e}")),
        },
        ("DELETE", ["v1", "snapshots", name]) => match node.delete_snapshot(name) {
            Ok(()) => json(200, &serde_json::json!({ "deleted": name })),
            Err(e) => node_error(e),
        },
        ("POST", ["v1", "snapshots", name, "restore"]) => match node.restore_snapshot(name) {
            Ok(volume) => json(
                200,
                &serde_json::json!({ "restored": volume, "from": name }),
            ),
            Err(e) => node_error(e),
        },
        ("POST", ["v1", "volumes", "-", "clone-local"]) => {
            match serde_json::from_slice::<CloneLocal>(body) {
                Ok(c) => match node.clone_local(c.from, c.to) {
                    Ok(()) => json(200, &serde_json::json!({ "cloned": c.to })),
                    Err(e) => node_error(e),
                },
                Err(e) => error(400, format!("bad request body: {e}")),
            }
        }
        ("POST", ["v1", "clones"]) => match serde_json::from_slice::<CreateClone>(body) {
            Ok(c) => match node.create_clone(&c.snapshot, &c.name) {
                Ok(v) => json(201, &v),
                Err(e) => node_error(e),
            },
            Err(e) => error(400, format!("bad request body: {e}")),
        },
        ("GET", ["v1", "ublk"]) => json(
            200,
            &node
                .ublk
                .list()
                .into_iter()
                .map(UblkView::from)
                .collect::<Vec<_>>(),
        ),
        ("POST", ["v1", "ublk"]) => match serde_json::from_slice::<CreateUblk>(body) {
            Ok(c) => match node.ublk.create(&c.volume) {
                Ok(d) => json(201, &UblkView::from(d)),
                Err(e) => error(409, e),
            },
            Err(e) => error(400, format!("bad request body: {e}")),
        },
        ("DELETE", ["v1", "ublk", id]) => match id.parse::<u32>() {
            Ok(id) => match node.ublk.remove(id) {
                Ok(()) => json(200, &serde_json::json!({ "removed": id })),
                Err(e) => error(409, e),
            },
            Err(_) => error(400, format!("{id:?} is not a ublk device id")),
        },
        _ => error(404, format!("no such endpoint: {method} {path}")),
    }
}

/// The volume's quota set, answered as its view with `code` (201 when set by a create).
fn set_quota(node: &Node, name: &str, quota: Option<u64>, code: u16) -> Answer {
    match node.set_quota(name, quota) {
        Ok(view) => json(code, &view),
        Err(e) => node_error(e),
    }
}

/// `answer(cluster)` on a cluster; alone, the node has no peers to list or change.
fn on_cluster(node: &Node, answer: impl FnOnce(&Cluster) -> Answer) -> Answer {
    match &node.cluster {
        Some(c) => answer(c),
        None => error(400, "this node runs alone (no --etcd): it has no peers"),
    }
}
