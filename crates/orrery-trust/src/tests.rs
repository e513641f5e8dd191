//! Certificates signed by our own CA that it would never issue (another cluster's
//! identity, no SAN, mismatched names, ...): refused by [`PeerIdentity`], at load, and
//! in a real handshake in both directions.

use crate::names::ClusterId;
use crate::{
    ClusterCa, HandshakeError, IdentityError, NodeCredentials, PeerIdentity, Refusal, Revocations,
    TrustConfig, TrustError, ALPN_PROTOCOL,
};
use orrery_core::Role;
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn params(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.serial_number = Some(SerialNumber::from(1000u64));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = sans;
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn identity_of(ca: &ClusterCa, sans: Vec<SanType>) -> Result<PeerIdentity, IdentityError> {
    let (cert, _) = ca.sign_raw(&params(sans)).unwrap();
    PeerIdentity::from_der(&der_of(&cert), ca.cluster_id())
}

#[test]
fn forged_identities_are_refused_by_peer_identity() {
    let ca = ClusterCa::init("alpha").unwrap();
    let ok = identity_of(
        &ca,
        vec![
            uri("urn:orrery:alpha:node:5:voter"),
            dns("node-5.alpha.orrery"),
        ],
    );
    assert_eq!(ok.unwrap().serial, 1000);
    type Expect = fn(&IdentityError) -> bool;
    let cases: Vec<(Vec<SanType>, Expect)> = vec![
        (vec![], |e| matches!(e, IdentityError::NoSan)),
        (vec![dns("node-5.alpha.orrery")], |e| {
            matches!(e, IdentityError::NoIdentity)
        }),
        (
            vec![
                uri("urn:orrery:beta:node:5:voter"),
                dns("node-5.alpha.orrery"),
            ],
            |e| matches!(e, IdentityError::OtherCluster { found, .. } if found == "beta"),
        ),
        (
            vec![
                uri("urn:orrery:alpha:node:5:voter"),
                dns("node-6.alpha.orrery"),
            ],
            |e| matches!(e, IdentityError::DnsNameMismatch { .. }),
        ),
        (vec![uri("urn:orrery:alpha:node:5:voter")], |e| {
            matches!(e, IdentityError::DnsNameMismatch { .. })
        }),
        (
            vec![
                uri("urn:orrery:alpha:node:5:king"),
                dns("node-5.alpha.orrery"),
            ],
            |e| matches!(e, IdentityError::UnknownRole(r) if r == "king"),
        ),
        (
            vec![
                uri("urn:orrery:alpha:node:five:voter"),
                dns("node-5.alpha.orrery"),
            ],
            |e| matches!(e, IdentityError::MalformedNodeId(_)),
        ),
        (
            vec![
                uri("urn:orrery:alpha:node:5:voter"),
                uri("urn:orrery:alpha:node:6:voter"),
            ],
            |e| matches!(e, IdentityError::AmbiguousIdentity),
        ),
        (
            vec![
                uri("urn:orrery:alpha:node:5:voter"),
                dns("node-5.alpha.orrery"),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            |e| matches!(e, IdentityError::UnexpectedSan(_)),
        ),
    ];
    for (sans, expect) in cases {
        let what = format!("{sans:?}");
        let err = identity_of(&ca, sans).unwrap_err();
        assert!(expect(&err), "{what}: {err}");
    }
    // A CA certificate is not a node certificate.
    let ca_der = ca.cert_der().clone();
    assert_eq!(
        PeerIdentity::from_der(&ca_der, ca.cluster_id()),
        Err(IdentityError::IsCa)
    );
}

/// A certificate of our CA whose SAN names another cluster ("beta") but whose DNS name
/// is a node of ours, as a buggy or misused issuer could produce.
fn forged_beta(
    ca: &ClusterCa,
    node: u64,
) -> (
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
    String,
    String,
) {
    let sans = vec![
        uri(&format!("urn:orrery:beta:node:{node}:voter")),
        dns(&format!("node-{node}.alpha.orrery")),
    ];
    let (cert, key) = ca.sign_raw(&params(sans)).unwrap();
    let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    (der_of(&cert), key_der, cert, key)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &ClusterCa) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    roots
}

#[tokio::test]
async fn a_forged_cluster_in_a_client_certificate_is_refused_by_the_server() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let (cert, key, cert_pem, key_pem) = forged_beta(&ca, 9);
    let load = NodeCredentials::from_pem(ca.cert_pem(), &cert_pem, &key_pem).unwrap_err();
    assert!(
        matches!(
            load,
            TrustError::Identity(IdentityError::OtherCluster { .. })
        ),
        "{load}"
    );

    let server = TrustConfig::new(
        &ca.issue_next(1, Role::Voter).unwrap(),
        Revocations::default(),
    )
    .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&ca))
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    let (c, s) = tokio::io::duplex(64 * 1024);
    let client = async {
        let mut stream = TlsConnector::from(Arc::new(cfg))
            .connect(server.server_name(1), c)
            .await?;
        stream.read_u8().await
    };
    let both = async { tokio::join!(client, server.accept(s)) };
    let (c, s) = tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .unwrap();
    let err = s.unwrap_err();
    assert!(
        matches!(
            err.refusal(),
            Some(Refusal::Identity(IdentityError::OtherCluster { .. }))
        ),
        "{err}"
    );
    assert!(c.is_err());
}

#[tokio::test]
async fn a_forged_cluster_in_a_server_certificate_is_refused_by_the_client() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let (cert, key, _, _) = forged_beta(&ca, 1);
    let client = TrustConfig::new(
        &ca.issue_next(2, Role::Voter).unwrap(),
        Revocations::default(),
    )
    .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&ca)),
        provider(),
    )
    .build()
    .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = async {
        let mut stream = TlsAcceptor::from(Arc::new(cfg)).accept(s).await?;
        stream.write_all(b"ok").await
    };
    let both = async { tokio::join!(client.connect(c, 1), server) };
    let (c, _) = tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .unwrap();
    let err: HandshakeError = c.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err.refusal(),
            Some(Refusal::Identity(IdentityError::OtherCluster { .. }))
        ),
        "{err}"
    );
}

#[test]
fn cluster_ids_are_checked_before_any_certificate_is_made() {
    assert!(ClusterId::new("alpha").is_ok());
    assert!(matches!(
        ClusterCa::init(""),
        Err(TrustError::InvalidClusterId(_))
    ));
}
