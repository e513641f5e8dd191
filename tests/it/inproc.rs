//! The node code itself (orrery-node, real openraft and redb) in an
//! in-process simulated network: 20 nodes, with loss and delay, an isolated
//! node and a crashed coordinator.

use crate::cluster::{events, show, SERIAL};
use orrery::inproc::{ready, InProcCluster};
use orrery::local::Plan;
use orrery_core::{EventKind, MemberStatus, Stage};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

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
    let mut c = cluster(dir.path(), 3_000);
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
    let mut c = InProcCluster::plan(&plan, 5).expect("plan");
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
    let mut c = InProcCluster::plan(&Plan::new(3, 3, dir.path()), 11).expect("plan");
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    let leader = s.leader.expect("a leader");
    let me = (1..=3).find(|i| *i != leader).unwrap();
    let epoch = s.members[&me].epoch;
    let peer = MemTransport::new(me, c.net.clone());
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
