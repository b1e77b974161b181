//! Fault switches read from the environment by `torusd-testing`, so that process-level tests
//! can show their checks catch what the switch breaks.

use std::sync::atomic::{AtomicU64, Ordering};

/// `TORUS_TESTING_REPLICA_DROPS_WRITES=N`: as a replica, acknowledge every Nth write without
/// applying it, a replica whose disk lies, so that tests can show the scrub's comparison of
/// replicas finds and repairs the difference.
pub fn replica_drops_this_write() -> bool {
    static EVERY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let every = *EVERY.get_or_init(|| {
        let n = std::env::var("TORUS_TESTING_REPLICA_DROPS_WRITES")
            .ok()?
            .parse()
            .ok()?;
        eprintln!("torusd: TORUS_TESTING_REPLICA_DROPS_WRITES={n}: this node acknowledges every {n}th replica write without applying it");
        Some(n)
    });
    every.is_some_and(|n: u64| (COUNT.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n.max(1)))
}
