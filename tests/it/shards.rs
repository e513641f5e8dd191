//! Shards, routing and calls (issue: shards) on the node code itself, in
//! the in-process network: remapping a dead node's shards, wait-cycle
//! detection, typed errors, and fenced ownership.

use crate::cluster::{events, show, SERIAL};
use orrery::inproc::{ready, InProcCluster};
use orrery::local::Plan;
use orrery_core::shardmap::ShardId;
use orrery_core::{EventKind, NodeId};
use orrery_node::shards::{CallCtx, CallError, ShardActor, ShardFuture, ShardService};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(2);

async fn cluster(dir: &std::path::Path, nodes: u64, shards: u64) -> InProcCluster {
    let mut plan = Plan::new(nodes, 3, dir);
    plan.demo = (1..=nodes)
        .map(|id| {
            (
                id,
                orrery_node::config::DemoConfig {
                    shards,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut c = InProcCluster::plan(&plan, 21).expect("plan");
    c.start_all().await.expect("start");
    c.wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("not ready:\n{}", show(s)));
    c
}

/// The lowest key of a demo shard owned by `node`.
fn first_on(s: &orrery_core::ClusterState, node: NodeId) -> u64 {
    s.shards
        .entries
        .iter()
        .find(|(_, e)| e.owner == node)
        .map(|(id, _)| id.key)
        .unwrap_or_else(|| panic!("node {node} owns no shard"))
}

fn demo(key: u64) -> ShardId {
    ShardId { kind: 0, key }
}

fn percentile(mut v: Vec<u128>, p: f64) -> u128 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Kill a node hosting hundreds of shards: all of them are owned and
/// answering on survivors within 5 s, and calls to other shards keep their
/// latency meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_shards_answer_elsewhere_within_5s() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 5, 1000).await;
    let s = c.state().await.unwrap();
    let load = s.shards.load();
    assert_eq!(
        load.values().sum::<usize>(),
        1000,
        "every shard has an owner: {load:?}"
    );
    let victim: NodeId = 5;
    let theirs: Vec<u64> = s
        .shards
        .entries
        .iter()
        .filter(|(_, e)| e.owner == victim)
        .map(|(id, _)| id.key)
        .collect();
    let others: Vec<u64> = s
        .shards
        .entries
        .iter()
        .filter(|(_, e)| e.owner != victim)
        .map(|(id, _)| id.key)
        .take(50)
        .collect();
    assert!(
        theirs.len() >= 150,
        "node {victim} hosts {} shards",
        theirs.len()
    );
    let client = c.nodes[&1].clone();
    // Latency of unaffected shards before the fault.
    let mut before = vec![];
    for k in &others {
        let t = tokio::time::Instant::now();
        client
            .call(demo(*k), "ping", vec![1], CALL)
            .await
            .expect("ping");
        before.push(t.elapsed().as_micros());
    }
    let killed = tokio::time::Instant::now();
    c.crash(victim).await;
    // Unaffected shards keep answering while the dead node's shards move.
    let mut during = vec![];
    let mut pending: Vec<u64> = theirs.clone();
    while !pending.is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{} shards still not answering",
            pending.len()
        );
        for k in &others {
            let t = tokio::time::Instant::now();
            client
                .call(demo(*k), "ping", vec![1], CALL)
                .await
                .expect("unaffected shard failed during the move");
            during.push(t.elapsed().as_micros());
        }
        let mut still = vec![];
        for k in pending {
            match client
                .call(demo(k), "ping", vec![1], Duration::from_millis(200))
                .await
            {
                Ok(_) => {}
                Err(_) => still.push(k),
            }
        }
        pending = still;
    }
    let took = killed.elapsed();
    let s = c.state().await.unwrap();
    assert!(s.shards.entries.values().all(|e| e.owner != victim));
    let (p_before, p_during) = (percentile(before, 0.99), percentile(during, 0.99));
    eprintln!("remap: {} shards of node {victim} answering elsewhere {} ms after the kill; unaffected p99 {} us before, {} us during", theirs.len(), took.as_millis(), p_before, p_during);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        p_during < 50_000,
        "unaffected calls slowed to p99 {p_during} us during the move"
    );
    c.shutdown().await;
}

/// The post-mortem's deadlock: shard A calls B, which calls A back while
/// the first call is pending. Detected at once, the calls fail with the
/// whole cycle, one event records it, other shards keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_cycle_fails_with_the_whole_cycle_and_is_recorded() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 5, 64).await;
    let s = c.state().await.unwrap();
    // A and B on different nodes, like a system and its alliance.
    let a = first_on(&s, 4);
    let b = first_on(&s, 5);
    let route = postcard::to_stdvec(&vec![b, a]).unwrap();
    let t = tokio::time::Instant::now();
    let err = c.nodes[&1]
        .call(demo(a), "relay", route, Duration::from_secs(10))
        .await
        .unwrap_err();
    let took = t.elapsed();
    let CallError::Deadlock { cycle } = &err else {
        panic!("expected a deadlock, got {err:?}")
    };
    assert!(took < Duration::from_secs(1), "detected after {took:?}");
    let shards: Vec<u64> = cycle.iter().map(|h| h.shard.key).collect();
    assert_eq!(shards, vec![a, b, a], "the whole cycle: {err}");
    assert_eq!(cycle[0].node, 4);
    assert_eq!(cycle[1].node, 5);
    let msg = err.to_string();
    assert!(
        msg.contains("deadlock") && msg.contains("call relay"),
        "{msg}"
    );
    let s = c
        .wait_for(T, |s| !events(s, EventKind::Deadlock).is_empty())
        .await
        .unwrap_or_else(|s| panic!("{}", show(s)));
    assert_eq!(
        events(&s, EventKind::Deadlock).len(),
        1,
        "one event for the cycle"
    );
    // Both shards and the others on both nodes keep serving, at normal latency.
    let on_both: Vec<u64> = s
        .shards
        .entries
        .iter()
        .filter(|(_, e)| e.owner == 4 || e.owner == 5)
        .map(|(id, _)| id.key)
        .collect();
    let mut lat = vec![];
    for k in on_both.iter().chain([a, b].iter()) {
        let t = tokio::time::Instant::now();
        c.nodes[&2]
            .call(demo(*k), "ping", vec![], CALL)
            .await
            .expect("serving after the cycle");
        lat.push(t.elapsed().as_micros());
    }
    let p99 = percentile(lat, 0.99);
    assert!(
        p99 < 50_000,
        "calls to shards on the cycle's nodes slowed to p99 {p99} us"
    );
    c.shutdown().await;
}

/// Unknown shards, unknown calls and oversized requests get clear errors
/// and disturb nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_clear_errors_and_change_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 3, 16).await;
    let n = &c.nodes[&1];
    let e = n
        .call(ShardId { kind: 0, key: 999 }, "ping", vec![], CALL)
        .await
        .unwrap_err();
    assert!(
        matches!(e, CallError::UnknownShard { kind: 0, key: 999 }),
        "{e}"
    );
    let e = n
        .call(ShardId { kind: 7, key: 1 }, "ping", vec![], CALL)
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::UnknownShard { .. }), "{e}");
    let e = n.call(demo(3), "explode", vec![], CALL).await.unwrap_err();
    assert!(
        matches!(&e, CallError::UnknownCall { call, .. } if call == "explode"),
        "{e}"
    );
    let e = n
        .call(demo(3), "ping", vec![0; 2 << 20], CALL)
        .await
        .unwrap_err();
    assert!(
        matches!(e, CallError::TooLarge { .. } | CallError::Unavailable(_)),
        "{e}"
    );
    let before = n.call(demo(3), "incr", vec![], CALL).await.unwrap();
    let after = n.call(demo(3), "incr", vec![], CALL).await.unwrap();
    assert_eq!(
        u64::from_le_bytes(after.try_into().unwrap()),
        u64::from_le_bytes(before.try_into().unwrap()) + 1
    );
    c.shutdown().await;
}

/// A former owner cut off from the control plane refuses calls for its
/// shards once its lease lapses; callers end up at the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_former_owner_refuses_once_its_lease_lapses() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 5, 64).await;
    let s = c.state().await.unwrap();
    let x: NodeId = 5;
    let key = first_on(&s, x);
    let epoch = s.shards.entries[&demo(key)].epoch;
    // Cut node 5 off from the voters (both ways); node 4 still reaches it.
    c.net.set_faults(|f| {
        for v in 1..=3 {
            f.cut.insert((x, v));
            f.cut.insert((v, x));
        }
    });
    let deadline = tokio::time::Instant::now() + T;
    while c.nodes[&x].status().serving {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {x} kept serving without a lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asker = orrery_node::transport::MemTransport::new(4, c.net.clone());
    asker.set_epoch(s.members[&4].epoch);
    let req = orrery_node::messages::Request::ShardCall {
        shard: demo(key),
        epoch: Some(epoch),
        call: "ping".into(),
        payload: vec![],
        deadline_ms: 1000,
        chain: vec![],
    };
    use orrery_node::transport::Transport;
    match asker.call(x, req, CALL).await {
        Ok(orrery_node::messages::Reply::ShardReply(Err(CallError::Fenced { node, .. }))) => {
            assert_eq!(node, x)
        }
        other => panic!("the former owner answered {other:?}"),
    }
    // Routed calls reach the shard's new owner once the cluster moved it.
    let reply = c.nodes[&4]
        .call(demo(key), "ping", vec![7], Duration::from_secs(15))
        .await
        .expect("served by its new owner");
    assert_eq!(reply, vec![7]);
    let s = c.state().await.unwrap();
    assert_ne!(s.shards.entries[&demo(key)].owner, x);
    assert!(
        s.shards.entries[&demo(key)].epoch > epoch,
        "a new ownership epoch"
    );
    c.shutdown().await;
}

/// A drained node hands all its shards off and then holds none; an impaired
/// node (its work path stalled) hands its shards off until it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_and_impaired_nodes_hand_their_shards_off() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 5, 200).await;
    c.nodes[&1].drain(4, true).await.expect("drain");
    let s = c
        .wait_for(T, |s| s.shards.load().get(&4).copied().unwrap_or(0) == 0)
        .await
        .unwrap_or_else(|s| panic!("node 4 still holds shards:\n{}", show(s)));
    assert_eq!(s.shards.load().values().sum::<usize>(), 200);
    let deadline = tokio::time::Instant::now() + T;
    while c.nodes[&4].shards().1.loaded > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 4 kept shards loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Impaired: a CPU hog stalls node 5's work path.
    c.nodes[&5].set_health_faults(orrery_node::health::HealthFaults {
        event_loop_lag_ms: 400,
        ..Default::default()
    });
    c.wait_for(T, |s| {
        !s.members[&5].health.healthy && s.shards.load().get(&5).copied().unwrap_or(0) == 0
    })
    .await
    .unwrap_or_else(|s| panic!("impaired node 5 kept its shards:\n{}", show(s)));
    // Recovered and undrained: both get shards again (gradually).
    c.nodes[&5].set_health_faults(Default::default());
    c.nodes[&1].drain(4, false).await.expect("undrain");
    c.wait_for(T, |s| {
        s.shards.load().get(&5).copied().unwrap_or(0) > 0
            && s.shards.load().get(&4).copied().unwrap_or(0) > 0
    })
    .await
    .unwrap_or_else(|s| panic!("nodes 4 and 5 never got shards back:\n{}", show(s)));
    for k in 0..200 {
        c.nodes[&2]
            .call(demo(k), "ping", vec![], CALL)
            .await
            .unwrap_or_else(|e| panic!("shard {k}: {e}"));
    }
    c.shutdown().await;
}

/// A caller that gives up cancels the call on the owner (and whatever it
/// waits on): the shard is free again at once, not when the handler's own
/// deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_propagates_to_the_owner() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 5, 32).await;
    let s = c.state().await.unwrap();
    let key = first_on(&s, 5);
    let ten_s = 10_000u64.to_le_bytes().to_vec();
    let slow = c.nodes[&1].call(demo(key), "sleep", ten_s, Duration::from_secs(20));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow)
            .await
            .is_err(),
        "the sleep cannot finish"
    );
    // The single-threaded shard would be busy for 10 s had the call not been cancelled.
    let t = tokio::time::Instant::now();
    c.nodes[&2]
        .call(demo(key), "ping", vec![1], Duration::from_secs(5))
        .await
        .expect("shard free again");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the cancelled handler kept the shard busy for {:?}",
        t.elapsed()
    );
    c.shutdown().await;
}

/// Capacity weights: a node of weight 3 hosts about three times the shards
/// of a node of weight 1 (within the stated load bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_weights_shape_the_placement() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plan = Plan::new(4, 3, dir.path());
    plan.placement.weights = vec![(4, 3)];
    plan.demo = (1..=4)
        .map(|id| {
            (
                id,
                orrery_node::config::DemoConfig {
                    shards: 600,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut c = InProcCluster::plan(&plan, 9).expect("plan");
    c.start_all().await.unwrap();
    let s = c
        .wait_for(T, ready)
        .await
        .unwrap_or_else(|s| panic!("{}", show(s)));
    let load = s.shards.load();
    // Weights 1,1,1,3 over 600 shards: shares 100,100,100,300; bound +-10 %.
    for n in 1..=3 {
        let l = load[&n];
        assert!((90..=110).contains(&l), "node {n} hosts {l}: {load:?}");
    }
    assert!(
        (270..=330).contains(&load[&4]),
        "node 4 hosts {}: {load:?}",
        load[&4]
    );
    c.shutdown().await;
}

/// A store-backed counter per shard, for the hand-over test: a load claims
/// the shard's fence and reads its count; `add` writes count + 1 under the
/// ownership epoch (`write_ms` after it started: a write in flight) and
/// only then counts it in memory. A former owner still serving beside the
/// new one would write a stale count; the store refuses that, and the
/// refusal must reach the caller typed.
struct Counters {
    store: Arc<dyn orrery_store::Store>,
    keys: u64,
    write_ms: u64,
    /// Writes the store refused as a stale owner's.
    stale: Arc<std::sync::atomic::AtomicU64>,
}

struct Counter {
    name: String,
    epoch: u64,
    n: u64,
    store: Arc<dyn orrery_store::Store>,
    write_ms: u64,
    stale: Arc<std::sync::atomic::AtomicU64>,
}

async fn on_store<T: Send + 'static>(
    store: &Arc<dyn orrery_store::Store>,
    f: impl FnOnce(&dyn orrery_store::Store) -> Result<T, orrery_store::StoreError> + Send + 'static,
) -> Result<T, CallError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&*s))
        .await
        .map_err(|e| CallError::Handler(e.to_string()))?
        .map_err(CallError::from)
}

impl ShardService for Counters {
    fn kinds(&self) -> Vec<orrery_core::shardmap::KindSpec> {
        vec![orrery_core::shardmap::KindSpec::new(
            "counter",
            0..self.keys,
        )]
    }

    fn load(
        &self,
        shard: ShardId,
        ctx: CallCtx,
    ) -> ShardFuture<'_, Result<Box<dyn ShardActor>, CallError>> {
        Box::pin(async move {
            let epoch = ctx
                .owner_epoch
                .ok_or_else(|| CallError::Handler("no ownership epoch".into()))?;
            let name = format!("counter/{}", shard.key);
            let n = name.clone();
            let row = on_store(&self.store, move |s| {
                s.claim_shard(&n, epoch)?;
                s.get(&n, "counter", "n")
            })
            .await?;
            let n = row
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            Ok(Box::new(Counter {
                name,
                epoch,
                n,
                store: self.store.clone(),
                write_ms: self.write_ms,
                stale: self.stale.clone(),
            }) as Box<dyn ShardActor>)
        })
    }
}

impl ShardActor for Counter {
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        _ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            if call != "add" {
                return Err(CallError::UnknownCall {
                    kind: "counter".into(),
                    call: call.into(),
                });
            }
            let next = self.n + 1;
            // The payload may ask for a slower write (ms, 8 LE bytes).
            let delay = payload
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(self.write_ms);
            let (name, epoch) = (self.name.clone(), self.epoch);
            // Once issued, the write completes even if the caller gives up.
            let write = tokio::spawn({
                let (store, stale) = (self.store.clone(), self.stale.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    on_store(&store, move |s| {
                        let r = s.write(
                            &name,
                            epoch,
                            &[orrery_store::Op::put("counter", "n", next.to_le_bytes())],
                        );
                        if let Err(orrery_store::StoreError::StaleOwner { .. }) = &r {
                            stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        r
                    })
                    .await
                }
            });
            write
                .await
                .map_err(|e| CallError::Handler(e.to_string()))??;
            self.n = next;
            Ok(next.to_le_bytes().to_vec())
        })
    }
}

/// What the callers saw for one counter.
#[derive(Default)]
struct Seen {
    /// Values successful `add`s returned.
    ok: Vec<u64>,
    /// Calls that timed out (their write may or may not have landed).
    uncertain: u64,
}

/// A node drains and leaves (SIGTERM's path) under a steady load of store
/// writes to its shards: no call fails with anything but a typed error the
/// router retries, and no increment is lost or applied twice (two owners
/// serving one counter would write a stale count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaving_under_write_load_fails_no_call_untyped_and_loses_no_write() {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    const KEYS: u64 = 48;
    const WRITE_MS: u64 = 5;
    const SLOW_MS: u64 = 3_000;
    let store: Arc<dyn orrery_store::Store> = Arc::from(
        orrery_store::open(&orrery_store::StoreConfig::sqlite(
            dir.path().join("counters.db"),
        ))
        .expect("open the store"),
    );
    let mut plan = Plan::new(5, 3, dir.path().join("cluster"));
    plan.demo = (1..=5)
        .map(|id| {
            (
                id,
                orrery_node::config::DemoConfig {
                    shards: 0,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut c = InProcCluster::plan(&plan, 23).expect("plan");
    // A live owner answers its in-flight calls, however slow: the slow
    // writes' callers wait for the leaver's refusal (then retried on the
    // new owner) rather than failing in doubt; nothing is ever re-sent.
    for cfg in c.configs.values_mut() {
        cfg.shards.moved_owner_grace_ms = 2 * SLOW_MS;
    }
    let stale = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut ids: Vec<(bool, NodeId)> = c
        .configs
        .values()
        .map(|cfg| (!cfg.me().role.is_voter(), cfg.node_id))
        .collect();
    ids.sort();
    for (_, id) in ids {
        let cfg = c.configs[&id].clone();
        let services = orrery_node::Services {
            stages: vec![Arc::new(orrery_node::DemoService::new(cfg.demo.clone()))
                as Arc<dyn orrery_node::Service>],
            shards: Some(Arc::new(Counters {
                store: store.clone(),
                keys: KEYS,
                write_ms: WRITE_MS,
                stale: stale.clone(),
            })),
            ..Default::default()
        };
        let node = orrery_node::Node::start_in(cfg, services, c.net.clone())
            .await
            .expect("start");
        c.nodes.insert(id, node);
    }
    let leaver: NodeId = 5;
    let s = c
        .wait_for(T, |s| {
            ready(s)
                && s.shards.entries.len() == KEYS as usize
                && s.shards.load().get(&leaver).copied().unwrap_or(0) > 0
        })
        .await
        .unwrap_or_else(|s| panic!("not ready with counters placed:\n{}", show(s)));
    let theirs = s.shards.load()[&leaver];
    // The load: callers on the other nodes, every counter in turn.
    let seen: Arc<Mutex<BTreeMap<u64, Seen>>> = Arc::default();
    let failures: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = vec![];
    for t in 0..8u64 {
        let node = c.nodes[&(1 + t % 4)].clone();
        let (seen, failures, stop) = (seen.clone(), failures.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut key = t * 7 % KEYS;
            let mut calls = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = node
                    .call(counter(key), "add", vec![], Duration::from_secs(2))
                    .await;
                calls += 1;
                let mut seen = seen.lock().unwrap();
                let at = seen.entry(key).or_default();
                match r {
                    Ok(v) => at.ok.push(u64::from_le_bytes(v[..8].try_into().unwrap())),
                    Err(e) => {
                        if matches!(e, CallError::Timeout | CallError::InDoubt { .. }) {
                            at.uncertain += 1;
                        }
                        *failures.lock().unwrap().entry(e.kind()).or_default() += 1;
                        eprintln!("add counter/{key}: {e}");
                    }
                }
                drop(seen);
                key = (key + 1) % KEYS;
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Writes in flight on the leaver when its shards move: each lands long
    // after the new owner raised the fence, is refused there, and its
    // caller must get a typed error the router retries on the new owner.
    let mut slow = vec![];
    for (id, _) in s.shards.entries.iter().filter(|(_, e)| e.owner == leaver) {
        let (node, key, seen) = (c.nodes[&1].clone(), id.key, seen.clone());
        slow.push(tokio::spawn(async move {
            let r = node
                .call(
                    counter(key),
                    "add",
                    SLOW_MS.to_le_bytes().to_vec(),
                    Duration::from_secs(10),
                )
                .await;
            let mut seen = seen.lock().unwrap();
            let at = seen.entry(key).or_default();
            match &r {
                Ok(v) => at.ok.push(u64::from_le_bytes(v[..8].try_into().unwrap())),
                Err(CallError::Timeout | CallError::InDoubt { .. }) => at.uncertain += 1,
                Err(_) => {}
            }
            r.err()
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SIGTERM's path: drain, stop serving, Leave.
    c.nodes[&leaver].leave().await.expect("left the cluster");
    let s = c
        .wait_for(T, |s| {
            s.shards.load().get(&leaver).copied().unwrap_or(0) == 0
        })
        .await
        .unwrap_or_else(|s| panic!("node {leaver} still owns shards:\n{}", show(s)));
    assert_eq!(s.shards.entries.len(), KEYS as usize);
    // Keep the load on while the moved counters settle on their new owners.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for l in load {
        calls += l.await.expect("load task");
    }
    for w in slow {
        if let Some(e) = w.await.expect("slow write") {
            eprintln!("slow add: {e}");
            *failures.lock().unwrap().entry(e.kind()).or_default() += 1;
        }
    }
    if let Some(n) = c.nodes.remove(&leaver) {
        n.shutdown().await;
    }
    let failures = failures.lock().unwrap().clone();
    let stale = stale.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{calls} adds, {theirs} counters moved off node {leaver}, {stale} stale write(s) refused, failures by kind: {failures:?}");
    assert!(calls > 100, "the load made only {calls} calls");
    assert!(
        stale > 0,
        "no write in flight was refused as stale: the hand-over went untested"
    );
    let untyped: Vec<_> = failures
        .iter()
        .filter(|(k, _)| !crate::roll::RETRIED.contains(k))
        .collect();
    assert!(
        untyped.is_empty(),
        "calls failed untyped during the hand-over: {failures:?}"
    );
    // Nothing lost, nothing applied twice.
    for (key, at) in seen.lock().unwrap().iter() {
        let stored = store
            .get(&format!("counter/{key}"), "counter", "n")
            .unwrap()
            .map(|b| u64::from_le_bytes(b[..].try_into().unwrap()))
            .unwrap_or(0);
        let distinct: std::collections::BTreeSet<u64> = at.ok.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            at.ok.len(),
            "counter/{key}: two adds returned one count: {:?}",
            at.ok
        );
        let ok = at.ok.len() as u64;
        assert!(
            ok <= stored && stored <= ok + at.uncertain,
            "counter/{key}: stored {stored}, {ok} adds acknowledged, {} uncertain",
            at.uncertain
        );
    }
    c.shutdown().await;
}

fn counter(key: u64) -> ShardId {
    ShardId { kind: 0, key }
}
