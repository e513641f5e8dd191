//! Test harness: a fresh database per test, on SQLite (a tempdir) or on
//! PostgreSQL (`ORRERY_TEST_PG`, or a throwaway server this binary starts).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use orrery_store::{Store, StoreConfig, StoreError};

enum Raw {
    Sqlite(PathBuf),
    Pg(String),
}

pub struct Harness {
    pub cfg: StoreConfig,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDb>,
}

impl Harness {
    pub fn sqlite() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.sqlite3");
        Harness {
            cfg: StoreConfig::sqlite(&path),
            raw: Raw::Sqlite(path),
            _dir: Some(dir),
            _db: None,
        }
    }

    /// A fresh database on the test server; `None` (after printing why) when
    /// there is no server and `CI` is not set.
    pub fn postgres(test: &str) -> Option<Harness> {
        let base = match pg_base() {
            Ok(b) => b,
            Err(reason) => {
                if std::env::var_os("CI").is_some() {
                    panic!("PostgreSQL is required when CI is set (set ORRERY_TEST_PG or install postgresql): {reason}");
                }
                // Straight to stderr: libtest captures only the print macros,
                // and a skip must be seen. Once per test binary.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIPPED: the postgres tests ({test} and the rest): {reason}"
                    );
                });
                return None;
            }
        };
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "orrery_store_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            test.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(30)
                .collect::<String>()
        );
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the test server: {e:?}"));
        // Separate statements: CREATE DATABASE cannot run in a (batch's) transaction.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
        let url = with_dbname(&base, &name);
        Some(Harness {
            cfg: StoreConfig::postgres(&url),
            raw: Raw::Pg(url),
            _dir: None,
            _db: Some(PgDb { base, name }),
        })
    }

    pub fn try_open_with(&self, cfg: &StoreConfig) -> Result<Box<dyn Store>, StoreError> {
        orrery_store::open(cfg)
    }

    pub fn try_open(&self) -> Result<Box<dyn Store>, StoreError> {
        orrery_store::open(&self.cfg)
    }

    pub fn open(&self) -> Box<dyn Store> {
        self.try_open().unwrap_or_else(|e| panic!("open: {e}"))
    }

    /// Runs `sql` on the database directly (to tamper with it).
    pub fn exec(&self, sql: &str) {
        match &self.raw {
            Raw::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).expect("raw sqlite");
                c.execute_batch(sql).expect("raw sql");
            }
            Raw::Pg(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("raw pg");
                c.batch_execute(sql).expect("raw sql");
            }
        }
    }

    /// The PostgreSQL database of this test (`None` on SQLite).
    pub fn pg_database(&self) -> Option<&str> {
        self._db.as_ref().map(|d| d.name.as_str())
    }

    /// Runs a query returning one integer.
    pub fn query_i64(&self, sql: &str) -> i64 {
        match &self.raw {
            Raw::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).expect("raw sqlite");
                c.query_row(sql, [], |r| r.get(0)).expect("raw query")
            }
            Raw::Pg(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("raw pg");
                c.query_one(sql, &[]).expect("raw query").get(0)
            }
        }
    }
}

/// Drops the test's database at the end (after the stores are gone).
struct PgDb {
    base: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `base` with its database replaced by `name` (URL or key-value form).
fn with_dbname(base: &str, name: &str) -> String {
    if let Some(i) = base.find("://") {
        let (pre, query) = match base.find('?') {
            Some(q) => (&base[..q], &base[q..]),
            None => (base, ""),
        };
        let authority_start = i + 3;
        let path_start = pre[authority_start..]
            .find('/')
            .map_or(pre.len(), |p| authority_start + p);
        format!("{}/{name}{query}", &pre[..path_start])
    } else {
        format!("{base} dbname={name}")
    }
}

static SERVER: OnceLock<Result<String, String>> = OnceLock::new();

/// The connection string of a database to create test databases from.
fn pg_base() -> Result<String, String> {
    SERVER
        .get_or_init(|| match std::env::var("ORRERY_TEST_PG") {
            Ok(url) if !url.trim().is_empty() => Ok(url),
            _ => start_throwaway().map_err(|e| {
                format!("ORRERY_TEST_PG is not set and no throwaway server could be started: {e}")
            }),
        })
        .clone()
}

fn find_pg_bin() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e} (apt-get install postgresql)", root.display()))?;
    for entry in entries.flatten() {
        let bin = entry.path().join("bin");
        let version = entry
            .file_name()
            .to_string_lossy()
            .parse::<u32>()
            .unwrap_or(0);
        if bin.join("initdb").exists()
            && bin.join("pg_ctl").exists()
            && best.as_ref().is_none_or(|(v, _)| version > *v)
        {
            best = Some((version, bin));
        }
    }
    best.map(|(_, b)| b)
        .ok_or_else(|| format!("no initdb/pg_ctl under {}/*/bin", root.display()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Starts a PostgreSQL server in a temp dir on a free 127.0.0.1 port (as
/// user `postgres` when we are root: the server refuses to run as root), and
/// a watcher that stops it and removes the dir when this process exits.
fn start_throwaway() -> Result<String, String> {
    let bin = find_pg_bin()?;
    let root = is_root();
    let dir = tempfile::Builder::new()
        .prefix("orrery-store-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let data = dir.join("data");
    let as_pg = |prog: &str| {
        let mut c = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        } else {
            Command::new(bin.join(prog))
        };
        c.stdin(Stdio::null());
        c
    };
    if root {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !st.success() {
            return Err("chown of the temp dir to user postgres failed (no user postgres?)".into());
        }
    }
    let out = as_pg("initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let port = free_port()?;
    let log = dir.join("server.log");
    let ctl_out = std::fs::File::create(dir.join("pg_ctl.out")).map_err(|e| e.to_string())?;
    let ctl_err = ctl_out.try_clone().map_err(|e| e.to_string())?;
    let status = as_pg("pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "30", "-o"])
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            dir.display()
        ))
        .arg("start")
        .stdout(ctl_out)
        .stderr(ctl_err)
        .status()
        .map_err(|e| format!("pg_ctl: {e}"))?;
    // Whatever happened, stop the server and remove the dir when we exit.
    let runner = if root { "runuser -u postgres -- " } else { "" };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {runner}'{ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    use std::os::unix::process::CommandExt;
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if !status.success() {
        let log_tail = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(format!("pg_ctl start failed: {}", log_tail.trim()));
    }
    Ok(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ))
}

#[test]
fn dbname_rewrite() {
    assert_eq!(
        with_dbname("postgres://u:p@h:5432/db?sslmode=disable", "t1"),
        "postgres://u:p@h:5432/t1?sslmode=disable"
    );
    assert_eq!(with_dbname("postgresql://u@h", "t1"), "postgresql://u@h/t1");
    assert_eq!(
        with_dbname("host=h user=u", "t1"),
        "host=h user=u dbname=t1"
    );
}
