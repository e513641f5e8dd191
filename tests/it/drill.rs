//! `orrery drill` (issue 13, item 4) on real processes: `drill leader`
//! hands Raft leadership to another voter and back (the replicated state
//! names each new coordinator, nobody is suspected); `drill node N` drains,
//! stops, restarts and readmits a node, which hosts shards again; each
//! drill's result is in the timeline and `drill history`. With a node
//! stopped, both drills refuse and say why. Waits are bounded polls.

use crate::cluster::{show, TestCluster};
use crate::roll::{orrery, owned_by, ready, Reaper};
use orrery_core::{EventKind, MemberStatus, NodeId};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn drills_hand_leadership_over_and_back_restart_a_node_and_refuse_a_sick_cluster() {
    let mut c = TestCluster::new(4, 3, |_| {});
    let ids: Vec<NodeId> = (1..=4).collect();
    let reaper = Reaper(c.dir.path().to_owned(), ids.clone());
    c.start_all();
    let before = c.wait_for("stage 0", T, |s| ready(s) && owned_by(s, 4) > 0);
    let leader = before.leader.expect("a leader");

    let (ok, text) = orrery(&["drill", "leader", "--stable-ms", "300"], c.dir.path());
    assert!(ok, "{text}");
    assert!(text.contains(&format!("leadership {leader} -> ")), "{text}");
    let s = c.wait_for("leadership back", T, |s| {
        s.leader == Some(leader) && ready(s)
    });
    let changes: Vec<NodeId> = s
        .events
        .iter()
        .filter(|e| e.index > before.applied_index && e.kind == EventKind::LeaderChanged)
        .filter_map(|e| e.node)
        .collect();
    assert!(
        changes.len() >= 2 && changes.last() == Some(&leader) && changes[0] != leader,
        "{changes:?}: {}",
        show(Some(s.clone()))
    );

    let (ok, text) = orrery(&["drill", "node", "4", "--stable-ms", "300"], c.dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("drained in") && text.contains("readmitted") && text.contains("shards back"),
        "{text}"
    );
    let s = c.wait_for("node 4 back with shards", T, |s| {
        ready(s) && owned_by(s, 4) > 0 && s.members[&4].epoch > before.members[&4].epoch
    });
    let suspected = s.events.iter().any(|e| {
        e.index > before.applied_index
            && matches!(e.kind, EventKind::NodeSuspected | EventKind::NodeRemoved)
    });
    assert!(!suspected, "{}", show(Some(s.clone())));

    // A backup drill: written, verified, restored into a scratch directory
    // and checked; the cluster's own files are untouched.
    let store = orrery::local::Manifest::store_path(c.dir.path());
    let (ok, text) = orrery(&["drill", "backup"], c.dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("written and verified in") && text.contains("restore check"),
        "{text}"
    );
    assert!(store.exists());

    // A voter stopped: the cluster is not healthy; both drills refuse.
    let (ok, text) = orrery(&["stop", "--node", "3"], c.dir.path());
    assert!(ok, "{text}");
    c.wait_exit(3, T);
    c.wait_for("node 3 left", T, |s| {
        matches!(s.members[&3].status, MemberStatus::Left { .. })
    });
    let (ok, text) = orrery(&["drill", "node", "2"], c.dir.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains("refused: the cluster is not healthy: node 3"),
        "{text}"
    );
    let (ok, text) = orrery(&["drill", "leader"], c.dir.path());
    assert!(!ok && text.contains("refused"), "{text}");
    let (ok, text) = orrery(&["drill", "backup"], c.dir.path());
    assert!(
        !ok && text.contains("refused: the cluster is not healthy"),
        "{text}"
    );

    let (ok, text) = orrery(&["drill", "history"], c.dir.path());
    assert!(ok, "{text}");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(
        rows[0].contains("leader") && rows[0].contains("ok: leadership"),
        "{text}"
    );
    assert!(rows[1].contains("ok: node 4: drained"), "{text}");
    assert!(
        rows[2].contains("backup") && rows[2].contains("ok: backup"),
        "{text}"
    );
    assert!(rows[3].contains("node 2: refused"), "{text}");
    assert!(
        rows[4].contains("leader") && rows[4].contains("refused"),
        "{text}"
    );
    assert!(
        rows[5].contains("backup") && rows[5].contains("refused"),
        "{text}"
    );
    reaper.stop();
    c.stop_all();
}

/// `drills.leader_every_ms`: the leader hands leadership on by itself, on
/// schedule, records each drill, and nobody is suspected.
#[test]
fn scheduled_leader_drills_move_leadership_and_are_recorded() {
    let c = TestCluster::new(3, 3, |_| {});
    for v in 1..=3 {
        c.edit_config(v, |cfg| cfg.drills.leader_every_ms = 1_500);
    }
    let mut c = c;
    c.start_all();
    let before = c.wait_for("stage 0", T, ready);
    let first = before.leader.expect("a leader");
    // The drill's record can commit before the new leader's LeaderChanged:
    // wait for both.
    let moved = |s: &orrery_core::ClusterState| -> Vec<NodeId> {
        s.events
            .iter()
            .filter(|e| e.index > before.applied_index && e.kind == EventKind::LeaderChanged)
            .filter_map(|e| e.node)
            .collect()
    };
    let s = c.wait_for("two scheduled drills recorded, leadership moved", T, |s| {
        let drills = s
            .events
            .iter()
            .filter(|e| {
                e.kind == EventKind::Operation && e.detail.contains("drill-leader: ok: scheduled")
            })
            .count();
        drills >= 2 && moved(s).iter().any(|l| *l != first)
    });
    let failures = s.events.iter().any(|e| {
        matches!(e.kind, EventKind::NodeSuspected | EventKind::NodeRemoved)
            || e.detail.contains("drill-leader: failed")
    });
    assert!(!failures, "{}", show(Some(s.clone())));
    let (ok, text) = orrery(&["drill", "history"], c.dir.path());
    assert!(ok && text.contains("ok: scheduled: leadership"), "{text}");
    c.stop_all();
}
