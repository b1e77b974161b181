//! The writes in flight here, counted by the map epoch they started under, without a lock: a
//! pair of counters per epoch (the write until every copy answered, and its local copy), the
//! table of epochs a snapshot replaced (under `adding`) when a write of a new epoch arrives.
//!
//! A counter whose epoch has nothing in flight any more is retired when a newer epoch is
//! added: a compare-and-swap from 0 to `RETIRED`, after which nothing counts on it (a write
//! that finds it retired takes the slow path and gets a fresh one). So a counter is either
//! counted on or retired, never both, and no write is lost from the table.
//!
//! A write's local copy is counted in after the write and out before it, so `local` never
//! exceeds `writes`, and `writes` at 0 means the epoch has nothing in flight at all.

use crate::counted::Mutex;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const RETIRED: u64 = 1 << 63;

#[derive(Default)]
pub(super) struct Counts {
    writes: AtomicU64,
    local: AtomicU64,
}

#[derive(Default)]
pub(super) struct InFlight {
    epochs: ArcSwap<BTreeMap<u64, Arc<Counts>>>,
    adding: Mutex<()>,
}

impl InFlight {
    /// Counts a write (and its local copy) under `epoch` in.
    pub(super) fn enter(&self, epoch: u64) {
        loop {
            if let Some(c) = self.epochs.load().get(&epoch) {
                let counted = c
                    .writes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n & RETIRED == 0).then_some(n + 1)
                    })
                    .is_ok();
                if counted {
                    c.local.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            self.add(epoch);
        }
    }

    /// Makes a live counter for `epoch`, retiring those of older epochs with nothing in flight.
    fn add(&self, epoch: u64) {
        let _adding = self.adding.lock();
        let current = self.epochs.load_full();
        if current
            .get(&epoch)
            .is_some_and(|c| c.writes.load(Ordering::SeqCst) & RETIRED == 0)
        {
            return;
        }
        let mut next: BTreeMap<u64, Arc<Counts>> = current
            .iter()
            .filter(|(&e, c)| {
                let live = c.writes.load(Ordering::SeqCst) & RETIRED == 0;
                let retire = || {
                    c.writes
                        .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                };
                live && (e > epoch || !retire())
            })
            .map(|(&e, c)| (e, c.clone()))
            .collect();
        next.insert(epoch, Arc::new(Counts::default()));
        self.epochs.store(Arc::new(next));
    }

    /// The write under `epoch` is answered (every copy of it).
    pub(super) fn write_done(&self, epoch: u64) {
        if let Some(c) = self.epochs.load().get(&epoch) {
            c.writes.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Its local copy is done (or will not be made).
    pub(super) fn local_done(&self, epoch: u64) {
        if let Some(c) = self.epochs.load().get(&epoch) {
            c.local.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The oldest epoch with a write in flight.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.epochs
            .load()
            .iter()
            .find(|(_, c)| {
                let n = c.writes.load(Ordering::SeqCst);
                n & RETIRED == 0 && n > 0
            })
            .map(|(&e, _)| e)
    }

    /// The oldest epoch with a local copy in flight.
    pub(super) fn oldest_local(&self) -> Option<u64> {
        self.epochs
            .load()
            .iter()
            .find(|(_, c)| c.local.load(Ordering::SeqCst) > 0)
            .map(|(&e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_epoch_and_retires_what_is_done() {
        let f = InFlight::default();
        assert_eq!(f.oldest(), None);
        f.enter(3);
        f.enter(3);
        f.enter(5);
        assert_eq!((f.oldest(), f.oldest_local()), (Some(3), Some(3)));
        f.local_done(3);
        f.local_done(3);
        assert_eq!((f.oldest(), f.oldest_local()), (Some(3), Some(5)));
        f.write_done(3);
        f.write_done(3);
        assert_eq!(f.oldest(), Some(5));
        f.enter(7); // retires 3
        assert_eq!(f.epochs.load().len(), 2);
        f.enter(3); // a late write of epoch 3 gets a fresh counter
        assert_eq!(f.oldest(), Some(3));
        f.local_done(3);
        f.write_done(3);
        assert_eq!(f.oldest(), Some(5));
    }

    #[test]
    fn no_write_is_lost_while_epochs_come_and_go() {
        let f = Arc::new(InFlight::default());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let epoch = (i / 100) * 4 + t % 2;
                        f.enter(epoch);
                        assert!(
                            f.oldest().is_some_and(|o| o <= epoch),
                            "a write in flight is seen"
                        );
                        f.local_done(epoch);
                        f.write_done(epoch);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(f.oldest(), None, "every count went back to zero");
        assert_eq!(f.oldest_local(), None);
    }
}
