//! The cluster map: which nodes exist, which are up, and for every placement group (PG) the
//! ordered slots that hold its replicas. It lives in one metadata key, is changed only by
//! compare-and-swap, and every change bumps `epoch`.
//!
//! Placement is weighted rendezvous hashing (weight = capacity): for each PG every node gets a
//! score from hash(pg, node); the top `replicas_max` nodes are the PG's target. Adding or
//! removing one node of N changes the target of about 1/N of the PGs and nothing else.
//!
//! A slot holds one node and a state. `Clean` means the node holds every acknowledged write of
//! the PG's volumes that map to this slot; `Stale` means it is catching up (a node that
//! restarted, was down, or just joined): it takes new writes but is not read from. While a
//! slot moves to a new node, `prev` keeps the old clean holder, which goes on taking writes
//! and serving reads until the new one is clean.
//!
//! A volume with `r` replicas uses slots `0..r` of each PG.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PG_COUNT: u32 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Node-to-node protocol address.
    pub peer_addr: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub cores: u32,
    pub capacity_bytes: u64,
    /// Changes on every start of the process: a restarted node must catch up first.
    pub incarnation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapNode {
    pub info: NodeInfo,
    pub up: bool,
    /// Being drained by `torusctl peer remove`: gets no new PGs, leaves when it holds none.
    pub removing: bool,
    /// The epoch since which this node (this incarnation) has been up without a break: every
    /// write of a later map reached it. A catch-up whose listing is older cannot make it
    /// clean (it may have missed writes in between), and what it remembered as dirty before
    /// is void.
    #[serde(default)]
    pub up_since: u64,
    /// Marked out by the leader after being down `--down-out-after` (`removing` is set with
    /// it): its slots go to other nodes, which copy them from the clean holders, and it leaves
    /// the map. Unlike a drained node it comes back in when it returns.
    #[serde(default)]
    pub out: bool,
    /// When the leader first recorded this node down, in milliseconds since the Unix epoch
    /// by that leader's clock; 0 while it is up. A new leader counts `--down-out-after` from
    /// it instead of starting over.
    #[serde(default)]
    pub down_since_ms: u64,
    /// This incarnation was first seen while the node's previous entry was down: maps in
    /// between sent writes to neither process, so what this one remembered as dirty from
    /// before is void (`replication::DirtyEpochs`). A restart noticed while the previous
    /// entry was still up had every write sent to it.
    #[serde(default)]
    pub after_break: bool,
}

impl MapNode {
    /// For a node that is down, how long, as the map records it (`reconcile_at`).
    pub fn down_for_ms(&self, now_ms: u64) -> Option<u64> {
        (!self.up && self.down_since_ms > 0).then(|| now_ms.saturating_sub(self.down_since_ms))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SlotState {
    Clean,
    Stale,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Slot {
    pub node: String,
    pub state: SlotState,
    /// The clean holder this slot is moving away from, if it is moving.
    pub prev: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterMap {
    pub epoch: u64,
    pub pg_count: u32,
    pub replicas_max: u32,
    pub nodes: BTreeMap<String, MapNode>,
    pub pgs: Vec<Vec<Slot>>,
    /// Nodes drained out by `peer remove`, with the incarnation that was drained: that
    /// process is not taken back in; the node rejoins when it is started again.
    #[serde(default)]
    pub removed: BTreeMap<String, u64>,
    /// PGs that lost their last clean holder (see `LostPg`). Without this a PG whose holders
    /// all went down at once (a power loss of the whole cluster) would stay down for good.
    #[serde(default)]
    pub last_clean: BTreeMap<u32, LostPg>,
    /// By PG, the clean holders that went down or restarted, while they hold its (now stale)
    /// slot (see `Demoted`).
    #[serde(default)]
    pub demoted: BTreeMap<u32, Vec<Demoted>>,
}

/// A clean holder the map marked stale under map `epoch` because it went down (cut off or
/// dead) or restarted; `incarnation` is the process that was clean. If that process is still
/// running when it comes back, it has every write acknowledged before `epoch` (each went to
/// it); after a restart, its disk has them if that process recorded a flush under `epoch` or
/// later (every flush records the newest map its process has seen). A restarted last clean
/// holder of a lost PG compares what each candidate covers and copies the whole PG from the
/// best one first (`replication::revival_source`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Demoted {
    pub node: String,
    pub incarnation: u64,
    pub epoch: u64,
}

/// A PG with no clean holder up: the holders that were clean when it was lost, and the epoch
/// of the map that lost it. The first of them back up is made clean again, and the others
/// catch up from it. If it is the same process (cut off, not restarted) it has every
/// acknowledged write — none can be acknowledged without it — and is clean at once. A
/// restarted one may have lost writes it had not flushed; any holder that has been up since
/// before the loss (catching up then) received every write since it came up, and remembers
/// which blocks they touched. So the restarted holder first copies those blocks from each
/// such holder (`reviving`), then is made clean (`mark_revived`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LostPg {
    /// (node, incarnation at the loss).
    pub holders: Vec<(String, u64)>,
    pub epoch: u64,
    #[serde(default)]
    pub reviving: Option<Reviving>,
}

/// What `ClusterMap::give_up` changed.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GiveUp {
    /// Lost PGs that no longer wait for the node.
    pub released: Vec<u32>,
    /// Of those, PGs left with no clean copy at all: they go on from a stale one, and lose
    /// what was written after it fell behind.
    pub from_older: Vec<u32>,
}

/// A restarted last clean holder copying what the holders up since the loss wrote meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reviving {
    pub node: String,
    pub incarnation: u64,
    /// Holders up since before the loss, to copy from.
    pub from: Vec<String>,
}

/// Where a piece of one PG goes under one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// The node that coordinates and serves reads: the first clean holder that is up.
    pub primary: Option<String>,
    /// Every up node that must have a write before it is acknowledged (primary included).
    pub write: Vec<String>,
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
    pub fn new(replicas_max: u32) -> ClusterMap {
        ClusterMap {
            epoch: 1,
            pg_count: PG_COUNT,
            replicas_max,
            nodes: BTreeMap::new(),
            pgs: vec![Vec::new(); PG_COUNT as usize],
            removed: BTreeMap::new(),
            last_clean: BTreeMap::new(),
            demoted: BTreeMap::new(),
        }
    }

    /// Records `node` (incarnation `inc`) as demoted under `epoch` in every PG it is a clean
    /// holder of: a clean slot, or the previous holder of a moving one (it took every write
    /// too).
    fn record_demotion(&mut self, node: &str, inc: u64, epoch: u64) {
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
    fn prune_demoted(&mut self) {
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

    pub fn up(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.up)
    }

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

    pub fn targets(&self, pg: u32, replicas: u32) -> Targets {
        let mut t = Targets {
            primary: None,
            write: Vec::new(),
            clean_up: 0,
        };
        let Some(slots) = self.pgs.get(pg as usize) else {
            return t;
        };
        for slot in slots.iter().take(replicas as usize) {
            let mut clean = None;
            if let Some(prev) = &slot.prev {
                if self.up(prev) {
                    clean = Some(prev.clone());
                    if !t.write.contains(prev) {
                        t.write.push(prev.clone());
                    }
                }
            }
            if self.up(&slot.node) {
                if slot.state == SlotState::Clean && clean.is_none() {
                    clean = Some(slot.node.clone());
                }
                if !t.write.contains(&slot.node) {
                    t.write.push(slot.node.clone());
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

    fn mark_stale(&mut self, node: &str) {
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

    /// Starts draining `name` (`torusctl peer remove`): its PGs move to the others, then it
    /// leaves the map. False when it is being removed already; refused, saying why, when it
    /// is unknown or when fewer nodes than `replicas_max` would be left.
    pub fn start_removing(&mut self, name: &str) -> Result<bool, String> {
        let remaining = self.nodes.values().filter(|n| !n.removing).count();
        match self.nodes.get_mut(name) {
            None => Err(format!("no node named {name:?} in the cluster")),
            Some(n) if n.removing => Ok(false),
            Some(_) if remaining <= self.replicas_max as usize => Err(format!(
                "removing {name:?} would leave {} nodes for {} replicas; add a node first",
                remaining - 1,
                self.replicas_max
            )),
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
    pub fn mark_out(&mut self, name: &str) -> Result<(), String> {
        let remaining = self.nodes.values().filter(|n| !n.removing).count();
        match self.nodes.get(name) {
            None => return Err(format!("no node named {name:?} in the map")),
            Some(n) if n.up => return Err("it is up".into()),
            Some(n) if n.removing => return Err("it is leaving already".into()),
            Some(_) => {}
        }
        if remaining <= self.replicas_max as usize {
            return Err(format!(
                "{} nodes would be left for {} replicas; add a node",
                remaining - 1,
                self.replicas_max
            ));
        }
        for pg in 0..self.pg_count {
            if self.slot_of(pg, name).is_some() && self.clean_holders(pg).is_empty() {
                return Err(format!("PG {pg} has no other clean replica up"));
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
    pub fn give_up(&mut self, name: &str) -> Result<GiveUp, String> {
        match self.nodes.get(name) {
            None => return Err(format!("no node named {name:?} in the map")),
            Some(n) if n.up => {
                return Err(format!(
                    "{name} is up, so it is not lost (torusctl peer remove drains a node out)"
                ))
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

    /// Clean holders of a PG that are up (the previous holder of a moving slot counts).
    fn clean_holders(&self, pg: u32) -> Vec<String> {
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

    /// Records the PGs that lost their last clean holder in this step (`before` is the map
    /// before it), and makes one of a lost PG's last clean holders clean again once it is up.
    fn revive_lost_pgs(&mut self, before: &ClusterMap) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication;

    fn node(name: &str, inc: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            peer_addr: String::new(),
            admin_addr: String::new(),
            nbd_addr: String::new(),
            cores: 2,
            capacity_bytes: 4 << 30,
            incarnation: inc,
        }
    }

    fn live(names: &[(&str, u64)]) -> BTreeMap<String, NodeInfo> {
        names
            .iter()
            .map(|(n, i)| (n.to_string(), node(n, *i)))
            .collect()
    }

    fn all_clean(m: &mut ClusterMap) {
        let names: Vec<(String, u64)> = m
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), v.info.incarnation))
            .collect();
        for (n, inc) in names {
            let pgs: Vec<u32> = (0..m.pg_count).collect();
            m.mark_clean(&n, inc, m.epoch, &pgs);
        }
        m.reconcile(&live_of(m));
    }

    /// Nodes a, b and c (incarnation 1), every PG clean.
    fn clean_abc() -> ClusterMap {
        let mut m = ClusterMap::new(3);
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        all_clean(&mut m);
        m
    }

    fn live_of(m: &ClusterMap) -> BTreeMap<String, NodeInfo> {
        m.nodes
            .iter()
            .filter(|(_, n)| n.up)
            .map(|(k, v)| (k.clone(), v.info.clone()))
            .collect()
    }

    #[test]
    fn a_clean_holder_that_goes_down_is_recorded_until_it_is_clean_again_or_restarts() {
        let newest = |m: &ClusterMap| m.demoted.values().flatten().map(|d| d.epoch).max();
        let mut m = clean_abc();
        assert_eq!(newest(&m), None);
        m.reconcile(&live(&[("a", 1), ("b", 1)]));
        let e = m.epoch;
        assert_eq!(newest(&m), Some(e));
        assert_eq!(
            m.demoted.len(),
            PG_COUNT as usize,
            "c held a clean slot of every PG"
        );
        let d = &m.demoted[&0];
        assert_eq!(d[0].node, "c");
        assert_eq!((d[0].incarnation, d[0].epoch), (1, e));
        // Back, the same process: still recorded while it catches up.
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        assert_eq!(m.demoted.len(), PG_COUNT as usize);
        m.mark_clean("c", 1, m.epoch, &[0, 1]);
        assert!(!m.demoted.contains_key(&0) && m.demoted.contains_key(&2));
        // Restarted: its disk may still have what it had (if it flushed): kept until clean,
        // and PGs 0 and 1, where it was clean again, record the restart.
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 2)]));
        assert_eq!(m.demoted.len(), PG_COUNT as usize);
        assert_eq!(
            (m.demoted[&0][0].incarnation, m.demoted[&0][0].epoch),
            (1, m.epoch)
        );
        let all: Vec<u32> = (0..PG_COUNT).collect();
        m.mark_clean("c", 2, m.epoch, &all);
        assert!(m.demoted.is_empty(), "{:?}", m.demoted);
        assert_eq!(newest(&m), None);
    }

    #[test]
    fn a_restarted_last_clean_holder_revives_from_a_holder_demoted_before_the_loss() {
        // The shape of the replication simulation's seed 26700: c is down; a write reaches a
        // and b; a is cut off and demoted; b, the last clean holder, dies before it flushed
        // (and before it recorded a flush under the map that demoted a). a comes back, the
        // same process, after the loss, so it is not among the holders up since before it.
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("b", 1)]));
        m.reconcile(&live(&[("b", 1)]));
        let demoted_a = m.epoch;
        m.reconcile(&live(&[]));
        assert!(m.last_clean.contains_key(&0));
        m.reconcile(&live(&[("a", 1)]));
        m.reconcile(&live(&[("a", 1), ("b", 2)]));
        let r = m.reviving("b", 2);
        assert!(
            !r.is_empty(),
            "b is not clean at once: a may have what it lost"
        );
        let (pg, from) = &r[0];
        assert!(from.is_empty(), "{from:?}");
        // b's old process (incarnation 1) recorded its last flush under map `f`.
        let pg = *pg;
        let source = |m: &ClusterMap, f: u64| {
            replication::revival_source(
                m,
                pg,
                "b",
                |n, inc| {
                    if (n, inc) == ("b", 1) {
                        f
                    } else {
                        0
                    }
                },
            )
        };
        assert_eq!(source(&m, demoted_a - 1), Ok(Some("a".into())));
        // Its flush under the map that demoted a is recorded: b's disk has every write a has.
        assert_eq!(source(&m, demoted_a), Ok(None));
        assert!(replication::serves_copies(&m, "a", 1, [pg].into_iter()));
        // a restarted: its disk has them only if its process recorded a flush under the map
        // that demoted it or later.
        let mut r = m.clone();
        r.reconcile(&live(&[("a", 2), ("b", 2)]));
        let from_a = |flushed_a: u64| {
            replication::revival_source(&r, pg, "b", |n, inc| match (n, inc) {
                ("a", 1) => flushed_a,
                ("b", 1) => demoted_a - 1,
                _ => 0,
            })
        };
        assert_eq!(from_a(demoted_a - 1), Ok(None));
        assert_eq!(from_a(demoted_a), Ok(Some("a".into())));
        // a cut off again: the revival waits for it, also while it is being drained.
        m.reconcile(&live(&[("b", 2)]));
        let wait = source(&m, demoted_a - 1);
        assert!(
            wait.as_ref()
                .is_err_and(|w| w.contains("waits for a (down)")),
            "{wait:?}"
        );
        m.nodes.get_mut("a").unwrap().removing = true;
        assert_eq!(source(&m, demoted_a - 1), wait);
        // Revived: clean again, and a's record goes once a is clean too.
        m.nodes.get_mut("a").unwrap().removing = false;
        m.reconcile(&live(&[("a", 1), ("b", 2)]));
        let pgs: Vec<u32> = m.reviving("b", 2).iter().map(|p| p.0).collect();
        assert!(m.mark_revived("b", 2, &pgs));
        assert!(m.last_clean.is_empty());
        assert!(m.demoted.contains_key(&0));
        let all: Vec<u32> = (0..PG_COUNT).collect();
        assert!(m.mark_clean("a", 1, m.epoch, &all));
        assert!(m.demoted.values().flatten().all(|d| d.node == "c"));
        m.reconcile(&live(&[("a", 1), ("b", 2), ("c", 2)]));
        assert!(m.mark_clean("c", 2, m.epoch, &all));
        assert!(m.demoted.is_empty());
    }

    #[test]
    fn first_node_is_clean_and_joiners_catch_up() {
        let mut m = ClusterMap::new(3);
        assert!(m.reconcile(&live(&[("a", 1)])));
        assert_eq!(m.health().clean, PG_COUNT);
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        let h = m.health();
        assert_eq!(h.recovering, PG_COUNT, "{h:?}");
        let t = m.targets(7, 3);
        assert_eq!(t.primary.as_deref(), Some("a"));
        assert_eq!(t.write.len(), 3);
        assert_eq!(t.clean_up, 1);
        all_clean(&mut m);
        assert_eq!(m.health().clean, PG_COUNT);
    }

    #[test]
    fn a_lost_node_goes_stale_and_comes_back_through_catch_up() {
        let mut m = clean_abc();
        let e = m.epoch;
        assert!(m.reconcile(&live(&[("a", 1), ("c", 1)])));
        assert!(m.epoch > e);
        for pg in 0..PG_COUNT {
            let t = m.targets(pg, 3);
            assert_eq!(t.clean_up, 2);
            assert!(!t.write.contains(&"b".to_string()));
            assert!(t.primary.is_some());
        }
        assert_eq!(m.health().degraded, PG_COUNT);
        // b restarts: it takes writes again but is not read from until it caught up.
        m.reconcile(&live(&[("a", 1), ("b", 2), ("c", 1)]));
        for pg in 0..PG_COUNT {
            let t = m.targets(pg, 3);
            assert_eq!(t.write.len(), 3);
            assert_ne!(t.primary.as_deref(), Some("b"));
        }
        assert!(
            !m.mark_clean("b", 1, m.epoch, &[0]),
            "an old incarnation cannot mark clean"
        );
        all_clean(&mut m);
        assert_eq!(m.health().clean, PG_COUNT);
        // Every node lost: reads have nowhere to go.
        m.reconcile(&live(&[]));
        assert_eq!(m.health().down, PG_COUNT);
        assert_eq!(m.targets(3, 3).primary, None);
    }

    #[test]
    fn a_pg_whose_holders_all_went_down_comes_back_with_the_last_clean_one() {
        let mut m = clean_abc();
        // The whole cluster restarts at once: every holder was clean; the first back revives
        // each PG, from its own disk when no other holder recorded a later flush.
        m.reconcile(&live(&[("a", 2), ("b", 2), ("c", 2)]));
        assert_eq!(m.health().down, PG_COUNT, "{:?}", m.health());
        for n in ["a", "b", "c"] {
            let pgs: Vec<u32> = m.reviving(n, 2).iter().map(|p| p.0).collect();
            for &pg in &pgs {
                assert_eq!(replication::revival_source(&m, pg, n, |_, _| 5), Ok(None));
            }
            // A holder whose old process flushed later has more: copied from first.
            let later = |node: &str, _| if node == n { 5 } else { 6 };
            for &pg in &pgs {
                assert!(replication::revival_source(&m, pg, n, later)
                    .is_ok_and(|s| s.is_some_and(|s| s != n)));
            }
            m.mark_revived(n, 2, &pgs);
        }
        assert_eq!(m.health().down, 0, "{:?}", m.health());
        for pg in 0..PG_COUNT {
            let t = m.targets(pg, 3);
            assert_eq!(
                t.clean_up, 1,
                "one holder clean, the others catch up from it"
            );
        }
        assert!(m.last_clean.is_empty());
        all_clean(&mut m);
        // c restarts (catching up from a and b, it takes every new write), then a and b
        // restart: they may have lost writes c holds. The PG stays down rather than serve
        // without them.
        m.reconcile(&live(&[("a", 2), ("b", 2), ("c", 3)]));
        m.reconcile(&live(&[("a", 3), ("b", 3), ("c", 3)]));
        assert_eq!(m.health().down, PG_COUNT, "{:?}", m.health());
        // So one of them revives each PG: it first copies what c wrote meanwhile.
        let r = m.reviving("a", 3);
        let r2 = m.reviving("b", 3);
        assert_eq!(r.len() + r2.len(), PG_COUNT as usize);
        assert!(r
            .iter()
            .chain(&r2)
            .all(|(_, from)| from == &vec!["c".to_string()]));
        assert!(
            !m.mark_revived("a", 2, &[r[0].0]),
            "only the reviving process"
        );
        let pgs: Vec<u32> = r.iter().map(|p| p.0).collect();
        assert!(m.mark_revived("a", 3, &pgs));
        let pgs: Vec<u32> = r2.iter().map(|p| p.0).collect();
        assert!(m.mark_revived("b", 3, &pgs));
        assert_eq!(m.health().down, 0);
        all_clean(&mut m);
        // A node cut off (not restarted) comes back: it has every acknowledged write.
        let mut m = clean_abc();
        m.reconcile(&live(&[("c", 1)]));
        assert_eq!(m.health().down, 0);
        m.reconcile(&live(&[]));
        assert_eq!(m.health().down, PG_COUNT);
        m.reconcile(&live(&[("a", 1), ("c", 1)]));
        assert_eq!(m.health().down, 0, "c was cut off, not restarted");
        for pg in 0..PG_COUNT {
            assert_eq!(m.targets(pg, 3).primary.as_deref(), Some("c"));
        }
        let mut m = clean_abc();
        // b goes first and misses writes; then a and c go together. b alone must not serve.
        m.reconcile(&live(&[("a", 1), ("c", 1)]));
        m.reconcile(&live(&[]));
        assert_eq!(m.health().down, PG_COUNT);
        m.reconcile(&live(&[("b", 3)]));
        assert_eq!(
            m.health().down,
            PG_COUNT,
            "b missed writes: it is not made clean"
        );
        m.reconcile(&live(&[("b", 3), ("c", 3)]));
        // c restarted and may have lost writes it had not flushed; a, cut off at the same
        // time, may still have them (`Demoted`): the revival waits for a.
        assert_eq!(m.health().down, PG_COUNT);
        let wait = replication::revival_source(&m, 0, "c", |_, _| 0);
        assert!(
            wait.as_ref().is_err_and(|w| w.contains("waits for a")),
            "{wait:?}"
        );
        // a restarted too, before it recorded a flush: c's copy is the best there is.
        m.reconcile(&live(&[("a", 4), ("b", 3), ("c", 3)]));
        assert_eq!(replication::revival_source(&m, 0, "c", |_, _| 0), Ok(None));
        let pgs: Vec<u32> = m.reviving("c", 3).iter().map(|p| p.0).collect();
        assert_eq!(pgs.len(), PG_COUNT as usize);
        assert!(m.mark_revived("c", 3, &pgs));
        assert_eq!(m.health().down, 0);
        for pg in 0..PG_COUNT {
            assert_eq!(m.targets(pg, 3).primary.as_deref(), Some("c"));
        }
        assert!(m.last_clean.is_empty());
    }

    #[test]
    fn a_last_clean_holder_that_is_no_longer_a_target_comes_back_as_the_source() {
        // Four nodes; PG p is moving off d (d is the previous holder, clean) while a, b, c
        // hold stale slots. Found by the replication simulation (seed 24917).
        let mut m = ClusterMap::new(3);
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        all_clean(&mut m);
        let p = (0..PG_COUNT)
            .find(|&pg| m.slot_of(pg, "d").is_none())
            .expect("a PG without d");
        for s in m.pgs[p as usize].iter_mut() {
            s.state = SlotState::Stale;
        }
        m.pgs[p as usize][0].prev = Some("d".into());
        // d goes down (its copy is the only good one), then a, b and c restart.
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        assert!(m.last_clean.contains_key(&p));
        m.reconcile(&live(&[("a", 2), ("b", 2), ("c", 2)]));
        // d restarts: with nobody up since before the loss it is the best copy there is.
        m.reconcile(&live(&[("a", 2), ("b", 2), ("c", 2), ("d", 2)]));
        let t = m.targets(p, 3);
        assert_eq!(
            t.clean_up, 1,
            "d must stay the PG's clean holder until the others copied from it: {:?}",
            m.pgs[p as usize]
        );
        assert_eq!(t.primary.as_deref(), Some("d"));
        assert!(m.pgs[p as usize]
            .iter()
            .any(|s| s.prev.as_deref() == Some("d")));
        // The PGs d held a clean slot of are revived by one of their restarted holders, who
        // first asks whether d's disk has more (`Demoted`).
        assert!(m.last_clean.values().all(|l| l.reviving.is_some()));
    }

    #[test]
    fn the_old_holder_of_a_moving_slot_that_goes_down_keeps_its_copy_for_a_revival() {
        // The shape of the replication simulation's seed 59333: a PG is moving off x (x is
        // the previous holder, clean, and takes every write); x is cut off, then both clean
        // holders die before they flushed. x may have the only copy of the last writes.
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        let (p, x) = (0..PG_COUNT)
            .find_map(|pg| {
                let prev = m.pgs[pg as usize].iter().find_map(|s| s.prev.clone())?;
                Some((pg, prev))
            })
            .expect("a moving slot");
        let others: Vec<String> = m.pgs[p as usize]
            .iter()
            .filter(|s| s.state == SlotState::Clean)
            .map(|s| s.node.clone())
            .collect();
        assert_eq!(others.len(), 2, "{:?}", m.pgs[p as usize]);
        let up = |names: &[&str], inc: u64| -> BTreeMap<String, NodeInfo> {
            ["a", "b", "c", "d"]
                .iter()
                .filter(|n| names.contains(n))
                .map(|n| {
                    let i = if others.iter().any(|o| o == n) {
                        inc
                    } else {
                        1
                    };
                    (n.to_string(), node(n, i))
                })
                .collect()
        };
        let all_but_x: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|n| *n != x)
            .collect();
        m.reconcile(&up(&all_but_x, 1));
        let demoted_x = m.epoch;
        assert!(m.pgs[p as usize].iter().all(|s| s.prev.is_none()));
        assert_eq!(
            m.demoted[&p],
            vec![Demoted {
                node: x.clone(),
                incarnation: 1,
                epoch: demoted_x
            }]
        );
        assert!(
            replication::holds(&m, &x, p),
            "x must not free its copy of the PG"
        );
        // Both clean holders restart, having lost what they had not flushed.
        let alone: Vec<&str> = all_but_x
            .iter()
            .copied()
            .filter(|n| !others.iter().any(|o| o == n))
            .collect();
        m.reconcile(&up(&alone, 1));
        m.reconcile(&up(&all_but_x, 2));
        assert!(m.last_clean.contains_key(&p));
        let me = m.last_clean[&p].holders[0].0.clone();
        let before = |_: &str, _: u64| demoted_x - 1;
        let wait = replication::revival_source(&m, p, &me, before);
        assert!(
            wait.as_ref()
                .is_err_and(|w| w.contains(&format!("waits for {x} (down)"))),
            "{wait:?}"
        );
        // x is back, the same process: the PG is copied from it first.
        m.reconcile(&up(&["a", "b", "c", "d"], 2));
        assert_eq!(
            replication::revival_source(&m, p, &me, before),
            Ok(Some(x.clone()))
        );
        // Once the PG is clean on every slot, x's record and its copy go.
        for _ in 0..4 {
            all_clean(&mut m);
            let pgs: Vec<u32> = m.reviving(&me, 2).iter().map(|r| r.0).collect();
            m.mark_revived(&me, 2, &pgs);
        }
        assert_eq!(m.health().clean, PG_COUNT, "{:?}", m.health());
        assert!(m.demoted.is_empty(), "{:?}", m.demoted);
        assert!(m.slot_of(p, &x).is_some() || !replication::holds(&m, &x, p));
    }

    #[test]
    fn a_lost_pg_stops_waiting_for_a_node_given_up_and_takes_the_best_copy_left() {
        // a and b hold every PG; c joins and is still catching up when b, then a, die.
        let mut m = ClusterMap::new(3);
        m.reconcile(&live(&[("a", 1), ("b", 1)]));
        all_clean(&mut m);
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        assert_eq!(m.stale_slots("c").len(), PG_COUNT as usize);
        m.reconcile(&live(&[("a", 1), ("c", 1)]));
        m.reconcile(&live(&[("c", 1)]));
        assert_eq!(m.health().down, PG_COUNT, "a had the only clean copy");
        assert_eq!(
            m.give_up("c"),
            Err("c is up, so it is not lost (torusctl peer remove drains a node out)".into())
        );
        assert_eq!(m.give_up("e"), Err("no node named \"e\" in the map".into()));
        // a will not come back: the PGs wait for b, demoted before the loss, instead.
        let epoch = m.epoch;
        let all: Vec<u32> = (0..PG_COUNT).collect();
        let g = m.give_up("a").expect("a is down");
        assert_eq!((g.released, g.from_older), (all.clone(), vec![]));
        assert_eq!(m.epoch, epoch + 1);
        assert_eq!(m.health().down, PG_COUNT);
        assert!(m
            .last_clean
            .values()
            .all(|l| l.holders == [("b".into(), 1)]));
        assert!(replication::holds(&m, "c", 0));
        // Nor will b: no clean copy is left, c's goes on (what only a and b had is lost).
        let g = m.give_up("b").expect("b is down");
        assert_eq!((g.released, g.from_older), (all.clone(), all));
        assert_eq!(m.health().down, 0, "{:?}", m.pgs[0]);
        assert!(m.last_clean.is_empty() && m.demoted.is_empty());
        for pg in 0..PG_COUNT {
            assert_eq!(m.targets(pg, 3).primary.as_deref(), Some("c"));
        }
        // Nothing waits any more: giving up again changes nothing.
        let epoch = m.epoch;
        assert_eq!(m.give_up("a"), Ok(GiveUp::default()));
        assert_eq!(m.epoch, epoch);
    }

    #[test]
    fn giving_up_on_a_demoted_holder_ends_a_revival_s_wait_for_it() {
        // c is cut off (demoted); b, the last clean holder, restarts having lost writes c may
        // have: b's revival waits for c until the operator gives c up.
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("b", 1)]));
        m.reconcile(&live(&[("b", 1)]));
        m.reconcile(&live(&[]));
        m.reconcile(&live(&[("b", 2)]));
        assert!(!m.reviving("b", 2).is_empty());
        let wait = replication::revival_source(&m, 0, "b", |_, _| 0);
        assert!(wait.is_err(), "{wait:?}");
        m.give_up("c").expect("c is down");
        m.give_up("a").expect("a is down");
        assert_eq!(replication::revival_source(&m, 0, "b", |_, _| 0), Ok(None));
        let pgs: Vec<u32> = m.reviving("b", 2).iter().map(|r| r.0).collect();
        assert!(
            pgs.is_empty() || m.mark_revived("b", 2, &pgs),
            "{:?}",
            m.last_clean
        );
        assert_eq!(m.health().down, 0);
    }

    #[test]
    fn a_catch_up_listed_before_a_break_cannot_mark_clean() {
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("c", 1)]));
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        let listed = m.epoch; // b lists its source under this map
                              // b is cut off (its lease expires) and comes back with the same process.
        m.reconcile(&live(&[("a", 1), ("c", 1)]));
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1)]));
        assert!(m.nodes["b"].up_since > listed);
        assert!(
            !m.mark_clean("b", 1, listed, &[0, 1]),
            "it missed writes meanwhile"
        );
        assert!(m.mark_clean("b", 1, m.epoch, &[0, 1]));
    }

    #[test]
    fn a_restart_within_the_lease_still_forces_catch_up() {
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("b", 9), ("c", 1)]));
        assert_eq!(m.stale_slots("b").len(), PG_COUNT as usize);
    }

    #[test]
    fn a_fourth_node_moves_about_a_quarter_and_keeps_the_old_holder_until_clean() {
        let mut m = clean_abc();
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        let moved = m.stale_slots("d").len();
        // 3 of 4 nodes hold each PG: d enters 3/4 of the PGs, one slot each, i.e. a quarter
        // of all replicas move.
        let share = moved as f64 / (PG_COUNT as f64 * 3.0);
        assert!((0.18..0.32).contains(&share), "moved {moved} ({share})");
        for (pg, _) in m.stale_slots("d") {
            let t = m.targets(pg, 3);
            assert_eq!(
                t.clean_up, 3,
                "the old holder still counts while d catches up"
            );
            assert_eq!(t.write.len(), 4);
        }
        all_clean(&mut m);
        assert_eq!(m.health().clean, PG_COUNT);
        for slots in &m.pgs {
            assert_eq!(slots.len(), 3);
            assert!(slots.iter().all(|s| s.prev.is_none()));
        }
    }

    #[test]
    fn a_drained_node_stays_out_until_it_restarts() {
        let mut m = ClusterMap::new(3);
        let four = live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        m.reconcile(&four);
        all_clean(&mut m);
        m.nodes.get_mut("d").unwrap().removing = true;
        m.reconcile(&four);
        // The slots d held move to the others; d keeps serving them until they are clean.
        assert!(m
            .pgs
            .iter()
            .flatten()
            .any(|s| s.prev.as_deref() == Some("d")));
        all_clean(&mut m);
        m.reconcile(&four);
        assert!(!m.nodes.contains_key("d"), "drained");
        assert!(m
            .pgs
            .iter()
            .flatten()
            .all(|s| s.node != "d" && s.prev.is_none()));
        m.reconcile(&four);
        assert!(
            !m.nodes.contains_key("d"),
            "the drained process is not taken back"
        );
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 2)]));
        assert!(m.nodes.contains_key("d"), "started again, it rejoins");
    }

    #[test]
    fn the_time_a_node_went_down_is_kept_in_the_map_until_it_is_up_again() {
        let mut m = ClusterMap::new(3);
        let abcd = live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        assert!(m.reconcile_at(&abcd, 1_000));
        assert!(m.nodes.values().all(|n| n.down_since_ms == 0));
        let abc = live(&[("a", 1), ("b", 1), ("c", 1)]);
        let epoch = m.epoch;
        assert!(m.reconcile_at(&abc, 2_000));
        assert_eq!(
            m.epoch,
            epoch + 1,
            "one new epoch for marking d down and when"
        );
        assert_eq!(m.nodes["d"].down_since_ms, 2_000);
        // Later rounds (another leader's among them) keep the first time.
        assert!(!m.reconcile_at(&abc, 9_000));
        assert_eq!(m.nodes["d"].down_since_ms, 2_000);
        // A map written before the field existed gets it on the next round.
        m.nodes.get_mut("d").unwrap().down_since_ms = 0;
        let epoch = m.epoch;
        assert!(m.reconcile_at(&abc, 9_000));
        assert_eq!((m.epoch, m.nodes["d"].down_since_ms), (epoch + 1, 9_000));
        // Up again: cleared.
        assert!(m.reconcile_at(&abcd, 10_000));
        assert!(m.nodes.values().all(|n| n.down_since_ms == 0));
    }

    #[test]
    fn a_node_marked_out_gives_its_slots_to_the_others_and_comes_back_in() {
        let mut m = ClusterMap::new(3);
        let abcd = live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        m.reconcile(&abcd);
        all_clean(&mut m);
        let abc = live(&[("a", 1), ("b", 1), ("c", 1)]);
        assert_eq!(m.mark_out("d"), Err("it is up".into()));
        m.reconcile(&abc);
        assert!(m.health().degraded > 0, "d is down");
        let epoch = m.epoch;
        assert_eq!(m.mark_out("d"), Ok(()));
        assert_eq!(m.epoch, epoch + 1);
        m.reconcile(&abc);
        // It stays in the map, out, while its copies may hold writes the clean holders have
        // not flushed yet (`Demoted`), and leaves once every PG is clean again.
        assert!(m.nodes["d"].out);
        assert!(m.demoted.values().flatten().all(|x| x.node == "d"));
        for slots in &m.pgs {
            assert_eq!(slots.len(), 3);
            assert!(slots.iter().all(|s| s.node != "d" && s.prev.is_none()));
            assert!(
                slots.iter().filter(|s| s.state == SlotState::Clean).count() >= 2,
                "its copies are made again from the clean holders"
            );
        }
        all_clean(&mut m);
        assert_eq!(m.health().clean, PG_COUNT);
        assert!(!m.nodes.contains_key("d"), "it held nothing it could keep");
        // Back with the same process (a long partition): unlike a drained node it rejoins.
        m.reconcile(&abcd);
        assert!(m.nodes.contains_key("d") && !m.stale_slots("d").is_empty());
        // Refused with too few nodes left, or when its copy may be the only good one.
        let mut three = clean_abc();
        three.reconcile(&live(&[("a", 1), ("b", 1)]));
        assert!(three
            .mark_out("c")
            .unwrap_err()
            .contains("2 nodes would be left"));
        let mut m = ClusterMap::new(3);
        m.reconcile(&abcd);
        all_clean(&mut m);
        m.reconcile(&live(&[("a", 1)]));
        m.reconcile(&live(&[("a", 1), ("b", 2), ("c", 2)])); // b and c restarted: stale
        m.reconcile(&live(&[("b", 2), ("c", 2)])); // a down too
        let err = m.mark_out("d").unwrap_err();
        assert!(err.contains("no other clean replica"), "{err}");
        assert_eq!(
            m.mark_out("e"),
            Err("no node named \"e\" in the map".into())
        );
    }

    #[test]
    fn scores_are_stable() {
        // Placement decides where data lives: it must not change between builds.
        assert_eq!(score(0, "a", 4).to_bits(), score(0, "a", 4).to_bits());
        let mut m = ClusterMap::new(3);
        m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
        let first: Vec<Vec<String>> = (0..8).map(|pg| m.target_nodes(pg)).collect();
        let mut again = ClusterMap::new(3);
        again.reconcile(&live(&[("d", 1), ("c", 1), ("b", 1), ("a", 1)]));
        let second: Vec<Vec<String>> = (0..8).map(|pg| again.target_nodes(pg)).collect();
        assert_eq!(first, second);
    }
}
