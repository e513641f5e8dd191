//! The failure detector: leases, corroborating probes, health-gated votes,
//! removal and reinstatement. Run by the coordinator (the Raft leader).
//!
//! Post-mortem 003: a node with bad memory read every healthy peer's health
//! response as invalid and kept voting them out. Here no single node's
//! opinion removes anyone:
//! - a lapsed lease only makes a node *suspect*;
//! - the coordinator then asks several *eligible* nodes (healthy, with a
//!   perfect health record over the eligibility window) to probe the suspect
//!   directly; removal needs a majority of those probes to fail;
//! - an impaired node (failing its own self-checks) is never eligible, so it
//!   can neither probe nor vote, and a node that declares fail-stop is
//!   removed on its own word;
//! - a removed node comes back only under a new epoch, after a confidence
//!   vote (the same probes, answered), and after a backoff that doubles with
//!   each removal.
//!
//! Everything peers send that it keeps is bounded ([`crate::state::limits`]):
//! accusation and probe details and health reasons are clipped in bytes on
//! arrival, and pending accusations are bounded in number (duplicates from
//! the same accuser are merged; the excess is dropped and counted).
//!
//! What it must never do: remove a node on the coordinator's view alone,
//! count an ineligible node's probe, read a clock, or keep a peer's bytes
//! without a bound.

use crate::config::MembershipConfig;
use crate::health::Health;
use crate::state::limits::{clip_to, MAX_DETAIL, MAX_PENDING_ACCUSATIONS, MAX_REASON};
use crate::state::{ClusterState, Command, MemberStatus};
use crate::{Epoch, Millis, NodeId, Stage};
use std::collections::BTreeMap;

/// Ask `prober` to probe `suspect` (running under `epoch`) and report back
/// with [`crate::Coordinator::on_probe_result`] quoting `round`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRequest {
    pub round: u64,
    pub prober: NodeId,
    pub suspect: NodeId,
    pub epoch: Epoch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// Its lease lapsed: should it be removed?
    Remove,
    /// An eligible node could not get a valid health proof from it: the
    /// probes decide, whatever its heartbeats say.
    Accused,
    /// It was removed and asks to come back: does it answer?
    Reinstate,
}

#[derive(Clone, Debug)]
struct Round {
    id: u64,
    epoch: Epoch,
    purpose: Purpose,
    started: Millis,
    /// An accused node found dead by the probes: leases stopped being
    /// renewed at this time; the removal waits until its lease has lapsed.
    fencing_since: Option<Millis>,
    probers: Vec<NodeId>,
    results: BTreeMap<NodeId, (bool, String)>,
}

/// Leader-local detector state; everything it decides is a [`Command`].
#[derive(Debug, Default)]
pub(crate) struct Detector {
    /// Each node's own health verdict from its latest heartbeat.
    health: BTreeMap<NodeId, (Epoch, Health)>,
    rounds: BTreeMap<NodeId, Round>,
    /// After a refutation or failed round, do not start another before this.
    quiet_until: BTreeMap<NodeId, Millis>,
    next_round: u64,
    outbox: Vec<ProbeRequest>,
    /// Accusations not yet judged: (accuser, suspect, epoch, detail), at
    /// most [`MAX_PENDING_ACCUSATIONS`], details clipped to [`MAX_DETAIL`].
    accusations: Vec<(NodeId, NodeId, Epoch, String)>,
    /// Accusations dropped because the accuser was not eligible, or because
    /// [`MAX_PENDING_ACCUSATIONS`] were already pending.
    pub ignored_accusations: u64,
    /// Nodes (at an epoch) whose lease the coordinator no longer renews:
    /// it has decided to remove them. Fence first, then remove.
    no_ack: BTreeMap<NodeId, (Epoch, Millis)>,
}

/// What the detector needs to know from the coordinator.
pub(crate) struct View<'a> {
    pub me: NodeId,
    pub now: Millis,
    pub leader_since: Millis,
    pub state: &'a ClusterState,
    /// Last contact per node: (epoch, when).
    pub contacts: &'a BTreeMap<NodeId, (Epoch, Millis)>,
}

impl View<'_> {
    fn cfg(&self) -> &MembershipConfig {
        &self.state.config.membership
    }

    /// When `node` was last heard from under its current epoch.
    fn heard(&self, node: NodeId) -> Option<Millis> {
        let m = self.state.members.get(&node)?;
        if node == self.me {
            return Some(self.now);
        }
        match self.contacts.get(&node) {
            Some((e, at)) if *e == m.epoch => Some(*at),
            _ => None,
        }
    }

    fn lease_live(&self, node: NodeId) -> bool {
        self.heard(node)
            .is_some_and(|at| self.now.saturating_sub(at) <= self.cfg().lease_ttl_ms)
    }
}

impl Detector {
    pub fn on_heartbeat(&mut self, node: NodeId, epoch: Epoch, health: Health) {
        let health = match health {
            Health::Healthy => Health::Healthy,
            Health::Impaired(r) => Health::Impaired(clip_to(r, MAX_REASON)),
            Health::FailStop(r) => Health::FailStop(clip_to(r, MAX_REASON)),
        };
        self.health.insert(node, (epoch, health));
    }

    pub fn on_probe_result(
        &mut self,
        round: u64,
        prober: NodeId,
        suspect: NodeId,
        ok: bool,
        detail: String,
    ) {
        if let Some(r) = self.rounds.get_mut(&suspect) {
            if r.id == round && r.probers.contains(&prober) {
                r.results.insert(prober, (ok, clip_to(detail, MAX_DETAIL)));
            }
        }
    }

    /// `accuser` could not get a valid health proof from `suspect`. Only an
    /// eligible accuser starts a probe round; nobody is removed on one
    /// node's word.
    pub fn on_accusation(
        &mut self,
        accuser: NodeId,
        suspect: NodeId,
        epoch: Epoch,
        detail: String,
    ) {
        // The same accuser's later word on the same suspect changes nothing:
        // the first one pending is judged.
        let pending = self
            .accusations
            .iter()
            .any(|(a, s, e, _)| (*a, *s, *e) == (accuser, suspect, epoch));
        if pending {
            return;
        }
        if self.accusations.len() < MAX_PENDING_ACCUSATIONS {
            let detail = clip_to(detail, MAX_DETAIL);
            self.accusations.push((accuser, suspect, epoch, detail));
        } else {
            self.ignored_accusations += 1;
        }
    }

    /// May the leader acknowledge (renew) `node`'s lease under `epoch`? Not
    /// once it has decided to remove it: a heartbeat that races the
    /// removal's commit must not hand a doomed epoch a fresh lease.
    pub fn may_ack(&self, node: NodeId, epoch: Epoch) -> bool {
        self.no_ack.get(&node).is_none_or(|(e, _)| *e != epoch)
    }

    /// Did `node`'s latest heartbeat under `epoch` say it is not healthy
    /// (news the replicated record may not carry yet)?
    pub fn reports_unhealthy(&self, node: NodeId, epoch: Epoch) -> bool {
        self.reported(node, epoch).is_some_and(|h| !h.is_healthy())
    }

    pub fn take_probes(&mut self) -> Vec<ProbeRequest> {
        std::mem::take(&mut self.outbox)
    }

    fn reported(&self, node: NodeId, epoch: Epoch) -> Option<&Health> {
        self.health
            .get(&node)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, h)| h)
    }

    /// May `p` probe and vote on `suspect`? Healthy now (its own word and
    /// the committed record), with a perfect record for the eligibility
    /// window (or since the cluster became ready), and alive.
    fn eligible(&self, v: &View, p: NodeId, suspect: NodeId) -> bool {
        let Some(m) = v.state.members.get(&p) else {
            return false;
        };
        if p == suspect
            || m.epoch == 0
            || m.status != MemberStatus::Active
            || m.report.stage != Stage::READY
        {
            return false;
        }
        if self.reports_unhealthy(p, m.epoch) {
            return false;
        }
        v.state.has_perfect_record(p, v.now) && v.lease_live(p)
    }

    fn open(
        &mut self,
        v: &View,
        node: NodeId,
        epoch: Epoch,
        purpose: Purpose,
    ) -> Option<Vec<NodeId>> {
        let eligible: Vec<NodeId> = v
            .state
            .members
            .keys()
            .copied()
            .filter(|p| self.eligible(v, *p, node))
            .collect();
        if eligible.is_empty() {
            return None;
        }
        self.next_round += 1;
        let id = self.next_round;
        let n = (v.cfg().probe_count as usize).min(eligible.len());
        let start = (node as usize + id as usize) % eligible.len();
        let probers: Vec<NodeId> = (0..n)
            .map(|i| eligible[(start + i) % eligible.len()])
            .collect();
        for p in &probers {
            self.outbox.push(ProbeRequest {
                round: id,
                prober: *p,
                suspect: node,
                epoch,
            });
        }
        self.rounds.insert(
            node,
            Round {
                id,
                epoch,
                purpose,
                started: v.now,
                fencing_since: None,
                probers: probers.clone(),
                results: BTreeMap::new(),
            },
        );
        Some(probers)
    }

    /// Has an accused node's lease surely lapsed since we stopped renewing it?
    fn lapsed(r: &Round, now: Millis, cfg: &MembershipConfig) -> bool {
        r.fencing_since
            .is_some_and(|t| now.saturating_sub(t) > cfg.lease_ttl_ms)
    }

    /// Proposals from health reports, lapsed leases and finished probe rounds.
    pub fn tick(&mut self, v: &View) -> Vec<Command> {
        let mut out = vec![];
        let cfg = v.cfg().clone();
        let now = v.now;
        self.no_ack.retain(|id, (e, _)| {
            v.state
                .members
                .get(id)
                .is_some_and(|m| m.epoch == *e && m.status == MemberStatus::Active)
        });
        // Health transitions, as the nodes report them.
        for (id, m) in v.state.members.iter() {
            if m.status != MemberStatus::Active || m.epoch == 0 {
                continue;
            }
            match self.reported(*id, m.epoch) {
                Some(Health::FailStop(r)) if *id != v.me => out.push(Command::Remove {
                    node: *id,
                    epoch: m.epoch,
                    reason: format!("it stopped itself (fail-stop): {r}"),
                    at: now,
                }),
                Some(Health::Healthy) if !m.health.healthy => out.push(Command::HealthChanged {
                    node: *id,
                    epoch: m.epoch,
                    healthy: true,
                    reason: None,
                    at: now,
                }),
                Some(Health::Impaired(r))
                    if m.health.healthy || m.health.reason.as_deref() != Some(r) =>
                {
                    out.push(Command::HealthChanged {
                        node: *id,
                        epoch: m.epoch,
                        healthy: false,
                        reason: Some(r.clone()),
                        at: now,
                    })
                }
                _ => {}
            }
        }
        // Leases are judged only in a running cluster (start-up has its own
        // deadlines), and only after this leader has heard a full lease.
        if v.state.stage != Stage::READY || now.saturating_sub(v.leader_since) <= cfg.lease_ttl_ms {
            return out;
        }
        for (id, m) in v.state.members.iter() {
            let joined = m.epoch > 0 && m.status == MemberStatus::Active;
            if !joined || *id == v.me || self.rounds.contains_key(id) || v.lease_live(*id) {
                continue;
            }
            if self.quiet_until.get(id).is_some_and(|t| now < *t) {
                continue;
            }
            let silent = v.heard(*id).map(|t| now.saturating_sub(t));
            if let Some(probers) = self.open(v, *id, m.epoch, Purpose::Remove) {
                out.push(Command::Suspect {
                    node: *id,
                    epoch: m.epoch,
                    reason: format!(
                        "{} (lease {} ms); probing through nodes {probers:?}",
                        silent
                            .map(|s| format!("no heartbeat for {s} ms"))
                            .unwrap_or_else(|| "never heard from by this coordinator".into()),
                        cfg.lease_ttl_ms
                    ),
                    at: now,
                });
            }
        }
        for (accuser, suspect, epoch, detail) in std::mem::take(&mut self.accusations) {
            let current = v
                .state
                .members
                .get(&suspect)
                .is_some_and(|m| m.epoch == epoch && m.status == MemberStatus::Active);
            let quiet = self.quiet_until.get(&suspect).is_some_and(|t| now < *t);
            if !current || suspect == v.me || self.rounds.contains_key(&suspect) || quiet {
                continue;
            }
            if !self.eligible(v, accuser, suspect) {
                self.ignored_accusations += 1;
                continue;
            }
            if let Some(probers) = self.open(v, suspect, epoch, Purpose::Accused) {
                out.push(Command::Suspect {
                    node: suspect,
                    epoch,
                    reason: format!(
                        "accused by node {accuser} ({detail}); probing through nodes {probers:?}"
                    ),
                    at: now,
                });
            }
        }
        self.reinstatements(v, &mut out);
        self.conclude(v, &mut out);
        out
    }

    /// Removed nodes that rejoined under a new epoch ask to come back: a
    /// confidence vote once their backoff has passed and they report healthy.
    fn reinstatements(&mut self, v: &View, out: &mut Vec<Command>) {
        let _ = out;
        let now = v.now;
        for (id, m) in v.state.members.iter() {
            let waiting = m.status == MemberStatus::Active
                && m.epoch > 0
                && m.removals > 0
                && m.report.stage < Stage::READY
                && m.admitted_late_in_boot != Some(v.state.boot);
            if !waiting
                || self.rounds.contains_key(id)
                || self.quiet_until.get(id).is_some_and(|t| now < *t)
            {
                continue;
            }
            if now
                < m.last_removed_at
                    .saturating_add(v.cfg().backoff(m.removals))
            {
                continue;
            }
            if !self.reported(*id, m.epoch).is_some_and(Health::is_healthy) {
                continue;
            }
            self.open(v, *id, m.epoch, Purpose::Reinstate);
        }
    }

    fn conclude(&mut self, v: &View, out: &mut Vec<Command>) {
        let now = v.now;
        let cfg = v.cfg().clone();
        let mut done = vec![];
        let mut fencing = vec![];
        for (id, r) in &self.rounds {
            let Some(m) = v.state.members.get(id) else {
                done.push((*id, 0));
                continue;
            };
            if m.epoch != r.epoch || m.status != MemberStatus::Active {
                done.push((*id, 0));
                continue;
            }
            let need = r.probers.len() / 2 + 1;
            let fails = r.results.values().filter(|(ok, _)| !ok).count();
            let oks = r.results.len() - fails;
            let details: Vec<String> = r
                .results
                .iter()
                .map(|(p, (ok, d))| {
                    format!(
                        "node {p}: {}",
                        if *ok { "reached it".into() } else { d.clone() }
                    )
                })
                .collect();
            // Leader -> prober -> suspect and back: one probe timeout plus
            // two hops of slack on each side.
            let timed_out = now.saturating_sub(r.started) > 4 * cfg.probe_timeout_ms;
            match r.purpose {
                Purpose::Remove | Purpose::Accused => {
                    if r.purpose == Purpose::Remove && v.heard(*id).is_some_and(|t| t > r.started) {
                        out.push(Command::Refute {
                            node: *id,
                            epoch: r.epoch,
                            detail: "it renewed its lease while suspected".into(),
                            at: now,
                        });
                        done.push((*id, 0));
                    } else if fails >= need
                        && r.purpose == Purpose::Accused
                        && !Self::lapsed(r, now, &cfg)
                    {
                        // Its lease may still be fresh: stop renewing it and
                        // remove only once it has surely fenced itself.
                        fencing.push((*id, r.epoch));
                    } else if fails >= need {
                        self.no_ack.entry(*id).or_insert((r.epoch, now));
                        let why = if r.purpose == Purpose::Remove {
                            "lease lapsed"
                        } else {
                            "accused"
                        };
                        out.push(Command::Remove {
                            node: *id,
                            epoch: r.epoch,
                            reason: format!(
                                "{why} and {fails} of {} eligible probes failed ({})",
                                r.probers.len(),
                                details.join("; ")
                            ),
                            at: now,
                        });
                        done.push((*id, 0));
                    } else if oks >= need {
                        out.push(Command::Refute {
                            node: *id,
                            epoch: r.epoch,
                            detail: format!(
                                "{oks} of {} eligible probes reached it ({})",
                                r.probers.len(),
                                details.join("; ")
                            ),
                            at: now,
                        });
                        done.push((*id, cfg.lease_ttl_ms));
                    } else if timed_out && r.fencing_since.is_none() {
                        done.push((*id, 0));
                    }
                }
                Purpose::Reinstate => {
                    if oks >= need {
                        out.push(Command::AdmitLate {
                            node: *id,
                            epoch: r.epoch,
                            at: now,
                        });
                        done.push((*id, 0));
                    } else if fails >= need || timed_out {
                        done.push((*id, cfg.probe_timeout_ms));
                    }
                }
            }
        }
        for (id, epoch) in fencing {
            self.no_ack.entry(id).or_insert((epoch, now));
            if let Some(r) = self.rounds.get_mut(&id) {
                r.fencing_since.get_or_insert(now);
            }
        }
        for (id, quiet) in done {
            self.rounds.remove(&id);
            if quiet > 0 {
                self.quiet_until.insert(id, now + quiet);
            }
        }
    }
}

#[cfg(test)]
mod bound_tests {
    use super::Detector;
    use crate::state::limits::{MAX_DETAIL, MAX_PENDING_ACCUSATIONS};
    use crate::Health;

    impl Detector {
        /// Heap bytes held by pending accusation details.
        fn accusation_bytes(&self) -> usize {
            self.accusations.iter().map(|a| a.3.capacity()).sum()
        }
    }

    /// Resident set size of this process, in bytes (Linux).
    fn rss() -> Option<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    #[test]
    fn accusations_of_4_mib_are_kept_clipped_and_bounded_in_number() {
        const MIB: usize = 1024 * 1024;
        let bound = MAX_PENDING_ACCUSATIONS * MAX_DETAIL;
        let mut d = Detector::default();
        let before = rss();
        // Two-byte characters, so clipping must find a char boundary.
        let huge = "é".repeat(2 * MIB);
        assert_eq!(huge.len(), 4 * MIB);
        for accuser in 0..(MAX_PENDING_ACCUSATIONS as u64 + 100) {
            d.on_accusation(accuser, 9, 1, huge.clone());
            // Checked at every step: an unbounded detector fails here after
            // holding a few MiB, long before it could exhaust memory.
            assert!(
                d.accusation_bytes() <= bound,
                "{} bytes",
                d.accusation_bytes()
            );
        }
        assert_eq!(d.accusations.len(), MAX_PENDING_ACCUSATIONS);
        assert_eq!(d.ignored_accusations, 100);
        assert!(d
            .accusations
            .iter()
            .all(|a| a.3.len() <= MAX_DETAIL && a.3.chars().all(|c| c == 'é')));
        // Repeats from the same accuser are merged, not queued.
        let mut d2 = Detector::default();
        for _ in 0..5_000 {
            d2.on_accusation(3, 9, 1, "no health proof".into());
        }
        assert_eq!((d2.accusations.len(), d2.ignored_accusations), (1, 0));
        drop(huge);
        // 1,124 accusations of 4 MiB went through (4.4 GiB); what stays is
        // the bound. Other tests share the process, hence the wide margin.
        if let (Some(b), Some(a)) = (before, rss()) {
            let grown = a.saturating_sub(b);
            assert!(grown < 256 * MIB as u64, "RSS grew by {grown} bytes");
        }
    }

    #[test]
    fn health_reasons_from_heartbeats_are_clipped() {
        let mut d = Detector::default();
        d.on_heartbeat(4, 1, Health::Impaired("x".repeat(1 << 20)));
        let (_, h) = &d.health[&4];
        assert!(h.reason().unwrap().len() <= crate::state::limits::MAX_REASON);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ClusterConfig;
    use crate::state::{ClusterState, Command, MemberStatus, Response};
    use crate::{Coordinator, EventKind, Health, NodeId, Stage};

    /// A ready 5-node cluster whose coordinator is node 1.
    fn ready_cluster() -> (ClusterState, Coordinator) {
        use crate::testkit::apply;
        let mut c = crate::testkit::config(5);
        c.stage_deadline_ms = ClusterConfig::default().stage_deadline_ms;
        let mut s = crate::testkit::configured(c, 1..=5);
        for st in Stage::ALL.iter().skip(1) {
            let from = s.stage;
            apply(
                &mut s,
                Command::Advance {
                    boot: 1,
                    from,
                    at: 0,
                },
            );
            for n in 1..=5 {
                let epoch = s.members[&n].epoch;
                let r = apply(
                    &mut s,
                    Command::Report {
                        node: n,
                        epoch,
                        stage: *st,
                        waiting: None,
                        progress: None,
                        unreachable: vec![],
                        at: 0,
                    },
                );
                assert_eq!(r, Response::Ok);
            }
        }
        apply(
            &mut s,
            Command::Advance {
                boot: 1,
                from: Stage::PRELOADED,
                at: 0,
            },
        );
        assert_eq!(s.stage, Stage::READY);
        (s, Coordinator::new(1, 1, 0))
    }

    use crate::testkit::run;

    fn beat(c: &mut Coordinator, s: &ClusterState, now: u64, nodes: &[NodeId]) {
        for n in nodes {
            c.on_heartbeat(now, *n, s.members[n].epoch, Health::Healthy);
        }
    }

    #[test]
    fn removal_needs_a_probe_majority_and_a_lone_false_accuser_is_outvoted() {
        let (mut s, mut c) = ready_cluster();
        let mut now = 0;
        for _ in 0..13 {
            beat(&mut c, &s, now, &[1, 2, 3, 4, 5]);
            let out = c.tick(now, &s);
            run(&mut s, out);
            now += 100;
        }
        // Node 5 silent until suspected.
        let probes = loop {
            beat(&mut c, &s, now, &[1, 2, 3, 4]);
            let out = c.tick(now, &s);
            run(&mut s, out);
            let p = c.take_probes();
            if !p.is_empty() {
                break p;
            }
            now += 100;
        };
        assert_eq!(probes.len(), 3);
        assert!(probes.iter().all(|p| p.suspect == 5 && p.prober != 5));
        // First prober says "unreachable", the other two reached it.
        for (i, p) in probes.iter().enumerate() {
            c.on_probe_result(p.round, p.prober, 5, i != 0, "no answer".into());
        }
        let out = c.tick(now, &s);
        assert!(
            out.iter()
                .any(|c| matches!(c, Command::Refute { node: 5, .. })),
            "{out:?}"
        );
        assert!(!out.iter().any(|c| matches!(c, Command::Remove { .. })));
        run(&mut s, out);
        // Quiet for a lease, then suspected again; this time two fail.
        let probes = loop {
            now += 100;
            beat(&mut c, &s, now, &[1, 2, 3, 4]);
            let out = c.tick(now, &s);
            run(&mut s, out);
            let p = c.take_probes();
            if !p.is_empty() {
                break p;
            }
            assert!(now < 10_000);
        };
        for (i, p) in probes.iter().enumerate() {
            c.on_probe_result(p.round, p.prober, 5, i == 0, "connection refused".into());
        }
        let out = c.tick(now, &s);
        assert!(
            out.iter()
                .any(|c| matches!(c, Command::Remove { node: 5, .. })),
            "{out:?}"
        );
        run(&mut s, out);
        assert!(matches!(s.members[&5].status, MemberStatus::Removed { .. }));
        assert!(s
            .refusal(5, s.members[&5].epoch)
            .is_some_and(|r| r.contains("revoked")));
    }

    #[test]
    fn impaired_nodes_never_probe_and_fail_stop_is_removed_on_its_own_word() {
        let (mut s, mut c) = ready_cluster();
        let mut now = 0;
        for _ in 0..13 {
            beat(&mut c, &s, now, &[1, 2, 3, 5]);
            c.on_heartbeat(
                now,
                4,
                s.members[&4].epoch,
                Health::Impaired("event-loop lag 400 ms".into()),
            );
            let out = c.tick(now, &s);
            run(&mut s, out);
            now += 100;
        }
        assert!(!s.members[&4].health.healthy);
        assert!(s.events.iter().any(|e| e.kind == EventKind::NodeImpaired));
        // Node 5 falls silent: node 4 is never among its probers.
        let probes = loop {
            beat(&mut c, &s, now, &[1, 2, 3]);
            c.on_heartbeat(
                now,
                4,
                s.members[&4].epoch,
                Health::Impaired("event-loop lag 400 ms".into()),
            );
            let out = c.tick(now, &s);
            run(&mut s, out);
            let p = c.take_probes();
            if !p.is_empty() {
                break p;
            }
            now += 100;
        };
        assert!(probes.iter().all(|p| p.prober != 4), "{probes:?}");
        // Node 3 declares fail-stop: removed without probes.
        c.on_heartbeat(
            now,
            3,
            s.members[&3].epoch,
            Health::FailStop("constant tables corrupted".into()),
        );
        let out = c.tick(now, &s);
        assert!(out.iter().any(
            |c| matches!(c, Command::Remove { node: 3, reason, .. } if reason.contains("fail-stop"))
        ));
    }

    /// Node 5 leaves (SIGTERM) and falls silent: it is never suspected or
    /// probed, its shards are placed elsewhere on the next tick (no lease to
    /// wait out: it stopped serving before it left), and it comes back
    /// later as a plain restart.
    #[test]
    fn a_node_that_left_is_never_suspected_and_its_shards_move_at_once() {
        use crate::shardmap::KindSpec;
        let (mut s, mut c) = ready_cluster();
        let declare = Command::DeclareShards {
            kinds: vec![KindSpec::new("k", 0..40)],
            at: 0,
        };
        run(&mut s, vec![declare]);
        let mut now = 0;
        for _ in 0..13 {
            beat(&mut c, &s, now, &[1, 2, 3, 4, 5]);
            let out = c.tick(now, &s);
            run(&mut s, out);
            now += 100;
        }
        let owned_by = |s: &ClusterState, n: NodeId| {
            s.shards.entries.values().filter(|e| e.owner == n).count()
        };
        assert!(owned_by(&s, 5) > 0, "node 5 hosts shards");
        let e5 = s.members[&5].epoch;
        run(
            &mut s,
            vec![Command::Leave {
                node: 5,
                epoch: e5,
                at: now,
            }],
        );
        let out = c.tick(now, &s);
        assert!(
            out.iter().any(|c| matches!(c, Command::MoveShards { .. })),
            "{out:?}"
        );
        run(&mut s, out);
        assert_eq!(owned_by(&s, 5), 0, "its shards moved at once");
        assert_eq!(s.shards.shards().count(), 40);
        // Silent for 20 lease periods: never suspected, never probed.
        for _ in 0..200 {
            now += 100;
            beat(&mut c, &s, now, &[1, 2, 3, 4]);
            let out = c.tick(now, &s);
            assert!(
                !out.iter().any(|c| matches!(
                    c,
                    Command::Suspect { node: 5, .. } | Command::Remove { node: 5, .. }
                )),
                "{out:?}"
            );
            run(&mut s, out);
            assert!(c.take_probes().iter().all(|p| p.suspect != 5));
        }
        assert!(!s
            .events
            .iter()
            .any(|e| e.node == Some(5) && e.kind == EventKind::NodeSuspected));
        // A heartbeat of the old process changes nothing (the leader refuses
        // it anyway); it comes back by joining, as a restart.
        c.on_heartbeat(now, 5, e5, Health::Healthy);
        let i = s.applied_index + 1;
        let Response::Joined { epoch } = s.apply(i, Command::Join { node: 5, at: now }) else {
            panic!()
        };
        let mut admitted = false;
        for _ in 0..30 {
            now += 100;
            beat(&mut c, &s, now, &[1, 2, 3, 4, 5]);
            let out = c.tick(now, &s);
            admitted |= out
                .iter()
                .any(|c| matches!(c, Command::AdmitLate { node: 5, epoch: e, .. } if *e == epoch));
            run(&mut s, out);
        }
        assert!(
            admitted,
            "a rejoin after leaving is admitted like a restart"
        );
        assert_eq!(s.members[&5].status, MemberStatus::Active);
        assert!(!s.events.iter().any(|e| e.kind == EventKind::NodeReinstated));
    }

    #[test]
    fn reinstatement_waits_for_backoff_health_and_a_confidence_vote() {
        let (mut s, mut c) = ready_cluster();
        let e5 = s.members[&5].epoch;
        run(
            &mut s,
            vec![Command::Remove {
                node: 5,
                epoch: e5,
                reason: "test".into(),
                at: 0,
            }],
        );
        let i = s.applied_index + 1;
        let Response::Joined { epoch } = s.apply(i, Command::Join { node: 5, at: 10 }) else {
            panic!()
        };
        let mut now = 1_200;
        beat(&mut c, &s, now, &[1, 2, 3, 4]);
        c.on_heartbeat(now, 5, epoch, Health::Impaired("checks failing".into()));
        let out = c.tick(now, &s);
        run(&mut s, out);
        assert!(
            c.take_probes().is_empty(),
            "no vote while it reports itself impaired"
        );
        now += 100;
        beat(&mut c, &s, now, &[1, 2, 3, 4, 5]);
        let out = c.tick(now, &s);
        run(&mut s, out);
        let probes = c.take_probes();
        assert_eq!(probes.len(), 3);
        for p in &probes {
            c.on_probe_result(p.round, p.prober, 5, true, String::new());
        }
        let out = c.tick(now, &s);
        assert!(
            out.iter()
                .any(|c| matches!(c, Command::AdmitLate { node: 5, .. })),
            "{out:?}"
        );
        run(&mut s, out);
        assert!(s.events.iter().any(|e| e.kind == EventKind::NodeReinstated));
        assert_eq!(s.config.membership.backoff(1), 1_000);
        assert_eq!(s.config.membership.backoff(3), 4_000);
        assert_eq!(s.config.membership.backoff(30), 60_000);
    }
}
