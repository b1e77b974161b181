//! A per-core pool of read buffers registered with the core's io_uring, so disk reads use
//! `IORING_OP_READ_FIXED` and the kernel does not pin and unpin pages on every I/O.
//!
//! One allocation of `count` buffers of `CHUNK_SIZE` bytes (a piece never exceeds a chunk) is
//! registered as a single fixed buffer (index 0). A buffer taken from the pool is an
//! `AlignedBuf` that returns itself to the pool when dropped, on whichever thread that is:
//! read data usually travels to the core that owns the connection and is dropped there once
//! sent. When the pool is empty, or registration failed (the memlock limit of a non-root
//! process), reads fall back to plain heap buffers.
//!
//! Registration pins the whole pool: `POOL_BYTES_PER_CORE` of memory per core, resident.

use crate::layout::{CHUNK_SIZE, PAGE_SIZE};
use crossbeam_channel::{Receiver, Sender};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Registered read buffers per core: 16 MiB, 128 pieces of 128 KiB in flight (above the
/// kernel's default queue depth). A non-root process gets 8 MiB of memlock, so a smaller pool
/// is tried before giving up.
pub const POOL_BYTES_PER_CORE: usize = 16 << 20;
pub const POOL_BYTES_FALLBACK: usize = 2 << 20;

pub struct BufferPool {
    base: NonNull<u8>,
    bytes: usize,
    free_tx: Sender<u32>,
    free_rx: Receiver<u32>,
}

// SAFETY: the pool owns its allocation; buffers handed out are disjoint and tracked by index.
unsafe impl Send for BufferPool {}
// SAFETY: shared use is only through the channel of free indices.
unsafe impl Sync for BufferPool {}

impl BufferPool {
    pub fn new(bytes: usize) -> BufferPool {
        let count = bytes / CHUNK_SIZE as usize;
        assert!(count > 0 && count <= u32::MAX as usize);
        let bytes = count * CHUNK_SIZE as usize;
        let layout = Layout::from_size_align(bytes, PAGE_SIZE).expect("pool layout");
        // SAFETY: non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let (free_tx, free_rx) = crossbeam_channel::bounded(count);
        for i in 0..count as u32 {
            free_tx.send(i).expect("room for every index");
        }
        BufferPool {
            base,
            bytes,
            free_tx,
            free_rx,
        }
    }

    /// The iovec to register with io_uring (fixed buffer index 0).
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr() as *mut libc::c_void,
            iov_len: self.bytes,
        }
    }

    /// A free buffer's index and address, or None when all are in use.
    pub(crate) fn take(&self) -> Option<(u32, NonNull<u8>)> {
        let i = self.free_rx.try_recv().ok()?;
        // SAFETY: i < count, so the offset is inside the allocation.
        let ptr = unsafe { self.base.as_ptr().add(i as usize * CHUNK_SIZE as usize) };
        Some((i, NonNull::new(ptr).expect("non-null")))
    }

    pub(crate) fn give_back(&self, index: u32) {
        // Never full: every index is handed out at most once.
        let _ = self.free_tx.try_send(index);
    }

    pub fn available(&self) -> usize {
        self.free_rx.len()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.bytes, PAGE_SIZE).expect("pool layout");
        // SAFETY: allocated in `new` with this layout; the pool is dropped only when no buffer
        // refers to it (each holds an Arc) and the ring that registered it is gone.
        unsafe { dealloc(self.base.as_ptr(), layout) }
    }
}
