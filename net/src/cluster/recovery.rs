//! Recovery: a node holding stale slots copies from each PG's primary only the blocks whose
//! checksums differ (`catch_up`, one source per round); a restarted last clean holder of lost
//! PGs copies them back from the holders that have more (`revive`); blocks this node keeps of
//! PGs that moved to other nodes are freed (`let_go_of_moved_pgs`).
//!
//! Invariant: a copy never overwrites newer data. Blocks written here by replica writes while
//! this node is not clean for their PG are remembered (`Cluster::dirty`), and catch-up leaves
//! them alone (`copy_run`, `unmap_local`). A PG that comes back to this node after it was let
//! go comes back stale and is caught up like any other, so nothing dropped is missed.

use super::{Cluster, ClusterError};
use crate::map::ClusterMap;
use crate::peer::{Callback, Outgoing};
use crate::replication::{self, Wanted};
use crate::wire::{self, Data, Entry, Op, Status};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::{AlignedBuf, Piece, PieceKind, BLOCK_SIZE};

/// Reads of a catch-up round in flight at once.
const RECOVERY_READS_IN_FLIGHT: usize = 32;

impl Cluster {
    pub(super) async fn recovery_loop(self: Arc<Self>) {
        let mut busy = false;
        let mut turn = 0;
        loop {
            if !busy {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            busy = false;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let map = self.map();
            let Some(me) = map.nodes.get(&self.me) else {
                continue;
            };
            if !me.up || me.info.incarnation != self.incarnation || !self.lease_fresh() {
                continue;
            }
            self.recovery.lock().pgs_stale = map.stale_slots(&self.me).len() as u64;
            let reviving = map.reviving(&self.me, self.incarnation);
            if !reviving.is_empty() {
                match self.clone().revive(&map, &reviving).await {
                    Ok(()) => {
                        let list: Vec<u32> = reviving.iter().map(|p| p.0).collect();
                        let (me, inc) = (self.me.clone(), self.incarnation);
                        if let Ok(Some(m)) =
                            self.update_map(|m| m.mark_revived(&me, inc, &list)).await
                        {
                            self.host.log(&format!("{} placement groups lost with every clean holder are clean here again", list.len()));
                            self.install_map(m);
                            busy = true;
                        }
                    }
                    Err(why) => {
                        let why = why.to_string();
                        let mut last = self.revival_wait.lock();
                        if *last != why {
                            self.host
                                .log(&format!("reviving lost placement groups: {why}; retrying"));
                            *last = why;
                        }
                    }
                }
                continue;
            }
            // One source (the PG's primary) per round.
            turn += 1;
            let Some((source, pgs)) = replication::recovery_round(&map, &self.me, turn) else {
                self.let_go_of_moved_pgs(&map).await;
                continue;
            };
            let listed_at = map.epoch;
            match self.clone().catch_up(&map, &source, &pgs).await {
                Ok(()) => {
                    let list: Vec<u32> = pgs.iter().map(|p| p.0).collect();
                    let inc = self.incarnation;
                    let me = self.me.clone();
                    if let Ok(Some(m)) = self
                        .update_map(|m| m.mark_clean(&me, inc, listed_at, &list))
                        .await
                    {
                        {
                            let mut r = self.recovery.lock();
                            r.pgs_done += list.len() as u64;
                            r.pgs_stale = r.pgs_stale.saturating_sub(list.len() as u64);
                        }
                        self.install_map(m);
                        busy = true;
                    }
                }
                Err(why) => self
                    .host
                    .log(&format!("catch-up from {source}: {why}; retrying")),
            }
            for (pg, _) in &pgs {
                self.recovering.remove(*pg);
            }
        }
    }

    /// A restarted last clean holder of lost PGs first copies each whole PG from the holder
    /// that surely has more than this store's disk, if any (`replication::revival_source`: by
    /// the flushes each process recorded, and the holders demoted while they ran; it waits
    /// while the best one is down), then, from each holder that stayed up since the loss, the
    /// blocks that holder wrote while catching up (see `map::LostPg`); a holder that is down
    /// now is skipped.
    async fn revive(
        self: Arc<Self>,
        map: &ClusterMap,
        pgs: &[(u32, Vec<String>)],
    ) -> Result<(), ClusterError> {
        // The flushes recorded by this store's processes and by the other candidates'.
        let mut records = HashMap::new();
        records.insert(self.me.clone(), self.flushed_record.lock().clone());
        for (pg, _) in pgs {
            let holders = map.last_clean.get(pg).into_iter().flat_map(|l| &l.holders);
            let demoted = map.demoted.get(pg).into_iter().flatten();
            for node in holders.map(|h| &h.0).chain(demoted.map(|d| &d.node)) {
                if !records.contains_key(node) {
                    let r = self.flush_record_of(node).await?;
                    records.insert(node.clone(), r);
                }
            }
        }
        let flushed = |node: &str, inc: u64| {
            records
                .get(node)
                .and_then(|r| r.iter().find(|r| r.0 == inc))
                .map_or(0, |r| r.1)
        };
        let mut whole: BTreeMap<String, Vec<(u32, usize)>> = BTreeMap::new();
        for (pg, _) in pgs {
            if let Some(source) = replication::revival_source(map, *pg, &self.me, flushed)? {
                let slot = map.slot_of(*pg, &self.me).unwrap_or(0);
                whole.entry(source).or_default().push((*pg, slot));
            }
        }
        for (source, list) in &whole {
            self.host.log(&format!(
                "copying {} lost placement groups whole from {source}, whose copy has more than this store's disk",
                list.len()
            ));
            let done = self.clone().catch_up(map, source, list).await;
            for (pg, _) in list {
                self.recovering.remove(*pg);
            }
            done?;
        }
        let mut by_source: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
        for (pg, from) in pgs {
            for source in from.iter().filter(|s| map.up(s)) {
                by_source
                    .entry(source)
                    .or_insert_with(|| vec![false; map.pg_count as usize])[*pg as usize] = true;
            }
        }
        for (source, bitmap) in by_source {
            let dirty = self.list_remote_op(map, source, &bitmap, Op::Dirty).await?;
            let blocks: Vec<(u32, u64)> = dirty.iter().map(|&(v, b, _)| (v, b)).collect();
            for (v, b, n) in replication::copy_runs(&blocks) {
                self.copy_run(map, source, v, b, n, wire::FLAG_DIRTY)
                    .await?;
            }
        }
        if !self.flushed_here().await {
            return Err(ClusterError::LocalFlushFailed);
        }
        Ok(())
    }

    /// The flushes `node`'s processes recorded (`Cluster::flushed_record`), from etcd.
    async fn flush_record_of(&self, node: &str) -> Result<Vec<(u64, u64)>, ClusterError> {
        let id = self
            .kv
            .get(&format!("ids/{node}"))
            .await
            .map_err(|source| ClusterError::ReadStoreId {
                node: node.to_owned(),
                source,
            })?;
        let Some((id, _)) = id else {
            return Ok(Vec::new());
        };
        let key = format!("flushed/{}", String::from_utf8_lossy(&id));
        match self.kv.get(&key).await {
            Err(source) => Err(ClusterError::ReadFlushRecord { key, source }),
            Ok(None) => Ok(Vec::new()),
            Ok(Some((v, _))) => serde_json::from_slice(&v)
                .map_err(|source| ClusterError::BadFlushRecord { key, source }),
        }
    }

    /// Copies into this node what it lacks of `pgs` from `source`, comparing checksums.
    async fn catch_up(
        self: Arc<Self>,
        map: &ClusterMap,
        source: &str,
        pgs: &[(u32, usize)],
    ) -> Result<(), ClusterError> {
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        for (pg, _) in pgs {
            bitmap[*pg as usize] = true;
            self.recovering.insert(*pg);
        }
        self.track_dirty(pgs.iter().map(|(pg, _)| *pg).collect())
            .await;
        // The volumes as etcd has them now: one created while this node was cut off must be
        // known here before its blocks are compared, or they would be skipped as not wanted
        // and the PG marked clean without them.
        self.refresh_volumes()
            .await
            .map_err(ClusterError::ReadVolumes)?;
        let volumes: HashMap<u32, u32> = self
            .volumes
            .load()
            .values()
            .map(|v| (v.id, v.replicas))
            .collect();
        let remote = self.list_remote(map, source, &bitmap).await?;
        if let Some(&(v, _, _)) = remote.iter().find(|(v, _, _)| !volumes.contains_key(v)) {
            return Err(ClusterError::UnknownVolume {
                node: source.to_owned(),
                volume: v,
            });
        }
        let wanted = Wanted::new(map, source, pgs, volumes);
        let local = self.list_local(&bitmap).await;
        let (fetch, unmap) = replication::catch_up_plan(&remote, &local, &wanted);
        self.recovery.lock().blocks_compared += remote.len() as u64;
        let runs = replication::copy_runs(&fetch);
        let started = Instant::now();
        let throttle =
            replication::Throttle::new(self.cfg.recovery_rate, self.recovery.lock().bytes_copied);
        let sem = Arc::new(tokio::sync::Semaphore::new(RECOVERY_READS_IN_FLIGHT));
        let failed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (v, b, n) in runs {
            if failed.load(Ordering::Acquire) {
                break;
            }
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let copied = self.recovery.lock().bytes_copied;
            if let Some(wait) = throttle.wait(copied, started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let me = self.clone();
            let failed = failed.clone();
            let source = source.to_owned();
            let map = map.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = me.copy_run(&map, &source, v, b, n, 0).await {
                    if !failed.swap(true, Ordering::AcqRel) {
                        me.log(&format!("catch-up read of volume {v} block {b}: {e}"));
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        if failed.load(Ordering::Acquire) {
            return Err(ClusterError::SourceReadFailed);
        }
        for (v, b) in unmap {
            if !self.unmap_local(v, b).await {
                return Err(ClusterError::UnmapFailed {
                    volume: v,
                    block: b,
                });
            }
        }
        if !self.flushed_here().await {
            return Err(ClusterError::LocalFlushFailed);
        }
        Ok(())
    }

    /// Copies `n` blocks from `source` (read with `flags`), leaving alone those a newer write
    /// reached here meanwhile.
    pub(super) async fn copy_run(
        &self,
        map: &ClusterMap,
        source: &str,
        volume: u32,
        block: u64,
        n: u32,
        flags: u8,
    ) -> Result<(), ClusterError> {
        let pg = self.pg_of(volume, block * BLOCK_SIZE as u64);
        let link = self
            .link(map, source, pg)
            .ok_or(ClusterError::SourceLeftMap)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        link.send(Outgoing {
            entry: Entry {
                op: Op::Read as u8,
                flags,
                volume,
                offset: block * BLOCK_SIZE as u64,
                len: n * BLOCK_SIZE as u32,
                epoch: map.epoch,
                ..Entry::default()
            },
            data: None,
            group: 0,
            done: Callback::once(move |r| {
                let _ = tx.send(r);
            }),
        });
        let r = rx.await.map_err(|_| ClusterError::LinkDropped)?;
        if r.status != Status::Ok {
            return Err(ClusterError::ReadStatus(r.status));
        }
        let d = r.data.ok_or(ClusterError::NoData)?;
        if d.len != (n as usize) * BLOCK_SIZE {
            return Err(ClusterError::ShortRead);
        }
        let mut waits = Vec::new();
        {
            let dirty = self.dirty.lock();
            let set = dirty.get(&pg);
            let spans = replication::clean_spans(n, |i| {
                set.is_some_and(|s| s.contains_key(&(volume, block + i as u64)))
            });
            for (i, j) in spans {
                waits.push(self.send_local_ok(Piece {
                    volume,
                    offset: (block + i as u64) * BLOCK_SIZE as u64,
                    len: (j - i) * BLOCK_SIZE as u32,
                    kind: PieceKind::Write {
                        data: d.buf.clone(),
                        data_offset: d.start + i as usize * BLOCK_SIZE,
                        fua: false,
                    },
                }));
            }
        }
        for w in waits {
            if !w.await.unwrap_or(false) {
                return Err(ClusterError::LocalWriteFailed);
            }
        }
        let mut rec = self.recovery.lock();
        rec.blocks_copied += n as u64;
        rec.bytes_copied += d.len as u64;
        Ok(())
    }

    pub(super) async fn list_remote(
        &self,
        map: &ClusterMap,
        source: &str,
        bitmap: &[bool],
    ) -> Result<Vec<(u32, u64, u32)>, ClusterError> {
        self.list_remote_op(map, source, bitmap, Op::List).await
    }

    /// A listing of the PGs in `bitmap` from `source`: its blocks (`Op::List`) or the blocks
    /// it wrote while catching up (`Op::Dirty`).
    async fn list_remote_op(
        &self,
        map: &ClusterMap,
        source: &str,
        bitmap: &[bool],
        op: Op,
    ) -> Result<Vec<(u32, u64, u32)>, ClusterError> {
        let link = self
            .link(map, source, 0)
            .ok_or(ClusterError::SourceLeftMap)?;
        let mut buf = AlignedBuf::zeroed(bitmap.len().div_ceil(4096) * 4096);
        for (i, &b) in bitmap.iter().enumerate() {
            buf[i] = b as u8;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        link.send(Outgoing {
            entry: Entry {
                op: op as u8,
                epoch: map.epoch,
                len: bitmap.len() as u32,
                ..Entry::default()
            },
            data: Some(Data {
                buf: Arc::new(buf),
                start: 0,
                len: bitmap.len(),
            }),
            group: 0,
            done: Callback::once(move |r| {
                let _ = tx.send(r);
            }),
        });
        let r = rx.await.map_err(|_| ClusterError::LinkDropped)?;
        if r.status != Status::Ok {
            return Err(ClusterError::ListingStatus(r.status));
        }
        let Some(d) = r.data else {
            return Ok(Vec::new());
        };
        // A listing cut mid-entry is refused like any other malformed frame: the round that
        // asked for it fails and is tried again.
        Ok(wire::decode_list(&d.buf[d.start..d.start + d.len])?)
    }

    /// Unmaps one block here (it reads as zeroes) for a catch-up or a scrub, unless a write
    /// reached it since they began: checked and sent under the dirty lock, so a write cannot
    /// slip in between and be undone. False when the engine refused.
    pub(super) async fn unmap_local(&self, volume: u32, block: u64) -> bool {
        let rx = {
            let dirty = self.dirty.lock();
            let pg = self.pg_of(volume, block * BLOCK_SIZE as u64);
            if dirty
                .get(&pg)
                .is_some_and(|d| d.contains_key(&(volume, block)))
            {
                return true;
            }
            self.send_local_ok(Piece {
                volume,
                offset: block * BLOCK_SIZE as u64,
                len: BLOCK_SIZE as u32,
                kind: PieceKind::Zero { fua: false },
            })
        };
        rx.await.unwrap_or(false)
    }

    /// Frees the blocks this node still keeps of PGs it holds no slot of under `map` (they
    /// moved to another node when one joined or left, or this node came back from being
    /// marked out with a smaller share), once no write of an older map is in flight here
    /// (later ones to such a PG are refused for their epoch). A PG that comes back to this
    /// node comes back stale and is caught up like any other, so nothing dropped is missed.
    async fn let_go_of_moved_pgs(&self, map: &ClusterMap) {
        let fresh: Vec<u32> = {
            let mut gone = self.let_go.lock();
            gone.retain(|&pg| !replication::holds(map, &self.me, pg));
            replication::let_go_candidates(map, &self.me, |pg| gone.contains(&pg))
        };
        let oldest = self.oldest_in_flight();
        if fresh.is_empty() || !replication::list_ready(self.map().epoch, map.epoch, oldest) {
            return;
        }
        let mut bitmap = vec![false; map.pg_count as usize];
        for &pg in &fresh {
            bitmap[pg as usize] = true;
        }
        let blocks: Vec<(u32, u64)> = self
            .list_local(&bitmap)
            .await
            .into_iter()
            .map(|(v, b, _)| (v, b))
            .collect();
        let mut waits = Vec::new();
        let mut kept = HashSet::new();
        let mut zeroed = 0u64;
        for (volume, first, n) in replication::copy_runs(&blocks) {
            // Under the lock a replica write to a PG held here (stale) is recorded and queued
            // with: a PG taken back since `map` (a write may already be on its way) is kept.
            let pg = self.pg_of(volume, first * BLOCK_SIZE as u64);
            let dirty = self.dirty.lock();
            let written = dirty
                .get(&pg)
                .is_some_and(|d| (first..first + n as u64).any(|b| d.contains_key(&(volume, b))));
            let taken_back = replication::keep_moved(&self.map(), &self.me, pg, written);
            if taken_back {
                kept.insert(pg);
                continue;
            }
            waits.push(self.send_local_ok(Piece {
                volume,
                offset: first * BLOCK_SIZE as u64,
                len: n * BLOCK_SIZE as u32,
                kind: PieceKind::Zero { fua: false },
            }));
            drop(dirty);
            zeroed += n as u64;
        }
        let mut freed = true;
        for w in waits {
            freed &= w.await.unwrap_or(false);
        }
        if !freed {
            return self
                .host
                .log("freeing blocks of placement groups that moved away failed; retrying");
        }
        if zeroed > 0 {
            self.host.log(&format!(
                "freed {zeroed} blocks of {} placement groups no longer held here",
                fresh.len() - kept.len()
            ));
        }
        self.let_go
            .lock()
            .extend(fresh.into_iter().filter(|pg| !kept.contains(pg)));
    }
}
