//! torusctl: the admin client. Talks to a node's admin HTTP API.

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand};
use torus_tools::admin::{StatusView, VolumeView};
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
    /// Node health; exits 0 only when healthy.
    Status,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume: torusctl volume create db 2G
    Create {
        name: String,
        /// 512, 4K, 1G, 1GiB... (a multiple of 4 KiB)
        size: String,
        /// Copies of every block (1 on a single node).
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

fn call(method: &str, url: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    let request = agent.request(method, url);
    let result = match body {
        Some(b) => request.send_json(b),
        None => request.call(),
    };
    match result {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {code}"));
            bail!("{msg}")
        }
        Err(ureq::Error::Transport(t)) => Err(anyhow!(
            "cannot reach torusd at {url}: {t} (is torusd running? see --server)"
        )),
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
            for p in &s.problems {
                println!("problem:     {p}");
            }
            return Ok(if s.healthy { 0 } else { 2 });
        }
    }
    Ok(0)
}
