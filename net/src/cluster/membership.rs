//! Membership: this node's lease and heartbeat (with the stats it publishes), the map and
//! volume pollers, installing a newer map, and an operator's changes to who is in the map
//! (`give_up_peer`, `remove_peer`).
//!
//! Invariant: this node acts on its map only while its lease is surely alive in etcd and its
//! map is current (`lease_fresh`). A node back from a partition renews its lease before it
//! fetches the map that says it is down; until then its old map would have it serve reads
//! from data that missed writes.

use super::status::NodeStats;
use super::{Cluster, ClusterError};
use crate::etcd::EtcdError;
use crate::map::{ClusterMap, GiveUp};
use crate::metadata::VolumeRecord;
use crate::replication;
use crate::wire::Status;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const MAP_POLL: Duration = Duration::from_millis(200);
const VOLUME_POLL: Duration = Duration::from_secs(1);

impl Cluster {
    /// True while this node's lease is surely alive in etcd and its map is current: `lease_ok`
    /// is when the last successful keep-alive was sent, `map_ok` when the last map fetch that
    /// succeeded was; a margin covers clock rate differences. (A node back from a partition
    /// renews its lease before it fetches the map that says it is down; until then its old
    /// map would have it serve reads from data that missed writes.)
    pub(super) fn lease_fresh(&self) -> bool {
        let limit = self.cfg.lease_ttl.mul_f64(0.8).as_nanos() as u64;
        let now = self.since_born(Instant::now());
        let fresh = |at: &AtomicU64| now.saturating_sub(at.load(Ordering::Acquire)) < limit;
        fresh(&self.lease_ok) && fresh(&self.map_ok)
    }

    pub(super) async fn refresh_volumes(&self) -> Result<(), EtcdError> {
        let list = self.kv.volumes().await?;
        let new: BTreeMap<u32, Arc<VolumeRecord>> = list
            .volumes
            .iter()
            .map(|r| (r.id, Arc::new(r.clone())))
            .collect();
        if **self.volumes.load() != new {
            self.volumes.store(Arc::new(new));
            let local = self.local.clone();
            self.host
                .blocking(Box::new(move || local.volumes_changed(&list)))
                .await;
        }
        Ok(())
    }

    pub(super) async fn volume_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(VOLUME_POLL).await;
            let _ = self.refresh_volumes().await;
        }
    }

    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        let every = self.cfg.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let sent = Instant::now();
            let renewed = matches!(self.kv.keep_alive_once(lease).await, Ok(true));
            let lease_age = self
                .since_born(Instant::now())
                .saturating_sub(self.lease_ok.load(Ordering::Acquire));
            if !renewed && lease_age >= self.cfg.lease_ttl.as_nanos() as u64 {
                self.fence_cut_off().await;
            }
            if renewed {
                self.lift_cut_off_fence();
                self.lease_ok
                    .fetch_max(self.since_born(sent), Ordering::AcqRel);
                // Still fenced: a lease taken since the fence, or a record not removed.
                self.pass_cut_off_fence().await;
            } else if let Ok(None) = self.kv.get(&format!("nodes/{}", self.me)).await {
                // etcd answers but our key is gone: the lease expired while we were cut off,
                // and the others took us out. Register again; we come back stale and catch up.
                self.host
                    .log("our lease expired; registering again (stale until caught up)");
                self.dirty_epochs.lock().lease_lost();
                if let Ok(l) = self.kv.lease_grant(self.cfg.lease_ttl).await {
                    let key = format!("nodes/{}", self.me);
                    let info = serde_json::to_vec(&self.info).expect("json");
                    if self.kv.put(&key, info, Some(l)).await.is_ok() {
                        self.lease.store(l as u64, Ordering::Release);
                        self.lease_ok
                            .fetch_max(self.since_born(Instant::now()), Ordering::AcqRel);
                        self.pass_cut_off_fence().await;
                    }
                }
            }
            let local = self.local.clone();
            let used = Arc::new(AtomicU64::new(0));
            let out = used.clone();
            self.host
                .blocking(Box::new(move || {
                    out.store(local.used_bytes(), Ordering::Relaxed)
                }))
                .await;
            let used = used.load(Ordering::Relaxed);
            let stats = NodeStats {
                used_bytes: used,
                heartbeat_unix_ms: self.host.now_ms(),
                recovery: self.recovery(),
            };
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let _ = self
                .kv
                .put(
                    &format!("stats/{}", self.me),
                    serde_json::to_vec(&stats).expect("json"),
                    Some(lease),
                )
                .await;
        }
    }

    pub(super) fn install_map(&self, map: ClusterMap) {
        let install = self.map_install.lock();
        let cur = self.map.load();
        let newer = map.epoch > cur.epoch;
        let lost = newer && replication::lost_a_node(&cur, &map);
        drop(cur);
        if newer {
            self.seen_epoch.fetch_max(map.epoch, Ordering::AcqRel);
            self.map.store(Arc::new(map));
        }
        drop(install);
        if lost {
            let host = self.host.clone();
            self.flush_local(Box::new(move |s| {
                if s != Status::Ok {
                    host.log(&format!(
                        "flush after a node left the map failed (status {})",
                        s.as_u16()
                    ));
                }
            }));
        }
        if newer {
            // A PG held here again is freed again when it moves away later: the PGs let go
            // of are otherwise forgotten only between catch-up rounds, and a PG can come here
            // and go away again while this node catches up.
            let map = self.map();
            self.let_go
                .lock()
                .retain(|&pg| !replication::holds(&map, &self.me, pg));
        }
        if newer {
            // Requests waiting on a node that is no longer up fail now and are sent again
            // under this map, instead of waiting for the link's timeout (a stopped or cut-off
            // node keeps its TCP connections open).
            let map = self.map();
            let _change = self.links_change.lock();
            let current = self.links.load_full();
            if current.keys().any(|n| !map.up(n)) {
                let (gone, kept): (BTreeMap<_, _>, BTreeMap<_, _>) = current
                    .iter()
                    .map(|(n, l)| (n.clone(), l.clone()))
                    .partition(|(n, _)| !map.up(n));
                self.links.store(Arc::new(kept));
                for link in gone.into_values().flat_map(|l| l.into_values()) {
                    link.close();
                }
            }
        }
        // Forget dirty blocks of PGs that are clean here and not being caught up, and all of
        // them when this node was down in a map since they were recorded (it missed writes:
        // a block it holds is not newer than its source's just because it was written here).
        let map = self.map();
        let recovering = self.recovering.to_set();
        let names_me = replication::names_me(&map, &self.me, self.incarnation);
        let (up_since, after_break) = map
            .nodes
            .get(&self.me)
            .map_or((0, false), |n| (n.up_since, n.after_break));
        let mut dirty = self.dirty.lock();
        if self
            .dirty_epochs
            .lock()
            .observe(names_me, up_since, after_break)
        {
            for set in dirty.values_mut() {
                set.retain(|_, epoch| *epoch >= up_since);
            }
        }
        let (me, inc) = (&self.me, self.incarnation);
        dirty.retain(|pg, _| {
            let keep = replication::keep_dirty(&map, *pg, me, inc, recovering.contains(pg));
            if !keep {
                self.dirty_pgs.remove(*pg);
            }
            keep
        });
    }

    pub(super) async fn map_loop(self: Arc<Self>) {
        loop {
            let sent = Instant::now();
            if let Ok((Some(map), _)) = self.kv.map().await {
                self.install_map(map);
                self.map_ok
                    .fetch_max(self.since_born(sent), Ordering::AcqRel);
            }
            // At the next poll, or sooner when a peer wrote under a newer map.
            tokio::select! {
                _ = tokio::time::sleep(MAP_POLL) => {}
                _ = self.map_wanted.notified() => {
                    tokio::time::sleep(super::claims::CLAIMED_MAP_FETCH_GAP).await;
                }
            }
        }
    }

    /// Gives up on a node that is down for good (`ClusterMap::give_up`). etcd's failure is
    /// said first, then the map's refusal.
    pub fn give_up_peer(&self, name: &str) -> Result<GiveUp, ClusterError> {
        let mut out = None;
        self.block_on(self.update_map(|m| {
            let epoch = m.epoch;
            let given_up = m.give_up(name);
            let changed = given_up.is_ok() && m.epoch != epoch;
            out = Some(given_up);
            changed
        }))?;
        let given_up = out.expect("a map update that succeeds has run its change");
        Ok(given_up?)
    }

    /// Starts draining a node: its PGs move to the others, then it leaves the map. The map's
    /// refusal is said first, then etcd's failure.
    pub fn remove_peer(&self, name: &str) -> Result<(), ClusterError> {
        let mut why = None;
        let r = self.block_on(self.update_map(|m| match m.start_removing(name) {
            Ok(changed) => changed,
            Err(w) => {
                why = Some(w);
                false
            }
        }));
        if let Some(w) = why {
            return Err(w.into());
        }
        r?;
        Ok(())
    }
}
