//! `ClusterError`: what goes wrong in the cluster's own work — the writer lock, an operator's
//! change to the map, the snapshot pause, catch-up and revival. Each says what was being done
//! and carries what failed underneath (etcd, the map's refusal, a peer's status); the texts are
//! the ones torusd's log, the admin API and `torusctl` have always shown.
//!
//! The data path does not use it: a piece's outcome is a wire `Status`, which is what travels
//! between nodes and maps to the engine's `BlockError` for a frontend.

use crate::etcd::EtcdError;
use crate::map::MapError;
use crate::replication::RevivalWait;
use crate::wire::{FrameError, Status};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd failed while the map was being changed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The map refused the change (`ClusterMap::give_up`, `start_removing`).
    #[error(transparent)]
    Map(#[from] MapError),

    /// The writer lock was taken but its epoch could not be recorded for good (the lock was
    /// let go again).
    #[error("cannot record the volume's writer epoch: {0}")]
    RecordWriterEpoch(#[source] EtcdError),
    #[error("cannot take the volume's writer lock: {0}")]
    TakeWriterLock(#[source] EtcdError),
    /// Another node held the writer lock past the wait (a lease and a second).
    #[error("volume is open for writing on node {node}; a volume has one writing node at a time")]
    WriterElsewhere { node: String },
    #[error("read the writer lock: {0}")]
    ReadWriterLock(#[source] EtcdError),
    /// The snapshot pause: writes in flight were not all answered in time (writes resumed).
    #[error("writes to the volume did not drain within {limit:?}")]
    WritesDidNotDrain { limit: Duration },

    /// A revival could not read the id of `node`'s store (to find its flush record).
    #[error("reading the store id of {node}: {source}")]
    ReadStoreId { node: String, source: EtcdError },
    /// A revival could not read the flush record at `key`.
    #[error("reading {key}: {source}")]
    ReadFlushRecord { key: String, source: EtcdError },
    /// The flush record at `key` does not parse.
    #[error("{key} is not a flush record: {source}")]
    BadFlushRecord {
        key: String,
        source: serde_json::Error,
    },
    /// A revival waits for a holder that is down.
    #[error(transparent)]
    RevivalWait(#[from] RevivalWait),
    /// Catch-up could not learn the volumes before comparing blocks.
    #[error("reading the volumes: {0}")]
    ReadVolumes(#[source] EtcdError),
    /// The source `node` lists blocks of a volume this node does not know yet.
    #[error("{node} lists blocks of volume {volume}, not known here yet")]
    UnknownVolume { node: String, volume: u32 },
    /// A copy of a catch-up round failed (the first failure is logged with its reason).
    #[error("a read from the source failed")]
    SourceReadFailed,
    #[error("unmapping volume {volume} block {block} failed")]
    UnmapFailed { volume: u32, block: u64 },
    #[error("local flush failed")]
    LocalFlushFailed,

    /// The source of a copy or a listing is no longer in the map.
    #[error("source left the map")]
    SourceLeftMap,
    /// The link to the source failed before its answer.
    #[error("link dropped")]
    LinkDropped,
    /// The source answered a read with this status.
    #[error("status {}", .0.as_u16())]
    ReadStatus(Status),
    /// The source answered a read with no data, or less than asked.
    #[error("no data")]
    NoData,
    #[error("short read")]
    ShortRead,
    #[error("local write failed")]
    LocalWriteFailed,
    /// The source answered a listing with this status.
    #[error("listing failed with status {}", .0.as_u16())]
    ListingStatus(Status),
    /// The source's listing is malformed.
    #[error(transparent)]
    Listing(#[from] FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_s_status_is_shown_as_its_wire_code() {
        // Logs said "status 4" when the codes were bare numbers; they still do.
        assert_eq!(
            ClusterError::ReadStatus(Status::Retry).to_string(),
            "status 4"
        );
        assert_eq!(
            ClusterError::ListingStatus(Status::Unknown(40)).to_string(),
            "listing failed with status 40"
        );
    }

    #[test]
    fn the_map_s_refusal_is_shown_as_the_map_says_it() {
        let e = ClusterError::from(MapError::UpNotLost { name: "c".into() });
        assert_eq!(
            e.to_string(),
            "c is up, so it is not lost (torusctl peer remove drains a node out)"
        );
        let e = ClusterError::WriterElsewhere { node: "a".into() };
        assert_eq!(
            e.to_string(),
            "volume is open for writing on node a; a volume has one writing node at a time"
        );
    }
}
