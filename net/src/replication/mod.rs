//! The replication protocol's decisions, free of I/O. `cluster` (sockets, tokio, the cores)
//! and the deterministic simulator (`sim`, one thread, one seed, a simulated network) both
//! call these, so what the simulator checks is what the cluster does:
//!
//! - `route`: who decides a piece (this node, the PG's primary, or nobody yet);
//! - `write_plan`: which nodes must have a write before it is acknowledged;
//! - `Copies` (`copies.rs`): one write's outcome from its copies' answers, arriving on any
//!   thread;
//! - `admit_write` and `Fence` (`fence.rs`): what a replica refuses (an older map, a fenced
//!   writer);
//! - `replica_is_clean`: whether a replica's write must be remembered as dirty so catch-up
//!   leaves it alone;
//! - `list_ready`: when a catch-up listing may be answered (no write of an older map still in
//!   flight here);
//! - `recovery_round`, `Wanted`, `catch_up_plan`, `copy_runs` and `clean_spans`: what a stale
//!   replica copies, unmaps and skips;
//! - `Throttle` (`throttle.rs`): how fast a catch-up round copies;
//! - `revival_source`: where a restarted last clean holder of a lost PG copies it from, or
//!   what it waits for (`RevivalWait`).

mod copies;
mod fence;
mod throttle;

pub use copies::Copies;
pub use fence::{admit_write, Fence};
pub use throttle::Throttle;

use crate::map::{min_size, ClusterMap, Names, SlotState, Targets};
use crate::wire::Status;
use std::collections::{BTreeMap, HashMap, HashSet};
use torus_engine::layout::placement_group;
use torus_engine::{BLOCK_SIZE, CHUNK_SIZE};

/// PGs caught up per round (one block listing each way per round).
pub const RECOVERY_PGS_PER_ROUND: usize = 64;

/// Where a piece is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// This node reads it (a read or status).
    Read,
    /// This node coordinates the write, to these copies.
    Write(WritePlan<'a>),
    /// Sent to the PG's primary on another node.
    Forward(&'a str),
    /// No replica of the PG is up under this map, or (a write) fewer than `min_size` clean
    /// ones: ask again later.
    Retry,
    /// A peer sent it here but this node does not decide it: the peer asks again.
    Refuse,
}

/// Decides where a piece of `pg` goes. Reads: any clean holder has every acknowledged write (a
/// write is acknowledged only when every replica that is up has it). Writes: the node holding
/// the volume's writer lock coordinates them itself when it is a clean holder, so a write
/// costs one round trip to the other replicas, not two; otherwise the PG's primary does; it
/// waits while fewer than `min_size` clean replicas are up.
/// `incarnation` must be the one the map knows (not an earlier process, clean before a crash).
#[allow(clippy::too_many_arguments)]
pub fn route<'a>(
    map: &'a ClusterMap,
    me: &str,
    incarnation: u64,
    pg: u32,
    replicas: u32,
    is_write: bool,
    from_peer: bool,
    holds_writer: bool,
) -> Route<'a> {
    let t = map.targets(pg, replicas);
    let Some(primary) = t.primary else {
        return Route::Retry;
    };
    let current = map
        .nodes
        .get(me)
        .is_some_and(|n| n.up && n.info.incarnation == incarnation);
    let clean_here = current && map.clean_holder(pg, replicas, me);
    let here = if is_write {
        (primary == me && current) || (clean_here && !from_peer && holds_writer)
    } else {
        clean_here
    };
    match (here, from_peer) {
        (true, _) if !is_write => Route::Read,
        (true, _) => write_plan(map, t, me, pg, replicas).map_or(Route::Retry, Route::Write),
        (false, true) => Route::Refuse,
        (false, false) => Route::Forward(primary),
    }
}

/// The copies a write coordinated here must reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan<'a> {
    /// Every other node that is up and holds a slot (clean or catching up).
    pub remote: Names<'a>,
    /// A target is catching up: a partial-block write must be sent as whole blocks (it
    /// cannot merge into a block it has not copied yet).
    pub stale_target: bool,
}

/// `None` while fewer than `min_size` clean replicas are up (the write waits).
fn write_plan<'a>(
    map: &ClusterMap,
    t: Targets<'a>,
    me: &str,
    pg: u32,
    replicas: u32,
) -> Option<WritePlan<'a>> {
    if t.clean_up < min_size(replicas) {
        return None;
    }
    let stale_target = map.pgs[pg as usize]
        .iter()
        .take(replicas as usize)
        .any(|s| s.state == SlotState::Stale);
    Some(WritePlan {
        remote: t.write.into_iter().filter(|n| *n != me).collect(),
        stale_target,
    })
}

/// Orders outcomes of one replicated write: any hard error wins over "ask again".
pub fn worse(a: Status, b: Status) -> Status {
    let rank = |s: Status| match s {
        Status::Ok => 0,
        Status::Retry => 1,
        _ => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// Whether `map` knows this process (`incarnation`): a process restarted before the leader
/// noticed is named by its predecessor's entry, whose clean slots it does not hold (it may
/// have lost unflushed writes).
pub fn names_me(map: &ClusterMap, me: &str, incarnation: u64) -> bool {
    map.nodes
        .get(me)
        .is_some_and(|n| n.info.incarnation == incarnation)
}

/// True when this process holds `pg` cleanly under a map at least as new as the write's
/// `epoch` and is not catching it up: otherwise the write's blocks are remembered as dirty
/// (newer than anything catch-up may copy, and what a revival copies from a holder up since
/// before the loss).
pub fn replica_is_clean(
    map: &ClusterMap,
    epoch: u64,
    pg: u32,
    me: &str,
    incarnation: u64,
    recovering: bool,
) -> bool {
    map.epoch >= epoch
        && names_me(map, me, incarnation)
        && map.pgs.get(pg as usize).is_some_and(|slots| {
            slots
                .iter()
                .any(|s| s.node == me && s.state == SlotState::Clean)
        })
        && !recovering
}

/// Dirty blocks of a PG are kept while the PG is being caught up here or holds a stale slot
/// of this node, or while the map does not know this process yet.
pub fn keep_dirty(map: &ClusterMap, pg: u32, me: &str, incarnation: u64, recovering: bool) -> bool {
    recovering
        || !names_me(map, me, incarnation)
        || map.pgs.get(pg as usize).is_some_and(|slots| {
            slots
                .iter()
                .any(|s| s.node == me && s.state == SlotState::Stale)
        })
}

/// The PGs this node may free under `map`: it holds no slot of them and has not let go of
/// them already (`gone`). The caller first forgets the PGs it holds again (`holds`), so a PG
/// given back and taken away again is freed again.
pub fn let_go_candidates(map: &ClusterMap, me: &str, gone: impl Fn(u32) -> bool) -> Vec<u32> {
    (0..map.pg_count)
        .filter(|&pg| !holds(map, me, pg) && !gone(pg))
        .collect()
}

/// True when this node holds a slot (any state, or as the previous holder of a moving one)
/// of `pg` under `map`, is named among its last clean holders while it is lost, or is a
/// demoted clean holder of it (`map::Demoted`): a revival may make this node's copy the PG's
/// source again, so it must not be freed.
pub fn holds(map: &ClusterMap, me: &str, pg: u32) -> bool {
    map.slot_of(pg, me).is_some()
        || map
            .last_clean
            .get(&pg)
            .is_some_and(|l| l.holders.iter().any(|(n, _)| n == me))
        || map
            .demoted
            .get(&pg)
            .is_some_and(|l| l.iter().any(|d| d.node == me))
}

/// Whether blocks of `pg` listed to be freed must be kept after all: the PG came back to this
/// node under the map it has `now` (a write may be on its way), or a write to one of them
/// arrived meanwhile (it is remembered as dirty).
pub fn keep_moved(now: &ClusterMap, me: &str, pg: u32, written_meanwhile: bool) -> bool {
    holds(now, me, pg) || written_meanwhile
}

/// Since when this process's dirty blocks are known to be newer than any copy elsewhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirtyEpochs {
    /// This process's `up_since` in the last map that knew it.
    seen: Option<u64>,
    /// Dirty blocks written under an older map than this may be void.
    pub valid_from: u64,
}

impl DirtyEpochs {
    /// Takes this node's entry of a map just installed (its incarnation, `up_since` and
    /// `after_break`). True when some of what it remembered as dirty may be void: the map says
    /// this process has been up only since a later epoch than the last map that knew it, so
    /// it was down in between and may have missed writes. A block written here under an older
    /// map than `up_since` is then no longer known to be newer than its source's copy and
    /// must be forgotten; one written under `up_since` or later stays (every later write
    /// reached it). The first map that knows a restarted process is no break: it received
    /// every write since it started, also those sent under its predecessor's entry — unless
    /// that entry was marked down before this process was seen (`after_break`: seed 137830)
    /// or its lease expired meanwhile (`lease_lost`).
    pub fn observe(&mut self, names_me: bool, up_since: u64, after_break: bool) -> bool {
        if !names_me {
            return false;
        }
        let void = match self.seen {
            Some(s) => up_since > s,
            None => after_break,
        };
        if void {
            self.valid_from = up_since;
        }
        self.seen = Some(self.seen.map_or(up_since, |s| s.max(up_since)));
        void
    }

    /// This process's lease expired (it was cut off and taken out of the map): the next map
    /// that knows it voids what it remembered before.
    pub fn lease_lost(&mut self) {
        self.seen = Some(0);
    }
}

/// True when this process may answer another node's plain read or block listing of `pgs`
/// (catch-up, scrub, a read repaired from a replica, a revival): the map knows this
/// incarnation, up, as a clean holder of each, or as a candidate source of a lost PG's
/// revival (`serves_revival`). A process that restarted and lost unflushed writes, before the
/// leader marked it stale, is not one, although the map still names its previous incarnation
/// clean.
pub fn serves_copies(
    map: &ClusterMap,
    me: &str,
    incarnation: u64,
    mut pgs: impl Iterator<Item = u32>,
) -> bool {
    let current = map
        .nodes
        .get(me)
        .is_some_and(|n| n.up && n.info.incarnation == incarnation);
    current
        && pgs.all(|pg| map.clean_holder(pg, map.replicas_max, me) || serves_revival(map, me, pg))
}

/// True when this node may answer the block listing and reads of `pg` that a restarted last
/// clean holder reviving it asks for: the PG is lost, and the map records this node among its
/// last clean holders or as a demoted clean holder (`map::Demoted`). The reviver decides
/// whether what it has is worth copying (`revival_source`).
pub fn serves_revival(map: &ClusterMap, me: &str, pg: u32) -> bool {
    let Some(lost) = map.last_clean.get(&pg) else {
        return false;
    };
    map.up(me)
        && (lost.holders.iter().any(|(n, _)| n == me)
            || map
                .demoted
                .get(&pg)
                .is_some_and(|l| l.iter().any(|d| d.node == me)))
}

/// Where `me`, a restarted last clean holder reviving `pg`, copies the whole PG from first.
///
/// `flushed(node, incarnation)` is the newest map epoch that process recorded a flush at (0:
/// none): it flushed everything it had received under older maps, and every flush records the
/// newest map it has seen first (see `Cluster::flush_local`). What each candidate surely
/// has, as the map epoch before which it has every write acknowledged to the PG:
/// - `me`: its process that was the clean holder (not this one) recorded a flush at F;
/// - another last clean holder, restarted: its old process's F (one still running is made
///   clean by the leader without a revival);
/// - a clean holder demoted under map D (`map::Demoted`): D if it is the same process (it
///   has everything in memory), else the lower of D and its old process's F.
///
/// The one that covers the most is taken, `me` when none covers more (Ok(None)). Nothing
/// acknowledged later can be missing from it: a write under a newer map reached `me` too
/// (a clean holder up to the loss), and a flush acknowledged after it would have recorded a
/// newer F for `me`; a write not flushed is kept by whoever still runs with it (a holder up
/// since before the loss, whose writes since are copied next; the others are candidates).
/// Among candidates that cover as much, the one up in the lowest slot (it holds every
/// volume of the PG). When the best are down the revival waits for one (also one being
/// drained: its copy is still the best); the error says what it waits for.
pub fn revival_source(
    map: &ClusterMap,
    pg: u32,
    me: &str,
    flushed: impl Fn(&str, u64) -> u64,
) -> Result<Option<String>, RevivalWait> {
    let Some(lost) = map.last_clean.get(&pg) else {
        return Ok(None);
    };
    let mine = map
        .lost_incarnation(pg, me)
        .map_or(0, |inc| flushed(me, inc));
    let holders = lost.holders.iter().map(|(n, inc)| (n, *inc, lost.epoch));
    let demoted = map
        .demoted
        .get(&pg)
        .into_iter()
        .flatten()
        .map(|d| (&d.node, d.incarnation, d.epoch));
    // Most covered first, then up, then the lowest slot.
    type Rank = (u64, bool, std::cmp::Reverse<usize>);
    let mut best: Option<(Rank, &String)> = None;
    for (node, inc, epoch) in holders.chain(demoted) {
        let Some(n) = map.nodes.get(node) else {
            continue;
        };
        if node == me {
            continue;
        }
        let covers = if n.info.incarnation == inc {
            epoch
        } else {
            epoch.min(flushed(node, inc))
        };
        let slot = map.slot_of(pg, node).unwrap_or(usize::MAX);
        let key = (covers, n.up, std::cmp::Reverse(slot));
        if covers > mine && best.is_none_or(|(b, _)| key > b) {
            best = Some((key, node));
        }
    }
    match best {
        None => Ok(None),
        Some(((_, true, _), node)) => Ok(Some(node.clone())),
        Some((_, node)) => Err(RevivalWait {
            pg,
            node: node.clone(),
        }),
    }
}

/// What a revival waits for (`revival_source`): `node`, down, may hold acknowledged writes of
/// `pg` that this node lost in its restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PG {pg} waits for {node} (down), which may hold acknowledged writes this node lost in its restart")]
pub struct RevivalWait {
    pub pg: u32,
    pub node: String,
}

/// A block listing asked under map `asked` is answered once this node has that map and no
/// write started under an older one is still in flight here (coordinated or applied as a
/// replica; later ones are refused for their old epoch): the listing then holds every write
/// the asking node did not receive itself.
pub fn list_ready(map_epoch: u64, asked: u64, oldest_in_flight: Option<u64>) -> bool {
    map_epoch >= asked && oldest_in_flight.is_none_or(|oldest| oldest >= asked)
}

/// This round of catch-up: the PGs (with this node's slot) to copy from one source, at most
/// `RECOVERY_PGS_PER_ROUND`. The source is each PG's primary; rounds take the sources in
/// turn (`turn` counts rounds), so one source that cannot answer does not hold up the PGs of
/// the others.
pub fn recovery_round(
    map: &ClusterMap,
    me: &str,
    turn: usize,
) -> Option<(String, Vec<(u32, usize)>)> {
    let mut by_source: BTreeMap<String, Vec<(u32, usize)>> = BTreeMap::new();
    for (pg, slot) in map.stale_slots(me) {
        if let Some(p) = map.targets(pg, map.replicas_max).primary {
            if p != me {
                by_source.entry(p.to_owned()).or_default().push((pg, slot));
            }
        }
    }
    let n = by_source.len();
    let (source, mut pgs) = by_source.into_iter().nth(turn % n.max(1))?;
    pgs.truncate(RECOVERY_PGS_PER_ROUND);
    Some((source, pgs))
}

/// True when `new` lost a holder `old` had: a node up in `old` is down or restarted in `new`.
/// The holders left then flush, so acknowledged writes that only they hold are durable before
/// another of them can fail (one replica lost must not leave such writes in volatile state).
pub fn lost_a_node(old: &ClusterMap, new: &ClusterMap) -> bool {
    old.nodes.iter().any(|(name, n)| {
        n.up && new
            .nodes
            .get(name)
            .is_none_or(|m| !m.up || m.info.incarnation != n.info.incarnation)
    })
}

/// Which blocks a catch-up round is about: those of the round's PGs whose volume has a
/// replica in this node's slot and in the source's (replicas > both slot indices).
pub struct Wanted {
    slot_limit: HashMap<u32, usize>,
    /// volume id → replicas.
    volumes: HashMap<u32, u32>,
    pg_count: u32,
}

impl Wanted {
    pub fn new(
        map: &ClusterMap,
        source: &str,
        pgs: &[(u32, usize)],
        volumes: HashMap<u32, u32>,
    ) -> Wanted {
        let slot_limit = pgs
            .iter()
            .map(|(pg, mine)| (*pg, (*mine).max(map.slot_of(*pg, source).unwrap_or(0))))
            .collect();
        Wanted {
            slot_limit,
            volumes,
            pg_count: map.pg_count,
        }
    }

    pub fn contains(&self, volume: u32, block: u64) -> bool {
        let pg = placement_group(
            volume,
            block * BLOCK_SIZE as u64 / CHUNK_SIZE,
            self.pg_count,
        );
        self.volumes
            .get(&volume)
            .is_some_and(|&r| r as usize > self.slot_limit.get(&pg).copied().unwrap_or(usize::MAX))
    }
}

/// From the source's listing and this node's (volume, block, crc32c), sorted: the blocks to
/// copy (missing here or different) and those to unmap (here but not at the source).
#[allow(clippy::type_complexity)]
pub fn catch_up_plan(
    remote: &[(u32, u64, u32)],
    local: &[(u32, u64, u32)],
    wanted: &Wanted,
) -> (Vec<(u32, u64)>, Vec<(u32, u64)>) {
    let local_map: HashMap<(u32, u64), u32> = local.iter().map(|&(v, b, c)| ((v, b), c)).collect();
    let remote_set: HashSet<(u32, u64)> = remote.iter().map(|&(v, b, _)| (v, b)).collect();
    let fetch = remote
        .iter()
        .filter(|&&(v, b, crc)| wanted.contains(v, b) && local_map.get(&(v, b)) != Some(&crc))
        .map(|&(v, b, _)| (v, b))
        .collect();
    let unmap = local
        .iter()
        .filter(|&&(v, b, _)| wanted.contains(v, b) && !remote_set.contains(&(v, b)))
        .map(|&(v, b, _)| (v, b))
        .collect();
    (fetch, unmap)
}

/// Runs of consecutive blocks within one chunk (volume, first block, count): one read each.
pub fn copy_runs(blocks: &[(u32, u64)]) -> Vec<(u32, u64, u32)> {
    let chunk_blocks = CHUNK_SIZE / BLOCK_SIZE as u64;
    let mut runs: Vec<(u32, u64, u32)> = Vec::new();
    for &(v, b) in blocks {
        if let Some(last) = runs.last_mut() {
            if last.0 == v
                && last.1 + last.2 as u64 == b
                && last.1 / chunk_blocks == b / chunk_blocks
            {
                last.2 += 1;
                continue;
            }
        }
        runs.push((v, b, 1));
    }
    runs
}

/// The spans `[i, j)` of a copied run of `n` blocks to write here: every block but those a
/// newer write reached meanwhile (`dirty(i)`).
pub fn clean_spans(n: u32, dirty: impl Fn(u32) -> bool) -> Vec<(u32, u32)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < n {
        if dirty(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n && !dirty(j) {
            j += 1;
        }
        spans.push((i, j));
        i = j;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_skip_dirty_blocks() {
        assert_eq!(clean_spans(5, |i| i == 1 || i == 2), vec![(0, 1), (3, 5)]);
        assert_eq!(clean_spans(2, |_| true), vec![]);
        assert_eq!(clean_spans(3, |_| false), vec![(0, 3)]);
    }

    #[test]
    fn runs_stop_at_gaps_and_chunks() {
        let cb = CHUNK_SIZE / BLOCK_SIZE as u64;
        let runs = copy_runs(&[(1, 0), (1, 1), (1, 3), (1, cb - 1), (1, cb), (2, cb + 1)]);
        assert_eq!(
            runs,
            vec![
                (1, 0, 2),
                (1, 3, 1),
                (1, cb - 1, 1),
                (1, cb, 1),
                (2, cb + 1, 1)
            ]
        );
    }

    fn node(name: &str, inc: u64) -> (String, crate::map::NodeInfo) {
        let info = crate::map::NodeInfo {
            name: name.into(),
            peer_addr: String::new(),
            admin_addr: String::new(),
            nbd_addr: String::new(),
            cores: 1,
            capacity_bytes: 1 << 30,
            incarnation: inc,
        };
        (name.to_string(), info)
    }

    #[test]
    fn dirty_blocks_are_void_after_a_break_but_not_when_the_map_first_knows_a_restart() {
        let mut d = DirtyEpochs::default();
        // Restarted before the leader noticed: the map names the old process (up since 3).
        assert!(!d.observe(false, 3, false));
        // The leader notices (up since 7): every write since the start reached it.
        assert!(!d.observe(true, 7, false));
        assert_eq!(d.valid_from, 0);
        assert!(!d.observe(true, 7, false));
        // Down and back in the map: writes before 9 may have been missed.
        assert!(d.observe(true, 9, false));
        assert_eq!(d.valid_from, 9);
        assert!(!d.observe(true, 9, false));
        // Restarted, and cut off before the map knew it (seed 37141): its lease expired.
        let mut d = DirtyEpochs::default();
        assert!(!d.observe(false, 3, false));
        d.lease_lost();
        assert!(d.observe(true, 12, false));
        assert_eq!(d.valid_from, 12);
        // Restarted while the previous process's entry was about to be marked down (seed
        // 137830): writes under the map that marked it down reached neither.
        let mut d = DirtyEpochs::default();
        assert!(!d.observe(false, 3, false));
        assert!(d.observe(true, 20, true));
        assert_eq!(d.valid_from, 20);
    }

    #[test]
    fn the_map_says_whether_a_restart_came_after_a_break() {
        let mut m = ClusterMap::new(3);
        let one = |inc| [node("x", inc)].into_iter().collect();
        m.reconcile(&one(1));
        m.reconcile(&one(2));
        assert!(!m.nodes["x"].after_break, "noticed while its entry was up");
        m.reconcile(&BTreeMap::new());
        m.reconcile(&one(3));
        assert!(m.nodes["x"].after_break, "its entry was down in between");
        m.reconcile(&BTreeMap::new());
        m.reconcile(&one(3));
        assert!(m.nodes["x"].after_break, "kept for that process");
        m.reconcile(&one(4));
        assert!(!m.nodes["x"].after_break);
    }

    #[test]
    fn a_restarted_process_is_not_clean_until_the_map_knows_it() {
        let mut m = ClusterMap::new(3);
        m.reconcile(&[node("x", 1)].into_iter().collect());
        assert!(replica_is_clean(&m, m.epoch, 0, "x", 1, false));
        assert!(!keep_dirty(&m, 0, "x", 1, false));
        // Incarnation 2 runs while the map still names 1: its writes are remembered.
        assert!(!replica_is_clean(&m, m.epoch, 0, "x", 2, false));
        assert!(keep_dirty(&m, 0, "x", 2, false));
    }

    #[test]
    fn a_lost_pgs_last_clean_holder_keeps_its_blocks() {
        let mut m = ClusterMap::new(3);
        m.reconcile(
            &[node("w", 1), node("x", 1), node("y", 1), node("z", 1)]
                .into_iter()
                .collect(),
        );
        let pg = (0..m.pg_count)
            .find(|&pg| m.slot_of(pg, "w").is_none())
            .expect("a PG without w");
        assert!(!holds(&m, "w", pg));
        assert!(let_go_candidates(&m, "w", |_| false).contains(&pg));
        // The PG was lost with w among its last clean holders (w restarted since): a revival
        // may make w's copy its source again. Found by the replication simulation (seed
        // 169759): w had freed it, and its revival emptied every replica.
        m.last_clean.insert(
            pg,
            crate::map::LostPg {
                holders: vec![("w".into(), 1)],
                epoch: m.epoch,
                reviving: None,
            },
        );
        assert!(holds(&m, "w", pg));
        assert!(!let_go_candidates(&m, "w", |_| false).contains(&pg));
        assert!(keep_moved(&m, "w", pg, false));
    }

    #[test]
    fn losing_a_node_is_seen_and_sources_take_turns() {
        let mut a = ClusterMap::new(3);
        a.reconcile(
            &[node("x", 1), node("y", 1), node("z", 1)]
                .into_iter()
                .collect(),
        );
        let mut b = a.clone();
        b.reconcile(&[node("x", 1), node("y", 1)].into_iter().collect());
        assert!(lost_a_node(&a, &b), "z went down");
        let mut c = b.clone();
        c.reconcile(
            &[node("x", 1), node("y", 2), node("z", 1)]
                .into_iter()
                .collect(),
        );
        assert!(lost_a_node(&b, &c), "y restarted");
        assert!(!lost_a_node(&c, &c));
        // z catches up: its stale PGs have primaries x and y; rounds alternate between them.
        let all: Vec<u32> = (0..c.pg_count).collect();
        let epoch = c.epoch;
        assert!(c.mark_clean("y", 2, epoch, &all));
        let first = recovery_round(&c, "z", 0).map(|r| r.0);
        let second = recovery_round(&c, "z", 1).map(|r| r.0);
        assert!(
            first.is_some() && second.is_some() && first != second,
            "{first:?} {second:?}"
        );
    }

    #[test]
    fn list_waits_for_older_writes() {
        assert!(!list_ready(4, 5, None), "map older than the asker's");
        assert!(!list_ready(5, 5, Some(4)), "a write of map 4 in flight");
        assert!(list_ready(5, 5, Some(5)));
        assert!(list_ready(6, 5, None));
    }
}
