//! Real TLS 1.3 handshakes (tokio-rustls over in-memory pipes and 127.0.0.1 sockets)
//! between nodes of one CA, of two CAs, without certificates, after revocation.

use orrery_core::{NodeId, Role};
use orrery_trust::rustls::pki_types::pem::PemObject;
use orrery_trust::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use orrery_trust::rustls::{self, AlertDescription, CertificateError, ClientConfig, RootCertStore};
use orrery_trust::tokio_rustls::TlsConnector;
use orrery_trust::{
    ClusterCa, HandshakeError, NodeCredentials, PeerIdentity, Refusal, Revocations, Revoked,
    TrustConfig, ALPN_PROTOCOL,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// Generous: a handshake takes milliseconds; this only turns a hang into a failure.
const LIMIT: Duration = Duration::from_secs(20);

type Side = Result<PeerIdentity, HandshakeError>;

fn node(ca: &mut ClusterCa, id: NodeId, role: Role, rev: &Revocations) -> TrustConfig {
    TrustConfig::new(&ca.issue_next(id, role).unwrap(), rev.clone()).unwrap()
}

/// Client side of a connection: after the handshake, read the server's "ok" (TLS 1.3
/// tells a client its certificate was refused only at its first read).
async fn client_side<IO>(client: &TrustConfig, io: IO, dial: NodeId) -> Side
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut stream, peer) = client.connect(io, dial).await?;
    let mut buf = [0u8; 2];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(HandshakeError::from_io)?;
    assert_eq!(&buf, b"ok");
    Ok(peer)
}

/// Server side: accept, then say "ok".
async fn server_side<IO>(server: &TrustConfig, io: IO) -> Side
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut stream, peer) = server.accept(io).await?;
    stream
        .write_all(b"ok")
        .await
        .map_err(HandshakeError::from_io)?;
    stream.flush().await.map_err(HandshakeError::from_io)?;
    Ok(peer)
}

/// One connection over an in-memory pipe: (client's view, server's view).
async fn handshake(client: &TrustConfig, server: &TrustConfig, dial: NodeId) -> (Side, Side) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let both = async { tokio::join!(client_side(client, c, dial), server_side(server, s)) };
    timeout(LIMIT, both).await.expect("handshake hung")
}

fn refused_by_peer(side: &Side) -> bool {
    // The peer's alert, or (if it hung up before its alert got through) the pipe closing.
    matches!(
        side,
        Err(HandshakeError::RefusedByPeer(_)) | Err(HandshakeError::Io(_))
    )
}

#[tokio::test]
async fn two_nodes_of_one_ca_learn_each_others_identity() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let rev = Revocations::default();
    let voter = node(&mut ca, 1, Role::Voter, &rev);
    let worker = node(&mut ca, 2, Role::Worker, &rev);
    let (at_client, at_server) = handshake(&worker, &voter, 1).await;
    assert_eq!(&at_client.unwrap(), voter.identity());
    assert_eq!(&at_server.unwrap(), worker.identity());
    let seen = voter.identity();
    assert_eq!(
        (seen.cluster_id.as_str(), seen.node_id, seen.role),
        ("alpha", 1, Role::Voter)
    );
    assert_eq!(worker.identity().role, Role::Worker);
    assert!(voter.identity().serial < worker.identity().serial);
}

#[tokio::test]
async fn nodes_connect_over_loopback_tcp() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let rev = Revocations::default();
    let arbiter = node(&mut ca, 3, Role::Arbiter, &rev);
    let voter = node(&mut ca, 4, Role::Voter, &rev);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = async {
        let (sock, _) = listener.accept().await.unwrap();
        server_side(&arbiter, sock).await
    };
    let client = async {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        client_side(&voter, sock, 3).await
    };
    let (c, s) = timeout(LIMIT, async { tokio::join!(client, server) })
        .await
        .unwrap();
    assert_eq!(&c.unwrap(), arbiter.identity());
    assert_eq!(&s.unwrap(), voter.identity());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let server = node(&mut ca, 1, Role::Voter, &Revocations::default());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    let (c, s) = tokio::io::duplex(64 * 1024);
    let client = async {
        let mut stream = TlsConnector::from(Arc::new(cfg))
            .connect(server.server_name(1), c)
            .await
            .map_err(HandshakeError::from_io)?;
        let mut buf = [0u8; 2];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(HandshakeError::from_io)?;
        Ok::<(), HandshakeError>(())
    };
    let (c, s) = timeout(LIMIT, async {
        tokio::join!(client, server_side(&server, s))
    })
    .await
    .unwrap();
    let err = s.unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::NoCertificate), "{err}");
    match c {
        Err(HandshakeError::RefusedByPeer(alert)) => {
            assert_eq!(alert, AlertDescription::CertificateRequired)
        }
        other => panic!("client should see the refusal, got {other:?}"),
    }
}

fn is_unknown_issuer(side: &Side) -> bool {
    matches!(
        side.as_ref().map_err(|e| e.refusal()),
        Err(Some(Refusal::Certificate(CertificateError::UnknownIssuer)))
            | Err(Some(Refusal::Certificate(CertificateError::BadSignature)))
    )
}

/// A client that trusts `ca` (so it accepts our server) but presents `creds`.
fn client_trusting(ca: &ClusterCa, creds: &NodeCredentials) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let cert = CertificateDer::from_pem_slice(creds.cert_pem().as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem().as_bytes()).unwrap();
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
    cfg.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

#[tokio::test]
async fn another_clusters_ca_is_refused_in_both_directions() {
    let mut alpha = ClusterCa::init("alpha").unwrap();
    let rev = Revocations::default();
    let ours = node(&mut alpha, 1, Role::Voter, &rev);
    let mut beta = ClusterCa::init("beta").unwrap();
    // A CA with our very cluster id but another key is just as foreign.
    let mut alpha_twin = ClusterCa::init("alpha").unwrap();
    let foreign = [
        beta.issue_next(2, Role::Voter).unwrap(),
        alpha_twin.issue_next(2, Role::Voter).unwrap(),
    ];
    for creds in &foreign {
        // Their client certificate, from a client that accepts our server: our server refuses.
        let (c, s) = tokio::io::duplex(64 * 1024);
        let client = async {
            let mut stream = client_trusting(&alpha, creds)
                .connect(ours.server_name(1), c)
                .await?;
            stream.read_u8().await
        };
        let (c, s) = timeout(LIMIT, async { tokio::join!(client, server_side(&ours, s)) })
            .await
            .unwrap();
        assert!(is_unknown_issuer(&s), "server: {s:?}");
        assert!(c.is_err());
        // A node of theirs dials us, or we dial them: refused (the client refuses first).
        let theirs = TrustConfig::new(creds, rev.clone()).unwrap();
        let (c, s) = handshake(&theirs, &ours, 1).await;
        assert!(is_unknown_issuer(&c) && refused_by_peer(&s), "{c:?} {s:?}");
        let (c, s) = handshake(&ours, &theirs, 2).await;
        assert!(is_unknown_issuer(&c) && refused_by_peer(&s), "{c:?} {s:?}");
    }
}

#[tokio::test]
async fn dialling_a_node_other_than_the_certificate_names_is_refused() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let rev = Revocations::default();
    let one = node(&mut ca, 1, Role::Voter, &rev);
    let two = node(&mut ca, 2, Role::Voter, &rev);
    let (c, _) = handshake(&one, &two, 3).await;
    let err = c.unwrap_err();
    assert!(
        matches!(
            err.refusal(),
            Some(Refusal::Certificate(
                CertificateError::NotValidForNameContext { .. }
            ))
        ) || matches!(
            err.refusal(),
            Some(Refusal::Certificate(CertificateError::NotValidForName))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_at_the_next_handshake_and_a_newer_one_accepted() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let server_rev = Revocations::default();
    let client_rev = Revocations::default();
    let server = node(&mut ca, 1, Role::Voter, &server_rev);
    let client = node(&mut ca, 2, Role::Worker, &client_rev);
    let (c, s) = handshake(&client, &server, 1).await;
    assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");

    // Node 2 is removed: the cluster raises its minimum serial past its certificate.
    let old = client.identity().serial;
    server_rev.raise_min_serial(2, old + 1);
    let (c, s) = handshake(&client, &server, 1).await;
    let want = Revoked::Superseded {
        node: 2,
        serial: old,
        min: old + 1,
    };
    assert_eq!(s.unwrap_err().refusal(), Some(&Refusal::Revoked(want)));
    assert!(
        matches!(
            c,
            Err(HandshakeError::RefusedByPeer(
                AlertDescription::CertificateUnknown
            ))
        ),
        "{c:?}"
    );

    // Readmitted with a newly issued certificate (higher serial): accepted.
    let reissued = node(&mut ca, 2, Role::Worker, &client_rev);
    assert!(reissued.identity().serial > old);
    let (c, s) = handshake(&reissued, &server, 1).await;
    assert_eq!(&s.unwrap(), reissued.identity());
    assert!(c.is_ok());

    // The other direction: the client refuses a server whose serial it holds revoked.
    client_rev.revoke_serial(server.identity().serial);
    let (c, _) = handshake(&reissued, &server, 1).await;
    let want = Revoked::Serial {
        node: 1,
        serial: server.identity().serial,
    };
    assert_eq!(c.unwrap_err().refusal(), Some(&Refusal::Revoked(want)));
}

#[tokio::test]
async fn the_revocation_list_is_shared_by_clones_and_wakes_subscribers() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    let rev = Revocations::default();
    let server = node(&mut ca, 1, Role::Voter, &rev);
    let client = node(&mut ca, 2, Role::Voter, &Revocations::default());
    let (_, s) = handshake(&client, &server, 1).await;
    let peer = s.unwrap();
    let mut changes = server.revocations().subscribe();
    rev.revoke_serial(peer.serial);
    timeout(LIMIT, changes.changed()).await.unwrap().unwrap();
    // An established connection's peer is re-checked by the caller on such a change.
    assert!(server.revocations().check(&peer).is_err());
}

#[tokio::test]
async fn the_handshake_benchmark_runs() {
    let cost = orrery_trust::bench_handshakes(3).await.unwrap();
    assert_eq!(cost.n, 3);
    assert!(cost.p50 <= cost.p99);
}
