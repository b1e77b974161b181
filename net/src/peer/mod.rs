//! Connections between nodes, owned by the cores' rings like NBD connections.
//!
//! A `Link` names one core of another node. Each core of this node that sends on a link has
//! its own TCP connection for it, received and sent through that core's io_uring: a request
//! leaves from the core that made it, and the reply's callback runs on that same core, so a
//! replicated write wakes no thread but the cores involved. Requests go out batched
//! (everything queued while the previous send ran goes out as one frame in one send), replies
//! come back in any order and are matched by id. A connection that fails — refused, reset, a
//! bad frame, or a reply overdue by `OP_TIMEOUT` — fails every request it holds with `RETRY`;
//! the next request on the link connects again.
//!
//! The other end: the peer listener (tokio, off the cores) reads the hello that names the core
//! a connection wants and hands the socket to that core, whose `PeerService` decodes frames
//! and hands each entry to the node's `Handler` with a `Responder`. Replies are batched the
//! same way.
//!
//! Before its hello a connection is served by the listener: at most `HELLO_WAITING` at once,
//! each reading at most `wire::HELLO_MAX` bytes for at most the hello timeout.
//!
//! A core serves at most `SERVED_PER_PEER` connections for one node (a new one past that
//! closes that node's oldest) and `SERVED_MAX` in all; TCP keepalive closes a connection whose
//! other end went silent within about 25 s.
//!
//! Memory per connection: a 64 KiB receive buffer, the frame being received (at most
//! `wire::BODY_MAX`), the frame being sent, and on a served connection at most
//! `SERVE_IN_FLIGHT` requests plus one frame's worth (`wire::COUNT_MAX`) in flight.

use crate::wire::{self, status, Data, Entry, Header, Op, HEADER_LEN};
use io_uring::{opcode, types};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use torus_engine::reactor::{AWAIT_ALL_LIMIT, TAG_KIND_PEER};
use torus_engine::{
    current_core, AlignedBuf, Completion, CoreContext, CoreService, Message, Shared,
};

/// A request with no reply within this long tears its connection down.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A frame is cut at this many entries or bytes of data.
const BATCH_ENTRIES: usize = 1024;
const BATCH_BYTES: usize = 8 << 20;
/// Incoming connections that may be waiting to send their hello at once.
pub const HELLO_WAITING: usize = 64;
/// Requests one incoming connection may have in flight on this node before it is not read.
pub const SERVE_IN_FLIGHT: usize = 2048;
/// Connections one core serves for one node. A node opens one per core of its own (and a new
/// one when the last failed), so more means old ones its side has given up on (a peer cut off
/// or restarted without a reset): the oldest is closed to make room.
pub const SERVED_PER_PEER: usize = 64;
/// Connections one core serves in all; past that a new one is closed at once.
pub const SERVED_MAX: usize = 1024;
/// Keepalive on peer connections: one whose other end stopped answering (a node powered off
/// or cut off, no reset sent) fails after about `idle + interval × probes`.
const KEEPALIVE_IDLE_S: u64 = 10;
const KEEPALIVE_INTERVAL_S: u64 = 5;
const KEEPALIVE_PROBES: u32 = 3;
/// Receive buffer per connection; a frame larger than what it holds is received straight into
/// the frame's own buffer.
const RECV_BUFFER: usize = 64 * 1024;
/// How often a core with requests out looks for overdue ones.
const TICK: Duration = Duration::from_millis(500);

const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_TICK: u64 = 3;

fn tag(op: u64, conn: u64) -> u64 {
    TAG_KIND_PEER | op << 4 | conn << 8
}

/// Frames and entries this process sent and received over peer connections (both directions
/// of every link): entries per frame is the batching factor.
pub struct Counters {
    pub frames_sent: AtomicU64,
    pub entries_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub entries_received: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    frames_sent: AtomicU64::new(0),
    entries_sent: AtomicU64::new(0),
    bytes_sent: AtomicU64::new(0),
    frames_received: AtomicU64::new(0),
    entries_received: AtomicU64::new(0),
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

/// Runs on the core that sent the request (or wherever the link failed it).
pub type Callback = Box<dyn FnOnce(Reply) + Send>;

pub struct Outgoing {
    pub entry: Entry,
    pub data: Option<Data>,
    /// Requests that are answered together (one replicated write's copies: nothing happens
    /// until every one is in) share a non-zero group; 0 for a request on its own. A core whose
    /// only requests out are one group's sleeps until all their replies are in.
    pub group: u64,
    pub done: Callback,
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// A new group for `Outgoing::group`.
pub fn new_group() -> u64 {
    NEXT_GROUP.fetch_add(1, Ordering::Relaxed)
}

fn retry() -> Reply {
    Reply {
        status: status::RETRY,
        data: None,
    }
}

struct LinkInner {
    id: u64,
    addr: String,
    me: String,
    /// The core on the other node.
    core: u32,
    closed: AtomicBool,
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
}

/// This node's way to one core of another node.
pub struct Link(Arc<LinkInner>);

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

impl Link {
    /// A link to core `core` of the node listening at `addr`; cores connect on first use.
    pub fn open(
        rt: &tokio::runtime::Handle,
        shared: &Arc<Shared>,
        addr: String,
        me: String,
        core: u32,
    ) -> Link {
        Link(Arc::new(LinkInner {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            addr,
            me,
            core,
            closed: AtomicBool::new(false),
            shared: shared.clone(),
            rt: rt.clone(),
        }))
    }

    /// Tears the link down now: every request it holds fails with `RETRY` (the peer left the
    /// map; its requests go elsewhere rather than wait for `OP_TIMEOUT`).
    pub fn close(&self) {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for m in &self.0.shared.mailboxes {
            m.send(Message::Service(Box::new(PeerMsg::Close(self.0.id))));
        }
    }

    pub fn dead(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// The address this link connects to.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Queues a request. On a core it leaves through that core's connection (no thread is
    /// woken); elsewhere through the core with the peer core's index.
    pub fn send(&self, o: Outgoing) {
        if self.dead() {
            return (o.done)(retry());
        }
        let cores = self.0.shared.mailboxes.len();
        let core = current_core()
            .filter(|c| *c < cores)
            .unwrap_or(self.0.core as usize % cores);
        self.0.shared.mailboxes[core]
            .send(Message::Service(Box::new(PeerMsg::Send(self.0.clone(), o))));
    }
}

/// What the cores' peer services are told through their mailboxes.
enum PeerMsg {
    Send(Arc<LinkInner>, Outgoing),
    Close(u64),
    /// A connection this core asked for is up (with the hello sent), or failed (`None`).
    Connected {
        conn: u64,
        fd: Option<std::net::TcpStream>,
    },
    /// A connection from another node, its hello read.
    Serve {
        fd: std::net::TcpStream,
        from: String,
        handler: Arc<dyn Handler>,
    },
    Reply {
        conn: u64,
        entry: Entry,
        data: Option<Data>,
    },
    Run(Box<dyn FnOnce() + Send>),
}

/// Runs `f` on core `core`'s thread (right away when called there).
pub fn run_on_core(shared: &Shared, core: usize, f: Box<dyn FnOnce() + Send>) {
    if current_core() == Some(core) {
        return f();
    }
    shared.mailboxes[core].send(Message::Service(Box::new(PeerMsg::Run(f))));
}

/// How a served connection answers one request. Dropped without a reply, it answers `RETRY`.
pub struct Responder {
    shared: Arc<Shared>,
    core: usize,
    conn: u64,
    id: u64,
    replied: bool,
}

impl Responder {
    pub fn reply(mut self, status: u16, data: Option<Data>) {
        self.replied = true;
        self.send(status, data);
    }

    fn send(&self, status: u16, data: Option<Data>) {
        let entry = Entry {
            op: Op::Reply as u8,
            status,
            id: self.id,
            ..Entry::default()
        };
        self.shared.mailboxes[self.core].send(Message::Service(Box::new(PeerMsg::Reply {
            conn: self.conn,
            entry,
            data,
        })));
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.replied {
            self.send(status::RETRY, None);
        }
    }
}

/// Turns on TCP keepalive (see `KEEPALIVE_IDLE_S`); a socket that refuses keeps working
/// without it.
fn keepalive(socket: &impl std::os::fd::AsFd) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(KEEPALIVE_IDLE_S))
        .with_interval(Duration::from_secs(KEEPALIVE_INTERVAL_S))
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(socket).set_tcp_keepalive(&ka);
}

/// What a node does with one request from a peer. Called on the core the connection belongs
/// to (the core index the caller asked for).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: &str, core: u32, entry: Entry, data: Option<Data>, respond: Responder);
    fn cores(&self) -> u32;
}

/// Reads an incoming connection's hello (which names the caller and the core it wants) and
/// hands the socket to that core. A bad or missing hello closes it.
pub async fn accept(stream: TcpStream, handler: Arc<dyn Handler>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    keepalive(&stream);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut stream = stream;
    let hello = match tokio::time::timeout(CONNECT_TIMEOUT * 5, wire::read_hello(&mut stream)).await
    {
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
    if e.op != Op::Hello as u8
        || e.volume >= handler.cores()
        || e.volume as usize >= shared.mailboxes.len()
        || e.data_len as usize > 256
    {
        eprintln!("torusd: peer connection from {peer}: bad hello; closed");
        return;
    }
    let from =
        String::from_utf8_lossy(&hello.body[start..start + e.data_len as usize]).into_owned();
    let Ok(std) = stream.into_std() else { return };
    if std.set_nonblocking(false).is_err() {
        return;
    }
    shared.mailboxes[e.volume as usize].send(Message::Service(Box::new(PeerMsg::Serve {
        fd: std,
        from,
        handler,
    })));
}

/// Connects for a core (off the core: the connect and the hello may block) and tells it.
async fn connect(link: Arc<LinkInner>, core: usize, conn: u64) {
    let fd = async {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&link.addr))
            .await
            .ok()?
            .ok()?;
        let _ = s.set_nodelay(true);
        keepalive(&s);
        // Closing a dead connection resets it: nothing still queued in the kernel is
        // delivered later.
        let _ = s.set_zero_linger();
        let mut s = s;
        let mut hello = Vec::new();
        let name = Arc::new(name_buf(&link.me));
        wire::encode_frame(
            &mut [(
                Entry {
                    op: Op::Hello as u8,
                    volume: link.core,
                    ..Entry::default()
                },
                Some(Data {
                    len: link.me.len(),
                    buf: name,
                    start: 0,
                }),
            )],
            &mut hello,
        );
        tokio::time::timeout(CONNECT_TIMEOUT, s.write_all(&hello))
            .await
            .ok()?
            .ok()?;
        let std = s.into_std().ok()?;
        std.set_nonblocking(false).ok()?;
        Some(std)
    }
    .await;
    link.shared.mailboxes[core].send(Message::Service(Box::new(PeerMsg::Connected { conn, fd })));
}

fn name_buf(name: &str) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(name.len().div_ceil(4096).max(1) * 4096);
    b[..name.len()].copy_from_slice(name.as_bytes());
    b
}

enum Role {
    /// This core's connection on a link: requests out, replies in.
    Client {
        link: Arc<LinkInner>,
        next_id: u64,
        queue: VecDeque<Outgoing>,
        /// Sent, not answered: the callback, when it was sent, its group.
        pending: HashMap<u64, (Callback, Instant, u64)>,
    },
    /// A connection from another node: requests in, replies out.
    Served {
        from: String,
        handler: Arc<dyn Handler>,
        in_flight: usize,
        replies: VecDeque<(Entry, Option<Data>)>,
    },
}

struct Conn {
    /// None while connecting.
    fd: Option<std::net::TcpStream>,
    role: Role,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// The frame whose body is being received, and how much of it has arrived.
    body: Option<(Header, AlignedBuf, usize)>,
    recv_armed: bool,
    recv_into_body: bool,
    out: Vec<u8>,
    sent: usize,
    send_armed: bool,
    closing: bool,
}

impl Conn {
    fn new(fd: Option<std::net::TcpStream>, role: Role) -> Conn {
        Conn {
            fd,
            role,
            rbuf: vec![0u8; RECV_BUFFER].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            body: None,
            recv_armed: false,
            recv_into_body: false,
            out: Vec::new(),
            sent: 0,
            send_armed: false,
            closing: false,
        }
    }

    fn who(&self) -> String {
        match &self.role {
            Role::Client { link, .. } => format!("{} (core {})", link.addr, link.core),
            Role::Served { from, .. } => format!("node {from}"),
        }
    }
}

/// The peer connections one core owns.
pub struct PeerService {
    core: usize,
    conns: HashMap<u64, Conn>,
    /// Link id → the connection this core has for it.
    links: HashMap<u64, u64>,
    next_conn: u64,
    tick: Option<Box<types::Timespec>>,
    /// Connections with something queued: sent at the end of the loop iteration, so what
    /// one iteration queued goes out as one frame.
    to_send: Vec<u64>,
    /// Served connections closed by `make_room`, and when that was last logged.
    refused: u64,
    said: LogEvery,
    awaiting: Awaiting,
}

/// What this core's requests out wait for, for `completions_awaited`.
#[derive(Default)]
struct Awaiting {
    /// Requests sent and not answered (nor failed), on every connection of this core.
    pending: usize,
    /// The group of the latest request sent (0: none), when its first request went out, and
    /// how many of its requests are pending.
    group: u64,
    since: Option<Instant>,
    in_group: usize,
    /// The group's connections; a second request of the group on one of them (whose replies
    /// might come in one receive) turns the count off.
    conns: Vec<u64>,
    one_per_conn: bool,
}

impl Awaiting {
    fn sent(&mut self, group: u64, conn: u64) {
        self.pending += 1;
        if group != 0 && group == self.group {
            self.in_group += 1;
            self.one_per_conn &= !self.conns.contains(&conn);
            self.conns.push(conn);
        } else {
            self.group = group;
            self.since = Some(Instant::now());
            self.in_group = 1;
            self.conns.clear();
            self.conns.push(conn);
            self.one_per_conn = true;
        }
    }

    fn answered(&mut self, group: u64) {
        self.pending -= 1;
        if group != 0 && group == self.group {
            self.in_group -= 1;
        }
    }

    /// The number of replies the core can sleep for: all of the group's when they are all
    /// that is out, each on its own connection, and the group went out less than
    /// `AWAIT_ALL_LIMIT` ago (a peer that stopped answering must not keep every other
    /// completion of this core waiting for its reply until `OP_TIMEOUT`).
    fn replies_awaited(&self) -> u32 {
        let whole = self.group != 0
            && self.in_group > 1
            && self.in_group == self.pending
            && self.one_per_conn
            && self.since.is_some_and(|t| t.elapsed() < AWAIT_ALL_LIMIT);
        if whole {
            self.in_group as u32
        } else {
            1
        }
    }
}

/// Lets a repeated log line through at most once per 10 s.
#[derive(Default)]
pub struct LogEvery(Option<Instant>);

impl LogEvery {
    /// True when the line may be logged now (and starts the next 10 s).
    pub fn ready(&mut self) -> bool {
        if self
            .0
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return false;
        }
        self.0 = Some(Instant::now());
        true
    }
}

impl PeerService {
    pub fn new(core: usize) -> PeerService {
        PeerService {
            core,
            conns: HashMap::new(),
            links: HashMap::new(),
            next_conn: 1,
            tick: None,
            to_send: Vec::new(),
            refused: 0,
            said: LogEvery::default(),
            awaiting: Awaiting::default(),
        }
    }

    fn add(&mut self, conn: Conn) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, conn);
        id
    }

    fn send_on(&mut self, ctx: &mut CoreContext, link: Arc<LinkInner>, o: Outgoing) {
        if link.closed.load(Ordering::Acquire) {
            return (o.done)(retry());
        }
        let id = match self.links.get(&link.id) {
            Some(&id) => id,
            None => {
                let role = Role::Client {
                    link: link.clone(),
                    next_id: 1,
                    queue: VecDeque::new(),
                    pending: HashMap::new(),
                };
                let id = self.add(Conn::new(None, role));
                self.links.insert(link.id, id);
                link.rt.spawn(connect(link.clone(), self.core, id));
                id
            }
        };
        if let Some(Role::Client { queue, .. }) = self.conns.get_mut(&id).map(|c| &mut c.role) {
            queue.push_back(o);
        }
        self.to_send.push(id);
        self.arm_tick(ctx);
    }

    fn arm_tick(&mut self, ctx: &mut CoreContext) {
        if self.tick.is_some() {
            return;
        }
        let waiting = self.conns.values().any(|c| match &c.role {
            Role::Client { pending, queue, .. } => !pending.is_empty() || !queue.is_empty(),
            Role::Served { .. } => false,
        });
        if !waiting {
            return;
        }
        let ts = Box::new(types::Timespec::from(TICK));
        ctx.submit_io(opcode::Timeout::new(&*ts).build(), tag(OP_TICK, 0));
        self.tick = Some(ts);
    }

    fn on_tick(&mut self, ctx: &mut CoreContext) {
        self.tick = None;
        let overdue: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| match &c.role {
                Role::Client { pending, .. } => {
                    pending.values().any(|(_, at, _)| at.elapsed() > OP_TIMEOUT)
                }
                Role::Served { .. } => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let who = self.conns[&id].who();
            eprintln!(
                "torusd: peer {who}: no reply within {OP_TIMEOUT:?}; connection closed, requests retried"
            );
            self.close(id);
        }
        self.arm_tick(ctx);
    }

    /// Fails what the connection holds and closes it once no operation is in flight on it.
    fn close(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        let mut failed = Vec::new();
        match &mut c.role {
            Role::Client {
                link,
                queue,
                pending,
                ..
            } => {
                if self.links.get(&link.id) == Some(&id) {
                    self.links.remove(&link.id);
                }
                failed.extend(queue.drain(..).map(|o| o.done));
                for (_, (cb, _, group)) in pending.drain() {
                    self.awaiting.answered(group);
                    failed.push(cb);
                }
            }
            Role::Served { replies, .. } => replies.clear(),
        }
        if let Some(s) = &c.fd {
            // Completes an armed receive or send.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.maybe_remove(id);
        for cb in failed {
            cb(retry());
        }
    }

    /// Before serving a new connection from `from`: closes that node's oldest connection here
    /// if it has `SERVED_PER_PEER`; false (with a log line at most every 10 s) when this core
    /// already serves `SERVED_MAX`.
    fn make_room(&mut self, from: &str) -> bool {
        let mut served = 0;
        let mut theirs = Vec::new();
        for (&id, c) in &self.conns {
            if let Role::Served { from: f, .. } = &c.role {
                if !c.closing {
                    served += 1;
                    if f == from {
                        theirs.push(id);
                    }
                }
            }
        }
        if served >= SERVED_MAX {
            self.refused += 1;
            self.say(format!(
                "peer connection from node {from} closed: {SERVED_MAX} are served already"
            ));
            return false;
        }
        if theirs.len() >= SERVED_PER_PEER {
            self.refused += 1;
            self.say(format!(
                "node {from} opened more than {SERVED_PER_PEER} connections; its oldest closed"
            ));
            self.close(*theirs.iter().min().expect("not empty"));
        }
        true
    }

    /// Logs a connection `make_room` closed, at most once per 10 s.
    fn say(&mut self, what: String) {
        if self.said.ready() {
            eprintln!(
                "torusd: core {}: {what} ({} closed so far)",
                self.core, self.refused
            );
        }
    }

    fn maybe_remove(&mut self, id: u64) {
        if let Some(c) = self.conns.get(&id) {
            if c.closing && !c.recv_armed && !c.send_armed {
                self.conns.remove(&id);
            }
        }
    }

    fn arm_recv(&mut self, ctx: &mut CoreContext, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.recv_armed || c.closing {
            return;
        }
        let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        if let Role::Served { in_flight, .. } = &c.role {
            if *in_flight >= SERVE_IN_FLIGHT {
                return;
            }
        }
        let entry = match &mut c.body {
            // The receive buffer is empty while a body is pending (parse moved all of it).
            Some((h, buf, got)) if *got < h.len => {
                c.recv_into_body = true;
                // SAFETY (for the kernel's write): the buffer is owned by the connection,
                // which is kept until this receive completes (maybe_remove).
                opcode::Recv::new(
                    types::Fd(fd),
                    buf[*got..].as_mut_ptr(),
                    (h.len - *got) as u32,
                )
                .flags(libc::MSG_WAITALL)
                .build()
            }
            _ => {
                c.recv_into_body = false;
                if c.rstart == c.rend {
                    c.rstart = 0;
                    c.rend = 0;
                } else if c.rstart > 0 {
                    c.rbuf.copy_within(c.rstart..c.rend, 0);
                    c.rend -= c.rstart;
                    c.rstart = 0;
                }
                opcode::Recv::new(
                    types::Fd(fd),
                    c.rbuf[c.rend..].as_mut_ptr(),
                    (c.rbuf.len() - c.rend) as u32,
                )
                .build()
            }
        };
        c.recv_armed = true;
        ctx.submit_io(entry, tag(OP_RECV, id));
    }

    fn on_recv(&mut self, ctx: &mut CoreContext, id: u64, result: i32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.recv_armed = false;
        if c.closing {
            return self.maybe_remove(id);
        }
        if result <= 0 {
            flush_every_core(ctx.shared());
            return self.close(id);
        }
        let n = result as usize;
        if c.recv_into_body {
            if let Some((_, _, got)) = &mut c.body {
                *got += n;
            }
        } else {
            c.rend += n;
        }
        if let Err(e) = self.parse(ctx, id) {
            if let Some(c) = self.conns.get(&id) {
                eprintln!("torusd: peer {}: {e}; connection closed", c.who());
            }
            return self.close(id);
        }
        self.arm_recv(ctx, id);
    }

    /// Decodes every whole frame received so far and acts on it.
    fn parse(&mut self, ctx: &mut CoreContext, id: u64) -> Result<(), wire::FrameError> {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return Ok(());
            };
            if c.closing {
                return Ok(());
            }
            if let Some((h, buf, got)) = &mut c.body {
                let take = (h.len - *got).min(c.rend - c.rstart);
                buf[*got..*got + take].copy_from_slice(&c.rbuf[c.rstart..c.rstart + take]);
                c.rstart += take;
                *got += take;
                if *got < h.len {
                    return Ok(());
                }
                let (h, buf, _) = c.body.take().expect("checked");
                let frame = wire::decode_body(&h, buf)?;
                self.dispatch(ctx, id, frame);
                continue;
            }
            if c.rend - c.rstart < HEADER_LEN {
                return Ok(());
            }
            let raw: [u8; HEADER_LEN] = c.rbuf[c.rstart..c.rstart + HEADER_LEN]
                .try_into()
                .expect("header length");
            let h = wire::decode_header(&raw)?;
            c.rstart += HEADER_LEN;
            let buf = AlignedBuf::zeroed(h.len.div_ceil(4096).max(1) * 4096);
            c.body = Some((h, buf, 0));
        }
    }

    fn dispatch(&mut self, ctx: &mut CoreContext, id: u64, frame: wire::Frame) {
        count_received(frame.entries.len());
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let data_of = |e: &Entry, start: usize| {
            (e.data_len > 0).then(|| Data {
                buf: frame.body.clone(),
                start,
                len: e.data_len as usize,
            })
        };
        match &mut c.role {
            Role::Client { pending, .. } => {
                // A callback reaches this service only through the mailbox, so it can run
                // while the connection is borrowed (no list of them is gathered first).
                for (e, start) in &frame.entries {
                    if e.op != Op::Reply as u8 {
                        continue;
                    }
                    if let Some((cb, _, group)) = pending.remove(&e.id) {
                        self.awaiting.answered(group);
                        cb(Reply {
                            status: e.status,
                            data: data_of(e, *start),
                        });
                    }
                }
            }
            Role::Served {
                from,
                handler,
                in_flight,
                ..
            } => {
                let (from, handler) = (from.clone(), handler.clone());
                *in_flight += frame.entries.len();
                for (e, start) in &frame.entries {
                    let respond = Responder {
                        shared: ctx.shared().clone(),
                        core: self.core,
                        conn: id,
                        id: e.id,
                        replied: false,
                    };
                    handler.handle(&from, self.core as u32, *e, data_of(e, *start), respond);
                }
            }
        }
    }

    /// Sends what is queued as one frame, unless a send is already in flight.
    fn try_send(&mut self, ctx: &mut CoreContext, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.send_armed || c.closing {
            return;
        }
        let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut batch: Vec<(Entry, Option<Data>)> = Vec::new();
        let mut bytes = 0usize;
        match &mut c.role {
            Role::Client {
                next_id,
                queue,
                pending,
                ..
            } => {
                while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
                    let Some(o) = queue.pop_front() else { break };
                    let mut e = o.entry;
                    e.id = *next_id;
                    *next_id += 1;
                    pending.insert(e.id, (o.done, Instant::now(), o.group));
                    self.awaiting.sent(o.group, id);
                    bytes += o.data.as_ref().map_or(0, |d| d.len);
                    batch.push((e, o.data));
                }
            }
            Role::Served { replies, .. } => {
                while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
                    let Some(r) = replies.pop_front() else { break };
                    bytes += r.1.as_ref().map_or(0, |d| d.len);
                    batch.push(r);
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        wire::encode_frame(&mut batch, &mut c.out);
        count_sent(batch.len(), c.out.len());
        c.sent = 0;
        submit_send(ctx, id, c, fd);
    }

    fn on_send(&mut self, ctx: &mut CoreContext, id: u64, result: i32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.send_armed = false;
        if c.closing {
            return self.maybe_remove(id);
        }
        if result <= 0 {
            flush_every_core(ctx.shared());
            return self.close(id);
        }
        c.sent += result as usize;
        if c.sent < c.out.len() {
            let fd = c.fd.as_ref().map(|f| f.as_raw_fd()).expect("sending");
            return submit_send(ctx, id, c, fd);
        }
        self.try_send(ctx, id);
    }
}

/// A peer closed or reset a connection: it may have died, and with it its copies of writes
/// acknowledged but not yet flushed that this node holds too. They are flushed here now, not
/// seconds later when the map says the peer is gone, so that another failure meanwhile cannot
/// lose them.
fn flush_every_core(shared: &Shared) {
    crate::cluster::flush_recorded(shared);
}

fn submit_send(ctx: &mut CoreContext, id: u64, c: &mut Conn, fd: i32) {
    let rest = &c.out[c.sent..];
    // The frame stays in `c.out`, untouched until this send completes.
    let entry = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    c.send_armed = true;
    ctx.submit_io(entry, tag(OP_SEND, id));
}

impl CoreService for PeerService {
    fn on_message(&mut self, ctx: &mut CoreContext, message: Box<dyn std::any::Any + Send>) {
        let Ok(m) = message.downcast::<PeerMsg>() else {
            return;
        };
        match *m {
            PeerMsg::Send(link, o) => self.send_on(ctx, link, o),
            PeerMsg::Close(link) => {
                if let Some(id) = self.links.remove(&link) {
                    self.close(id);
                }
            }
            PeerMsg::Connected { conn, fd } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return; // closed meanwhile; the socket is dropped
                };
                if c.closing {
                    return;
                }
                match fd {
                    Some(fd) => {
                        c.fd = Some(fd);
                        self.arm_recv(ctx, conn);
                        self.try_send(ctx, conn);
                    }
                    None => self.close(conn),
                }
            }
            PeerMsg::Serve { fd, from, handler } => {
                if !self.make_room(&from) {
                    return; // the socket is dropped: closed
                }
                let role = Role::Served {
                    from,
                    handler,
                    in_flight: 0,
                    replies: VecDeque::new(),
                };
                let id = self.add(Conn::new(Some(fd), role));
                self.arm_recv(ctx, id);
            }
            PeerMsg::Run(f) => f(),
            PeerMsg::Reply { conn, entry, data } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                if let Role::Served {
                    in_flight, replies, ..
                } = &mut c.role
                {
                    *in_flight = in_flight.saturating_sub(1);
                    if !c.closing {
                        replies.push_back((entry, data));
                    }
                }
                self.to_send.push(conn);
                self.arm_recv(ctx, conn);
            }
        }
    }

    fn on_io(&mut self, ctx: &mut CoreContext, tag: u64, result: i32, _flags: u32) {
        let id = tag >> 8;
        match (tag >> 4) & 0xF {
            OP_RECV => self.on_recv(ctx, id, result),
            OP_SEND => self.on_send(ctx, id, result),
            OP_TICK => self.on_tick(ctx),
            _ => {}
        }
    }

    fn on_completion(&mut self, _ctx: &mut CoreContext, _completion: Completion) {}

    /// Peer connections stay up while the node drains: the requests its frontends still have
    /// in flight need them, and so may other nodes' writes.
    fn on_shutdown(&mut self, _ctx: &mut CoreContext) {}

    fn busy(&self) -> bool {
        false
    }

    fn completions_awaited(&self) -> u32 {
        self.awaiting.replies_awaited()
    }

    fn end_of_iteration(&mut self, ctx: &mut CoreContext) {
        if self.to_send.is_empty() {
            return;
        }
        // try_send queues nothing here, so the list (and its allocation) is put back empty.
        let mut ids = std::mem::take(&mut self.to_send);
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            self.try_send(ctx, id);
        }
        ids.clear();
        self.to_send = ids;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_sleeps_for_all_of_one_writes_replies_and_no_longer() {
        let mut a = Awaiting::default();
        assert_eq!(a.replies_awaited(), 1, "nothing out");
        let g = new_group();
        a.sent(g, 1);
        assert_eq!(a.replies_awaited(), 1, "one reply is one completion");
        a.sent(g, 2);
        assert_eq!(a.replies_awaited(), 2, "both copies' replies");
        a.answered(g);
        assert_eq!(a.replies_awaited(), 1, "the other one");
        a.answered(g);
        assert_eq!(a.replies_awaited(), 1);
        assert_eq!(a.pending, 0);
    }

    #[test]
    fn anything_else_out_wakes_the_core_for_each_reply() {
        let mut a = Awaiting::default();
        // A request on its own (a forwarded read) before a write's copies: its reply alone
        // is worth waking for.
        a.sent(0, 3);
        let g = new_group();
        a.sent(g, 1);
        a.sent(g, 2);
        assert_eq!(a.replies_awaited(), 1);
        a.answered(0);
        assert_eq!(a.replies_awaited(), 2);
        // An older write still waiting for one copy: its reply finishes it.
        let h = new_group();
        a.sent(h, 1);
        a.sent(h, 2);
        assert_eq!(a.replies_awaited(), 1);
        for _ in 0..2 {
            a.answered(g);
        }
        assert_eq!(a.replies_awaited(), 2);
    }

    #[test]
    fn two_requests_on_one_connection_or_an_old_group_are_not_awaited_together() {
        let mut a = Awaiting::default();
        let g = new_group();
        a.sent(g, 1);
        a.sent(g, 1);
        assert_eq!(
            a.replies_awaited(),
            1,
            "their replies may come in one receive"
        );
        let mut b = Awaiting::default();
        let h = new_group();
        b.sent(h, 1);
        b.sent(h, 2);
        b.since = Some(Instant::now() - AWAIT_ALL_LIMIT);
        assert_eq!(
            b.replies_awaited(),
            1,
            "a peer that does not answer holds nothing up"
        );
    }
}
