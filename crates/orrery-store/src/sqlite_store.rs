//! The SQLite back end: one WAL-mode file that several processes of one
//! machine may open at once. Every write transaction is `BEGIN IMMEDIATE`,
//! so the fence check and the writes happen under the database's write lock.
//!
//! Durability: every connection runs `synchronous = FULL`, so a commit
//! returns only after its WAL frames are fsynced: a fence, a write or a
//! job's output the store acknowledged survives a power loss, like the Raft
//! log (redb) that records the decisions made on it. The file is created
//! 0600 (SQLite gives its `-wal` and `-shm` files the same mode).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::migrations::{self, Recorded, STATE_DONE, STATE_STARTED};
use crate::pool::Pool;
use crate::{
    arg_i64, assemble_periods, stored_u64, Durability, JobCommitRow, Limits, Op, Store,
    StoreConfig, StoreError,
};

pub(crate) struct SqliteStore {
    pool: Pool<Connection>,
    limits: Limits,
    path: PathBuf,
}

/// The database's clock in milliseconds since the Unix epoch.
const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

pub(crate) fn err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StoreError::Busy(format!(
                "sqlite: {e} (the database stayed locked past store.busy_timeout_ms)"
            ))
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DatabaseCorrupt => {
            StoreError::Corrupt {
                what: "sqlite database file".into(),
                row: e.to_string(),
            }
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::NotADatabase => {
            StoreError::Corrupt {
                what: "sqlite database file".into(),
                row: e.to_string(),
            }
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt {
            what: "row".into(),
            row: e.to_string(),
        },
        _ => StoreError::Backend(format!("sqlite: {e}")),
    }
}

fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(busy_timeout).map_err(err)?;
    // Switching a new file to WAL takes an exclusive lock that the busy
    // handler does not always wait for: retry a few times.
    let mut attempt = 0;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
            Ok(mode) => {
                return Err(StoreError::Backend(format!(
                    "sqlite: {} refuses WAL mode (journal_mode = {mode})",
                    path.display()
                )))
            }
            Err(rusqlite::Error::SqliteFailure(f, _))
                if attempt < 50
                    && matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(e)),
        }
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(err)?;
    Ok(conn)
}

/// The durability settings of one of the store's connections.
fn durability_of(conn: &Connection) -> Result<Durability, StoreError> {
    let synchronous: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(err)?;
    let journal_mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(err)?;
    Ok(Durability::Sqlite {
        synchronous,
        journal_mode: journal_mode.to_ascii_lowercase(),
    })
}

/// The database file is its owner's only: created 0600 if it does not
/// exist, and an existing file (with its `-wal` and `-shm`) narrowed to
/// 0600 where this process may. SQLite reports any other problem on open.
fn make_private(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Racing openers: one creates it, the others find it.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        for p in [path.as_os_str().to_owned(), wal, shm] {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

pub(crate) fn read_recorded(conn: &Connection) -> Result<Vec<Recorded>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT version, name, checksum, state FROM schema_migrations ORDER BY version")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Recorded {
                version: r.get(0)?,
                name: r.get(1)?,
                checksum: r.get(2)?,
                state: r.get(3)?,
            })
        })
        .map_err(err)?;
    rows.map(|r| {
        r.map_err(|e| StoreError::Corrupt {
            what: "schema_migrations".into(),
            row: e.to_string(),
        })
    })
    .collect()
}

fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let code = migrations::SQLITE;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(migrations::SQLITE_MIGRATIONS_TABLE)
            .map_err(err)?;
        let recorded = read_recorded(&tx)?;
        let current = migrations::verify(&recorded, code)?;
        let Some(m) = code.get(current as usize) else {
            tx.commit().map_err(err)?;
            return Ok(current);
        };
        tx.execute(
            &format!(
                "INSERT INTO schema_migrations (version, name, checksum, state, applied_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, {NOW_MS})"
            ),
            params![
                m.version,
                m.name,
                migrations::checksum(m.sql),
                STATE_STARTED
            ],
        )
        .map_err(err)?;
        tx.execute_batch(m.sql).map_err(|e| {
            StoreError::Migration(format!(
                "migration {} ({:?}) failed and was rolled back: {e}",
                m.version, m.name
            ))
        })?;
        tx.execute(
            "UPDATE schema_migrations SET state = ?1 WHERE version = ?2",
            params![STATE_DONE, m.version],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
    }
}

impl SqliteStore {
    pub(crate) fn open(path: &Path, cfg: &StoreConfig) -> Result<SqliteStore, StoreError> {
        let busy = Duration::from_millis(cfg.busy_timeout_ms);
        make_private(path);
        let mut first = connect(path, busy)?;
        migrate(&mut first)?;
        let p = path.to_path_buf();
        let pool = Pool::new(
            cfg.pool_size,
            Duration::from_millis(cfg.pool_wait_ms),
            Box::new(move || connect(&p, busy)),
            |_| true,
            first,
        );
        Ok(SqliteStore {
            pool,
            limits: Limits::from_config(cfg),
            path: path.to_path_buf(),
        })
    }

    /// Raises `shard`'s fence to `epoch` inside `tx`, or refuses.
    fn raise_shard_fence(
        tx: &rusqlite::Transaction<'_>,
        shard: &str,
        epoch: u64,
        e: i64,
    ) -> Result<(), StoreError> {
        let cur: Option<i64> = tx
            .query_row(
                "SELECT epoch FROM shard_fence WHERE shard = ?1",
                [shard],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if let Some(c) = cur {
            let current = stored_u64("shard_fence", c, || format!("shard {shard}"))?;
            if current > epoch {
                return Err(StoreError::StaleOwner {
                    shard: shard.to_string(),
                    epoch,
                    current,
                });
            }
            if current == epoch {
                return Ok(());
            }
        }
        tx.execute(
            "INSERT INTO shard_fence (shard, epoch) VALUES (?1, ?2) \
             ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch",
            params![shard, e],
        )
        .map_err(err)?;
        Ok(())
    }

    /// Checks the job fence and the commit record of `job`/`period` inside
    /// `tx`, and raises the fence to `lease_epoch`.
    fn raise_job_fence(
        tx: &rusqlite::Transaction<'_>,
        job: &str,
        period: u64,
        lease_epoch: u64,
        p: i64,
        l: i64,
    ) -> Result<(), StoreError> {
        let cur: Option<i64> = tx
            .query_row(
                "SELECT lease_epoch FROM job_fence WHERE job = ?1 AND period = ?2",
                params![job, p],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let cur = match cur {
            Some(c) => Some(stored_u64("job_fence", c, || {
                format!("job {job} period {period}")
            })?),
            None => None,
        };
        if let Some(current) = cur {
            if current > lease_epoch {
                return Err(StoreError::StaleToken {
                    job: job.to_string(),
                    period,
                    lease_epoch,
                    current,
                });
            }
        }
        let committed: Option<i64> = tx
            .query_row(
                "SELECT lease_epoch FROM job_commit WHERE job = ?1 AND period = ?2",
                params![job, p],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if let Some(c) = committed {
            return Err(StoreError::AlreadyCommitted {
                job: job.to_string(),
                period,
                committed_by: stored_u64("job_commit", c, || format!("job {job} period {period}"))?,
            });
        }
        if cur != Some(lease_epoch) {
            tx.execute(
                "INSERT INTO job_fence (job, period, lease_epoch) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (job, period) DO UPDATE SET lease_epoch = excluded.lease_epoch",
                params![job, p, l],
            )
            .map_err(err)?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn durability(&self) -> Result<Durability, StoreError> {
        let conn = self.pool.get()?;
        durability_of(&conn)
    }

    fn schema_version(&self) -> Result<u32, StoreError> {
        let conn = self.pool.get()?;
        let recorded = read_recorded(&conn)?;
        migrations::verify(&recorded, migrations::SQLITE)
    }

    fn claim_shard(&self, shard: &str, epoch: u64) -> Result<(), StoreError> {
        self.limits.name("shard", shard)?;
        let e = arg_i64("epoch", epoch)?;
        let mut conn = self.pool.get()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        Self::raise_shard_fence(&tx, shard, epoch, e)?;
        tx.commit().map_err(err)
    }

    fn shard_fence(&self, shard: &str) -> Result<Option<u64>, StoreError> {
        self.limits.name("shard", shard)?;
        let conn = self.pool.get()?;
        let cur: Option<i64> = conn
            .query_row(
                "SELECT epoch FROM shard_fence WHERE shard = ?1",
                [shard],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        cur.map(|c| stored_u64("shard_fence", c, || format!("shard {shard}")))
            .transpose()
    }

    fn write(&self, shard: &str, epoch: u64, ops: &[Op]) -> Result<(), StoreError> {
        self.limits.name("shard", shard)?;
        let e = arg_i64("epoch", epoch)?;
        self.limits.ops(ops)?;
        let mut conn = self.pool.get()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        Self::raise_shard_fence(&tx, shard, epoch, e)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO kv (shard, tbl, key, value, epoch) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (shard, tbl, key) DO UPDATE SET value = excluded.value, epoch = excluded.epoch",
                )
                .map_err(err)?;
            let mut del = tx
                .prepare_cached("DELETE FROM kv WHERE shard = ?1 AND tbl = ?2 AND key = ?3")
                .map_err(err)?;
            for op in ops {
                match op {
                    Op::Put { table, key, value } => {
                        put.execute(params![shard, table, key, value, e])
                            .map_err(err)?;
                    }
                    Op::Delete { table, key } => {
                        del.execute(params![shard, table, key]).map_err(err)?;
                    }
                }
            }
        }
        tx.commit().map_err(err)
    }

    fn get(&self, shard: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.limits.name("shard", shard)?;
        self.limits.name("table", table)?;
        self.limits.name("key", key)?;
        let conn = self.pool.get()?;
        conn.query_row(
            "SELECT value FROM kv WHERE shard = ?1 AND tbl = ?2 AND key = ?3",
            params![shard, table, key],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .map_err(err)
    }

    fn scan(
        &self,
        shard: &str,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.limits.name("shard", shard)?;
        self.limits.name("table", table)?;
        self.limits.scan_limit(limit)?;
        if let Some(a) = after {
            if a.len() > self.limits.max_name_bytes || a.contains('\0') {
                return Err(StoreError::InvalidInput {
                    what: "scan cursor",
                    reason: "not a valid key".into(),
                });
            }
        }
        let conn = self.pool.get()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT key, value FROM kv WHERE shard = ?1 AND tbl = ?2 AND key > ?3 \
                 ORDER BY key LIMIT ?4",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(
                params![shard, table, after.unwrap_or(""), limit as i64],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .map_err(err)?;
        rows.map(|r| r.map_err(err)).collect()
    }

    fn fence_job(&self, job: &str, period: u64, lease_epoch: u64) -> Result<(), StoreError> {
        self.limits.name("job", job)?;
        let p = arg_i64("period", period)?;
        let l = arg_i64("lease_epoch", lease_epoch)?;
        let mut conn = self.pool.get()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        Self::raise_job_fence(&tx, job, period, lease_epoch, p, l)?;
        tx.commit().map_err(err)
    }

    fn commit_job(
        &self,
        job: &str,
        period: u64,
        lease_epoch: u64,
        rows: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.limits.name("job", job)?;
        let p = arg_i64("period", period)?;
        let l = arg_i64("lease_epoch", lease_epoch)?;
        self.limits.job_rows(rows)?;
        let mut conn = self.pool.get()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        Self::raise_job_fence(&tx, job, period, lease_epoch, p, l)?;
        tx.execute(
            &format!(
                "INSERT INTO job_commit (job, period, lease_epoch, committed_at_ms, row_count) \
                 VALUES (?1, ?2, ?3, {NOW_MS}, ?4)"
            ),
            params![job, p, l, rows.len() as i64],
        )
        .map_err(err)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO job_row (job, period, key, value) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for (key, value) in rows {
                ins.execute(params![job, p, key, value]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    fn job_periods(&self, job: &str, from: u64, to: u64) -> Result<Vec<JobCommitRow>, StoreError> {
        self.limits.name("job", job)?;
        let Ok(from) = i64::try_from(from) else {
            return Ok(Vec::new());
        };
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        if from >= to {
            return Ok(Vec::new());
        }
        let max = self.limits.max_scan_rows;
        let mut conn = self.pool.get()?;
        // One read transaction: the commits and their rows from one snapshot.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(err)?;
        let mut commits = Vec::new();
        let mut counts = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT period, lease_epoch, committed_at_ms, row_count FROM job_commit \
                     WHERE job = ?1 AND period >= ?2 AND period < ?3 ORDER BY period LIMIT ?4",
                )
                .map_err(err)?;
            let mut rows = stmt
                .query(params![job, from, to, max as i64 + 1])
                .map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let (period, lease, at, n): (i64, i64, i64, i64) = (
                    r.get(0).map_err(err)?,
                    r.get(1).map_err(err)?,
                    r.get(2).map_err(err)?,
                    r.get(3).map_err(err)?,
                );
                let ctx = || format!("job {job} period {period}");
                commits.push(JobCommitRow {
                    period: stored_u64("job_commit", period, ctx)?,
                    lease_epoch: stored_u64("job_commit", lease, ctx)?,
                    committed_at_ms: stored_u64("job_commit", at, ctx)?,
                    rows: Vec::new(),
                });
                counts.push(stored_u64("job_commit", n, ctx)?);
            }
        }
        if commits.len() > max {
            return Err(StoreError::Limit {
                what: "job periods returned",
                key: "max_scan_rows",
                limit: max as u64,
                actual: commits.len() as u64,
            });
        }
        let mut out_rows = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT period, key, value FROM job_row \
                     WHERE job = ?1 AND period >= ?2 AND period < ?3 ORDER BY period, key LIMIT ?4",
                )
                .map_err(err)?;
            let mut rows = stmt
                .query(params![job, from, to, max as i64 + 1])
                .map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let period: i64 = r.get(0).map_err(err)?;
                let period = stored_u64("job_row", period, || format!("job {job}"))?;
                out_rows.push((period, r.get(1).map_err(err)?, r.get(2).map_err(err)?));
            }
        }
        if out_rows.len() > max {
            return Err(StoreError::Limit {
                what: "job rows returned",
                key: "max_scan_rows",
                limit: max as u64,
                actual: out_rows.len() as u64,
            });
        }
        tx.commit().map_err(err)?;
        assemble_periods(job, commits, &counts, out_rows)
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_commits_durably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let conn = connect(&path, Duration::from_millis(100)).unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "PRAGMA synchronous must be FULL (2)");
        let store = SqliteStore::open(&path, &StoreConfig::sqlite(&path)).unwrap();
        assert_eq!(
            store.durability().unwrap(),
            Durability::Sqlite {
                synchronous: 2,
                journal_mode: "wal".into()
            }
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, &StoreConfig::sqlite(&path)).unwrap();
        store.claim_shard("s", 1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        for ext in ["db-wal", "db-shm"] {
            let p = path.with_extension(ext);
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
        drop(store);
        // An existing, wider file is narrowed on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&path, &StoreConfig::sqlite(&path)).unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
