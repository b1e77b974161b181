#!/bin/bash
# What this machine charges a replicated 4 KiB QD1 write for before torus does anything, and
# whether the replicated QD1 goal (p50 <= 2x one node's) moves with the machine's settings.
#
# 1. The disk: CPU time per 4 KiB O_DIRECT write (fio on CPU 0, a file in DIR), at QD1 with
#    pwrite and at QD8 with io_uring submitting 8 at a time, and the share of a QD1 write's
#    CPU spent in the virtio notification (`iowrite16`, a VM exit) from `perf record`. Each
#    replicated write is three such writes, all issued from this machine's CPUs.
# 2. `torus-bench compare` (one node and three nodes, randwrite 4k QD1), four configurations
#    interleaved, ROUNDS rounds:
#      plain        as the benchmark runs (each node's core on CPU 0, fio where the kernel puts it);
#      spread       nodes b and c under `taskset -c 1` (a torusd wrapper in a temp dir);
#      idle-poll    /dev/cpu_dma_latency held at 0 during the run: idle CPUs poll instead of
#                   halting, so a wake-up across the two virtual CPUs costs no VM exit;
#      idle-poll+spread  both.
#    Prints median p50 of each and the three-node ÷ one-node ratio of the medians.
#   bash benches/qd1_machine.sh [ROUNDS] [DIR]   # default 3 rounds, DIR .; needs root, fio, perf
set -euo pipefail
ROUNDS=${1:-3}
DIR=${2:-.}
B="$(cd "$(dirname "$0")/.." && pwd)/target/release"
W=$(mktemp -d)
F=$(mktemp -p "$DIR" qd1_machine.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W" "$F"' EXIT
for t in fio perf taskset python3; do command -v $t > /dev/null || { echo "needs $t" >&2; exit 1; }; done

echo "## The disk: CPU per 4 KiB O_DIRECT write (fio on CPU 0, $F)"
fio --name=fill --filename="$F" --size=1G --rw=write --bs=1M --direct=1 > /dev/null
cpu_per_write() {
  fio --name=w --filename="$F" --size=1G --rw=randwrite --bs=4k --direct=1 --runtime=6 --time_based \
    --cpus_allowed=0 --output-format=json "$@" 2>/dev/null |
    python3 -c "import json,sys
j=json.load(sys.stdin)['jobs'][0]; w=j['write']; n=w['total_ios']; s=j['job_runtime']/1000
print(f'{round(n/s)} IOPS, p50 {w[\"clat_ns\"][\"percentile\"][\"50.000000\"]/1000:.1f} us, CPU {(j[\"usr_cpu\"]+j[\"sys_cpu\"])/100*s/n*1e6:.1f} us per write')"
}
echo "- QD1, pwrite:                $(cpu_per_write --ioengine=psync)"
echo "- QD8, io_uring, 8 per submit: $(cpu_per_write --ioengine=io_uring --iodepth=8 --iodepth_batch_submit=8 --iodepth_batch_complete_min=8)"
perf record -q -o "$W/perf.data" -- fio --name=w --filename="$F" --size=1G --rw=randwrite --bs=4k --direct=1 \
  --ioengine=psync --runtime=5 --time_based --cpus_allowed=0 > /dev/null 2>&1
echo "- QD1, pwrite: share of fio's CPU samples in the virtio notification: $(perf report -i "$W/perf.data" --no-children --sort sym 2>/dev/null | awk '/iowrite16/ {print $1; exit}')"

# A copy of the binaries whose torusd runs nodes b and c on CPU 1 (torus-bench finds torusd
# beside itself).
mkdir "$W/spread"
cp "$B/torus-bench" "$B/torusctl" "$W/spread/"
cat > "$W/spread/torusd" <<EOF
#!/bin/bash
case " \$* " in *" --node-name b "*|*" --node-name c "*) exec taskset -c 1 "$B/torusd" "\$@";; esac
exec "$B/torusd" "\$@"
EOF
chmod +x "$W/spread/torusd"
hold_idle_poll() {
  python3 -c 'import os,struct,signal; fd=os.open("/dev/cpu_dma_latency",os.O_WRONLY); os.write(fd,struct.pack("i",0)); signal.pause()' &
  POLL=$!
  sleep 0.5
}

echo
echo "## torus-bench compare, randwrite 4k QD1, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  for cfg in plain spread idle-poll idle-poll+spread; do
    case $cfg in *spread) BIN=$W/spread ;; *) BIN=$B ;; esac
    POLL=
    case $cfg in idle-poll*) hold_idle_poll ;; esac
    "$BIN/torus-bench" compare --repeats 1 --runtime 8 --targets torus,torus-3x --workloads randwrite-4k-qd1 \
      --out "$W/out" 2>&1 | grep '^| randwrite' | sed "s/^/$cfg /" | tee -a "$W/all.txt" >&2
    if [ -n "$POLL" ]; then kill "$POLL"; wait "$POLL" 2>/dev/null || true; fi
  done
  echo "round $r of $ROUNDS done" >&2
done
python3 - "$W/all.txt" <<'PY'
import sys, statistics as st
p = {}
for line in open(sys.argv[1]):
    cfg, rest = line.split(' ', 1)
    f = [x.strip() for x in rest.strip().strip('|').split('|')]
    p.setdefault(cfg, {}).setdefault(f[1], []).append(float(f[4]))
print("| configuration | one node p50 µs | three nodes p50 µs | ratio of medians | round by round |")
print("|---|---|---|---|---|")
for cfg, t in p.items():
    one, three = t["torus"], t["torus-3x"]
    rounds = ", ".join(f"{b / a:.2f}×" for a, b in zip(one, three))
    print(f"| {cfg} | {st.median(one):.1f} | {st.median(three):.1f} | {st.median(three) / st.median(one):.2f}× | {rounds} |")
PY
