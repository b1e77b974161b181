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
//! most the receive buffer plus 64 MiB (plus one 32 MiB payload that started under the limit).
//!
//! Protocol errors that leave the stream unframed (a bad request magic, a payload over
//! `PAYLOAD_MAX`) close the connection once in-flight requests are answered; every other bad
//! request gets its error reply and the connection goes on (NBD spec, "Error values").

use super::protocol::*;
use crate::exports::Attachment;
use crate::nbd::handshake::Negotiated;
use io_uring::{opcode, types};
use slab::Slab;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use torus_engine::{
    AlignedBuf, BlockError, Completion, CoreContext, CoreService, Output, Piece, PieceKind,
    ReplyTo, BLOCK_SIZE, CHUNK_SIZE,
};

/// Receive buffer per connection: room for many request headers (and small payloads).
const RECV_BUFFER_SIZE: usize = 256 * 1024;
/// Requests in flight per connection: above the kernel's default queue depth (128).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Payload and read bytes in flight per connection.
pub const BYTES_IN_FLIGHT_MAX: usize = 64 << 20;
/// Replies per sendmsg, and iovecs per sendmsg (below IOV_MAX = 1024).
const SEND_REPLIES_MAX: usize = 128;
const SEND_IOVECS_MAX: usize = 1000;
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
}

struct Reply {
    header: Vec<u8>,
    data: Vec<(AlignedBuf, usize, usize)>,
    request: usize,
}

impl Reply {
    fn len(&self) -> usize {
        self.header.len() + self.data.iter().map(|d| d.2).sum::<usize>()
    }
}

struct SendBatch {
    replies: Vec<Reply>,
    iovecs: Vec<libc::iovec>,
    msghdr: libc::msghdr,
    total: usize,
    sent: usize,
}

struct Payload {
    request: usize,
    buf: AlignedBuf,
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
    state: State,
    dead: bool,
}

// SAFETY: the raw pointers inside SendBatch (iovecs, msghdr) point into buffers owned by the
// same batch; a connection moves between threads only before it is handed to its core.
unsafe impl Send for Connection {}

pub struct NbdService {
    core: usize,
    connections: Slab<Connection>,
    shutting_down: bool,
    stats: Arc<FrontendStats>,
}

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
            // SAFETY: got < len <= buf.len().
            (unsafe { p.buf.as_mut_ptr().add(p.got) }, p.len - p.got)
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
        if result == -libc::EINTR || result == -libc::EAGAIN {
            self.arm_recv(ctx, key);
            return;
        }
        if result <= 0 {
            c.state = State::Draining;
            self.maybe_close(key);
            return;
        }
        let n = result as usize;
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
                p.buf[p.got..p.got + take].copy_from_slice(&c.rbuf[c.rstart..c.rstart + take]);
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

    fn new_request(&mut self, key: usize, h: &RequestHeader, bytes: usize) -> usize {
        self.counters().requests.fetch_add(1, Ordering::Relaxed);
        self.counters()
            .requests_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let c = &mut self.connections[key];
        c.bytes_in_flight += bytes;
        c.requests.insert(Request {
            cookie: h.cookie,
            command: h.command,
            flags: h.flags,
            offset: h.offset,
            length: h.length,
            pieces_left: 0,
            error: None,
            reads: Vec::new(),
            status: Vec::new(),
            bytes,
        })
    }

    /// Answers a request with an error at once.
    fn refuse(
        &mut self,
        ctx: &mut CoreContext,
        key: usize,
        h: &RequestHeader,
        errno: u32,
        why: &'static str,
    ) {
        self.counters().bad_requests.fetch_add(1, Ordering::Relaxed);
        let r = self.new_request(key, h, 0);
        self.connections[key].requests[r].error = Some((errno, why));
        self.finish_request(ctx, key, r);
    }

    fn on_header(&mut self, ctx: &mut CoreContext, key: usize, h: RequestHeader) {
        let c = &mut self.connections[key];
        if h.magic != REQUEST_MAGIC {
            eprintln!(
                "torus: nbd {}: bad request magic {:#x}; closing the connection",
                c.peer, h.magic
            );
            self.counters().bad_requests.fetch_add(1, Ordering::Relaxed);
            self.connections[key].state = State::Draining;
            return;
        }
        // The volume's size now, not at attach: a resize applies to open connections too.
        let (size, read_only, structured) = (c._attachment.0.size(), c.read_only, c.structured);
        let in_range = h
            .offset
            .checked_add(h.length as u64)
            .is_some_and(|end| end <= size);
        let allowed_flags = match h.command {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
        let bad_flags =
            h.flags & !allowed_flags != 0 || (h.flags & CMD_FLAG_DF != 0 && !structured);
        match h.command {
            CMD_WRITE => {
                if h.length > PAYLOAD_MAX {
                    eprintln!(
                        "torus: nbd {}: write payload of {} bytes is over {PAYLOAD_MAX}; closing",
                        c.peer, h.length
                    );
                    self.refuse(ctx, key, &h, EINVAL, "payload too large");
                    self.connections[key].state = State::Draining;
                    return;
                }
                let refusal = if bad_flags {
                    Some((EINVAL, "unknown command flags"))
                } else if read_only {
                    Some((EPERM, "export is read-only"))
                } else if h.length == 0 {
                    Some((EINVAL, "zero-length write"))
                } else if !in_range {
                    Some((EINVAL, "write past the end of the export"))
                } else {
                    None
                };
                if let Some((errno, why)) = refusal {
                    self.connections[key].discard = h.length as u64;
                    self.refuse(ctx, key, &h, errno, why);
                    return;
                }
                let r = self.new_request(key, &h, h.length as usize);
                let len = h.length as usize;
                self.connections[key].payload = Some(Payload {
                    request: r,
                    buf: AlignedBuf::zeroed(len),
                    got: 0,
                    len,
                });
            }
            CMD_READ | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS => {
                if bad_flags {
                    return self.refuse(ctx, key, &h, EINVAL, "unknown command flags");
                }
                if h.length == 0 {
                    return self.refuse(ctx, key, &h, EINVAL, "zero-length request");
                }
                if !in_range {
                    return self.refuse(ctx, key, &h, EINVAL, "request past the end of the export");
                }
                if h.command == CMD_READ && h.length > PAYLOAD_MAX {
                    return self.refuse(
                        ctx,
                        key,
                        &h,
                        EINVAL,
                        "read longer than the maximum payload",
                    );
                }
                if read_only && matches!(h.command, CMD_TRIM | CMD_WRITE_ZEROES) {
                    return self.refuse(ctx, key, &h, EPERM, "export is read-only");
                }
                if h.command == CMD_BLOCK_STATUS && !self.connections[key].meta_allocation {
                    return self.refuse(ctx, key, &h, EINVAL, "no metadata context was negotiated");
                }
                self.dispatch(ctx, key, h);
            }
            CMD_FLUSH => {
                if h.offset != 0 || h.length != 0 {
                    return self.refuse(ctx, key, &h, EINVAL, "FLUSH with an offset or length");
                }
                if bad_flags {
                    return self.refuse(ctx, key, &h, EINVAL, "unknown command flags");
                }
                let r = self.new_request(key, &h, 0);
                if ctx.routed() {
                    self.connections[key].requests[r].pieces_left = 1;
                    let volume = self.connections[key].volume;
                    ctx.route_flush(
                        volume,
                        ReplyTo::Core {
                            core: self.core,
                            token: token(key, r, 0),
                        },
                    );
                    return;
                }
                let cores = ctx.cores();
                self.connections[key].requests[r].pieces_left = cores as u32;
                for core in 0..cores {
                    let piece = Piece {
                        volume: self.connections[key].volume,
                        offset: 0,
                        len: 0,
                        kind: PieceKind::Flush,
                    };
                    ctx.send_piece_to(
                        core,
                        piece,
                        ReplyTo::Core {
                            core: self.core,
                            token: token(key, r, core),
                        },
                    );
                }
            }
            CMD_DISC => {
                self.connections[key].state = State::Draining;
            }
            _ => self.refuse(ctx, key, &h, EINVAL, "unknown command"),
        }
    }

    fn dispatch(&mut self, ctx: &mut CoreContext, key: usize, h: RequestHeader) {
        let length = if h.command == CMD_BLOCK_STATUS {
            (h.length as u64).min(BLOCK_STATUS_LENGTH_MAX)
        } else {
            h.length as u64
        };
        let bytes = if h.command == CMD_READ {
            h.length as usize
        } else {
            0
        };
        let r = self.new_request(key, &h, bytes);
        if h.command == CMD_CACHE {
            return self.finish_request(ctx, key, r);
        }
        let c = &mut self.connections[key];
        let volume = c.volume;
        let count = pieces(h.offset, length).count();
        let req = &mut c.requests[r];
        req.pieces_left = count as u32;
        match h.command {
            CMD_READ => req.reads = (0..count).map(|_| None).collect(),
            CMD_BLOCK_STATUS => req.status = vec![Vec::new(); count],
            _ => {}
        }
        let fua = h.flags & CMD_FLAG_FUA != 0;
        for (i, (offset, len)) in pieces(h.offset, length).enumerate() {
            let kind = match h.command {
                CMD_READ => PieceKind::Read,
                CMD_BLOCK_STATUS => PieceKind::Status,
                _ => PieceKind::Zero { fua },
            };
            ctx.send_piece(
                Piece {
                    volume,
                    offset,
                    len,
                    kind,
                },
                ReplyTo::Core {
                    core: self.core,
                    token: token(key, r, i),
                },
            );
        }
    }

    fn dispatch_write(&mut self, ctx: &mut CoreContext, key: usize, p: Payload) {
        let c = &mut self.connections[key];
        let volume = c.volume;
        let req = &mut c.requests[p.request];
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let offset = req.offset;
        let length = req.length as u64;
        req.pieces_left = pieces(offset, length).count() as u32;
        let data = Arc::new(p.buf);
        for (i, (at, len)) in pieces(offset, length).enumerate() {
            let kind = PieceKind::Write {
                data: data.clone(),
                data_offset: (at - offset) as usize,
                fua,
            };
            ctx.send_piece(
                Piece {
                    volume,
                    offset: at,
                    len,
                    kind,
                },
                ReplyTo::Core {
                    core: self.core,
                    token: token(key, p.request, i),
                },
            );
        }
    }

    fn finish_request(&mut self, ctx: &mut CoreContext, key: usize, r: usize) {
        let c = &mut self.connections[key];
        let structured = c.structured;
        let req = &mut c.requests[r];
        let mut reply = Reply {
            header: Vec::new(),
            data: Vec::new(),
            request: r,
        };
        if let Some((errno, why)) = req.error {
            if structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
                reply.header.extend_from_slice(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    req.cookie,
                    6 + why.len() as u32,
                ));
                reply.header.extend_from_slice(&errno.to_be_bytes());
                reply
                    .header
                    .extend_from_slice(&(why.len() as u16).to_be_bytes());
                reply.header.extend_from_slice(why.as_bytes());
            } else {
                reply
                    .header
                    .extend_from_slice(&simple_reply(errno, req.cookie));
            }
        } else if req.command == CMD_READ {
            if structured {
                reply.header.extend_from_slice(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + req.length,
                ));
                reply.header.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                reply.header.extend_from_slice(&simple_reply(0, req.cookie));
            }
            reply.data = req
                .reads
                .drain(..)
                .map(|d| d.expect("every piece answered"))
                .collect();
        } else if req.command == CMD_BLOCK_STATUS {
            let extents = extents(req.offset, &req.status, req.flags & CMD_FLAG_REQ_ONE != 0);
            let len = 4 + 8 * extents.len() as u32;
            reply.header.extend_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                len,
            ));
            reply
                .header
                .extend_from_slice(&META_CONTEXT_ALLOCATION_ID.to_be_bytes());
            for (length, flags) in extents {
                reply.header.extend_from_slice(&length.to_be_bytes());
                reply.header.extend_from_slice(&flags.to_be_bytes());
            }
        } else {
            reply.header.extend_from_slice(&simple_reply(0, req.cookie));
        }
        c.replies.push_back(reply);
        self.try_send(ctx, key);
    }

    fn try_send(&mut self, ctx: &mut CoreContext, key: usize) {
        let c = &mut self.connections[key];
        if c.send.is_some() || c.replies.is_empty() {
            return;
        }
        if c.dead {
            while let Some(reply) = c.replies.pop_front() {
                retire(c, reply.request, &self.stats.per_core[self.core]);
            }
            return;
        }
        let mut batch = Box::new(SendBatch {
            replies: Vec::new(),
            iovecs: Vec::new(),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msghdr: unsafe { std::mem::zeroed() },
            total: 0,
            sent: 0,
        });
        let mut iovecs = 0;
        while let Some(reply) = c.replies.front() {
            let n = 1 + reply.data.len();
            if !batch.replies.is_empty()
                && (batch.replies.len() >= SEND_REPLIES_MAX || iovecs + n > SEND_IOVECS_MAX)
            {
                break;
            }
            iovecs += n;
            let reply = c.replies.pop_front().expect("front exists");
            batch.total += reply.len();
            batch.replies.push(reply);
        }
        build_iovecs(&mut batch);
        let entry = opcode::SendMsg::new(types::Fd(c.fd.as_raw_fd()), &batch.msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        c.send = Some(batch);
        ctx.submit_io(entry, (key as u64) << 4 | TAG_SEND);
    }

    fn on_send(&mut self, ctx: &mut CoreContext, key: usize, result: i32) {
        let c = &mut self.connections[key];
        let mut batch = c.send.take().expect("send in flight");
        if result == -libc::EINTR || result == -libc::EAGAIN {
            c.send = Some(batch);
            submit_send(ctx, key, c);
            return;
        }
        if result < 0 {
            // The client is gone: its replies are dropped, requests in flight still finish.
            c.dead = true;
            c.state = State::Draining;
            if c.recv_armed {
                // SAFETY: shutdown on our own socket; wakes the armed receive with EOF.
                unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        } else {
            batch.sent += result as usize;
            if batch.sent < batch.total {
                build_iovecs(&mut batch);
                c.send = Some(batch);
                submit_send(ctx, key, c);
                return;
            }
        }
        for reply in batch.replies {
            retire(c, reply.request, &self.stats.per_core[self.core]);
        }
        self.process(ctx, key);
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
            retire(c, p.request, &self.stats.per_core[self.core]);
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
fn retire(c: &mut Connection, request: usize, counters: &FrontendCounters) {
    let req = c.requests.remove(request);
    c.bytes_in_flight -= req.bytes;
    counters.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Submits the connection's send batch (again, after a partial send or EAGAIN).
fn submit_send(ctx: &mut CoreContext, key: usize, c: &Connection) {
    let batch = c.send.as_ref().expect("send batch");
    let entry = opcode::SendMsg::new(types::Fd(c.fd.as_raw_fd()), &batch.msghdr)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build();
    ctx.submit_io(entry, (key as u64) << 4 | TAG_SEND);
}

/// iovecs for the unsent part of a batch.
fn build_iovecs(batch: &mut SendBatch) {
    let mut skip = batch.sent;
    let mut iovecs = Vec::new();
    let mut push = |ptr: *const u8, len: usize, skip: &mut usize| {
        if *skip >= len {
            *skip -= len;
            return;
        }
        // SAFETY: *skip < len, inside the buffer.
        iovecs.push(libc::iovec {
            iov_base: unsafe { ptr.add(*skip) } as *mut libc::c_void,
            iov_len: len - *skip,
        });
        *skip = 0;
    };
    for r in &batch.replies {
        push(r.header.as_ptr(), r.header.len(), &mut skip);
        for (buf, head, len) in &r.data {
            // SAFETY: head + len is inside buf (the engine returns whole blocks covering it).
            push(unsafe { buf.as_ptr().add(*head) }, *len, &mut skip);
        }
    }
    batch.iovecs = iovecs;
    batch.msghdr.msg_iov = batch.iovecs.as_mut_ptr();
    batch.msghdr.msg_iovlen = batch.iovecs.len();
}

/// base:allocation extents for the pieces' block flags, merged where the state repeats.
fn extents(offset: u64, status: &[Vec<bool>], only_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = offset;
    for mapped in status {
        for &m in mapped {
            let block_end = (at / BLOCK_SIZE as u64 + 1) * BLOCK_SIZE as u64;
            let len = (block_end - at) as u32;
            let flags = if m { 0 } else { STATE_HOLE | STATE_ZERO };
            match out.last_mut() {
                Some(last) if last.1 == flags && last.0.checked_add(len).is_some() => last.0 += len,
                _ => out.push((len, flags)),
            }
            at = block_end;
        }
    }
    // The last extent may run past the requested length to the end of its block, which the
    // spec allows; volume sizes are whole blocks, so it never runs past the export.
    if only_one {
        out.truncate(1);
    }
    out
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

    #[test]
    fn extents_merge_and_start_mid_block() {
        let e = extents(100, &[vec![false, false, true], vec![true]], false);
        assert_eq!(
            e,
            vec![(4096 - 100 + 4096, STATE_HOLE | STATE_ZERO), (8192, 0)]
        );
        assert_eq!(extents(0, &[vec![true, false]], true), vec![(4096, 0)]);
    }
}
