//! The leader: the node that holds the `leader` key on its lease reconciles the map with the
//! live nodes every `LEADER_TICK` and, with `--down-out-after`, marks out each node down that
//! long, so its PGs get their replicas back on the other nodes. How long a node has been down
//! is counted from the time the map records (`reconcile_at`, set by whichever leader first saw
//! it down).

use super::Cluster;
use crate::map::NodeInfo;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const LEADER_TICK: Duration = Duration::from_millis(500);

impl Cluster {
    pub(super) async fn leader_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(LEADER_TICK).await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let lease = self.lease.load(Ordering::Acquire) as i64;
            let Ok((holder, _)) = self
                .kv
                .acquire("leader", self.me.clone().into_bytes(), lease)
                .await
            else {
                continue;
            };
            if holder != self.me.as_bytes() {
                continue;
            }
            let Ok(nodes) = self.kv.list("nodes/").await else {
                continue;
            };
            let live: BTreeMap<String, NodeInfo> = nodes
                .into_iter()
                .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
                .collect();
            if let Ok(Some(map)) = self
                .update_map(|m| m.reconcile_at(&live, self.host.now_ms()))
                .await
            {
                self.host.log(&format!(
                    "map epoch {}: {} nodes up, PGs {:?}",
                    map.epoch,
                    map.nodes.values().filter(|n| n.up).count(),
                    map.health()
                ));
                self.install_map(map);
            }
            if let Some(after) = self.cfg.down_out_after {
                self.mark_out_long_down(after).await;
            }
        }
    }

    /// As leader: marks out each node down for `after` or more, so its PGs get their replicas
    /// back on the other nodes. Counted from the time the map records (`reconcile_at`, set
    /// by whichever leader first saw it down, in this same loop before this call).
    async fn mark_out_long_down(&self, after: Duration) {
        let due: Vec<String> = self
            .map()
            .down_nodes(self.host.now_ms())
            .filter(|&(_, ms)| ms >= after.as_millis() as u64)
            .map(|(name, _)| name.clone())
            .collect();
        self.out_refused.lock().retain(|n| due.contains(n));
        for name in due {
            let mut why = None;
            let marked = self
                .update_map(|m| match m.mark_out(&name) {
                    Ok(()) => true,
                    Err(w) => {
                        why = Some(w);
                        false
                    }
                })
                .await;
            match (marked, why) {
                (Ok(Some(map)), _) => {
                    self.host.log(&format!(
                        "map epoch {}: node {name} down for over {after:?}, marked out; its placement groups get their replicas back on the other nodes",
                        map.epoch
                    ));
                    self.install_map(map);
                }
                (_, Some(why)) if self.out_refused.lock().insert(name.clone()) => {
                    self.host.log(&format!(
                        "node {name} down for over {after:?} but not marked out: {why}"
                    ));
                }
                _ => {}
            }
        }
    }
}
