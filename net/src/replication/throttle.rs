//! How fast a catch-up round copies (`--recovery-rate`): after a first burst, no more than the
//! rate allows since the round began. Counted from what this process had copied when the round
//! began, so a node that copied much earlier does not wait for that.

use std::time::Duration;

/// What a round may copy at once before the rate applies.
pub const RECOVERY_BURST: u64 = 8 << 20;

/// One catch-up round's limit.
pub struct Throttle {
    /// Bytes a second.
    rate: u64,
    /// The process's bytes copied when the round began.
    base: u64,
}

impl Throttle {
    /// A round that begins with `copied_before` bytes copied by this process so far.
    pub fn new(rate: u64, copied_before: u64) -> Throttle {
        Throttle {
            rate: rate.max(1),
            base: copied_before,
        }
    }

    /// How long to wait before the next copy, `elapsed` into the round, with `copied` bytes
    /// copied by the process so far; `None` when it may go on now.
    pub fn wait(&self, copied: u64, elapsed: Duration) -> Option<Duration> {
        let copied = copied.saturating_sub(self.base) as f64;
        let allowed = self.rate as f64 * elapsed.as_secs_f64();
        (copied > allowed + RECOVERY_BURST as f64)
            .then(|| Duration::from_secs_f64((copied - allowed) / self.rate as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_round_waits_once_it_copied_past_the_burst_faster_than_the_rate() {
        let t = Throttle::new(10 * MIB, 0);
        assert_eq!(t.wait(8 * MIB, Duration::ZERO), None, "within the burst");
        // 20 MiB in 1 s at 10 MiB/s: 10 MiB ahead, a second's wait.
        assert_eq!(
            t.wait(20 * MIB, Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(t.wait(20 * MIB, Duration::from_secs(2)), None);
    }

    #[test]
    fn what_the_process_copied_before_the_round_does_not_slow_it() {
        // A node that caught up 100 GiB earlier starts a round: its first copies go at once
        // (counted from the process's total, it would wait 10,240 s at 10 MiB/s).
        let before = 100 << 30;
        let t = Throttle::new(10 * MIB, before);
        assert_eq!(t.wait(before, Duration::ZERO), None);
        assert_eq!(t.wait(before + 4 * MIB, Duration::from_millis(10)), None);
        assert!(t.wait(before + 30 * MIB, Duration::from_secs(1)).is_some());
    }
}
