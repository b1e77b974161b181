//! `PeerService`: the peer connections one core owns, received and sent through that core's
//! io_uring. On a link's connection requests go out batched (everything queued while the
//! previous send ran goes out as one frame in one send) and replies come back in any order,
//! matched by id; on a served connection each request is handed to the node's `Handler` with
//! a `Responder`, and replies are batched the same way.
//!
//! A connection that fails — refused, reset, a bad frame, or a reply overdue by `OP_TIMEOUT` —
//! fails every request it holds with `RETRY`; the next request on the link connects again.
//! When the other end closed or reset it, this node is flushed first (`flush_every_core`).
//!
//! Limits: a core serves at most `SERVED_PER_PEER` connections for one node (a new one past
//! that closes that node's oldest) and `SERVED_MAX` in all; a served connection is not read
//! while it has `SERVE_IN_FLIGHT` requests in flight.
//!
//! Invariant: a buffer handed to the kernel (the receive buffer, the body being received, the
//! frame being sent) belongs to its connection, which is kept until that receive or send
//! completes (`maybe_remove`).

use super::awaiting::Awaiting;
use super::conn::{Conn, Role};
use super::link::{connect, LinkInner};
use super::Responder;
use super::{retry, LogEvery, Outgoing, PeerMsg, Reply, COUNTERS, OP_TIMEOUT};
use crate::wire::{self, Data, Entry, Op, Status, HEADER_LEN};
use io_uring::{opcode, types};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::reactor::TAG_KIND_PEER;
use torus_engine::socket::{self, SocketResult};
use torus_engine::{
    AlignedBuf, Completion, CompletionSink, CoreContext, CoreService, Message, Piece, PieceKind,
    ReplyTo, Shared, Sink, SpareBuffers,
};

/// A frame is cut at this many entries or bytes of data.
const BATCH_ENTRIES: usize = 1024;
const BATCH_BYTES: usize = 8 << 20;

/// Requests one incoming connection may have in flight on this node (until their replies are
/// sent) before it is not read.
pub const SERVE_IN_FLIGHT: usize = 2048;
/// Bytes the reads one incoming connection has in flight may answer with; a read past it is
/// answered RETRY at once (the sender asks again). Beside `SERVE_IN_FLIGHT`, this bounds what
/// a peer that sends reads and never takes their replies holds of this node's memory.
pub const SERVE_READ_BYTES: usize = 32 << 20;
/// The same for every incoming connection of a core together.
pub const CORE_READ_BYTES: usize = 256 << 20;
/// Connections one core serves for one node. A node opens one per core of its own (and a new
/// one when the last failed), so more means old ones its side has given up on (a peer cut off
/// or restarted without a reset): the oldest is closed to make room.
pub const SERVED_PER_PEER: usize = 64;
/// Connections one core serves in all; past that a new one is closed at once.
pub const SERVED_MAX: usize = 1024;

/// How often a core with requests out looks for overdue ones.
const TICK: Duration = Duration::from_millis(500);

const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_TICK: u64 = 3;

fn tag(op: u64, conn: u64) -> u64 {
    TAG_KIND_PEER | op << 4 | conn << 8
}

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
    /// Bytes the reads of every served connection have in flight (`CORE_READ_BYTES`).
    read_bytes: usize,
    /// The entries of the frame being sent, kept for its capacity (`try_send`).
    send_batch: Vec<(Entry, Option<Data>)>,
    /// Bodies of received frames that carry data, kept for reuse once the store is done
    /// with them (`SPARE_BODIES` of at most `SPARE_BODY_BYTES`: 2 MiB per core at most).
    spare_bodies: SpareBuffers,
}

const SPARE_BODIES: usize = 32;
const SPARE_BODY_BYTES: usize = 64 << 10;

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
            read_bytes: 0,
            send_batch: Vec::new(),
            spare_bodies: SpareBuffers::new(SPARE_BODIES, SPARE_BODY_BYTES),
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
            return o.done.call(retry());
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
            cb.call(retry());
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
                    if &**f == from {
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
                if let Some(Conn {
                    role: Role::Served { read_bytes, .. },
                    ..
                }) = self.conns.remove(&id)
                {
                    self.read_bytes -= read_bytes;
                }
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
        if let Role::Served {
            in_flight,
            read_bytes,
            ..
        } = &c.role
        {
            if *in_flight >= SERVE_IN_FLIGHT || *read_bytes >= SERVE_READ_BYTES {
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
        let n = match socket::classify(result) {
            SocketResult::Data(n) => n,
            SocketResult::TryAgain => return self.arm_recv(ctx, id),
            SocketResult::EndOfStream | SocketResult::Error(_) => {
                flush_every_core(c, ctx.shared());
                return self.close(id);
            }
        };
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
                self.dispatch(ctx, id, frame.entries, Some(frame.body));
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
            if c.rend - c.rstart >= h.len {
                // The whole body is here: decoded where it is, and copied out only if its
                // entries carry data (a frame of replies needs no buffer).
                let bytes = &c.rbuf[c.rstart..c.rstart + h.len];
                let (entries, data) = wire::split_body(&h, bytes)?;
                let body = (data > 0).then(|| {
                    let mut buf = self.spare_bodies.take(h.len);
                    Arc::get_mut(&mut buf).expect("held by nothing else")[..h.len]
                        .copy_from_slice(bytes);
                    self.spare_bodies.keep(buf.clone());
                    buf
                });
                c.rstart += h.len;
                self.dispatch(ctx, id, entries, body);
                continue;
            }
            let buf = wire::body_buffer(h.len);
            c.body = Some((h, buf, 0));
        }
    }

    /// Acts on a frame's entries; `body` holds their data (none when they carry none).
    fn dispatch(
        &mut self,
        ctx: &mut CoreContext,
        id: u64,
        entries: wire::Entries,
        body: Option<Arc<AlignedBuf>>,
    ) {
        count_received(entries.len());
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let data_of = |e: &Entry, start: usize| {
            let buf = body.as_ref().filter(|_| e.data_len > 0)?;
            Some(Data {
                buf: buf.clone(),
                start,
                len: e.data_len as usize,
            })
        };
        match &mut c.role {
            Role::Client { pending, .. } => {
                // A callback reaches this service only through the mailbox, so it can run
                // while the connection is borrowed (no list of them is gathered first).
                for (e, start) in &entries {
                    if e.op != Op::Reply as u8 {
                        continue;
                    }
                    if let Some((cb, _, group)) = pending.remove(&e.id) {
                        self.awaiting.answered(group);
                        cb.call(Reply {
                            status: Status::from_u16(e.status),
                            data: data_of(e, *start),
                        });
                    }
                }
            }
            Role::Served {
                from,
                handler,
                in_flight,
                read_bytes,
                charged,
                ..
            } => {
                let (from, handler) = (from.clone(), handler.clone());
                *in_flight += entries.len();
                for (e, start) in &entries {
                    let respond = Responder::conn(ctx.shared().clone(), self.core, id, e.id);
                    if e.op == Op::Read as u8 || e.op == Op::CRead as u8 {
                        let n = e.len as usize;
                        if *read_bytes + n > SERVE_READ_BYTES
                            || self.read_bytes + n > CORE_READ_BYTES
                            || charged.contains_key(&e.id)
                        {
                            respond.reply(Status::Retry, None);
                            continue;
                        }
                        *read_bytes += n;
                        self.read_bytes += n;
                        charged.insert(e.id, n);
                    }
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
        let mut batch = std::mem::take(&mut self.send_batch);
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
            Role::Served {
                replies,
                in_flight,
                read_bytes,
                charged,
                ..
            } => {
                while batch.len() < BATCH_ENTRIES && bytes < BATCH_BYTES {
                    let Some(r) = replies.pop_front() else { break };
                    // Counted out once its reply is in the frame being sent (one at a time
                    // per connection, at most `BATCH_BYTES`).
                    *in_flight = in_flight.saturating_sub(1);
                    if let Some(n) = charged.remove(&r.0.id) {
                        *read_bytes -= n;
                        self.read_bytes -= n;
                    }
                    bytes += r.1.as_ref().map_or(0, |d| d.len);
                    batch.push(r);
                }
            }
        }
        let served = matches!(c.role, Role::Served { .. });
        let any = !batch.is_empty();
        if any {
            wire::encode_frame(&mut batch, &mut c.out);
            count_sent(batch.len(), c.out.len());
            c.sent = 0;
            submit_send(ctx, id, c, fd);
        }
        batch.clear();
        self.send_batch = batch;
        // Replies counted out: a connection not read for its requests in flight may be again.
        if served && any {
            self.arm_recv(ctx, id);
        }
    }

    fn on_send(&mut self, ctx: &mut CoreContext, id: u64, result: i32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.send_armed = false;
        if c.closing {
            return self.maybe_remove(id);
        }
        c.sent += match socket::classify(result) {
            SocketResult::Data(n) => n,
            // Nothing went out: the rest is submitted again below.
            SocketResult::TryAgain => 0,
            SocketResult::EndOfStream | SocketResult::Error(_) => {
                flush_every_core(c, ctx.shared());
                return self.close(id);
            }
        };
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
fn flush_every_core(c: &Conn, shared: &Shared) {
    if !c.recorder().flush_recorded() {
        flush_cores_unrecorded(shared);
    }
}

/// Flushes every core of this node without recording it (the cluster is gone).
fn flush_cores_unrecorded(shared: &Shared) {
    struct Ignore;
    impl CompletionSink for Ignore {
        fn complete(&self, _: Completion) {}
    }
    for m in &shared.mailboxes {
        let flush = Piece {
            volume: 0,
            offset: 0,
            len: 0,
            kind: PieceKind::Flush,
        };
        let reply = ReplyTo::Sink {
            sink: Sink(Arc::new(Ignore)),
            token: 0,
        };
        m.send(Message::Piece(flush, reply));
    }
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

impl PeerService {
    /// Acts on a message for this core's peer service (from its mailbox or its own queue).
    fn handle(&mut self, ctx: &mut CoreContext, m: PeerMsg) {
        match m {
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
            PeerMsg::Serve {
                fd,
                from,
                handler,
                recorder,
            } => {
                if !self.make_room(&from) {
                    return; // the socket is dropped: closed
                }
                let role = Role::Served {
                    from: from.into(),
                    handler,
                    recorder,
                    in_flight: 0,
                    read_bytes: 0,
                    charged: HashMap::new(),
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
                if let Role::Served { replies, .. } = &mut c.role {
                    if !c.closing {
                        replies.push_back((entry, data));
                    }
                }
                self.to_send.push(conn);
                self.arm_recv(ctx, conn);
            }
        }
    }
}

impl CoreService for PeerService {
    fn on_message(&mut self, ctx: &mut CoreContext, message: Box<dyn std::any::Any + Send>) {
        if let Ok(m) = message.downcast::<PeerMsg>() {
            self.handle(ctx, *m);
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
        // What code on this core queued for it (and what handling that queues in turn).
        while let Some(m) = super::next_for_this_core() {
            self.handle(ctx, m);
        }
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
