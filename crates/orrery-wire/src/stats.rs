//! Process-wide wire counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters for everything the wire layer refuses or sheds. Cheap to bump
        /// (relaxed atomics); share one `Arc<WireStats>` per process or per endpoint.
        #[derive(Debug, Default)]
        pub struct WireStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A plain copy of [`WireStats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub struct WireStatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl WireStats {
            /// Read all counters (each individually atomic; not a consistent cut).
            pub fn snapshot(&self) -> WireStatsSnapshot {
                WireStatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

stats! {
    /// TCP connections accepted by `serve`.
    connections_accepted,
    /// Handshakes completed successfully (either side).
    handshakes_ok,
    /// Handshakes we refused because the peer could not prove the cluster secret.
    handshakes_refused_wrong_secret,
    /// Server-side handshakes that failed for any other reason (unknown cluster,
    /// no common protocol, bad magic, not admitted, malformed, timeout, I/O).
    handshakes_refused_other,
    /// Frames we received that did not decode (postcard error, trailing bytes,
    /// unexpected message kind).
    frames_malformed,
    /// Frames we received whose length prefix exceeded the allowed maximum.
    frames_oversized,
    /// Connections we closed because the peer sent bad input.
    connections_closed_bad_input,
    /// Requests shed because the in-flight bound was reached (server side: answered
    /// with `Overloaded`; client side: `CallError::Overloaded`).
    requests_overloaded,
    /// Client calls that hit their deadline.
    calls_timed_out,
}

impl WireStats {
    /// A fresh set of zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
