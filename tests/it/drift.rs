//! Configuration drift made visible (issue 13): a node whose own file
//! disagrees with the replicated cluster-wide keys says so, naming node,
//! key, its value and the cluster's, in the timeline, its status and
//! `orrery config diff`.

use crate::cluster::{show, TestCluster, BIN};
use orrery::inproc::ready;
use orrery_core::EventKind;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_node_restarted_with_an_edited_cluster_key_raises_a_drift_alarm_naming_it() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    let s = c.wait_for("stage 0", T, ready);
    let ttl = s.config.membership.lease_ttl_ms;
    let report_interval = s.config.liveness_window_ms.min(1_000);
    // No node drifts to begin with.
    for id in 1..=4 {
        let st = c.node_status(id).expect("status");
        assert!(
            st.config_drift.is_empty(),
            "node {id}: {:?}",
            st.config_drift
        );
    }
    c.stop(4);
    c.edit_config(4, |cfg| cfg.membership.lease_ttl_ms = ttl + 2_000);
    let restarted = s.applied_index;
    c.start(4);
    let key = "membership.lease_ttl_ms";
    let s = c.wait_for("a drift alarm naming node 4 and the key", T, |s| {
        s.events.iter().any(|e| {
            e.kind == EventKind::Alarm
                && e.node == Some(4)
                && e.index > restarted
                && e.detail.contains(key)
        })
    });
    let joined = s
        .events
        .iter()
        .filter(|e| e.kind == EventKind::NodeJoined && e.node == Some(4) && e.index > restarted)
        .map(|e| e.at)
        .next()
        .expect("node 4 rejoined");
    let alarm = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::Alarm && e.node == Some(4) && e.detail.contains(key))
        .expect("the alarm");
    assert!(
        alarm
            .detail
            .contains(&format!("{} here, {ttl} in the cluster", ttl + 2_000)),
        "{}",
        alarm.detail
    );
    // Within one report interval of the node holding the state (it fetches
    // it right after joining; the alarm commits on its next tick).
    assert!(
        alarm.at.saturating_sub(joined) <= 2 * report_interval + 1_000,
        "alarm {} ms after the join:\n{}",
        alarm.at.saturating_sub(joined),
        show(Some(s.clone()))
    );
    // Its status names it; the others do not drift; `orrery config diff`
    // prints the row and exits 3.
    let st = c.node_status(4).expect("status");
    assert_eq!(st.config_drift.len(), 1, "{:?}", st.config_drift);
    assert_eq!(st.config_drift[0].key, key);
    assert!(c.node_status(1).expect("status").config_drift.is_empty());
    let out = std::process::Command::new(BIN)
        .args(["config", "diff", "--data-dir"])
        .arg(c.dir.path())
        .output()
        .expect("orrery config diff");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with('4') && l.contains(key))
        .unwrap_or_else(|| panic!("no row for node 4:\n{text}"));
    assert!(
        row.contains(&(ttl + 2_000).to_string()) && row.ends_with(&ttl.to_string()),
        "{row}"
    );

    // `config set` makes node 4's value the cluster's: in force everywhere,
    // in the timeline with old and new value; now node 4 agrees and the
    // three nodes whose files still say the old value drift instead.
    let new = (ttl + 2_000).to_string();
    let before = c.state().expect("state").applied_index;
    let (ok, out, err) = c.exec(&["--nodes", "1"], &["config", "set", key, &new]);
    assert!(ok, "config set failed: {out} {err}");
    let s = c.wait_for("the new value replicated and recorded", T, |s| {
        s.config.membership.lease_ttl_ms == ttl + 2_000
            && s.events.iter().any(|e| {
                e.kind == EventKind::ConfigChanged
                    && e.index > before
                    && e.detail.contains(&format!("{key}: {ttl} -> {new}"))
            })
    });
    for id in 1..=3 {
        let st = c.wait_node(id, "drift against the new value", T, |st| {
            st.config_drift
                .iter()
                .any(|d| d.key == key && d.cluster == new)
        });
        assert_eq!(st.config_drift[0].here, ttl.to_string());
    }
    c.wait_node(4, "node 4 agreeing now", T, |st| st.config_drift.is_empty());
    // A value that does not validate is refused, once, and changes nothing.
    let (ok, out, err) = c.exec(&["--nodes", "1"], &["config", "set", key, "10"]);
    assert!(!ok, "an invalid lease was accepted: {out}");
    assert!(
        format!("{out}{err}").contains("must not exceed"),
        "{out} {err}"
    );
    let (ok, out, err) = c.exec(&["--nodes", "4"], &["config", "set", key, &new]);
    let said = format!("{out}{err}");
    assert!(
        !ok && said.contains("voter"),
        "a worker proposed a config change: {said}"
    );
    let after = c.state().expect("state");
    assert_eq!(after.config.membership.lease_ttl_ms, ttl + 2_000);
    assert_eq!(
        after
            .events
            .iter()
            .filter(|e| e.kind == EventKind::ConfigChanged)
            .count(),
        s.events
            .iter()
            .filter(|e| e.kind == EventKind::ConfigChanged)
            .count()
    );
    c.stop_all();
}
