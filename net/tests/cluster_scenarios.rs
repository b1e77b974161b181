//! Scripted fault sequences against the cluster's own code in the simulation
//! (`torus_net::testing::sim::scenario`): each is the sequence one fixed bug needed, written as
//! steps that wait for the cluster's state, so it keeps pinning the bug when a change moves the
//! cluster's events in time. Each fails with its fix taken out (the message that gives is in its
//! doc comment). A killed process loses every write since its last flush.

use std::time::Duration;
use torus_net::testing::sim::{scenario, SimReport, Stage};

fn pass(r: Result<SimReport, torus_net::testing::sim::SimFailure>) -> SimReport {
    r.unwrap_or_else(|f| panic!("{f}"))
}

/// A block of a PG that three of the four nodes hold, and those holders, a, b and c in slot
/// order. The fourth node is made the leader (so the holders learn of a new map only when
/// they poll it), and the client attaches to it.
struct Roles {
    block: u64,
    a: usize,
    b: usize,
    c: usize,
}

async fn roles(s: &Stage) -> Result<Roles, String> {
    s.until_clean().await?;
    let block = s.blocks()[0];
    let h = s.holders(s.pg_of(block));
    let d = (0..s.nodes())
        .find(|i| !h.contains(i))
        .ok_or("every node holds the PG")?;
    s.make_leader(d).await?;
    s.attach(d).await?;
    let h = s.holders(s.pg_of(block));
    Ok(Roles {
        block,
        a: h[0],
        b: h[1],
        c: h[2],
    })
}

/// `roles`, then c is killed, and a and b run the map that marks it down: a write now reaches
/// a and b only.
async fn c_down(s: &Stage) -> Result<Roles, String> {
    let r = roles(s).await?;
    s.kill(r.c);
    s.until_down(r.c).await?;
    s.until_installed(&[r.a, r.b]).await?;
    Ok(r)
}

/// Fix 14 (the earlier model's seed 26700): a write reaches holders a and b while c is down; a
/// is cut off and marked down; b is killed before it flushes and so loses the write. b comes
/// back as the PG's last clean holder, and must copy the whole PG from a, whose copy covers
/// more (`replication::revival_source`, `Cluster::revive`), waiting while a is still cut off,
/// rather than revive from its own disk. With that copy taken out it fails: "after healing,
/// node n1 holds version 0 of block 0 (PG 7), the model says 1".
#[test]
fn a_restarted_last_clean_holder_copies_what_a_holder_cut_off_before_it_has() {
    let r = pass(scenario(
        "a_restarted_last_clean_holder_copies_what_a_holder_cut_off_before_it_has",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, b, c } = c_down(&s).await?;
            s.write(block).await?;
            s.isolate(a, true);
            s.until_down(a).await?;
            if s.epoch_at(b) == Some(s.map().epoch) {
                return Err("b took the map that marks a down before it was killed".into());
            }
            s.kill(b);
            s.sleep_ms(500).await;
            s.start(b);
            s.sleep_ms(3000).await;
            s.isolate(a, false);
            s.start(c);
            Ok(())
        },
    ));
    assert!(r.revivals_whole > 0, "no revival copied a whole PG: {r:?}");
}

/// Fix 19 (the earlier model's seed 3940): holders a and b record a flush under the same map,
/// then take a write while c is down; a is cut off and b is killed before it flushes; a's
/// process dies while still cut off. A node cut off past its lease must refuse writes, flush,
/// and record on its own disk that the flush covers every map it saw
/// (`Cluster::fence_cut_off`); its next process publishes that before it registers, and b,
/// started first, copies from a before it revives the PG. Without it, a's write dies with its
/// process and b revives from its own disk: "after healing, node n1 holds version 0 of block 0
/// (PG 7), the model says 1".
#[test]
fn a_holder_cut_off_past_its_lease_flushes_and_records_that_on_its_disk() {
    let r = pass(scenario(
        "a_holder_cut_off_past_its_lease_flushes_and_records_that_on_its_disk",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, b, c } = c_down(&s).await?;
            s.flush().await?;
            s.write(block).await?;
            s.isolate(a, true);
            s.kill(b);
            // a's lease runs out while it is cut off; then its process dies.
            s.sleep_ms(5000).await;
            s.kill(a);
            s.start(b);
            s.sleep_ms(2000).await;
            s.isolate(a, false);
            s.start(a);
            s.start(c);
            Ok(())
        },
    ));
    assert!(r.cut_records_published > 0, "{r:?}");
}

/// The earlier model's seed 37141 (fix 15's exception): c is killed and started again before
/// the leader notices; its new process is cut off from etcd as soon as it joins, so it never
/// sees a map that names it, and takes a write as a stale replica (remembered as dirty: newer
/// than its source's copy). Its lease runs out, the map marks it down, and a newer write reaches
/// a and b only. When it registers again, the first map that knows it must void what it
/// remembered (`DirtyEpochs::lease_lost` in the heartbeat loop); without that, catch-up skips
/// the block as dirty and c keeps the older write: "after healing, node n3 holds version 1 of
/// block 0 (PG 7), the model says 2".
#[test]
fn a_process_whose_lease_expired_forgets_the_dirty_blocks_it_remembered() {
    pass(scenario(
        "a_process_whose_lease_expired_forgets_the_dirty_blocks_it_remembered",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, b, c } = roles(&s).await?;
            s.kill(c);
            s.start(c);
            s.until("c's new process runs", |s| s.running(c)).await?;
            s.cut_etcd(c, true);
            s.write(block).await?;
            s.until_down(c).await?;
            s.until_installed(&[a, b]).await?;
            s.write(block).await?;
            s.cut_etcd(c, false);
            Ok(())
        },
    ));
}

/// Fix 18b (the earlier model's seed 67642): holders a and b take a write while c is up, then
/// c is killed and the map marks it down. Installing that map, a and b flush (what only they
/// hold now must not wait for a client's flush), and that flush must be recorded under the new
/// map, so `Cluster::install_map` takes the map first and flushes after: a revival compares
/// these records (`replication::revival_source`), and a flush recorded under the older map
/// would rank a disk that has the write with one that lost it. With the flush made before the
/// map is taken it fails: "the script stopped: a and b record a flush under the map that
/// marks c down: not within 60 s".
#[test]
fn a_flush_after_a_node_left_the_map_is_recorded_under_the_new_map() {
    pass(scenario(
        "a_flush_after_a_node_left_the_map_is_recorded_under_the_new_map",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, b, c } = roles(&s).await?;
            s.write(block).await?;
            s.kill(c);
            s.until_down(c).await?;
            let epoch = s.map().epoch;
            s.until_installed(&[a, b]).await?;
            s.until(
                "a and b record a flush under the map that marks c down",
                |s| s.flushed(a) >= epoch && s.flushed(b) >= epoch,
            )
            .await
        },
    ));
}

/// The known bug the 100,000-seed run found (seed 9297 of four nodes, on the code that kept
/// dirty blocks on each PG's core): a, cut off from etcd, fences itself past its lease
/// (`Cluster::fence_cut_off`: it refuses writes under every map it has seen) and registers
/// again once etcd answers. The leader d missed etcd for a moment just then, and the call of
/// its tick that hung there kept it from listing the nodes until a was back, so it publishes
/// no new map. a must move etcd's map past its fence itself
/// (`Cluster::pass_cut_off_fence`); without that it refuses the writes of the PGs it is
/// primary of for good: "the script stopped: the write of version 1 of block 0 failed".
#[test]
fn a_node_registered_again_before_the_leader_saw_it_gone_takes_writes_again() {
    let r = pass(scenario(
        "a_node_registered_again_before_the_leader_saw_it_gone_takes_writes_again",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, .. } = roles(&s).await?;
            let d = s.leader().ok_or("no leader")?;
            let up_since = |s: &Stage| s.map().nodes[&format!("n{a}")].up_since;
            let (epoch, since) = (s.map().epoch, up_since(&s));
            s.until("a renewed its lease", |s| {
                s.lease_left(a) >= Some(Duration::from_millis(2990))
            })
            .await?;
            s.cut_etcd(a, true);
            s.sleep_ms(1500).await;
            // Just after a heartbeat of d, so its lease does not miss a renewal.
            let stats = format!("stats/n{d}");
            let seen = s.revision(&stats);
            s.until("d's heartbeat", |s| s.revision(&stats) != seen)
                .await?;
            s.cut_etcd(d, true);
            s.sleep_ms(600).await;
            s.cut_etcd(d, false);
            s.until("a's lease ran out", |s| s.lease_left(a).is_none())
                .await?;
            s.cut_etcd(a, false);
            s.until("a registered again", |s| s.lease_left(a).is_some())
                .await?;
            if !s.map().up(&format!("n{a}")) || s.leader() != Some(d) {
                return Err("the leader saw a gone: this no longer reaches the bug".into());
            }
            s.write(block).await?;
            // a's own map, one past its fence (the map it fenced under, plus two), with no
            // break in a's time up.
            if (s.map().epoch, up_since(&s)) != (epoch + 2, since) {
                return Err(format!(
                    "map {} (a up since {}) after map {epoch} (a up since {since})",
                    s.map().epoch,
                    up_since(&s)
                ));
            }
            Ok(())
        },
    ));
    assert!(r.cut_records > 0, "{r:?}");
}

/// Fix 18a (the earlier model's seed 59333): a PG's slot moves from x back to d, which was
/// marked out while down and has returned, and x, the slot's previous holder, still takes every
/// write until d has caught up. A write reaches x, b and c; x (the leader) is cut off before d
/// has caught up, and b and c are killed just before x's lease runs out, so d, the leader now,
/// drops x from the PG under a map that b and c never install (and so never flush under). x
/// must be recorded as demoted like a clean holder (`ClusterMap::record_demotion`) and keep its
/// copy, so that b and c, restarted, copy the PG from it before they revive it. Without that, x
/// frees its copy and b revives from its own disk: "after healing, node n1 holds version 0 of
/// block 0 (PG 7), the model says 1".
#[test]
fn the_old_holder_of_a_moving_slot_cut_off_keeps_what_the_others_lost() {
    let r = pass(scenario(
        "the_old_holder_of_a_moving_slot_cut_off_keeps_what_the_others_lost",
        4,
        true,
        async |s: Stage| {
            s.until_clean().await?;
            let block = s.blocks()[0];
            let pg = s.pg_of(block);
            let h = s.holders(pg);
            let (d, b, c) = (h[0], h[1], h[2]);
            let x = (0..s.nodes())
                .find(|i| !h.contains(i))
                .ok_or("every node holds the PG")?;
            s.make_leader(x).await?;
            s.attach(x).await?;
            // d is marked out; x takes its slot of the PG.
            s.kill(d);
            s.until("d is marked out", |s| {
                s.map().nodes.get(&format!("n{d}")).is_some_and(|n| n.out)
            })
            .await?;
            s.until("every PG is clean on x, b and c", |s| {
                let m = s.map();
                m.health().clean == m.pg_count
            })
            .await?;
            if s.holders(pg) != [x, b, c] {
                return Err(format!("the PG is held by {:?}", s.holders(pg)));
            }
            s.write(block).await?;
            // d comes back in, and the PG's first slot moves back to it from x.
            s.start(d);
            let was_x = Some(format!("n{x}"));
            s.until("x's slot of the PG moves back to d", |s| {
                s.map().pgs[pg as usize][0].prev == was_x
            })
            .await?;
            s.isolate(x, true);
            s.until("x's lease is about to run out", |s| {
                s.lease_left(x) < Some(Duration::from_millis(100))
            })
            .await?;
            s.kill(b);
            s.kill(c);
            s.until_down(x).await?;
            let m = s.map();
            if !m.up(&format!("n{b}")) || !m.up(&format!("n{c}")) {
                return Err("b and c went down in the same map as x".into());
            }
            if m.pgs[pg as usize].iter().any(|slot| slot.prev.is_some()) {
                return Err("the slot still moves in the map that marks x down".into());
            }
            s.until_down(b).await?;
            s.until_down(c).await?;
            s.start(b);
            s.start(c);
            s.sleep_ms(3000).await;
            s.isolate(x, false);
            Ok(())
        },
    ));
    assert!(r.revivals_whole > 0, "no revival copied a whole PG: {r:?}");
}

/// Fix 20 (the earlier model's seed 137830): c is killed, and once its lease has run out the
/// leader d, whose etcd calls are slow, lists the nodes without it. Before d publishes the map
/// that marks c down, c's new process registers and takes a write (a stale replica's, kept as
/// dirty: newer than its source's copy) under the map that still names its predecessor. The
/// map that marks c down comes, a newer write reaches a and b only, and the map after it is
/// the first to know the new process. That map must say the restart came after a break
/// (`after_break`), so the process voids what it remembered as dirty; without that, catch-up
/// skips the block and c keeps the older write: "after healing, node n3 holds version 1 of
/// block 0 (PG 7), the model says 2".
#[test]
fn a_process_restarted_as_its_predecessor_is_marked_down_forgets_its_dirty_blocks() {
    pass(scenario(
        "a_process_restarted_as_its_predecessor_is_marked_down_forgets_its_dirty_blocks",
        4,
        false,
        async |s: Stage| {
            let Roles { block, a, b, c } = roles(&s).await?;
            let d = s.leader().ok_or("no leader")?;
            s.slow_etcd(d, 400);
            s.kill(c);
            s.until("c's lease ran out", |s| s.lease_left(c).is_none())
                .await?;
            let listed = s.nodes_listed(d);
            s.until("d listed the nodes without c", |s| {
                s.nodes_listed(d) > listed
            })
            .await?;
            s.start(c);
            s.until("c's new process registered", |s| {
                s.running(c) && s.lease_left(c).is_some()
            })
            .await?;
            let name = format!("n{c}");
            if !s.map().up(&name) {
                return Err("the map marked c down before its new process took a write".into());
            }
            s.write(block).await?;
            s.until_down(c).await?;
            if s.lease_left(c).is_none() {
                return Err("c's new process is not registered".into());
            }
            s.until_installed(&[a, b]).await?;
            s.write(block).await?;
            Ok(())
        },
    ));
}
