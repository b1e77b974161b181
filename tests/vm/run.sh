#!/bin/bash
# torus's kernel frontends against a real kernel, in a qemu guest: this machine's kernel has
# neither nbd.ko nor ublk_drv, so a Debian kernel (bookworm-backports, which has both) boots
# under software emulation with a tiny initramfs holding torusd, torusblk and fio.
#   - `torusblk nbd` in the guest attaches the kernel's NBD client to torusd on the host
#     (10.0.2.2 from the guest); the host restarts that torusd when the guest asks (a line
#     "VM-REQUEST: restart-host-torusd" on the console) while a filesystem is mounted.
#     The host also grows the volume when asked ("VM-REQUEST: resize-host-volume"): the
#     device must follow.
#   - `torusblk ublk` against a torusd inside the guest, restarted there.
#   - fio figures: ublk vs kernel NBD vs fio's NBD engine, same guest, same volume.
# Exits 0 only when the guest printed RESULT: PASS. PARTS=nbd,ublk,figures picks parts; the
# figures (ROUNDS rounds, 1 by default; benches/kernel_frontends.sh runs more) go to
# $W/figures.txt. About 4 minutes (the kernel package, ~100 MB, is fetched once into $W).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W=${W:-/tmp/torus-kernel-vm}; mkdir -p "$W"; cd "$W"
export DEBIAN_FRONTEND=noninteractive
need="qemu-system-x86 busybox-static kmod cpio e2fsprogs xz-utils fio"
PARTS=${PARTS:-nbd,ublk,figures}
ROUNDS=${ROUNDS:-1}
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
# torus's binaries go into the guest stripped (the release build keeps debug info).
BINDIR=${BINDIR:-$ROOT/target/release}
rm -rf bin; mkdir bin
for b in torusd torusblk; do
  [ -x "$BINDIR/$b" ] || { echo "vm: $BINDIR/$b is not built (cargo build --release)"; exit 1; }
  strip -o bin/$b "$BINDIR/$b"
done
KPKG=$W/kpkg KV=$KV INIT=$HERE/init OUT=$W/initramfs.cpio.gz EXTRA_MODS=ublk_drv \
  EXTRA_BINS="$W/bin/torusd $W/bin/torusblk" "$HERE/build-initramfs.sh"

# torusd on the host, on a free port, in its own data dir.
rm -rf data; mkdir data
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ADMIN=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_host_torusd() {
  : > data/torusd.out
  (cd data && exec "$BINDIR/torusd" --cores 2 --size 2G --sparse --nbd-listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN >> torusd.out 2>> torusd.log) &
  SRV=$!
  for _ in $(seq 100); do grep -q serving data/torusd.out 2>/dev/null && break; sleep 0.1; done
  grep -q serving data/torusd.out || { echo "vm: torusd did not start"; cat data/torusd.log; exit 1; }
}
start_host_torusd
trap 'kill $SRV $QEMU 2>/dev/null || true' EXIT

# qemu exits 0 even when the guest fails: the log decides.
boot_guest() {
  timeout 600 qemu-system-x86_64 -accel tcg -m 3072 -smp 2 -nographic -no-reboot \
    -kernel kpkg/boot/vmlinuz-$KV -initrd initramfs.cpio.gz \
    -append "console=ttyS0 quiet panic=-1 nbdport=$PORT adminport=$ADMIN parts=$PARTS rounds=$ROUNDS" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 </dev/null > guest.log 2>&1 &
  QEMU=$!
  # The guest asks for the host's torusd to be restarted under its mounted filesystem.
  restarted=0; resized=0
  while kill -0 $QEMU 2>/dev/null; do
    if [ $resized = 0 ] && grep -a -q '^VM-REQUEST: resize-host-volume' guest.log; then
      # (Already 2 GiB when the guest boots a second time: the guest checks the size.)
      "$BINDIR/torusctl" --server "http://127.0.0.1:$ADMIN" volume resize default 2G > /dev/null || true
      resized=1
    fi
    if [ $restarted = 0 ] && grep -a -q '^VM-REQUEST: restart-host-torusd' guest.log; then
      kill -TERM $SRV; wait $SRV || { echo "vm: host torusd did not exit cleanly"; tail data/torusd.log; exit 1; }
      sleep 1
      start_host_torusd; restarted=1
      echo "vm: host torusd restarted under the guest's mounted filesystem"
    fi
    sleep 0.2
  done
  wait $QEMU || true
}
boot_guest
# The guest's kernel crashing in its own code (a "kernel BUG" or an oops) is not torus
# failing: a process cannot cause one by any system call it makes. Seen once, on Debian's
# 6.12.95: a double free in io_uring's ring teardown (io_req_caches_free) as torusd exited with
# its ublk commands armed. Said, with the kernel's trace, and the guest booted once more.
if ! grep -a -q '^RESULT: PASS' guest.log && grep -a -q -E 'kernel BUG at|Oops: ' guest.log; then
  echo "vm: the guest's kernel ($KV) crashed in its own code; its trace:"
  grep -a -E -A24 'kernel BUG at|Oops: ' guest.log | head -40
  cp guest.log guest-kernel-crash.log
  echo "vm: booting the guest once more (that log kept in $W/guest-kernel-crash.log)"
  boot_guest
fi
grep -a -E '^T\+|RESULT|FIGURE' guest.log || { echo "vm: the guest printed no progress; the end of its log:"; tail -60 guest.log; exit 1; }
grep -a '^FIGURE' guest.log > figures.txt || true
kill -TERM $SRV; wait $SRV || { echo "vm: torusd did not exit cleanly"; cat data/torusd.log; exit 1; }
grep -a -q '^RESULT: PASS' guest.log || { echo "vm: guest test failed; log in $W/guest.log"; exit 1; }
echo "vm: torusblk nbd (kernel NBD client) and torusblk ublk against torusd: PASS ($PARTS)"
