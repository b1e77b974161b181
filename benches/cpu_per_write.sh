#!/bin/bash
# Where a replicated QD1 write's CPU goes, and what the nodes cost at rest: three torusd nodes
# (one core each, as in the README's tables) with a replicas=3 volume and one single node,
# fio 4 KiB random writes at QD1 through node 1 and through the single node, interleaved.
#   1. CPU per write of each process (user and system, from /proc/PID/stat) and context
#      switches per write of each node's core, medians of ROUNDS runs;
#   2. p50 with the three nodes' cores moved between the CPUs while they run (taskset -p):
#      all on CPU 0 (what each node does by itself), unpinned, nodes 2 and 3 on CPU 1, node 2
#      alone on CPU 1; medians of ROUNDS rounds (needs two CPUs);
#   3. CPU of the idle nodes and their etcd over 10 s, then of etcd alone.
#   bash benches/cpu_per_write.sh [ROUNDS]        # default 5; the README used 12 for part 2
ROUNDS=${1:-5}
RUNTIME=${RUNTIME:-6}
. "$(dirname "$0")/lib.sh"
start_etcd etcd
declare -a NBD ADMIN PID
for i in 1 2 3; do
  start_cluster_node "n$i" --size 2G --cores 1
  NBD[$i]=$NODE_NBD; ADMIN[$i]=$NODE_ADMIN; PID[$i]=$NODE_PID
done
start_node solo --size 3G --cores 1
SOLO_NBD=$NODE_NBD; SOLO_PID=$NODE_PID
until ctl "${ADMIN[1]}" status > /dev/null 2>&1 && ctl "$NODE_ADMIN" status > /dev/null 2>&1; do sleep 1; done
ctl "${ADMIN[1]}" volume create bench 1G --replicas 3 > /dev/null

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }   # user system, in clock ticks
core_task() { for t in /proc/"$1"/task/*; do [ "$(cat "$t/comm")" = torus-core-0 ] && echo "$t"; done; }
switches() { awk '/ctxt_switches/ {s += $2} END {print s}' "$(core_task "$1")/status"; }
fio_qd1() {  # port export -> "iops p50_us"
  fio --name=q --ioengine=nbd --uri="nbd://127.0.0.1:$1/$2" --rw=randwrite --bs=4k --iodepth=1 \
    --size=512M --time_based --runtime="$RUNTIME" --output-format=json --output="$W/fio.json" > /dev/null
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(int(j["iops"]), j["clat_ns"]["percentile"]["50.000000"] / 1000)' "$W/fio.json"
}
# measure LABEL PORT EXPORT PID...: one run; per process a line "LABEL/ROLE user_us sys_us
# switches" per write (ROLE: the process's place in the list).
measure() {
  local label=$1 port=$2 export=$3 role=0 out writes u0 s0 u1 s1 w0
  shift 3
  local -A before sw
  for p in "$@"; do before[$p]=$(ticks "$p"); sw[$p]=$(switches "$p"); done
  out=$(fio_qd1 "$port" "$export"); writes=$(( ${out%% *} * RUNTIME ))
  for p in "$@"; do
    role=$((role + 1))
    read -r u0 s0 <<< "${before[$p]}"
    read -r u1 s1 <<< "$(ticks "$p")"
    w0=${sw[$p]}
    awk -v l="$label/$role" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v w=$(( $(switches "$p") - w0 )) -v n="$writes" \
      -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%s %.1f %.1f %.2f\n", l, u / hz * 1e6 / n, s / hz * 1e6 / n, w / n}'
  done
}
echo "== 1. CPU per write (µs) and core context switches per write, medians of $ROUNDS" >&2
for r in $(seq "$ROUNDS"); do
  measure 3x "${NBD[1]}" bench "${PID[1]}" "${PID[2]}" "${PID[3]}" >> "$W/cpu.txt"
  measure one "$SOLO_NBD" default "$SOLO_PID" >> "$W/cpu.txt"
done
python3 - "$W/cpu.txt" <<'PY'
import sys, statistics as st
c = {}
for line in open(sys.argv[1]):
    k, u, s, w = line.split()
    c.setdefault(k, []).append((float(u), float(s), float(w)))
names = {"3x/1": "coordinator (node 1)", "3x/2": "replica (node 2)", "3x/3": "replica (node 3)", "one/1": "one node"}
print("| process | user µs/write | system µs/write | total | core switches/write |")
print("|---|---|---|---|---|")
for k, v in c.items():
    u, s, w = (st.median(x[i] for x in v) for i in range(3))
    print(f"| {names[k]} | {u:.1f} | {s:.1f} | {u + s:.1f} | {w:.2f} |")
PY

if [ "$(nproc)" -ge 2 ]; then
  echo "== 2. p50 by where the three cores run, medians of $ROUNDS rounds" >&2
  pin() { local i=1; for c in "$@"; do taskset -p -c "$c" "$(basename "$(core_task "${PID[$i]}")")" > /dev/null; i=$((i + 1)); done; }
  for r in $(seq "$ROUNDS"); do
    for cfg in "0 0 0" "0-1 0-1 0-1" "0 1 1" "0 1 0"; do
      # shellcheck disable=SC2086
      pin $cfg
      echo "$cfg|$(fio_qd1 "${NBD[1]}" bench)" >> "$W/pin.txt"
    done
    echo "one node|$(fio_qd1 "$SOLO_NBD" default)" >> "$W/pin.txt"
  done
  pin 0 0 0
  python3 - "$W/pin.txt" <<'PY'
import sys, statistics as st
c = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split("|")
    c.setdefault(k, []).append(float(v.split()[1]))
print("| cores of nodes 1, 2, 3 on CPUs | p50 µs | min–max |")
print("|---|---|---|")
for k, v in c.items():
    print(f"| {k} | {st.median(v):.1f} | {min(v):.1f}–{max(v):.1f} |")
PY
fi

echo "== 3. at rest, 10 s" >&2
declare -A t0
for p in "${PID[@]}" "$ETCD_PID"; do t0[$p]=$(ticks "$p"); done
sleep 10
pct() { read -r u0 s0 <<< "$2"; read -r u1 s1 <<< "$(ticks "$1")"; awk -v t=$((u1 + s1 - u0 - s0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz / 10 * 100}'; }
for i in 1 2 3; do echo "idle node $i: $(pct "${PID[$i]}" "${t0[${PID[$i]}]}") % of a CPU"; done
echo "their etcd: $(pct "$ETCD_PID" "${t0[$ETCD_PID]}") % of a CPU"
kill "${PID[@]}"
wait "${PID[@]}" 2> /dev/null || true
sleep 2
e0=$(ticks "$ETCD_PID")
sleep 10
echo "etcd with no node: $(pct "$ETCD_PID" "$e0") % of a CPU"
