//! What a frontend asks of a core, and what it gets back.
//!
//! A frontend cuts each client request at chunk boundaries into `Piece`s; every piece lies in
//! one chunk and so belongs to exactly one core. The core answers each piece with one
//! `Completion`, sent to the core (or channel) named in its `ReplyTo`.

use crate::buffer::AlignedBuf;
use crate::error::BlockError;
use crossbeam_channel::Sender;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub struct Piece {
    pub volume: u32,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes; the piece never crosses a chunk boundary.
    pub len: u32,
    pub kind: PieceKind,
}

#[derive(Debug)]
pub enum PieceKind {
    Read,
    /// `data[data_offset .. data_offset + len]` is written.
    Write {
        data: Arc<AlignedBuf>,
        data_offset: usize,
        fua: bool,
    },
    /// Write zeroes; whole blocks are unmapped (thin), partial blocks rewritten.
    Zero {
        fua: bool,
    },
    /// Make every write this core has acknowledged durable (offset and len are ignored).
    Flush,
    /// Which 4 KiB blocks of the piece are mapped (allocated).
    Status,
}

/// Where the answer to a piece goes. `token` means whatever the requester wants it to.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    Core {
        core: usize,
        token: u64,
    },
    Channel {
        sender: Sender<Completion>,
        token: u64,
    },
}

impl ReplyTo {
    pub fn token(&self) -> u64 {
        match self {
            ReplyTo::Core { token, .. } | ReplyTo::Channel { token, .. } => *token,
        }
    }
}

#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    pub output: Result<Output, BlockError>,
}

#[derive(Debug)]
pub enum Output {
    Done,
    /// Whole blocks covering the piece; the piece's bytes start at `head` in `data`.
    Read {
        data: AlignedBuf,
        head: usize,
    },
    /// One flag per 4 KiB block touched by the piece: true when the block holds data.
    Status {
        mapped: Vec<bool>,
    },
}

/// A piece with the time it reached the core that owns it, for latency histograms.
pub(crate) struct Arrived {
    pub piece: Piece,
    pub reply: ReplyTo,
    pub at: Instant,
}
