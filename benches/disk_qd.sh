#!/bin/bash
# The disk alone: fio 4 KiB random writes (io_uring, O_DIRECT) on a file in this directory's
# filesystem at queue depth 1 and 3, p50 completion latency. Three replicas on one machine
# put three concurrent writes on its one disk; this is what that costs before torus does
# anything (README, Performance, Replicated).
#   bash benches/disk_qd.sh [DIR]      # default: the current directory
set -euo pipefail
F=$(mktemp -p "${1:-.}" disk_qd.XXXX)
trap 'rm -f "$F"' EXIT
for qd in 1 3; do
  fio --name=disk --filename="$F" --size=512M --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring \
    --iodepth=$qd --runtime=6 --time_based --output-format=json 2>/dev/null |
    python3 -c "import json,sys; w=json.load(sys.stdin)['jobs'][0]['write']; print(f'QD$qd: {w[\"iops\"]:.0f} IOPS, p50 {w[\"clat_ns\"][\"percentile\"][\"50.000000\"]/1000:.1f} us')"
done
