//! What a peer's write claims that this node has not seen yet: a newer map, or a newer writer
//! epoch of a volume. Neither is taken on the peer's word (`replication::admit_write` answers
//! "ask again"); the node looks in etcd instead, and the peer's retry finds it there. A newer
//! map is fetched now rather than at the next poll; a newer writer is checked against the
//! epoch the writer recorded in etcd before it wrote (`fence/VOLUME`, put by
//! `acquire_writer`) and that is adopted, whatever the peer said.

use super::Cluster;
use std::sync::Arc;
use std::time::Duration;

/// The least time between two map fetches asked for by claims (a peer sending newer epochs
/// again and again cannot make this node poll etcd faster).
pub(super) const CLAIMED_MAP_FETCH_GAP: Duration = Duration::from_millis(20);

impl Cluster {
    /// Called when a write sent under map `epoch` by writer `writer` of `volume` was refused:
    /// looks up in etcd what it claims and this node has not seen (nothing, when it claims
    /// nothing newer).
    pub(super) fn check_claims(self: &Arc<Self>, epoch: u64, volume: u32, writer: u64) {
        if epoch > self.map().epoch {
            self.map_wanted.notify_one();
        }
        if writer > self.fence.known(volume) && self.verifying.lock().insert(volume) {
            let me = self.clone();
            self.host.spawn(Box::pin(async move {
                me.verify_writer(volume).await;
                me.verifying.lock().remove(&volume);
            }));
        }
    }

    /// Adopts `volume`'s writer epoch as etcd has it recorded (the newest a writer can have
    /// written under).
    async fn verify_writer(&self, volume: u32) {
        let key = format!("fence/{volume}");
        match self.kv.get(&key).await {
            Ok(Some((v, _))) => match String::from_utf8_lossy(&v).parse::<u64>() {
                Ok(recorded) => {
                    self.fence.admit(volume, recorded);
                }
                Err(_) => self
                    .host
                    .log(&format!("etcd's {key} is not a writer epoch: {v:?}")),
            },
            Ok(None) => {}
            Err(e) => self
                .host
                .log(&format!("checking a writer epoch of volume {volume}: {e}")),
        }
    }
}
