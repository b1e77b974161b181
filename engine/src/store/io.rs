//! What the store asks of its backing store, and how: each operation (`DiskOp`) with what it
//! was for (`StoreIo`), submitted through `IoSubmit`, which the reactor implements with its
//! io_uring ring and the simulator with a simulated disk. The store reaches its disk through
//! nothing else, so the simulation runs the real store under faults.
//!
//! Memory an operation points at is owned by the store (a task, a commit, a batch, the
//! background checkpoint) until its completion comes back through `Store::on_io`.

use io_uring::{opcode, squeue, types};

/// The ring file index of the backing store (registered with `register_files`).
pub(crate) const BACKING_FILE: types::Fixed = types::Fixed(0);

/// What a store-owned io_uring operation was for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreIo {
    /// Read of a run of blocks of a read task: `first` index into the piece's blocks.
    DataRead {
        task: usize,
        first: u32,
        count: u32,
    },
    /// Read of an edge block for a read-modify-write.
    EdgeRead {
        task: usize,
        index: u32,
    },
    DataWrite {
        task: usize,
        expected: u32,
    },
    /// A vectored write of several tasks' data to consecutive slots.
    BatchWrite {
        batch: usize,
    },
    Commit {
        expected: u32,
    },
    /// A step of the checkpoint written in the background (`Build`).
    Checkpoint {
        expected: u32,
    },
}

/// One operation on the backing store as the store asks for it. The reactor turns it into an
/// io_uring entry on the registered backing file; the simulator (`sim`) performs it on a
/// simulated disk. Whatever memory it points at stays valid until its completion.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DiskOp {
    /// `fixed`: the buffer lies in the registered read pool (buffer index 0).
    Read {
        offset: u64,
        ptr: *mut u8,
        len: u32,
        fixed: bool,
    },
    Write {
        offset: u64,
        ptr: *const u8,
        len: u32,
    },
    Writev {
        offset: u64,
        iovecs: *const libc::iovec,
        count: u32,
    },
    /// `fdatasync` of the backing store.
    SyncData,
}

impl DiskOp {
    /// The io_uring entry for this operation on the ring's registered backing file.
    pub(crate) fn entry(self) -> squeue::Entry {
        match self {
            DiskOp::Read {
                offset,
                ptr,
                len,
                fixed: true,
            } => opcode::ReadFixed::new(BACKING_FILE, ptr, len, 0)
                .offset(offset)
                .build(),
            DiskOp::Read {
                offset, ptr, len, ..
            } => opcode::Read::new(BACKING_FILE, ptr, len)
                .offset(offset)
                .build(),
            DiskOp::Write { offset, ptr, len } => opcode::Write::new(BACKING_FILE, ptr, len)
                .offset(offset)
                .build(),
            DiskOp::Writev {
                offset,
                iovecs,
                count,
            } => opcode::Writev::new(BACKING_FILE, iovecs, count)
                .offset(offset)
                .build(),
            DiskOp::SyncData => opcode::Fsync::new(BACKING_FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// A data write small enough to be written synchronously by an otherwise idle core.
    pub(crate) fn small_write(&self) -> bool {
        matches!(*self, DiskOp::Write { len, .. } if len <= SYNC_WRITE_MAX)
    }

    /// Runs a write with a plain system call on `fd` (the backing file), returning what its
    /// io_uring completion would have: bytes written or a negative errno.
    pub(crate) fn write_now(&self, fd: i32) -> i32 {
        loop {
            // SAFETY: the buffers are owned by the store task until its completion is handled,
            // which is after this call returns.
            let r = match *self {
                DiskOp::Write { offset, ptr, len } => unsafe {
                    libc::pwrite64(fd, ptr as *const libc::c_void, len as usize, offset as i64)
                },
                DiskOp::Writev {
                    offset,
                    iovecs,
                    count,
                } => unsafe { libc::pwritev64(fd, iovecs, count as i32, offset as i64) },
                _ => unreachable!("write_now of a non-write"),
            };
            if r >= 0 {
                return r as i32;
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return -errno;
            }
        }
    }
}

/// Largest write a core writes synchronously when it has nothing else in flight.
pub(crate) const SYNC_WRITE_MAX: u32 = 64 * 1024;

/// Submission of backing-store operations: the reactor's ring, or the simulator.
pub(crate) trait IoSubmit {
    fn submit_store(&mut self, op: DiskOp, io: StoreIo);
    /// Told of every piece the store starts (the reactor watches for requests that arrived
    /// while it was blocked in a synchronous write).
    fn piece_arrived(&mut self) {}
}

/// Whether a write (`expected` bytes) or a sync (`expected` 0) completed in full.
pub(super) fn completed(expected: u32, result: i32) -> bool {
    if expected == 0 {
        result == 0
    } else {
        result == expected as i32
    }
}

/// Names an io_uring result for a log line: a negative errno or a short transfer.
pub(crate) fn describe_result(result: i32) -> String {
    if result < 0 {
        std::io::Error::from_raw_os_error(-result).to_string()
    } else {
        format!("short transfer of {result} bytes")
    }
}
