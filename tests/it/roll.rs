//! `orrery roll` (issue 13, item 5) on real processes. Under NPC load a
//! roll of a 5-node universe cluster restarts every node exactly once
//! (one `NodeLeft` and one new epoch each, nobody suspected), no shard is
//! loaded by two nodes at once (the nodes' own `/shards` reports, polled
//! during the roll), and the NPC calls that fail do so only with typed,
//! retried kinds (`/metrics`). A roll onto a binary that fails its health
//! check stops at the first node and, with `--rollback-on-failure`, puts
//! it back on its previous binary. Waits are bounded polls, never sleeps.

use crate::cluster::{show, TestCluster, BIN};
use orrery::local::{self, DirLock, Manifest};
use orrery_core::{ClusterState, EventKind, MemberStatus, NodeId, Stage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// Failure kinds a caller retries (the route moved, the owner was being
/// handed over, fenced or busy, a deadline passed): what a roll may cause.
/// Typed failures a caller expects around a hand-over: the router retried
/// them until the deadline, or (`in_doubt`) the outcome is unknown.
pub const RETRIED: [&str; 6] = [
    "timeout",
    "moved",
    "fenced",
    "overloaded",
    "unavailable",
    "in_doubt",
];

pub fn ready(s: &ClusterState) -> bool {
    s.stage == Stage::READY
        && s.laggards(Stage::READY).is_empty()
        && s.members.values().all(|m| m.status == MemberStatus::Active)
}

pub fn owned_by(s: &ClusterState, n: NodeId) -> usize {
    s.shards.entries.values().filter(|e| e.owner == n).count()
}

/// Stops every node process of the cluster in `dir`, however it was
/// started (by the harness or detached by `orrery start`/`roll`): SIGTERM
/// to all, then SIGKILL to what still runs after the grace period. Runs on
/// drop, so a failing test leaves nothing behind.
pub struct Reaper(pub PathBuf, pub Vec<NodeId>);

impl Reaper {
    fn pids(&self) -> Vec<u32> {
        self.1
            .iter()
            .filter_map(|id| {
                let lock = local::node_lock_path(&self.0.join(format!("node-{id}")));
                DirLock::holder(&lock).ok().flatten().and_then(|h| h.pid)
            })
            .collect()
    }

    pub fn stop(&self) {
        let kill = |sig: &str, pid: u32| {
            let _ = Command::new("kill")
                .args([sig, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        };
        self.pids().into_iter().for_each(|p| kill("-TERM", p));
        let deadline = Instant::now() + orrery::procs::STOP_GRACE;
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pids().into_iter().for_each(|p| kill("-KILL", p));
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `/metrics` of the node at `admin`: (name, labels, value) of every
/// sample, `None` if it does not answer.
/// One `/metrics` sample: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

pub fn scrape(admin: &str) -> Option<Vec<Sample>> {
    let text = ureq::get(&format!("http://{admin}/metrics"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()?;
    Some(
        scrape
            .samples
            .into_iter()
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (s.metric, labels, v)
            })
            .collect(),
    )
}

/// Runs a real `orrery` command to its end: (exit ok, stdout + stderr).
pub fn orrery(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .env_remove("ORRERY_ADMIN_TOKEN")
        .output()
        .expect("run orrery");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// What the nodes said about themselves while the roll ran.
#[derive(Default)]
struct Seen {
    /// Polls at which every answering node routed by the same map version.
    same_version_polls: usize,
    /// (poll, total loaded, shards) where more were loaded than exist.
    double_loaded: Vec<String>,
    /// Last NPC failure count by (node, epoch, kind): counters restart
    /// with each process.
    failures: BTreeMap<(NodeId, u64, String), f64>,
}

impl Seen {
    /// One poll of every node's own `/shards`, `/status` and `/metrics`.
    fn poll(&mut self, c: &TestCluster, total: usize) {
        let client = local::AdminClient::default();
        let mut reports = vec![];
        for n in &c.manifest.nodes {
            let (Ok(st), Ok(h)) = (
                client.node_status(&n.admin_addr),
                client.node_shards(&n.admin_addr),
            ) else {
                continue;
            };
            reports.push((n.id, h));
            for (name, labels, v) in scrape(&n.admin_addr).unwrap_or_default() {
                if name == "orrery_app_call_failures_total" && v > 0.0 {
                    let kind = labels.get("kind").cloned().unwrap_or_default();
                    self.failures.insert((n.id, st.epoch, kind), v);
                }
            }
        }
        let versions: std::collections::BTreeSet<u64> =
            reports.iter().map(|(_, h)| h.map_version).collect();
        if versions.len() == 1 {
            self.same_version_polls += 1;
            let loaded: usize = reports.iter().map(|(_, h)| h.loaded).sum();
            let over: Vec<String> = reports
                .iter()
                .filter(|(_, h)| h.loaded > h.assigned)
                .map(|(id, h)| format!("node {id} loaded {} of {} assigned", h.loaded, h.assigned))
                .collect();
            if loaded > total || !over.is_empty() {
                self.double_loaded.push(format!(
                    "{loaded} loaded of {total} shards at map {versions:?}: {over:?}"
                ));
            }
        }
    }
}

fn universe_cluster(nodes: u64, voters: u64, npc_ops_per_s: u32) -> TestCluster {
    use orrery_universe::{generate, Sizes, UniverseConfig};
    let cfg = UniverseConfig {
        npc_ops_per_s,
        call_timeout_ms: 1_000,
        ..Default::default()
    };
    let c = TestCluster::new(nodes, voters, |p| {
        local::with_universe(p, &cfg).expect("universe config");
    });
    let u = generate(7, Sizes::for_systems(300)).expect("generate");
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        c.dir.path(),
    )))
    .expect("open the store");
    orrery_universe::import(&*store, &u).expect("import");
    c
}

#[test]
fn a_roll_under_npc_load_restarts_every_node_once_and_fails_no_call_untyped() {
    let mut c = universe_cluster(5, 3, 50);
    let ids: Vec<NodeId> = (1..=5).collect();
    let reaper = Reaper(c.dir.path().to_owned(), ids.clone());
    c.start_all();
    let before = c.wait_for("the universe at stage 0, shards everywhere", T, |s| {
        ready(s) && ids.iter().all(|id| owned_by(s, *id) > 0)
    });
    let total = before.shards.entries.len();
    let mut seen = Seen::default();
    // The NPCs are at work before the roll starts.
    let deadline = Instant::now() + T;
    while scrape(&c.admin_addr(1)).is_none_or(|m| {
        !m.iter()
            .any(|(n, l, v)| n == "orrery_app_calls_total" && l.get("call").is_some() && *v > 0.0)
    }) {
        assert!(Instant::now() < deadline, "node 1's NPCs make no calls");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Failures before the roll (start-up) are not the roll's.
    seen.poll(&c, total);
    let pre = seen.failures.clone();
    let out = c.dir.path().join("roll.out");
    let mut roll = Command::new(BIN)
        .args([
            "roll",
            "--stable-ms",
            "1000",
            "--node-timeout-s",
            "60",
            "--data-dir",
        ])
        .arg(c.dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("roll.out"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start orrery roll");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = roll.try_wait().expect("roll") {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "the roll did not end"
        );
        seen.poll(&c, total);
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    eprintln!("{text}");
    assert!(status.success(), "the roll failed: {text}");
    assert!(text.contains("roll finished: 5 nodes restarted"), "{text}");
    // Workers first, voters last, the leader last.
    let leader = before.leader.expect("a leader");
    let order: Vec<NodeId> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("orrery: node ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(order.len(), 5, "{text}");
    assert_eq!(&order[..2], &[4, 5], "{text}");
    assert_eq!(order[4], leader, "{text}");

    let after = c.wait_for("all back at stage 0", T, ready);
    let since = |e: &orrery_core::Event| e.index > before.applied_index;
    for id in &ids {
        let of = |k: EventKind| {
            after
                .events
                .iter()
                .filter(|e| since(e) && e.node == Some(*id) && e.kind == k)
                .count()
        };
        assert_eq!(
            of(EventKind::NodeLeft),
            1,
            "node {id}: {}",
            show(Some(after.clone()))
        );
        assert_eq!(
            of(EventKind::NodeSuspected) + of(EventKind::NodeRemoved),
            0,
            "node {id}"
        );
        assert!(
            after.members[id].epoch > before.members[id].epoch,
            "node {id} not restarted"
        );
    }
    let ops: Vec<&str> = after
        .events
        .iter()
        .filter(|e| since(e) && e.kind == EventKind::Operation)
        .map(|e| e.detail.as_str())
        .collect();
    assert!(
        ops.first()
            .is_some_and(|o| o.starts_with("roll: roll started")),
        "{ops:?}"
    );
    assert_eq!(
        ops.iter()
            .filter(|o| o.starts_with("roll: node ") && o.contains(" restarted in "))
            .count(),
        5,
        "{ops:?}"
    );
    assert!(
        ops.last()
            .is_some_and(|o| o.starts_with("roll: roll finished")),
        "{ops:?}"
    );

    // The nodes' own reports: never more shards loaded than exist, nor a
    // node holding more than its map assigns it (polls at one map version).
    assert!(
        seen.same_version_polls > 20,
        "{} polls",
        seen.same_version_polls
    );
    assert!(seen.double_loaded.is_empty(), "{:?}", seen.double_loaded);
    let bad: Vec<_> = seen
        .failures
        .iter()
        .filter(|(k, v)| !RETRIED.contains(&k.2.as_str()) && pre.get(*k) != Some(*v))
        .collect();
    let log_lines = |needle: &str| -> Vec<String> {
        ids.iter()
            .flat_map(|id| {
                c.log(*id)
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("node {id}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // A hand-over never surfaces untyped: the new owner raises the store
    // fence only after the hand-over delay, calls queued at an unloaded
    // shard are answered `Moved`, and a write the fence refuses anyway
    // reaches its caller as `Unavailable` (retried on the new owner).
    assert!(
        bad.is_empty(),
        "NPC calls failed untyped or unretried: {bad:?} (before the roll: {pre:?}):\n{}",
        log_lines("refused").join("\n")
    );
    let stale = log_lines("stale owner");
    eprintln!(
        "store refusals of a stale owner's write during the roll (typed, retried): {}\n{}",
        stale.len(),
        stale.join("\n")
    );
    eprintln!(
        "NPC failures during the roll (node, epoch, kind): {:?}",
        seen.failures
    );
    reaper.stop();
    c.stop_all();
}

#[test]
fn a_roll_onto_a_failing_binary_stops_at_the_first_node_and_rolls_it_back() {
    let mut c = TestCluster::new(4, 3, |_| {});
    let ids: Vec<NodeId> = (1..=4).collect();
    let reaper = Reaper(c.dir.path().to_owned(), ids.clone());
    c.start_all();
    let before = c.wait_for("stage 0", T, |s| ready(s) && owned_by(s, 4) > 0);
    // A "new build" that starts but fails its own health check.
    let bad = c.dir.path().join("orrery-bad");
    std::fs::write(
        &bad,
        format!("#!/bin/sh\nexec {BIN} \"$@\" --set faults.corrupt_health_verification=true\n"),
    )
    .expect("write the bad binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, text) = orrery(
        &[
            "roll",
            "--binary",
            bad.to_str().expect("utf8 path"),
            "--rollback-on-failure",
            "--stable-ms",
            "500",
            "--node-timeout-s",
            "15",
        ],
        c.dir.path(),
    );
    eprintln!("{text}");
    assert!(!ok, "the roll succeeded: {text}");
    assert!(text.contains("roll failed at node(s) 4"), "{text}");
    assert!(
        text.contains("rolled back node(s) 4 to the previous binary"),
        "{text}"
    );
    // Back on its previous binary (none recorded: the one `orrery` runs).
    assert_eq!(
        orrery::roll::recorded_binary(c.dir.path(), 4).unwrap(),
        None
    );
    let after = c.wait_for("node 4 back and healthy", T, |s| {
        ready(s) && s.members[&4].health.healthy && owned_by(s, 4) > 0
    });
    // Stopped at the first node: nobody else was touched.
    for id in 1..=3 {
        assert_eq!(
            after.members[&id].epoch, before.members[&id].epoch,
            "node {id}"
        );
    }
    // Back under a new epoch. (The failing binary fail-stops at its first
    // self-check, which abandons its start-up: it may or may not have
    // joined first, so one epoch or two.)
    assert!(after.members[&4].epoch > before.members[&4].epoch);
    let st = c.node_status(4).expect("node 4 answers");
    assert!(st.serving, "{st:?}");
    let failed = after
        .events
        .iter()
        .filter(|e| e.index > before.applied_index && e.kind == EventKind::Operation)
        .any(|e| e.detail.starts_with("roll: roll failed at node(s) 4"));
    assert!(failed, "{}", show(Some(after.clone())));
    // A roll that would lose the quorum is refused before anything stops.
    let (ok, text) = orrery(
        &["roll", "--batch", "2", "--stable-ms", "100"],
        c.dir.path(),
    );
    assert!(
        !ok && text.contains("roll refused") && text.contains("a quorum needs 2"),
        "{text}"
    );
    reaper.stop();
    c.stop_all();
}
