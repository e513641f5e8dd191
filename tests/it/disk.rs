//! A voter's disk fills (issue 13, item 3; the second post-mortem's silent
//! standby). Real `orrery node` processes, 3 voters and a worker, each
//! voter's Raft directory on its own 24 MiB tmpfs (a real filesystem that
//! really fills: this test mounts, so it runs as root, as `.ci/run` does).
//! The leader's fills: within seconds an alarm names the node and the path,
//! the node says VOTER DOWN (its Raft core stopped, it no longer leads),
//! `orrery status` shows it, the other two voters go on committing; once
//! the space is freed its core restarts by itself and it holds the same
//! state as the others. Waits are bounded polls, never sleeps.

use crate::cluster::{TestCluster, Tmpfs};
use orrery_core::{EventKind, NodeId, Stage};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn ready(s: &orrery_core::ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

/// Writes `file` in 256 KiB chunks until the filesystem refuses (ENOSPC).
fn fill(file: &Path) -> u64 {
    let mut f = std::fs::File::create(file).expect("create ballast");
    let chunk = vec![0x5au8; 256 * 1024];
    let mut written = 0u64;
    while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {
        written += chunk.len() as u64;
        assert!(written < 1 << 30, "the tmpfs never filled");
    }
    written
}

fn poll<V>(what: &str, mut f: impl FnMut() -> Result<V, String>) -> V {
    let deadline = Instant::now() + T;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `orrery CMD --data-dir` against the cluster: (exit code, stdout).
fn run(c: &TestCluster, cmd: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(crate::cluster::BIN)
        .args([cmd, "--data-dir"])
        .arg(c.dir.path())
        .output()
        .expect("run orrery");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// (applied index, digest) of node `id`, if it answers.
fn digest(c: &TestCluster, id: NodeId) -> Option<(u64, String)> {
    c.node_status(id)?.raft_digest
}

#[test]
fn a_full_disk_takes_a_voter_out_loudly_and_it_recovers_once_space_is_freed() {
    let mut c = TestCluster::new(4, 3, |_| {});
    let mounts: Vec<Tmpfs> = (1..=3)
        .map(|v| Tmpfs::mount(&c.dir.path().join(format!("node-{v}")).join("raft"), "24m"))
        .collect();
    for v in 1..=3 {
        c.edit_config(v, |cfg| {
            cfg.resources.check_interval_ms = 200;
            cfg.resources.disk_warn_free_bytes = 4 << 20;
            cfg.resources.disk_warn_free_pct = 0;
            cfg.resources.disk_critical_free_bytes = 1 << 20;
            cfg.resources.disk_critical_free_pct = 0;
        });
    }
    c.start_all();
    c.wait_for("stage 0", T, ready);
    let victim = c
        .wait_node(1, "a leader", T, |s| s.leader.is_some())
        .leader
        .expect("leader");
    let raft_dir = c.dir.path().join(format!("node-{victim}")).join("raft");
    let written = fill(&raft_dir.join("ballast"));
    let filled_at = c.state().map(|s| s.applied_index).unwrap_or(0);

    // Loud: the node says why, it no longer leads, the alarm names node and path.
    let st = c.wait_node(victim, "VOTER DOWN", T, |s| {
        s.voter_down.is_some() && !s.is_leader
    });
    let why = st.voter_down.clone().unwrap_or_default();
    assert!(why.contains(&raft_dir.display().to_string()), "{why}");
    let path = raft_dir.display().to_string();
    let s = c.wait_for(
        "a new coordinator, and an alarm naming node and path",
        T,
        |s| {
            s.leader.is_some_and(|l| l != victim)
                && s.events.iter().any(|e| {
                    e.kind == EventKind::Alarm
                        && e.node == Some(victim)
                        && e.index > filled_at
                        && e.detail.contains(&path)
                })
        },
    );
    assert!(
        s.leader.is_some_and(|l| l != victim),
        "a new leader: {:?}",
        s.leader
    );
    // `orrery status` shows it and exits 2 (a critical alarm nobody has
    // acknowledged); `orrery alarms` lists both; once acknowledged, 0.
    let (code, table) = run(&c, "status");
    assert_eq!(code, Some(2), "{table}");
    assert!(table.contains("VOTER DOWN"), "{table}");
    assert!(
        table.contains("resource CRITICAL") && table.contains(&path),
        "{table}"
    );
    let (code, list) = run(&c, "alarms");
    assert_eq!(code, Some(2), "{list}");
    let row = |name: &str| {
        list.lines()
            .any(|l| l.starts_with("CRITICAL") && l.contains(name))
    };
    assert!(row("voter_down") && row("resource:raft_disk"), "{list}");
    for name in ["voter_down", "resource:raft_disk"] {
        let (ok, out, err) = c.exec(&["--nodes", &victim.to_string()], &["alarm", "ack", name]);
        assert!(ok, "ack {name}: {out} {err}");
    }
    let (code, table) = run(&c, "status");
    assert_eq!(code, Some(0), "acknowledged, status exits 0: {table}");

    // The other two voters keep committing.
    let worker = 4.to_string();
    for on in ["on", "off"] {
        poll(
            &format!("drain {on} committed without the full voter"),
            || {
                let (ok, out, err) = c.exec(&["--nodes", &worker], &["drain", on]);
                ok.then_some(()).ok_or(format!("{out} {err}"))
            },
        );
    }

    // Space freed: it comes back by itself, holding the others' state.
    std::fs::remove_file(raft_dir.join("ballast")).expect("free the space");
    let st = c.wait_node(victim, "the voter back", T, |s| {
        s.voter_down.is_none() && s.resources.is_empty()
    });
    assert!(st.control_alarms.is_empty(), "{:?}", st.control_alarms);
    assert!(st.alarms.is_empty(), "every alarm cleared: {:?}", st.alarms);
    let other = (1..=3).find(|v| *v != victim).expect("another voter");
    poll("equal digests at one index", || {
        match (digest(&c, other), digest(&c, victim)) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                assert_eq!(a.1, b.1, "same index {}, different state", a.0);
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    let metrics = ureq::get(&format!("http://{}/metrics", c.admin_addr(victim)))
        .timeout(Duration::from_secs(2))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("metrics text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orrery_raft_core_restarts_total ") && !l.ends_with(" 0")),
        "the core was restarted in place"
    );
    eprintln!("filled {written} bytes of the leader's 24 MiB tmpfs");
    c.stop_all();
    drop(mounts);
}
