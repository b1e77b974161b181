//! The client: reads, writes (partial blocks too), write-zeroes, FUA writes and flushes of
//! random ranges, and snapshots (a clone of volume 1) and deletions of a volume, each entered
//! in the model as it is submitted.

use super::model::{fill_sector, Rec};
use super::{Sim, CLONE, OP_TAG, SECTOR, VOLUMES, ZERO_FLAG};
use crate::buffer::AlignedBuf;
use crate::layout::{BLOCK_SIZE, CHUNK_SIZE};
use crate::request::{Arrived, Piece, PieceKind, ReplyTo};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub(super) enum Request {
    Write {
        volume: u32,
        first: u64,
        sectors: u64,
        version: u64,
        fua: bool,
    },
    Read {
        volume: u32,
        first: u64,
        allowed: Vec<Vec<u64>>,
        /// Read by the check after a crash: a sector's first read since then.
        after_crash: bool,
    },
    Flush {
        mark: u64,
    },
    /// `clone_volume(1, CLONE)` or `drop_volume(CLONE)`: every sector of CLONE got a version
    /// tagged `tag`; answered once durable.
    Volume {
        tag: u64,
    },
}

impl Sim {
    /// Clones volume 1 onto CLONE, or drops CLONE; only while nothing else writes either, and
    /// (for a clone) while every sector of volume 1 has one version a read could return.
    pub(super) fn submit_volume_op(&mut self, clone: bool) {
        let busy = self.requests.values().any(|r| match r {
            Request::Write { volume, .. } => *volume == 1 || *volume == CLONE,
            Request::Volume { .. } => true,
            _ => false,
        });
        if busy {
            return;
        }
        let versions: Vec<u64> = if clone {
            let mut v = Vec::with_capacity(self.volume_sectors as usize);
            for sector in &self.sectors[&1] {
                match sector.readable()[..] {
                    [one] => v.push(one),
                    _ => return,
                }
            }
            v
        } else {
            let zero = self.next_version | ZERO_FLAG;
            self.next_version += 1;
            vec![zero; self.volume_sectors as usize]
        };
        self.now += 1;
        let (token, reply) = self.new_reply();
        let tag = OP_TAG | token;
        let now = self.now;
        for (sector, version) in self
            .sectors
            .get_mut(&CLONE)
            .expect("clone volume")
            .iter_mut()
            .zip(versions)
        {
            sector.0.push(Rec {
                version,
                tag,
                submitted: now,
                ended: None,
                acked: false,
                durable: false,
            });
        }
        if self.trace {
            eprintln!(
                "[{}] submit {} (tag {tag:#x})",
                self.step,
                if clone {
                    "clone 1 -> CLONE"
                } else {
                    "drop CLONE"
                }
            );
        }
        self.requests.insert(token, Request::Volume { tag });
        let store = self.store.as_mut().expect("store open");
        if clone {
            store.clone_volume(&mut self.disk, 1, CLONE, reply);
        } else {
            store.drop_volume(&mut self.disk, CLONE, reply);
        }
    }

    /// A token for a new request, and where the store sends its answer.
    pub(super) fn new_reply(&mut self) -> (u64, ReplyTo) {
        let token = self.next_token;
        self.next_token += 1;
        let reply = ReplyTo::Channel {
            sender: self.reply.clone(),
            token,
        };
        (token, reply)
    }

    fn submit(&mut self, piece: Piece, request: Request) {
        if self.trace && !matches!(request, Request::Read { .. }) {
            eprintln!("[{}] submit {request:?}", self.step);
        }
        self.now += 1;
        let (token, reply) = self.new_reply();
        self.requests.insert(token, request);
        let arrived = Arrived {
            piece,
            reply,
            at: Instant::now(),
        };
        let store = self.store.as_mut().expect("store open");
        store.start(&mut self.disk, arrived);
    }

    /// A random range of one volume inside one chunk: whole blocks mostly, sometimes
    /// unaligned sectors (a read-modify-write).
    pub(super) fn random_range(&mut self) -> (u32, u64, u64) {
        let volume = VOLUMES[self.rng.below(VOLUMES.len() as u64) as usize];
        let per_block = (BLOCK_SIZE / SECTOR) as u64;
        let chunk_sectors = CHUNK_SIZE / SECTOR as u64;
        let (first, count) = if self.rng.chance(0.7) {
            let blocks = self.volume_sectors / per_block;
            let b = self.rng.below(blocks);
            let n = 1 + self.rng.below(8);
            (b * per_block, n * per_block)
        } else {
            let s = self.rng.below(self.volume_sectors);
            (s, 1 + self.rng.below(20))
        };
        // Clip to the volume and to the chunk.
        let chunk_end = (first / chunk_sectors + 1) * chunk_sectors;
        let end = (first + count).min(self.volume_sectors).min(chunk_end);
        (volume, first, end - first)
    }

    pub(super) fn submit_write(&mut self, zero: bool) {
        let (volume, first, sectors) = self.random_range();
        let fua = self.rng.chance(0.1);
        let version = self.next_version | if zero { ZERO_FLAG } else { 0 };
        self.next_version += 1;
        for s in first..first + sectors {
            self.sectors.get_mut(&volume).expect("volume")[s as usize]
                .0
                .push(Rec {
                    version,
                    tag: version,
                    submitted: self.now,
                    ended: None,
                    acked: false,
                    durable: false,
                });
        }
        let len = sectors as usize * SECTOR;
        let kind = if zero {
            PieceKind::Zero { fua }
        } else {
            let mut data = AlignedBuf::zeroed(len);
            for (i, out) in data.chunks_mut(SECTOR).enumerate() {
                fill_sector(out, version, volume, first + i as u64);
            }
            PieceKind::Write {
                data: Arc::new(data),
                data_offset: 0,
                fua,
            }
        };
        self.submit(
            Piece {
                volume,
                offset: first * SECTOR as u64,
                len: len as u32,
                kind,
            },
            Request::Write {
                volume,
                first,
                sectors,
                version,
                fua,
            },
        );
    }

    pub(super) fn submit_read(&mut self, volume: u32, first: u64, sectors: u64, after_crash: bool) {
        let model = &self.sectors[&volume];
        let allowed = (first..first + sectors)
            .map(|s| {
                let sector = &model[s as usize];
                if after_crash {
                    sector.survivable()
                } else {
                    sector.readable()
                }
            })
            .collect();
        self.submit(
            Piece {
                volume,
                offset: first * SECTOR as u64,
                len: (sectors as usize * SECTOR) as u32,
                kind: PieceKind::Read,
            },
            Request::Read {
                volume,
                first,
                allowed,
                after_crash,
            },
        );
    }

    pub(super) fn submit_flush(&mut self) {
        let mark = self.now;
        self.submit(
            Piece {
                volume: VOLUMES[0],
                offset: 0,
                len: 0,
                kind: PieceKind::Flush,
            },
            Request::Flush { mark },
        );
    }
}
