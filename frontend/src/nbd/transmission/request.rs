//! Requests: each header read off the connection is checked against what was negotiated and
//! the export's size (NBD spec, "Request message" and "Error values"), refused with its error
//! reply, or cut at chunk boundaries and sent piece by piece to the cores that own the data
//! (a write once its payload has arrived). A request's slot and bytes count against the
//! connection's limits from here until its reply is sent (`retire`).

use super::{pieces, token, NbdService, Payload, Request, State, BLOCK_STATUS_LENGTH_MAX};
use crate::nbd::protocol::*;
use std::sync::atomic::Ordering;
use torus_engine::{CoreContext, Piece, PieceKind, ReplyTo};

impl NbdService {
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
            data: None,
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

    pub(super) fn on_header(&mut self, ctx: &mut CoreContext, key: usize, h: RequestHeader) {
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
                    buf: self.spare_payloads.take(len),
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

    pub(super) fn dispatch_write(&mut self, ctx: &mut CoreContext, key: usize, p: Payload) {
        let c = &mut self.connections[key];
        let volume = c.volume;
        let req = &mut c.requests[p.request];
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let offset = req.offset;
        let length = req.length as u64;
        req.pieces_left = pieces(offset, length).count() as u32;
        let data = p.buf;
        req.data = Some(data.clone());
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
}
