//! Whether the control plane can commit, as this node sees it, and which
//! voters it can reach.
//!
//! Losing a quorum must be loud. With 2 of 3 voters gone nothing commits,
//! and a node that only says "control plane unreachable: node 2: connection
//! refused" (or still names the dead leader) sends the operator the wrong
//! way. Every node keeps when it last heard from each peer (any request from
//! it, any answer to a call to it) and when it last saw proof of a working
//! quorum: on the leader, openraft's quorum acknowledgement; on every other
//! node, an answer the leader gives only with a quorum behind it (a renewed
//! lease, a committed proposal, a linearizable read). Without such proof for
//! `quorum.lost_after_ms` the node says "no quorum: 1 of 3 voters reachable
//! (2, 3 unreachable since ...)" in its status, refuses control-plane
//! requests with that reason ([`AskError::NoQuorum`]) and raises an alarm,
//! kept locally as well (an alarm cannot commit without a quorum). The first
//! new proof clears it. A leader whose replication to a voter keeps failing,
//! and a proposal that waits longer than `quorum.slow_proposal_ms`, alarm
//! the same way, naming the cause.
//!
//! What it must never do: decide membership (a node without a quorum stops
//! serving through its lease, not through this module), or block: every
//! record is an atomic store or a short lock.

use crate::clock::now_ms;
use crate::node::Inner;
use crate::watchdog::Alarm;
use orrery_core::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{info, warn};

const LOG: &str = "orrery::quorum";

/// `[quorum]`: when a node calls its control plane stuck.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuorumConfig {
    /// Without proof of a working quorum for this long, the node says "no
    /// quorum", refuses control-plane requests at once and alarms. Must
    /// exceed `raft.election_max_ms` and twice
    /// `membership.heartbeat_interval_ms`. Default 2500.
    pub lost_after_ms: u64,
    /// A proposal still uncommitted after this long raises an alarm naming
    /// the cause. Default 4000.
    pub slow_proposal_ms: u64,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            lost_after_ms: 2_500,
            slow_proposal_ms: 4_000,
        }
    }
}

impl QuorumConfig {
    pub fn validate(&self, election_max_ms: u64, heartbeat_interval_ms: u64) -> Result<(), String> {
        if !(1..=600_000).contains(&self.lost_after_ms) {
            return Err("quorum.lost_after_ms must be in 1..=600000".into());
        }
        if !(1..=600_000).contains(&self.slow_proposal_ms) {
            return Err("quorum.slow_proposal_ms must be in 1..=600000".into());
        }
        if self.lost_after_ms <= election_max_ms
            || self.lost_after_ms <= heartbeat_interval_ms.saturating_mul(2)
        {
            return Err(format!(
                "quorum.lost_after_ms ({}) must exceed raft.election_max_ms ({election_max_ms}) and twice membership.heartbeat_interval_ms ({heartbeat_interval_ms}), or every election looks like a lost quorum",
                self.lost_after_ms
            ));
        }
        Ok(())
    }
}

/// The control plane cannot commit: no proof of a working quorum for
/// `quorum.lost_after_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoQuorum {
    /// Voters in the configuration.
    pub voters: usize,
    /// Voters this node heard from within `quorum.lost_after_ms` (itself,
    /// if it votes).
    pub reachable: Vec<NodeId>,
    /// The other voters.
    pub unreachable: Vec<NodeId>,
    /// Since when (ms since the Unix epoch) none of the unreachable voters
    /// was heard: the latest of their last contacts. `None`: none ever was.
    pub unreachable_since_ms: Option<u64>,
    /// When this node last saw a working quorum; `None`: not since it started.
    pub quorum_seen_ms: Option<u64>,
    /// The last error reaching an unreachable voter.
    pub last_error: Option<String>,
}

/// `HH:MM:SS UTC` of a wall-clock time in ms since the Unix epoch.
pub fn utc_time(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60
    )
}

fn id_list(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for NoQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no quorum: {} of {} voters reachable",
            self.reachable.len(),
            self.voters
        )?;
        if self.unreachable.is_empty() {
            return match self.quorum_seen_ms {
                Some(t) => write!(f, " (none confirms a leader since {})", utc_time(t)),
                None => write!(f, " (none confirms a leader)"),
            };
        }
        match self.unreachable_since_ms {
            Some(t) => write!(
                f,
                " ({} unreachable since {})",
                id_list(&self.unreachable),
                utc_time(t)
            ),
            None => write!(f, " ({} never reached)", id_list(&self.unreachable)),
        }
    }
}

/// Why a control-plane request (a proposal, a read through the leader)
/// failed. Callers branch on the variant, never on the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// Refused at once, or failed, while this node sees no quorum.
    #[error("{0}")]
    NoQuorum(NoQuorum),
    /// No leader answered (the last error is named).
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The leader committed the command and the state machine rejected it.
    #[error("{0}")]
    Rejected(String),
    /// An answer of the wrong kind.
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

impl From<AskError> for String {
    fn from(e: AskError) -> String {
        e.to_string()
    }
}

/// What this node knows about one peer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Contact {
    /// Monotonic ms of the last request from it or answer by it (0: never).
    pub heard_mono: u64,
    /// The same, as wall-clock ms.
    pub heard_wall: u64,
    /// Monotonic ms of the last stage -3 ping either way (0: never).
    pub pinged_mono: u64,
    /// The last error reaching it.
    pub error: Option<String>,
    /// Raft RPCs to it: the start of the current run of failures (no gap
    /// longer than `lost_after_ms` between two of them; 0: none), the last
    /// failure, and its error. Heartbeats may succeed in between while
    /// every append fails, so a success does not end the run.
    pub raft_failing_since: u64,
    pub raft_failed_at: u64,
    pub raft_error: Option<String>,
}

/// A consistent copy of the contacts at one instant.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    pub now_mono: u64,
    pub peers: BTreeMap<NodeId, Contact>,
    /// Monotonic and wall ms of the last proof of a working quorum (0: never).
    pub quorum_mono: u64,
    pub quorum_wall: u64,
}

/// The control-plane alarms a node keeps locally, one per cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum AlarmKey {
    NoQuorum,
    Replication(NodeId),
    SlowProposal,
    /// This voter's Raft core is stopped (a full disk, a storage error).
    VoterDown,
    /// A resource past a threshold (`crate::resources`).
    Resource(crate::resources::Watched),
}

/// Contacts with peers and proofs of a quorum, recorded from every path
/// that talks to a peer. Shared with the heartbeat thread.
pub(crate) struct Contacts {
    origin: tokio::time::Instant,
    lost_after_ms: u64,
    peers: Mutex<BTreeMap<NodeId, Contact>>,
    quorum_mono: AtomicU64,
    quorum_wall: AtomicU64,
    alarms: Mutex<BTreeMap<AlarmKey, Alarm>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Contacts {
    pub fn new(lost_after_ms: u64) -> Arc<Contacts> {
        Arc::new(Contacts {
            origin: tokio::time::Instant::now(),
            lost_after_ms,
            peers: Mutex::new(BTreeMap::new()),
            quorum_mono: AtomicU64::new(0),
            quorum_wall: AtomicU64::new(0),
            alarms: Mutex::new(BTreeMap::new()),
        })
    }

    /// Monotonic ms since these contacts were created, never 0.
    pub fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// `node` sent a request or answered a call.
    pub fn heard(&self, node: NodeId) {
        let (mono, wall) = (self.mono_ms(), now_ms());
        let mut peers = lock(&self.peers);
        let c = peers.entry(node).or_default();
        c.heard_mono = mono;
        c.heard_wall = wall;
    }

    /// A stage -3 ping crossed between this node and `node` (it pinged
    /// us, or answered ours).
    pub fn pinged(&self, node: NodeId) {
        let mono = self.mono_ms();
        lock(&self.peers).entry(node).or_default().pinged_mono = mono;
    }

    /// Whether a ping crossed with `node` at or after monotonic ms `since`.
    /// Other traffic does not count: a node that reached the control plane
    /// and was then cut off has talked to the voters, but connects to
    /// nobody at stage -3.
    pub fn pinged_since(&self, node: NodeId, since: u64) -> bool {
        lock(&self.peers)
            .get(&node)
            .is_some_and(|c| c.pinged_mono > 0 && c.pinged_mono >= since)
    }

    /// A call to `node` got no answer.
    pub fn failed(&self, node: NodeId, error: &str) {
        lock(&self.peers).entry(node).or_default().error = Some(error.to_string());
    }

    /// A Raft RPC to `node` failed (it may still have answered).
    pub fn raft_failed(&self, node: NodeId, error: &str) {
        let now = self.mono_ms();
        let mut peers = lock(&self.peers);
        let c = peers.entry(node).or_default();
        if c.raft_failing_since == 0 || now.saturating_sub(c.raft_failed_at) > self.lost_after_ms {
            c.raft_failing_since = now;
        }
        c.raft_failed_at = now;
        c.raft_error = Some(error.to_string());
    }

    /// An answer that only a leader with a quorum gives.
    pub fn quorum_seen(&self) {
        self.quorum_mono.store(self.mono_ms(), Ordering::Relaxed);
        self.quorum_wall.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether `node` was heard from within `ms`.
    pub fn heard_within(&self, node: NodeId, ms: u64) -> bool {
        let now = self.mono_ms();
        lock(&self.peers)
            .get(&node)
            .is_some_and(|c| c.heard_mono > 0 && now.saturating_sub(c.heard_mono) <= ms)
    }

    /// The contacts with `nodes` (the voters: every caller judges the
    /// control plane) at one instant. Copying every peer instead cost a
    /// 1,000-node process most of its CPU: `no_quorum` runs on every
    /// request.
    pub fn snapshot(&self, nodes: &[NodeId]) -> Snapshot {
        let peers = lock(&self.peers);
        Snapshot {
            now_mono: self.mono_ms(),
            peers: nodes
                .iter()
                .filter_map(|n| peers.get(n).map(|c| (*n, c.clone())))
                .collect(),
            quorum_mono: self.quorum_mono.load(Ordering::Relaxed),
            quorum_wall: self.quorum_wall.load(Ordering::Relaxed),
        }
    }

    /// Sets the alarm for `key`; true if there was none for it.
    pub fn set_alarm(&self, key: AlarmKey, alarm: Alarm) -> bool {
        lock(&self.alarms).insert(key, alarm).is_none()
    }

    /// Rewrites the alarm for `key` in place (its cause changed), keeping
    /// when it was raised; false if there is none.
    pub fn update_alarm(&self, key: AlarmKey, what: String) -> bool {
        match lock(&self.alarms).get_mut(&key) {
            Some(a) => {
                a.what = what;
                true
            }
            None => false,
        }
    }

    /// Clears the alarm for `key`; true if there was one.
    pub fn clear_alarm(&self, key: AlarmKey) -> bool {
        lock(&self.alarms).remove(&key).is_some()
    }

    /// The alarms in force with their keys.
    pub fn keyed_alarms(&self) -> Vec<(AlarmKey, Alarm)> {
        lock(&self.alarms)
            .iter()
            .map(|(k, a)| (*k, a.clone()))
            .collect()
    }

    /// The alarms in force, oldest first.
    pub fn alarms(&self) -> Vec<Alarm> {
        let mut out: Vec<Alarm> = lock(&self.alarms).values().cloned().collect();
        out.sort_by_key(|a| a.at_ms);
        out
    }
}

/// What [`assess`] needs besides the contacts.
pub(crate) struct Inputs<'a> {
    pub me: NodeId,
    /// Every voter of the configuration.
    pub voters: &'a [NodeId],
    /// While this node leads: ms since a quorum acknowledged it (`u64::MAX`
    /// if never).
    pub leading_ack_age_ms: Option<u64>,
    pub lost_after_ms: u64,
}

/// Whether this node sees a quorum; `Some` says who it can reach if not.
/// `None` also while it is too early to tell (no proof yet, but the node
/// has not waited `lost_after_ms`).
pub(crate) fn assess(i: &Inputs<'_>, s: &Snapshot) -> Option<NoQuorum> {
    let fresh = |at: u64| at > 0 && s.now_mono.saturating_sub(at) <= i.lost_after_ms;
    let leader_ok = i.leading_ack_age_ms.is_some_and(|a| a <= i.lost_after_ms);
    if leader_ok || fresh(s.quorum_mono) {
        return None;
    }
    if s.quorum_mono == 0 && s.now_mono <= i.lost_after_ms {
        return None;
    }
    let (mut reachable, mut unreachable) = (vec![], vec![]);
    let (mut since, mut last_error) = (None, None);
    for v in i.voters {
        let c = s.peers.get(v);
        if *v == i.me || c.is_some_and(|c| fresh(c.heard_mono)) {
            reachable.push(*v);
            continue;
        }
        unreachable.push(*v);
        if let Some(c) = c {
            if c.heard_mono > 0 {
                since = since.max(Some(c.heard_wall));
            }
            if last_error.is_none() {
                last_error = c.error.clone();
            }
        }
    }
    Some(NoQuorum {
        voters: i.voters.len(),
        reachable,
        unreachable,
        unreachable_since_ms: since,
        quorum_seen_ms: (s.quorum_mono > 0).then_some(s.quorum_wall),
        last_error,
    })
}

/// Voters (other than `me`) whose Raft RPCs have been failing for longer
/// than `lost_after_ms` and still fail: (voter, for how long, last error).
pub(crate) fn failing_replication(
    me: NodeId,
    voters: &[NodeId],
    s: &Snapshot,
    lost_after_ms: u64,
) -> Vec<(NodeId, u64, String)> {
    voters
        .iter()
        .filter(|v| **v != me)
        .filter_map(|v| {
            let c = s.peers.get(v)?;
            let recent = s.now_mono.saturating_sub(c.raft_failed_at) <= lost_after_ms;
            let long = s.now_mono.saturating_sub(c.raft_failing_since) > lost_after_ms;
            (c.raft_failing_since > 0 && recent && long).then(|| {
                (
                    *v,
                    s.now_mono.saturating_sub(c.raft_failing_since),
                    c.raft_error.clone().unwrap_or_default(),
                )
            })
        })
        .collect()
}

/// Raises a control-plane alarm: kept in the node's status until its cause
/// clears, logged, and handed to the watchdog for the timeline (which it
/// reaches only once a quorum is back).
pub(crate) fn raise(node: &Inner, key: AlarmKey, what: String) {
    let now = now_ms();
    let alarm = Alarm {
        at_ms: now,
        what: what.clone(),
    };
    if node.contacts.set_alarm(key, alarm) && node.watchdog.raise(now, what.clone()).is_none() {
        warn!(target: LOG, "alarm: {what}");
    }
}

/// The cause of a stuck control plane, for alarms: the failing replication
/// (on the leader) or the last error reaching a voter.
pub(crate) fn cause(node: &Inner) -> String {
    let voters: Vec<NodeId> = node.cfg.voters().keys().copied().collect();
    let s = node.contacts.snapshot(&voters);
    if node.is_leading() {
        let failing =
            failing_replication(node.cfg.node_id, &voters, &s, node.cfg.quorum.lost_after_ms);
        if let Some((v, _, e)) = failing.first() {
            return format!("replication to node {v} failing: {e}");
        }
    }
    voters
        .iter()
        .filter(|v| **v != node.cfg.node_id)
        .find_map(|v| s.peers.get(v)?.error.clone())
        .unwrap_or_default()
}

/// A proposal `name` has waited `waited` without committing.
pub(crate) fn slow_proposal(node: &Inner, name: &str, waited: Duration) {
    let cause = cause(node);
    let sep = if cause.is_empty() { "" } else { ": " };
    raise(
        node,
        AlarmKey::SlowProposal,
        format!(
            "proposal {name} not committed after {} ms{sep}{cause}",
            waited.as_millis()
        ),
    );
}

/// Watches the quorum and the leader's replication; raises and clears the
/// alarms on each change.
pub(crate) async fn watch(node: Arc<Inner>) {
    let every = Duration::from_millis(node.cfg.membership.heartbeat_interval_ms.max(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While lost: whom the node could reach when it last said so.
    let mut lost: Option<Vec<NodeId>> = None;
    let mut failing: BTreeSet<NodeId> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match (node.no_quorum(), &lost) {
            (Some(nq), was) if was.as_ref() != Some(&nq.reachable) => {
                let cause = cause(&node);
                let sep = if cause.is_empty() { "" } else { "; " };
                let what = format!("control plane stuck: {nq}{sep}{cause}");
                if was.is_none() {
                    raise(&node, AlarmKey::NoQuorum, what);
                } else {
                    warn!(target: LOG, "still stuck: {nq}");
                    node.contacts.update_alarm(AlarmKey::NoQuorum, what);
                }
                lost = Some(nq.reachable);
            }
            (None, Some(_)) => {
                lost = None;
                node.contacts.clear_alarm(AlarmKey::NoQuorum);
                info!(target: LOG, "quorum regained: the control plane commits again");
            }
            _ => {}
        }
        check_replication(&node, &mut failing);
    }
}

/// On the leader: an alarm per voter whose replication keeps failing.
fn check_replication(node: &Inner, alarmed: &mut BTreeSet<NodeId>) {
    let voters: Vec<NodeId> = node.cfg.voters().keys().copied().collect();
    let now_failing: BTreeMap<NodeId, (u64, String)> = if node.is_leading() {
        failing_replication(
            node.cfg.node_id,
            &voters,
            &node.contacts.snapshot(&voters),
            node.cfg.quorum.lost_after_ms,
        )
        .into_iter()
        .map(|(v, ms, e)| (v, (ms, e)))
        .collect()
    } else {
        BTreeMap::new()
    };
    for (v, (ms, e)) in &now_failing {
        if alarmed.insert(*v) {
            let what = format!("replication to node {v} failing for {ms} ms: {e}");
            raise(node, AlarmKey::Replication(*v), what);
        }
    }
    alarmed.retain(|v| {
        let still = now_failing.contains_key(v);
        if !still {
            node.contacts.clear_alarm(AlarmKey::Replication(*v));
            info!(target: LOG, "replication to node {v} works again");
        }
        still
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(now: u64, quorum: u64, heard: &[(NodeId, u64)]) -> Snapshot {
        Snapshot {
            now_mono: now,
            peers: heard
                .iter()
                .map(|(id, at)| {
                    (
                        *id,
                        Contact {
                            heard_mono: *at,
                            heard_wall: 1_000_000 + at,
                            error: Some(format!("node {id} unreachable: connection refused")),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            quorum_mono: quorum,
            quorum_wall: if quorum > 0 { 1_000_000 + quorum } else { 0 },
        }
    }

    fn inputs(me: NodeId, leading: Option<u64>) -> Inputs<'static> {
        Inputs {
            me,
            voters: &[1, 2, 3],
            leading_ack_age_ms: leading,
            lost_after_ms: 2_000,
        }
    }

    #[test]
    fn fresh_proof_means_quorum_and_stale_proof_names_the_reachable() {
        assert_eq!(assess(&inputs(1, None), &snap(10_000, 9_000, &[])), None);
        // Too early to tell: no proof yet, but the node is young.
        assert_eq!(assess(&inputs(1, None), &snap(1_500, 0, &[])), None);
        let nq = assess(
            &inputs(1, None),
            &snap(10_000, 5_000, &[(2, 5_000), (3, 4_000)]),
        )
        .expect("no quorum");
        assert_eq!(nq.reachable, vec![1]);
        assert_eq!(nq.unreachable, vec![2, 3]);
        assert_eq!(nq.unreachable_since_ms, Some(1_005_000));
        let text = nq.to_string();
        assert!(
            text.starts_with("no quorum: 1 of 3 voters reachable (2, 3 unreachable since "),
            "{text}"
        );
        assert!(nq.last_error.unwrap().contains("refused"));
    }

    #[test]
    fn a_worker_counts_the_voters_that_answered() {
        let nq = assess(&inputs(4, None), &snap(10_000, 1_000, &[(1, 9_900)])).unwrap();
        assert_eq!((nq.reachable.len(), nq.voters), (1, 3));
        assert_eq!(nq.unreachable_since_ms, None);
        assert!(nq.to_string().contains("2, 3 never reached"), "{nq}");
    }

    #[test]
    fn a_leader_trusts_its_quorum_acknowledgements() {
        assert_eq!(assess(&inputs(1, Some(100)), &snap(10_000, 0, &[])), None);
        assert!(assess(&inputs(1, Some(u64::MAX)), &snap(10_000, 0, &[])).is_some());
    }

    #[test]
    fn replication_failing_despite_heartbeats_is_named() {
        let mut s = snap(10_000, 9_000, &[(2, 9_990)]);
        let c = s.peers.get_mut(&2).unwrap();
        c.raft_failing_since = 6_000;
        c.raft_failed_at = 9_800;
        c.raft_error = Some("frame of 4194400 bytes exceeds the limit".into());
        let f = failing_replication(1, &[1, 2, 3], &s, 2_000);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1), (2, 4_000));
        // A run that ended (no failure for longer than the bound) is over.
        s.peers.get_mut(&2).unwrap().raft_failed_at = 7_000;
        assert!(failing_replication(1, &[1, 2, 3], &s, 2_000).is_empty());
    }

    #[test]
    fn config_bounds() {
        let c = QuorumConfig::default();
        c.validate(800, 200).unwrap();
        assert!(c
            .validate(3_000, 200)
            .unwrap_err()
            .contains("lost_after_ms"));
        let bad = QuorumConfig {
            slow_proposal_ms: 0,
            ..c
        };
        assert!(bad.validate(800, 200).is_err());
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(1_700_000_000_000), "22:13:20 UTC");
    }
}
