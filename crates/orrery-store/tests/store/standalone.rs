//! Single-back-end tests: several processes sharing one SQLite file; unusable files; an unreachable server.

use std::process::{Command, Stdio};

use orrery_store::{Op, StoreConfig, StoreError};

const CHILD_DB: &str = "ORRERY_STORE_TEST_CHILD_DB";
const CHILD_EXPECT: &str = "ORRERY_STORE_TEST_CHILD_EXPECT";

/// Run by `two_processes` in a child process (a no-op otherwise): writes at
/// epoch 1 and checks the outcome the parent expects.
#[test]
fn child_writer() {
    let (Some(db), Some(expect)) = (std::env::var_os(CHILD_DB), std::env::var_os(CHILD_EXPECT))
    else {
        return;
    };
    let s = orrery_store::open(&StoreConfig::sqlite(db)).unwrap();
    for i in 0..100 {
        let r = s.write("shared", 1, &[Op::put("t", format!("child-{i:03}"), "c")]);
        match expect.to_str() {
            Some("ok") => r.unwrap(),
            Some("stale") => {
                assert!(
                    matches!(r, Err(StoreError::StaleOwner { current: 2, .. })),
                    "{r:?}"
                );
                return;
            }
            other => panic!("bad expectation {other:?}"),
        }
    }
}

fn run_child(db: &std::path::Path, expect: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "standalone::child_writer",
            "--test-threads=1",
            "--quiet",
        ])
        .env(CHILD_DB, db)
        .env(CHILD_EXPECT, expect)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the child; its output (a test run of its own) is shown only if it failed.
fn child_ok(child: std::process::Child) -> bool {
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!(
            "child stdout:\n{}\nchild stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// Two processes write one file at once; after a claim by epoch 2 in this
/// process, the other process's epoch-1 writes are refused.
#[test]
fn two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.sqlite3");
    let s = orrery_store::open(&StoreConfig::sqlite(&db)).unwrap();
    let child = run_child(&db, "ok");
    for i in 0..100 {
        s.write("shared", 1, &[Op::put("t", format!("parent-{i:03}"), "p")])
            .unwrap();
    }
    assert!(child_ok(child), "child writer failed");
    assert_eq!(s.scan("shared", "t", None, 1000).unwrap().len(), 200);
    s.claim_shard("shared", 2).unwrap();
    assert!(child_ok(run_child(&db, "stale")), "child was not fenced");
    assert_eq!(s.scan("shared", "t", None, 1000).unwrap().len(), 200);
}

/// A file that is not a database is refused with an error.
#[test]
fn garbage_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("garbage");
    std::fs::write(&db, vec![0x5au8; 8192]).unwrap();
    let r = orrery_store::open(&StoreConfig::sqlite(&db));
    assert!(
        matches!(
            r,
            Err(StoreError::Corrupt { .. }) | Err(StoreError::Backend(_))
        ),
        "{:?}",
        r.map(|_| ())
    );
    let r = orrery_store::open(&StoreConfig::sqlite(dir.path().join("no/such/dir/db")));
    assert!(matches!(r, Err(StoreError::Backend(_))));
}

/// An unreachable PostgreSQL server fails fast with an error (no server needed).
#[test]
fn postgres_unreachable_fails_fast() {
    let mut cfg = StoreConfig::postgres("host=127.0.0.1 port=1 user=nobody dbname=none");
    cfg.connect_timeout_ms = 2_000;
    assert!(matches!(
        orrery_store::open(&cfg),
        Err(StoreError::Backend(_))
    ));
}
