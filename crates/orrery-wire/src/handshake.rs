//! The authenticated handshake.
//!
//! Four messages, all in frames of at most [`HANDSHAKE_MAX_FRAME_BYTES`]:
//!
//! 1. client -> server [`ClientHello`] (magic, protocol range, cluster id, node id, epoch, nonce)
//! 2. server -> client [`ServerHello`] (chosen version, cluster id, node id, epoch, nonce)
//!    or `Reject` (bad magic, unknown cluster id, no common protocol version)
//! 3. client -> server `ClientProof { hmac }`
//! 4. server -> client `ServerProof { hmac }`, or `Reject { WrongSecret }` if the
//!    client's proof did not verify (or `Reject { NotAdmitted }` if the server's
//!    admission hook refused the peer)
//!
//! Each proof is HMAC-SHA256 keyed with the cluster secret over a transcript that binds
//! a role label (so a proof cannot be reflected), the chosen protocol version, the
//! client's offered range, the cluster id, both node ids and epochs, and both nonces.
//! The secret itself is never sent. Proofs are verified in constant time with
//! [`Mac::verify_slice`]. Nonces come from [`rand::rngs::OsRng`].
//!
//! Under TLS ([`crate::link`]) the same four messages run inside the TLS
//! session, and each side also checks that the node id the other announces is
//! the one its certificate names ([`RejectReason::IdentityMismatch`]). The
//! secret stays as a second factor: a node key copied off one machine is not
//! enough to join without the deployment's secret, and the secret alone (which
//! every node holds) no longer lets anyone speak as another node.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::frame::{decode, encode, FrameError, WireCodec, HANDSHAKE_MAX_FRAME_BYTES};
use crate::stats::WireStats;
use crate::{WireConfig, LOG_TARGET};

/// First bytes of every `ClientHello`.
pub const MAGIC: [u8; 8] = *b"ORRERYW\x01";
/// Oldest protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// Newest protocol version this build speaks.
pub const PROTOCOL_MAX: u16 = 1;

type HmacSha256 = Hmac<Sha256>;

/// What each side knows about the other once the handshake has succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id.
    pub node_id: u64,
    /// The peer's epoch (incarnation).
    pub epoch: u64,
    /// The peer's socket address.
    pub addr: SocketAddr,
    /// The negotiated protocol version.
    pub protocol_version: u16,
    /// Under TLS: who the peer's certificate says it is (its node id is
    /// `node_id`, checked); `None` on a plain connection.
    pub cert: Option<orrery_trust::PeerIdentity>,
}

/// Why [`crate::Handler::admit`] refuses a peer; the peer is told which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The peer's process is fenced (a revoked or superseded epoch): an
    /// honest peer stops serving and rejoins under a new epoch.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Any other refusal (not in the cluster, a wrong role).
    #[error("{0}")]
    Refused(String),
}

impl HandshakeError {
    /// The reason, if the server refused us because our process is fenced.
    pub fn fenced(&self) -> Option<&str> {
        match self {
            HandshakeError::RejectedByPeer {
                reason: RejectReason::Fenced(r),
                ..
            } => Some(r),
            _ => None,
        }
    }
}

/// Step 1, client -> server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Must equal [`MAGIC`].
    pub magic: [u8; 8],
    /// Oldest protocol version the client speaks.
    pub protocol_min: u16,
    /// Newest protocol version the client speaks.
    pub protocol_max: u16,
    /// The client's cluster id.
    pub cluster_id: String,
    /// The client's node id.
    pub node_id: u64,
    /// The client's epoch.
    pub epoch: u64,
    /// Fresh random client nonce.
    pub nonce: [u8; 32],
}

/// Step 2, server -> client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The protocol version chosen by the server (highest common version).
    pub protocol_version: u16,
    /// The server's cluster id.
    pub cluster_id: String,
    /// The server's node id.
    pub node_id: u64,
    /// The server's epoch.
    pub epoch: u64,
    /// Fresh random server nonce.
    pub nonce: [u8; 32],
}

/// Why a side refused the handshake (sent in `Reject`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    /// The hello did not start with [`MAGIC`]: not an orrery peer.
    #[error("bad magic: not an orrery wire peer")]
    BadMagic,
    /// The cluster ids differ; carries the rejecting side's cluster id.
    #[error("unknown cluster id (rejecting side is in cluster {ours:?})")]
    UnknownCluster {
        /// The rejecting side's cluster id.
        ours: String,
    },
    /// No common protocol version; carries the rejecting side's range.
    #[error("no common protocol version (rejecting side supports {min}..={max})")]
    UnsupportedProtocol {
        /// Rejecting side's oldest version.
        min: u16,
        /// Rejecting side's newest version.
        max: u16,
    },
    /// The proof did not verify: the two sides have different cluster secrets.
    #[error("wrong cluster secret")]
    WrongSecret,
    /// The server's admission hook refused this peer (e.g. not in the
    /// cluster configuration).
    #[error("not admitted: {0}")]
    NotAdmitted(String),
    /// The server's admission hook says this peer's process is fenced (its
    /// epoch was revoked or superseded): it must rejoin under a new one.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The rejecting side could not parse what it received.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// The node id announced is not the one the sender's certificate names.
    #[error("the certificate names node {certificate}, the hello announced node {announced}")]
    IdentityMismatch {
        /// Named by the certificate.
        certificate: u64,
        /// Announced in the hello.
        announced: u64,
    },
}

/// Every handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeMsg {
    /// Step 1.
    ClientHello(ClientHello),
    /// Step 2 (success).
    ServerHello(ServerHello),
    /// Refusal, by either side, at any step; the connection is closed after it.
    Reject {
        /// Why.
        reason: RejectReason,
    },
    /// Step 3: client's HMAC over the transcript.
    ClientProof {
        /// HMAC-SHA256.
        hmac: [u8; 32],
    },
    /// Step 4: server's HMAC over the transcript.
    ServerProof {
        /// HMAC-SHA256.
        hmac: [u8; 32],
    },
}

impl HandshakeMsg {
    fn kind(&self) -> &'static str {
        match self {
            HandshakeMsg::ClientHello(_) => "ClientHello",
            HandshakeMsg::ServerHello(_) => "ServerHello",
            HandshakeMsg::Reject { .. } => "Reject",
            HandshakeMsg::ClientProof { .. } => "ClientProof",
            HandshakeMsg::ServerProof { .. } => "ServerProof",
        }
    }
}

/// Why a handshake failed. Both sides get one of these.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's proof did not verify: it does not know our cluster secret.
    #[error("{peer} could not prove the cluster secret")]
    WrongSecret {
        /// "node N at ADDR".
        peer: String,
    },
    /// The peer sent `Reject`.
    #[error("{peer} rejected the handshake: {reason}")]
    RejectedByPeer {
        /// "node N at ADDR" or "peer at ADDR".
        peer: String,
        /// The peer's stated reason.
        reason: RejectReason,
    },
    /// The cluster ids differ.
    #[error("unknown cluster: we are in cluster {ours:?}, the peer is in cluster {theirs:?}")]
    UnknownCluster {
        /// Our cluster id.
        ours: String,
        /// The peer's cluster id.
        theirs: String,
    },
    /// No common protocol version.
    #[error("no common protocol version: we support {}..={}, the peer supports {}..={}", ours.0, ours.1, theirs.0, theirs.1)]
    UnsupportedProtocol {
        /// Our (min, max).
        ours: (u16, u16),
        /// The peer's (min, max).
        theirs: (u16, u16),
    },
    /// Our admission hook refused the peer (server side only).
    #[error("refused {peer}: {reason}")]
    NotAdmitted {
        /// "node N at ADDR".
        peer: String,
        /// The hook's reason.
        reason: String,
    },
    /// The peer sent something that is not a valid handshake message at this step.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// A handshake frame exceeded [`HANDSHAKE_MAX_FRAME_BYTES`].
    #[error("handshake frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The handshake (connect included, on the client) exceeded `handshake_timeout`.
    #[error("handshake timed out")]
    Timeout,
    /// Transport error.
    #[error("i/o error during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection mid-handshake.
    #[error("connection closed during handshake")]
    Closed,
    /// The TLS handshake failed or refused the peer (no certificate, another
    /// cluster's CA, a revoked certificate, not the node dialled).
    #[error("TLS: {0}")]
    Tls(#[source] orrery_trust::HandshakeError),
    /// The peer announced a node id other than the one its certificate names.
    #[error(
        "{peer}: the certificate names node {certificate}, the hello announced node {announced}"
    )]
    IdentityMismatch {
        /// "peer at ADDR".
        peer: String,
        /// Named by the certificate.
        certificate: u64,
        /// Announced in the hello.
        announced: u64,
    },
}

impl HandshakeError {
    /// True if the peer sent bytes that violate the protocol (malformed/oversized).
    pub fn is_bad_input(&self) -> bool {
        use orrery_trust::rustls::Error as Tls;
        match self {
            HandshakeError::Malformed(_) | HandshakeError::FrameTooLarge { .. } => true,
            // Bytes that are not TLS records at all (garbage, a plain-TCP peer).
            HandshakeError::Tls(orrery_trust::HandshakeError::Tls(e)) => matches!(
                e,
                Tls::InvalidMessage(_) | Tls::DecryptError | Tls::PeerMisbehaved(_)
            ),
            _ => false,
        }
    }
}

/// Protocol offer made by the client; overridable in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offer {
    pub magic: [u8; 8],
    pub min: u16,
    pub max: u16,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            magic: MAGIC,
            min: PROTOCOL_MIN,
            max: PROTOCOL_MAX,
        }
    }
}

pub(crate) fn new_framed<S: AsyncRead + AsyncWrite>(io: S) -> Framed<S, WireCodec> {
    Framed::new(io, WireCodec::new(HANDSHAKE_MAX_FRAME_BYTES))
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

const ROLE_CLIENT: &[u8] = b"client-proof";
const ROLE_SERVER: &[u8] = b"server-proof";

/// The keyed transcript MAC; every variable-length field is length-prefixed.
fn transcript_mac(
    secret: &[u8],
    role: &[u8],
    client: &ClientHello,
    server: &ServerHello,
) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    let mut put = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u64).to_be_bytes());
        mac.update(bytes);
    };
    put(b"orrery-wire handshake transcript");
    put(role);
    put(&server.protocol_version.to_be_bytes());
    put(&client.magic);
    put(&client.protocol_min.to_be_bytes());
    put(&client.protocol_max.to_be_bytes());
    put(client.cluster_id.as_bytes());
    put(server.cluster_id.as_bytes());
    put(&client.node_id.to_be_bytes());
    put(&client.epoch.to_be_bytes());
    put(&server.node_id.to_be_bytes());
    put(&server.epoch.to_be_bytes());
    put(&client.nonce);
    put(&server.nonce);
    mac
}

fn prove(secret: &[u8], role: &[u8], client: &ClientHello, server: &ServerHello) -> [u8; 32] {
    transcript_mac(secret, role, client, server)
        .finalize()
        .into_bytes()
        .into()
}

fn verify(
    secret: &[u8],
    role: &[u8],
    client: &ClientHello,
    server: &ServerHello,
    proof: &[u8],
) -> bool {
    transcript_mac(secret, role, client, server)
        .verify_slice(proof)
        .is_ok()
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, WireCodec>,
    msg: &HandshakeMsg,
) -> Result<(), HandshakeError> {
    let bytes = encode(msg).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    framed.send(bytes).await.map_err(|e| match e {
        FrameError::Io(e) => HandshakeError::Io(e),
        FrameError::TooLarge { len, max } => HandshakeError::FrameTooLarge { len, max },
        FrameError::Malformed(m) => HandshakeError::Malformed(m),
    })
}

/// Best-effort: tell the peer why before closing; errors are irrelevant then.
async fn reject<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, WireCodec>,
    reason: RejectReason,
) {
    let _ = send(framed, &HandshakeMsg::Reject { reason }).await;
}

async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, WireCodec>,
    stats: &WireStats,
) -> Result<HandshakeMsg, HandshakeError> {
    match framed.next().await {
        None => Err(HandshakeError::Closed),
        Some(Err(FrameError::TooLarge { len, max })) => {
            WireStats::bump(&stats.frames_oversized);
            Err(HandshakeError::FrameTooLarge { len, max })
        }
        Some(Err(FrameError::Io(e))) => Err(HandshakeError::Io(e)),
        Some(Err(FrameError::Malformed(m))) => {
            WireStats::bump(&stats.frames_malformed);
            Err(HandshakeError::Malformed(m))
        }
        Some(Ok(bytes)) => decode::<HandshakeMsg>(&bytes).map_err(|e| {
            WireStats::bump(&stats.frames_malformed);
            HandshakeError::Malformed(e.to_string())
        }),
    }
}

fn unexpected(stats: &WireStats, expected: &str, got: &HandshakeMsg) -> HandshakeError {
    WireStats::bump(&stats.frames_malformed);
    HandshakeError::Malformed(format!("expected {expected}, got {}", got.kind()))
}

/// Run the client side of the handshake on an established stream.
/// Does not apply the timeout (the caller does).
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, WireCodec>,
    cfg: &WireConfig,
    addr: SocketAddr,
    stats: &WireStats,
    offer: Offer,
    cert: Option<orrery_trust::PeerIdentity>,
) -> Result<PeerInfo, HandshakeError> {
    let hello = ClientHello {
        magic: offer.magic,
        protocol_min: offer.min,
        protocol_max: offer.max,
        cluster_id: cfg.cluster_id.clone(),
        node_id: cfg.node_id,
        epoch: cfg.epoch,
        nonce: nonce(),
    };
    send(framed, &HandshakeMsg::ClientHello(hello.clone())).await?;

    let anon = format!("peer at {addr}");
    let server = match recv(framed, stats).await? {
        HandshakeMsg::ServerHello(s) => s,
        HandshakeMsg::Reject { reason } => {
            return Err(match reason {
                RejectReason::UnknownCluster { ours } => HandshakeError::UnknownCluster {
                    ours: cfg.cluster_id.clone(),
                    theirs: ours,
                },
                RejectReason::UnsupportedProtocol { min, max } => {
                    HandshakeError::UnsupportedProtocol {
                        ours: (offer.min, offer.max),
                        theirs: (min, max),
                    }
                }
                reason => HandshakeError::RejectedByPeer { peer: anon, reason },
            })
        }
        other => return Err(unexpected(stats, "ServerHello", &other)),
    };
    let peer_name = format!("node {} at {addr}", server.node_id);
    if let Err(e) = same_node(cert.as_ref(), server.node_id, addr, stats) {
        reject(framed, e.1).await;
        return Err(e.0);
    }
    if server.cluster_id != cfg.cluster_id {
        reject(
            framed,
            RejectReason::UnknownCluster {
                ours: cfg.cluster_id.clone(),
            },
        )
        .await;
        return Err(HandshakeError::UnknownCluster {
            ours: cfg.cluster_id.clone(),
            theirs: server.cluster_id,
        });
    }
    if server.protocol_version < offer.min || server.protocol_version > offer.max {
        reject(
            framed,
            RejectReason::UnsupportedProtocol {
                min: offer.min,
                max: offer.max,
            },
        )
        .await;
        return Err(HandshakeError::UnsupportedProtocol {
            ours: (offer.min, offer.max),
            theirs: (server.protocol_version, server.protocol_version),
        });
    }

    let hmac = prove(&cfg.secret, ROLE_CLIENT, &hello, &server);
    send(framed, &HandshakeMsg::ClientProof { hmac }).await?;

    match recv(framed, stats).await? {
        HandshakeMsg::ServerProof { hmac } => {
            if !verify(&cfg.secret, ROLE_SERVER, &hello, &server, &hmac) {
                WireStats::bump(&stats.handshakes_refused_wrong_secret);
                tracing::warn!(target: LOG_TARGET, "{peer_name} could not prove the cluster secret");
                return Err(HandshakeError::WrongSecret { peer: peer_name });
            }
        }
        HandshakeMsg::Reject { reason } => {
            return Err(HandshakeError::RejectedByPeer {
                peer: peer_name,
                reason,
            })
        }
        other => return Err(unexpected(stats, "ServerProof", &other)),
    }
    Ok(PeerInfo {
        node_id: server.node_id,
        epoch: server.epoch,
        addr,
        protocol_version: server.protocol_version,
        cert,
    })
}

/// Under TLS the hello must announce the node the certificate names: a
/// peer speaks only as itself.
fn same_node(
    cert: Option<&orrery_trust::PeerIdentity>,
    announced: u64,
    addr: SocketAddr,
    stats: &WireStats,
) -> Result<(), (HandshakeError, RejectReason)> {
    match cert {
        Some(c) if c.node_id != announced => {
            WireStats::bump(&stats.handshakes_refused_identity);
            let (certificate, peer) = (c.node_id, format!("peer at {addr}"));
            tracing::warn!(target: LOG_TARGET, "refused {peer}: its certificate names node {certificate}, it announced node {announced}");
            Err((
                HandshakeError::IdentityMismatch {
                    peer,
                    certificate,
                    announced,
                },
                RejectReason::IdentityMismatch {
                    certificate,
                    announced,
                },
            ))
        }
        _ => Ok(()),
    }
}

/// Run the server side of the handshake on an accepted stream. `admit` is consulted
/// after the client has proven the secret and before the server proves it.
/// Does not apply the timeout (the caller does).
pub(crate) async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, WireCodec>,
    cfg: &WireConfig,
    addr: SocketAddr,
    stats: &WireStats,
    cert: Option<orrery_trust::PeerIdentity>,
    admit: impl FnOnce(&PeerInfo) -> Result<(), AdmitError>,
) -> Result<PeerInfo, HandshakeError> {
    let client = match recv(framed, stats).await? {
        HandshakeMsg::ClientHello(c) => c,
        other => {
            let err = unexpected(stats, "ClientHello", &other);
            reject(framed, RejectReason::Malformed(err.to_string())).await;
            return Err(err);
        }
    };
    if client.magic != MAGIC {
        reject(framed, RejectReason::BadMagic).await;
        return Err(HandshakeError::Malformed(format!(
            "bad magic {:?}",
            client.magic
        )));
    }
    if client.cluster_id != cfg.cluster_id {
        reject(
            framed,
            RejectReason::UnknownCluster {
                ours: cfg.cluster_id.clone(),
            },
        )
        .await;
        return Err(HandshakeError::UnknownCluster {
            ours: cfg.cluster_id.clone(),
            theirs: client.cluster_id,
        });
    }
    if let Err(e) = same_node(cert.as_ref(), client.node_id, addr, stats) {
        reject(framed, e.1).await;
        return Err(e.0);
    }
    let lo = client.protocol_min.max(PROTOCOL_MIN);
    let hi = client.protocol_max.min(PROTOCOL_MAX);
    if lo > hi {
        reject(
            framed,
            RejectReason::UnsupportedProtocol {
                min: PROTOCOL_MIN,
                max: PROTOCOL_MAX,
            },
        )
        .await;
        return Err(HandshakeError::UnsupportedProtocol {
            ours: (PROTOCOL_MIN, PROTOCOL_MAX),
            theirs: (client.protocol_min, client.protocol_max),
        });
    }
    let server = ServerHello {
        protocol_version: hi,
        cluster_id: cfg.cluster_id.clone(),
        node_id: cfg.node_id,
        epoch: cfg.epoch,
        nonce: nonce(),
    };
    send(framed, &HandshakeMsg::ServerHello(server.clone())).await?;

    let peer_name = format!("node {} at {addr}", client.node_id);
    match recv(framed, stats).await? {
        HandshakeMsg::ClientProof { hmac } => {
            if !verify(&cfg.secret, ROLE_CLIENT, &client, &server, &hmac) {
                WireStats::bump(&stats.handshakes_refused_wrong_secret);
                tracing::warn!(target: LOG_TARGET, "refused {peer_name}: wrong cluster secret");
                reject(framed, RejectReason::WrongSecret).await;
                return Err(HandshakeError::WrongSecret { peer: peer_name });
            }
        }
        HandshakeMsg::Reject { reason } => {
            return Err(HandshakeError::RejectedByPeer {
                peer: peer_name,
                reason,
            })
        }
        other => {
            let err = unexpected(stats, "ClientProof", &other);
            reject(framed, RejectReason::Malformed(err.to_string())).await;
            return Err(err);
        }
    }
    let peer = PeerInfo {
        node_id: client.node_id,
        epoch: client.epoch,
        addr,
        protocol_version: server.protocol_version,
        cert,
    };
    if let Err(refused) = admit(&peer) {
        let (why, reason) = match refused {
            AdmitError::Fenced(r) => (RejectReason::Fenced(r.clone()), r),
            AdmitError::Refused(r) => (RejectReason::NotAdmitted(r.clone()), r),
        };
        reject(framed, why).await;
        return Err(HandshakeError::NotAdmitted {
            peer: peer_name,
            reason,
        });
    }
    let hmac = prove(&cfg.secret, ROLE_SERVER, &client, &server);
    send(framed, &HandshakeMsg::ServerProof { hmac }).await?;
    Ok(peer)
}
