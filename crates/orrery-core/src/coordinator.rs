//! The start-up coordinator: the post-mortem's "Polaris", run by whichever
//! node leads the control plane.
//!
//! It owns the decisions that move a boot forward: advance the barrier when
//! every participant has completed the current stage, declare laggards stuck
//! past the stage deadline (with their own diagnosis), exclude them when the
//! policy says so, tell a lone rejoining node from a cluster-wide restart;
//! once ready, grant each declared job's current period to an eligible node
//! and take it over from a fenced or impaired holder (`jobs::plan`).
//! Its only memory besides the replicated state is who contacted it recently
//! (liveness), which a new leader rebuilds within one liveness window; all
//! that matters across leaders lives in [`ClusterState`], so a leader that
//! dies mid-start-up leaves nothing behind that its successor needs.
//!
//! What it must never do: mutate the state itself (it only proposes
//! [`Command`]s, which `apply` validates), read a clock, or decide anything
//! on a node's say-so without the replicated state agreeing.

use crate::config::StuckPolicy;
pub use crate::detector::ProbeRequest;
use crate::detector::{Detector, View};
use crate::health::Health;
use crate::shardmap::{plan, Host, PlacementConfig};
use crate::state::{ClusterState, Command, MemberStatus};
use crate::{Epoch, Millis, NodeId, Stage};
use std::collections::{BTreeMap, BTreeSet};

/// Leader-local coordinator. Create one when a node becomes leader.
#[derive(Debug)]
pub struct Coordinator {
    me: NodeId,
    term: u64,
    leader_since: Millis,
    /// Last contact per node: (epoch it ran under, when).
    contacts: BTreeMap<NodeId, (Epoch, Millis)>,
    detector: Detector,
    /// (shard map version, hosts, ready) for which the last plan was empty:
    /// nothing changed since, so there is nothing to plan.
    settled: Option<(u64, Vec<NodeId>, bool)>,
}

impl Coordinator {
    /// A coordinator for node `me`, which became leader in `term` at `now`.
    pub fn new(me: NodeId, term: u64, now: Millis) -> Self {
        let mut contacts = BTreeMap::new();
        contacts.insert(me, (0, now));
        Coordinator {
            me,
            term,
            leader_since: now,
            contacts,
            detector: Detector::default(),
            settled: None,
        }
    }

    /// The term this coordinator leads in.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// A node (process `epoch`) was heard from at `now`.
    pub fn on_contact(&mut self, now: Millis, node: NodeId, epoch: Epoch) {
        let e = self.contacts.entry(node).or_insert((epoch, now));
        if epoch >= e.0 {
            *e = (epoch, now.max(e.1));
        }
    }

    /// A heartbeat: `node` (process `epoch`) renews its lease and reports
    /// its own health.
    pub fn on_heartbeat(&mut self, now: Millis, node: NodeId, epoch: Epoch, health: Health) {
        self.on_contact(now, node, epoch);
        self.detector.on_heartbeat(node, epoch, health);
    }

    /// A prober's answer for a [`ProbeRequest`].
    pub fn on_probe_result(
        &mut self,
        round: u64,
        prober: NodeId,
        suspect: NodeId,
        ok: bool,
        detail: String,
    ) {
        self.detector
            .on_probe_result(round, prober, suspect, ok, detail);
    }

    /// `accuser` reports that `suspect` (under `epoch`) failed its probe.
    pub fn on_accusation(
        &mut self,
        accuser: NodeId,
        suspect: NodeId,
        epoch: Epoch,
        detail: String,
    ) {
        self.detector.on_accusation(accuser, suspect, epoch, detail);
    }

    /// Accusations dropped because the accuser was not eligible to accuse.
    pub fn ignored_accusations(&self) -> u64 {
        self.detector.ignored_accusations
    }

    /// May the leader renew `node`'s lease under `epoch`? (Not once it has
    /// decided to remove it.)
    pub fn may_ack(&self, node: NodeId, epoch: Epoch) -> bool {
        self.detector.may_ack(node, epoch)
    }

    /// Probes the runtime must now send (drained).
    pub fn take_probes(&mut self) -> Vec<ProbeRequest> {
        self.detector.take_probes()
    }

    fn is_live(&self, state: &ClusterState, now: Millis, node: NodeId) -> bool {
        let window = state.config.liveness_window_ms;
        match (self.contacts.get(&node), state.members.get(&node)) {
            (Some((epoch, at)), Some(m)) => {
                (node == self.me || *epoch == m.epoch) && now.saturating_sub(*at) <= window
            }
            _ => false,
        }
    }

    /// What the coordinator proposes now. Commands are idempotent under
    /// `apply`'s validation, so proposing one twice is harmless.
    pub fn tick(&mut self, now: Millis, state: &ClusterState) -> Vec<Command> {
        self.decide(now, state, true)
    }

    /// What a coordinator whose own node is impaired proposes now: it
    /// judges nobody (no suspicion, removal, stuck report or exclusion: its
    /// own view may be what is wrong, the third post-mortem's lesson), but
    /// it still announces itself, places shards, grants jobs and opens the
    /// barrier once every participant has reported. On a machine so loaded
    /// that every node lags (250 processes on 2 cores), a leader that
    /// decided nothing at all held start-up closed for good.
    pub fn tick_impaired(&mut self, now: Millis, state: &ClusterState) -> Vec<Command> {
        self.decide(now, state, false)
    }

    fn decide(&mut self, now: Millis, state: &ClusterState, judge: bool) -> Vec<Command> {
        let mut out = vec![];
        if !state.configured {
            return out;
        }
        if let Some(me) = state.members.get(&self.me) {
            self.contacts.insert(self.me, (me.epoch, now));
        }
        // Until the state names this node: an announcement whose write
        // failed (a timeout, a lost leadership race) is proposed again on
        // the next tick (CI saw a new leader coordinate for 30 s unnamed).
        if state.leader != Some(self.me) {
            out.push(Command::LeaderChanged {
                leader: self.me,
                term: self.term,
                at: now,
            });
        }
        // A member that rejoined under a new epoch: its lease starts now,
        // not at its old process's last heartbeat.
        for (id, m) in state.members.iter() {
            if self.contacts.get(id).is_some_and(|(e, _)| *e < m.epoch) {
                self.contacts.insert(*id, (m.epoch, now));
            }
        }
        let view = View {
            me: self.me,
            now,
            leader_since: self.leader_since,
            state,
            contacts: &self.contacts,
        };
        if judge {
            out.extend(self.detector.tick(&view));
        }
        self.place(now, state, &mut out);
        self.run_jobs(now, state, &mut out);
        if state.stage == Stage::READY {
            self.after_ready(now, state, &mut out);
            return out;
        }
        let Some(next) = state.stage.next() else {
            return out;
        };
        if state.laggards(next).is_empty() {
            out.push(Command::Advance {
                boot: state.boot,
                from: state.stage,
                at: now,
            });
            return out;
        }
        // The new leader gives the laggards one liveness window before judging,
        // so it never excludes a node merely because it has not heard from it yet.
        let deadline_passed = now.saturating_sub(state.stage_since)
            > state.config.stage_deadline_ms
            && now.saturating_sub(self.leader_since) > state.config.liveness_window_ms;
        if !deadline_passed || !judge {
            return out;
        }
        let waiters = Self::waiters(state, next);
        for node in self.culprits(now, state, next) {
            let mut diagnosis = self.diagnose(now, state, node, next);
            let blocked: Vec<NodeId> = waiters.get(&node).cloned().unwrap_or_default();
            if !blocked.is_empty() {
                diagnosis.push_str(&format!(
                    "; {} other node(s) wait on it (first: {})",
                    blocked.len(),
                    blocked[0]
                ));
            }
            if !state
                .stuck_reported
                .contains(&(state.boot, next.number(), node))
            {
                out.push(Command::Stuck {
                    boot: state.boot,
                    node,
                    stage: next,
                    diagnosis: diagnosis.clone(),
                    at: now,
                });
            }
            if state.config.stuck_policy == StuckPolicy::Exclude && node != self.me {
                out.push(Command::Exclude {
                    boot: state.boot,
                    node,
                    epoch: state.members[&node].epoch,
                    reason: format!(
                        "missed the {} ms deadline for stage {next}: {diagnosis}",
                        state.config.stage_deadline_ms
                    ),
                    at: now,
                });
            }
        }
        out
    }

    /// For each laggard, the other laggards that say they wait on it (as the
    /// node they wait on, or as a peer they cannot reach).
    fn waiters(state: &ClusterState, next: Stage) -> BTreeMap<NodeId, Vec<NodeId>> {
        let lag: BTreeSet<NodeId> = state.laggards(next).into_iter().collect();
        let mut out: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        for n in &lag {
            let r = &state.members[n].report;
            let mut on: BTreeSet<NodeId> = r.unreachable.iter().copied().collect();
            on.extend(r.waiting.as_ref().and_then(|w| w.on_node));
            for o in on.into_iter().filter(|o| o != n && lag.contains(o)) {
                out.entry(o).or_default().push(*n);
            }
        }
        out
    }

    /// Which laggards hold the barrier, as opposed to waiting on another
    /// laggard. One dead or cut-off node makes every other node miss stage
    /// -3 too (they cannot connect to it); excluding all of them would turn
    /// one fault into a cluster that starts with nobody. So, in order:
    /// 1. laggards the coordinator no longer hears from (dead, cut off);
    /// 2. else laggards not waiting on another node (their own work hangs);
    /// 3. else the laggards most waited on by other laggards, leaving out
    ///    those that themselves wait on a node no longer lagging;
    /// 4. else (they wait on nodes that are done or excluded) nobody until a
    ///    second deadline has passed, then all of them.
    pub fn culprits(&self, now: Millis, state: &ClusterState, next: Stage) -> Vec<NodeId> {
        let laggards = state.laggards(next);
        let silent: Vec<NodeId> = laggards
            .iter()
            .copied()
            .filter(|n| !self.is_live(state, now, *n))
            .collect();
        if !silent.is_empty() {
            return silent;
        }
        let waits_on_another = |n: &NodeId| {
            let r = &state.members[n].report;
            r.waiting
                .as_ref()
                .is_some_and(|w| w.on_node.is_some_and(|o| o != *n))
                || r.unreachable.iter().any(|u| u != n)
        };
        let own: Vec<NodeId> = laggards
            .iter()
            .copied()
            .filter(|n| !waits_on_another(n))
            .collect();
        if !own.is_empty() {
            return own;
        }
        // A laggard that waits on a node no longer holding the barrier (done,
        // or excluded a tick ago) is about to notice and carry on: judged
        // now, the neighbour of one hung node was excluded with it.
        let lag: BTreeSet<NodeId> = laggards.iter().copied().collect();
        let blocker_gone = |n: &NodeId| {
            let r = &state.members[n].report;
            r.waiting
                .as_ref()
                .and_then(|w| w.on_node)
                .into_iter()
                .chain(r.unreachable.iter().copied())
                .any(|o| o != *n && !lag.contains(&o))
        };
        let mut waiters = Self::waiters(state, next);
        waiters.retain(|n, _| !blocker_gone(n));
        if let Some(most) = waiters.values().map(Vec::len).max() {
            return waiters
                .into_iter()
                .filter(|(_, w)| w.len() == most)
                .map(|(n, _)| n)
                .collect();
        }
        // They all wait on nodes that are done or already excluded: give them
        // one more deadline to notice before judging them.
        if now.saturating_sub(state.stage_since) > 2 * state.config.stage_deadline_ms {
            laggards
        } else {
            vec![]
        }
    }

    /// Shard placement: every shard owned by a live, healthy member that
    /// hosts services. Before the cluster is ready (the barrier holds the
    /// whole cluster) everything is placed at once; afterwards moves between
    /// live owners are rate-limited, while orphans (shards of removed nodes)
    /// are placed at once: a shard is unavailable until it has an owner.
    fn place(&mut self, now: Millis, state: &ClusterState, out: &mut Vec<Command>) {
        if state.shards.kinds.is_empty() || state.stage < Stage::RUNNING {
            return;
        }
        let ready = state.stage == Stage::READY;
        let hosts: Vec<Host> = state
            .members
            .iter()
            .filter(|(id, m)| state.may_host(**id) && self.detector.may_ack(**id, m.epoch))
            .map(|(id, _)| Host {
                node: *id,
                weight: state.config.placement.weight(*id),
            })
            .filter(|h| h.weight > 0)
            .collect();
        if hosts.is_empty() {
            return;
        }
        let key = (
            state.shards.version,
            hosts.iter().map(|h| h.node).collect::<Vec<_>>(),
            ready,
        );
        if self.settled.as_ref() == Some(&key) {
            return;
        }
        let p = &state.config.placement;
        let cfg = PlacementConfig {
            max_moves_per_step: if ready {
                p.max_moves_per_step
            } else {
                usize::MAX
            },
            max_orphan_moves_per_step: None,
            load_slack: f64::from(p.load_slack_percent) / 100.0,
        };
        let moves = plan(&state.shards, &hosts, &cfg);
        if moves.is_empty() {
            self.settled = Some(key);
        } else {
            let orphans = moves
                .iter()
                .filter(|m| m.from.is_none_or(|f| !hosts.iter().any(|h| h.node == f)))
                .count();
            out.push(Command::MoveShards {
                reason: format!(
                    "{orphans} without a live owner, {} rebalanced over {} hosts",
                    moves.len() - orphans,
                    hosts.len()
                ),
                moves,
                at: now,
            });
        }
    }

    /// Per-period singleton jobs (see `jobs::plan`): a holder must
    /// also be heard from recently, not be on its way out, and not report
    /// itself unhealthy in its latest heartbeat. A period is reported
    /// unassigned only after one liveness window of leadership, so a new
    /// leader does not mistake "not heard yet" for "nobody eligible".
    fn run_jobs(&self, now: Millis, state: &ClusterState, out: &mut Vec<Command>) {
        if state.jobs.jobs.is_empty() {
            return;
        }
        let may_hold = |node: NodeId, epoch: Epoch| {
            self.is_live(state, now, node)
                && self.detector.may_ack(node, epoch)
                && !self.detector.reports_unhealthy(node, epoch)
        };
        let judge_absence = now.saturating_sub(self.leader_since) > state.config.liveness_window_ms;
        crate::jobs::plan(state, now, may_hold, judge_absence, out);
    }

    /// The cluster is ready: nodes that joined since are either lone
    /// restarts (admit them) or the first of a cluster-wide restart.
    fn after_ready(&self, now: Millis, state: &ClusterState, out: &mut Vec<Command>) {
        let waiting: Vec<(NodeId, Epoch)> = state
            .members
            .iter()
            .filter(|(_, m)| {
                m.status == MemberStatus::Active
                    && m.epoch > 0
                    && m.removals == 0
                    && m.report.stage < Stage::READY
                    && m.admitted_late_in_boot != Some(state.boot)
            })
            .map(|(id, m)| (*id, m.epoch))
            .collect();
        if waiting.is_empty() {
            return;
        }
        // Wait one liveness window of leadership so "nobody is running" is
        // known, not merely unheard.
        if now.saturating_sub(self.leader_since) <= state.config.liveness_window_ms {
            return;
        }
        let cluster_running = state.members.iter().any(|(id, m)| {
            m.report.stage == Stage::READY
                && m.status == MemberStatus::Active
                && self.is_live(state, now, *id)
        });
        if cluster_running {
            for (node, epoch) in waiting {
                out.push(Command::AdmitLate {
                    node,
                    epoch,
                    at: now,
                });
            }
        } else {
            let live: BTreeSet<(NodeId, Epoch)> = state
                .members
                .iter()
                .filter(|(id, _)| self.is_live(state, now, **id))
                .map(|(id, m)| (*id, m.epoch))
                .collect();
            out.push(Command::BeginBoot {
                after: state.boot,
                live,
                at: now,
            });
        }
    }

    /// The laggard's own account of what it waits on, plus what the
    /// coordinator itself knows (when it last heard from it).
    pub fn diagnose(&self, now: Millis, state: &ClusterState, node: NodeId, next: Stage) -> String {
        let m = &state.members[&node];
        let heard = match self.contacts.get(&node) {
            Some((_, at)) if self.is_live(state, now, node) => {
                format!("last heard {} ms ago", now.saturating_sub(*at))
            }
            Some((_, at)) => format!(
                "no contact for {} ms: process down or cut off",
                now.saturating_sub(*at)
            ),
            None => format!(
                "not heard from since node {} began coordinating {} ms ago",
                self.me,
                now.saturating_sub(self.leader_since)
            ),
        };
        if m.epoch == 0 || m.report.stage == Stage::NOT_STARTED {
            return format!("never reached the control plane in this start-up; {heard}");
        }
        let mut s = format!("at stage {} working towards {next}", m.report.stage);
        if let Some(w) = &m.report.waiting {
            s.push_str(&format!(
                "; waiting {} ms in {w}",
                now.saturating_sub(w.since)
            ));
        }
        if let Some(p) = m.report.progress {
            s.push_str(&format!("; progress {}/{}", p.done, p.total));
        }
        if !m.report.unreachable.is_empty() {
            s.push_str(&format!("; cannot reach nodes {:?}", m.report.unreachable));
        }
        s.push_str("; ");
        s.push_str(&heard);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::{Response, Wait};

    use crate::testkit::{config, run};

    fn configured(n: u64, policy: StuckPolicy) -> ClusterState {
        let mut c = config(n);
        c.stuck_policy = policy;
        crate::testkit::configured(c, [])
    }

    /// Node 1 coordinates while impaired; nodes 1 and 2 report stage -3,
    /// node 3 never does.
    fn impaired_leader_at_stage_minus_3(c: &mut Coordinator) -> ClusterState {
        let mut s = configured(3, StuckPolicy::Exclude);
        for n in 1..=3 {
            let i = s.applied_index + 1;
            s.apply(i, Command::Join { node: n, at: 0 });
        }
        let out = c.tick_impaired(10, &s);
        run(&mut s, out);
        assert_eq!(s.stage, Stage::RUNNING, "it opens the barrier impaired");
        for n in 1..=2 {
            report_connected(&mut s, n, 20);
        }
        s
    }

    /// `node` reports stage -3 done under its current epoch at `at`.
    pub(super) fn report_connected(s: &mut ClusterState, node: NodeId, at: Millis) {
        let (epoch, i) = (s.members[&node].epoch, s.applied_index + 1);
        let report = Command::Report {
            node,
            epoch,
            stage: Stage::CONNECTED,
            waiting: None,
            progress: None,
            unreachable: vec![],
            at,
        };
        s.apply(i, report);
    }

    #[test]
    fn an_impaired_coordinator_opens_the_barrier_but_judges_nobody() {
        let mut c = Coordinator::new(1, 1, 0);
        let mut s = impaired_leader_at_stage_minus_3(&mut c);
        // Long past the deadline, with node 3 silent: a healthy coordinator
        // would report it stuck and exclude it; an impaired one does neither.
        let out = c.tick_impaired(100_000, &s);
        let judged: Vec<&Command> = out
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Stuck { .. }
                        | Command::Exclude { .. }
                        | Command::Suspect { .. }
                        | Command::Remove { .. }
                )
            })
            .collect();
        assert!(judged.is_empty(), "impaired, it judged: {judged:?}");
        let healthy = c.tick(100_001, &s);
        assert!(
            healthy
                .iter()
                .any(|c| matches!(c, Command::Exclude { node: 3, .. })),
            "the same coordinator, healthy, excludes node 3: {healthy:?}"
        );
        // Once node 3 reports too, the impaired coordinator advances.
        report_connected(&mut s, 3, 100_002);
        let out = c.tick_impaired(100_003, &s);
        assert!(
            out.iter().any(|c| matches!(c, Command::Advance { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn stuck_node_is_diagnosed_then_excluded_and_the_rest_advance() {
        let mut s = configured(3, StuckPolicy::Exclude);
        let mut c = Coordinator::new(1, 1, 0);
        for n in 1..=3 {
            let i = s.applied_index + 1;
            s.apply(i, Command::Join { node: n, at: 0 });
        }
        let out = c.tick(10, &s);
        run(&mut s, out);
        assert_eq!(s.stage, Stage::RUNNING);
        let e3 = s.members[&3].epoch;
        for n in 1..=2 {
            let e = s.members[&n].epoch;
            let i = s.applied_index + 1;
            s.apply(
                i,
                Command::Report {
                    node: n,
                    epoch: e,
                    stage: Stage::CONNECTED,
                    waiting: None,
                    progress: None,
                    unreachable: vec![],
                    at: 20,
                },
            );
        }
        let i = s.applied_index + 1;
        s.apply(
            i,
            Command::Report {
                node: 3,
                epoch: e3,
                stage: Stage::RUNNING,
                waiting: Some(Wait {
                    service: "peers".into(),
                    step: "connect".into(),
                    since: 20,
                    on_node: Some(2),
                    what: "handshake".into(),
                }),
                progress: None,
                unreachable: vec![2],
                at: 20,
            },
        );
        for n in 1..=3 {
            c.on_contact(900, n, s.members[&n].epoch);
        }
        assert!(
            c.tick(900, &s).is_empty(),
            "no decision before the deadline"
        );
        // Node 3 waits on node 2, which is done: it gets a second deadline
        // to notice before it is judged.
        for n in 1..=3 {
            c.on_contact(2000, n, s.members[&n].epoch);
        }
        assert!(c.tick(2000, &s).is_empty());
        for n in 1..=3 {
            c.on_contact(3000, n, s.members[&n].epoch);
        }
        let out = c.tick(3000, &s);
        assert!(matches!(&out[0], Command::Stuck { node: 3, .. }), "{out:?}");
        assert!(matches!(&out[1], Command::Exclude { node: 3, .. }));
        run(&mut s, out);
        let out = c.tick(3001, &s);
        assert!(matches!(out[0], Command::Advance { .. }));
        run(&mut s, out);
        assert_eq!(s.stage, Stage::CONNECTED);
        let stuck = s
            .events
            .iter()
            .find(|e| e.kind == crate::EventKind::NodeStuck)
            .unwrap();
        assert!(stuck.detail.contains("peers: connect"), "{}", stuck.detail);
        assert!(
            stuck.detail.contains("waiting on node 2"),
            "{}",
            stuck.detail
        );
    }

    /// A new leader's announcement whose write failed is proposed again
    /// until the state names it, and only then no more.
    #[test]
    fn a_lost_leader_announcement_is_proposed_again() {
        let mut s = configured(2, StuckPolicy::Wait);
        let mut c = Coordinator::new(1, 1, 0);
        let announces = |out: &[Command]| {
            out.iter()
                .filter(|c| matches!(c, Command::LeaderChanged { leader: 1, .. }))
                .count()
        };
        assert_eq!(announces(&c.tick(10, &s)), 1);
        // The write failed: nothing was applied.
        let out = c.tick(20, &s);
        assert_eq!(announces(&out), 1, "{out:?}");
        run(&mut s, out);
        assert_eq!(s.leader, Some(1));
        assert_eq!(announces(&c.tick(30, &s)), 0);
        // Applied twice (a timed-out write that did commit): one event.
        let again = Command::LeaderChanged {
            leader: 1,
            term: 1,
            at: 40,
        };
        run(&mut s, vec![again]);
        let events = s
            .events
            .iter()
            .filter(|e| e.kind == crate::EventKind::LeaderChanged);
        assert_eq!(events.count(), 1);
    }

    #[test]
    fn wait_policy_reports_once_and_holds() {
        let mut s = configured(2, StuckPolicy::Wait);
        let mut c = Coordinator::new(1, 1, 0);
        let i = s.applied_index + 1;
        s.apply(i, Command::Join { node: 1, at: 0 });
        let out = c.tick(5000, &s);
        assert_eq!(out.len(), 2, "{out:?}"); // leader announcement + stuck
        run(&mut s, out);
        assert!(c.tick(6000, &s).is_empty());
        assert_eq!(s.stage, Stage::NOT_STARTED);
        assert_eq!(s.members[&2].status, MemberStatus::Active);
    }

    #[test]
    fn lone_restart_is_admitted_and_whole_restart_begins_a_boot() {
        let mut s = configured(2, StuckPolicy::Exclude);
        let mut c = Coordinator::new(1, 1, 0);
        for n in 1..=2 {
            let i = s.applied_index + 1;
            s.apply(i, Command::Join { node: n, at: 0 });
        }
        for st in Stage::ALL.iter().skip(1) {
            let out = c.tick(1, &s);
            run(&mut s, out);
            for n in 1..=2 {
                let e = s.members[&n].epoch;
                let i = s.applied_index + 1;
                assert_eq!(
                    s.apply(
                        i,
                        Command::Report {
                            node: n,
                            epoch: e,
                            stage: *st,
                            waiting: None,
                            progress: None,
                            unreachable: vec![],
                            at: 1
                        }
                    ),
                    Response::Ok
                );
            }
        }
        let out = c.tick(2, &s);
        run(&mut s, out);
        assert_eq!(s.stage, Stage::READY);
        // Node 2 restarts; node 1 (leader) is running.
        let i = s.applied_index + 1;
        s.apply(i, Command::Join { node: 2, at: 3 });
        c.on_contact(3000, 2, s.members[&2].epoch);
        let out = c.tick(3000, &s);
        assert!(
            matches!(out[0], Command::AdmitLate { node: 2, .. }),
            "{out:?}"
        );
        // Whole-cluster restart: a fresh coordinator sees only fresh processes.
        for n in 1..=2 {
            let i = s.applied_index + 1;
            s.apply(i, Command::Join { node: n, at: 4000 });
        }
        let mut c = Coordinator::new(1, 2, 4000);
        c.on_contact(4100, 2, s.members[&2].epoch);
        assert!(c
            .tick(4100, &s)
            .iter()
            .all(|c| !matches!(c, Command::BeginBoot { .. })));
        let out = c.tick(6000, &s);
        assert!(
            out.iter().any(|c| matches!(c, Command::BeginBoot { .. })),
            "{out:?}"
        );
        run(&mut s, out);
        assert_eq!(s.boot, 2);
    }
}

#[cfg(test)]
mod culprit_tests {
    use super::*;

    use super::tests::report_connected;
    use crate::state::{Response, Wait};
    use crate::testkit::run;

    /// One silent node, four live nodes waiting on it: only it is blamed.
    #[test]
    fn the_silent_node_not_its_victims_is_the_culprit() {
        let mut s = crate::testkit::configured(crate::testkit::config(5), 1..=5);
        let mut co = Coordinator::new(1, 1, 0);
        let out = co.tick(1, &s);
        for cmd in out {
            let i = s.applied_index + 1;
            s.apply(i, cmd);
        }
        assert_eq!(s.stage, Stage::RUNNING);
        for n in 1..=4 {
            let e = s.members[&n].epoch;
            let i = s.applied_index + 1;
            s.apply(
                i,
                Command::Report {
                    node: n,
                    epoch: e,
                    stage: Stage::RUNNING,
                    waiting: Some(Wait {
                        service: "peers".into(),
                        step: "connect".into(),
                        since: 10,
                        on_node: Some(5),
                        what: String::new(),
                    }),
                    progress: None,
                    unreachable: vec![5],
                    at: 10,
                },
            );
        }
        for n in 1..=4 {
            co.on_contact(2500, n, s.members[&n].epoch);
        }
        assert_eq!(co.culprits(2500, &s, Stage::CONNECTED), vec![5]);
        let out = co.tick(2500, &s);
        let excluded: Vec<NodeId> = out
            .iter()
            .filter_map(|c| match c {
                Command::Exclude { node, .. } => Some(*node),
                _ => None,
            })
            .collect();
        assert_eq!(excluded, vec![5]);
        // With node 5 live but its work hung, it is still the culprit (rule 3:
        // most waited on).
        co.on_contact(2600, 5, s.members[&5].epoch);
        assert_eq!(co.culprits(2600, &s, Stage::CONNECTED), vec![5]);
    }

    /// `node` reports it still works towards stage -3, waiting on `on`.
    fn report_waiting(s: &mut ClusterState, node: NodeId, on: NodeId, at: Millis) {
        let (epoch, i) = (s.members[&node].epoch, s.applied_index + 1);
        let waiting = Some(Wait {
            service: "peers".into(),
            step: "connect".into(),
            since: 10,
            on_node: Some(on),
            what: String::new(),
        });
        let report = Command::Report {
            node,
            epoch,
            stage: Stage::RUNNING,
            waiting,
            progress: None,
            unreachable: vec![on],
            at,
        };
        s.apply(i, report);
    }

    /// Node 5 hung and was excluded; node 4 still waits on it (it has not
    /// noticed yet) and node 3 waits on node 4. Node 4 is not judged for
    /// its blocker's fault: nobody is, until the second deadline.
    #[test]
    fn a_laggard_whose_blocker_was_excluded_is_not_the_next_culprit() {
        let mut s = crate::testkit::configured(crate::testkit::config(5), 1..=5);
        let mut co = Coordinator::new(1, 1, 0);
        let out = co.tick(1, &s);
        run(&mut s, out);
        assert_eq!(s.stage, Stage::RUNNING);
        for n in 1..=2 {
            report_connected(&mut s, n, 10);
        }
        report_waiting(&mut s, 4, 5, 10);
        report_waiting(&mut s, 3, 4, 10);
        let (boot, epoch) = (s.boot, s.members[&5].epoch);
        let exclude = Command::Exclude {
            boot,
            node: 5,
            epoch,
            reason: "hung".into(),
            at: 1_100,
        };
        assert_eq!(crate::testkit::apply(&mut s, exclude), Response::Ok);
        for n in 1..=4 {
            co.on_contact(1_200, n, s.members[&n].epoch);
        }
        assert_eq!(
            co.culprits(1_200, &s, Stage::CONNECTED),
            Vec::<NodeId>::new()
        );
        // Past the second deadline every laggard is judged.
        for n in 1..=4 {
            co.on_contact(2_500, n, s.members[&n].epoch);
        }
        assert_eq!(co.culprits(2_500, &s, Stage::CONNECTED), vec![3, 4]);
    }
}
