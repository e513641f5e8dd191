//! The crate's one place that reads clocks.
//!
//! The workspace bans `Instant::now`/`SystemTime::now` so that decision
//! logic takes time as an input. Logging genuinely needs real time: every
//! record carries its wall-clock timestamp, and the per-channel token
//! buckets refill with elapsed monotonic time. Both reads live here.
#![allow(clippy::disallowed_methods)] // The sanctioned clock reads; see module docs.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Monotonic nanoseconds since the first call in this process.
pub(crate) fn mono_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    origin.elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a);
        assert!(unix_ms() > 1_600_000_000_000, "wall clock is after 2020");
    }
}
