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
//!
//! This folder:
//!
//! - `mod.rs`: what the rest of the node uses (`Outgoing`, `Reply`, `Handler`,
//!   `FlushRecorder`), the messages a core's peer service is sent, the counters.
//! - `link.rs`: `Link`, this node's way to one core of another node, and connecting it.
//! - `listener.rs`: accepting connections from other nodes and reading their hello.
//! - `service.rs`: `PeerService`, the peer connections one core owns: frames in and out
//!   through its io_uring, requests served with a `Responder`.
//! - `responder.rs`: `Responder`, how a node answers one request.
//! - `awaiting.rs`: how many replies a core may sleep for.
//!
//! The peer layer does not know the cluster: it serves requests through the `Handler`, and
//! when the other end closes a connection it flushes this node through the `FlushRecorder`
//! the cluster hands it with each link and with the listener.

mod awaiting;
mod conn;
mod link;
mod listener;
mod responder;
mod service;

pub use link::Link;
pub use listener::{accept, listen, HELLO_WAITING};
pub use responder::Responder;
pub use service::{PeerService, SERVED_MAX, SERVED_PER_PEER, SERVE_IN_FLIGHT};

use crate::wire::{Data, Entry, Status};
use link::LinkInner;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::{current_core, Message, Shared};

/// A request with no reply within this long tears its connection down.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

pub struct Reply {
    /// The entry's status code, read (`Status::from_u16`).
    pub status: Status,
    pub data: Option<Data>,
}

/// What a request's reply goes to; runs on the core that sent the request (or wherever the
/// link failed it), once.
pub enum Callback {
    Once(Box<dyn FnOnce(Reply) + Send>),
    /// A receiver several requests share (a replicated write's copies): no allocation per
    /// request.
    Shared(Arc<dyn Answered>),
}

/// Takes the replies of the requests that share it (`Callback::Shared`).
pub trait Answered: Send + Sync {
    fn answered(&self, reply: Reply);
}

impl Callback {
    pub fn once(f: impl FnOnce(Reply) + Send + 'static) -> Callback {
        Callback::Once(Box::new(f))
    }

    pub fn call(self, reply: Reply) {
        match self {
            Callback::Once(f) => f(reply),
            Callback::Shared(a) => a.answered(reply),
        }
    }
}

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
        status: Status::Retry,
        data: None,
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
        recorder: Arc<dyn FlushRecorder>,
    },
    Reply {
        conn: u64,
        entry: Entry,
        data: Option<Data>,
    },
    Run(Box<dyn FnOnce() + Send>),
}

thread_local! {
    /// Messages for this core's own peer service from code running on the core (a write's
    /// copies, a served request's reply): taken at the end of the loop iteration
    /// (`PeerService::end_of_iteration`) instead of boxed through the core's own mailbox.
    static FOR_THIS_CORE: std::cell::RefCell<std::collections::VecDeque<PeerMsg>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// Hands `m` to core `core`'s peer service: from that core itself onto its queue for the end
/// of the loop iteration (no allocation, no trip through the mailbox), from anywhere else
/// through its mailbox.
fn to_core(shared: &Shared, core: usize, m: PeerMsg) {
    if current_core() == Some(core) {
        FOR_THIS_CORE.with(|q| q.borrow_mut().push_back(m));
    } else {
        shared.mailboxes[core].send(Message::Service(Box::new(m)));
    }
}

/// The next message `to_core` queued on this core.
fn next_for_this_core() -> Option<PeerMsg> {
    FOR_THIS_CORE.with(|q| q.borrow_mut().pop_front())
}

/// Runs `f` on core `core`'s thread (right away when called there).
pub fn run_on_core(shared: &Shared, core: usize, f: Box<dyn FnOnce() + Send>) {
    if current_core() == Some(core) {
        return f();
    }
    shared.mailboxes[core].send(Message::Service(Box::new(PeerMsg::Run(f))));
}

/// What a node does with one request from a peer. Called on the core the connection belongs
/// to (the core index the caller asked for).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: &str, core: u32, entry: Entry, data: Option<Data>, respond: Responder);
    fn cores(&self) -> u32;
}

/// How a core flushes this node when the other end of a peer connection closes or resets it
/// (`service::flush_every_core`): the node's own way, so that the flush is recorded like every
/// other (the cluster's `Cluster::flush_local`). The cluster hands it to the peer layer with
/// each link it opens and with the listener.
pub trait FlushRecorder: Send + Sync + 'static {
    /// Flushes every core of the node, recorded. False when the node's cluster is gone (the
    /// caller flushes the cores itself, unrecorded).
    fn flush_recorded(&self) -> bool;
}

/// This node's way to one core of another node (`Link`, or the simulation's network).
pub trait PeerLink: Send + Sync + 'static {
    /// Queues a request; its callback gets the reply, or `RETRY` when the link fails.
    fn send(&self, o: Outgoing);
    /// Tears the link down now: every request it holds fails with `RETRY`.
    fn close(&self);
    fn dead(&self) -> bool;
    /// The address the link connects to.
    fn addr(&self) -> &str;
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
