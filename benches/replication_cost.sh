#!/bin/bash
# What a replicated write costs: three torusd nodes on this machine (etcd in a temp dir), a
# replicas=3 volume, fio 4 KiB random writes through node 1 at the given queue depth; prints
# requests per frame from the nodes' /metrics and the syscalls per write from `strace -c -f`
# (Debian package strace) on node 1 and node 2 over a few seconds of the run.
#   bash benches/replication_cost.sh [QD]      # default 32; the README's figures used 32 and 1
QD=${1:-32}
. "$(dirname "$0")/lib.sh"
start_etcd etcd
declare -a NBD ADMIN PID
for i in 1 2 3; do
  start_cluster_node "n$i" --size 2G --cores 1
  NBD[$i]=$NODE_NBD; ADMIN[$i]=$NODE_ADMIN; PID[$i]=$NODE_PID
done
until ctl "${ADMIN[1]}" status > /dev/null 2>&1; do sleep 1; done
ctl "${ADMIN[1]}" volume create bench 1G --replicas 3 > /dev/null
metric() { curl -s "http://127.0.0.1:${ADMIN[$1]}/metrics" | awk -v m="$2" '$1 ~ "^"m {s+=$2} END {print s+0}'; }
fio --name=cost --ioengine=nbd --uri="nbd://127.0.0.1:${NBD[1]}/bench" --rw=randwrite --bs=4k \
  --iodepth="$QD" --size=512M --time_based --runtime=12 > /dev/null &
FIO=$!
sleep 3
w0=$(metric 1 torus_writes_total)
timeout 4 strace -c -f -p "${PID[1]}" -o "$W/s1.txt" 2> /dev/null &
S1=$!
timeout 4 strace -c -f -p "${PID[2]}" -o "$W/s2.txt" 2> /dev/null &
S2=$!
wait $S1 $S2 || true
w1=$(metric 1 torus_writes_total)
wait $FIO || true
writes=$((w1 - w0))
for i in 1 2; do
  echo "node $i: requests sent per frame $(awk "BEGIN {printf \"%.1f\", $(metric $i torus_peer_entries_sent_total) / $(metric $i torus_peer_frames_sent_total)}")"
  calls=$(awk '$NF == "total" {print $4}' "$W/s$i.txt")
  echo "node $i: $calls syscalls for $writes writes under strace: $(awk "BEGIN {printf \"%.1f\", $calls / $writes}") per write"
  awk -v w="$writes" '$NF != "total" && $4 ~ /^[0-9]+$/ && $4 > w / 20 {printf "    %-16s %5.2f per write\n", $NF, $4 / w}' "$W/s$i.txt"
done
