//! Buffers a core keeps for reuse: a write's payload or a received frame's body is handed on
//! as an `Arc<AlignedBuf>` (to the store, to peer links) and comes back here; it is taken
//! again, for a buffer of the same size, once nothing else holds it. A 4 KiB write then
//! allocates nothing for its buffer in the steady state. Bounded: at most `max` buffers of at
//! most `max_bytes` each (the rest are dropped as before).

use crate::buffer::AlignedBuf;
use crate::layout::PAGE_SIZE;
use std::sync::Arc;

pub struct SpareBuffers {
    bufs: Vec<Arc<AlignedBuf>>,
    max: usize,
    max_bytes: usize,
}

impl SpareBuffers {
    pub fn new(max: usize, max_bytes: usize) -> SpareBuffers {
        SpareBuffers {
            bufs: Vec::new(),
            max,
            max_bytes,
        }
    }

    /// A buffer for `len` bytes that nothing else holds: a kept one of the same size (its
    /// bytes past `len` zeroed; the caller fills the first `len`), or a new zeroed one.
    pub fn take(&mut self, len: usize) -> Arc<AlignedBuf> {
        let size = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let unique = self
            .bufs
            .iter_mut()
            .position(|b| b.len() == size && Arc::get_mut(b).is_some());
        if let Some(i) = unique {
            let mut b = self.bufs.swap_remove(i);
            Arc::get_mut(&mut b).expect("held by nothing else")[len..].fill(0);
            return b;
        }
        Arc::new(AlignedBuf::zeroed(len))
    }

    /// Keeps `buf` (others may still hold it) for a later `take`, when there is room.
    pub fn keep(&mut self, buf: Arc<AlignedBuf>) {
        if buf.len() <= self.max_bytes && self.bufs.len() < self.max {
            self.bufs.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_is_taken_again_only_when_nothing_else_holds_it() {
        let mut spare = SpareBuffers::new(4, 64 << 10);
        let mut kept = spare.take(4096);
        Arc::get_mut(&mut kept).unwrap().fill(7);
        let at = kept.as_ptr();
        let held = kept.clone();
        spare.keep(kept);
        let other = spare.take(4096);
        assert_ne!(
            other.as_ptr(),
            at,
            "a buffer still held elsewhere is not reused"
        );
        drop(held);
        let wider = spare.take(8192);
        assert_ne!(
            wider.as_ptr(),
            at,
            "only a buffer of the same size is reused"
        );
        let again = spare.take(100);
        assert_eq!(again.as_ptr(), at, "reused once nothing else holds it");
        assert!(
            again[100..].iter().all(|&b| b == 0),
            "past the length it is zeroed"
        );
        let mut full = SpareBuffers::new(1, 4096);
        full.keep(Arc::new(AlignedBuf::zeroed(8192)));
        assert!(full.bufs.is_empty(), "a buffer over max_bytes is not kept");
        full.keep(Arc::new(AlignedBuf::zeroed(4096)));
        full.keep(Arc::new(AlignedBuf::zeroed(4096)));
        assert_eq!(full.bufs.len(), 1, "at most max buffers");
    }
}
