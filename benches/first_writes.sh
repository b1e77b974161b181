#!/bin/bash
# First writes to a new store: `torusd --sparse` (the store file reserved, never written) side
# by side with the default (written with zeros once at creation), one node and a three-node
# replicas=3 cluster of each, fio 4 KiB random writes at QD1 to volume blocks never written
# before (a fresh 256 MiB range each round), interleaved, medians of the rounds.
#   bash benches/first_writes.sh [ROUNDS]        # default 5; needs fio and etcd
ROUNDS=${1:-5}
. "$(dirname "$0")/lib.sh"
declare -A NBD
for side in sparse filled; do
  flags=()
  [ $side = sparse ] && flags=(--sparse)
  start_etcd "$side-etcd"
  for i in 1 2 3; do
    start_cluster_node "$side-n$i" "${flags[@]}" --size 3G
    [ $i = 1 ] && { NBD[$side-3x]=$NODE_NBD; A1=$NODE_ADMIN; }
  done
  start_node "$side-solo" "${flags[@]}" --size 3G --default-volume-size 2G
  NBD[$side-1]=$NODE_NBD
  until ctl "$A1" status > /dev/null 2>&1 && ctl "$NODE_ADMIN" status > /dev/null 2>&1; do sleep 1; done
  ctl "$A1" volume create vol 2G --replicas 3 > /dev/null
  echo "$side: ready" >&2
done
run() {  # port export round -> "iops p50_us"
  fio --name=first --ioengine=nbd --uri="nbd://127.0.0.1:$1/$2" --rw=randwrite --bs=4k --iodepth=1 \
    --offset=$(( ($3 - 1) * 256 ))M --size=256M --time_based --runtime=6 --output-format=json --output="$W/fio.json" > /dev/null
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(int(j["iops"]), j["clat_ns"]["percentile"]["50.000000"] / 1000)' "$W/fio.json"
}
for r in $(seq "$ROUNDS"); do
  for side in sparse filled; do
    echo "$side 1 $(run "${NBD[$side-1]}" default "$r")" | tee -a "$W/all.txt" >&2
    echo "$side 3x $(run "${NBD[$side-3x]}" vol "$r")" | tee -a "$W/all.txt" >&2
  done
done
python3 - "$W/all.txt" <<'PY'
import sys, statistics
c = {}
for line in open(sys.argv[1]):
    side, target, iops, p50 = line.split()
    c.setdefault((target, side), []).append((float(iops), float(p50)))
print("| target | store file | IOPS | p50 µs (min–max) |")
print("|---|---|---|---|")
for (target, side), v in sorted(c.items()):
    p = [x[1] for x in v]
    print(f"| {'one node' if target == '1' else 'three nodes, replicas=3'} | {side} | {statistics.median(x[0] for x in v):.0f} | {statistics.median(p):.1f} ({min(p):.1f}–{max(p):.1f}) |")
PY
