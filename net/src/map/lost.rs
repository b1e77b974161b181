//! Lost PGs: the clean holders demoted when they went down or restarted (`Demoted`), the PGs
//! left with no clean holder up (`LostPg`), and bringing each back from its last clean holder,
//! which first copies what the holders up since the loss wrote (`Reviving`).

use super::{ClusterMap, Demoted, LostPg, Reviving, Slot, SlotState};

impl ClusterMap {
    /// Records `node` (incarnation `inc`) as demoted under `epoch` in every PG it is a clean
    /// holder of: a clean slot, or the previous holder of a moving one (it took every write
    /// too).
    pub(super) fn record_demotion(&mut self, node: &str, inc: u64, epoch: u64) {
        for (pg, slots) in self.pgs.iter().enumerate() {
            if slots.iter().any(|s| {
                (s.node == node && s.state == SlotState::Clean) || s.prev.as_deref() == Some(node)
            }) {
                let list = self.demoted.entry(pg as u32).or_default();
                list.retain(|d| d.node != node);
                list.push(Demoted {
                    node: node.to_owned(),
                    incarnation: inc,
                    epoch,
                });
            }
        }
    }

    /// Keeps a demotion while that node is in the map, holds no clean slot of the PG and the
    /// PG is not clean everywhere: clean again, it has nothing the others lack, and a PG clean
    /// on every slot has every write on all its holders. Replaced by another node, or dropped
    /// as the previous holder of a moving slot, it may still have writes only it kept (the
    /// clean holder that also took them may die before it flushed), so it keeps its copy of
    /// the PG (`replication::holds`) and stays in the map until then. Restarted, its disk may
    /// still have everything (`replication::revival_source`).
    pub(super) fn prune_demoted(&mut self) {
        let (nodes, pgs, lost) = (&self.nodes, &self.pgs, &self.last_clean);
        self.demoted.retain(|pg, list| {
            let Some(slots) = pgs.get(*pg as usize) else {
                return false;
            };
            let all_clean =
                !lost.contains_key(pg) && slots.iter().all(|s| s.state == SlotState::Clean);
            list.retain(|d| {
                nodes.contains_key(&d.node)
                    && !all_clean
                    && !slots
                        .iter()
                        .any(|s| s.node == d.node && s.state == SlotState::Clean)
            });
            !list.is_empty()
        });
    }

    /// Records the PGs that lost their last clean holder in this step (`before` is the map
    /// before it), and makes one of a lost PG's last clean holders clean again once it is up.
    pub(super) fn revive_lost_pgs(&mut self, before: &ClusterMap) {
        for pg in 0..self.pg_count {
            if !self.clean_holders(pg).is_empty() {
                self.last_clean.remove(&pg);
                continue;
            }
            let was = before.clean_holders(pg);
            if !was.is_empty() {
                let holders = was
                    .into_iter()
                    .map(|n| {
                        let inc = before.nodes[&n].info.incarnation;
                        (n, inc)
                    })
                    .collect();
                let lost = LostPg {
                    holders,
                    epoch: before.epoch + 1,
                    reviving: None,
                };
                self.last_clean.insert(pg, lost);
            }
            let Some(lost) = self.last_clean.get(&pg) else {
                continue;
            };
            let running = |n: &str, inc: u64| {
                self.nodes
                    .get(n)
                    .is_some_and(|m| m.up && m.info.incarnation == inc)
            };
            // Holders up since before the loss: they have every write since they came up.
            let from: Vec<String> = self.pgs[pg as usize]
                .iter()
                .flat_map(|s| std::iter::once(&s.node).chain(s.prev.as_ref()))
                .filter(|n| !lost.holders.iter().any(|(h, _)| h == *n))
                .filter(|n| {
                    self.nodes
                        .get(*n)
                        .is_some_and(|m| m.up && m.up_since < lost.epoch)
                })
                .cloned()
                .collect();
            let same = lost.holders.iter().find(|(n, inc)| running(n, *inc));
            let restarted = lost.holders.iter().find(|(n, _)| self.up(n));
            // A restarted holder copies from the others, if any may have what it lost (its
            // own demotion, recorded as it went down, names no other).
            let others_demoted = self.demoted.get(&pg).is_some_and(|l| {
                l.iter()
                    .any(|d| !lost.holders.contains(&(d.node.clone(), d.incarnation)))
            });
            let alone = from.is_empty() && !others_demoted && lost.holders.len() == 1;
            if let Some(r) = &lost.reviving {
                if running(&r.node, r.incarnation) && !alone {
                    continue; // under way
                }
            }
            let (back, reviving) = match (same, restarted) {
                (Some((n, _)), _) => (n.clone(), None),
                (None, Some((n, _))) if alone => (n.clone(), None),
                (None, Some((n, _))) => {
                    let incarnation = self.nodes[n].info.incarnation;
                    let r = Reviving {
                        node: n.clone(),
                        incarnation,
                        from,
                    };
                    (n.clone(), Some(r))
                }
                (None, None) => continue,
            };
            if let Some(r) = reviving {
                self.last_clean.get_mut(&pg).expect("listed").reviving = Some(r);
                continue;
            }
            if revive_slot(&mut self.pgs[pg as usize], &back) {
                self.last_clean.remove(&pg);
            }
        }
    }

    /// PGs this process is reviving (see `LostPg`), with the holders to copy from.
    pub fn reviving(&self, node: &str, incarnation: u64) -> Vec<(u32, Vec<String>)> {
        self.last_clean
            .iter()
            .filter_map(|(pg, l)| {
                let r = l.reviving.as_ref()?;
                (r.node == node && r.incarnation == incarnation).then(|| (*pg, r.from.clone()))
            })
            .collect()
    }

    /// The incarnation of `node` that was a last clean holder of lost `pg`.
    pub fn lost_incarnation(&self, pg: u32, node: &str) -> Option<u64> {
        let lost = self.last_clean.get(&pg)?;
        lost.holders.iter().find(|(n, _)| n == node).map(|h| h.1)
    }

    /// A reviving holder copied what the others wrote: its slot in `pgs` is clean again.
    pub fn mark_revived(&mut self, node: &str, incarnation: u64, pgs: &[u32]) -> bool {
        if !self
            .nodes
            .get(node)
            .is_some_and(|n| n.up && n.info.incarnation == incarnation)
        {
            return false;
        }
        let mut changed = false;
        for pg in pgs {
            let ours = self.last_clean.get(pg).is_some_and(|l| {
                l.reviving
                    .as_ref()
                    .is_some_and(|r| r.node == node && r.incarnation == incarnation)
            });
            if !ours {
                continue;
            }
            if revive_slot(&mut self.pgs[*pg as usize], node) {
                self.last_clean.remove(pg);
                changed = true;
            }
        }
        if changed {
            self.prune_demoted();
            self.epoch += 1;
        }
        changed
    }
}

/// Makes `node`, the last clean holder of a lost PG, its clean holder again. It may have lost
/// its slot meanwhile (it was the old holder of a move when it went down, and its restart
/// ended the move): then it takes the place of a stale holder (every holder of a lost PG is
/// stale), which the next reconcile moves again if placement wants it elsewhere.
fn revive_slot(slots: &mut [Slot], node: &str) -> bool {
    if let Some(s) = slots.iter_mut().find(|s| s.node == node) {
        s.state = SlotState::Clean;
        return true;
    }
    let Some(s) = slots.iter_mut().find(|s| s.state == SlotState::Stale) else {
        return false;
    };
    *s = Slot {
        node: node.to_owned(),
        state: SlotState::Clean,
        prev: None,
    };
    true
}
