//! orrery-log: logging channels that can never stall a node.
//!
//! **Owns** the path from a `tracing` event (or a direct [`LogChannels::submit`])
//! to its sinks: per-channel level and rate settings resolved by longest
//! prefix of the channel name (the tracing target), one bounded queue and
//! one writer thread per sink, and the counters that say what was written
//! and what was dropped, per channel and per sink ([`LogStats`]).
//!
//! **Must never block the caller**: a record goes through a level check, a
//! lock-free token bucket and a non-blocking enqueue. When a channel is over
//! its rate, or a sink's queue is full because the sink is slow or stuck,
//! the record is dropped and counted — never waited for. (A post-mortem:
//! one channel with a slow sink slowed game nodes until they were timed out
//! of the cluster.) A stalled sink affects only its own queue and thread.
//!
//! **Must never grow without bound**: queues hold at most `queue_capacity`
//! records, messages are cut at [`MAX_MESSAGE_BYTES`], at most
//! `max_channels` channels are tracked (the rest share [`OTHER_CHANNEL`]),
//! and [`RotatingFile`] keeps at most `keep` rotated files.
//!
//! Counting: `written` of a channel counts records that every sink they
//! were routed to wrote; `dropped_queue_full` counts records that at least
//! one of their sinks refused (they still reach the sinks that accepted
//! them). Sinks count per sink. Time is read only in the `clock` module.

mod channels;
mod clock;
mod config;
mod layer;
mod rate;
mod sink;

pub use channels::{ChannelStats, LogChannels, LogStats, SinkStats, MAX_MESSAGE_BYTES};
pub use config::{
    parse_level, ChannelConfig, FileConfig, LogConfig, MAX_CAPACITY, MAX_KEEP, MAX_RATE_PER_S,
    OTHER_CHANNEL,
};
pub use layer::ChannelLayer;
pub use sink::{format_line, Record, RotatingFile, Sink, StdoutSink};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {0:?} (expected trace, debug, info, warn, error or off)")]
    InvalidLevel(String),
    #[error("invalid rate {value} for {what} (expected 1..={max} records per second)", max = MAX_RATE_PER_S)]
    InvalidRate { what: String, value: u32 },
    #[error("{key} = {value} is out of range ({min}..={max})")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    #[error("a sink named {0:?} exists already")]
    DuplicateSink(String),
    #[error("no sink named {0:?}")]
    UnknownSink(String),
    #[error("the log channels are shut down")]
    Closed,
    #[error("cannot start a log writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot open the log file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// The node's logging: channels with a `stdout` sink (if `cfg.stdout`) and a
/// `file` sink at `data_dir/logs/node.log` (if `cfg.file.enabled` and a data
/// dir is given), installed as the global tracing subscriber. A second
/// install returns [`LogError::AlreadyInstalled`] (and starts no threads
/// that outlive the call).
pub fn install(cfg: &LogConfig, data_dir: Option<&Path>) -> Result<LogChannels, LogError> {
    use tracing_subscriber::layer::SubscriberExt;
    let channels = build(cfg, data_dir)?;
    let subscriber = tracing_subscriber::registry().with(channels.layer());
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        channels.shutdown(std::time::Duration::from_secs(1));
        return Err(LogError::AlreadyInstalled(e.to_string()));
    }
    // Callsites registered before the install may have cached interest.
    tracing::callsite::rebuild_interest_cache();
    Ok(channels)
}

/// The channels and sinks [`install`] would use, without installing them.
pub fn build(cfg: &LogConfig, data_dir: Option<&Path>) -> Result<LogChannels, LogError> {
    let channels = LogChannels::new(cfg)?;
    if cfg.stdout {
        channels.add_sink("stdout", Box::new(StdoutSink::new()))?;
    }
    if let (true, Some(dir)) = (cfg.file.enabled, data_dir) {
        let dir = dir.join("logs");
        let file = RotatingFile::open(&dir, "node.log", cfg.file.max_bytes, cfg.file.keep)
            .map_err(|source| LogError::File {
                path: dir.join("node.log"),
                source,
            })?;
        channels.add_sink("file", Box::new(file))?;
    }
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn install_writes_the_node_log_and_a_second_install_fails() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            stdout: false,
            ..LogConfig::default()
        };
        let channels = install(&cfg, Some(dir.path())).unwrap();
        tracing::warn!(target: "orrery_test::install", "installed");
        assert!(channels.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(dir.path().join("logs/node.log")).unwrap();
        assert!(
            text.contains("WARN orrery_test::install: installed"),
            "{text}"
        );
        let again = install(&cfg, Some(dir.path()));
        assert!(matches!(again, Err(LogError::AlreadyInstalled(_))));
        let stats = channels.stats();
        assert_eq!(stats.sinks.len(), 1);
        assert!(serde_json::to_string(&stats)
            .unwrap()
            .contains("\"dropped_queue_full\":0"));
    }
}
