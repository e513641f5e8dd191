//! The node's side of per-period singleton jobs (see `orrery_core::jobs`):
//! running the periods this process holds a lease for, and committing their
//! output with the lease's fencing token.
//!
//! What this module owns:
//! - the inbox of held leases: the leader's heartbeat acknowledgement lists
//!   the uncommitted leases the node holds under the epoch it heartbeats
//!   with (`lease.rs` puts them here), so a worker learns of a grant within
//!   about one heartbeat interval;
//! - the runner task: for each lease held under *this process's* epoch that
//!   it has not started, one run: `Store::fence_job` with the token, the
//!   job's `run` bounded by the period's deadline, `Store::commit_job` with
//!   the token, then `Command::CommitJob` through the leader;
//! - the bookkeeping ([`Runs`]): at most one run per token (job, period,
//!   lease epoch), remembered as one high-water token per local job, so its
//!   memory is bounded by the number of jobs the services define;
//! - the counters ([`JobStats`], shown in `NodeStatus` and `/metrics`).
//!
//! What it must never do: decide who runs a period (the coordinator grants
//! leases), run a lease granted to another process of this node (an older
//! or newer epoch), start a second run for a token it already ran, retry a
//! fenced store write (`StaleToken` and `AlreadyCommitted` are answers: a
//! stale holder gives up, counts it and logs it at info), write to the store
//! while this node is not serving (lease not fresh, fenced, or impaired), or
//! block the event loop (store calls go through `spawn_blocking`).

use crate::clock::now_ms;
use crate::node::Inner;
use crate::service::{JobRun, PeriodicJob};
use orrery_core::{Command, JobLease, JobSpec, Rejection, Response};
use orrery_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

const LOG: &str = "orrery::jobs";

/// What the job runner did since the process started (`NodeStatus::jobs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobStats {
    /// Runs started (one per token this process held).
    pub started: u64,
    /// Runs whose output the store and the control plane both accepted.
    pub committed: u64,
    /// Runs refused as a stale holder: the store said `StaleToken` or
    /// `AlreadyCommitted`, or the control plane rejected the commit, or the
    /// lease was lost (not serving, fenced, impaired) before the commit.
    pub refused_stale: u64,
    /// Runs that failed: the job returned an error, missed its deadline,
    /// or the store or control plane failed otherwise.
    pub failed: u64,
    /// Leases not run at all: learnt after the period was over.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    committed: AtomicU64,
    refused_stale: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

/// Which tokens this process has started, as one high-water token
/// (period, lease epoch) per job. Lease epochs of a job only grow and are
/// never reused, so a token at or below the high water was started already
/// (or superseded before it arrived). Only jobs this node defines are
/// remembered, so the map holds at most that many entries.
#[derive(Debug)]
pub(crate) struct Runs {
    /// The jobs this node can run.
    known: Vec<String>,
    /// Per job: the newest token started.
    started: BTreeMap<String, (u64, u64)>,
}

impl Runs {
    pub(crate) fn new(known: impl IntoIterator<Item = String>) -> Self {
        Runs {
            known: known.into_iter().collect(),
            started: BTreeMap::new(),
        }
    }

    /// Whether to start a run for `lease` now: the job is one of ours and
    /// its token is newer than every token of that job started before. A
    /// `true` answer records the token, so the same token is never started
    /// twice.
    pub(crate) fn admit(&mut self, lease: &JobLease) -> bool {
        if !self.known.contains(&lease.job) {
            return false;
        }
        let token = (lease.period, lease.lease_epoch);
        match self.started.get(&lease.job) {
            Some(&(_, epoch)) if lease.lease_epoch <= epoch => false,
            _ => {
                self.started.insert(lease.job.clone(), token);
                true
            }
        }
    }

    /// Jobs remembered (at most the number of jobs this node defines).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.started.len()
    }
}

/// The held leases, as the latest heartbeat acknowledgement listed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Held {
    /// The epoch the heartbeat was sent under.
    epoch: u64,
    leases: Vec<JobLease>,
}

/// The node's job runner: inbox, bookkeeping, counters.
pub(crate) struct JobRunner {
    jobs: Vec<Arc<dyn PeriodicJob>>,
    /// The jobs' specs, in name order (what the leader declares).
    specs: Vec<JobSpec>,
    store: Option<Arc<dyn Store>>,
    held: tokio::sync::watch::Sender<Held>,
    runs: Mutex<Runs>,
    counters: Counters,
}

impl JobRunner {
    pub(crate) fn new(jobs: Vec<Arc<dyn PeriodicJob>>, store: Option<Arc<dyn Store>>) -> Self {
        let mut specs: Vec<JobSpec> = jobs.iter().map(|j| j.spec()).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let runs = Runs::new(specs.iter().map(|s| s.name.clone()));
        JobRunner {
            jobs,
            specs,
            store,
            held: tokio::sync::watch::channel(Held::default()).0,
            runs: Mutex::new(runs),
            counters: Counters::default(),
        }
    }

    /// The specs of the jobs this node's services define, in name order.
    pub(crate) fn specs(&self) -> &[JobSpec] {
        &self.specs
    }

    /// From the heartbeat thread: the leases the leader says this node
    /// holds under `epoch`. Wakes the runner only when they changed.
    pub(crate) fn offer(&self, epoch: u64, leases: Vec<JobLease>) {
        let next = Held { epoch, leases };
        self.held.send_if_modified(|h| {
            if *h == next {
                false
            } else {
                *h = next;
                true
            }
        });
    }

    pub(crate) fn stats(&self) -> JobStats {
        let c = &self.counters;
        JobStats {
            started: c.started.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            refused_stale: c.refused_stale.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
        }
    }

    fn count(&self, outcome: Outcome) {
        let c = &self.counters;
        match outcome {
            Outcome::Committed => &c.committed,
            Outcome::Stale => &c.refused_stale,
            Outcome::Failed => &c.failed,
            Outcome::Skipped => &c.skipped,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    Stale,
    Failed,
    Skipped,
}

/// The runner task: starts one run per newly held token of this process.
pub(crate) async fn run(node: Arc<Inner>) {
    let mut rx = node.jobs.held.subscribe();
    // Also look again every heartbeat interval: a lease held while this
    // node could not act on it (its lease briefly not fresh) is started
    // once it can.
    let mut tick = tokio::time::interval(Duration::from_millis(
        node.cfg.membership.heartbeat_interval_ms.max(10),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let held = rx.borrow_and_update().clone();
        let epoch = node.epoch.load(Ordering::Relaxed);
        if epoch == 0 || held.epoch != epoch {
            continue;
        }
        for lease in held.leases {
            if lease.holder != node.cfg.node_id
                || lease.holder_epoch != epoch
                || still_holds(&node, &lease).is_err()
            {
                continue;
            }
            let admitted = node
                .jobs
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(&lease);
            if !admitted {
                continue;
            }
            let Some(job) = node
                .jobs
                .jobs
                .iter()
                .find(|j| j.spec().name == lease.job)
                .cloned()
            else {
                continue;
            };
            node.jobs.counters.started.fetch_add(1, Ordering::Relaxed);
            let node = node.clone();
            tokio::spawn(async move {
                let outcome = run_one(&node, job, lease).await;
                node.jobs.count(outcome);
            });
        }
    }
}

/// Whether this process may still act on `lease`: same epoch, serving
/// (ready, not fenced, lease fresh) and healthy by its own checks.
fn still_holds(node: &Inner, lease: &JobLease) -> Result<(), String> {
    let epoch = node.epoch.load(Ordering::Relaxed);
    if epoch != lease.holder_epoch {
        return Err(format!(
            "this process's epoch is {epoch}, the lease's {}",
            lease.holder_epoch
        ));
    }
    if !node.serving() {
        return Err("this node is not serving (fenced, or its lease is not fresh)".into());
    }
    if !node.health.is_healthy() {
        return Err("this node is impaired".into());
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Backend(format!("store task failed: {e}"))))
}

/// One run of one token: fence, run, commit to the store, commit to the
/// control plane.
async fn run_one(node: &Arc<Inner>, job: Arc<dyn PeriodicJob>, lease: JobLease) -> Outcome {
    let (name, period, lease_epoch) = (lease.job.clone(), lease.period, lease.lease_epoch);
    let _guard = node.watchdog.begin(format!(
        "job {name} period {period} (lease epoch {lease_epoch})"
    ));
    // The replicated declaration is what the coordinator grants by; the
    // local spec only until this node has seen it.
    let spec = node
        .local_state()
        .and_then(|s| s.jobs.jobs.get(&name).map(|j| j.spec.clone()))
        .unwrap_or_else(|| job.spec());
    let (start, due, end) = (
        spec.starts(period),
        spec.due(period),
        spec.starts(period + 1),
    );
    let now = now_ms();
    // The run is bounded by the period's deadline; a lease taken over after
    // the deadline still gets the rest of the period (late output beats none).
    let until = if now < due { due } else { end };
    if now >= until {
        info!(target: LOG, job = %name, period, lease_epoch, "lease learnt after period {period} was over: not run");
        return Outcome::Skipped;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(until - now);
    let token = format!("job {name} period {period} lease epoch {lease_epoch}");
    if let Err(why) = still_holds(node, &lease) {
        info!(target: LOG, "{token}: not run: {why}");
        return Outcome::Stale;
    }
    info!(target: LOG, "{token}: running ({} ms into the period, {} ms left)", now.saturating_sub(start), until - now);
    let store = node.jobs.store.clone();
    if let Some(store) = &store {
        let (s, j) = (store.clone(), name.clone());
        match blocking(move || s.fence_job(&j, period, lease_epoch)).await {
            Ok(()) => {}
            Err(StoreError::AlreadyCommitted { committed_by, .. })
                if committed_by < lease_epoch =>
            {
                // We hold the lease, so the control plane has no commit for
                // this period: an earlier holder wrote its output and died
                // (or was cut off) before committing it there. Adopt that
                // output as the period's commit: the one run that counts.
                warn!(target: LOG, "{token}: the store already holds this period's output under lease epoch {committed_by}, never committed to the control plane; adopting it");
                return adopt(node, &lease, &token, committed_by).await;
            }
            Err(e) if e.is_fenced() => {
                info!(target: LOG, "{token}: stale holder, not run: {e}");
                return Outcome::Stale;
            }
            Err(e) => {
                warn!(target: LOG, "{token}: cannot fence the period in the store: {e}");
                return Outcome::Failed;
            }
        }
    }
    let run = JobRun {
        job: name.clone(),
        period,
        lease_epoch,
        period_start_ms: start,
        period_ms: spec.period_ms,
        node: node.cfg.node_id,
    };
    let output = match tokio::time::timeout_at(deadline, job.run(run)).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            warn!(target: LOG, "{token}: the job failed: {e}");
            return Outcome::Failed;
        }
        Err(_) => {
            warn!(target: LOG, "{token}: the job missed its deadline ({until} ms)");
            return Outcome::Failed;
        }
    };
    // Write only while this process still holds the lease: a node that
    // self-fenced may already have been replaced.
    if let Err(why) = still_holds(node, &lease) {
        info!(target: LOG, "{token}: output dropped: {why}");
        return Outcome::Stale;
    }
    let rows = output.rows.len();
    match &store {
        Some(store) => {
            let (s, j, r) = (store.clone(), name.clone(), output.rows);
            match blocking(move || s.commit_job(&j, period, lease_epoch, &r)).await {
                Ok(()) if node.cfg.faults.job_exit_after_store_commit => {
                    // Fault hook: die inside the window between the two
                    // commits, as a crash would.
                    warn!(target: LOG, "{token}: fault hook: exiting after the store commit");
                    if let Some(log) = node.log.get() {
                        log.flush(Duration::from_secs(1));
                    }
                    std::process::exit(3);
                }
                Ok(()) => {}
                Err(e) if e.is_fenced() => {
                    info!(target: LOG, "{token}: stale holder, output refused by the store: {e}");
                    return Outcome::Stale;
                }
                Err(e) => {
                    warn!(target: LOG, "{token}: cannot commit the output to the store: {e}");
                    return Outcome::Failed;
                }
            }
        }
        None if rows > 0 => {
            warn!(target: LOG, "{token}: {rows} output rows dropped: this node has no store");
        }
        None => {}
    }
    commit(node, &lease, &token, output.summary).await
}

/// Proposes `AdoptJobCommit`: the period's output is the store's, written
/// under `stored` by a holder that died before committing it here.
async fn adopt(node: &Inner, lease: &JobLease, token: &str, stored: u64) -> Outcome {
    let cmd = Command::AdoptJobCommit {
        job: lease.job.clone(),
        period: lease.period,
        lease_epoch: lease.lease_epoch,
        holder: lease.holder,
        holder_epoch: lease.holder_epoch,
        stored_lease_epoch: stored,
        at: now_ms(),
    };
    match node.propose(cmd).await {
        Ok(Response::Ok) => {
            info!(target: LOG, "{token}: committed the stored output of lease epoch {stored}");
            Outcome::Committed
        }
        Ok(Response::Rejected { reason, .. }) => {
            info!(target: LOG, "{token}: adoption rejected: {reason}");
            Outcome::Stale
        }
        Ok(other) => {
            warn!(target: LOG, "{token}: unexpected adoption response {other:?}");
            Outcome::Failed
        }
        Err(e) => {
            warn!(target: LOG, "{token}: cannot adopt the stored output: {e}");
            Outcome::Failed
        }
    }
}

/// Proposes `CommitJob` for `lease` through the leader. A transport error
/// is retried a few times; a rejection is final (a retry that finds the
/// period committed under this very token counts as committed).
async fn commit(node: &Inner, lease: &JobLease, token: &str, summary: String) -> Outcome {
    let mut last = String::new();
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        match node.propose(lease.commit(summary.clone(), now_ms())).await {
            Ok(Response::Ok) => {
                info!(target: LOG, "{token}: committed");
                return Outcome::Committed;
            }
            Ok(Response::Rejected {
                kind: Rejection::AlreadyCommitted { lease_epoch },
                ..
            }) if attempt > 0 && lease_epoch == lease.lease_epoch => {
                info!(target: LOG, "{token}: committed (an earlier attempt landed)");
                return Outcome::Committed;
            }
            Ok(Response::Rejected { reason, .. }) => {
                info!(target: LOG, "{token}: stale holder, commit rejected: {reason}");
                return Outcome::Stale;
            }
            Ok(other) => {
                warn!(target: LOG, "{token}: unexpected commit response {other:?}");
                return Outcome::Failed;
            }
            Err(e) => {
                debug!(target: LOG, "{token}: commit attempt {attempt}: {e}");
                last = e.to_string();
            }
        }
    }
    warn!(target: LOG, "{token}: the output is in the store but the control plane could not be told: {last}");
    Outcome::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(job: &str, period: u64, lease_epoch: u64) -> JobLease {
        JobLease {
            job: job.into(),
            period,
            lease_epoch,
            holder: 1,
            holder_epoch: 7,
            granted_at: period * 1_000,
        }
    }

    #[test]
    fn one_run_per_token() {
        let mut r = Runs::new(["stats".to_string(), "rollup".to_string()]);
        assert!(r.admit(&lease("stats", 3, 10)));
        // The same token again (every heartbeat lists it until committed).
        for _ in 0..100 {
            assert!(!r.admit(&lease("stats", 3, 10)));
        }
        // Another job's token is independent.
        assert!(r.admit(&lease("rollup", 3, 11)));
        // An older token (superseded, or delivered late) is never started.
        assert!(!r.admit(&lease("stats", 3, 9)));
        assert!(!r.admit(&lease("stats", 2, 8)));
        // The same period taken back under a newer lease epoch is a new token.
        assert!(r.admit(&lease("stats", 3, 12)));
        assert!(!r.admit(&lease("stats", 3, 12)));
        // The next period.
        assert!(r.admit(&lease("stats", 4, 13)));
        // A job this node does not define is not run, and not remembered.
        assert!(!r.admit(&lease("unknown", 4, 14)));
        assert_eq!(r.remembered(), 2);
    }

    #[test]
    fn memory_is_bounded_by_the_jobs_defined() {
        let mut r = Runs::new(["stats".to_string()]);
        let mut started = 0;
        for p in 0..100_000u64 {
            // Each period is offered several times, sometimes taken over.
            for e in [2 * p + 1, 2 * p + 1, 2 * p + 2] {
                if r.admit(&lease("stats", p, e)) {
                    started += 1;
                }
                r.admit(&lease(&format!("other-{p}"), p, e));
            }
        }
        assert_eq!(started, 200_000, "one run per distinct token");
        assert_eq!(r.remembered(), 1);
    }

    #[test]
    fn the_inbox_wakes_the_runner_only_on_change() {
        let runner = JobRunner::new(vec![], None);
        let mut rx = runner.held.subscribe();
        runner.offer(7, vec![lease("stats", 1, 1)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        runner.offer(7, vec![lease("stats", 1, 1)]);
        assert!(!rx.has_changed().unwrap(), "same leases: no wake-up");
        runner.offer(8, vec![lease("stats", 1, 1)]);
        assert!(rx.has_changed().unwrap(), "another epoch");
    }
}
