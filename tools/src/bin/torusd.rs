//! torusd: one torus storage node. Started with no arguments in an empty directory it creates
//! `./torus-data` with a backing store, the embedded metadata store and a 1 GiB volume named
//! `default`, and serves it over NBD on 127.0.0.1:10809.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::{Engine, EngineConfig, Fill};
use torus_frontend::exports::{AttachPolicy, Exports, Volume};
use torus_frontend::nbd::server::{poke, Listener, NbdServer};
use torus_frontend::nbd::transmission::FrontendStats;
use torus_frontend::service::FrontendService;
use torus_frontend::ublk::UblkTarget;
use torus_net::cluster::{Cluster, ClusterConfig, Local};
use torus_net::etcd::{Etcd, EtcdMetadata};
use torus_net::metadata::{EmbeddedMetadata, Metadata};
use torus_net::peer::PeerService;
use torus_tools::admin::{self, AdminServer, Node};
use torus_tools::size::{human, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "torusd",
    version = torus_tools::VERSION,
    args_override_self = true,
    about = "torus storage node: serves replicated block volumes over NBD",
    long_about = "torus storage node. Without --etcd it runs alone with an embedded metadata store.\n\n\
On first start in an empty --data-dir it creates the backing store (--size), the metadata, and a \
volume named `default` (--default-volume-size), then serves it over NBD. Connect with, for example:\n\n  \
nbdinfo nbd://127.0.0.1:10809/default\n  \
fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/default --rw=randwrite --bs=4k --name=t\n\n\
SIGINT or SIGTERM finishes the requests in flight, makes every acknowledged write durable, and exits 0.\n\n\
Every flag can also be set in a TOML file given with --config, as `data-dir = \"/var/lib/torus\"`; a \
flag on the command line overrides the file."
)]
struct Args {
    /// Read flags from this TOML file: each key is a flag's long name (`data-dir = "/srv/torus"`,
    /// `sparse = true`, `etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`). Flags on the
    /// command line override the file; a key that names no flag is an error.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Directory for the backing store file, the metadata and the lock.
    #[arg(long, default_value = "./torus-data", value_name = "DIR")]
    data_dir: PathBuf,
    /// Size of the backing store file created on first start: 512, 4K, 1G, 1GiB, or 10% (of the
    /// free space of the data dir's filesystem). Ignored once the store exists.
    #[arg(long, default_value = "4G", value_name = "BYTES")]
    size: String,
    /// Leave a new store file sparse instead of writing zeros over it once at creation. Quicker
    /// to create (the space is still reserved), but on ext4 and xfs the first write to each
    /// block then costs the filesystem an extent conversion, so writes are slower until the
    /// store has been written over once. For trials and tests; no effect with --device.
    #[arg(long)]
    sparse: bool,
    /// Use this block device as the backing store instead of a file in the data dir. A device
    /// that is not all zeros at its start and holds no torus store is refused, never overwritten.
    #[arg(long, value_name = "PATH")]
    device: Option<PathBuf>,
    /// Reactor threads (one per core, each owning a shard of the store). Fixed when the store
    /// is created; default: every CPU but one (at least one).
    #[arg(long, value_name = "N")]
    cores: Option<u32>,
    /// TCP address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
    nbd_listen: String,
    /// Also serve NBD on this Unix socket.
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Serve one NBD connection on stdin and stdout (like `nbdkit -s`) instead of listening
    /// on --nbd-listen, and exit once it closes, with every acknowledged write durable. For
    /// fuzzers that drive the whole connection from a file, and inetd-style launchers. Log
    /// lines (the ready line too) go to stderr. Not with --etcd.
    #[arg(long, conflicts_with = "etcd")]
    nbd_stdin: bool,
    /// Address of the admin HTTP API (torusctl) and of /metrics (Prometheus).
    #[arg(long, default_value = "127.0.0.1:4321", value_name = "ADDR")]
    admin_listen: String,
    /// Size of the `default` volume created in a fresh data dir.
    #[arg(long, default_value = "1G", value_name = "BYTES")]
    default_volume_size: String,
    /// Node-to-node address (cluster mode); other nodes connect here, so use an address they
    /// can reach.
    #[arg(long, default_value = "127.0.0.1:4400", value_name = "ADDR")]
    peer_listen: String,
    /// Join the cluster whose metadata lives in this etcd (comma separated endpoints),
    /// creating it on first use. Without it the node runs alone.
    #[arg(long, value_name = "URL[,URL...]")]
    etcd: Option<String>,
    /// This node's name in the cluster (default: the host name). A name stays with the
    /// data dir that first used it.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Cluster mode: a node that misses heartbeats this long is declared down and I/O goes
    /// on without it.
    #[arg(long, default_value = "6s", value_name = "DURATION")]
    lease_ttl: String,
    /// Cluster mode: most replicas a volume can have (also: how many nodes hold each
    /// placement group). Fixed when the cluster is created.
    #[arg(long, default_value_t = 3, value_name = "N")]
    replicas_max: u32,
    /// Cluster mode: a node down this long is marked out by the leader, and its placement
    /// groups get their replicas back on the other nodes (it needs more nodes than
    /// --replicas-max); a node marked out that returns takes its share again. `off`: a down
    /// node's PGs stay degraded until it returns or `torusctl peer remove` drains it.
    #[arg(long, default_value = "10m", value_name = "DURATION|off")]
    down_out_after: String,
    /// Cluster mode: rate limit for copying data to a node that is catching up.
    #[arg(long, default_value = "256M", value_name = "BYTES_PER_SEC")]
    recovery_rate: String,
}

/// A duration such as `6s`, `500ms`, `10m` or `2h`, above 0 and below `max`.
fn parse_duration(s: &str, max: Duration) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (try 6s or 500ms)"))?;
    let secs = match unit {
        "s" | "" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)"),
    };
    if !(secs > 0.0 && secs < max.as_secs_f64()) {
        bail!(
            "{s:?}: use a duration above 0 and below {}",
            human_duration(max)
        );
    }
    Ok(Duration::from_secs_f64(secs))
}

fn human_duration(d: Duration) -> String {
    let (n, unit) = match d.as_secs() {
        s if s % 86400 == 0 => (s / 86400, "day"),
        s if s % 3600 == 0 => (s / 3600, "hour"),
        s => return format!("{s} s"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "torus".into())
}

/// One writing node per volume: a volume's first connection here takes its writer lock.
struct WriterPolicy(Arc<Cluster>);

impl AttachPolicy for WriterPolicy {
    fn first(&self, volume: &Volume) -> std::result::Result<(), String> {
        self.0.acquire_writer(volume.id).map(|_| ()).map_err(|why| {
            eprintln!(
                "torusd: refused a connection to volume {}: {why}",
                volume.name
            );
            why.to_string()
        })
    }
    fn last(&self, volume: &Volume) {
        self.0.release_writer(volume.id)
    }
}

/// What the cluster layer asks of this node.
struct NodeLocal {
    engine: Arc<Engine>,
    exports: Arc<Exports>,
}

impl Local for NodeLocal {
    fn used_bytes(&self) -> u64 {
        self.engine
            .stats()
            .iter()
            .map(|s| (s.slots_total - s.slots_free) * torus_engine::BLOCK_SIZE as u64)
            .sum()
    }

    fn volumes_changed(&self, list: &torus_net::etcd::VolumeList) {
        let volumes = &list.volumes;
        let names: std::collections::HashSet<&str> =
            volumes.iter().map(|v| v.name.as_str()).collect();
        for v in volumes {
            if let Err(e) = self.engine.set_quota(v.id, v.quota_bytes) {
                eprintln!("torusd: applying the quota of {}: {e}", v.name);
            }
            match self.exports.get(&v.name) {
                Some(e) if e.id == v.id => e.set_size(v.size_bytes),
                _ => self
                    .exports
                    .insert(Volume::new(&v.name, v.id, v.size_bytes, v.is_snapshot())),
            }
        }
        for name in self.exports.names() {
            if !names.contains(name.as_str()) {
                let _ = self.exports.remove_unless_attached(&name);
            }
        }
        // Blocks of volumes deleted anywhere in the cluster are freed here too. Ids are never
        // reused, so an id below `next_id` that is not listed is gone for good; a snapshot's
        // or clone's id likewise when its member number is below its family's next.
        let known: std::collections::HashSet<u32> = volumes.iter().map(|v| v.id).collect();
        let issued = |id: u32| {
            let (family, member) = (id & torus_engine::layout::FAMILY_MASK, id >> 24);
            if member == 0 {
                id < list.next_id
            } else {
                member < list.families.get(&family).copied().unwrap_or(1)
            }
        };
        let mut orphans: Vec<u32> = self
            .engine
            .stats()
            .iter()
            .flat_map(|s| s.volumes.iter().map(|v| v.0))
            .filter(|id| !known.contains(id) && issued(*id))
            .collect();
        orphans.sort_unstable();
        orphans.dedup();
        for id in orphans {
            eprintln!("torusd: freeing the blocks of deleted volume id {id}");
            if let Err(e) = self.engine.drop_volume(id) {
                eprintln!("torusd: freeing volume id {id} failed: {e}");
            }
        }
    }
}

/// Most reactor threads (and store regions) a node runs.
const MAX_CORES: u32 = 256;

fn free_space(dir: &std::path::Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct; the path is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("{} is in use by another torusd", dir.display());
    }
    Ok(f)
}

/// Every CPU but one, at least one. The one left over runs the kernel's share of the work
/// (TCP, interrupts, softirqs) and the clients on the same machine: on this project's 2-CPU
/// test machine one reactor serves fio's nbd engine about 25 % faster than two (README,
/// Performance), because two reactors and the client then fight over two CPUs.
fn default_cores() -> u32 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    cpus.saturating_sub(1).max(1)
}

/// The command line, with the flags of the --config file (if any) before it.
fn parse_args() -> Args {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = Args::parse_from(&argv);
    let Some(config) = first.config.clone() else {
        return first;
    };
    match torus_tools::config::merge(&Args::command(), argv, Some(&config)) {
        Ok(merged) => Args::parse_from(merged),
        Err(e) => {
            eprintln!("torusd: {e:#}");
            std::process::exit(2);
        }
    }
}

pub fn main() {
    let args = parse_args();
    if let Err(e) = run(args) {
        eprintln!("torusd: {e:#}");
        std::process::exit(1);
    }
}

/// Raises this process's limit on open files to the most it may have: every NBD client, peer
/// connection and admin connection holds one, and the common default of 1024 runs out long
/// before the node's own caps do. Says so when the hard limit itself is low.
fn raise_open_files_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 || l.rlim_cur >= l.rlim_max {
            return;
        }
        l.rlim_cur = l.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            return;
        }
    }
    if l.rlim_max < 65536 {
        eprintln!(
            "torusd: at most {} open files (RLIMIT_NOFILE): clients and peers past that are refused; raise it (LimitNOFILE= in the systemd unit, ulimit -Hn)",
            l.rlim_max
        );
    }
}

fn run(args: Args) -> Result<()> {
    raise_open_files_limit();
    let lease_ttl = parse_duration(&args.lease_ttl, Duration::from_secs(3600))
        .map_err(|e| anyhow::anyhow!("--lease-ttl {e}"))?;
    let down_out_after = match args.down_out_after.as_str() {
        "off" => None,
        d => Some(
            parse_duration(d, Duration::from_secs(7 * 86400))
                .map_err(|e| anyhow::anyhow!("--down-out-after {e}"))?,
        ),
    };
    let recovery_rate = parse_size(&args.recovery_rate, None)
        .map_err(|e| anyhow::anyhow!("--recovery-rate {e}"))?;
    if args.replicas_max == 0 || args.replicas_max > 8 {
        bail!("--replicas-max {}: use 1 to 8", args.replicas_max);
    }
    let clustered = args.etcd.is_some();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let size = parse_size(&args.size, free_space(&args.data_dir))
        .map_err(|e| anyhow::anyhow!("--size {e}"))?;
    let default_size = parse_size(&args.default_volume_size, None)
        .map_err(|e| anyhow::anyhow!("--default-volume-size {e}"))?;
    let cores = args.cores.unwrap_or_else(default_cores);
    if cores == 0 || cores > MAX_CORES {
        bail!("--cores {cores}: use 1 to 256");
    }
    let path = args
        .device
        .clone()
        .unwrap_or_else(|| args.data_dir.join("blocks"));
    let fresh_store = !path.exists()
        || std::fs::metadata(&path)
            .map(|m| m.len() == 0 && m.is_file())
            .unwrap_or(false);
    if fresh_store && args.device.is_none() {
        if let Some(free) = free_space(&args.data_dir) {
            if size > free {
                bail!(
                    "--size {}: only {} free in {}",
                    human(size),
                    human(free),
                    args.data_dir.display()
                );
            }
        }
    }
    // Cluster mode: the control plane's runtime and the connection to etcd come first, so a
    // wrong --etcd fails before anything is created.
    let runtime = if clustered {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(
                    std::env::var("TORUS_CONTROL_THREADS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                )
                .thread_name("torus-control")
                .enable_all()
                .build()
                .context("start the control plane")?,
        )
    } else {
        None
    };
    let peer_listener = if clustered {
        Some(
            std::net::TcpListener::bind(&args.peer_listen)
                .with_context(|| format!("listen for peers on {}", args.peer_listen))?,
        )
    } else {
        None
    };
    // One etcd connection serves the metadata and the cluster.
    let etcd = match (&args.etcd, &runtime) {
        (Some(urls), Some(rt)) => {
            let endpoints: Vec<String> = urls.split(',').map(|s| s.trim().to_owned()).collect();
            Some(rt.block_on(Etcd::connect(&endpoints))?)
        }
        _ => None,
    };
    let (metadata, metadata_created): (Arc<dyn Metadata>, bool) = match (&etcd, &runtime) {
        (Some(etcd), Some(rt)) => (
            Arc::new(EtcdMetadata {
                etcd: etcd.clone(),
                rt: rt.handle().clone(),
            }),
            false,
        ),
        _ => {
            let (m, created) = EmbeddedMetadata::open(&args.data_dir)?;
            (Arc::new(m), created)
        }
    };

    let started = Instant::now();
    // Sized for the most regions a store can have; an existing store keeps its own count.
    let frontend = Arc::new(FrontendStats::new(MAX_CORES as usize));
    let clustered = etcd.is_some();
    let engine = Engine::open(
        &EngineConfig {
            path: path.clone(),
            create_size: size,
            cores,
            fill: if args.sparse {
                Fill::Sparse
            } else {
                Fill::Zeros {
                    progress: |written, total| {
                        eprintln!(
                            "torusd: new store: writing zeros over it once, so that writes are plain overwrites: {} of {} ({}%)",
                            human(written),
                            human(total),
                            written * 100 / total.max(1)
                        )
                    },
                }
            },
        },
        |core| {
            let service = FrontendService::new(core, frontend.clone());
            Box::new(if clustered {
                service.with_peer(Box::new(PeerService::new(core)))
            } else {
                service
            })
        },
    )
    .with_context(|| format!("open backing store {}", path.display()))?;
    if engine.cores() != cores as usize && args.cores.is_some() {
        eprintln!("torusd: the store at {} was created for {} cores; running that many (ignoring --cores {cores})", path.display(), engine.cores());
    }
    let engine = Arc::new(engine);
    eprintln!(
        "torusd: store {} ready in {:.1?}: {} cores, {} of capacity",
        path.display(),
        started.elapsed(),
        engine.cores(),
        human(engine.capacity_bytes())
    );

    let exports = Arc::new(Exports::default());
    if metadata_created && metadata.volumes().is_empty() {
        metadata
            .create_volume("default", default_size, 1)
            .context("create the default volume")?;
    }
    let known: std::collections::HashSet<u32> = metadata.volumes().iter().map(|v| v.id).collect();
    let mut orphans: Vec<u32> = if clustered {
        Vec::new() // the cluster's volume poller frees them (it knows the next id)
    } else {
        engine
            .stats()
            .iter()
            .flat_map(|s| s.volumes.iter().map(|v| v.0))
            .filter(|id| !known.contains(id))
            .collect()
    };
    orphans.sort_unstable();
    orphans.dedup();
    for id in orphans {
        eprintln!("torusd: freeing the blocks of deleted volume id {id}");
        engine
            .drop_volume(id)
            .map_err(|e| anyhow::anyhow!("free blocks of deleted volume {id}: {e}"))?;
    }
    for v in metadata.volumes() {
        if v.quota_bytes.is_some() {
            engine
                .set_quota(v.id, v.quota_bytes)
                .map_err(|e| anyhow::anyhow!("apply the quota of {}: {e}", v.name))?;
        }
        exports.insert(Volume::new(&v.name, v.id, v.size_bytes, v.is_snapshot()));
    }

    let tcp = if args.nbd_stdin {
        None
    } else {
        Some(
            std::net::TcpListener::bind(&args.nbd_listen)
                .with_context(|| format!("listen for NBD on {}", args.nbd_listen))?,
        )
    };
    let nbd_addr = match &tcp {
        Some(l) => l.local_addr()?.to_string(),
        None => "stdin".to_string(),
    };
    let cluster = match (&args.etcd, etcd, &runtime, peer_listener) {
        (Some(urls), Some(etcd), Some(rt), Some(listener)) => {
            let peer_addr = listener.local_addr()?.to_string();
            let cfg = ClusterConfig {
                node_name: args.node_name.clone().unwrap_or_else(hostname),
                peer_addr,
                admin_addr: args.admin_listen.clone(),
                nbd_addr: nbd_addr.clone(),
                lease_ttl,
                replicas_max: args.replicas_max,
                recovery_rate,
                node_id: engine.superblock().node_id,
                capacity_bytes: engine.capacity_bytes(),
                down_out_after,
                cut_record_path: args.data_dir.join("cut-flush.json"),
            };
            let local = Arc::new(NodeLocal {
                engine: engine.clone(),
                exports: exports.clone(),
            });
            let c = Cluster::start(cfg, etcd, rt, engine.shared().clone(), local, listener)
                .with_context(|| format!("join the cluster at {urls}"))?;
            exports.set_policy(Arc::new(WriterPolicy(c.clone())));
            // A volume or snapshot made through another node a moment ago (before this node's
            // volume poller saw it) is looked up in etcd by the handshake.
            let m = metadata.clone();
            exports.set_resolver(Arc::new(move |name| {
                m.volume(name)
                    .map(|v| Volume::new(&v.name, v.id, v.size_bytes, v.is_snapshot()))
            }));
            eprintln!(
                "torusd: node {} joined the cluster at {urls}; peers connect to {}",
                c.me, c.cfg.peer_addr
            );
            Some(c)
        }
        _ => None,
    };
    let server = NbdServer::new(exports.clone(), engine.shared().clone());
    let mut nbd_urls = Vec::new();
    let mut accept_threads = Vec::new();
    let mut poke_addrs = Vec::new();
    if let Some(tcp) = tcp {
        nbd_urls.push(format!("nbd://{nbd_addr}/"));
        accept_threads.push(server.serve(Listener::Tcp(tcp)));
        poke_addrs.push(nbd_addr.clone());
    }
    if let Some(sock) = &args.nbd_socket {
        let _ = std::fs::remove_file(sock);
        let l = std::os::unix::net::UnixListener::bind(sock)
            .with_context(|| format!("listen for NBD on {}", sock.display()))?;
        nbd_urls.push(format!("nbd+unix:///?socket={}", sock.display()));
        poke_addrs.push(sock.display().to_string());
        accept_threads.push(server.serve(Listener::Unix(l, sock.clone())));
    }
    let admin_listener = std::net::TcpListener::bind(&args.admin_listen)
        .with_context(|| format!("listen for the admin API on {}", args.admin_listen))?;
    // The bound address: with port 0 the kernel picked one.
    let admin_bound = admin_listener.local_addr()?;
    let admin_addr = admin_bound.to_string();
    let credentials = admin::auth::node_credentials(&args.data_dir, cluster.as_deref())?;
    let token_file = torus_tools::token::publish(
        &credentials.admin,
        &args.data_dir,
        &token_addrs(&args.admin_listen, &admin_bound),
    )
    .context("write the admin token")?;
    eprintln!(
        "torusd: the admin API takes the token in {} (torusctl on this host finds it)",
        token_file.display()
    );
    let ublk = Arc::new(UblkTarget::new(
        engine.shared().clone(),
        exports.clone(),
        &args.data_dir,
    ));
    let node = Arc::new(Node {
        engine: engine.clone(),
        metadata: metadata.clone(),
        exports: exports.clone(),
        frontend,
        started,
        nbd_urls,
        cluster: cluster.clone(),
        ublk: ublk.clone(),
        node_token: credentials.node.clone(),
    });
    let admin_server = AdminServer::start(node, admin_listener, credentials, &args.admin_listen)
        .context("start the admin API")?;
    // ublk devices a previous torusd served: taken back in the background (user recovery).
    let recovering = ublk.clone();
    std::thread::Builder::new()
        .name("torus-ublk-recovery".into())
        .spawn(move || recovering.recover())
        .context("spawn the ublk recovery thread")?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("install signal handlers")?;
    let signal = if args.nbd_stdin {
        serve_stdin(&server, signals)?
    } else {
        print_ready(&metadata, &nbd_addr, &admin_addr);
        signals.forever().next()
    };
    match signal {
        Some(signal) => {
            eprintln!("torusd: signal {signal} received: finishing requests in flight, flushing")
        }
        None => eprintln!("torusd: the stdin connection closed: flushing"),
    }
    server.stop_accepting();
    for a in &poke_addrs {
        poke(a);
    }
    let stopped = engine.stop();
    if let Some(c) = &cluster {
        c.stop();
    }
    admin_server.stop();
    for t in accept_threads {
        let _ = t.join();
    }
    if let Some(sock) = &args.nbd_socket {
        let _ = std::fs::remove_file(sock);
    }
    stopped.map_err(|e| anyhow::anyhow!("final flush failed: {e}"))?;
    eprintln!("torusd: stopped cleanly");
    Ok(())
}

/// The addresses `torusctl --server` may name this node's admin API by, for the token files
/// it finds by address: as given, as bound, and on loopback when bound to every address.
fn token_addrs(given: &str, bound: &std::net::SocketAddr) -> Vec<String> {
    let mut addrs = vec![given.to_owned(), bound.to_string()];
    if bound.ip().is_unspecified() {
        addrs.push(format!("127.0.0.1:{}", bound.port()));
        addrs.push(format!("localhost:{}", bound.port()));
    }
    addrs.dedup();
    addrs
}

/// --nbd-stdin: the connection's bytes come from stdin and its replies go to stdout, through
/// a socket pair whose other end is negotiated and handed to a core like any accepted socket.
/// Returns when the connection closed (None) or a signal came.
fn serve_stdin(
    server: &Arc<NbdServer>,
    mut signals: signal_hook::iterator::Signals,
) -> Result<Option<i32>> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socket pair")?;
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Option<i32>>(2);
    let mut to_server = ours.try_clone().context("socket pair")?;
    std::thread::Builder::new()
        .name("torus-stdin".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_server);
            let _ = to_server.shutdown(std::net::Shutdown::Write);
        })
        .context("spawn the stdin thread")?;
    let closed = done_tx.clone();
    std::thread::Builder::new()
        .name("torus-stdout".into())
        .spawn(move || {
            use std::io::{Read, Write};
            // Stdout is line-buffered: each reply goes out whole, flushed, at once.
            let mut from_server = ours;
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = from_server.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            let _ = closed.send(None);
        })
        .context("spawn the stdout thread")?;
    std::thread::Builder::new()
        .name("torus-signals".into())
        .spawn(move || {
            if let Some(s) = signals.forever().next() {
                let _ = done_tx.send(Some(s));
            }
        })
        .context("spawn the signal thread")?;
    eprintln!("torusd: serving one NBD connection on stdin/stdout");
    server.serve_stream(theirs, "stdin");
    Ok(done_rx.recv().unwrap_or(None))
}

fn print_ready(metadata: &Arc<dyn Metadata>, nbd_addr: &str, admin_listen: &str) {
    let volumes = metadata.volumes();
    let shown = volumes
        .iter()
        .find(|v| v.name == "default")
        .or(volumes.first());
    match shown {
        Some(v) => println!(
            "torusd: serving volume '{}' ({}) at nbd://{nbd_addr}/{} ; try: nbdinfo nbd://{nbd_addr}/{} ; admin API on http://{}",
            v.name,
            human(v.size_bytes),
            v.name,
            v.name,
            admin_listen
        ),
        None => println!("torusd: serving NBD on {nbd_addr} (no volumes yet: torusctl volume create NAME SIZE) ; admin API on http://{admin_listen}"),
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// Every flag torusd has, with a value that differs from its default (switches on).
    /// `nbd-stdin` conflicts with `etcd`, so it is tried on its own.
    const EVERY_FLAG: &[(&str, &str)] = &[
        ("data-dir", "/srv/torus"),
        ("size", "10%"),
        ("sparse", ""),
        ("device", "/dev/vdb"),
        ("cores", "3"),
        ("nbd-listen", "0.0.0.0:10810"),
        ("nbd-socket", "/run/torus/nbd.sock"),
        ("admin-listen", "127.0.0.1:4322"),
        ("default-volume-size", "2G"),
        ("peer-listen", "10.0.0.5:4401"),
        ("etcd", "http://10.0.0.1:2379,http://10.0.0.2:2379"),
        ("node-name", "storage-01"),
        ("lease-ttl", "9s"),
        ("replicas-max", "2"),
        ("down-out-after", "off"),
        ("recovery-rate", "64M"),
    ];

    fn parse(argv: Vec<OsString>) -> Args {
        let first = Args::try_parse_from(&argv).unwrap();
        let merged =
            torus_tools::config::merge(&Args::command(), argv, first.config.as_deref()).unwrap();
        let mut args = Args::try_parse_from(merged).unwrap();
        args.config = None;
        args
    }

    fn flags(pairs: &[(&str, &str)]) -> Vec<OsString> {
        let mut argv = vec![OsString::from("torusd")];
        for (key, value) in pairs {
            argv.push(format!("--{key}").into());
            if !value.is_empty() {
                argv.push(value.into());
            }
        }
        argv
    }

    fn toml(pairs: &[(&str, &str)]) -> String {
        pairs
            .iter()
            .map(|(key, value)| match *value {
                "" => format!("{key} = true\n"),
                "3" | "2" => format!("{key} = {value}\n"),
                v => format!("{key} = {v:?}\n"),
            })
            .collect()
    }

    fn with_config(dir: &std::path::Path, text: &str, extra: &[&str]) -> Args {
        let path = dir.join("torusd.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec![OsString::from("torusd"), "--config".into(), path.into()];
        argv.extend(extra.iter().map(OsString::from));
        parse(argv)
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("torusd-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_config_file_setting_every_flag_gives_what_the_flags_give() {
        let longs: Vec<String> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|l| !["help", "version", "config", "nbd-stdin"].contains(&l.as_str()))
            .collect();
        for long in &longs {
            assert!(
                EVERY_FLAG.iter().any(|(k, _)| k == long),
                "--{long} is missing from this test's EVERY_FLAG"
            );
        }
        let dir = scratch("every-flag");
        let from_flags = parse(flags(EVERY_FLAG));
        let from_file = with_config(&dir, &toml(EVERY_FLAG), &[]);
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        // The switch that cannot go with etcd.
        let alone = [("nbd-stdin", ""), ("data-dir", "/srv/torus")];
        let from_file = with_config(&dir, &toml(&alone), &[]);
        assert_eq!(
            format!("{from_file:?}"),
            format!("{:?}", parse(flags(&alone)))
        );
        // An array for etcd is the comma-separated list.
        let listed = with_config(
            &dir,
            "etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n",
            &[],
        );
        assert_eq!(
            listed.etcd.as_deref(),
            Some("http://10.0.0.1:2379,http://10.0.0.2:2379")
        );
        // A flag on the command line wins over the file.
        let overridden = with_config(&dir, &toml(EVERY_FLAG), &["--cores", "5"]);
        assert_eq!(overridden.cores, Some(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_example_config_parses_and_names_every_flag() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/torusd.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let args = torus_tools::config::args_from_str(&Args::command(), &text).unwrap();
        assert!(!args.is_empty(), "the example sets nothing");
        // Each flag appears as a line of its own, set or commented out.
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version", "config"].contains(&long) {
                continue;
            }
            let set = format!("\n{long} = ");
            let commented = format!("\n# {long} = ");
            assert!(
                text.contains(&set) || text.contains(&commented),
                "deploy/torusd.toml does not show {long}"
            );
        }
    }
}
