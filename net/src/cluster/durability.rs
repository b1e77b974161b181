//! Durability: flushes across the cluster and the record of what they cover.
//!
//! A frontend's flush flushes every node that is up, so every acknowledged write is durable on
//! all of them (`flush_all`). A node's own flush flushes every core, then, if this process has
//! seen a newer map since its last recorded flush, records that epoch in etcd before answering
//! (RETRY when it cannot): a revival compares these records to find the disk with the most
//! (`replication::revival_source`). Flushes the peer layer starts when a connection closes
//! are recorded too (`Recorder`).
//!
//! Writes in flight here are counted by the map epoch they started under (`enter_inflight`,
//! `inflight.rs`).
//! Cut off from etcd past its lease, a node refuses writes under the maps it has seen
//! (`write_floor`), waits for the local copies of those already in flight, flushes, and
//! records on its own disk that the flush covers every write of those maps, for its next
//! process to publish (`fence_cut_off`, `flush_records`). The fence ends with a map at or past
//! its floor: the leader's, one the node publishes itself once its lease is alive again and
//! the leader published none (`pass_cut_off_fence`), or, when the same lease turns out
//! alive, by lifting it (`lift_cut_off_fence`).
//!
//! Invariant: a write the fence does not find in flight finds the floor (`enter_inflight`
//! counts itself in before it reads the floor, the fence sets the floor before it reads what
//! is in flight, all sequentially consistent).

use super::data_path::{REQUEST_DEADLINE, RETRY_DELAY};
use super::store::{deliver, sink};
use super::{Cluster, Host};
use crate::etcd::EtcdError;
use crate::kv::Kv;
use crate::peer::{Callback, FlushRecorder, Outgoing};
use crate::replication::{self, worse, Copies};
use crate::wire::{Entry, Op, Status};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::{BlockError, Message, Output, Piece, PieceKind, ReplyTo};

/// Processes of this store whose recorded flush is kept (`Cluster::flushed_record`): a PG lost
/// with one of them as its last clean holder waits for a revival that asks for it.
const FLUSH_RECORDS_KEPT: usize = 64;

/// The cluster as the peer layer's `FlushRecorder`, for flushes started where it is not at
/// hand (a peer's connection closing): they are recorded too (`Cluster::flush_local`). Once
/// the cluster is gone, every core is flushed unrecorded.
pub(super) struct Recorder(pub(super) Weak<Cluster>, pub(super) Arc<dyn Host>);

impl FlushRecorder for Recorder {
    fn flush_recorded(&self) -> bool {
        match self.0.upgrade() {
            Some(c) => c.flush_local(Box::new(|_| {})),
            None => flush_cores(&*self.1, Box::new(|_| {})),
        }
        true
    }
}

/// Writes in flight on a node, by the map epoch they started under.
fn with_flush(mut record: Vec<(u64, u64)>, inc: u64, epoch: u64) -> Vec<(u64, u64)> {
    let epoch = record
        .iter()
        .find(|(i, _)| *i == inc)
        .map_or(epoch, |&(_, e)| e.max(epoch));
    record.retain(|&(i, _)| i != inc);
    record.push((inc, epoch));
    let keep = record.len().saturating_sub(FLUSH_RECORDS_KEPT);
    record.drain(..keep);
    record
}

/// This store's flush records as etcd has them (under `key`), with, before this process
/// registers, the one a previous process left on its disk when it was cut off from etcd
/// (`Cluster::fence_cut_off`) published: a revival that asks what that process's disk has
/// then sees it. The file goes once etcd has it; one that cannot be read is reported and
/// left alone.
pub(super) async fn flush_records(
    kv: &dyn Kv,
    host: &dyn Host,
    key: &str,
) -> Result<Vec<(u64, u64)>, EtcdError> {
    let record: Vec<(u64, u64)> = match kv.get(key).await? {
        None => Vec::new(),
        Some((v, _)) => serde_json::from_slice(&v).map_err(|e| EtcdError::Corrupt {
            key: key.to_owned(),
            why: format!("not a list of (incarnation, map epoch): {e}"),
        })?,
    };
    let bytes = match host.read_cut_record() {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(record),
        Err(e) => {
            host.log(&format!(
                "reading {}: {e}; not published",
                host.cut_record_name()
            ));
            return Ok(record);
        }
    };
    let Ok((inc, epoch)) = serde_json::from_slice::<(u64, u64)>(&bytes) else {
        host.log(&format!(
            "{} is not a flush record (incarnation, map epoch); not published",
            host.cut_record_name()
        ));
        return Ok(record);
    };
    let record = with_flush(record, inc, epoch);
    kv.put(key, serde_json::to_vec(&record).expect("json"), None)
        .await?;
    host.log(&format!(
        "published the flush its previous process made while cut off (map {epoch})"
    ));
    let _ = host.remove_cut_record();
    Ok(record)
}

/// Flushes every core of a node; `done` gets the worst status.
pub(super) fn flush_cores(host: &dyn Host, done: Box<dyn FnOnce(Status) + Send>) {
    let cores = host.cores();
    let copies = Arc::new(Copies::new(cores, done));
    for core in 0..cores {
        let copies = copies.clone();
        let flush = Piece {
            volume: 0,
            offset: 0,
            len: 0,
            kind: PieceKind::Flush,
        };
        host.to_core(
            core,
            Message::Piece(
                flush,
                sink(move |c| {
                    if let Some((worst, done)) = copies.add(Status::of(&c.output)) {
                        done(worst);
                    }
                }),
            ),
        );
    }
}

impl Cluster {
    /// Counts a write under map `epoch` in flight here (`serve_list`, `fence_cut_off`), unless
    /// it is under the write floor (false). Under one lock with the floor's setting: a write
    /// the fence does not find in flight finds the floor.
    /// Its local copy is counted too, until `local_done`.
    pub(super) fn enter_inflight(&self, epoch: u64) -> bool {
        // Counted in, then checked against the floor; `fence_cut_off` sets the floor, then
        // looks at what is in flight. Both sequentially consistent: a write the fence does
        // not find in flight finds the floor.
        self.inflight.enter(epoch);
        if epoch < self.write_floor.load(Ordering::SeqCst) {
            self.inflight.local_done(epoch);
            self.inflight.write_done(epoch);
            return false;
        }
        true
    }

    pub(super) fn inflight_done(&self, epoch: u64) {
        self.inflight.write_done(epoch);
    }

    /// The local copy of a write under map `epoch` is done (or will not be made).
    pub(super) fn local_done(&self, epoch: u64) {
        self.inflight.local_done(epoch);
    }

    /// The map epoch of the oldest write in flight here (coordinated or applied as a replica).
    pub(super) fn oldest_in_flight(&self) -> Option<u64> {
        self.inflight.oldest()
    }

    /// Flushes every node that is up, so every acknowledged write is durable on all of them.
    pub(super) fn flush_all(self: &Arc<Self>, reply: ReplyTo) {
        let me = self.clone();
        self.host.spawn(Box::pin(async move {
            let deadline = Instant::now() + REQUEST_DEADLINE;
            loop {
                let map = me.map();
                let nodes: Vec<String> = map
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.up)
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut waits = Vec::new();
                for node in nodes {
                    let (tx, rx) = tokio::sync::oneshot::channel::<Status>();
                    if node == me.me {
                        me.flush_vouched(Box::new(move |s| {
                            let _ = tx.send(s);
                        }));
                    } else if let Some(link) = me.link(&map, &node, 0) {
                        link.send(Outgoing {
                            entry: Entry {
                                op: Op::Flush as u8,
                                epoch: map.epoch,
                                ..Entry::default()
                            },
                            data: None,
                            group: 0,
                            done: Callback::once(move |r| {
                                let _ = tx.send(r.status);
                            }),
                        });
                    }
                    waits.push(rx);
                }
                let mut worst = Status::Ok;
                for w in waits {
                    worst = worse(worst, w.await.unwrap_or(Status::Retry));
                }
                match worst {
                    Status::Ok => return deliver(&*me.host, reply, Ok(Output::Done)),
                    Status::Retry if Instant::now() < deadline => {
                        tokio::time::sleep(RETRY_DELAY * 3).await;
                    }
                    s => return deliver(&*me.host, reply, Err(BlockError::from(s))),
                }
            }
        }));
    }

    /// Flushes every core, then, if this process has seen a newer map since its last recorded
    /// flush, records that epoch in etcd before answering (RETRY when it cannot): a revival
    /// compares these records to find the disk with the most (`replication::revival_source`).
    /// The first flush after each new map pays one etcd write.
    pub(super) fn flush_local(&self, done: Box<dyn FnOnce(Status) + Send>) {
        let seen = self.seen_epoch.load(Ordering::Acquire);
        let me = self.this.get().and_then(|w| w.upgrade());
        flush_cores(
            &*self.host,
            Box::new(move |s| match me {
                Some(me) if s == Status::Ok => me.record_flush(seen, done),
                _ => done(s),
            }),
        );
    }

    /// A flush that answers for the writes the map says this node holds: `flush_local`, but
    /// RETRY from a process the map does not name yet (restarted before the leader noticed:
    /// its predecessor's unflushed writes may be lost, so its flush covers none of them).
    pub(super) fn flush_vouched(&self, done: Box<dyn FnOnce(Status) + Send>) {
        if !replication::names_me(&self.map(), &self.me, self.incarnation) {
            return done(Status::Retry);
        }
        self.flush_local(done)
    }

    fn record_flush(self: Arc<Self>, seen: u64, done: Box<dyn FnOnce(Status) + Send>) {
        if self.flushed_epoch.load(Ordering::Acquire) >= seen {
            return done(Status::Ok);
        }
        let me = self.clone();
        self.host.spawn(Box::pin(async move {
            let _one = me.record_lock.lock().await;
            if me.flushed_epoch.load(Ordering::Acquire) >= seen {
                return done(Status::Ok);
            }
            let record = with_flush(me.flushed_record.lock().clone(), me.incarnation, seen);
            let put = me
                .kv
                .put(
                    &me.flushed_key,
                    serde_json::to_vec(&record).expect("json"),
                    None,
                )
                .await;
            match put {
                Ok(()) => {
                    *me.flushed_record.lock() = record;
                    me.flushed_epoch.store(seen, Ordering::Release);
                    done(Status::Ok)
                }
                Err(e) => {
                    me.log(&format!("recording a flush at map {seen} in etcd: {e}"));
                    done(Status::Retry)
                }
            }
        }));
    }

    /// Flushes every core of this node and waits: true when all succeeded.
    pub(super) async fn flushed_here(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_local(Box::new(move |s| {
            let _ = tx.send(s);
        }));
        rx.await.unwrap_or(Status::Eio) == Status::Ok
    }

    /// Cut off from etcd past its lease, this node is being taken out of the map: no write
    /// under a map it has seen can be acknowledged with it any more, and it refuses those from
    /// now on (`write_floor`). It then flushes and records, on its own disk (etcd cannot be
    /// reached), that the flush covers every write of those maps: as a flush record, the
    /// newest epoch seen plus one. Its next process publishes it (`flush_records`), so a
    /// revival knows this disk has more than a holder that recorded a flush under the same
    /// map before these writes. Once per map seen.
    pub(super) async fn fence_cut_off(&self) {
        let seen = self.seen_epoch.load(Ordering::Acquire);
        if self.write_floor.load(Ordering::Acquire) > seen {
            return;
        }
        // See `enter_inflight`.
        self.write_floor.fetch_max(seen + 1, Ordering::SeqCst);
        let lease = self.lease.load(Ordering::Acquire);
        self.fenced_lease.store(lease, Ordering::Release);
        // Writes admitted before the floor may still be on their way to the disk.
        let deadline = Instant::now() + self.cfg.lease_ttl;
        while self.inflight.oldest_local().is_some_and(|e| e <= seen) {
            if Instant::now() >= deadline {
                self.host.log(&format!("cut off from etcd past the lease: refusing writes under map {seen} and older; local writes still in flight, so no flush is recorded on disk"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        flush_cores(
            &*self.host,
            Box::new(move |s| {
                let _ = tx.send(s);
            }),
        );
        if rx.await.unwrap_or(Status::Eio) != Status::Ok {
            self.host.log(&format!("cut off from etcd past the lease: refusing writes under map {seen} and older; the flush failed, so none is recorded on disk"));
            return;
        }
        let bytes = serde_json::to_vec(&(self.incarnation, seen + 1)).expect("json");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let host = self.host.clone();
        self.host
            .blocking(Box::new(move || {
                let _ = tx.send(host.write_cut_record(&bytes));
            }))
            .await;
        match rx.await {
            Ok(Ok(())) => self.log(&format!(
                "cut off from etcd past the lease: refusing writes under map {seen} and older; flushed, and recorded that on disk"
            )),
            Ok(Err(e)) => self.log(&format!(
                "recording a flush made while cut off in {}: {e}",
                self.host.cut_record_name()
            )),
            Err(_) => {}
        }
    }

    /// Its lease alive again while its cut-off fence stands (registered again on a new lease,
    /// or the fence's record could not be removed), this node needs a map at or past the
    /// floor to take writes. The leader publishes one when it saw the node's key gone; when
    /// it did not (the node registered again before the leader's next look; the leader
    /// stalled), etcd still has the very map the node last saw, no write was acknowledged
    /// without it under that map (every write needs every holder it names, and this node
    /// refused them), and the node moves etcd's map past the fence itself: the same map, at
    /// the floor plus one (the floor would do too: the cut-off record covers the maps below
    /// it; one more keeps every epoch the record names free of this process's writes). Only
    /// when etcd's map is the one it fenced under (one the node is down in is passed too: the
    /// leader's next map takes it back in); tried again at every heartbeat until a map at or
    /// past the floor is installed, and a newer map already in etcd is left to the map loop.
    pub(super) async fn pass_cut_off_fence(&self) {
        let floor = self.write_floor.load(Ordering::Acquire);
        if floor == 0 || self.map().epoch >= floor {
            return;
        }
        let passed = self
            .update_map(|m| {
                // Not a map etcd lost (`update_map` starts from an empty one) or one restored
                // from before the fence.
                if m.nodes.is_empty() || m.epoch + 1 != floor {
                    return false;
                }
                m.epoch = floor + 1;
                true
            })
            .await;
        match passed {
            Ok(Some(map)) => {
                self.log(&format!(
                    "lease alive again behind the cut-off fence (writes under map {} and older refused): map epoch {} published",
                    floor - 1,
                    map.epoch
                ));
                self.install_map(map);
            }
            Ok(None) => {}
            Err(e) => self.log(&format!(
                "moving the map past the cut-off fence (map {}): {e}; trying again at the next heartbeat",
                floor - 1
            )),
        }
    }

    /// The lease is still alive after all (the fence came early: the map may not change):
    /// the record of the fence goes first, then writes are taken again.
    pub(super) fn lift_cut_off_fence(&self) {
        let floor = self.write_floor.load(Ordering::Acquire);
        let same_lease =
            self.fenced_lease.load(Ordering::Acquire) == self.lease.load(Ordering::Acquire);
        if floor == 0 || floor <= self.map().epoch || !same_lease {
            return;
        }
        if let Err(e) = self.host.remove_cut_record() {
            self.log(&format!(
                "removing {}: {e}; still refusing old writes",
                self.host.cut_record_name()
            ));
            return;
        }
        self.write_floor.store(0, Ordering::Release);
        self.host
            .log("the lease outlived the cut; taking writes again");
    }
}
