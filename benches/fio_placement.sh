#!/bin/bash
# Where fio runs, and what it costs a replicated QD1 write: a three-node replicas=3 cluster
# (one core each) and one single node, fio 4 KiB random writes at QD1 through node 1 and
# through the single node, with fio on CPU 0 (beside every node's core), on CPU 1, and where
# the kernel puts it; interleaved, medians of ROUNDS rounds of p50. Then, with fio placed by
# the kernel, which CPU fio ran on (`perf sched record -a` for 0.5 s, fio's sched-ins by CPU).
# The README's "Where fio runs" section.
#   bash benches/fio_placement.sh [ROUNDS]        # default 3; needs fio, etcd, two CPUs, perf
ROUNDS=${1:-3}
RUNTIME=${RUNTIME:-5}
. "$(dirname "$0")/lib.sh"
[ "$(nproc)" -ge 2 ] || { echo "fio_placement.sh: needs two CPUs"; exit 1; }
start_etcd etcd
for i in 1 2 3; do
  start_cluster_node "n$i" --size 2G --cores 1
  [ $i = 1 ] && { NBD3=$NODE_NBD; A1=$NODE_ADMIN; }
done
start_node solo --size 3G --cores 1
SOLO=$NODE_NBD
until ctl "$A1" status > /dev/null 2>&1 && ctl "$NODE_ADMIN" status > /dev/null 2>&1; do sleep 1; done
ctl "$A1" volume create bench 1G --replicas 3 > /dev/null
fio_qd1() {  # CPUS PORT EXPORT -> "p50_us"
  local pin=()
  [ "$1" = any ] || pin=(taskset -c "$1")
  "${pin[@]}" fio --name=q --ioengine=nbd --uri="nbd://127.0.0.1:$2/$3" --rw=randwrite --bs=4k \
    --iodepth=1 --size=512M --time_based --runtime="$RUNTIME" --output-format=json --output="$W/fio.json" > /dev/null
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(j["clat_ns"]["percentile"]["50.000000"] / 1000)' "$W/fio.json"
}
for port in "$NBD3 bench" "$SOLO default"; do  # written once before anything is measured
  # shellcheck disable=SC2086
  set -- $port
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$1/$2" --rw=write --bs=1m --iodepth=8 --size=512M --output-format=terse > /dev/null
done
echo "== p50 of 4 KiB random writes at QD1 (us), medians of $ROUNDS rounds" >&2
for r in $(seq "$ROUNDS"); do
  for cpus in 0 1 any; do
    echo "three nodes|$cpus|$(fio_qd1 "$cpus" "$NBD3" bench)" >> "$W/p50.txt"
    echo "one node|$cpus|$(fio_qd1 "$cpus" "$SOLO" default)" >> "$W/p50.txt"
  done
done
python3 - "$W/p50.txt" <<'PY'
import sys, statistics as st
c = {}
for line in open(sys.argv[1]):
    k, cpus, p50 = line.strip().split("|")
    c.setdefault((k, cpus), []).append(float(p50))
print("| target | fio on CPU 0 | fio on CPU 1 | fio placed by the kernel |")
print("|---|---|---|---|")
for k in ("one node", "three nodes"):
    print(f"| {k} | " + " | ".join(f"{st.median(c[(k, x)]):.1f}" for x in ("0", "1", "any")) + " |")
PY
if command -v perf > /dev/null; then
  echo "== where fio ran, placed by the kernel (sched-ins by CPU in 0.5 s)" >&2
  for port in "$SOLO default one node" "$NBD3 bench three nodes"; do
    # shellcheck disable=SC2086
    set -- $port
    fio_qd1 any "$1" "$2" > /dev/null &
    job=$!
    sleep 2
    perf sched record -a -o "$W/sched.data" -- sleep 0.5 > /dev/null 2>&1
    wait "$job"
    perf sched timehist -i "$W/sched.data" 2> /dev/null | awk -v who="${*:3}" \
      '$3 ~ /^fio/ {n[$2]++} END {printf "%s: CPU 0 %d, CPU 1 %d\n", who, n["[0000]"], n["[0001]"]}'
  done
else
  echo "fio_placement.sh: perf is not installed (Debian package linux-perf): placement counts skipped" >&2
fi
