//! torusblk: torus volumes as the kernel's block devices.
//!
//! `torusblk nbd VOLUME [/dev/nbdX]` attaches the kernel's NBD client through netlink and
//! leaves a small monitor process behind that reconnects when torusd restarts;
//! `torusblk ublk VOLUME` asks the local torusd to serve the volume as /dev/ublkbN.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use torus_frontend::kernel_nbd::{device_index, DeviceConfig, Netlink};
use torus_frontend::nbd::client::Address;
use torus_tools::admin::UblkView;
use torus_tools::client::call;

#[derive(Parser, Debug)]
#[command(
    name = "torusblk",
    version = torus_tools::VERSION,
    about = "Attach torus volumes as block devices (kernel NBD client or ublk)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Attach VOLUME to /dev/nbdX through the kernel's NBD client (any free device when none
    /// is named); `-d /dev/nbdX` detaches. Needs root and the nbd module.
    Nbd {
        /// Detach this device instead.
        #[arg(short = 'd', long = "disconnect", value_name = "DEVICE", conflicts_with_all = ["volume", "device"])]
        disconnect: Option<String>,
        /// Volume to attach (the export name).
        #[arg(required_unless_present = "disconnect")]
        volume: Option<String>,
        /// Device to use, e.g. /dev/nbd0.
        device: Option<String>,
        /// torusd's NBD address: HOST:PORT, or the path of its Unix socket.
        #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
        server: String,
        /// Connections (the device's hardware queues).
        #[arg(long, default_value_t = 2)]
        connections: u32,
        /// Seconds before an unanswered request makes the kernel drop its connection and retry.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds the kernel holds I/O while the connection is down (torusd restarting)
        /// before it fails it.
        #[arg(long, default_value_t = 120)]
        dead_conn_timeout: u64,
        /// Do not leave a monitor process that reconnects after torusd restarts.
        #[arg(long)]
        no_monitor: bool,
    },
    /// Serve VOLUME as /dev/ublkbN from the local torusd (one queue per core); `-d ID`
    /// removes /dev/ublkbID; `--list` shows the devices. Needs root and the ublk_drv module.
    Ublk {
        /// Remove this device (its number, or /dev/ublkbN).
        #[arg(short = 'd', long = "delete", value_name = "ID", conflicts_with_all = ["volume", "list"])]
        delete: Option<String>,
        /// List the ublk devices torusd serves.
        #[arg(long, conflicts_with = "volume")]
        list: bool,
        #[arg(required_unless_present_any = ["delete", "list"])]
        volume: Option<String>,
        /// Admin API of the torusd that serves the device (it must run on this machine).
        #[arg(long, default_value = "http://127.0.0.1:4321", value_name = "URL")]
        admin: String,
        /// File with the admin token (default: as torusctl finds it).
        #[arg(long, value_name = "PATH")]
        token_file: Option<std::path::PathBuf>,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("torusblk: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    if let Command::Ublk { token_file, .. } = &args.command {
        torus_tools::client::use_token_file(token_file.clone());
    }
    match args.command {
        Command::Nbd {
            disconnect: Some(device),
            ..
        } => {
            let index = device_index(&device)
                .ok_or_else(|| anyhow!("{device:?} is not an NBD device (expected /dev/nbdN)"))?;
            let mut nl = Netlink::open()?;
            nl.disconnect(index)
                .with_context(|| format!("disconnect {device}"))?;
            println!("{device} disconnected");
            Ok(0)
        }
        Command::Nbd {
            volume,
            device,
            server,
            connections,
            timeout,
            dead_conn_timeout,
            no_monitor,
            ..
        } => {
            let volume = volume.expect("clap requires it");
            let index =
                match &device {
                    Some(d) => Some(device_index(d).ok_or_else(|| {
                        anyhow!("{d:?} is not an NBD device (expected /dev/nbdN)")
                    })?),
                    None => None,
                };
            if connections == 0 || connections > 16 {
                bail!("--connections {connections}: use 1 to 16");
            }
            let address = Address::parse(&server);
            let (sockets, info) = open_connections(&address, &volume, connections)?;
            let cfg = DeviceConfig {
                size: info.size,
                block_size: 4096,
                flags: info.flags,
                timeout: Duration::from_secs(timeout),
                dead_conn_timeout: Duration::from_secs(dead_conn_timeout),
                backend: format!("torus:{volume}@{server}"),
            };
            let mut nl = Netlink::open()?;
            let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
            let index = nl.connect(index, &cfg, &fds).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                    " (the device is in use: pick another or leave it out)"
                } else {
                    ""
                };
                anyhow!("connect the kernel's NBD client: {e}{hint}")
            })?;
            drop(sockets); // the kernel holds its own references
            println!(
                "/dev/nbd{index}: volume {volume} ({} bytes) from {server}, {connections} connection(s)",
                info.size
            );
            if !no_monitor {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                spawn_monitor(index, address, volume, connections, &cfg)?;
            }
            Ok(0)
        }
        Command::Ublk {
            delete: Some(id),
            admin,
            ..
        } => {
            let id: u32 = id
                .trim_start_matches("/dev/ublkb")
                .parse()
                .map_err(|_| anyhow!("{id:?} is not a ublk device (a number or /dev/ublkbN)"))?;
            call(
                "DELETE",
                &format!("{}/v1/ublk/{id}", admin.trim_end_matches('/')),
                None,
            )?;
            println!("/dev/ublkb{id} removed");
            Ok(0)
        }
        Command::Ublk {
            list: true, admin, ..
        } => {
            let list: Vec<UblkView> = serde_json::from_value(call(
                "GET",
                &format!("{}/v1/ublk", admin.trim_end_matches('/')),
                None,
            )?)?;
            println!(
                "{:<14} {:<20} {:>6} {:>6}",
                "DEVICE", "VOLUME", "QUEUES", "DEPTH"
            );
            for d in list {
                println!(
                    "{:<14} {:<20} {:>6} {:>6}",
                    d.device, d.volume, d.queues, d.depth
                );
            }
            Ok(0)
        }
        Command::Ublk { volume, admin, .. } => {
            let volume = volume.expect("clap requires it");
            let d: UblkView = serde_json::from_value(call(
                "POST",
                &format!("{}/v1/ublk", admin.trim_end_matches('/')),
                Some(serde_json::json!({ "volume": volume })),
            )?)?;
            println!(
                "{}: volume {} served by torusd ({} queues × {} requests)",
                d.device, d.volume, d.queues, d.depth
            );
            Ok(0)
        }
    }
}

fn open_connections(
    address: &Address,
    volume: &str,
    n: u32,
) -> Result<(
    Vec<std::os::fd::OwnedFd>,
    torus_frontend::nbd::client::ExportInfo,
)> {
    let mut sockets = Vec::new();
    let mut info = None;
    for _ in 0..n {
        let (s, i) = address
            .open(volume)
            .with_context(|| format!("negotiate volume {volume:?}"))?;
        if n > 1 && i.flags & torus_frontend::nbd::protocol::TFLAG_CAN_MULTI_CONN == 0 {
            bail!(
                "the server does not allow several connections to {volume:?}: use --connections 1"
            );
        }
        sockets.push(s);
        info = Some(i);
    }
    Ok((sockets, info.expect("at least one connection")))
}

/// How often the monitor asks torusd for the volume's size.
const SIZE_CHECK: Duration = Duration::from_secs(3);

/// Leaves a process behind (its own session) that replaces dead connections of device
/// `index` while it stays connected, and exits when the device is disconnected.
fn spawn_monitor(
    index: u32,
    address: Address,
    volume: String,
    connections: u32,
    cfg: &DeviceConfig,
) -> Result<()> {
    let mut nl = Netlink::open()?;
    nl.subscribe().context("listen for dead NBD links")?;
    // SAFETY: torusblk is single-threaded here; the child only runs Rust code of its own.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork the monitor: {}", std::io::Error::last_os_error());
    }
    if pid > 0 {
        println!("monitor pid {pid} reconnects /dev/nbd{index} when torusd restarts");
        return Ok(());
    }
    // SAFETY: detaching the child from the terminal's session.
    unsafe { libc::setsid() };
    let tag = format!("torusblk[{}] /dev/nbd{index}", std::process::id());
    let mut last_check = Instant::now();
    let mut last_size_check = Instant::now();
    let mut size = cfg.size;
    loop {
        let dead = match nl.dead_links(Duration::from_secs(1)) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{tag}: netlink: {e}");
                std::thread::sleep(Duration::from_secs(1));
                Vec::new()
            }
        };
        if dead.contains(&index) {
            // Let the other connections' announcements arrive, then replace them all at once.
            let _ = nl.dead_links(Duration::from_millis(200));
            let deadline = Instant::now() + cfg.dead_conn_timeout;
            loop {
                match open_connections(&address, &volume, connections) {
                    Ok((sockets, _)) => {
                        let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
                        match nl.reconfigure(index, &cfg.backend, &fds) {
                            Ok(()) => eprintln!("{tag}: reconnected"),
                            Err(e) => eprintln!("{tag}: reconfigure: {e}"),
                        }
                        break;
                    }
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => {
                        eprintln!("{tag}: giving up reconnecting: {e:#}");
                        break;
                    }
                }
            }
        }
        // A resized volume: tell the kernel (new connections to torusd see the new size; the
        // device would not without this).
        if last_size_check.elapsed() >= SIZE_CHECK {
            last_size_check = Instant::now();
            if let Ok(now) = address.probe_size(&volume) {
                if now != size {
                    match nl.resize(index, &cfg.backend, now) {
                        Ok(()) => {
                            eprintln!("{tag}: volume {volume} is now {now} bytes (was {size}); device resized");
                            size = now;
                        }
                        Err(e) => eprintln!("{tag}: resize to {now} bytes: {e}"),
                    }
                }
            }
        }
        if last_check.elapsed() >= Duration::from_secs(2) {
            last_check = Instant::now();
            if matches!(nl.connected(index), Ok(Some(false)) | Ok(None)) {
                std::process::exit(0);
            }
        }
    }
}
