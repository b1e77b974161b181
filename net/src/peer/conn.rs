//! One peer connection of a core (`Conn`): its socket, its role (a link's connection, requests
//! out; or a connection from another node, requests in), its receive buffer and the frame
//! being received or sent. `PeerService` (`service.rs`) drives it.

use super::link::LinkInner;
use super::{Callback, FlushRecorder, Handler, Outgoing};
use crate::wire::{Data, Entry, Header};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use torus_engine::AlignedBuf;

/// Receive buffer per connection; a frame larger than what it holds is received straight into
/// the frame's own buffer.
const RECV_BUFFER: usize = 64 * 1024;

pub(super) enum Role {
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
        /// The peer's name (shared: every frame it sends hands it to the handler).
        from: Arc<str>,
        handler: Arc<dyn Handler>,
        recorder: Arc<dyn FlushRecorder>,
        /// Requests received and not yet sent their reply (answered or not).
        in_flight: usize,
        /// Bytes the reads among them may answer with (`SERVE_READ_BYTES`), by request id.
        read_bytes: usize,
        charged: HashMap<u64, usize>,
        replies: VecDeque<(Entry, Option<Data>)>,
    },
}

pub(super) struct Conn {
    /// None while connecting.
    pub(super) fd: Option<std::net::TcpStream>,
    pub(super) role: Role,
    pub(super) rbuf: Box<[u8]>,
    pub(super) rstart: usize,
    pub(super) rend: usize,
    /// The frame whose body is being received, and how much of it has arrived.
    pub(super) body: Option<(Header, AlignedBuf, usize)>,
    pub(super) recv_armed: bool,
    pub(super) recv_into_body: bool,
    pub(super) out: Vec<u8>,
    pub(super) sent: usize,
    pub(super) send_armed: bool,
    pub(super) closing: bool,
}

impl Conn {
    pub(super) fn new(fd: Option<std::net::TcpStream>, role: Role) -> Conn {
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

    pub(super) fn who(&self) -> String {
        match &self.role {
            Role::Client { link, .. } => format!("{} (core {})", link.addr, link.core),
            Role::Served { from, .. } => format!("node {from}"),
        }
    }

    /// What flushes this node when the other end closes the connection (`flush_every_core`):
    /// the cluster's, handed over with the link or the listener.
    pub(super) fn recorder(&self) -> &dyn FlushRecorder {
        match &self.role {
            Role::Client { link, .. } => &*link.recorder,
            Role::Served { recorder, .. } => &**recorder,
        }
    }
}
