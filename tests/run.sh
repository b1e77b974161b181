#!/bin/bash
# The test command of torus (the README's second command; .ci/run runs exactly this).
# On a fresh Debian machine it installs the real clients the tests drive, then runs the lints
# and every test: unit tests, engine tests, the process-level tests in tests/, and the kernel's
# NBD client (torusblk nbd) and ublk (torusblk ublk) against torusd in a qemu guest (tests/vm/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages="fio libnbd-bin nbdkit nbdfuse python3-libnbd qemu-utils e2fsprogs fuse3 mount curl fonts-dejavu-core etcd-server iproute2 nftables systemd binutils"
missing=""
for p in $need_packages; do
  # A virtual package where libnbd-bin provides it (Debian 12): dpkg never lists it installed.
  [ "$p" = nbdfuse ] && command -v nbdfuse >/dev/null && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ -n "$missing" ]; then
  echo "== installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# Runs a command with protoc hidden: PATH's folders that hold one are replaced by copies made
# of symlinks to everything else in them, and PROTOC is unset. Building torus needs nothing
# but Rust (docs/architecture.md#building-without-protoc); a dependency that wants protoc
# fails the build here even on a machine that has it.
without_protoc() {
  local shadow path="" d f
  shadow=$(mktemp -d)
  IFS=: read -ra dirs <<<"$PATH"
  for d in "${dirs[@]}"; do
    if [ -e "$d/protoc" ]; then
      mkdir -p "$shadow/$d"
      for f in "$d"/*; do [ "${f##*/}" = protoc ] || ln -s "$f" "$shadow/$d/"; done
      d="$shadow/$d"
    fi
    path="$path:$d"
  done
  if env -u PROTOC PATH="${path#:}" sh -c 'command -v protoc' >/dev/null; then
    echo "protoc is still reachable"; return 1
  fi
  env -u PROTOC PATH="${path#:}" "$@"
  local rc=$?
  rm -rf "$shadow"
  return $rc
}

echo "== docs: README at most 300 lines, every relative link resolves"
lines=$(wc -l <README.md)
[ "$lines" -le 300 ] || { echo "README.md has $lines lines (at most 300: depth goes in docs/)"; exit 1; }
python3 tests/check_links.py

echo "== structure: no import cycle, no source file over 800 lines before its tests"
python3 tests/check_structure.py

echo "== generated gRPC code is what its .proto files make"
cargo run -q -p torus-codegen -- --check

echo "== lints (protoc hidden)"
cargo fmt --all -- --check
without_protoc cargo clippy --workspace --all-targets --release -q -- -D warnings

echo "== build (protoc hidden)"
without_protoc cargo build --workspace --release -q
# torusd with the test-only fault switches, for the tests that show their checks catch them.
without_protoc cargo build --release -q -p torus-tools --features testing --bin torusd-testing
if strings target/release/torusd | grep -q TORUS_TESTING_; then
  echo "target/release/torusd holds a test-only fault switch"; exit 1
fi

echo "== the README's first command"
bash tests/first_command.sh

echo "== the Debian package and the systemd unit"
command -v cargo-deb >/dev/null || cargo install -q --locked cargo-deb --version 3.8.0
rm -rf target/debian
cargo deb -q -p torus-tools --no-build >/dev/null
deb=$(ls target/debian/torus_*.deb)
contents=$(dpkg-deb -c "$deb")
for f in usr/bin/torusd usr/bin/torusctl usr/bin/torusblk usr/lib/systemd/system/torusd.service etc/torus/torusd.toml; do
  grep -q " \./$f\$" <<<"$contents" || { echo "$deb lacks $f:"; echo "$contents"; exit 1; }
done
echo "$deb holds the three binaries, the unit and the example config"
$SUDO dpkg -i "$deb" >/dev/null
trap '$SUDO dpkg -r torus >/dev/null 2>&1 || true' EXIT
/usr/bin/torusd --version
systemd-analyze verify deploy/systemd/*.service
echo "systemd-analyze verify deploy/systemd/*.service: ok"
$SUDO dpkg -r torus >/dev/null
trap - EXIT

echo "== tests"
# Process-level tests start several torusd at once; two test threads fit this 2-core machine.
cargo test --workspace --release -- --test-threads=2

echo "== torusblk nbd and torusblk ublk against a real kernel, in a qemu guest"
bash tests/vm/run.sh
