//! The admin console: a fixed set of commands an operator runs on one node
//! or on many at once (`orrery exec`, `orrery console`).
//!
//! In the post-mortem the engineers found the slow logging channel only by
//! driving all 250 nodes from a live console. Here every node answers the
//! same commands over its admin endpoint (`POST /console`, with the admin
//! token), and the CLI fans one command out to the chosen nodes in
//! parallel.
//!
//! This module owns the command language (parsing, with a clear error for
//! an unknown command or a bad argument) and what each command does on a
//! node. What it must never do: run anything that is not one of these
//! commands (no shell, no eval, no file paths from the caller), change
//! anything when a command is refused, or block the runtime (fault hooks
//! that block are opt-in with `admin.fault_commands` and bounded).

use crate::node::Node;
use crate::quorum::AskError;
use orrery_core::state::MAX_EVENTS;
use orrery_core::Stage;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest argument list and argument accepted.
pub const MAX_ARGS: usize = 16;
pub const MAX_ARG_LEN: usize = 256;
/// Most lines one `fault log-emit` may submit.
pub const MAX_EMIT: u64 = 100_000;
/// Most lines `log tail` returns.
pub const MAX_TAIL: usize = 10_000;
/// Longest paced `fault log-emit`, in seconds.
pub const MAX_EMIT_SECS: u64 = 60;
/// Longest `fault block-loop`, in ms.
pub const MAX_BLOCK_MS: u64 = 10_000;

/// Why a console command was refused. Nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleError {
    #[error("empty command; try `help`")]
    Empty,
    /// Not a command (nor a sub-command): the nearest one, if any is near.
    #[error("unknown command `{word}`{}; `help` lists the commands", did_you_mean(.suggestion))]
    Unknown {
        word: String,
        suggestion: Option<String>,
    },
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("bad argument: {0}")]
    BadArgument(String),
    #[error(
        "too many arguments or an argument too long (at most {MAX_ARGS} of {MAX_ARG_LEN} bytes)"
    )]
    TooLong,
    #[error("fault commands are disabled on this node (admin.fault_commands = false)")]
    FaultsDisabled,
    #[error("{0}")]
    Failed(String),
    /// Refused: this node sees no quorum, so nothing can commit.
    #[error("{0}")]
    NoQuorum(crate::quorum::NoQuorum),
}

impl From<AskError> for ConsoleError {
    fn from(e: AskError) -> Self {
        match e {
            AskError::NoQuorum(nq) => ConsoleError::NoQuorum(nq),
            other => ConsoleError::Failed(other.to_string()),
        }
    }
}

/// One console command, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleCommand {
    Help,
    Status,
    Stage,
    Health,
    Shards,
    LogLevel {
        channel: String,
        level: String,
    },
    LogRate {
        channel: String,
        per_s: u32,
    },
    LogStats,
    /// The latest lines of the cluster-wide log (on the collector).
    LogTail {
        lines: usize,
    },
    ConfigGet {
        key: String,
    },
    /// Change a cluster-wide key everywhere (replicated, in the timeline).
    ConfigSet {
        key: String,
        value: String,
    },
    Drain {
        drain: bool,
    },
    /// Refuse `node`'s certificates below serial `min_serial` everywhere.
    CertRevoke {
        node: u64,
        min_serial: u64,
    },
    /// On the leader: hand Raft leadership to voter `to` (`orrery drill leader`).
    LeaderTransfer {
        to: u64,
    },
    /// Record an operator's action in the timeline (`orrery roll`, `orrery drill`).
    OperationRecord {
        what: String,
        detail: String,
    },
    Tasks,
    /// This node's alarms in force (`crate::alarms`).
    Alarms,
    /// Acknowledge an alarm (`kind` or `kind:subject`) until it clears.
    AlarmAck {
        name: String,
    },
    Timeline {
        last: usize,
    },
    /// Fault hook: block (or unblock) a log sink's writer.
    FaultLogStall {
        sink: String,
        stall: bool,
    },
    /// Fault hook: submit `count` lines at `level` on `channel`, all at
    /// once or paced at `per_s` lines a second.
    FaultLogEmit {
        channel: String,
        count: u64,
        level: String,
        per_s: Option<u64>,
    },
    /// Fault hook: block one runtime worker for `ms` (a CPU hog in a handler).
    FaultBlockLoop {
        ms: u64,
    },
    /// A command a service registered under its own first word (the node
    /// refuses it if no service did).
    Service {
        args: Vec<String>,
    },
}

/// Every command with its usage, for `help`, completion and suggestions:
/// (its words, its usage). Every [`ConsoleCommand`] but `Service` has one
/// (see [`ConsoleCommand::word`]; a test checks both ways).
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "help [COMMAND] (every command's usage, or one's)"),
    ("status", "status"),
    ("stage", "stage"),
    ("health", "health"),
    ("shards", "shards"),
    (
        "log level",
        "log level CHANNEL trace|debug|info|warn|error|off",
    ),
    ("log rate", "log rate CHANNEL N/s"),
    ("log stats", "log stats"),
    ("log tail", "log tail [N] (on the collector node)"),
    (
        "config get",
        "config get KEY (dotted, e.g. startup.stage_deadline_ms)",
    ),
    ("drain", "drain [on|off]"),
    (
        "cert revoke",
        "cert revoke NODE MIN_SERIAL (refuse the node's certificates below the serial)",
    ),
    (
        "config set",
        "config set KEY VALUE (a cluster-wide key, e.g. membership.lease_ttl_ms, everywhere)",
    ),
    (
        "leader transfer",
        "leader transfer NODE (on the leader: hand leadership to voter NODE)",
    ),
    (
        "operation record",
        "operation record WHAT DETAIL... (an operator's action, to the timeline)",
    ),
    ("tasks", "tasks"),
    ("alarms", "alarms"),
    (
        "alarm ack",
        "alarm ack NAME (kind or kind:subject, as `alarms` lists it; acknowledged until it clears)",
    ),
    ("timeline", "timeline [N]"),
    ("fault log-stall", "fault log-stall SINK on|off"),
    (
        "fault log-emit",
        "fault log-emit CHANNEL COUNT [LEVEL [N/s]]",
    ),
    ("fault block-loop", "fault block-loop MS"),
];

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// The first words of the built-in commands, in `COMMANDS` order.
pub fn command_words() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for (key, _) in COMMANDS {
        let first = key.split(' ').next().unwrap_or(key);
        if !out.contains(&first) {
            out.push(first);
        }
    }
    out
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// Edit distance with adjacent transpositions (optimal string alignment):
/// `lgo` is one edit from `log`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d: Vec<Vec<usize>> = (0..=a.len())
        .map(|i| (0..=b.len()).map(|j| if i == 0 { j } else { i }).collect())
        .collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate nearest to `word` (one edit for short words, two for
/// longer ones, or `word` a prefix of it), the first in order on a tie.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let word = word.to_ascii_lowercase();
    let most = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .filter_map(|c| {
            let d = if word.len() >= 3 && c.starts_with(&word) {
                1
            } else {
                edit_distance(&word, c)
            };
            (d <= most).then_some((d, c))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

/// The usage of the built-in command `words` begin with (`log level x`
/// -> `log level CHANNEL ...`), if any.
pub fn usage_for<S: AsRef<str>>(words: &[S]) -> Option<&'static str> {
    COMMANDS
        .iter()
        .filter(|(k, _)| {
            let key: Vec<&str> = k.split(' ').collect();
            key.len() <= words.len() && key.iter().zip(words).all(|(k, w)| *k == w.as_ref())
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(_, u)| *u)
}

/// `word` is not a command: the error, suggesting the nearest of the
/// built-in command words and `extra` (services' words).
pub fn unknown(word: &str, extra: &[&str]) -> ConsoleError {
    ConsoleError::Unknown {
        word: word.to_string(),
        suggestion: suggest(
            word,
            command_words().into_iter().chain(extra.iter().copied()),
        ),
    }
}

/// `group sub` is not a command (`log levl`): suggests the group's nearest.
fn unknown_sub(group: &str, sub: &str) -> ConsoleError {
    let subs = COMMANDS.iter().filter_map(|(k, _)| {
        k.strip_prefix(group)
            .and_then(|rest| rest.strip_prefix(' '))
    });
    ConsoleError::Unknown {
        word: format!("{group} {sub}"),
        suggestion: suggest(sub, subs).map(|s| format!("{group} {s}")),
    }
}

/// The commands a service registered under its first word.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCommands {
    pub word: String,
    pub usage: Vec<String>,
}

/// Every command a node runs (`GET /commands`): the built-in ones' usage
/// and its services'.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandList {
    pub builtin: Vec<String>,
    pub services: Vec<ServiceCommands>,
}

/// Refuses a `Service` command whose first word no service registered
/// (`services`: the words registered).
pub fn check_service<S: AsRef<str>>(args: &[S], services: &[&str]) -> Result<(), ConsoleError> {
    let word = args.first().map(|w| w.as_ref()).unwrap_or_default();
    if services.contains(&word) {
        Ok(())
    } else {
        Err(unknown(word, services))
    }
}

/// The leading command words of a usage line (`universe tick SYSTEM` ->
/// `universe tick`).
fn usage_words(usage: &str) -> Vec<&str> {
    usage
        .split_whitespace()
        .take_while(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || matches!(c, '-' | '_'))
        })
        .collect()
}

/// `help [TOPIC]`: every usage line (built-in, then the services'), or
/// those of the commands whose words begin with `topic` (`help log`,
/// `help log level`). A topic that names nothing is refused with a
/// suggestion.
pub fn help_lines<S: AsRef<str>>(
    topic: &[S],
    services: &[ServiceCommands],
) -> Result<Vec<String>, ConsoleError> {
    let topic: Vec<&str> = topic.iter().map(|t| t.as_ref()).collect();
    let mut entries: Vec<(Vec<&str>, &str)> = COMMANDS
        .iter()
        .map(|(k, u)| (k.split(' ').collect(), *u))
        .collect();
    for s in services {
        for u in &s.usage {
            let mut words = usage_words(u);
            if words.first() != Some(&s.word.as_str()) {
                words = vec![s.word.as_str()];
            }
            entries.push((words, u.as_str()));
        }
    }
    let lines: Vec<String> = entries
        .iter()
        .filter(|(words, _)| words.len() >= topic.len() && words[..topic.len()] == topic[..])
        .map(|(_, u)| u.to_string())
        .collect();
    if lines.is_empty() {
        let keys: Vec<String> = entries.iter().map(|(w, _)| w.join(" ")).collect();
        let mut candidates: Vec<&str> = command_words();
        candidates.extend(services.iter().map(|s| s.word.as_str()));
        candidates.extend(keys.iter().map(String::as_str));
        let word = topic.join(" ");
        return Err(ConsoleError::Unknown {
            suggestion: suggest(&word, candidates),
            word,
        });
    }
    Ok(lines)
}

fn usage(word: &str) -> &'static str {
    COMMANDS
        .iter()
        .find(|(w, _)| *w == word)
        .map(|(_, u)| *u)
        .unwrap_or("help")
}

fn level(s: &str) -> Result<String, ConsoleError> {
    let l = s.to_ascii_lowercase();
    if LEVELS.contains(&l.as_str()) {
        Ok(l)
    } else {
        Err(ConsoleError::BadArgument(format!(
            "unknown level `{s}` (one of {})",
            LEVELS.join(", ")
        )))
    }
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ConsoleError> {
    s.parse()
        .map_err(|_| ConsoleError::BadArgument(format!("{what} must be a number, got `{s}`")))
}

fn on_off(s: &str) -> Result<bool, ConsoleError> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConsoleError::BadArgument(format!(
            "expected on or off, got `{s}`"
        ))),
    }
}

fn channel(s: &str) -> Result<String, ConsoleError> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(ConsoleError::BadArgument(format!(
            "`{s}` is not a channel name (letters, digits, _ : . -)"
        )))
    }
}

impl ConsoleCommand {
    /// Parses a command from its words (`["log", "level", "noisy", "debug"]`).
    pub fn parse<S: AsRef<str>>(words: &[S]) -> Result<ConsoleCommand, ConsoleError> {
        if words.len() > MAX_ARGS || words.iter().any(|w| w.as_ref().len() > MAX_ARG_LEN) {
            return Err(ConsoleError::TooLong);
        }
        let w: Vec<&str> = words.iter().map(|w| w.as_ref()).collect();
        let Some(first) = w.first() else {
            return Err(ConsoleError::Empty);
        };
        let exact = |n: usize, word: &str| {
            if w.len() == n {
                Ok(())
            } else {
                Err(ConsoleError::Usage(usage(word)))
            }
        };
        use ConsoleCommand as C;
        Ok(match *first {
            "help" => C::Help,
            "status" => exact(1, "status").map(|_| C::Status)?,
            "stage" => exact(1, "stage").map(|_| C::Stage)?,
            "health" => exact(1, "health").map(|_| C::Health)?,
            "shards" => exact(1, "shards").map(|_| C::Shards)?,
            "tasks" => exact(1, "tasks").map(|_| C::Tasks)?,
            "alarms" => exact(1, "alarms").map(|_| C::Alarms)?,
            "alarm" => match w.get(1).copied() {
                Some("ack") => {
                    exact(3, "alarm ack")?;
                    C::AlarmAck {
                        name: w[2].to_string(),
                    }
                }
                Some(sub) => return Err(unknown_sub("alarm", sub)),
                None => return Err(ConsoleError::Usage(usage("alarm ack"))),
            },
            "timeline" => match w.len() {
                1 => C::Timeline { last: 20 },
                2 => C::Timeline {
                    last: number::<usize>(w[1], "N")?.clamp(1, MAX_EVENTS),
                },
                _ => return Err(ConsoleError::Usage(usage("timeline"))),
            },
            "drain" => match w.len() {
                1 => C::Drain { drain: true },
                2 => C::Drain {
                    drain: on_off(w[1])?,
                },
                _ => return Err(ConsoleError::Usage(usage("drain"))),
            },
            "cert" => {
                if let Some(sub) = w.get(1).filter(|s| **s != "revoke") {
                    return Err(unknown_sub("cert", sub));
                }
                if w.len() != 4 {
                    return Err(ConsoleError::Usage(usage("cert revoke")));
                }
                C::CertRevoke {
                    node: number(w[2], "NODE")?,
                    min_serial: number(w[3], "MIN_SERIAL")?,
                }
            }
            "leader" => {
                if let Some(sub) = w.get(1).filter(|s| **s != "transfer") {
                    return Err(unknown_sub("leader", sub));
                }
                exact(3, "leader transfer")?;
                C::LeaderTransfer {
                    to: number(w[2], "NODE")?,
                }
            }
            "operation" => {
                if let Some(sub) = w.get(1).filter(|s| **s != "record") {
                    return Err(unknown_sub("operation", sub));
                }
                if w.len() < 4 {
                    return Err(ConsoleError::Usage(usage("operation record")));
                }
                C::OperationRecord {
                    what: channel(w[2])?,
                    detail: w[3..].join(" "),
                }
            }
            "log" => match w.get(1).copied() {
                Some("level") => {
                    exact(4, "log level")?;
                    C::LogLevel {
                        channel: channel(w[2])?,
                        level: level(w[3])?,
                    }
                }
                Some("rate") => {
                    exact(4, "log rate")?;
                    let n = w[3].strip_suffix("/s").unwrap_or(w[3]);
                    let per_s: u32 = number(n, "rate")?;
                    if per_s == 0 {
                        return Err(ConsoleError::BadArgument(
                            "rate must be at least 1/s (use `log level CHANNEL off` to silence)"
                                .into(),
                        ));
                    }
                    C::LogRate {
                        channel: channel(w[2])?,
                        per_s,
                    }
                }
                Some("stats") => exact(2, "log stats").map(|_| C::LogStats)?,
                Some("tail") => match w.len() {
                    2 => C::LogTail { lines: 20 },
                    3 => C::LogTail {
                        lines: number::<usize>(w[2], "N")?.clamp(1, MAX_TAIL),
                    },
                    _ => return Err(ConsoleError::Usage(usage("log tail"))),
                },
                Some(sub) => return Err(unknown_sub("log", sub)),
                None => return Err(ConsoleError::Usage("log level|rate|stats|tail ...")),
            },
            "config" => match w.get(1).copied() {
                Some("get") => {
                    exact(3, "config get")?;
                    C::ConfigGet {
                        key: w[2].to_string(),
                    }
                }
                Some("set") => {
                    exact(4, "config set")?;
                    C::ConfigSet {
                        key: w[2].to_string(),
                        value: w[3].to_string(),
                    }
                }
                Some(sub) => return Err(unknown_sub("config", sub)),
                None => return Err(ConsoleError::Usage("config get|set ...")),
            },
            "fault" => match w.get(1).copied() {
                Some("log-stall") => {
                    exact(4, "fault log-stall")?;
                    C::FaultLogStall {
                        sink: channel(w[2])?,
                        stall: on_off(w[3])?,
                    }
                }
                Some("log-emit") => {
                    if !(4..=6).contains(&w.len()) {
                        return Err(ConsoleError::Usage(usage("fault log-emit")));
                    }
                    let count: u64 = number(w[3], "COUNT")?;
                    if count > MAX_EMIT {
                        return Err(ConsoleError::BadArgument(format!(
                            "COUNT must be at most {MAX_EMIT}"
                        )));
                    }
                    let per_s = match w.get(5) {
                        None => None,
                        Some(r) => {
                            let n: u64 = number(r.strip_suffix("/s").unwrap_or(r), "rate")?;
                            if n == 0 || count / n > MAX_EMIT_SECS {
                                return Err(ConsoleError::BadArgument(format!(
                                    "the rate must be positive and the emission last at most {MAX_EMIT_SECS} s"
                                )));
                            }
                            Some(n)
                        }
                    };
                    C::FaultLogEmit {
                        channel: channel(w[2])?,
                        count,
                        level: level(w.get(4).copied().unwrap_or("warn"))?,
                        per_s,
                    }
                }
                Some("block-loop") => {
                    exact(3, "fault block-loop")?;
                    let ms: u64 = number(w[2], "MS")?;
                    if ms > MAX_BLOCK_MS {
                        return Err(ConsoleError::BadArgument(format!(
                            "MS must be at most {MAX_BLOCK_MS}"
                        )));
                    }
                    C::FaultBlockLoop { ms }
                }
                Some(sub) => return Err(unknown_sub("fault", sub)),
                None => {
                    return Err(ConsoleError::Usage(
                        "fault log-stall|log-emit|block-loop ...",
                    ))
                }
            },
            other if other.chars().all(|c| c.is_ascii_lowercase() || c == '_') => C::Service {
                args: w.iter().map(|x| x.to_string()).collect(),
            },
            other => return Err(unknown(other, &[])),
        })
    }

    /// The `COMMANDS` entry of the command (`None` for a service's), by
    /// an exhaustive match: a new command must name its entry.
    pub fn word(&self) -> Option<&'static str> {
        use ConsoleCommand as C;
        Some(match self {
            C::Help => "help",
            C::Status => "status",
            C::Stage => "stage",
            C::Health => "health",
            C::Shards => "shards",
            C::LogLevel { .. } => "log level",
            C::LogRate { .. } => "log rate",
            C::LogStats => "log stats",
            C::LogTail { .. } => "log tail",
            C::ConfigGet { .. } => "config get",
            C::ConfigSet { .. } => "config set",
            C::Drain { .. } => "drain",
            C::CertRevoke { .. } => "cert revoke",
            C::LeaderTransfer { .. } => "leader transfer",
            C::OperationRecord { .. } => "operation record",
            C::Tasks => "tasks",
            C::Alarms => "alarms",
            C::AlarmAck { .. } => "alarm ack",
            C::Timeline { .. } => "timeline",
            C::FaultLogStall { .. } => "fault log-stall",
            C::FaultLogEmit { .. } => "fault log-emit",
            C::FaultBlockLoop { .. } => "fault block-loop",
            C::Service { .. } => return None,
        })
    }

    /// The usage line of the command (`None` for a service's).
    pub fn usage(&self) -> Option<&'static str> {
        self.word().map(usage)
    }

    /// Whether the command changes anything on the node or the cluster.
    pub fn is_mutation(&self) -> bool {
        use ConsoleCommand as C;
        matches!(
            self,
            C::LogLevel { .. }
                | C::LogRate { .. }
                | C::Drain { .. }
                | C::ConfigSet { .. }
                | C::AlarmAck { .. }
                | C::CertRevoke { .. }
                | C::LeaderTransfer { .. }
                | C::OperationRecord { .. }
                | C::FaultLogStall { .. }
                | C::FaultLogEmit { .. }
                | C::FaultBlockLoop { .. }
                | C::Service { .. }
        )
    }

    fn is_fault(&self) -> bool {
        use ConsoleCommand as C;
        matches!(
            self,
            C::FaultLogStall { .. } | C::FaultLogEmit { .. } | C::FaultBlockLoop { .. }
        )
    }

    /// A short name for the watchdog's registry.
    pub fn name(&self) -> String {
        format!("{self:?}")
    }
}

/// A command's answer: a line for a table, and the data behind it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsoleReply {
    /// One line, for `orrery exec`'s table.
    pub summary: String,
    /// Everything, as JSON.
    pub data: serde_json::Value,
}

fn reply<T: Serialize>(summary: String, data: &T) -> Result<ConsoleReply, ConsoleError> {
    Ok(ConsoleReply {
        summary,
        data: serde_json::to_value(data).map_err(|e| ConsoleError::Failed(e.to_string()))?,
    })
}

/// What `config get` shows instead of a credential.
pub const REDACTED: &str = "<redacted>";

/// Whether a configuration key names a credential: the cluster secret, a
/// token, a password, a key.
pub fn is_credential_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "secret",
        "token",
        "password",
        "passwd",
        "pwd",
        "key",
        "apikey",
        "passphrase",
    ];
    WORDS.iter().any(|w| {
        k.strip_suffix(w)
            .is_some_and(|rest| rest.is_empty() || rest.ends_with('_') || rest.ends_with('.'))
    }) || k.ends_with("_secret_file")
}

/// Replaces every credential inside `v`: values under credential keys, and
/// passwords inside connection strings (`postgres://user:pw@host/db`,
/// `password=pw`) wherever they appear.
pub fn redact_credentials(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if is_credential_key(k) && !x.is_null() {
                    *x = Value::String(REDACTED.into());
                } else {
                    redact_credentials(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact_credentials),
        Value::String(s) => {
            let lower = s.to_ascii_lowercase();
            if s.contains("://") || lower.contains("password") {
                *s = orrery_store::redact_url(s);
            }
        }
        _ => {}
    }
}

/// `config get`: the value at a dotted key of the node's configuration;
/// credentials are never shown (see [`redact_credentials`]).
pub fn config_value(cfg: &crate::NodeConfig, key: &str) -> Result<serde_json::Value, ConsoleError> {
    if key.split('.').any(is_credential_key) {
        return Ok(serde_json::Value::String(REDACTED.into()));
    }
    let mut v = serde_json::to_value(cfg).map_err(|e| ConsoleError::Failed(e.to_string()))?;
    redact_credentials(&mut v);
    let mut at = &v;
    for part in key.split('.') {
        at = match at {
            serde_json::Value::Object(o) => o.get(part),
            serde_json::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| ConsoleError::BadArgument(format!("no config key `{key}`")))?;
    }
    Ok(at.clone())
}

impl Node {
    /// Every command this node runs: the built-in ones and its services'
    /// (`GET /commands`, and `help`).
    pub fn command_list(&self) -> CommandList {
        CommandList {
            builtin: COMMANDS.iter().map(|(_, u)| u.to_string()).collect(),
            services: self
                .inner()
                .console_ext
                .iter()
                .map(|e| ServiceCommands {
                    word: e.word().to_string(),
                    usage: e.usage().into_iter().map(str::to_string).collect(),
                })
                .collect(),
        }
    }

    /// Runs one console command on this node.
    pub async fn console(&self, cmd: ConsoleCommand) -> Result<ConsoleReply, ConsoleError> {
        use ConsoleCommand as C;
        let inner = self.inner();
        if cmd.is_fault() && !inner.cfg.admin.fault_commands {
            return Err(ConsoleError::FaultsDisabled);
        }
        let _guard = inner.watchdog.begin(format!("console: {}", cmd.name()));
        let log = || {
            inner.log.get().ok_or_else(|| {
                ConsoleError::Failed(
                    "this node's logging channels are not managed by orrery (embedded node)".into(),
                )
            })
        };
        match cmd {
            C::Help => {
                let list = self.command_list();
                let mut words = command_words();
                words.extend(list.services.iter().map(|s| s.word.as_str()));
                let lines = help_lines::<&str>(&[], &list.services)?;
                reply(
                    format!(
                        "commands: {} ({} with sub-commands; `help` in orrery exec or console prints each usage)",
                        words.join(", "),
                        lines.len(),
                    ),
                    &lines,
                )
            }
            C::Service { args } => {
                let word = args.first().map(String::as_str).unwrap_or_default();
                let Some(ext) = inner.console_ext.iter().find(|e| e.word() == word) else {
                    let words: Vec<&str> = inner.console_ext.iter().map(|e| e.word()).collect();
                    return Err(unknown(word, &words));
                };
                let (summary, data) = ext.run(&args[1..]).await.map_err(ConsoleError::Failed)?;
                Ok(ConsoleReply { summary, data })
            }
            C::Status => {
                let s = self.status();
                let no_quorum = s
                    .no_quorum
                    .as_ref()
                    .map(|nq| format!("; {nq}"))
                    .unwrap_or_default();
                reply(
                    format!(
                        "stage {} epoch {} {}{}{no_quorum}",
                        s.stage,
                        s.epoch,
                        if s.serving { "serving" } else { "not serving" },
                        if s.is_leader { ", leader" } else { "" }
                    ),
                    &s,
                )
            }
            C::Stage => {
                let s = self.status();
                let name = Stage::from_number(s.stage)
                    .map(|st| st.name())
                    .unwrap_or("?");
                let waiting = s.waiting.as_ref().map(|w| w.to_string());
                reply(
                    match &waiting {
                        Some(w) => format!("stage {} ({name}); waiting: {w}", s.stage),
                        None => format!("stage {} ({name})", s.stage),
                    },
                    &serde_json::json!({
                        "stage": s.stage, "name": name, "since_ms": s.stage_since_ms,
                        "waiting": s.waiting, "progress": s.progress,
                    }),
                )
            }
            C::Health => {
                let h = inner.health.report();
                reply(format!("{:?}, lag {} ms", h.state, h.lag_ms), &h)
            }
            C::Shards => {
                let (_, h) = self.shards();
                reply(
                    format!(
                        "{} assigned, {} loaded, {} loading (map v{})",
                        h.assigned, h.loaded, h.loading, h.map_version
                    ),
                    &h,
                )
            }
            C::LogLevel { channel, level } => {
                log()?
                    .set_level(&channel, &level)
                    .map_err(|e| ConsoleError::BadArgument(e.to_string()))?;
                reply(
                    format!("{channel} = {level}"),
                    &serde_json::json!({"channel": channel, "level": level}),
                )
            }
            C::LogRate { channel, per_s } => {
                log()?
                    .set_rate(&channel, per_s)
                    .map_err(|e| ConsoleError::BadArgument(e.to_string()))?;
                reply(
                    format!("{channel} at most {per_s}/s"),
                    &serde_json::json!({"channel": channel, "rate_per_s": per_s}),
                )
            }
            C::LogStats => {
                let st = log()?.stats();
                let dropped: u64 = st
                    .channels
                    .iter()
                    .map(|c| c.dropped_queue_full + c.dropped_rate_limited)
                    .sum();
                let written: u64 = st.channels.iter().map(|c| c.written).sum();
                let stalled: Vec<&str> = st
                    .sinks
                    .iter()
                    .filter(|s| s.stalled)
                    .map(|s| s.name.as_str())
                    .collect();
                let mut summary = format!("{written} written, {dropped} dropped");
                if let Some(worst) = st
                    .channels
                    .iter()
                    .max_by_key(|c| c.dropped_queue_full + c.dropped_rate_limited)
                    .filter(|c| c.dropped_queue_full + c.dropped_rate_limited > 0)
                {
                    summary.push_str(&format!(
                        " (most on {}: {})",
                        worst.channel,
                        worst.dropped_queue_full + worst.dropped_rate_limited
                    ));
                }
                if !stalled.is_empty() {
                    summary.push_str(&format!("; stalled sinks: {}", stalled.join(", ")));
                }
                reply(summary, &st)
            }
            C::LogTail { lines } => {
                let Some(cl) = self.cluster_log() else {
                    return Err(ConsoleError::Failed(format!(
                        "node {} does not collect the cluster's logs (log_forward.collector = {:?})",
                        inner.cfg.node_id, inner.cfg.log_forward.collector
                    )));
                };
                let tail = cl.tail(lines);
                let last = tail
                    .last()
                    .map(|l| {
                        format!(
                            "; last: [node {}] {} {}: {}",
                            l.node, l.level, l.channel, l.message
                        )
                    })
                    .unwrap_or_default();
                reply(format!("{} lines{last}", tail.len()), &tail)
            }
            C::ConfigGet { key } => {
                let v = config_value(&inner.cfg, &key)?;
                reply(format!("{key} = {v} (this node's file)"), &v)
            }
            C::ConfigSet { key, value } => {
                self.set_config(&key, &value).await?;
                reply(
                    format!("config set {key} = {value}: in force cluster-wide for every decision; a node whose own file says otherwise raises a drift alarm until its file is changed and it restarts"),
                    &serde_json::json!({"key": key, "value": value}),
                )
            }
            C::Drain { drain } => {
                let me = inner.cfg.node_id;
                self.drain(me, drain).await?;
                reply(
                    format!("node {me} {}", if drain { "draining" } else { "undrained" }),
                    &serde_json::json!({"node": me, "draining": drain}),
                )
            }
            C::CertRevoke { node, min_serial } => {
                self.revoke_certificates(node, min_serial).await?;
                reply(
                    format!("node {node}'s certificates below serial {min_serial} are revoked"),
                    &serde_json::json!({"node": node, "min_serial": min_serial}),
                )
            }
            C::LeaderTransfer { to } => {
                self.transfer_leader(to)
                    .await
                    .map_err(ConsoleError::Failed)?;
                reply(
                    format!("leadership handed to node {to}"),
                    &serde_json::json!({"from": inner.cfg.node_id, "to": to}),
                )
            }
            C::OperationRecord { what, detail } => {
                let cmd = orrery_core::Command::Operation {
                    what: what.clone(),
                    detail,
                    at: crate::clock::now_ms(),
                };
                match inner.propose(cmd).await? {
                    orrery_core::Response::Ok => {}
                    orrery_core::Response::Rejected { reason, .. } => {
                        return Err(ConsoleError::Failed(reason))
                    }
                    other => return Err(ConsoleError::Failed(format!("{other:?}"))),
                }
                reply(
                    format!("{what} recorded in the timeline"),
                    &serde_json::json!({"what": what}),
                )
            }
            C::Alarms => {
                let alarms = inner.status_now().alarms;
                let lines: Vec<String> = alarms
                    .iter()
                    .map(|a| {
                        let sev = match a.severity {
                            crate::alarms::Severity::Critical => "CRITICAL",
                            crate::alarms::Severity::Warning => "warning",
                        };
                        let ack = if a.acked { " (acked)" } else { "" };
                        format!("{sev} {}{ack}: {}", a.name(), a.what)
                    })
                    .collect();
                let text = if lines.is_empty() {
                    "no alarms in force".to_string()
                } else {
                    lines.join("\n")
                };
                reply(text, &alarms)
            }
            C::AlarmAck { name } => {
                if !inner.ack_alarm(&name) {
                    return Err(ConsoleError::BadArgument(format!(
                        "no alarm {name} in force on node {} (see `alarms`)",
                        inner.cfg.node_id
                    )));
                }
                reply(
                    format!("alarm {name} acknowledged until it clears"),
                    &serde_json::json!({"acked": name}),
                )
            }
            C::Tasks => {
                let r = inner.watchdog.report();
                let oldest = r
                    .in_flight
                    .first()
                    .map(|h| format!("; oldest: {} ({} ms)", h.what, h.for_ms))
                    .unwrap_or_default();
                reply(
                    format!(
                        "lag p99 {:.1} ms, max {:.1} ms; {} in flight{oldest}",
                        r.lag_p99_ms, r.lag_max_ms, r.in_flight_total
                    ),
                    &r,
                )
            }
            C::Timeline { last } => {
                let s = self.cluster_state().await.map_err(ConsoleError::Failed)?;
                let events: Vec<_> = s.events.iter().rev().take(last).rev().cloned().collect();
                reply(format!("{} events", events.len()), &events)
            }
            C::FaultLogStall { sink, stall } => {
                log()?
                    .stall_sink(&sink, stall)
                    .map_err(|e| ConsoleError::BadArgument(e.to_string()))?;
                reply(
                    format!("sink {sink} {}", if stall { "stalled" } else { "released" }),
                    &serde_json::json!({"sink": sink, "stalled": stall}),
                )
            }
            C::FaultLogEmit {
                channel,
                count,
                level,
                per_s,
            } => {
                let l = log()?;
                let lvl: tracing::Level = level
                    .parse()
                    .map_err(|_| ConsoleError::BadArgument(format!("level `{level}`")))?;
                // On the event loop, like any handler that logs: submitting
                // never waits, whatever the sink does. Paced, it submits a
                // batch every 10 ms.
                let batch = per_s.map(|r| (r / 100).max(1)).unwrap_or(count.max(1));
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut i = 0;
                while i < count {
                    tick.tick().await;
                    for _ in 0..batch.min(count - i) {
                        l.submit(&channel, lvl, format!("fault log-emit line {i} of {count}"));
                        i += 1;
                    }
                }
                reply(
                    format!("{count} lines submitted on {channel}"),
                    &serde_json::json!({"channel": channel, "count": count}),
                )
            }
            C::FaultBlockLoop { ms } => {
                // Deliberately blocks this runtime worker: a CPU hog inside a
                // handler, for the watchdog to name.
                std::thread::sleep(Duration::from_millis(ms));
                reply(
                    format!("blocked a worker for {ms} ms"),
                    &serde_json::json!({"ms": ms}),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ConsoleCommand, ConsoleError> {
        ConsoleCommand::parse(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn parses_every_command() {
        use ConsoleCommand as C;
        assert_eq!(p("status"), Ok(C::Status));
        assert_eq!(
            p("log level noisy DEBUG"),
            Ok(C::LogLevel {
                channel: "noisy".into(),
                level: "debug".into()
            })
        );
        assert_eq!(
            p("log rate orrery_node::lease 50/s"),
            Ok(C::LogRate {
                channel: "orrery_node::lease".into(),
                per_s: 50
            })
        );
        assert_eq!(p("drain off"), Ok(C::Drain { drain: false }));
        assert_eq!(
            p("cert revoke 4 9"),
            Ok(C::CertRevoke {
                node: 4,
                min_serial: 9
            })
        );
        assert!(p("cert revoke 4").is_err());
        assert!(p("cert renew 4 9").is_err());
        assert_eq!(p("timeline 5"), Ok(C::Timeline { last: 5 }));
        assert_eq!(
            p("fault log-emit noisy 500"),
            Ok(C::FaultLogEmit {
                channel: "noisy".into(),
                count: 500,
                level: "warn".into(),
                per_s: None,
            })
        );
        assert!(p("log level noisy debug").unwrap().is_mutation());
        assert!(!p("log stats").unwrap().is_mutation());
        assert!(p("config get startup.stage_deadline_ms").is_ok());
    }

    fn config_with_store(url: &str) -> crate::NodeConfig {
        let text = format!(
            r#"
node_id = 1
cluster_id = "test"
secret = "0123456789abcdef-cluster-secret"
data_dir = "/tmp/x"
[admin]
token = "0123456789abcdef-admin-token"
[store]
backend = "postgres"
url = "{url}"
[app.extra]
api_token = "0123456789-app-token"
dsn = "host=h password=kvsecret dbname=d"
[[nodes]]
id = 1
addr = "127.0.0.1:1"
admin_addr = "127.0.0.1:2"
role = "voter"
"#
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn config_get_shows_no_credential() {
        let cfg = config_with_store("postgres://u:secretpw@h/db");
        assert_eq!(
            config_value(&cfg, "store.url").unwrap(),
            serde_json::json!("postgres://u:***@h/db")
        );
        for key in ["secret", "admin.token", "app.extra.api_token"] {
            assert_eq!(
                config_value(&cfg, key).unwrap(),
                serde_json::json!(REDACTED),
                "{key}"
            );
        }
        // Nothing anywhere in the whole tree, either.
        let mut all = serde_json::to_value(&cfg).unwrap();
        redact_credentials(&mut all);
        let text = all.to_string();
        for secret in [
            "secretpw",
            "cluster-secret",
            "admin-token",
            "app-token",
            "kvsecret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        for key in ["store", "app", "admin", "app.extra"] {
            let v = config_value(&cfg, key).unwrap().to_string();
            assert!(
                !v.contains("secretpw") && !v.contains("token\":\"0"),
                "{key}: {v}"
            );
        }
        // Nor in the configuration's `Debug`.
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("secretpw") && !debug.contains("cluster-secret"),
            "{debug}"
        );
        // Ordinary values are untouched.
        assert_eq!(
            config_value(&cfg, "store.backend").unwrap(),
            serde_json::json!("postgres")
        );
        let cfg = config_with_store("postgres://h/db?user=u&password=qsecret");
        let v = config_value(&cfg, "store.url").unwrap().to_string();
        assert!(!v.contains("qsecret"), "{v}");
    }

    #[test]
    fn refuses_bad_input_with_a_clear_error() {
        assert_eq!(p(""), Err(ConsoleError::Empty));
        // Unknown words go to the node, which refuses what no service registered.
        assert!(matches!(p("rm -rf /"), Ok(ConsoleCommand::Service { .. })));
        assert!(matches!(p("rm; -rf"), Err(ConsoleError::Unknown { word, .. }) if word == "rm;"));
        assert!(matches!(p("Rm"), Err(ConsoleError::Unknown { word, .. }) if word == "Rm"));
        assert!(
            matches!(p("log level noisy loud"), Err(ConsoleError::BadArgument(m)) if m.contains("loud"))
        );
        assert!(matches!(
            p("log rate noisy 0/s"),
            Err(ConsoleError::BadArgument(_))
        ));
        assert!(matches!(
            p("log rate noisy many"),
            Err(ConsoleError::BadArgument(_))
        ));
        assert!(matches!(
            p("log level a;b debug"),
            Err(ConsoleError::BadArgument(_))
        ));
        assert!(matches!(
            p("status now"),
            Err(ConsoleError::Usage("status"))
        ));
        assert!(matches!(
            p("fault block-loop 999999"),
            Err(ConsoleError::BadArgument(_))
        ));
        let long = "x".repeat(MAX_ARG_LEN + 1);
        assert_eq!(
            ConsoleCommand::parse(&["log", "level", &long, "info"]),
            Err(ConsoleError::TooLong)
        );
        for (word, _) in COMMANDS {
            assert!(!word.is_empty());
        }
    }

    /// One of every command, and an exhaustive match that stops compiling
    /// when a variant is added (add it here too).
    fn one_of_each() -> Vec<ConsoleCommand> {
        use ConsoleCommand as C;
        let s = || "x".to_string();
        let all = vec![
            C::Help,
            C::Status,
            C::Stage,
            C::Health,
            C::Shards,
            C::LogLevel {
                channel: s(),
                level: s(),
            },
            C::LogRate {
                channel: s(),
                per_s: 1,
            },
            C::LogStats,
            C::LogTail { lines: 1 },
            C::ConfigGet { key: s() },
            C::ConfigSet {
                key: s(),
                value: s(),
            },
            C::Drain { drain: true },
            C::CertRevoke {
                node: 1,
                min_serial: 1,
            },
            C::LeaderTransfer { to: 2 },
            C::OperationRecord {
                what: s(),
                detail: s(),
            },
            C::Tasks,
            C::Alarms,
            C::AlarmAck { name: s() },
            C::Timeline { last: 1 },
            C::FaultLogStall {
                sink: s(),
                stall: true,
            },
            C::FaultLogEmit {
                channel: s(),
                count: 1,
                level: s(),
                per_s: None,
            },
            C::FaultBlockLoop { ms: 1 },
            C::Service { args: vec![s()] },
        ];
        let index = |c: &C| match c {
            C::Help => 0,
            C::Status => 1,
            C::Stage => 2,
            C::Health => 3,
            C::Shards => 4,
            C::LogLevel { .. } => 5,
            C::LogRate { .. } => 6,
            C::LogStats => 7,
            C::LogTail { .. } => 8,
            C::ConfigGet { .. } => 9,
            C::Drain { .. } => 10,
            C::CertRevoke { .. } => 11,
            C::Tasks => 12,
            C::Timeline { .. } => 13,
            C::FaultLogStall { .. } => 14,
            C::FaultLogEmit { .. } => 15,
            C::FaultBlockLoop { .. } => 16,
            C::Service { .. } => 17,
            C::LeaderTransfer { .. } => 18,
            C::OperationRecord { .. } => 19,
            C::ConfigSet { .. } => 20,
            C::Alarms => 21,
            C::AlarmAck { .. } => 22,
        };
        let seen: std::collections::BTreeSet<usize> = all.iter().map(index).collect();
        assert_eq!(seen, (0..=22).collect(), "one_of_each lacks a variant");
        all
    }

    /// A line a usage describes: placeholders filled in, optional parts
    /// left out (or, `full`, put in).
    fn example(usage: &str, full: bool) -> String {
        let mut out = Vec::new();
        let mut depth = 0usize;
        for tok in usage.split_whitespace() {
            if tok.starts_with('(') {
                break;
            }
            let opens = tok.matches('[').count();
            if opens > 0 && !full {
                depth += opens;
            }
            let inside = depth > 0;
            if !full {
                depth -= tok.matches(']').count().min(depth);
            }
            if inside {
                continue;
            }
            let t = tok.trim_matches(|c| c == '[' || c == ']');
            let t = t.split('|').next().unwrap_or(t);
            out.push(match t {
                "LEVEL" => "warn".to_string(),
                "N/s" => "5/s".to_string(),
                _ if t.chars().any(|c| c.is_ascii_uppercase()) => "5".to_string(),
                _ => t.to_string(),
            });
        }
        out.join(" ")
    }

    #[test]
    fn every_command_has_help_and_every_help_line_parses() {
        // Every command (but a service's) names an entry of COMMANDS...
        for c in one_of_each() {
            match c.word() {
                Some(w) => assert!(
                    COMMANDS.iter().any(|(k, _)| *k == w),
                    "{c:?}: `{w}` is not in COMMANDS"
                ),
                None => assert!(matches!(c, ConsoleCommand::Service { .. })),
            }
        }
        // ...and every entry's usage, filled in, parses back to its command.
        let mut keys = std::collections::BTreeSet::new();
        for (key, usage) in COMMANDS {
            assert!(keys.insert(*key), "`{key}` twice in COMMANDS");
            assert!(usage.starts_with(key), "{key}: {usage}");
            for full in [false, true] {
                let line = example(usage, full);
                let cmd = p(&line).unwrap_or_else(|e| panic!("`{line}` ({usage}): {e}"));
                assert_eq!(cmd.word(), Some(*key), "`{line}`");
                assert_eq!(cmd.usage(), Some(*usage));
            }
        }
        // `help` lists them all, one per line; `help log` only log's.
        let all = help_lines::<&str>(&[], &[]).unwrap();
        assert_eq!(all.len(), COMMANDS.len());
        for (_, usage) in COMMANDS {
            assert!(all.iter().any(|l| l == usage), "help lacks {usage}");
        }
        let log = help_lines(&["log"], &[]).unwrap();
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(log.iter().all(|l| l.starts_with("log ")));
        assert_eq!(
            help_lines(&["log", "level"], &[]).unwrap(),
            vec![usage("log level").to_string()]
        );
        // Services' commands are listed too, and found by their word.
        let universe = ServiceCommands {
            word: "universe".into(),
            usage: vec!["universe stats [N]".into(), "universe tick SYSTEM".into()],
        };
        let svc = std::slice::from_ref(&universe);
        assert_eq!(
            help_lines::<&str>(&[], svc).unwrap().len(),
            COMMANDS.len() + 2
        );
        assert_eq!(
            help_lines(&["universe", "tick"], svc).unwrap(),
            vec!["universe tick SYSTEM".to_string()]
        );
        assert!(matches!(
            help_lines(&["lgo"], svc),
            Err(ConsoleError::Unknown { suggestion: Some(s), .. }) if s == "log"
        ));
    }

    #[test]
    fn a_mistyped_command_gets_a_suggestion() {
        assert_eq!(edit_distance("lgo", "log"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(suggest("lgo", command_words()), Some("log".into()));
        assert_eq!(suggest("stauts", command_words()), Some("status".into()));
        assert_eq!(suggest("helth", command_words()), Some("health".into()));
        assert_eq!(suggest("timelin", command_words()), Some("timeline".into()));
        assert_eq!(suggest("frobnicate", command_words()), None);
        assert_eq!(suggest("x", command_words()), None);
        // A service's word is a candidate where the services are known.
        assert_eq!(
            check_service(&["univers", "stats"], &["universe"]),
            Err(ConsoleError::Unknown {
                word: "univers".into(),
                suggestion: Some("universe".into())
            })
        );
        assert!(check_service(&["universe", "stats"], &["universe"]).is_ok());
        let e = check_service(&["lgo", "level", "x", "debug"], &["universe"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown command `lgo` (did you mean `log`?); `help` lists the commands"
        );
        // Sub-commands too.
        assert_eq!(
            p("log levl x debug"),
            Err(ConsoleError::Unknown {
                word: "log levl".into(),
                suggestion: Some("log level".into())
            })
        );
        assert!(matches!(
            p("fault block-lop 5"),
            Err(ConsoleError::Unknown { suggestion: Some(s), .. }) if s == "fault block-loop"
        ));
        assert!(matches!(
            p("config gte k"),
            Err(ConsoleError::Unknown { suggestion: Some(s), .. }) if s == "config get"
        ));
        assert!(matches!(p("log"), Err(ConsoleError::Usage(_))));
    }
}
