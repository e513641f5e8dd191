//! Backups that are proven (issue 13, item 2), on real processes: back a
//! universe cluster up, destroy its data directory, restore it and reach
//! stage 0 with the same universe; a scheduled backup to an unwritable
//! destination (under a regular file) or a full one (a small tmpfs)
//! raises an alarm within one period and `orrery status` exits non-zero
//! until it is fixed; a backup with a flipped byte is
//! refused by `orrery restore`, which changes nothing.

use crate::cluster::{TestCluster, BIN};
use orrery::local::{self, AdminClient, Manifest, Plan};
use orrery_core::{ClusterState, EventKind};
use orrery_node::backup::{self as nb, BackupConfig, BackupManifest};
use orrery_store::backup::inspect_sqlite;
use orrery_universe::{generate, Sizes, UniverseConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn orrery(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("ORRERY_ADMIN_TOKEN")
        .output()
        .expect("run orrery")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The one backup directory under `root`.
fn only_backup(root: &Path) -> (PathBuf, BackupManifest) {
    let all = nb::list(root);
    assert_eq!(all.len(), 1, "one backup in {}: {all:?}", root.display());
    let dir = all[0].0.clone();
    let m = nb::read_manifest(&dir).expect("manifest");
    (dir, m)
}

/// The row counts of the universe itself and its fences, which stay put
/// while an idle universe cluster runs (its statistics job goes on
/// committing periods: the job tables only grow).
fn steady(
    mut rows: std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    for t in ["job_fence", "job_commit", "job_row"] {
        rows.remove(t);
    }
    rows
}

/// `orrery up` in the background, interrupted (as Ctrl-C) when dropped.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the restored cluster until it is at stage 0 with every node
/// rejoined since `launched_ms`.
fn wait_ready(m: &Manifest, launched_ms: u64, within: Duration) -> ClusterState {
    let client = AdminClient::default();
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(s) = client.cluster_state(m) {
            if local::is_ready(&s, launched_ms) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the restored cluster never reached stage 0: {}",
        crate::cluster::show(last)
    );
}

#[test]
fn backup_destroy_restore_reaches_stage_zero_with_the_same_universe() {
    let cfg = UniverseConfig {
        npc_ops_per_s: 0,
        stats_period_ms: 3_600_000,
        ..Default::default()
    };
    let mut c = TestCluster::new(3, 3, |p| local::with_universe(p, &cfg).expect("universe"));
    let store_path = Manifest::store_path(c.dir.path());
    let u = generate(5, Sizes::for_systems(300)).expect("generate");
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store_path)).expect("store");
    orrery_universe::import(&*store, &u).expect("import");
    c.start_all();
    c.wait_for("stage 0", Duration::from_secs(120), |s| {
        local::is_ready(s, 0)
    });
    // A shard whose fence is far above anything a fresh control plane
    // issues: the restore must reset it, or the shard never loads again.
    store
        .claim_shard("solar_system/3", 1_000)
        .expect("raise a fence");
    drop(store);
    let dests = tempfile::tempdir().expect("tempdir");
    let out = orrery(&[
        "backup",
        "--data-dir",
        p(c.dir.path()),
        "--to",
        p(dests.path()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verified"),
        "{}",
        text(&out)
    );
    let (bdir, m) = only_backup(dests.path());
    let st = m.store.clone().expect("the store is in the backup");
    assert_eq!(
        st.row_counts["kv"] as usize,
        kv_rows(&u),
        "every universe row is in the backup"
    );
    let saved: ClusterState =
        postcard::from_bytes(&std::fs::read(bdir.join(nb::STATE_FILE)).unwrap()).unwrap();
    assert_eq!(
        nb::digest_hex(&std::fs::read(bdir.join(nb::STATE_FILE)).unwrap()),
        m.state_digest
    );
    assert_eq!(saved.applied_index, m.applied_index);
    c.stop_all();

    // Destroy the data directory, then restore into the same path.
    let data = c.dir.path().to_path_buf();
    std::fs::remove_dir_all(&data).expect("destroy the data directory");
    let out = orrery(&["restore", "--from", p(&bdir), "--data-dir", p(&data)]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("fences reset"), "{said}");
    let manifest = Manifest::load(&data).expect("restored manifest");
    assert_eq!(manifest.cluster_id, m.cluster_id);

    let launched = orrery_node::clock::now_ms();
    let up = Up(Command::new(BIN)
        .args([
            "up",
            "--data-dir",
            p(&data),
            "--nodes",
            "3",
            "--voters",
            "3",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("orrery up"));
    let s = wait_ready(&manifest, launched, Duration::from_secs(120));
    // The replicated state a universe depends on is the backup's: the
    // configuration and the declared shards (the control plane itself,
    // its epochs and timeline, start afresh).
    assert_eq!(*s.config, *saved.config, "same replicated configuration");
    assert_eq!(s.shards.kinds, saved.shards.kinds, "same shard kinds");
    assert_eq!(
        s.shards.entries.keys().collect::<Vec<_>>(),
        saved.shards.entries.keys().collect::<Vec<_>>(),
        "same shards"
    );
    // Every shard was loaded again by the new cluster: solar_system/3's
    // fence is the new owner's epoch, not the 1,000 of before.
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        &data,
    )))
    .expect("restored store");
    loop {
        let f = store.shard_fence("solar_system/3").unwrap();
        if f.is_some_and(|e| e > 0 && e < 1_000) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "solar_system/3 was never claimed again: fence {f:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(store);
    drop(up);
    // The universe in the restored cluster's store is the backup's, row for row.
    let copy = tempfile::tempdir().unwrap();
    let snap = copy.path().join("now.db");
    orrery_store::backup::sqlite_snapshot(
        &Manifest::store_path(&data),
        &snap,
        Duration::from_secs(5),
    )
    .unwrap();
    let now = inspect_sqlite(&snap).expect("the restored store checks");
    assert_eq!(
        steady(now.row_counts.clone()),
        steady(st.row_counts.clone()),
        "row counts equal"
    );
    assert_eq!(now.data_digest, st.data_digest, "data digest equal");
    for t in ["job_commit", "job_row"] {
        assert!(
            now.row_counts[t] >= st.row_counts[t],
            "committed job output kept: {t}"
        );
    }
    let u2 = orrery_universe::import::read_back(
        &*orrery_store::open(&orrery_store::StoreConfig::sqlite(&snap)).unwrap(),
    )
    .expect("the universe reads back valid");
    assert_eq!(u2.systems.len(), u.systems.len());
    drop(c);
}

fn kv_rows(u: &orrery_universe::Universe) -> usize {
    // One meta row; a row per system, campaign, alliance, market order,
    // region, constellation and character.
    1 + u.systems.len()
        + u.campaigns.len()
        + u.alliances.len()
        + u.market_orders.len()
        + u.regions.len()
        + u.constellations.len()
        + u.characters.len()
}

#[test]
fn a_scheduled_backup_to_an_unwritable_destination_alarms_and_status_exits_non_zero() {
    let outside = tempfile::tempdir().expect("tempdir");
    // A path under a regular file: unwritable whoever runs the test (root too).
    let blocker = outside.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    failing_destination_alarms_then_clears(
        blocker.join("backups"),
        &["Not a directory", "not-a-dir"],
        || std::fs::remove_file(&blocker).unwrap(),
    );
}

#[test]
fn a_scheduled_backup_to_a_full_destination_alarms_and_status_exits_non_zero() {
    let outside = tempfile::tempdir().expect("tempdir");
    let fs = crate::cluster::Tmpfs::mount(&outside.path().join("small"), "1m");
    let ballast = fs.0.join("ballast");
    let mut f = std::fs::File::create(&ballast).expect("ballast");
    let chunk = vec![0x5au8; 4096];
    let mut written = 0u64;
    while std::io::Write::write_all(&mut f, &chunk)
        .and_then(|_| f.sync_data())
        .is_ok()
    {
        written += 4096;
        assert!(written < 64 << 20, "the tmpfs never filled");
    }
    drop(f);
    failing_destination_alarms_then_clears(
        fs.0.join("backups"),
        &["No space left on device"],
        || std::fs::remove_file(&ballast).unwrap(),
    );
}

/// A cluster whose scheduled backups go to `dest`, which fails: the leader
/// knows within one period of stage 0 (the reason names each of `reason`),
/// the timeline has the alarm, `orrery status` exits 2, the metrics say
/// so; after `fix`, the next backup is good and proven and all of it clears.
fn failing_destination_alarms_then_clears(dest: PathBuf, reason: &[&str], fix: impl FnOnce()) {
    let period = 3_000;
    let mut c = TestCluster::new(3, 3, |p| {
        p.backup = BackupConfig {
            period_ms: period,
            dir: Some(dest.clone()),
            ..Default::default()
        };
    });
    c.start_all();
    let ready = c.wait_for("stage 0", Duration::from_secs(60), |s| {
        local::is_ready(s, 0)
    });
    let ready_at = orrery_node::clock::now_ms();
    let leader = ready.leader.expect("a leader");
    let st = c.wait_node(
        leader,
        "a failed backup",
        Duration::from_millis(period + 2_000),
        |s| s.backup.as_ref().is_some_and(|b| b.last_failure.is_some()),
    );
    let b = st.backup.unwrap();
    let failed_at = b.last_failure_at_ms.unwrap();
    assert!(
        failed_at <= ready_at + period + 1_000,
        "the failure is known within one period of stage 0 ({failed_at} vs ready {ready_at})"
    );
    let why = b.last_failure.unwrap();
    assert!(reason.iter().all(|r| why.contains(r)), "{why}");
    c.wait_for(
        "a backup alarm in the timeline",
        Duration::from_secs(15),
        |s| {
            s.events.iter().any(|e| {
                e.kind == EventKind::Alarm
                    && e.detail.contains("backup to")
                    && e.detail.contains(reason[0])
            })
        },
    );
    let out = orrery(&["status", "--data-dir", p(c.dir.path())]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ALARM node"),
        "{}",
        text(&out)
    );
    let metrics = scrape(&c.admin_addr(leader));
    assert!(
        metrics.contains("orrery_backup_failures_total"),
        "{metrics}"
    );
    assert!(metrics.contains("orrery_backup_alarm 1"), "{metrics}");
    assert!(
        nb::list(&dest).is_empty(),
        "no failed backup is left looking like one"
    );

    fix();
    let st = c.wait_node(
        leader,
        "a good backup",
        Duration::from_millis(period + 5_000),
        |s| {
            s.backup
                .as_ref()
                .is_some_and(|b| b.last_success.is_some() && b.last_failure.is_none())
        },
    );
    let good = PathBuf::from(st.backup.unwrap().last_success.unwrap());
    let scratch = tempfile::tempdir().unwrap();
    nb::verify(&good, scratch.path(), 1 << 30).expect("the scheduled backup verifies");
    let out = orrery(&["status", "--data-dir", p(c.dir.path())]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("last good backup"),
        "{}",
        text(&out)
    );
    let metrics = scrape(&c.admin_addr(leader));
    assert!(
        metrics.contains("orrery_backup_last_success_age_seconds"),
        "{metrics}"
    );
    assert!(metrics.contains("orrery_backup_alarm 0"), "{metrics}");
    c.stop_all();
}

fn scrape(admin: &str) -> String {
    ureq::get(&format!("http://{admin}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("metrics text")
}

#[test]
fn a_backup_with_a_flipped_byte_is_refused_and_restore_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let m = local::prepare(&Plan::new(3, 3, &data)).expect("a local cluster's layout");
    let store_path = Manifest::store_path(&data);
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store_path)).unwrap();
    orrery_universe::import(&*store, &generate(2, Sizes::for_systems(100)).unwrap()).unwrap();
    drop(store);
    // A backup of the kind the leader schedules (state and store, no layout).
    let state = ClusterState {
        applied_index: 7,
        ..Default::default()
    };
    let inputs = nb::Inputs {
        cluster_id: m.cluster_id.clone(),
        taken_by: "test".into(),
        source_data_dir: None,
        state: nb::encode_state(&state).unwrap(),
        store: Some(store_path.clone()),
        extra: vec![],
        busy_timeout: Duration::from_secs(5),
        scratch: dir.path().to_path_buf(),
        max_state_bytes: 1 << 20,
    };
    let good = nb::take(&dir.path().join("backups"), &inputs)
        .expect("backup")
        .dir;
    // Its store changes in the live cluster afterwards: a restore would show.
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store_path)).unwrap();
    store
        .write(
            "universe",
            0,
            &[orrery_store::Op::put("x", "after", b"1".to_vec())],
        )
        .unwrap();
    drop(store);
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(&good).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    let target = bad.join(nb::STORE_FILE);
    let mut bytes = std::fs::read(&target).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&target, &bytes).unwrap();

    let before = listing(&data);
    let store_before = std::fs::read(&store_path).unwrap();
    let out = orrery(&[
        "restore",
        "--from",
        p(&bad),
        "--data-dir",
        p(&data),
        "--replace",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was restored or changed"), "{err}");
    assert!(err.contains("checksum mismatch in store.db"), "{err}");
    assert_eq!(listing(&data), before, "no file added, moved or removed");
    assert_eq!(
        std::fs::read(&store_path).unwrap(),
        store_before,
        "the store is untouched"
    );
    // A restore into a fresh directory is refused the same way, and makes none.
    let fresh = dir.path().join("fresh");
    let out = orrery(&["restore", "--from", p(&bad), "--data-dir", p(&fresh)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!fresh.exists(), "nothing created");
    // The intact backup restores, and the row written after it is gone.
    let out = orrery(&[
        "restore",
        "--from",
        p(&good),
        "--data-dir",
        p(&data),
        "--replace",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store_path)).unwrap();
    assert_eq!(store.get("universe", "x", "after").unwrap(), None);
}

/// Every path under `dir`, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out.sort();
    out
}
