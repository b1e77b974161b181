//! The NBD transmission phase, run on a core: each connection is owned by one core, whose
//! io_uring receives its requests and sends its replies. Requests are cut at chunk boundaries
//! and each piece goes to the core that owns it (this one directly, others by mailbox);
//! replies go out as soon as all pieces of a request are done, in any order, batched into one
//! `sendmsg` when several are ready.
//!
//! Limits per connection (so a client that floods requests or never reads its replies cannot
//! grow the server's memory): `REQUESTS_IN_FLIGHT_MAX` requests and `BYTES_IN_FLIGHT_MAX`
//! bytes of payload and read data, counted from the header until the reply is sent. At the
//! limit the connection is not read until replies drain. Memory per connection is therefore at
//! most the receive buffer plus 64 MiB (plus one 32 MiB payload that started under the limit);
//! per core, the write payload buffers kept for reuse add at most 2 MiB (`SPARE_PAYLOADS`).
//!
//! Protocol errors that leave the stream unframed (a bad request magic, a payload over
//! `PAYLOAD_MAX`) close the connection once in-flight requests are answered; every other bad
//! request gets its error reply and the connection goes on (NBD spec, "Error values").
//!
//! This file owns the connection: its state, receiving into its buffer, the limits, and the
//! engine's answers. `request` checks and dispatches each request, `reply` encodes and sends
//! the replies.

mod reply;
mod request;

use super::protocol::*;
use crate::exports::Attachment;
use crate::nbd::handshake::Negotiated;
use io_uring::{opcode, types};
use reply::{Reply, SendBatch};
use slab::Slab;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use torus_engine::socket::{self, SocketResult};
use torus_engine::{
    AlignedBuf, BlockError, Completion, CoreContext, CoreService, Output, SpareBuffers, CHUNK_SIZE,
};

/// Receive buffer per connection: room for many request headers (and small payloads).
const RECV_BUFFER_SIZE: usize = 256 * 1024;
/// Requests in flight per connection: above the kernel's default queue depth (128).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Payload and read bytes in flight per connection.
pub const BYTES_IN_FLIGHT_MAX: usize = 64 << 20;
/// BLOCK_STATUS answers for at most this much of the export per request (the spec allows a
/// shorter answer); 256 MiB is 2048 map look-ups.
const BLOCK_STATUS_LENGTH_MAX: u64 = 256 << 20;

const TAG_RECV: u64 = 1;
const TAG_SEND: u64 = 2;

/// A connection whose handshake is done, handed to a core.
pub struct NewConnection {
    pub fd: OwnedFd,
    pub negotiated: Negotiated,
    pub peer: String,
}

/// Counters the admin API reads (one set per core).
#[derive(Default)]
pub struct FrontendCounters {
    pub connections: AtomicU64,
    pub requests_in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
}

#[derive(Default)]
pub struct FrontendStats {
    pub per_core: Vec<FrontendCounters>,
}

impl FrontendStats {
    pub fn new(cores: usize) -> FrontendStats {
        FrontendStats {
            per_core: (0..cores).map(|_| FrontendCounters::default()).collect(),
        }
    }
}

struct Request {
    cookie: u64,
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    pieces_left: u32,
    error: Option<(u32, &'static str)>,
    reads: Vec<Option<(AlignedBuf, usize, usize)>>,
    status: Vec<Vec<bool>>,
    bytes: usize,
    /// A write's payload, kept for `spare_payloads` once the reply is sent.
    data: Option<Arc<AlignedBuf>>,
}

struct Payload {
    request: usize,
    /// Held by nothing else until the write is dispatched.
    buf: Arc<AlignedBuf>,
    got: usize,
    len: usize,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum State {
    Open,
    /// Not reading any more; answer what is in flight, then close.
    Draining,
}

struct Connection {
    fd: OwnedFd,
    /// Held for the life of the connection: counts it as a client of the volume.
    _attachment: Attachment,
    peer: String,
    volume: u32,
    read_only: bool,
    structured: bool,
    meta_allocation: bool,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv_armed: bool,
    payload: Option<Payload>,
    discard: u64,
    requests: Slab<Request>,
    bytes_in_flight: usize,
    replies: VecDeque<Reply>,
    send: Option<Box<SendBatch>>,
    /// The last send's batch, emptied and kept for the next one (one send is in flight at a
    /// time, so one batch serves the connection).
    spare_send: Option<Box<SendBatch>>,
    state: State,
    dead: bool,
}

// SAFETY: the raw pointers inside SendBatch (iovecs, msghdr) point into buffers owned by the
// same batch; a connection moves between threads only before it is handed to its core.
unsafe impl Send for Connection {}

pub struct NbdService {
    core: usize,
    connections: Slab<Connection>,
    /// Write payload buffers kept for reuse.
    spare_payloads: SpareBuffers,
    shutting_down: bool,
    stats: Arc<FrontendStats>,
}

/// Write payload buffers a core keeps for its next writes (`SpareBuffers`): at most
/// `SPARE_PAYLOADS` of at most `SPARE_PAYLOAD_BYTES` each, 2 MiB per core at most.
const SPARE_PAYLOADS: usize = 32;
const SPARE_PAYLOAD_BYTES: usize = 64 << 10;

fn token(conn: usize, request: usize, piece: usize) -> u64 {
    debug_assert!(conn < 1 << 23 && request < 1 << 20 && piece < 1 << 20);
    (conn as u64) << 40 | (request as u64) << 20 | piece as u64
}

fn untoken(t: u64) -> (usize, usize, usize) {
    (
        (t >> 40) as usize,
        ((t >> 20) & 0xF_FFFF) as usize,
        (t & 0xF_FFFF) as usize,
    )
}

/// The chunk-aligned pieces of [offset, offset+length).
pub fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, u32)> {
    let end = offset + length;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (CHUNK_SIZE - at % CHUNK_SIZE).min(end - at);
        let p = (at, n as u32);
        at += n;
        Some(p)
    })
}

/// Start of piece `i` of a request at `offset`, as `pieces` cuts it, in O(1).
pub fn piece_start(offset: u64, i: usize) -> u64 {
    if i == 0 {
        offset
    } else {
        (offset / CHUNK_SIZE + i as u64) * CHUNK_SIZE
    }
}

/// Length of piece `i` of [offset, offset+length), as `pieces` cuts it, in O(1).
pub fn piece_len(offset: u64, length: u64, i: usize) -> usize {
    let start = piece_start(offset, i);
    let end = ((start / CHUNK_SIZE + 1) * CHUNK_SIZE).min(offset + length);
    debug_assert!(start < end, "piece {i} of {length} bytes at {offset}");
    (end - start) as usize
}

impl NbdService {
    pub fn new(core: usize, stats: Arc<FrontendStats>) -> NbdService {
        NbdService {
            core,
            connections: Slab::new(),
            spare_payloads: SpareBuffers::new(SPARE_PAYLOADS, SPARE_PAYLOAD_BYTES),
            shutting_down: false,
            stats,
        }
    }

    fn counters(&self) -> &FrontendCounters {
        &self.stats.per_core[self.core]
    }

    fn arm_recv(&mut self, ctx: &mut CoreContext, key: usize) {
        let c = &mut self.connections[key];
        if c.recv_armed || c.state != State::Open {
            return;
        }
        let (ptr, len) = if let Some(p) = c.payload.as_mut().filter(|p| p.got < p.len) {
            let buf = Arc::get_mut(&mut p.buf).expect("a payload's buffer is its own");
            // SAFETY: got < len <= buf.len().
            (unsafe { buf.as_mut_ptr().add(p.got) }, p.len - p.got)
        } else {
            if c.requests.len() >= REQUESTS_IN_FLIGHT_MAX
                || (c.bytes_in_flight >= BYTES_IN_FLIGHT_MAX && c.discard == 0)
            {
                return;
            }
            if c.rend == c.rbuf.len() {
                return; // full of unparsed bytes: parsing will make room
            }
            // SAFETY: rend < rbuf.len().
            (
                unsafe { c.rbuf.as_mut_ptr().add(c.rend) },
                c.rbuf.len() - c.rend,
            )
        };
        let entry = opcode::Recv::new(
            types::Fd(c.fd.as_raw_fd()),
            ptr,
            len.min(u32::MAX as usize) as u32,
        )
        .build();
        c.recv_armed = true;
        ctx.submit_io(entry, (key as u64) << 4 | TAG_RECV);
    }

    fn on_recv(&mut self, ctx: &mut CoreContext, key: usize, result: i32) {
        let c = &mut self.connections[key];
        c.recv_armed = false;
        let n = match socket::classify(result) {
            SocketResult::Data(n) => n,
            SocketResult::TryAgain => return self.arm_recv(ctx, key),
            SocketResult::EndOfStream | SocketResult::Error(_) => {
                c.state = State::Draining;
                self.maybe_close(key);
                return;
            }
        };
        match c.payload.as_mut().filter(|p| p.got < p.len) {
            Some(p) => p.got += n,
            None => c.rend += n,
        }
        self.process(ctx, key);
    }

    /// Parses and dispatches what the receive buffer holds, then re-arms the receive.
    fn process(&mut self, ctx: &mut CoreContext, key: usize) {
        loop {
            let c = &mut self.connections[key];
            if c.state != State::Open {
                break;
            }
            if let Some(p) = c.payload.as_mut() {
                let take = (c.rend - c.rstart).min(p.len - p.got);
                Arc::get_mut(&mut p.buf).expect("a payload's buffer is its own")
                    [p.got..p.got + take]
                    .copy_from_slice(&c.rbuf[c.rstart..c.rstart + take]);
                p.got += take;
                c.rstart += take;
                if p.got < p.len {
                    break;
                }
                let p = c.payload.take().expect("payload");
                self.dispatch_write(ctx, key, p);
                continue;
            }
            if c.discard > 0 {
                let take = ((c.rend - c.rstart) as u64).min(c.discard);
                c.rstart += take as usize;
                c.discard -= take;
                if c.discard > 0 {
                    break;
                }
            }
            if c.requests.len() >= REQUESTS_IN_FLIGHT_MAX
                || c.bytes_in_flight >= BYTES_IN_FLIGHT_MAX
            {
                break;
            }
            if c.rend - c.rstart < REQUEST_HEADER_SIZE {
                break;
            }
            let h = RequestHeader::decode(
                c.rbuf[c.rstart..c.rstart + REQUEST_HEADER_SIZE]
                    .try_into()
                    .unwrap(),
            );
            c.rstart += REQUEST_HEADER_SIZE;
            self.on_header(ctx, key, h);
        }
        let c = &mut self.connections[key];
        if c.rstart > 0 {
            c.rbuf.copy_within(c.rstart..c.rend, 0);
            c.rend -= c.rstart;
            c.rstart = 0;
        }
        self.arm_recv(ctx, key);
        self.try_send(ctx, key);
        self.maybe_close(key);
    }

    fn maybe_close(&mut self, key: usize) {
        let c = &mut self.connections[key];
        if c.state != State::Draining {
            return;
        }
        if c.recv_armed {
            // SAFETY: shutdown on our own socket; completes the armed receive with EOF.
            unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RD) };
            return;
        }
        if let Some(p) = c.payload.take() {
            // A write whose payload never fully arrived: it was never acknowledged, drop it.
            retire(
                c,
                p.request,
                &self.stats.per_core[self.core],
                &mut self.spare_payloads,
            );
        }
        if c.requests.is_empty() && c.send.is_none() {
            let c = self.connections.remove(key);
            self.counters().connections.fetch_sub(1, Ordering::Relaxed);
            drop(c);
        }
    }
}

/// Forgets a request whose reply was sent (or can never be): its bytes and its slot count no
/// more against the connection's limits.
/// A write's payload buffer is kept for the next writes (`spare_payloads`).
fn retire(
    c: &mut Connection,
    request: usize,
    counters: &FrontendCounters,
    spare: &mut SpareBuffers,
) {
    let req = c.requests.remove(request);
    c.bytes_in_flight -= req.bytes;
    counters.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    if let Some(data) = req.data {
        spare.keep(data);
    }
}

impl CoreService for NbdService {
    fn on_message(&mut self, ctx: &mut CoreContext, message: Box<dyn std::any::Any + Send>) {
        let Ok(new) = message.downcast::<NewConnection>() else {
            return;
        };
        if self.shutting_down {
            return;
        }
        let n = new.negotiated;
        let volume = n.attachment.0.clone();
        let key = self.connections.insert(Connection {
            fd: new.fd,
            peer: new.peer,
            volume: volume.id,
            read_only: volume.read_only,
            structured: n.structured,
            meta_allocation: n.meta_allocation,
            _attachment: n.attachment,
            rbuf: vec![0u8; RECV_BUFFER_SIZE].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            recv_armed: false,
            payload: None,
            discard: 0,
            requests: Slab::new(),
            bytes_in_flight: 0,
            replies: VecDeque::new(),
            send: None,
            spare_send: None,
            state: State::Open,
            dead: false,
        });
        self.counters().connections.fetch_add(1, Ordering::Relaxed);
        self.arm_recv(ctx, key);
    }

    fn on_io(&mut self, ctx: &mut CoreContext, tag: u64, result: i32, _flags: u32) {
        let key = (tag >> 4) as usize;
        if !self.connections.contains(key) {
            return;
        }
        match tag & 0xF {
            TAG_RECV => self.on_recv(ctx, key, result),
            TAG_SEND => self.on_send(ctx, key, result),
            _ => {}
        }
    }

    fn on_completion(&mut self, ctx: &mut CoreContext, completion: Completion) {
        let (key, r, piece) = untoken(completion.token);
        let Some(c) = self.connections.get_mut(key) else {
            return;
        };
        let Some(req) = c.requests.get_mut(r) else {
            return;
        };
        match completion.output {
            Ok(Output::Read { data, head }) => {
                let len = piece_len(req.offset, req.length as u64, piece);
                req.reads[piece] = Some((data, head, len));
            }
            Ok(Output::Status { mapped }) => req.status[piece] = mapped,
            Ok(Output::Done) => {}
            Err(e) => {
                let why = match e {
                    BlockError::Io => "I/O error: the data cannot be vouched for",
                    BlockError::NoSpace => "no space left on the node",
                    BlockError::ShuttingDown => "server is shutting down",
                    _ => "request failed",
                };
                req.error.get_or_insert((nbd_error(e), why));
            }
        }
        req.pieces_left -= 1;
        if req.pieces_left == 0 {
            self.finish_request(ctx, key, r);
            self.maybe_close(key);
        }
    }

    fn on_shutdown(&mut self, _ctx: &mut CoreContext) {
        self.shutting_down = true;
        let keys: Vec<usize> = self.connections.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.connections[key].state = State::Draining;
            self.maybe_close(key);
        }
    }

    fn busy(&self) -> bool {
        !self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_chunk_boundaries() {
        let p: Vec<_> = pieces(CHUNK_SIZE - 10, 20 + CHUNK_SIZE).collect();
        assert_eq!(
            p,
            vec![
                (CHUNK_SIZE - 10, 10),
                (CHUNK_SIZE, CHUNK_SIZE as u32),
                (2 * CHUNK_SIZE, 10)
            ]
        );
    }

    #[test]
    fn piece_len_matches_pieces() {
        for &(offset, length) in &[
            (0, 1),
            (CHUNK_SIZE - 10, 20 + CHUNK_SIZE),
            (12345, 32 << 20),
            (CHUNK_SIZE, 3 * CHUNK_SIZE),
        ] {
            for (i, (_, n)) in pieces(offset, length).enumerate() {
                assert_eq!(
                    piece_len(offset, length, i),
                    n as usize,
                    "piece {i} of ({offset}, {length})"
                );
            }
        }
    }

    #[test]
    fn tokens_roundtrip() {
        assert_eq!(untoken(token(12345, 999_999, 77)), (12345, 999_999, 77));
    }
}
