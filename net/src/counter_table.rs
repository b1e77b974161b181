//! A counter per key (a volume), read and changed without a lock: the table is a snapshot,
//! replaced whole (one at a time, under `adding`) when a key's first counter is made.

use crate::counted::Mutex;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Default)]
pub struct CounterTable {
    counters: ArcSwap<HashMap<u32, Arc<AtomicU64>>>,
    adding: Mutex<()>,
}

impl CounterTable {
    /// `key`'s counter, made (at 0) the first time.
    pub fn get(&self, key: u32) -> Arc<AtomicU64> {
        if let Some(c) = self.counters.load().get(&key) {
            return c.clone();
        }
        let _adding = self.adding.lock();
        let current = self.counters.load_full();
        if let Some(c) = current.get(&key) {
            return c.clone();
        }
        let c = Arc::new(AtomicU64::new(0));
        let mut next = (*current).clone();
        next.insert(key, c.clone());
        self.counters.store(Arc::new(next));
        c
    }

    /// `f` of `key`'s counter (without taking a reference to it when it exists).
    pub fn with<R>(&self, key: u32, f: impl FnOnce(&AtomicU64) -> R) -> R {
        if let Some(c) = self.counters.load().get(&key) {
            return f(c);
        }
        f(&self.get(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn one_counter_per_key() {
        let t = CounterTable::default();
        t.get(1).fetch_add(2, Ordering::Relaxed);
        assert_eq!(t.with(1, |c| c.load(Ordering::Relaxed)), 2);
        assert_eq!(
            t.with(2, |c| c.fetch_add(1, Ordering::Relaxed)),
            0,
            "made at 0"
        );
        assert_eq!(t.get(2).load(Ordering::Relaxed), 1, "the same counter");
    }
}
