//! One reactor per core: a pinned thread that owns one io_uring (`SINGLE_ISSUER |
//! DEFER_TASKRUN`, no SQPOLL, so an idle core sleeps in `io_uring_enter`), its shard of the
//! block store, and the frontend connections handed to it. Nothing else touches them; other
//! threads and cores talk to it through its mailbox.
//!
//! Loop: reap completions, take mailbox messages, route the answers the store produced,
//! submit. When an iteration found nothing to do, the core sleeps until a completion arrives;
//! a message arriving meanwhile wakes it through the eventfd read that is always armed.

use crate::error::EngineError;
use crate::layout::{placement_group, Geometry, CHUNK_SIZE};
use crate::mailbox::{Mailbox, Message};
use crate::metrics::CoreStats;
use crate::request::{Arrived, Completion, Piece, PieceKind, ReplyTo, Router};
use crate::store::{DiskOp, IoSubmit, Store, StoreIo};
use crossbeam_channel::Receiver;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Submission queue entries per ring. Completion queue is twice this (kernel default).
const RING_ENTRIES: u32 = 1024;
/// Messages taken from the mailbox per loop iteration, so completions are not starved.
const MAILBOX_BATCH_MAX: usize = 256;
/// Extra rounds of the mailbox per loop iteration for messages the iteration itself produced.
const SELF_MESSAGE_ROUNDS: usize = 4;
/// Delay after which journal records that no flush asked for are committed anyway.
const BACKGROUND_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// What the frontend running on a core implements. Callbacks run on the core's thread.
pub trait CoreService: Send + 'static {
    fn on_message(&mut self, core: &mut CoreContext, message: Box<dyn Any + Send>);
    /// Completion of an operation the service submitted with `submit_io`.
    fn on_io(&mut self, core: &mut CoreContext, tag: u64, result: i32, flags: u32);
    /// Answer to a piece the service sent with `ReplyTo::Core` naming this core.
    fn on_completion(&mut self, core: &mut CoreContext, completion: Completion);
    /// Stop taking new requests; finish and close what is open.
    fn on_shutdown(&mut self, core: &mut CoreContext);
    /// True while the service still has requests or connections open.
    fn busy(&self) -> bool;
    /// Called once per loop iteration, before the ring is submitted: what the iteration
    /// queued can go out as one batch.
    fn end_of_iteration(&mut self, _core: &mut CoreContext) {}
    /// How many completions the core may sleep for before it wakes: more than one only when
    /// nothing can progress until all of them are in (the replies to one replicated write).
    /// The core still wakes after `AWAIT_ALL_LIMIT` with fewer.
    fn completions_awaited(&self) -> u32 {
        1
    }
}

/// The longest a core sleeps for all of `completions_awaited` before it wakes for fewer.
pub const AWAIT_ALL_LIMIT: Duration = Duration::from_millis(1);

/// The low 4 bits of a service's io tag say whose operation it is when several services share
/// a core: the NBD connections use 1 and 2, the ublk queues 3, the peer connections this.
pub const TAG_KIND_PEER: u64 = 4;

/// A service for cores that serve no frontend (tests, tools).
pub struct NoService;

impl CoreService for NoService {
    fn on_message(&mut self, _: &mut CoreContext, _: Box<dyn Any + Send>) {}
    fn on_io(&mut self, _: &mut CoreContext, _: u64, _: i32, _: u32) {}
    fn on_completion(&mut self, _: &mut CoreContext, _: Completion) {}
    fn on_shutdown(&mut self, _: &mut CoreContext) {}
    fn busy(&self) -> bool {
        false
    }
}

/// Shared, read-only after start: the mailboxes, the geometry, and the router of a cluster.
pub struct Shared {
    pub mailboxes: Vec<Mailbox>,
    pub geometry: Geometry,
    pub router: std::sync::OnceLock<Arc<dyn Router>>,
    pub quotas: Arc<crate::quota::Quotas>,
}

impl Shared {
    /// The core that owns the chunk holding `offset` of `volume`.
    pub fn core_for(&self, volume: u32, offset: u64) -> usize {
        let pg = placement_group(volume, offset / CHUNK_SIZE, self.geometry.pg_count);
        (pg % self.geometry.cores) as usize
    }
}

thread_local! {
    static CURRENT_CORE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The core whose thread this is, if any. A message a core sends to its own mailbox costs no
/// system call and no wake-up, so code that may run anywhere can prefer the current core.
pub fn current_core() -> Option<usize> {
    CURRENT_CORE.with(|c| c.get())
}

/// user_data of the CQE another core posts into this ring with MSG_RING to wake it.
const WAKE_USER_DATA: u64 = u64::MAX;

/// How long a core keeps polling its ring and mailbox after its last piece of work before it
/// sleeps. Waking a sleeping core costs a context switch on both sides; under load a short
/// poll avoids most of them, and an idle core still sleeps after this long.
const POLL_BEFORE_SLEEP_DEFAULT: Duration = Duration::from_micros(0);

enum Op {
    /// A MSG_RING wake-up sent to another core (its CQE only comes back on failure).
    WakeCore(usize),
    Wake(#[allow(dead_code)] Box<u64>), // kept alive until the read completes
    Timer(#[allow(dead_code)] Box<types::Timespec>), // kept alive until the timeout fires
    Store(StoreIo),
    Service(u64),
}

struct Io {
    ring: IoUring,
    ops: Slab<Op>,
    sync: SyncWrites,
}

/// Small writes of an otherwise idle core, written with `pwrite` instead of through the ring.
///
/// An `O_DIRECT` write submitted through io_uring to a file on ext4 or XFS completes in a
/// kernel worker (the filesystem's direct-I/O completion work), which then wakes the core: two
/// context switches a `pwrite` does not make, since the device's interrupt wakes the waiting
/// thread directly. At queue depth 1 the core has nothing to do meanwhile, so it writes a lone
/// small write itself, after submitting what the iteration queued (a replicated write's sends go
/// out first). While other store operations are in flight, or when a new request arrived
/// while the core was blocked in such a write (the client has more than one request going), the
/// ring is used: blocking would delay the others.
struct SyncWrites {
    /// `TORUS_SYNC_WRITES=0` turns it off.
    enabled: bool,
    backing_fd: i32,
    /// Store operations in the ring, not yet reaped.
    store_in_flight: usize,
    /// Small writes still to go through the ring before trying again, after a request arrived
    /// during a synchronous write.
    paused: u32,
    /// A lone small write held back until the end of the iteration.
    held: Option<(DiskOp, StoreIo)>,
    /// The result of the synchronous write, reaped like a completion.
    written: Option<(StoreIo, i32)>,
    /// Set after a synchronous write during which completions arrived, until they are handled:
    /// a piece arriving then means the client did not wait for this write.
    watching: bool,
    /// Writes written synchronously (a counter for the metrics).
    count: u64,
}

/// `io_uring_enter` flag: wait for (and, with DEFER_TASKRUN, post) completions.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// After a request arrived during a synchronous write, this many small writes go through the
/// ring before the core tries again.
const SYNC_PAUSE_WRITES: u32 = 1024;

impl Io {
    fn push(&mut self, entry: squeue::Entry, op: Op) {
        let key = self.ops.insert(op);
        let entry = entry.user_data(key as u64);
        loop {
            // SAFETY: every buffer an entry points at is owned by the op (kept in `ops`), the
            // store task or the service connection until the completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                // EBUSY: completions must be reaped first; they are kept by the kernel (NODROP).
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    panic!("io_uring submit failed: {e}");
                }
            }
        }
    }
}

impl Io {
    /// Wakes another core by posting a CQE into its ring, from this ring (no extra syscall:
    /// it goes out with this core's next submit).
    fn wake_core(&mut self, core: usize, ring_fd: i32) {
        let entry = opcode::MsgRingData::new(types::Fd(ring_fd), 0, WAKE_USER_DATA, None)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS);
        self.push(entry, Op::WakeCore(core));
    }
}

impl IoSubmit for Io {
    fn piece_arrived(&mut self) {
        Io::piece_arrived(self)
    }

    fn submit_store(&mut self, op: DiskOp, io: StoreIo) {
        let sync = &mut self.sync;
        if sync.enabled && op.small_write() {
            if sync.paused > 0 {
                sync.paused -= 1;
            } else if sync.store_in_flight == 0 && sync.held.is_none() && sync.written.is_none() {
                sync.held = Some((op, io));
                return;
            }
        }
        if let Some((held, held_io)) = self.sync.held.take() {
            self.sync.store_in_flight += 1;
            self.push(held.entry(), Op::Store(held_io));
        }
        self.sync.store_in_flight += 1;
        self.push(op.entry(), Op::Store(io));
    }
}

impl Io {
    /// Called for every piece this core's store starts or this core's service sends.
    fn piece_arrived(&mut self) {
        if self.sync.watching {
            // A request that came while this core was blocked in a write.
            self.sync.paused = SYNC_PAUSE_WRITES;
        }
    }

    /// Writes the held write, if any, after submitting what is queued. True if it did.
    fn write_held(&mut self) -> bool {
        let Some((op, what)) = self.sync.held.take() else {
            return false;
        };
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
        let result = op.write_now(self.sync.backing_fd);
        if matches!(what, StoreIo::DataWrite { .. } | StoreIo::BatchWrite { .. }) {
            self.sync.count += 1;
        }
        self.sync.written = Some((what, result));
        if self.ring.submission().taskrun() {
            // Completions arrived meanwhile: post them now, so the next iteration handles
            // exactly those while watching for new requests among them.
            // SAFETY: no argument is passed.
            let _ = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
            };
            self.sync.watching = true;
        }
        true
    }
}

/// What a service sees of its core.
pub struct CoreContext {
    pub index: usize,
    io: Io,
    store: Store,
    shared: Arc<Shared>,
}

impl CoreContext {
    pub fn cores(&self) -> usize {
        self.shared.mailboxes.len()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Submits an operation for the service; its completion comes back to `on_io` with `tag`.
    /// Whatever memory the entry points at must stay valid until then.
    pub fn submit_io(&mut self, entry: squeue::Entry, tag: u64) {
        self.io.push(entry, Op::Service(tag));
    }

    /// True when pieces go through a cluster router rather than straight to this node's cores.
    pub fn routed(&self) -> bool {
        self.shared.router.get().is_some()
    }

    /// Flush through the cluster router (one completion); see `routed`.
    pub fn route_flush(&mut self, volume: u32, reply: ReplyTo) {
        let router = self
            .shared
            .router
            .get()
            .expect("route_flush needs a router")
            .clone();
        router.flush(volume, reply);
    }

    /// Sends a piece to the core that owns it (this one or another), or to the cluster router.
    pub fn send_piece(&mut self, piece: Piece, reply: ReplyTo) {
        // A request this core's service took, wherever it goes: it waited if this core was
        // blocked in a write.
        self.io.piece_arrived();
        if let Some(router) = self.shared.router.get() {
            let router = router.clone();
            return router.route(piece, reply);
        }
        let owner = match piece.kind {
            PieceKind::Flush => panic!("flush goes to every core: use send_piece_to"),
            _ => self.shared.core_for(piece.volume, piece.offset),
        };
        self.send_piece_to(owner, piece, reply);
    }

    pub fn send_piece_to(&mut self, core: usize, piece: Piece, reply: ReplyTo) {
        if core == self.index {
            self.store.start(
                &mut self.io,
                Arrived {
                    piece,
                    reply,
                    at: Instant::now(),
                },
            );
        } else {
            self.io.piece_arrived();
            self.send_to_core(core, Message::Piece(piece, reply));
        }
    }

    /// Sends a message to another core, waking it through this core's ring if it sleeps.
    pub fn send_to_core(&mut self, core: usize, message: Message) {
        if let Some(fd) = self.shared.mailboxes[core].send_from_core(message) {
            self.io.wake_core(core, fd);
        }
    }
}

pub(crate) struct Reactor {
    ctx: CoreContext,
    receiver: Receiver<Message>,
    service: Box<dyn CoreService>,
    shutdown: Option<ReplyTo>,
    /// A shutdown was asked for (`shutdown` holds its answer until the checkpoint takes it).
    shutting_down: bool,
    draining: Option<ReplyTo>,
    cqes: Vec<cqueue::Entry>,
    routing: Vec<(ReplyTo, Completion)>,
    service_stopped: bool,
    checkpoint_started: bool,
}

impl Reactor {
    pub(crate) fn new(
        index: usize,
        store: Store,
        shared: Arc<Shared>,
        receiver: Receiver<Message>,
        service: Box<dyn CoreService>,
        backing_fd: i32,
    ) -> Result<Reactor, EngineError> {
        let ring_err = |source| EngineError::Ring {
            core: index,
            source,
        };
        // Without DEFER_TASKRUN (before Linux 6.1) nor the taskrun flag, a core cannot tell that
        // requests arrived while it was blocked in a write, so it never writes synchronously.
        let (ring, taskrun_flag) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
        {
            Ok(ring) => (ring, true),
            Err(_) => (
                IoUring::builder().build(RING_ENTRIES).map_err(ring_err)?,
                false,
            ),
        };
        ring.submitter()
            .register_files(&[backing_fd])
            .map_err(ring_err)?;
        shared.mailboxes[index].set_ring_fd(std::os::fd::AsRawFd::as_raw_fd(&ring));
        let mut store = store;
        store.read_pool = register_read_pool(&ring, index);
        store.quotas = shared.quotas.clone();
        let mut reactor = Reactor {
            ctx: CoreContext {
                index,
                io: Io {
                    ring,
                    ops: Slab::with_capacity(256),
                    sync: SyncWrites {
                        enabled: taskrun_flag
                            && std::env::var("TORUS_SYNC_WRITES").map_or(true, |v| v != "0"),
                        backing_fd,
                        store_in_flight: 0,
                        paused: 0,
                        held: None,
                        written: None,
                        watching: false,
                        count: 0,
                    },
                },
                store,
                shared,
            },
            receiver,
            service,
            shutdown: None,
            shutting_down: false,
            draining: None,
            cqes: Vec::with_capacity(256),
            routing: Vec::with_capacity(256),
            service_stopped: false,
            checkpoint_started: false,
        };
        reactor.arm_wake();
        Ok(reactor)
    }

    fn arm_wake(&mut self) {
        let mut buf = Box::new(0u64);
        let fd = self.ctx.shared.mailboxes[self.ctx.index].eventfd();
        let entry = opcode::Read::new(types::Fd(fd), &mut *buf as *mut u64 as *mut u8, 8).build();
        self.ctx.io.push(entry, Op::Wake(buf));
    }

    fn arm_timer(&mut self) {
        let ts = Box::new(types::Timespec::from(BACKGROUND_COMMIT_DELAY));
        let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        self.ctx.io.push(entry, Op::Timer(ts));
        self.ctx.store.timer_armed = true;
    }

    pub(crate) fn run(mut self) {
        CURRENT_CORE.with(|c| c.set(Some(self.ctx.index)));
        let spin_limit = std::env::var("TORUS_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_micros)
            .unwrap_or(POLL_BEFORE_SLEEP_DEFAULT);
        let mut last_work = Instant::now();
        let mut skipped = 0;
        loop {
            let mut work = self.reap();
            // Set when this iteration must be followed by another one whatever happens.
            let mut must_loop = false;
            work |= self.take_messages();
            self.route();
            // What this core sent itself meanwhile (a cluster's piece for its own store, a
            // reply for its own connection) is taken now, not after another trip through
            // io_uring_enter.
            for _ in 0..SELF_MESSAGE_ROUNDS {
                if self.receiver.is_empty() {
                    break;
                }
                self.take_messages();
            }
            self.ctx.io.sync.watching = false;
            if self.ctx.store.has_pending_records()
                && !self.ctx.store.timer_armed
                && !self.ctx.store.commit_running()
            {
                self.arm_timer();
            }
            if self.draining.is_some() && !self.service.busy() {
                let reply = self.draining.take().expect("drain requested");
                let token = reply.token();
                self.ctx.store.out.push((
                    reply,
                    Completion {
                        token,
                        output: Ok(crate::request::Output::Done),
                    },
                ));
                self.route();
            }
            if self.shutting_down && !self.service.busy() && self.ctx.store.tasks_in_flight() == 0 {
                if !self.checkpoint_started {
                    self.checkpoint_started = true;
                    let reply = self.shutdown.take().expect("shutdown requested");
                    self.ctx.store.checkpoint_now(&mut self.ctx.io, reply);
                    self.route();
                    work = true;
                    must_loop = true;
                } else if self.ctx.store.idle() {
                    if !self.ctx.store.has_pending_records() {
                        return;
                    }
                    // Something changed after the checkpoint began: commit it before leaving.
                    self.ctx.store.kick_commit(&mut self.ctx.io);
                    work = true;
                    must_loop = true;
                }
            }
            // A checkpoint is encoded a step at a time, with the core's I/O reaped between
            // steps (never several steps without a trip through io_uring_enter).
            let stepped = self.ctx.store.wants_step();
            if stepped {
                self.ctx.store.checkpoint_step(&mut self.ctx.io);
                self.route();
                work = true;
                // No sleep while encoding is left (a submission made meanwhile, such as a
                // receive re-armed on an idle connection, might not complete for long).
                must_loop = true;
            }
            self.service.end_of_iteration(&mut self.ctx);
            self.ctx.store.flush_writes(&mut self.ctx.io);
            if self.ctx.io.write_held() {
                continue;
            }
            // The clock is read only when polling is asked for (a few per request otherwise).
            let polling = !spin_limit.is_zero();
            if work && polling {
                last_work = Instant::now();
            }
            let spin = polling && !work && last_work.elapsed() < spin_limit;
            let submitting = !self.ctx.io.ring.submission().is_empty();
            if work && !submitting && !stepped && skipped < 8 {
                // Nothing to submit and more to look at: another round without a system call
                // (a few at most: completions are only gathered by io_uring_enter).
                skipped += 1;
                continue;
            }
            skipped = 0;
            // After work that submitted something, everything it led to is either in the
            // submission queue or in the mailbox: when the mailbox is empty, submitting and
            // waiting for the first completion is one system call instead of two. (The
            // submissions' own completions, inline or not, end the wait.)
            let mailbox = &self.ctx.shared.mailboxes[self.ctx.index];
            let sleep = (!work || (submitting && !must_loop))
                && !spin
                && mailbox.prepare_sleep(&self.receiver);
            // One wake-up for all of a replicated write's replies instead of one for each
            // (with DEFER_TASKRUN the kernel wakes the core only when that many are in).
            let awaited = if sleep
                && self.ctx.io.sync.store_in_flight == 0
                && !self.shutting_down
                && self.draining.is_none()
            {
                self.service.completions_awaited()
            } else {
                1
            };
            let result = if awaited > 1 {
                let limit = types::Timespec::from(AWAIT_ALL_LIMIT);
                let args = types::SubmitArgs::new().timespec(&limit);
                self.ctx
                    .io
                    .ring
                    .submitter()
                    .submit_with_args(awaited as usize, &args)
            } else {
                self.ctx.io.ring.submit_and_wait(if sleep { 1 } else { 0 })
            };
            if sleep {
                self.ctx.shared.mailboxes[self.ctx.index].awake();
            }
            if let Err(e) = result {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) {
                    panic!("core {}: io_uring_enter failed: {e}", self.ctx.index);
                }
            }
        }
    }

    fn reap(&mut self) -> bool {
        let mut any = false;
        if let Some((what, result)) = self.ctx.io.sync.written.take() {
            any = true;
            self.ctx.store.on_io(&mut self.ctx.io, what, result);
            self.route();
        }
        loop {
            // Reused buffers: reaping and routing allocate nothing per completion.
            let mut batch = std::mem::take(&mut self.cqes);
            batch.extend(self.ctx.io.ring.completion().take(256));
            if batch.is_empty() {
                self.cqes = batch;
                return any;
            }
            any = true;
            for cqe in batch.drain(..) {
                if cqe.user_data() == WAKE_USER_DATA {
                    continue; // another core woke us: the mailbox is read next
                }
                let key = cqe.user_data() as usize;
                let op = self.ctx.io.ops.remove(key);
                match op {
                    Op::WakeCore(core) => self.ctx.shared.mailboxes[core].wake(),
                    Op::Wake(_) => self.arm_wake(),
                    Op::Timer(_) => {
                        self.ctx.store.timer_armed = false;
                        self.ctx.store.kick_commit(&mut self.ctx.io);
                    }
                    Op::Store(what) => {
                        self.ctx.io.sync.store_in_flight -= 1;
                        self.ctx.store.on_io(&mut self.ctx.io, what, cqe.result())
                    }
                    Op::Service(tag) => {
                        self.service
                            .on_io(&mut self.ctx, tag, cqe.result(), cqe.flags())
                    }
                }
                self.route();
            }
            self.cqes = batch;
        }
    }

    fn take_messages(&mut self) -> bool {
        let mut any = false;
        for _ in 0..MAILBOX_BATCH_MAX {
            let Ok(message) = self.receiver.try_recv() else {
                break;
            };
            any = true;
            match message {
                Message::Piece(piece, reply) => {
                    self.ctx.store.start(
                        &mut self.ctx.io,
                        Arrived {
                            piece,
                            reply,
                            at: Instant::now(),
                        },
                    );
                }
                Message::Done(completion) => self.service.on_completion(&mut self.ctx, completion),
                Message::Service(m) => self.service.on_message(&mut self.ctx, m),
                Message::CloneVolume { from, to, reply } => {
                    self.ctx
                        .store
                        .clone_volume(&mut self.ctx.io, from, to, reply)
                }
                Message::CountQuota(volume, reply) => {
                    if let Some(q) = self.ctx.shared.quotas.get(volume) {
                        q.start_counting(
                            self.ctx.index,
                            self.ctx.store.map().mapped_blocks_of(volume),
                        );
                    }
                    let token = reply.token();
                    self.ctx.store.out.push((
                        reply,
                        Completion {
                            token,
                            output: Ok(crate::request::Output::Done),
                        },
                    ));
                }
                Message::DropVolume(volume, reply) => {
                    self.ctx.store.drop_volume(&mut self.ctx.io, volume, reply)
                }
                Message::Stats(sender) => {
                    let _ = sender.send(self.stats());
                }
                Message::ExclusiveBlocks(sender) => {
                    let _ = sender.send(self.ctx.store.exclusive_blocks());
                }
                Message::ListBlocks { pgs, reply } => {
                    let pg_count = self.ctx.shared.geometry.pg_count;
                    reply(self.ctx.store.list_blocks(&pgs, pg_count));
                }
                Message::Drain(reply) => {
                    if !self.service_stopped {
                        self.service_stopped = true;
                        self.service.on_shutdown(&mut self.ctx);
                    }
                    self.draining = Some(reply);
                }
                Message::Shutdown(reply) => {
                    if !self.shutting_down {
                        self.shutting_down = true;
                        self.shutdown = Some(reply);
                        if !self.service_stopped {
                            self.service_stopped = true;
                            self.service.on_shutdown(&mut self.ctx);
                        }
                    }
                }
            }
            self.route();
        }
        any
    }

    /// Delivers what the store answered: to this core's service, another core, or a channel.
    fn route(&mut self) {
        while !self.ctx.store.out.is_empty() {
            let mut out = std::mem::take(&mut self.routing);
            std::mem::swap(&mut out, &mut self.ctx.store.out);
            for (reply, completion) in out.drain(..) {
                match reply {
                    ReplyTo::Core { core, .. } if core == self.ctx.index => {
                        self.service.on_completion(&mut self.ctx, completion)
                    }
                    ReplyTo::Core { core, .. } => {
                        self.ctx.send_to_core(core, Message::Done(completion))
                    }
                    ReplyTo::Channel { sender, .. } => {
                        let _ = sender.send(completion);
                    }
                    ReplyTo::Sink { sink, .. } => sink.0.complete(completion),
                    ReplyTo::Once(f) => (f.0)(completion),
                }
            }
            // Keep the larger buffer for the next round; `out` is empty now.
            if out.capacity() > self.routing.capacity() {
                self.routing = out;
            }
        }
    }

    fn stats(&self) -> CoreStats {
        let s = &self.ctx.store;
        let c = &s.counters;
        let map = s.map();
        CoreStats {
            core: self.ctx.index,
            reads: c.reads,
            writes: c.writes,
            zeroes: c.zeroes,
            flushes: c.flushes,
            bytes_read: c.bytes_read,
            bytes_written: c.bytes_written,
            commits: c.commits,
            checkpoints: c.checkpoints,
            checksum_errors: c.checksum_errors,
            io_errors: c.io_errors,
            disk_write_ops: c.write_ops,
            sync_write_ops: self.ctx.io.sync.count,
            pieces_in_flight: s.tasks_in_flight() as u64,
            slots_total: s.slots_total(),
            slots_free: s.slots_free(),
            mapped_blocks: map.mapped_blocks(),
            volumes: map
                .volumes()
                .into_iter()
                .map(|v| (v, map.mapped_blocks_of(v)))
                .collect(),
            latency_read_us: s.latency_read_us.clone(),
            latency_write_us: s.latency_write_us.clone(),
            poisoned: s.poisoned(),
        }
    }
}

/// Registers a pool of read buffers with the ring: the full size, then a small one (a
/// non-root process has 8 MiB of memlock), else none (reads use plain buffers).
fn register_read_pool(ring: &IoUring, core: usize) -> Option<Arc<crate::buffer_pool::BufferPool>> {
    use crate::buffer_pool::{BufferPool, POOL_BYTES_FALLBACK, POOL_BYTES_PER_CORE};
    for bytes in [POOL_BYTES_PER_CORE, POOL_BYTES_FALLBACK] {
        let pool = Arc::new(BufferPool::new(bytes));
        // SAFETY: the pool's memory stays allocated while any ring uses it: the store keeps an
        // Arc, every buffer handed out keeps one, and the ring is dropped with the reactor.
        match unsafe { ring.submitter().register_buffers(&[pool.iovec()]) } {
            Ok(()) => return Some(pool),
            Err(e) => {
                if bytes == POOL_BYTES_FALLBACK {
                    eprintln!("torus: core {core}: registered buffers unavailable ({e}); reads use plain O_DIRECT buffers");
                }
            }
        }
    }
    None
}

/// The CPUs the calling thread may run on (its affinity mask), in order; empty if unknown.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it and the result is checked.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU (best effort: a container may forbid it).
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
