//! The cluster-wide log view: every node forwards its warnings (by default)
//! to one collector node, which keeps the latest lines in memory (`log
//! tail`) and writes them all to `logs/cluster.log` in its data directory.
//!
//! Forwarding is an orrery-log sink like any other (`collector`): it runs
//! on that sink's writer thread and sends batches over the node's transport
//! with a deadline, so a slow or dead collector fills only that sink's
//! queue, whose overflow is dropped and counted. The collector writes what
//! it receives through its own bounded orrery-log channels (`cluster.log`)
//! and never waits on the disk in a request handler.
//!
//! What peers send is bounded before it is kept or written
//! (`orrery_core::state::limits`): each line's message is clipped to
//! `MAX_LOG_LINE` bytes, its channel and level to `MAX_NAME`, and a batch
//! to `MAX_LOG_BATCH` lines; clipped and dropped lines are counted
//! (`/metrics`).
//!
//! What it must never do: block the caller of a log macro or a request
//! handler, forward a record twice, or hold more than `keep_lines` lines
//! of at most `MAX_LOG_LINE` bytes (the tail) and one batch of at most
//! `batch_max` records (the sender).

use crate::messages::{Reply, Request};
use crate::transport::Transport;
use orrery_core::state::limits::{clip_to, MAX_LOG_BATCH, MAX_LOG_LINE, MAX_NAME};
use orrery_core::NodeId;
use orrery_log::{LogChannels, LogConfig, Record, RotatingFile, Sink};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `[log_forward]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// The node that collects the cluster's log lines; unset: no forwarding.
    pub collector: Option<NodeId>,
    /// Least level forwarded. Default `warn`.
    pub min_level: String,
    /// Records per batch sent. Default 256.
    pub batch_max: usize,
    /// Deadline of one batch. Default 1000.
    pub timeout_ms: u64,
    /// Lines the collector keeps in memory for `log tail`. Default 2000.
    pub keep_lines: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            collector: None,
            min_level: "warn".into(),
            batch_max: 256,
            timeout_ms: 1_000,
            keep_lines: 2_000,
        }
    }
}

impl ForwardConfig {
    pub fn validate(&self) -> Result<(), String> {
        orrery_log::parse_level(&self.min_level)
            .map_err(|e| format!("log_forward.min_level: {e}"))?;
        if !(1..=10_000).contains(&self.batch_max) {
            return Err("log_forward.batch_max must be in 1..=10000".into());
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err("log_forward.timeout_ms must be in 1..=60000".into());
        }
        if !(1..=1_000_000).contains(&self.keep_lines) {
            return Err("log_forward.keep_lines must be in 1..=1000000".into());
        }
        Ok(())
    }
}

/// One forwarded line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    pub node: NodeId,
    pub at_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    pub channel: String,
    pub message: String,
}

/// The collector's side: the tail in memory and `cluster.log` on disk.
pub struct ClusterLog {
    tail: Mutex<VecDeque<LogLine>>,
    keep: usize,
    file: LogChannels,
    /// Lines whose message, channel or level was clipped.
    clipped: AtomicU64,
    /// Lines dropped over `MAX_LOG_BATCH` in one batch.
    dropped: AtomicU64,
}

impl LogLine {
    /// The line within the byte bounds; `true` if anything was cut.
    fn bounded(self) -> (LogLine, bool) {
        let cut = self.message.len() > MAX_LOG_LINE
            || self.channel.len() > MAX_NAME
            || self.level.len() > MAX_NAME;
        let line = LogLine {
            message: clip_to(self.message, MAX_LOG_LINE),
            channel: clip_to(self.channel, MAX_NAME),
            level: clip_to(self.level, MAX_NAME),
            ..self
        };
        (line, cut)
    }
}

impl ClusterLog {
    /// Opens `data_dir/logs/cluster.log` behind its own bounded queue.
    pub fn open(data_dir: &Path, cfg: &ForwardConfig) -> Result<ClusterLog, String> {
        let file_cfg = LogConfig {
            level: "trace".into(),
            stdout: false,
            ..LogConfig::default()
        };
        let file = LogChannels::new(&file_cfg).map_err(|e| e.to_string())?;
        let dir = data_dir.join("logs");
        let sink = RotatingFile::open(
            &dir,
            "cluster.log",
            file_cfg.file.max_bytes,
            file_cfg.file.keep,
        )
        .map_err(|e| format!("cannot open {}/cluster.log: {e}", dir.display()))?;
        file.add_sink("cluster-file", Box::new(sink))
            .map_err(|e| e.to_string())?;
        Ok(ClusterLog {
            tail: Mutex::new(VecDeque::new()),
            keep: cfg.keep_lines,
            file,
            clipped: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// (lines stored clipped, lines dropped over the batch bound) so far.
    pub fn bounded(&self) -> (u64, u64) {
        (
            self.clipped.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    /// Takes lines in: never blocks (the file has a bounded queue). Lines
    /// are clipped to the byte bounds first; a batch over `MAX_LOG_BATCH`
    /// lines loses its excess.
    pub fn accept(&self, mut lines: Vec<LogLine>) {
        if lines.len() > MAX_LOG_BATCH {
            let over = lines.len() - MAX_LOG_BATCH;
            lines.truncate(MAX_LOG_BATCH);
            self.dropped.fetch_add(over as u64, Ordering::Relaxed);
        }
        let lines: Vec<LogLine> = lines
            .into_iter()
            .map(|l| {
                let (l, cut) = l.bounded();
                if cut {
                    self.clipped.fetch_add(1, Ordering::Relaxed);
                }
                l
            })
            .collect();
        for l in &lines {
            let level = l.level.parse().unwrap_or(tracing::Level::INFO);
            self.file.submit(
                &l.channel,
                level,
                format!("[node {}] {}", l.node, l.message),
            );
        }
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        for l in lines {
            if tail.len() == self.keep {
                tail.pop_front();
            }
            tail.push_back(l);
        }
        debug_assert!(tail.len() <= self.keep);
    }

    /// The latest `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter()
            .skip(tail.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    pub fn flush(&self, timeout: Duration) -> bool {
        self.file.flush(timeout)
    }
}

/// Where a forwarding sink delivers.
pub(crate) enum Destination {
    /// This node is the collector.
    Local(Arc<ClusterLog>),
    Remote {
        collector: NodeId,
        net: Arc<dyn Transport>,
        runtime: tokio::runtime::Handle,
    },
}

/// The `collector` sink: batches records at or above `min_level` and
/// delivers them (on its writer thread, with a deadline).
pub(crate) struct ForwardSink {
    pub(crate) me: NodeId,
    pub(crate) to: Destination,
    pub(crate) min_level: tracing::level_filters::LevelFilter,
    pub(crate) batch_max: usize,
    pub(crate) timeout: Duration,
    pub(crate) batch: Vec<LogLine>,
}

impl ForwardSink {
    fn send(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.batch);
        match &self.to {
            Destination::Local(log) => {
                log.accept(lines);
                Ok(())
            }
            Destination::Remote {
                collector,
                net,
                runtime,
            } => {
                let timeout = self.timeout;
                let call = net.call(*collector, Request::Logs(lines), timeout);
                // The deadline's timer is created inside the runtime.
                match runtime.block_on(async move { tokio::time::timeout(timeout, call).await }) {
                    Ok(Ok(Reply::Ok)) => Ok(()),
                    Ok(Ok(other)) => Err(io::Error::other(format!(
                        "collector {collector} answered {other:?}"
                    ))),
                    Ok(Err(e)) => Err(io::Error::other(e.to_string())),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("collector {collector} did not answer in time"),
                    )),
                }
            }
        }
    }
}

impl Sink for ForwardSink {
    fn write(&mut self, rec: &Record) -> io::Result<()> {
        if rec.level > self.min_level {
            return Ok(());
        }
        self.batch.push(LogLine {
            node: self.me,
            at_ms: rec.at_ms,
            level: rec.level.to_string(),
            channel: rec.channel.to_string(),
            message: rec.message.clone(),
        });
        if self.batch.len() >= self.batch_max {
            self.send()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(node: NodeId, i: u64) -> LogLine {
        LogLine {
            node,
            at_ms: i,
            level: "WARN".into(),
            channel: "c".into(),
            message: format!("m{i}"),
        }
    }

    #[test]
    fn the_tail_is_bounded_and_the_file_gets_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ForwardConfig {
            keep_lines: 3,
            ..Default::default()
        };
        let log = Arc::new(ClusterLog::open(dir.path(), &cfg).unwrap());
        log.accept((0..5).map(|i| line(2, i)).collect());
        let tail = log.tail(10);
        assert_eq!(
            tail.iter().map(|l| l.at_ms).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join("logs/cluster.log")).unwrap();
        assert_eq!(text.matches("[node 2] m").count(), 5, "{text}");
    }

    #[test]
    fn a_4_mib_forwarded_line_is_stored_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ClusterLog::open(dir.path(), &ForwardConfig::default()).unwrap());
        // Three-byte characters: the cut must fall on a boundary.
        let huge = "€".repeat(4 * 1024 * 1024 / 3 + 1);
        assert!(huge.len() >= 4 * 1024 * 1024);
        let mut l = line(2, 1);
        l.message = huge;
        l.channel = "c".repeat(10_000);
        log.accept(vec![l, line(2, 2)]);
        let tail = log.tail(10);
        assert_eq!(tail.len(), 2);
        let m = &tail[0].message;
        assert!(
            m.len() <= MAX_LOG_LINE && m.len() > MAX_LOG_LINE - 3,
            "{}",
            m.len()
        );
        assert!(m.chars().all(|c| c == '€'));
        assert!(tail[0].channel.len() <= MAX_NAME);
        assert_eq!(tail[1].message, "m2", "short lines are untouched");
        assert_eq!(log.bounded(), (1, 0));
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join("logs/cluster.log")).unwrap();
        assert!(
            text.len() < 64 * 1024,
            "the file got the clipped line: {}",
            text.len()
        );
        // A batch is bounded in lines too.
        log.accept((0..MAX_LOG_BATCH as u64 + 7).map(|i| line(3, i)).collect());
        assert_eq!(log.bounded(), (1, 7));
    }

    #[test]
    fn a_local_sink_forwards_warnings_only_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ClusterLog::open(dir.path(), &ForwardConfig::default()).unwrap());
        let mut sink = ForwardSink {
            me: 1,
            to: Destination::Local(log.clone()),
            min_level: tracing::level_filters::LevelFilter::WARN,
            batch_max: 2,
            timeout: Duration::from_secs(1),
            batch: vec![],
        };
        let rec = |level, m: &str| Record {
            at_ms: 1,
            level,
            channel: Arc::from("ch"),
            message: m.into(),
        };
        sink.write(&rec(tracing::Level::INFO, "info")).unwrap();
        sink.write(&rec(tracing::Level::WARN, "w1")).unwrap();
        assert!(log.tail(10).is_empty(), "batched until full or flushed");
        sink.write(&rec(tracing::Level::ERROR, "e1")).unwrap();
        assert_eq!(log.tail(10).len(), 2);
        sink.write(&rec(tracing::Level::WARN, "w2")).unwrap();
        sink.flush().unwrap();
        let msgs: Vec<String> = log.tail(10).into_iter().map(|l| l.message).collect();
        assert_eq!(msgs, vec!["w1", "e1", "w2"]);
    }
}
