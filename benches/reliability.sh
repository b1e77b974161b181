#!/bin/bash
# The long forms of the reliability tests (the README's reliability figures); the short forms
# run in `cargo test`. Writes benches/results/DATE/reliability.txt.
#   bash benches/reliability.sh                # everything, ~22 minutes on 2 cores
#   SEEDS=500 ROUNDS=1 RUNS=300 CLUSTER_SEEDS=2000 bash benches/reliability.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-3000}; ROUNDS=${ROUNDS:-3}; RUNS=${RUNS:-2000}; CLUSTER_SEEDS=${CLUSTER_SEEDS:-20000}
out=benches/results/$(date +%F)/reliability.txt
mkdir -p "$(dirname "$out")"
cargo build --release -q --workspace --examples
{
  echo "# torus reliability long forms, $(date -u '+%F %H:%M UTC'), $(nproc) CPUs, $(uname -r)"
  echo
  echo "## deterministic simulation: every fault kind ($SEEDS seeds)"
  target/release/examples/sim --seeds "$SEEDS" --faults all
  echo
  echo "## deterministic simulation: power loss, torn writes, a full device only; EIO is a failure ($SEEDS seeds)"
  target/release/examples/sim --seeds "$SEEDS" --first 100000 --faults crash,torn,device-full
  echo
  echo "## canary: flushes acknowledged before they are durable (must be caught)"
  target/release/examples/sim --seeds 50 --faults crash --canary | tail -1
  echo
  echo "## deterministic simulation of replication: 3 and 4 nodes, network and node faults ($CLUSTER_SEEDS seeds)"
  target/release/examples/cluster_sim --seeds "$CLUSTER_SEEDS"
  echo
  echo "## canary: nodes acknowledge flushes without syncing (must be caught)"
  target/release/examples/cluster_sim --seeds 50 --canary | tail -1
  echo
  echo "## process-level fault campaign ($ROUNDS rounds of 7 nemeses)"
  TORUS_CAMPAIGN_ROUNDS=$ROUNDS cargo test --release -q -p torus-tests --test campaign -- --nocapture 2>&1 \
    | grep -E '^campaign|test result'
  echo
  echo "## NBD connection fuzzing through torusd --nbd-stdin ($RUNS mutated sessions)"
  TORUS_STDIN_FUZZ_RUNS=$RUNS cargo test --release -q -p torus-tests --test nbd_stdin -- --nocapture 2>&1 \
    | grep -E 'mutated sessions|test result'
  echo
  echo "## 64 bit flips in one replica's data, then scrub (replicas=3)"
  cargo test --release -q -p torus-tests --test cluster_recovery a_corrupt_local_copy -- --nocapture 2>&1 \
    | grep -E '^64 flips|^NODE|^[abc] |test result'
  echo
  echo "## a replica that acknowledges every 9th write without applying it, then scrub"
  cargo test --release -q -p torus-tests --test cluster_recovery a_replica_that_lost_writes -- --nocapture 2>&1 \
    | grep -E '^NODE|^[abc] |test result' | head -4
} 2>&1 | tee "$out"
