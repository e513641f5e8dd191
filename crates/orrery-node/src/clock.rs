//! The node's one wall clock.
//!
//! Decision logic in orrery-core never reads a clock: the runtime reads it
//! here and passes the value in. Keeping the read in one function makes the
//! determinism rule (clippy `disallowed_methods`) checkable everywhere else.

use orrery_core::Millis;

/// Wall-clock milliseconds since the Unix epoch. Replicated timestamps use
/// it so that a restarted process keeps measuring from the same origin.
#[allow(clippy::disallowed_methods)] // The sanctioned clock read; see module docs.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
