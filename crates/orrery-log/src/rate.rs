//! Per-channel rate limit: a lock-free token bucket.
//!
//! Implemented as GCRA (the "virtual scheduling" form of a token bucket):
//! one atomic holds the theoretical arrival time of the next record. A
//! record is admitted when, after charging it one emission interval, the
//! schedule runs at most one second ahead of now — i.e. the burst equals
//! the rate per second, and the bucket refills continuously at that rate.

use std::sync::atomic::{AtomicU64, Ordering};

const NANOS_PER_S: u64 = 1_000_000_000;

/// Nanoseconds between two records at `per_s` records per second (>= 1).
pub(crate) fn interval_ns(per_s: u32) -> u64 {
    debug_assert!(per_s >= 1, "rate must be positive");
    NANOS_PER_S / u64::from(per_s.max(1))
}

#[derive(Debug, Default)]
pub(crate) struct TokenBucket {
    /// Theoretical arrival time (monotonic ns) of the next conforming record.
    tat_ns: AtomicU64,
}

impl TokenBucket {
    /// Takes one token at time `now_ns` if available. Never blocks or spins
    /// beyond lost compare-exchange races with other admitters.
    pub(crate) fn try_take(&self, now_ns: u64, interval_ns: u64) -> bool {
        debug_assert!(interval_ns >= 1);
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns).saturating_add(interval_ns);
            if next > now_ns.saturating_add(NANOS_PER_S) {
                return false;
            }
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(b: &TokenBucket, now: u64, per_s: u32) -> u32 {
        let mut n = 0;
        while b.try_take(now, interval_ns(per_s)) {
            n += 1;
            assert!(n <= per_s + 1, "burst must be bounded by the rate");
        }
        n
    }

    #[test]
    fn burst_equals_rate_then_refills_at_rate() {
        let b = TokenBucket::default();
        let t0 = 5 * NANOS_PER_S;
        assert_eq!(take_all(&b, t0, 100), 100);
        assert!(!b.try_take(t0, interval_ns(100)));
        // A tenth of a second later, ten more tokens.
        assert_eq!(take_all(&b, t0 + NANOS_PER_S / 10, 100), 10);
        // After a long idle time, the burst is capped at the rate again.
        assert_eq!(take_all(&b, t0 + 60 * NANOS_PER_S, 100), 100);
    }

    #[test]
    fn rate_one_admits_one_per_second() {
        let b = TokenBucket::default();
        assert!(b.try_take(0, interval_ns(1)));
        assert!(!b.try_take(0, interval_ns(1)));
        assert!(!b.try_take(NANOS_PER_S / 2, interval_ns(1)));
        assert!(b.try_take(NANOS_PER_S, interval_ns(1)));
    }
}
