#!/bin/bash
# What snapshots, dump and load cost on one node (the README's figures): a torusd in a temp
# dir, 1 GiB written with fio into a 2 GiB volume, then `torusctl snapshot create` timed three
# times (the command's start and the durable commit included), then a 1 GiB volume with
# 200 MiB written dumped to a file and loaded into a new volume, timed.
#   bash benches/volume_services.sh
set -euo pipefail
B="$(cd "$(dirname "$0")/.." && pwd)/target/release"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
NBD=$(port); ADMIN=$(port)
(cd "$W" && exec "$B/torusd" --cores 2 --size 6G --default-volume-size 2G \
  --nbd-listen "127.0.0.1:$NBD" --admin-listen "127.0.0.1:$ADMIN" > out 2> log) &
until grep -q serving "$W/out" 2>/dev/null; do sleep 0.1; done
C="$B/torusctl --server http://127.0.0.1:$ADMIN"
ms() { local t0 t1; t0=$(date +%s%N); "$@" > /dev/null 2>&1; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$NBD/default" --rw=write --bs=1M --iodepth=8 --size=1G > /dev/null
for i in 1 2 3; do echo "snapshot create, 1 GiB written: $(ms $C snapshot create default@s$i) ms"; done
$C volume create d 1G > /dev/null
fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$NBD/d" --rw=write --bs=1M --iodepth=8 --size=200M > /dev/null
echo "dump of 1 GiB with 200 MiB written, to a file: $(ms $C dump d "$W/d.img") ms"
echo "load of that image into a new volume: $(ms $C load "$W/d.img" d2) ms"
