//! What the cluster tests (`tests/tests/cluster_*.rs`) share: fio over a region of a volume,
//! and the peers a node lists (`torusctl peers --json`).

use crate::{fio_verify, Torusd};
use std::time::{Duration, Instant};

/// fio (`fio_verify`) over `size` bytes at `offset` of `uri` with a fixed seed, so that a run
/// with `--verify_only=1` checks what an earlier run over the same region wrote; `extra` adds
/// fio options.
pub fn fio(uri: &str, offset: &str, size: &str, extra: &[&str]) -> serde_json::Value {
    let offset = format!("--offset={offset}");
    let size = format!("--size={size}");
    let mut args = vec![offset.as_str(), size.as_str(), "--randseed=777"];
    args.extend_from_slice(extra);
    fio_verify(uri, &args)
}

/// What `node` lists with `torusctl peers --json`.
pub fn peers(node: &Torusd) -> serde_json::Value {
    serde_json::from_str(&node.torusctl_ok(&["peers", "--json"])).unwrap()
}

/// (name, `field`) of every peer `node` lists.
pub fn peer_values(node: &Torusd, field: &str) -> Vec<(String, Option<u64>)> {
    peers(node)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p[field].as_u64()))
        .collect()
}

/// The names of the peers `node` lists.
pub fn peer_names(node: &Torusd) -> Vec<String> {
    peer_values(node, "name")
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// `field` of the peer called `name`, as `node` lists it; None if it is not listed.
pub fn peer_value(node: &Torusd, name: &str, field: &str) -> Option<Option<u64>> {
    peer_values(node, field)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// Waits until `node` lists peer `name` as down.
pub fn wait_peer_down(node: &Torusd, name: &str) {
    let start = Instant::now();
    while !matches!(peer_value(node, name, "down_for_ms"), Some(Some(_))) {
        assert!(start.elapsed() < Duration::from_secs(60), "{name} not down");
        std::thread::sleep(Duration::from_millis(200));
    }
}
