//! What a node refuses of the writes it is sent: a replaced writer, and a copy coordinated
//! under an older map than one already applied for its PG. Checked on every write, on the
//! core that handles it, without a lock: each volume's writer epoch and each PG's map epoch
//! is an atomic that only grows.

use crate::counter_table::CounterTable;
use crate::wire::Status;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a node has seen of the writes it applied: the highest writer epoch per volume (a write
/// carrying a lower one comes from a writer that has been replaced, and is refused) and the
/// highest map epoch per PG (a copy coordinated under an older map than one already applied
/// here may have been overtaken by a newer write of another coordinator, and is refused).
pub struct Fence {
    /// Per volume.
    writers: CounterTable,
    /// Per PG, indexed by PG.
    pgs: Box<[AtomicU64]>,
}

impl Fence {
    pub fn new(pg_count: u32) -> Fence {
        Fence {
            writers: CounterTable::default(),
            pgs: (0..pg_count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The newest writer epoch this node knows for `volume` (0: none).
    pub fn known(&self, volume: u32) -> u64 {
        self.writers
            .with(volume, |seen| seen.load(Ordering::Acquire))
    }

    /// Whether `writer` is `volume`'s writer as far as this node knows, without adopting it:
    /// a newer one than any known is a claim to check first (in etcd, `Cluster::verify_writer`),
    /// or a peer could fence every real write with one forged epoch.
    pub fn check(&self, volume: u32, writer: u64) -> Result<(), Status> {
        let known = self.known(volume);
        match writer.cmp(&known) {
            std::cmp::Ordering::Less => Err(Status::Fenced),
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(Status::Retry),
        }
    }

    /// True when `writer` may write `volume` (and remembers it as the newest seen): for
    /// epochs this node has from etcd (its own lock, the records, a checked claim).
    pub fn admit(&self, volume: u32, writer: u64) -> bool {
        self.writers.with(volume, |seen| {
            seen.fetch_max(writer, Ordering::AcqRel) <= writer
        })
    }
}

/// What a node answers a write sent under map `epoch`: an older map than this node's, or than
/// a write of the same PG applied here (`pg`, for a copy about to be applied), means the
/// sender may have been cut off or overtaken since, so it asks again with a fresh map; a
/// replaced writer is fenced. Under one map a PG's writes have one coordinator, whose
/// connections keep their order, so these two checks order every copy a replica applies.
/// A PG this node does not have is refused as invalid.
///
/// A newer map than this node's, or a newer writer than it knows, is not taken on the
/// sender's word: the sender asks again once this node has the map from etcd, or has checked
/// the writer there (`Cluster::check_claims`). So a peer that sends epoch `u64::MAX` changes
/// nothing here.
pub fn admit_write(
    map_epoch: u64,
    epoch: u64,
    fence: &Fence,
    volume: u32,
    pg: Option<u32>,
    writer: u64,
) -> Result<(), Status> {
    let pg_seen = match pg {
        Some(pg) => match fence.pgs.get(pg as usize) {
            Some(seen) => Some(seen),
            None => return Err(Status::Einval),
        },
        None => None,
    };
    let seen = pg_seen.map_or(0, |s| s.load(Ordering::Acquire));
    if epoch < map_epoch.max(seen) {
        return Err(Status::Retry);
    }
    fence.check(volume, writer)?;
    if epoch > map_epoch {
        return Err(Status::Retry);
    }
    // A newer copy of the PG admitted meanwhile (on another thread) wins, as it would have
    // had it come first.
    if pg_seen.is_some_and(|s| s.fetch_max(epoch, Ordering::AcqRel) > epoch) {
        return Err(Status::Retry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_refuses_an_older_writer() {
        let f = Fence::new(16);
        assert!(f.admit(1, 5));
        assert!(f.admit(1, 5));
        assert!(!f.admit(1, 4));
        assert!(f.admit(2, 1), "per volume");
        assert!(f.admit(1, 6));
        assert_eq!(admit_write(3, 2, &f, 1, None, 6), Err(Status::Retry));
        assert_eq!(admit_write(3, 3, &f, 1, None, 4), Err(Status::Fenced));
        assert_eq!(admit_write(4, 4, &f, 1, Some(7), 6), Ok(()));
        // A copy of PG 7 coordinated under map 3 after one under map 4 was applied here.
        assert_eq!(admit_write(3, 3, &f, 1, Some(7), 6), Err(Status::Retry));
        assert_eq!(admit_write(3, 3, &f, 1, Some(8), 6), Ok(()), "per PG");
        assert_eq!(
            admit_write(3, 3, &f, 1, Some(16), 6),
            Err(Status::Einval),
            "no such PG"
        );
    }

    #[test]
    fn a_newer_map_or_writer_than_this_node_knows_is_not_adopted() {
        let f = Fence::new(16);
        assert!(f.admit(1, 6));
        // A forged frame: map and writer epochs far past anything real.
        assert_eq!(
            admit_write(3, u64::MAX, &f, 1, Some(7), 6),
            Err(Status::Retry)
        );
        assert_eq!(
            admit_write(3, 3, &f, 1, Some(7), u64::MAX),
            Err(Status::Retry)
        );
        assert_eq!(f.known(1), 6, "the forged writer was not adopted");
        // Real writes go on.
        assert_eq!(admit_write(3, 3, &f, 1, Some(7), 6), Ok(()));
        // A new writer, once checked in etcd and admitted, fences the old one.
        assert_eq!(admit_write(3, 3, &f, 1, Some(7), 9), Err(Status::Retry));
        assert!(f.admit(1, 9));
        assert_eq!(admit_write(3, 3, &f, 1, Some(7), 9), Ok(()));
        assert_eq!(admit_write(3, 3, &f, 1, Some(7), 6), Err(Status::Fenced));
    }
}
