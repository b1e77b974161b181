//! `GET /metrics`: the node's counters and gauges in the Prometheus text exposition format
//! (version 0.0.4): per core (I/O, journal, disk, queue depth, slots, latency histograms),
//! per NBD core (connections, requests), per volume (size, used bytes) and, on a cluster,
//! peer traffic, placement group states, the map epoch and how long each down node has been
//! down. Every name starts with `torus_`; these names are what dashboards and alerts use, so
//! they do not change.

use crate::node::Node;
use std::fmt::Write as _;

/// The metrics text of `node`.
pub fn render(node: &Node) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = node.engine.stats();
    let mut out = String::new();
    let mut counter =
        |name: &str, help: &str, kind: &str, values: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(
                out,
                "# HELP torus_{name} {help}\n# TYPE torus_{name} {kind}"
            );
            for (labels, v) in values {
                let _ = writeln!(out, "torus_{name}{{{labels}}} {v}");
            }
        };
    macro_rules! per_core {
        ($name:expr, $help:expr, $kind:expr, $field:ident) => {
            counter(
                $name,
                $help,
                $kind,
                &mut stats
                    .iter()
                    .map(|s| (format!("core=\"{}\"", s.core), s.$field)),
            )
        };
    }
    per_core!(
        "reads_total",
        "Read pieces completed by the core that owns them.",
        "counter",
        reads
    );
    per_core!("writes_total", "Write pieces completed.", "counter", writes);
    per_core!(
        "zeroes_total",
        "Trim and write-zeroes pieces completed.",
        "counter",
        zeroes
    );
    per_core!("flushes_total", "Flushes answered.", "counter", flushes);
    per_core!(
        "read_bytes_total",
        "Bytes read by clients.",
        "counter",
        bytes_read
    );
    per_core!(
        "written_bytes_total",
        "Bytes written by clients.",
        "counter",
        bytes_written
    );
    per_core!(
        "commits_total",
        "Journal commits (group commit: one for many flushes).",
        "counter",
        commits
    );
    per_core!(
        "checkpoints_total",
        "Checkpoints written.",
        "counter",
        checkpoints
    );
    per_core!(
        "checksum_errors_total",
        "Blocks whose crc32c did not match on read (answered EIO).",
        "counter",
        checksum_errors
    );
    per_core!(
        "io_errors_total",
        "Failed disk operations.",
        "counter",
        io_errors
    );
    per_core!(
        "disk_write_ops_total",
        "Data writes sent to the disk; consecutive slots of many pieces merge into one.",
        "counter",
        disk_write_ops
    );
    per_core!(
        "disk_sync_write_ops_total",
        "Of those, written with pwrite by a core with nothing else in flight (queue depth 1).",
        "counter",
        sync_write_ops
    );
    per_core!(
        "queue_depth",
        "Pieces in flight on the core.",
        "gauge",
        pieces_in_flight
    );
    per_core!(
        "slots_total",
        "Data slots (4 KiB) of the core's region.",
        "gauge",
        slots_total
    );
    per_core!("slots_free", "Free data slots.", "gauge", slots_free);
    let f = &node.frontend.per_core[..node.engine.cores().min(node.frontend.per_core.len())];
    counter(
        "nbd_connections",
        "Open NBD connections owned by the core.",
        "gauge",
        &mut f
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("core=\"{i}\""), c.connections.load(Relaxed))),
    );
    counter(
        "nbd_requests_in_flight",
        "NBD requests received and not yet answered.",
        "gauge",
        &mut f
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("core=\"{i}\""), c.requests_in_flight.load(Relaxed))),
    );
    counter(
        "nbd_requests_total",
        "NBD requests received.",
        "counter",
        &mut f
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("core=\"{i}\""), c.requests.load(Relaxed))),
    );
    counter(
        "nbd_bad_requests_total",
        "NBD requests refused as malformed.",
        "counter",
        &mut f
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("core=\"{i}\""), c.bad_requests.load(Relaxed))),
    );
    let used = Node::used_by_volume(&stats);
    let volumes = node.metadata.volumes();
    counter(
        "volume_size_bytes",
        "Provisioned size of each volume.",
        "gauge",
        &mut volumes
            .iter()
            .map(|v| (format!("volume=\"{}\"", v.name), v.size_bytes)),
    );
    counter(
        "volume_used_bytes",
        "Bytes of each volume that hold data.",
        "gauge",
        &mut volumes.iter().map(|v| {
            (
                format!("volume=\"{}\"", v.name),
                used.get(&v.id).copied().unwrap_or(0),
            )
        }),
    );
    const BOUNDS_US: [u64; 12] = [
        50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
    ];
    let _ = writeln!(out, "# HELP torus_latency_us Time from a piece reaching its core to its answer, in microseconds.\n# TYPE torus_latency_us histogram");
    for s in &stats {
        for (op, h) in [("read", &s.latency_read_us), ("write", &s.latency_write_us)] {
            for b in BOUNDS_US {
                let n = h
                    .iter_recorded()
                    .filter(|v| v.value_iterated_to() <= b)
                    .map(|v| v.count_at_value())
                    .sum::<u64>();
                let _ = writeln!(
                    out,
                    "torus_latency_us_bucket{{core=\"{}\",op=\"{op}\",le=\"{b}\"}} {n}",
                    s.core
                );
            }
            let _ = writeln!(
                out,
                "torus_latency_us_bucket{{core=\"{}\",op=\"{op}\",le=\"+Inf\"}} {}",
                s.core,
                h.len()
            );
            let sum: f64 = h.mean() * h.len() as f64;
            let _ = writeln!(
                out,
                "torus_latency_us_sum{{core=\"{}\",op=\"{op}\"}} {}",
                s.core, sum as u64
            );
            let _ = writeln!(
                out,
                "torus_latency_us_count{{core=\"{}\",op=\"{op}\"}} {}",
                s.core,
                h.len()
            );
        }
    }
    #[cfg(feature = "counters")]
    {
        let _ = writeln!(
            out,
            "# HELP torus_counted_allocations_total Allocations by this process (a counters build)\n# TYPE torus_counted_allocations_total counter\ntorus_counted_allocations_total {}",
            torus_testkit::alloc::allocations()
        );
        let _ = writeln!(
            out,
            "# HELP torus_counted_locks_total Locks the cluster took (a counters build)\n# TYPE torus_counted_locks_total counter\ntorus_counted_locks_total {}",
            torus_net::counted::locks_taken()
        );
    }
    if let Some(c) = &node.cluster {
        let p = &torus_net::peer::COUNTERS;
        for (name, help, v) in [
            (
                "torus_peer_frames_sent_total",
                "Frames sent to other nodes (each one send)",
                &p.frames_sent,
            ),
            (
                "torus_peer_entries_sent_total",
                "Requests and replies sent to other nodes",
                &p.entries_sent,
            ),
            (
                "torus_peer_bytes_sent_total",
                "Bytes sent to other nodes",
                &p.bytes_sent,
            ),
            (
                "torus_peer_frames_received_total",
                "Frames received from other nodes",
                &p.frames_received,
            ),
            (
                "torus_peer_entries_received_total",
                "Requests and replies received from other nodes",
                &p.entries_received,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP torus_reads_answered_by_replica_total Reads whose local copy failed its checksum, answered from another replica\n# TYPE torus_reads_answered_by_replica_total counter\ntorus_reads_answered_by_replica_total {}", c.repaired_reads());
        let h = c.health();
        let _ = writeln!(
            out,
            "# HELP torus_pgs Placement groups by state\n# TYPE torus_pgs gauge"
        );
        for (state, n) in [
            ("clean", h.clean),
            ("degraded", h.degraded),
            ("recovering", h.recovering),
            ("down", h.down),
        ] {
            let _ = writeln!(out, "torus_pgs{{state=\"{state}\"}} {n}");
        }
        let map = c.map();
        let _ = writeln!(out, "# HELP torus_map_epoch Cluster map epoch this node has\n# TYPE torus_map_epoch gauge\ntorus_map_epoch {}", map.epoch);
        let now_ms = torus_net::cluster::now_ms();
        let _ = writeln!(out, "# HELP torus_node_down_seconds How long each node the cluster map counts as down has been down, as the map records it\n# TYPE torus_node_down_seconds gauge");
        for (name, n) in &map.nodes {
            if let Some(ms) = n.down_for_ms(now_ms) {
                let _ = writeln!(
                    out,
                    "torus_node_down_seconds{{node=\"{}\"}} {:.1}",
                    label_value(name),
                    ms as f64 / 1000.0
                );
            }
        }
    }
    out
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
