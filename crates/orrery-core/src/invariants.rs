//! The replicated state's invariants, checked after every apply.
//!
//! This module owns the list of what must never happen to a
//! [`ClusterState`] from one applied command to the next: epochs (membership,
//! shard ownership, job leases) only grow, the cluster's stage never regresses
//! or skips within a boot, a member's reported stage never regresses within
//! its epoch and boot, and a committed job period never changes. [`ClusterState::apply`]
//! checks them in debug builds (every test and simulation run) and panics with
//! the log index and the invariant: every voter applies the same commands in
//! the same order, so a violation stops all of them at the same index.
//!
//! It must never change the state or decide anything: it only reads.

use crate::jobs::Jobs;
use crate::shardmap::ShardMap;
use crate::state::Member;
use crate::{ClusterState, NodeId, Stage};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What an applied command broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the highest epoch issued went down from {before} to {after}")]
    LastEpochDown { before: u64, after: u64 },
    #[error("node {node}'s epoch went down from {before} to {after}")]
    MemberEpochDown {
        node: NodeId,
        before: u64,
        after: u64,
    },
    #[error("node {node} holds epoch {epoch}, above the highest issued ({last})")]
    EpochNeverIssued { node: NodeId, epoch: u64, last: u64 },
    #[error("the cluster stage went from {before} to {after} within boot {boot}")]
    StageJump {
        boot: u64,
        before: Stage,
        after: Stage,
    },
    #[error("node {node}'s reported stage went back from {before} to {after} within epoch {epoch} and one boot")]
    ReportBack {
        node: NodeId,
        epoch: u64,
        before: Stage,
        after: Stage,
    },
    #[error("shard {shard}: ownership epoch {before} became {after} (owner {owner})")]
    OwnershipEpoch {
        shard: String,
        owner: NodeId,
        before: u64,
        after: u64,
    },
    #[error("shard {shard} holds ownership epoch {epoch}, above the map's last ({last})")]
    OwnershipNeverIssued {
        shard: String,
        epoch: u64,
        last: u64,
    },
    #[error("job {job}: {what}")]
    Job { job: String, what: String },
}

/// The parts of a state the invariants compare: cheap to take (the large
/// parts are `Arc`s, shared until the apply copies what it changes).
pub struct Before {
    boot: u64,
    stage: Stage,
    last_epoch: u64,
    members: Arc<BTreeMap<NodeId, Member>>,
    shards: Arc<ShardMap>,
    jobs: Jobs,
}

impl Before {
    pub fn of(s: &ClusterState) -> Before {
        Before {
            boot: s.boot,
            stage: s.stage,
            last_epoch: s.last_epoch,
            members: s.members.clone(),
            shards: s.shards.clone(),
            jobs: s.jobs.clone(),
        }
    }
}

/// Every invariant, `before` one apply and `after` it.
pub fn check(before: &Before, after: &ClusterState) -> Result<(), Violation> {
    epochs(before, after)?;
    stage(before, after)?;
    if !Arc::ptr_eq(&before.shards, &after.shards) {
        ownership(&before.shards, &after.shards)?;
    }
    jobs(&before.jobs, &after.jobs)
}

fn epochs(before: &Before, after: &ClusterState) -> Result<(), Violation> {
    if after.last_epoch < before.last_epoch {
        return Err(Violation::LastEpochDown {
            before: before.last_epoch,
            after: after.last_epoch,
        });
    }
    if Arc::ptr_eq(&before.members, &after.members) {
        return Ok(());
    }
    for (&node, m) in after.members.iter() {
        if m.epoch > after.last_epoch {
            return Err(Violation::EpochNeverIssued {
                node,
                epoch: m.epoch,
                last: after.last_epoch,
            });
        }
        let Some(old) = before.members.get(&node) else {
            continue;
        };
        if m.epoch < old.epoch {
            return Err(Violation::MemberEpochDown {
                node,
                before: old.epoch,
                after: m.epoch,
            });
        }
        let same_run = m.epoch == old.epoch && m.epoch != 0 && after.boot == before.boot;
        if same_run && m.report.stage < old.report.stage {
            return Err(Violation::ReportBack {
                node,
                epoch: m.epoch,
                before: old.report.stage,
                after: m.report.stage,
            });
        }
    }
    Ok(())
}

fn stage(before: &Before, after: &ClusterState) -> Result<(), Violation> {
    if after.boot != before.boot || after.stage == before.stage {
        return Ok(());
    }
    if before.stage.next() == Some(after.stage) {
        return Ok(());
    }
    Err(Violation::StageJump {
        boot: after.boot,
        before: before.stage,
        after: after.stage,
    })
}

fn ownership(before: &ShardMap, after: &ShardMap) -> Result<(), Violation> {
    for (shard, e) in &after.entries {
        if e.epoch > after.last_epoch {
            return Err(Violation::OwnershipNeverIssued {
                shard: format!("{shard:?}"),
                epoch: e.epoch,
                last: after.last_epoch,
            });
        }
        let Some(old) = before.entries.get(shard) else {
            continue;
        };
        let moved = old.owner != e.owner;
        if e.epoch < old.epoch || (moved && e.epoch == old.epoch) {
            return Err(Violation::OwnershipEpoch {
                shard: format!("{shard:?}"),
                owner: e.owner,
                before: old.epoch,
                after: e.epoch,
            });
        }
    }
    Ok(())
}

fn jobs(before: &Jobs, after: &Jobs) -> Result<(), Violation> {
    let bad = |job: &str, what: String| Violation::Job {
        job: job.to_string(),
        what,
    };
    for (name, j) in &after.jobs {
        if let Some(l) = &j.lease {
            if l.lease_epoch > j.last_lease_epoch {
                let what = format!(
                    "lease epoch {} above the last issued ({})",
                    l.lease_epoch, j.last_lease_epoch
                );
                return Err(bad(name, what));
            }
        }
        let Some(old) = before.jobs.get(name) else {
            continue;
        };
        if j.last_lease_epoch < old.last_lease_epoch {
            let what = format!(
                "last lease epoch went down from {} to {}",
                old.last_lease_epoch, j.last_lease_epoch
            );
            return Err(bad(name, what));
        }
        if old.spec.period_ms != j.spec.period_ms {
            continue; // Redeclared with another period: its history restarts.
        }
        for (period, c) in &j.commits {
            if old.commits.get(period).is_some_and(|o| o != c) {
                return Err(bad(name, format!("committed period {period} changed")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

    #[test]
    fn a_ready_cluster_and_its_commands_keep_every_invariant() {
        // testkit's cluster applies through ClusterState::apply, which checks
        // after every command in debug builds: reaching here is the test.
        let s = testkit::ready(testkit::config(5));
        assert_eq!(s.stage, Stage::READY);
    }

    #[test]
    fn each_broken_invariant_is_named() {
        let s = testkit::ready(testkit::config(3));
        let before = Before::of(&s);
        let mut after = s.clone();
        after.last_epoch -= 1;
        assert!(matches!(
            check(&before, &after),
            Err(Violation::LastEpochDown { .. } | Violation::EpochNeverIssued { .. })
        ));

        let mut after = s.clone();
        Arc::make_mut(&mut after.members).get_mut(&1).unwrap().epoch = 0;
        let e = check(&before, &after).unwrap_err();
        assert!(
            matches!(e, Violation::MemberEpochDown { node: 1, .. }),
            "{e}"
        );

        let mut after = s.clone();
        after.stage = Stage::NOT_STARTED;
        let e = check(&before, &after).unwrap_err();
        assert!(matches!(e, Violation::StageJump { .. }), "{e}");

        let mut after = s.clone();
        let m = Arc::make_mut(&mut after.members).get_mut(&2).unwrap();
        m.report.stage = Stage::RUNNING;
        let e = check(&before, &after).unwrap_err();
        assert!(matches!(e, Violation::ReportBack { node: 2, .. }), "{e}");
    }

    #[test]
    fn a_shard_moved_without_a_new_ownership_epoch_is_a_violation() {
        use crate::shardmap::{ShardEntry, ShardId};
        let mut s = testkit::ready(testkit::config(3));
        let shard = ShardId { kind: 0, key: 7 };
        let map = Arc::make_mut(&mut s.shards);
        let entry = ShardEntry {
            owner: 1,
            epoch: 1,
            since: 0,
            previous: None,
        };
        map.entries.insert(shard, entry);
        map.last_epoch = 1;
        let before = Before::of(&s);
        let mut after = s.clone();
        let map = Arc::make_mut(&mut after.shards);
        map.entries.get_mut(&shard).unwrap().owner = 2;
        let v = check(&before, &after).unwrap_err();
        assert!(
            matches!(v, Violation::OwnershipEpoch { owner: 2, .. }),
            "{v}"
        );
        // With a new epoch issued the move is fine.
        let map = Arc::make_mut(&mut after.shards);
        map.last_epoch = 2;
        map.entries.get_mut(&shard).unwrap().epoch = 2;
        check(&before, &after).unwrap();
    }
}
