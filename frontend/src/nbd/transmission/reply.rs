//! Replies: a finished request becomes a simple reply, or with structured replies negotiated a
//! structured one (NBD spec, "Structured reply chunk message": `NBD_REPLY_TYPE_OFFSET_DATA`,
//! `NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_BLOCK_STATUS`). Replies go out in the order they
//! finish, several to one `sendmsg` (`SEND_REPLIES_MAX`, `SEND_IOVECS_MAX`); read data is sent
//! from the engine's buffers without a copy. A batch's buffers belong to the connection until
//! its send completes.

use super::{retire, Connection, NbdService, State, TAG_SEND};
use crate::nbd::protocol::*;
use io_uring::{opcode, types};
use smallvec::SmallVec;
use std::os::fd::AsRawFd;
use torus_engine::socket::{self, SocketResult};
use torus_engine::{AlignedBuf, CoreContext, BLOCK_SIZE};

/// Replies per sendmsg, and iovecs per sendmsg (below IOV_MAX = 1024).
const SEND_REPLIES_MAX: usize = 128;
const SEND_IOVECS_MAX: usize = 1000;

pub(super) struct Reply {
    /// Inline for the usual headers (a simple reply is 16 bytes, an offset-data chunk's 28);
    /// an error message or block status spills to the heap.
    header: SmallVec<[u8; 32]>,
    data: Vec<(AlignedBuf, usize, usize)>,
    request: usize,
}

impl Reply {
    fn len(&self) -> usize {
        self.header.len() + self.data.iter().map(|d| d.2).sum::<usize>()
    }
}

pub(super) struct SendBatch {
    replies: Vec<Reply>,
    iovecs: Vec<libc::iovec>,
    msghdr: libc::msghdr,
    total: usize,
    sent: usize,
}

impl NbdService {
    pub(super) fn finish_request(&mut self, ctx: &mut CoreContext, key: usize, r: usize) {
        let c = &mut self.connections[key];
        let structured = c.structured;
        let req = &mut c.requests[r];
        let mut reply = Reply {
            header: SmallVec::new(),
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

    pub(super) fn try_send(&mut self, ctx: &mut CoreContext, key: usize) {
        let c = &mut self.connections[key];
        if c.send.is_some() || c.replies.is_empty() {
            return;
        }
        if c.dead {
            while let Some(reply) = c.replies.pop_front() {
                retire(
                    c,
                    reply.request,
                    &self.stats.per_core[self.core],
                    &mut self.spare_payloads,
                );
            }
            return;
        }
        let mut batch = c.spare_send.take().unwrap_or_else(|| {
            Box::new(SendBatch {
                replies: Vec::new(),
                iovecs: Vec::new(),
                // SAFETY: msghdr is plain data; all-zero is a valid empty header.
                msghdr: unsafe { std::mem::zeroed() },
                total: 0,
                sent: 0,
            })
        });
        batch.total = 0;
        batch.sent = 0;
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

    pub(super) fn on_send(&mut self, ctx: &mut CoreContext, key: usize, result: i32) {
        let c = &mut self.connections[key];
        let mut batch = c.send.take().expect("send in flight");
        match socket::classify(result) {
            SocketResult::TryAgain => {
                c.send = Some(batch);
                submit_send(ctx, key, c);
                return;
            }
            SocketResult::EndOfStream | SocketResult::Error(_) => {
                // The client is gone: its replies are dropped, requests in flight still finish.
                c.dead = true;
                c.state = State::Draining;
                if c.recv_armed {
                    // SAFETY: shutdown on our own socket; wakes the armed receive with EOF.
                    unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
            }
            SocketResult::Data(n) => {
                batch.sent += n;
                if batch.sent < batch.total {
                    build_iovecs(&mut batch);
                    c.send = Some(batch);
                    submit_send(ctx, key, c);
                    return;
                }
            }
        }
        for reply in batch.replies.drain(..) {
            retire(
                c,
                reply.request,
                &self.stats.per_core[self.core],
                &mut self.spare_payloads,
            );
        }
        c.spare_send = Some(batch);
        self.process(ctx, key);
    }
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
    let mut iovecs = std::mem::take(&mut batch.iovecs);
    iovecs.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

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
