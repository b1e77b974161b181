//! Volumes: list, create, delete, resize and quota. The metadata store is the truth (a name
//! exists when the metadata has it); the exports follow it, and the engine's blocks of a
//! deleted volume go last, so a node that stops part-way drops them as orphans at its next
//! start. On a cluster a volume is deleted only while no other node has clients of it, and
//! under its writer lock (see `cluster.rs`).

use super::{Node, NodeError};
use crate::size::human;
use serde::{Deserialize, Serialize};
use torus_frontend::exports::Volume;
use torus_net::metadata::{MetadataError, VolumeRecord};

/// A volume as `GET /v1/volumes` lists it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VolumeView {
    pub name: String,
    pub id: u32,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub clients: usize,
    pub replicas: u32,
    pub created_unix: u64,
    /// Most bytes the volume may hold on a node; writes past it answer ENOSPC.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
}

impl Node {
    pub fn volume_views(&self) -> Vec<VolumeView> {
        let stats = self.engine.stats();
        let used = Self::used_by_volume(&stats);
        self.metadata
            .volumes()
            .into_iter()
            .filter(|v| !v.is_snapshot())
            .map(|v| VolumeView {
                clients: self
                    .exports
                    .get(&v.name)
                    .map(|e| e.connections())
                    .unwrap_or(0),
                used_bytes: used.get(&v.id).copied().unwrap_or(0),
                name: v.name,
                id: v.id,
                size_bytes: v.size_bytes,
                replicas: v.replicas,
                quota_bytes: v.quota_bytes,
                created_unix: v.created_unix,
            })
            .collect()
    }

    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: Option<u32>,
    ) -> Result<VolumeView, NodeError> {
        let replicas = self.replicas_for(replicas)?;
        let v = self.metadata.create_volume(name, size_bytes, replicas)?;
        if self.exports.get(&v.name).is_none() {
            self.exports
                .insert(Volume::new(&v.name, v.id, v.size_bytes, v.is_snapshot()));
        }
        Ok(VolumeView {
            name: v.name,
            id: v.id,
            size_bytes: v.size_bytes,
            used_bytes: 0,
            clients: 0,
            replicas,
            created_unix: v.created_unix,
            quota_bytes: None,
        })
    }

    /// Deletes a volume (or, through `delete_snapshot`, a snapshot); refused while clients
    /// are connected, here or through another node.
    pub fn delete_volume(&self, name: &str) -> Result<(), NodeError> {
        let Some(vol) = self.metadata.volume(name) else {
            return Err(MetadataError::NotFound(name.to_owned()).into());
        };
        self.wait_for_other_writer(vol.id, name)?;
        let removed = match self.exports.remove_unless_attached(name) {
            Ok(v) => v,
            Err(clients) => {
                return Err(NodeError::Conflict(format!(
                    "volume {name:?} has {clients} client(s) connected; disconnect them first"
                )));
            }
        };
        // Held while the volume goes, so that no node lets a client attach meanwhile.
        let deleted = self
            .holding_writer(vol.id, || self.metadata.delete_volume(name))
            .and_then(|deleted| deleted.map_err(NodeError::from));
        let record = match deleted {
            Ok(r) => r,
            Err(e) => {
                self.put_back(removed);
                return Err(e);
            }
        };
        // The name is gone from the metadata first: if this node stops before the blocks are
        // dropped, the next start drops them as orphans.
        self.engine.drop_volume(record.id).map_err(|e| {
            NodeError::Failed(format!("volume {name:?} deleted, but freeing its blocks failed: {e} (they are freed at the next start)"))
        })
    }

    /// Sets a volume's quota in the metadata and on this node's engine (the other nodes of a
    /// cluster apply it when their volume poller sees it, within a second).
    pub fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<VolumeView, NodeError> {
        if let Some(q) = quota {
            if q == 0 || q % torus_engine::BLOCK_SIZE as u64 != 0 {
                return Err(NodeError::Invalid(format!(
                    "quota {q}: use a positive multiple of 4 KiB"
                )));
            }
        }
        if self.metadata.volume(name).is_some_and(|v| v.is_snapshot()) {
            return Err(NodeError::Invalid(format!(
                "{name:?} is a snapshot: it takes no writes"
            )));
        }
        let v = self.metadata.set_quota(name, quota)?;
        if let Err(e) = self.engine.set_quota(v.id, quota) {
            return Err(NodeError::Failed(format!(
                "apply the quota of {name:?}: {e}"
            )));
        }
        self.volume_views()
            .into_iter()
            .find(|x| x.name == name)
            .ok_or_else(|| NodeError::Failed("volume vanished".into()))
    }

    /// A new size for the volume; shrinking drops the data past the new end, so it needs
    /// `force`. New NBD connections see the new size.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        force: bool,
    ) -> Result<VolumeRecord, NodeError> {
        let Some(v) = self.metadata.volume(name) else {
            return Err(MetadataError::NotFound(name.to_owned()).into());
        };
        if v.is_snapshot() {
            return Err(NodeError::Invalid(format!("{name:?} is a snapshot: snapshots keep their size (clone it to get a volume you can resize)")));
        }
        if size_bytes < v.size_bytes && !force {
            return Err(NodeError::Conflict(format!("shrinking {name:?} from {} to {} drops the data past the new end; repeat with --force", human(v.size_bytes), human(size_bytes))));
        }
        let v = self.metadata.resize_volume(name, size_bytes)?;
        if let Some(e) = self.exports.get(name) {
            e.set_size(v.size_bytes);
        }
        Ok(v)
    }
}
