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
    blobs: BTreeMap<String, Vec<u8>>,
    applied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum KvCmd {
    Set(String, u64),
    Add(String, u64),
    Put(String, Vec<u8>),
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
            KvCmd::Put(k, b) => {
                let n = b.len() as u64;
                self.blobs.insert(k, b);
                Some(n)
            }
        }
    }
}

/// Routes calls straight into the target's `handle_rpc`; nodes in `cut` are isolated.
#[derive(Default)]
struct Router {
    nodes: Mutex<BTreeMap<NodeId, ControlPlane<Kv>>>,
    cut: Mutex<BTreeSet<NodeId>>,
    /// Like a frame limit: a larger payload is refused (and counted in `oversized`).
    max_payload: Mutex<Option<usize>>,
    oversized: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
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
            self.router
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(max) = *self.router.max_payload.lock().unwrap() {
                if payload.len() > max {
                    self.router
                        .oversized
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(TransportError::Remote(format!(
                        "frame of {} bytes exceeds the limit of {max}",
                        payload.len()
                    )));
                }
            }
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
    start_cluster_with(dir, router, |_| {}).await
}

async fn start_cluster_with(
    dir: &Path,
    router: &Arc<Router>,
    tweak: impl Fn(&mut ControlConfig),
) -> BTreeMap<NodeId, ControlPlane<Kv>> {
    let mut out = BTreeMap::new();
    for id in 1..=3 {
        let cp = start_node(dir, router, id, &tweak).await.expect("start");
        out.insert(id, cp);
    }
    out
}

async fn start_node(
    dir: &Path,
    router: &Arc<Router>,
    id: NodeId,
    tweak: &impl Fn(&mut ControlConfig),
) -> Result<ControlPlane<Kv>, ControlError> {
    let t = Arc::new(Transport {
        from: id,
        router: router.clone(),
    });
    let mut cfg = config(id, dir);
    tweak(&mut cfg);
    let cp = ControlPlane::<Kv>::start(cfg, t).await?;
    router.nodes.lock().unwrap().insert(id, cp.clone());
    Ok(cp)
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

/// A write whose entry cannot commit (its leader is cut off from every follower) fails
/// `Timeout` after `write_timeout` instead of waiting forever; the cluster goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_cannot_commit_fails_in_bounded_time() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster_with(&dir, &router, |c| {
        c.write_timeout = Duration::from_millis(300)
    })
    .await;
    let old = agreed_leader(&nodes, &[1, 2, 3]).await;
    nodes[&old].write(KvCmd::Set("x".into(), 1)).await.unwrap();
    router.cut.lock().unwrap().insert(old);
    let t0 = tokio::time::Instant::now();
    let r = tokio::time::timeout(WAIT, nodes[&old].write(KvCmd::Add("x".into(), 1))).await;
    let took = t0.elapsed();
    assert!(r.is_ok(), "the write was still open after {WAIT:?}");
    assert!(
        matches!(
            r.unwrap(),
            Err(ControlError::Timeout(_)) | Err(ControlError::NotLeader { .. })
        ),
        "a write without a quorum must fail"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let timeouts = nodes[&old].write_timeouts();
    assert!(timeouts <= 1, "one write, {timeouts} timeouts");

    let rest: Vec<NodeId> = (1..=3).filter(|i| *i != old).collect();
    let new = agreed_leader(&nodes, &rest).await;
    nodes[&new].write(KvCmd::Set("y".into(), 7)).await.unwrap();
    router.cut.lock().unwrap().clear();
    wait_applied(&nodes[&old], "y", 7).await;
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_in_place_keeps_its_state_and_its_watchers() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster(&dir, &router).await;
    let old = agreed_leader(&nodes, &[1, 2, 3]).await;
    nodes[&old].write(KvCmd::Set("x".into(), 1)).await.unwrap();
    let mut watcher = nodes[&old].watch_state();
    nodes[&old].restart().await.unwrap();
    assert_eq!(nodes[&old].restarts(), 1);
    nodes[&old].health().unwrap();
    // The state it had made durable is back at once.
    assert_eq!(nodes[&old].state().state.map.get("x"), Some(&1));
    // The cluster goes on, and the restarted voter follows it.
    let l = agreed_leader(&nodes, &[1, 2, 3]).await;
    nodes[&l].write(KvCmd::Add("x".into(), 1)).await.unwrap();
    wait_applied(&nodes[&old], "x", 2).await;
    // A receiver taken before the restart still sees new states.
    tokio::time::timeout(Duration::from_secs(10), async {
        while watcher.borrow_and_update().state.map.get("x") != Some(&2) {
            watcher
                .changed()
                .await
                .expect("the watch outlives the restart");
        }
    })
    .await
    .expect("the watcher saw the write after the restart");
    shutdown_all(&nodes, &router).await;
    // After shutdown there is no restart.
    assert!(nodes[&old].restart().await.is_err());
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

// ---------------------------------------------------------------------------------------------
// Bounds and integrity: proposals, batches, snapshots, checksums at rest, repair.

/// Small limits, so a state of a few hundred KiB is "larger than a frame".
fn small_messages(c: &mut ControlConfig) {
    c.max_message_bytes = 64 * 1024;
    c.max_proposal_bytes = 8 * 1024;
    c.snapshot_chunk_bytes = 16 * 1024;
}

fn oversized(router: &Router) -> u64 {
    router.oversized.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes `n` blobs of `size` bytes (`b0`, `b1`, ...) through the leader.
async fn write_blobs(leader: &ControlPlane<Kv>, n: usize, size: usize) {
    for i in 0..n {
        let blob = vec![(i % 251) as u8; size];
        leader
            .write(KvCmd::Put(format!("b{i}"), blob))
            .await
            .unwrap();
    }
}

/// Waits until `a` and `b` have applied the same index with equal state digests.
async fn same_digest(a: &ControlPlane<Kv>, b: &ControlPlane<Kv>) -> (u64, String) {
    let mut last = (a.state_digest(), b.state_digest());
    let deadline = tokio::time::Instant::now() + WAIT;
    while last.0 != last.1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "digests never matched: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = (a.state_digest(), b.state_digest());
    }
    last.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_proposal_is_refused_and_the_next_commits() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let nodes = start_cluster_with(&dir, &router, |_| {}).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let lp = &nodes[&leader];
    let before = lp.state().applied_index;
    // The wedge: a command just under the 4 MiB frame limit.
    let huge = KvCmd::Put("huge".into(), vec![7; 4 * 1024 * 1024 - 12]);
    match lp.write(huge).await {
        Err(e @ ControlError::ProposalTooLarge { limit, bytes }) => {
            assert_eq!(limit, 64 * 1024);
            assert!(bytes > 4 * 1024 * 1024 - 12);
            assert!(e.to_string().contains("raft.max_proposal_bytes"), "{e}");
        }
        other => panic!("oversized proposal gave {other:?}"),
    }
    assert_eq!(lp.state().applied_index, before, "nothing reached the log");
    let (_, v) = lp.write(KvCmd::Add("n".into(), 1)).await.unwrap();
    assert_eq!(v, Some(1));
    for n in nodes.values() {
        wait_applied(n, "n", 1).await;
    }
    assert!(lp.state().state.blobs.is_empty());
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_entries_are_cut_to_the_message_limit() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    *router.max_payload.lock().unwrap() = Some(64 * 1024);
    let nodes = start_cluster_with(&dir, &router, |c| {
        small_messages(c);
        // Keep every entry in the log, so the lagger is caught up by entries alone.
        c.snapshot_every_n_logs = 10_000;
        c.max_payload_entries = 300;
    })
    .await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let lagger = (1..=3u64).find(|i| *i != leader).unwrap();
    router.cut.lock().unwrap().insert(lagger);
    // 48 entries of 7 KiB: 336 KiB behind, five times one message.
    write_blobs(&nodes[&leader], 48, 7 * 1024).await;
    nodes[&leader]
        .write(KvCmd::Set("done".into(), 1))
        .await
        .unwrap();
    router.cut.lock().unwrap().clear();
    wait_applied(&nodes[&lagger], "done", 1).await;
    assert_eq!(nodes[&lagger].state().state.blobs.len(), 48);
    assert_eq!(oversized(&router), 0, "a message exceeded the limit");
    assert!(nodes[&leader].replication_trouble().is_empty());
    same_digest(&nodes[&leader], &nodes[&lagger]).await;
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_is_brought_back_by_a_chunked_snapshot() {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    *router.max_payload.lock().unwrap() = Some(64 * 1024);
    let tweak = |c: &mut ControlConfig| {
        small_messages(c);
        c.snapshot_every_n_logs = 5;
        c.logs_to_keep_after_snapshot = 2;
    };
    let mut nodes = start_cluster_with(&dir, &router, tweak).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let wiped = (1..=3u64).find(|i| *i != leader).unwrap();
    // 40 blobs of 7 KiB: a state of about 280 KiB, over four times the message limit.
    write_blobs(&nodes[&leader], 40, 7 * 1024).await;
    nodes[&wiped].shutdown().await.unwrap();
    router.nodes.lock().unwrap().remove(&wiped);
    let report = orrery_control::repair(&dir.join(format!("n{wiped}"))).unwrap();
    assert!(report.moved_to.is_some() && report.kept_vote, "{report:?}");
    write_blobs(&nodes[&leader], 5, 100).await;
    let calls_before = router.calls.load(std::sync::atomic::Ordering::Relaxed);
    let back = start_node(&dir, &router, wiped, &tweak).await.unwrap();
    assert!(back.is_catching_up(), "a repaired voter starts catching up");
    nodes.insert(wiped, back);
    let (index, digest) = same_digest(&nodes[&leader], &nodes[&wiped]).await;
    assert!(index > 40, "caught up to index {index}");
    assert_eq!(nodes[&wiped].state().state.blobs.len(), 40);
    assert_eq!(oversized(&router), 0, "a message exceeded the limit");
    let calls = router.calls.load(std::sync::atomic::Ordering::Relaxed) - calls_before;
    assert!(
        calls >= 5,
        "a 280 KiB snapshot needs several chunks ({calls} calls)"
    );
    eventually("repaired voter votes again", || {
        (!nodes[&wiped].is_catching_up()).then_some(())
    })
    .await;
    tracing::info!(index, digest, "wiped follower restored");
    shutdown_all(&nodes, &router).await;
}

/// Flips one bit in every occurrence of `marker` in `file` (old copies may linger in free
/// pages; the live one must be hit). Returns how many were flipped.
fn flip_every(file: &Path, marker: &[u8]) -> usize {
    let mut bytes = std::fs::read(file).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + marker.len() <= bytes.len() {
        if &bytes[i..i + marker.len()] == marker {
            bytes[i + marker.len() / 2] ^= 0x01;
            hits += 1;
            i += marker.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(file, bytes).unwrap();
    hits
}

/// Stops voter `victim`, flips `marker` in its store, and checks that it refuses to start
/// naming `table`; then repairs it and checks it comes back equal to the leader.
async fn corrupt_refuse_repair(snapshot_every: u64, marker: &[u8], table: &str) {
    let (_guard, dir) = tempdir();
    let router = Arc::new(Router::default());
    let tweak = move |c: &mut ControlConfig| {
        c.snapshot_every_n_logs = snapshot_every;
        c.logs_to_keep_after_snapshot = 2;
    };
    let mut nodes = start_cluster_with(&dir, &router, tweak).await;
    let leader = agreed_leader(&nodes, &[1, 2, 3]).await;
    let victim = (1..=3u64).find(|i| *i != leader).unwrap();
    nodes[&leader]
        .write(KvCmd::Put("addr".into(), marker.to_vec()))
        .await
        .unwrap();
    for i in 0..12 {
        nodes[&leader]
            .write(KvCmd::Set("k".into(), i))
            .await
            .unwrap();
    }
    wait_applied(&nodes[&victim], "k", 11).await;
    nodes[&victim].shutdown().await.unwrap();
    router.nodes.lock().unwrap().remove(&victim);
    let file = dir.join(format!("n{victim}")).join("raft.redb");
    assert!(
        flip_every(&file, marker) >= 1,
        "marker not found in {file:?}"
    );

    match start_node(&dir, &router, victim, &tweak).await {
        Err(e @ ControlError::Corrupt { .. }) => {
            let ControlError::Corrupt {
                file: f, table: t, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(f, &file);
            assert_eq!(t, table, "{e}");
            assert!(e.to_string().contains("orrery repair"), "{e}");
        }
        Err(e) => panic!("damaged store gave another error: {e}"),
        Ok(_) => panic!("voter started on a damaged store"),
    }
    let report = orrery_control::repair(file.parent().unwrap()).unwrap();
    assert!(report.damage.is_some(), "repair saw the damage: {report:?}");
    nodes.insert(
        victim,
        start_node(&dir, &router, victim, &tweak).await.unwrap(),
    );
    nodes[&leader]
        .write(KvCmd::Set("after".into(), 1))
        .await
        .unwrap();
    wait_applied(&nodes[&victim], "after", 1).await;
    same_digest(&nodes[&leader], &nodes[&victim]).await;
    assert_eq!(nodes[&victim].state().state.blobs["addr"], marker);
    shutdown_all(&nodes, &router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_log_entry_is_refused_and_repaired() {
    // No snapshot: the marker lives only in its log entry.
    corrupt_refuse_repair(10_000, b"node 2 at 127.0.0.1:42695 (log)", "raft_log").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_snapshot_is_refused_and_repaired() {
    // Snapshots every 5 entries and 2 kept: the marker's entry is purged, the snapshot holds it.
    corrupt_refuse_repair(5, b"node 2 at 127.0.0.1:42695 (snap)", "raft_meta").await;
}
