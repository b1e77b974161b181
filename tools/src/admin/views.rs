//! The JSON bodies of the admin API. What a request sends (`CreateVolume`, `ResizeVolume`,
//! ...) and the ublk devices' view are defined here; what the volume services answer
//! (`VolumeView`, `SnapshotView`, `StatusView`) is defined beside its service in
//! `crate::node` and re-exported here, so `admin` uses `node` and never the reverse.
//! `torusctl` and `torusblk` read the answers as `torus_tools::admin::...`, with these same
//! types, so a field renamed here is renamed on both sides.

use serde::{Deserialize, Serialize};
use torus_frontend::ublk::DeviceView;

pub use crate::node::{SnapshotView, StatusView, VolumeView};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UblkView {
    pub id: u32,
    pub volume: String,
    pub device: String,
    pub queues: u16,
    pub depth: u16,
}

impl From<DeviceView> for UblkView {
    fn from(d: DeviceView) -> UblkView {
        UblkView {
            id: d.id,
            volume: d.volume,
            device: d.path,
            queues: d.queues,
            depth: d.depth,
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateSnapshot {
    pub name: String,
}

/// `POST /v1/peers/NAME/lost`: the confirmation that writes only that node had are lost.
#[derive(Serialize, Deserialize, Debug)]
pub struct GiveUpPeer {
    #[serde(default)]
    pub accept_data_loss: bool,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CloneLocal {
    pub from: u32,
    pub to: u32,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateClone {
    pub snapshot: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateUblk {
    pub volume: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SetQuota {
    /// None removes the quota.
    pub quota_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CreateVolume {
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub replicas: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ResizeVolume {
    pub size_bytes: u64,
    #[serde(default)]
    pub force: bool,
}
