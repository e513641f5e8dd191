//! A stuck control plane is loud; secrets are private (issue 11). Real
//! `orrery node` processes: 3 voters and a worker. Two voters are
//! SIGKILLed; every survivor says "no quorum" with the reachable count and
//! stops naming the dead leader, `orrery status` still prints the node
//! table from the nodes' own reports, and a mutation is refused with that
//! reason. A voter comes back: the quorum recovers, the line disappears and
//! the mutation goes through. Waits are bounded polls, never sleeps.

use crate::cluster::TestCluster;
use orrery_core::{NodeId, Stage};
use orrery_node::NodeStatus;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn ready(s: &orrery_core::ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

/// Polls `f` every 100 ms until it returns `Ok`, at most `timeout`; panics
/// with `what` and the last error.
fn poll<V>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<V, String>) -> V {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A running cluster's files: every directory 0700, every file that holds
/// a secret or a key 0600 (node.toml, admin.token, the store and its WAL,
/// the Raft store).
fn check_private(c: &TestCluster, voters: &[NodeId]) {
    let dir = c.dir.path();
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    let mut files = vec![
        dir.join("cluster.toml"),
        dir.join("admin.token"),
        dir.join("store.db"),
    ];
    for ext in ["db-wal", "db-shm"] {
        let p = dir.join("store").with_extension(ext);
        if p.exists() {
            files.push(p);
        }
    }
    for n in &c.manifest.nodes {
        let node_dir = dir.join(format!("node-{}", n.id));
        assert_eq!(mode(&node_dir), 0o700, "{}", node_dir.display());
        files.push(c.config_path(n.id));
        if voters.contains(&n.id) {
            let raft = node_dir.join("raft");
            assert_eq!(mode(&raft), 0o700, "{}", raft.display());
            files.push(raft.join("raft.redb"));
        }
    }
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// Node `id`'s own "no quorum" report, once it names `reachable` of 3.
fn no_quorum(c: &TestCluster, id: NodeId, reachable: usize) -> NodeStatus {
    c.wait_node(id, "no quorum reported", T, |s| {
        s.no_quorum
            .as_ref()
            .is_some_and(|nq| nq.voters == 3 && nq.reachable.len() == reachable)
    })
}

#[test]
fn losing_two_of_three_voters_is_called_no_quorum_and_recovers() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    let s = c.wait_for("stage 0", T, ready);
    check_private(&c, &[1, 2, 3]);
    let leader = s.leader.expect("a leader");
    let victim = (1..=3).find(|v| *v != leader).expect("a second voter");
    let survivor = (1..=3)
        .find(|v| *v != leader && *v != victim)
        .expect("a third voter");
    let worker: NodeId = 4;

    c.kill(leader);
    c.kill(victim);
    let mut dead = vec![leader, victim];
    dead.sort();
    for id in [survivor, worker] {
        let st = no_quorum(&c, id, 1);
        let nq = st.no_quorum.clone().expect("no quorum");
        assert_eq!(nq.unreachable, dead, "node {id}: {nq:?}");
        let text = nq.to_string();
        assert!(
            text.starts_with("no quorum: 1 of 3 voters reachable ("),
            "node {id}: {text}"
        );
        assert_eq!(st.leader, None, "node {id} still names a leader: {st:#?}");
        assert!(!st.serving, "node {id} serves without a quorum");
    }
    // The survivor keeps the alarm itself: it cannot commit to the timeline.
    let st = c.wait_node(survivor, "a no-quorum alarm", T, |s| {
        s.control_alarms
            .iter()
            .any(|a| a.what.contains("no quorum: 1 of 3 voters reachable"))
    });
    assert!(st.no_quorum.is_some());
    // ... and says it in /metrics.
    let metrics = ureq::get(&format!("http://{}/metrics", c.admin_addr(survivor)))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("metrics text");
    assert!(
        metrics.lines().any(|l| l == "orrery_control_no_quorum 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orrery_control_alarms ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // The console's `status` says it on both survivors.
    let survivors = format!("{survivor},{worker}");
    let (ok, out, err) = c.exec(&["--nodes", &survivors], &["status"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.matches("no quorum: 1 of 3 voters reachable").count(),
        2,
        "{out}"
    );

    // `orrery status`: the line first, then the table from the nodes; it
    // exits 2 (no quorum is a critical alarm), for scripts and cron.
    let (code, out) = c.status_with_code();
    assert_eq!(code, Some(2), "{out}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("no quorum: 1 of 3 voters reachable"),
        "{out}"
    );
    for n in &c.manifest.nodes {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("{:<5} ", n.id)) && l.contains(&n.addr))
            .unwrap_or_else(|| panic!("no row for node {}:\n{out}", n.id));
        if dead.contains(&n.id) {
            assert!(row.contains("not answering"), "{row}");
        } else {
            assert!(row.contains("none (no quorum)"), "{row}");
        }
    }

    // A mutation is refused with that reason.
    let (ok, out, err) = c.exec(&["--nodes", &worker.to_string()], &["drain", "on"]);
    assert!(!ok, "drain went through without a quorum: {out}");
    assert!(
        out.contains("no quorum: 1 of 3 voters reachable"),
        "{out}{err}"
    );

    // One voter returns: the quorum recovers and the no-quorum alarm
    // clears. (The other dead voter stays dead: a new leader rightly
    // raises "replication to node N failing" about it after a few seconds.)
    c.start(victim);
    for id in [survivor, worker] {
        c.wait_node(id, "quorum regained and a leader named", T, |s| {
            s.no_quorum.is_none()
                && s.leader.is_some()
                && !s
                    .control_alarms
                    .iter()
                    .any(|a| a.what.contains("no quorum"))
        });
    }
    poll(
        "orrery status without the no-quorum line, exiting 0",
        T,
        || {
            let (code, out) = c.status_with_code();
            if code != Some(0) {
                return Err(format!("exit {code:?}: {out}"));
            }
            // (The alarm it raised is in the timeline by now, under the table.)
            if out.lines().any(|l| l.starts_with("no quorum")) || !out.starts_with("cluster: ") {
                return Err(out);
            }
            Ok(())
        },
    );
    // The mutation goes through now.
    poll("drain on committed", T, || {
        let (ok, out, err) = c.exec(&["--nodes", &worker.to_string()], &["drain", "on"]);
        if ok && out.contains("draining") {
            Ok(())
        } else {
            Err(format!("{out}{err}"))
        }
    });
    let (ok, out, err) = c.exec(&["--nodes", &worker.to_string()], &["drain", "off"]);
    assert!(ok, "{out}{err}");
    c.stop_all();
}
