//! Membership a broken node cannot corrupt (issue: membership): crash and
//! pause detection with real processes; corruption, partitions and revoked
//! epochs with the node code on the in-process network.

use crate::cluster::{events, show, TestCluster, SERIAL};
use orrery::inproc::{ready, InProcCluster};
use orrery::local::Plan;
use orrery_core::{ClusterState, EventKind, MemberStatus, NodeId, Stage};
use orrery_node::health::HealthFaults;
use orrery_node::messages::{Reply, Request};
use orrery_node::transport::{MemTransport, Transport};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn removed(s: &ClusterState) -> Vec<NodeId> {
    s.events
        .iter()
        .filter(|e| e.kind == EventKind::NodeRemoved)
        .filter_map(|e| e.node)
        .collect()
}

fn all_serving(c: &InProcCluster, s: &ClusterState) -> bool {
    ready(s)
        && s.members.values().all(|m| m.status == MemberStatus::Active)
        && c.nodes.values().all(|n| n.status().serving)
}

async fn inproc(dir: &std::path::Path, nodes: u64) -> InProcCluster {
    let plan = Plan::new(nodes, 3, dir);
    let mut c = InProcCluster::plan(&plan, 11).expect("plan");
    c.start_all().await.expect("start");
    c.wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    c
}

/// The post-mortem (seed 003): a node whose health verification is
/// corrupted reads every peer's health proof as invalid and accuses them.
/// Its accusations are ignored; nobody healthy is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_node_accuses_everyone_and_removes_no_one() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(7, 3, dir.path());
    // Keep the corrupted node running (impaired, not fail-stop) so it keeps trying.
    plan.health.fatal_checks = vec![];
    let mut c = InProcCluster::plan(&plan, 3).expect("plan");
    c.start_all().await.unwrap();
    c.wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("{}", show(s)));
    c.nodes[&6].set_health_faults(HealthFaults {
        corrupt_health_verification: true,
        ..Default::default()
    });
    let s = c
        .wait_for(T, |s| {
            s.members[&6]
                .health
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("health_verification"))
        })
        .await
        .unwrap_or_else(|s| panic!("node 6 never identified itself:\n{}", show(s)));
    assert!(events(&s, EventKind::NodeImpaired)
        .iter()
        .any(|d| d.contains("node 6")));
    // It keeps accusing; the coordinator keeps ignoring it.
    let leader = s.leader.expect("leader");
    let deadline = tokio::time::Instant::now() + T;
    while c.nodes[&leader].status().ignored_accusations < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 6 never tried to accuse anyone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = c.state().await.unwrap();
    assert_eq!(
        removed(&s),
        Vec::<NodeId>::new(),
        "a healthy node was removed:\n{}",
        show(Some(s))
    );
    assert!(all_serving(&c, &s) || !c.nodes[&6].status().serving);
    for id in [1, 2, 3, 4, 5, 7] {
        assert!(c.nodes[&id].status().serving, "node {id} stopped serving");
    }
    c.shutdown().await;
}

/// With the default (fatal) check, the corrupted node stops itself, is
/// fenced (epoch revoked), and is not readmitted while its checks fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_node_is_fenced_and_not_readmitted() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = inproc(dir.path(), 7).await;
    c.nodes[&6].set_health_faults(HealthFaults {
        corrupt_health_verification: true,
        ..Default::default()
    });
    let s = c
        .wait_for(T, |s| {
            matches!(s.members[&6].status, MemberStatus::Removed { .. })
        })
        .await
        .unwrap_or_else(|s| panic!("node 6 not removed:\n{}", show(s)));
    let why = events(&s, EventKind::NodeRemoved);
    assert!(
        why.iter()
            .any(|d| d.contains("node 6") && d.contains("fail-stop")),
        "{why:?}"
    );
    assert_eq!(removed(&s), vec![6], "only the corrupted node is removed");
    let st = c.nodes[&6].status();
    assert!(
        !st.serving
            && st
                .fenced
                .as_deref()
                .is_some_and(|f| f.contains("fail-stop")),
        "{st:?}"
    );
    // Watch it for three lease periods: it is never readmitted.
    let epoch = s.members[&6].epoch;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut s = s;
    while tokio::time::Instant::now() < until {
        s = c.state().await.expect("state");
        assert!(
            matches!(s.members[&6].status, MemberStatus::Removed { .. }),
            "node 6 readmitted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.members[&6].epoch, epoch, "it never rejoined");
    c.shutdown().await;
}

/// A 2/3 partition of 5 nodes, the leader on the minority side: the
/// minority removes nobody and self-fences; the majority removes the
/// minority; on heal everything converges without help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_three_partition_fences_the_minority_and_converges_on_heal() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = inproc(dir.path(), 5).await;
    let s = c.state().await.unwrap();
    let leader = s.leader.unwrap();
    let worker = if leader == 4 { 5 } else { 4 };
    let minority = [leader, worker];
    c.net
        .set_faults(|f| f.split = minority.into_iter().collect());
    // The minority stops serving (its heartbeats are no longer acknowledged)...
    let deadline = tokio::time::Instant::now() + T;
    while minority.iter().any(|n| c.nodes[n].status().serving) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the minority kept serving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...while the majority elects a leader and removes the minority.
    let majority: Vec<NodeId> = (1..=5).filter(|n| !minority.contains(n)).collect();
    let mut s = None;
    for n in &majority {
        if let Ok(Ok(st)) = tokio::time::timeout(T, async {
            loop {
                if let Ok(st) = c.nodes[n].cluster_state().await {
                    if minority
                        .iter()
                        .all(|m| matches!(st.members[m].status, MemberStatus::Removed { .. }))
                    {
                        return Ok::<_, String>(st);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        {
            s = Some(st);
            break;
        }
    }
    let s = s.expect("the majority removed the minority");
    for n in &majority {
        assert_eq!(
            s.members[n].status,
            MemberStatus::Active,
            "the minority removed node {n}"
        );
    }
    // The majority serves under its new leader (it may have self-fenced
    // briefly while the old leader's lease ran out).
    let deadline = tokio::time::Instant::now() + T;
    while !majority.iter().all(|n| c.nodes[n].status().serving) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the majority does not serve"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Heal: everybody back, serving, under new epochs for the minority.
    c.net.set_faults(|f| f.split.clear());
    let s = c
        .wait_for(Duration::from_secs(60), |s| {
            s.members
                .values()
                .all(|m| m.status == MemberStatus::Active && m.report.stage == Stage::READY)
        })
        .await
        .unwrap_or_else(|s| panic!("did not converge:\n{}", show(s)));
    assert!(
        events(&s, EventKind::NodeReinstated).len() >= 2,
        "{:?}",
        events(&s, EventKind::NodeReinstated)
    );
    let deadline = tokio::time::Instant::now() + T;
    while !c.nodes.values().all(|n| n.status().serving) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not everyone serves again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        removed(&s).iter().all(|n| minority.contains(n)),
        "{:?}",
        removed(&s)
    );
    c.shutdown().await;
}

/// Messages carrying a revoked epoch are refused by every other node, with
/// the node, the epoch and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_a_revoked_epoch_are_refused_everywhere() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = inproc(dir.path(), 5).await;
    let s = c.state().await.unwrap();
    let victim = (4..=5).find(|n| Some(*n) != s.leader).unwrap();
    let old_epoch = s.members[&victim].epoch;
    c.net.set_faults(|f| {
        f.isolated.insert(victim);
    });
    c.wait_for(T, |s| {
        matches!(s.members[&victim].status, MemberStatus::Removed { .. })
    })
    .await
    .unwrap_or_else(|s| panic!("{}", show(s)));
    // Every other node learns of the revocation through its heartbeats.
    let deadline = tokio::time::Instant::now() + T;
    let impostor = MemTransport::new(victim, c.net.clone());
    impostor.set_epoch(old_epoch);
    c.net.set_faults(|f| f.isolated.clear());
    for n in (1..=5).filter(|n| *n != victim) {
        loop {
            match impostor
                .call(n, Request::Ping, Duration::from_secs(1))
                .await
            {
                Ok(Reply::Fenced { reason }) => {
                    assert!(
                        reason.contains(&format!("node {victim} epoch {old_epoch}")),
                        "{reason}"
                    );
                    break;
                }
                other => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "node {n} still accepts epoch {old_epoch}: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    c.shutdown().await;
}

/// SIGKILL: the node is removed and its epoch revoked within 3 s.
#[test]
fn a_crashed_process_is_removed_and_its_epoch_revoked_within_3s() {
    let mut c = TestCluster::new(5, 3, |_| {});
    c.start_all();
    let s = c.wait_for("stage 0", T, |s| {
        s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
    });
    let victim = (4..=5).find(|n| Some(*n) != s.leader).unwrap();
    let epoch = s.members[&victim].epoch;
    let killed_at = orrery_node::clock::now_ms();
    c.kill(victim);
    let s = c.wait_for("removal", T, |s| {
        matches!(s.members[&victim].status, MemberStatus::Removed { .. })
    });
    let removed_at = s.members[&victim].last_removed_at;
    let took = removed_at.saturating_sub(killed_at);
    eprintln!("crash detection: node {victim} removed {took} ms after SIGKILL");
    assert!(took < 3_000, "took {took} ms");
    assert!(s
        .refusal(victim, epoch)
        .is_some_and(|r| r.contains("revoked")));
    c.stop_all();
}

/// SIGSTOP longer than the lease: removed; after SIGCONT it notices, serves
/// nothing under the old epoch, and rejoins under a new epoch through a
/// confidence vote within 5 s.
#[test]
fn a_paused_process_is_removed_then_rejoins_under_a_new_epoch() {
    let mut c = TestCluster::new(5, 3, |_| {});
    c.start_all();
    let s = c.wait_for("stage 0", T, |s| {
        s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
    });
    let victim = (4..=5).find(|n| Some(*n) != s.leader).unwrap();
    let old = s.members[&victim].epoch;
    c.signal(victim, "STOP");
    c.wait_for("removal", T, |s| {
        matches!(s.members[&victim].status, MemberStatus::Removed { .. })
    });
    // The survivors close the connections the frozen process still holds
    // open under its revoked epoch (not only refuse its next handshake).
    // Stage -3 opens one connection per pair, so not every survivor holds
    // one from it; the leader does (its heartbeats).
    let survivors: Vec<u64> = (1..=5).filter(|n| *n != victim).collect();
    let deadline = std::time::Instant::now() + T;
    while !survivors.iter().any(|n| {
        c.node_status(*n)
            .is_some_and(|st| st.wire.connections_closed_revoked > 0)
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no survivor closed the removed epoch's connections within {T:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let resumed_at = orrery_node::clock::now_ms();
    c.signal(victim, "CONT");
    let s = c.wait_for("reinstatement", T, |s| {
        s.members[&victim].epoch > old
            && s.members[&victim].status == MemberStatus::Active
            && s.members[&victim].report.stage == Stage::READY
    });
    let back = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::NodeReinstated && e.node == Some(victim))
        .expect("a confidence vote reinstated it");
    let took = back.at.saturating_sub(resumed_at);
    eprintln!(
        "pause: node {victim} reinstated under epoch {} {took} ms after SIGCONT",
        s.members[&victim].epoch
    );
    assert!(took < 5_000, "took {took} ms");
    c.wait_node(victim, "serving again", T, |st| {
        st.serving && st.epoch > old
    });
    c.stop_all();
}

/// No false removal: for 60 s one node is CPU-starved (a hog blocks its
/// runtime 300 ms at a time) and every node logs a burst of 500 warnings.
/// The starved node is reported impaired (its work path stalls) but nobody
/// is removed: heartbeats run on their own thread.
#[test]
fn cpu_starvation_and_log_bursts_remove_no_one_in_60s() {
    let mut c = TestCluster::new(5, 3, |p| p.starve_and_burst(5));
    c.start_all();
    let s = c.wait_for("stage 0", T, |s| {
        s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
    });
    let start = s.applied_index;
    c.wait_for("node 5 reported impaired", T, |s| {
        !s.members[&5].health.healthy
    });
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let mut checks = 0;
    while std::time::Instant::now() < until {
        if let Some(s) = c.state() {
            assert_eq!(
                removed(&s),
                Vec::<NodeId>::new(),
                "false removal:\n{}",
                show(Some(s.clone()))
            );
            assert!(s.members.values().all(|m| m.status == MemberStatus::Active));
            checks += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = c.state().expect("state");
    assert!(s.applied_index > start, "the cluster kept working");
    assert!(checks > 60, "observed the cluster only {checks} times");
    for id in 1..=5 {
        let log = c.log(id);
        assert!(
            log.matches("demo log burst").count() >= 500,
            "node {id} did not log its burst"
        );
    }
    c.stop_all();
}
