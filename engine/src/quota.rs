//! Per-volume quotas: a volume with a quota may map at most `limit` blocks on this node;
//! a write that would map more is answered `NoSpace` (overwrites of mapped blocks and trims
//! always go through). The count is kept exactly by the cores: a write reserves the blocks it
//! will newly map once it holds their lock, its completion settles the reservation, unmaps
//! give blocks back.
//!
//! A quota set on a running node starts counting on each core when that core has added its
//! current mapped blocks of the volume (`Message::CountQuota`); until then that core does
//! not check the quota, so nothing is counted twice.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Quota {
    /// Blocks the volume may map on this node.
    pub limit: AtomicU64,
    /// Blocks mapped (and reserved by writes in flight), over the cores that count.
    pub used: AtomicU64,
    counting: Vec<AtomicBool>,
}

impl Quota {
    pub fn counting(&self, core: usize) -> bool {
        self.counting[core].load(Ordering::Acquire)
    }

    /// Reserves `n` blocks; false (nothing reserved) when that would pass the limit.
    pub fn reserve(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.limit.load(Ordering::Acquire) {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub fn add(&self, n: u64) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    pub fn sub(&self, n: u64) {
        // Saturating: a count can never go below what the cores hold.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Core `core` has added its mapped blocks: it counts from now on.
    pub fn start_counting(&self, core: usize, mapped: u64) {
        self.used.fetch_add(mapped, Ordering::AcqRel);
        self.counting[core].store(true, Ordering::Release);
    }
}

#[derive(Default)]
pub struct Quotas(RwLock<HashMap<u32, Arc<Quota>>>);

impl Quotas {
    pub fn get(&self, volume: u32) -> Option<Arc<Quota>> {
        self.0.read().get(&volume).cloned()
    }

    /// Sets (or changes) a volume's limit; true when the quota is new and the cores must
    /// count the volume's blocks.
    pub fn set(&self, volume: u32, limit_blocks: u64, cores: usize) -> bool {
        let mut q = self.0.write();
        if let Some(existing) = q.get(&volume) {
            existing.limit.store(limit_blocks, Ordering::Release);
            return false;
        }
        q.insert(
            volume,
            Arc::new(Quota {
                limit: AtomicU64::new(limit_blocks),
                used: AtomicU64::new(0),
                counting: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            }),
        );
        true
    }

    pub fn remove(&self, volume: u32) {
        self.0.write().remove(&volume);
    }
}
