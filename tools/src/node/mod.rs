//! The volume services of a node: what it does to create, delete, resize, snapshot, clone and
//! restore volumes and set their quotas, alone or as one node of a cluster. `Node` holds what
//! they reach (the engine through its cores' mailboxes, the metadata, the exports, the cluster
//! when there is one); the admin HTTP API (`crate::admin`) calls them and turns their results
//! into JSON and status codes.
//!
//! - `volumes.rs`: list, create, delete, resize, quota.
//! - `snapshots.rs`: snapshots, clones and restores, each a new member of a volume's family
//!   that shares its blocks.
//! - `cluster.rs`: every choice between running alone and running in a cluster: the replica
//!   count of a new volume, the volume's writer lock held around a change, work done on every
//!   node through its admin API (copying a block map, scrubbing).
//! - `status.rs`: node health, capacity and problems (`GET /v1/status`).
//!
//! A service answers with the view the admin API sends as JSON (`VolumeView`, `SnapshotView`,
//! `StatusView`, each defined beside its service and re-exported by `admin::views`), or
//! refuses with a `NodeError` whose kind says why (bad request, not found, in the way, cluster
//! unreachable, failed); the admin API maps each kind to one status code. This module uses
//! nothing of `admin`, so the two do not import each other.

mod cluster;
mod snapshots;
mod status;
mod volumes;

pub use snapshots::{SnapshotTaken, SnapshotView};
pub use status::StatusView;
pub use volumes::VolumeView;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use torus_engine::{CoreStats, Engine};
use torus_frontend::exports::{Exports, Volume};
use torus_frontend::nbd::transmission::FrontendStats;
use torus_frontend::ublk::UblkTarget;
use torus_net::cluster::Cluster;
use torus_net::metadata::{Metadata, MetadataError};

pub struct Node {
    pub engine: Arc<Engine>,
    pub metadata: Arc<dyn Metadata>,
    pub exports: Arc<Exports>,
    pub frontend: Arc<FrontendStats>,
    pub started: Instant,
    pub nbd_urls: Vec<String>,
    pub cluster: Option<Arc<Cluster>>,
    pub ublk: Arc<UblkTarget>,
    /// The cluster's node token, which this node calls other nodes' admin APIs with.
    pub node_token: Option<crate::token::Token>,
}

/// Why a volume service refused or failed. The message is the one the client sees.
#[derive(Debug)]
pub enum NodeError {
    /// The request cannot be done as asked (a bad size, a snapshot of a snapshot, ...).
    Invalid(String),
    /// A thing the request names does not exist (beyond what the metadata reports itself).
    NotFound(String),
    /// The volume's state is in the way: clients connected, its writer lock held elsewhere.
    Conflict(String),
    /// The cluster could not be asked: the metadata store or the volume's writer unreachable.
    Unavailable(String),
    /// The operation failed part-way on this node or on another.
    Failed(String),
    /// The metadata store refused or failed.
    Metadata(MetadataError),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Invalid(m)
            | NodeError::NotFound(m)
            | NodeError::Conflict(m)
            | NodeError::Unavailable(m)
            | NodeError::Failed(m) => f.write_str(m),
            NodeError::Metadata(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for NodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NodeError::Metadata(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MetadataError> for NodeError {
    fn from(e: MetadataError) -> NodeError {
        NodeError::Metadata(e)
    }
}

impl Node {
    /// Bytes that hold data, per volume id, summed over the cores' reports.
    pub(crate) fn used_by_volume(stats: &[CoreStats]) -> HashMap<u32, u64> {
        let mut used = HashMap::new();
        for s in stats {
            for &(v, blocks) in &s.volumes {
                *used.entry(v).or_insert(0) += blocks * torus_engine::BLOCK_SIZE as u64;
            }
        }
        used
    }

    /// Serves again an export taken away by `remove_unless_attached` (the operation failed,
    /// or it only needed the volume free for a while).
    fn put_back(&self, removed: Option<Arc<Volume>>) {
        if let Some(v) = removed {
            self.exports
                .insert(Volume::new(&v.name, v.id, v.size(), v.read_only));
        }
    }
}
