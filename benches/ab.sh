#!/bin/bash
# A/B runs of torusd configurations (or builds) against each other with fio's nbd engine,
# interleaved, several repeats, medians and min-max. The README's --cores and registered
# buffer comparisons come from this.
#
#   benches/ab.sh "one::--cores 1" "two::--cores 2"
#   benches/ab.sh "old:/tmp/torusd-old:" "new::"            # two builds, default flags
#   benches/ab.sh "ring::TORUS_SYNC_WRITES=0" "pwrite::"   # an environment variable
#   REPEATS=5 RUNTIME=5 WORKLOADS="randread randwrite" QD=32 NUMJOBS=1 benches/ab.sh ...
#
# A configuration is LABEL:BINARY:FLAGS (BINARY empty: target/release/torusd); FLAGS may
# begin with NAME=VALUE words, set in torusd's environment. NUMJOBS fio jobs (each at QD)
# drive each configuration, as separate clients. Each runs in
# its own data dir (a 3 GiB store, removed at exit) with its 1 GiB volume written once before
# anything is measured.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPEATS=${REPEATS:-5}; RUNTIME=${RUNTIME:-5}; WORKLOADS=${WORKLOADS:-"randread randwrite"}; QD=${QD:-32}
AB_DIR=$(mktemp -d)
command -v fio >/dev/null || { echo "ab.sh: fio is not installed (Debian package fio)"; exit 1; }
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
iops() {  # fio json on stdin -> total IOPS
  python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}
pids=(); ports=(); labels=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait; rm -rf "$AB_DIR"' EXIT
for cfg in "$@"; do
  IFS=: read -r label bin flags <<<"$cfg"
  bin=${bin:-$ROOT/target/release/torusd}
  d=$AB_DIR/$label; mkdir -p "$d"; port=$(free_port)
  envs=(); args=()
  for w in $flags; do
    if [ ${#args[@]} = 0 ] && [[ $w == [A-Z]*=* ]]; then envs+=("$w"); else args+=("$w"); fi
  done
  (cd "$d" && exec env "${envs[@]}" "$bin" "${args[@]}" --size 3G --nbd-listen 127.0.0.1:$port --admin-listen 127.0.0.1:$(free_port) > out.log 2> err.log) &
  pids+=($!); ports+=($port); labels+=("$label")
  for _ in $(seq 100); do grep -q serving "$d/out.log" 2>/dev/null && break; sleep 0.1; done
  fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$port/default --rw=write --bs=1m --iodepth=8 --size=1G --output-format=terse >/dev/null
done
out=$AB_DIR/samples.txt; : > "$out"
for r in $(seq "$REPEATS"); do for wl in $WORKLOADS; do for i in "${!labels[@]}"; do
  v=$(fio --name=ab --ioengine=nbd --uri=nbd://127.0.0.1:${ports[$i]}/default --rw=$wl --bs=4k --iodepth=$QD \
        --numjobs="${NUMJOBS:-1}" --group_reporting --size=1G --runtime=$RUNTIME --time_based --randrepeat=0 --output-format=json 2>/dev/null | iops)
  echo "$wl ${labels[$i]} $v" | tee -a "$out"
done; done; done
echo "== medians (min-max) of $REPEATS runs, IOPS"
sort "$out" | awk '{k=$1" "$2; v[k]=v[k]" "$3} END {for (k in v) print k, v[k]}' | sort | while read -r wl label rest; do
  echo "$wl $label $(echo $rest | tr ' ' '\n' | sort -n | awk '{x[NR]=$1} END {print x[int((NR+1)/2)], "(" x[1] "-" x[NR] ")"}')"
done
