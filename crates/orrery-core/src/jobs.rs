//! Per-period singleton jobs: work that one healthy node must do exactly once
//! per period (post-mortem 003's statistics run, "one healthy node is
//! selected to process all of the statistics for a given time period").
//!
//! What this module owns:
//! - [`JobSpec`]: a job the services declare (`Command::DeclareJobs`, like
//!   shard kinds): a name, a period and a deadline within the period;
//! - [`Jobs`], the replicated part of [`ClusterState`]: per job the current
//!   [`JobLease`] (which node runs which period, under which lease epoch —
//!   the job's fencing token) and a bounded history of committed periods;
//! - how `apply` validates `GrantJob`, `CommitJob`, `JobUnassigned` and
//!   `JobOverdue` against the state they land on;
//! - `plan`, the coordinator's step: grant the current period to an
//!   eligible node, take it over when the holder is fenced or impaired,
//!   report a period nobody may run or that missed its deadline.
//!
//! The guarantee is *one committed output per period*, not one run: a holder
//! cut off from the control plane may keep working after its lease was
//! taken over, so a period's work may run twice, but only the output
//! presented with the current token (period, lease epoch, holder, holder
//! epoch) is committed, and only once. A node with bad memory never holds a
//! lease: only nodes with a perfect health record (the failure detector's
//! eligibility, [`ClusterState::has_perfect_record`]) are chosen, and a
//! holder that turns impaired loses its lease and cannot commit.
//!
//! What it must never do: read a clock (the period comes from the time in
//! the command), reuse a lease epoch (a job's epochs start above every epoch
//! any job ever issued, so even a job dropped and declared again never
//! repeats one), let a period be committed twice, grant a period older than
//! the job's current lease, or grow without bound ([`MAX_JOBS`],
//! [`MAX_JOB_HISTORY`], [`MAX_JOB_SUMMARY`], and the timeline budget
//! [`MAX_JOB_EVENTS_PER_MINUTE`]).

use crate::state::{
    clip_to, reject, reject_as, ClusterState, Command, EventKind, Rejection, Response, MAX_TEXT,
};
use crate::{Epoch, Millis, NodeId, Stage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most jobs the services may declare.
pub const MAX_JOBS: usize = 64;
/// Longest job name, in bytes.
pub const MAX_JOB_NAME: usize = 64;
/// Shortest period: a job runs at most once a second.
pub const MIN_JOB_PERIOD_MS: Millis = 1_000;
/// Longest period: a week.
pub const MAX_JOB_PERIOD_MS: Millis = 7 * 24 * 60 * 60 * 1_000;
/// Committed periods kept per job (oldest dropped first).
pub const MAX_JOB_HISTORY: usize = 256;
/// Longest commit summary the state stores, in bytes (clipped).
pub const MAX_JOB_SUMMARY: usize = 128;
/// Routine job events (a grant and a commit per period and job) the declared
/// jobs may add to the timeline per minute: jobs must not flush the
/// membership events out of the bounded event list.
pub const MAX_JOB_EVENTS_PER_MINUTE: u64 = 120;

/// A job the services declare: run once per `period_ms` on one node, with
/// its output committed at most `deadline_ms` into the period.
///
/// Period `p` is the time `[p * period_ms, (p + 1) * period_ms)` on the
/// coordinator's clock. The deadline should leave room for a takeover: the
/// failure detector needs about `lease_ttl_ms` + 4 × `probe_timeout_ms` to
/// remove a dead holder, and its successor then needs the job's run time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Unique among the declared jobs; 1..=[`MAX_JOB_NAME`] bytes, no
    /// whitespace or control characters.
    pub name: String,
    /// [`MIN_JOB_PERIOD_MS`]..=[`MAX_JOB_PERIOD_MS`].
    pub period_ms: Millis,
    /// 1..=`period_ms`.
    pub deadline_ms: Millis,
}

impl JobSpec {
    pub fn new(name: impl Into<String>, period_ms: Millis, deadline_ms: Millis) -> Self {
        JobSpec {
            name: name.into(),
            period_ms,
            deadline_ms,
        }
    }

    /// Checks the bounds; the error names the job and the rule.
    pub fn validate(&self) -> Result<(), JobError> {
        let name = &self.name;
        if name.is_empty() || name.len() > MAX_JOB_NAME {
            return Err(JobError::BadName(format!(
                "job name {name:?} must be 1 to {MAX_JOB_NAME} bytes long"
            )));
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(JobError::BadName(format!(
                "job name {name:?} must not contain whitespace or control characters"
            )));
        }
        if !(MIN_JOB_PERIOD_MS..=MAX_JOB_PERIOD_MS).contains(&self.period_ms) {
            return Err(JobError::BadPeriod {
                name: name.clone(),
                period_ms: self.period_ms,
            });
        }
        if self.deadline_ms == 0 || self.deadline_ms > self.period_ms {
            return Err(JobError::BadDeadline {
                name: name.clone(),
                deadline_ms: self.deadline_ms,
                period_ms: self.period_ms,
            });
        }
        Ok(())
    }

    /// The period `at` falls in.
    pub fn period_at(&self, at: Millis) -> u64 {
        debug_assert!(self.period_ms > 0, "validated job specs have a period");
        at / self.period_ms
    }

    /// When `period` starts.
    pub fn starts(&self, period: u64) -> Millis {
        period.saturating_mul(self.period_ms)
    }

    /// When `period`'s output is due.
    pub fn due(&self, period: u64) -> Millis {
        self.starts(period).saturating_add(self.deadline_ms)
    }

    /// Routine events per minute: a grant and a commit per period (rounded up).
    fn events_per_minute(&self) -> u64 {
        (2 * 60_000u64).div_ceil(self.period_ms.max(1))
    }
}

/// Why a job declaration was refused (the declared jobs are unchanged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    BadName(String),
    #[error(
        "job {name:?}: period_ms {period_ms} is outside {MIN_JOB_PERIOD_MS}..={MAX_JOB_PERIOD_MS}"
    )]
    BadPeriod { name: String, period_ms: Millis },
    #[error("job {name:?}: deadline_ms {deadline_ms} must be positive and at most period_ms {period_ms}")]
    BadDeadline {
        name: String,
        deadline_ms: Millis,
        period_ms: Millis,
    },
    #[error("job {0:?} is declared twice")]
    Duplicate(String),
    #[error("{0} jobs declared: at most {MAX_JOBS}")]
    TooMany(usize),
    #[error("the declared jobs would add {0} events a minute to the timeline (at most {MAX_JOB_EVENTS_PER_MINUTE}): lengthen their periods")]
    TooChatty(u64),
}

/// Checks a whole declaration: every spec, unique names, the job count and
/// the timeline budget.
pub fn validate_declaration(specs: &[JobSpec]) -> Result<(), JobError> {
    if specs.len() > MAX_JOBS {
        return Err(JobError::TooMany(specs.len()));
    }
    let mut names = BTreeSet::new();
    for s in specs {
        s.validate()?;
        if !names.insert(s.name.as_str()) {
            return Err(JobError::Duplicate(s.name.clone()));
        }
    }
    let rate: u64 = specs.iter().map(JobSpec::events_per_minute).sum();
    if rate > MAX_JOB_EVENTS_PER_MINUTE {
        return Err(JobError::TooChatty(rate));
    }
    Ok(())
}

/// The right to run one period of one job, and the token its output must be
/// committed with: (`period`, `lease_epoch`, `holder`, `holder_epoch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLease {
    pub job: String,
    pub period: u64,
    /// Strictly increasing per job, never reused.
    pub lease_epoch: u64,
    pub holder: NodeId,
    /// The holder's membership epoch when granted: the lease dies with it.
    pub holder_epoch: Epoch,
    /// The coordinator's clock when it granted the lease.
    pub granted_at: Millis,
}

impl JobLease {
    /// The command that commits this period's output under this lease.
    pub fn commit(&self, summary: impl Into<String>, at: Millis) -> Command {
        Command::CommitJob {
            job: self.job.clone(),
            period: self.period,
            lease_epoch: self.lease_epoch,
            holder: self.holder,
            holder_epoch: self.holder_epoch,
            summary: summary.into(),
            at,
        }
    }
}

/// A committed period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCommit {
    pub holder: NodeId,
    pub holder_epoch: Epoch,
    pub lease_epoch: u64,
    /// The holder's clock when it committed.
    pub at: Millis,
    /// Committed after the period's deadline.
    pub late: bool,
    /// What the run produced, in words (clipped to [`MAX_JOB_SUMMARY`]).
    pub summary: String,
}

/// One declared job, as the control plane holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub spec: JobSpec,
    /// The latest lease granted (its period may be committed already).
    pub lease: Option<JobLease>,
    /// The last lease epoch issued for this job.
    pub last_lease_epoch: u64,
    /// Committed periods, the last [`MAX_JOB_HISTORY`].
    pub commits: BTreeMap<u64, JobCommit>,
    /// The last period reported as having no eligible holder.
    pub unassigned_reported: Option<u64>,
    /// The last period reported as past its deadline uncommitted.
    pub overdue_reported: Option<u64>,
    /// Periods reported without an eligible holder, ever.
    pub unassigned_periods: u64,
    /// Periods reported past their deadline uncommitted, ever.
    pub overdue_periods: u64,
}

impl JobState {
    fn new(spec: JobSpec, high_water: u64) -> Self {
        JobState {
            spec,
            lease: None,
            last_lease_epoch: high_water,
            commits: BTreeMap::new(),
            unassigned_reported: None,
            overdue_reported: None,
            unassigned_periods: 0,
            overdue_periods: 0,
        }
    }

    /// The commit of `period`, if it was committed (and is still retained).
    pub fn committed(&self, period: u64) -> Option<&JobCommit> {
        self.commits.get(&period)
    }
}

/// The declared jobs and their leases (part of [`ClusterState`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jobs {
    /// By name.
    pub jobs: BTreeMap<String, JobState>,
    /// The highest lease epoch any job ever issued: a newly declared job's
    /// epochs start above it.
    pub high_water: u64,
}

impl Jobs {
    /// The declared specs, in name order.
    pub fn specs(&self) -> Vec<JobSpec> {
        self.jobs.values().map(|j| j.spec.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&JobState> {
        self.jobs.get(name)
    }

    /// Replaces the declared jobs (the order of `specs` does not matter). A
    /// job declared again with the same period keeps its lease and history;
    /// one whose period changed keeps only its lease-epoch counter (its
    /// period numbers now mean other times); jobs no longer declared are
    /// dropped. Returns whether anything changed; a refused declaration
    /// changes nothing.
    pub fn declare(&mut self, specs: Vec<JobSpec>) -> Result<bool, JobError> {
        validate_declaration(&specs)?;
        let mut sorted = specs.clone();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        if sorted == self.specs() {
            return Ok(false);
        }
        let mut next = BTreeMap::new();
        for spec in specs {
            let state = match self.jobs.remove(&spec.name) {
                Some(old) if old.spec.period_ms == spec.period_ms => JobState { spec, ..old },
                Some(old) => JobState::new(spec, old.last_lease_epoch),
                None => JobState::new(spec, self.high_water),
            };
            next.insert(state.spec.name.clone(), state);
        }
        self.jobs = next;
        debug_assert!(self.jobs.len() <= MAX_JOBS);
        Ok(true)
    }
}

impl ClusterState {
    /// Why `node`, running under `epoch`, may not be granted a job lease at
    /// `now` (`None`: it may). A holder hosts services, is Active under that
    /// epoch at stage 0, healthy with a perfect health record (the failure
    /// detector's eligibility), and not draining.
    pub fn job_ineligibility(&self, node: NodeId, epoch: Epoch, now: Millis) -> Option<String> {
        let Some(role) = self.role_of(node) else {
            return Some(format!("node {node} is not in the cluster configuration"));
        };
        if !role.hosts_services() {
            return Some(format!("node {node} is an {role}: it hosts no services"));
        }
        let Some(m) = self.members.get(&node) else {
            return Some(format!("node {node} has no member record"));
        };
        if epoch == 0 || m.epoch == 0 {
            return Some(format!("node {node} has not joined"));
        }
        if let Some(why) = m.fenced_reason(node, epoch) {
            return Some(why);
        }
        if m.report.stage != Stage::READY {
            return Some(format!(
                "node {node} is at stage {}, not serving",
                m.report.stage
            ));
        }
        if !m.health.healthy {
            return Some(format!(
                "node {node} is impaired: {}",
                m.health
                    .reason
                    .as_deref()
                    .unwrap_or("failing its self-checks")
            ));
        }
        if !self.has_perfect_record(node, now) {
            return Some(format!(
                "node {node} has a perfect health record only for {} ms (needs {} ms, or since the cluster became ready)",
                now.saturating_sub(m.health.since),
                self.config.membership.eligibility_window_ms
            ));
        }
        if m.draining {
            return Some(format!("node {node} is draining"));
        }
        None
    }

    /// Why `lease` no longer binds (`None`: its holder may still run and
    /// commit it): the holder's epoch was revoked, superseded or excluded,
    /// or the holder is impaired. (A holder that starts draining keeps the
    /// period it holds; it is not chosen for the next one.)
    pub fn job_lease_invalidity(&self, lease: &JobLease) -> Option<String> {
        let (node, epoch) = (lease.holder, lease.holder_epoch);
        let Some(m) = self.members.get(&node) else {
            return Some(format!("node {node} is not in the cluster configuration"));
        };
        if let Some(why) = m.fenced_reason(node, epoch) {
            return Some(why);
        }
        if !m.health.healthy {
            return Some(format!(
                "node {node} is impaired: {}",
                m.health
                    .reason
                    .as_deref()
                    .unwrap_or("failing its self-checks")
            ));
        }
        None
    }

    /// The lease `node` holds for `job`, if it holds one whose period is not
    /// committed yet: the period it must run and the token it must present.
    /// The node must also check `holder_epoch` is its own process's epoch.
    pub fn job_lease_for(&self, node: NodeId, job: &str) -> Option<&JobLease> {
        let j = self.jobs.get(job)?;
        j.lease
            .as_ref()
            .filter(|l| l.holder == node && j.committed(l.period).is_none())
    }

    /// Every uncommitted lease `node` holds, in job-name order.
    pub fn jobs_held_by(&self, node: NodeId) -> Vec<&JobLease> {
        self.jobs
            .jobs
            .keys()
            .filter_map(|name| self.job_lease_for(node, name))
            .collect()
    }

    pub(crate) fn declare_jobs(&mut self, index: u64, specs: Vec<JobSpec>, at: Millis) -> Response {
        let listed: Vec<String> = specs
            .iter()
            .map(|s| {
                format!(
                    "{} every {} ms (due {} ms in)",
                    s.name, s.period_ms, s.deadline_ms
                )
            })
            .collect();
        match self.jobs.declare(specs) {
            Ok(true) => {}
            Ok(false) => return reject("no change"),
            Err(e) => return reject(e.to_string()),
        }
        let detail = format!("{} job(s) declared: {}", listed.len(), listed.join(", "));
        self.event(
            index,
            at,
            EventKind::JobsDeclared,
            None,
            clip_to(detail, MAX_TEXT),
        );
        Response::Ok
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn grant_job(
        &mut self,
        index: u64,
        job: String,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
        holder_epoch: Epoch,
        at: Millis,
    ) -> Response {
        let Some(j) = self.jobs.jobs.get(&job) else {
            return reject(format!("job {job:?} is not declared"));
        };
        let now_period = j.spec.period_at(at);
        if period != now_period {
            return reject(format!(
                "grant of period {period} of job {job} at {at} ms: that time is in period {now_period}"
            ));
        }
        if let Some(c) = j.committed(period) {
            return reject_as(
                Rejection::AlreadyCommitted {
                    lease_epoch: c.lease_epoch,
                },
                format!(
                    "period {period} of job {job} already committed by node {} (lease epoch {})",
                    c.holder, c.lease_epoch
                ),
            );
        }
        let mut takeover = None;
        if let Some(l) = &j.lease {
            if l.period > period {
                return reject(format!(
                    "period {period} of job {job} is older than its current lease's period {}",
                    l.period
                ));
            }
            if l.period == period {
                match self.job_lease_invalidity(l) {
                    None => {
                        return reject(format!(
                            "node {} (epoch {}) still holds period {period} of job {job} under lease epoch {}",
                            l.holder, l.holder_epoch, l.lease_epoch
                        ))
                    }
                    Some(why) => takeover = Some((l.holder, l.holder_epoch, l.lease_epoch, why)),
                }
            }
        }
        let next = j.last_lease_epoch + 1;
        if lease_epoch != next {
            return reject(format!(
                "lease epoch {lease_epoch} of job {job} is not the next one ({next}): \
                 already issued, or proposed from a stale view"
            ));
        }
        if self.stage != Stage::READY {
            return reject(format!("the cluster is at stage {}, not ready", self.stage));
        }
        if let Some(why) = self.job_ineligibility(holder, holder_epoch, at) {
            return reject(format!("node {holder} may not hold job {job}: {why}"));
        }
        let j = self.jobs.jobs.get_mut(&job).expect("checked above");
        let previous = j.lease.as_ref().map_or(0, |l| l.lease_epoch);
        assert!(
            lease_epoch > previous && lease_epoch > j.last_lease_epoch,
            "lease epochs only grow: {lease_epoch} after {previous}"
        );
        let into = at.saturating_sub(j.spec.starts(period));
        j.last_lease_epoch = lease_epoch;
        j.lease = Some(JobLease {
            job: job.clone(),
            period,
            lease_epoch,
            holder,
            holder_epoch,
            granted_at: at,
        });
        self.jobs.high_water = self.jobs.high_water.max(lease_epoch);
        let mut detail = format!(
            "job {job} period {period}: lease epoch {lease_epoch} granted to node {holder} \
             (epoch {holder_epoch}) {into} ms into the period"
        );
        if let Some((n, e, l, why)) = takeover {
            detail.push_str(&format!(
                "; takes over from node {n} (epoch {e}, lease epoch {l}): {why}"
            ));
        }
        self.event(
            index,
            at,
            EventKind::JobGranted,
            Some(holder),
            clip_to(detail, MAX_TEXT),
        );
        Response::Ok
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn commit_job(
        &mut self,
        index: u64,
        job: String,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
        holder_epoch: Epoch,
        summary: String,
        adopted: Option<u64>,
        at: Millis,
    ) -> Response {
        let Some(j) = self.jobs.jobs.get(&job) else {
            return reject(format!("job {job:?} is not declared"));
        };
        if adopted.is_some_and(|stored| stored >= lease_epoch) {
            return reject(format!(
                "an adopted output must come from an older lease epoch than {lease_epoch}"
            ));
        }
        if let Some(c) = j.committed(period) {
            return reject_as(
                Rejection::AlreadyCommitted {
                    lease_epoch: c.lease_epoch,
                },
                format!(
                    "period {period} of job {job} already committed by node {} (lease epoch {})",
                    c.holder, c.lease_epoch
                ),
            );
        }
        let Some(l) = &j.lease else {
            return reject(format!("job {job} has no lease: nothing was granted yet"));
        };
        if l.period != period || l.lease_epoch != lease_epoch {
            let stale = (period, lease_epoch) < (l.period, l.lease_epoch);
            let kind = if stale {
                Rejection::StaleToken
            } else {
                Rejection::Other
            };
            return reject_as(
                kind,
                if stale {
                    if l.period == period {
                        format!(
                        "stale job token: lease epoch {lease_epoch} for period {period} of job {job} \
                         superseded by {}",
                        l.lease_epoch
                    )
                    } else {
                        format!(
                        "stale job token: lease epoch {lease_epoch} for period {period} of job {job} \
                         superseded by lease epoch {} for period {}",
                        l.lease_epoch, l.period
                    )
                    }
                } else {
                    format!(
                    "job token (period {period}, lease epoch {lease_epoch}) of job {job} was never \
                     granted: the current lease is epoch {} for period {}",
                    l.lease_epoch, l.period
                )
                },
            );
        }
        if (l.holder, l.holder_epoch) != (holder, holder_epoch) {
            return reject(format!(
                "job token names node {holder} (epoch {holder_epoch}) but lease epoch {lease_epoch} \
                 of job {job} is held by node {} (epoch {})",
                l.holder, l.holder_epoch
            ));
        }
        if let Some(why) = self.job_lease_invalidity(l) {
            return reject_as(
                Rejection::StaleToken,
                format!(
                    "stale job token: lease epoch {lease_epoch} for period {period} of job {job} \
                 no longer binds: {why}"
                ),
            );
        }
        let j = self.jobs.jobs.get_mut(&job).expect("checked above");
        // Leases only move to newer periods and a period is committed under
        // its lease, so this period is newer than every committed one.
        assert!(
            j.commits.last_key_value().is_none_or(|(p, _)| *p < period),
            "job {job}: period {period} committed out of order"
        );
        let due = j.spec.due(period);
        let late = at > due;
        let summary = clip_to(summary, MAX_JOB_SUMMARY);
        // An adopted commit records the token the stored output carries.
        let lease_epoch = adopted.unwrap_or(lease_epoch);
        j.commits.insert(
            period,
            JobCommit {
                holder,
                holder_epoch,
                lease_epoch,
                at,
                late,
                summary: summary.clone(),
            },
        );
        while j.commits.len() > MAX_JOB_HISTORY {
            j.commits.pop_first();
        }
        let into = at.saturating_sub(j.spec.starts(period));
        let mut detail = format!(
            "job {job} period {period} committed by node {holder} (epoch {holder_epoch}, \
             lease epoch {lease_epoch}) {into} ms into the period"
        );
        if late {
            detail.push_str(&format!(
                ", LATE by {} ms (due {} ms in)",
                at - due,
                j.spec.deadline_ms
            ));
        }
        if !summary.is_empty() {
            detail.push_str(&format!(": {summary}"));
        }
        self.event(
            index,
            at,
            EventKind::JobCommitted,
            Some(holder),
            clip_to(detail, MAX_TEXT),
        );
        Response::Ok
    }

    pub(crate) fn job_unassigned(
        &mut self,
        index: u64,
        job: String,
        period: u64,
        reason: String,
        at: Millis,
    ) -> Response {
        let Some(j) = self.jobs.jobs.get_mut(&job) else {
            return reject(format!("job {job:?} is not declared"));
        };
        if j.spec.period_at(at) != period || j.committed(period).is_some() {
            return reject(format!(
                "period {period} of job {job} is not current or already committed"
            ));
        }
        if j.unassigned_reported.is_some_and(|p| p >= period) {
            return reject(format!(
                "period {period} of job {job} was already reported unassigned"
            ));
        }
        j.unassigned_reported = Some(period);
        j.unassigned_periods += 1;
        self.event(
            index,
            at,
            EventKind::JobUnassigned,
            None,
            clip_to(
                format!("job {job} period {period}: no node may run it: {reason}"),
                MAX_TEXT,
            ),
        );
        Response::Ok
    }

    pub(crate) fn job_overdue(
        &mut self,
        index: u64,
        job: String,
        period: u64,
        at: Millis,
    ) -> Response {
        let Some(j) = self.jobs.jobs.get(&job) else {
            return reject(format!("job {job:?} is not declared"));
        };
        if j.committed(period).is_some() {
            return reject(format!("period {period} of job {job} is committed"));
        }
        let due = j.spec.due(period);
        if at <= due || j.spec.period_at(at) != period {
            return reject(format!(
                "period {period} of job {job} is not current and past its deadline at {at} ms"
            ));
        }
        if j.overdue_reported.is_some_and(|p| p >= period) {
            return reject(format!(
                "period {period} of job {job} was already reported overdue"
            ));
        }
        let holder = match &j.lease {
            Some(l) if l.period == period => {
                let state = self
                    .job_lease_invalidity(l)
                    .unwrap_or_else(|| "still holds it".into());
                format!(
                    "node {} (epoch {}, lease epoch {}): {state}",
                    l.holder, l.holder_epoch, l.lease_epoch
                )
            }
            _ => "never granted".into(),
        };
        let deadline = j.spec.deadline_ms;
        let j = self.jobs.jobs.get_mut(&job).expect("checked above");
        j.overdue_reported = Some(period);
        j.overdue_periods += 1;
        self.event(
            index,
            at,
            EventKind::JobOverdue,
            None,
            clip_to(
                format!(
                    "job {job} period {period} not committed by its deadline ({deadline} ms in); holder: {holder}"
                ),
                MAX_TEXT,
            ),
        );
        Response::Ok
    }
}

/// A fixed, platform-independent hash of a job name (FNV-1a, 64 bits): it
/// staggers the rotation of different jobs over the eligible nodes.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The coordinator's job step, for a ready cluster at `now`. For each
/// declared job and its current period: nothing if the period is committed
/// or its lease still binds; otherwise grant it (the next lease epoch) to an
/// eligible node — one that [`ClusterState::job_ineligibility`] clears and
/// `may_hold` (the coordinator's own view: heard from recently, not being
/// removed, not reporting itself unhealthy) accepts — rotating with the
/// period so no node is always the one; or, if none is eligible and
/// `judge_absence` (the coordinator has led long enough to have heard from
/// everyone), report the period unassigned once. A period past its deadline
/// uncommitted is reported once too, and is still granted: late output
/// beats none.
pub(crate) fn plan(
    state: &ClusterState,
    now: Millis,
    may_hold: impl Fn(NodeId, Epoch) -> bool,
    judge_absence: bool,
    out: &mut Vec<Command>,
) {
    if state.stage != Stage::READY {
        return;
    }
    for (name, j) in &state.jobs.jobs {
        let period = j.spec.period_at(now);
        if j.committed(period).is_some() {
            continue;
        }
        if now > j.spec.due(period) && j.overdue_reported.is_none_or(|p| p < period) {
            out.push(Command::JobOverdue {
                job: name.clone(),
                period,
                at: now,
            });
        }
        if let Some(l) = &j.lease {
            let binds = l.period == period && state.job_lease_invalidity(l).is_none();
            if l.period > period || binds {
                continue;
            }
        }
        let mut refused = vec![];
        let eligible: Vec<(NodeId, Epoch)> = state
            .members
            .iter()
            .filter(
                |(id, m)| match state.job_ineligibility(**id, m.epoch, now) {
                    Some(why) => {
                        refused.push(why);
                        false
                    }
                    None if !may_hold(**id, m.epoch) => {
                        refused.push(format!("node {id} is not heard from or is being removed"));
                        false
                    }
                    None => true,
                },
            )
            .map(|(id, m)| (*id, m.epoch))
            .collect();
        if eligible.is_empty() {
            if judge_absence && j.unassigned_reported.is_none_or(|p| p < period) {
                out.push(Command::JobUnassigned {
                    job: name.clone(),
                    period,
                    reason: refused.join("; "),
                    at: now,
                });
            }
            continue;
        }
        // Prefer a holder that is not the coordinator: if the leader held
        // the job and died, the takeover would wait for an election and a
        // new coordinator's liveness window, longer than a short period.
        let eligible: Vec<(NodeId, Epoch)> = match state.leader {
            Some(leader) if eligible.iter().any(|(id, _)| *id != leader) => eligible
                .into_iter()
                .filter(|(id, _)| *id != leader)
                .collect(),
            _ => eligible,
        };
        debug_assert!(!eligible.is_empty());
        let pick = period.wrapping_add(name_hash(name)) % eligible.len() as u64;
        let (holder, holder_epoch) = eligible[pick as usize];
        out.push(Command::GrantJob {
            job: name.clone(),
            period,
            lease_epoch: j.last_lease_epoch + 1,
            holder,
            holder_epoch,
            at: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::testkit::{apply, config, ready};
    use crate::{Coordinator, Health};

    const JOB: &str = "stats";
    const PERIOD: Millis = 10_000;
    const DUE: Millis = 8_000;

    /// A ready cluster of `n` nodes (node `n` an arbiter) with one job
    /// declared: "stats", every 10 s, due 8 s in.
    fn cluster(n: u64) -> ClusterState {
        let mut c = config(n);
        c.nodes.get_mut(&n).expect("node n").role = Role::Arbiter;
        let mut s = ready(c);
        let r = apply(
            &mut s,
            Command::DeclareJobs {
                jobs: vec![JobSpec::new(JOB, PERIOD, DUE)],
                at: 0,
            },
        );
        assert_eq!(r, Response::Ok);
        s
    }

    fn grant_epoch(
        s: &mut ClusterState,
        period: u64,
        lease_epoch: u64,
        holder: NodeId,
    ) -> Response {
        let holder_epoch = s.members[&holder].epoch;
        apply(
            s,
            Command::GrantJob {
                job: JOB.into(),
                period,
                lease_epoch,
                holder,
                holder_epoch,
                at: period * PERIOD + 10,
            },
        )
    }

    fn grant(s: &mut ClusterState, period: u64, holder: NodeId) -> Response {
        let next = s.jobs.jobs[JOB].last_lease_epoch + 1;
        grant_epoch(s, period, next, holder)
    }

    fn commit(s: &mut ClusterState, lease: &JobLease, at: Millis) -> Response {
        apply(s, lease.commit("42 rows", at))
    }

    fn lease(s: &ClusterState) -> JobLease {
        s.jobs.jobs[JOB].lease.clone().expect("a lease")
    }

    fn rejected(r: Response) -> String {
        match r {
            Response::Rejected { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn set_health(s: &mut ClusterState, node: NodeId, healthy: bool, at: Millis) {
        let epoch = s.members[&node].epoch;
        let reason = (!healthy).then(|| "memory known-answer check failed".to_string());
        let r = apply(
            s,
            Command::HealthChanged {
                node,
                epoch,
                healthy,
                reason,
                at,
            },
        );
        assert_eq!(r, Response::Ok);
    }

    #[test]
    fn declarations_are_validated_and_bounded() {
        let ok = |specs: Vec<JobSpec>| validate_declaration(&specs);
        assert!(ok(vec![JobSpec::new("stats", 60_000, 50_000)]).is_ok());
        for bad in [
            JobSpec::new("", 60_000, 1),
            JobSpec::new("a b", 60_000, 1),
            JobSpec::new("x".repeat(MAX_JOB_NAME + 1), 60_000, 1),
            JobSpec::new("fast", MIN_JOB_PERIOD_MS - 1, 1),
            JobSpec::new("slow", MAX_JOB_PERIOD_MS + 1, 1),
            JobSpec::new("nodue", 60_000, 0),
            JobSpec::new("pastdue", 60_000, 60_001),
        ] {
            assert!(ok(vec![bad.clone()]).is_err(), "{bad:?} accepted");
        }
        let dup = vec![JobSpec::new("a", 60_000, 1), JobSpec::new("a", 60_000, 1)];
        assert_eq!(ok(dup), Err(JobError::Duplicate("a".into())));
        let many: Vec<JobSpec> = (0..=MAX_JOBS)
            .map(|i| JobSpec::new(format!("j{i}"), MAX_JOB_PERIOD_MS, 1))
            .collect();
        assert_eq!(ok(many), Err(JobError::TooMany(MAX_JOBS + 1)));
        let chatty: Vec<JobSpec> = (0..2)
            .map(|i| JobSpec::new(format!("j{i}"), MIN_JOB_PERIOD_MS, 1))
            .collect();
        assert_eq!(ok(chatty), Err(JobError::TooChatty(240)));
        // Through apply: refused and unchanged.
        let mut s = cluster(4);
        let before = s.jobs.clone();
        let r = apply(
            &mut s,
            Command::DeclareJobs {
                jobs: vec![JobSpec::new("stats", 500, 100)],
                at: 1,
            },
        );
        assert!(rejected(r).contains("period_ms 500"));
        let again = Command::DeclareJobs {
            jobs: vec![JobSpec::new(JOB, PERIOD, DUE)],
            at: 1,
        };
        assert_eq!(rejected(apply(&mut s, again)), "no change");
        assert_eq!(s.jobs, before);
        assert!(s.events.iter().any(|e| e.kind == EventKind::JobsDeclared
            && e.detail.contains("stats every 10000 ms (due 8000 ms in)")));
    }

    #[test]
    fn a_grant_is_committed_exactly_once() {
        let mut s = cluster(4);
        assert_eq!(grant(&mut s, 3, 2), Response::Ok);
        let l = lease(&s);
        assert_eq!((l.period, l.lease_epoch, l.holder), (3, 1, 2));
        assert_eq!(l.holder_epoch, s.members[&2].epoch);
        // The node side: node 2 sees what it must run, nobody else does.
        assert_eq!(s.job_lease_for(2, JOB), Some(&l));
        assert_eq!(s.jobs_held_by(2), vec![&l]);
        assert!(s.job_lease_for(3, JOB).is_none() && s.jobs_held_by(3).is_empty());
        // A second grant for a period whose lease still binds is refused,
        // whoever proposes it and whatever epoch it carries.
        let why = rejected(grant(&mut s, 3, 3));
        assert!(
            why.contains("node 2") && why.contains("still holds period 3"),
            "{why}"
        );
        assert_eq!(commit(&mut s, &l, 3 * PERIOD + 500), Response::Ok);
        let c = s.jobs.jobs[JOB].committed(3).expect("committed").clone();
        assert_eq!((c.holder, c.lease_epoch, c.late), (2, 1, false));
        assert_eq!(c.summary, "42 rows");
        assert!(
            s.job_lease_for(2, JOB).is_none(),
            "a committed period is done"
        );
        let why = rejected(commit(&mut s, &l, 3 * PERIOD + 600));
        assert_eq!(
            why,
            "period 3 of job stats already committed by node 2 (lease epoch 1)"
        );
        let why = rejected(grant(&mut s, 3, 3));
        assert!(why.contains("already committed"), "{why}");
        let kinds: Vec<EventKind> = s.events.iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&EventKind::JobGranted) && kinds.contains(&EventKind::JobCommitted));
        let ev = s.events.back().expect("an event");
        assert_eq!(
            ev.detail,
            "job stats period 3 committed by node 2 (epoch 2, lease epoch 1) 500 ms into the period: 42 rows"
        );
    }

    #[test]
    fn a_holder_adopts_output_its_dead_predecessor_stored() {
        let mut s = cluster(4);
        assert_eq!(grant(&mut s, 3, 2), Response::Ok);
        let first = lease(&s);
        // Node 2 wrote the period's output to the store and died before
        // committing it here; it is removed and node 3 takes over.
        let e = s.members[&2].epoch;
        let remove = Command::Remove {
            node: 2,
            epoch: e,
            reason: "crashed".into(),
            at: 3 * PERIOD + 100,
        };
        assert_eq!(apply(&mut s, remove), Response::Ok);
        assert_eq!(grant(&mut s, 3, 3), Response::Ok);
        let second = lease(&s);
        let adopt = |stored: u64, l: &JobLease| Command::AdoptJobCommit {
            job: JOB.into(),
            period: l.period,
            lease_epoch: l.lease_epoch,
            holder: l.holder,
            holder_epoch: l.holder_epoch,
            stored_lease_epoch: stored,
            at: 3 * PERIOD + 300,
        };
        // Only an older token's output can be adopted, by the current holder.
        assert!(rejected(apply(&mut s, adopt(second.lease_epoch, &second)))
            .contains("older lease epoch"));
        assert!(rejected(apply(&mut s, adopt(0, &first))).contains("stale job token"));
        assert_eq!(
            apply(&mut s, adopt(first.lease_epoch, &second)),
            Response::Ok
        );
        let c = s.jobs.jobs[JOB].committed(3).expect("committed").clone();
        assert_eq!((c.holder, c.lease_epoch), (3, first.lease_epoch));
        assert!(c.summary.starts_with("adopted"), "{}", c.summary);
        // Exactly once: neither a commit nor another adoption lands after it.
        assert!(rejected(commit(&mut s, &second, 3 * PERIOD + 400)).contains("already committed"));
        assert!(rejected(apply(&mut s, adopt(first.lease_epoch, &second)))
            .contains("already committed"));
    }

    #[test]
    fn grants_are_validated() {
        let mut s = cluster(5);
        // The lease epoch must be the next one: a duplicate proposal of an
        // epoch already issued lands on a state that moved on.
        assert!(rejected(grant_epoch(&mut s, 1, 2, 2)).contains("not the next one (1)"));
        assert_eq!(grant_epoch(&mut s, 1, 1, 2), Response::Ok);
        let l = lease(&s);
        assert_eq!(commit(&mut s, &l, PERIOD + 100), Response::Ok);
        assert!(rejected(grant_epoch(&mut s, 2, 1, 3)).contains("not the next one (2)"));
        // The period must be the one the grant's time falls in.
        let e3 = s.members[&3].epoch;
        let why = rejected(apply(
            &mut s,
            Command::GrantJob {
                job: JOB.into(),
                period: 7,
                lease_epoch: 2,
                holder: 3,
                holder_epoch: e3,
                at: 2 * PERIOD,
            },
        ));
        assert!(why.contains("that time is in period 2"), "{why}");
        // Never an older period than the current lease's.
        assert!(rejected(grant(&mut s, 0, 3)).contains("older than its current lease's period 1"));
        // Unknown job.
        let why = rejected(apply(
            &mut s,
            Command::GrantJob {
                job: "nope".into(),
                period: 2,
                lease_epoch: 1,
                holder: 3,
                holder_epoch: e3,
                at: 2 * PERIOD,
            },
        ));
        assert_eq!(why, "job \"nope\" is not declared");
        // Ineligible holders: an arbiter, an impaired node, a node whose
        // record is not perfect long enough, a draining node, a stale epoch.
        assert!(rejected(grant(&mut s, 2, 5)).contains("arbiter"));
        set_health(&mut s, 4, false, 15_000);
        assert!(rejected(grant(&mut s, 2, 4)).contains("impaired: memory known-answer"));
        set_health(&mut s, 4, true, 16_000);
        let why = rejected(grant(&mut s, 2, 4));
        assert!(
            why.contains("perfect health record only for 4010 ms"),
            "{why}"
        );
        apply(
            &mut s,
            Command::Drain {
                node: 3,
                drain: true,
                at: 1,
            },
        );
        assert!(rejected(grant(&mut s, 2, 3)).contains("draining"));
        let old = s.members[&2].epoch;
        apply(&mut s, Command::Join { node: 2, at: 1 });
        let why = rejected(grant_epoch_as(&mut s, 2, 2, old));
        assert!(why.contains("superseded"), "{why}");
        // Node 1 is fine; the epochs never went backwards on refusals.
        assert_eq!(grant(&mut s, 2, 1), Response::Ok);
        assert_eq!(lease(&s).lease_epoch, 2);
    }

    fn grant_epoch_as(
        s: &mut ClusterState,
        period: u64,
        holder: NodeId,
        holder_epoch: Epoch,
    ) -> Response {
        let lease_epoch = s.jobs.jobs[JOB].last_lease_epoch + 1;
        apply(
            s,
            Command::GrantJob {
                job: JOB.into(),
                period,
                lease_epoch,
                holder,
                holder_epoch,
                at: period * PERIOD + 10,
            },
        )
    }

    #[test]
    fn a_fenced_holder_is_taken_over_and_its_token_goes_stale() {
        let mut s = cluster(5);
        assert_eq!(grant(&mut s, 17, 2), Response::Ok);
        let old = lease(&s);
        // Node 2's epoch is revoked mid-period: the period is granted again.
        let e2 = s.members[&2].epoch;
        let r = apply(
            &mut s,
            Command::Remove {
                node: 2,
                epoch: e2,
                reason: "lease lapsed and 3 of 3 eligible probes failed".into(),
                at: 17 * PERIOD + 2_000,
            },
        );
        assert_eq!(r, Response::Ok);
        assert!(
            s.job_lease_for(2, JOB).is_some(),
            "it still names node 2 until taken over"
        );
        assert_eq!(grant(&mut s, 17, 3), Response::Ok);
        let new = lease(&s);
        assert_eq!((new.period, new.lease_epoch, new.holder), (17, 2, 3));
        let ev = s.events.back().expect("event");
        assert!(
            ev.detail.contains("takes over from node 2"),
            "{}",
            ev.detail
        );
        assert!(ev.detail.contains("revoked"), "{}", ev.detail);
        // The paused old holder wakes up and presents its token.
        let why = rejected(commit(&mut s, &old, 17 * PERIOD + 5_000));
        assert_eq!(
            why,
            "stale job token: lease epoch 1 for period 17 of job stats superseded by 2"
        );
        assert_eq!(commit(&mut s, &new, 17 * PERIOD + 6_000), Response::Ok);
        let why = rejected(commit(&mut s, &old, 17 * PERIOD + 7_000));
        assert_eq!(
            why,
            "period 17 of job stats already committed by node 3 (lease epoch 2)"
        );
        // An uncommitted period superseded by the next period's lease.
        assert_eq!(grant(&mut s, 18, 3), Response::Ok);
        let p18 = lease(&s);
        assert_eq!(grant(&mut s, 19, 4), Response::Ok);
        let why = rejected(commit(&mut s, &p18, 19 * PERIOD + 1));
        assert_eq!(
            why,
            "stale job token: lease epoch 3 for period 18 of job stats superseded by lease epoch 4 for period 19"
        );
        assert!(s.jobs.jobs[JOB].committed(18).is_none());
    }

    #[test]
    fn only_a_current_healthy_holder_with_the_exact_token_commits() {
        let mut s = cluster(5);
        assert_eq!(grant(&mut s, 1, 2), Response::Ok);
        let l = lease(&s);
        // A forged or confused token: right lease epoch, another holder.
        let mut forged = l.clone();
        forged.holder = 3;
        forged.holder_epoch = s.members[&3].epoch;
        assert!(rejected(commit(&mut s, &forged, PERIOD + 1)).contains("held by node 2"));
        // A token never granted.
        let mut future = l.clone();
        future.lease_epoch = 9;
        assert!(rejected(commit(&mut s, &future, PERIOD + 1)).contains("never granted"));
        // The holder restarted (new epoch): its old process's token is stale.
        apply(
            &mut s,
            Command::Join {
                node: 2,
                at: PERIOD + 2,
            },
        );
        let why = rejected(commit(&mut s, &l, PERIOD + 3));
        assert!(
            why.starts_with("stale job token") && why.contains("superseded"),
            "{why}"
        );
        // An impaired holder loses the lease and cannot commit.
        assert_eq!(grant(&mut s, 1, 3), Response::Ok);
        let l3 = lease(&s);
        set_health(&mut s, 3, false, PERIOD + 4);
        let why = rejected(commit(&mut s, &l3, PERIOD + 5));
        assert!(why.contains("no longer binds: node 3 is impaired"), "{why}");
        // Unknown job.
        let mut unknown = l3.clone();
        unknown.job = "nope".into();
        assert_eq!(
            rejected(commit(&mut s, &unknown, PERIOD + 6)),
            "job \"nope\" is not declared"
        );
        assert!(s.jobs.jobs[JOB].commits.is_empty());
        // A commit after the deadline is accepted but marked late.
        assert_eq!(grant(&mut s, 1, 4), Response::Ok);
        let l = lease(&s);
        assert_eq!(commit(&mut s, &l, PERIOD + DUE + 250), Response::Ok);
        assert!(s.jobs.jobs[JOB].committed(1).expect("committed").late);
        assert!(s
            .events
            .back()
            .expect("event")
            .detail
            .contains("LATE by 250 ms"));
    }

    #[test]
    fn history_epochs_and_summaries_are_bounded() {
        let mut s = cluster(4);
        let long = "é".repeat(MAX_JOB_SUMMARY);
        let mut last = 0;
        for p in 0..(MAX_JOB_HISTORY as u64 + 10) {
            assert_eq!(grant(&mut s, p, 1 + p % 3), Response::Ok);
            let l = lease(&s);
            assert!(l.lease_epoch > last, "lease epochs only grow");
            last = l.lease_epoch;
            assert_eq!(
                apply(&mut s, l.commit(long.clone(), p * PERIOD + 1)),
                Response::Ok
            );
        }
        let j = &s.jobs.jobs[JOB];
        assert_eq!(j.commits.len(), MAX_JOB_HISTORY);
        assert_eq!(j.commits.keys().next(), Some(&10));
        assert!(j
            .commits
            .values()
            .all(|c| c.summary.len() <= MAX_JOB_SUMMARY));
        // Dropped and declared again: a fresh history, but lease epochs
        // continue above every epoch ever issued.
        for jobs in [vec![], vec![JobSpec::new(JOB, PERIOD, DUE)]] {
            assert_eq!(
                apply(&mut s, Command::DeclareJobs { jobs, at: 1 }),
                Response::Ok
            );
        }
        assert!(s.jobs.jobs[JOB].commits.is_empty());
        assert_eq!(grant(&mut s, 0, 1), Response::Ok);
        assert_eq!(lease(&s).lease_epoch, last + 1);
    }

    /// The coordinator: grants early in the period, rotates, takes over
    /// from a removed holder, never picks an arbiter or an impaired node,
    /// and reports unassigned and overdue periods once.
    #[test]
    fn the_coordinator_grants_takes_over_and_reports() {
        let mut s = cluster(5);
        set_health(&mut s, 4, false, 1);
        let mut c = Coordinator::new(1, 1, 0);
        let step = |c: &mut Coordinator, s: &mut ClusterState, now: Millis| {
            for n in 1..=5 {
                let h = if n == 4 {
                    Health::Impaired("memory known-answer check failed".into())
                } else {
                    Health::Healthy
                };
                c.on_heartbeat(now, n, s.members[&n].epoch, h);
            }
            let out = c.tick(now, s);
            let jobs: Vec<Command> = out
                .iter()
                .filter(|c| {
                    matches!(
                        c,
                        Command::GrantJob { .. }
                            | Command::JobUnassigned { .. }
                            | Command::JobOverdue { .. }
                    )
                })
                .cloned()
                .collect();
            crate::testkit::run(s, out);
            jobs
        };
        let mut holders = BTreeSet::new();
        for p in 1..=12u64 {
            let start = p * PERIOD;
            let out = step(&mut c, &mut s, start + 50);
            assert!(
                matches!(&out[..], [Command::GrantJob { period, .. }] if *period == p),
                "{out:?}"
            );
            assert!(
                step(&mut c, &mut s, start + 100).is_empty(),
                "the lease binds"
            );
            let l = lease(&s);
            assert!(
                ![4, 5].contains(&l.holder),
                "period {p} granted to node {}",
                l.holder
            );
            holders.insert(l.holder);
            assert_eq!(commit(&mut s, &l, start + 1_000), Response::Ok);
            assert!(step(&mut c, &mut s, start + 1_100).is_empty(), "committed");
        }
        // It rotates, and not onto the coordinator while others are eligible.
        assert_eq!(s.leader, Some(1));
        assert_eq!(holders, [2, 3].into_iter().collect(), "the job rotates");
        // A holder removed mid-period is replaced at the next tick.
        let p = 13;
        step(&mut c, &mut s, p * PERIOD + 50);
        let first = lease(&s);
        let e = s.members[&first.holder].epoch;
        let remove = Command::Remove {
            node: first.holder,
            epoch: e,
            reason: "test".into(),
            at: p * PERIOD + 3_000,
        };
        assert_eq!(apply(&mut s, remove), Response::Ok);
        let out = step(&mut c, &mut s, p * PERIOD + 3_050);
        assert!(matches!(&out[..], [Command::GrantJob { .. }]), "{out:?}");
        let second = lease(&s);
        assert_eq!(second.period, p);
        assert!(second.lease_epoch > first.lease_epoch);
        assert_ne!(second.holder, first.holder);
        // Nobody eligible (the others impaired): reported once per period,
        // then past the deadline, overdue once.
        for n in [1, 2, 3] {
            if s.members[&n].status == crate::MemberStatus::Active {
                set_health(&mut s, n, false, p * PERIOD + 3_100);
            }
        }
        let out = step(&mut c, &mut s, p * PERIOD + 3_200);
        assert!(
            matches!(&out[..], [Command::JobUnassigned { reason, .. }] if reason.contains("impaired")),
            "{out:?}"
        );
        assert!(
            step(&mut c, &mut s, p * PERIOD + 3_300).is_empty(),
            "reported once"
        );
        let out = step(&mut c, &mut s, p * PERIOD + DUE + 1);
        assert!(
            matches!(&out[..], [Command::JobOverdue { period, .. }] if *period == p),
            "{out:?}"
        );
        assert!(
            step(&mut c, &mut s, p * PERIOD + DUE + 100).is_empty(),
            "reported once"
        );
        let j = &s.jobs.jobs[JOB];
        assert_eq!((j.unassigned_periods, j.overdue_periods), (1, 1));
        assert!(s.events.iter().any(|e| e.kind == EventKind::JobOverdue
            && e.detail.contains("not committed by its deadline")));
    }
}
