//! Snapshots, clones and restores. Each is a member of a volume's family (same id family in
//! the engine) that shares its blocks: a snapshot (`VOLUME@SNAP`) copies the block map of a
//! volume, a clone copies the block map of a snapshot, and a restore copies a snapshot's block
//! map back over its volume. The copy is made on every node that holds the family's blocks
//! (`clone_everywhere` in `cluster.rs`); a snapshot is taken where the volume's writes come
//! from, so it catches every write acknowledged before it.

use super::VolumeView;
use super::{Node, NodeError};
use serde::{Deserialize, Serialize};
use torus_frontend::exports::Volume;
use torus_net::metadata::{split_snapshot, MetadataError, VolumeRecord};

/// A snapshot as `GET /v1/snapshots` lists it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SnapshotView {
    pub name: String,
    pub volume: String,
    pub id: u32,
    pub size_bytes: u64,
    /// What deleting it would free: blocks no volume or other snapshot shares.
    pub held_bytes: u64,
    pub created_unix: u64,
}

/// Where a snapshot was taken.
#[derive(Debug)]
pub enum SnapshotTaken {
    /// On this node.
    Here(SnapshotView),
    /// By the node holding the volume's writer lock, to which the request was passed: its
    /// admin API's status code and body, success or error, passed on as they are.
    ByWriter { code: u16, body: String },
}

impl Node {
    /// Snapshots, with the space each alone holds; those of one volume when it is named.
    pub fn snapshot_views(&self, volume: Option<&str>) -> Vec<SnapshotView> {
        let held = self.engine.exclusive_blocks();
        self.metadata
            .volumes()
            .into_iter()
            .filter(|v| v.is_snapshot())
            .filter(|v| volume.is_none_or(|name| v.origin.as_deref() == Some(name)))
            .map(|v| SnapshotView {
                volume: v.origin.clone().unwrap_or_default(),
                held_bytes: held.get(&v.id).copied().unwrap_or(0) * torus_engine::BLOCK_SIZE as u64,
                name: v.name,
                id: v.id,
                size_bytes: v.size_bytes,
                created_unix: v.created_unix,
            })
            .collect()
    }

    /// A new member of `origin`'s family sharing all its blocks: a snapshot (`VOL@SNAP`) of
    /// a volume, or a clone of a snapshot.
    fn create_member(&self, origin: &str, name: &str) -> Result<VolumeRecord, NodeError> {
        let Some(o) = self.metadata.volume(origin) else {
            return Err(MetadataError::NotFound(origin.to_owned()).into());
        };
        let record = self.metadata.create_member(origin, name, &mut |r| {
            self.clone_everywhere(o.id, r.id)
                .map_err(|e| format!("copying the block map of {origin:?}: {e}"))
        })?;
        self.exports.insert(Volume::new(
            &record.name,
            record.id,
            record.size_bytes,
            record.is_snapshot(),
        ));
        Ok(record)
    }

    /// `engine.clone_volume(from, to)` on this node's engine only: the cluster's snapshot,
    /// clone and restore call it on every node.
    pub fn clone_local(&self, from: u32, to: u32) -> Result<(), NodeError> {
        if torus_engine::layout::family(from) != torus_engine::layout::family(to) {
            return Err(NodeError::Invalid("clone across volume families".into()));
        }
        self.engine
            .clone_volume(from, to)
            .map_err(|e| NodeError::Failed(e.to_string()))
    }

    /// Takes snapshot `name` (`VOLUME@SNAP`) of a volume, where its writes come from (see
    /// `snapshot_where_written`).
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotTaken, NodeError> {
        let volume = split_snapshot(name)?.0;
        let Some(vol) = self.metadata.volume(volume) else {
            return Err(MetadataError::NotFound(volume.to_owned()).into());
        };
        if vol.is_snapshot() {
            return Err(NodeError::Invalid(
                "a snapshot of a snapshot: clone it first".into(),
            ));
        }
        self.snapshot_where_written(vol.id, volume, name)
    }

    /// Takes the snapshot on this node, with nothing held: the caller keeps writes out.
    pub(super) fn snapshot_here(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotView, NodeError> {
        self.create_member(volume, name)?;
        self.snapshot_views(Some(volume))
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| NodeError::Failed("snapshot made but not listed".into()))
    }

    /// A new volume `name` starting as snapshot `snapshot`.
    pub fn create_clone(&self, snapshot: &str, name: &str) -> Result<VolumeView, NodeError> {
        if !snapshot.contains('@') {
            return Err(NodeError::Invalid(format!("{snapshot:?} is not a snapshot (VOLUME@SNAPSHOT): clone a snapshot, so the clone's starting point is fixed")));
        }
        if name.contains('@') {
            return Err(NodeError::Invalid(format!(
                "{name:?}: a clone is a volume; its name has no @"
            )));
        }
        let v = self.create_member(snapshot, name)?;
        Ok(VolumeView {
            name: v.name,
            id: v.id,
            size_bytes: v.size_bytes,
            used_bytes: 0,
            clients: 0,
            replicas: v.replicas,
            created_unix: v.created_unix,
            quota_bytes: None,
        })
    }

    /// Frees the blocks no volume or other snapshot maps.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), NodeError> {
        split_snapshot(name)?;
        self.delete_volume(name)
    }

    /// The volume's blocks become the snapshot's (shared); refused while it has clients.
    /// Returns the volume's name.
    pub fn restore_snapshot<'a>(&self, name: &'a str) -> Result<&'a str, NodeError> {
        let volume = split_snapshot(name)?.0;
        let (Some(snap), Some(vol)) = (self.metadata.volume(name), self.metadata.volume(volume))
        else {
            return Err(NodeError::NotFound(format!(
                "no snapshot named {name:?} (or its volume is gone)"
            )));
        };
        if torus_engine::layout::family(snap.id) != torus_engine::layout::family(vol.id) {
            return Err(NodeError::Conflict(format!(
                "{name:?} was taken of an earlier volume named {volume:?}; clone it instead"
            )));
        }
        // Taking the export away keeps clients out while the map changes under it.
        let removed = match self.exports.remove_unless_attached(volume) {
            Ok(v) => v,
            Err(clients) => {
                return Err(NodeError::Conflict(format!("volume {volume:?} has {clients} client(s) connected; disconnect them before restoring")));
            }
        };
        // On a cluster no node may be writing it: hold its writer lock for the while.
        let copied = self.holding_writer(vol.id, || self.clone_everywhere(snap.id, vol.id));
        self.put_back(removed);
        match copied? {
            Ok(()) => Ok(volume),
            Err(e) => Err(NodeError::Failed(format!(
                "restore {volume:?} from {name:?}: {e}"
            ))),
        }
    }
}
