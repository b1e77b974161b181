//! Cross-core mailboxes. Each core has one multi-producer queue and an eventfd; the core's
//! ring always has a read of that eventfd armed, so a message wakes a sleeping core through
//! its own io_uring. A sender writes the eventfd only when the target said it was about to
//! sleep, so a busy core receives messages without any system call.
//!
//! The queue itself is unbounded; what travels through it is bounded upstream: every piece
//! comes from a connection with a limit on requests and bytes in flight.

use crate::request::{Completion, Piece, ReplyTo};
use crossbeam_channel::{Receiver, Sender};
use std::any::Any;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Mapped blocks as (volume, block, crc32c).
pub type BlockList = Vec<(u32, u64, u32)>;

pub enum Message {
    Piece(Piece, ReplyTo),
    Done(Completion),
    /// Something for the core's service (the frontend): a new connection, say.
    Service(Box<dyn Any + Send>),
    DropVolume(u32, ReplyTo),
    /// Map every block of the first volume in the second too (emptied first): a snapshot,
    /// clone or restore. Answered once durable.
    CloneVolume {
        from: u32,
        to: u32,
        reply: ReplyTo,
    },
    /// Start counting a volume's blocks against its (new) quota.
    CountQuota(u32, ReplyTo),
    Stats(Sender<crate::metrics::CoreStats>),
    /// Per volume, blocks no other volume shares (walks the core's whole map: asked only by
    /// `snapshot list`, never by the periodic stats).
    ExclusiveBlocks(Sender<Vec<(u32, u64)>>),
    /// Every mapped block of this core in the placement groups flagged in `pgs` (indexed by
    /// PG), as (volume, block, crc32c), sorted; the answer goes to `reply` on the core's thread.
    ListBlocks {
        pgs: Vec<bool>,
        reply: Box<dyn FnOnce(BlockList) + Send>,
    },
    /// Finish in-flight work, close connections, checkpoint, then stop. The checkpoint's
    /// result is sent to the reply.
    Shutdown(ReplyTo),
    /// Stop the service: no new requests, close connections once their requests are answered.
    /// The reply goes out when the service on this core has nothing open. All cores are
    /// drained before any is shut down, so no piece can reach a core after its checkpoint.
    Drain(ReplyTo),
}

pub struct Mailbox {
    sender: Sender<Message>,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    /// The owning core's io_uring fd, so other cores can wake it with IORING_OP_MSG_RING
    /// from their own ring instead of a write(2) to the eventfd. -1 until the ring exists.
    ring_fd: AtomicI32,
}

impl Mailbox {
    pub fn new() -> std::io::Result<(Mailbox, Receiver<Message>)> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (sender, receiver) = crossbeam_channel::unbounded();
        // SAFETY: fd was just created and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((
            Mailbox {
                sender,
                sleeping: AtomicBool::new(false),
                eventfd,
                ring_fd: AtomicI32::new(-1),
            },
            receiver,
        ))
    }

    pub fn send(&self, message: Message) {
        // The receiver lives as long as the engine; a send after shutdown is dropped.
        let _ = self.sender.send(message);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Queues a message without waking the core. Returns the core's ring fd when it must be
    /// woken (it said it would sleep): the caller, a core, wakes it through its own ring.
    pub(crate) fn send_from_core(&self, message: Message) -> Option<i32> {
        let _ = self.sender.send(message);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let fd = self.ring_fd.load(Ordering::Acquire);
            if fd < 0 {
                self.wake();
                return None;
            }
            return Some(fd);
        }
        None
    }

    pub(crate) fn set_ring_fd(&self, fd: i32) {
        self.ring_fd.store(fd, Ordering::Release);
    }

    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter full) means a
        // wake-up is already pending, which is all we need.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }

    pub(crate) fn eventfd(&self) -> i32 {
        self.eventfd.as_raw_fd()
    }

    /// The core announces it will sleep. Returns false if a message raced in (do not sleep).
    pub(crate) fn prepare_sleep(&self, receiver: &Receiver<Message>) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if !receiver.is_empty() {
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }
}
