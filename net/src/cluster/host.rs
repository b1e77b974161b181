//! `Host`: what the cluster needs from the process it runs in — this node's cores and their
//! store, links to other nodes, tasks, the wall clock, one small file beside the store, and a
//! log. `Process` is torusd's (the engine's cores, real TCP, tokio, the file system); the
//! replication simulation has its own (`testing::sim`), so it runs this folder's code.
//!
//! Sleeps, timeouts and `Instant`s are tokio's (`tokio::time`): a simulation pauses tokio's
//! clock and advances it itself.

use crate::kv::BoxFuture;
use crate::peer::{self, FlushRecorder, Link, PeerLink};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use torus_engine::{current_core, Completion, Message, ReplyTo, Shared};

pub trait Host: Send + Sync + 'static {
    /// This node's cores.
    fn cores(&self) -> usize;
    /// Placement groups in the cluster (this node's store was formatted for them).
    fn pg_count(&self) -> u32;
    /// The core that owns a volume's offset (and decides about its PG).
    fn core_for(&self, volume: u32, offset: u64) -> usize;
    /// The core the caller runs on, if it runs on one of this node's.
    fn current_core(&self) -> Option<usize>;
    /// Runs `f` on `core` (right away when called there).
    fn run_on_core(&self, core: usize, f: Box<dyn FnOnce() + Send>);
    /// Hands a core's store a message: a piece (`Message::Piece`) or a listing
    /// (`Message::ListBlocks`).
    fn to_core(&self, core: usize, message: Message);
    /// Delivers a completion to whoever asked, from any thread.
    fn deliver(&self, reply: ReplyTo, completion: Completion);
    /// A link to core `core` of the node listening at `addr`, sending as node `me`; when a
    /// connection of it fails, `recorder` flushes this node.
    fn link(
        &self,
        addr: &str,
        me: &str,
        core: u32,
        recorder: Arc<dyn FlushRecorder>,
    ) -> Arc<dyn PeerLink>;
    /// Starts a task (control loops, retries, catch-up).
    fn spawn(&self, task: BoxFuture<'static, ()>);
    /// Runs blocking work (torusd's hooks, file writes) off the tasks' threads and waits.
    fn blocking(&self, f: Box<dyn FnOnce() + Send>) -> BoxFuture<'static, ()>;
    /// Wall-clock time, milliseconds since the Unix epoch: the clock the map's times are in.
    fn now_ms(&self) -> u64;
    /// The record of a flush made while cut off from etcd (`Cluster::fence_cut_off`), kept
    /// beside the store: what it holds, if it exists.
    fn read_cut_record(&self) -> io::Result<Option<Vec<u8>>>;
    /// Writes the cut record so that it survives a power loss (blocking).
    fn write_cut_record(&self, bytes: &[u8]) -> io::Result<()>;
    /// Removes the cut record, durably; absent is fine.
    fn remove_cut_record(&self) -> io::Result<()>;
    /// Where the cut record is, for log lines.
    fn cut_record_name(&self) -> String;
    /// One line of the node's log.
    fn log(&self, line: &str);
}

/// torusd's host: the engine's cores, TCP links, the control plane's tokio runtime.
pub struct Process {
    pub shared: Arc<Shared>,
    pub rt: tokio::runtime::Handle,
    /// Beside the store (`ClusterConfig::cut_record_path`).
    pub cut_record_path: PathBuf,
}

/// Milliseconds since the Unix epoch (0 before it): the clock the map's times are in.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `bytes` to `path` so that it survives a power loss: a temporary file, synced, then
/// renamed over it, and the directory synced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &std::path::Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Host for Process {
    fn cores(&self) -> usize {
        self.shared.mailboxes.len()
    }

    fn pg_count(&self) -> u32 {
        self.shared.geometry.pg_count
    }

    fn core_for(&self, volume: u32, offset: u64) -> usize {
        self.shared.core_for(volume, offset)
    }

    fn current_core(&self) -> Option<usize> {
        current_core()
    }

    fn run_on_core(&self, core: usize, f: Box<dyn FnOnce() + Send>) {
        peer::run_on_core(&self.shared, core, f)
    }

    fn to_core(&self, core: usize, message: Message) {
        self.shared.mailboxes[core].send(message)
    }

    fn deliver(&self, reply: ReplyTo, c: Completion) {
        match reply {
            ReplyTo::Core { core, .. } => self.shared.mailboxes[core].send(Message::Done(c)),
            ReplyTo::Channel { sender, .. } => {
                let _ = sender.send(c);
            }
            ReplyTo::Sink { sink, .. } => sink.0.complete(c),
            ReplyTo::Once(f) => (f.0)(c),
        }
    }

    fn link(
        &self,
        addr: &str,
        me: &str,
        core: u32,
        recorder: Arc<dyn FlushRecorder>,
    ) -> Arc<dyn PeerLink> {
        Arc::new(Link::open(
            &self.rt,
            &self.shared,
            addr.to_owned(),
            me.to_owned(),
            core,
            recorder,
        ))
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        self.rt.spawn(task);
    }

    fn blocking(&self, f: Box<dyn FnOnce() + Send>) -> BoxFuture<'static, ()> {
        let task = self.rt.spawn_blocking(f);
        Box::pin(async move {
            let _ = task.await;
        })
    }

    fn now_ms(&self) -> u64 {
        wall_ms()
    }

    fn read_cut_record(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.cut_record_path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_cut_record(&self, bytes: &[u8]) -> io::Result<()> {
        write_durably(&self.cut_record_path, bytes)
    }

    fn remove_cut_record(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.cut_record_path) {
            Ok(()) => sync_parent(&self.cut_record_path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn cut_record_name(&self) -> String {
        self.cut_record_path.display().to_string()
    }

    fn log(&self, line: &str) {
        eprintln!("torusd: {line}");
    }
}
