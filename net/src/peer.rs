//! Connections between nodes. A `Link` is this node's connection to one core of another node:
//! requests go out batched (everything queued while the previous send ran goes out as one
//! frame in one write), replies come back in any order and are matched by id. A link that
//! fails — refused, reset, a bad frame, or a reply overdue by `OP_TIMEOUT` — fails every request
//! it holds with `RETRY` and is replaced on next use.
//!
//! `serve_connection` is the other end: it decodes frames and hands each entry to a handler
//! with a way to reply; replies are batched the same way.

use crate::wire::{self, status, Data, Entry, Op};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A request with no reply within this long tears its link down.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A frame is cut at this many entries or bytes of data.
const BATCH_ENTRIES: usize = 1024;
const BATCH_BYTES: usize = 8 << 20;
/// Requests one incoming connection may have in flight on this node.
pub const SERVE_IN_FLIGHT: usize = 2048;

/// Frames and entries this process sent and received over peer connections (both directions
/// of every link): entries per frame is the batching factor.
pub struct Counters {
    pub frames_sent: std::sync::atomic::AtomicU64,
    pub entries_sent: std::sync::atomic::AtomicU64,
    pub bytes_sent: std::sync::atomic::AtomicU64,
    pub frames_received: std::sync::atomic::AtomicU64,
    pub entries_received: std::sync::atomic::AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    frames_sent: std::sync::atomic::AtomicU64::new(0),
    entries_sent: std::sync::atomic::AtomicU64::new(0),
    bytes_sent: std::sync::atomic::AtomicU64::new(0),
    frames_received: std::sync::atomic::AtomicU64::new(0),
    entries_received: std::sync::atomic::AtomicU64::new(0),
};

fn count_sent(entries: usize, bytes: usize) {
    COUNTERS.frames_sent.fetch_add(1, Ordering::Relaxed);
    COUNTERS
        .entries_sent
        .fetch_add(entries as u64, Ordering::Relaxed);
    COUNTERS
        .bytes_sent
        .fetch_add(bytes as u64, Ordering::Relaxed);
}

fn count_received(entries: usize) {
    COUNTERS.frames_received.fetch_add(1, Ordering::Relaxed);
    COUNTERS
        .entries_received
        .fetch_add(entries as u64, Ordering::Relaxed);
}

pub struct Reply {
    pub status: u16,
    pub data: Option<Data>,
}

pub type Callback = Box<dyn FnOnce(Reply) + Send>;

pub struct Outgoing {
    pub entry: Entry,
    pub data: Option<Data>,
    pub done: Callback,
}

fn retry() -> Reply {
    Reply {
        status: status::RETRY,
        data: None,
    }
}

pub struct Link {
    tx: mpsc::UnboundedSender<Outgoing>,
    dead: Arc<AtomicBool>,
    kill: Arc<tokio::sync::Notify>,
}

type Pending = Arc<parking_lot::Mutex<HashMap<u64, (Callback, Instant)>>>;

impl Link {
    /// Starts connecting to `addr` (core `core` there) on the runtime; requests queue meanwhile.
    pub fn open(rt: &tokio::runtime::Handle, addr: String, me: String, core: u32) -> Link {
        let (tx, rx) = mpsc::unbounded_channel();
        let dead = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(tokio::sync::Notify::new());
        rt.spawn(run_link(addr, me, core, rx, dead.clone(), kill.clone()));
        Link { tx, dead, kill }
    }

    /// Tears the link down now: every request it holds fails with `RETRY` (the peer left the
    /// map; its requests go elsewhere rather than wait for `OP_TIMEOUT`).
    pub fn close(&self) {
        self.dead.store(true, Ordering::Release);
        self.kill.notify_one();
    }

    pub fn dead(&self) -> bool {
        self.dead.load(Ordering::Acquire) || self.tx.is_closed()
    }

    pub fn send(&self, o: Outgoing) {
        if let Err(mpsc::error::SendError(o)) = self.tx.send(o) {
            (o.done)(retry());
        }
    }
}

fn fail_all(pending: &Pending) {
    let all: Vec<(Callback, Instant)> = pending.lock().drain().map(|(_, v)| v).collect();
    for (cb, _) in all {
        cb(retry());
    }
}

async fn run_link(
    addr: String,
    me: String,
    core: u32,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    dead: Arc<AtomicBool>,
    kill: Arc<tokio::sync::Notify>,
) {
    let pending: Pending = Arc::new(parking_lot::Mutex::new(HashMap::new()));
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        _ => {
            dead.store(true, Ordering::Release);
            rx.close();
            while let Some(o) = rx.recv().await {
                (o.done)(retry());
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    // Closing a dead link resets it: nothing still queued in the kernel is delivered later.
    let _ = stream.set_zero_linger();
    let (mut rd, mut wr) = stream.into_split();
    let gone = Arc::new(tokio::sync::Notify::new());
    let reader_gone = gone.clone();
    let reader_pending = pending.clone();
    let reader_dead = dead.clone();
    let reader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                frame = wire::read_frame(&mut rd) => {
                    let Ok(frame) = frame else { break };
                    count_received(frame.entries.len());
                    for (e, start) in &frame.entries {
                        if e.op != Op::Reply as u8 {
                            continue;
                        }
                        let Some((cb, _)) = reader_pending.lock().remove(&e.id) else { continue };
                        let data = (e.data_len > 0).then(|| Data {
                            buf: frame.body.clone(),
                            start: *start,
                            len: e.data_len as usize,
                        });
                        cb(Reply { status: e.status, data });
                    }
                }
                _ = kill.notified() => break,
                _ = tick.tick() => {
                    let overdue = reader_pending
                        .lock()
                        .values()
                        .any(|(_, at)| at.elapsed() > OP_TIMEOUT);
                    if overdue {
                        break;
                    }
                }
            }
        }
        reader_dead.store(true, Ordering::Release);
        fail_all(&reader_pending);
        reader_gone.notify_one();
    });
    let mut next_id: u64 = 1;
    let mut buf = Vec::new();
    let hello = Entry {
        op: Op::Hello as u8,
        volume: core,
        ..Entry::default()
    };
    let name = Arc::new(name_buf(&me));
    wire::encode_frame(
        &mut [(
            hello,
            Some(Data {
                len: me.len(),
                buf: name,
                start: 0,
            }),
        )],
        &mut buf,
    );
    let mut ok = wr.write_all(&buf).await.is_ok();
    let mut batch: Vec<(Entry, Option<Data>)> = Vec::new();
    while ok {
        let first = tokio::select! {
            o = rx.recv() => o,
            _ = gone.notified() => None,
        };
        let Some(first) = first else { break };
        let mut take = |o: Outgoing, batch: &mut Vec<(Entry, Option<Data>)>| -> usize {
            let mut e = o.entry;
            e.id = next_id;
            next_id += 1;
            pending.lock().insert(e.id, (o.done, Instant::now()));
            let n = o.data.as_ref().map_or(0, |d| d.len);
            batch.push((e, o.data));
            n
        };
        let mut bytes = take(first, &mut batch);
        while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(o) => bytes += take(o, &mut batch),
                Err(_) => break,
            }
        }
        wire::encode_frame(&mut batch, &mut buf);
        count_sent(batch.len(), buf.len());
        batch.clear();
        if dead.load(Ordering::Acquire) || wr.write_all(&buf).await.is_err() {
            ok = false;
        }
    }
    dead.store(true, Ordering::Release);
    reader.abort();
    let _ = reader.await;
    drop(wr);
    fail_all(&pending);
    rx.close();
    while let Ok(o) = rx.try_recv() {
        (o.done)(retry());
    }
}

fn name_buf(name: &str) -> torus_engine::AlignedBuf {
    let mut b = torus_engine::AlignedBuf::zeroed(name.len().div_ceil(4096).max(1) * 4096);
    b[..name.len()].copy_from_slice(name.as_bytes());
    b
}

/// How a served connection answers one request.
pub struct Responder {
    tx: mpsc::UnboundedSender<(Entry, Option<Data>)>,
    id: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Responder {
    pub fn reply(self, status: u16, data: Option<Data>) {
        let e = Entry {
            op: Op::Reply as u8,
            status,
            id: self.id,
            ..Entry::default()
        };
        let _ = self.tx.send((e, data));
    }
}

/// What a node does with one request from a peer.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: &str, core: u32, entry: Entry, data: Option<Data>, respond: Responder);
    fn cores(&self) -> u32;
}

/// Serves one incoming peer connection until it closes or misbehaves.
pub async fn serve_connection(stream: TcpStream, handler: Arc<dyn Handler>) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (mut rd, mut wr) = stream.into_split();
    // The first frame says who is calling and which core it wants.
    let hello = match tokio::time::timeout(CONNECT_TIMEOUT * 5, wire::read_frame(&mut rd)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            eprintln!("torusd: peer connection from {peer}: {e}; closed");
            return;
        }
        Err(_) => return,
    };
    let Some(&(e, start)) = hello.entries.first() else {
        return;
    };
    if e.op != Op::Hello as u8 || e.volume >= handler.cores() || e.data_len as usize > 256 {
        eprintln!("torusd: peer connection from {peer}: bad hello; closed");
        return;
    }
    let from =
        String::from_utf8_lossy(&hello.body[start..start + e.data_len as usize]).into_owned();
    let core = e.volume;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Entry, Option<Data>)>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut bytes = first.1.as_ref().map_or(0, |d| d.len);
            batch.push(first);
            while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.1.as_ref().map_or(0, |d| d.len);
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            wire::encode_frame(&mut batch, &mut buf);
            count_sent(batch.len(), buf.len());
            batch.clear();
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(SERVE_IN_FLIGHT));
    loop {
        let frame = match wire::read_frame(&mut rd).await {
            Ok(f) => f,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    eprintln!("torusd: peer {from} ({peer}): {e}; connection closed");
                }
                break;
            }
        };
        count_received(frame.entries.len());
        for (e, start) in &frame.entries {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let data = (e.data_len > 0).then(|| Data {
                buf: frame.body.clone(),
                start: *start,
                len: e.data_len as usize,
            });
            let r = Responder {
                tx: tx.clone(),
                id: e.id,
                _permit: permit,
            };
            handler.handle(&from, core, *e, data, r);
        }
    }
    drop(tx);
    let _ = writer.await;
}
