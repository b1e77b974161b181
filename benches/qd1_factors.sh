#!/bin/bash
# What a replicated 4 KiB QD1 write waits for on this machine: three three-node replicas=3
# clusters and one single node, fio QD1 random writes through node 1 of each cluster and
# through the single node, interleaved, medians of ROUNDS rounds of p50:
#   plain          three nodes as the benchmark runs them (data on the one disk);
#   tmpfs-replicas nodes 2 and 3 keep their data in /dev/shm: the coordinator's own write is
#                  then the only one on the disk (no queueing behind the other two copies);
#   fifo           all three nodes under SCHED_FIFO (chrt -f 10): a woken core runs at once
#                  instead of waiting for fio or another node to be preempted.
# If the disk's queueing or the scheduler's wake-up latency were what a replicated write
# waits for, the second or third would be much faster than the first.
#   bash benches/qd1_factors.sh [ROUNDS]        # default 5; needs fio, etcd and root (chrt)
ROUNDS=${1:-5}
RUNTIME=${RUNTIME:-6}
. "$(dirname "$0")/lib.sh"
S=$(mktemp -d -p /dev/shm)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W" "$S"' EXIT
declare -A NBD
for c in plain tmpfs-replicas fifo; do
  start_etcd "$c-etcd"
  [ $c = fifo ] && NODE_WRAP="chrt -f 10"
  for i in 1 2 3; do
    if [ $c = tmpfs-replicas ] && [ $i != 1 ]; then mkdir "$S/n$i"; ln -s "$S/n$i" "$W/$c-n$i"; fi
    start_cluster_node "$c-n$i" --size 2G --cores 1
    [ $i = 1 ] && { NBD[$c]=$NODE_NBD; A1=$NODE_ADMIN; }
  done
  NODE_WRAP=
  until ctl "$A1" status > /dev/null 2>&1; do sleep 1; done
  ctl "$A1" volume create bench 1G --replicas 3 > /dev/null
done
start_node solo --size 2G --cores 1
NBD[one-node]=$NODE_NBD
until ctl "$NODE_ADMIN" status > /dev/null 2>&1; do sleep 1; done
export_of() { [ "$1" = one-node ] && echo default || echo bench; }
for c in plain tmpfs-replicas fifo one-node; do   # every region written once, as in `compare`
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:${NBD[$c]}/$(export_of $c)" --rw=write --bs=1M \
    --iodepth=4 --size=1G > /dev/null
done
echo "ready" >&2
for r in $(seq "$ROUNDS"); do
  for c in plain tmpfs-replicas fifo one-node; do
    fio --name=q --ioengine=nbd --uri="nbd://127.0.0.1:${NBD[$c]}/$(export_of $c)" --rw=randwrite --bs=4k \
      --iodepth=1 --size=1G --time_based --runtime="$RUNTIME" --output-format=json --output="$W/fio.json" > /dev/null
    echo "$c $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["clat_ns"]["percentile"]["50.000000"] / 1000)' "$W/fio.json")" >> "$W/p50.txt"
  done
  echo "round $r of $ROUNDS done" >&2
done
python3 - "$W/p50.txt" <<'PY'
import sys, statistics as st
c = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    c.setdefault(k, []).append(float(v))
one = st.median(c["one-node"])
print("| target | p50 µs, median | min–max | ÷ one node |")
print("|---|---|---|---|")
for k, v in c.items():
    print(f"| {k} | {st.median(v):.1f} | {min(v):.1f}–{max(v):.1f} | {st.median(v) / one:.2f}× |")
PY
