//! orrery-store: storage for application data under ownership fencing.
//!
//! A shard's data is written only by its current owner: every `write` names
//! the ownership epoch it acts under, and is refused whole
//! ([`StoreError::StaleOwner`]) once a newer owner has claimed the shard —
//! checked in the same transaction as the writes. Per-period singleton jobs
//! (the per-minute statistics) commit their output once per period under a
//! fencing token `(period, lease_epoch)`; a replaced holder's late commit is
//! refused ([`StoreError::StaleToken`]) and a second commit of the same
//! period is refused ([`StoreError::AlreadyCommitted`]).
//!
//! Two back ends pass one test suite: SQLite (one WAL file shared by the
//! processes of a machine) and PostgreSQL. The API is synchronous; async
//! callers use `spawn_blocking`. Every bound has a config key
//! ([`StoreConfig`]); no input panics.

pub mod backup;
mod config;
mod error;
mod migrations;
mod pool;
mod postgres_store;
mod sqlite_store;

pub use config::{redact_url, Backend, BackendKind, StoreConfig};
pub use error::StoreError;
pub use migrations::SCHEMA_VERSION;

/// One change in a [`Store::write`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace `table`/`key` with `value`.
    Put {
        table: String,
        key: String,
        value: Vec<u8>,
    },
    /// Remove `table`/`key` (absent is fine).
    Delete { table: String, key: String },
}

impl Op {
    pub fn put(table: impl Into<String>, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            table: table.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(table: impl Into<String>, key: impl Into<String>) -> Op {
        Op::Delete {
            table: table.into(),
            key: key.into(),
        }
    }
}

/// How durable an acknowledged commit is, as the database itself reports
/// it on one of the store's own connections ([`Store::durability`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// `PRAGMA synchronous` (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA; orrery runs
    /// 2) and `PRAGMA journal_mode` (`wal`).
    Sqlite {
        synchronous: i64,
        journal_mode: String,
    },
    /// `SHOW synchronous_commit` (orrery sets `on` per session) and
    /// `SHOW fsync` (the server's; `on` unless an administrator turned it off).
    Postgres {
        synchronous_commit: String,
        fsync: String,
    },
}

/// One committed period of a job, as [`Store::job_periods`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommitRow {
    pub period: u64,
    /// The lease epoch of the holder whose commit won.
    pub lease_epoch: u64,
    /// The database's clock at commit, milliseconds since the Unix epoch.
    pub committed_at_ms: u64,
    /// The period's output rows, in key order.
    pub rows: Vec<(String, Vec<u8>)>,
}

/// The storage interface. Synchronous and blocking: call it from
/// `spawn_blocking` (or a thread of your own), never on an event loop.
///
/// Epochs, periods and lease epochs are `u64` but must fit in `i64`
/// (both databases store signed 64-bit integers); larger ones are refused
/// as `InvalidInput`. Names (shard, table, key, job) are non-empty UTF-8 of
/// at most `max_name_bytes`, without NUL.
pub trait Store: Send + Sync {
    /// `"sqlite"` or `"postgres"`.
    fn backend_name(&self) -> &'static str;

    /// The schema version the database is at (== [`SCHEMA_VERSION`] after `open`).
    fn schema_version(&self) -> Result<u32, StoreError>;

    /// The durability settings the store's connections run with: an
    /// acknowledged fence, write or job commit survives a crash of the
    /// machine (SQLite `synchronous = FULL`, PostgreSQL
    /// `synchronous_commit = on`).
    fn durability(&self) -> Result<Durability, StoreError>;

    /// Raises the shard's fence to `epoch`: the new owner calls it when it
    /// takes the shard, before it reads. Idempotent for the same epoch.
    /// Refused with `StaleOwner` if the stored fence is higher.
    fn claim_shard(&self, shard: &str, epoch: u64) -> Result<(), StoreError>;

    /// The shard's current fence, if it was ever claimed or written.
    fn shard_fence(&self, shard: &str) -> Result<Option<u64>, StoreError>;

    /// Applies `ops` atomically, in order, on behalf of `shard` at ownership
    /// `epoch`. Refused whole with `StaleOwner { shard, epoch, current }` if the
    /// shard's fence is higher than `epoch`, checked in the same transaction as
    /// the writes. A write at `epoch` also raises the fence to `epoch` (as a
    /// claim would), so it fences out every older owner from then on.
    fn write(&self, shard: &str, epoch: u64, ops: &[Op]) -> Result<(), StoreError>;

    /// The value at `table`/`key` of `shard`.
    fn get(&self, shard: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries of `table` of `shard` with keys strictly after
    /// `after` (from the start when `None`), in key (byte) order. Page on by
    /// passing the last key returned. `limit` above `max_scan_rows` is
    /// refused with `Limit`.
    fn scan(
        &self,
        shard: &str,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Per-period singleton jobs: raises the fence of `job`'s `period` to
    /// `lease_epoch`. The new holder calls it first, before computing the
    /// period. Refused with `StaleToken` if a higher lease epoch fenced the
    /// period, with `AlreadyCommitted` if the period already has its output.
    fn fence_job(&self, job: &str, period: u64, lease_epoch: u64) -> Result<(), StoreError>;

    /// Commits the period's output `rows` (unique keys) with the token
    /// `(period, lease_epoch)`, atomically: refused with `StaleToken` if a
    /// higher lease epoch fenced this job and period, with `AlreadyCommitted`
    /// if the period has output; otherwise the rows and the commit record
    /// (job, period, lease_epoch, committed_at) are written in one transaction.
    fn commit_job(
        &self,
        job: &str,
        period: u64,
        lease_epoch: u64,
        rows: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError>;

    /// The committed periods `from <= period < to` of `job`, in period order,
    /// each with its rows. More than `max_scan_rows` periods or rows in all
    /// is refused with `Limit`: ask for a shorter range.
    fn job_periods(&self, job: &str, from: u64, to: u64) -> Result<Vec<JobCommitRow>, StoreError>;
}

/// Connects to the configured back end and brings its schema up to
/// [`SCHEMA_VERSION`] (refusing a database whose recorded migrations do not
/// match this build's).
pub fn open(cfg: &StoreConfig) -> Result<Box<dyn Store>, StoreError> {
    match cfg.validate()? {
        Backend::Sqlite { path } => Ok(Box::new(sqlite_store::SqliteStore::open(&path, cfg)?)),
        Backend::Postgres { url } => Ok(Box::new(postgres_store::PgStore::open(&url, cfg)?)),
    }
}

/// The input bounds, copied from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_value_bytes: usize,
    pub max_name_bytes: usize,
    pub max_batch_ops: usize,
    pub max_scan_rows: usize,
}

impl Limits {
    pub(crate) fn from_config(cfg: &StoreConfig) -> Limits {
        Limits {
            max_value_bytes: cfg.max_value_bytes,
            max_name_bytes: cfg.max_name_bytes,
            max_batch_ops: cfg.max_batch_ops,
            max_scan_rows: cfg.max_scan_rows,
        }
    }

    pub(crate) fn name(&self, what: &'static str, s: &str) -> Result<(), StoreError> {
        if s.is_empty() {
            return Err(StoreError::InvalidInput {
                what,
                reason: "empty".into(),
            });
        }
        if s.len() > self.max_name_bytes {
            return Err(StoreError::Limit {
                what,
                key: "max_name_bytes",
                limit: self.max_name_bytes as u64,
                actual: s.len() as u64,
            });
        }
        if s.contains('\0') {
            return Err(StoreError::InvalidInput {
                what,
                reason: "contains a NUL character".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn value(&self, what: &'static str, v: &[u8]) -> Result<(), StoreError> {
        if v.len() > self.max_value_bytes {
            return Err(StoreError::Limit {
                what,
                key: "max_value_bytes",
                limit: self.max_value_bytes as u64,
                actual: v.len() as u64,
            });
        }
        Ok(())
    }

    pub(crate) fn batch(&self, what: &'static str, n: usize) -> Result<(), StoreError> {
        if n > self.max_batch_ops {
            return Err(StoreError::Limit {
                what,
                key: "max_batch_ops",
                limit: self.max_batch_ops as u64,
                actual: n as u64,
            });
        }
        Ok(())
    }

    pub(crate) fn scan_limit(&self, limit: usize) -> Result<(), StoreError> {
        if limit > self.max_scan_rows {
            return Err(StoreError::Limit {
                what: "scan limit",
                key: "max_scan_rows",
                limit: self.max_scan_rows as u64,
                actual: limit as u64,
            });
        }
        Ok(())
    }

    pub(crate) fn ops(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.batch("write batch", ops.len())?;
        for op in ops {
            match op {
                Op::Put { table, key, value } => {
                    self.name("table", table)?;
                    self.name("key", key)?;
                    self.value("value", value)?;
                }
                Op::Delete { table, key } => {
                    self.name("table", table)?;
                    self.name("key", key)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn job_rows(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.batch("job rows", rows.len())?;
        let mut seen = std::collections::BTreeSet::new();
        for (key, value) in rows {
            self.name("job row key", key)?;
            self.value("job row value", value)?;
            if !seen.insert(key.as_str()) {
                return Err(StoreError::InvalidInput {
                    what: "job rows",
                    reason: format!("duplicate key {key:?}"),
                });
            }
        }
        Ok(())
    }
}

/// A `u64` argument as the `i64` the databases store.
pub(crate) fn arg_i64(what: &'static str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput {
        what,
        reason: format!(
            "{v} exceeds {} (stored as a signed 64-bit integer)",
            i64::MAX
        ),
    })
}

/// A stored integer as the `u64` it must be; negative means corrupt.
pub(crate) fn stored_u64(
    what: &str,
    v: i64,
    row: impl FnOnce() -> String,
) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        what: what.to_string(),
        row: format!("{} (negative: {v})", row()),
    })
}

/// Groups `(period, key, value)` rows under their commit records, checking
/// each record's row count.
pub(crate) fn assemble_periods(
    job: &str,
    mut commits: Vec<JobCommitRow>,
    counts: &[u64],
    rows: Vec<(u64, String, Vec<u8>)>,
) -> Result<Vec<JobCommitRow>, StoreError> {
    let mut by_period: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for (i, c) in commits.iter().enumerate() {
        by_period.insert(c.period, i);
    }
    for (period, key, value) in rows {
        match by_period.get(&period) {
            Some(&i) => commits[i].rows.push((key, value)),
            None => {
                return Err(StoreError::Corrupt {
                    what: "job_row".into(),
                    row: format!("job {job} period {period} key {key:?} has no commit record"),
                })
            }
        }
    }
    for (c, &n) in commits.iter().zip(counts) {
        if c.rows.len() as u64 != n {
            return Err(StoreError::Corrupt {
                what: "job_commit".into(),
                row: format!(
                    "job {job} period {} records {n} rows but {} are stored",
                    c.period,
                    c.rows.len()
                ),
            });
        }
    }
    Ok(commits)
}
