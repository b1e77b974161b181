//! Placement: where a PG should live, and where one piece of it goes under a given map.
//!
//! Weighted rendezvous hashing (weight = capacity): for each PG every node gets a score from
//! hash(pg, node); the top `replicas_max` nodes are the PG's target. Adding or removing one
//! node of N changes the target of about 1/N of the PGs and nothing else. The hash is fixed
//! (FNV-1a, then mixed): it decides where data lives, so it must not change between builds.

use super::{ClusterMap, SlotState};
use smallvec::SmallVec;

/// Node names borrowed from a map, inline for the usual handful (a replicated write routes
/// without allocating).
pub type Names<'a> = SmallVec<[&'a str; 6]>;

/// Where a piece of one PG goes under one map (names borrowed from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets<'a> {
    /// The node that coordinates and serves reads: the first clean holder that is up.
    pub primary: Option<&'a str>,
    /// Every up node that must have a write before it is acknowledged (primary included).
    pub write: Names<'a>,
    /// Slots with at least one clean holder up.
    pub clean_up: usize,
}

/// Writes need this many clean replicas up: 2 of 3, 1 of 2, 1 of 1 (as Ceph's min_size).
pub fn min_size(replicas: u32) -> usize {
    (replicas as usize - replicas as usize / 2).max(1)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a, then mixed: stable across builds and platforms (it decides where data lives).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    mix(h)
}

/// Weighted rendezvous score of `node` for `pg`: weight / -ln(u), u uniform in (0, 1).
pub fn score(pg: u32, node: &str, weight: u64) -> f64 {
    let h = mix(name_hash(node) ^ (pg as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (weight.max(1) as f64) / -u.ln()
}

impl ClusterMap {
    /// The nodes a PG should live on, best first.
    pub fn target_nodes(&self, pg: u32) -> Vec<String> {
        let mut scored: Vec<(f64, &String)> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.removing)
            .map(|(name, n)| (score(pg, name, n.info.capacity_bytes >> 30), name))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        scored
            .into_iter()
            .take(self.replicas_max as usize)
            .map(|(_, n)| n.clone())
            .collect()
    }

    pub fn targets(&self, pg: u32, replicas: u32) -> Targets<'_> {
        let mut t = Targets {
            primary: None,
            write: Names::new(),
            clean_up: 0,
        };
        let Some(slots) = self.pgs.get(pg as usize) else {
            return t;
        };
        for slot in slots.iter().take(replicas as usize) {
            let mut clean = None;
            if let Some(prev) = slot.prev.as_deref() {
                if self.up(prev) {
                    clean = Some(prev);
                    if !t.write.contains(&prev) {
                        t.write.push(prev);
                    }
                }
            }
            let node = slot.node.as_str();
            if self.up(node) {
                if slot.state == SlotState::Clean && clean.is_none() {
                    clean = Some(node);
                }
                if !t.write.contains(&node) {
                    t.write.push(node);
                }
            }
            if let Some(c) = clean {
                t.clean_up += 1;
                if t.primary.is_none() {
                    t.primary = Some(c);
                }
            }
        }
        t
    }

    /// True when `node` is up and holds every acknowledged write of the PG's first `replicas`
    /// slots it sits in: a clean holder, or the previous holder of a moving slot.
    pub fn clean_holder(&self, pg: u32, replicas: u32, node: &str) -> bool {
        self.up(node)
            && self.pgs.get(pg as usize).is_some_and(|slots| {
                slots.iter().take(replicas as usize).any(|s| {
                    (s.node == node && s.state == SlotState::Clean)
                        || s.prev.as_deref() == Some(node)
                })
            })
    }

    /// The slot index a node holds in a PG (as holder or as the previous holder).
    pub fn slot_of(&self, pg: u32, node: &str) -> Option<usize> {
        self.pgs
            .get(pg as usize)?
            .iter()
            .position(|s| s.node == node || s.prev.as_deref() == Some(node))
    }
}
