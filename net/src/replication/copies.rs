//! One write's copies (local and remote, or a node's cores) answering, from whichever thread
//! their answers arrive on: done when all have, with the worst answer (`worse`), counted with
//! atomics. The answer that completes the count takes what the write was waiting
//! with (its request), once: the one lock, uncontended (handing it over without one would
//! take `unsafe`, which this crate forbids).

use super::worse;
use crate::counted::Mutex;
use crate::wire::Status;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

pub struct Copies<T> {
    remaining: AtomicUsize,
    /// The worst answer so far (`worse`), as its wire code.
    worst: AtomicU32,
    /// Taken by the answer that brings `remaining` to zero, and by no other.
    waiting: Mutex<Option<T>>,
}

impl<T> Copies<T> {
    pub fn new(copies: usize, waiting: T) -> Copies<T> {
        Copies {
            remaining: AtomicUsize::new(copies),
            worst: AtomicU32::new(Status::Ok.as_u16() as u32),
            waiting: Mutex::new(Some(waiting)),
        }
    }

    /// Counts one answer. The last one gets the write's outcome and what it waited with; an
    /// answer beyond the count is ignored.
    pub fn add(&self, s: Status) -> Option<(Status, T)> {
        let mut cur = self.worst.load(Ordering::Relaxed);
        loop {
            let next = worse(Status::from_u16(cur as u16), s).as_u16() as u32;
            if next == cur {
                break;
            }
            match self
                .worst
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        let before = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()?;
        if before != 1 {
            return None;
        }
        let worst = Status::from_u16(self.worst.load(Ordering::Acquire) as u16);
        let waiting = self.waiting.lock().take()?;
        Some((worst, waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_answer_takes_the_request_with_the_worst_outcome() {
        let c = Copies::new(3, "req");
        assert!(c.add(Status::Ok).is_none());
        assert!(c.add(Status::Retry).is_none());
        assert_eq!(c.add(Status::Ok), Some((Status::Retry, "req")));
        assert_eq!(c.add(Status::Ok), None, "an extra answer is ignored");
        let c = Copies::new(2, ());
        assert_eq!(c.add(Status::Retry), None);
        assert_eq!(c.add(Status::Eio), Some((Status::Eio, ())));
        assert_eq!(c.add(Status::Ok), None, "an extra answer is ignored");
        let c = Copies::new(3, 7u32);
        assert!(c.add(Status::Retry).is_none());
        assert!(c.add(Status::Eio).is_none());
        assert_eq!(
            c.add(Status::Fenced),
            Some((Status::Eio, 7)),
            "the first hard error"
        );
    }

    #[test]
    fn answers_from_many_threads_finish_once() {
        for _ in 0..200 {
            let c = std::sync::Arc::new(Copies::new(8, String::from("req")));
            let finished = std::sync::Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (c, finished) = (c.clone(), finished.clone());
                    std::thread::spawn(move || {
                        let s = if i == 5 { Status::Retry } else { Status::Ok };
                        if let Some((worst, req)) = c.add(s) {
                            assert_eq!((worst, req.as_str()), (Status::Retry, "req"));
                            finished.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            assert_eq!(finished.load(Ordering::Relaxed), 1);
        }
    }
}
