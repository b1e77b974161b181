#!/bin/bash
# The README's first command, as a new user runs it: `cargo run --release --bin torusd` in an
# empty directory must print the serving line, and nbdinfo must then see the 1 GiB volume
# `default`. Run by tests/run.sh after the build; uses the default ports 10809 and 4321.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir=$(mktemp -d)
out="$dir/stdout"
cleanup() {
  [ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# cargo run replaces itself with torusd, so $pid is torusd's.
(cd "$dir" && exec cargo run -q --manifest-path "$repo/Cargo.toml" --release --bin torusd) \
  >"$out" 2>"$dir/stderr" &
pid=$!
for _ in $(seq 600); do
  grep -q "serving volume" "$out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr"; echo "FAIL: torusd exited before serving"; exit 1; }
  sleep 0.1
done
grep -q "serving volume 'default' (1 GiB) at nbd://127.0.0.1:10809/default" "$out" ||
  { cat "$out" "$dir/stderr"; echo "FAIL: no serving line within 60 s"; exit 1; }
cat "$out"
size=$(nbdinfo --size nbd://127.0.0.1:10809/default)
[ "$size" = 1073741824 ] || { echo "FAIL: nbdinfo says the default volume has $size bytes"; exit 1; }
echo "nbdinfo nbd://127.0.0.1:10809/default: $size bytes"
kill -TERM "$pid"
wait "$pid" || { echo "FAIL: torusd did not exit 0 on SIGTERM"; exit 1; }
pid=
echo "PASS: the README's first command serves the 1 GiB default volume"
