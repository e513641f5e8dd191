//! Mutual TLS under the wire handshake: who may connect, who a peer may
//! speak as, and what a revocation or a relay does to an open connection.
//! Real TCP on 127.0.0.1:0; every wait bounded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use orrery_core::Role;
use orrery_trust::{ClusterCa, NodeCredentials, Revocations, TrustConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::*;

const BOUND: Duration = Duration::from_secs(10);
const CALL: Duration = Duration::from_secs(5);
const CLUSTER: &str = "tls-test";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ask(u64);
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answer(u64);

/// Echoes, and records who each request came from (node id, certificate's
/// node id).
#[derive(Default)]
struct Seen(Mutex<Vec<(u64, Option<u64>, u64)>>);

impl Handler<Ask, Answer> for Seen {
    fn handle<'a>(&'a self, peer: &'a PeerInfo, req: Ask) -> BoxFuture<'a, Answer> {
        let cert = peer.cert.as_ref().map(|c| c.node_id);
        self.0.lock().unwrap().push((peer.node_id, cert, req.0));
        Box::pin(async move { Answer(req.0) })
    }
}

fn trust(creds: &NodeCredentials, revocations: &Revocations) -> TrustConfig {
    TrustConfig::new(creds, revocations.clone()).expect("trust config")
}

fn wire(node: u64, trust: Option<TrustConfig>) -> Arc<WireConfig> {
    let mut c = WireConfig::new(CLUSTER, b"tls-test-secret".to_vec(), node, 1);
    c.trust = trust;
    c.handshake_timeout = Duration::from_secs(3);
    Arc::new(c)
}

struct Endpoint {
    addr: String,
    seen: Arc<Seen>,
    stats: Arc<WireStats>,
    revocations: Revocations,
    shutdown: CancellationToken,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A server for node 100 of `ca`'s cluster.
async fn server(ca: &mut ClusterCa) -> Endpoint {
    let creds = ca.issue_next(100, Role::Voter).unwrap();
    let revocations = Revocations::default();
    let cfg = wire(100, Some(trust(&creds, &revocations)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (seen, stats, shutdown) = (
        Arc::new(Seen::default()),
        Arc::new(WireStats::new()),
        CancellationToken::new(),
    );
    tokio::spawn(serve::<Ask, Answer, _>(
        listener,
        cfg,
        seen.clone(),
        stats.clone(),
        shutdown.clone(),
    ));
    Endpoint {
        addr,
        seen,
        stats,
        revocations,
        shutdown,
    }
}

async fn dial(
    node: u64,
    cfg: Arc<WireConfig>,
    at: &Endpoint,
) -> Result<Channel<Ask, Answer>, HandshakeError> {
    connect::<Ask, Answer>(node, &at.addr, cfg, Arc::new(WireStats::new())).await
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn both_sides_learn_the_certificates_identity() {
    let mut ca = ClusterCa::init(CLUSTER).unwrap();
    let srv = server(&mut ca).await;
    let creds = ca.issue_next(7, Role::Worker).unwrap();
    let chan = dial(
        100,
        wire(7, Some(trust(&creds, &Revocations::default()))),
        &srv,
    )
    .await
    .expect("a node of the cluster connects");
    assert_eq!(chan.peer().cert.as_ref().map(|c| c.node_id), Some(100));
    assert_eq!(chan.call(Ask(5), CALL).await, Ok(Answer(5)));
    assert_eq!(*srv.seen.0.lock().unwrap(), vec![(7, Some(7), 5)]);
}

#[tokio::test]
async fn a_peer_cannot_announce_another_node_than_its_certificate_names() {
    let mut ca = ClusterCa::init(CLUSTER).unwrap();
    let srv = server(&mut ca).await;
    // A worker's certificate, a hello that says "node 1" (a voter).
    let creds = ca.issue_next(7, Role::Worker).unwrap();
    let err = dial(
        100,
        wire(1, Some(trust(&creds, &Revocations::default()))),
        &srv,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::RejectedByPeer {
                reason: RejectReason::IdentityMismatch {
                    certificate: 7,
                    announced: 1
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(srv.stats.snapshot().handshakes_refused_identity, 1);
    assert!(srv.seen.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn no_certificate_or_another_clusters_ca_is_refused() {
    let mut ca = ClusterCa::init(CLUSTER).unwrap();
    let srv = server(&mut ca).await;
    // Plain TCP (knows the secret, speaks the handshake, has no certificate).
    let err = dial(100, wire(7, None), &srv).await.unwrap_err();
    assert!(!matches!(err, HandshakeError::Timeout), "{err:?}");
    // A certificate of another CA for the same cluster name.
    let mut other = ClusterCa::init(CLUSTER).unwrap();
    let foreign = other.issue_next(7, Role::Worker).unwrap();
    let err = dial(
        100,
        wire(7, Some(trust(&foreign, &Revocations::default()))),
        &srv,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HandshakeError::Tls(_)), "{err:?}");
    let stats = srv.stats.clone();
    eventually("both refusals counted", || {
        stats.snapshot().handshakes_refused_tls >= 2
    })
    .await;
    assert!(srv.seen.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_its_open_connection_closed() {
    let mut ca = ClusterCa::init(CLUSTER).unwrap();
    let srv = server(&mut ca).await;
    let creds = ca.issue_next(7, Role::Worker).unwrap();
    let cfg = wire(7, Some(trust(&creds, &Revocations::default())));
    let chan = dial(100, cfg.clone(), &srv).await.unwrap();
    assert_eq!(chan.call(Ask(1), CALL).await, Ok(Answer(1)));
    // The cluster removes node 7 for good: serials below the next one are out.
    srv.revocations.raise_min_serial(7, creds.serial() + 1);
    tokio::time::timeout(BOUND, chan.closed())
        .await
        .expect("the open connection is closed");
    assert_eq!(srv.stats.snapshot().connections_closed_revoked, 1);
    let err = dial(100, cfg, &srv).await.unwrap_err();
    assert!(!matches!(err, HandshakeError::Timeout), "{err:?}");
    // A newly issued certificate is accepted again.
    let fresh = ca.issue_next(7, Role::Worker).unwrap();
    let chan = dial(
        100,
        wire(7, Some(trust(&fresh, &Revocations::default()))),
        &srv,
    )
    .await
    .expect("a re-issued certificate connects");
    assert_eq!(chan.call(Ask(2), CALL).await, Ok(Answer(2)));
}

/// A relay between a node and the server passes the handshake through, then
/// writes a frame of its own into the stream: TLS records are authenticated,
/// so the server closes the connection and no request runs.
#[tokio::test]
async fn a_frame_injected_by_a_relay_after_the_handshake_closes_the_connection() {
    let mut ca = ClusterCa::init(CLUSTER).unwrap();
    let srv = server(&mut ca).await;
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let upstream = srv.addr.clone();
    let inject = Arc::new(tokio::sync::Notify::new());
    let go = inject.clone();
    tokio::spawn(async move {
        let (client, _) = relay.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = cr.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => { if sw.write_all(&buf[..n]).await.is_err() { return } }
                },
                _ = go.notified() => {
                    // A length-prefixed frame, as a plain-TCP peer would send it.
                    let body = crate::frame::encode(&Envelope::<Ask, Answer>::Request {
                        id: 99,
                        timeout_ms: 1000,
                        body: Ask(666),
                    })
                    .unwrap();
                    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
                    frame.extend_from_slice(&body);
                    let _ = sw.write_all(&frame).await;
                }
            }
        }
    });
    let creds = ca.issue_next(7, Role::Worker).unwrap();
    let cfg = wire(7, Some(trust(&creds, &Revocations::default())));
    let chan = connect::<Ask, Answer>(100, &relay_addr, cfg, Arc::new(WireStats::new()))
        .await
        .expect("the relay passes the handshake through");
    assert_eq!(chan.call(Ask(1), CALL).await, Ok(Answer(1)));
    inject.notify_one();
    tokio::time::timeout(BOUND, chan.closed())
        .await
        .expect("the server closes the tampered connection");
    let seen = srv.seen.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(7, Some(7), 1)],
        "the injected request never ran"
    );
    let stats = srv.stats.clone();
    eventually("the tampered record counted as bad input", || {
        stats.snapshot().connections_closed_bad_input == 1
    })
    .await;
}
