//! The node's watchdog: how late its event loop runs, which handlers are in
//! flight and for how long, and who is to blame when the loop stalls.
//!
//! In the post-mortem a logging channel slowed nodes until they timed out of
//! the cluster, and nobody could see it from inside. Here every node
//! measures its own event-loop lag continuously (a ticker task on the
//! runtime records how late each tick wakes) and keeps a registry of the
//! handlers in flight (RPCs, shard calls, console commands). A monitor on an
//! OS thread of its own (so it still runs when every runtime worker is
//! blocked) looks at both; when the loop has not ticked for longer than
//! `lag_alarm_ms`, or a handler has run longer than `blocked_handler_ms`, it
//! names the culprit (the oldest handler in flight), logs it, and raises an
//! alarm that the node records in the cluster's timeline.
//!
//! What it must never do: take a lock across an await or a blocking call,
//! grow without bound (the sample window, the in-flight registry and the
//! alarm queue are all bounded), or change membership (an alarm is news,
//! not a verdict: the health checks and the failure detector decide).

use orrery_core::Millis;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

const LOG: &str = "orrery::watchdog";

/// `[watchdog]`: every bound has a key and a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// How often the ticker wakes to measure lag. Default 50 (each wake-up
    /// costs every node process, hundreds of them on one machine).
    pub tick_ms: u64,
    /// Event-loop lag (or a loop silent this long) that raises an alarm
    /// naming the culprit. Default 100.
    pub lag_alarm_ms: u64,
    /// A handler in flight this long is reported as blocked. Default 1000.
    pub blocked_handler_ms: u64,
    /// Lag samples kept for percentiles. Default 2048.
    pub window: usize,
    /// At most one alarm per this interval goes to the cluster timeline
    /// (the log gets each one, at the same bound). Default 10000.
    pub alarm_interval_ms: u64,
    /// Handlers tracked at once; beyond this they run untracked (counted).
    /// Default 4096.
    pub max_tracked: usize,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            tick_ms: 50,
            lag_alarm_ms: 100,
            blocked_handler_ms: 1_000,
            window: 2_048,
            alarm_interval_ms: 10_000,
            max_tracked: 4_096,
        }
    }
}

impl WatchdogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 || self.tick_ms > 1_000 {
            return Err("watchdog.tick_ms must be in 1..=1000".into());
        }
        if self.lag_alarm_ms <= self.tick_ms {
            return Err("watchdog.lag_alarm_ms must exceed watchdog.tick_ms".into());
        }
        if self.blocked_handler_ms == 0 {
            return Err("watchdog.blocked_handler_ms must be positive".into());
        }
        if !(16..=1_000_000).contains(&self.window) {
            return Err("watchdog.window must be in 16..=1000000".into());
        }
        if !(1..=1_000_000).contains(&self.max_tracked) {
            return Err("watchdog.max_tracked must be in 1..=1000000".into());
        }
        Ok(())
    }
}

/// A handler in flight.
struct InFlight {
    what: String,
    since: Instant,
}

/// What a long-lived task of the node is doing now.
struct Doing {
    doing: String,
    since: Instant,
}

#[derive(Default)]
struct Lag {
    /// Recent lag samples in microseconds, oldest first.
    samples: VecDeque<u64>,
    max_us: u64,
    ticks: u64,
    /// Ticks that woke later than `lag_alarm_ms`.
    late_ticks: u64,
}

/// One alarm, as raised.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Alarm {
    pub at_ms: Millis,
    pub what: String,
}

/// The watchdog of one node. Cheap to share (`Arc`).
pub struct Watchdog {
    cfg: WatchdogConfig,
    origin: Instant,
    /// When the ticker last ran, in ms since `origin`.
    last_tick_ms: AtomicU64,
    lag: Mutex<Lag>,
    /// Every tick's lag since start, in seconds, for `/metrics`
    /// (`orrery_event_loop_lag_seconds`, a histogram).
    lag_seconds: Histogram,
    next_id: AtomicU64,
    in_flight: Mutex<BTreeMap<u64, InFlight>>,
    untracked: AtomicU64,
    tasks: Mutex<BTreeMap<&'static str, Doing>>,
    last_alarm: Mutex<Option<Alarm>>,
    /// When an alarm was last raised, in ms since `origin` (0: never).
    last_alarm_ms: AtomicU64,
    alarms: AtomicU64,
    /// Alarms waiting to be recorded in the timeline (bounded).
    outbox: Mutex<VecDeque<Alarm>>,
    stopped: AtomicBool,
}

/// Alarms waiting for the node to record them; older ones are dropped.
const OUTBOX: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes its handler from the registry when dropped.
pub struct HandlerGuard {
    dog: Arc<Watchdog>,
    id: Option<u64>,
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.dog.in_flight).remove(&id);
        }
    }
}

/// A copy of what the watchdog knows (console `tasks`, `GET /tasks`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchdogReport {
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_samples: usize,
    pub ticks: u64,
    pub late_ticks: u64,
    /// How long ago the ticker last ran.
    pub since_last_tick_ms: u64,
    /// Handlers in flight, longest-running first (at most 20).
    pub in_flight: Vec<Running>,
    pub in_flight_total: usize,
    pub untracked: u64,
    /// The node's long-lived tasks and what each is doing.
    pub tasks: Vec<Running>,
    pub alarms: u64,
    pub last_alarm: Option<Alarm>,
    pub runtime: Option<RuntimeReport>,
}

/// One handler or task, and for how long it has been at it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Running {
    pub what: String,
    pub for_ms: u64,
}

/// The async runtime's own counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuntimeReport {
    pub workers: usize,
    pub alive_tasks: usize,
    pub global_queue_depth: usize,
}

impl Watchdog {
    pub fn new(cfg: WatchdogConfig) -> Arc<Watchdog> {
        Self::with_origin(cfg, Instant::now())
    }

    fn with_origin(cfg: WatchdogConfig, origin: Instant) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            cfg,
            origin,
            last_tick_ms: AtomicU64::new(0),
            lag: Mutex::new(Lag::default()),
            lag_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            next_id: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeMap::new()),
            untracked: AtomicU64::new(0),
            tasks: Mutex::new(BTreeMap::new()),
            last_alarm: Mutex::new(None),
            last_alarm_ms: AtomicU64::new(0),
            alarms: AtomicU64::new(0),
            outbox: Mutex::new(VecDeque::new()),
            stopped: AtomicBool::new(false),
        })
    }

    /// The lag of every tick since start (0.5 ms .. 4 s buckets); clones
    /// share the counts.
    pub fn lag_histogram(&self) -> Histogram {
        self.lag_seconds.clone()
    }

    pub fn config(&self) -> &WatchdogConfig {
        &self.cfg
    }

    fn elapsed_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Registers a handler in flight until the guard drops.
    pub fn begin(self: &Arc<Self>, what: impl Into<String>) -> HandlerGuard {
        let mut map = lock(&self.in_flight);
        if map.len() >= self.cfg.max_tracked {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return HandlerGuard {
                dog: self.clone(),
                id: None,
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        map.insert(
            id,
            InFlight {
                what: what.into(),
                since: Instant::now(),
            },
        );
        HandlerGuard {
            dog: self.clone(),
            id: Some(id),
        }
    }

    /// Records what a long-lived task is doing now.
    pub fn set_doing(&self, task: &'static str, doing: impl Into<String>) {
        lock(&self.tasks).insert(
            task,
            Doing {
                doing: doing.into(),
                since: Instant::now(),
            },
        );
    }

    /// One ticker sample: the tick meant for `expected` ran at `now`.
    fn record_tick(&self, expected: Instant, now: Instant) {
        let lag = now.saturating_duration_since(expected);
        let lag_us = lag.as_micros() as u64;
        self.lag_seconds.observe(lag.as_secs_f64());
        self.last_tick_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
        let mut l = lock(&self.lag);
        if l.samples.len() == self.cfg.window {
            l.samples.pop_front();
        }
        l.samples.push_back(lag_us);
        l.max_us = l.max_us.max(lag_us);
        l.ticks += 1;
        if lag_us > self.cfg.lag_alarm_ms * 1_000 {
            l.late_ticks += 1;
        }
        debug_assert!(l.samples.len() <= self.cfg.window);
    }

    /// The oldest handler in flight and its age.
    fn oldest(&self, now: Instant) -> Option<(String, u64)> {
        lock(&self.in_flight)
            .values()
            .min_by_key(|f| f.since)
            .map(|f| {
                (
                    f.what.clone(),
                    now.saturating_duration_since(f.since).as_millis() as u64,
                )
            })
    }

    /// One look by the monitor: returns the alarm raised, if any.
    pub fn check(&self, now_wall_ms: Millis) -> Option<Alarm> {
        let now = Instant::now();
        let silent_ms = self
            .elapsed_ms()
            .saturating_sub(self.last_tick_ms.load(Ordering::Relaxed));
        let oldest = self.oldest(now);
        let what = if silent_ms > self.cfg.lag_alarm_ms {
            let culprit = match &oldest {
                Some((w, age)) => format!("culprit: {w} (running {age} ms)"),
                None => "no handler in flight: an untracked task blocked the runtime".into(),
            };
            format!("event loop stalled for {silent_ms} ms; {culprit}")
        } else {
            match &oldest {
                Some((w, age)) if *age > self.cfg.blocked_handler_ms => {
                    format!("handler blocked for {age} ms: {w}")
                }
                _ => return None,
            }
        };
        self.raise(now_wall_ms, what)
    }

    /// Raises an alarm unless one was raised within `alarm_interval_ms`.
    pub fn raise(&self, now_wall_ms: Millis, what: String) -> Option<Alarm> {
        let now = self.elapsed_ms().max(1);
        let last = self.last_alarm_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.cfg.alarm_interval_ms {
            return None;
        }
        self.last_alarm_ms.store(now, Ordering::Relaxed);
        self.alarms.fetch_add(1, Ordering::Relaxed);
        let alarm = Alarm {
            at_ms: now_wall_ms,
            what,
        };
        tracing::warn!(target: LOG, "alarm: {}", alarm.what);
        *lock(&self.last_alarm) = Some(alarm.clone());
        let mut out = lock(&self.outbox);
        if out.len() == OUTBOX {
            out.pop_front();
        }
        out.push_back(alarm.clone());
        Some(alarm)
    }

    /// Puts back an alarm that could not be recorded (it goes first; when
    /// the outbox is full the newest wait, the oldest is kept).
    pub fn requeue(&self, alarm: Alarm) {
        let mut out = lock(&self.outbox);
        if out.len() < OUTBOX {
            out.push_front(alarm);
        }
    }

    /// Alarms not yet recorded in the timeline (taken out).
    pub fn take_alarms(&self) -> Vec<Alarm> {
        lock(&self.outbox).drain(..).collect()
    }

    pub fn report(&self) -> WatchdogReport {
        let now = Instant::now();
        let (p50, p99, max, samples, ticks, late) = {
            let l = lock(&self.lag);
            let mut v: Vec<u64> = l.samples.iter().copied().collect();
            v.sort_unstable();
            let pct = |p: f64| -> f64 {
                if v.is_empty() {
                    return 0.0;
                }
                let i = ((v.len() as f64 - 1.0) * p).round() as usize;
                v[i.min(v.len() - 1)] as f64 / 1000.0
            };
            (
                pct(0.50),
                pct(0.99),
                l.max_us as f64 / 1000.0,
                v.len(),
                l.ticks,
                l.late_ticks,
            )
        };
        let (mut in_flight, in_flight_total) = {
            let map = lock(&self.in_flight);
            let v: Vec<Running> = map
                .values()
                .map(|f| Running {
                    what: f.what.clone(),
                    for_ms: now.saturating_duration_since(f.since).as_millis() as u64,
                })
                .collect();
            (v, map.len())
        };
        in_flight.sort_by_key(|r| std::cmp::Reverse(r.for_ms));
        in_flight.truncate(20);
        let tasks = lock(&self.tasks)
            .iter()
            .map(|(task, d)| Running {
                what: format!("{task}: {}", d.doing),
                for_ms: now.saturating_duration_since(d.since).as_millis() as u64,
            })
            .collect();
        let runtime = tokio::runtime::Handle::try_current().ok().map(|h| {
            let m = h.metrics();
            RuntimeReport {
                workers: m.num_workers(),
                alive_tasks: m.num_alive_tasks(),
                global_queue_depth: m.global_queue_depth(),
            }
        });
        WatchdogReport {
            lag_p50_ms: p50,
            lag_p99_ms: p99,
            lag_max_ms: max,
            lag_samples: samples,
            ticks,
            late_ticks: late,
            since_last_tick_ms: self
                .elapsed_ms()
                .saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)),
            in_flight,
            in_flight_total,
            untracked: self.untracked.load(Ordering::Relaxed),
            tasks,
            alarms: self.alarms.load(Ordering::Relaxed),
            last_alarm: lock(&self.last_alarm).clone(),
            runtime,
        }
    }

    /// Starts the ticker on the current runtime and the monitor thread.
    /// Both stop when `stop` is cancelled.
    pub fn spawn(self: &Arc<Self>, stop: orrery_wire::CancellationToken, wall_ms: fn() -> Millis) {
        let tick = Duration::from_millis(self.cfg.tick_ms);
        self.last_tick_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
        let dog = self.clone();
        let ticker_stop = stop.clone();
        tokio::spawn(async move {
            let mut expected = Instant::now() + tick;
            loop {
                tokio::select! {
                    _ = ticker_stop.cancelled() => break,
                    _ = tokio::time::sleep_until(expected) => {}
                }
                let now = Instant::now();
                dog.record_tick(expected, now);
                expected = now + tick;
            }
            dog.stopped.store(true, Ordering::Relaxed);
        });
        let dog = self.clone();
        let every = tick * 5;
        let spawned = std::thread::Builder::new()
            .name("orrery-watchdog".into())
            .spawn(move || {
                while !stop.is_cancelled() && !dog.stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    dog.check(wall_ms());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(target: LOG, "cannot start the watchdog thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(alarm_interval_ms: u64) -> WatchdogConfig {
        WatchdogConfig {
            blocked_handler_ms: 20,
            lag_alarm_ms: 20,
            tick_ms: 5,
            alarm_interval_ms,
            window: 16,
            max_tracked: 2,
        }
    }

    fn dog(alarm_interval_ms: u64) -> Arc<Watchdog> {
        Watchdog::new(cfg(alarm_interval_ms))
    }

    #[test]
    fn names_the_oldest_handler_when_it_blocks() {
        let d = dog(0);
        // The ticker has just run: only the blocked handler can alarm.
        d.record_tick(Instant::now(), Instant::now());
        let _young = d.begin("rpc Ping from node 2");
        let old = d.begin("shard demo/7 call sleep");
        lock(&d.in_flight)
            .values_mut()
            .find(|f| f.what.contains("demo/7"))
            .unwrap()
            .since = Instant::now() - Duration::from_millis(500);
        let a = d.check(1).expect("an alarm");
        assert!(a.what.contains("shard demo/7 call sleep"), "{}", a.what);
        assert_eq!(d.take_alarms(), vec![a]);
        drop(old);
        assert!(d.check(2).is_none(), "nothing blocked any more");
    }

    #[test]
    fn a_silent_loop_is_a_stall_with_the_culprit() {
        // The ticker last ran at the origin, 200 ms ago: the loop is silent.
        let d = Watchdog::with_origin(cfg(0), Instant::now() - Duration::from_millis(200));
        let _g = d.begin("console: fault block-loop 300");
        let a = d.check(1).expect("a stall alarm");
        assert!(a.what.starts_with("event loop stalled"), "{}", a.what);
        assert!(a.what.contains("fault block-loop"), "{}", a.what);
    }

    #[test]
    fn alarms_are_rate_limited_and_the_registry_is_bounded() {
        let d = dog(60_000);
        assert!(d.raise(1, "first".into()).is_some());
        assert!(d.raise(2, "second".into()).is_none());
        assert_eq!(d.report().alarms, 1);
        let _a = d.begin("a");
        let _b = d.begin("b");
        let _c = d.begin("c");
        let r = d.report();
        assert_eq!(r.in_flight_total, 2);
        assert_eq!(r.untracked, 1);
    }

    #[test]
    fn lag_percentiles_come_from_a_bounded_window() {
        let d = dog(0);
        let t0 = Instant::now();
        for i in 0..100u64 {
            d.record_tick(t0, t0 + Duration::from_millis(i));
        }
        let r = d.report();
        assert_eq!(r.lag_samples, 16);
        assert_eq!(r.ticks, 100);
        assert!((r.lag_max_ms - 99.0).abs() < 0.01);
        assert!(r.lag_p50_ms >= 84.0, "{r:?}");
        assert!(r.late_ticks > 0);
    }
}
