//! A discrete-event simulator that runs a whole cluster's start-up in one
//! thread, on virtual time, from one seed.
//!
//! Why not turmoil for this: turmoil ticks every link of every host each
//! simulated millisecond, so its cost grows with the cube of the host count;
//! a 250-node start-up would not finish in CI. This simulator jumps from
//! event to event and only pays for messages actually sent.
//!
//! What it runs for real: [`ClusterState::apply`] (the replicated state
//! machine), [`Coordinator`] (the leader's decisions) and
//! [`ClusterState::gate`] (each node's barrier check) — the same code a real
//! node runs. What it models: the network (per-link delay drawn from the
//! seeded RNG, loss, partitions, crashes) and the Raft control plane, as a
//! linearisable log that commits after a quorum round trip while a majority
//! of voters is up, with a new leader (the lowest live voter) after an
//! election timeout. openraft itself is exercised by the real-process tests.
//!
//! What it must never do: read a clock, use unseeded randomness, or iterate
//! in hash order. Two runs with the same seed produce the same trace; the
//! tests assert it.

use crate::config::{ClusterConfig, NodeSpec, Role, StuckPolicy};
use crate::coordinator::Coordinator;
use crate::state::{ClusterState, Command, Gate, MemberStatus, Progress, Response, Wait};
use crate::{Epoch, Millis, NodeId, Stage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// A fault to inject.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The node's process dies at `at` and does not come back.
    Crash { node: NodeId, at: Millis },
    /// The current control-plane leader dies as soon as the cluster reaches `stage`.
    CrashLeaderAtStage { stage: Stage },
    /// Every link to and from `node` is cut from `from` until `until`.
    Partition {
        node: NodeId,
        from: Millis,
        until: Millis,
    },
    /// Every link to and from `node` is cut, for good, as soon as the
    /// cluster reaches `stage`.
    IsolateAtStage { node: NodeId, stage: Stage },
    /// The node's demo service never finishes preload item `item`.
    HangPreload { node: NodeId, item: u64 },
}

/// Simulation parameters. Times are virtual milliseconds.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: u64,
    pub voters: u64,
    /// One-way link delay range (ms).
    pub link_delay: (Millis, Millis),
    /// Probability that a message is lost.
    pub drop_rate: f64,
    /// Nodes start at a uniformly random time in [0, start_spread).
    pub start_spread: Millis,
    pub preload_items: u64,
    /// Time per preload item (ms).
    pub preload_item: (Millis, Millis),
    pub poll_interval: Millis,
    pub report_interval: Millis,
    pub request_timeout: Millis,
    pub coordinator_tick: Millis,
    pub election_timeout: Millis,
    pub stage_deadline: Millis,
    pub stuck_policy: StuckPolicy,
    pub liveness_window: Millis,
    pub faults: Vec<Fault>,
    /// The run stops here whatever happened.
    pub max_time: Millis,
}

impl SimConfig {
    /// Defaults resembling a LAN: 0.1-1 ms links, 20 preload items of 5-20 ms.
    pub fn new(nodes: u64, seed: u64) -> Self {
        SimConfig {
            seed,
            nodes,
            voters: 3.min(nodes),
            link_delay: (1, 2),
            drop_rate: 0.0,
            start_spread: 200,
            preload_items: 20,
            preload_item: (5, 20),
            poll_interval: 50,
            report_interval: 1000,
            request_timeout: 500,
            coordinator_tick: 50,
            election_timeout: 800,
            stage_deadline: 10_000,
            stuck_policy: StuckPolicy::Exclude,
            liveness_window: 1_500,
            faults: vec![],
            max_time: 300_000,
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct SimOutcome {
    /// When the cluster reached stage 0, if it did.
    pub ready_at: Option<Millis>,
    /// When the cluster reached each stage (by stage number).
    pub stage_reached_at: BTreeMap<i8, Millis>,
    /// Every committed command, with its virtual time: the run's fingerprint.
    pub trace: Vec<String>,
    pub state: ClusterState,
    pub excluded: Vec<NodeId>,
    pub crashed: Vec<NodeId>,
    /// Events processed (cost of the run).
    pub steps: u64,
}

#[derive(Clone, Debug)]
enum Msg {
    Propose { cmd: Command, req: u64 },
    Committed { resp: Response, req: u64 },
    Poll { epoch: Epoch, next: Stage },
    PollReply { gate: Gate, next: Stage },
    Ping,
    Pong,
}

#[derive(Clone, Debug)]
enum Ev {
    Start(NodeId),
    Deliver {
        from: NodeId,
        to: NodeId,
        msg: Msg,
    },
    Commit {
        from: NodeId,
        cmd: Command,
        req: u64,
    },
    Poll(NodeId),
    Report(NodeId),
    Work(NodeId, u64),
    Tick,
    Elect,
    Crash(NodeId),
}

#[derive(Debug, Default)]
struct SimNode {
    up: bool,
    crashed: bool,
    epoch: Epoch,
    stage: Stage,
    working_on: Option<Stage>,
    /// Work generation: stale timers are ignored.
    work_gen: u64,
    waiting: Option<Wait>,
    progress: Option<Progress>,
    missing_peers: BTreeSet<NodeId>,
    next_req: u64,
    join_req: Option<u64>,
    fenced: bool,
    hang_at: Option<u64>,
}

struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: Millis,
    seq: u64,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    events: BTreeMap<u64, Ev>,
    state: ClusterState,
    leader: Option<NodeId>,
    term: u64,
    coordinator: Option<Coordinator>,
    nodes: BTreeMap<NodeId, SimNode>,
    partitions: Vec<(NodeId, Millis, Millis)>,
    crash_leader_at: Option<Stage>,
    isolate_at: Vec<(NodeId, Stage)>,
    trace: Vec<String>,
    steps: u64,
}

/// Runs one seeded start-up to completion (or `max_time`).
pub fn run(cfg: SimConfig) -> SimOutcome {
    assert!(cfg.nodes >= 1 && cfg.voters >= 1 && cfg.voters <= cfg.nodes);
    assert!(cfg.link_delay.0 <= cfg.link_delay.1 && cfg.preload_item.0 <= cfg.preload_item.1);
    let mut sim = Sim {
        rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        state: ClusterState::default(),
        leader: Some(1),
        term: 1,
        coordinator: Some(Coordinator::new(1, 1, 0)),
        nodes: BTreeMap::new(),
        partitions: vec![],
        crash_leader_at: None,
        isolate_at: vec![],
        trace: vec![],
        steps: 0,
        cfg,
    };
    sim.setup();
    sim.run_loop();
    let excluded = sim
        .state
        .members
        .iter()
        .filter(|(_, m)| matches!(m.status, MemberStatus::Excluded { .. }))
        .map(|(id, _)| *id)
        .collect();
    let crashed = sim
        .nodes
        .iter()
        .filter(|(_, n)| n.crashed)
        .map(|(id, _)| *id)
        .collect();
    SimOutcome {
        ready_at: sim.state.stage_reached_at.get(&0).copied(),
        stage_reached_at: sim.state.stage_reached_at.clone(),
        trace: sim.trace,
        state: sim.state,
        excluded,
        crashed,
        steps: sim.steps,
    }
}

impl Sim {
    fn setup(&mut self) {
        let mut config = ClusterConfig {
            stage_deadline_ms: self.cfg.stage_deadline,
            stuck_policy: self.cfg.stuck_policy,
            liveness_window_ms: self.cfg.liveness_window,
            ..Default::default()
        };
        for id in 1..=self.cfg.nodes {
            config.nodes.insert(
                id,
                NodeSpec {
                    addr: format!("sim:{id}"),
                    admin_addr: String::new(),
                    role: if id <= self.cfg.voters {
                        Role::Voter
                    } else {
                        Role::Worker
                    },
                },
            );
            self.nodes.insert(id, SimNode::default());
        }
        self.commit(Command::Configure { config, at: 0 });
        for id in 1..=self.cfg.nodes {
            let at = self.rng.gen_range(0..self.cfg.start_spread.max(1));
            self.schedule(at, Ev::Start(id));
        }
        for f in self.cfg.faults.clone() {
            match f {
                Fault::Crash { node, at } => self.schedule(at, Ev::Crash(node)),
                Fault::CrashLeaderAtStage { stage } => self.crash_leader_at = Some(stage),
                Fault::IsolateAtStage { node, stage } => self.isolate_at.push((node, stage)),
                Fault::Partition { node, from, until } => self.partitions.push((node, from, until)),
                Fault::HangPreload { node, item } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.hang_at = Some(item)
                    }
                }
            }
        }
        self.schedule(self.cfg.coordinator_tick, Ev::Tick);
    }

    fn schedule(&mut self, delay: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn run_loop(&mut self) {
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            if at > self.cfg.max_time {
                break;
            }
            self.now = at;
            self.steps += 1;
            let ev = self
                .events
                .remove(&seq)
                .expect("every queued seq has an event");
            self.handle(ev);
            if self.state.stage == Stage::READY && self.all_settled() {
                break;
            }
        }
    }

    /// Ready, and every live participant has reported 0.
    fn all_settled(&self) -> bool {
        self.state.members.iter().all(|(id, m)| {
            m.status != MemberStatus::Active
                || m.report.stage == Stage::READY
                || self.nodes[id].crashed
        })
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        self.partitions
            .iter()
            .any(|(n, from, until)| (*n == a || *n == b) && self.now >= *from && self.now < *until)
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        if self.cut(from, to) || (self.cfg.drop_rate > 0.0 && self.rng.gen_bool(self.cfg.drop_rate))
        {
            return;
        }
        let d = self
            .rng
            .gen_range(self.cfg.link_delay.0..=self.cfg.link_delay.1);
        self.schedule(d, Ev::Deliver { from, to, msg });
    }

    fn alive(&self, n: NodeId) -> bool {
        self.nodes.get(&n).is_some_and(|n| n.up && !n.crashed)
    }

    fn commit(&mut self, cmd: Command) -> Response {
        let idx = self.state.applied_index + 1;
        self.trace.push(format!("{} {:?}", self.now, cmd));
        let resp = self.state.apply(idx, cmd);
        let reached = self.state.stage;
        let now = self.now;
        for (node, _) in self.isolate_at.iter().filter(|(_, s)| *s == reached) {
            self.trace.push(format!("{now} isolate node {node}"));
            self.partitions.push((*node, now, Millis::MAX));
        }
        self.isolate_at.retain(|(_, s)| *s != reached);
        if let (Some(stage), Some(leader)) = (self.crash_leader_at, self.leader) {
            if self.state.stage == stage {
                self.crash_leader_at = None;
                self.schedule(0, Ev::Crash(leader));
            }
        }
        resp
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(id) => {
                let n = self.nodes.get_mut(&id).expect("node");
                if n.crashed {
                    return;
                }
                n.up = true;
                self.join(id);
                let poll = self.cfg.poll_interval;
                self.schedule(poll, Ev::Poll(id));
                let rep = self.cfg.report_interval;
                self.schedule(rep, Ev::Report(id));
            }
            Ev::Crash(id) => {
                let n = self.nodes.get_mut(&id).expect("node");
                n.crashed = true;
                self.trace.push(format!("{} crash node {id}", self.now));
                if self.leader == Some(id) {
                    self.leader = None;
                    self.coordinator = None;
                    let t = self.cfg.election_timeout;
                    self.schedule(t, Ev::Elect);
                }
            }
            Ev::Elect => self.elect(),
            Ev::Tick => {
                self.tick();
                let t = self.cfg.coordinator_tick;
                self.schedule(t, Ev::Tick);
            }
            Ev::Poll(id) => {
                if !self.alive(id) {
                    return;
                }
                let n = &self.nodes[&id];
                if n.epoch > 0 && !n.fenced {
                    if let (Some(next), Some(leader)) = (n.stage.next(), self.leader) {
                        let msg = Msg::Poll {
                            epoch: n.epoch,
                            next,
                        };
                        self.send(id, leader, msg);
                    }
                }
                let poll = self.cfg.poll_interval;
                self.schedule(poll, Ev::Poll(id));
            }
            Ev::Report(id) => {
                if !self.alive(id) {
                    return;
                }
                if self.nodes[&id].epoch == 0 {
                    self.join(id);
                } else {
                    self.report(id);
                }
                // Re-ping peers still missing while connecting.
                if self.nodes[&id].working_on == Some(Stage::CONNECTED) {
                    // Peers excluded meanwhile are no longer waited for.
                    let participants = self.state.participants();
                    let n = self.nodes.get_mut(&id).expect("node");
                    n.missing_peers.retain(|p| participants.contains(p));
                    let missing: Vec<NodeId> = n.missing_peers.iter().copied().collect();
                    if missing.is_empty() {
                        self.connect_progress(id);
                    }
                    for p in missing {
                        self.send(id, p, Msg::Ping);
                    }
                }
                let rep = self.cfg.report_interval;
                self.schedule(rep, Ev::Report(id));
            }
            Ev::Work(id, generation) => self.work_step(id, generation),
            Ev::Commit { from, cmd, req } => {
                if self.leader.is_none() || !self.quorum_up() {
                    return;
                }
                let resp = self.commit(cmd);
                let leader = self.leader.expect("checked");
                self.send(leader, from, Msg::Committed { resp, req });
            }
            Ev::Deliver { from, to, msg } => {
                if !self.alive(to) {
                    return;
                }
                self.deliver(from, to, msg);
            }
        }
    }

    fn quorum_up(&self) -> bool {
        let up = (1..=self.cfg.voters)
            .filter(|v| self.alive(*v) || !self.nodes[v].up && !self.nodes[v].crashed)
            .count() as u64;
        up * 2 > self.cfg.voters
    }

    fn elect(&mut self) {
        let cand = (1..=self.cfg.voters).find(|v| self.alive(*v) && !self.cut(*v, 0));
        match cand {
            Some(v) if self.quorum_up() => {
                self.term += 1;
                self.leader = Some(v);
                self.coordinator = Some(Coordinator::new(v, self.term, self.now));
                self.trace
                    .push(format!("{} leader node {v} term {}", self.now, self.term));
            }
            _ => {
                let t = self.cfg.election_timeout;
                self.schedule(t, Ev::Elect);
            }
        }
    }

    fn tick(&mut self) {
        let Some(leader) = self.leader else { return };
        if !self.alive(leader) {
            return;
        }
        let now = self.now;
        let cmds = match self.coordinator.as_mut() {
            Some(c) => c.tick(now, &self.state),
            None => return,
        };
        for cmd in cmds {
            // The coordinator's proposals commit after a quorum round trip.
            let d = 2 * self.cfg.link_delay.1;
            self.schedule(
                d,
                Ev::Commit {
                    from: leader,
                    cmd,
                    req: 0,
                },
            );
        }
    }

    fn propose(&mut self, id: NodeId, cmd: Command) -> u64 {
        let n = self.nodes.get_mut(&id).expect("node");
        n.next_req += 1;
        let req = n.next_req;
        if let Some(leader) = self.leader {
            self.send(id, leader, Msg::Propose { cmd, req });
        }
        req
    }

    fn join(&mut self, id: NodeId) {
        let at = self.now;
        let req = self.propose(id, Command::Join { node: id, at });
        self.nodes.get_mut(&id).expect("node").join_req = Some(req);
    }

    fn report(&mut self, id: NodeId) {
        let n = &self.nodes[&id];
        if n.fenced || n.epoch == 0 {
            return;
        }
        let cmd = Command::Report {
            node: id,
            epoch: n.epoch,
            stage: n.stage,
            waiting: n.waiting.clone(),
            progress: n.progress,
            unreachable: n.missing_peers.iter().copied().collect(),
            at: self.now,
        };
        self.propose(id, cmd);
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        match msg {
            Msg::Propose { cmd, req } => {
                if self.leader != Some(to) {
                    return;
                }
                if let (Command::Report { node, epoch, .. }, Some(c)) =
                    (&cmd, self.coordinator.as_mut())
                {
                    c.on_contact(self.now, *node, *epoch);
                }
                let d = 2 * self.cfg.link_delay.1;
                self.schedule(d, Ev::Commit { from, cmd, req });
            }
            Msg::Committed { resp, req } => {
                let n = self.nodes.get_mut(&to).expect("node");
                if n.join_req == Some(req) {
                    if let Response::Joined { epoch } = resp {
                        n.join_req = None;
                        n.epoch = epoch;
                        n.stage = Stage::RUNNING;
                    }
                } else if let Response::Rejected { reason } = resp {
                    if reason.contains("excluded") || reason.contains("superseded") {
                        n.fenced = true;
                    }
                }
            }
            Msg::Poll { epoch, next } => {
                if self.leader != Some(to) {
                    return;
                }
                if let Some(c) = self.coordinator.as_mut() {
                    c.on_contact(self.now, from, epoch);
                }
                let gate = self.state.gate(from, epoch, next);
                self.send(to, from, Msg::PollReply { gate, next });
            }
            Msg::PollReply { gate, next } => self.on_gate(to, gate, next),
            Msg::Ping => self.send(to, from, Msg::Pong),
            Msg::Pong => {
                let n = self.nodes.get_mut(&to).expect("node");
                if n.missing_peers.remove(&from) && n.working_on == Some(Stage::CONNECTED) {
                    self.connect_progress(to);
                }
            }
        }
    }

    fn on_gate(&mut self, id: NodeId, gate: Gate, asked: Stage) {
        let n = self.nodes.get_mut(&id).expect("node");
        if n.stage.next() != Some(asked) {
            return; // A late reply about a stage already behind us.
        }
        match gate {
            Gate::Fenced { .. } => n.fenced = true,
            Gate::Closed { .. } => {}
            Gate::Open => {
                let Some(next) = n.stage.next() else { return };
                if n.working_on == Some(next) {
                    return;
                }
                n.working_on = Some(next);
                n.work_gen += 1;
                self.begin_work(id, next);
            }
        }
    }

    fn begin_work(&mut self, id: NodeId, stage: Stage) {
        let now = self.now;
        match stage {
            Stage::CONNECTED => {
                let peers: BTreeSet<NodeId> = self
                    .state
                    .participants()
                    .into_iter()
                    .filter(|p| *p != id)
                    .collect();
                let n = self.nodes.get_mut(&id).expect("node");
                n.missing_peers = peers.clone();
                for p in peers {
                    self.send(id, p, Msg::Ping);
                }
                self.connect_progress(id);
            }
            Stage::PRELOADED => {
                let n = self.nodes.get_mut(&id).expect("node");
                n.progress = Some(Progress {
                    done: 0,
                    total: self.cfg.preload_items,
                });
                n.waiting = Some(Wait {
                    service: "demo".into(),
                    step: "preload item 1".into(),
                    since: now,
                    on_node: None,
                    what: String::new(),
                });
                let g = n.work_gen;
                let d = self
                    .rng
                    .gen_range(self.cfg.preload_item.0..=self.cfg.preload_item.1);
                self.schedule(d, Ev::Work(id, g));
            }
            // Address cache: the poll reply carried the state version; one
            // more round trip fetches it. Ready: nothing to load.
            _ => {
                let g = self.nodes[&id].work_gen;
                let d = 2 * self.cfg.link_delay.1;
                self.schedule(d, Ev::Work(id, g));
            }
        }
    }

    fn connect_progress(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        if n.missing_peers.is_empty() {
            n.waiting = None;
            self.complete(id);
        } else {
            let first = *n.missing_peers.iter().next().expect("non-empty");
            n.waiting = Some(Wait {
                service: "peers".into(),
                step: "connect".into(),
                since: self.now,
                on_node: Some(first),
                what: format!("{} peer(s) not connected", n.missing_peers.len()),
            });
        }
    }

    fn work_step(&mut self, id: NodeId, generation: u64) {
        if !self.alive(id) {
            return;
        }
        let n = self.nodes.get_mut(&id).expect("node");
        if n.work_gen != generation || n.working_on.is_none() {
            return;
        }
        if n.working_on == Some(Stage::PRELOADED) {
            let p = n.progress.get_or_insert(Progress { done: 0, total: 0 });
            if n.hang_at == Some(p.done + 1) {
                return; // The fault: this item never finishes.
            }
            p.done += 1;
            if p.done < p.total {
                let step = format!("preload item {}", p.done + 1);
                if let Some(w) = n.waiting.as_mut() {
                    w.step = step;
                    w.since = self.now;
                }
                let d = self
                    .rng
                    .gen_range(self.cfg.preload_item.0..=self.cfg.preload_item.1);
                self.schedule(d, Ev::Work(id, generation));
                return;
            }
            n.waiting = None;
        }
        self.complete(id);
    }

    fn complete(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        if let Some(s) = n.working_on.take() {
            n.stage = s;
            n.progress = None;
            n.waiting = None;
        }
        self.report(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cluster_reaches_ready() {
        let out = run(SimConfig::new(5, 1));
        assert!(out.ready_at.is_some(), "not ready: {:#?}", out.state.events);
        assert!(out.excluded.is_empty());
    }

    #[test]
    fn same_seed_same_trace() {
        let a = run(SimConfig::new(8, 42));
        let b = run(SimConfig::new(8, 42));
        assert_eq!(a.trace, b.trace);
        let c = run(SimConfig::new(8, 43));
        assert_ne!(a.trace, c.trace);
    }
}
