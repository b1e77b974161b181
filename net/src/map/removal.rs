//! Nodes leaving the map: drained by `torusctl peer remove`, marked out by the leader after
//! `--down-out-after`, or given up by the operator (`torusctl peer lost`), whose lost PGs then
//! take the best copy left. Each refuses, saying why, what would leave too few nodes for the
//! replicas or give up the only good copy of a PG.

use super::{ClusterMap, MapError};
use serde::{Deserialize, Serialize};

/// What `ClusterMap::give_up` changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GiveUp {
    /// Lost PGs that no longer wait for the node.
    pub released: Vec<u32>,
    /// Of those, PGs left with no clean copy at all: they go on from a stale one, and lose
    /// what was written after it fell behind.
    pub from_older: Vec<u32>,
}

impl ClusterMap {
    /// Starts draining `name` (`torusctl peer remove`): its PGs move to the others, then it
    /// leaves the map. False when it is being removed already; refused, saying why, when it
    /// is unknown or when fewer nodes than `replicas_max` would be left.
    pub fn start_removing(&mut self, name: &str) -> Result<bool, MapError> {
        let remaining = self.nodes.values().filter(|n| !n.removing).count();
        match self.nodes.get_mut(name) {
            None => Err(MapError::NotInCluster {
                name: name.to_owned(),
            }),
            Some(n) if n.removing => Ok(false),
            Some(_) if remaining <= self.replicas_max as usize => {
                Err(MapError::RemovalLeavesTooFew {
                    name: name.to_owned(),
                    left: remaining - 1,
                    replicas: self.replicas_max,
                })
            }
            Some(n) => {
                n.removing = true;
                self.epoch += 1;
                Ok(true)
            }
        }
    }

    /// Marks a node that is down out (see `MapNode::out`), under a new epoch. Refused, saying
    /// why, when it is up or already leaving, when fewer nodes than `replicas_max` would be
    /// left to hold its PGs, or while a PG it holds has no other clean holder up (its copy
    /// may be the only good one: it waits for a revival or for the node).
    pub fn mark_out(&mut self, name: &str) -> Result<(), MapError> {
        let remaining = self.nodes.values().filter(|n| !n.removing).count();
        match self.nodes.get(name) {
            None => {
                return Err(MapError::NotInMap {
                    name: name.to_owned(),
                })
            }
            Some(n) if n.up => return Err(MapError::Up),
            Some(n) if n.removing => return Err(MapError::Leaving),
            Some(_) => {}
        }
        if remaining <= self.replicas_max as usize {
            return Err(MapError::MarkOutLeavesTooFew {
                left: remaining - 1,
                replicas: self.replicas_max,
            });
        }
        for pg in 0..self.pg_count {
            if self.slot_of(pg, name).is_some() && self.clean_holders(pg).is_empty() {
                return Err(MapError::OnlyCleanCopy { pg });
            }
        }
        let n = self.nodes.get_mut(name).expect("checked");
        n.removing = true;
        n.out = true;
        self.epoch += 1;
        Ok(())
    }

    /// `torusctl peer lost`: the operator gives up on `name`, a node that is down and will not
    /// come back with its data (a dead disk, a lost machine). Lost PGs stop waiting for it:
    /// its place among their last clean holders and its demotions go. A PG left without a
    /// holder to wait for takes the best copy there is instead: the holder demoted last,
    /// else the first of its slots' holders that is up (revived from its own copy, plus what
    /// the holders up since the loss wrote). Writes only `name` had are lost; that is what
    /// the operator accepts. Refused while it is up.
    pub fn give_up(&mut self, name: &str) -> Result<GiveUp, MapError> {
        match self.nodes.get(name) {
            None => {
                return Err(MapError::NotInMap {
                    name: name.to_owned(),
                })
            }
            Some(n) if n.up => {
                return Err(MapError::UpNotLost {
                    name: name.to_owned(),
                })
            }
            Some(_) => {}
        }
        let untouched = self.clone();
        let mut done = GiveUp::default();
        for (pg, list) in self.demoted.iter_mut() {
            if list.iter().any(|d| d.node == name) && self.last_clean.contains_key(pg) {
                done.released.push(*pg);
            }
            list.retain(|d| d.node != name);
        }
        self.demoted.retain(|_, l| !l.is_empty());
        let (nodes, pgs, demoted) = (&self.nodes, &self.pgs, &self.demoted);
        let up = |n: &str| nodes.get(n).is_some_and(|m| m.up);
        for (pg, lost) in self.last_clean.iter_mut() {
            if !lost.holders.iter().any(|(n, _)| n == name) {
                continue;
            }
            lost.holders.retain(|(n, _)| n != name);
            if lost.reviving.as_ref().is_some_and(|r| r.node == name) {
                lost.reviving = None;
            }
            if !done.released.contains(pg) {
                done.released.push(*pg);
            }
            if !lost.holders.is_empty() {
                continue;
            }
            let newest = demoted
                .get(pg)
                .into_iter()
                .flatten()
                .filter(|d| nodes.contains_key(&d.node))
                .max_by_key(|d| d.epoch);
            if let Some(d) = newest {
                lost.holders.push((d.node.clone(), d.incarnation));
                continue;
            }
            // No clean copy is left anywhere: a stale one (incarnation 0: no process was
            // clean with it) becomes the PG's copy.
            done.from_older.push(*pg);
            let slots = &pgs[*pg as usize];
            let first_up = slots.iter().find(|s| s.node != name && up(&s.node));
            lost.holders = match first_up {
                Some(s) => vec![(s.node.clone(), 0)],
                None => slots
                    .iter()
                    .filter(|s| s.node != name)
                    .map(|s| (s.node.clone(), 0))
                    .collect(),
            };
        }
        done.released.sort_unstable();
        // The slots are as they were: no PG is lost by this step.
        self.revive_lost_pgs(&untouched);
        self.prune_demoted();
        if *self != untouched {
            self.epoch += 1;
        }
        Ok(done)
    }
}
