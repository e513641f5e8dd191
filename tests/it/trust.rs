//! Only the cluster decides who a node is (issue 10): every real-process
//! cluster here runs over mutual TLS, as `orrery up` lays it out. Hostile
//! connections (no certificate, another CA's, a certificate announcing
//! another node, a relay injecting a frame after the handshake) are refused,
//! counted in `/metrics`, and change nothing; a revoked certificate locks
//! its node out until it is issued a new one.

use crate::cluster::{show, TestCluster};
use orrery::inproc::ready;
use orrery_core::{EventKind, Role};
use orrery_node::messages::{Reply, Request};
use orrery_trust::{ClusterCa, NodeCredentials, Revocations, TrustConfig};
use orrery_wire::{HandshakeError, WireConfig, WireStats};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// One sample from `/metrics` (0 if absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn metrics(c: &TestCluster, id: u64) -> String {
    ureq::get(&format!("http://{}/metrics", c.admin_addr(id)))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("metrics text")
}

/// A wire config as node `node` of `c` would have it, with `trust`.
fn wire(c: &TestCluster, node: u64, trust: Option<TrustConfig>) -> Arc<WireConfig> {
    let cfg = orrery_node::NodeConfig::load(&c.config_path(node)).expect("node config");
    let mut w = WireConfig::new(cfg.cluster_id, cfg.secret.into_bytes(), node, 0);
    w.trust = trust;
    w.handshake_timeout = Duration::from_secs(3);
    Arc::new(w)
}

fn tls_dir(c: &TestCluster, node: u64) -> std::path::PathBuf {
    c.dir.path().join(format!("node-{node}/tls"))
}

/// Dials node 1 as `cfg` says and, if that works, proposes the removal of
/// node 2 (what the hostile client in the issue did).
async fn try_remove_node_2(c: &TestCluster, cfg: Arc<WireConfig>) -> Result<Reply, HandshakeError> {
    let addr = &c.manifest.nodes[0].addr;
    let ch =
        orrery_wire::connect::<Request, Reply>(1, addr, cfg, Arc::new(WireStats::new())).await?;
    let cmd = orrery_core::Command::Remove {
        node: 2,
        epoch: 1,
        reason: "hostile".into(),
        at: 0,
    };
    Ok(ch
        .call(Request::Propose(cmd), Duration::from_secs(5))
        .await
        .unwrap_or(Reply::Error("call failed".into())))
}

struct Relay {
    addr: String,
    inject: Arc<tokio::sync::Notify>,
}

/// A TCP relay to `upstream` for one connection that, when told, writes a
/// length-prefixed frame of its own (a `Remove` proposal) towards it.
async fn tamper_relay(upstream: String) -> Relay {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let inject = Arc::new(tokio::sync::Notify::new());
    let go = inject.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let ((mut cr, mut cw), (mut sr, mut sw)) = (client.into_split(), server.into_split());
        tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
        let mut buf = vec![0u8; 16 * 1024];
        let frame = forged_remove_frame();
        loop {
            tokio::select! {
                n = cr.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if sw.write_all(&buf[..n]).await.is_err() { return },
                },
                _ = go.notified() => { let _ = sw.write_all(&frame).await; }
            }
        }
    });
    Relay { addr, inject }
}

/// What a plain-TCP peer would send to propose removing node 2.
fn forged_remove_frame() -> Vec<u8> {
    let cmd = orrery_core::Command::Remove {
        node: 2,
        epoch: 1,
        reason: "injected".into(),
        at: 0,
    };
    let env = orrery_wire::Envelope::<Request, Reply>::Request {
        id: 77,
        timeout_ms: 1000,
        body: Request::Propose(cmd),
    };
    let body = postcard::to_stdvec(&env).expect("encode");
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn connections_without_a_valid_certificate_of_their_own_are_refused_and_counted() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    let before = c.wait_for("stage 0 over TLS", T, ready);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let worker = NodeCredentials::load(&tls_dir(&c, 4)).expect("node 4's credentials");
    let own = |creds: &NodeCredentials| TrustConfig::new(creds, Revocations::default()).unwrap();
    rt.block_on(async {
        // Knows the secret, speaks the handshake, has no certificate.
        let err = try_remove_node_2(&c, wire(&c, 4, None)).await.unwrap_err();
        assert!(!matches!(err, HandshakeError::Timeout), "{err:?}");
        // A certificate from another CA for the same cluster id.
        let mut foreign_ca = ClusterCa::init(&c.manifest.cluster_id).unwrap();
        let foreign = foreign_ca.issue_next(4, Role::Worker).unwrap();
        let err = try_remove_node_2(&c, wire(&c, 4, Some(own(&foreign))))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Tls(_)), "{err:?}");
        // Node 4's real certificate, announcing itself as voter 3.
        let err = try_remove_node_2(&c, wire(&c, 3, Some(own(&worker))))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandshakeError::RejectedByPeer { .. }),
            "{err:?}"
        );
        // Node 4's certificate through a relay that injects a frame of its
        // own after the handshake: the TLS record fails to authenticate and
        // node 1 closes the connection; the injected request never runs.
        let before_bad = c
            .node_status(1)
            .expect("status")
            .wire
            .connections_closed_bad_input;
        let relay = tamper_relay(c.manifest.nodes[0].addr.clone()).await;
        let ch = orrery_wire::connect::<Request, Reply>(
            1,
            &relay.addr,
            wire(&c, 4, Some(own(&worker))),
            Arc::new(WireStats::new()),
        )
        .await
        .expect("the relay passes the handshake through");
        assert!(matches!(
            ch.call(Request::Ping, Duration::from_secs(5)).await,
            Ok(Reply::Pong)
        ));
        relay.inject.notify_one();
        tokio::time::timeout(T, ch.closed())
            .await
            .expect("node 1 closes the tampered connection");
        c.wait_node(1, "the tampered record counted", T, |st| {
            st.wire.connections_closed_bad_input > before_bad
        });
    });
    let text = metrics(&c, 1);
    assert!(
        metric(&text, "orrery_wire_handshakes_refused_tls_total") >= 2,
        "{text}"
    );
    assert!(
        metric(&text, "orrery_wire_handshakes_refused_identity_total") >= 1,
        "{text}"
    );
    // DNS rebinding: a GET addressed to another site's name is refused.
    let raw_get = |host: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(c.admin_addr(2)).expect("connect admin");
        s.set_read_timeout(Some(T)).unwrap();
        write!(
            s,
            "GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let rebound = raw_get("evil.example:80");
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    let own = raw_get(&c.admin_addr(2));
    assert!(own.starts_with("HTTP/1.1 200"), "{own}");
    assert_eq!(
        metric(&metrics(&c, 2), "orrery_admin_requests_refused_host_total"),
        1
    );
    // Nothing happened to node 2 (or anyone).
    let s = c.wait_for("still ready", T, ready);
    let decided = |s: &orrery_core::ClusterState| {
        s.events
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::NodeRemoved | EventKind::NodeSuspected | EventKind::ShardsMoved
                ) && e.index > before.applied_index
            })
            .count()
    };
    assert_eq!(decided(&s), 0, "{}", show(Some(s.clone())));
    c.stop_all();
}

#[test]
fn a_revoked_certificate_locks_its_node_out_until_a_new_one_is_issued() {
    let mut c = TestCluster::new(5, 3, |_| {});
    c.start_all();
    c.wait_for("stage 0 over TLS", T, ready);
    let serial = NodeCredentials::load(&tls_dir(&c, 5)).unwrap().serial();
    let floor = (serial + 1).to_string();
    let (ok, out, err) = c.exec(&["--nodes", "1"], &["cert", "revoke", "5", &floor]);
    assert!(ok, "{out} {err}");
    // Its connections are closed and it cannot open new ones: it loses its
    // lease, is removed, and cannot rejoin.
    let s = c.wait_for("node 5 removed", T, |s| {
        s.events
            .iter()
            .any(|e| e.kind == EventKind::NodeRemoved && e.node == Some(5))
    });
    assert!(s
        .events
        .iter()
        .any(|e| e.kind == EventKind::CertificatesRevoked && e.node == Some(5)));
    let removed_at = s.applied_index;
    // Give it several rejoin attempts' worth of time (its backoff is
    // sub-second): none may succeed while its certificate is revoked.
    c.wait_node(1, "node 5's handshakes refused", T, |st| {
        st.wire.handshakes_refused_tls >= 3
    });
    let s = c.state().expect("state");
    assert!(
        !s.events
            .iter()
            .any(|e| e.kind == EventKind::NodeJoined && e.node == Some(5) && e.index > removed_at),
        "{}",
        show(Some(s.clone()))
    );
    // Issued a new certificate, it comes back under a new epoch.
    c.stop(5);
    orrery::ca::issue(
        &orrery::local::Manifest::ca_path(c.dir.path()),
        5,
        Role::Worker,
        &tls_dir(&c, 5),
    )
    .expect("issue node 5 a new certificate");
    c.start(5);
    c.wait_for("node 5 back at stage 0", T, |s| {
        ready(s)
            && s.events.iter().any(|e| {
                e.kind == EventKind::NodeJoined && e.node == Some(5) && e.index > removed_at
            })
    });
    c.stop_all();
}
