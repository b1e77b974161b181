# Sourced by the benches' shell scripts that start torus processes on this machine: the
# release binaries ($B), a work dir ($W) removed at exit with every process started, free
# loopback ports, etcd and torusd nodes.
set -euo pipefail
B="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/release"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ctl() { "$B/torusctl" --server "http://127.0.0.1:$1" "${@:2}"; }

# start_etcd NAME: etcd with its data in $W/NAME on free loopback ports, once it answers;
# sets ETCD (its URL) and ETCD_PID.
start_etcd() {
  local c p
  c=$(port); p=$(port)
  etcd --data-dir "$W/$1" --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "default=http://127.0.0.1:$p" > "$W/$1.log" 2>&1 &
  ETCD_PID=$!
  ETCD="http://127.0.0.1:$c"
  until curl -sf "$ETCD/health" > /dev/null; do sleep 0.2; done
}

# start_node NAME [torusd flags...]: torusd with its data in $W/NAME on free NBD and admin
# ports (its output in $W/NAME.out and .log); sets NODE_NBD, NODE_ADMIN and NODE_PID. A
# command in NODE_WRAP (say `chrt -f 10`) runs torusd; it must exec it (same PID).
start_node() {
  local name=$1
  shift
  NODE_NBD=$(port); NODE_ADMIN=$(port)
  ${NODE_WRAP:-} "$B/torusd" --data-dir "$W/$name" --nbd-listen "127.0.0.1:$NODE_NBD" --admin-listen "127.0.0.1:$NODE_ADMIN" "$@" \
    > "$W/$name.out" 2> "$W/$name.log" &
  NODE_PID=$!
}

# start_cluster_node NAME [torusd flags...]: start_node as cluster node NAME of $ETCD.
start_cluster_node() {
  local name=$1
  shift
  start_node "$name" --etcd "$ETCD" --node-name "$name" --peer-listen "127.0.0.1:$(port)" "$@"
}
