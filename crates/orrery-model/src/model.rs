//! [`OwnershipModel`]: the stateright model. Every step is one event: the
//! clock ticks; a node sends a heartbeat, fetches the shard map, walks its
//! start-up stages, runs a job lease, crashes, restarts, rejoins after a
//! fence, pauses or resumes; the network delivers or loses a message; the
//! leader moves a shard, removes a node, admits a rejoined one or grants
//! the job's period. Every leader decision is an orrery-core `Command`
//! applied by `ClusterState::apply`, which refuses what its rules refuse;
//! the leader's proposals themselves are left free (any shard to any node,
//! any member removed, any holder granted), a superset of what the
//! coordinator would propose, so the rules are checked against the worst
//! coordinator as well as the real one.
//!
//! A heartbeat round trip is one step, answered at its send time: an answer
//! computed later (a slow request), or received later (a slow reply), only
//! renews from the same send time with newer news, or fences later, so it
//! serves at no instant the one-step round trip does not; a lost heartbeat
//! or reply is a round trip that did not happen. `CommitJob`s are real
//! messages: delayed, reordered or lost ([`crate::world::Msg`]).

use crate::control::{Control, FENCE_TICKS, JOB, LEADER, TICK_MS};
use crate::node::{Proc, Run, Tick, Token};
use crate::world::{Accepted, Answer, Msg, Spent, World};
use orrery_core::lease::{answer_heartbeat, Heartbeat};
use orrery_core::shardmap::{Move, ShardId};
use orrery_core::state::{Rejection, Response};
use orrery_core::{Command, Coordinator, Gate, Health, Millis, NodeId, Stage};
use std::collections::BTreeSet;

/// The limits that keep the state space finite. Each is a constant of the
/// check that uses it (see the tests), so a reader knows what was covered.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub nodes: u64,
    pub shards: u64,
    /// The clock stops at this tick (ticks are [`TICK_MS`] ms).
    pub max_tick: Tick,
    pub max_crashes: u8,
    pub max_pauses: u8,
    /// `MoveShards` commands the leader may commit.
    pub max_moves: u8,
    /// `Remove` commands the leader may commit.
    pub max_removals: u8,
    /// Messages in flight at once; a send beyond it waits.
    pub max_in_flight: usize,
    /// Whether the leader grants the job and holders commit it.
    pub jobs: bool,
    /// Ticks added to the node's hand-over delay: 0 is the shipped rule
    /// (hand-over = `self_fence_after_ms`); more, to try a longer one.
    pub handover_margin: Tick,
}

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Tick,
    /// A heartbeat round trip: sent, answered by the leader, acknowledged.
    Heartbeat(NodeId),
    Deliver(Msg),
    Lose(Msg),
    FetchMap(NodeId),
    CatchUp(NodeId),
    RunJob(NodeId, Token),
    Crash(NodeId),
    Restart(NodeId),
    Rejoin(NodeId),
    Pause(NodeId),
    Resume(NodeId),
    MoveShard {
        key: u64,
        to: NodeId,
    },
    Remove(NodeId),
    AdmitLate(NodeId),
    Grant(NodeId),
}

/// The model of orrery's shard ownership and job leases.
#[derive(Clone, Debug)]
pub struct OwnershipModel {
    pub bounds: Bounds,
}

/// The shard of key `key`.
pub fn shard(key: u64) -> ShardId {
    ShardId { kind: 0, key }
}

fn ms(t: Tick) -> Millis {
    t * TICK_MS
}

impl OwnershipModel {
    pub fn new(bounds: Bounds) -> Self {
        OwnershipModel { bounds }
    }

    /// `self_fence_after_ms` (also the hand-over delay), in ticks, from the
    /// replicated configuration.
    pub fn fence(&self, w: &World) -> Tick {
        w.control.state.config.membership.self_fence_after_ms / TICK_MS
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> {
        1..=self.bounds.nodes
    }

    /// The ready cluster, every process at stage 0 holding the first map,
    /// none with a lease yet, nothing in flight, at time 0.
    pub fn init(&self) -> World {
        let b = &self.bounds;
        let control = Control::ready(b.nodes, b.shards);
        assert_eq!(
            FENCE_TICKS * TICK_MS,
            control.state.config.membership.self_fence_after_ms
        );
        let nodes = self
            .node_ids()
            .map(|id| {
                let epoch = control.state.members[&id].epoch;
                let mut p = Proc::joined(id, epoch, Stage::READY);
                p.adopt(&control.state.shards, 0);
                p.announce(control.state.shards.version);
                p
            })
            .collect();
        World {
            now: 0,
            control,
            nodes,
            net: BTreeSet::new(),
            spent: Spent::default(),
            commits: vec![],
            stale_refused: false,
        }
    }

    /// Which node serves each shard, as the nodes' own rule says, now.
    pub fn servers(&self, w: &World, key: u64) -> Vec<NodeId> {
        let fence = self.fence(w);
        w.nodes
            .iter()
            .filter(|p| p.serves(shard(key), w.now, fence, self.bounds.handover_margin))
            .map(|p| p.id)
            .collect()
    }

    pub(crate) fn node_actions(&self, w: &World, id: NodeId, out: &mut Vec<Action>) {
        let b = &self.bounds;
        let p = w.node(id);
        let room = w.net.len() < b.max_in_flight;
        match p.run {
            Run::Crashed => out.push(Action::Restart(id)),
            Run::Paused => out.push(Action::Resume(id)),
            Run::Running => {
                if p.fenced {
                    out.push(Action::Rejoin(id));
                } else {
                    out.push(Action::Heartbeat(id));
                    if p.stage < Stage::READY {
                        out.push(Action::CatchUp(id));
                    }
                }
                if w.control.state.shards.version > p.map.0.version {
                    out.push(Action::FetchMap(id));
                }
                if room {
                    out.extend(p.pending.iter().map(|t| Action::RunJob(id, *t)));
                }
                if w.spent.pauses < b.max_pauses {
                    out.push(Action::Pause(id));
                }
            }
        }
        if p.run != Run::Crashed && w.spent.crashes < b.max_crashes {
            out.push(Action::Crash(id));
        }
    }

    pub(crate) fn leader_actions(&self, w: &World, out: &mut Vec<Action>) {
        let b = &self.bounds;
        let s = &w.control.state;
        for id in self.node_ids() {
            if w.spent.moves < b.max_moves {
                for key in 0..b.shards {
                    let owner = s.shards.owner(shard(key)).map(|e| e.owner);
                    if owner != Some(id) {
                        out.push(Action::MoveShard { key, to: id });
                    }
                }
            }
            if w.spent.removals < b.max_removals && id != LEADER {
                out.push(Action::Remove(id));
            }
            if s.members
                .get(&id)
                .is_some_and(|m| m.report.stage < Stage::READY)
            {
                out.push(Action::AdmitLate(id));
            }
            if b.jobs {
                out.push(Action::Grant(id));
            }
        }
    }

    pub(crate) fn step(&self, w: &World, a: Action) -> Option<World> {
        let mut w = w.clone();
        let changed = match a {
            Action::Tick => {
                w.now += 1;
                true
            }
            Action::Heartbeat(id) => {
                let epoch = w.node(id).epoch;
                let answer = self.answer(&w, id, epoch);
                let sent = w.now;
                let before = w.node(id).clone();
                receive_ack(w.node_mut(id), epoch, sent, &answer);
                *w.node(id) != before
            }
            Action::Deliver(m) => self.deliver(&mut w, m),
            Action::Lose(m) => w.net.remove(&m),
            Action::FetchMap(id) => {
                let (map, now) = (w.control.state.shards.clone(), w.now);
                w.node_mut(id).adopt(&map, now);
                true
            }
            Action::CatchUp(id) => catch_up(&mut w, id),
            Action::RunJob(id, t) => self.run_job(&mut w, id, t),
            Action::Crash(id) => {
                w.spent.crashes += 1;
                w.spent.crashed.insert(id);
                *w.node_mut(id) = Proc::crashed(id);
                true
            }
            Action::Restart(id) => {
                let epoch = join(&mut w, id);
                *w.node_mut(id) = Proc::joined(id, epoch, Stage::RUNNING);
                true
            }
            Action::Rejoin(id) => {
                let epoch = join(&mut w, id);
                let p = w.node(id).rejoined(epoch);
                *w.node_mut(id) = p;
                true
            }
            Action::Pause(id) => {
                w.spent.pauses += 1;
                w.node_mut(id).run = Run::Paused;
                true
            }
            Action::Resume(id) => {
                w.node_mut(id).run = Run::Running;
                true
            }
            leader => self.decide(&mut w, leader),
        };
        if !changed {
            return None;
        }
        let fence = self.fence(&w);
        w.normalise(fence, self.bounds.handover_margin);
        Some(w)
    }

    /// A leader decision, committed if `apply` accepts it.
    fn decide(&self, w: &mut World, a: Action) -> bool {
        let at = ms(w.now);
        let s = &w.control.state;
        let epoch_of = |id: NodeId| s.members.get(&id).map_or(0, |m| m.epoch);
        let cmd = match a {
            Action::MoveShard { key, to } => Command::MoveShards {
                moves: vec![Move {
                    shard: shard(key),
                    from: s.shards.owner(shard(key)).map(|e| e.owner),
                    to,
                }],
                reason: "model".into(),
                at,
            },
            Action::Remove(node) => Command::Remove {
                node,
                epoch: epoch_of(node),
                reason: "model".into(),
                at,
            },
            Action::AdmitLate(node) => Command::AdmitLate {
                node,
                epoch: epoch_of(node),
                at,
            },
            Action::Grant(holder) => {
                let Some(j) = s.jobs.get(JOB) else {
                    return false;
                };
                Command::GrantJob {
                    job: JOB.into(),
                    period: j.spec.period_at(at),
                    lease_epoch: j.last_lease_epoch + 1,
                    holder,
                    holder_epoch: epoch_of(holder),
                    at,
                }
            }
            other => unreachable!("not a leader decision: {other:?}"),
        };
        let moved = matches!(cmd, Command::MoveShards { .. });
        let removed = matches!(cmd, Command::Remove { .. });
        if w.control.apply(cmd) != Response::Ok {
            return false;
        }
        w.spent.moves += u8::from(moved);
        w.spent.removals += u8::from(removed);
        true
    }

    fn deliver(&self, w: &mut World, m: Msg) -> bool {
        if !w.net.remove(&m) {
            return false;
        }
        let Msg::Commit { node, token, at } = m;
        commit(w, node, token, at);
        true
    }

    /// The leader's answer to `node`'s heartbeat under `epoch`, now: the
    /// shipped rule. The coordinator is leader-local and vouches for every
    /// node it has not decided to remove; the model's leader removes by
    /// committing `Remove` instead (see `decide`), and a refused renewal is
    /// no different from a lost one.
    fn answer(&self, w: &World, node: NodeId, epoch: u64) -> Answer {
        let now = ms(w.now);
        let mut coordinator = Coordinator::new(LEADER, 1, now);
        let hb = Heartbeat {
            node,
            epoch,
            health: Health::Healthy,
        };
        answer_heartbeat(now, true, &w.control.state, Some(&mut coordinator), hb).into()
    }

    /// The runner's check (`still_holds`, and the period not over yet),
    /// then `CommitJob` through the leader.
    fn run_job(&self, w: &mut World, id: NodeId, t: Token) -> bool {
        let fence = self.fence(w);
        let now = w.now;
        let p = w.node_mut(id);
        p.pending.remove(&t);
        let end = (t.period + 1) * crate::control::PERIOD_MS;
        if p.epoch == t.holder_epoch && p.serving(now, fence) && ms(now) < end {
            w.net.insert(Msg::Commit {
                node: id,
                token: t,
                at: now,
            });
        }
        true
    }
}

/// The heartbeat loop's handling of an answer (`orrery-node/src/lease.rs`).
fn receive_ack(p: &mut Proc, epoch: u64, sent: Tick, answer: &Answer) {
    match answer {
        Answer::Renewed {
            shards_version,
            jobs,
        } => {
            p.announce(*shards_version);
            if p.epoch == epoch && !p.fenced {
                p.acked_send = Some(sent);
                p.offer(jobs);
            }
        }
        Answer::Fenced => {
            if p.epoch == epoch && !p.fenced {
                p.fence();
            }
        }
        Answer::Refused => {}
    }
}

/// The leader applies a holder's `CommitJob`.
fn commit(w: &mut World, node: NodeId, token: Token, at: Tick) {
    let cmd = Command::CommitJob {
        job: JOB.into(),
        period: token.period,
        lease_epoch: token.lease_epoch,
        holder: node,
        holder_epoch: token.holder_epoch,
        summary: String::new(),
        at: ms(at),
    };
    match w.control.apply(cmd) {
        Response::Ok => w.commits.push(Accepted {
            period: token.period,
            holder: node,
            token,
        }),
        Response::Rejected {
            kind: Rejection::StaleToken,
            ..
        } => w.stale_refused = true,
        _ => {}
    }
}

/// `Command::Join`: the new epoch `apply` issues.
fn join(w: &mut World, id: NodeId) -> u64 {
    let at = ms(w.now);
    match w.control.apply(Command::Join { node: id, at }) {
        Response::Joined { epoch } => epoch,
        other => panic!("join of node {id} refused: {other:?}"),
    }
}

/// Start-up: while `gate` opens the next stage, do it and report it.
fn catch_up(w: &mut World, id: NodeId) -> bool {
    let mut moved = false;
    loop {
        let p = w.node(id);
        let Some(next) = p.stage.next() else {
            return moved;
        };
        let (epoch, at) = (p.epoch, ms(w.now));
        if w.control.state.gate(id, epoch, next) != Gate::Open {
            return moved;
        }
        let report = Command::Report {
            node: id,
            epoch,
            stage: next,
            waiting: None,
            progress: None,
            unreachable: vec![],
            at,
        };
        if w.control.apply(report) != Response::Ok {
            return moved;
        }
        w.node_mut(id).stage = next;
        moved = true;
    }
}
