//! The one test suite both back ends pass.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

use orrery_store::{Durability, Op, Store, StoreError, SCHEMA_VERSION};

use crate::harness::Harness;

fn rows(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn get(s: &dyn Store, shard: &str, table: &str, key: &str) -> Option<String> {
    s.get(shard, table, key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

/// A newer owner's claim fences the old owner out: its whole batch is
/// refused, the new owner's data is intact.
pub fn fencing(h: &Harness) {
    let s = h.open();
    let s = s.as_ref();
    s.claim_shard("sol-1", 1).unwrap();
    s.write(
        "sol-1",
        1,
        &[
            Op::put("planets", "earth", "a1"),
            Op::put("planets", "mars", "m1"),
        ],
    )
    .unwrap();
    // The new owner takes the shard over.
    s.claim_shard("sol-1", 2).unwrap();
    s.write("sol-1", 2, &[Op::put("planets", "earth", "b2")])
        .unwrap();
    // The old owner wakes up and writes a batch: refused whole.
    let e = s
        .write(
            "sol-1",
            1,
            &[
                Op::put("planets", "venus", "stale"),
                Op::put("planets", "earth", "stale"),
                Op::delete("planets", "mars"),
            ],
        )
        .unwrap_err();
    assert_eq!(
        e,
        StoreError::StaleOwner {
            shard: "sol-1".into(),
            epoch: 1,
            current: 2
        }
    );
    assert_eq!(
        e.to_string(),
        "stale owner: shard sol-1 epoch 1 < current 2"
    );
    assert!(e.is_fenced());
    assert_eq!(get(s, "sol-1", "planets", "earth").as_deref(), Some("b2"));
    assert_eq!(get(s, "sol-1", "planets", "mars").as_deref(), Some("m1"));
    assert_eq!(get(s, "sol-1", "planets", "venus"), None);
    // Its claim is refused too; the new owner's claim is idempotent.
    assert!(matches!(
        s.claim_shard("sol-1", 1),
        Err(StoreError::StaleOwner { current: 2, .. })
    ));
    s.claim_shard("sol-1", 2).unwrap();
    assert_eq!(s.shard_fence("sol-1").unwrap(), Some(2));
    // A write at a newer epoch raises the fence as a claim would.
    s.write("sol-1", 3, &[Op::delete("planets", "mars")])
        .unwrap();
    assert_eq!(s.shard_fence("sol-1").unwrap(), Some(3));
    assert_eq!(get(s, "sol-1", "planets", "mars"), None);
    assert!(matches!(
        s.write("sol-1", 2, &[Op::put("planets", "earth", "x")]),
        Err(StoreError::StaleOwner {
            epoch: 2,
            current: 3,
            ..
        })
    ));
    // Other shards are fenced separately.
    assert_eq!(s.shard_fence("sol-2").unwrap(), None);
    s.write("sol-2", 1, &[Op::put("planets", "earth", "other")])
        .unwrap();
    assert_eq!(get(s, "sol-1", "planets", "earth").as_deref(), Some("b2"));
    assert_eq!(
        get(s, "sol-2", "planets", "earth").as_deref(),
        Some("other")
    );
    // An empty batch checks (and raises) the fence only.
    s.write("sol-2", 4, &[]).unwrap();
    assert!(matches!(
        s.write("sol-2", 1, &[]),
        Err(StoreError::StaleOwner { .. })
    ));
}

/// Two nodes (two stores on one database): the paused node resumes after its
/// shard moved and must not overwrite the new owner.
pub fn fencing_two_nodes(h: &Harness) {
    let a = h.open();
    let b = h.open();
    a.claim_shard("sys-7", 10).unwrap();
    a.write("sys-7", 10, &[Op::put("fleet", "f1", "a")])
        .unwrap();
    b.claim_shard("sys-7", 11).unwrap();
    b.write("sys-7", 11, &[Op::put("fleet", "f1", "b")])
        .unwrap();
    assert!(matches!(
        a.write("sys-7", 10, &[Op::put("fleet", "f1", "a-late")]),
        Err(StoreError::StaleOwner {
            epoch: 10,
            current: 11,
            ..
        })
    ));
    assert_eq!(
        get(a.as_ref(), "sys-7", "fleet", "f1").as_deref(),
        Some("b")
    );
}

/// Exactly one commit per period; a replaced holder's late commit refused.
pub fn job_commit(h: &Harness) {
    let s = h.open();
    let s = s.as_ref();
    s.fence_job("stats", 100, 1).unwrap();
    s.commit_job("stats", 100, 1, &rows(&[("b", "2"), ("a", "1")]))
        .unwrap();
    // The same holder retrying (e.g. after a lost reply): refused, one row set.
    assert_eq!(
        s.commit_job("stats", 100, 1, &rows(&[("a", "other")])),
        Err(StoreError::AlreadyCommitted {
            job: "stats".into(),
            period: 100,
            committed_by: 1
        })
    );
    // A new holder for a committed period learns it at once.
    assert!(matches!(
        s.fence_job("stats", 100, 2),
        Err(StoreError::AlreadyCommitted {
            committed_by: 1,
            ..
        })
    ));
    // Holder 1 is killed and replaced mid-period 101 by holder 2.
    s.fence_job("stats", 101, 1).unwrap();
    s.fence_job("stats", 101, 2).unwrap();
    let e = s
        .commit_job("stats", 101, 1, &rows(&[("a", "late")]))
        .unwrap_err();
    assert_eq!(
        e,
        StoreError::StaleToken {
            job: "stats".into(),
            period: 101,
            lease_epoch: 1,
            current: 2
        }
    );
    assert!(e.to_string().contains("stale token"), "{e}");
    assert!(matches!(
        s.fence_job("stats", 101, 1),
        Err(StoreError::StaleToken { current: 2, .. })
    ));
    s.commit_job("stats", 101, 2, &rows(&[("a", "fresh")]))
        .unwrap();
    assert!(matches!(
        s.commit_job("stats", 101, 3, &[]),
        Err(StoreError::AlreadyCommitted {
            committed_by: 2,
            ..
        })
    ));
    // A commit without a prior fence is fenced by its own token; an empty output is a commit.
    s.commit_job("stats", 102, 5, &[]).unwrap();
    assert!(matches!(
        s.commit_job("stats", 102, 4, &[]),
        Err(StoreError::StaleToken { current: 5, .. })
    ));
    // Another job's periods are separate.
    s.commit_job("econ", 100, 1, &rows(&[("x", "y")])).unwrap();

    let got = s.job_periods("stats", 100, 103).unwrap();
    assert_eq!(
        got.iter()
            .map(|c| (c.period, c.lease_epoch))
            .collect::<Vec<_>>(),
        vec![(100, 1), (101, 2), (102, 5)]
    );
    assert_eq!(got[0].rows, rows(&[("a", "1"), ("b", "2")]));
    assert_eq!(got[1].rows, rows(&[("a", "fresh")]));
    assert!(got[2].rows.is_empty());
    // The database's clock, in ms since 1970: after 2020, before 2200.
    for c in &got {
        assert!(
            c.committed_at_ms > 1_577_836_800_000 && c.committed_at_ms < 7_258_118_400_000,
            "{}",
            c.committed_at_ms
        );
    }
    assert_eq!(s.job_periods("stats", 101, 102).unwrap().len(), 1);
    assert!(s.job_periods("stats", 0, 100).unwrap().is_empty());
    assert!(s.job_periods("stats", 103, 100).unwrap().is_empty());
    assert_eq!(s.job_periods("stats", 0, u64::MAX).unwrap().len(), 3);
    assert_eq!(s.job_periods("econ", 0, u64::MAX).unwrap().len(), 1);
}

/// Many holders race to commit one period: exactly one wins.
pub fn job_commit_race(h: &Harness) {
    let stores: Vec<_> = (0..4).map(|_| h.open()).collect();
    let wins = AtomicUsize::new(0);
    let barrier = Barrier::new(stores.len());
    std::thread::scope(|sc| {
        for (i, s) in stores.iter().enumerate() {
            let (wins, barrier) = (&wins, &barrier);
            sc.spawn(move || {
                let lease = i as u64 + 1;
                barrier.wait();
                let _ = s.fence_job("minute", 7, lease);
                match s.commit_job("minute", 7, lease, &rows(&[("who", &lease.to_string())])) {
                    Ok(()) => {
                        wins.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => assert!(e.is_fenced(), "unexpected {e}"),
                }
            });
        }
    });
    assert_eq!(wins.load(Ordering::SeqCst), 1);
    let got = stores[0].job_periods("minute", 7, 8).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rows.len(), 1);
    assert_eq!(
        got[0].rows[0].1,
        got[0].lease_epoch.to_string().into_bytes(),
        "the rows are the winner's"
    );
}

/// Writers on several threads and stores; an old owner writing in a loop
/// while the new owner claims: no old write lands after the claim.
pub fn concurrent_writers(h: &Harness) {
    let stores: Vec<_> = (0..3).map(|_| h.open()).collect();
    std::thread::scope(|sc| {
        for t in 0..4 {
            let s = &stores[t % stores.len()];
            sc.spawn(move || {
                for i in 0..25 {
                    s.write(
                        "shared",
                        1,
                        &[Op::put("t", format!("k{t}-{i:02}"), vec![t as u8; 16])],
                    )
                    .unwrap();
                }
            });
        }
    });
    let all = stores[0].scan("shared", "t", None, 1000).unwrap();
    assert_eq!(all.len(), 100);

    let started = AtomicBool::new(false);
    let old_writes = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        let (old, new) = (&stores[1], &stores[2]);
        let (started, old_writes) = (&started, &old_writes);
        sc.spawn(move || {
            for i in 0..100_000u32 {
                match old.write("race", 1, &[Op::put("t", "k", format!("old-{i}"))]) {
                    Ok(()) => {
                        old_writes.fetch_add(1, Ordering::SeqCst);
                        started.store(true, Ordering::SeqCst);
                        // A shard writes at its own pace, not in a loop that
                        // never lets go: SQLite's write lock is not fair, and
                        // with `synchronous = FULL` (an fsync per commit) a
                        // writer that re-takes it at once can starve the
                        // claim past `busy_timeout_ms` (a liveness limit of
                        // the shared-file back end, not a fencing hole).
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(StoreError::StaleOwner { current: 2, .. }) => return,
                    Err(e) => panic!("old owner: {e}"),
                }
            }
            panic!("the old owner was never fenced");
        });
        sc.spawn(move || {
            while !started.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            new.claim_shard("race", 2).unwrap();
            new.write("race", 2, &[Op::put("t", "k", "new")]).unwrap();
        });
    });
    assert!(old_writes.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        get(stores[0].as_ref(), "race", "t", "k").as_deref(),
        Some("new")
    );
}

/// Several processes' stores opening one fresh database at once.
pub fn concurrent_openers(h: &Harness) {
    let barrier = Barrier::new(4);
    std::thread::scope(|sc| {
        for _ in 0..4 {
            let barrier = &barrier;
            sc.spawn(move || {
                barrier.wait();
                let s = h.open();
                assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
            });
        }
    });
    assert_eq!(
        h.query_i64("SELECT count(*) FROM schema_migrations"),
        i64::from(SCHEMA_VERSION)
    );
}

/// An acknowledged commit is durable: SQLite runs `synchronous = FULL`
/// (2) in WAL mode on the store's connections; PostgreSQL sets
/// `synchronous_commit = on` per session, even where the database's default
/// says `off`.
pub fn durable_commits(h: &Harness) {
    if let Some(db) = h.pg_database() {
        h.exec(&format!("ALTER DATABASE {db} SET synchronous_commit = off"));
    }
    let s = h.open();
    s.write("s", 1, &[Op::put("t", "k", "v")]).unwrap();
    match s.durability().unwrap() {
        Durability::Sqlite {
            synchronous,
            journal_mode,
        } => {
            assert_eq!(h.pg_database(), None);
            assert_eq!(synchronous, 2, "PRAGMA synchronous must be FULL");
            assert_eq!(journal_mode, "wal");
        }
        // The throwaway test server runs `fsync = off` (speed): a server
        // setting orrery reports but does not own.
        Durability::Postgres {
            synchronous_commit, ..
        } => {
            assert!(h.pg_database().is_some());
            assert_eq!(synchronous_commit, "on");
        }
    }
}

/// Re-opening is a no-op: same version, same records, data intact.
pub fn reopen_is_noop(h: &Harness) {
    {
        let s = h.open();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        s.write("s", 1, &[Op::put("t", "k", "v")]).unwrap();
    }
    let before = h.query_i64("SELECT count(*) FROM schema_migrations");
    let s = h.open();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(
        h.query_i64("SELECT count(*) FROM schema_migrations"),
        before
    );
    assert_eq!(get(s.as_ref(), "s", "t", "k").as_deref(), Some("v"));
    assert_eq!(s.shard_fence("s").unwrap(), Some(1));
}

/// A database written by a newer build is refused.
pub fn future_version_refused(h: &Harness) {
    let s = h.open();
    h.exec(
        "INSERT INTO schema_migrations (version, name, checksum, state) \
         VALUES (999, 'from the future', 'abc', 'done')",
    );
    match h.try_open() {
        Err(StoreError::Migration(m)) => assert!(m.contains("999") && m.contains("newer"), "{m}"),
        other => panic!("expected a migration refusal, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(s.schema_version(), Err(StoreError::Migration(_))));
}

/// A migration recorded with another checksum is refused.
pub fn checksum_mismatch_refused(h: &Harness) {
    drop(h.open());
    h.exec("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1");
    match h.try_open() {
        Err(StoreError::Migration(m)) => assert!(m.contains("checksum"), "{m}"),
        other => panic!("expected a migration refusal, got {:?}", other.map(|_| ())),
    }
}

/// A migration recorded as started but never finished is refused, not loaded.
pub fn half_applied_refused(h: &Harness) {
    drop(h.open());
    h.exec("UPDATE schema_migrations SET state = 'started' WHERE version = 1");
    match h.try_open() {
        Err(StoreError::Corrupt { what, row }) => {
            assert_eq!(what, "schema_migrations");
            assert!(row.contains("never finished"), "{row}");
        }
        other => panic!("expected a corrupt refusal, got {:?}", other.map(|_| ())),
    }
    // A database that only got as far as a started record (a crash of a
    // non-transactional migrator) is refused the same way.
    h.exec(
        "DELETE FROM schema_migrations; \
         INSERT INTO schema_migrations (version, name, checksum, state) VALUES (1, 'x', 'y', 'started')",
    );
    assert!(matches!(h.try_open(), Err(StoreError::Corrupt { .. })));
}

/// Bad input is refused with an error, never a panic, and writes nothing.
pub fn bad_input(h: &Harness) {
    let mut cfg = h.cfg.clone();
    cfg.max_value_bytes = 1024;
    cfg.max_batch_ops = 10;
    cfg.max_name_bytes = 64;
    cfg.max_scan_rows = 50;
    let s = h.try_open_with(&cfg).unwrap();
    let s = s.as_ref();
    let invalid = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::InvalidInput { .. })),
            "expected InvalidInput, got {r:?}"
        )
    };
    let limit = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::Limit { .. })),
            "expected Limit, got {r:?}"
        )
    };
    invalid(s.claim_shard("", 1));
    invalid(s.write("", 1, &[Op::put("t", "k", "v")]));
    invalid(s.write("a\0b", 1, &[Op::put("t", "k", "v")]));
    invalid(s.write("s", 1, &[Op::put("", "k", "v")]));
    invalid(s.write("s", 1, &[Op::put("t", "", "v")]));
    invalid(s.write("s", 1, &[Op::delete("t", "k\0")]));
    invalid(s.write("s", u64::MAX, &[Op::put("t", "k", "v")]));
    invalid(s.claim_shard("s", 1 << 63));
    limit(s.write("s", 1, &[Op::put("t", "k", vec![0u8; 1025])]));
    limit(s.write("s", 1, &[Op::put("t", "x".repeat(65), "v")]));
    limit(s.write("s", 1, &vec![Op::put("t", "k", "v"); 11]));
    // A batch with one bad op writes nothing, not even the good ones.
    limit(s.write(
        "s",
        1,
        &[
            Op::put("t", "good", "v"),
            Op::put("t", "big", vec![0u8; 2000]),
        ],
    ));
    assert_eq!(s.get("s", "t", "good").unwrap(), None);
    assert_eq!(s.shard_fence("s").unwrap(), None);
    assert!(matches!(
        s.get("", "t", "k"),
        Err(StoreError::InvalidInput { .. })
    ));
    assert!(matches!(
        s.scan("s", "t", None, 51),
        Err(StoreError::Limit { .. })
    ));
    invalid(s.fence_job("", 1, 1));
    invalid(s.fence_job("j", u64::MAX, 1));
    invalid(s.commit_job("j", 1, u64::MAX, &[]));
    invalid(s.commit_job("j", 1, 1, &rows(&[("a", "1"), ("a", "2")])));
    invalid(s.commit_job("j", 1, 1, &rows(&[("", "1")])));
    limit(s.commit_job("j", 1, 1, &[("a".into(), vec![0; 1025])]));
    assert!(s.job_periods("j", 0, u64::MAX).unwrap().is_empty());
    // Edge values that are fine: an empty value, unicode names, the largest epoch.
    let max = i64::MAX as u64;
    s.write("système-☉", max, &[Op::put("tä", "ключ", vec![])])
        .unwrap();
    assert_eq!(s.get("système-☉", "tä", "ключ").unwrap(), Some(vec![]));
    s.write("s", 1, &[Op::put("t", "k", vec![0u8; 1024])])
        .unwrap();
}

/// Scans page in byte order, within one shard and table.
pub fn scan_pages(h: &Harness) {
    let s = h.open();
    let mut ops: Vec<Op> = (0..25)
        .map(|i| Op::put("t", format!("k{i:02}"), vec![i]))
        .collect();
    ops.push(Op::put("t", "B", "upper"));
    ops.push(Op::put("t", "é", "accent"));
    ops.push(Op::put("other", "k00", "x"));
    s.write("s1", 1, &ops).unwrap();
    s.write("s2", 1, &[Op::put("t", "k00", "x")]).unwrap();
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.scan("s1", "t", after.as_deref(), 10).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = Some(page.last().unwrap().0.clone());
        keys.extend(page.into_iter().map(|(k, _)| k));
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
    expected.insert(0, "B".into());
    expected.push("é".into());
    assert_eq!(keys, expected, "byte order");
    assert_eq!(s.scan("s1", "t", None, 0).unwrap(), vec![]);
    assert!(s.scan("nope", "t", None, 10).unwrap().is_empty());
}

/// `job_periods` refuses a range with more output than `max_scan_rows`.
pub fn job_periods_bounded(h: &Harness) {
    let mut cfg = h.cfg.clone();
    cfg.max_scan_rows = 5;
    let s = h.try_open_with(&cfg).unwrap();
    for p in 0..6 {
        s.commit_job("j", p, 1, &[]).unwrap();
    }
    assert!(matches!(
        s.job_periods("j", 0, 6),
        Err(StoreError::Limit { .. })
    ));
    assert_eq!(s.job_periods("j", 0, 5).unwrap().len(), 5);
    s.commit_job("k", 0, 1, &rows(&[("a", "1"), ("b", "1"), ("c", "1")]))
        .unwrap();
    s.commit_job("k", 1, 1, &rows(&[("a", "1"), ("b", "1"), ("c", "1")]))
        .unwrap();
    assert!(matches!(
        s.job_periods("k", 0, 2),
        Err(StoreError::Limit { .. })
    ));
    assert_eq!(s.job_periods("k", 1, 2).unwrap()[0].rows.len(), 3);
}

/// A commit record whose row count disagrees with its rows is reported corrupt.
pub fn corrupt_rows_reported(h: &Harness) {
    let s = h.open();
    s.commit_job("j", 1, 1, &rows(&[("a", "1")])).unwrap();
    h.exec("UPDATE job_commit SET row_count = 5 WHERE job = 'j'");
    assert!(matches!(
        s.job_periods("j", 0, 10),
        Err(StoreError::Corrupt { .. })
    ));
}
