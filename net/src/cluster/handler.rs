//! Requests from other nodes (the peer layer's `Handler`): replica writes, reads and status
//! answered from this node's store, flushes, block listings for catch-up and revival, and
//! `C*` requests this node coordinates as the PG's primary.
//!
//! Invariant: a listing is answered once every write that started under an older map has
//! finished here, so it holds every write the asking node did not receive itself
//! (`serve_list`); a `C*` request sent under an older map is answered "ask again" (its sender
//! may have been cut off since).

use super::data_path::{Done, Request, PEER_REQUEST_DEADLINE};
#[cfg(feature = "testing")]
use super::faults::replica_drops_this_write;
use super::store::sink;
use super::Cluster;
use crate::metadata::VolumeRecord;
use crate::peer::{Handler, Responder};
use crate::replication;
use crate::wire::{self, Data, Entry, Op, Status};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use torus_engine::{AlignedBuf, Output, Piece, PieceKind, BLOCK_SIZE, CHUNK_SIZE};

/// Answers a peer's request with what a piece produced.
pub(super) fn reply_output(respond: Responder, output: Result<Output, Status>, len: usize) {
    match output {
        Ok(Output::Read { data, head }) => respond.reply(
            Status::Ok,
            Some(Data {
                buf: Arc::new(data),
                start: head,
                len,
            }),
        ),
        Ok(Output::Status { mapped }) => {
            let mut buf = AlignedBuf::zeroed(mapped.len().div_ceil(4096).max(1) * 4096);
            for (i, m) in mapped.iter().enumerate() {
                buf[i] = *m as u8;
            }
            respond.reply(
                Status::Ok,
                Some(Data {
                    buf: Arc::new(buf),
                    start: 0,
                    len: mapped.len(),
                }),
            )
        }
        Ok(Output::Done) => respond.reply(Status::Ok, None),
        Err(s) => respond.reply(s, None),
    }
}

/// Requests from other nodes.
pub(super) struct ClusterHandler(pub(super) Arc<Cluster>);

impl Handler for ClusterHandler {
    fn cores(&self) -> u32 {
        self.0.host.cores() as u32
    }

    fn handle(&self, _from: &str, _core: u32, e: Entry, data: Option<Data>, respond: Responder) {
        let c = &self.0;
        let Some(op) = Op::from_u8(e.op) else {
            return respond.reply(Status::Einval, None);
        };
        let fua = e.flags & wire::FLAG_FUA != 0;
        let piece_of = |kind: PieceKind| Piece {
            volume: e.volume,
            offset: e.offset,
            len: e.len,
            kind,
        };
        match op {
            Op::Write | Op::Zero => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                let map_epoch = c.map().epoch;
                let pg = c.pg_of(e.volume, e.offset);
                // A newer map than this node's: asked again once it is here, and not counted
                // in flight (a peer's made-up epochs would each add a counter).
                if e.epoch > map_epoch {
                    c.check_claims(e.epoch, e.volume, e.writer);
                    let s = match c.fence.check(e.volume, e.writer) {
                        Err(Status::Fenced) => Status::Fenced,
                        _ => Status::Retry,
                    };
                    return respond.reply(s, None);
                }
                if !c.enter_inflight(e.epoch) {
                    return respond.reply(Status::Retry, None);
                }
                let admitted = replication::admit_write(
                    map_epoch,
                    e.epoch,
                    &c.fence,
                    e.volume,
                    Some(pg),
                    e.writer,
                );
                if let Err(s) = admitted {
                    c.local_done(e.epoch);
                    c.inflight_done(e.epoch);
                    c.check_claims(e.epoch, e.volume, e.writer);
                    return respond.reply(s, None);
                }
                if data.is_some() && replica_drops_this_write() {
                    c.local_done(e.epoch);
                    c.inflight_done(e.epoch);
                    return respond.reply(Status::Ok, None);
                }
                let kind = match data {
                    Some(d) => PieceKind::Write {
                        data: d.buf,
                        data_offset: d.start,
                        fua,
                    },
                    None => PieceKind::Zero { fua },
                };
                c.apply_replica(piece_of(kind), e.epoch, move |s| respond.reply(s, None));
            }
            Op::Read | Op::Status => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                let pg = c.pg_of(e.volume, e.offset);
                let serves = if op == Op::Read && e.flags & wire::FLAG_DIRTY != 0 {
                    c.holds_dirty(pg, e.volume, e.offset, e.len)
                } else {
                    replication::serves_copies(&c.map(), &c.me, c.incarnation, [pg].into_iter())
                };
                if !serves {
                    return respond.reply(Status::Retry, None);
                }
                let kind = if op == Op::Read {
                    PieceKind::Read
                } else {
                    PieceKind::Status
                };
                let len = e.len as usize;
                c.send_local(
                    piece_of(kind),
                    sink(move |done| reply_output(respond, done.output.map_err(Status::from), len)),
                );
            }
            Op::Flush => c.flush_vouched(Box::new(move |s| respond.reply(s, None))),
            Op::List => {
                let me = c.clone();
                c.host.spawn(Box::pin(me.serve_list(e, data, respond)));
            }
            Op::Dirty => c.serve_dirty(data, respond),
            Op::CWrite | Op::CZero | Op::CRead | Op::CStatus => {
                if let Err(s) = c.validate(&e, &data) {
                    return respond.reply(s, None);
                }
                // Sent under an older map: the sender may have been cut off since (a request
                // delivered late by TCP after a partition healed). It asks again with a fresh
                // map if it is still alive.
                let map_epoch = c.map().epoch;
                if e.epoch < map_epoch {
                    return respond.reply(Status::Retry, None);
                }
                let is_write = matches!(op, Op::CWrite | Op::CZero);
                if is_write {
                    if let Err(s) = c.fence.check(e.volume, e.writer) {
                        c.check_claims(e.epoch, e.volume, e.writer);
                        return respond.reply(s, None);
                    }
                }
                let kind = match op {
                    Op::CRead => PieceKind::Read,
                    Op::CStatus => PieceKind::Status,
                    Op::CZero => PieceKind::Zero { fua },
                    _ => {
                        let d = data.expect("validated");
                        PieceKind::Write {
                            data: d.buf,
                            data_offset: d.start,
                            fua,
                        }
                    }
                };
                let len = e.len as usize;
                c.submit(Request {
                    piece: piece_of(kind),
                    done: Done::Peer { respond, len },
                    deadline: Instant::now() + PEER_REQUEST_DEADLINE,
                    from_peer: true,
                    writer: e.writer,
                });
            }
            Op::Hello | Op::Reply => respond.reply(Status::Einval, None),
        }
    }
}

/// Test-only fault: never without the `testing` feature (see `faults.rs`).
#[cfg(not(feature = "testing"))]
fn replica_drops_this_write() -> bool {
    false
}

impl Cluster {
    fn validate(
        self: &Arc<Self>,
        e: &Entry,
        data: &Option<Data>,
    ) -> Result<Arc<VolumeRecord>, Status> {
        let Some(vol) = self.volume(e.volume) else {
            // Perhaps created a moment ago: look again; the sender asks again meanwhile.
            let me = self.clone();
            self.host.spawn(Box::pin(async move {
                let _ = me.refresh_volumes().await;
            }));
            return Err(Status::Retry);
        };
        let end = e.offset.checked_add(e.len as u64).ok_or(Status::Einval)?;
        let in_chunk = e.len > 0
            && e.len as u64 <= CHUNK_SIZE
            && e.offset / CHUNK_SIZE == (end - 1) / CHUNK_SIZE;
        if !in_chunk {
            return Err(Status::Einval);
        }
        if end > vol.size_bytes {
            // Grown a moment ago through another node: look again; the sender asks again
            // meanwhile (a request really past the end never leaves the frontend).
            let me = self.clone();
            self.host.spawn(Box::pin(async move {
                let _ = me.refresh_volumes().await;
            }));
            return Err(Status::Retry);
        }
        let wants_data = e.op == Op::Write as u8 || e.op == Op::CWrite as u8;
        let has = data.as_ref().map_or(0, |d| d.len);
        if wants_data != (has > 0) || (wants_data && has != e.len as usize) {
            return Err(Status::Einval);
        }
        Ok(vol)
    }

    /// Answers a block listing once every write that started under an older map has finished
    /// here (coordinated here or applied as a replica; later ones are refused for their old
    /// epoch), so the listing holds every write the asking node did not receive itself.
    async fn serve_list(self: Arc<Self>, e: Entry, data: Option<Data>, respond: Responder) {
        let Some(d) = data else {
            return respond.reply(Status::Einval, None);
        };
        let pg_count = self.host.pg_count() as usize;
        if d.len != pg_count {
            return respond.reply(Status::Einval, None);
        }
        let bitmap: Vec<bool> = d.buf[d.start..d.start + d.len]
            .iter()
            .map(|&b| b != 0)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let oldest = self.oldest_in_flight();
            let ready = replication::list_ready(self.map().epoch, e.epoch, oldest);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return respond.reply(Status::Retry, None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pgs = (0..bitmap.len() as u32).filter(|&pg| bitmap[pg as usize]);
        if !replication::serves_copies(&self.map(), &self.me, self.incarnation, pgs) {
            return respond.reply(Status::Retry, None);
        }
        let list = self.list_local(&bitmap).await;
        match wire::encode_list(&list) {
            Ok(data) => respond.reply(Status::Ok, data),
            Err(s) => respond.reply(s, None),
        }
    }

    /// The valid dirty blocks of `pg` here: written while catching up, under a map in which
    /// this node had been up without a break since.
    fn valid_dirty(&self, pg: u32) -> Vec<(u32, u64)> {
        let up_since = self.dirty_epochs.lock().valid_from;
        let dirty = self.dirty.lock();
        let mut out: Vec<(u32, u64)> = dirty
            .get(&pg)
            .into_iter()
            .flatten()
            .filter(|(_, epoch)| **epoch >= up_since)
            .map(|(k, _)| *k)
            .collect();
        out.sort_unstable();
        out
    }

    /// True when every block of the byte range is a valid dirty block here (`Op::Dirty`).
    fn holds_dirty(&self, pg: u32, volume: u32, offset: u64, len: u32) -> bool {
        let up_since = self.dirty_epochs.lock().valid_from;
        let dirty = self.dirty.lock();
        let Some(set) = dirty.get(&pg) else {
            return false;
        };
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len as u64).div_ceil(BLOCK_SIZE as u64);
        offset.is_multiple_of(BLOCK_SIZE as u64)
            && (first..end).all(|b| set.get(&(volume, b)).is_some_and(|e| *e >= up_since))
    }

    /// Answers `Op::Dirty`: the valid dirty blocks of the PGs in the bitmap.
    fn serve_dirty(&self, data: Option<Data>, respond: Responder) {
        let Some(d) = data else {
            return respond.reply(Status::Einval, None);
        };
        if d.len != self.host.pg_count() as usize {
            return respond.reply(Status::Einval, None);
        }
        let mut list = Vec::new();
        for (pg, &on) in d.buf[d.start..d.start + d.len].iter().enumerate() {
            if on != 0 {
                list.extend(
                    self.valid_dirty(pg as u32)
                        .into_iter()
                        .map(|(v, b)| (v, b, 0)),
                );
            }
        }
        match wire::encode_list(&list) {
            Ok(data) => respond.reply(Status::Ok, data),
            Err(s) => respond.reply(s, None),
        }
    }
}
