#!/bin/bash
# What recording flushes in etcd costs (README, "Revival of a lost PG"): every flush records
# the newest map epoch its process has seen, before it is answered, but only the first flush
# after each new map writes to etcd. A three-node replicas=3 cluster; fio 4 KiB random writes
# at QD1 with an fsync after each through node 1, for RUNTIME seconds with the map unchanged,
# then again while node 3 is killed and started again (new maps). Prints, per phase, the
# fsyncs fio made and the etcd writes of the flush records (the keys' version counts).
#   bash benches/flush_records.sh            # needs fio, etcd, curl
RUNTIME=${RUNTIME:-10}
. "$(dirname "$0")/lib.sh"
start_etcd etcd
for i in 1 2 3; do
  start_cluster_node "n$i" --size 2G --cores 1
  [ $i = 1 ] && { NBD1=$NODE_NBD; A1=$NODE_ADMIN; }
  [ $i = 3 ] && N3=$NODE_PID
done
until ctl "$A1" status > /dev/null 2>&1; do sleep 1; done
ctl "$A1" volume create bench 1G --replicas 3 > /dev/null
records() {  # -> etcd writes of every flush record so far (the sum of the keys' versions)
  local b64 end
  b64=$(printf '/torus/flushed/' | base64 -w0)
  end=$(printf '/torus/flushed0' | base64 -w0)
  curl -sf "$ETCD/v3/kv/range" -d "{\"key\":\"$b64\",\"range_end\":\"$end\"}" |
    python3 -c 'import json,sys; print(sum(int(k.get("version", 0)) for k in json.load(sys.stdin).get("kvs", [])))'
}
epoch() { ctl "$A1" status 2> /dev/null | sed -n 's/.*map epoch \([0-9]*\).*/\1/p'; }
fio_sync() {  # -> fsyncs done, p50 of the write (us), p50 of the fsync (us)
  fio --name=q --ioengine=nbd --uri="nbd://127.0.0.1:$NBD1/bench" --rw=randwrite --bs=4k \
    --iodepth=1 --fsync=1 --size=256M --time_based --runtime="$RUNTIME" --output-format=json \
    --output="$W/fio.json" > /dev/null
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]
s=j["sync"]; w=j["write"]
print(s["total_ios"], w["clat_ns"]["percentile"]["50.000000"]/1000, s["lat_ns"]["percentile"]["50.000000"]/1000)' "$W/fio.json"
}
r0=$(records); e0=$(epoch)
read -r syncs wp50 sp50 <<< "$(fio_sync)"
r1=$(records); e1=$(epoch)
echo "map unchanged:      $syncs fsyncs (write p50 ${wp50} us, fsync p50 ${sp50} us); map epochs $e0 -> $e1; flush-record etcd writes $((r1 - r0))"
fio_sync > "$W/phase2.txt" &
job=$!
sleep 2
kill -9 "$N3"
sleep 2
start_cluster_node n3 --size 2G --cores 1
wait "$job"
read -r syncs wp50 sp50 < "$W/phase2.txt"
until ctl "$A1" status > /dev/null 2>&1; do sleep 1; done
r2=$(records); e2=$(epoch)
echo "node 3 killed, back: $syncs fsyncs (write p50 ${wp50} us, fsync p50 ${sp50} us); map epochs $e1 -> $e2; flush-record etcd writes $((r2 - r1)) (until clean again)"
