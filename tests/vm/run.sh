#!/bin/bash
# The kernel's own NBD client against torusd, in a qemu guest: this machine's kernel has no
# nbd.ko, so a Debian kernel (bookworm-backports, which has nbd and ublk_drv) boots under
# software emulation with a tiny initramfs. torusd runs on the host; the guest reaches it at
# 10.0.2.2. Exits 0 only when the guest printed RESULT: PASS. About a minute (the kernel
# package, ~100 MB, is fetched once into $W).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W=${W:-/tmp/torus-kernel-vm}; mkdir -p "$W"; cd "$W"
export DEBIAN_FRONTEND=noninteractive
need="qemu-system-x86 busybox-static nbd-client kmod cpio e2fsprogs xz-utils fio"
missing=""
for p in $need; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "== vm: installing:$missing"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# The kernel, with private apt state: the system's apt configuration is left alone.
mkdir -p apt/lists/partial apt/cache/archives/partial
echo "deb http://deb.debian.org/debian bookworm-backports main" > apt/sources.list
A="-o Dir::Etc::SourceList=$W/apt/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$W/apt/lists -o Dir::Cache=$W/apt/cache"
if [ ! -e kernel.deb ]; then
  apt-get $A update -q >/dev/null
  KPKGNAME=$(apt-cache $A depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  apt-get $A download "$KPKGNAME" >/dev/null 2>&1
  mv linux-image-*.deb kernel.deb
fi
rm -rf kpkg; dpkg -x kernel.deb kpkg
KV=$(ls kpkg/lib/modules)
KPKG=$W/kpkg KV=$KV INIT=$HERE/init OUT=$W/initramfs.cpio.gz "$HERE/build-initramfs.sh"

# torusd on the host, on a free port, in its own data dir.
BIN=${TORUSD:-$ROOT/target/release/torusd}
[ -x "$BIN" ] || { echo "vm: $BIN is not built (cargo build --release)"; exit 1; }
rm -rf data; mkdir data
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ADMIN=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd data && exec "$BIN" --cores 2 --size 2G --nbd-listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN > torusd.out 2> torusd.log) &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving data/torusd.out 2>/dev/null && break; sleep 0.1; done
grep -q serving data/torusd.out || { echo "vm: torusd did not start"; cat data/torusd.log; exit 1; }

# qemu exits 0 even when the guest fails: the log decides.
timeout 300 qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -nographic -no-reboot \
  -kernel kpkg/boot/vmlinuz-$KV -initrd initramfs.cpio.gz \
  -append "console=ttyS0 quiet panic=-1 nbdport=$PORT" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 </dev/null > guest.log 2>&1 || true
grep -a -E '^T\+|RESULT' guest.log
kill -TERM $SRV; wait $SRV || { echo "vm: torusd did not exit cleanly"; cat data/torusd.log; exit 1; }
grep -a -q '^RESULT: PASS' guest.log || { echo "vm: guest test failed; log in $W/guest.log"; exit 1; }
echo "vm: kernel NBD client against torusd: PASS"
