//! `MapError`: why the map refuses an operator's or the leader's change to who is in it
//! (`removal.rs`: draining a node, marking one out, giving one up). Each says what is in the
//! way in the words `torusctl` and the leader's log have always used; nothing is changed
//! when one is returned.

/// A change to the map's nodes refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// `torusctl peer remove` of a node the cluster does not have.
    #[error("no node named {name:?} in the cluster")]
    NotInCluster { name: String },
    /// Marking out or giving up a node the map does not have.
    #[error("no node named {name:?} in the map")]
    NotInMap { name: String },
    /// Draining `name` would leave fewer nodes than `replicas_max` (`left` is after it).
    #[error(
        "removing {name:?} would leave {left} nodes for {replicas} replicas; add a node first"
    )]
    RemovalLeavesTooFew {
        name: String,
        left: usize,
        replicas: u32,
    },
    /// Marking out a node the map has up.
    #[error("it is up")]
    Up,
    /// Marking out a node already drained or marked out.
    #[error("it is leaving already")]
    Leaving,
    /// Marking out would leave fewer nodes than `replicas_max` (`left` is after it).
    #[error("{left} nodes would be left for {replicas} replicas; add a node")]
    MarkOutLeavesTooFew { left: usize, replicas: u32 },
    /// The node holds a slot of `pg`, which has no other clean holder up: its copy may be the
    /// only good one.
    #[error("PG {pg} has no other clean replica up")]
    OnlyCleanCopy { pg: u32 },
    /// Giving up a node that is up: it is not lost.
    #[error("{name} is up, so it is not lost (torusctl peer remove drains a node out)")]
    UpNotLost { name: String },
}
