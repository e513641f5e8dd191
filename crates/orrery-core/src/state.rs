//! The replicated cluster state and the commands that change it.
//!
//! [`ClusterState::apply`] is the Raft state machine: every voter applies the
//! same committed commands in the same order and must reach the same state,
//! so `apply` is a pure function of (state, log index, command). It
//! validates every command against the state it lands on: a coordinator that
//! lost leadership, or a node process whose epoch was superseded, gets a
//! `Rejected` response and changes nothing.
//!
//! Job commands (`DeclareJobs`, `GrantJob`, `CommitJob`, `JobUnassigned`,
//! `JobOverdue`) are validated in [`crate::jobs`].
//!
//! What it must never do: read a clock (timestamps travel inside commands),
//! trust a command's claim without checking it against the state, or grow
//! without bound (the event list is a ring of [`MAX_EVENTS`]).

use crate::config::{ClusterConfig, Role};
use crate::jobs::{JobSpec, Jobs};
use crate::shardmap::{KindSpec, Move, ShardMap};
use crate::{Epoch, Millis, NodeId, Stage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

/// How many events the replicated state keeps (oldest dropped first).
pub const MAX_EVENTS: usize = 1024;
/// Alarms recorded per window, cluster-wide; more are refused (the
/// raising node still logs them).
pub const MAX_ALARMS_PER_WINDOW: u32 = 30;
pub const ALARM_WINDOW_MS: Millis = 60_000;
pub(crate) use limits::clip_to;
pub use limits::MAX_TEXT;

/// Bounds on every string or list a peer can send that a node keeps, in
/// one place: one constant per kind (bytes unless named otherwise), and the
/// helpers that apply them. Clipping cuts on a UTF-8 character boundary
/// and gives back the cut string's spare capacity, so what is kept is
/// bounded in memory, not only in length.
pub mod limits {
    /// Longest free-text field (diagnosis, reason, event detail) the
    /// replicated state stores.
    pub const MAX_TEXT: usize = 512;
    /// Longest health reason the failure detector keeps from a heartbeat.
    pub const MAX_REASON: usize = MAX_TEXT;
    /// Longest accusation or probe detail the failure detector keeps.
    pub const MAX_DETAIL: usize = 256;
    /// Accusations the detector holds between two ticks (more are dropped
    /// and counted as ignored).
    pub const MAX_PENDING_ACCUSATIONS: usize = 1024;
    /// Entries of a reported wait cycle kept (the rest is counted in one
    /// final entry).
    pub const MAX_CYCLE_ENTRIES: usize = 16;
    /// Longest wait-cycle entry.
    pub const MAX_CYCLE_ENTRY: usize = 128;
    /// Longest forwarded log line the collector keeps.
    pub const MAX_LOG_LINE: usize = 4 * 1024;
    /// Forwarded log lines taken from one batch (the rest is dropped and
    /// counted).
    pub const MAX_LOG_BATCH: usize = 10_000;
    /// Longest short name a peer sends that is kept (log channel, level).
    pub const MAX_NAME: usize = 64;

    /// `s`, cut to at most `max` bytes on a character boundary.
    pub fn clip_to(mut s: String, max: usize) -> String {
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.shrink_to_fit();
        }
        s
    }

    /// At most `max_entries` entries of at most `max_bytes` each; when
    /// entries were dropped, one more entry says how many.
    pub fn clip_list(list: Vec<String>, max_entries: usize, max_bytes: usize) -> Vec<String> {
        let dropped = list.len().saturating_sub(max_entries);
        let mut out: Vec<String> = list
            .into_iter()
            .take(max_entries)
            .map(|e| clip_to(e, max_bytes))
            .collect();
        if dropped > 0 {
            out.push(format!("... {dropped} more"));
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn clipping_cuts_on_a_char_boundary_and_frees_the_rest() {
            // "é" is 2 bytes, "€" 3, "🦀" 4: every cut point lands inside one.
            for ch in ["é", "€", "🦀"] {
                let s = ch.repeat(1000);
                for max in 0..12 {
                    let c = clip_to(s.clone(), max);
                    assert!(c.len() <= max && max - c.len() < ch.len(), "{ch} {max}");
                    assert!(c.chars().all(|x| x.to_string() == ch));
                }
                let c = clip_to(s, 100);
                assert!(c.capacity() < 200, "capacity {}", c.capacity());
            }
            assert_eq!(clip_to("short".into(), 5), "short");
            assert_eq!(clip_to(String::new(), 0), "");
        }

        #[test]
        fn lists_are_bounded_in_entries_and_bytes() {
            let long = vec!["x".repeat(1000); 100];
            let c = clip_list(long, MAX_CYCLE_ENTRIES, MAX_CYCLE_ENTRY);
            assert_eq!(c.len(), MAX_CYCLE_ENTRIES + 1);
            assert!(c.iter().all(|e| e.len() <= MAX_CYCLE_ENTRY));
            assert_eq!(c.last().unwrap(), "... 84 more");
            let short = vec!["a".to_string(), "b".to_string()];
            assert_eq!(clip_list(short.clone(), 2, 10), short);
        }

        #[test]
        fn a_deadlock_of_huge_entries_is_recorded_clipped() {
            use crate::state::{Command, EventKind, Response};
            let mut s = crate::testkit::configured(crate::testkit::config(3), 1..=3);
            let huge = "é".repeat(2 * 1024 * 1024);
            let cycle = vec![huge; 64];
            let r = crate::testkit::apply(&mut s, Command::Deadlock { cycle, at: 1 });
            assert_eq!(r, Response::Ok);
            let e = s.events.back().unwrap();
            assert_eq!(e.kind, EventKind::Deadlock);
            assert!(
                e.detail.len() <= MAX_TEXT && e.detail.contains("é"),
                "{}",
                e.detail.len()
            );
        }
    }
}

/// What a node is waiting on, as it reports it: the stuck-node diagnosis the
/// post-mortem's engineers never had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// The service (or runtime component) doing the waiting.
    pub service: String,
    /// The step within the service.
    pub step: String,
    /// Since when (injected clock).
    pub since: Millis,
    /// The node it waits on, if the wait is on another node.
    pub on_node: Option<NodeId>,
    /// For what, in words.
    pub what: String,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.service, self.step)?;
        if let Some(n) = self.on_node {
            write!(f, " (waiting on node {n}")?;
            if !self.what.is_empty() {
                write!(f, ": {}", self.what)?;
            }
            write!(f, ")")
        } else if !self.what.is_empty() {
            write!(f, " ({})", self.what)
        } else {
            Ok(())
        }
    }
}

/// Progress counts of the current stage's work (e.g. items preloaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// A node's latest report, as the control plane holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    /// Last stage completed.
    pub stage: Stage,
    /// When the report was made (node's clock).
    pub at: Millis,
    /// What it waits on now, if anything.
    pub waiting: Option<Wait>,
    /// Progress of the work towards the next stage.
    pub progress: Option<Progress>,
    /// Peers it must talk to but is not connected to (stage -3 connectivity).
    pub unreachable: Vec<NodeId>,
    /// When each stage was completed in this boot, by this node.
    pub completed_at: BTreeMap<i8, Millis>,
}

impl StageReport {
    fn fresh(stage: Stage, at: Millis) -> Self {
        let mut completed_at = BTreeMap::new();
        if stage != Stage::NOT_STARTED {
            completed_at.insert(stage.number(), at);
        }
        StageReport {
            stage,
            at,
            waiting: None,
            progress: None,
            unreachable: vec![],
            completed_at,
        }
    }
}

/// Whether a member takes part in the current boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    Active,
    /// Fenced out of the current start-up by the coordinator.
    Excluded {
        reason: String,
        at: Millis,
    },
    /// Removed by the failure detector (or by its own fail-stop): its epoch
    /// is revoked. It may come back only under a new epoch, once reinstated.
    Removed {
        reason: String,
        at: Millis,
    },
    /// Left the cluster by its own decision ([`Command::Leave`]): it
    /// stopped serving first, its epoch is revoked, nobody suspects or
    /// probes it, its shards move at once. It comes back like any restart,
    /// under a new epoch, with no confidence vote. Kept through a new boot:
    /// a node that left does not hold the barrier.
    Left {
        at: Millis,
    },
}

/// A member's health record, as the coordinator last committed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    pub healthy: bool,
    /// Since when it has been in this state.
    pub since: Millis,
    /// Why it is impaired, if it is.
    pub reason: Option<String>,
}

/// One member, as the control plane knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Epoch of the member's current process (0: never joined).
    pub epoch: Epoch,
    pub status: MemberStatus,
    pub report: StageReport,
    /// The boot this process was admitted to run in after the cluster was
    /// already ready (a late joiner), if any.
    pub admitted_late_in_boot: Option<u64>,
    /// The boot the coordinator excluded this node from, if any. A process
    /// that rejoins while that boot is still starting sits it out
    /// ([`ClusterState::sits_out`]): it waits for stage 0 and is admitted
    /// late, instead of holding the barrier (and being excluded) again.
    #[serde(default)]
    pub excluded_in_boot: Option<u64>,
    pub health: MemberHealth,
    /// How many times the failure detector removed this node (for backoff).
    pub removals: u32,
    /// Asked to hand all its shards off (and take none) until undrained.
    #[serde(default)]
    pub draining: bool,
    pub last_removed_at: Millis,
}

/// What happened, for the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    BootStarted,
    NodeJoined,
    NodeAdmittedLate,
    StageAdvanced,
    NodeStuck,
    NodeExcluded,
    LeaderChanged,
    NodeSuspected,
    NodeRefuted,
    NodeRemoved,
    NodeImpaired,
    NodeRecovered,
    NodeReinstated,
    ShardsDeclared,
    ShardsMoved,
    Deadlock,
    NodeDraining,
    /// A node raised an alarm about itself (event-loop lag, a blocked
    /// handler, a stalled log sink), naming the culprit.
    Alarm,
    /// The services declared their per-period jobs.
    JobsDeclared,
    /// A node was granted a job's period (a lease epoch), possibly taking
    /// it over from a holder that was fenced or impaired.
    JobGranted,
    /// A job's period was committed under its current lease.
    JobCommitted,
    /// No node may run a job's period (none eligible).
    JobUnassigned,
    /// A job's period was not committed by its deadline.
    JobOverdue,
    /// A node's certificates were revoked below a serial.
    CertificatesRevoked,
    /// A node left the cluster by its own decision (SIGTERM): not a
    /// failure, never suspected.
    NodeLeft,
    /// An operator's action (a rolling restart, a failover drill) and its
    /// outcome, recorded for the timeline ([`Command::Operation`]).
    Operation,
    /// A cluster-wide configuration key changed ([`Command::SetConfig`]).
    ConfigChanged,
}

/// One entry in the replicated event list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Raft log index of the command that caused it.
    pub index: u64,
    pub at: Millis,
    pub kind: EventKind,
    pub node: Option<NodeId>,
    pub detail: String,
}

/// A change to the cluster state. Every command carries the proposer's
/// timestamp: `apply` never reads a clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Written once when the control plane is bootstrapped.
    Configure { config: ClusterConfig, at: Millis },
    /// A node process reached the control plane: issues it a new epoch.
    Join { node: NodeId, at: Millis },
    /// A node reports its stage and what it waits on.
    Report {
        node: NodeId,
        epoch: Epoch,
        stage: Stage,
        waiting: Option<Wait>,
        progress: Option<Progress>,
        unreachable: Vec<NodeId>,
        at: Millis,
    },
    /// Coordinator: every participant has completed the stage after `from`.
    Advance { boot: u64, from: Stage, at: Millis },
    /// Coordinator: `node` missed the deadline for `stage`.
    Stuck {
        boot: u64,
        node: NodeId,
        stage: Stage,
        diagnosis: String,
        at: Millis,
    },
    /// Coordinator: fence `node` (at `epoch`) out of this start-up.
    Exclude {
        boot: u64,
        node: NodeId,
        epoch: Epoch,
        reason: String,
        at: Millis,
    },
    /// Coordinator: the cluster was ready and a node process rejoined while
    /// others kept running: it may catch up on its own.
    AdmitLate {
        node: NodeId,
        epoch: Epoch,
        at: Millis,
    },
    /// Coordinator: the cluster was ready but nothing of it is running any
    /// more (a cluster-wide restart): start a new boot at the barrier.
    BeginBoot {
        /// The boot this replaces (guards against a stale coordinator).
        after: u64,
        /// Members heard from recently, with the epoch heard.
        live: BTreeSet<(NodeId, Epoch)>,
        at: Millis,
    },
    /// Coordinator: a new Raft leader took over coordination.
    LeaderChanged {
        leader: NodeId,
        term: u64,
        at: Millis,
    },
    /// Coordinator: `node`'s lease lapsed; probes are under way.
    Suspect {
        node: NodeId,
        epoch: Epoch,
        reason: String,
        at: Millis,
    },
    /// Coordinator: the suspect answered (itself, or a quorum of probes).
    Refute {
        node: NodeId,
        epoch: Epoch,
        detail: String,
        at: Millis,
    },
    /// Coordinator: revoke `node`'s epoch (a quorum of eligible probes
    /// failed, or the node declared fail-stop).
    Remove {
        node: NodeId,
        epoch: Epoch,
        reason: String,
        at: Millis,
    },
    /// Coordinator: the shard kinds the services declare.
    DeclareShards { kinds: Vec<KindSpec>, at: Millis },
    /// Coordinator: move shards (placement step); each moved shard gets a
    /// new ownership epoch.
    MoveShards {
        moves: Vec<Move>,
        reason: String,
        at: Millis,
    },
    /// An operator drains `node` (it hands all its shards off and takes
    /// none) or undrains it.
    Drain {
        node: NodeId,
        drain: bool,
        at: Millis,
    },
    /// A node detected a wait cycle between shards; one event with it.
    Deadlock { cycle: Vec<String>, at: Millis },
    /// A node reports an alarm about itself (its watchdog saw the event
    /// loop lag or a handler block; a log sink stalled). Recorded for the
    /// timeline only: an alarm never changes membership.
    Alarm {
        node: NodeId,
        epoch: Epoch,
        what: String,
        at: Millis,
    },
    /// Coordinator: `node`'s own health report changed.
    HealthChanged {
        node: NodeId,
        epoch: Epoch,
        healthy: bool,
        reason: Option<String>,
        at: Millis,
    },
    /// The per-period singleton jobs the services declare (replaces the
    /// declared set; see [`crate::jobs`]).
    DeclareJobs { jobs: Vec<JobSpec>, at: Millis },
    /// Coordinator: `holder` (process `holder_epoch`) runs `period` of `job`
    /// under `lease_epoch`, the job's next lease epoch. Refused while the
    /// period's current lease still binds.
    GrantJob {
        job: String,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
        holder_epoch: Epoch,
        at: Millis,
    },
    /// A holder commits its period's output, presenting its token; accepted
    /// only under the job's current lease, from a current, healthy holder,
    /// once per period.
    CommitJob {
        job: String,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
        holder_epoch: Epoch,
        summary: String,
        at: Millis,
    },
    /// Coordinator: no node may run the current period of `job`.
    JobUnassigned {
        job: String,
        period: u64,
        reason: String,
        at: Millis,
    },
    /// Coordinator: the current period of `job` passed its deadline uncommitted.
    JobOverdue {
        job: String,
        period: u64,
        at: Millis,
    },
    /// The current holder of (job, period) found the period's output
    /// already in the store under an older lease epoch (its holder died
    /// after writing it and before committing it here): commit the period
    /// as that output, instead of running it again or never.
    AdoptJobCommit {
        job: String,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
        holder_epoch: Epoch,
        /// The lease epoch the store's output was written under.
        stored_lease_epoch: u64,
        at: Millis,
    },
    /// An operator revokes `node`'s certificates: from now on only serials
    /// at or above `min_serial` are accepted, so every certificate issued
    /// to it before is refused at the TLS handshake and the connections
    /// made with one are closed. The floor never goes down; the node comes
    /// back only with a newly issued certificate (`orrery ca issue`).
    RevokeCertificates {
        node: NodeId,
        min_serial: u64,
        at: Millis,
    },
    /// `node` (process `epoch`) leaves the cluster: it has stopped serving
    /// (fence first) and is about to exit. Its epoch is revoked, it is
    /// never suspected, and its shards move at once. Only its current
    /// epoch may leave.
    Leave {
        node: NodeId,
        epoch: Epoch,
        at: Millis,
    },
    /// An operator's action and its outcome (`orrery roll`, `orrery drill`:
    /// "roll started", "node 3 restarted in 2100 ms", "drill leader: ok ..."),
    /// proposed through a voter's console with the admin token. Recorded
    /// for the timeline only: it changes nothing else.
    Operation {
        what: String,
        detail: String,
        at: Millis,
    },
    /// An operator changes a cluster-wide key (`config set KEY VALUE`,
    /// through a voter's console with the admin token). Validated in
    /// `apply` ([`crate::config::ClusterConfig::with_key`]); recorded in the
    /// timeline with the old and the new value.
    SetConfig {
        key: String,
        value: String,
        at: Millis,
    },
}

impl Command {
    /// The proposer's timestamp (every command carries one). The leader
    /// checks it against its own clock before proposing a peer's command:
    /// windows and budgets in `apply` are kept on it.
    pub fn at(&self) -> Millis {
        match self {
            Command::Configure { at, .. }
            | Command::Join { at, .. }
            | Command::Report { at, .. }
            | Command::Advance { at, .. }
            | Command::Stuck { at, .. }
            | Command::Exclude { at, .. }
            | Command::AdmitLate { at, .. }
            | Command::BeginBoot { at, .. }
            | Command::LeaderChanged { at, .. }
            | Command::Suspect { at, .. }
            | Command::Refute { at, .. }
            | Command::Remove { at, .. }
            | Command::DeclareShards { at, .. }
            | Command::MoveShards { at, .. }
            | Command::Drain { at, .. }
            | Command::Deadlock { at, .. }
            | Command::Alarm { at, .. }
            | Command::HealthChanged { at, .. }
            | Command::DeclareJobs { at, .. }
            | Command::GrantJob { at, .. }
            | Command::CommitJob { at, .. }
            | Command::JobUnassigned { at, .. }
            | Command::JobOverdue { at, .. }
            | Command::AdoptJobCommit { at, .. }
            | Command::RevokeCertificates { at, .. }
            | Command::Leave { at, .. }
            | Command::Operation { at, .. }
            | Command::SetConfig { at, .. } => *at,
        }
    }
}

/// The result of applying a command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    Ok,
    /// A join was accepted under this epoch.
    Joined { epoch: Epoch },
    /// The command changed nothing: why, for people (`reason`), and what
    /// kind of refusal, for code (`kind`; never branch on `reason`).
    Rejected { reason: String, kind: Rejection },
}

/// What kind of refusal a [`Response::Rejected`] is: what callers decide on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// Any other refusal (invalid, stale coordinator, no change, ...).
    #[default]
    Other,
    /// The cluster is not configured yet: try again shortly.
    NotConfigured,
    /// The proposer's process is fenced: it must stop and rejoin.
    Fenced(Fence),
    /// The job period was committed already, under this lease epoch.
    AlreadyCommitted { lease_epoch: u64 },
    /// A job token that no longer binds (a newer lease, a fenced holder).
    StaleToken,
}

/// Why a process's epoch no longer counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fence {
    /// A newer process of the same node joined.
    Superseded,
    /// Excluded from this start-up.
    Excluded,
    /// Removed (declared dead) or its epoch otherwise revoked.
    Revoked,
    /// It left the cluster.
    Left,
}

/// Whether a node may start work on a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gate {
    Open,
    /// Not yet: the cluster has not completed the stage before it.
    Closed {
        reason: String,
    },
    /// Never, under this epoch: superseded or excluded (`fence`; `None`:
    /// the node is not a member at all).
    Fenced {
        reason: String,
        fence: Option<Fence>,
    },
}

/// The replicated cluster state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The large parts of the state sit behind `Arc`s: the control plane
    /// publishes every applied batch while readers still hold the previous
    /// one, so an apply copies only the parts it changes
    /// (`Arc::make_mut`), never the whole state.
    pub config: Arc<ClusterConfig>,
    pub configured: bool,
    /// Log index of the last `config set` (0: the bootstrap configuration):
    /// nodes that hold a copy of the state refetch it when this grows.
    #[serde(default)]
    pub config_index: u64,
    /// Start-up generation: a cluster-wide restart starts a new boot.
    pub boot: u64,
    /// Last stage every participant has completed in this boot.
    pub stage: Stage,
    /// When the cluster entered `stage` (deadline clock).
    pub stage_since: Millis,
    /// When each cluster stage was reached in this boot, by stage number.
    pub stage_reached_at: BTreeMap<i8, Millis>,
    pub boot_started_at: Millis,
    pub members: Arc<BTreeMap<NodeId, Member>>,
    /// Highest epoch ever issued; epochs never repeat.
    pub last_epoch: Epoch,
    /// (boot, stage number, node) already reported stuck.
    pub stuck_reported: BTreeSet<(u64, i8, NodeId)>,
    pub events: Arc<VecDeque<Event>>,
    /// Raft log index of the last applied command.
    pub applied_index: u64,
    /// Current coordinator, as last announced.
    pub leader: Option<NodeId>,
    /// Which node owns which shard, under which ownership epoch.
    pub shards: Arc<ShardMap>,
    /// Per-period singleton jobs: declared jobs, leases, committed periods.
    #[serde(default)]
    pub jobs: Jobs,
    /// (window start, alarms recorded in it): see [`MAX_ALARMS_PER_WINDOW`].
    #[serde(default)]
    pub alarm_window: (Millis, u32),
    /// Per node, the lowest certificate serial still accepted
    /// ([`Command::RevokeCertificates`]); absent: every serial.
    #[serde(default)]
    pub cert_floor: BTreeMap<NodeId, u64>,
}

impl Default for Stage {
    fn default() -> Self {
        Stage::NOT_STARTED
    }
}

fn clip(s: String) -> String {
    clip_to(s, MAX_TEXT)
}

fn clip_wait(w: Option<Wait>) -> Option<Wait> {
    w.map(|w| Wait {
        service: clip(w.service),
        step: clip(w.step),
        since: w.since,
        on_node: w.on_node,
        what: clip(w.what),
    })
}

impl Command {
    /// The command's name ("Join", "CommitJob"), for logs, alarms and
    /// invariant reports.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Join { .. } => "Join",
            Command::Report { .. } => "Report",
            Command::Alarm { .. } => "Alarm",
            Command::Leave { .. } => "Leave",
            Command::CommitJob { .. } => "CommitJob",
            Command::AdoptJobCommit { .. } => "AdoptJobCommit",
            Command::Drain { .. } => "Drain",
            Command::Deadlock { .. } => "Deadlock",
            Command::RevokeCertificates { .. } => "RevokeCertificates",
            Command::Operation { .. } => "Operation",
            Command::SetConfig { .. } => "SetConfig",
            Command::Configure { .. } => "Configure",
            Command::Advance { .. } => "Advance",
            Command::Stuck { .. } => "Stuck",
            Command::Exclude { .. } => "Exclude",
            Command::AdmitLate { .. } => "AdmitLate",
            Command::BeginBoot { .. } => "BeginBoot",
            Command::LeaderChanged { .. } => "LeaderChanged",
            Command::Suspect { .. } => "Suspect",
            Command::Refute { .. } => "Refute",
            Command::Remove { .. } => "Remove",
            Command::DeclareShards { .. } => "DeclareShards",
            Command::MoveShards { .. } => "MoveShards",
            Command::HealthChanged { .. } => "HealthChanged",
            Command::DeclareJobs { .. } => "DeclareJobs",
            Command::GrantJob { .. } => "GrantJob",
            Command::JobUnassigned { .. } => "JobUnassigned",
            Command::JobOverdue { .. } => "JobOverdue",
        }
    }
}

impl ClusterState {
    /// Applies one committed command. Pure: same state and command, same
    /// result. Debug builds (every test and simulation) check the
    /// [`crate::invariants`] after it and stop at the first violation, with
    /// the index: every voter stops at the same one.
    pub fn apply(&mut self, index: u64, command: Command) -> Response {
        if !cfg!(debug_assertions) {
            return self.apply_unchecked(index, command);
        }
        let before = crate::invariants::Before::of(self);
        let what = command.name();
        let r = self.apply_unchecked(index, command);
        if let Err(v) = crate::invariants::check(&before, self) {
            panic!("invariant violated by {what} at log index {index}: {v}");
        }
        r
    }

    fn apply_unchecked(&mut self, index: u64, command: Command) -> Response {
        debug_assert!(index > self.applied_index || index == 0);
        self.applied_index = index;
        if !self.configured && !matches!(command, Command::Configure { .. }) {
            return reject_as(
                Rejection::NotConfigured,
                "the cluster is not configured yet",
            );
        }
        match command {
            Command::Configure { config, at } => self.configure(index, config, at),
            Command::Join { node, at } => self.join(index, node, at),
            Command::Report {
                node,
                epoch,
                stage,
                waiting,
                progress,
                unreachable,
                at,
            } => self.report(node, epoch, stage, waiting, progress, unreachable, at),
            Command::Advance { boot, from, at } => self.advance(index, boot, from, at),
            Command::Stuck {
                boot,
                node,
                stage,
                diagnosis,
                at,
            } => {
                if boot != self.boot {
                    return reject("stale boot");
                }
                if !self.stuck_reported.insert((boot, stage.number(), node)) {
                    return reject("already reported");
                }
                self.event(index, at, EventKind::NodeStuck, Some(node), clip(diagnosis));
                Response::Ok
            }
            Command::Exclude {
                boot,
                node,
                epoch,
                reason,
                at,
            } => self.exclude(index, boot, node, epoch, reason, at),
            Command::AdmitLate { node, epoch, at } => {
                let boot = self.boot;
                let Some(m) = Arc::make_mut(&mut self.members).get_mut(&node) else {
                    return reject(format!("unknown node {node}"));
                };
                if m.epoch != epoch {
                    return reject(format!("node {node} epoch {epoch} superseded"));
                }
                if self.stage != Stage::READY {
                    return reject("the cluster is not ready: the node takes part in the boot");
                }
                m.admitted_late_in_boot = Some(boot);
                if m.removals > 0 {
                    let n = m.removals;
                    self.event(
                        index,
                        at,
                        EventKind::NodeReinstated,
                        Some(node),
                        format!("node {node} reinstated under epoch {epoch} after a confidence vote (removed {n} time(s) before)"),
                    );
                    return Response::Ok;
                }
                self.event(
                    index,
                    at,
                    EventKind::NodeAdmittedLate,
                    Some(node),
                    format!("node {node} (epoch {epoch}) rejoined a running cluster and catches up on its own"),
                );
                Response::Ok
            }
            Command::BeginBoot { after, live, at } => self.begin_boot(index, after, live, at),
            Command::DeclareShards { kinds, at } => {
                let n = kinds.len();
                match Arc::make_mut(&mut self.shards).declare(kinds) {
                    Ok(true) => {}
                    Ok(false) => return reject("no change"),
                    Err(e) => return reject(e.to_string()),
                }
                let total = self.shards.shards().count();
                self.event(
                    index,
                    at,
                    EventKind::ShardsDeclared,
                    None,
                    format!("{n} shard kind(s) declared, {total} shards"),
                );
                Response::Ok
            }
            Command::MoveShards { moves, reason, at } => {
                // Only moves that still make sense land: the source must be
                // the current owner, the target a serving-capable member.
                let valid: Vec<Move> = moves
                    .into_iter()
                    .filter(|m| {
                        self.shards.owner(m.shard).map(|e| e.owner) == m.from
                            && self
                                .members
                                .get(&m.to)
                                .is_some_and(|t| t.status == MemberStatus::Active && t.epoch > 0)
                            && self
                                .config
                                .nodes
                                .get(&m.to)
                                .is_some_and(|s| s.role.hosts_services())
                    })
                    .collect();
                if valid.is_empty() {
                    return reject("no valid move");
                }
                let changed = Arc::make_mut(&mut self.shards).apply(&valid, at);
                let version = self.shards.version;
                self.event(
                    index,
                    at,
                    EventKind::ShardsMoved,
                    None,
                    clip(format!(
                        "{changed} shard(s) moved ({reason}); shard map version {version}"
                    )),
                );
                Response::Ok
            }
            Command::Drain { node, drain, at } => {
                match self.members.get(&node) {
                    None => {
                        return reject(format!("node {node} is not in the cluster configuration"))
                    }
                    Some(m) if m.draining == drain => return reject("no change"),
                    Some(_) => {}
                }
                if let Some(m) = Arc::make_mut(&mut self.members).get_mut(&node) {
                    m.draining = drain;
                }
                let what = if drain {
                    "draining: it hands all its shards off"
                } else {
                    "no longer draining"
                };
                self.event(
                    index,
                    at,
                    EventKind::NodeDraining,
                    Some(node),
                    format!("node {node} {what}"),
                );
                Response::Ok
            }
            Command::RevokeCertificates {
                node,
                min_serial,
                at,
            } => self.revoke_certificates(index, node, min_serial, at),
            Command::Leave { node, epoch, at } => self.leave(index, node, epoch, at),
            Command::SetConfig { key, value, at } => self.set_config(index, &key, &value, at),
            Command::Operation { what, detail, at } => {
                let what = what.trim();
                if what.is_empty() {
                    return reject("an operation names what it is");
                }
                let text = clip(format!("{}: {detail}", clip_to(what.to_string(), 64)));
                self.event(index, at, EventKind::Operation, None, text);
                Response::Ok
            }
            Command::Alarm {
                node,
                epoch,
                what,
                at,
            } => {
                if self.current(node, epoch).is_none() {
                    return reject(format!("node {node} epoch {epoch} is not current"));
                }
                if let Err(reason) = self.take_alarm_budget(at) {
                    return reject(reason);
                }
                self.event(
                    index,
                    at,
                    EventKind::Alarm,
                    Some(node),
                    clip(format!("node {node}: {what}")),
                );
                Response::Ok
            }
            Command::Deadlock { cycle, at } => {
                if let Err(reason) = self.take_alarm_budget(at) {
                    return reject(reason);
                }
                let cycle = limits::clip_list(cycle, limits::MAX_CYCLE_ENTRIES, limits::MAX_CYCLE_ENTRY);
                let text = cycle.join(" -> ");
                self.event(
                    index,
                    at,
                    EventKind::Deadlock,
                    None,
                    clip(format!("wait cycle detected and failed: {text}")),
                );
                Response::Ok
            }
            Command::Suspect {
                node,
                epoch,
                reason,
                at,
            } => {
                if self.current(node, epoch).is_none() {
                    return reject(format!("node {node} epoch {epoch} is not current"));
                }
                self.event(
                    index,
                    at,
                    EventKind::NodeSuspected,
                    Some(node),
                    clip(format!("node {node} (epoch {epoch}) suspected: {reason}")),
                );
                Response::Ok
            }
            Command::Refute {
                node,
                epoch,
                detail,
                at,
            } => {
                if self.current(node, epoch).is_none() {
                    return reject(format!("node {node} epoch {epoch} is not current"));
                }
                self.event(
                    index,
                    at,
                    EventKind::NodeRefuted,
                    Some(node),
                    clip(format!(
                        "node {node} (epoch {epoch}) is not removed: {detail}"
                    )),
                );
                Response::Ok
            }
            Command::Remove {
                node,
                epoch,
                reason,
                at,
            } => {
                let Some(m) = self.current(node, epoch) else {
                    return reject(format!("node {node} epoch {epoch} is not current"));
                };
                let reason = clip(reason);
                m.status = MemberStatus::Removed {
                    reason: reason.clone(),
                    at,
                };
                m.removals += 1;
                m.last_removed_at = at;
                m.admitted_late_in_boot = None;
                self.event(
                    index,
                    at,
                    EventKind::NodeRemoved,
                    Some(node),
                    format!("node {node} removed, epoch {epoch} revoked: {reason}"),
                );
                Response::Ok
            }
            Command::HealthChanged {
                node,
                epoch,
                healthy,
                reason,
                at,
            } => {
                let Some(m) = self.current(node, epoch) else {
                    return reject(format!("node {node} epoch {epoch} is not current"));
                };
                if m.health.healthy == healthy && m.health.reason == reason {
                    return reject("no change");
                }
                m.health = MemberHealth {
                    healthy,
                    since: at,
                    reason: reason.clone().map(clip),
                };
                let (kind, detail) = if healthy {
                    (
                        EventKind::NodeRecovered,
                        format!("node {node} (epoch {epoch}) passes its self-checks again"),
                    )
                } else {
                    (
                        EventKind::NodeImpaired,
                        format!(
                            "node {node} (epoch {epoch}) impaired: {}; it no longer probes or votes",
                            reason.unwrap_or_default()
                        ),
                    )
                };
                self.event(index, at, kind, Some(node), clip(detail));
                Response::Ok
            }
            Command::DeclareJobs { jobs, at } => self.declare_jobs(index, jobs, at),
            Command::GrantJob {
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                at,
            } => self.grant_job(index, job, period, lease_epoch, holder, holder_epoch, at),
            Command::CommitJob {
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                summary,
                at,
            } => self.commit_job(
                index,
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                summary,
                None,
                at,
            ),
            Command::AdoptJobCommit {
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                stored_lease_epoch,
                at,
            } => self.commit_job(
                index,
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                format!(
                    "adopted the store's output of lease epoch {stored_lease_epoch} (its holder died before committing it here)"
                ),
                Some(stored_lease_epoch),
                at,
            ),
            Command::JobUnassigned {
                job,
                period,
                reason,
                at,
            } => self.job_unassigned(index, job, period, reason, at),
            Command::JobOverdue { job, period, at } => self.job_overdue(index, job, period, at),
            Command::LeaderChanged { leader, term, at } => {
                if self.leader == Some(leader) {
                    // Proposed again after a write that did commit: no news.
                    return Response::Ok;
                }
                self.leader = Some(leader);
                self.event(
                    index,
                    at,
                    EventKind::LeaderChanged,
                    Some(leader),
                    format!("node {leader} leads the control plane (term {term}) and coordinates start-up"),
                );
                Response::Ok
            }
        }
    }

    fn configure(&mut self, index: u64, config: ClusterConfig, at: Millis) -> Response {
        if self.configured {
            return reject("already configured");
        }
        if config.nodes.is_empty() || config.voters().is_empty() {
            return reject("a cluster needs at least one node and one voter");
        }
        self.config = Arc::new(config);
        self.configured = true;
        self.members = Arc::new(
            self.config
                .nodes
                .keys()
                .map(|id| (*id, Member::never_joined()))
                .collect(),
        );
        self.start_boot(index, at, "first start-up of this cluster".into());
        Response::Ok
    }

    fn start_boot(&mut self, index: u64, at: Millis, why: String) {
        self.boot += 1;
        self.stage = Stage::NOT_STARTED;
        self.stage_since = at;
        self.boot_started_at = at;
        self.stage_reached_at.clear();
        let boot = self.boot;
        self.event(
            index,
            at,
            EventKind::BootStarted,
            None,
            format!("start-up {boot} begins: {why}"),
        );
    }

    fn join(&mut self, index: u64, node: NodeId, at: Millis) -> Response {
        if !self.config.nodes.contains_key(&node) {
            return reject(format!("node {node} is not in the cluster configuration"));
        }
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        let m = Arc::make_mut(&mut self.members)
            .entry(node)
            .or_insert_with(Member::never_joined);
        let was = m.epoch;
        m.epoch = epoch;
        m.status = MemberStatus::Active;
        m.report = StageReport::fresh(Stage::RUNNING, at);
        m.admitted_late_in_boot = None;
        m.health = MemberHealth {
            healthy: true,
            since: at,
            reason: None,
        };
        let detail = if was == 0 {
            format!("node {node} reached the control plane (epoch {epoch})")
        } else {
            format!("node {node} reached the control plane (epoch {epoch}, was {was})")
        };
        self.event(index, at, EventKind::NodeJoined, Some(node), detail);
        Response::Joined { epoch }
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &mut self,
        node: NodeId,
        epoch: Epoch,
        stage: Stage,
        waiting: Option<Wait>,
        progress: Option<Progress>,
        mut unreachable: Vec<NodeId>,
        at: Millis,
    ) -> Response {
        // Every check reads; only an accepted report copies the members.
        let Some(m) = self.members.get(&node) else {
            return reject(format!("node {node} is not in the cluster configuration"));
        };
        if let Some((fence, reason)) = m.fence(node, epoch) {
            return reject_as(Rejection::Fenced(fence), reason);
        }
        if stage < m.report.stage {
            return reject(format!(
                "node {node} reported stage {stage} after {}: stages never go back within an epoch",
                m.report.stage
            ));
        }
        if stage > m.report.stage && stage.number() - m.report.stage.number() != 1 {
            return reject(format!(
                "node {node} skipped from stage {} to {stage}",
                m.report.stage
            ));
        }
        let Some(m) = Arc::make_mut(&mut self.members).get_mut(&node) else {
            return reject(format!("node {node} is not in the cluster configuration"));
        };
        if stage > m.report.stage {
            m.report.completed_at.insert(stage.number(), at);
        }
        unreachable.truncate(self.config.nodes.len());
        m.report.stage = stage;
        m.report.at = at;
        m.report.waiting = clip_wait(waiting);
        m.report.progress = progress;
        m.report.unreachable = unreachable;
        Response::Ok
    }

    fn advance(&mut self, index: u64, boot: u64, from: Stage, at: Millis) -> Response {
        if boot != self.boot || from != self.stage {
            return reject(format!(
                "stale advance: cluster is in boot {} at stage {}",
                self.boot, self.stage
            ));
        }
        let Some(to) = from.next() else {
            return reject("the cluster is already ready");
        };
        if let Some(n) = self.laggards(to).first() {
            return reject(format!("node {n} has not completed stage {to}"));
        }
        // Nodes prime their address cache at -2: every shard must have an
        // owner among the participants before the cluster opens -2.
        if to == Stage::CONNECTED {
            let participants = self.participants();
            let hosts_any = participants.iter().any(|p| {
                self.config
                    .nodes
                    .get(p)
                    .is_some_and(|s| s.role.hosts_services())
            });
            let unplaced = self
                .shards
                .shards()
                .filter(|s| {
                    self.shards
                        .owner(*s)
                        .is_none_or(|e| !participants.contains(&e.owner))
                })
                .count();
            if hosts_any && unplaced > 0 {
                return reject(format!("{unplaced} shard(s) not placed yet"));
            }
        }
        self.stage = to;
        self.stage_since = at;
        self.stage_reached_at.insert(to.number(), at);
        let took = at.saturating_sub(self.stage_reached_at_or_boot(from));
        let n = self.participants().len();
        self.event(
            index,
            at,
            EventKind::StageAdvanced,
            None,
            format!(
                "cluster reached stage {to} ({}): {n} nodes, {took} ms",
                to.name()
            ),
        );
        Response::Ok
    }

    fn stage_reached_at_or_boot(&self, s: Stage) -> Millis {
        self.stage_reached_at
            .get(&s.number())
            .copied()
            .unwrap_or(self.boot_started_at)
    }

    fn exclude(
        &mut self,
        index: u64,
        boot: u64,
        node: NodeId,
        epoch: Epoch,
        reason: String,
        at: Millis,
    ) -> Response {
        if boot != self.boot {
            return reject("stale boot");
        }
        let Some(m) = Arc::make_mut(&mut self.members).get_mut(&node) else {
            return reject(format!("unknown node {node}"));
        };
        if m.epoch != epoch {
            return reject(format!(
                "node {node} epoch {epoch} superseded by {}",
                m.epoch
            ));
        }
        if matches!(m.status, MemberStatus::Excluded { .. }) {
            return reject(format!("node {node} is already excluded"));
        }
        let reason = clip(reason);
        m.status = MemberStatus::Excluded {
            reason: reason.clone(),
            at,
        };
        m.excluded_in_boot = Some(boot);
        self.event(
            index,
            at,
            EventKind::NodeExcluded,
            Some(node),
            format!("node {node} (epoch {epoch}) excluded from start-up {boot}: {reason}"),
        );
        Response::Ok
    }

    fn begin_boot(
        &mut self,
        index: u64,
        after: u64,
        live: BTreeSet<(NodeId, Epoch)>,
        at: Millis,
    ) -> Response {
        if after != self.boot || self.stage != Stage::READY {
            return reject("stale: the boot already changed");
        }
        for (id, m) in Arc::make_mut(&mut self.members).iter_mut() {
            let is_live = live.contains(&(*id, m.epoch));
            if !is_live || m.report.stage == Stage::READY {
                // Not heard from in this boot: must (re)join before it counts.
                m.report = StageReport::fresh(Stage::NOT_STARTED, at);
            }
            // A node that left stays out (and revoked) until it rejoins.
            if matches!(m.status, MemberStatus::Left { .. }) {
                continue;
            }
            m.status = MemberStatus::Active;
            m.admitted_late_in_boot = None;
        }
        self.start_boot(
            index,
            at,
            "the cluster was ready but none of its running processes remains (cluster-wide restart)"
                .into(),
        );
        Response::Ok
    }

    /// A cluster-wide bound shared by alarms and deadlock reports, so a
    /// flood from many nodes (or a load retried in a wait cycle) cannot
    /// push membership decisions out of the bounded event list.
    fn take_alarm_budget(&mut self, at: Millis) -> Result<(), String> {
        let (start, count) = self.alarm_window;
        let (start, count) = if at.saturating_sub(start) >= ALARM_WINDOW_MS {
            (at, 0)
        } else {
            (start, count)
        };
        if count >= MAX_ALARMS_PER_WINDOW {
            self.alarm_window = (start, count);
            return Err(format!(
                "more than {MAX_ALARMS_PER_WINDOW} alarms and deadlock reports in {} s: recorded in the node's log only",
                ALARM_WINDOW_MS / 1000
            ));
        }
        self.alarm_window = (start, count + 1);
        Ok(())
    }

    fn revoke_certificates(
        &mut self,
        index: u64,
        node: NodeId,
        min_serial: u64,
        at: Millis,
    ) -> Response {
        let reject = |reason: String| reject_as(Rejection::Other, reason);
        if !self.config.nodes.contains_key(&node) {
            return reject(format!("node {node} is not in the cluster configuration"));
        }
        let floor = self.cert_floor.get(&node).copied().unwrap_or(0);
        if min_serial <= floor {
            return reject(format!(
                "node {node}'s certificates below serial {floor} are already revoked"
            ));
        }
        self.cert_floor.insert(node, min_serial);
        self.event(
            index,
            at,
            EventKind::CertificatesRevoked,
            Some(node),
            format!(
                "node {node}'s certificates below serial {min_serial} revoked: it needs a newly issued one"
            ),
        );
        Response::Ok
    }

    /// `config set`: the key's new value is in force for every decision
    /// from this index on; the timeline says who had what before.
    fn set_config(&mut self, index: u64, key: &str, value: &str, at: Millis) -> Response {
        let (config, old) = match self.config.with_key(key, value) {
            Ok(v) => v,
            Err(e) => return reject(e),
        };
        if config == *self.config {
            return reject("no change");
        }
        self.config = Arc::new(config);
        self.config_index = index;
        self.event(
            index,
            at,
            EventKind::ConfigChanged,
            None,
            clip(format!("config set {key}: {old} -> {value} (cluster-wide)")),
        );
        Response::Ok
    }

    /// A node leaves by its own decision: its epoch is revoked (like a
    /// removal, without counting as one: no backoff, no confidence vote
    /// when it comes back), and a drain it asked for ends with it.
    fn leave(&mut self, index: u64, node: NodeId, epoch: Epoch, at: Millis) -> Response {
        let Some(m) = self.current(node, epoch) else {
            return reject(format!(
                "node {node} epoch {epoch} is not current: only a node's current process may leave"
            ));
        };
        m.status = MemberStatus::Left { at };
        m.draining = false;
        m.admitted_late_in_boot = None;
        let owned = self
            .shards
            .entries
            .values()
            .filter(|e| e.owner == node)
            .count();
        let shards = if owned == 0 {
            "it hands over no shard".to_string()
        } else {
            format!("its {owned} shard(s) move now")
        };
        self.event(
            index,
            at,
            EventKind::NodeLeft,
            Some(node),
            format!(
                "node {node} left the cluster (epoch {epoch} revoked; not a failure): {shards}"
            ),
        );
        Response::Ok
    }

    pub(crate) fn event(
        &mut self,
        index: u64,
        at: Millis,
        kind: EventKind,
        node: Option<NodeId>,
        detail: String,
    ) {
        let events = Arc::make_mut(&mut self.events);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Event {
            index,
            at,
            kind,
            node,
            detail,
        });
    }

    /// Nodes taking part in the current boot (configured and not excluded).
    pub fn participants(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.status == MemberStatus::Active && !self.sits_out(m))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Participants that have not completed `stage`, ascending.
    pub fn laggards(&self, stage: Stage) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| {
                m.status == MemberStatus::Active && !self.sits_out(m) && m.report.stage < stage
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Does `m` sit out this boot: excluded from it, back under a new
    /// epoch, and not admitted late yet? It takes no part in the barrier.
    pub fn sits_out(&self, m: &Member) -> bool {
        m.excluded_in_boot == Some(self.boot) && m.admitted_late_in_boot != Some(self.boot)
    }

    /// May `node`, running under `epoch`, start work towards `next`?
    pub fn gate(&self, node: NodeId, epoch: Epoch, next: Stage) -> Gate {
        let Some(m) = self.members.get(&node) else {
            return Gate::Fenced {
                reason: format!("node {node} is not in the cluster configuration"),
                fence: None,
            };
        };
        if let Some((fence, reason)) = m.fence(node, epoch) {
            return Gate::Fenced {
                reason,
                fence: Some(fence),
            };
        }
        let needs = Stage::from_number(next.number() - 1).unwrap_or(Stage::NOT_STARTED);
        if self.sits_out(m) && self.stage != Stage::READY {
            return Gate::Closed {
                reason: format!(
                    "excluded from start-up {}: waiting for the others to reach stage 0, then to be admitted late",
                    self.boot
                ),
            };
        }
        if self.stage == Stage::READY {
            return if m.admitted_late_in_boot == Some(self.boot) || m.report.stage == Stage::READY {
                Gate::Open
            } else {
                Gate::Closed {
                    reason: "the cluster is ready: waiting for the coordinator to admit this node"
                        .into(),
                }
            };
        }
        if self.stage >= needs {
            Gate::Open
        } else {
            let lag = self.laggards(needs);
            Gate::Closed {
                reason: format!(
                    "cluster at stage {}: {} node(s) have not completed stage {needs} (first: {})",
                    self.stage,
                    lag.len(),
                    lag.first().map(|n| n.to_string()).unwrap_or_default()
                ),
            }
        }
    }

    /// The member, if `epoch` is its current, unfenced epoch.
    fn current(&mut self, node: NodeId, epoch: Epoch) -> Option<&mut Member> {
        // Check before `make_mut`: a refused command copies nothing.
        let current = self
            .members
            .get(&node)
            .is_some_and(|m| m.epoch == epoch && epoch > 0 && m.status == MemberStatus::Active);
        if !current {
            return None;
        }
        Arc::make_mut(&mut self.members).get_mut(&node)
    }

    /// Why a message from `node` under `epoch` must be refused, if it must:
    /// the epoch was revoked, excluded, or superseded. Epoch 0 (not yet
    /// joined) is let through: joining is how a fenced node comes back.
    pub fn refusal(&self, node: NodeId, epoch: Epoch) -> Option<String> {
        self.refusal_kind(node, epoch).map(|(_, why)| why)
    }

    /// [`Self::refusal`] with its kind (`None`: not a member at all).
    pub fn refusal_kind(&self, node: NodeId, epoch: Epoch) -> Option<(Option<Fence>, String)> {
        if epoch == 0 {
            return None;
        }
        let Some(m) = self.members.get(&node) else {
            return Some((
                None,
                format!("node {node} is not in the cluster configuration"),
            ));
        };
        if epoch > m.epoch {
            return None; // Newer than this view: the view is stale, not the sender.
        }
        m.fence(node, epoch).map(|(f, why)| (Some(f), why))
    }

    /// Has `node` a perfect health record at `now`: healthy, and so for at
    /// least the eligibility window or since the cluster became ready? Only
    /// such nodes probe, vote, accuse (the failure detector) and run jobs.
    pub fn has_perfect_record(&self, node: NodeId, now: Millis) -> bool {
        let Some(m) = self.members.get(&node) else {
            return false;
        };
        m.health.healthy
            && (now.saturating_sub(m.health.since) >= self.config.membership.eligibility_window_ms
                || self.ready_at().is_some_and(|r| m.health.since <= r))
    }

    /// May `node` be given shards, as the replicated state has it: a
    /// joined, active, healthy member whose role hosts services, not
    /// draining, and (once the cluster is ready) ready itself. The
    /// coordinator also skips a node it is about to remove; a leaving node
    /// asks this of its peers to know whether anyone can take its shards.
    pub fn may_host(&self, node: NodeId) -> bool {
        self.members.get(&node).is_some_and(|m| {
            m.status == MemberStatus::Active
                && m.epoch > 0
                && m.health.healthy
                && !m.draining
                // A node sitting this boot out hosts nothing until it is
                // admitted late: a shard placed on it counted as unplaced
                // at the stage -3 barrier, which then never opened (50
                // processes, one hung: its neighbour excluded with it came
                // back, was given a shard, and start-up stood still).
                && !self.sits_out(m)
                && (self.stage != Stage::READY || m.report.stage == Stage::READY)
                && self
                    .config
                    .nodes
                    .get(&node)
                    .is_some_and(|s| s.role.hosts_services())
        })
    }

    /// When the cluster became ready in this boot.
    pub fn ready_at(&self) -> Option<Millis> {
        self.stage_reached_at.get(&Stage::READY.number()).copied()
    }

    /// The epoch of `node`'s current process, if it ever joined.
    pub fn epoch_of(&self, node: NodeId) -> Option<Epoch> {
        self.members.get(&node).map(|m| m.epoch).filter(|e| *e > 0)
    }

    /// The role of `node` in the configuration.
    pub fn role_of(&self, node: NodeId) -> Option<Role> {
        self.config.nodes.get(&node).map(|s| s.role)
    }
}

impl Member {
    fn never_joined() -> Self {
        Member {
            epoch: 0,
            status: MemberStatus::Active,
            report: StageReport::fresh(Stage::NOT_STARTED, 0),
            admitted_late_in_boot: None,
            excluded_in_boot: None,
            health: MemberHealth {
                healthy: true,
                since: 0,
                reason: None,
            },
            removals: 0,
            last_removed_at: 0,
            draining: false,
        }
    }

    pub(crate) fn fenced_reason(&self, node: NodeId, epoch: Epoch) -> Option<String> {
        self.fence(node, epoch).map(|(_, why)| why)
    }

    /// [`Self::fenced_reason`] with its kind.
    pub(crate) fn fence(&self, node: NodeId, epoch: Epoch) -> Option<(Fence, String)> {
        if epoch != self.epoch {
            return Some((
                Fence::Superseded,
                format!(
                    "node {node} epoch {epoch} is superseded: the current epoch is {}",
                    self.epoch
                ),
            ));
        }
        match &self.status {
            MemberStatus::Excluded { reason, .. } => Some((
                Fence::Excluded,
                format!("node {node} epoch {epoch} was excluded from this start-up: {reason}"),
            )),
            MemberStatus::Removed { reason, .. } => Some((
                Fence::Revoked,
                format!("node {node} epoch {epoch} was revoked: {reason}"),
            )),
            MemberStatus::Left { .. } => Some((
                Fence::Left,
                format!("node {node} epoch {epoch} left the cluster: it rejoins under a new epoch"),
            )),
            MemberStatus::Active => None,
        }
    }
}

pub(crate) fn reject(reason: impl Into<String>) -> Response {
    reject_as(Rejection::Other, reason)
}

pub(crate) fn reject_as(kind: Rejection, reason: impl Into<String>) -> Response {
    Response::Rejected {
        reason: reason.into(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeSpec, Role};

    pub(crate) fn config(n: u64, voters: u64) -> ClusterConfig {
        let mut c = ClusterConfig::default();
        for id in 1..=n {
            c.nodes.insert(
                id,
                NodeSpec {
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    admin_addr: format!("127.0.0.1:{}", 8000 + id),
                    role: if id <= voters {
                        Role::Voter
                    } else {
                        Role::Worker
                    },
                },
            );
        }
        c
    }

    struct Log {
        s: ClusterState,
        i: u64,
    }
    impl Log {
        fn new(n: u64) -> Self {
            let mut l = Log {
                s: ClusterState::default(),
                i: 0,
            };
            assert_eq!(
                l.apply(Command::Configure {
                    config: config(n, 3.min(n)),
                    at: 0
                }),
                Response::Ok
            );
            l
        }
        fn apply(&mut self, c: Command) -> Response {
            self.i += 1;
            self.s.apply(self.i, c)
        }
        fn join(&mut self, node: NodeId) -> Epoch {
            match self.apply(Command::Join { node, at: 1 }) {
                Response::Joined { epoch } => epoch,
                r => panic!("join refused: {r:?}"),
            }
        }
        fn report(&mut self, node: NodeId, epoch: Epoch, stage: Stage) -> Response {
            self.apply(Command::Report {
                node,
                epoch,
                stage,
                waiting: None,
                progress: None,
                unreachable: vec![],
                at: 2,
            })
        }
        fn advance(&mut self) -> Response {
            let (boot, from) = (self.s.boot, self.s.stage);
            self.apply(Command::Advance { boot, from, at: 3 })
        }
    }

    #[test]
    fn barrier_holds_until_every_participant_reports() {
        let mut l = Log::new(3);
        let e1 = l.join(1);
        let e2 = l.join(2);
        assert!(matches!(l.advance(), Response::Rejected { .. }));
        assert!(matches!(
            l.s.gate(1, e1, Stage::CONNECTED),
            Gate::Closed { .. }
        ));
        let e3 = l.join(3);
        assert_eq!(l.advance(), Response::Ok);
        assert_eq!(l.s.stage, Stage::RUNNING);
        assert_eq!(l.s.gate(1, e1, Stage::CONNECTED), Gate::Open);
        assert!(matches!(
            l.s.gate(1, e1, Stage::ADDRESSED),
            Gate::Closed { .. }
        ));
        for (n, e) in [(1, e1), (2, e2), (3, e3)] {
            assert_eq!(l.report(n, e, Stage::CONNECTED), Response::Ok);
        }
        assert_eq!(l.advance(), Response::Ok);
        assert_eq!(l.s.stage, Stage::CONNECTED);
        // A repeated advance from the old stage is stale.
        assert!(matches!(
            l.apply(Command::Advance {
                boot: 1,
                from: Stage::RUNNING,
                at: 4
            }),
            Response::Rejected { .. }
        ));
    }

    #[test]
    fn reports_are_fenced_by_epoch_and_never_skip_or_regress() {
        let mut l = Log::new(3);
        let old = l.join(1);
        let new = l.join(1);
        assert!(new > old);
        assert!(matches!(
            l.report(1, old, Stage::CONNECTED),
            Response::Rejected { .. }
        ));
        assert!(matches!(
            l.report(1, new, Stage::ADDRESSED),
            Response::Rejected { .. }
        ));
        assert_eq!(l.report(1, new, Stage::CONNECTED), Response::Ok);
        assert!(matches!(
            l.report(1, new, Stage::RUNNING),
            Response::Rejected { .. }
        ));
        assert!(matches!(
            l.s.gate(1, old, Stage::ADDRESSED),
            Gate::Fenced { .. }
        ));
        assert!(matches!(
            l.apply(Command::Join { node: 99, at: 5 }),
            Response::Rejected { .. }
        ));
    }

    #[test]
    fn excluded_node_no_longer_holds_the_barrier_and_is_fenced() {
        let mut l = Log::new(3);
        let e1 = l.join(1);
        let e2 = l.join(2);
        let boot = l.s.boot;
        assert_eq!(
            l.apply(Command::Exclude {
                boot,
                node: 3,
                epoch: 0,
                reason: "never reached the control plane".into(),
                at: 9
            }),
            Response::Ok
        );
        assert_eq!(l.advance(), Response::Ok);
        assert_eq!(l.report(1, e1, Stage::CONNECTED), Response::Ok);
        assert_eq!(l.report(2, e2, Stage::CONNECTED), Response::Ok);
        assert_eq!(l.advance(), Response::Ok);
        assert!(matches!(
            l.s.gate(3, 0, Stage::RUNNING),
            Gate::Fenced { .. }
        ));
        let ev =
            l.s.events
                .iter()
                .find(|e| e.kind == EventKind::NodeExcluded)
                .unwrap();
        assert!(ev.detail.contains("never reached the control plane"));
    }

    #[test]
    fn command_names_are_short() {
        let cmd = Command::Drain {
            node: 3,
            drain: true,
            at: 1,
        };
        assert_eq!(cmd.name(), "Drain");
    }

    /// An excluded node that comes back while its boot is still starting
    /// sits the boot out: it holds no barrier (it could only be excluded
    /// again, each time at a deadline's cost) and is admitted late at 0.
    #[test]
    fn an_excluded_node_back_during_its_boot_sits_it_out_until_admitted_late() {
        let mut l = Log::new(3);
        let (e1, e2, e3) = (l.join(1), l.join(2), l.join(3));
        let boot = l.s.boot;
        let why = "missed the deadline".to_string();
        let exclude = Command::Exclude {
            boot,
            node: 3,
            epoch: e3,
            reason: why,
            at: 9,
        };
        assert_eq!(l.apply(exclude), Response::Ok);
        let back = l.join(3);
        assert!(back > e3);
        assert_eq!(l.s.participants(), vec![1, 2]);
        assert!(!l.s.may_host(3), "it sits out: it hosts nothing");
        assert!(matches!(
            l.s.gate(3, back, Stage::CONNECTED),
            Gate::Closed { .. }
        ));
        for stage in Stage::ALL.iter().skip(1) {
            assert_eq!(l.advance(), Response::Ok, "{:?}", l.s.laggards(*stage));
            assert_eq!(l.report(1, e1, *stage), Response::Ok);
            assert_eq!(l.report(2, e2, *stage), Response::Ok);
        }
        assert_eq!(l.advance(), Response::Ok);
        assert_eq!(l.s.stage, Stage::READY);
        assert!(matches!(
            l.s.gate(3, back, Stage::CONNECTED),
            Gate::Closed { .. }
        ));
        let admit = Command::AdmitLate {
            node: 3,
            epoch: back,
            at: 10,
        };
        assert_eq!(l.apply(admit), Response::Ok);
        assert_eq!(l.s.gate(3, back, Stage::CONNECTED), Gate::Open);
        assert_eq!(l.s.participants(), vec![1, 2, 3]);
        assert!(!l.s.may_host(3), "not before it reports stage 0");
    }

    #[test]
    fn restart_of_a_ready_cluster_needs_a_new_boot_or_late_admission() {
        let mut l = Log::new(2);
        let mut epochs = [l.join(1), l.join(2)];
        for s in Stage::ALL.iter().skip(1) {
            assert_eq!(l.advance(), Response::Ok);
            for (i, e) in epochs.iter().enumerate() {
                assert_eq!(l.report(i as u64 + 1, *e, *s), Response::Ok);
            }
        }
        assert_eq!(l.advance(), Response::Ok);
        assert_eq!(l.s.stage, Stage::READY);
        // Node 2 restarts alone: closed until admitted.
        epochs[1] = l.join(2);
        assert!(matches!(
            l.s.gate(2, epochs[1], Stage::CONNECTED),
            Gate::Closed { .. }
        ));
        assert_eq!(
            l.apply(Command::AdmitLate {
                node: 2,
                epoch: epochs[1],
                at: 10
            }),
            Response::Ok
        );
        assert_eq!(l.s.gate(2, epochs[1], Stage::CONNECTED), Gate::Open);
        // Now a cluster-wide restart: node 1 rejoins, nobody else live.
        epochs[0] = l.join(1);
        let live = [(1, epochs[0])].into_iter().collect();
        assert_eq!(
            l.apply(Command::BeginBoot {
                after: 1,
                live,
                at: 20
            }),
            Response::Ok
        );
        assert_eq!(l.s.boot, 2);
        assert_eq!(l.s.stage, Stage::NOT_STARTED);
        assert_eq!(l.s.members[&1].report.stage, Stage::RUNNING);
        assert_eq!(l.s.members[&2].report.stage, Stage::NOT_STARTED);
        assert!(matches!(l.advance(), Response::Rejected { .. }));
    }

    #[test]
    fn alarms_are_bounded_cluster_wide() {
        let mut l = Log::new(3);
        let e = l.join(1);
        let alarm = |at| Command::Alarm {
            node: 1,
            epoch: e,
            what: "event loop stalled".into(),
            at,
        };
        for i in 0..MAX_ALARMS_PER_WINDOW {
            assert_eq!(l.apply(alarm(1_000 + u64::from(i))), Response::Ok);
        }
        assert!(matches!(l.apply(alarm(2_000)), Response::Rejected { .. }));
        let recorded = |l: &Log| {
            l.s.events
                .iter()
                .filter(|e| e.kind == EventKind::Alarm)
                .count()
        };
        assert_eq!(recorded(&l), MAX_ALARMS_PER_WINDOW as usize);
        // A new window takes alarms again.
        assert_eq!(l.apply(alarm(1_000 + ALARM_WINDOW_MS)), Response::Ok);
        assert_eq!(recorded(&l), MAX_ALARMS_PER_WINDOW as usize + 1);
        // From an epoch that is not current: refused.
        let stale = Command::Alarm {
            node: 1,
            epoch: e + 7,
            what: "x".into(),
            at: 1_000 + ALARM_WINDOW_MS,
        };
        assert!(matches!(l.apply(stale), Response::Rejected { .. }));
    }

    #[test]
    fn certificate_floors_only_rise_and_name_configured_nodes() {
        let mut l = Log::new(3);
        let revoke = |node, min_serial| Command::RevokeCertificates {
            node,
            min_serial,
            at: 10,
        };
        assert_eq!(l.apply(revoke(2, 8)), Response::Ok);
        assert_eq!(l.s.cert_floor.get(&2), Some(&8));
        assert!(l
            .s
            .events
            .iter()
            .any(|e| e.kind == EventKind::CertificatesRevoked && e.node == Some(2)));
        // Lowering it, or the same floor again: refused, nothing changes.
        let before = l.s.events.len();
        assert!(matches!(l.apply(revoke(2, 5)), Response::Rejected { .. }));
        assert!(matches!(l.apply(revoke(2, 8)), Response::Rejected { .. }));
        assert!(matches!(l.apply(revoke(99, 8)), Response::Rejected { .. }));
        assert_eq!(l.s.cert_floor.get(&2), Some(&8));
        assert_eq!(l.s.cert_floor.get(&99), None);
        assert_eq!(l.s.events.len(), before);
    }

    #[test]
    fn config_set_changes_a_key_records_old_and_new_and_refuses_bad_values() {
        let mut s = crate::testkit::configured(crate::testkit::config(3), 1..=3);
        let before = s.config.membership.lease_ttl_ms;
        let set = |key: &str, value: &str| Command::SetConfig {
            key: key.into(),
            value: value.into(),
            at: 10,
        };
        assert_eq!(
            s.apply(100, set("membership.lease_ttl_ms", "3000")),
            Response::Ok
        );
        assert_eq!(s.config.membership.lease_ttl_ms, 3_000);
        let e = s.events.back().unwrap();
        assert_eq!(e.kind, EventKind::ConfigChanged);
        assert!(
            e.detail.contains(&format!("{before} -> 3000")),
            "{}",
            e.detail
        );
        let snapshot = s.clone();
        let bad = [
            ("membership.lease_ttl_ms", "3000"),
            ("nodes", "{}"),
            ("membership.lease_ttl_ms", "x"),
        ];
        for (i, (k, v)) in (101..).zip(bad) {
            assert!(
                matches!(s.apply(i, set(k, v)), Response::Rejected { .. }),
                "{k} = {v}"
            );
        }
        assert_eq!(s.config, snapshot.config, "a refused set changes nothing");
        assert_eq!(s.events.len(), snapshot.events.len());
    }

    #[test]
    fn an_operation_is_one_clipped_event_and_changes_nothing_else() {
        let mut l = Log::new(3);
        let members = l.s.members.clone();
        let op = |what: &str, detail: String| Command::Operation {
            what: what.into(),
            detail,
            at: 10,
        };
        assert_eq!(l.apply(op("roll", "started".into())), Response::Ok);
        let ev = l.s.events.back().expect("an event");
        assert_eq!(
            (ev.kind, ev.node, ev.detail.as_str()),
            (EventKind::Operation, None, "roll: started")
        );
        assert_eq!(l.apply(op("roll", "é".repeat(2 * MAX_TEXT))), Response::Ok);
        assert!(l.s.events.back().unwrap().detail.len() <= MAX_TEXT);
        let before = l.s.events.len();
        assert!(matches!(
            l.apply(op(" ", "x".into())),
            Response::Rejected { .. }
        ));
        assert_eq!(l.s.events.len(), before);
        assert_eq!(l.s.members, members);
    }

    #[test]
    fn leaving_revokes_the_current_epoch_only_and_a_rejoin_is_a_plain_restart() {
        let mut l = Log::new(3);
        let e1 = l.join(1);
        let old = l.join(2);
        let e2 = l.join(2);
        let leave = |epoch, at| Command::Leave { node: 2, epoch, at };
        // A superseded process cannot leave in the current one's name.
        assert!(matches!(l.apply(leave(old, 5)), Response::Rejected { .. }));
        assert_eq!(l.s.members[&2].status, MemberStatus::Active);
        assert!(matches!(l.apply(leave(0, 5)), Response::Rejected { .. }));
        assert!(matches!(
            l.apply(Command::Leave {
                node: 99,
                epoch: 1,
                at: 5
            }),
            Response::Rejected { .. }
        ));
        // It drained first; leaving ends the drain with it.
        let drain = Command::Drain {
            node: 2,
            drain: true,
            at: 5,
        };
        assert_eq!(l.apply(drain), Response::Ok);
        assert_eq!(l.apply(leave(e2, 6)), Response::Ok);
        let m = &l.s.members[&2];
        assert_eq!(m.status, MemberStatus::Left { at: 6 });
        assert!(!m.draining);
        assert_eq!(m.removals, 0, "leaving is not a removal");
        let ev = l.s.events.back().unwrap();
        assert_eq!((ev.kind, ev.node), (EventKind::NodeLeft, Some(2)));
        assert!(ev.detail.contains("not a failure"), "{}", ev.detail);
        // Its epoch never serves again.
        assert!(l.s.refusal(2, e2).is_some_and(|r| r.contains("left")));
        assert!(matches!(
            l.s.gate(2, e2, Stage::CONNECTED),
            Gate::Fenced { .. }
        ));
        assert!(matches!(
            l.report(2, e2, Stage::CONNECTED),
            Response::Rejected { .. }
        ));
        assert!(matches!(l.apply(leave(e2, 7)), Response::Rejected { .. }));
        assert_eq!(l.s.participants(), vec![1, 3]);
        // Coming back is a restart: a new epoch, active, nothing to forgive.
        let e3 = l.join(2);
        assert!(e3 > e2);
        assert_eq!(l.s.members[&2].status, MemberStatus::Active);
        assert_eq!(l.s.refusal(2, e3), None);
        assert_eq!(l.s.members[&2].removals, 0);
        assert_eq!(l.report(2, e3, Stage::CONNECTED), Response::Ok);
        assert_eq!(l.s.refusal(1, e1), None);
    }

    #[test]
    fn a_node_that_left_stays_out_of_a_new_boot() {
        let mut l = Log::new(3);
        let mut epochs = [l.join(1), l.join(2), l.join(3)];
        for s in Stage::ALL.iter().skip(1) {
            assert_eq!(l.advance(), Response::Ok);
            for (i, e) in epochs.iter().enumerate() {
                assert_eq!(l.report(i as u64 + 1, *e, *s), Response::Ok);
            }
        }
        assert_eq!(l.advance(), Response::Ok);
        let leave = Command::Leave {
            node: 3,
            epoch: epochs[2],
            at: 10,
        };
        assert_eq!(l.apply(leave), Response::Ok);
        // The cluster restarts without node 3: it does not hold the barrier.
        epochs[0] = l.join(1);
        epochs[1] = l.join(2);
        let live = [(1, epochs[0]), (2, epochs[1])].into_iter().collect();
        let begin = Command::BeginBoot {
            after: 1,
            live,
            at: 20,
        };
        assert_eq!(l.apply(begin), Response::Ok);
        assert_eq!(l.s.members[&3].status, MemberStatus::Left { at: 10 });
        assert!(l.s.refusal(3, epochs[2]).is_some());
        assert_eq!(l.s.participants(), vec![1, 2]);
        assert_eq!(l.advance(), Response::Ok, "nodes 1 and 2 are enough");
    }

    #[test]
    fn events_are_bounded() {
        let mut l = Log::new(1);
        for _ in 0..(MAX_EVENTS + 10) {
            l.join(1);
        }
        assert_eq!(l.s.events.len(), MAX_EVENTS);
    }
}
