//! `orrery bench logging`: orrery-log against `tracing-appender`'s
//! non-blocking writer (lossy, its default, and lossless).
//!
//! 1. Throughput: `lines` events on one channel from `threads` threads into
//!    a file; lines emitted per second (caller side) and lines written per
//!    second (until the file holds all that will be written), and drops.
//! 2. Event-loop lag while the sink is stalled: a current-thread tokio
//!    runtime (a node's event loop) runs a 1 ms ticker and a task emitting
//!    500 warnings every 100 ms (the post-mortem's burst) while the sink
//!    blocks as a stuck disk would; the stall is lifted after `stall_secs`
//!    so the lossless run can finish. Lag = how late the ticker wakes.
//!
//! Nothing here is asserted: tests assert, benchmarks measure.

#![allow(clippy::disallowed_methods)] // Benchmarks measure wall time.

use anyhow::{bail, Context, Result};
use orrery_log::{LogChannels, LogConfig, RotatingFile};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::dispatcher::{self, Dispatch};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;

/// Queue bound for every contender in the stall runs: orrery-log's default
/// `queue_capacity` (tracing-appender's default, 128 000 lines, would take
/// 25 s of the post-mortem's burst to fill).
const STALL_QUEUE: usize = 4096;
/// tracing-appender's default buffered lines; orrery-log gets the same in
/// the throughput runs so both buffer alike.
const APPENDER_DEFAULT_LINES: usize = 128_000;
const WAIT_WRITTEN: Duration = Duration::from_secs(120);

pub fn logging(lines: u64, threads: u64, stall_secs: u64) -> Result<()> {
    if lines == 0 || threads == 0 || stall_secs == 0 {
        bail!("need lines, threads and stall_secs >= 1");
    }
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    println!("bench logging: orrery-log vs tracing-appender non_blocking (lossy = its default, lossless); temp dir {}", dir.path().display());
    println!();
    println!("## throughput: {lines} lines on one channel from {threads} threads into a file (queue {APPENDER_DEFAULT_LINES} lines each)");
    println!(
        "| {:<34} | {:>9} | {:>8} | {:>11} | {:>9} | {:>11} | {:>9} |",
        "run", "emitted", "emit ms", "emitted/s", "written", "written/s", "dropped"
    );
    println!(
        "|{:-<36}|{:->11}|{:->10}|{:->13}|{:->11}|{:->13}|{:->11}|",
        "", "", "", "", "", "", ""
    );
    let rows = [
        throughput_orrery(dir.path(), lines, threads)?,
        throughput_appender(dir.path(), lines, threads, true)?,
        throughput_appender(dir.path(), lines, threads, false)?,
    ];
    for r in &rows {
        r.print();
    }
    println!();
    let run_for = Duration::from_secs(stall_secs + 1);
    println!("## event-loop lag, sink STALLED: current-thread runtime, 1 ms ticker, 500 warnings / 100 ms; stall lifted after {stall_secs} s, run {} s (queue {STALL_QUEUE} lines each)", run_for.as_secs());
    println!(
        "| {:<34} | {:>7} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} |",
        "run", "ticks", "p50 ms", "p99 ms", "max ms", "emitted", "dropped"
    );
    println!(
        "|{:-<36}|{:->9}|{:->10}|{:->10}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", "", "", ""
    );
    lag_baseline(run_for)?.print();
    lag_orrery(dir.path(), stall_secs, run_for, false)?
        .0
        .print();
    let (orrery_lag, rate_limited, queue_full) = lag_orrery(dir.path(), stall_secs, run_for, true)?;
    orrery_lag.print();
    lag_appender(stall_secs, run_for, true)?.print();
    lag_appender(stall_secs, run_for, false)?.print();
    println!(
        "orrery-log drops: {rate_limited} over the channel's rate (default rate_per_s = {}), {queue_full} on the full queue of the stalled sink",
        LogConfig::default().rate_per_s
    );
    println!();
    println!("target: no lag increase from a stalled sink; throughput >= tracing-appender");
    Ok(())
}

struct Throughput {
    name: &'static str,
    emitted: u64,
    emit: Duration,
    written: u64,
    until_written: Duration,
    dropped: u64,
}

impl Throughput {
    fn print(&self) {
        println!(
            "| {:<34} | {:>9} | {:>8.1} | {:>11.0} | {:>9} | {:>11.0} | {:>9} |",
            self.name,
            self.emitted,
            self.emit.as_secs_f64() * 1e3,
            self.emitted as f64 / self.emit.as_secs_f64(),
            self.written,
            self.written as f64 / self.until_written.as_secs_f64(),
            self.dropped
        );
    }
}

/// Emits `lines` info events on target "bench" from `threads` threads, each
/// with `dispatch` as its scoped default. Returns the wall time.
fn emit_from_threads(dispatch: &Dispatch, lines: u64, threads: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let n = lines / threads + u64::from(t < lines % threads);
            let d = dispatch.clone();
            s.spawn(move || {
                dispatcher::with_default(&d, || {
                    for i in 0..n {
                        tracing::info!(target: "bench", thread = t, "throughput line {i}");
                    }
                })
            });
        }
    });
    start.elapsed()
}

fn count_lines(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes.iter().filter(|b| **b == b'\n').count() as u64)
}

fn throughput_orrery(dir: &Path, lines: u64, threads: u64) -> Result<Throughput> {
    let cfg = LogConfig {
        queue_capacity: APPENDER_DEFAULT_LINES as u64,
        rate_per_s: orrery_log::MAX_RATE_PER_S,
        stdout: false,
        ..LogConfig::default()
    };
    let channels = LogChannels::new(&cfg)?;
    let file = RotatingFile::open(dir, "orrery.log", 1 << 40, 0)?;
    let path = file.path();
    channels.add_sink("file", Box::new(file))?;
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(channels.layer()));
    let start = Instant::now();
    let emit = emit_from_threads(&dispatch, lines, threads);
    if !channels.flush(WAIT_WRITTEN) {
        bail!("orrery-log did not drain in {WAIT_WRITTEN:?}");
    }
    let until_written = start.elapsed();
    let st = channels.stats();
    let ch = st.channel("bench").context("no bench channel")?;
    channels.shutdown(Duration::from_secs(5));
    Ok(Throughput {
        name: "orrery-log",
        emitted: ch.emitted,
        emit,
        written: count_lines(&path)?,
        until_written,
        dropped: ch.dropped_queue_full + ch.dropped_rate_limited,
    })
}

/// A file that counts the lines written through it.
struct CountingFile {
    file: std::fs::File,
    lines: Arc<AtomicU64>,
}

impl Write for CountingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        let nl = buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        self.lines.fetch_add(nl, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn appender_dispatch(writer: NonBlocking) -> Dispatch {
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    Dispatch::new(tracing_subscriber::registry().with(layer))
}

fn throughput_appender(dir: &Path, lines: u64, threads: u64, lossy: bool) -> Result<Throughput> {
    let name = if lossy {
        "appender-lossy.log"
    } else {
        "appender-lossless.log"
    };
    let path = dir.join(name);
    let counted = Arc::new(AtomicU64::new(0));
    let file = CountingFile {
        file: std::fs::File::create(&path)?,
        lines: counted.clone(),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(lossy)
        .buffered_lines_limit(APPENDER_DEFAULT_LINES)
        .finish(file);
    let errors = writer.error_counter();
    let dispatch = appender_dispatch(writer);
    let start = Instant::now();
    let emit = emit_from_threads(&dispatch, lines, threads);
    let dropped = errors.dropped_lines() as u64;
    let expect = lines - dropped;
    // The worker writes asynchronously; wait until the file holds every
    // line that was not dropped (the guard's drop waits only up to 1 s).
    let deadline = Instant::now() + WAIT_WRITTEN;
    while counted.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let until_written = start.elapsed();
    drop(dispatch);
    drop(guard);
    Ok(Throughput {
        name: if lossy {
            "tracing-appender lossy"
        } else {
            "tracing-appender lossless"
        },
        emitted: lines,
        emit,
        written: count_lines(&path)?,
        until_written,
        dropped,
    })
}

struct Lag {
    name: &'static str,
    lags: Vec<Duration>,
    emitted: u64,
    dropped: u64,
}

impl Lag {
    fn print(&self) {
        let mut v = self.lags.clone();
        v.sort();
        let q = |p: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let i = ((v.len() - 1) as f64 * p).round() as usize;
            v[i].as_secs_f64() * 1e3
        };
        println!(
            "| {:<34} | {:>7} | {:>8.2} | {:>8.2} | {:>9.1} | {:>9} | {:>9} |",
            self.name,
            v.len(),
            q(0.5),
            q(0.99),
            q(1.0),
            self.emitted,
            self.dropped
        );
    }
}

/// Runs the ticker and the warning burst on a current-thread runtime with
/// `dispatch` as the default; returns the ticker's lags and events emitted.
fn event_loop(dispatch: &Dispatch, run_for: Duration) -> Result<(Vec<Duration>, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let tick = Duration::from_millis(1);
    let out = dispatcher::with_default(dispatch, || {
        rt.block_on(async {
            let end = Instant::now() + run_for;
            let ticker = async {
                let mut lags = Vec::with_capacity(run_for.as_millis() as usize);
                while Instant::now() < end {
                    let t = Instant::now();
                    tokio::time::sleep(tick).await;
                    lags.push(t.elapsed().saturating_sub(tick));
                }
                lags
            };
            let emitter = async {
                let mut emitted = 0u64;
                while Instant::now() < end {
                    for i in 0..500 {
                        tracing::warn!(target: "bench", i, "peer lease renewal is slow");
                        emitted += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                emitted
            };
            tokio::join!(ticker, emitter)
        })
    });
    Ok(out)
}

fn lag_baseline(run_for: Duration) -> Result<Lag> {
    let (lags, _) = event_loop(&Dispatch::none(), run_for)?;
    Ok(Lag {
        name: "no logging (baseline)",
        lags,
        emitted: 0,
        dropped: 0,
    })
}

/// Lifts a stall after `after` on a helper thread.
fn release_after(
    after: Duration,
    release: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        release();
    })
}

/// The lag, and the drops over the rate limit and on the full queue.
fn lag_orrery(
    dir: &Path,
    stall_secs: u64,
    run_for: Duration,
    stall: bool,
) -> Result<(Lag, u64, u64)> {
    let cfg = LogConfig {
        queue_capacity: STALL_QUEUE as u64,
        stdout: false,
        ..LogConfig::default()
    };
    let channels = LogChannels::new(&cfg)?;
    channels.add_sink(
        "file",
        Box::new(RotatingFile::open(dir, "stalled.log", 1 << 40, 0)?),
    )?;
    channels.stall_sink("file", stall)?;
    let releaser = {
        let channels = channels.clone();
        release_after(Duration::from_secs(stall_secs), move || {
            let _ = channels.stall_sink("file", false);
        })
    };
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(channels.layer()));
    let (lags, emitted) = event_loop(&dispatch, run_for)?;
    let _ = releaser.join();
    channels.flush(Duration::from_secs(10));
    let st = channels.stats();
    let ch = st.channel("bench").context("no bench channel")?;
    let (rate_limited, queue_full) = (ch.dropped_rate_limited, ch.dropped_queue_full);
    channels.shutdown(Duration::from_secs(5));
    let lag = Lag {
        name: if stall {
            "orrery-log, stalled"
        } else {
            "orrery-log, sink healthy"
        },
        lags,
        emitted,
        dropped: rate_limited + queue_full,
    };
    Ok((lag, rate_limited, queue_full))
}

/// A writer that blocks while its gate is closed, like a stuck disk.
struct StalledWriter {
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Write for StalledWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (stalled, cv) = &*self.gate;
        let mut s = stalled.lock().unwrap_or_else(|e| e.into_inner());
        while *s {
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lag_appender(stall_secs: u64, run_for: Duration, lossy: bool) -> Result<Lag> {
    let gate = Arc::new((Mutex::new(true), Condvar::new()));
    let (writer, guard): (NonBlocking, WorkerGuard) = NonBlockingBuilder::default()
        .lossy(lossy)
        .buffered_lines_limit(STALL_QUEUE)
        .finish(StalledWriter { gate: gate.clone() });
    let errors = writer.error_counter();
    let releaser = release_after(Duration::from_secs(stall_secs), move || {
        let (stalled, cv) = &*gate;
        *stalled.lock().unwrap_or_else(|e| e.into_inner()) = false;
        cv.notify_all();
    });
    let dispatch = appender_dispatch(writer);
    let (lags, emitted) = event_loop(&dispatch, run_for)?;
    let _ = releaser.join();
    let dropped = errors.dropped_lines() as u64;
    drop(dispatch);
    drop(guard);
    Ok(Lag {
        name: if lossy {
            "tracing-appender lossy, stalled"
        } else {
            "tracing-appender lossless, stalled"
        },
        lags,
        emitted,
        dropped,
    })
}
