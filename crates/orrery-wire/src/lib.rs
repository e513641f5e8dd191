//! # orrery-wire
//!
//! Node-to-node bytes for orrery. This crate **owns**:
//!
//! * **framing** ([`frame`]): length-delimited frames (4-byte big-endian length,
//!   bounded by [`WireConfig::max_frame_bytes`]) carrying postcard-encoded payloads;
//! * **the authenticated handshake** ([`handshake`]): cluster id and protocol version
//!   negotiation plus mutual proof of the cluster secret (HMAC-SHA256 over a transcript
//!   binding both nonces, both node ids/epochs, the cluster id and the version), run
//!   inside mutual TLS 1.3 ([`link`], policy from `orrery-trust`) when the
//!   [`WireConfig`] carries a trust configuration: the certificate says who the peer
//!   is, and the node id it announces must be that one;
//! * **a multiplexed request/response channel** over one TCP connection: [`serve`]
//!   with a [`Handler`] on the accepting side, [`connect`] / [`Channel`] on the
//!   connecting side, and a [`PeerPool`] of lazily (re)connected channels;
//! * **connection admission** ([`limit`]): caps on open and pending
//!   connections with eviction of the oldest pending one, used by [`serve`]
//!   and by any other accepting endpoint of the node (the admin port).
//!
//! It is generic over the message types (`Req`/`Resp`, any serde type) and knows
//! nothing of cluster policy; the only policy hook is [`Handler::admit`].
//!
//! This crate must **never**:
//!
//! * panic, allocate without bound, or affect anything beyond one connection because
//!   of bytes received from the network — bad input closes *that* connection, is
//!   logged with its reason on tracing target `orrery::wire`, and is counted in
//!   [`WireStats`];
//! * send the cluster secret, or compare proofs in variable time;
//! * queue without limit: in-flight requests and outgoing frames are bounded per
//!   connection and excess work fails fast with an `Overloaded` error; accepted
//!   connections and handshakes in progress are bounded per endpoint;
//! * make cluster decisions (membership, routing, fencing policy) — callers do.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod frame;
pub mod handshake;
pub mod limit;
pub mod link;
pub mod pool;
pub mod server;
pub mod stats;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

pub use client::{connect, CallError, Channel};
pub use config::WireConfig;
pub use frame::{Envelope, FrameError, RemoteError, HANDSHAKE_MAX_FRAME_BYTES};
pub use handshake::{
    AdmitError, HandshakeError, PeerInfo, RejectReason, PROTOCOL_MAX, PROTOCOL_MIN,
};
pub use limit::{admit_yielding, Admission, ConnLimiter, ConnLimits, ConnSlot};
pub use link::Link;
pub use pool::{PeerPool, PoolError};
pub use server::{serve, BoxFuture, Handler};
pub use stats::{WireStats, WireStatsSnapshot};
pub use tokio_util::sync::CancellationToken;

/// Tracing target of every log line this crate emits.
pub const LOG_TARGET: &str = "orrery::wire";

/// Bound for request/response types: any owned serde type that can cross tasks.
pub trait Message: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Message for T {}
