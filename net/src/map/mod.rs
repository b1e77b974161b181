//! The cluster map: which nodes exist, which are up, and for every placement group (PG) the
//! ordered slots that hold its replicas. It lives in one metadata key, is changed only by
//! compare-and-swap, and every change bumps `epoch`.
//!
//! Placement is weighted rendezvous hashing (weight = capacity; `placement`): adding or
//! removing one node of N changes the target of about 1/N of the PGs and nothing else.
//!
//! A slot holds one node and a state. `Clean` means the node holds every acknowledged write of
//! the PG's volumes that map to this slot; `Stale` means it is catching up (a node that
//! restarted, was down, or just joined): it takes new writes but is not read from. While a
//! slot moves to a new node, `prev` keeps the old clean holder, which goes on taking writes
//! and serving reads until the new one is clean.
//!
//! A volume with `r` replicas uses slots `0..r` of each PG.
//!
//! This file holds the map's data, the form it is stored in (serde, one JSON value); the
//! decisions on it are pure functions in the files beside it: `placement` (where a PG lives
//! and where a piece goes), `reconcile` (the leader's step), `slots` (clean and stale slots,
//! and the PG counts), `lost` (clean holders demoted, PGs that lost every clean holder, and
//! their revival) and `removal` (nodes drained, marked out or given up by the operator),
//! whose refusals are `MapError` (`error`).

mod error;
mod lost;
mod placement;
mod reconcile;
mod removal;
mod slots;

pub use error::MapError;
pub use placement::{min_size, score, Names, Targets};
pub use removal::GiveUp;
pub use slots::PgHealth;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PG_COUNT: u32 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Node-to-node protocol address.
    pub peer_addr: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub cores: u32,
    pub capacity_bytes: u64,
    /// Changes on every start of the process: a restarted node must catch up first.
    pub incarnation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapNode {
    pub info: NodeInfo,
    pub up: bool,
    /// Being drained by `torusctl peer remove`: gets no new PGs, leaves when it holds none.
    pub removing: bool,
    /// The epoch since which this node (this incarnation) has been up without a break: every
    /// write of a later map reached it. A catch-up whose listing is older cannot make it
    /// clean (it may have missed writes in between), and what it remembered as dirty before
    /// is void.
    #[serde(default)]
    pub up_since: u64,
    /// Marked out by the leader after being down `--down-out-after` (`removing` is set with
    /// it): its slots go to other nodes, which copy them from the clean holders, and it leaves
    /// the map. Unlike a drained node it comes back in when it returns.
    #[serde(default)]
    pub out: bool,
    /// When the leader first recorded this node down, in milliseconds since the Unix epoch
    /// by that leader's clock; 0 while it is up. A new leader counts `--down-out-after` from
    /// it instead of starting over.
    #[serde(default)]
    pub down_since_ms: u64,
    /// This incarnation was first seen while the node's previous entry was down: maps in
    /// between sent writes to neither process, so what this one remembered as dirty from
    /// before is void (`replication::DirtyEpochs`). A restart noticed while the previous
    /// entry was still up had every write sent to it.
    #[serde(default)]
    pub after_break: bool,
}

impl MapNode {
    /// For a node that is down, how long, as the map records it (`reconcile_at`).
    pub fn down_for_ms(&self, now_ms: u64) -> Option<u64> {
        (!self.up && self.down_since_ms > 0).then(|| now_ms.saturating_sub(self.down_since_ms))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SlotState {
    Clean,
    Stale,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Slot {
    pub node: String,
    pub state: SlotState,
    /// The clean holder this slot is moving away from, if it is moving.
    pub prev: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMap {
    pub epoch: u64,
    pub pg_count: u32,
    pub replicas_max: u32,
    pub nodes: BTreeMap<String, MapNode>,
    pub pgs: Vec<Vec<Slot>>,
    /// Nodes drained out by `peer remove`, with the incarnation that was drained: that
    /// process is not taken back in; the node rejoins when it is started again.
    #[serde(default)]
    pub removed: BTreeMap<String, u64>,
    /// PGs that lost their last clean holder (see `LostPg`). Without this a PG whose holders
    /// all went down at once (a power loss of the whole cluster) would stay down for good.
    #[serde(default)]
    pub last_clean: BTreeMap<u32, LostPg>,
    /// By PG, the clean holders that went down or restarted, while they hold its (now stale)
    /// slot (see `Demoted`).
    #[serde(default)]
    pub demoted: BTreeMap<u32, Vec<Demoted>>,
}

/// A clean holder the map marked stale under map `epoch` because it went down (cut off or
/// dead) or restarted; `incarnation` is the process that was clean. If that process is still
/// running when it comes back, it has every write acknowledged before `epoch` (each went to
/// it); after a restart, its disk has them if that process recorded a flush under `epoch` or
/// later (every flush records the newest map its process has seen). A restarted last clean
/// holder of a lost PG compares what each candidate covers and copies the whole PG from the
/// best one first (`replication::revival_source`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Demoted {
    pub node: String,
    pub incarnation: u64,
    pub epoch: u64,
}

/// A PG with no clean holder up: the holders that were clean when it was lost, and the epoch
/// of the map that lost it. The first of them back up is made clean again, and the others
/// catch up from it. If it is the same process (cut off, not restarted) it has every
/// acknowledged write — none can be acknowledged without it — and is clean at once. A
/// restarted one may have lost writes it had not flushed; any holder that has been up since
/// before the loss (catching up then) received every write since it came up, and remembers
/// which blocks they touched. So the restarted holder first copies those blocks from each
/// such holder (`reviving`), then is made clean (`mark_revived`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LostPg {
    /// (node, incarnation at the loss).
    pub holders: Vec<(String, u64)>,
    pub epoch: u64,
    #[serde(default)]
    pub reviving: Option<Reviving>,
}

/// A restarted last clean holder copying what the holders up since the loss wrote meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reviving {
    pub node: String,
    pub incarnation: u64,
    /// Holders up since before the loss, to copy from.
    pub from: Vec<String>,
}

impl ClusterMap {
    pub fn new(replicas_max: u32) -> ClusterMap {
        ClusterMap {
            epoch: 1,
            pg_count: PG_COUNT,
            replicas_max,
            nodes: BTreeMap::new(),
            pgs: vec![Vec::new(); PG_COUNT as usize],
            removed: BTreeMap::new(),
            last_clean: BTreeMap::new(),
            demoted: BTreeMap::new(),
        }
    }

    pub fn up(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.up)
    }
}

#[cfg(test)]
mod tests;
