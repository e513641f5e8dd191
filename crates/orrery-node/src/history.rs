//! The node's recent history for the dashboard's charts (`GET /history`):
//! a bounded ring of samples taken every [`PERIOD_MS`], the last
//! [`CAPACITY`] of them (10 minutes). Each sample holds this node's
//! event-loop lag (p99 and max), RPCs served per second and their p99
//! latency, shards loaded, and log lines dropped per second.
//!
//! The numbers come from where they are kept: the watchdog's lag window
//! ([`crate::watchdog::Watchdog::report`]), an RPC tally fed next to the
//! Prometheus counters ([`RpcTally`], in `metrics::RpcMetrics::observe`),
//! the shard host, the logging channels. Rates are deltas between two
//! readings over the wall time between them.
//!
//! [`Origins`] decides which pages may read `/history` and `/status` from
//! another node's admin port (the dashboard served by one node draws every
//! node's): exactly `http://ADMIN_ADDR` of a node in the configuration.
//!
//! What it must never do: grow (the ring, the tally and the answer are
//! bounded), block the runtime (a sample is a few locks and atomics), or
//! label anything with unbounded input.

use crate::config::NodeConfig;
use crate::node::{Inner, Node};
use orrery_core::{Millis, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a sample is taken (ms). A const, not a key: the dashboard's
/// charts assume it only to space their refreshes.
pub const PERIOD_MS: u64 = 2_000;

/// Samples kept: 300 x 2 s = the last 10 minutes. The ring never holds
/// more (about 100 bytes a sample, 30 KB a node).
pub const CAPACITY: usize = 300;

/// RPC latency buckets: upper bounds 25 µs x sqrt(2)^k, k = 0 .. 41
/// (25 µs .. ~37 s); one more for anything slower. A p99 read from them is
/// an upper bound within a factor of sqrt(2).
const BUCKETS: usize = 42;
const FIRST_BOUND_US: f64 = 25.0;

/// Upper bound of bucket `k`, in microseconds.
fn bound_us(k: usize) -> f64 {
    FIRST_BOUND_US * 2f64.powf(k as f64 / 2.0)
}

/// The bucket a latency of `us` microseconds falls in (`BUCKETS`: slower
/// than every bound).
fn bucket(us: f64) -> usize {
    if us <= FIRST_BOUND_US || us.is_nan() {
        return 0;
    }
    let k = (2.0 * (us / FIRST_BOUND_US).log2()).ceil() as usize;
    // Float rounding at a bound: step back if the bucket below holds it.
    let k = if k > 0 && us <= bound_us(k - 1) {
        k - 1
    } else {
        k
    };
    k.min(BUCKETS)
}

/// Every RPC served, all kinds together: a count, errors, and latency
/// buckets. Observing is three relaxed atomic adds.
#[derive(Debug)]
pub struct RpcTally {
    count: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS + 1],
}

impl Default for RpcTally {
    fn default() -> Self {
        RpcTally {
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RpcTally {
    pub fn observe(&self, took: Duration, error: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let b = bucket(took.as_secs_f64() * 1e6);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> RpcTotals {
        RpcTotals {
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// A reading of an [`RpcTally`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcTotals {
    pub count: u64,
    pub errors: u64,
    buckets: [u64; BUCKETS + 1],
}

impl Default for RpcTotals {
    fn default() -> Self {
        RpcTotals {
            count: 0,
            errors: 0,
            buckets: [0; BUCKETS + 1],
        }
    }
}

impl RpcTotals {
    /// The p99 latency (ms) of the RPCs served between `earlier` and this
    /// reading (an upper bound, see [`BUCKETS`]); `None` if there were none.
    pub fn p99_ms_since(&self, earlier: &RpcTotals) -> Option<f64> {
        let delta: Vec<u64> = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let n: u64 = delta.iter().sum();
        if n == 0 {
            return None;
        }
        // The smallest bucket holding at least 99% of them.
        let want = (n * 99).div_ceil(100);
        let mut seen = 0;
        for (k, d) in delta.iter().enumerate() {
            seen += d;
            if seen >= want {
                // The overflow bucket has no bound: say twice the last one.
                let us = if k == BUCKETS {
                    bound_us(BUCKETS - 1) * 2.0
                } else {
                    bound_us(k)
                };
                return Some(us / 1000.0);
            }
        }
        None
    }
}

/// One sample: what a chart point shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was taken (this node's wall clock, ms since the Unix epoch).
    pub at_ms: Millis,
    /// Event-loop lag p99 over the watchdog's window (`watchdog.window`
    /// ticks, about 20 s by default), ms.
    pub lag_p99_ms: f64,
    /// The largest lag since the previous sample, when it is a new high
    /// since the node started; otherwise the window's p99 (the watchdog
    /// keeps its maximum since start only), ms.
    pub lag_max_ms: f64,
    /// RPCs served per second since the previous sample.
    pub rpc_per_s: f64,
    /// Of which answered with an error, per second.
    pub rpc_errors_per_s: f64,
    /// p99 latency of those RPCs, ms (`None`: none were served).
    pub rpc_p99_ms: Option<f64>,
    /// Shards loaded and serving on this node.
    pub shards: u64,
    /// Log lines dropped per second since the previous sample (queue
    /// full, rate limited, no sink), all channels.
    pub log_dropped_per_s: f64,
    /// Log lines dropped since the node started.
    pub log_dropped_total: u64,
}

/// The raw numbers a sample is made from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub at_ms: Millis,
    pub lag_p99_ms: f64,
    /// The watchdog's maximum since start.
    pub lag_max_ever_ms: f64,
    pub rpc: RpcTotals,
    pub shards: u64,
    pub log_dropped: u64,
}

impl Reading {
    /// The sample of the interval from `prev` to this reading.
    pub fn sample_since(&self, prev: &Reading) -> Sample {
        let secs = self.at_ms.saturating_sub(prev.at_ms).max(1) as f64 / 1000.0;
        let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        let lag_max_ms = if self.lag_max_ever_ms > prev.lag_max_ever_ms {
            self.lag_max_ever_ms
        } else {
            self.lag_p99_ms
        };
        Sample {
            at_ms: self.at_ms,
            lag_p99_ms: self.lag_p99_ms,
            lag_max_ms: lag_max_ms.max(self.lag_p99_ms),
            rpc_per_s: per_s(self.rpc.count, prev.rpc.count),
            rpc_errors_per_s: per_s(self.rpc.errors, prev.rpc.errors),
            rpc_p99_ms: self.rpc.p99_ms_since(&prev.rpc),
            shards: self.shards,
            log_dropped_per_s: per_s(self.log_dropped, prev.log_dropped),
            log_dropped_total: self.log_dropped,
        }
    }

    /// This node's numbers now.
    pub(crate) fn of(inner: &Inner) -> Reading {
        let lag = inner.watchdog.report();
        let log_dropped = inner
            .log
            .get()
            .map(|l| {
                l.stats()
                    .channels
                    .iter()
                    .map(|c| c.dropped_queue_full + c.dropped_rate_limited + c.dropped_no_sink)
                    .sum()
            })
            .unwrap_or(0);
        Reading {
            at_ms: crate::clock::now_ms(),
            lag_p99_ms: lag.lag_p99_ms,
            lag_max_ever_ms: lag.lag_max_ms,
            rpc: inner.rpc.tally.totals(),
            shards: inner.shards.status().loaded as u64,
            log_dropped,
        }
    }
}

/// The ring of samples. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct History {
    capacity: usize,
    ring: Mutex<VecDeque<Sample>>,
}

impl Default for History {
    fn default() -> Self {
        History::new(CAPACITY)
    }
}

impl History {
    /// A ring keeping the last `capacity` samples (at least 1).
    pub fn new(capacity: usize) -> History {
        let capacity = capacity.max(1);
        History {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a sample, forgetting the oldest one at the bound.
    pub fn push(&self, s: Sample) {
        let mut ring = self.lock();
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(s);
        debug_assert!(ring.len() <= self.capacity);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The samples taken after `since_ms` (all of them for 0), oldest first.
    pub fn since(&self, since_ms: Millis) -> Vec<Sample> {
        self.lock()
            .iter()
            .filter(|s| s.at_ms > since_ms)
            .cloned()
            .collect()
    }

    /// The `GET /history` answer.
    pub fn answer(&self, node: NodeId, since_ms: Millis) -> HistoryAnswer {
        HistoryAnswer {
            node,
            period_ms: PERIOD_MS,
            capacity: self.capacity,
            samples: self.since(since_ms),
        }
    }
}

/// `GET /history[?since=MS]`: this node's samples after `since`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryAnswer {
    pub node: NodeId,
    pub period_ms: u64,
    pub capacity: usize,
    pub samples: Vec<Sample>,
}

/// Takes a sample every [`PERIOD_MS`] into `history` until the node stops.
pub(crate) async fn run(node: Node, history: Arc<History>) {
    let mut tick = tokio::time::interval(Duration::from_millis(PERIOD_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut prev = Reading::of(node.inner());
    loop {
        tokio::select! {
            _ = node.stopped() => return,
            _ = tick.tick() => {}
        }
        let now = Reading::of(node.inner());
        history.push(now.sample_since(&prev));
        prev = now;
    }
}

/// The pages allowed to read this node's `/history` and `/status` from
/// another origin: `http://ADMIN_ADDR` of every node in the configuration,
/// exactly (the dashboard as another node serves it). Nothing else gets an
/// `Access-Control-Allow-Origin`, and no other endpoint sends one.
#[derive(Clone, Debug)]
pub struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    pub fn of(cfg: &NodeConfig) -> Origins {
        let mut allowed: Vec<String> = cfg
            .nodes
            .iter()
            .filter(|n| !n.admin_addr.is_empty())
            .map(|n| format!("http://{}", n.admin_addr.to_ascii_lowercase()))
            .collect();
        allowed.sort();
        allowed.dedup();
        Origins { allowed }
    }

    /// Whether a request with `Origin: origin` may read the answer.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        self.allowed.contains(&origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: Millis) -> Sample {
        Sample {
            at_ms,
            lag_p99_ms: 0.0,
            lag_max_ms: 0.0,
            rpc_per_s: 0.0,
            rpc_errors_per_s: 0.0,
            rpc_p99_ms: None,
            shards: 0,
            log_dropped_per_s: 0.0,
            log_dropped_total: 0,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_capacity_samples() {
        let h = History::default();
        assert!(h.is_empty());
        for i in 1..=(3 * CAPACITY as u64 + 7) {
            h.push(sample(i));
            assert!(h.len() <= CAPACITY);
        }
        assert_eq!(h.len(), CAPACITY);
        let all = h.since(0);
        let first = 2 * CAPACITY as u64 + 8;
        assert_eq!(all.first().unwrap().at_ms, first, "the oldest went first");
        assert_eq!(all.last().unwrap().at_ms, 3 * CAPACITY as u64 + 7);
        assert!(all.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        let tail = h.since(3 * CAPACITY as u64 + 4);
        assert_eq!(tail.len(), 3, "only the samples after `since`");
        let small = History::new(0);
        small.push(sample(1));
        small.push(sample(2));
        assert_eq!(small.since(0), vec![sample(2)], "a bound of 0 keeps one");
        assert_eq!(h.answer(3, 0).samples.len(), CAPACITY);
    }

    #[test]
    fn buckets_hold_their_bounds() {
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(25.0), 0);
        assert_eq!(bucket(25.1), 1);
        for k in 0..BUCKETS {
            assert_eq!(bucket(bound_us(k)), k, "bound {k}");
            assert_eq!(bucket(bound_us(k) * 1.01), k + 1, "above bound {k}");
        }
        assert_eq!(bucket(1e12), BUCKETS);
    }

    #[test]
    fn rates_and_p99_come_from_deltas() {
        let tally = RpcTally::default();
        let t0 = tally.totals();
        for _ in 0..99 {
            tally.observe(Duration::from_micros(100), false);
        }
        tally.observe(Duration::from_millis(40), true);
        let t1 = tally.totals();
        let p99 = t1.p99_ms_since(&t0).unwrap();
        assert!((0.1..=0.1415).contains(&p99), "99 of 100 at 0.1 ms: {p99}");
        tally.observe(Duration::from_millis(40), false);
        tally.observe(Duration::from_millis(40), false);
        let t2 = tally.totals();
        let p99 = t2.p99_ms_since(&t1).unwrap();
        assert!((40.0..=56.6).contains(&p99), "only slow ones since: {p99}");
        assert_eq!(t2.p99_ms_since(&t2), None);

        let prev = Reading {
            at_ms: 10_000,
            lag_p99_ms: 1.0,
            lag_max_ever_ms: 5.0,
            rpc: t0,
            shards: 4,
            log_dropped: 10,
        };
        let now = Reading {
            at_ms: 12_000,
            lag_p99_ms: 2.0,
            lag_max_ever_ms: 800.0,
            rpc: t1,
            shards: 6,
            log_dropped: 30,
        };
        let s = now.sample_since(&prev);
        assert_eq!(s.at_ms, 12_000);
        assert_eq!(s.rpc_per_s, 50.0);
        assert_eq!(s.rpc_errors_per_s, 0.5);
        assert_eq!(s.log_dropped_per_s, 10.0);
        assert_eq!(s.log_dropped_total, 30);
        assert_eq!(s.shards, 6);
        assert_eq!(s.lag_max_ms, 800.0, "a new high is the interval's max");
        let later = Reading {
            at_ms: 14_000,
            lag_p99_ms: 3.0,
            ..now.clone()
        };
        let s = later.sample_since(&now);
        assert_eq!(s.lag_max_ms, 3.0, "no new high: the window's p99");
        assert_eq!(s.rpc_per_s, 0.0);
        assert_eq!(s.rpc_p99_ms, None);
        // A counter that went back (channels reconfigured) is no negative rate.
        let back = Reading {
            at_ms: 16_000,
            log_dropped: 0,
            ..later.clone()
        };
        assert_eq!(back.sample_since(&later).log_dropped_per_s, 0.0);
    }

    #[test]
    fn only_configured_admin_origins_are_allowed() {
        let mut cfg: NodeConfig = toml::from_str(&crate::config::tests::sample()).unwrap();
        cfg.nodes[0].admin_addr = "127.0.0.1:9101".into();
        let o = Origins::of(&cfg);
        assert!(o.allows("http://127.0.0.1:9101"));
        for bad in [
            "https://127.0.0.1:9101",
            "http://127.0.0.1:9109",
            "http://evil.example",
            "http://127.0.0.1:9101.evil.example",
            "null",
            "",
        ] {
            assert!(!o.allows(bad), "{bad}");
        }
    }
}
