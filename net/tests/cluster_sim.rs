//! The cluster's deterministic simulation, short form: a few hundred seeds of three and four
//! nodes running the cluster's own code under network and node faults (net/src/testing/sim/). The long form is a
//! command: `cargo run --release -p torus-net --example cluster_sim -- --seeds 20000`.

use torus_net::testing::sim::{run, SimConfig, SimReport, FAULT_KINDS};

fn run_seeds(seeds: std::ops::Range<u64>, nodes: usize) -> SimReport {
    let mut total = SimReport::default();
    for seed in seeds {
        let cfg = SimConfig {
            seed,
            seconds: 30,
            nodes,
            faults: true,
            canary: false,
        };
        match run(cfg) {
            Ok(r) => total.add(&r),
            Err(failure) => panic!("{failure}"),
        }
    }
    total
}

/// One seed as `cluster_sim --seed SEED --nodes NODES` runs it.
fn replay(seed: u64, nodes: usize) -> SimReport {
    run(SimConfig {
        seed,
        seconds: 30,
        nodes,
        faults: true,
        canary: false,
    })
    .unwrap_or_else(|f| panic!("{f}"))
}

fn check(r: &SimReport, seeds: u64) {
    println!("{r:?}");
    assert_eq!(r.seeds, seeds);
    for (kind, n) in FAULT_KINDS.iter().zip(r.faults) {
        assert!(n >= 10, "{kind} injected only {n} times");
    }
    assert!(
        r.writes_acked > 100_000 && r.reads_checked > 100_000,
        "{r:?}"
    );
    assert!(r.catch_up_rounds > 500 && r.blocks_copied > 1000, "{r:?}");
    assert!(r.revivals > 0, "no PG was ever lost and revived: {r:?}");
    assert!(r.flush_records > 0, "no flush epoch was recorded: {r:?}");
    assert!(
        r.cut_records_published > 0,
        "no flush made while cut off: {r:?}"
    );
    assert!(r.blocks_verified >= seeds * 64 * 3, "{r:?}");
}

/// 150 seeds of three nodes, 30 simulated seconds each: every fault kind at least 10 times, over
/// 100k writes acknowledged and reads checked, catch-up and revivals happen, every replica matches
/// the model after healing, no node keeps blocks of a group it no longer holds, flushes are
/// recorded, and a flush made while cut off is published.
#[test]
fn three_nodes_lose_no_acknowledged_write_and_converge() {
    check(&run_seeds(0..150, 3), 150);
}

/// The same with four nodes, where nodes are marked out (at least 5 times) and also free the blocks
/// of groups that moved away.
#[test]
fn four_nodes_lose_no_acknowledged_write_and_converge() {
    let r = run_seeds(1000..1150, 4);
    check(&r, 150);
    assert!(r.marked_out >= 5, "nodes marked out: {}", r.marked_out);
    // Nodes freed what moved away from them (and kept nothing of it: checked per seed).
    assert!(r.blocks_freed > 0, "{r:?}");
}

/// The canary (flushes acknowledged without syncing) is caught in at least 10 of 30 seeds, with its
/// replay command.
#[test]
fn the_canary_that_acknowledges_flushes_without_syncing_is_caught() {
    // Nodes answer flushes without making anything durable: a power loss of every node must
    // then show a lost write. This is what proves the model sees one.
    let failures: Vec<String> = (0..30)
        .filter_map(|seed| {
            run(SimConfig {
                seed,
                seconds: 30,
                nodes: 3,
                faults: true,
                canary: true,
            })
            .err()
            .map(|f| f.to_string())
        })
        .collect();
    assert!(
        failures.len() >= 10,
        "the canary was caught in only {} of 30 seeds",
        failures.len()
    );
    let first = &failures[0];
    assert!(
        first.contains("--example cluster_sim -- --seed") && first.contains("--canary"),
        "a failure names the command that replays it: {first}"
    );
}

/// Seed 1521 (three nodes): the client leaves a node and attaches to the same node again while
/// a write of its first session is still being retried there and the lock's release has not
/// reached etcd; the new session must take the writer lock under a new epoch, or that old
/// write lands after the new session's writes and a read returns it (a stale read).
#[test]
fn a_new_writer_session_on_the_same_node_fences_the_last_ones_writes() {
    // Before the fix the lock's value was "NODE LEASE": a session on the node that held it
    // found its own value and kept the old epoch (`Cluster::take_writer`).
    replay(1521, 3);
}

/// Seed 1355 (four nodes): a node killed and restarted before the leader noticed answers a
/// flush for writes its predecessor lost; after a power loss of every node, the revival takes
/// that node's disk and an acknowledged, flushed write is gone. A process the map does not
/// name yet must answer a flush "ask again" (`Cluster::flush_vouched`).
#[test]
fn a_process_the_map_does_not_name_yet_does_not_answer_for_a_flush() {
    replay(1355, 4);
}

// Fixes 14, 18b, 19, 21 and the earlier model's seed 37141 are pinned by scripted scenarios
// (tests/cluster_scenarios.rs), which keep failing with their fix taken out when a change
// moves the cluster's events in time; a seed does not (seeds 1585, 7672 and 4865 pinned 14,
// 18b and 37141 until the dirty-block tracking moved onto each PG's core).

/// One seed (77, four nodes, 20 simulated seconds) run twice gives the same counts of events,
/// messages, acknowledged writes and faults.
#[test]
fn a_seed_replays_exactly() {
    let cfg = SimConfig {
        seed: 77,
        seconds: 20,
        nodes: 4,
        faults: true,
        canary: false,
    };
    let a = run(cfg.clone()).expect("seed 77");
    let b = run(cfg).expect("seed 77");
    assert_eq!(
        (a.events, a.messages, a.writes_acked, a.faults),
        (b.events, b.messages, b.writes_acked, b.faults)
    );
}
