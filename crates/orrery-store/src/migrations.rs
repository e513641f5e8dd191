//! Versioned schema migrations, shared rules for both back ends.
//!
//! `schema_migrations (version, name, checksum, state, applied_at_ms)` records
//! each applied migration. Each migration runs in its own transaction, under
//! a lock that serialises concurrent openers (SQLite `BEGIN IMMEDIATE`,
//! PostgreSQL `pg_advisory_xact_lock`), after re-reading the record: its
//! record is inserted as `started`, the DDL runs, the record is set to
//! `done`, all in that one transaction — a crash rolls the whole step back.
//! A database whose records do not match this build (a version this build
//! does not know, a checksum that differs, a gap, or a record left
//! `started`) is refused, never half-loaded.

use sha2::{Digest, Sha256};

use crate::StoreError;

pub(crate) struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The schema version this build brings a database to.
pub const SCHEMA_VERSION: u32 = 1;

pub(crate) const SQLITE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    state TEXT NOT NULL,
    applied_at_ms INTEGER NOT NULL DEFAULT 0
)";

pub(crate) const PG_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    state TEXT NOT NULL,
    applied_at_ms BIGINT NOT NULL DEFAULT 0
)";

pub(crate) const SQLITE: &[Migration] = &[Migration {
    version: 1,
    name: "fenced shard data and singleton job output",
    sql: "
CREATE TABLE shard_fence (
    shard TEXT PRIMARY KEY NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch >= 0)
) STRICT, WITHOUT ROWID;
CREATE TABLE kv (
    shard TEXT NOT NULL,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch >= 0),
    PRIMARY KEY (shard, tbl, key)
) STRICT, WITHOUT ROWID;
CREATE TABLE job_fence (
    job TEXT NOT NULL,
    period INTEGER NOT NULL CHECK (period >= 0),
    lease_epoch INTEGER NOT NULL CHECK (lease_epoch >= 0),
    PRIMARY KEY (job, period)
) STRICT, WITHOUT ROWID;
CREATE TABLE job_commit (
    job TEXT NOT NULL,
    period INTEGER NOT NULL CHECK (period >= 0),
    lease_epoch INTEGER NOT NULL CHECK (lease_epoch >= 0),
    committed_at_ms INTEGER NOT NULL,
    row_count INTEGER NOT NULL CHECK (row_count >= 0),
    PRIMARY KEY (job, period)
) STRICT, WITHOUT ROWID;
CREATE TABLE job_row (
    job TEXT NOT NULL,
    period INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (job, period, key),
    FOREIGN KEY (job, period) REFERENCES job_commit (job, period)
) STRICT, WITHOUT ROWID;
",
}];

pub(crate) const POSTGRES: &[Migration] = &[Migration {
    version: 1,
    name: "fenced shard data and singleton job output",
    sql: "
CREATE TABLE shard_fence (
    shard TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL CHECK (epoch >= 0)
);
CREATE TABLE kv (
    shard TEXT NOT NULL,
    tbl TEXT NOT NULL,
    key TEXT COLLATE \"C\" NOT NULL,
    value BYTEA NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch >= 0),
    PRIMARY KEY (shard, tbl, key)
);
CREATE TABLE job_fence (
    job TEXT NOT NULL,
    period BIGINT NOT NULL CHECK (period >= 0),
    lease_epoch BIGINT NOT NULL CHECK (lease_epoch >= 0),
    PRIMARY KEY (job, period)
);
CREATE TABLE job_commit (
    job TEXT NOT NULL,
    period BIGINT NOT NULL CHECK (period >= 0),
    lease_epoch BIGINT NOT NULL CHECK (lease_epoch >= 0),
    committed_at_ms BIGINT NOT NULL,
    row_count BIGINT NOT NULL CHECK (row_count >= 0),
    PRIMARY KEY (job, period)
);
CREATE TABLE job_row (
    job TEXT NOT NULL,
    period BIGINT NOT NULL,
    key TEXT COLLATE \"C\" NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (job, period, key),
    FOREIGN KEY (job, period) REFERENCES job_commit (job, period)
);
",
}];

pub(crate) fn checksum(sql: &str) -> String {
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One row of `schema_migrations` as read.
#[derive(Debug)]
pub(crate) struct Recorded {
    pub version: i64,
    pub name: String,
    pub checksum: String,
    pub state: String,
}

pub(crate) const STATE_STARTED: &str = "started";
pub(crate) const STATE_DONE: &str = "done";

/// Checks the recorded migrations (in version order) against the code's;
/// returns how many are applied (== the database's version).
pub(crate) fn verify(recorded: &[Recorded], code: &[Migration]) -> Result<u32, StoreError> {
    let known = code.last().map_or(0, |m| m.version);
    for (i, rec) in recorded.iter().enumerate() {
        if rec.state != STATE_DONE {
            return Err(StoreError::Corrupt {
                what: "schema_migrations".into(),
                row: format!(
                    "migration {} ({:?}) is recorded as {:?}, not {STATE_DONE:?}: it started and never \
                     finished; refusing a half-migrated database (restore it or repair it by hand)",
                    rec.version, rec.name, rec.state
                ),
            });
        }
        if rec.version > i64::from(known) {
            return Err(StoreError::Migration(format!(
                "the database is at schema version {} ({:?}) but this build knows versions up to {known}: \
                 it was written by a newer orrery; refusing to open it",
                rec.version, rec.name
            )));
        }
        let expected = i as i64 + 1;
        if rec.version != expected {
            return Err(StoreError::Migration(format!(
                "recorded migrations skip from {} to {}: expected version {expected}",
                expected - 1,
                rec.version
            )));
        }
        let m = &code[i];
        let sum = checksum(m.sql);
        if rec.checksum != sum {
            return Err(StoreError::Migration(format!(
                "migration {} ({:?}) was recorded with checksum {} but this build's is {sum}: \
                 the database was migrated by a different schema; refusing to open it",
                rec.version, rec.name, rec.checksum
            )));
        }
    }
    Ok(recorded.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: i64, sum: &str, state: &str) -> Recorded {
        Recorded {
            version: v,
            name: "x".into(),
            checksum: sum.into(),
            state: state.into(),
        }
    }

    #[test]
    fn versions_are_contiguous_and_match() {
        for list in [SQLITE, POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version as usize, i + 1);
            }
            assert_eq!(list.last().unwrap().version, SCHEMA_VERSION);
        }
    }

    #[test]
    fn verify_rules() {
        let good = checksum(SQLITE[0].sql);
        assert_eq!(verify(&[], SQLITE).unwrap(), 0);
        assert_eq!(verify(&[rec(1, &good, "done")], SQLITE).unwrap(), 1);
        assert!(matches!(
            verify(&[rec(1, "bad", "done")], SQLITE),
            Err(StoreError::Migration(_))
        ));
        assert!(matches!(
            verify(&[rec(1, &good, "started")], SQLITE),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            verify(&[rec(1, &good, "done"), rec(2, "x", "done")], SQLITE),
            Err(StoreError::Migration(_))
        ));
        assert!(matches!(
            verify(&[rec(0, &good, "done")], SQLITE),
            Err(StoreError::Migration(_))
        ));
    }
}
