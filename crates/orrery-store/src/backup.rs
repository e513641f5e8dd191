//! Backing the store up and checking a copy: owns the SQLite online backup
//! (one consistent copy of a live, shared WAL database), the inspection of
//! a copy (integrity check, migrations, row counts, a digest of the data)
//! and the fence reset a restore onto a fresh control plane needs.
//!
//! What it must never do: write to the source database (the copy is taken
//! under a read transaction), or call a copy good without having opened
//! and checked it. PostgreSQL is not handled here: `pg_dump --format=custom`
//! and `pg_restore` are its equivalent, run by the operator (see README.md,
//! "Backups").

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::sqlite_store::{err, read_recorded};
use crate::{migrations, StoreError, SCHEMA_VERSION};

/// What a checked copy of the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSummary {
    /// The schema version its recorded migrations verify to.
    pub schema_version: u32,
    /// Rows per table (every table of the database, `schema_migrations` included).
    pub row_counts: BTreeMap<String, u64>,
    /// SHA-256 (hex) of the application data: every `kv` row (shard,
    /// table, key, value) in key order. Fences and the epochs rows were
    /// written under are left out: a restore resets fences ([`reset_fences`]).
    pub data_digest: String,
    /// SHA-256 (hex) of the committed job output: every `job_commit` and
    /// `job_row` row, in key order.
    pub job_digest: String,
}

/// Copies the live SQLite database at `src` into a new file `dst` (created
/// 0600, must not exist) in one step of the online backup API, i.e. under
/// one read transaction: a consistent copy while other processes write.
/// The copy is left in rollback-journal mode, one self-contained file.
/// Waits at most `busy_timeout` for a lock.
pub fn sqlite_snapshot(src: &Path, dst: &Path, busy_timeout: Duration) -> Result<(), StoreError> {
    create_private(dst)?;
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {}: {e}", src.display())))?;
    from.busy_timeout(busy_timeout).map_err(err)?;
    let mut to = Connection::open(dst).map_err(|e| {
        StoreError::Backend(format!("sqlite: cannot create {}: {e}", dst.display()))
    })?;
    {
        let b = Backup::new(&from, &mut to).map_err(err)?;
        // Waits in 20 ms steps (no clock read: the store's rule).
        let mut waits = busy_timeout.as_millis() / 20;
        loop {
            // -1: every page in one step, so the copy is one snapshot.
            match b.step(-1).map_err(err)? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked if waits > 0 => {
                    waits -= 1;
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => {
                    return Err(StoreError::Busy(format!(
                        "sqlite backup of {}: {other:?} after {} ms (store.busy_timeout_ms)",
                        src.display(),
                        busy_timeout.as_millis()
                    )))
                }
            }
        }
    }
    let mode: String = to
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StoreError::Backend(format!(
            "sqlite: the copy {} stays in journal mode {mode}",
            dst.display()
        )));
    }
    to.close().map_err(|(_, e)| err(e))?;
    Ok(())
}

fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
        .map(|_| ())
        .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", path.display())))
}

/// Opens the copy at `path` and checks it: `PRAGMA integrity_check` must
/// answer `ok`, the recorded migrations must verify against this build's
/// and reach [`SCHEMA_VERSION`]; returns its row counts and data digest.
/// Open a copy in a scratch directory: SQLite may write a journal beside it.
pub fn inspect_sqlite(path: &Path) -> Result<StoreSummary, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Backend(format!(
            "{} is not a file",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {}: {e}", path.display())))?;
    let integrity = integrity(&conn)?;
    if integrity != "ok" {
        return Err(StoreError::Corrupt {
            what: format!("sqlite copy {}", path.display()),
            row: format!("PRAGMA integrity_check: {integrity}"),
        });
    }
    let version = migrations::verify(&read_recorded(&conn)?, migrations::SQLITE)?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::Migration(format!(
            "the copy is at schema version {version}, this build's is {SCHEMA_VERSION}"
        )));
    }
    Ok(StoreSummary {
        schema_version: version,
        row_counts: row_counts(&conn)?,
        data_digest: digest(&conn, &DATA_QUERIES)?,
        job_digest: digest(&conn, &JOB_QUERIES)?,
    })
}

/// The first lines `PRAGMA integrity_check` answers, joined (`ok` if sound).
fn integrity(conn: &Connection) -> Result<String, StoreError> {
    let mut stmt = conn.prepare("PRAGMA integrity_check(20)").map_err(err)?;
    let lines = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    Ok(lines.join("; "))
}

fn row_counts(conn: &Connection) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .map_err(err)?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let mut out = BTreeMap::new();
    for name in names {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let n: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM {quoted}"), [], |r| r.get(0))
            .map_err(err)?;
        out.insert(name, n.max(0) as u64);
    }
    Ok(out)
}

/// Feeds one length-prefixed field into the digest (so fields cannot run
/// into each other).
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

const DATA_QUERIES: [&str; 1] = ["SELECT shard, tbl, key, value FROM kv ORDER BY shard, tbl, key"];
const JOB_QUERIES: [&str; 2] = [
        "SELECT job, CAST(period AS TEXT), CAST(lease_epoch AS TEXT) || '/' || CAST(committed_at_ms AS TEXT), CAST(row_count AS BLOB) FROM job_commit ORDER BY job, period",
        "SELECT job, CAST(period AS TEXT), key, value FROM job_row ORDER BY job, period, key",
];

/// SHA-256 (hex) over the rows the `queries` return (4 columns each).
fn digest(conn: &Connection, queries: &[&str]) -> Result<String, StoreError> {
    let mut h = Sha256::new();
    for (i, q) in queries.iter().enumerate() {
        h.update([i as u8]);
        let mut stmt = conn.prepare(q).map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            for c in 0..4 {
                let v = r.get_ref(c).map_err(err)?;
                let bytes = match v {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => t,
                    _ => &[],
                };
                field(&mut h, bytes);
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// After a restore onto a fresh control plane, which issues ownership and
/// lease epochs from 1 again: lowers every shard fence, and the fence of
/// every job period without output, to 0, in one transaction. Rows,
/// committed periods and row counts are untouched. Returns (shard fences,
/// job fences) lowered. Only for a restored copy no old owner writes to.
pub fn reset_fences(path: &Path) -> Result<(u64, u64), StoreError> {
    let mut conn = Connection::open(path)
        .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {}: {e}", path.display())))?;
    let tx = conn.transaction().map_err(err)?;
    let shards = tx
        .execute("UPDATE shard_fence SET epoch = 0 WHERE epoch <> 0", [])
        .map_err(err)?;
    let jobs = tx
        .execute(
            "UPDATE job_fence SET lease_epoch = 0 WHERE lease_epoch <> 0 AND NOT EXISTS \
             (SELECT 1 FROM job_commit c WHERE c.job = job_fence.job AND c.period = job_fence.period)",
            [],
        )
        .map_err(err)?;
    tx.commit().map_err(err)?;
    Ok((shards as u64, jobs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, StoreConfig};

    fn seeded(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("live.db");
        let s = crate::open(&StoreConfig::sqlite(&p)).unwrap();
        s.write(
            "solar_system/1",
            3,
            &[Op::put("system", "row", b"{}".to_vec())],
        )
        .unwrap();
        s.claim_shard("solar_system/1", 7).unwrap();
        s.fence_job("stats", 5, 4).unwrap();
        s.commit_job("stats", 4, 2, &[("total".into(), b"1".to_vec())])
            .unwrap();
        p
    }

    #[test]
    fn a_snapshot_is_checked_and_its_fences_reset() {
        let dir = tempfile::tempdir().unwrap();
        let live = seeded(dir.path());
        let copy = dir.path().join("copy.db");
        sqlite_snapshot(&live, &copy, Duration::from_secs(2)).unwrap();
        let a = inspect_sqlite(&copy).unwrap();
        assert_eq!(a.schema_version, SCHEMA_VERSION);
        assert_eq!(a.row_counts["kv"], 1);
        assert_eq!(a.row_counts["job_row"], 1);
        assert_eq!(reset_fences(&copy).unwrap(), (1, 1));
        let b = inspect_sqlite(&copy).unwrap();
        assert_eq!(a, b, "the reset changes no row count and no data");
        let s = crate::open(&StoreConfig::sqlite(&copy)).unwrap();
        s.claim_shard("solar_system/1", 1).unwrap();
        s.fence_job("stats", 5, 1).unwrap();
    }

    #[test]
    fn a_copy_is_never_overwritten_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let live = seeded(dir.path());
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, b"x").unwrap();
        assert!(sqlite_snapshot(&live, &copy, Duration::from_secs(1)).is_err());
        std::fs::write(&copy, vec![7u8; 8192]).unwrap();
        assert!(inspect_sqlite(&copy).is_err());
    }

    #[test]
    fn the_digest_sees_a_changed_value() {
        let dir = tempfile::tempdir().unwrap();
        let live = seeded(dir.path());
        let a = dir.path().join("a.db");
        sqlite_snapshot(&live, &a, Duration::from_secs(1)).unwrap();
        let s = crate::open(&StoreConfig::sqlite(&live)).unwrap();
        s.write(
            "solar_system/1",
            7,
            &[Op::put("system", "row", b"{ }".to_vec())],
        )
        .unwrap();
        let b = dir.path().join("b.db");
        sqlite_snapshot(&live, &b, Duration::from_secs(1)).unwrap();
        let (x, y) = (inspect_sqlite(&a).unwrap(), inspect_sqlite(&b).unwrap());
        assert_eq!(x.row_counts, y.row_counts);
        assert_ne!(x.data_digest, y.data_digest);
    }
}
