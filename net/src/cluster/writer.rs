//! The writer lock: one writing node per volume. The lock's create revision in etcd is the
//! fencing epoch that every write from its holder carries; a write with an older one than a
//! replica has seen for the volume is refused (`replication::Fence`), and a node that restarts
//! fences every older writer from the start (`load_fences`).
//!
//! The snapshot pause: new writes to a volume from this node are held back while those in
//! flight are answered (each by every replica), the point at which a snapshot is the same on
//! every replica (`pause_writes`, then `resume_writes`).

use super::{Cluster, ClusterError};
use crate::counter_table::CounterTable;
use crate::etcd::EtcdError;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::{Piece, ReplyTo};

/// Volumes whose new writes wait (a snapshot is being taken), and the writes waiting.
#[derive(Default)]
pub(super) struct Pause {
    pub(super) paused: HashSet<u32>,
    pub(super) parked: Vec<(Piece, ReplyTo)>,
}

/// The writes each volume has in flight from this node's frontends, a counter per volume read
/// without a lock, and how many volumes are paused: while none is, a write passes without a
/// lock.
///
/// A write counts itself in, then looks at `paused`; a pause marks its volume paused, then
/// waits for the count to reach zero. Both are sequentially consistent, so either the write
/// sees the pause (and waits, parked) or the pause sees the write (and waits for it).
#[derive(Default)]
pub(super) struct WritesIn {
    pub(super) counts: CounterTable,
    pub(super) paused: AtomicUsize,
}

/// The node named by a writer lock's value (`writer_value`: "NODE LEASE").
fn holder_node(value: &[u8]) -> String {
    let v = String::from_utf8_lossy(value);
    v.split(' ').next().unwrap_or("").to_string()
}

impl Cluster {
    /// The epoch of the writer lock this node holds on `volume` (0: none).
    pub(super) fn writer_epoch(&self, volume: u32) -> u64 {
        self.writer_epochs.load().get(&volume).copied().unwrap_or(0)
    }

    /// `writer_epochs` from `writing` (called with it locked, after every change).
    fn publish_writers(&self, writing: &BTreeMap<u32, (u64, Vec<u8>)>) {
        let epochs = writing.iter().map(|(v, (e, _))| (*v, *e)).collect();
        self.writer_epochs.store(Arc::new(epochs));
    }

    /// The writer lock's value for a new session of this node: "NODE LEASE SESSION". Each
    /// session is its own, so that a lock left by an earlier session here (its release not
    /// done yet, or failed) is not taken for this one's: writes of that session still being
    /// retried must be fenced by a new epoch.
    fn writer_value(&self) -> Vec<u8> {
        let session = self.writer_sessions.fetch_add(1, Ordering::Relaxed);
        format!(
            "{} {} {session}",
            self.me,
            self.lease.load(Ordering::Acquire)
        )
        .into_bytes()
    }

    /// Takes the writer lock of a volume (one writing node per volume), waiting up to a lease
    /// for a holder that may have died. Its create revision is the fencing epoch that every
    /// write from this node carries from now on. Blocks: for torusd's threads.
    pub fn acquire_writer(&self, volume: u32) -> Result<u64, ClusterError> {
        self.block_on(self.take_writer(volume))
    }

    /// `acquire_writer`, awaited.
    pub async fn take_writer(&self, volume: u32) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + self.cfg.lease_ttl + Duration::from_secs(1);
        let key = format!("writers/{volume}");
        let mine = self.writer_value();
        loop {
            let lease = self.lease.load(Ordering::Acquire) as i64;
            match self.kv.acquire(&key, mine.clone(), lease).await {
                Ok((holder, epoch)) if holder == mine => {
                    // Recorded for good (the lock's key goes with its lease): a node that
                    // restarts fences every older writer from the start (`load_fences`).
                    let recorded = self
                        .kv
                        .put(
                            &format!("fence/{volume}"),
                            epoch.to_string().into_bytes(),
                            None,
                        )
                        .await;
                    if let Err(e) = recorded {
                        let _ = self.kv.release(&key, mine).await;
                        return Err(ClusterError::RecordWriterEpoch(e));
                    }
                    self.fence.admit(volume, epoch as u64);
                    let mut writing = self.writing.lock();
                    writing.insert(volume, (epoch as u64, mine.clone()));
                    self.publish_writers(&writing);
                    return Ok(epoch as u64);
                }
                Ok((holder, _)) if holder_node(&holder) == self.me => {
                    // Held by a session of this process that is still open: shared, as
                    // before (an operator's change while a client writes through this node).
                    let open = self.writing.lock().get(&volume).cloned();
                    if let Some((epoch, _)) = open.filter(|(_, v)| *v == holder) {
                        return Ok(epoch);
                    }
                    // An earlier session's lock here, not released yet: this session takes
                    // it anew (a new create revision, so a new epoch).
                    if let Err(e) = self.kv.release(&key, holder).await {
                        return Err(ClusterError::TakeWriterLock(e));
                    }
                }
                Ok((holder, _)) => {
                    if Instant::now() >= deadline {
                        return Err(ClusterError::WriterElsewhere {
                            node: holder_node(&holder),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(ClusterError::TakeWriterLock(e)),
            }
        }
    }

    /// Gives up the writer lock (the last connection here closed). Blocks: for torusd's
    /// threads.
    pub fn release_writer(&self, volume: u32) {
        self.block_on(self.give_up_writer(volume))
    }

    /// `release_writer`, awaited.
    pub async fn give_up_writer(&self, volume: u32) {
        let removed = {
            let mut writing = self.writing.lock();
            let removed = writing.remove(&volume);
            self.publish_writers(&writing);
            removed
        };
        let Some((_, value)) = removed else {
            return;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            self.kv.release(&format!("writers/{volume}"), value),
        )
        .await;
    }

    /// The node holding `volume`'s writer lock, if any.
    pub fn writer_holder(&self, volume: u32) -> Result<Option<String>, ClusterError> {
        let got = self
            .block_on(self.kv.get(&format!("writers/{volume}")))
            .map_err(ClusterError::ReadWriterLock)?;
        Ok(got.map(|(v, _)| holder_node(&v)))
    }

    /// A starting node's fence: the last writer epoch recorded per volume (and that of any
    /// writer lock held now), so a request of a replaced writer that arrives after a restart
    /// is refused here as on every other replica.
    pub(super) async fn load_fences(&self) -> Result<(), EtcdError> {
        let recorded = self.kv.list("fence/").await?;
        let held = self.kv.list("writers/").await?;
        let fence = &self.fence;
        for (k, v, _) in recorded {
            let epoch = String::from_utf8_lossy(&v).parse::<u64>().ok();
            if let (Ok(volume), Some(epoch)) = (k.parse::<u32>(), epoch) {
                fence.admit(volume, epoch);
            }
        }
        for (k, _, created) in held {
            if let Ok(volume) = k.parse::<u32>() {
                fence.admit(volume, created as u64);
            }
        }
        Ok(())
    }

    /// Holds back new writes to `volume` from this node and waits until those in flight are
    /// answered (each by every replica): the point at which a snapshot is the same on every
    /// replica. `resume_writes` must follow.
    pub fn pause_writes(
        self: &Arc<Self>,
        volume: u32,
        limit: Duration,
    ) -> Result<(), ClusterError> {
        {
            let mut p = self.pause.lock();
            if p.paused.insert(volume) {
                self.writes_in.paused.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = self.writes_in.counts.get(volume);
        let deadline = Instant::now() + limit;
        while count.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                self.resume_writes(volume);
                return Err(ClusterError::WritesDidNotDrain { limit });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn resume_writes(self: &Arc<Self>, volume: u32) {
        let parked: Vec<(Piece, ReplyTo)> = {
            let mut p = self.pause.lock();
            if p.paused.remove(&volume) {
                self.writes_in.paused.fetch_sub(1, Ordering::SeqCst);
            }
            let (mine, rest) = std::mem::take(&mut p.parked)
                .into_iter()
                .partition(|(piece, _)| piece.volume == volume);
            p.parked = rest;
            mine
        };
        for (piece, reply) in parked {
            self.route(piece, reply);
        }
    }
}
