//! Connection configuration shared by the server and client halves.

use std::time::Duration;

/// Default upper bound on one frame's payload after the handshake: 4 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Default bound on the whole handshake (TCP connect included on the client side): 5 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on concurrently executing requests per connection: 256.
pub const DEFAULT_MAX_INFLIGHT_PER_CONNECTION: usize = 256;
/// Default capacity of the bounded outgoing frame queue per connection: 1024.
pub const DEFAULT_REQUEST_QUEUE: usize = 1024;
/// Default bound on accepted connections open at once (handshaking ones
/// included): 512.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default bound on accepted connections whose handshake is in progress: 64.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;

/// Configuration of one node's wire endpoint (used for both `serve` and `connect`).
///
/// Build it with [`WireConfig::new`], which fills in the documented defaults, then
/// override individual public fields if needed.
#[derive(Clone)]
pub struct WireConfig {
    /// Cluster identity; peers with a different id are refused during the handshake.
    pub cluster_id: String,
    /// Shared cluster secret used as the HMAC-SHA256 key. Never sent on the wire.
    pub secret: Vec<u8>,
    /// This node's id, announced in the handshake.
    pub node_id: u64,
    /// This node's epoch (incarnation), announced in the handshake.
    pub epoch: u64,
    /// Largest accepted frame payload after the handshake. Default 4 MiB.
    /// (Before the handshake completes only [`crate::HANDSHAKE_MAX_FRAME_BYTES`] is accepted.)
    pub max_frame_bytes: usize,
    /// Bound on the whole handshake. Default 5 s.
    pub handshake_timeout: Duration,
    /// Max concurrently executing requests per connection. The server answers any
    /// excess request immediately with `RemoteError::Overloaded`; the client fails
    /// excess calls locally with `CallError::Overloaded`. Default 256.
    pub max_inflight_per_connection: usize,
    /// Capacity of the bounded outgoing frame queue per connection. Default 1024.
    pub request_queue: usize,
    /// `serve`: accepted connections open at once, handshaking ones included.
    /// Beyond it a new connection evicts the oldest handshake in progress, or
    /// is closed at once if none is (counted in `connections_refused`).
    /// Default 512.
    pub max_connections: usize,
    /// `serve`: handshakes in progress at once. Beyond it the oldest one is
    /// closed to make room (counted in `connections_evicted`). Default 64.
    pub max_handshakes: usize,
    /// Mutual TLS 1.3 under the handshake (`None`: plain TCP). With it, each
    /// side proves its identity by a certificate of the cluster CA, the
    /// node id announced in the handshake must be the one the certificate
    /// names, and a connection whose certificate is revoked later is closed.
    /// The TLS handshake counts against `handshake_timeout`. Default `None`.
    pub trust: Option<orrery_trust::TrustConfig>,
}

impl WireConfig {
    /// A config with the required identity fields and all defaults:
    /// `max_frame_bytes` = 4 MiB, `handshake_timeout` = 5 s,
    /// `max_inflight_per_connection` = 256, `request_queue` = 1024,
    /// `max_connections` = 512, `max_handshakes` = 64.
    pub fn new(
        cluster_id: impl Into<String>,
        secret: impl Into<Vec<u8>>,
        node_id: u64,
        epoch: u64,
    ) -> Self {
        WireConfig {
            cluster_id: cluster_id.into(),
            secret: secret.into(),
            node_id,
            epoch,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_inflight_per_connection: DEFAULT_MAX_INFLIGHT_PER_CONNECTION,
            request_queue: DEFAULT_REQUEST_QUEUE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            trust: None,
        }
    }
}

impl std::fmt::Debug for WireConfig {
    // Hand-written so the secret never ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireConfig")
            .field("cluster_id", &self.cluster_id)
            .field("secret", &"<redacted>")
            .field("node_id", &self.node_id)
            .field("epoch", &self.epoch)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field(
                "max_inflight_per_connection",
                &self.max_inflight_per_connection,
            )
            .field("request_queue", &self.request_queue)
            .field("max_connections", &self.max_connections)
            .field("max_handshakes", &self.max_handshakes)
            .field("tls", &self.trust.is_some())
            .finish()
    }
}
