#!/bin/bash
# First writes to a new store: `torusd --sparse` (the store file reserved, never written) side
# by side with the default (written with zeros once at creation), one node and a three-node
# replicas=3 cluster of each, fio 4 KiB random writes at QD1 to volume blocks never written
# before (a fresh 256 MiB range each round), interleaved, medians of the rounds.
#   bash benches/first_writes.sh [ROUNDS]        # default 5; needs fio and etcd
set -euo pipefail
ROUNDS=${1:-5}
B="$(cd "$(dirname "$0")/.." && pwd)/target/release"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ctl() { "$B/torusctl" --server "http://127.0.0.1:$1" "${@:2}"; }
declare -A NBD
for side in sparse filled; do
  flags=""; [ $side = sparse ] && flags="--sparse"
  E=$(port); EP=$(port)
  etcd --data-dir "$W/$side-etcd" --listen-client-urls "http://127.0.0.1:$E" --advertise-client-urls "http://127.0.0.1:$E" \
    --listen-peer-urls "http://127.0.0.1:$EP" --initial-advertise-peer-urls "http://127.0.0.1:$EP" \
    --initial-cluster "default=http://127.0.0.1:$EP" > "$W/$side-etcd.log" 2>&1 &
  sleep 2
  for i in 1 2 3; do
    N=$(port); A=$(port)
    [ $i = 1 ] && { NBD[$side-3x]=$N; A1=$A; }
    # shellcheck disable=SC2086
    "$B/torusd" $flags --data-dir "$W/$side-n$i" --size 3G --etcd "http://127.0.0.1:$E" --node-name "n$i" \
      --peer-listen "127.0.0.1:$(port)" --nbd-listen "127.0.0.1:$N" --admin-listen "127.0.0.1:$A" \
      > "$W/$side-n$i.out" 2> "$W/$side-n$i.log" &
  done
  N=$(port); A=$(port); NBD[$side-1]=$N
  # shellcheck disable=SC2086
  "$B/torusd" $flags --data-dir "$W/$side-solo" --size 3G --default-volume-size 2G \
    --nbd-listen "127.0.0.1:$N" --admin-listen "127.0.0.1:$A" > "$W/$side-solo.out" 2> "$W/$side-solo.log" &
  until ctl "$A1" status > /dev/null 2>&1 && ctl "$A" status > /dev/null 2>&1; do sleep 1; done
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
