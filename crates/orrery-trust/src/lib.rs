//! Node identity for orrery: the cluster's certificate authority ([`ClusterCa`]), node
//! certificates ([`NodeCredentials`]), and the mutual TLS 1.3 configuration every
//! node-to-node connection runs under ([`TrustConfig`]), with revocation
//! ([`Revocations`]) checked at every handshake.
//!
//! The main type is [`TrustConfig`]: built once per node from its credentials, it gives
//! the rustls server and client configurations, and `accept`/`connect` return the
//! peer's [`PeerIdentity`] (cluster, node id, role, serial), which is who the peer may
//! speak as: the wire and node layers take the sender's identity from it, never from a
//! message.
//!
//! # What this crate owns
//! - Making the CA and node certificates (rcgen), saving and loading them as PEM (keys
//!   0600, directories 0700), and serial numbers that only grow ([`ca`]).
//! - What a certificate means: the names in it ([`names`]) and the identity read from
//!   it ([`identity`]).
//! - The TLS policy: TLS 1.3 only, mandatory client authentication against the cluster
//!   CA, no session resumption, bounded chains ([`config`], [`verify`]).
//! - The revocation check at every handshake ([`revocation`]); *what* is revoked is the
//!   replicated state's decision, copied in by the node.
//!
//! # What it must never do
//! - **No home-made cryptography**: signatures, key generation, the handshake, chain
//!   validation are rustls, webpki, ring and rcgen; this crate only adds checks on
//!   already-verified certificates and parses them with `x509-parser`.
//! - **Never read the network itself**: it opens no socket and spawns no task; the
//!   caller hands it a connected stream (and bounds the handshake's time).
//! - Never read a clock: certificates carry a fixed, wide validity window ([`ca`]);
//!   rustls reads its own clock for the window check.
//! - Never decide who is revoked or who may send what: it enforces the list it is given
//!   and reports who the peer is.

pub mod bench;
pub mod ca;
pub mod config;
pub mod error;
mod files;
pub mod identity;
pub mod names;
mod pem;
pub mod revocation;
pub mod verify;

#[cfg(test)]
mod tests;

pub use bench::{bench_handshakes, BenchError, HandshakeCost};
pub use ca::{ClusterCa, NodeCredentials};
pub use config::{HandshakeError, TrustConfig, ALPN_PROTOCOL};
pub use error::TrustError;
pub use identity::{IdentityError, PeerIdentity};
pub use names::{ClusterId, InvalidClusterId};
pub use revocation::{RevocationList, Revocations, Revoked};
pub use verify::Refusal;

/// The rustls and tokio-rustls this crate is built on, for callers that name their types.
pub use {rustls, tokio_rustls};

/// Most intermediate certificates a peer may send after its leaf. orrery's CA signs node
/// certificates directly (its path length is 0), so a node sends only its leaf; one extra
/// is tolerated for a peer that also sends the CA certificate.
pub const MAX_PEER_INTERMEDIATES: usize = 1;

/// Largest certificate parsed for an identity (orrery's are well under 1 KiB).
pub const MAX_CERT_BYTES: usize = 16 * 1024;

/// Largest key or certificate file read.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
