//! The model of every 512-byte sector of every volume: the versions a sector may hold now
//! (for a read) or after a crash, and the bytes that name a version, so that a read can be
//! told apart as the right data, stale data or bytes no write put there.

use super::rng::Rng;
use super::{SECTOR, ZERO_FLAG};

/// One version of a sector: a write's, or what the sector held before the model knew more.
/// Times are the simulation's logical clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rec {
    pub(super) version: u64,
    /// The operation that wrote it: a write's version, or a clone's or drop's OP_TAG | token.
    pub(super) tag: u64,
    pub(super) submitted: u64,
    /// When it was answered (acknowledged or failed); None while in flight.
    pub(super) ended: Option<u64>,
    pub(super) acked: bool,
    /// Acknowledged and then covered by a completed flush, or a FUA write.
    pub(super) durable: bool,
}

/// One 512-byte sector of a volume: the versions it may hold. NBD orders nothing between
/// requests in flight at the same time, so a version is ruled out only by a write submitted
/// after it ended: for reads, an acknowledged one; after a crash, a durable one.
#[derive(Clone)]
pub(super) struct Sector(pub(super) Vec<Rec>);

impl Sector {
    pub(super) fn known(version: u64) -> Sector {
        Sector(vec![Rec {
            version,
            tag: 0,
            submitted: 0,
            ended: Some(0),
            acked: true,
            durable: true,
        }])
    }

    /// Versions a read submitted now may return.
    pub(super) fn readable(&self) -> Vec<u64> {
        let last = self.0.iter().filter(|r| r.acked).map(|r| r.submitted).max();
        self.0
            .iter()
            .filter(|r| match (r.ended, last) {
                (Some(end), Some(last)) => end > last || r.acked && r.submitted == last,
                _ => true,
            })
            .map(|r| r.version)
            .collect()
    }

    /// Versions a crash may leave.
    pub(super) fn survivable(&self) -> Vec<u64> {
        self.0.iter().map(|r| r.version).collect()
    }

    /// Drops versions a durable write submitted after them has ruled out for good.
    pub(super) fn prune(&mut self) {
        if let Some(last) = self
            .0
            .iter()
            .filter(|r| r.durable)
            .map(|r| r.submitted)
            .max()
        {
            self.0.retain(|r| match r.ended {
                Some(end) => end > last || r.durable && r.submitted == last,
                None => true,
            });
        }
    }

    /// A completed flush submitted at `flush_submitted` made these durable.
    pub(super) fn flushed(&mut self, flush_submitted: u64) {
        let mut any = false;
        for r in &mut self.0 {
            if r.acked && !r.durable && r.ended.is_some_and(|e| e < flush_submitted) {
                r.durable = true;
                any = true;
            }
        }
        if any {
            self.prune();
        }
    }
}

/// What a sector's bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Content {
    Zero,
    Version(u64),
    Garbage,
}

pub(super) fn fill_sector(out: &mut [u8], version: u64, volume: u32, sector: u64) {
    out[0..8].copy_from_slice(&version.to_le_bytes());
    out[8..12].copy_from_slice(&volume.to_le_bytes());
    out[12..20].copy_from_slice(&sector.to_le_bytes());
    let mut r = Rng(version ^ (sector << 20) ^ ((volume as u64) << 56));
    for chunk in out[20..].chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// What a sector read at `sector` of any volume holds (a clone holds its origin's sectors, so
/// the volume written is taken from the bytes; a version names one write, hence one volume).
pub(super) fn decode_sector(bytes: &[u8], sector: u64) -> Content {
    if bytes.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    let version = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let volume = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let mut expect = [0u8; SECTOR];
    fill_sector(&mut expect, version, volume, sector);
    if expect[..] == bytes[..] {
        Content::Version(version)
    } else {
        Content::Garbage
    }
}

pub(super) fn content_of(version: u64) -> Content {
    if version == 0 || version & ZERO_FLAG != 0 {
        Content::Zero
    } else {
        Content::Version(version)
    }
}
