//! The PostgreSQL back end (the sync `postgres` client, no TLS): a small
//! bounded pool of connections. Fences are raised with a conditional upsert
//! (`ON CONFLICT ... DO UPDATE ... WHERE fence <= new`) that locks the fence
//! row until commit, in the same transaction as the writes, so a claim by a
//! newer owner waits for an in-flight write and every later write of the old
//! owner is refused.

use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, IsolationLevel, NoTls, Transaction};

use crate::migrations::{self, Recorded, STATE_DONE, STATE_STARTED};
use crate::pool::Pool;
use crate::{
    arg_i64, assemble_periods, redact_url, stored_u64, Durability, JobCommitRow, Limits, Op, Store,
    StoreConfig, StoreError,
};

pub(crate) struct PgStore {
    pool: Pool<Client>,
    limits: Limits,
    url: String,
}

/// The advisory lock key that serialises migrations of one database ("orrery" in ASCII).
const MIGRATION_LOCK: i64 = 0x6f72_7265_7279;

const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

fn err(e: postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let msg = format!(
            "postgres: {}: {} ({})",
            db.severity(),
            db.message(),
            code.code()
        );
        if *code == SqlState::QUERY_CANCELED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            return StoreError::Busy(msg);
        }
        if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED {
            return StoreError::Corrupt {
                what: "postgres data".into(),
                row: msg,
            };
        }
        return StoreError::Backend(msg);
    }
    // Conversion errors (a stored value of the wrong type) come without a DbError.
    let text = e.to_string();
    let full = match std::error::Error::source(&e) {
        Some(src) => format!("{text}: {src}"),
        None => text,
    };
    if full.contains("error deserializing column") {
        return StoreError::Corrupt {
            what: "row".into(),
            row: full,
        };
    }
    StoreError::Backend(format!("postgres: {full}"))
}

fn connect(config: &postgres::Config, statement_timeout_ms: u64) -> Result<Client, StoreError> {
    let mut client = config.connect(NoTls).map_err(|e| {
        let mut msg = format!("postgres: cannot connect: {e}");
        if let Some(src) = std::error::Error::source(&e) {
            msg.push_str(&format!(": {src}"));
        }
        StoreError::Backend(msg)
    })?;
    // `synchronous_commit = on` explicitly, whatever the server's or the
    // role's default: a COMMIT returns only once its WAL is flushed (and,
    // with synchronous standbys configured, flushed on them too).
    client
        .batch_execute(&format!(
            "SET synchronous_commit = on; SET statement_timeout = {statement_timeout_ms}; SET idle_in_transaction_session_timeout = {}",
            statement_timeout_ms.saturating_mul(2)
        ))
        .map_err(err)?;
    Ok(client)
}

fn read_recorded(tx: &mut Transaction<'_>) -> Result<Vec<Recorded>, StoreError> {
    let rows = tx
        .query(
            "SELECT version, name, checksum, state FROM schema_migrations ORDER BY version",
            &[],
        )
        .map_err(err)?;
    rows.iter()
        .map(|r| {
            let bad = |e: postgres::Error| StoreError::Corrupt {
                what: "schema_migrations".into(),
                row: e.to_string(),
            };
            Ok(Recorded {
                version: r.try_get(0).map_err(bad)?,
                name: r.try_get(1).map_err(bad)?,
                checksum: r.try_get(2).map_err(bad)?,
                state: r.try_get(3).map_err(bad)?,
            })
        })
        .collect()
}

fn migrate(client: &mut Client) -> Result<u32, StoreError> {
    let code = migrations::POSTGRES;
    loop {
        let mut tx = client.transaction().map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(err)?;
        tx.batch_execute(migrations::PG_MIGRATIONS_TABLE)
            .map_err(err)?;
        let recorded = read_recorded(&mut tx)?;
        let current = migrations::verify(&recorded, code)?;
        let Some(m) = code.get(current as usize) else {
            tx.commit().map_err(err)?;
            return Ok(current);
        };
        tx.execute(
            &format!(
                "INSERT INTO schema_migrations (version, name, checksum, state, applied_at_ms) \
                 VALUES ($1, $2, $3, $4, {NOW_MS})"
            ),
            &[
                &i64::from(m.version),
                &m.name,
                &migrations::checksum(m.sql),
                &STATE_STARTED,
            ],
        )
        .map_err(err)?;
        tx.batch_execute(m.sql).map_err(|e| {
            StoreError::Migration(format!(
                "migration {} ({:?}) failed and was rolled back: {}",
                m.version,
                m.name,
                err(e)
            ))
        })?;
        tx.execute(
            "UPDATE schema_migrations SET state = $1 WHERE version = $2",
            &[&STATE_DONE, &i64::from(m.version)],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
    }
}

fn get_i64(r: &postgres::Row, i: usize) -> Result<i64, StoreError> {
    r.try_get(i).map_err(err)
}

impl PgStore {
    pub(crate) fn open(url: &str, cfg: &StoreConfig) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Config(format!(
                "store.url ({}) does not parse: {e}",
                redact_url(url)
            ))
        })?;
        config.connect_timeout(Duration::from_millis(cfg.connect_timeout_ms));
        if config.get_application_name().is_none() {
            config.application_name("orrery-store");
        }
        let stmt_timeout = cfg.statement_timeout_ms;
        let mut first = connect(&config, stmt_timeout)?;
        migrate(&mut first)?;
        let pool = Pool::new(
            cfg.pool_size,
            Duration::from_millis(cfg.pool_wait_ms),
            Box::new(move || connect(&config, stmt_timeout)),
            |c: &Client| !c.is_closed(),
            first,
        );
        Ok(PgStore {
            pool,
            limits: Limits::from_config(cfg),
            url: redact_url(url),
        })
    }

    /// Raises `shard`'s fence to `epoch` inside `tx` (locking the fence row
    /// until commit), or refuses.
    fn raise_shard_fence(
        tx: &mut Transaction<'_>,
        shard: &str,
        epoch: u64,
        e: i64,
    ) -> Result<(), StoreError> {
        let raised = tx
            .query_opt(
                "INSERT INTO shard_fence AS f (shard, epoch) VALUES ($1, $2) \
                 ON CONFLICT (shard) DO UPDATE SET epoch = EXCLUDED.epoch \
                 WHERE f.epoch <= EXCLUDED.epoch RETURNING f.epoch",
                &[&shard, &e],
            )
            .map_err(err)?;
        if raised.is_some() {
            return Ok(());
        }
        let row = tx
            .query_one("SELECT epoch FROM shard_fence WHERE shard = $1", &[&shard])
            .map_err(err)?;
        let current = stored_u64("shard_fence", get_i64(&row, 0)?, || {
            format!("shard {shard}")
        })?;
        Err(StoreError::StaleOwner {
            shard: shard.to_string(),
            epoch,
            current,
        })
    }

    fn raise_job_fence(
        tx: &mut Transaction<'_>,
        job: &str,
        period: u64,
        lease_epoch: u64,
        p: i64,
        l: i64,
    ) -> Result<(), StoreError> {
        let raised = tx
            .query_opt(
                "INSERT INTO job_fence AS f (job, period, lease_epoch) VALUES ($1, $2, $3) \
                 ON CONFLICT (job, period) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch \
                 WHERE f.lease_epoch <= EXCLUDED.lease_epoch RETURNING f.lease_epoch",
                &[&job, &p, &l],
            )
            .map_err(err)?;
        if raised.is_none() {
            let row = tx
                .query_one(
                    "SELECT lease_epoch FROM job_fence WHERE job = $1 AND period = $2",
                    &[&job, &p],
                )
                .map_err(err)?;
            let current = stored_u64("job_fence", get_i64(&row, 0)?, || {
                format!("job {job} period {period}")
            })?;
            return Err(StoreError::StaleToken {
                job: job.to_string(),
                period,
                lease_epoch,
                current,
            });
        }
        // The fence row is locked by this transaction: a commit record cannot
        // appear behind our back.
        let committed = tx
            .query_opt(
                "SELECT lease_epoch FROM job_commit WHERE job = $1 AND period = $2",
                &[&job, &p],
            )
            .map_err(err)?;
        if let Some(row) = committed {
            return Err(StoreError::AlreadyCommitted {
                job: job.to_string(),
                period,
                committed_by: stored_u64("job_commit", get_i64(&row, 0)?, || {
                    format!("job {job} period {period}")
                })?,
            });
        }
        Ok(())
    }
}

impl Store for PgStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    fn durability(&self) -> Result<Durability, StoreError> {
        let mut conn = self.pool.get()?;
        let mut show = |what: &str| -> Result<String, StoreError> {
            let row = conn.query_one(&format!("SHOW {what}"), &[]).map_err(err)?;
            row.try_get::<_, String>(0).map_err(err)
        };
        Ok(Durability::Postgres {
            synchronous_commit: show("synchronous_commit")?,
            fsync: show("fsync")?,
        })
    }

    fn schema_version(&self) -> Result<u32, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(err)?;
        let recorded = read_recorded(&mut tx)?;
        tx.commit().map_err(err)?;
        migrations::verify(&recorded, migrations::POSTGRES)
    }

    fn claim_shard(&self, shard: &str, epoch: u64) -> Result<(), StoreError> {
        self.limits.name("shard", shard)?;
        let e = arg_i64("epoch", epoch)?;
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(err)?;
        Self::raise_shard_fence(&mut tx, shard, epoch, e)?;
        tx.commit().map_err(err)
    }

    fn shard_fence(&self, shard: &str) -> Result<Option<u64>, StoreError> {
        self.limits.name("shard", shard)?;
        let mut conn = self.pool.get()?;
        let row = conn
            .query_opt("SELECT epoch FROM shard_fence WHERE shard = $1", &[&shard])
            .map_err(err)?;
        match row {
            Some(r) => Ok(Some(stored_u64("shard_fence", get_i64(&r, 0)?, || {
                format!("shard {shard}")
            })?)),
            None => Ok(None),
        }
    }

    fn write(&self, shard: &str, epoch: u64, ops: &[Op]) -> Result<(), StoreError> {
        self.limits.name("shard", shard)?;
        let e = arg_i64("epoch", epoch)?;
        self.limits.ops(ops)?;
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(err)?;
        Self::raise_shard_fence(&mut tx, shard, epoch, e)?;
        if !ops.is_empty() {
            let put = tx
                .prepare(
                    "INSERT INTO kv (shard, tbl, key, value, epoch) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (shard, tbl, key) DO UPDATE SET value = EXCLUDED.value, epoch = EXCLUDED.epoch",
                )
                .map_err(err)?;
            let del = tx
                .prepare("DELETE FROM kv WHERE shard = $1 AND tbl = $2 AND key = $3")
                .map_err(err)?;
            for op in ops {
                match op {
                    Op::Put { table, key, value } => {
                        tx.execute(&put, &[&shard, table, key, value, &e])
                            .map_err(err)?;
                    }
                    Op::Delete { table, key } => {
                        tx.execute(&del, &[&shard, table, key]).map_err(err)?;
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
        let mut conn = self.pool.get()?;
        let row = conn
            .query_opt(
                "SELECT value FROM kv WHERE shard = $1 AND tbl = $2 AND key = $3",
                &[&shard, &table, &key],
            )
            .map_err(err)?;
        match row {
            Some(r) => Ok(Some(r.try_get::<_, Vec<u8>>(0).map_err(err)?)),
            None => Ok(None),
        }
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
        let mut conn = self.pool.get()?;
        let rows = conn
            .query(
                "SELECT key, value FROM kv WHERE shard = $1 AND tbl = $2 AND key > $3 \
                 ORDER BY key LIMIT $4",
                &[&shard, &table, &after.unwrap_or(""), &(limit as i64)],
            )
            .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0).map_err(err)?,
                    r.try_get::<_, Vec<u8>>(1).map_err(err)?,
                ))
            })
            .collect()
    }

    fn fence_job(&self, job: &str, period: u64, lease_epoch: u64) -> Result<(), StoreError> {
        self.limits.name("job", job)?;
        let p = arg_i64("period", period)?;
        let l = arg_i64("lease_epoch", lease_epoch)?;
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(err)?;
        Self::raise_job_fence(&mut tx, job, period, lease_epoch, p, l)?;
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
        let mut tx = conn.transaction().map_err(err)?;
        Self::raise_job_fence(&mut tx, job, period, lease_epoch, p, l)?;
        tx.execute(
            &format!(
                "INSERT INTO job_commit (job, period, lease_epoch, committed_at_ms, row_count) \
                 VALUES ($1, $2, $3, {NOW_MS}, $4)"
            ),
            &[&job, &p, &l, &(rows.len() as i64)],
        )
        .map_err(err)?;
        if !rows.is_empty() {
            let ins = tx
                .prepare("INSERT INTO job_row (job, period, key, value) VALUES ($1, $2, $3, $4)")
                .map_err(err)?;
            for (key, value) in rows {
                tx.execute(&ins, &[&job, &p, key, value]).map_err(err)?;
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
        let fetch = max as i64 + 1;
        let mut conn = self.pool.get()?;
        // One snapshot for the commits and their rows.
        let mut tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(err)?;
        let commit_rows = tx
            .query(
                "SELECT period, lease_epoch, committed_at_ms, row_count FROM job_commit \
                 WHERE job = $1 AND period >= $2 AND period < $3 ORDER BY period LIMIT $4",
                &[&job, &from, &to, &fetch],
            )
            .map_err(err)?;
        if commit_rows.len() > max {
            return Err(StoreError::Limit {
                what: "job periods returned",
                key: "max_scan_rows",
                limit: max as u64,
                actual: commit_rows.len() as u64,
            });
        }
        let mut commits = Vec::with_capacity(commit_rows.len());
        let mut counts = Vec::with_capacity(commit_rows.len());
        for r in &commit_rows {
            let period = get_i64(r, 0)?;
            let ctx = || format!("job {job} period {period}");
            commits.push(JobCommitRow {
                period: stored_u64("job_commit", period, ctx)?,
                lease_epoch: stored_u64("job_commit", get_i64(r, 1)?, ctx)?,
                committed_at_ms: stored_u64("job_commit", get_i64(r, 2)?, ctx)?,
                rows: Vec::new(),
            });
            counts.push(stored_u64("job_commit", get_i64(r, 3)?, ctx)?);
        }
        let data = tx
            .query(
                "SELECT period, key, value FROM job_row \
                 WHERE job = $1 AND period >= $2 AND period < $3 ORDER BY period, key LIMIT $4",
                &[&job, &from, &to, &fetch],
            )
            .map_err(err)?;
        if data.len() > max {
            return Err(StoreError::Limit {
                what: "job rows returned",
                key: "max_scan_rows",
                limit: max as u64,
                actual: data.len() as u64,
            });
        }
        let mut rows = Vec::with_capacity(data.len());
        for r in &data {
            let period = stored_u64("job_row", get_i64(r, 0)?, || format!("job {job}"))?;
            rows.push((
                period,
                r.try_get::<_, String>(1).map_err(err)?,
                r.try_get::<_, Vec<u8>>(2).map_err(err)?,
            ));
        }
        tx.commit().map_err(err)?;
        assemble_periods(job, commits, &counts, rows)
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.url).finish()
    }
}
