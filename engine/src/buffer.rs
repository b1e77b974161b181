//! Page-aligned buffers for `O_DIRECT` I/O.
//!
//! An `AlignedBuf` is a heap allocation aligned to 4 KiB whose length is a multiple of 4 KiB.
//! A buffer handed to the kernel in an io_uring operation is owned by that operation until its
//! completion is reaped: the reactor keeps it inside the operation's slab entry.

use crate::buffer_pool::BufferPool;
use crate::layout::{CHUNK_SIZE, PAGE_SIZE};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Set for a buffer of a registered pool: it goes back there when dropped.
    pool: Option<(Arc<BufferPool>, u32)>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to whole pages (at least one page).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let layout = Layout::from_size_align(len, PAGE_SIZE).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            pool: None,
        }
    }

    /// A buffer of `len` bytes (at most a chunk) from a registered pool. Its bytes hold
    /// whatever the previous user left: the caller overwrites or zeroes all it hands out.
    pub(crate) fn from_pool(pool: &Arc<BufferPool>, len: usize) -> Option<AlignedBuf> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        if len > CHUNK_SIZE as usize {
            return None;
        }
        let (index, ptr) = pool.take()?;
        Some(AlignedBuf {
            ptr,
            len,
            pool: Some((pool.clone(), index)),
        })
    }

    /// True for a buffer of a registered pool (I/O on it may use the *_FIXED opcodes).
    pub fn is_registered(&self) -> bool {
        self.pool.is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some((pool, index)) = self.pool.take() {
            pool.give_back(index);
            return;
        }
        let layout = Layout::from_size_align(self.len, PAGE_SIZE).expect("buffer layout");
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}
