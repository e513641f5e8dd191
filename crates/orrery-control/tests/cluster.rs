//! In-process 3-voter clusters over a direct-call transport.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orrery_control::{
    ControlConfig, ControlError, ControlPlane, NodeId, RaftTransport, ReplicatedState,
    TransportError, TransportFuture,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Kv {
    map: BTreeMap<String, u64>,
    applied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum KvCmd {
    Set(String, u64),
    Add(String, u64),
}

impl ReplicatedState for Kv {
    type Command = KvCmd;
    type Response = Option<u64>;

    fn apply(&mut self, index: u64, command: KvCmd) -> Option<u64> {
        self.applied = index;
        match command {
            KvCmd::Set(k, v) => self.map.insert(k, v),
            KvCmd::Add(k, d) => {
                let e = self.map.entry(k).or_insert(0);
                *e += d;
                Some(*e)
            }
        }
    }
}

/// Routes calls straight into the target's `handle_rpc`; nodes in `cut` are isolated.
#[derive(Default)]
struct Router {
    nodes: Mutex<BTreeMap<NodeId, ControlPlane<Kv>>>,
    cut: Mutex<BTreeSet<NodeId>>,
}

struct Transport {
    from: NodeId,
    router: Arc<Router>,
}

impl RaftTransport for Transport {
    fn call(
        &self,
        target: NodeId,
        _addr: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> TransportFuture<'_> {
        Box::pin(async move {
            let node = {
                let cut = self.router.cut.lock().unwrap();
                if cut.contains(&self.from) || cut.contains(&target) {
                    return Err(TransportError::Unreachable(format!(
                        "{} -> {target} cut",
                        self.from
                    )));
                }
                self.router.nodes.lock().unwrap().get(&target).cloned()
            };
            let node = node
                .ok_or_else(|| TransportError::Unreachable(format!("node {target} not running")))?;
            match tokio::time::timeout(timeout, node.handle_rpc(payload)).await {
                Ok(r) => r.map_err(|e| TransportError::Remote(e.to_string())),
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }
}

fn voters() -> BTreeMap<NodeId, String> {
    (1..=3).map(|i| (i, format!("node-{i}:7000"))).collect()
}

fn config(id: NodeId, dir: &Path) -> ControlConfig {
    let mut c = ControlConfig::new(id, dir.join(format!("n{id}")), voters());
    c.heartbeat_interval = Duration::from_millis(50);
    c.election_timeout_min = Duration::from_millis(150);
    c.election_timeout_max = Duration::from_millis(300);
    c.snapshot_every_n_logs = 5;
    c.logs_to_keep_after_snapshot = 2;
    c
}

async fn start_cluster(dir: &Path, router: &Arc<Router>) -> BTreeMap<NodeId, ControlPlane<Kv>> {
    let mut out = BTreeMap::new();
    for id in 1..=3 {
        let t = Arc::new(Transport {
            from: id,
            router: router.clone(),
        });
        let cp = ControlPlane::<Kv>::start(config(id, dir), t)
            .await
            .expect("start");
        router.nodes.lock().unwrap().insert(id, cp.clone());
        out.insert(id, cp);
    }
    out
}

const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `Some`, failing after `WAIT`.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every node in `ids` agrees on one leader that is among `ids`.
async fn agreed_leader(nodes: &BTreeMap<NodeId, ControlPlane<Kv>>, ids: &[NodeId]) -> NodeId {
    eventually("agreed leader", || {
        let l = nodes[&ids[0]].current_leader()?;
        let all = ids.iter().all(|i| nodes[i].current_leader() == Some(l));
        (all && ids.contains(&l) && nodes[&l].is_leader()).then_some(l)
    })
    .await
}

async fn wait_applied(node: &ControlPlane<Kv>, key: &str, val: u64) {
    let mut rx = node.watch_state();
    tokio::time::timeout(WAIT, rx.wait_for(|v| v.state.map.get(key) == Some(&val)))
        .await
        .unwrap_or_else(|_| panic!("node {} never applied {key}={val}", node.node_id()))
        .expect("state watch closed");
}

async fn shutdown_all(nodes: &BTreeMap<NodeId, ControlPlane<Kv>>, router: &Router) {
    for n in nodes.values() {
        n.shutdown().await.expect("shutdown");
    }
    router.nodes.lock().unwrap().clear();
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_replicates_and_redirects() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster(&dir, &router).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let lp = &nodes[&leader];
    assert!(lp.current_term() >= 1);
    assert_eq!(lp.voters(), voters());
    assert_eq!(
        *lp.watch_leader().borrow(),
        orrery_control::LeaderView {
            term: lp.current_term(),
            leader: Some(leader)
        }
    );

    let (i1, prev) = lp.write(KvCmd::Set("a".into(), 1)).await.unwrap();
    assert_eq!(prev, None);
    let (i2, sum) = lp.write(KvCmd::Add("a".into(), 41)).await.unwrap();
    assert_eq!(sum, Some(42));
    assert!(i2 > i1);
    // The writer's own watch already reflects its write.
    assert_eq!(lp.state().state.map.get("a"), Some(&42));
    assert!(lp.state().applied_index >= i2);

    let view = lp.read_linearizable().await.unwrap();
    assert_eq!(view.state.map.get("a"), Some(&42));
    assert_eq!(view.state.applied, i2);

    for (id, n) in &nodes {
        wait_applied(n, "a", 42).await;
        if *id != leader {
            let want = Some((leader, format!("node-{leader}:7000")));
            match n.write(KvCmd::Set("b".into(), 2)).await {
                Err(ControlError::NotLeader { leader: got }) => assert_eq!(got, want),
                other => panic!("follower write: {other:?}"),
            }
            match n.read_linearizable().await {
                Err(ControlError::NotLeader { leader: got }) => assert_eq!(got, want),
                other => panic!("follower read: {other:?}"),
            }
            assert_eq!(n.current_leader_addr(), want);
        }
        n.health().unwrap();
    }
    shutdown_all(&nodes, &router).await;
    assert!(
        nodes[&1].health().is_err(),
        "stopped node reports unhealthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster(&dir, &router).await;
    let old = agreed_leader(&nodes, &[1, 2, 3]).await;
    nodes[&old].write(KvCmd::Set("x".into(), 1)).await.unwrap();
    let old_term = nodes[&old].current_term();

    router.cut.lock().unwrap().insert(old);
    let rest: Vec<NodeId> = (1..=3).filter(|i| *i != old).collect();
    let new = agreed_leader(&nodes, &rest).await;
    assert_ne!(new, old);
    assert!(nodes[&new].current_term() > old_term);

    let (_, v) = nodes[&new].write(KvCmd::Add("x".into(), 1)).await.unwrap();
    assert_eq!(v, Some(2));
    assert_eq!(
        nodes[&new]
            .read_linearizable()
            .await
            .unwrap()
            .state
            .map
            .get("x"),
        Some(&2)
    );

    // The isolated old leader cannot serve linearizable reads or commit writes.
    // (It may still believe it leads; ReadIndex must not succeed without a quorum.)
    let stale =
        tokio::time::timeout(Duration::from_millis(500), nodes[&old].read_linearizable()).await;
    assert!(
        !matches!(stale, Ok(Ok(_))),
        "isolated node served a linearizable read"
    );

    // Heal: the old leader rejoins as a follower and catches up.
    router.cut.lock().unwrap().clear();
    wait_applied(&nodes[&old], "x", 2).await;
    let l = agreed_leader(&nodes, &[1, 2, 3]).await;
    nodes[&l].write(KvCmd::Add("x".into(), 1)).await.unwrap();
    for n in nodes.values() {
        wait_applied(n, "x", 3).await;
    }
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_state_and_membership() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster(&dir, &router).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    // More than snapshot_every_n_logs writes, so restart exercises snapshot + log replay.
    for i in 0..13u64 {
        nodes[&leader]
            .write(KvCmd::Set(format!("k{i}"), i))
            .await
            .unwrap();
    }
    for n in nodes.values() {
        wait_applied(n, "k12", 12).await;
    }
    let applied_before: BTreeMap<NodeId, u64> = nodes
        .iter()
        .map(|(i, n)| (*i, n.state().applied_index))
        .collect();
    shutdown_all(&nodes, &router).await;
    drop(nodes);

    // Restart fully isolated: each node must restore its state locally (latest snapshot +
    // replay of the committed log), without any help from peers.
    router.cut.lock().unwrap().extend([1, 2, 3]);
    let nodes = start_cluster(&dir, &router).await;
    for (id, n) in &nodes {
        assert_eq!(n.voters(), voters(), "node {id} membership");
        let want = applied_before[id];
        eventually("local restore", || {
            (n.state().applied_index >= want).then_some(())
        })
        .await;
        assert_eq!(n.state().state.map.len(), 13, "node {id} restored state");
    }
    router.cut.lock().unwrap().clear();
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let view = nodes[&leader].read_linearizable().await.unwrap();
    for i in 0..13u64 {
        assert_eq!(view.state.map.get(&format!("k{i}")), Some(&i));
    }
    for (id, n) in &nodes {
        n.wait_for_recovery(WAIT).await.unwrap();
        assert!(
            n.state().applied_index >= applied_before[id],
            "node {id} recovered its applied state"
        );
        assert_eq!(n.state().state.map.len(), 13);
    }
    let (_, prev) = nodes[&leader]
        .write(KvCmd::Set("k0".into(), 100))
        .await
        .unwrap();
    assert_eq!(prev, Some(0));
    for n in nodes.values() {
        wait_applied(n, "k0", 100).await;
    }
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_rpc_is_an_error() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let t = Arc::new(Transport {
        from: 1,
        router: router.clone(),
    });
    let mut cfg = config(1, &dir);
    cfg.voters = BTreeMap::from([(1, "solo".to_string())]);
    let cp = ControlPlane::<Kv>::start(cfg, t).await.unwrap();
    for junk in [
        vec![],
        vec![0xff; 3],
        vec![1, 7, 0, 0, 0],
        vec![9, 0],
        b"hello world, definitely not raft".to_vec(),
    ] {
        match cp.handle_rpc(junk.clone()).await {
            Err(ControlError::MalformedRpc(_)) => {}
            other => panic!("junk {junk:?} gave {other:?}"),
        }
    }
    // A single-voter cluster elects itself and still works after the junk.
    eventually("solo leader", || cp.is_leader().then_some(())).await;
    assert_eq!(
        cp.write(KvCmd::Add("n".into(), 5)).await.unwrap().1,
        Some(5)
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let t = Arc::new(Transport { from: 9, router });
    let cfg = ControlConfig::new(9, &dir, voters());
    match ControlPlane::<Kv>::start(cfg, t).await {
        Err(ControlError::Config(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("node outside voters started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster(&dir, &router).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let mut others = (1..=3u64).filter(|i| *i != leader);
    let (follower, lagger) = (others.next().unwrap(), others.next().unwrap());
    router.cut.lock().unwrap().insert(lagger);
    // Enough writes that the follower snapshots and purges the entries the lagger lacks.
    // (A leader never purges entries a replication stream still needs; a follower does.)
    for i in 0..20u64 {
        nodes[&leader]
            .write(KvCmd::Add("s".into(), i))
            .await
            .unwrap();
    }
    let total: u64 = (0..20).sum();
    wait_applied(&nodes[&follower], "s", total).await;
    // Swap the partition: the follower must lead and can only catch the lagger up by
    // sending its snapshot.
    {
        let mut cut = router.cut.lock().unwrap();
        cut.clear();
        cut.insert(leader);
    }
    wait_applied(&nodes[&lagger], "s", total).await;
    let new = agreed_leader(&nodes, &[follower, lagger]).await;
    assert_eq!(new, follower);
    nodes[&new].write(KvCmd::Add("s".into(), 1)).await.unwrap();
    router.cut.lock().unwrap().clear();
    for n in nodes.values() {
        wait_applied(n, "s", total + 1).await;
    }
    shutdown_all(&nodes, &router).await;
}
