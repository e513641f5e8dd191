//! The control plane as the model sees it: one linearizable replicated
//! [`ClusterState`], changed only by orrery-core's own
//! [`ClusterState::apply`]. Raft itself is not modelled (openraft is
//! exercised by orrery-control's tests); a committed command is simply
//! applied at the next log index.
//!
//! The state derives no `Hash`, so [`Control`] hashes and compares the
//! serde form of the parts that decide anything: members (epochs, status,
//! stage reports, health), the shard map, the jobs, the cluster stage and
//! the epoch counter. Left out: the event list (the timeline; `apply` never
//! reads it) and the applied log index (only ever compared with the next
//! index), so two states that differ only there are one state.

use orrery_core::jobs::JobSpec;
use orrery_core::shardmap::{plan, Host, KindSpec, PlacementConfig};
use orrery_core::{
    ClusterConfig, ClusterState, Command, MemberStatus, MembershipConfig, Millis, NodeId, NodeSpec,
    Response, Role, Stage,
};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Milliseconds per model tick: the model's clock is a small integer.
pub const TICK_MS: Millis = 1_000;
/// A node stops serving this many ticks after its last acknowledged
/// heartbeat was sent (`membership.self_fence_after_ms`), and a shard
/// taken over from a previous owner is served this long after its new
/// owner learnt of the move (the node's hand-over delay is the same value).
/// Two: a lease renewed at tick t is fresh at t and t+1 (strictly less
/// than two ticks old), so a lease spans more than the instant it was sent.
pub const FENCE_TICKS: u64 = 2;
/// The node whose control plane answers (the Raft leader, and coordinator).
pub const LEADER: NodeId = 1;
/// The one per-period job; its period is [`PERIOD_MS`], due at its end.
pub const JOB: &str = "stats";
/// The job's period: one tick (the shortest period orrery allows).
pub const PERIOD_MS: Millis = TICK_MS;
/// The shard kind; its keys are `0..shards`.
pub const KIND: &str = "shard";

/// The replicated state, applied to only through orrery-core.
#[derive(Clone)]
pub struct Control {
    pub state: ClusterState,
}

impl Control {
    /// A ready cluster of nodes `1..=nodes` (all voters), `shards` shards
    /// placed by orrery-core's `plan`, and the job declared, all at time 0.
    pub fn ready(nodes: u64, shards: u64) -> Control {
        let mut c = Control {
            state: ClusterState::default(),
        };
        let config = config(nodes);
        c.must(Command::Configure { config, at: 0 });
        for node in 1..=nodes {
            assert!(matches!(
                c.apply(Command::Join { node, at: 0 }),
                Response::Joined { .. }
            ));
        }
        c.walk_to_ready(nodes);
        let kinds = vec![KindSpec::new(KIND, 0..shards)];
        c.must(Command::DeclareShards { kinds, at: 0 });
        c.place(nodes);
        let jobs = vec![JobSpec::new(JOB, PERIOD_MS, PERIOD_MS)];
        c.must(Command::DeclareJobs { jobs, at: 0 });
        c
    }

    /// Applies `cmd` at the next log index, as a committed entry.
    pub fn apply(&mut self, cmd: Command) -> Response {
        let index = self.state.applied_index + 1;
        let r = self.state.apply(index, cmd);
        if !self.state.events.is_empty() {
            Arc::make_mut(&mut self.state.events).clear();
        }
        r
    }

    fn must(&mut self, cmd: Command) {
        let what = format!("{cmd:?}");
        assert_eq!(self.apply(cmd), Response::Ok, "{what}");
    }

    fn walk_to_ready(&mut self, nodes: u64) {
        for stage in Stage::ALL.iter().skip(1) {
            let (boot, from) = (self.state.boot, self.state.stage);
            self.must(Command::Advance { boot, from, at: 0 });
            for node in 1..=nodes {
                let epoch = self.state.members[&node].epoch;
                self.must(Command::Report {
                    node,
                    epoch,
                    stage: *stage,
                    waiting: None,
                    progress: None,
                    unreachable: vec![],
                    at: 0,
                });
            }
        }
        let (boot, from) = (self.state.boot, self.state.stage);
        self.must(Command::Advance { boot, from, at: 0 });
        assert_eq!(self.state.stage, Stage::READY);
    }

    /// The first placement, by orrery-core's placement rule.
    fn place(&mut self, nodes: u64) {
        let hosts: Vec<Host> = (1..=nodes).map(|node| Host { node, weight: 1 }).collect();
        let cfg = PlacementConfig {
            max_moves_per_step: usize::MAX,
            max_orphan_moves_per_step: None,
            load_slack: 0.1,
        };
        let moves = plan(&self.state.shards, &hosts, &cfg);
        self.must(Command::MoveShards {
            moves,
            reason: "first placement".into(),
            at: 0,
        });
    }

    /// What two states are told apart by (see the module docs): every
    /// field a later decision of `apply`, `gate` or `answer_heartbeat`
    /// reads, for the commands the model proposes; not the timeline, the
    /// log index, or the times kept only for people (stage report times,
    /// when a shard or a lease was handed out, when a period was committed,
    /// removal reasons).
    fn key(&self) -> Vec<u8> {
        let s = &self.state;
        let members: Vec<_> = s
            .members
            .iter()
            .map(|(id, m)| {
                let status = match m.status {
                    MemberStatus::Active => 0u8,
                    MemberStatus::Excluded { .. } => 1,
                    MemberStatus::Removed { .. } => 2,
                    MemberStatus::Left { .. } => 3,
                };
                let health = (m.health.healthy, m.health.since);
                let late = m.admitted_late_in_boot;
                (
                    *id,
                    m.epoch,
                    status,
                    m.report.stage,
                    late,
                    health,
                    m.removals,
                    m.draining,
                )
            })
            .collect();
        let shards: Vec<_> = s
            .shards
            .entries
            .iter()
            .map(|(id, e)| (id.key, e.owner, e.epoch, e.previous))
            .collect();
        let jobs: Vec<_> = s
            .jobs
            .jobs
            .values()
            .map(|j| {
                let lease = j
                    .lease
                    .as_ref()
                    .map(|l| (l.period, l.lease_epoch, l.holder, l.holder_epoch));
                let commits: Vec<_> = j
                    .commits
                    .iter()
                    .map(|(p, c)| (*p, c.holder, c.holder_epoch, c.lease_epoch))
                    .collect();
                (lease, j.last_lease_epoch, commits)
            })
            .collect();
        let parts = (
            members,
            (shards, s.shards.version, s.shards.last_epoch),
            (jobs, s.jobs.high_water),
            (s.stage, s.last_epoch, s.boot),
        );
        postcard::to_allocvec(&parts).expect("the projection serializes")
    }
}

/// Nodes `1..=n`, all voters, with the model's lease timing: a node fences
/// itself [`FENCE_TICKS`] after its last acknowledged heartbeat, and a
/// rejoined node's health record is long enough after one tick.
fn config(n: u64) -> ClusterConfig {
    let fence = FENCE_TICKS * TICK_MS;
    let membership = MembershipConfig {
        self_fence_after_ms: fence,
        heartbeat_interval_ms: fence / 2,
        fence_margin_ms: TICK_MS,
        lease_ttl_ms: fence + TICK_MS,
        eligibility_window_ms: TICK_MS,
        ..MembershipConfig::default()
    };
    assert_eq!(membership.validate(), Ok(()));
    let mut c = ClusterConfig {
        stage_deadline_ms: 1_000,
        membership,
        ..Default::default()
    };
    for id in 1..=n {
        let spec = NodeSpec {
            addr: String::new(),
            admin_addr: String::new(),
            role: Role::Voter,
        };
        c.nodes.insert(id, spec);
    }
    c
}

impl Hash for Control {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key().hash(h);
    }
}

impl PartialEq for Control {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Control {}

/// Compact: epochs and status per member, shard owners, the job's lease
/// and commits (the full state would drown a counterexample's trace).
impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.state;
        let members: Vec<String> = s
            .members
            .iter()
            .map(|(id, m)| format!("{id}@{} {:?} st{}", m.epoch, m.status, m.report.stage))
            .collect();
        let shards: Vec<String> = s
            .shards
            .entries
            .iter()
            .map(|(id, e)| format!("{}:{}@{} prev {:?}", id.key, e.owner, e.epoch, e.previous))
            .collect();
        let job = s.jobs.get(JOB);
        let lease = job.and_then(|j| j.lease.as_ref()).map(|l| {
            format!(
                "p{} le{} -> {}@{}",
                l.period, l.lease_epoch, l.holder, l.holder_epoch
            )
        });
        let commits: Vec<String> = job
            .map(|j| {
                j.commits
                    .iter()
                    .map(|(p, c)| {
                        format!(
                            "p{p} by {}@{} le{}",
                            c.holder, c.holder_epoch, c.lease_epoch
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        f.debug_struct("Control")
            .field("members", &members)
            .field("shards", &format!("v{} {shards:?}", s.shards.version))
            .field("lease", &lease)
            .field("commits", &commits)
            .finish()
    }
}
