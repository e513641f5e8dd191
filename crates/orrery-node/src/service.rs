//! The service API: how application code hooks the start-up stages.
//!
//! A service is told when its node starts work towards each stage and
//! returns when its part is done. While it works it says what it is doing
//! through [`StageContext`], which is what `orrery status` and the stuck-node
//! diagnosis show. This module must never block the runtime: hooks are async
//! and the context only records.

use orrery_core::{Progress, Stage, Wait};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;
use crate::config::DemoConfig;
use crate::shards::{CallCtx, CallError, ShardActor, ShardFuture, ShardService};
use orrery_core::shardmap::{KindSpec, ShardId};

/// Boxed future returned by service hooks.
pub type ServiceFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ServiceError>> + Send + 'a>>;

/// A service failed its stage work.
#[derive(Debug, thiserror::Error)]
#[error("service {service} failed at stage {stage}: {message}")]
pub struct ServiceError {
    pub service: String,
    pub stage: Stage,
    pub message: String,
}

/// Application code run by every node.
pub trait Service: Send + Sync + 'static {
    /// Short name, shown in diagnoses.
    fn name(&self) -> &str;
    /// Called when the node starts work towards `stage` (after the cluster
    /// completed the stage before it). Return when this service's part is done.
    fn on_stage<'a>(&'a self, stage: Stage, ctx: &'a StageContext) -> ServiceFuture<'a>;
    /// The service's own counters, exported in `/metrics` at scrape time
    /// (e.g. its failed calls by kind). Default: none.
    fn counters(&self) -> Vec<ServiceCounter> {
        vec![]
    }
}

/// One counter a [`Service`] exports: `orrery_{name}_total{labels}` in
/// `/metrics`. Counters of one name must share help text and label names;
/// label values must come from a bounded set (call names, error kinds),
/// never from peers' input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCounter {
    /// Without the `orrery_` prefix and the `_total` suffix, e.g.
    /// `app_call_failures`.
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

/// Boxed future of the job and console extension traits.
pub type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A job that must run exactly once per period on one healthy node (see
/// `orrery_core::jobs`): the coordinator grants each period's lease to one
/// eligible node, which runs it and commits its output with the token.
pub trait PeriodicJob: Send + Sync + 'static {
    /// Name, period and deadline; declared by the leader for the cluster.
    fn spec(&self) -> orrery_core::JobSpec;
    /// Computes the output of `run.period`. It may run again on another node
    /// (a holder that lost its lease): only the run holding the current
    /// token can commit, so it must not have other side effects.
    fn run(&self, run: JobRun) -> BoxedFuture<'_, Result<JobOutput, String>>;
}

/// One period's run of a job, with its fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRun {
    pub job: String,
    pub period: u64,
    /// The token is (period, lease_epoch).
    pub lease_epoch: u64,
    /// When the period started (ms since the Unix epoch) and its length.
    pub period_start_ms: u64,
    pub period_ms: u64,
    /// The node running it.
    pub node: orrery_core::NodeId,
}

/// What a job run produced: rows committed with the token, and one line
/// for the timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobOutput {
    pub rows: Vec<(String, Vec<u8>)>,
    pub summary: String,
}

/// Console commands a service adds under its own first word (for example
/// `universe campaigns 42`). They run with the same token, deadline and
/// bounds as the built-in ones.
pub trait ConsoleExtension: Send + Sync + 'static {
    /// The first word it owns.
    fn word(&self) -> &'static str;
    /// Usage lines, for `help`.
    fn usage(&self) -> Vec<&'static str>;
    /// Whether `args` (after the first word) would change anything.
    fn is_mutation(&self, args: &[String]) -> bool;
    /// Runs `args` (after the first word): (one-line summary, data), or an
    /// error message for the operator (nothing changed).
    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> BoxedFuture<'a, Result<(String, serde_json::Value), String>>;
}

/// What a service is doing right now, shared with the node's reporter.
#[derive(Clone, Default)]
pub struct StageContext {
    inner: Arc<Mutex<Activity>>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Activity {
    pub waiting: Option<Wait>,
    pub progress: Option<Progress>,
}

impl StageContext {
    /// The service is now at `step` (waiting on nothing outside itself).
    pub fn step(&self, service: &str, step: impl Into<String>) {
        self.wait(service, step, None, "");
    }

    /// The service waits at `step`, on `on_node` if it is another node, for `what`.
    pub fn wait(&self, service: &str, step: impl Into<String>, on_node: Option<u64>, what: &str) {
        let step = step.into();
        let mut a = self.lock();
        let same = a
            .waiting
            .as_ref()
            .is_some_and(|w| w.service == service && w.step == step && w.on_node == on_node);
        if same {
            if let Some(w) = a.waiting.as_mut() {
                w.what = what.into();
            }
        } else {
            a.waiting = Some(Wait {
                service: service.into(),
                step,
                since: now_ms(),
                on_node,
                what: what.into(),
            });
        }
    }

    /// Progress counts for the current stage's work.
    pub fn progress(&self, done: u64, total: u64) {
        self.lock().progress = Some(Progress { done, total });
    }

    pub(crate) fn clear(&self) {
        *self.lock() = Activity::default();
    }

    pub(crate) fn snapshot(&self) -> Activity {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The built-in demo service: preloads a configurable number of items at
/// stage -1, with a fault hook that hangs on one item.
pub struct DemoService {
    cfg: DemoConfig,
}

impl DemoService {
    pub fn new(cfg: DemoConfig) -> Self {
        DemoService { cfg }
    }
}

impl Service for DemoService {
    fn name(&self) -> &str {
        "demo"
    }

    fn on_stage<'a>(&'a self, stage: Stage, ctx: &'a StageContext) -> ServiceFuture<'a> {
        Box::pin(async move {
            if stage == Stage::READY {
                for i in 0..self.cfg.log_burst_lines {
                    tracing::warn!(target: "orrery::demo", line = i, "demo log burst: a noisy warning the node must shrug off");
                }
            }
            if stage != Stage::PRELOADED {
                return Ok(());
            }
            let total = self.cfg.preload_items;
            ctx.progress(0, total);
            for item in 1..=total {
                ctx.step("demo", format!("preload item {item}"));
                if item == self.cfg.hang_at_item {
                    // The fault hook: this item never finishes.
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(self.cfg.preload_item_ms)).await;
                ctx.progress(item, total);
            }
            Ok(())
        })
    }
}

/// The built-in demo shard service: kind `demo`, keys `0..shards`. Calls:
/// `ping` (echo), `incr` (a per-shard counter, returned as 8 LE bytes),
/// `sleep` (payload: milliseconds as 8 LE bytes), `relay` (payload: a
/// postcard `Vec<u64>` of keys; calls the first with the rest — a chain of
/// nested calls, which is how a wait cycle is built in tests).
pub struct DemoShards {
    shards: u64,
}

impl DemoShards {
    pub fn new(shards: u64) -> Self {
        DemoShards { shards }
    }
}

struct DemoShard {
    shard: ShardId,
    counter: u64,
}

impl ShardService for DemoShards {
    fn kinds(&self) -> Vec<KindSpec> {
        if self.shards == 0 {
            return vec![];
        }
        vec![KindSpec::new("demo", 0..self.shards)]
    }

    fn load(
        &self,
        shard: ShardId,
        _ctx: CallCtx,
    ) -> ShardFuture<'_, Result<Box<dyn ShardActor>, CallError>> {
        Box::pin(
            async move { Ok(Box::new(DemoShard { shard, counter: 0 }) as Box<dyn ShardActor>) },
        )
    }
}

impl ShardActor for DemoShard {
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            match call {
                "ping" => Ok(payload),
                "incr" => {
                    self.counter += 1;
                    Ok(self.counter.to_le_bytes().to_vec())
                }
                "sleep" => {
                    let ms = payload
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                    Ok(vec![])
                }
                "relay" => {
                    let route: Vec<u64> = postcard::from_bytes(&payload)
                        .map_err(|e| CallError::Handler(format!("relay payload: {e}")))?;
                    let Some((next, rest)) = route.split_first() else {
                        return Ok(vec![]);
                    };
                    let rest =
                        postcard::to_stdvec(rest).map_err(|e| CallError::Handler(e.to_string()))?;
                    let target = ShardId {
                        kind: self.shard.kind,
                        key: *next,
                    };
                    ctx.call(target, "relay", rest).await
                }
                other => Err(CallError::UnknownCall {
                    kind: "demo".into(),
                    call: other.into(),
                }),
            }
        })
    }
}

/// The demo job's name.
pub const DEMO_JOB: &str = "demo-stats";

/// The built-in demo per-period job `demo-stats` (on when
/// `demo.job_period_ms` > 0): each run writes one row, key `run`, value the
/// JSON `{"node", "period", "lease_epoch"}` of the run, after working
/// `demo.job_work_ms` (the fault hook that lets a test kill a holder
/// mid-run).
pub struct DemoStatsJob {
    spec: orrery_core::JobSpec,
    work_ms: u64,
}

impl DemoStatsJob {
    /// The demo job, if `cfg` enables it.
    pub fn new(cfg: &DemoConfig) -> Option<Self> {
        Some(DemoStatsJob {
            spec: cfg.job_spec()?,
            work_ms: cfg.job_work_ms,
        })
    }
}

impl PeriodicJob for DemoStatsJob {
    fn spec(&self) -> orrery_core::JobSpec {
        self.spec.clone()
    }

    fn run(&self, run: JobRun) -> BoxedFuture<'_, Result<JobOutput, String>> {
        Box::pin(async move {
            if self.work_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.work_ms)).await;
            }
            let value = serde_json::json!({
                "node": run.node,
                "period": run.period,
                "lease_epoch": run.lease_epoch,
            });
            Ok(JobOutput {
                rows: vec![("run".to_string(), value.to_string().into_bytes())],
                summary: format!("1 row by node {}", run.node),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_demo_job_writes_one_row_naming_its_token() {
        let mut cfg = DemoConfig::default();
        assert!(DemoStatsJob::new(&cfg).is_none(), "off by default");
        cfg.job_period_ms = 2_000;
        cfg.job_deadline_ms = 1_800;
        let job = DemoStatsJob::new(&cfg).expect("on");
        assert_eq!(
            job.spec(),
            orrery_core::JobSpec::new(DEMO_JOB, 2_000, 1_800)
        );
        let out = job
            .run(JobRun {
                job: DEMO_JOB.into(),
                period: 12,
                lease_epoch: 5,
                period_start_ms: 24_000,
                period_ms: 2_000,
                node: 3,
            })
            .await
            .expect("runs");
        assert_eq!(out.rows.len(), 1);
        assert_eq!(out.rows[0].0, "run");
        let v: serde_json::Value = serde_json::from_slice(&out.rows[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"node": 3, "period": 12, "lease_epoch": 5})
        );
    }
}
