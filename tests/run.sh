#!/bin/bash
# The test command of torus (the README's second command; .ci/run runs exactly this).
# On a fresh Debian machine it installs the real clients the tests drive, then runs the lints
# and every test: unit tests, engine tests, the process-level tests in tests/, and the kernel's
# NBD client (torusblk nbd) and ublk (torusblk ublk) against torusd in a qemu guest (tests/vm/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages="fio libnbd-bin nbdkit nbdfuse python3-libnbd qemu-utils e2fsprogs fuse3 mount curl fonts-dejavu-core etcd-server iproute2 nftables"
missing=""
for p in $need_packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "== installing:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

echo "== lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -q -- -D warnings

echo "== build"
cargo build --workspace --release -q

echo "== tests"
# Process-level tests start several torusd at once; two test threads fit this 2-core machine.
cargo test --workspace --release -- --test-threads=2

echo "== torusblk nbd and torusblk ublk against a real kernel, in a qemu guest"
bash tests/vm/run.sh
