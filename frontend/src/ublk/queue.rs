//! One ublk queue per core, served on that core's io_uring: the core issues a FETCH_REQ
//! (`URING_CMD`, a plain 64-byte SQE) for every tag; when the kernel hands it a request the
//! core reads the tag's descriptor, cuts the request at chunk boundaries, sends each piece to
//! the core (or node) that owns it, and answers with COMMIT_AND_FETCH_REQ, which also arms the
//! tag for the next request. No thread, ring or event loop besides the core's own.
//!
//! Data moves through one buffer per tag (`MAX_IO_BYTES`, allocated on first touch): the
//! kernel copies a write's data into it before handing the request over, and copies a read's
//! data out of it when the commit arrives. Memory per queue: `QUEUE_DEPTH × MAX_IO_BYTES`
//! (64 MiB of address space, resident only as far as requests used it).

use super::error::UblkError;
use super::sys;
use crate::exports::Attachment;
use crate::nbd::transmission::{piece_len, piece_start, pieces};
use io_uring::{opcode, types};
use slab::Slab;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use torus_engine::{
    AlignedBuf, BlockError, Completion, CoreContext, Output, Piece, PieceKind, ReplyTo,
};

/// Requests in flight per queue (the kernel's tags).
pub const QUEUE_DEPTH: u16 = 128;
/// Largest request the kernel sends (it splits larger ones).
pub const MAX_IO_BYTES: u32 = 512 * 1024;

/// A ublk device served by this node: shared by its queues (one per core) and the control plane.
pub struct Device {
    pub id: u32,
    pub cdev: OwnedFd,
    pub queues: u16,
    pub depth: u16,
    /// The claim on the volume, held while any queue runs.
    pub attachment: Attachment,
}

/// Sent to a core: start serving queue `q` of `device`; `ready` hears once every tag's fetch
/// is queued (or why the queue could not start).
pub struct StartQueue {
    pub device: Arc<Device>,
    pub q: u16,
    pub ready: crossbeam_channel::Sender<Result<(), UblkError>>,
}

struct Tag {
    buf: Arc<AlignedBuf>,
    pieces_left: u32,
    error: Option<i32>,
    /// Bytes the request asked for (its answer when it succeeds).
    len: u32,
    offset: u64,
    op: u8,
}

struct Queue {
    device: Arc<Device>,
    q: u16,
    descs: *const sys::IoDesc,
    map_len: usize,
    tags: Vec<Tag>,
    /// FETCH / COMMIT_AND_FETCH commands the kernel holds.
    armed: usize,
    /// Requests being worked on.
    busy: usize,
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: descs/map_len are the mapping made in `start`, unmapped once.
        unsafe { libc::munmap(self.descs as *mut libc::c_void, self.map_len) };
    }
}

/// The ublk queues running on one core.
pub struct UblkService {
    core: usize,
    queues: Slab<Queue>,
    shutting_down: bool,
}

// SAFETY: the descriptor pointer refers to a shared read-only mapping; queues are only
// touched by the core that owns them.
unsafe impl Send for Queue {}

/// Completion tokens of ublk pieces carry this bit (NBD's never do).
pub const TOKEN_UBLK: u64 = 1 << 63;

fn token(queue: usize, tag: usize, piece: usize) -> u64 {
    debug_assert!(queue < 1 << 20 && tag < 1 << 16 && piece < 1 << 20);
    TOKEN_UBLK | (queue as u64) << 40 | (tag as u64) << 20 | piece as u64
}

fn untoken(t: u64) -> (usize, usize, usize) {
    (
        ((t >> 40) & 0xF_FFFF) as usize,
        ((t >> 20) & 0xFFFF) as usize,
        (t & 0xF_FFFF) as usize,
    )
}

/// The io tag of a queue's command for `tag`; the low 4 bits are the service's kind.
pub fn io_tag(queue: usize, tag: u16, kind: u64) -> u64 {
    ((queue as u64) << 16 | tag as u64) << 4 | kind
}

fn errno(e: BlockError) -> i32 {
    match e {
        BlockError::NoSpace => -libc::ENOSPC,
        BlockError::Invalid => -libc::EINVAL,
        _ => -libc::EIO,
    }
}

impl UblkService {
    pub fn new(core: usize) -> UblkService {
        UblkService {
            core,
            queues: Slab::new(),
            shutting_down: false,
        }
    }

    pub fn busy(&self) -> bool {
        self.queues.iter().any(|(_, q)| q.busy > 0)
    }

    pub fn shutdown(&mut self) {
        // The queues stay armed: when the process exits the kernel quiesces the device and a
        // restarted torusd takes it back (user recovery); requests then in flight are reissued.
        self.shutting_down = true;
    }

    pub fn start(&mut self, ctx: &mut CoreContext, start: StartQueue, kind: u64) {
        let StartQueue { device, q, ready } = start;
        let map_len = (device.depth as usize * std::mem::size_of::<sys::IoDesc>())
            .next_multiple_of(sys::page_size());
        // SAFETY: a read-only shared mapping of the char device's descriptor area for queue q.
        let descs = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                device.cdev.as_raw_fd(),
                sys::desc_offset(q),
            )
        };
        if descs == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            let _ = ready.send(Err(UblkError::MapDescriptors { queue: q, source }));
            return;
        }
        let depth = device.depth;
        let tags = (0..depth)
            .map(|_| Tag {
                buf: Arc::new(AlignedBuf::zeroed(MAX_IO_BYTES as usize)),
                pieces_left: 0,
                error: None,
                len: 0,
                offset: 0,
                op: 0,
            })
            .collect();
        let key = self.queues.insert(Queue {
            device,
            q,
            descs: descs as *const sys::IoDesc,
            map_len,
            tags,
            armed: 0,
            busy: 0,
        });
        for tag in 0..depth {
            self.command(ctx, key, tag, sys::IO_FETCH_REQ, 0, kind);
        }
        let _ = ready.send(Ok(()));
    }

    fn command(
        &mut self,
        ctx: &mut CoreContext,
        key: usize,
        tag: u16,
        op: u32,
        result: i32,
        kind: u64,
    ) {
        let queue = &mut self.queues[key];
        let cmd = sys::IoCmd {
            q_id: queue.q,
            tag,
            result,
            addr: queue.tags[tag as usize].buf.as_ptr() as u64,
        };
        let entry = opcode::UringCmd16::new(types::Fd(queue.device.cdev.as_raw_fd()), op)
            .cmd(sys::bytes_of(&cmd))
            .build();
        queue.armed += 1;
        ctx.submit_io(entry, io_tag(key, tag, kind));
    }

    /// A FETCH or COMMIT_AND_FETCH completed: a new request for `tag`, or the end.
    pub fn on_io(&mut self, ctx: &mut CoreContext, io_tag: u64, result: i32, kind: u64) {
        let key = (io_tag >> 20) as usize;
        let tag = ((io_tag >> 4) & 0xFFFF) as u16;
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        queue.armed -= 1;
        if result != 0 {
            if result != sys::IO_RES_ABORT {
                eprintln!(
                    "torus: ublk device {} queue {}: fetch failed: {}",
                    queue.device.id,
                    queue.q,
                    std::io::Error::from_raw_os_error(-result)
                );
            }
            if queue.armed == 0 && queue.busy == 0 {
                self.queues.remove(key); // device stopped: drop its mapping and fd
            }
            return;
        }
        // SAFETY: tag < depth, inside the mapping; the kernel wrote the descriptor before
        // completing the fetch.
        let desc = unsafe { std::ptr::read_volatile(queue.descs.add(tag as usize)) };
        if self.shutting_down {
            // Not started: the kernel keeps the request, and after this process exits the
            // device is quiesced and a restarted torusd gets it reissued (user recovery).
            // Taking it would let a busy writer keep the core from ever finishing.
            return;
        }
        self.handle(ctx, key, tag, desc, kind);
    }

    fn handle(
        &mut self,
        ctx: &mut CoreContext,
        key: usize,
        tag: u16,
        desc: sys::IoDesc,
        kind: u64,
    ) {
        let op = (desc.op_flags & 0xff) as u8;
        let fua = desc.op_flags & sys::IO_F_FUA != 0;
        let queue = &mut self.queues[key];
        let attachment = &queue.device.attachment.0;
        let volume = attachment.id;
        let size = attachment.size();
        let offset = desc.start_sector.saturating_mul(512);
        let len = (desc.nr_sectors as u64) * 512;
        let t = &mut queue.tags[tag as usize];
        t.op = op;
        t.len = len as u32;
        t.offset = offset;
        t.error = None;
        let reply = |piece: usize| ReplyTo::Core {
            core: self.core,
            token: token(key, tag as usize, piece),
        };
        match op {
            sys::OP_FLUSH => {
                // The kernel may send FLUSH with start_sector = u64::MAX: no bounds check.
                queue.busy += 1;
                if ctx.routed() {
                    t.pieces_left = 1;
                    ctx.route_flush(volume, reply(0));
                    return;
                }
                let cores = ctx.cores();
                t.pieces_left = cores as u32;
                for core in 0..cores {
                    let piece = Piece {
                        volume,
                        offset: 0,
                        len: 0,
                        kind: PieceKind::Flush,
                    };
                    ctx.send_piece_to(core, piece, reply(core));
                }
            }
            sys::OP_READ | sys::OP_WRITE | sys::OP_DISCARD | sys::OP_WRITE_ZEROES => {
                if len == 0 {
                    return self.command(ctx, key, tag, sys::IO_COMMIT_AND_FETCH_REQ, 0, kind);
                }
                if offset.checked_add(len).is_none_or(|end| end > size)
                    || ((op == sys::OP_READ || op == sys::OP_WRITE) && len > MAX_IO_BYTES as u64)
                {
                    return self.command(
                        ctx,
                        key,
                        tag,
                        sys::IO_COMMIT_AND_FETCH_REQ,
                        -libc::EIO,
                        kind,
                    );
                }
                queue.busy += 1;
                let count = pieces(offset, len).count();
                t.pieces_left = count as u32;
                let data = t.buf.clone();
                for (i, (at, n)) in pieces(offset, len).enumerate() {
                    let kind = match op {
                        sys::OP_READ => PieceKind::Read,
                        sys::OP_WRITE => PieceKind::Write {
                            data: data.clone(),
                            data_offset: (at - offset) as usize,
                            fua,
                        },
                        _ => PieceKind::Zero { fua },
                    };
                    ctx.send_piece(
                        Piece {
                            volume,
                            offset: at,
                            len: n,
                            kind,
                        },
                        reply(i),
                    );
                }
            }
            _ => self.command(
                ctx,
                key,
                tag,
                sys::IO_COMMIT_AND_FETCH_REQ,
                -libc::EOPNOTSUPP,
                kind,
            ),
        }
    }

    pub fn on_completion(&mut self, ctx: &mut CoreContext, completion: Completion, kind: u64) {
        let (key, tag, piece) = untoken(completion.token);
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        let Some(t) = queue.tags.get_mut(tag) else {
            return;
        };
        match completion.output {
            Ok(Output::Read { data, head }) => {
                let at = (piece_start(t.offset, piece) - t.offset) as usize;
                let n = piece_len(t.offset, t.len as u64, piece);
                match Arc::get_mut(&mut t.buf) {
                    Some(buf) => {
                        buf[at..at + n].copy_from_slice(&data[head..head + n]);
                    }
                    None => {
                        t.error.get_or_insert(-libc::EIO);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                t.error.get_or_insert(errno(e));
            }
        }
        t.pieces_left -= 1;
        if t.pieces_left > 0 {
            return;
        }
        queue.busy -= 1;
        let result = t.error.unwrap_or(if t.op == sys::OP_FLUSH {
            0
        } else {
            t.len as i32
        });
        if Arc::get_mut(&mut t.buf).is_none() {
            // Someone still reads the old buffer (a write on its way to a peer): the next
            // request gets a fresh one rather than overwriting what they read.
            t.buf = Arc::new(AlignedBuf::zeroed(MAX_IO_BYTES as usize));
        }
        self.command(
            ctx,
            key,
            tag as u16,
            sys::IO_COMMIT_AND_FETCH_REQ,
            result,
            kind,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_found_again_from_their_index() {
        use torus_engine::CHUNK_SIZE;
        for (offset, len) in [
            (0, 4096),
            (CHUNK_SIZE - 512, 4096),
            (3 * CHUNK_SIZE + 7 * 512, 2 * CHUNK_SIZE),
        ] {
            for (i, (at, n)) in pieces(offset, len).enumerate() {
                assert_eq!(piece_start(offset, i), at);
                assert_eq!(piece_len(offset, len, i), n as usize);
            }
        }
    }

    #[test]
    fn tokens_round_trip_and_are_marked() {
        let t = token(77, 127, 5);
        assert_ne!(t & TOKEN_UBLK, 0);
        assert_eq!(untoken(t), (77, 127, 5));
    }
}
