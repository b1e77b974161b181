#!/bin/bash
# The kernel frontends side by side, in the qemu guest of tests/vm/run.sh (software
# emulation: compare ratios, not absolute numbers): fio through ublk (/dev/ublkbN), the
# kernel's NBD client (/dev/nbdN via torusblk nbd) and fio's own NBD engine (libnbd, torus's
# native path), all against one torusd inside the guest, same volume, interleaved, ROUNDS
# rounds (default 3). Prints a markdown table of medians and ratios to the NBD engine.
#   bash benches/kernel_frontends.sh            # then see /tmp/torus-kernel-vm/figures.md
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-/tmp/torus-kernel-vm}
export W ROUNDS=${ROUNDS:-3} PARTS=figures
bash "$ROOT/tests/vm/run.sh" > "$W/bench.log" 2>&1 || { tail -30 "$W/bench.log"; exit 1; }
python3 - "$W/figures.txt" <<'PY' | tee "$W/figures.md"
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = dict(kv.split("=", 1) for kv in line.split()[1:])
    key = (f["rw"], f["bs"], f["qd"])
    if f["rw"].endswith("write"):
        iops, bw, p50 = float(f["write_iops"]), float(f["write_bw_kib"]), float(f["write_p50_us"])
    else:
        iops, bw, p50 = float(f["read_iops"]), float(f["read_bw_kib"]), float(f["read_p50_us"])
    rows[(key, f["path"])].append((iops, bw, p50))
paths = ["ublk", "nbd-kernel", "nbd-engine"]
print("| workload | path | IOPS (median) | MiB/s | p50 µs | IOPS vs NBD engine |")
print("|---|---|---:|---:|---:|---:|")
for key in sorted({k for k, _ in rows}, key=lambda k: (k[1] != "4k", k[0])):
    base = statistics.median(r[0] for r in rows[(key, "nbd-engine")])
    for p in paths:
        r = rows[(key, p)]
        iops = statistics.median(x[0] for x in r)
        print(f"| {key[0]} {key[1]} QD{key[2]} | {p} | {iops:.0f} | {statistics.median(x[1] for x in r)/1024:.1f} | "
              f"{statistics.median(x[2] for x in r):.0f} | {iops/base:.2f}× |")
print(f"\n{len(next(iter(rows.values())))} rounds, interleaved; fio 4 s per run.")
PY
