#!/bin/bash
# Builds the guest's initramfs: busybox-static, the kernel modules the tests need (with their
# dependencies, decompressed, built-ins skipped), and host binaries with the libraries ldd
# lists. Adapted from the project's kernel-vm recipe.
set -euo pipefail
KPKG=${KPKG:?dpkg -x of a linux-image .deb}
KV=${KV:-$(ls "$KPKG/lib/modules" | head -1)}
OUT=${OUT:?where the initramfs goes}
INIT=${INIT:?the guest init script}
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
MODS="nbd ext4 crc32c_generic virtio_net virtio_pci ${EXTRA_MODS:-}"
BINS="/usr/sbin/mke2fs /usr/sbin/e2fsck /usr/bin/fio"

mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,lib/modules/$KV,lib64,usr/lib/x86_64-linux-gnu}
cp /bin/busybox "$ROOT/bin/busybox"
# `busybox --list` includes busybox itself: a self-link would loop (init fails with -40).
for a in $(/bin/busybox --list | grep -vx busybox); do ln -sf busybox "$ROOT/bin/$a"; done
ln -sf ../bin/busybox "$ROOT/sbin/modprobe"

depmod -b "$KPKG" "$KV"
copy_mod() {
  local m=$1 path rel
  path=$(modinfo -b "$KPKG" -k "$KV" -n "$m") || { echo "no module $m"; exit 1; }
  [ "$path" = "(builtin)" ] && return 0
  for d in $(modinfo -b "$KPKG" -k "$KV" -F depends "$m" | tr , ' '); do copy_mod "$d"; done
  rel=${path#$KPKG/lib/modules/$KV/}
  mkdir -p "$ROOT/lib/modules/$KV/$(dirname "$rel")"
  cp "$path" "$ROOT/lib/modules/$KV/$rel"
  case $rel in *.xz) xz -df "$ROOT/lib/modules/$KV/$rel";; *.zst) zstd -qdf --rm "$ROOT/lib/modules/$KV/$rel";; esac
}
for m in $MODS; do copy_mod "$m"; done
cp "$KPKG/lib/modules/$KV"/modules.{order,builtin,builtin.modinfo} "$ROOT/lib/modules/$KV/"
depmod -b "$ROOT" "$KV"

# copy_bin PATH [PATH-IN-GUEST]
copy_bin() {
  local b=$1 to=${2:-$1}
  mkdir -p "$ROOT/$(dirname "$to")"; cp -L "$b" "$ROOT/$to"
  for l in $(ldd "$b" | grep -o '/[^ ]*'); do mkdir -p "$ROOT/$(dirname "$l")"; cp -L "$l" "$ROOT/$l"; done
}
for b in $BINS; do copy_bin "$b"; done
for b in ${EXTRA_BINS:-}; do copy_bin "$b" "/usr/bin/$(basename "$b")"; done
ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"
cp "$INIT" "$ROOT/init"; chmod +x "$ROOT/init"
cp /etc/mke2fs.conf "$ROOT/etc/"
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
