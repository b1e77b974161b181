#!/bin/bash
# Two builds of torus side by side: `torus-bench compare` from each build's target/release,
# one repeat at a time, interleaved, so both see the same machine. Medians per cell at the end.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release --workspace)
#   bash benches/ab_builds.sh /tmp/old/target/release target/release [ROUNDS] [TARGETS] [WORKLOADS]
# Defaults: 3 rounds; torus,torus-3x; randwrite-4k-qd1,randwrite-4k-qd32,seqwrite-1m-qd8.
# A_ENV / B_ENV: NAME=VALUE words for one side's environment (torusd inherits it), so one build
# can be compared with itself: A_ENV=TORUS_SYNC_WRITES=0 bash benches/ab_builds.sh target/release target/release
set -euo pipefail
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd)
ROUNDS=${3:-3}
TARGETS=${4:-torus,torus-3x}
WORKLOADS=${5:-randwrite-4k-qd1,randwrite-4k-qd32,seqwrite-1m-qd8}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for i in $(seq "$ROUNDS"); do
  for side in a b; do
    if [ $side = a ]; then BIN=$A; ENVS=${A_ENV:-}; else BIN=$B; ENVS=${B_ENV:-}; fi
    echo "== round $i, $side ($BIN${ENVS:+ with $ENVS})" >&2
    # shellcheck disable=SC2086
    env $ENVS "$BIN/torus-bench" compare --repeats 1 --runtime 8 --targets "$TARGETS" --workloads "$WORKLOADS" \
      --out "$OUT" 2>&1 | grep '^| [a-z]' | grep -v '^| workload' | sed "s/^/$side /" | tee -a "$OUT/all.txt" >&2
  done
done
# Median IOPS and p50 per (side, workload, target).
python3 - "$OUT/all.txt" <<'PY'
import sys, statistics
cells = {}
for line in open(sys.argv[1]):
    side, rest = line.split(' ', 1)
    f = [x.strip() for x in rest.strip().strip('|').split('|')]
    key = (f[0], f[1])
    cells.setdefault(key, {}).setdefault(side, []).append((float(f[2].split()[0]), float(f[4])))
print("| workload | target | IOPS a | IOPS b | b ÷ a | p50 µs a | p50 µs b |")
print("|---|---|---|---|---|---|---|")
for (w, t), sides in cells.items():
    a, b = sides.get('a', []), sides.get('b', [])
    if not a or not b:
        continue
    ia, ib = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
    pa, pb = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
    print(f"| {w} | {t} | {ia:.0f} | {ib:.0f} | {ib / ia:.2f}× | {pa:.1f} | {pb:.1f} |")
PY
