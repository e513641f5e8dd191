//! The certificate verifiers: rustls' WebPki verifiers (chain to the cluster CA,
//! signatures, validity, key usage, server name) wrapped with orrery's checks, in this
//! order, at every handshake on both sides:
//! 1. the chain is short ([`MAX_PEER_INTERMEDIATES`]), before any parsing;
//! 2. the WebPki verifier accepts it (so nothing below reads an unsigned certificate);
//! 3. it names an orrery node of our cluster ([`PeerIdentity::from_der`]);
//! 4. it is not revoked ([`Revocations::check`]), read at this very handshake.
//!
//! A refusal from steps 1, 3 and 4 travels inside rustls' error as a [`Refusal`]
//! (`CertificateError::Other`), so the side that refused can name the reason
//! ([`crate::HandshakeError::Refused`]); the other side sees a `certificate_unknown` alert.

use crate::identity::{IdentityError, PeerIdentity};
use crate::names::ClusterId;
use crate::revocation::{Revocations, Revoked};
use crate::MAX_PEER_INTERMEDIATES;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use std::sync::Arc;
use thiserror::Error;

/// Why this side refused the peer's certificate.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum Refusal {
    /// The peer presented no certificate (client authentication is mandatory).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The chain is longer than orrery ever sends.
    #[error("the peer sent {intermediates} intermediate certificates, at most {max} are accepted")]
    ChainTooLong {
        /// Intermediates sent.
        intermediates: usize,
        /// The bound.
        max: usize,
    },
    /// rustls/webpki refused the certificate: not issued by this cluster's CA (another
    /// cluster's CA: `UnknownIssuer`, `BadSignature`), not valid for the node dialled
    /// (`NotValidForName`), expired, wrong key usage, ...
    #[error("certificate not accepted by the cluster CA: {0}")]
    Certificate(CertificateError),
    /// Signed by our CA but not naming a node of our cluster.
    #[error("certificate names no node of this cluster: {0}")]
    Identity(IdentityError),
    /// A valid certificate of a node, revoked by the cluster.
    #[error("certificate revoked: {0}")]
    Revoked(Revoked),
}

impl Refusal {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The orrery checks after WebPki accepted the chain.
#[derive(Debug)]
struct NodeChecks {
    cluster: ClusterId,
    revocations: Revocations,
}

impl NodeChecks {
    fn chain_len(&self, intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        if intermediates.len() > MAX_PEER_INTERMEDIATES {
            return Err(Refusal::ChainTooLong {
                intermediates: intermediates.len(),
                max: MAX_PEER_INTERMEDIATES,
            }
            .into_rustls());
        }
        Ok(())
    }

    fn identity(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = PeerIdentity::from_der(end_entity, &self.cluster)
            .map_err(|e| Refusal::Identity(e).into_rustls())?;
        self.revocations
            .check(&id)
            .map_err(|r| Refusal::Revoked(r).into_rustls())
    }
}

/// Verifies a connecting client: WebPki client verifier + [`NodeChecks`].
#[derive(Debug)]
pub(crate) struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    checks: NodeChecks,
}

impl NodeClientVerifier {
    pub(crate) fn new(
        inner: Arc<dyn ClientCertVerifier>,
        cluster: ClusterId,
        revocations: Revocations,
    ) -> Self {
        NodeClientVerifier {
            inner,
            checks: NodeChecks {
                cluster,
                revocations,
            },
        }
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.checks.chain_len(intermediates)?;
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.checks.identity(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies the server a client dialled: WebPki server verifier (which also checks the
/// certificate is valid for `node-<id>.<cluster>.orrery`, the node dialled) +
/// [`NodeChecks`].
#[derive(Debug)]
pub(crate) struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    checks: NodeChecks,
}

impl NodeServerVerifier {
    pub(crate) fn new(
        inner: Arc<WebPkiServerVerifier>,
        cluster: ClusterId,
        revocations: Revocations,
    ) -> Self {
        NodeServerVerifier {
            inner,
            checks: NodeChecks {
                cluster,
                revocations,
            },
        }
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.checks.chain_len(intermediates)?;
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.checks.identity(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Turns rustls' error for a refused certificate back into a [`Refusal`].
pub(crate) fn refusal_of(err: &rustls::Error) -> Option<Refusal> {
    match err {
        rustls::Error::NoCertificatesPresented => Some(Refusal::NoCertificate),
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            match inner.downcast_ref::<Refusal>() {
                Some(r) => Some(r.clone()),
                None => Some(Refusal::Certificate(CertificateError::Other(OtherError(
                    inner.clone(),
                )))),
            }
        }
        rustls::Error::InvalidCertificate(e) => Some(Refusal::Certificate(e.clone())),
        _ => None,
    }
}

/// The WebPki verifiers need the roots; kept here so config.rs reads as configuration.
pub(crate) fn webpki_verifiers(
    roots: Arc<rustls::RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<
    (Arc<dyn ClientCertVerifier>, Arc<WebPkiServerVerifier>),
    rustls::server::VerifierBuilderError,
> {
    let client =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    Ok((client, server))
}
