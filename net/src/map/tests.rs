//! The map's decisions as scenarios: nodes join, go down, restart, are cut off, drained,
//! marked out or given up, and each test checks who holds what and which copy is good.

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
        wait.as_ref().is_err_and(|w| w.node == "a" && w.pg == pg),
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
    assert_eq!(t.primary, Some("a"));
    assert_eq!(t.write.len(), 3);
    assert_eq!(t.clean_up, 1);
    drop(t);
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
        assert!(!t.write.contains(&"b"));
        assert!(t.primary.is_some());
    }
    assert_eq!(m.health().degraded, PG_COUNT);
    // b restarts: it takes writes again but is not read from until it caught up.
    m.reconcile(&live(&[("a", 1), ("b", 2), ("c", 1)]));
    for pg in 0..PG_COUNT {
        let t = m.targets(pg, 3);
        assert_eq!(t.write.len(), 3);
        assert_ne!(t.primary, Some("b"));
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
        assert_eq!(m.targets(pg, 3).primary, Some("c"));
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
    assert!(wait.as_ref().is_err_and(|w| w.node == "a"), "{wait:?}");
    // a restarted too, before it recorded a flush: c's copy is the best there is.
    m.reconcile(&live(&[("a", 4), ("b", 3), ("c", 3)]));
    assert_eq!(replication::revival_source(&m, 0, "c", |_, _| 0), Ok(None));
    let pgs: Vec<u32> = m.reviving("c", 3).iter().map(|p| p.0).collect();
    assert_eq!(pgs.len(), PG_COUNT as usize);
    assert!(m.mark_revived("c", 3, &pgs));
    assert_eq!(m.health().down, 0);
    for pg in 0..PG_COUNT {
        assert_eq!(m.targets(pg, 3).primary, Some("c"));
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
    assert_eq!(t.primary, Some("d"));
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
    assert_eq!(
        wait.as_ref().map_err(|w| w.to_string()),
        Err(format!("PG {p} waits for {x} (down), which may hold acknowledged writes this node lost in its restart")),
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
    let up = m.give_up("c").unwrap_err();
    assert_eq!(up, MapError::UpNotLost { name: "c".into() });
    assert_eq!(
        up.to_string(),
        "c is up, so it is not lost (torusctl peer remove drains a node out)"
    );
    let unknown = m.give_up("e").unwrap_err();
    assert_eq!(unknown, MapError::NotInMap { name: "e".into() });
    assert_eq!(unknown.to_string(), "no node named \"e\" in the map");
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
        assert_eq!(m.targets(pg, 3).primary, Some("c"));
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
fn a_removal_is_refused_saying_why_when_too_few_nodes_would_be_left() {
    let mut m = ClusterMap::new(3);
    m.reconcile(&live(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
    let epoch = m.epoch;
    assert_eq!(m.start_removing("d"), Ok(true));
    assert_eq!(m.start_removing("d"), Ok(false), "being removed already");
    assert_eq!(m.epoch, epoch + 1);
    let refused = m.start_removing("c").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "removing \"c\" would leave 2 nodes for 3 replicas; add a node first"
    );
    let unknown = m.start_removing("e").unwrap_err();
    assert_eq!(unknown.to_string(), "no node named \"e\" in the cluster");
    assert_eq!(m.epoch, epoch + 1, "a refusal changes nothing");
    assert!(!m.nodes["c"].removing);
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
    assert_eq!(m.mark_out("d"), Err(MapError::Up));
    assert_eq!(MapError::Up.to_string(), "it is up");
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
    let too_few = three.mark_out("c").unwrap_err();
    assert_eq!(
        too_few,
        MapError::MarkOutLeavesTooFew {
            left: 2,
            replicas: 3
        }
    );
    assert_eq!(
        too_few.to_string(),
        "2 nodes would be left for 3 replicas; add a node"
    );
    let mut m = ClusterMap::new(3);
    m.reconcile(&abcd);
    all_clean(&mut m);
    m.reconcile(&live(&[("a", 1)]));
    m.reconcile(&live(&[("a", 1), ("b", 2), ("c", 2)])); // b and c restarted: stale
    m.reconcile(&live(&[("b", 2), ("c", 2)])); // a down too
    let err = m.mark_out("d").unwrap_err();
    assert!(matches!(err, MapError::OnlyCleanCopy { .. }), "{err}");
    assert!(
        err.to_string().contains("has no other clean replica up"),
        "{err}"
    );
    assert_eq!(
        m.mark_out("e"),
        Err(MapError::NotInMap { name: "e".into() })
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
