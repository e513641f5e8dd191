//! `orrery bench …`: benchmarks that print numbers.
//!
//! Each prints what it ran (in-process, simulated or real processes) and
//! the figures beside their targets and, where there is one, the peer's.
//! Nothing here is asserted: tests assert, benchmarks measure.

#![allow(clippy::disallowed_methods)] // Benchmarks measure wall time.

use anyhow::{bail, Context, Result};
use orrery::local::{self, AdminClient, Manifest, Plan};
use orrery::procs::NodeProcs;
use orrery_core::sim::{self, SimConfig};
use orrery_core::{ClusterState, MemberStatus, NodeId, Stage};
use orrery_node::clock::now_ms;
use std::time::{Duration, Instant};

pub fn startup(nodes: u64, voters: u64, seed: u64, runs: u64) -> Result<()> {
    if nodes == 0 || voters == 0 || voters > nodes || runs == 0 {
        bail!("need nodes >= voters >= 1 and runs >= 1");
    }
    println!("bench startup: {nodes} nodes ({voters} voters) in the deterministic simulator (virtual time; LAN links 1-2 ms, 20 preload items of 5-20 ms per node)");
    println!(
        "{:<6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "seed", "ready(ms)", "-4", "-3", "-2", "-1", "0", "events", "wall(ms)"
    );
    let mut readies = vec![];
    for s in seed..seed + runs {
        let mut cfg = SimConfig::new(nodes, s);
        cfg.voters = voters;
        let t = Instant::now();
        let out = sim::run(cfg);
        let wall = t.elapsed().as_millis();
        let mut prev = 0;
        let per: Vec<String> = Stage::ALL
            .iter()
            .map(|st| match out.stage_reached_at.get(&st.number()) {
                Some(at) => {
                    let d = at - prev;
                    prev = *at;
                    d.to_string()
                }
                None => "-".into(),
            })
            .collect();
        let ready = out
            .ready_at
            .map(|r| r.to_string())
            .unwrap_or_else(|| "never".into());
        println!(
            "{:<6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
            s, ready, per[0], per[1], per[2], per[3], per[4], out.steps, wall
        );
        if let Some(r) = out.ready_at {
            readies.push(r);
        }
    }
    if readies.len() as u64 != runs {
        bail!(
            "{} of {runs} runs did not reach stage 0",
            runs - readies.len() as u64
        );
    }
    readies.sort();
    println!(
        "stage 0 reached in all {runs} runs: median {} ms, max {} ms of virtual time (target: < 10000 ms)",
        readies[readies.len() / 2],
        readies[readies.len() - 1]
    );
    Ok(())
}

pub fn startup_inproc(nodes: u64, voters: u64, seed: u64, runs: u64) -> Result<()> {
    println!(
        "bench startup --inproc: {nodes} nodes ({voters} voters), real node code with openraft and redb on disk, \
         one process, in-process network (no loss or delay), demo preload 20 x 10 ms per node"
    );
    println!(
        "{:<4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "run", "ready(ms)", "-4", "-3", "-2", "-1", "0", "launch(ms)"
    );
    let rt = tokio::runtime::Runtime::new()?;
    let mut readies = vec![];
    for run in 0..runs {
        let dir = tempfile::tempdir()?;
        let plan = Plan::new(nodes, voters, dir.path());
        let mut cluster = orrery::inproc::InProcCluster::plan(&plan, seed + run)?;
        let launched = Instant::now();
        let launched_ms = now_ms();
        let (state, started) = rt.block_on(async {
            cluster.start_all().await?;
            let started = launched.elapsed().as_millis();
            let s = cluster
                .wait_for(Duration::from_secs(120), orrery::inproc::ready)
                .await
                .map_err(|last| {
                    anyhow::anyhow!(
                        "not ready after 120 s:\n{}",
                        last.map(|s| local::render_status(&s, &[], now_ms()))
                            .unwrap_or_default()
                    )
                })?;
            Ok::<_, anyhow::Error>((s, started))
        })?;
        let ready = launched.elapsed().as_millis() as u64;
        let mut prev = launched_ms;
        let per: Vec<String> = Stage::ALL
            .iter()
            .map(|st| match state.stage_reached_at.get(&st.number()) {
                Some(at) => {
                    let d = at.saturating_sub(prev);
                    prev = *at;
                    d.to_string()
                }
                None => "-".into(),
            })
            .collect();
        println!(
            "{:<4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            run, ready, per[0], per[1], per[2], per[3], per[4], started
        );
        readies.push(ready);
        rt.block_on(cluster.shutdown());
    }
    readies.sort();
    println!(
        "stage 0 reached in all {runs} runs: median {} ms, max {} ms wall time from launch (target: < 10000 ms)",
        readies[readies.len() / 2],
        readies[readies.len() - 1]
    );
    Ok(())
}

/// A fresh local cluster of real processes in a temporary directory.
pub(crate) struct BenchCluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) manifest: Manifest,
    pub(crate) procs: NodeProcs,
    pub(crate) client: AdminClient,
}

impl BenchCluster {
    fn start(nodes: u64, tweak: impl FnOnce(&mut Plan)) -> Result<BenchCluster> {
        let c = Self::launch(nodes, tweak, |_| Ok(()))?;
        c.wait(Duration::from_secs(60), "stage 0", |s| {
            s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
        })?;
        Ok(c)
    }

    /// Lays the cluster out, runs `before` on its data dir, starts every
    /// node, and returns at once.
    pub(crate) fn launch(
        nodes: u64,
        tweak: impl FnOnce(&mut Plan),
        before: impl FnOnce(&std::path::Path) -> Result<()>,
    ) -> Result<BenchCluster> {
        let dir = tempfile::tempdir()?;
        let mut plan = Plan::new(nodes, 3, dir.path());
        plan.log.level = "warn".into();
        tweak(&mut plan);
        let manifest = local::prepare(&plan)?;
        before(dir.path())?;
        let exe = std::env::current_exe().context("cannot find the orrery binary")?;
        let mut procs = NodeProcs::new(exe, dir.path());
        procs.start_all(&manifest)?;
        Ok(BenchCluster {
            dir,
            manifest,
            procs,
            client: AdminClient::default(),
        })
    }

    pub(crate) fn wait(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&ClusterState) -> bool,
    ) -> Result<ClusterState> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(s) = self.client.cluster_state(&self.manifest) {
                if pred(&s) {
                    return Ok(s);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("timed out after {timeout:?} waiting for {what}")
    }

    pub(crate) fn state(&self) -> Result<ClusterState> {
        self.client.cluster_state(&self.manifest)
    }
}

fn removed(s: &ClusterState, node: NodeId) -> bool {
    matches!(s.members[&node].status, MemberStatus::Removed { .. })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn summary(name: &str, mut v: Vec<u64>) -> String {
    v.sort_unstable();
    format!(
        "{name:<34} n={:<3} p50 {:>5} ms  p99 {:>5} ms  max {:>5} ms",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(0)
    )
}

/// `orrery bench detection`: crash and pause detection with real processes,
/// false removals under CPU starvation and log bursts, default config.
pub fn detection(trials: u64, starve_secs: u64) -> Result<()> {
    println!(
        "bench detection: 5 real node processes (3 voters) on 127.0.0.1, default membership config"
    );
    println!("(lease 1000 ms, heartbeat 200 ms, self-fence 600 ms, 3 probes of 300 ms; a fresh cluster per trial)");
    let mut crash = vec![];
    let mut crash_leader = vec![];
    let mut pause = vec![];
    let mut rejoin = vec![];
    for t in 0..trials {
        let mut c = BenchCluster::start(5, |_| {})?;
        let s = c.state()?;
        let leader = s.leader.context("no leader")?;
        // Every fifth trial kills the leader (then a new leader must be
        // elected before anyone can be judged).
        let victim = if t % 5 == 4 {
            leader
        } else {
            [2, 3, 4, 5, 1]
                .into_iter()
                .find(|n| *n != leader)
                .unwrap_or(2)
        };
        let t0 = now_ms();
        c.procs.kill(victim);
        let s = c.wait(Duration::from_secs(30), "removal", |s| removed(s, victim))?;
        let took = s.members[&victim].last_removed_at.saturating_sub(t0);
        if victim == leader {
            crash_leader.push(took)
        } else {
            crash.push(took)
        }
        eprintln!(
            "  trial {t}: SIGKILL node {victim}{} -> removed in {took} ms",
            if victim == leader { " (leader)" } else { "" }
        );
        c.procs.stop_all();
    }
    for t in 0..trials.div_ceil(4) {
        let c = BenchCluster::start(5, |_| {})?;
        let s = c.state()?;
        let victim = (4..=5).find(|n| Some(*n) != s.leader).unwrap_or(4);
        let old = s.members[&victim].epoch;
        let t0 = now_ms();
        c.procs.signal(victim, "STOP")?;
        let s = c.wait(Duration::from_secs(30), "removal", |s| removed(s, victim))?;
        pause.push(s.members[&victim].last_removed_at.saturating_sub(t0));
        let resumed = now_ms();
        c.procs.signal(victim, "CONT")?;
        let s = c.wait(Duration::from_secs(30), "reinstatement", |s| {
            let m = &s.members[&victim];
            m.epoch > old && m.status == MemberStatus::Active && m.report.stage == Stage::READY
        })?;
        let back = s.members[&victim]
            .report
            .completed_at
            .get(&0)
            .copied()
            .unwrap_or(resumed);
        rejoin.push(back.saturating_sub(resumed));
        eprintln!("  pause trial {t}: SIGSTOP node {victim} -> removed in {} ms; after SIGCONT back at stage 0 under epoch {} in {} ms", pause.last().unwrap(), s.members[&victim].epoch, rejoin.last().unwrap());
    }
    // False removals: one node CPU-starved, every node logs 500 warnings.
    let c = BenchCluster::start(5, |p| p.starve_and_burst(5))?;
    let start = Instant::now();
    let mut false_removals = 0usize;
    while start.elapsed() < Duration::from_secs(starve_secs) {
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(s) = c.state() {
            false_removals = s
                .events
                .iter()
                .filter(|e| e.kind == orrery_core::EventKind::NodeRemoved)
                .count();
        }
    }
    let hours = starve_secs as f64 / 3600.0;
    println!();
    println!("{}", summary("crash (SIGKILL), non-leader", crash));
    println!("{}", summary("crash (SIGKILL), leader", crash_leader));
    println!("{}", summary("pause (SIGSTOP), removed after", pause));
    println!("{}", summary("paused node back at stage 0 after", rejoin));
    println!(
        "false removals under CPU starvation + 500-line log bursts: {false_removals} in {starve_secs} s ({:.1} per hour); target: 0",
        false_removals as f64 / hours
    );
    println!();
    println!(
        "target: crash detection p99 < 3000 ms; reinstatement < 5000 ms after links work again"
    );
    println!("peers (documented defaults, not run here; see ../shared/research/peers.md and anchors.md):");
    println!("  Akka Cluster phi accrual: heartbeat 1 s, threshold 8.0, acceptable-heartbeat-pause 3 s -> unreachable after >= ~3-5 s, downing (SBR stable-after) 20 s more");
    println!("  Orleans 9/10: probes every ~5 s (adaptive 2.5-20 s), votes needed -> ~90 s per its docs (up to 10 min in 7.x/8.x)");
    println!("  memberlist/Serf (Lifeguard), measured in research: kill -9 -> failed after 4879 ms (local profile) / 5801 ms (lan profile) median");
    Ok(())
}

/// `orrery bench remap`: a node hosting `per_node` shards is killed in a
/// cluster of `nodes` (real node code, in-process network); how long until
/// every one of its shards is owned elsewhere, loaded and answering.
pub fn remap(nodes: u64, per_node: u64, runs: u64) -> Result<()> {
    let total = nodes * per_node;
    println!(
        "bench remap: {nodes} nodes (3 voters), {total} demo shards (~{per_node} per node), real node code in one process, in-process network"
    );
    println!(
        "{:<4} {:>8} {:>12} {:>14} {:>16}",
        "run", "shards", "removed(ms)", "map moved(ms)", "all answer(ms)"
    );
    let rt = tokio::runtime::Runtime::new()?;
    for run in 0..runs {
        let dir = tempfile::tempdir()?;
        let mut plan = Plan::new(nodes, 3, dir.path());
        plan.demo = (1..=nodes)
            .map(|id| {
                (
                    id,
                    orrery_node::config::DemoConfig {
                        shards: total,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut c = orrery::inproc::InProcCluster::plan(&plan, 100 + run)?;
        rt.block_on(async {
            c.start_all().await?;
            c.wait_for(Duration::from_secs(120), orrery::inproc::ready)
                .await
                .map_err(|_| anyhow::anyhow!("cluster not ready"))?;
            let s = c.state().await.context("no state")?;
            let victim = nodes;
            let theirs: Vec<u64> = s
                .shards
                .entries
                .iter()
                .filter(|(_, e)| e.owner == victim)
                .map(|(id, _)| id.key)
                .collect();
            let t0 = Instant::now();
            c.crash(victim).await;
            let s = c
                .wait_for(Duration::from_secs(60), |s| {
                    matches!(s.members[&victim].status, MemberStatus::Removed { .. })
                })
                .await
                .map_err(|_| anyhow::anyhow!("victim not removed"))?;
            let removed = t0.elapsed().as_millis();
            let _ = s;
            c.wait_for(Duration::from_secs(60), |s| {
                s.shards.entries.values().all(|e| e.owner != victim)
            })
            .await
            .map_err(|_| anyhow::anyhow!("shards not moved"))?;
            let moved = t0.elapsed().as_millis();
            let client = c.nodes.values().next().context("no node")?.clone();
            let mut pending = theirs.clone();
            while !pending.is_empty() {
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(60),
                    "{} shards never answered",
                    pending.len()
                );
                let mut still = vec![];
                for k in pending {
                    let shard = orrery_core::shardmap::ShardId { kind: 0, key: k };
                    if client
                        .call(shard, "ping", vec![], Duration::from_millis(500))
                        .await
                        .is_err()
                    {
                        still.push(k);
                    }
                }
                pending = still;
            }
            let answered = t0.elapsed().as_millis();
            println!(
                "{:<4} {:>8} {:>12} {:>14} {:>16}",
                run,
                theirs.len(),
                removed,
                moved,
                answered
            );
            c.shutdown().await;
            Ok::<_, anyhow::Error>(())
        })?;
    }
    println!("target (issue: shards): all of a killed node's shards owned and answering on survivors within 5000 ms");
    Ok(())
}
