//! The locks the cluster takes, counted in a benchmark build (the `counters` feature:
//! `benches/write_path_counts.sh` divides the count by the writes it made). Without the
//! feature they are parking_lot's locks and count nothing.

use std::sync::atomic::{AtomicU64, Ordering};

static LOCKS: AtomicU64 = AtomicU64::new(0);

/// Locks taken so far by this process (0 without the `counters` feature).
pub fn locks_taken() -> u64 {
    LOCKS.load(Ordering::Relaxed)
}

#[inline]
fn taken() {
    #[cfg(feature = "counters")]
    LOCKS.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
pub struct Mutex<T>(parking_lot::Mutex<T>);

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Mutex<T> {
        Mutex(parking_lot::Mutex::new(value))
    }

    pub fn lock(&self) -> parking_lot::MutexGuard<'_, T> {
        taken();
        self.0.lock()
    }
}

#[derive(Default)]
pub struct RwLock<T>(parking_lot::RwLock<T>);

impl<T> RwLock<T> {
    pub const fn new(value: T) -> RwLock<T> {
        RwLock(parking_lot::RwLock::new(value))
    }

    pub fn read(&self) -> parking_lot::RwLockReadGuard<'_, T> {
        taken();
        self.0.read()
    }

    pub fn write(&self) -> parking_lot::RwLockWriteGuard<'_, T> {
        taken();
        self.0.write()
    }
}
