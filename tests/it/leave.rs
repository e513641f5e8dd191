//! Leaving is a decision, not a failure (issue 13, item 6). Real `orrery
//! node` processes: a SIGTERMed worker drains, stops serving, records
//! `NodeLeft` and exits 0; it is never suspected, its shards answer
//! elsewhere, and restarted it rejoins and takes shards again. Without a
//! quorum it still exits in time and says why. `orrery up` refuses a data
//! directory in use at once, naming the pid, and fails fast naming a node
//! that cannot start (a broken node.toml, a port in use) with the node's
//! own reason. Waits are bounded polls, never sleeps.

use crate::cluster::{show, TestCluster, BIN, SERIAL};
use orrery::local::{self, DirLock, Manifest, Plan};
use orrery::procs::STOP_GRACE;
use orrery_core::{ClusterState, EventKind, MemberStatus, NodeId, Stage};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn ready(s: &ClusterState) -> bool {
    s.stage == Stage::READY
        && s.laggards(Stage::READY).is_empty()
        && s.members.values().all(|m| m.status == MemberStatus::Active)
}

fn owned_by(s: &ClusterState, n: NodeId) -> usize {
    s.shards.entries.values().filter(|e| e.owner == n).count()
}

/// Events about `node` that treat it as failed.
fn failures_of(s: &ClusterState, node: NodeId) -> Vec<String> {
    s.events
        .iter()
        .filter(|e| e.node == Some(node))
        .filter(|e| matches!(e.kind, EventKind::NodeSuspected | EventKind::NodeRemoved))
        .map(|e| e.detail.clone())
        .collect()
}

/// Runs the real `orrery up` to its end: (exit ok, stderr, how long).
fn run_up(dir: &Path, args: &[&str]) -> (bool, String, Duration) {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["up", "--demo", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run orrery up");
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), err, t.elapsed())
}

/// Polls `f` every 50 ms until it gives `Some`, at most `timeout`.
fn poll<V>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<V>) -> V {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The leader leaving hands its leadership over instead of leaving the
/// others to sit out an election timeout; it is not suspected either.
#[test]
fn a_sigtermed_leader_hands_leadership_over_before_it_exits() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    c.wait_for("stage 0", T, ready);
    let leader = c
        .wait_node(1, "a leader", T, |s| s.leader.is_some())
        .leader
        .expect("leader");
    let before = c.state().expect("state").applied_index;
    c.stop(leader);
    let log = c.log(leader);
    let line = log
        .lines()
        .find(|l| l.contains("leaving: leadership handed to node"))
        .unwrap_or_else(|| panic!("no hand-over in the leader's log:\n{log}"));
    let to: NodeId = line
        .rsplit(' ')
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_ne!(to, leader);
    let s = c.wait_for("the chosen voter coordinating", T, |s| s.leader == Some(to));
    assert!(
        failures_of(&s, leader).is_empty(),
        "{}",
        show(Some(s.clone()))
    );
    assert!(s
        .events
        .iter()
        .any(|e| { e.kind == EventKind::NodeLeft && e.node == Some(leader) && e.index > before }));
    c.stop_all();
}

#[test]
fn a_sigtermed_worker_leaves_without_being_suspected_and_rejoins() {
    let mut c = TestCluster::new(5, 3, |_| {});
    c.start_all();
    let victim: NodeId = 5;
    let s = c.wait_for("ready, shards on node 5", T, |s| {
        ready(s) && owned_by(s, victim) > 0
    });
    let old_epoch = s.members[&victim].epoch;
    let total = s.shards.shards().count();
    let lease_ttl = s.config.membership.lease_ttl_ms;

    // A second `orrery up` on this running directory (nodes started by
    // the harness, not by `up`) refuses at once, naming a node's pid.
    let (ok, err, took) = run_up(c.dir.path(), &["--nodes", "5", "--voters", "3"]);
    let pid1 = c.pid(1).expect("node 1 runs");
    assert!(!ok, "a second up started: {err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert!(
        err.contains("a cluster is already running on") && err.contains(&format!("pid {pid1}")),
        "{err}"
    );
    assert!(
        ready(&c.state().expect("state")),
        "the refused up disturbed the cluster"
    );

    let t = Instant::now();
    c.signal(victim, "TERM");
    let st = c.wait_exit(victim, STOP_GRACE);
    let took = t.elapsed();
    assert!(st.success(), "node 5 exited with {st}:\n{}", c.log(victim));
    assert!(took < STOP_GRACE, "leaving took {took:?}");
    let log = c.log(victim);
    assert!(log.contains("left the cluster"), "{log}");

    let s = c.wait_for(
        "node 5 left, its shards elsewhere",
        Duration::from_secs(5),
        |s| {
            matches!(s.members[&victim].status, MemberStatus::Left { .. })
                && owned_by(s, victim) == 0
        },
    );
    assert_eq!(s.shards.shards().count(), total);
    let left: Vec<_> = s
        .events
        .iter()
        .filter(|e| e.kind == EventKind::NodeLeft && e.node == Some(victim))
        .collect();
    assert_eq!(left.len(), 1, "{}", show(Some(s.clone())));
    assert!(left[0].detail.contains(&format!("epoch {old_epoch}")));
    // The other nodes' own reports: every shard loaded on one of them.
    let client = local::AdminClient::default();
    poll("every shard loaded on nodes 1-4", T, || {
        let loaded: usize = (1..=4)
            .map(|id| {
                client
                    .node_shards(&c.admin_addr(id))
                    .map_or(0, |h| h.loaded)
            })
            .sum();
        (loaded == total).then_some(())
    });
    // Three lease periods after it went silent: never suspected, never
    // removed (checked on every poll of the window).
    let until = Instant::now() + Duration::from_millis(3 * lease_ttl);
    while Instant::now() < until {
        if let Some(s) = c.state() {
            assert_eq!(
                failures_of(&s, victim),
                Vec::<String>::new(),
                "{}",
                show(Some(s))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Restarted, it rejoins under a new epoch as a plain restart and takes
    // shards again (leaving ended its drain).
    c.start(victim);
    let s = c.wait_for("node 5 back, hosting shards", T, |s| {
        let m = &s.members[&victim];
        m.epoch > old_epoch
            && m.status == MemberStatus::Active
            && m.report.stage == Stage::READY
            && !m.draining
            && owned_by(s, victim) > 0
    });
    assert_eq!(
        failures_of(&s, victim),
        Vec::<String>::new(),
        "{}",
        show(Some(s.clone()))
    );
    assert!(!s.events.iter().any(|e| e.kind == EventKind::NodeReinstated));
    c.stop_all();
}

#[test]
fn a_node_leaving_without_a_quorum_exits_in_time_and_says_why() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    c.wait_for("ready", T, ready);
    // Two of three voters die: nothing can commit.
    c.kill(2);
    c.kill(3);
    let t = Instant::now();
    c.signal(4, "TERM");
    let st = c.wait_exit(4, STOP_GRACE);
    let took = t.elapsed();
    assert!(st.success(), "node 4 exited with {st}:\n{}", c.log(4));
    assert!(took < STOP_GRACE, "leaving without a quorum took {took:?}");
    let log = c.log(4);
    assert!(
        log.contains("could not tell the cluster that node 4 leaves")
            && log.contains("exiting anyway"),
        "{log}"
    );
    // The lone voter leaves the same way, in time.
    c.stop_all();
}

/// Kills `orrery up` (and so its nodes) if a test fails half-way.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_up_on_a_running_data_directory_refuses_at_once_with_the_pid() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let first = Command::new(BIN)
        .args([
            "up",
            "--demo",
            "--nodes",
            "3",
            "--voters",
            "3",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start orrery up");
    let mut first = Up(first);
    let up_pid = first.0.id();
    // Running: its lock names it, and its nodes hold theirs.
    let held = poll("up.lock names the first up", T, || {
        DirLock::holder(&local::up_lock_path(dir.path()))
            .ok()
            .flatten()
            .filter(|h| h.admin.is_some())
    });
    assert_eq!(held.pid, Some(up_pid));
    let node1 = poll("node 1 holds its lock", T, || {
        DirLock::holder(&local::node_lock_path(&dir.path().join("node-1")))
            .ok()
            .flatten()
    });

    let (ok, err, took) = run_up(dir.path(), &["--nodes", "3", "--voters", "3"]);
    assert!(!ok, "a second up started: {err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert!(
        err.contains(&format!(
            "a cluster is already running on {}: pid {up_pid}, admin ",
            dir.path().display()
        )),
        "{err}"
    );
    // A second process for node 1 is refused too, naming the first.
    let out = Command::new(BIN)
        .args(["node", "--config"])
        .arg(Manifest::node_config_path(dir.path(), 1))
        .output()
        .expect("run orrery node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let pid = node1.pid.expect("node 1's lock names its pid");
    assert!(
        err.contains("in use by another process") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the first up died");
    // SIGTERM to the first up: it stops its nodes (they leave) and exits.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up_pid.to_string())
        .status();
    let st = poll(
        "the first up exits",
        STOP_GRACE + Duration::from_secs(5),
        || first.0.try_wait().ok().flatten(),
    );
    assert!(st.success(), "{st}");
}

#[test]
fn up_fails_fast_naming_a_node_that_cannot_start() {
    let _serial = SERIAL.blocking_lock();
    // A node.toml that does not parse: refused before anything starts.
    let dir = tempfile::tempdir().unwrap();
    local::prepare(&Plan::new(3, 3, dir.path())).expect("prepare");
    let broken = Manifest::node_config_path(dir.path(), 2);
    let mut text = std::fs::read_to_string(&broken).unwrap();
    text.push_str("\n[[[ not toml\n");
    std::fs::write(&broken, text).unwrap();
    let args = ["--nodes", "3", "--voters", "3", "--exit-when-ready"];
    let (ok, err, took) = run_up(dir.path(), &args);
    assert!(!ok, "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert!(
        err.contains("node 2 cannot start") && err.contains("is not valid"),
        "{err}"
    );
    assert!(
        DirLock::holder(&local::node_lock_path(&dir.path().join("node-1")))
            .unwrap()
            .is_none(),
        "no node was left running"
    );

    // A node that exits at once (its admin port is taken): `up` stops
    // waiting and prints the node, its exit status and its own reason.
    let dir = tempfile::tempdir().unwrap();
    let m = local::prepare(&Plan::new(3, 3, dir.path())).expect("prepare");
    let taken = std::net::TcpListener::bind(&m.nodes[1].admin_addr).expect("bind");
    let (ok, err, took) = run_up(dir.path(), &args);
    drop(taken);
    assert!(!ok, "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
    assert!(
        err.contains("node 2 exited (exit status: 1) before the cluster reached stage 0")
            && err.contains("cannot listen on admin address")
            && err.contains("Address already in use"),
        "{err}"
    );
    for id in 1..=3 {
        let lock = local::node_lock_path(&dir.path().join(format!("node-{id}")));
        assert!(
            DirLock::holder(&lock).unwrap().is_none(),
            "node {id} left running"
        );
    }
}

/// One sample of `/metrics`: name, labels (sorted), value.
type Sample = (String, Vec<(String, String)>, f64);

/// `/metrics` of node `id`, parsed.
fn scrape(c: &TestCluster, id: NodeId) -> Vec<Sample> {
    let text = ureq::get(&format!("http://{}/metrics", c.admin_addr(id)))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("text");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
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
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            (s.metric, labels, v)
        })
        .collect()
}

/// The universe's NPC driver under a node's sudden death: calls to the
/// dead owner's shards fail until they move, and every failure is counted
/// in `/metrics` by call and typed kind (none is dropped silently).
#[test]
fn npc_call_failures_are_counted_by_kind_in_metrics() {
    use orrery_universe::{generate, Sizes, UniverseConfig};
    let cfg = UniverseConfig {
        npc_ops_per_s: 100,
        call_timeout_ms: 500,
        ..Default::default()
    };
    let mut c = TestCluster::new(4, 3, |p| {
        local::with_universe(p, &cfg).expect("universe config");
    });
    let u = generate(5, Sizes::for_systems(300)).expect("generate");
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        c.dir.path(),
    )))
    .expect("open the store");
    orrery_universe::import(&*store, &u).expect("import");
    drop(store);
    c.start_all();
    c.wait_for("the universe at stage 0", T, |s| {
        ready(s) && owned_by(s, 4) > 0
    });
    let calls = |c: &TestCluster, id: NodeId, call: &str| -> f64 {
        scrape(c, id)
            .into_iter()
            .filter(|(n, l, _)| {
                n == "orrery_app_calls_total"
                    && l.contains(&("call".into(), call.into()))
                    && l.contains(&("service".into(), "universe".into()))
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    poll("node 1's NPCs make calls", T, || {
        (calls(&c, 1, "jump") > 0.0).then_some(())
    });
    // Node 4 dies without a word: calls to its shards fail until they move.
    c.kill(4);
    c.wait_for("node 4 removed", T, |s| {
        matches!(s.members[&4].status, MemberStatus::Removed { .. }) && owned_by(s, 4) == 0
    });
    let failures = poll("failed NPC calls counted on a survivor", T, || {
        let f: Vec<_> = (1..=3)
            .flat_map(|id| scrape(&c, id))
            .filter(|(n, _, v)| n == "orrery_app_call_failures_total" && *v > 0.0)
            .collect();
        (!f.is_empty()).then_some(f)
    });
    let kinds = orrery_node::shards::CallError::KINDS;
    for (_, labels, _) in &failures {
        let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("service").as_deref(), Some("universe"), "{labels:?}");
        let kind = get("kind").expect("a kind label");
        assert!(
            kinds.contains(&kind.as_str()),
            "{kind} is not a CallError kind"
        );
        assert!(get("call").is_some(), "{labels:?}");
    }
    c.stop_all();
}

/// `orrery stop --node N` is SIGTERM by name: the node leaves (a `NodeLeft`,
/// never suspected) and exits; stopping it again says it is not running.
#[test]
fn orrery_stop_makes_a_node_leave_and_refuses_a_node_that_is_not_running() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    let before = c.wait_for("stage 0", T, ready);
    let stop = |c: &TestCluster| {
        Command::new(BIN)
            .args(["stop", "--node", "4", "--data-dir"])
            .arg(c.dir.path())
            .output()
            .expect("orrery stop")
    };
    let out = stop(&c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("node 4") && text.contains("left the cluster"),
        "{text}"
    );
    assert!(c.wait_exit(4, T).success());
    let s = c.wait_for("node 4 left", T, |s| {
        s.events
            .iter()
            .any(|e| e.kind == EventKind::NodeLeft && e.node == Some(4))
    });
    let suspected = s.events.iter().any(|e| {
        e.index > before.applied_index
            && e.node == Some(4)
            && matches!(e.kind, EventKind::NodeSuspected | EventKind::NodeRemoved)
    });
    assert!(!suspected, "{}", show(Some(s.clone())));
    let again = stop(&c);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("node 4 is not running"),
        "{err}"
    );
    c.stop_all();
}
