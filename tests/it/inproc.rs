//! The node code itself (orrery-node, real openraft and redb) in an
//! in-process simulated network: 20 nodes, with loss and delay, an isolated
//! node and a crashed coordinator; hostile peers (issue 10) on 5 nodes.

use crate::cluster::{events, show, SERIAL};
use orrery::inproc::{ready, InProcCluster};
use orrery::local::Plan;
use orrery_core::{EventKind, MemberStatus, NodeId, Stage};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A cluster of `nodes` (3 voters) started on the in-process network, and
/// the state that first showed it at stage 0.
async fn ready_cluster(
    dir: &std::path::Path,
    nodes: u64,
    seed: u64,
) -> (InProcCluster, orrery_core::ClusterState) {
    let mut c = InProcCluster::plan(&Plan::new(nodes, 3, dir), seed).expect("plan");
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    (c, s)
}

fn cluster(dir: &std::path::Path, deadline_ms: u64) -> InProcCluster {
    let mut plan = Plan::new(20, 3, dir);
    plan.stage_deadline_ms = deadline_ms;
    let mut c = InProcCluster::plan(&plan, 7).expect("plan");
    for cfg in c.configs.values_mut() {
        cfg.rpc.call_timeout_ms = 500;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_reach_stage_zero_over_a_lossy_slow_network() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 30_000);
    c.net.set_faults(|f| {
        f.delay_ms = (1, 15);
        f.drop_rate = 0.01;
    });
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    assert_eq!(s.participants().len(), 20);
    let (delivered, lost) = c.net.counts();
    assert!(
        lost > 0 && delivered > 1000,
        "the faults were exercised: {delivered} delivered, {lost} lost"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_node_is_reported_with_its_last_words_and_excluded() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 2_000);
    c.start_all().await.unwrap();
    c.wait_for(T, |s| s.members.get(&17).is_some_and(|m| m.epoch > 0))
        .await
        .unwrap_or_else(|s| panic!("{}", show(s)));
    c.net.set_faults(|f| {
        f.isolated.insert(17);
    });
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    assert!(matches!(
        s.members[&17].status,
        MemberStatus::Excluded { .. }
    ));
    let stuck = events(&s, EventKind::NodeStuck);
    assert_eq!(
        stuck.len(),
        1,
        "only the cut-off node is reported stuck: {stuck:?}"
    );
    assert!(
        stuck[0].contains("no contact") || stuck[0].contains("not heard from"),
        "{stuck:?}"
    );
    assert!(
        stuck[0].contains("19 other node(s) wait on it"),
        "its victims are named: {stuck:?}"
    );
    assert_eq!(s.participants().len(), 19);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_coordinator_mid_start_up_is_replaced() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    crashed_coordinator(cluster(dir.path(), 3_000)).await;
}

/// The same, every connection real TCP inside mutual TLS (issue 10: the
/// in-process suite over TLS where its network is not simulated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_coordinator_mid_start_up_is_replaced_over_tls() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(20, 3, dir.path());
    plan.stage_deadline_ms = 3_000;
    let mut c = InProcCluster::over_tls(&plan).expect("plan");
    for cfg in c.configs.values_mut() {
        cfg.rpc.call_timeout_ms = 500;
    }
    crashed_coordinator(c).await;
}

async fn crashed_coordinator(mut c: InProcCluster) {
    for cfg in c.configs.values_mut() {
        cfg.demo.preload_items = 30;
        cfg.demo.preload_item_ms = 40;
    }
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, |s| s.stage == Stage::ADDRESSED && s.leader.is_some())
        .await
        .unwrap_or_else(|s| panic!("{}", show(s)));
    let old = s.leader.unwrap();
    c.crash(old).await;
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    assert!(s.leader.is_some_and(|l| l != old));
    assert!(matches!(
        s.members[&old].status,
        MemberStatus::Excluded { .. }
    ));
    assert_eq!(s.participants().len(), 19);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbiters_vote_and_host_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(5, 3, dir.path());
    plan.arbiters = 2;
    arbiters(InProcCluster::plan(&plan, 5).expect("plan")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbiters_vote_and_host_nothing_over_tls() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(5, 3, dir.path());
    plan.arbiters = 2;
    arbiters(InProcCluster::over_tls(&plan).expect("plan")).await;
}

async fn arbiters(mut c: InProcCluster) {
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    assert_eq!(s.config.voters(), vec![1, 2, 3], "arbiters are voters");
    for id in [2, 3] {
        let st = c.nodes[&id].status();
        assert_eq!(st.role, Some(orrery_core::Role::Arbiter));
        assert!(
            st.services.is_empty(),
            "arbiter {id} runs {:?}",
            st.services
        );
    }
    assert_eq!(s.config.nodes[&1].role, orrery_core::Role::Voter);
    assert_eq!(c.nodes[&1].status().services, vec!["demo".to_string()]);
    c.shutdown().await;
}

/// Issue 10, proposer clocks: a peer that dates its alarms far in the future
/// (a hostile node, or one whose clock runs ahead) is refused by the leader,
/// so it cannot use up the cluster-wide alarm budget and a present alarm
/// still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_dated_alarms_do_not_block_a_present_one() {
    use orrery_node::messages::{Reply, Request};
    use orrery_node::transport::MemTransport;
    use orrery_node::Transport;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, s) = ready_cluster(dir.path(), 3, 11).await;
    let leader = s.leader.expect("a leader");
    let me = (1..=3).find(|i| *i != leader).unwrap();
    let epoch = s.members[&me].epoch;
    // A connection announcing `me` under its current epoch: the sender is
    // the connection's, and an alarm is accepted only under it.
    let peer = MemTransport::new(me, c.net.clone());
    peer.set_epoch(epoch);
    let alarm = |what: &str, at: u64| {
        Request::Propose(orrery_core::Command::Alarm {
            node: me,
            epoch,
            what: what.into(),
            at,
        })
    };
    let far = orrery_node::clock::now_ms() + 1_000 * 3_600_000;
    for i in 0..31 {
        let r = peer
            .call(
                leader,
                alarm(&format!("future {i}"), far),
                Duration::from_secs(5),
            )
            .await
            .expect("the leader answers");
        match r {
            Reply::Error(e) => assert!(e.contains("ahead of the leader's clock"), "{e}"),
            other => panic!("future-dated alarm {i} was not refused: {other:?}"),
        }
    }
    let now = orrery_node::clock::now_ms();
    let r = peer
        .call(leader, alarm("present alarm", now), Duration::from_secs(5))
        .await
        .expect("the leader answers");
    assert!(
        matches!(
            r,
            Reply::Committed {
                response: orrery_core::Response::Ok,
                ..
            }
        ),
        "the present alarm was refused: {r:?}"
    );
    let s = c.state().await.expect("state");
    let alarms = events(&s, EventKind::Alarm);
    assert!(
        alarms.iter().any(|a| a.contains("present alarm")),
        "{alarms:?}"
    );
    assert!(!alarms.iter().any(|a| a.contains("future")), "{alarms:?}");
    c.shutdown().await;
}

/// Issue 10, "only the cluster decides": a connection speaking as node
/// `from` under `epoch` sends `req` to whichever node leads (followed if
/// leadership moves meanwhile), and gets the leader's answer.
async fn to_leader(
    c: &InProcCluster,
    from: NodeId,
    epoch: u64,
    req: &orrery_node::messages::Request,
) -> orrery_node::messages::Reply {
    use orrery_node::messages::Reply;
    use orrery_node::transport::MemTransport;
    use orrery_node::Transport;
    let peer = MemTransport::new(from, c.net.clone());
    peer.set_epoch(epoch);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let leader = c.nodes.values().find(|n| n.status().is_leader);
        if let Some(l) = leader {
            let to = l.config().node_id;
            match peer.call(to, req.clone(), Duration::from_secs(5)).await {
                Ok(Reply::NotLeader { .. }) | Err(_) => {}
                Ok(reply) => return reply,
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves the admin API of nodes `ids` on ephemeral ports (as `orrery node`
/// does on its admin port): where each listens, and the `Host` it answers
/// to (its configured admin address).
async fn serve_admin(c: &InProcCluster, ids: &[NodeId]) -> Vec<(String, String)> {
    let mut addrs = vec![];
    for id in ids {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = c.configs[id].me().admin_addr.clone();
        addrs.push((listener.local_addr().unwrap().to_string(), host));
        tokio::spawn(orrery_node::admin::serve(listener, c.nodes[id].clone()));
    }
    addrs
}

/// `orrery_rpc_refused_total` by reason, summed over the nodes' `/metrics`.
async fn refused_total(admin: &[(String, String)]) -> BTreeMap<String, u64> {
    let admin = admin.to_vec();
    tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut total = BTreeMap::new();
        for (addr, host) in admin {
            let text = agent
                .get(&format!("http://{addr}/metrics"))
                .set("Host", &host)
                .call()
                .expect("GET /metrics")
                .into_string()
                .unwrap();
            let lines = text.lines().map(|l| Ok(l.to_string()));
            let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
            for s in scrape.samples {
                if s.metric != "orrery_rpc_refused_total" {
                    continue;
                }
                // The OpenMetrics `_total` suffix leaves prometheus-parse
                // without the family's type: a counter, read untyped.
                let (prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v)) =
                    s.value
                else {
                    panic!("orrery_rpc_refused_total is not a counter: {:?}", s.value);
                };
                let reason = s.labels.get("reason").expect("a reason label").to_string();
                *total.entry(reason).or_insert(0) += v as u64;
            }
        }
        total
    })
    .await
    .unwrap()
}

/// How much each refusal count grew between two scrapes.
fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

fn report(node: NodeId, epoch: u64) -> orrery_node::messages::Request {
    orrery_node::messages::Request::Propose(orrery_core::Command::Report {
        node,
        epoch,
        stage: Stage::READY,
        waiting: None,
        progress: None,
        unreachable: vec![],
        at: orrery_node::clock::now_ms(),
    })
}

fn heartbeat(node: NodeId, epoch: u64) -> orrery_node::messages::Request {
    orrery_node::messages::Request::Heartbeat {
        node,
        epoch,
        health: orrery_core::Health::Healthy,
        view_version: 0,
    }
}

/// Membership events a hostile request could cause, after log index `mark`.
fn membership_events_after(s: &orrery_core::ClusterState, mark: u64) -> Vec<String> {
    s.events
        .iter()
        .filter(|e| e.index > mark)
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::NodeRemoved
                    | EventKind::NodeSuspected
                    | EventKind::NodeExcluded
                    | EventKind::NodeJoined
                    | EventKind::NodeDraining
            )
        })
        .map(|e| format!("{:?}: {}", e.kind, e.detail))
        .collect()
}

/// Issue 10: with a worker's credentials one cannot remove a node, talk
/// Raft, speak for another node, or report under an epoch that is not its
/// current one. Each attempt is refused with the reason, counted in
/// `/metrics` as `orrery_rpc_refused_total{reason}`, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_counted_and_change_nothing() {
    use orrery_node::messages::{Reply, Request};
    use orrery_node::transport::MemTransport;
    use orrery_node::Transport;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, before) = ready_cluster(dir.path(), 5, 13).await;
    let admin = serve_admin(&c, &[1, 2, 3]).await;
    let counted = refused_total(&admin).await;
    // Worker 4 attacks; worker 5 is the node it speaks for or removes.
    let (w, v) = (4, 5);
    let (ew, ev) = (before.members[&w].epoch, before.members[&v].epoch);
    let remove = Request::Propose(orrery_core::Command::Remove {
        node: v,
        epoch: ev,
        reason: "hostile".into(),
        at: orrery_node::clock::now_ms(),
    });
    let (as_v_report, as_v_heartbeat) = (
        format!("node {w} may not Report as node {v}"),
        format!("node {w} may not heartbeat as node {v}"),
    );
    #[rustfmt::skip]
    let attempts: Vec<(&str, u64, Request, &str)> = vec![
        ("a worker proposes Remove", ew, remove.clone(), "only the leader's coordinator decides Remove"),
        ("a worker sends a Raft RPC", ew, Request::Raft(vec![0; 16]), "only voters may send Raft messages"),
        ("a report as another node", ew, report(v, ev), &as_v_report),
        ("a heartbeat as another node", ew, heartbeat(v, ev), &as_v_heartbeat),
        ("a report at epoch 0", 0, report(w, 0), "has not joined (epoch 0)"),
        ("a heartbeat at epoch 0", 0, heartbeat(w, 0), "has not joined (epoch 0)"),
        ("a report at epoch 999", 999, report(w, 999), "epoch 999 was never issued"),
        ("a heartbeat at epoch 999", 999, heartbeat(w, 999), "epoch 999 was never issued"),
    ];
    for (what, epoch, req, why) in &attempts {
        match to_leader(&c, w, *epoch, req).await {
            Reply::Error(e) => assert!(e.contains(why), "{what}: {e}"),
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    // The first hop authorises too: a follower refuses the same Remove
    // instead of passing it on under its own name, and answers an honest
    // proposal with who leads instead of forwarding it.
    let peer = MemTransport::new(w, c.net.clone());
    peer.set_epoch(ew);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let follower = (1..=3).find(|n| !c.nodes[n].status().is_leader).unwrap();
        match peer
            .call(follower, remove.clone(), Duration::from_secs(5))
            .await
        {
            Ok(Reply::Error(e)) => assert!(e.contains("coordinator decides Remove"), "{e}"),
            other => panic!("follower {follower} did not refuse the Remove: {other:?}"),
        }
        match peer
            .call(follower, report(w, ew), Duration::from_secs(5))
            .await
        {
            Ok(Reply::NotLeader { .. }) => break,
            // It took over meanwhile: ask the next follower.
            Ok(Reply::Committed { .. }) if c.nodes[&follower].status().is_leader => {}
            other => panic!("follower {follower} answered an honest report {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "no follower");
    }
    // Counted, by reason, where they were refused (at least: a retried
    // follower refuses the Remove once more).
    let want: BTreeMap<String, u64> = [
        ("coordinator_only", 2),
        ("not_voter", 1),
        ("impersonation", 2),
        ("not_joined", 2),
        ("never_issued", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    let got = grown(&counted, &refused_total(&admin).await);
    for (reason, n) in &want {
        assert!(
            got.get(reason).copied().unwrap_or(0) >= *n,
            "orrery_rpc_refused_total{{reason=\"{reason}\"}} grew by {got:?}, want {want:?}"
        );
    }
    // And nothing happened: every refusal answered before anything was
    // written, so the state read now (linearizably) shows no effect.
    let after = c.state().await.expect("state");
    for (id, m) in after.members.iter() {
        assert_eq!(m.epoch, before.members[id].epoch, "node {id} epoch");
        assert_eq!(m.status, MemberStatus::Active, "node {id}");
    }
    let events = membership_events_after(&after, before.applied_index);
    assert!(events.is_empty(), "{events:?}");
    assert!(
        after.shards.load().get(&v).copied().unwrap_or(0) > 0,
        "node {v}'s shards were moved away"
    );
    c.shutdown().await;
}

/// Issue 10: a Report (and a heartbeat) under epoch 2^63, which the cluster
/// never issued, is refused before it counts as contact: the coordinator's
/// view of the node is not pushed to a forged epoch, so the node is not
/// suspected afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_under_an_epoch_never_issued_raises_no_suspicion() {
    use orrery_node::messages::Reply;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, before) = ready_cluster(dir.path(), 5, 17).await;
    let admin = serve_admin(&c, &[1, 2, 3]).await;
    let counted = refused_total(&admin).await;
    let (v, forged) = (5, 1u64 << 63);
    for req in [report(v, forged), heartbeat(v, forged)] {
        match to_leader(&c, v, forged, &req).await {
            Reply::Error(e) => assert!(e.contains("was never issued"), "{e}"),
            other => panic!("epoch 2^63 was not refused: {other:?}"),
        }
    }
    let got = grown(&counted, &refused_total(&admin).await);
    assert!(
        got.get("never_issued").copied().unwrap_or(0) >= 2,
        "{got:?}"
    );
    // "Nothing happens" needs a window: a forged contact would hide the
    // node's real heartbeats and reports (the coordinator keeps the highest
    // epoch it heard), and suspicion follows a lapsed lease (lease_ttl_ms
    // 1 s) or silence past the liveness window (1.5 s). 4 s covers both
    // twice over plus a probe round; we fail as soon as a suspicion shows.
    let window = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < window {
        let s = c.state().await.expect("state");
        let suspected: Vec<_> = s
            .events
            .iter()
            .filter(|e| e.index > before.applied_index && e.node == Some(v))
            .filter(|e| e.kind == EventKind::NodeSuspected)
            .map(|e| e.detail.clone())
            .collect();
        assert!(suspected.is_empty(), "node {v} suspected: {suspected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = c.state().await.expect("state");
    assert_eq!(s.members[&v].epoch, before.members[&v].epoch);
    assert_eq!(s.members[&v].status, MemberStatus::Active);
    c.shutdown().await;
}

/// Issue 12: a probe must never delay a heartbeat. Node 4 is impaired (its
/// probes wait 4x `probe_timeout_ms` = 1.2 s) and cannot reach node 5 (one
/// way: everyone else can, so node 5 stays a member and node 4 keeps
/// probing it). Were the probe awaited before the heartbeat, node 4's lease
/// would lapse (`self_fence_after_ms` 600) at each of those probes and the
/// coordinator would suspect it for silence; with probes beside the
/// heartbeats it stays serving, its lease never lapses in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_probe_never_delays_the_probers_own_heartbeats() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, before) = ready_cluster(dir.path(), 5, 23).await;
    c.nodes[&4].set_health_faults(orrery_node::health::HealthFaults {
        event_loop_lag_ms: 400,
        ..Default::default()
    });
    c.wait_for(T, |s| !s.members[&4].health.healthy)
        .await
        .unwrap_or_else(|s| panic!("node 4 never impaired:\n{}", show(s)));
    c.net.set_faults(|f| {
        f.cut.insert((4, 5));
    });
    // Several of node 4's probe rounds (every 500 ms over 4 peers, each
    // probe of node 5 hanging 1.2 s): a fixed window, because what must be
    // shown is that nothing happens in it.
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut lapses = 0;
    while tokio::time::Instant::now() < until {
        if !c.nodes[&4].status().serving {
            lapses += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = c.state().await.expect("state");
    // Node 5's own probes of node 4 lose their answers on the cut link, so
    // node 5 accuses it (and the probes through others refute that); what
    // must not happen is a lapsed lease ("no heartbeat for ...") or a
    // removal.
    let about_4: Vec<String> = s
        .events
        .iter()
        .filter(|e| e.index > before.applied_index && e.node == Some(4))
        .filter(|e| match e.kind {
            EventKind::NodeRemoved => true,
            EventKind::NodeSuspected => !e.detail.contains("accused by node 5"),
            _ => false,
        })
        .map(|e| e.detail.clone())
        .collect();
    assert!(about_4.is_empty(), "node 4's lease lapsed: {about_4:?}");
    assert_eq!(
        lapses, 0,
        "node 4 stopped serving {lapses} times (50 ms samples)"
    );
    c.shutdown().await;
}
