//! `[store]` configuration: every bound has a key and a default.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Which database holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// One SQLite file, shared by the processes of one machine (WAL mode).
    #[default]
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// The resolved back end: what `open` connects to.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite { path: PathBuf },
    Postgres { url: String },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            Backend::Postgres { url } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .finish(),
        }
    }
}

/// `[store]`:
///
/// ```toml
/// [store]
/// backend = "sqlite"            # or "postgres"
/// path = "data/store.sqlite3"   # sqlite only
/// url = "postgres://orrery@127.0.0.1:5432/orrery"   # postgres only
/// busy_timeout_ms = 5000
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `"sqlite"` (default) or `"postgres"`.
    pub backend: BackendKind,
    /// SQLite database file (required for `sqlite`; its directory must exist).
    pub path: Option<PathBuf>,
    /// PostgreSQL connection string, URL (`postgres://user:pw@host:port/db`) or
    /// key-value (`host=... dbname=...`) form (required for `postgres`).
    pub url: Option<String>,
    /// SQLite: how long a statement waits for another connection's lock before `Busy`.
    pub busy_timeout_ms: u64,
    /// PostgreSQL: TCP connect (and authentication) timeout.
    pub connect_timeout_ms: u64,
    /// PostgreSQL: server-side `statement_timeout` for every statement.
    pub statement_timeout_ms: u64,
    /// Connections kept per store (both back ends), 1..=64.
    pub pool_size: usize,
    /// How long an operation waits for a free pooled connection before `Busy`.
    pub pool_wait_ms: u64,
    /// Largest value (`Op::Put`, job row) in bytes.
    pub max_value_bytes: usize,
    /// Longest shard, table, key or job name in bytes.
    pub max_name_bytes: usize,
    /// Most ops in one `write`, most rows in one `commit_job`.
    pub max_batch_ops: usize,
    /// Most rows one `scan` or `job_periods` may return.
    pub max_scan_rows: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: BackendKind::Sqlite,
            path: None,
            url: None,
            busy_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 30_000,
            pool_size: 4,
            pool_wait_ms: 10_000,
            max_value_bytes: 1 << 20,
            max_name_bytes: 256,
            max_batch_ops: 1_000,
            max_scan_rows: 10_000,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("pool_size", &self.pool_size)
            .field("pool_wait_ms", &self.pool_wait_ms)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("max_name_bytes", &self.max_name_bytes)
            .field("max_batch_ops", &self.max_batch_ops)
            .field("max_scan_rows", &self.max_scan_rows)
            .finish()
    }
}

/// Upper bounds of the numeric keys: a typo of three zeros is refused, not obeyed.
const MAX_TIMEOUT_MS: u64 = 600_000;
const MAX_POOL: usize = 64;
const MAX_VALUE_BYTES: usize = 64 << 20;
const MAX_NAME_BYTES: usize = 4_096;
const MAX_BATCH: usize = 100_000;
const MAX_SCAN: usize = 1_000_000;

impl StoreConfig {
    /// A SQLite config with defaults.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            backend: BackendKind::Sqlite,
            path: Some(path.into()),
            ..StoreConfig::default()
        }
    }

    /// A PostgreSQL config with defaults.
    pub fn postgres(url: impl Into<String>) -> Self {
        StoreConfig {
            backend: BackendKind::Postgres,
            url: Some(url.into()),
            ..StoreConfig::default()
        }
    }

    /// Checks every key; returns the back end to open.
    pub fn validate(&self) -> Result<Backend, StoreError> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(StoreError::Config(format!(
                    "store.{key} = {v} is out of range {lo}..={hi}"
                )))
            } else {
                Ok(())
            }
        };
        range("busy_timeout_ms", self.busy_timeout_ms, 1, MAX_TIMEOUT_MS)?;
        range(
            "connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        )?;
        range(
            "statement_timeout_ms",
            self.statement_timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        )?;
        range("pool_wait_ms", self.pool_wait_ms, 1, MAX_TIMEOUT_MS)?;
        range("pool_size", self.pool_size as u64, 1, MAX_POOL as u64)?;
        range(
            "max_value_bytes",
            self.max_value_bytes as u64,
            1,
            MAX_VALUE_BYTES as u64,
        )?;
        range(
            "max_name_bytes",
            self.max_name_bytes as u64,
            1,
            MAX_NAME_BYTES as u64,
        )?;
        range(
            "max_batch_ops",
            self.max_batch_ops as u64,
            1,
            MAX_BATCH as u64,
        )?;
        range(
            "max_scan_rows",
            self.max_scan_rows as u64,
            1,
            MAX_SCAN as u64,
        )?;
        match self.backend {
            BackendKind::Sqlite => {
                if self.url.is_some() {
                    return Err(StoreError::Config(
                        "store.url is for backend = \"postgres\"; sqlite takes store.path".into(),
                    ));
                }
                match &self.path {
                    Some(p) if !p.as_os_str().is_empty() => Ok(Backend::Sqlite { path: p.clone() }),
                    _ => Err(StoreError::Config(
                        "backend = \"sqlite\" needs store.path (the database file)".into(),
                    )),
                }
            }
            BackendKind::Postgres => {
                if self.path.is_some() {
                    return Err(StoreError::Config(
                        "store.path is for backend = \"sqlite\"; postgres takes store.url".into(),
                    ));
                }
                match &self.url {
                    Some(u) if !u.trim().is_empty() => {
                        u.parse::<postgres::Config>().map_err(|e| {
                            StoreError::Config(format!(
                                "store.url ({}) does not parse: {e}",
                                redact_url(u)
                            ))
                        })?;
                        Ok(Backend::Postgres { url: u.clone() })
                    }
                    _ => Err(StoreError::Config(
                        "backend = \"postgres\" needs store.url (a connection string)".into(),
                    )),
                }
            }
        }
    }
}

/// The connection string with every password replaced by `***`, for
/// logs, errors and `config get`: the URL form's `user:password@` and
/// `?password=` parameter, the key-value form's `password=` (quoted or not).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_key_values(url);
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{}:***{}", &authority[..colon], &authority[at..]),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    format!("{head}{authority}{}", redact_query(tail))
}

/// `path?a=1&password=pw` -> `path?a=1&password=***`.
fn redact_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_string();
    };
    let (path, query) = tail.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}{}", parts.join("&"))
}

/// Key-value form (`host=h password = 'p w' dbname=d`): every password
/// value replaced, everything else kept as written.
fn redact_key_values(s: &str) -> String {
    const WORD: &str = "password";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.to_ascii_lowercase().find(WORD) {
        let (before, after) = rest.split_at(i + WORD.len());
        out.push_str(before);
        let word_start = i == 0 || rest[..i].ends_with(char::is_whitespace);
        let eq = after.trim_start();
        if !word_start || !eq.starts_with('=') {
            rest = after;
            continue;
        }
        let value = eq[1..].trim_start();
        out.push_str(&after[..after.len() - value.len()]);
        out.push_str("***");
        rest = &value[value_len(value)..];
    }
    out.push_str(rest);
    out
}

/// Length of a key-value form value at the start of `v`: single-quoted
/// (backslash escapes) or up to the next whitespace.
fn value_len(v: &str) -> usize {
    let Some(quoted) = v.strip_prefix('\'') else {
        return v.find(char::is_whitespace).unwrap_or(v.len());
    };
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 2,
            _ => {}
        }
    }
    v.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_defaults() {
        let cfg: StoreConfig =
            toml::from_str("backend = \"sqlite\"\npath = \"/tmp/x.db\"").unwrap();
        assert_eq!(cfg.pool_size, 4);
        assert_eq!(
            cfg.validate().unwrap(),
            Backend::Sqlite {
                path: "/tmp/x.db".into()
            }
        );
        let cfg: StoreConfig = toml::from_str(
            "backend = \"postgres\"\nurl = \"postgres://u:secret@h/db\"\npool_size = 2",
        )
        .unwrap();
        assert!(matches!(cfg.validate().unwrap(), Backend::Postgres { .. }));
        assert!(!format!("{cfg:?}").contains("secret"));
    }

    #[test]
    fn refuses_bad_configs() {
        assert!(toml::from_str::<StoreConfig>("bakend = \"sqlite\"").is_err());
        assert!(toml::from_str::<StoreConfig>("backend = \"mysql\"").is_err());
        assert!(StoreConfig::default().validate().is_err()); // no path
        let mut c = StoreConfig::sqlite("/tmp/x");
        c.pool_size = 0;
        assert!(matches!(c.validate(), Err(StoreError::Config(_))));
        c.pool_size = 1000;
        assert!(c.validate().is_err());
        let mut c = StoreConfig::sqlite("/tmp/x");
        c.url = Some("postgres://h/db".into());
        assert!(c.validate().is_err());
        assert!(StoreConfig::postgres("").validate().is_err());
        assert!(StoreConfig::postgres("postgres://h:notaport/db")
            .validate()
            .is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://me:pw@host:5432/db?x=1"),
            "postgres://me:***@host:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://me@host/db"), "postgres://me@host/db");
        assert_eq!(
            redact_url("host=h password=pw dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(
            redact_url("postgres://u:secretpw@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgresql://h/db?user=u&password=secretpw&sslmode=disable"),
            "postgresql://h/db?user=u&password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("host=h password = 'se cret\\' pw' dbname=d"),
            "host=h password = *** dbname=d"
        );
        assert_eq!(
            redact_url("host=h PASSWORD=x user=password"),
            "host=h PASSWORD=*** user=password"
        );
        assert_eq!(redact_url("host=h dbname=d"), "host=h dbname=d");
    }
}
