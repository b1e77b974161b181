//! Clean and stale slots: which holders have every acknowledged write of a PG, marking a
//! holder stale when it may have missed some and clean when its catch-up finished (only for
//! the process that caught up, unbroken since its listing), and the PG counts the operator
//! sees.

use super::{ClusterMap, SlotState};
use serde::{Deserialize, Serialize};

impl ClusterMap {
    /// Clean holders of a PG that are up (the previous holder of a moving slot counts).
    pub(super) fn clean_holders(&self, pg: u32) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.pgs.get(pg as usize).into_iter().flatten() {
            let clean = [
                (s.state == SlotState::Clean).then_some(&s.node),
                s.prev.as_ref(),
            ];
            for n in clean.into_iter().flatten() {
                if self.up(n) && !out.contains(n) {
                    out.push(n.clone());
                }
            }
        }
        out
    }

    /// PGs in which `node` holds a stale slot, with the slot index.
    pub fn stale_slots(&self, node: &str) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        for (pg, slots) in self.pgs.iter().enumerate() {
            for (i, s) in slots.iter().enumerate() {
                if s.node == node && s.state == SlotState::Stale {
                    out.push((pg as u32, i));
                }
            }
        }
        out
    }

    pub(super) fn mark_stale(&mut self, node: &str) {
        for slots in &mut self.pgs {
            for s in slots.iter_mut() {
                if s.node == node {
                    s.state = SlotState::Stale;
                }
                if s.prev.as_deref() == Some(node) {
                    s.prev = None;
                }
            }
        }
    }

    /// Marks the slots of `node` clean in the given PGs (its catch-up, whose block listing
    /// was taken under map `listed_at`, finished). Only for the incarnation that did the
    /// catching up, and only if it has been up without a break since the listing: a node that
    /// restarted or was cut off since may have missed writes and must start over.
    pub fn mark_clean(
        &mut self,
        node: &str,
        incarnation: u64,
        listed_at: u64,
        pgs: &[u32],
    ) -> bool {
        let Some(n) = self.nodes.get(node) else {
            return false;
        };
        if n.info.incarnation != incarnation || !n.up || n.up_since > listed_at {
            return false;
        }
        let mut changed = false;
        for &pg in pgs {
            if let Some(slots) = self.pgs.get_mut(pg as usize) {
                for s in slots.iter_mut() {
                    if s.node == node && s.state == SlotState::Stale {
                        s.state = SlotState::Clean;
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.prune_demoted();
            self.epoch += 1;
        }
        changed
    }

    /// PG counts for the operator: (active+clean, degraded, recovering).
    pub fn health(&self) -> PgHealth {
        let mut h = PgHealth::default();
        for (pg, slots) in self.pgs.iter().enumerate() {
            let t = self.targets(pg as u32, self.replicas_max);
            let want = (self.replicas_max as usize).min(self.nodes.len()).max(1);
            let recovering = slots
                .iter()
                .any(|s| s.state == SlotState::Stale && self.up(&s.node));
            if t.primary.is_none() {
                h.down += 1;
            } else if recovering {
                h.recovering += 1;
            } else if t.clean_up < want || slots.iter().any(|s| s.prev.is_some()) {
                h.degraded += 1;
            } else {
                h.clean += 1;
            }
        }
        h
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgHealth {
    pub clean: u32,
    pub degraded: u32,
    pub recovering: u32,
    /// No clean replica up: I/O to these answers EIO.
    pub down: u32,
}
