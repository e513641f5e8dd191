//! Scheduled failover drills ([`DrillsConfig`]): the second post-mortem's
//! backup load balancer took over with a configuration nobody had tried,
//! and its remedy was "regular checks of the failover mechanism". With
//! `drills.leader_every_ms` set, the Raft leader hands its leadership to the
//! next healthy voter on that period (the control plane's failover, done on
//! purpose while nothing is wrong), times it, and records the result in the
//! timeline (`drill-leader`, listed by `orrery drill history`). A drill that
//! fails raises an alarm at once: a failover that does not work is found on
//! a quiet afternoon, not during an outage.
//!
//! A drill starts only on a healthy cluster (every member active at stage
//! 0, nothing draining, no critical alarm here) and never touches more than
//! leadership. This module never decides membership.

use crate::node::Inner;
use orrery_core::{Command, MemberStatus, NodeId, Stage};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

const LOG: &str = "orrery::drills";

/// `[drills]`: scheduled drills (off by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrillsConfig {
    /// Hand leadership to the next healthy voter this often, in ms. 0: off
    /// (default); else at least 1000.
    pub leader_every_ms: u64,
}

/// Longest a scheduled hand-over may take before it counts as failed.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

impl DrillsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.leader_every_ms != 0 && !(1_000..=86_400_000).contains(&self.leader_every_ms) {
            return Err("drills.leader_every_ms must be 0 (off) or in 1000..=86400000".into());
        }
        Ok(())
    }
}

/// The voter after `me` (in id order, wrapping) that may take over: an
/// active member at stage 0, not draining. `None` if the cluster is not
/// healthy enough for a drill.
pub(crate) fn next_leader(state: &orrery_core::ClusterState, me: NodeId) -> Option<NodeId> {
    let healthy = state.stage == Stage::READY
        && state
            .members
            .values()
            .all(|m| m.status == MemberStatus::Active && !m.draining && m.health.healthy);
    if !healthy {
        return None;
    }
    let voters = state.config.voters();
    let after = voters.iter().copied().filter(|v| *v > me);
    let before = voters.iter().copied().filter(|v| *v < me);
    after.chain(before).find(|v| {
        state
            .members
            .get(v)
            .is_some_and(|m| m.report.stage == Stage::READY)
    })
}

/// The scheduled leader drill, on every voter (it acts only while leading).
pub(crate) async fn run(node: Arc<Inner>) {
    let every = node.cfg.drills.leader_every_ms;
    if every == 0 || node.control_plane().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // The first tick is immediate: wait one period.
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(detail) = leader_drill(&node).await {
            record(&node, detail).await;
        }
    }
}

/// One drill, if this node leads and the cluster is healthy: the timeline
/// line, `ok: ...` or `failed: ...`.
async fn leader_drill(node: &Inner) -> Option<String> {
    let control = node.control_plane()?;
    if !control.is_leader() || node.leaving() {
        return None;
    }
    let me = node.cfg.node_id;
    let critical = crate::alarms::unacked_critical(&node.status_now().alarms);
    let to = next_leader(&control.state().state.0, me).filter(|_| !critical);
    let Some(to) = to else {
        info!(target: LOG, "scheduled leader drill skipped: the cluster is not healthy");
        return None;
    };
    let t0 = tokio::time::Instant::now();
    let handed = tokio::time::timeout(HANDOVER_TIMEOUT, async {
        control
            .transfer_leader(to)
            .await
            .map_err(|e| e.to_string())?;
        while control.current_leader() != Some(to) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<(), String>(())
    })
    .await;
    let ms = t0.elapsed().as_millis();
    Some(match handed {
        Ok(Ok(())) => format!("ok: scheduled: leadership {me} -> {to} in {ms} ms"),
        Ok(Err(e)) => format!("failed: scheduled: leadership {me} -> {to}: {e}"),
        Err(_) => format!(
            "failed: scheduled: leadership {me} -> {to}: not taken within {HANDOVER_TIMEOUT:?}"
        ),
    })
}

/// Into the timeline; a failure raises an alarm too.
async fn record(node: &Inner, detail: String) {
    if detail.starts_with("failed") {
        node.watchdog
            .raise(crate::clock::now_ms(), format!("failover drill {detail}"));
        warn!(target: LOG, "drill-leader: {detail}");
    } else {
        info!(target: LOG, "drill-leader: {detail}");
    }
    let cmd = Command::Operation {
        what: "drill-leader".into(),
        detail,
        at: crate::clock::now_ms(),
    };
    if let Err(e) = node.propose(cmd).await {
        warn!(target: LOG, "the drill's result was not recorded: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_off_by_default_and_bounded() {
        assert_eq!(DrillsConfig::default().leader_every_ms, 0);
        assert!(DrillsConfig {
            leader_every_ms: 10
        }
        .validate()
        .is_err());
        assert!(DrillsConfig {
            leader_every_ms: 60_000
        }
        .validate()
        .is_ok());
    }
}
