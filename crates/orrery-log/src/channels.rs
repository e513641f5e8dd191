//! `LogChannels`: the channel table, the per-sink bounded queues and writer
//! threads, counters, run-time changes, flush and shutdown.
//!
//! Hot path (`submit`): a shared read lock on the channel table, a level
//! compare, a lock-free token bucket, then for each routed sink an atomic
//! capacity reservation and a non-blocking `try_send`. Nothing on it waits
//! for a sink. The write lock is taken only for run-time changes, new sinks
//! and the first record of a new channel (bounded by `max_channels`).

use crate::clock;
use crate::config::{self, level_name, LogConfig, Resolved, OTHER_CHANNEL};
use crate::rate::{self, TokenBucket};
use crate::sink::{Record, Sink};
use crate::LogError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::level_filters::LevelFilter;
use tracing::Level;

/// Messages longer than this are cut (on a char boundary) and marked, so a
/// single record cannot hold an unbounded amount of memory in a queue.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// How long dropping the last handle waits for writers to drain.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

/// A handle on the logging channels. Cheap to clone; the writer threads stop
/// when the last handle is dropped or on [`LogChannels::shutdown`].
#[derive(Clone)]
pub struct LogChannels {
    inner: Arc<Inner>,
}

struct Inner {
    table: RwLock<Table>,
    /// Writers report progress (queue drained and flushed, thread finished)
    /// under this lock so that `flush`/`shutdown` never miss a wake-up.
    progress: Arc<Progress>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Progress {
    lock: Mutex<()>,
    changed: Condvar,
}

impl Progress {
    fn notify(&self) {
        let _g = lock(&self.lock);
        self.changed.notify_all();
    }
}

struct Table {
    /// The configuration including run-time changes (always valid).
    config: LogConfig,
    channels: BTreeMap<Arc<str>, Channel>,
    /// Where channels beyond `max_channels` are accounted.
    other: Channel,
    sinks: Vec<SinkSlot>,
}

/// A channel's resolved settings (changed under the write lock) and its
/// shared counters (atomics, updated under the read lock or by writers).
struct Channel {
    name: Arc<str>,
    level: LevelFilter,
    rate_per_s: u32,
    interval_ns: u64,
    /// Indices into `Table::sinks`.
    routes: Vec<usize>,
    state: Arc<ChannelState>,
}

#[derive(Default)]
struct ChannelState {
    emitted: AtomicU64,
    written: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_rate_limited: AtomicU64,
    dropped_no_sink: AtomicU64,
    bucket: TokenBucket,
}

struct SinkSlot {
    /// `None` once shut down: every record is then refused.
    tx: Option<SyncSender<Arc<Pending>>>,
    shared: Arc<SinkShared>,
    thread: Option<JoinHandle<()>>,
}

struct SinkShared {
    name: String,
    capacity: u64,
    /// Records accepted and not yet written: the bound of the queue.
    queued: AtomicU64,
    accepted: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    /// Records processed (written or failed) when the sink was last flushed
    /// with an empty queue; set under `Progress::lock`.
    flushed_upto: AtomicU64,
    finished: AtomicBool,
    stall: Mutex<bool>,
    stall_changed: Condvar,
    stalled: AtomicBool,
}

/// A record in flight to its sinks. The last sink to finish with it (or the
/// submitter, if a sink refused it) settles the channel's `written` count.
struct Pending {
    rec: Record,
    /// Routed sinks that have not yet finished or refused the record.
    remaining: AtomicUsize,
    failed: AtomicBool,
    channel: Arc<ChannelState>,
}

impl Pending {
    fn settle(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.failed.load(Ordering::Relaxed)
        {
            self.channel.written.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of one channel. With no sink write errors and after a flush:
/// `emitted == written + dropped_queue_full + dropped_rate_limited + dropped_no_sink`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    pub channel: String,
    pub level: String,
    pub rate_per_s: u32,
    /// Records at an enabled level (before the rate limit).
    pub emitted: u64,
    /// Records written by every sink they were routed to.
    pub written: u64,
    /// Records that at least one of their sinks could not accept (full queue).
    pub dropped_queue_full: u64,
    pub dropped_rate_limited: u64,
    /// Records of a channel whose routes name no existing sink.
    pub dropped_no_sink: u64,
}

/// Counters of one sink (each record counted once per sink).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    pub name: String,
    pub capacity: u64,
    pub queued: u64,
    pub written: u64,
    pub dropped: u64,
    pub stalled: bool,
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogStats {
    pub channels: Vec<ChannelStats>,
    pub sinks: Vec<SinkStats>,
}

impl LogStats {
    pub fn channel(&self, name: &str) -> Option<&ChannelStats> {
        self.channels.iter().find(|c| c.channel == name)
    }

    pub fn sink(&self, name: &str) -> Option<&SinkStats> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Channel {
    fn new(name: Arc<str>, resolved: &Resolved, sinks: &[SinkSlot]) -> Self {
        let mut ch = Self {
            name,
            level: LevelFilter::OFF,
            rate_per_s: 1,
            interval_ns: 1,
            routes: vec![],
            state: Arc::default(),
        };
        ch.apply(resolved, sinks);
        ch
    }

    fn apply(&mut self, resolved: &Resolved, sinks: &[SinkSlot]) {
        self.level = resolved.level;
        self.rate_per_s = resolved.rate_per_s;
        self.interval_ns = rate::interval_ns(resolved.rate_per_s);
        self.routes = match &resolved.sinks {
            None => (0..sinks.len()).collect(),
            Some(names) => sinks
                .iter()
                .enumerate()
                .filter(|(_, s)| names.iter().any(|n| *n == s.shared.name))
                .map(|(i, _)| i)
                .collect(),
        };
    }

    fn stats(&self) -> ChannelStats {
        let s = &self.state;
        ChannelStats {
            channel: self.name.to_string(),
            level: level_name(self.level).to_string(),
            rate_per_s: self.rate_per_s,
            emitted: s.emitted.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
            dropped_queue_full: s.dropped_queue_full.load(Ordering::Relaxed),
            dropped_rate_limited: s.dropped_rate_limited.load(Ordering::Relaxed),
            dropped_no_sink: s.dropped_no_sink.load(Ordering::Relaxed),
        }
    }
}

impl Table {
    fn reresolve(&mut self) {
        let Table {
            config,
            channels,
            other,
            sinks,
        } = self;
        for ch in channels.values_mut() {
            ch.apply(&config.resolve(&ch.name), sinks);
        }
        other.apply(&config.resolve(OTHER_CHANNEL), sinks);
    }

    fn sink(&self, name: &str) -> Result<&SinkSlot, LogError> {
        self.sinks
            .iter()
            .find(|s| s.shared.name == name)
            .ok_or_else(|| LogError::UnknownSink(name.to_string()))
    }
}

impl LogChannels {
    /// Channels with no sinks yet (see [`LogChannels::add_sink`]).
    pub fn new(cfg: &LogConfig) -> Result<Self, LogError> {
        cfg.validate()?;
        let other = Channel::new(Arc::from(OTHER_CHANNEL), &cfg.resolve(OTHER_CHANNEL), &[]);
        Ok(Self {
            inner: Arc::new(Inner {
                table: RwLock::new(Table {
                    config: cfg.clone(),
                    channels: BTreeMap::new(),
                    other,
                    sinks: vec![],
                }),
                progress: Arc::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.inner
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a sink with its own bounded queue (`queue_capacity` records) and
    /// its own writer thread. Channels without a `sinks` setting route to it.
    pub fn add_sink(&self, name: &str, sink: Box<dyn Sink>) -> Result<(), LogError> {
        if name.is_empty() {
            return Err(LogError::InvalidConfig(
                "a sink name must not be empty".into(),
            ));
        }
        let mut table = self.write();
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        if table.sinks.iter().any(|s| s.shared.name == name) {
            return Err(LogError::DuplicateSink(name.to_string()));
        }
        let capacity = table.config.queue_capacity;
        let (tx, rx) = mpsc::sync_channel(capacity as usize);
        let shared = Arc::new(SinkShared {
            name: name.to_string(),
            capacity,
            queued: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            stall: Mutex::new(false),
            stall_changed: Condvar::new(),
            stalled: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            let progress = self.inner.progress.clone();
            std::thread::Builder::new()
                .name(format!("log-{name}"))
                .spawn(move || run_writer(sink, rx, &shared, &progress))
                .map_err(LogError::Spawn)?
        };
        table.sinks.push(SinkSlot {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        });
        table.reresolve();
        Ok(())
    }

    /// The `tracing` layer that feeds these channels (see [`crate::ChannelLayer`]).
    pub fn layer(&self) -> crate::ChannelLayer {
        crate::ChannelLayer::new(self.clone())
    }

    /// Submits one record on `channel`. Never blocks: a record above the
    /// channel's level is ignored, one over its rate or refused by a full
    /// sink queue is dropped and counted. No user code runs under the
    /// table lock (the message is already formatted).
    pub fn submit(&self, channel: &str, level: Level, mut message: String) {
        let table = self.read();
        let table = match table.channels.get(channel) {
            Some(_) => table,
            None if table.channels.len() as u64 >= table.config.max_channels => table,
            None => {
                drop(table);
                self.register(channel);
                self.read()
            }
        };
        let (ch, name) = match table.channels.get(channel) {
            Some(ch) => (ch, ch.name.clone()),
            None => (&table.other, Arc::from(channel)),
        };
        if level > ch.level {
            return;
        }
        let state = &ch.state;
        state.emitted.fetch_add(1, Ordering::Relaxed);
        if !state.bucket.try_take(clock::mono_ns(), ch.interval_ns) {
            state.dropped_rate_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if ch.routes.is_empty() {
            state.dropped_no_sink.fetch_add(1, Ordering::Relaxed);
            return;
        }
        truncate_message(&mut message);
        let pending = Arc::new(Pending {
            rec: Record {
                at_ms: clock::unix_ms(),
                level,
                channel: name,
                message,
            },
            remaining: AtomicUsize::new(ch.routes.len()),
            failed: AtomicBool::new(false),
            channel: state.clone(),
        });
        let mut refused = false;
        for &i in &ch.routes {
            if !table.sinks[i].try_enqueue(&pending) {
                refused = true;
                pending.settle(false);
            }
        }
        if refused {
            state.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `channel` to the table (write lock), unless the table is full.
    fn register(&self, channel: &str) {
        let mut table = self.write();
        if table.channels.contains_key(channel)
            || table.channels.len() as u64 >= table.config.max_channels
        {
            return;
        }
        let name: Arc<str> = Arc::from(channel);
        let ch = Channel::new(name.clone(), &table.config.resolve(channel), &table.sinks);
        table.channels.insert(name, ch);
    }

    /// Whether a record at `level` on `channel` would pass the level check.
    pub fn enabled(&self, channel: &str, level: Level) -> bool {
        let table = self.read();
        let ch_level = match table.channels.get(channel) {
            Some(ch) => ch.level,
            None if table.channels.len() as u64 >= table.config.max_channels => table.other.level,
            None => table.config.resolve(channel).level,
        };
        level <= ch_level
    }

    /// Sets the level of the channels starting with `channel` (run time).
    /// A bad level is an error and changes nothing.
    pub fn set_level(&self, channel: &str, level: &str) -> Result<(), LogError> {
        config::check_channel_name(channel)?;
        let parsed = config::parse_level(level)?;
        {
            let mut table = self.write();
            table
                .config
                .channels
                .entry(channel.to_string())
                .or_default()
                .level = Some(config::level_name(parsed).to_string());
            table.reresolve();
        }
        // Outside the lock: this calls back into the layer's `register_callsite`.
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    }

    /// Sets the rate (records per second, burst the same) of the channels
    /// starting with `channel`. A bad rate is an error and changes nothing.
    pub fn set_rate(&self, channel: &str, per_s: u32) -> Result<(), LogError> {
        config::check_channel_name(channel)?;
        config::check_rate(channel, per_s)?;
        let mut table = self.write();
        table
            .config
            .channels
            .entry(channel.to_string())
            .or_default()
            .rate_per_s = Some(per_s);
        table.reresolve();
        Ok(())
    }

    /// The configuration in force, including run-time changes.
    pub fn config(&self) -> LogConfig {
        self.read().config.clone()
    }

    pub fn stats(&self) -> LogStats {
        let table = self.read();
        let mut channels: Vec<ChannelStats> = table.channels.values().map(Channel::stats).collect();
        let other = table.other.stats();
        if other.emitted > 0 {
            channels.push(other);
        }
        let sinks = table.sinks.iter().map(|s| s.shared.stats()).collect();
        LogStats { channels, sinks }
    }

    /// Fault hook: while `stalled`, the sink's writer thread blocks before
    /// each write, as on a stuck disk or a full pipe. Its queue fills and
    /// further records for it are dropped; callers never wait.
    pub fn stall_sink(&self, name: &str, stalled: bool) -> Result<(), LogError> {
        let table = self.read();
        let sink = table.sink(name)?;
        sink.shared.set_stalled(stalled);
        self.inner.progress.notify();
        Ok(())
    }

    /// Waits at most `timeout` until every sink that is not stalled has
    /// written and flushed all records it accepted. True if they all did.
    pub fn flush(&self, timeout: Duration) -> bool {
        let sinks: Vec<Arc<SinkShared>> =
            self.read().sinks.iter().map(|s| s.shared.clone()).collect();
        self.inner.progress.wait_until(timeout, || {
            sinks.iter().all(|s| {
                s.stalled.load(Ordering::Acquire)
                    || s.finished.load(Ordering::Acquire)
                    || s.drained()
            })
        })
    }

    /// Stops accepting records, lifts stall hooks, lets the writers drain
    /// and waits at most `timeout` for them. True if every writer finished;
    /// a writer stuck in its sink is left behind (it holds no lock).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.inner.shutdown(timeout)
    }
}

impl Inner {
    fn shutdown(&self, timeout: Duration) -> bool {
        self.closed.store(true, Ordering::Release);
        let mut slots: Vec<(Arc<SinkShared>, Option<JoinHandle<()>>)> = vec![];
        {
            let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
            for s in &mut table.sinks {
                s.tx = None; // closes the queue: the writer drains it and exits
                s.shared.set_stalled(false);
                slots.push((s.shared.clone(), s.thread.take()));
            }
        }
        let all_done = self.progress.wait_until(timeout, || {
            slots
                .iter()
                .all(|(s, t)| t.is_none() || s.finished.load(Ordering::Acquire))
        });
        for (shared, thread) in slots {
            if let Some(t) = thread {
                if shared.finished.load(Ordering::Acquire) {
                    let _ = t.join();
                }
            }
        }
        all_done
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            self.shutdown(DROP_TIMEOUT);
        }
    }
}

impl Progress {
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let mut guard = lock(&self.lock);
        let mut left = timeout;
        let step = Duration::from_millis(50);
        loop {
            if done() {
                return true;
            }
            if left.is_zero() {
                return false;
            }
            // Bounded waits: a writer notifies on progress; the step only
            // guards against progress made without a notification.
            let wait = left.min(step);
            guard = self
                .changed
                .wait_timeout(guard, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            left = left.saturating_sub(wait);
        }
    }
}

impl SinkSlot {
    /// Reserves a place in the bounded queue and hands the record over,
    /// without ever waiting. False if the queue is full (or closed).
    fn try_enqueue(&self, pending: &Arc<Pending>) -> bool {
        let s = &self.shared;
        let Some(tx) = &self.tx else {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if s.queued.fetch_add(1, Ordering::AcqRel) >= s.capacity {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        s.accepted.fetch_add(1, Ordering::AcqRel);
        match tx.try_send(pending.clone()) {
            Ok(()) => true,
            // The channel holds `capacity` records and we reserved a place,
            // so it cannot be full; it is disconnected only if the writer died.
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                s.queued.fetch_sub(1, Ordering::AcqRel);
                s.accepted.fetch_sub(1, Ordering::AcqRel);
                s.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

impl SinkShared {
    fn set_stalled(&self, on: bool) {
        let mut stall = lock(&self.stall);
        *stall = on;
        self.stalled.store(on, Ordering::Release);
        self.stall_changed.notify_all();
    }

    /// Blocks the writer while the stall hook is on.
    fn wait_while_stalled(&self) {
        if !self.stalled.load(Ordering::Acquire) {
            return;
        }
        let mut stall = lock(&self.stall);
        while *stall {
            stall = self
                .stall_changed
                .wait(stall)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn drained(&self) -> bool {
        self.flushed_upto.load(Ordering::Acquire) == self.accepted.load(Ordering::Acquire)
    }

    fn stats(&self) -> SinkStats {
        SinkStats {
            name: self.name.clone(),
            capacity: self.capacity,
            queued: self.queued.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            stalled: self.stalled.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// The sink's writer thread: write records as they come, flush the sink
/// whenever the queue runs empty, exit when the queue is closed and drained.
fn run_writer(
    mut sink: Box<dyn Sink>,
    rx: Receiver<Arc<Pending>>,
    shared: &SinkShared,
    progress: &Progress,
) {
    let mut processed: u64 = 0;
    loop {
        let pending = match rx.try_recv() {
            Ok(p) => p,
            Err(TryRecvError::Empty) => {
                flush_sink(&mut sink, shared);
                mark_flushed(shared, progress, processed);
                match rx.recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        shared.wait_while_stalled();
        let ok = matches!(
            panic::catch_unwind(AssertUnwindSafe(|| sink.write(&pending.rec))),
            Ok(Ok(()))
        );
        if ok {
            shared.written.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        pending.settle(ok);
        drop(pending);
        processed += 1;
        let before = shared.queued.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before >= 1, "queued underflow");
    }
    flush_sink(&mut sink, shared);
    let _g = lock(&progress.lock);
    shared.flushed_upto.store(processed, Ordering::Release);
    shared.finished.store(true, Ordering::Release);
    progress.changed.notify_all();
}

fn flush_sink(sink: &mut Box<dyn Sink>, shared: &SinkShared) {
    let ok = matches!(
        panic::catch_unwind(AssertUnwindSafe(|| sink.flush())),
        Ok(Ok(()))
    );
    if !ok {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn mark_flushed(shared: &SinkShared, progress: &Progress, processed: u64) {
    let _g = lock(&progress.lock);
    shared.flushed_upto.store(processed, Ordering::Release);
    progress.changed.notify_all();
}

fn truncate_message(message: &mut String) {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("…(truncated)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChannelConfig;
    use std::sync::mpsc::Sender;

    const WAIT: Duration = Duration::from_secs(10);

    /// Collects formatted lines in memory.
    #[derive(Clone, Default)]
    struct MemSink {
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl MemSink {
        fn lines(&self) -> Vec<String> {
            lock(&self.lines).clone()
        }
    }

    impl Sink for MemSink {
        fn write(&mut self, rec: &Record) -> std::io::Result<()> {
            lock(&self.lines).push(format!("{} {}", rec.channel, rec.message));
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink whose writes block on a gate it owns, like a stuck pipe, and
    /// that reports when a write started blocking.
    struct GateSink {
        gate: Arc<(Mutex<bool>, Condvar)>,
        entered: Sender<()>,
    }

    impl Sink for GateSink {
        fn write(&mut self, _rec: &Record) -> std::io::Result<()> {
            let _ = self.entered.send(());
            let (open, cv) = &*self.gate;
            let mut open = lock(open);
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct FailSink;

    impl Sink for FailSink {
        fn write(&mut self, rec: &Record) -> std::io::Result<()> {
            if rec.message == "panic" {
                panic!("a sink panicked");
            }
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn cfg(queue_capacity: u64) -> LogConfig {
        LogConfig {
            queue_capacity,
            ..LogConfig::default()
        }
    }

    #[test]
    fn level_filter_and_prefix_match() {
        let mut c = cfg(100);
        c.channels.insert(
            "orrery_node".into(),
            ChannelConfig {
                level: Some("debug".into()),
                ..ChannelConfig::default()
            },
        );
        c.channels.insert(
            "orrery_node::lease".into(),
            ChannelConfig {
                level: Some("error".into()),
                ..ChannelConfig::default()
            },
        );
        let ch = LogChannels::new(&c).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        ch.submit("orrery_node::node", Level::DEBUG, "d".into());
        ch.submit("orrery_node::node", Level::TRACE, "t".into());
        ch.submit("orrery_node::lease", Level::WARN, "w".into());
        ch.submit("orrery_node::lease", Level::ERROR, "e".into());
        ch.submit("orrery_wire", Level::DEBUG, "d".into());
        ch.submit("orrery_wire", Level::INFO, "i".into());
        assert!(ch.flush(WAIT));
        assert_eq!(
            mem.lines(),
            [
                "orrery_node::node d",
                "orrery_node::lease e",
                "orrery_wire i"
            ]
        );
        let st = ch.stats();
        assert_eq!(st.channel("orrery_node::lease").unwrap().level, "error");
        assert_eq!(st.channel("orrery_node::node").unwrap().level, "debug");
        assert_eq!(st.channel("orrery_wire").unwrap().emitted, 1);
        assert_eq!(st.channel("orrery_wire").unwrap().written, 1);
    }

    #[test]
    fn rate_limit_drops_are_counted() {
        let mut c = cfg(1000);
        c.channels.insert(
            "noisy".into(),
            ChannelConfig {
                rate_per_s: Some(1),
                ..ChannelConfig::default()
            },
        );
        let ch = LogChannels::new(&c).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        for i in 0..50 {
            ch.submit("noisy", Level::WARN, format!("n{i}"));
            ch.submit("calm", Level::WARN, format!("c{i}"));
        }
        assert!(ch.flush(WAIT));
        let st = ch.stats();
        let noisy = st.channel("noisy").unwrap();
        assert_eq!(noisy.emitted, 50);
        // One per second with a burst of one: at most 2 unless the loop took > 1 s.
        assert!(noisy.dropped_rate_limited >= 48, "{noisy:?}");
        assert_eq!(noisy.written + noisy.dropped_rate_limited, 50);
        let calm = st.channel("calm").unwrap();
        assert_eq!((calm.written, calm.dropped_rate_limited), (50, 0));
        assert_eq!(mem.lines().len() as u64, 50 + noisy.written);
    }

    #[test]
    fn stalled_sink_drops_and_never_blocks_while_a_healthy_sink_gets_everything() {
        let mut c = cfg(100);
        c.channels.insert(
            "game".into(),
            ChannelConfig {
                sinks: Some(vec!["disk".into(), "healthy".into()]),
                ..ChannelConfig::default()
            },
        );
        c.channels.insert(
            "game::only_healthy".into(),
            ChannelConfig {
                sinks: Some(vec!["healthy".into()]),
                ..ChannelConfig::default()
            },
        );
        let ch = LogChannels::new(&c).unwrap();
        let disk = MemSink::default();
        let healthy = MemSink::default();
        ch.add_sink("disk", Box::new(disk.clone())).unwrap();
        ch.add_sink("healthy", Box::new(healthy.clone())).unwrap();
        ch.stall_sink("disk", true).unwrap();
        // 500 warnings in batches the healthy queue can hold; flush skips
        // the stalled sink, so it returns as soon as "healthy" is drained.
        for batch in 0..5 {
            for i in 0..100 {
                ch.submit("game::lease", Level::WARN, format!("w{}", batch * 100 + i));
            }
            assert!(
                ch.flush(WAIT),
                "the healthy sink drains while the other is stalled"
            );
            ch.submit("game::only_healthy", Level::WARN, format!("h{batch}"));
            assert!(ch.flush(WAIT));
        }
        let st = ch.stats();
        let game = st.channel("game::lease").unwrap();
        assert_eq!(game.emitted, 500);
        assert_eq!(
            game.dropped_queue_full, 400,
            "beyond the stalled queue's capacity"
        );
        assert_eq!(
            game.written, 0,
            "the accepted 100 wait in the stalled queue"
        );
        let disk_stats = st.sink("disk").unwrap();
        assert!(disk_stats.stalled);
        assert_eq!((disk_stats.queued, disk_stats.dropped), (100, 400));
        assert_eq!(healthy.lines().len(), 505, "healthy sink got every line");
        assert_eq!(st.channel("game::only_healthy").unwrap().written, 5);
        assert!(disk.lines().is_empty());
        // Lift the stall: the queued records are written.
        ch.stall_sink("disk", false).unwrap();
        assert!(ch.flush(WAIT));
        let game = ch.stats().channel("game::lease").unwrap().clone();
        assert_eq!(game.written, 100);
        assert_eq!(game.written + game.dropped_queue_full, game.emitted);
        let lines = disk.lines();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[0], "game::lease w0");
    }

    #[test]
    fn a_sink_stuck_inside_write_costs_callers_nothing() {
        let ch = LogChannels::new(&cfg(10)).unwrap();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (entered_tx, entered) = mpsc::channel();
        ch.add_sink(
            "pipe",
            Box::new(GateSink {
                gate: gate.clone(),
                entered: entered_tx,
            }),
        )
        .unwrap();
        ch.submit("x", Level::WARN, "first".into());
        entered
            .recv_timeout(WAIT)
            .expect("the writer is stuck in write");
        for i in 0..500 {
            ch.submit("x", Level::WARN, format!("w{i}"));
        }
        assert!(
            !ch.flush(Duration::from_millis(1)),
            "a stuck sink is not drained"
        );
        let x = ch.stats().channel("x").unwrap().clone();
        assert_eq!(x.emitted, 501);
        // One record is inside write(), so nine more fit the queue of ten.
        assert_eq!(x.dropped_queue_full, 491);
        let (open, cv) = &*gate;
        *lock(open) = true;
        cv.notify_all();
        assert!(ch.flush(WAIT));
        assert_eq!(ch.stats().channel("x").unwrap().written, 10);
    }

    #[test]
    fn bad_runtime_changes_are_rejected_and_change_nothing() {
        let ch = LogChannels::new(&cfg(10)).unwrap();
        let before = ch.config();
        assert!(matches!(
            ch.set_level("x", "loud"),
            Err(LogError::InvalidLevel(_))
        ));
        assert!(matches!(
            ch.set_rate("x", 0),
            Err(LogError::InvalidRate { .. })
        ));
        assert!(ch.set_rate("x", MAX_RATE_PER_S_PLUS_ONE).is_err());
        assert!(ch.set_level("", "info").is_err());
        assert!(matches!(
            ch.stall_sink("nope", true),
            Err(LogError::UnknownSink(_))
        ));
        assert_eq!(ch.config(), before);
        let bad = LogConfig {
            rate_per_s: 0,
            ..LogConfig::default()
        };
        assert!(LogChannels::new(&bad).is_err());
    }

    const MAX_RATE_PER_S_PLUS_ONE: u32 = crate::MAX_RATE_PER_S + 1;

    #[test]
    fn runtime_changes_re_resolve_existing_channels() {
        let ch = LogChannels::new(&cfg(100)).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        ch.submit("a::b", Level::DEBUG, "hidden".into());
        ch.set_level("a", "debug").unwrap();
        ch.submit("a::b", Level::DEBUG, "shown".into());
        ch.set_rate("a::b", 7).unwrap();
        assert!(ch.flush(WAIT));
        assert_eq!(mem.lines(), ["a::b shown"]);
        let st = ch.stats();
        let ab = st.channel("a::b").unwrap();
        assert_eq!((ab.level.as_str(), ab.rate_per_s), ("debug", 7));
    }

    #[test]
    fn channels_beyond_the_limit_share_other() {
        let c = LogConfig {
            max_channels: 2,
            ..cfg(100)
        };
        let ch = LogChannels::new(&c).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        for name in ["a", "b", "c", "d", "a"] {
            ch.submit(name, Level::INFO, "m".into());
        }
        assert!(ch.flush(WAIT));
        let st = ch.stats();
        assert_eq!(st.channels.len(), 3);
        assert_eq!(st.channel(OTHER_CHANNEL).unwrap().emitted, 2);
        assert_eq!(st.channel("a").unwrap().emitted, 2);
        assert_eq!(mem.lines().len(), 5, "records keep their own channel name");
        assert!(mem.lines().contains(&"d m".to_string()));
    }

    #[test]
    fn sink_errors_and_panics_are_counted() {
        let ch = LogChannels::new(&cfg(100)).unwrap();
        ch.add_sink("bad", Box::new(FailSink)).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        ch.submit("x", Level::ERROR, "io".into());
        ch.submit("x", Level::ERROR, "panic".into());
        ch.submit("x", Level::ERROR, "io".into());
        assert!(ch.flush(WAIT));
        let st = ch.stats();
        assert_eq!(st.sink("bad").unwrap().errors, 3);
        assert_eq!(st.sink("mem").unwrap().written, 3);
        assert_eq!(st.channel("x").unwrap().written, 0);
        assert!(matches!(
            ch.add_sink("mem", Box::new(MemSink::default())),
            Err(LogError::DuplicateSink(_))
        ));
    }

    #[test]
    fn unknown_routes_and_no_sinks_are_counted() {
        let mut c = cfg(10);
        c.channels.insert(
            "lost".into(),
            ChannelConfig {
                sinks: Some(vec!["nowhere".into()]),
                ..ChannelConfig::default()
            },
        );
        let ch = LogChannels::new(&c).unwrap();
        ch.submit("lost", Level::INFO, "m".into());
        ch.submit("x", Level::INFO, "m".into());
        let st = ch.stats();
        assert_eq!(st.channel("lost").unwrap().dropped_no_sink, 1);
        assert_eq!(st.channel("x").unwrap().dropped_no_sink, 1);
    }

    #[test]
    fn flush_drains_and_shutdown_stops_and_refuses() {
        let ch = LogChannels::new(&cfg(10_000)).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        for i in 0..1000 {
            ch.submit("x", Level::INFO, format!("{i}"));
        }
        assert!(ch.flush(WAIT));
        assert_eq!(mem.lines().len(), 1000);
        assert_eq!(ch.stats().sink("mem").unwrap().queued, 0);
        ch.stall_sink("mem", true).unwrap();
        ch.submit("x", Level::INFO, "queued while stalled".into());
        assert!(ch.shutdown(WAIT), "shutdown lifts the stall and drains");
        assert_eq!(mem.lines().len(), 1001);
        ch.submit("x", Level::INFO, "after".into());
        assert_eq!(ch.stats().channel("x").unwrap().dropped_queue_full, 1);
        assert!(matches!(
            ch.add_sink("late", Box::new(MemSink::default())),
            Err(LogError::Closed)
        ));
    }

    #[test]
    fn long_messages_are_cut() {
        let ch = LogChannels::new(&cfg(10)).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        ch.submit("x", Level::INFO, "é".repeat(MAX_MESSAGE_BYTES));
        assert!(ch.flush(WAIT));
        let line = &mem.lines()[0];
        assert!(line.len() <= MAX_MESSAGE_BYTES + 32);
        assert!(line.ends_with("…(truncated)"));
    }

    #[test]
    fn concurrent_submitters_counters_add_up() {
        let ch = LogChannels::new(&LogConfig {
            rate_per_s: 1_000_000,
            ..cfg(64)
        })
        .unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ch = ch.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        ch.submit("x", Level::INFO, format!("{t}-{i}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(ch.flush(WAIT));
        let x = ch.stats().channel("x").unwrap().clone();
        assert_eq!(x.emitted, 20_000);
        assert_eq!(
            x.written + x.dropped_queue_full + x.dropped_rate_limited,
            20_000
        );
        assert_eq!(mem.lines().len() as u64, x.written);
    }
}
