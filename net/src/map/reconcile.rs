//! The leader's step: the live nodes (those holding a lease) against the map. Nodes that
//! joined come in stale, nodes that went down or restarted are marked stale (and recorded as
//! demoted where they were clean), lost PGs are revived, and each PG's slots move toward its
//! placement target, the old clean holder staying the source until the new one is clean.
//! Drained nodes leave once they hold nothing.

use super::{ClusterMap, MapNode, NodeInfo, Slot, SlotState};
use std::collections::BTreeMap;

impl ClusterMap {
    /// `reconcile`, then records when each node that is down was first seen down (`now_ms`)
    /// and clears it for each node that is up. Returns true when something changed.
    pub fn reconcile_at(&mut self, live: &BTreeMap<String, NodeInfo>, now_ms: u64) -> bool {
        let epoch = self.epoch;
        let changed = self.reconcile(live);
        let mut stamped = false;
        for n in self.nodes.values_mut() {
            let since = match (n.up, n.down_since_ms) {
                (true, _) => 0,
                (false, 0) => now_ms.max(1),
                (false, t) => t,
            };
            if n.down_since_ms != since {
                n.down_since_ms = since;
                stamped = true;
            }
        }
        if stamped && self.epoch == epoch {
            self.epoch += 1;
        }
        changed || stamped
    }

    /// Nodes down (not being drained) and for how long, as the map records it.
    pub fn down_nodes(&self, now_ms: u64) -> impl Iterator<Item = (&String, u64)> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.removing)
            .filter_map(move |(name, n)| Some((name, n.down_for_ms(now_ms)?)))
    }

    /// The leader's step: takes the live nodes (those holding a lease) and brings the map in
    /// line. Returns true when something changed (the caller bumps the epoch and writes it).
    pub fn reconcile(&mut self, live: &BTreeMap<String, NodeInfo>) -> bool {
        let before = self.clone();
        for (name, info) in live {
            if let Some(&inc) = self.removed.get(name) {
                if inc == info.incarnation {
                    continue; // drained and still running: stays out
                }
                self.removed.remove(name);
            }
            match self.nodes.get_mut(name) {
                None => {
                    self.nodes.insert(
                        name.clone(),
                        MapNode {
                            info: info.clone(),
                            up: true,
                            removing: false,
                            up_since: before.epoch + 1,
                            out: false,
                            down_since_ms: 0,
                            after_break: false,
                        },
                    );
                }
                Some(n) => {
                    if n.out {
                        // Back before it left the map: it takes PGs again.
                        n.out = false;
                        n.removing = false;
                    }
                    let restarted = n.info.incarnation != info.incarnation;
                    if restarted || !n.up {
                        n.up_since = before.epoch + 1;
                    }
                    if restarted {
                        n.after_break = !n.up;
                    }
                    n.info = info.clone();
                    n.up = true;
                    if restarted {
                        // Its disk may still have what the old process flushed.
                        let old = before.nodes[name].info.incarnation;
                        self.record_demotion(name, old, before.epoch + 1);
                        self.mark_stale(name);
                    }
                }
            }
        }
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(name, n)| n.up && !live.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let n = self.nodes.get_mut(&name).expect("listed");
            n.up = false;
            let inc = n.info.incarnation;
            self.record_demotion(&name, inc, before.epoch + 1);
            self.mark_stale(&name);
        }
        self.prune_demoted();
        self.revive_lost_pgs(&before);
        for pg in 0..self.pg_count {
            let targets = self.target_nodes(pg);
            // With no clean holder up, a holder that is down may have the only good copy
            // (the PG waits for it or for a revival): nobody is replaced or dropped until a
            // clean holder is up again, from which a new one would copy anyway.
            let settled = !self.clean_holders(pg).is_empty();
            let slots = &mut self.pgs[pg as usize];
            // A finished move: the new holder is clean, the old one lets go.
            for s in slots.iter_mut() {
                if s.state == SlotState::Clean {
                    s.prev = None;
                }
            }
            let mut missing: Vec<String> = targets
                .iter()
                .filter(|t| !slots.iter().any(|s| &s.node == *t))
                .cloned()
                .collect();
            missing.reverse();
            // Replace holders that are no longer targets (not while a move is under way).
            for s in slots.iter_mut() {
                if targets.contains(&s.node) || s.prev.is_some() || !settled {
                    continue;
                }
                let Some(next) = missing.pop() else { break };
                // A clean holder that is up stays the source until the new one caught up,
                // also one revived in this very step (down in `before`): it may hold the
                // only good copy.
                let old_clean =
                    s.state == SlotState::Clean && self.nodes.get(&s.node).is_some_and(|n| n.up);
                *s = Slot {
                    node: next,
                    state: SlotState::Stale,
                    prev: old_clean.then(|| s.node.clone()),
                };
            }
            // Grow to the target size (a node joined a cluster smaller than replicas_max).
            while slots.len() < targets.len() {
                let Some(next) = missing.pop() else { break };
                // The first holder of a PG has nothing anywhere to catch up from.
                let state = if slots.is_empty() {
                    SlotState::Clean
                } else {
                    SlotState::Stale
                };
                slots.push(Slot {
                    node: next,
                    state,
                    prev: None,
                });
            }
            // Shrink (fewer nodes than replicas_max): only the last slot, and only when its
            // holder is no longer a target, so slot indices (and what they hold) never shift.
            while settled
                && slots.len() > targets.len()
                && slots
                    .last()
                    .is_some_and(|s| !targets.contains(&s.node) && s.prev.is_none())
            {
                slots.pop();
            }
        }
        // Nodes being removed leave once they hold nothing (a demoted one keeps its copy).
        self.prune_demoted();
        let holding: std::collections::BTreeSet<String> = self
            .pgs
            .iter()
            .flatten()
            .flat_map(|s| std::iter::once(s.node.clone()).chain(s.prev.clone()))
            .chain(self.demoted.values().flatten().map(|d| d.node.clone()))
            .collect();
        let drained: Vec<(String, u64, bool)> = self
            .nodes
            .iter()
            .filter(|(name, n)| n.removing && !holding.contains(*name))
            .map(|(name, n)| (name.clone(), n.info.incarnation, n.out))
            .collect();
        for (name, inc, out) in drained {
            self.nodes.remove(&name);
            // A drained node stays out while that process runs; one marked out joins again
            // as a new node when it returns.
            if !out {
                self.removed.insert(name, inc);
            }
        }
        self.prune_demoted();
        let changed = *self != before;
        if changed {
            self.epoch = before.epoch + 1;
        }
        changed
    }
}
