#!/bin/bash
# Write stalls a checkpoint causes: one node with one core, a volume of SIZE written whole (so
# the block map holds SIZE / 4 KiB entries), then fio random 4 KiB writes at QD32 for
# RUNTIME seconds with every completion's latency logged. Prints the percentiles, each burst
# of completions over 5 ms (when, the longest, how many) and the checkpoints written.
#   bash benches/checkpoint_stalls.sh [SIZE] [RUNTIME]     # default 4G, 60 s; BIN=DIR: binaries from DIR
SIZE=${1:-4G}
RUNTIME=${2:-60}
. "$(dirname "$0")/lib.sh"
B=${BIN:-$B}   # another build's target/release, to compare
start_node n --size "$(python3 -c "import sys; u={'G':1<<30,'M':1<<20}; s=sys.argv[1]; print(int(s[:-1])*u[s[-1]]*3//2)" "$SIZE")" \
  --default-volume-size "$SIZE" --cores 1
until ctl "$NODE_ADMIN" status > /dev/null 2>&1; do sleep 0.5; done
URI="nbd://127.0.0.1:$NODE_NBD/default"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="$SIZE" > /dev/null
before=$(curl -s "http://127.0.0.1:$NODE_ADMIN/metrics" | awk '/^torus_checkpoints_total/ {s+=$2} END {print s}')
fio --name=w --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
  --runtime="$RUNTIME" --time_based --write_lat_log="$W/lat" --log_avg_msec=0 > /dev/null
after=$(curl -s "http://127.0.0.1:$NODE_ADMIN/metrics" | awk '/^torus_checkpoints_total/ {s+=$2} END {print s}')
echo "checkpoints written during the run: $((after - before))"
python3 - "$W"/lat_clat.1.log <<'PY'
import sys
rows = [tuple(map(int, l.split(',')[:2])) for l in open(sys.argv[1])]
lat = sorted(r[1] for r in rows)
n = len(lat)
pct = lambda p: lat[min(n - 1, int(n * p))] / 1e3
print(f"{n} writes: p50 {pct(.5):.0f} µs, p99 {pct(.99):.0f} µs, p99.9 {pct(.999):.0f} µs, p99.99 {pct(.9999):.0f} µs, max {lat[-1] / 1e3:.0f} µs")
bursts = []
for t, l in rows:
    if l > 5e6:
        if bursts and t - bursts[-1][1] < 200:
            bursts[-1][1] = t; bursts[-1][2] = max(bursts[-1][2], l); bursts[-1][3] += 1
        else:
            bursts.append([t, t, l, 1])
print(f"bursts of completions over 5 ms: {len(bursts)}")
for b in bursts:
    print(f"  at {b[0] / 1e3:.1f} s: longest {b[2] / 1e6:.1f} ms, {b[3]} writes")
PY
