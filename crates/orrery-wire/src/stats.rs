//! Process-wide wire counters (one set per endpoint: the node's cluster port
//! has one, its admin port another).

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
    /// Gauge: accepted connections open now (pending ones included).
    connections_open,
    /// Gauge: connections still pending (handshake in progress; on the admin
    /// port: no request byte received yet).
    connections_pending,
    /// Connections closed right after `accept` because the endpoint's
    /// connection cap was reached and nothing could be evicted.
    connections_refused,
    /// Pending connections closed to make room for a newer one (the pending
    /// cap, or the connection cap, was reached).
    connections_evicted,
    /// Connections closed because a handshake (or, on the admin port, a
    /// request head) did not arrive in time.
    connections_timed_out,
    /// Admin connections closed after making no progress for the idle bound.
    connections_idle_closed,
    /// TLS handshakes refused or failed (no certificate, another cluster's
    /// CA, a revoked certificate, not TLS at all), either side.
    handshakes_refused_tls,
    /// Handshakes refused because the node id announced differs from the
    /// one the peer's certificate names.
    handshakes_refused_identity,
    /// Established connections closed because the peer's certificate was
    /// revoked while they were open, or the handler stopped admitting the
    /// peer (its epoch was revoked or superseded).
    connections_closed_revoked,
}

impl WireStats {
    /// A fresh set of zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one to `counter`; returns the new value.
    pub fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}
