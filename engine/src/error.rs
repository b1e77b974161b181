//! Errors of the engine layer. Each names the operation and where it happened, so that the
//! binaries can print one clear line. `errno()` is the single place that maps an engine error
//! to the negative errno a frontend hands back to its client (NBD_E* is derived from it).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a torus data file (bad superblock magic)")]
    NotTorus { path: PathBuf },
    #[error("{path}: both superblock copies are damaged")]
    SuperblockDamaged { path: PathBuf },
    #[error(
        "{path}: on-disk format version {found} is not supported (this build reads {supported})"
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: backing store of {size} bytes is too small (need at least {min} bytes)")]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error("core {core}: {what}")]
    Damaged { core: usize, what: String },
    #[error("core {core}: io_uring setup failed: {source}")]
    Ring {
        core: usize,
        #[source]
        source: io::Error,
    },
}

/// Result of one block operation, as a frontend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// The data cannot be vouched for (checksum mismatch, device error, poisoned region).
    Io,
    /// No free slot left on this node.
    NoSpace,
    /// Offset or length outside the volume, or a malformed request.
    Invalid,
    /// The volume does not exist (deleted while the request was in flight).
    NoVolume,
    /// The engine is shutting down.
    ShuttingDown,
}

impl BlockError {
    /// Positive errno for this error (ublk wants it negated, NBD maps it to NBD_E*).
    pub fn errno(self) -> i32 {
        match self {
            BlockError::Io => libc::EIO,
            BlockError::NoSpace => libc::ENOSPC,
            BlockError::Invalid => libc::EINVAL,
            BlockError::NoVolume => libc::ENXIO,
            BlockError::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

impl std::fmt::Display for BlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            BlockError::Io => "I/O error: data cannot be vouched for",
            BlockError::NoSpace => "no space left on the node",
            BlockError::Invalid => "invalid request",
            BlockError::NoVolume => "volume does not exist",
            BlockError::ShuttingDown => "server is shutting down",
        };
        f.write_str(s)
    }
}
