//! `orrery bench apply`: proposals/s and commit latency on 3 in-process voters
//! (the real control plane: openraft, redb on disk) holding a large cluster
//! state (default 250 members and 10,000 shards). It measures what applying
//! a command costs when the state is big, e.g. whether every applied batch
//! copies the whole state.
#![allow(clippy::disallowed_methods)] // A benchmark measures wall time.

use anyhow::{ensure, Context, Result};
use orrery_control::{
    ControlConfig, ControlPlane, NodeId, RaftTransport, TransportError, TransportFuture,
};
use orrery_core::shardmap::{KindSpec, Move, ShardId};
use orrery_core::{ClusterConfig, Command, NodeSpec, Response, Role, StuckPolicy};
use orrery_node::ControlState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Delivers each call straight to the target's `handle_rpc`.
#[derive(Default)]
struct Direct(Mutex<BTreeMap<NodeId, ControlPlane<ControlState>>>);

struct DirectTransport(Arc<Direct>);

impl RaftTransport for DirectTransport {
    fn call(
        &self,
        target: NodeId,
        _: String,
        payload: Vec<u8>,
        t: Duration,
    ) -> TransportFuture<'_> {
        Box::pin(async move {
            let node = self.0 .0.lock().unwrap().get(&target).cloned();
            let node = node.ok_or_else(|| TransportError::Unreachable(format!("{target}")))?;
            match tokio::time::timeout(t, node.handle_rpc(payload)).await {
                Ok(r) => r.map_err(|e| TransportError::Remote(e.to_string())),
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }
}

fn cluster_config(members: u64) -> ClusterConfig {
    let nodes = (1..=members)
        .map(|i| {
            let role = if i <= 3 { Role::Voter } else { Role::Worker };
            let spec = NodeSpec {
                addr: format!("10.0.{}.{}:7000", i / 250, i % 250),
                admin_addr: format!("10.0.{}.{}:8000", i / 250, i % 250),
                role,
            };
            (i, spec)
        })
        .collect();
    ClusterConfig {
        nodes,
        stage_deadline_ms: 60_000,
        stuck_policy: StuckPolicy::Exclude,
        liveness_window_ms: 10_000,
        membership: Default::default(),
        placement: Default::default(),
    }
}

async fn propose(leader: &ControlPlane<ControlState>, cmd: Command) -> Result<Response> {
    Ok(leader.write(cmd).await.context("proposal")?.1)
}

/// Configure, join every member, declare and place `shards` shards.
async fn build_state(leader: &ControlPlane<ControlState>, members: u64, shards: u64) -> Result<()> {
    let at = 1;
    propose(
        leader,
        Command::Configure {
            config: cluster_config(members),
            at,
        },
    )
    .await?;
    for node in 1..=members {
        propose(leader, Command::Join { node, at }).await?;
    }
    let kinds = vec![KindSpec::new("bench", 0..shards)];
    propose(leader, Command::DeclareShards { kinds, at }).await?;
    let keys: Vec<u64> = (0..shards).collect();
    for chunk in keys.chunks(500) {
        let moves = chunk
            .iter()
            .map(|k| Move {
                shard: ShardId { kind: 0, key: *k },
                from: None,
                to: 4 + k % (members - 3),
            })
            .collect();
        let reason = "bench placement".into();
        propose(leader, Command::MoveShards { moves, reason, at }).await?;
    }
    let s = leader.state().state;
    ensure!(
        s.0.members.len() as u64 == members,
        "members: {}",
        s.0.members.len()
    );
    let owned =
        s.0.shards
            .shards()
            .filter(|id| s.0.shards.owner(*id).is_some())
            .count();
    ensure!(
        owned as u64 == shards,
        "only {owned} of {shards} shards placed"
    );
    Ok(())
}

/// The leader, once it commits (an election may still be settling at first).
async fn settled_leader(direct: &Direct) -> Result<ControlPlane<ControlState>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = direct
            .0
            .lock()
            .unwrap()
            .values()
            .find(|c| c.is_leader())
            .cloned();
        if let Some(l) = l {
            if l.read_linearizable().await.is_ok() {
                return Ok(l);
            }
        }
        ensure!(Instant::now() < deadline, "no leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// `concurrency` writers each toggle one member's drain flag `per_writer` times.
async fn measure(
    leader: &ControlPlane<ControlState>,
    concurrency: u64,
    per_writer: u64,
    members: u64,
) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            let node = 4 + w % (members - 3);
            let mut lat = Vec::new();
            for i in 0..per_writer {
                let t = Instant::now();
                let cmd = Command::Drain {
                    node,
                    drain: i % 2 == 0,
                    at: 2,
                };
                if leader.write(cmd).await.is_ok() {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    (all.len() as f64 / secs, all)
}

/// What one applied batch copies, measured apart from Raft and the disk: the
/// state is shared with a reader (as the published view always is), one
/// `Drain` is applied. "whole state" copies every part first, as every batch
/// did before the large parts moved behind `Arc`s; "changed parts" is what
/// `Arc::make_mut` copies now.
fn copy_cost(state: &orrery_core::ClusterState, members: u64) {
    const N: u32 = 200;
    let whole = |s: &orrery_core::ClusterState| {
        let mut c = s.clone();
        c.config = Arc::new((*s.config).clone());
        c.members = Arc::new((*s.members).clone());
        c.events = Arc::new((*s.events).clone());
        c.shards = Arc::new((*s.shards).clone());
        c
    };
    let mut results = Vec::new();
    for (what, deep) in [
        ("whole state (before)", true),
        ("changed parts (now)", false),
    ] {
        let shared = Arc::new(state.clone());
        let t = Instant::now();
        for i in 0..N {
            let reader = shared.clone(); // the published view still holds it
            let mut s = if deep {
                whole(&reader)
            } else {
                (*reader).clone()
            };
            let node = 4 + u64::from(i) % (members - 3);
            std::hint::black_box(s.apply(
                1_000_000 + u64::from(i),
                Command::Drain {
                    node,
                    drain: i % 2 == 0,
                    at: 3,
                },
            ));
            drop(reader);
        }
        results.push((what, t.elapsed().as_secs_f64() * 1e6 / f64::from(N)));
    }
    for (what, us) in &results {
        println!("copy + apply of one Drain, {what}: {us:.1} µs");
    }
}

pub fn apply(members: u64, shards: u64, proposals: u64) -> Result<()> {
    ensure!(members > 3, "--members must exceed the 3 voters");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let direct = Arc::new(Direct::default());
        let voters: BTreeMap<NodeId, String> = (1..=3).map(|i| (i, format!("v{i}"))).collect();
        for id in 1..=3 {
            let cfg = ControlConfig::new(id, dir.path().join(format!("v{id}")), voters.clone());
            let cp = ControlPlane::start(cfg, Arc::new(DirectTransport(direct.clone()))).await?;
            direct.0.lock().unwrap().insert(id, cp);
        }
        let leader = settled_leader(&direct).await?;
        let t = Instant::now();
        build_state(&leader, members, shards).await?;
        let bytes = postcard::to_stdvec(leader.state().state.as_ref())?.len();
        println!(
            "state: {members} members, {shards} shards, {:.1} KiB encoded (built in {:.1} s)",
            bytes as f64 / 1024.0,
            t.elapsed().as_secs_f64()
        );
        println!("| writers | proposals | proposals/s | p50 ms | p99 ms | max ms |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for concurrency in [1u64, 16] {
            let per = (proposals / concurrency).max(1);
            let (rate, lat) = measure(&leader, concurrency, per, members).await;
            let max = lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
            println!(
                "| {concurrency} | {} | {rate:.0} | {:.2} | {:.2} | {max:.2} |",
                lat.len(),
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }
        copy_cost(&leader.state().state.0, members);
        let nodes: Vec<_> = direct.0.lock().unwrap().values().cloned().collect();
        for n in nodes {
            let _ = n.shutdown().await;
        }
        Ok(())
    })
}
