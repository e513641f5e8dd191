//! [`TrustConfig`]: one node's TLS configuration, server and client side, and the two
//! calls the wire layer makes on a fresh connection ([`TrustConfig::accept`],
//! [`TrustConfig::connect`]).
//!
//! Both sides: TLS 1.3 only, `ring` provider, ALPN [`ALPN_PROTOCOL`], the node presents
//! its own certificate and requires the peer's, both chained to the cluster CA and
//! checked by [`crate::verify`] (identity, revocation) at every handshake.
//! **Session resumption is off** on both sides (no tickets, no session cache, no 0-RTT):
//! a resumed TLS 1.3 session skips certificate verification, so a revoked node could
//! otherwise come back on an old ticket.
//!
//! **Bounds.** rustls caps a handshake message at 64 KiB; a peer chain longer than one
//! leaf + [`crate::MAX_PEER_INTERMEDIATES`] and a certificate over
//! [`crate::MAX_CERT_BYTES`] are refused before they are parsed. The *time* a handshake
//! may take is the caller's: wrap `accept`/`connect` in `tokio::time::timeout` (the wire
//! layer's connect timeout must include the TLS handshake; the accept side needs its own,
//! or a peer that stalls mid-handshake holds the task).
//!
//! **TLS 1.3 and client refusal.** The client finishes its half of the handshake before
//! the server has checked the client's certificate: `connect` can return `Ok` on a
//! connection the server then refuses. The client learns it at its first read
//! (an alert, [`HandshakeError::RefusedByPeer`] through [`HandshakeError::from_io`]). A
//! protocol on top should therefore have the server speak first (orrery's wire
//! handshake does), or treat the first read's error as a connect failure.

use crate::ca::NodeCredentials;
use crate::error::TrustError;
use crate::identity::{IdentityError, PeerIdentity};
use crate::names::{self, ClusterId};
use crate::revocation::Revocations;
use crate::verify::{self, NodeClientVerifier, NodeServerVerifier, Refusal};
use orrery_core::NodeId;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{AlertDescription, ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// The ALPN protocol id of orrery's node-to-node protocol (both sides require it, so
/// another TLS service's connection cannot be mistaken for a node's).
pub const ALPN_PROTOCOL: &[u8] = b"orrery/1";

/// A node's TLS configuration: built once at start, shared by every connection.
#[derive(Clone, Debug)]
pub struct TrustConfig {
    own: PeerIdentity,
    revocations: Revocations,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Why a handshake (or the first read after it) failed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// This side refused the peer's certificate.
    #[error("refused the peer: {0}")]
    Refused(Refusal),
    /// The peer refused this side (its alert: `certificate_unknown` for an unknown CA or a
    /// revoked or foreign certificate, `certificate_required` for none, ...).
    #[error("the peer refused the handshake: {0:?}")]
    RefusedByPeer(AlertDescription),
    /// Any other TLS failure (protocol, ALPN, decryption).
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// The transport failed (reset, EOF mid-handshake).
    #[error("I/O: {0}")]
    Io(io::Error),
    /// The handshake passed but the peer's certificate does not give an identity
    /// (defensive: the verifiers already checked it).
    #[error("peer identity: {0}")]
    Identity(IdentityError),
    /// The server is not the node dialled (defensive: the name check already ran).
    #[error("dialled node {expected}, the certificate names node {found}")]
    WrongNode {
        /// Dialled.
        expected: NodeId,
        /// Named by the certificate.
        found: NodeId,
    },
}

impl HandshakeError {
    /// Classifies an `io::Error` from `tokio_rustls` (handshake, or any later read or
    /// write on the stream).
    pub fn from_io(err: io::Error) -> Self {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return HandshakeError::Io(err);
        };
        if let Some(refusal) = verify::refusal_of(tls) {
            return HandshakeError::Refused(refusal);
        }
        match tls {
            rustls::Error::AlertReceived(alert) => HandshakeError::RefusedByPeer(*alert),
            other => HandshakeError::Tls(other.clone()),
        }
    }

    /// This side's reason for refusing the peer, if that is what happened.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            HandshakeError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

fn creds_der(
    creds: &NodeCredentials,
) -> Result<
    (
        CertificateDer<'static>,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ),
    TrustError,
> {
    let pem_err = |what: &str, e: rustls::pki_types::pem::Error| TrustError::Pem {
        path: what.into(),
        reason: e.to_string(),
    };
    let ca = CertificateDer::from_pem_slice(creds.ca_cert_pem().as_bytes())
        .map_err(|e| pem_err("<CA certificate>", e))?;
    let cert = CertificateDer::from_pem_slice(creds.cert_pem().as_bytes())
        .map_err(|e| pem_err("<node certificate>", e))?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem().as_bytes())
        .map_err(|e| pem_err("<node key>", e))?;
    Ok((ca, cert, key))
}

impl TrustConfig {
    /// Builds the server and client configurations for the node `creds` names, trusting
    /// only `creds`' CA and consulting `revocations` at every handshake.
    pub fn new(creds: &NodeCredentials, revocations: Revocations) -> Result<Self, TrustError> {
        let (ca, cert, key) = creds_der(creds)?;
        let own = creds.identity().clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let (client_v, server_v) = verify::webpki_verifiers(Arc::new(roots), &provider)?;
        let cluster = own.cluster_id.clone();
        let client_verifier =
            NodeClientVerifier::new(client_v, cluster.clone(), revocations.clone());
        let server_verifier = NodeServerVerifier::new(server_v, cluster, revocations.clone());

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_single_cert(vec![cert.clone()], key.clone_key())?;
        server.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        server.max_early_data_size = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(server_verifier))
            .with_client_auth_cert(vec![cert], key)?;
        client.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        client.resumption = Resumption::disabled();
        client.enable_early_data = false;

        Ok(TrustConfig {
            own,
            revocations,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// [`NodeCredentials::load`] + [`TrustConfig::new`].
    pub fn load(dir: &Path, revocations: Revocations) -> Result<Self, TrustError> {
        TrustConfig::new(&NodeCredentials::load(dir)?, revocations)
    }

    /// This node, as its own certificate names it.
    pub fn identity(&self) -> &PeerIdentity {
        &self.own
    }

    /// The cluster.
    pub fn cluster_id(&self) -> &ClusterId {
        &self.own.cluster_id
    }

    /// The revocation list the verifiers consult (shared: update it through this).
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// The rustls server configuration (TLS 1.3, mandatory client certificates).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The rustls client configuration (TLS 1.3, presents this node's certificate).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// A `tokio_rustls` acceptor over [`server_config`](Self::server_config).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// A `tokio_rustls` connector over [`client_config`](Self::client_config).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }

    /// The server name to dial `node` under.
    pub fn server_name(&self, node: NodeId) -> ServerName<'static> {
        names::server_name(&self.own.cluster_id, node)
    }

    /// The identity of a finished handshake's peer (`stream.get_ref().1`).
    pub fn peer_identity(&self, conn: &rustls::CommonState) -> Result<PeerIdentity, IdentityError> {
        PeerIdentity::from_connection(conn, &self.own.cluster_id)
    }

    /// Server side of a new connection: the TLS handshake, then the peer's identity.
    /// Not bounded in time: wrap it in a timeout.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(server::TlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self
            .acceptor()
            .accept(io)
            .await
            .map_err(HandshakeError::from_io)?;
        let peer = self
            .peer_identity(stream.get_ref().1)
            .map_err(HandshakeError::Identity)?;
        Ok((stream, peer))
    }

    /// Client side: dials `node` (its certificate must name it), then the peer's
    /// identity. Not bounded in time: wrap it in the connect timeout. See the module
    /// docs: a refusal of *our* certificate shows at the first read.
    pub async fn connect<IO>(
        &self,
        io: IO,
        node: NodeId,
    ) -> Result<(client::TlsStream<IO>, PeerIdentity), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self
            .connector()
            .connect(self.server_name(node), io)
            .await
            .map_err(HandshakeError::from_io)?;
        let peer = self
            .peer_identity(stream.get_ref().1)
            .map_err(HandshakeError::Identity)?;
        if peer.node_id != node {
            return Err(HandshakeError::WrongNode {
                expected: node,
                found: peer.node_id,
            });
        }
        Ok((stream, peer))
    }
}
