#!/bin/bash
# Allocations and the cluster's locks per replicated 4 KiB write (issue 23's target: at most
# two of each), at QD1 and QD32: builds torusd-testing with the `counters` feature (every
# allocation and every cluster lock counted, shown in /metrics), places it as `torusd` beside
# torus-bench in a temp dir, and runs `torus-bench counts` (three nodes and etcd on loopback,
# a replicas=3 volume, fio writing IOS random blocks through node a per depth, idle windows
# subtracted).
#   bash benches/write_path_counts.sh [IOS] [DIR]   # default 20000 writes, DIR . ; needs fio, etcd
set -euo pipefail
IOS=${1:-20000}
DIR=${2:-.}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
for t in fio etcd; do command -v $t > /dev/null || { echo "needs $t" >&2; exit 1; }; done
cargo build -q --release -p torus-bench -p torus-tools --bin torus-bench --bin torusctl
cargo build -q --release -p torus-tools --features counters --bin torusd-testing
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cp target/release/torus-bench target/release/torusctl "$W/"
cp target/release/torusd-testing "$W/torusd"
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with changes)'), $(date -u +%F)"
"$W/torus-bench" counts --ios "$IOS" --depths 1,32 --work "$DIR"
