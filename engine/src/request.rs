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
#[derive(Debug)]
pub enum ReplyTo {
    Core {
        core: usize,
        token: u64,
    },
    Channel {
        sender: Sender<Completion>,
        token: u64,
    },
    /// A callback run on the answering core's thread (the cluster layer's replies): it must
    /// not block.
    Sink {
        sink: Sink,
        token: u64,
    },
    /// A callback run once on the answering core's thread: it must not block. One
    /// allocation and no lock per piece (the cluster layer's own replies).
    Once(OnceReply),
}

/// The callback of `ReplyTo::Once`.
pub struct OnceReply(pub Box<dyn FnOnce(Completion) + Send>);

impl std::fmt::Debug for OnceReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnceReply")
    }
}

/// Receives completions on whatever thread produced them.
pub trait CompletionSink: Send + Sync {
    fn complete(&self, completion: Completion);
}

#[derive(Clone)]
pub struct Sink(pub Arc<dyn CompletionSink>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl ReplyTo {
    pub fn token(&self) -> u64 {
        match self {
            ReplyTo::Core { token, .. }
            | ReplyTo::Channel { token, .. }
            | ReplyTo::Sink { token, .. } => *token,
            ReplyTo::Once(_) => 0,
        }
    }
}

/// Sends pieces of a clustered volume to the node that owns them (set once, after the engine
/// started). Without one, every piece goes to a core of this node.
pub trait Router: Send + Sync {
    fn route(&self, piece: Piece, reply: ReplyTo);
    /// Makes every write acknowledged so far durable wherever it went; one completion.
    fn flush(&self, volume: u32, reply: ReplyTo);
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
