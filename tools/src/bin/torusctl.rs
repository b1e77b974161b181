//! torusctl: the admin client. Talks to a node's admin HTTP API.

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use torus_net::cluster::{PeerView, ScrubReport};
use torus_tools::admin::{SnapshotView, StatusView, VolumeView};
use torus_tools::client::call;
use torus_tools::size::{human, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "torusctl",
    version,
    about = "Manage torus volumes through a node's admin API"
)]
struct Args {
    /// Admin API of any node.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:4321",
        value_name = "URL"
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, delete and resize volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Node and cluster health; exits 0 only when healthy and every PG is clean.
    Status,
    /// Cluster nodes: address, id, capacity, used, state, last heartbeat.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read every copy of a volume on every node (each block's crc32c is checked) and
    /// rewrite bad copies from a good replica; exits 0 only when nothing is left bad.
    Scrub { volume: String },
    /// Cluster membership changes.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Point-in-time, read-only copies of a volume (VOLUME@SNAPSHOT); they cost no space until
    /// the volume is overwritten, and are served over NBD as export VOLUME@SNAPSHOT.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// A writable volume that starts as a snapshot and shares its unchanged blocks:
    /// torusctl clone db@monday db-test
    Clone { snapshot: String, name: String },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a snapshot: torusctl snapshot create db@before-upgrade
    Create { name: String },
    /// List snapshots (of one volume, or all) with the space each alone holds.
    List {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; frees the blocks no volume or other snapshot shares.
    Delete { name: String },
    /// Make the volume read as the snapshot again (refused while the volume has clients).
    Restore { name: String },
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Drain a node: its data moves to the others, then it leaves the cluster.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume: torusctl volume create db 2G
    Create {
        name: String,
        /// 512, 4K, 1G, 1GiB... (a multiple of 4 KiB)
        size: String,
        /// Copies of every block: 1 on a single node; on a cluster, default 3 (or the number
        /// of nodes when fewer).
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// List volumes with their size, used space and connected clients.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and free its space (refused while clients are connected).
    Delete { name: String },
    /// Change a volume's size; shrinking needs --force.
    Resize {
        name: String,
        size: String,
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("torusctl: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let base = args.server.trim_end_matches('/');
    match args.command {
        Command::Volume(VolumeCommand::Create {
            name,
            size,
            replicas,
        }) => {
            let size_bytes = parse_size(&size, None).map_err(|e| anyhow!("size {e}"))?;
            let v: VolumeView = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/volumes"),
                Some(
                    serde_json::json!({"name": name, "size_bytes": size_bytes, "replicas": replicas}),
                ),
            )?)?;
            println!("created volume {} ({})", v.name, human(v.size_bytes));
        }
        Command::Volume(VolumeCommand::List { json }) => {
            let value = call("GET", &format!("{base}/v1/volumes"), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let list: Vec<VolumeView> = serde_json::from_value(value)?;
                println!(
                    "{:<24} {:>12} {:>12} {:>8} {:>8}",
                    "NAME", "SIZE", "USED", "REPLICAS", "CLIENTS"
                );
                for v in list {
                    println!(
                        "{:<24} {:>12} {:>12} {:>8} {:>8}",
                        v.name,
                        human(v.size_bytes),
                        human(v.used_bytes),
                        v.replicas,
                        v.clients
                    );
                }
            }
        }
        Command::Volume(VolumeCommand::Delete { name }) => {
            call("DELETE", &format!("{base}/v1/volumes/{name}"), None)?;
            println!("deleted volume {name}");
        }
        Command::Volume(VolumeCommand::Resize { name, size, force }) => {
            let size_bytes = parse_size(&size, None).map_err(|e| anyhow!("size {e}"))?;
            call(
                "POST",
                &format!("{base}/v1/volumes/{name}/resize"),
                Some(serde_json::json!({"size_bytes": size_bytes, "force": force})),
            )?;
            println!(
                "volume {name} is now {} (new connections see the new size)",
                human(size_bytes)
            );
        }
        Command::Status => {
            let s: StatusView =
                serde_json::from_value(call("GET", &format!("{base}/v1/status"), None)?)?;
            println!("health:      {}", if s.healthy { "OK" } else { "PROBLEM" });
            println!("mode:        {}", s.mode);
            println!("cores:       {}", s.cores);
            println!(
                "capacity:    {} ({} used)",
                human(s.capacity_bytes),
                human(s.used_bytes)
            );
            println!("volumes:     {}", s.volumes);
            println!("connections: {}", s.connections);
            println!("uptime:      {} s", s.uptime_seconds);
            for n in &s.nbd {
                println!("nbd:         {n}");
            }
            if let Some(c) = &s.cluster {
                println!(
                    "pgs:         {} total: {} clean, {} degraded, {} recovering, {} down",
                    c.pg_count, c.pgs.clean, c.pgs.degraded, c.pgs.recovering, c.pgs.down
                );
                println!("leader:      {}", c.leader.as_deref().unwrap_or("none"));
                for (node, r) in &c.recovering {
                    println!(
                        "recovering:  {node}: {}/{} PGs caught up, {} blocks compared, {} copied",
                        r.pgs_done,
                        r.pgs_done + r.pgs_stale,
                        r.blocks_compared,
                        human(r.bytes_copied)
                    );
                }
            }
            for p in &s.problems {
                println!("problem:     {p}");
            }
            return Ok(if s.healthy { 0 } else { 2 });
        }
        Command::Peers { json } => {
            let value = call("GET", &format!("{base}/v1/peers"), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let list: Vec<PeerView> = serde_json::from_value(value)?;
                println!(
                    "{:<12} {:<22} {:<18} {:>10} {:>10} {:<9} {:>10} {:>5}",
                    "NAME", "ADDRESS", "ID", "CAPACITY", "USED", "STATE", "HEARTBEAT", "PGS"
                );
                for p in list {
                    println!(
                        "{:<12} {:<22} {:<18x} {:>10} {:>10} {:<9} {:>10} {:>5}",
                        p.name,
                        p.peer_addr,
                        p.incarnation,
                        human(p.capacity_bytes),
                        p.used_bytes.map(human).unwrap_or_else(|| "-".into()),
                        p.state,
                        p.last_heartbeat_ms_ago
                            .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                            .unwrap_or_else(|| "-".into()),
                        p.pgs_held
                    );
                }
            }
        }
        Command::Scrub { volume } => {
            let reports: Vec<ScrubReport> = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/volumes/{volume}/scrub"),
                None,
            )?)?;
            let mut clean = true;
            println!(
                "{:<12} {:>12} {:>8} {:>9}",
                "NODE", "CHECKED", "BAD", "REPAIRED"
            );
            for r in &reports {
                println!(
                    "{:<12} {:>12} {:>8} {:>9}",
                    r.node, r.blocks_checked, r.bad_found, r.repaired
                );
                for p in &r.problems {
                    println!("  problem: {p}");
                }
                clean &= r.problems.is_empty() && r.repaired == r.bad_found;
            }
            return Ok(if clean { 0 } else { 2 });
        }
        Command::Snapshot(SnapshotCommand::Create { name }) => {
            let v: SnapshotView = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/snapshots"),
                Some(serde_json::json!({ "name": name })),
            )?)?;
            println!(
                "snapshot {} of {} taken ({})",
                v.name,
                v.volume,
                human(v.size_bytes)
            );
        }
        Command::Snapshot(SnapshotCommand::List { volume, json }) => {
            let url = match &volume {
                Some(v) => format!("{base}/v1/snapshots?volume={v}"),
                None => format!("{base}/v1/snapshots"),
            };
            let value = call("GET", &url, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let list: Vec<SnapshotView> = serde_json::from_value(value)?;
                println!(
                    "{:<32} {:>12} {:>12} {:>20}",
                    "NAME", "SIZE", "HELD", "CREATED (UTC)"
                );
                for v in list {
                    println!(
                        "{:<32} {:>12} {:>12} {:>20}",
                        v.name,
                        human(v.size_bytes),
                        human(v.held_bytes),
                        utc(v.created_unix)
                    );
                }
            }
        }
        Command::Snapshot(SnapshotCommand::Delete { name }) => {
            call("DELETE", &format!("{base}/v1/snapshots/{name}"), None)?;
            println!("deleted snapshot {name}");
        }
        Command::Snapshot(SnapshotCommand::Restore { name }) => {
            call("POST", &format!("{base}/v1/snapshots/{name}/restore"), None)?;
            println!(
                "restored {} from {name}",
                name.split('@').next().unwrap_or("")
            );
        }
        Command::Clone { snapshot, name } => {
            let v: VolumeView = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/clones"),
                Some(serde_json::json!({ "snapshot": snapshot, "name": name })),
            )?)?;
            println!(
                "created volume {} from {snapshot} ({})",
                v.name,
                human(v.size_bytes)
            );
        }
        Command::Peer(PeerCommand::Remove { name }) => {
            call("POST", &format!("{base}/v1/peers/{name}/remove"), None)?;
            println!("draining {name}: its placement groups move to the other nodes; it leaves the cluster when they are clean (watch torusctl status)");
        }
    }
    Ok(0)
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, in UTC.
fn utc(t: u64) -> String {
    let (days, rem) = (t / 86400, t % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
