//! The leader's lease-renewal rule ([`answer_heartbeat`]): what the leader
//! answers a node's heartbeat. One place, run by the node's request handler
//! and by the simulator alike, so the simulated rule is the shipped one.
//!
//! A lease is renewed only by a leader that a quorum still follows (a
//! leader on the minority side of a partition must let its nodes
//! self-fence), only for the node's current epoch (a fenced process gets
//! the reason, so it rejoins), and only while the coordinator has not
//! decided to remove the node (fence first, then remove). The renewal
//! carries the shard map version and the job leases held under this very
//! epoch (a new process of the same node must not run its predecessor's
//! periods).
//!
//! The node's side of the lease is [`lease_fresh`], the one rule for
//! "may this process still serve", run by the node, the simulator and the
//! model checker (`orrery-model`).
//!
//! It decides only; it never sends, reads a clock or touches the state.

use crate::{ClusterState, Coordinator, Epoch, Health, JobLease, Millis, NodeId};

/// Whether a node whose last acknowledged heartbeat was sent at `sent` may
/// still serve at `now` (both on the node's own clock): strictly less than
/// `self_fence_after` ago. Strictly, because a shard handed over is served
/// by its new owner from `self_fence_after` after the new owner learned of
/// the move, and the old owner's last renewal was sent before the move
/// committed: with `<=` both may serve at the one shared instant
/// `sent + self_fence_after` (the model checker found that trace).
pub fn lease_fresh(now: Millis, sent: Millis, self_fence_after: Millis) -> bool {
    now.saturating_sub(sent) < self_fence_after
}

/// What the leader answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Not the leader (or not one a quorum follows): ask the leader.
    NotLeader,
    /// The heartbeat's epoch is fenced: the reason, for the node to rejoin
    /// (`fence`: its kind; `None` if the node is not a member at all).
    Fenced {
        reason: String,
        fence: Option<crate::Fence>,
    },
    /// The coordinator is removing the node, or not coordinating yet.
    NotVouched,
    Renewed {
        shards_version: u64,
        jobs: Vec<JobLease>,
    },
}

/// A heartbeat from `node` under `epoch`, with its `health`.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    pub node: NodeId,
    pub epoch: Epoch,
    pub health: Health,
}

/// The rule. `leads_with_quorum`: this node leads and a quorum acknowledged
/// it recently; `coordinator`: its coordinator, if it runs one (it records
/// the heartbeat as a contact).
pub fn answer_heartbeat(
    now: Millis,
    leads_with_quorum: bool,
    state: &ClusterState,
    coordinator: Option<&mut Coordinator>,
    hb: Heartbeat,
) -> LeaseAnswer {
    if !leads_with_quorum || hb.epoch == 0 {
        return LeaseAnswer::NotLeader;
    }
    if let Some((fence, reason)) = state.refusal_kind(hb.node, hb.epoch) {
        return LeaseAnswer::Fenced { reason, fence };
    }
    let vouched = match coordinator {
        Some(c) => {
            c.on_heartbeat(now, hb.node, hb.epoch, hb.health);
            c.may_ack(hb.node, hb.epoch)
        }
        None => false,
    };
    if !vouched {
        return LeaseAnswer::NotVouched;
    }
    let jobs = state
        .jobs_held_by(hb.node)
        .into_iter()
        .filter(|l| l.holder_epoch == hb.epoch)
        .cloned()
        .collect();
    LeaseAnswer::Renewed {
        shards_version: state.shards.version,
        jobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Response};

    fn hb(node: NodeId, epoch: Epoch) -> Heartbeat {
        Heartbeat {
            node,
            epoch,
            health: Health::Healthy,
        }
    }

    #[test]
    fn only_a_leader_with_a_quorum_and_a_coordinator_renews_a_current_epoch() {
        let s = crate::testkit::configured(crate::testkit::config(3), 1..=3);
        let e2 = s.members[&2].epoch;
        let mut co = Coordinator::new(1, 1, 0);
        assert_eq!(
            answer_heartbeat(10, false, &s, Some(&mut co), hb(2, e2)),
            LeaseAnswer::NotLeader
        );
        assert_eq!(
            answer_heartbeat(10, true, &s, Some(&mut co), hb(2, 0)),
            LeaseAnswer::NotLeader
        );
        assert_eq!(
            answer_heartbeat(10, true, &s, None, hb(2, e2)),
            LeaseAnswer::NotVouched
        );
        assert!(matches!(
            answer_heartbeat(10, true, &s, Some(&mut co), hb(2, e2)),
            LeaseAnswer::Renewed { .. }
        ));
    }

    #[test]
    fn a_superseded_epoch_is_told_why() {
        let mut s = crate::testkit::configured(crate::testkit::config(3), 1..=3);
        let old = s.members[&2].epoch;
        let next = s.applied_index + 1;
        assert!(matches!(
            s.apply(next, Command::Join { node: 2, at: 5 }),
            Response::Joined { .. }
        ));
        let mut co = Coordinator::new(1, 1, 0);
        match answer_heartbeat(10, true, &s, Some(&mut co), hb(2, old)) {
            LeaseAnswer::Fenced { reason, fence } => {
                assert!(!reason.is_empty());
                assert_eq!(fence, Some(crate::Fence::Superseded));
            }
            other => panic!("{other:?}"),
        }
    }
}
