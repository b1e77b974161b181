//! torusctl: the admin client. Talks to a node's admin HTTP API.

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand};
use torus_net::cluster::{PeerView, ScrubReport};
use torus_net::map::GiveUp;
use torus_tools::admin::{SnapshotView, StatusView, VolumeView};
use torus_tools::client::call;
use torus_tools::size::{human, parse_size, span};
use torus_tools::transfer;

#[derive(Parser, Debug)]
#[command(
    name = "torusctl",
    version = torus_tools::VERSION,
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
    /// File with the admin token (default: $TORUS_TOKEN_FILE, else the one the node on this
    /// host wrote for --server's address, and for a loopback --server
    /// /var/lib/torus/admin.token and ./torus-data/admin.token).
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
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
    /// Copy a volume or snapshot into a raw image FILE (`-`: stdout), reading only the blocks
    /// that hold data; the file is sparse. Shows progress on a terminal.
    Dump {
        /// VOLUME or VOLUME@SNAPSHOT.
        volume: String,
        file: String,
        /// The node's NBD address (HOST:PORT or a socket path); default: the one it announces.
        #[arg(long, value_name = "ADDR")]
        nbd: Option<String>,
    },
    /// Copy a raw image FILE (`-`: stdin) into VOLUME, creating it (SIZE, or the file's size)
    /// when it does not exist; runs of zeroes are not written, so the volume stays thin.
    Load {
        file: String,
        volume: String,
        /// Size of a volume to create (needed with stdin).
        size: Option<String>,
        #[arg(long, value_name = "ADDR")]
        nbd: Option<String>,
    },
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
    /// Give up on a node that is down for good, so lost placement groups stop waiting for it
    ///
    /// For a dead disk or machine: placement groups that lost every clean copy but the one it
    /// had stop waiting for it and go on from the best copy left. Writes only that node had
    /// are lost, so it asks for --accept-data-loss. `torusctl status` names the nodes lost
    /// placement groups wait for.
    Lost {
        name: String,
        /// Confirms that writes only this node had may be lost.
        #[arg(long)]
        accept_data_loss: bool,
    },
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
        /// Most space the volume may use (thin volumes can be larger than this); writes that
        /// would pass it answer ENOSPC instead of filling the node.
        #[arg(long)]
        quota: Option<String>,
    },
    /// Set a volume's quota (`none` removes it): torusctl volume quota db 10G
    Quota { name: String, quota: String },
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
    torus_tools::client::use_token_file(args.token_file.clone());
    let base = args.server.trim_end_matches('/');
    match args.command {
        Command::Volume(VolumeCommand::Create {
            name,
            size,
            replicas,
            quota,
        }) => {
            let size_bytes = parse_size(&size, None).map_err(|e| anyhow!("size {e}"))?;
            let quota_bytes = match &quota {
                Some(q) => Some(parse_size(q, None).map_err(|e| anyhow!("quota {e}"))?),
                None => None,
            };
            let v: VolumeView = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/volumes"),
                Some(
                    serde_json::json!({"name": name, "size_bytes": size_bytes, "replicas": replicas, "quota_bytes": quota_bytes}),
                ),
            )?)?;
            match v.quota_bytes {
                Some(q) => println!(
                    "created volume {} ({}, quota {})",
                    v.name,
                    human(v.size_bytes),
                    human(q)
                ),
                None => println!("created volume {} ({})", v.name, human(v.size_bytes)),
            }
        }
        Command::Volume(VolumeCommand::Quota { name, quota }) => {
            let quota_bytes = if quota == "none" {
                None
            } else {
                Some(parse_size(&quota, None).map_err(|e| anyhow!("quota {e}"))?)
            };
            call(
                "POST",
                &format!("{base}/v1/volumes/{name}/quota"),
                Some(serde_json::json!({ "quota_bytes": quota_bytes })),
            )?;
            match quota_bytes {
                Some(q) => println!("volume {name}: quota {}", human(q)),
                None => println!("volume {name}: no quota"),
            }
        }
        Command::Volume(VolumeCommand::List { json }) => {
            let value = call("GET", &format!("{base}/v1/volumes"), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let list: Vec<VolumeView> = serde_json::from_value(value)?;
                println!(
                    "{:<24} {:>12} {:>12} {:>12} {:>8} {:>8}",
                    "NAME", "SIZE", "USED", "QUOTA", "REPLICAS", "CLIENTS"
                );
                for v in list {
                    println!(
                        "{:<24} {:>12} {:>12} {:>12} {:>8} {:>8}",
                        v.name,
                        human(v.size_bytes),
                        human(v.used_bytes),
                        v.quota_bytes.map(human).unwrap_or_else(|| "-".into()),
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
                    "{:<12} {:<22} {:<18} {:>10} {:>10} {:<14} {:>10} {:>5}",
                    "NAME", "ADDRESS", "ID", "CAPACITY", "USED", "STATE", "HEARTBEAT", "PGS"
                );
                for p in list {
                    let state = match p.down_for_ms {
                        Some(ms) => format!("{} {}", p.state, span(ms)),
                        None => p.state.clone(),
                    };
                    println!(
                        "{:<12} {:<22} {:<18x} {:>10} {:>10} {:<14} {:>10} {:>5}",
                        p.name,
                        p.peer_addr,
                        p.incarnation,
                        human(p.capacity_bytes),
                        p.used_bytes.map(human).unwrap_or_else(|| "-".into()),
                        state,
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
                "{:<12} {:>12} {:>8} {:>9} {:>9}",
                "NODE", "CHECKED", "BAD", "DIVERGED", "REPAIRED"
            );
            for r in &reports {
                println!(
                    "{:<12} {:>12} {:>8} {:>9} {:>9}",
                    r.node, r.blocks_checked, r.bad_found, r.diverged, r.repaired
                );
                for p in &r.problems {
                    println!("  problem: {p}");
                }
                clean &= r.problems.is_empty() && r.repaired == r.bad_found + r.diverged;
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
        Command::Dump { volume, file, nbd } => {
            let address = nbd_address(base, nbd)?;
            let mut session = address
                .session(&volume)
                .map_err(|e| anyhow!("open volume {volume:?} over NBD: {e}"))?;
            let summary = if file == "-" {
                let stdout = std::io::stdout();
                let mut lock = stdout.lock();
                transfer::dump(&mut session, &mut transfer::Target::Stream(&mut lock))?
            } else {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&file)
                    .map_err(|e| anyhow!("open {file}: {e}"))?;
                transfer::dump(&mut session, &mut transfer::Target::File(&mut f))?
            };
            session.close();
            eprintln!(
                "dumped {volume} ({}, {} of data) to {file} in {:.1} s ({}/s)",
                human(summary.size),
                human(summary.data),
                summary.seconds,
                human(summary.rate as u64)
            );
        }
        Command::Load {
            file,
            volume,
            size,
            nbd,
        } => {
            let (mut input, length): (Box<dyn std::io::Read>, Option<u64>) = if file == "-" {
                (Box::new(std::io::stdin().lock()), None)
            } else {
                let f = std::fs::File::open(&file).map_err(|e| anyhow!("open {file}: {e}"))?;
                let len = f.metadata()?.len();
                (
                    Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
                    Some(len),
                )
            };
            let exists = call("GET", &format!("{base}/v1/volumes"), None)?
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v["name"] == volume.as_str()));
            if !exists {
                let size_bytes = match (&size, length) {
                    (Some(s), _) => parse_size(s, None).map_err(|e| anyhow!("size {e}"))?,
                    (None, Some(len)) => len.div_ceil(4096).max(1) * 4096,
                    (None, None) => bail!("loading from stdin into a new volume needs its SIZE"),
                };
                call(
                    "POST",
                    &format!("{base}/v1/volumes"),
                    Some(serde_json::json!({ "name": volume, "size_bytes": size_bytes })),
                )?;
                eprintln!("created volume {volume} ({})", human(size_bytes));
            }
            let address = nbd_address(base, nbd)?;
            let mut session = address
                .session(&volume)
                .map_err(|e| anyhow!("open volume {volume:?} over NBD: {e}"))?;
            if let Some(len) = length {
                if len > session.info.size {
                    bail!(
                        "{file} ({}) does not fit in {volume} ({})",
                        human(len),
                        human(session.info.size)
                    );
                }
            }
            let summary = transfer::load(&mut session, &mut input, length.unwrap_or(0))?;
            session.close();
            eprintln!(
                "loaded {file} ({}, {} of data written) into {volume} in {:.1} s ({}/s)",
                human(summary.size),
                human(summary.data),
                summary.seconds,
                human(summary.rate as u64)
            );
        }
        Command::Peer(PeerCommand::Lost {
            name,
            accept_data_loss,
        }) => {
            if !accept_data_loss {
                eprintln!(
                    "torusctl: giving up on {name} loses the writes only it had; if it can come back, start it again instead; else run again with --accept-data-loss"
                );
                return Ok(1);
            }
            let g: GiveUp = serde_json::from_value(call(
                "POST",
                &format!("{base}/v1/peers/{name}/lost"),
                Some(serde_json::json!({ "accept_data_loss": true })),
            )?)?;
            if g.released.is_empty() {
                println!("no placement group waited for {name}; nothing changed");
            } else {
                println!(
                    "{} placement groups no longer wait for {name}: they go on from the best copy left, and writes only {name} had are lost; watch torusctl status",
                    g.released.len()
                );
                if !g.from_older.is_empty() {
                    println!(
                        "{} of them had no clean copy left: they go on from a stale one, without what was written after it fell behind",
                        g.from_older.len()
                    );
                }
            }
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

/// The NBD address to use: `--nbd`, else the first one the node announces (a wildcard host
/// is replaced by the admin URL's host).
fn nbd_address(base: &str, given: Option<String>) -> Result<torus_frontend::nbd::client::Address> {
    use torus_frontend::nbd::client::Address;
    if let Some(a) = given {
        return Ok(Address::parse(&a));
    }
    let s: StatusView = serde_json::from_value(call("GET", &format!("{base}/v1/status"), None)?)?;
    let url = s
        .nbd
        .first()
        .ok_or_else(|| anyhow!("the node announces no NBD address; give one with --nbd"))?;
    if let Some(path) = url.split_once("socket=").map(|x| x.1) {
        return Ok(Address::Unix(path.into()));
    }
    let hostport = url
        .trim_start_matches("nbd://")
        .trim_end_matches('/')
        .to_string();
    let admin_host = base
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map(|x| x.0.to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let hostport = match hostport.rsplit_once(':') {
        Some((h, p)) if h == "0.0.0.0" || h == "[::]" => format!("{admin_host}:{p}"),
        _ => hostport,
    };
    Ok(Address::Tcp(hostport))
}
