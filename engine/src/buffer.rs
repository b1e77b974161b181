//! Page-aligned buffers for `O_DIRECT` I/O.
//!
//! An `AlignedBuf` is a heap allocation aligned to 4 KiB whose length is a multiple of 4 KiB.
//! A buffer handed to the kernel in an io_uring operation is owned by that operation until its
//! completion is reaped: the reactor keeps it inside the operation's slab entry.
//!
//! Buffers of `LARGE_MIN` bytes or more (write payloads, frames) are mapped in power-of-two
//! sizes and kept for reuse after they are dropped, at most `LARGE_KEPT_MAX` bytes in all
//! (the rest is unmapped). glibc's malloc kept every freed page-aligned 1 MiB buffer in the
//! allocating thread's arena: a node's resident memory stayed at hundreds of MiB after a
//! large sequential write, and mapping each one anew instead cost 45 % of sequential write
//! throughput in page faults.

use crate::buffer_pool::BufferPool;
use crate::layout::{CHUNK_SIZE, PAGE_SIZE};
use parking_lot::Mutex;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Buffers this large or larger are mapped and kept for reuse (see the module's comment).
pub const LARGE_MIN: usize = 128 << 10;
/// Largest size class kept; larger buffers are mapped and unmapped each time.
const LARGE_MAX: usize = 32 << 20;
/// Bytes of dropped large buffers kept for reuse, over all size classes.
pub const LARGE_KEPT_MAX: usize = 64 << 20;
const CLASSES: usize = (LARGE_MAX / LARGE_MIN).trailing_zeros() as usize + 1;

/// Dropped large buffers by size class (`LARGE_MIN << class`), as addresses.
static KEPT: [Mutex<Vec<usize>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of dropped large buffers kept for reuse now.
pub fn large_kept_bytes() -> usize {
    KEPT_BYTES.load(Ordering::Relaxed)
}

enum Origin {
    Heap,
    /// Mapped, `size` bytes (a size class or, above `LARGE_MAX`, the length).
    Mapped {
        size: usize,
    },
    /// A buffer of a registered pool: it goes back there when dropped.
    Registered(Arc<BufferPool>, u32),
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    origin: Origin,
}

fn class_of(size: usize) -> Option<usize> {
    (size <= LARGE_MAX).then(|| (size / LARGE_MIN).trailing_zeros() as usize)
}

/// A zeroed mapping of `size` bytes, a kept one (zeroed here) when there is one.
fn map_large(size: usize, len: usize) -> NonNull<u8> {
    if let Some(class) = class_of(size) {
        if let Some(addr) = KEPT[class].lock().pop() {
            KEPT_BYTES.fetch_sub(size, Ordering::Relaxed);
            let ptr = addr as *mut u8;
            // SAFETY: a kept mapping of `size` ≥ `len` bytes that nothing else refers to.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
            return NonNull::new(ptr).expect("kept mappings are not null");
        }
    }
    // SAFETY: a new private anonymous mapping (zero-filled by the kernel).
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        let layout = Layout::from_size_align(size, PAGE_SIZE).expect("buffer layout");
        std::alloc::handle_alloc_error(layout);
    }
    NonNull::new(raw as *mut u8).expect("mmap does not return null")
}

/// Keeps a dropped mapping for reuse, or unmaps it when its class is not kept or the kept
/// bytes would pass `LARGE_KEPT_MAX`.
fn unmap_large(ptr: NonNull<u8>, size: usize) {
    if let Some(class) = class_of(size) {
        if KEPT_BYTES.fetch_add(size, Ordering::Relaxed) + size <= LARGE_KEPT_MAX {
            KEPT[class].lock().push(ptr.as_ptr() as usize);
            return;
        }
        KEPT_BYTES.fetch_sub(size, Ordering::Relaxed);
    }
    // SAFETY: a mapping of `size` bytes made by `map_large`, no longer referred to.
    unsafe { libc::munmap(ptr.as_ptr() as *mut libc::c_void, size) };
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to whole pages (at least one page).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        if len >= LARGE_MIN {
            let size = if len <= LARGE_MAX {
                len.next_power_of_two()
            } else {
                len
            };
            return AlignedBuf {
                ptr: map_large(size, len),
                len,
                origin: Origin::Mapped { size },
            };
        }
        let layout = Layout::from_size_align(len, PAGE_SIZE).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            origin: Origin::Heap,
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
            origin: Origin::Registered(pool.clone(), index),
        })
    }

    /// True for a buffer of a registered pool (I/O on it may use the *_FIXED opcodes).
    pub fn is_registered(&self) -> bool {
        matches!(self.origin, Origin::Registered(..))
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
        match std::mem::replace(&mut self.origin, Origin::Heap) {
            Origin::Registered(pool, index) => pool.give_back(index),
            Origin::Mapped { size } => unmap_large(self.ptr, size),
            Origin::Heap => {
                let layout = Layout::from_size_align(self.len, PAGE_SIZE).expect("buffer layout");
                // SAFETY: allocated in `zeroed` with this exact layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_zeroed_kept_for_reuse_and_bounded() {
        let mut a = AlignedBuf::zeroed(1 << 20);
        assert!(a.iter().all(|&b| b == 0));
        a.fill(0xa5);
        drop(a);
        let b = AlignedBuf::zeroed(1 << 20);
        assert!(b.iter().all(|&b| b == 0), "a reused buffer is zeroed again");
        let c = AlignedBuf::zeroed(300 << 10);
        assert_eq!(c.len(), 300 << 10, "the length asked for, in pages");
        let many: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::zeroed(1 << 20)).collect();
        drop(many);
        assert!(
            large_kept_bytes() <= LARGE_KEPT_MAX,
            "{}",
            large_kept_bytes()
        );
        assert!(large_kept_bytes() >= 16 << 20, "{}", large_kept_bytes());
        let huge = AlignedBuf::zeroed(40 << 20);
        assert_eq!(huge.len(), 40 << 20);
        drop(huge);
        assert!(large_kept_bytes() <= LARGE_KEPT_MAX);
    }
}
