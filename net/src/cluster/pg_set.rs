//! A set of placement groups that the data path reads on every replica write and the control
//! loops change now and then: a flag per PG, no lock.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) struct PgSet(Box<[AtomicBool]>);

impl PgSet {
    pub(super) fn new(pg_count: u32) -> PgSet {
        PgSet((0..pg_count).map(|_| AtomicBool::new(false)).collect())
    }

    pub(super) fn contains(&self, pg: u32) -> bool {
        self.0
            .get(pg as usize)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Adds `pg`; false when it was in already (or is not a PG here).
    pub(super) fn insert(&self, pg: u32) -> bool {
        self.0
            .get(pg as usize)
            .is_some_and(|f| !f.swap(true, Ordering::AcqRel))
    }

    pub(super) fn remove(&self, pg: u32) {
        if let Some(f) = self.0.get(pg as usize) {
            f.store(false, Ordering::Release);
        }
    }

    pub(super) fn to_set(&self) -> BTreeSet<u32> {
        (0..self.0.len() as u32)
            .filter(|&pg| self.contains(pg))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pg_is_in_once() {
        let s = PgSet::new(4);
        assert!(s.insert(2));
        assert!(!s.insert(2), "in already");
        assert!(s.contains(2) && !s.contains(1));
        assert!(!s.insert(9) && !s.contains(9), "not a PG");
        assert_eq!(s.to_set(), BTreeSet::from([2]));
        s.remove(2);
        assert!(!s.contains(2));
    }
}
