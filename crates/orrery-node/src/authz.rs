//! Who may ask what of a node: the one authorisation rule for every
//! node-to-node [`Request`] and every proposable [`Command`].
//!
//! It owns the decision whether a request may be served, given who sends it
//! (a [`Caller`]: node id and epoch as the connection proves them, role from
//! the cluster configuration) and what the checking node knows of the
//! membership (a [`View`]). It must never take the caller's identity from a
//! message body, do I/O, read a clock or change anything: [`authorize`] is a
//! pure function, and `Server::dispatch` (node.rs) answers, logs and counts
//! what it refuses, before anything else looks at the request.
//!
//! The rules (ARCHITECTURE.md, "Authorisation", has them as a table):
//! * Raft RPCs come from voters only.
//! * Decisions are the coordinator's: it writes them on the leader's own
//!   replica (`ControlPlane::write`), so a peer proposing one is refused.
//! * Anything about a node (a join, a report, a heartbeat, a poll, an alarm,
//!   a job commit, a log line) comes from that node itself, under the epoch
//!   its connection announces. An operator acts through a voter: a voter
//!   may drain another node and revoke certificates.
//! * Epoch 0 (not joined) reaches only what a process needs to join: Join,
//!   Ping, the state and shard map reads, and log forwarding (the collector
//!   sink's connection never learns the epoch); a voter's health probes,
//!   because the coordinator may probe before its own join commits.
//! * A superseded or revoked epoch is refused (reads excepted, so a fenced
//!   node can come back); an epoch beyond a member's current one was never
//!   issued, and the leader, whose replica holds every epoch it issued,
//!   refuses it. Elsewhere the view may lag behind the leader, so a newer
//!   epoch is let through: only the leader can tell a forgery from news.
//!
//! Nothing is forwarded (a node that does not lead says who does), so the
//! caller checked here is always the request's author.

use crate::messages::{MembershipView, Request};
use orrery_core::{ClusterState, Command, Epoch, NodeId, Role};

/// Who sends a request, as the connection proves it (today the HMAC
/// handshake, later the TLS certificate), never as the message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub node: NodeId,
    pub epoch: Epoch,
    /// Its role in the replicated cluster configuration (the node's own
    /// configuration until that is committed); `None`: not configured.
    pub role: Option<Role>,
}

/// A node's membership as the checking node knows it.
pub(crate) trait Members {
    /// `node`'s current epoch (0: never joined) and why that epoch is fenced,
    /// if it is; `None`: not a member.
    fn standing(&self, node: NodeId) -> Option<(Epoch, Option<String>)>;
    /// Knows no members at all yet (a worker before its first heartbeat
    /// acknowledgement, a voter before the configuration committed): no
    /// epoch can be judged.
    fn knows_nobody(&self) -> bool;
}

impl Members for MembershipView {
    fn standing(&self, node: NodeId) -> Option<(Epoch, Option<String>)> {
        self.members.get(&node).cloned()
    }
    fn knows_nobody(&self) -> bool {
        self.members.is_empty()
    }
}

impl Members for ClusterState {
    fn standing(&self, node: NodeId) -> Option<(Epoch, Option<String>)> {
        let m = self.members.get(&node)?;
        Some((m.epoch, self.refusal(node, m.epoch)))
    }
    fn knows_nobody(&self) -> bool {
        self.members.is_empty()
    }
}

/// What the checking node knows of the membership.
pub(crate) struct View<'a> {
    pub members: &'a dyn Members,
    /// The leader's own replica: every epoch issued so far is in it (the
    /// leader applies a join before it answers it), so an epoch beyond a
    /// member's current one was never issued.
    pub authoritative: bool,
}

/// Why a request is refused. [`Refusal::kind`] is the stable label of
/// `orrery_rpc_refused_total{reason}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("node {node} is not in the cluster configuration")]
    NotConfigured { node: NodeId },
    #[error("node {node} is not a member of this cluster")]
    NotMember { node: NodeId },
    #[error("node {node} is a {role}: only voters may {what}")]
    NotVoter {
        node: NodeId,
        role: Role,
        what: &'static str,
    },
    #[error("node {node} has not joined (epoch 0): {what} needs its current epoch")]
    NotJoined { node: NodeId, what: &'static str },
    #[error("node {node} epoch {epoch} is superseded: the current epoch is {current}")]
    Superseded {
        node: NodeId,
        epoch: Epoch,
        current: Epoch,
    },
    /// The replicated state's reason (it names node, epoch and why).
    #[error("{reason}")]
    Revoked { reason: String },
    #[error("node {node} epoch {epoch} was never issued: its current epoch is {current}")]
    NeverIssued {
        node: NodeId,
        epoch: Epoch,
        current: Epoch,
    },
    #[error("node {node} may not {what} as node {claimed}")]
    Impersonation {
        node: NodeId,
        claimed: NodeId,
        what: &'static str,
    },
    #[error("node {node} sent a {what} for epoch {claimed} on a connection of epoch {epoch}")]
    EpochMismatch {
        node: NodeId,
        epoch: Epoch,
        claimed: Epoch,
        what: &'static str,
    },
    #[error("only the leader's coordinator decides {command}: node {node} may not propose it")]
    CoordinatorOnly { node: NodeId, command: &'static str },
    #[error("node {node}'s certificate grants the {certified} role, the cluster configures it as a {configured}")]
    WrongRole {
        node: NodeId,
        certified: Role,
        configured: Role,
    },
}

impl Refusal {
    /// Every [`Refusal::kind`], for metrics (a fixed, bounded label set).
    pub const KINDS: [&'static str; 11] = [
        "not_configured",
        "not_member",
        "not_voter",
        "not_joined",
        "superseded",
        "revoked",
        "never_issued",
        "impersonation",
        "epoch_mismatch",
        "coordinator_only",
        "wrong_role",
    ];

    /// A stable label, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        let i = match self {
            Refusal::NotConfigured { .. } => 0,
            Refusal::NotMember { .. } => 1,
            Refusal::NotVoter { .. } => 2,
            Refusal::NotJoined { .. } => 3,
            Refusal::Superseded { .. } => 4,
            Refusal::Revoked { .. } => 5,
            Refusal::NeverIssued { .. } => 6,
            Refusal::Impersonation { .. } => 7,
            Refusal::EpochMismatch { .. } => 8,
            Refusal::CoordinatorOnly { .. } => 9,
            Refusal::WrongRole { .. } => 10,
        };
        Self::KINDS[i]
    }

    /// Whether the answer is `Reply::Fenced` (the caller's process is
    /// fenced: superseded, revoked, not a member; an honest node stops
    /// serving and rejoins) rather than `Reply::Error`. An epoch never
    /// issued is an error, not a fence: an honest node meets it only while
    /// a new leader catches up, and must not fence itself for that.
    pub fn fences(&self) -> bool {
        matches!(
            self,
            Refusal::Superseded { .. } | Refusal::Revoked { .. } | Refusal::NotMember { .. }
        )
    }
}

/// Which epochs of the caller a request accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Epochs {
    /// Its current, unfenced epoch: it has joined and is not fenced.
    Current,
    /// As `Current`, or 0: a process that has not joined (yet, or again).
    CurrentOrUnjoined,
    /// Any epoch the cluster issued it, or 0: reads, which a fenced
    /// process needs to come back.
    Issued,
    /// The handshake: not superseded, not revoked; 0 and newer epochs pass
    /// (each request then applies its own rule).
    Connect,
}

/// May `caller` make request `req` of a node that knows `view`?
pub(crate) fn authorize(caller: &Caller, req: &Request, view: &View) -> Result<(), Refusal> {
    let Some(role) = caller.role else {
        return Err(Refusal::NotConfigured { node: caller.node });
    };
    let unjoined_voter = if role.is_voter() {
        Epochs::CurrentOrUnjoined
    } else {
        Epochs::Current
    };
    match req {
        Request::Raft(_) => voter(caller, role, "send Raft messages"),
        Request::Propose(cmd) => propose(caller, role, cmd, view),
        Request::Heartbeat { node, epoch, .. } => {
            itself(caller, *node, Some(*epoch), "heartbeat")?;
            epochs(caller, view, Epochs::Current, "a heartbeat")
        }
        Request::Poll { node, epoch, .. } => {
            itself(caller, *node, Some(*epoch), "poll")?;
            epochs(caller, view, Epochs::Current, "a poll")
        }
        Request::Accuse { .. } => epochs(caller, view, Epochs::Current, "an accusation"),
        Request::ShardCall { .. } => epochs(caller, view, Epochs::Current, "a shard call"),
        Request::Probe { .. } => {
            voter(caller, role, "ask for probes")?;
            epochs(caller, view, Epochs::Current, "a probe request")
        }
        Request::HealthProbe { .. } => epochs(caller, view, unjoined_voter, "a health probe"),
        Request::Ping => epochs(caller, view, Epochs::CurrentOrUnjoined, "a ping"),
        Request::Participants => {
            epochs(caller, view, Epochs::Current, "a read of the participants")
        }
        Request::FetchState | Request::FetchShards => {
            epochs(caller, view, Epochs::Issued, "a read")
        }
        Request::Logs(lines) => {
            if let Some(l) = lines.iter().find(|l| l.node != caller.node) {
                return Err(impersonation(caller, l.node, "forward log lines"));
            }
            epochs(caller, view, Epochs::CurrentOrUnjoined, "log lines")
        }
    }
}

/// May `caller` hold a connection at all (the handshake's check)?
/// `certified`: the role its certificate grants (`None` without TLS); a
/// certificate for another role than the configured one is refused, so a
/// worker's key cannot be reused for a node configured as a voter.
pub(crate) fn admit(caller: &Caller, certified: Option<Role>, view: &View) -> Result<(), Refusal> {
    let Some(configured) = caller.role else {
        return Err(Refusal::NotConfigured { node: caller.node });
    };
    if let Some(certified) = certified.filter(|r| *r != configured) {
        return Err(Refusal::WrongRole {
            node: caller.node,
            certified,
            configured,
        });
    }
    epochs(caller, view, Epochs::Connect, "a connection")
}

/// Who may propose a command.
enum Proposer {
    /// Written by the leader's coordinator on its own replica; never
    /// proposed by a peer.
    Coordinator,
    /// The node itself, under the epoch the command names (Join names none).
    Itself { node: NodeId, epoch: Option<Epoch> },
    /// The node itself, or a voter acting for an operator (`Node::drain`).
    ItselfOrVoter { node: NodeId },
    /// A voter acting for an operator (the console of a voter).
    Voter,
    /// Any current member (a wait cycle names shards, not a node).
    Member,
}

/// What each command is and who proposes it. Exhaustive on purpose: a new
/// command does not compile until someone decides who may propose it.
fn proposer(cmd: &Command) -> (&'static str, Proposer) {
    use Proposer::*;
    let me = |node: NodeId, epoch: Epoch| Itself {
        node,
        epoch: Some(epoch),
    };
    match cmd {
        Command::Join { node, .. } => (
            "Join",
            Itself {
                node: *node,
                epoch: None,
            },
        ),
        Command::Report { node, epoch, .. } => ("Report", me(*node, *epoch)),
        Command::Alarm { node, epoch, .. } => ("Alarm", me(*node, *epoch)),
        // Leaving is the node's own decision; nobody leaves for another.
        Command::Leave { node, epoch, .. } => ("Leave", me(*node, *epoch)),
        Command::CommitJob {
            holder,
            holder_epoch,
            ..
        } => ("CommitJob", me(*holder, *holder_epoch)),
        Command::AdoptJobCommit {
            holder,
            holder_epoch,
            ..
        } => ("AdoptJobCommit", me(*holder, *holder_epoch)),
        Command::Drain { node, .. } => ("Drain", ItselfOrVoter { node: *node }),
        Command::Deadlock { .. } => ("Deadlock", Member),
        Command::RevokeCertificates { .. } => ("RevokeCertificates", Voter),
        // `orrery roll` / `orrery drill` through a voter's console (token).
        Command::Operation { .. } => ("Operation", Voter),
        // `config set` through a voter's console (token).
        Command::SetConfig { .. } => ("SetConfig", Voter),
        Command::Configure { .. } => ("Configure", Coordinator),
        Command::Advance { .. } => ("Advance", Coordinator),
        Command::Stuck { .. } => ("Stuck", Coordinator),
        Command::Exclude { .. } => ("Exclude", Coordinator),
        Command::AdmitLate { .. } => ("AdmitLate", Coordinator),
        Command::BeginBoot { .. } => ("BeginBoot", Coordinator),
        Command::LeaderChanged { .. } => ("LeaderChanged", Coordinator),
        Command::Suspect { .. } => ("Suspect", Coordinator),
        Command::Refute { .. } => ("Refute", Coordinator),
        Command::Remove { .. } => ("Remove", Coordinator),
        Command::DeclareShards { .. } => ("DeclareShards", Coordinator),
        Command::MoveShards { .. } => ("MoveShards", Coordinator),
        Command::HealthChanged { .. } => ("HealthChanged", Coordinator),
        Command::DeclareJobs { .. } => ("DeclareJobs", Coordinator),
        Command::GrantJob { .. } => ("GrantJob", Coordinator),
        Command::JobUnassigned { .. } => ("JobUnassigned", Coordinator),
        Command::JobOverdue { .. } => ("JobOverdue", Coordinator),
    }
}

fn propose(caller: &Caller, role: Role, cmd: &Command, view: &View) -> Result<(), Refusal> {
    let (command, who) = proposer(cmd);
    match who {
        Proposer::Coordinator => Err(Refusal::CoordinatorOnly {
            node: caller.node,
            command,
        }),
        // A join issues a new epoch: the process has none yet (0).
        Proposer::Itself { node, epoch: None } => {
            itself(caller, node, None, command)?;
            epochs(caller, view, Epochs::CurrentOrUnjoined, command)
        }
        Proposer::Itself { node, epoch } => {
            itself(caller, node, epoch, command)?;
            epochs(caller, view, Epochs::Current, command)
        }
        Proposer::ItselfOrVoter { node } => {
            if !role.is_voter() {
                itself(caller, node, None, command)?;
            }
            epochs(caller, view, Epochs::Current, command)
        }
        Proposer::Voter => {
            voter(caller, role, "act for an operator")?;
            epochs(caller, view, Epochs::Current, command)
        }
        Proposer::Member => epochs(caller, view, Epochs::Current, command),
    }
}

fn voter(caller: &Caller, role: Role, what: &'static str) -> Result<(), Refusal> {
    if role.is_voter() {
        Ok(())
    } else {
        Err(Refusal::NotVoter {
            node: caller.node,
            role,
            what,
        })
    }
}

fn impersonation(caller: &Caller, claimed: NodeId, what: &'static str) -> Refusal {
    Refusal::Impersonation {
        node: caller.node,
        claimed,
        what,
    }
}

/// The message speaks for `node` (under `epoch`): that must be the caller.
fn itself(
    caller: &Caller,
    node: NodeId,
    epoch: Option<Epoch>,
    what: &'static str,
) -> Result<(), Refusal> {
    if node != caller.node {
        return Err(impersonation(caller, node, what));
    }
    match epoch {
        Some(claimed) if claimed != caller.epoch => Err(Refusal::EpochMismatch {
            node: caller.node,
            epoch: caller.epoch,
            claimed,
            what,
        }),
        _ => Ok(()),
    }
}

/// The caller's epoch under `rule`, as far as `view` can tell.
fn epochs(caller: &Caller, view: &View, rule: Epochs, what: &'static str) -> Result<(), Refusal> {
    let (node, epoch) = (caller.node, caller.epoch);
    if epoch == 0 {
        return match rule {
            Epochs::Current => Err(Refusal::NotJoined { node, what }),
            _ => Ok(()),
        };
    }
    if view.members.knows_nobody() {
        return Ok(());
    }
    let Some((current, fenced)) = view.members.standing(node) else {
        return Err(Refusal::NotMember { node });
    };
    if epoch > current {
        if view.authoritative && rule != Epochs::Connect {
            return Err(Refusal::NeverIssued {
                node,
                epoch,
                current,
            });
        }
        return Ok(());
    }
    if rule == Epochs::Issued {
        return Ok(());
    }
    if epoch < current {
        return Err(Refusal::Superseded {
            node,
            epoch,
            current,
        });
    }
    match fenced {
        Some(reason) => Err(Refusal::Revoked { reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfwd::LogLine;
    use orrery_core::shardmap::ShardId;
    use orrery_core::{ClusterConfig, Health, NodeSpec, Response, Stage};
    use std::collections::BTreeSet;

    // The cluster every test checks against: voters 1 and 2, arbiter 3,
    // workers 4 to 7; node 9 is not configured. Current epochs: 1:10, 2:11,
    // 3:12, 4:14 (13 superseded), 5:15 (revoked), 6: never joined; 7 is
    // configured but missing from the view.
    const REVOKED: &str = "node 5 epoch 15 was revoked: a majority of probes failed";

    fn role(node: NodeId) -> Option<Role> {
        match node {
            1 | 2 => Some(Role::Voter),
            3 => Some(Role::Arbiter),
            4..=7 => Some(Role::Worker),
            _ => None,
        }
    }

    fn members() -> MembershipView {
        let mut v = MembershipView::default();
        for (n, e) in [(1, 10), (2, 11), (3, 12), (4, 14), (6, 0)] {
            v.members.insert(n, (e, None));
        }
        v.members.insert(5, (15, Some(REVOKED.into())));
        v
    }

    fn caller(node: NodeId, epoch: Epoch) -> Caller {
        Caller {
            node,
            epoch,
            role: role(node),
        }
    }

    /// The kind of refusal, or "ok".
    fn verdict(c: Caller, req: &Request, authoritative: bool) -> &'static str {
        let m = members();
        let view = View {
            members: &m,
            authoritative,
        };
        authorize(&c, req, &view).map_or_else(|r| r.kind(), |()| "ok")
    }

    fn cmd(c: Command) -> Request {
        Request::Propose(c)
    }
    fn report(node: NodeId, epoch: Epoch) -> Request {
        cmd(Command::Report {
            node,
            epoch,
            stage: Stage::READY,
            waiting: None,
            progress: None,
            unreachable: vec![],
            at: 1,
        })
    }
    fn heartbeat(node: NodeId, epoch: Epoch) -> Request {
        Request::Heartbeat {
            node,
            epoch,
            health: Health::Healthy,
            view_version: 0,
        }
    }
    fn poll(node: NodeId, epoch: Epoch) -> Request {
        Request::Poll {
            node,
            epoch,
            next: Stage::READY,
        }
    }
    fn join(node: NodeId) -> Request {
        cmd(Command::Join { node, at: 1 })
    }
    fn drain(node: NodeId) -> Request {
        cmd(Command::Drain {
            node,
            drain: true,
            at: 1,
        })
    }
    fn logs(node: NodeId) -> Request {
        Request::Logs(vec![LogLine {
            node,
            at_ms: 1,
            level: "WARN".into(),
            channel: "orrery::node".into(),
            message: "hello".into(),
        }])
    }

    /// One command of every kind, speaking for `node` under `epoch`.
    fn every_command(node: NodeId, epoch: Epoch) -> Vec<Command> {
        let mut all = about_a_node(node, epoch);
        all.extend(decisions(node, epoch));
        all
    }

    /// The commands nodes propose (for themselves, or for an operator).
    fn about_a_node(node: NodeId, epoch: Epoch) -> Vec<Command> {
        let (at, job, s) = (1, String::from("stats"), String::from("why"));
        let (period, lease_epoch, holder, holder_epoch) = (1, 2, node, epoch);
        vec![
            Command::Join { node, at },
            Command::Report {
                node,
                epoch,
                stage: Stage::READY,
                waiting: None,
                progress: None,
                unreachable: vec![],
                at,
            },
            Command::Drain {
                node,
                drain: true,
                at,
            },
            Command::Deadlock { cycle: vec![], at },
            Command::Alarm {
                node,
                epoch,
                what: s.clone(),
                at,
            },
            Command::CommitJob {
                job: job.clone(),
                period,
                lease_epoch,
                holder,
                holder_epoch,
                summary: s,
                at,
            },
            Command::AdoptJobCommit {
                job,
                period,
                lease_epoch,
                holder,
                holder_epoch,
                stored_lease_epoch: 1,
                at,
            },
            Command::RevokeCertificates {
                node,
                min_serial: 2,
                at,
            },
            Command::Leave { node, epoch, at },
            Command::Operation {
                what: "roll".into(),
                detail: "started".into(),
                at,
            },
        ]
    }

    /// The coordinator's decisions, about `node` where they name one.
    fn decisions(node: NodeId, epoch: Epoch) -> Vec<Command> {
        let (at, boot, job, period) = (1, 1, String::from("stats"), 1);
        let (why, config) = (String::from("why"), ClusterConfig::default());
        let stage = Stage::READY;
        #[rustfmt::skip]
        let all = vec![
            Command::Configure { config, at },
            Command::Advance { boot, from: stage, at },
            Command::Stuck { boot, node, stage, diagnosis: why.clone(), at },
            Command::Exclude { boot, node, epoch, reason: why.clone(), at },
            Command::AdmitLate { node, epoch, at },
            Command::BeginBoot { after: boot, live: BTreeSet::new(), at },
            Command::LeaderChanged { leader: node, term: 1, at },
            Command::Suspect { node, epoch, reason: why.clone(), at },
            Command::Refute { node, epoch, detail: why.clone(), at },
            Command::Remove { node, epoch, reason: why.clone(), at },
            Command::DeclareShards { kinds: vec![], at },
            Command::MoveShards { moves: vec![], reason: why.clone(), at },
            Command::HealthChanged { node, epoch, healthy: true, reason: None, at },
            Command::DeclareJobs { jobs: vec![], at },
            Command::GrantJob { job: job.clone(), period, lease_epoch: 1, holder: node, holder_epoch: epoch, at },
            Command::JobUnassigned { job: job.clone(), period, reason: why, at },
            Command::JobOverdue { job, period, at },
        ];
        all
    }

    /// One request of every kind (and every command), speaking for `node`
    /// under `epoch`, with a label for failure messages.
    fn every_request(node: NodeId, epoch: Epoch) -> Vec<(String, Request)> {
        let mut all = vec![
            ("raft".to_string(), Request::Raft(vec![1, 2, 3])),
            ("poll".into(), poll(node, epoch)),
            ("fetch_state".into(), Request::FetchState),
            ("ping".into(), Request::Ping),
            ("heartbeat".into(), heartbeat(node, epoch)),
            (
                "probe".into(),
                Request::Probe {
                    round: 1,
                    suspect: 2,
                    epoch: 11,
                },
            ),
            ("health_probe".into(), Request::HealthProbe { nonce: 7 }),
            (
                "accuse".into(),
                Request::Accuse {
                    suspect: 2,
                    epoch: 11,
                    detail: "no answer".into(),
                },
            ),
            (
                "shard_call".into(),
                Request::ShardCall {
                    shard: ShardId { kind: 0, key: 1 },
                    epoch: Some(1),
                    call: "ping".into(),
                    payload: vec![],
                    deadline_ms: 100,
                    chain: vec![],
                },
            ),
            ("fetch_shards".into(), Request::FetchShards),
            ("participants".into(), Request::Participants),
            ("logs".into(), logs(node)),
        ];
        for c in every_command(node, epoch) {
            all.push((format!("propose {}", proposer(&c).0), Request::Propose(c)));
        }
        all
    }

    /// The request labelled `label` in [`every_request`].
    fn req(label: &str, node: NodeId, epoch: Epoch) -> Request {
        every_request(node, epoch)
            .into_iter()
            .find(|(l, _)| l == label)
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("no request {label}"))
    }

    /// (what, who asks, the request, asked of the leader, verdict).
    type Case = (&'static str, Caller, Request, bool, &'static str);

    fn run(table: Vec<Case>) {
        for (name, c, req, authoritative, want) in table {
            assert_eq!(verdict(c, &req, authoritative), want, "{name}");
        }
    }

    /// Who may propose what, under which epoch.
    #[test]
    fn every_proposal_rule() {
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            // Decisions are the coordinator's, never a peer's.
            ("a worker proposes Remove", caller(4, 14), cmd(Command::Remove { node: 2, epoch: 11, reason: "x".into(), at: 1 }), true, "coordinator_only"),
            ("a voter proposes Remove", caller(1, 10), cmd(Command::Remove { node: 4, epoch: 14, reason: "x".into(), at: 1 }), true, "coordinator_only"),
            ("a worker proposes MoveShards", caller(4, 14), cmd(Command::MoveShards { moves: vec![], reason: "x".into(), at: 1 }), false, "coordinator_only"),
            // Joining: as itself, unjoined or current.
            ("a first join", caller(6, 0), join(6), true, "ok"),
            ("a rejoin at epoch 0", caller(4, 0), join(4), true, "ok"),
            ("a join under the current epoch", caller(4, 14), join(4), true, "ok"),
            ("a join for another node", caller(4, 0), join(6), true, "impersonation"),
            ("a join from a revoked epoch", caller(5, 15), join(5), true, "revoked"),
            ("a join from a superseded epoch", caller(4, 13), join(4), true, "superseded"),
            ("a join from a never-issued epoch", caller(4, 999), join(4), true, "never_issued"),
            // Reports: as itself, under its current epoch.
            ("a report", caller(4, 14), report(4, 14), true, "ok"),
            ("a report as another node", caller(4, 14), report(2, 11), true, "impersonation"),
            ("a report under another epoch", caller(4, 14), report(4, 13), true, "epoch_mismatch"),
            ("a report at epoch 0", caller(4, 0), report(4, 0), true, "not_joined"),
            ("a report at epoch 999, leader", caller(4, 999), report(4, 999), true, "never_issued"),
            ("a report at epoch 999, lagging view", caller(4, 999), report(4, 999), false, "ok"),
            ("a report at epoch 2^63", caller(4, 1 << 63), report(4, 1 << 63), true, "never_issued"),
            ("a superseded report", caller(4, 13), report(4, 13), true, "superseded"),
            ("a revoked report", caller(5, 15), report(5, 15), true, "revoked"),
            ("a report from a configured non-member", caller(7, 3), report(7, 3), true, "not_member"),
            // Other commands about a node: as itself.
            ("an alarm as another node", caller(4, 14), cmd(Command::Alarm { node: 1, epoch: 10, what: "x".into(), at: 1 }), true, "impersonation"),
            ("a job commit", caller(4, 14), req("propose CommitJob", 4, 14), true, "ok"),
            ("a job commit for another holder", caller(4, 14), req("propose CommitJob", 5, 15), true, "impersonation"),
            ("an adoption for another holder", caller(4, 14), req("propose AdoptJobCommit", 2, 11), true, "impersonation"),
            ("a worker drains itself", caller(4, 14), drain(4), true, "ok"),
            ("a worker drains another node", caller(4, 14), drain(5), true, "impersonation"),
            ("a voter drains a worker (operator)", caller(1, 10), drain(4), true, "ok"),
            ("a voter revokes a node's certificates (operator)", caller(2, 11), req("propose RevokeCertificates", 4, 14), true, "ok"),
            ("a worker revokes certificates", caller(4, 14), req("propose RevokeCertificates", 5, 15), true, "not_voter"),
            ("a superseded voter revokes certificates", caller(1, 9), req("propose RevokeCertificates", 4, 14), true, "superseded"),
            ("a voter records an operation (operator)", caller(2, 11), req("propose Operation", 4, 14), true, "ok"),
            ("a worker records an operation", caller(4, 14), req("propose Operation", 4, 14), true, "not_voter"),
            ("a voter records an operation at epoch 0", caller(2, 0), req("propose Operation", 4, 14), true, "not_joined"),
            ("a wait cycle from a member", caller(4, 14), cmd(Command::Deadlock { cycle: vec![], at: 1 }), true, "ok"),
            ("a wait cycle at epoch 0", caller(4, 0), cmd(Command::Deadlock { cycle: vec![], at: 1 }), true, "not_joined"),
            // Leaving: the node itself, under its current epoch.
            ("a worker leaves", caller(4, 14), req("propose Leave", 4, 14), true, "ok"),
            ("a voter leaves", caller(1, 10), req("propose Leave", 1, 10), true, "ok"),
            ("a leave for another node", caller(4, 14), req("propose Leave", 6, 0), true, "impersonation"),
            ("a voter leaves for a worker (no operator shortcut)", caller(1, 10), req("propose Leave", 4, 14), true, "impersonation"),
            ("a leave under another epoch", caller(4, 14), req("propose Leave", 4, 13), true, "epoch_mismatch"),
            ("a leave from a superseded epoch", caller(4, 13), req("propose Leave", 4, 13), true, "superseded"),
            ("a leave from a revoked epoch", caller(5, 15), req("propose Leave", 5, 15), true, "revoked"),
            ("a leave at epoch 0", caller(4, 0), req("propose Leave", 4, 0), true, "not_joined"),
            ("a leave at epoch 999, leader", caller(4, 999), req("propose Leave", 4, 999), true, "never_issued"),
        ];
        run(table);
    }

    /// Who may send the other requests, under which epoch.
    #[test]
    fn every_request_rule() {
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            // Raft: voters (arbiters are voters), at any epoch.
            ("a voter's raft", caller(1, 10), Request::Raft(vec![]), true, "ok"),
            ("an arbiter's raft", caller(3, 12), Request::Raft(vec![]), true, "ok"),
            ("a voter's raft before it joined", caller(1, 0), Request::Raft(vec![]), true, "ok"),
            ("a worker sends raft", caller(4, 14), Request::Raft(vec![]), true, "not_voter"),
            ("a worker sends raft at epoch 0", caller(4, 0), Request::Raft(vec![]), false, "not_voter"),
            ("a stranger sends raft", caller(9, 0), Request::Raft(vec![]), true, "not_configured"),
            // Heartbeats and polls: as itself, under its current epoch.
            ("a heartbeat", caller(4, 14), heartbeat(4, 14), true, "ok"),
            ("a heartbeat as another node", caller(4, 14), heartbeat(5, 15), true, "impersonation"),
            ("a heartbeat under another epoch", caller(4, 14), heartbeat(4, 15), true, "epoch_mismatch"),
            ("a heartbeat at epoch 0", caller(4, 0), heartbeat(4, 0), true, "not_joined"),
            ("a heartbeat at epoch 999", caller(4, 999), heartbeat(4, 999), true, "never_issued"),
            ("a revoked heartbeat", caller(5, 15), heartbeat(5, 15), true, "revoked"),
            ("a poll", caller(4, 14), poll(4, 14), true, "ok"),
            ("a voter polls for a worker", caller(1, 10), poll(4, 14), true, "impersonation"),
            // Membership traffic.
            ("an accusation", caller(4, 14), req("accuse", 4, 14), true, "ok"),
            ("a revoked accuser", caller(5, 15), req("accuse", 5, 15), true, "revoked"),
            ("a probe request from a voter", caller(1, 10), req("probe", 1, 10), false, "ok"),
            ("a probe request from a worker", caller(4, 14), req("probe", 4, 14), false, "not_voter"),
            ("a voter's health probe before it joined", caller(1, 0), Request::HealthProbe { nonce: 1 }, false, "ok"),
            ("a worker's health probe before it joined", caller(4, 0), Request::HealthProbe { nonce: 1 }, false, "not_joined"),
            ("a worker's health probe", caller(4, 14), Request::HealthProbe { nonce: 1 }, false, "ok"),
            // Pings, reads, logs.
            ("a ping before joining", caller(6, 0), Request::Ping, true, "ok"),
            ("a revoked ping", caller(5, 15), Request::Ping, false, "revoked"),
            ("a superseded ping", caller(4, 13), Request::Ping, false, "superseded"),
            ("a read from a revoked epoch", caller(5, 15), Request::FetchState, true, "ok"),
            ("a read from a superseded epoch", caller(4, 13), Request::FetchShards, true, "ok"),
            ("a read at epoch 999", caller(4, 999), Request::FetchState, true, "never_issued"),
            ("a read by a stranger", caller(9, 0), Request::FetchState, true, "not_configured"),
            ("own log lines at epoch 0", caller(4, 0), logs(4), false, "ok"),
            ("another node's log lines", caller(4, 14), logs(5), false, "impersonation"),
        ];
        run(table);
    }

    #[test]
    fn no_peer_proposes_a_coordinator_decision() {
        for node in [1, 3, 4] {
            let epoch = members().members[&node].0;
            for c in every_command(node, epoch) {
                let (name, who) = proposer(&c);
                let v = verdict(caller(node, epoch), &Request::Propose(c), true);
                match who {
                    Proposer::Coordinator => {
                        assert_eq!(v, "coordinator_only", "node {node}: {name}")
                    }
                    Proposer::Voter if node == 4 => assert_eq!(v, "not_voter", "worker: {name}"),
                    _ => assert_eq!(v, "ok", "node {node} as itself: {name}"),
                }
            }
        }
    }

    #[test]
    fn epoch_zero_reaches_only_what_joining_needs() {
        let open = [
            "ping",
            "fetch_state",
            "fetch_shards",
            "logs",
            "propose Join",
        ];
        for (label, req) in every_request(4, 0) {
            let want = open.contains(&label.as_str());
            let v = verdict(caller(4, 0), &req, true);
            assert_eq!(v == "ok", want, "worker at epoch 0, {label}: {v}");
        }
        // A voter also talks Raft and health-probes before its join commits
        // (it may coordinate first).
        for (label, req) in every_request(1, 0) {
            let want = open.contains(&label.as_str()) || label == "raft" || label == "health_probe";
            let v = verdict(caller(1, 0), &req, true);
            assert_eq!(v == "ok", want, "voter at epoch 0, {label}: {v}");
        }
    }

    #[test]
    fn the_leader_refuses_an_epoch_it_never_issued_on_every_request() {
        for node in [1, 4] {
            for (label, req) in every_request(node, 999) {
                let v = verdict(caller(node, 999), &req, true);
                // Raft is the voter set's business, not the epochs'.
                let want_ok = node == 1 && label == "raft";
                assert_eq!(v == "ok", want_ok, "node {node} at epoch 999, {label}: {v}");
            }
        }
    }

    #[test]
    fn the_handshake_refuses_fenced_processes_and_strangers_only() {
        let m = members();
        let view = View {
            members: &m,
            authoritative: true,
        };
        let admitted = |node, epoch| admit(&caller(node, epoch), None, &view).map_err(|r| r.kind());
        assert_eq!(admitted(4, 14), Ok(()));
        assert_eq!(admitted(4, 0), Ok(()), "joins need a connection");
        assert_eq!(admitted(4, 999), Ok(()), "the request decides");
        assert_eq!(admitted(4, 13), Err("superseded"));
        assert_eq!(admitted(5, 15), Err("revoked"));
        assert_eq!(admitted(9, 1), Err("not_configured"));
        // Node 4 is a worker: its own worker certificate passes, a
        // voter's certificate in its name does not.
        let certified = |role| admit(&caller(4, 14), Some(role), &view).map_err(|r| r.kind());
        assert_eq!(certified(Role::Worker), Ok(()));
        assert_eq!(certified(Role::Voter), Err("wrong_role"));
    }

    #[test]
    fn a_node_that_knows_nobody_judges_roles_and_identity_only() {
        let empty = MembershipView::default();
        let view = View {
            members: &empty,
            authoritative: true,
        };
        let judge = |c: Caller, r: &Request| authorize(&c, r, &view).map_err(|r| r.kind());
        assert_eq!(judge(caller(4, 999), &report(4, 999)), Ok(()));
        assert_eq!(judge(caller(4, 0), &report(4, 0)), Err("not_joined"));
        assert_eq!(judge(caller(4, 14), &report(5, 14)), Err("impersonation"));
        assert_eq!(
            judge(caller(4, 14), &Request::Raft(vec![])),
            Err("not_voter")
        );
    }

    #[test]
    fn the_replica_and_the_heartbeat_view_judge_alike() {
        let mut config = ClusterConfig::default();
        for n in 1..=5 {
            let spec = NodeSpec {
                addr: format!("127.0.0.1:{}", 7000 + n),
                admin_addr: format!("127.0.0.1:{}", 8000 + n),
                role: role(n).unwrap(),
            };
            config.nodes.insert(n, spec);
        }
        let mut s = ClusterState::default();
        let mut i = 0;
        let mut apply = |s: &mut ClusterState, c: Command| {
            i += 1;
            s.apply(i, c)
        };
        assert_eq!(
            apply(&mut s, Command::Configure { config, at: 1 }),
            Response::Ok
        );
        for n in [1, 4, 4, 5] {
            apply(&mut s, Command::Join { node: n, at: 1 });
        }
        let e5 = s.members[&5].epoch;
        let removed = Command::Remove {
            node: 5,
            epoch: e5,
            reason: "probes failed".into(),
            at: 2,
        };
        assert_eq!(apply(&mut s, removed), Response::Ok);
        let view = MembershipView::of(&s);
        for node in 1..=5 {
            for epoch in 0..=e5 + 1 {
                for (label, req) in every_request(node, epoch) {
                    let judge = |members: &dyn Members| {
                        let v = View {
                            members,
                            authoritative: true,
                        };
                        authorize(&caller(node, epoch), &req, &v)
                    };
                    assert_eq!(
                        judge(&s),
                        judge(&view),
                        "node {node} epoch {epoch}: {label}"
                    );
                }
            }
        }
        assert_eq!(
            verdict_with(&s, caller(5, e5), &report(5, e5)),
            Err(Refusal::Revoked {
                reason: format!("node 5 epoch {e5} was revoked: probes failed")
            })
        );
    }

    fn verdict_with(m: &dyn Members, c: Caller, req: &Request) -> Result<(), Refusal> {
        authorize(
            &c,
            req,
            &View {
                members: m,
                authoritative: true,
            },
        )
    }

    #[test]
    fn refusal_kinds_are_distinct_and_only_fenced_processes_are_fenced() {
        let kinds: BTreeSet<&str> = Refusal::KINDS.into_iter().collect();
        assert_eq!(kinds.len(), Refusal::KINDS.len());
        let (node, epoch, current, what) = (4, 2, 3, "x");
        #[rustfmt::skip]
        let samples = [
            (Refusal::NotConfigured { node }, false),
            (Refusal::NotMember { node }, true),
            (Refusal::NotVoter { node, role: Role::Worker, what }, false),
            (Refusal::NotJoined { node, what }, false),
            (Refusal::Superseded { node, epoch, current }, true),
            (Refusal::Revoked { reason: what.into() }, true),
            (Refusal::NeverIssued { node, epoch: 4, current }, false),
            (Refusal::Impersonation { node, claimed: 5, what }, false),
            (Refusal::EpochMismatch { node, epoch, claimed: 1, what }, false),
            (Refusal::CoordinatorOnly { node, command: "Remove" }, false),
            (Refusal::WrongRole { node, certified: Role::Voter, configured: Role::Worker }, false),
        ];
        let seen: BTreeSet<&str> = samples.iter().map(|(r, _)| r.kind()).collect();
        assert_eq!(seen, kinds, "every kind has a variant");
        for (r, fences) in &samples {
            assert_eq!(r.fences(), *fences, "{r:?}");
        }
        let r = Refusal::Superseded {
            node: 4,
            epoch: 13,
            current: 14,
        };
        assert_eq!(
            r.to_string(),
            "node 4 epoch 13 is superseded: the current epoch is 14"
        );
    }

    #[test]
    fn the_sender_is_the_connection_not_the_message() {
        // The same Raft bytes pass from a voter's connection and are refused
        // from a worker's: nothing in a request says who sends it.
        let bytes = Request::Raft(vec![9; 16]);
        assert_eq!(verdict(caller(2, 11), &bytes, true), "ok");
        assert_eq!(verdict(caller(5, 15), &bytes, true), "not_voter");
        // A report naming the sender passes; the same report from any other
        // connection is an impersonation.
        let r = report(4, 14);
        assert_eq!(verdict(caller(4, 14), &r, true), "ok");
        for other in [1, 2, 3, 6] {
            let epoch = members().members[&other].0;
            assert_eq!(verdict(caller(other, epoch), &r, true), "impersonation");
        }
    }
}
