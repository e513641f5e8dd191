//! `LogConfig`: every key defaulted and validated; per-channel settings
//! resolved by longest prefix.

use crate::LogError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tracing::level_filters::LevelFilter;

/// Upper bound for capacities and counts in the configuration.
pub const MAX_CAPACITY: u64 = 1_000_000;
/// Upper bound for a per-channel rate (records per second).
pub const MAX_RATE_PER_S: u32 = 1_000_000;
/// Upper bound for the number of rotated files a [`crate::RotatingFile`] keeps.
pub const MAX_KEEP: u32 = 1_000;

/// The logging configuration (`[log]` of a node's TOML, or built in code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Level of channels without one of their own: trace, debug, info, warn, error, off.
    pub level: String,
    /// Records each sink queue holds; beyond it records are dropped and counted.
    pub queue_capacity: u64,
    /// Per-channel token bucket: records per second (the burst is the same number).
    pub rate_per_s: u32,
    /// Distinct channels tracked; further ones are accounted under [`OTHER_CHANNEL`].
    pub max_channels: u64,
    /// Write to standard output (used by [`crate::install`]).
    pub stdout: bool,
    /// The rotating file sink (used by [`crate::install`]).
    pub file: FileConfig,
    /// Per-channel settings, keyed by channel (tracing target) prefix.
    pub channels: BTreeMap<String, ChannelConfig>,
}

/// The channel under which channels beyond `max_channels` are accounted.
pub const OTHER_CHANNEL: &str = "(other)";

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            queue_capacity: 4096,
            rate_per_s: 2000,
            max_channels: 256,
            stdout: true,
            file: FileConfig::default(),
            channels: BTreeMap::new(),
        }
    }
}

/// The rotating file sink's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub enabled: bool,
    /// Rotate once the current file would exceed this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`node.log.1` .. `node.log.<keep>`).
    pub keep: u32,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 16 * 1024 * 1024,
            keep: 4,
        }
    }
}

/// Settings of the channels whose name starts with the key. Unset fields
/// fall through to a shorter matching key, then to the global defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    pub level: Option<String>,
    pub rate_per_s: Option<u32>,
    /// Names of the sinks this channel writes to (default: all sinks).
    pub sinks: Option<Vec<String>>,
}

/// A channel's settings after prefix resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub level: LevelFilter,
    pub rate_per_s: u32,
    pub sinks: Option<Vec<String>>,
}

/// Parses a level name (case-insensitive): trace, debug, info, warn, error, off.
pub fn parse_level(s: &str) -> Result<LevelFilter, LogError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "trace" => Ok(LevelFilter::TRACE),
        "debug" => Ok(LevelFilter::DEBUG),
        "info" => Ok(LevelFilter::INFO),
        "warn" => Ok(LevelFilter::WARN),
        "error" => Ok(LevelFilter::ERROR),
        "off" => Ok(LevelFilter::OFF),
        _ => Err(LogError::InvalidLevel(s.to_string())),
    }
}

/// The canonical lower-case name of a level filter.
pub(crate) fn level_name(level: LevelFilter) -> &'static str {
    if level == LevelFilter::TRACE {
        "trace"
    } else if level == LevelFilter::DEBUG {
        "debug"
    } else if level == LevelFilter::INFO {
        "info"
    } else if level == LevelFilter::WARN {
        "warn"
    } else if level == LevelFilter::ERROR {
        "error"
    } else {
        "off"
    }
}

pub(crate) fn check_rate(what: &str, per_s: u32) -> Result<(), LogError> {
    if (1..=MAX_RATE_PER_S).contains(&per_s) {
        Ok(())
    } else {
        Err(LogError::InvalidRate {
            what: what.to_string(),
            value: per_s,
        })
    }
}

pub(crate) fn check_channel_name(name: &str) -> Result<(), LogError> {
    if name.is_empty() {
        return Err(LogError::InvalidConfig(
            "a channel name must not be empty".into(),
        ));
    }
    Ok(())
}

fn check_range(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), LogError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LogError::OutOfRange {
            key,
            value,
            min,
            max,
        })
    }
}

impl LogConfig {
    /// Checks every key; the first problem is returned as a typed error.
    pub fn validate(&self) -> Result<(), LogError> {
        parse_level(&self.level)?;
        check_range("queue_capacity", self.queue_capacity, 1, MAX_CAPACITY)?;
        check_rate("rate_per_s", self.rate_per_s)?;
        check_range("max_channels", self.max_channels, 1, MAX_CAPACITY)?;
        check_range("file.max_bytes", self.file.max_bytes, 1, 1 << 40)?;
        check_range(
            "file.keep",
            u64::from(self.file.keep),
            0,
            u64::from(MAX_KEEP),
        )?;
        for (name, ch) in &self.channels {
            check_channel_name(name)?;
            if let Some(level) = &ch.level {
                parse_level(level)?;
            }
            if let Some(rate) = ch.rate_per_s {
                check_rate(&format!("channels.{name}.rate_per_s"), rate)?;
            }
            if let Some(sinks) = &ch.sinks {
                if sinks.iter().any(|s| s.is_empty()) {
                    return Err(LogError::InvalidConfig(format!(
                        "channels.{name}.sinks: a sink name must not be empty"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Resolves `channel`'s settings: for each setting, the longest key that
    /// is a prefix of the channel name (as a string, like `EnvFilter`
    /// targets) and sets it wins; otherwise the global default applies.
    /// Assumes a validated configuration (invalid levels fall back to info).
    pub(crate) fn resolve(&self, channel: &str) -> Resolved {
        let mut level: Option<(usize, &str)> = None;
        let mut rate: Option<(usize, u32)> = None;
        let mut sinks: Option<(usize, &Vec<String>)> = None;
        for (key, ch) in &self.channels {
            if !channel.starts_with(key.as_str()) {
                continue;
            }
            let len = key.len();
            if let Some(l) = &ch.level {
                if level.is_none_or(|(best, _)| len > best) {
                    level = Some((len, l));
                }
            }
            if let Some(r) = ch.rate_per_s {
                if rate.is_none_or(|(best, _)| len > best) {
                    rate = Some((len, r));
                }
            }
            if let Some(s) = &ch.sinks {
                if sinks.is_none_or(|(best, _)| len > best) {
                    sinks = Some((len, s));
                }
            }
        }
        let level = level.map_or(self.level.as_str(), |(_, l)| l);
        Resolved {
            level: parse_level(level).unwrap_or(LevelFilter::INFO),
            rate_per_s: rate.map_or(self.rate_per_s, |(_, r)| r),
            sinks: sinks.map(|(_, s)| s.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_channels(pairs: &[(&str, ChannelConfig)]) -> LogConfig {
        LogConfig {
            channels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..LogConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = LogConfig::default();
        c.validate().unwrap();
        assert_eq!(c.level, "info");
        assert_eq!(c.queue_capacity, 4096);
        assert_eq!(c.rate_per_s, 2000);
        assert_eq!(c.max_channels, 256);
        assert_eq!(c.file.max_bytes, 16 * 1024 * 1024);
        assert_eq!(c.file.keep, 4);
        let r = c.resolve("anything");
        assert_eq!(r.level, LevelFilter::INFO);
        assert_eq!(r.rate_per_s, 2000);
        assert_eq!(r.sinks, None);
    }

    #[test]
    fn longest_prefix_wins_per_setting() {
        let c = with_channels(&[
            (
                "orrery_node",
                ChannelConfig {
                    level: Some("debug".into()),
                    rate_per_s: Some(50),
                    sinks: None,
                },
            ),
            (
                "orrery_node::lease",
                ChannelConfig {
                    level: Some("warn".into()),
                    ..ChannelConfig::default()
                },
            ),
        ]);
        c.validate().unwrap();
        let lease = c.resolve("orrery_node::lease");
        assert_eq!(lease.level, LevelFilter::WARN);
        assert_eq!(
            lease.rate_per_s, 50,
            "rate falls through to the shorter key"
        );
        let node = c.resolve("orrery_node::node");
        assert_eq!(node.level, LevelFilter::DEBUG);
        let other = c.resolve("orrery_wire");
        assert_eq!(other.level, LevelFilter::INFO);
        assert_eq!(other.rate_per_s, 2000);
    }

    #[test]
    fn bad_values_are_rejected_with_typed_errors() {
        let bad_level = LogConfig {
            level: "loud".into(),
            ..LogConfig::default()
        };
        assert!(matches!(bad_level.validate(), Err(LogError::InvalidLevel(l)) if l == "loud"));
        let zero_queue = LogConfig {
            queue_capacity: 0,
            ..LogConfig::default()
        };
        assert!(matches!(
            zero_queue.validate(),
            Err(LogError::OutOfRange {
                key: "queue_capacity",
                ..
            })
        ));
        let huge = LogConfig {
            max_channels: MAX_CAPACITY + 1,
            ..LogConfig::default()
        };
        assert!(huge.validate().is_err());
        let zero_rate = with_channels(&[(
            "x",
            ChannelConfig {
                rate_per_s: Some(0),
                ..ChannelConfig::default()
            },
        )]);
        assert!(matches!(
            zero_rate.validate(),
            Err(LogError::InvalidRate { value: 0, .. })
        ));
        let too_fast = LogConfig {
            rate_per_s: MAX_RATE_PER_S + 1,
            ..LogConfig::default()
        };
        assert!(too_fast.validate().is_err());
    }

    #[test]
    fn serde_defaults_and_unknown_fields() {
        let c: LogConfig =
            serde_json::from_str(r#"{"level":"warn","channels":{"noisy":{"rate_per_s":5}}}"#)
                .unwrap();
        assert_eq!(c.level, "warn");
        assert_eq!(c.queue_capacity, 4096);
        assert_eq!(c.channels["noisy"].rate_per_s, Some(5));
        assert!(serde_json::from_str::<LogConfig>(r#"{"levle":"warn"}"#).is_err());
        assert!(serde_json::from_str::<LogConfig>(r#"{"channels":{"x":{"speed":1}}}"#).is_err());
        let back: LogConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn level_names_round_trip() {
        for name in ["trace", "debug", "info", "warn", "error", "off"] {
            assert_eq!(level_name(parse_level(name).unwrap()), name);
        }
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::WARN);
    }
}
