//! `orrery bench universe`: the universe on a local cluster of real node
//! processes — time to stage 0 (per stage) with 5,000 systems, 300
//! campaigns and the markets loaded; sustained NPC operations per second
//! across the cluster (from the statistics job's own committed rows); and
//! the singleton job's failover time (holder killed mid-run until the next
//! holder commits that period), beside etcd's leader election (`etcdctl
//! elect`, default lease) measured on this machine in the same run.
#![allow(clippy::disallowed_methods)] // A benchmark measures real time.

use crate::bench::{summary, BenchCluster};
use anyhow::{bail, Context, Result};
use orrery::local::{self, Manifest};
use orrery_core::{ClusterState, MemberStatus, Stage};
use orrery_universe::service::{Activity, STATS_JOB};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PERIOD_MS: u64 = 5_000;

fn ready(s: &ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

pub fn universe(
    nodes: u64,
    systems: usize,
    npc_ops_per_s: u32,
    failovers: u64,
    etcd: bool,
) -> Result<()> {
    println!("bench universe: {nodes} real node processes (3 voters) on 127.0.0.1, {systems} systems, shared SQLite store");
    let cfg = orrery_universe::UniverseConfig {
        npc_ops_per_s,
        stats_period_ms: PERIOD_MS,
        stats_work_ms: 1_500,
        ..Default::default()
    };
    let u = orrery_universe::generate(1, orrery_universe::Sizes::for_systems(systems))?;
    let mut import_ms = 0;
    let launched = Instant::now();
    let mut c = BenchCluster::launch(
        nodes,
        |p| local::with_universe(p, &cfg).expect("valid universe config"),
        |dir| {
            let t = Instant::now();
            let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(
                Manifest::store_path(dir),
            ))?;
            orrery_universe::import(&*store, &u)?;
            import_ms = t.elapsed().as_millis();
            Ok(())
        },
    )?;
    let started = Instant::now();
    let s = c.wait(Duration::from_secs(180), "stage 0", ready)?;
    let to_ready = started.elapsed();
    println!(
        "\n## start-up: {} systems, {} campaigns, {} alliances, {} regions ({} market orders)",
        u.systems.len(),
        u.campaigns.len(),
        u.alliances.len(),
        u.regions.len(),
        u.market_orders.len()
    );
    println!("import into the store: {import_ms} ms (before launch)");
    let mut prev = s.boot_started_at;
    for st in Stage::ALL.iter() {
        if let Some(at) = s.stage_reached_at.get(&st.number()) {
            println!(
                "stage {:>2} ({:<22}) {:>6} ms",
                st.number(),
                st.name(),
                at.saturating_sub(prev)
            );
            prev = *at;
        }
    }
    println!(
        "processes launched to stage 0: {} ms (total, including process start)",
        to_ready.as_millis()
    );
    let _ = launched;

    // Sustained NPC operations: the statistics job's committed totals.
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        c.dir.path(),
    )))?;
    let first = s
        .jobs
        .jobs
        .get(STATS_JOB)
        .map(|_| orrery_node::clock::now_ms() / PERIOD_MS)
        .context("the statistics job is not declared")?;
    c.wait(Duration::from_secs(60), "four committed periods", |s| {
        s.jobs
            .jobs
            .get(STATS_JOB)
            .is_some_and(|j| j.commits.range(first + 1..).count() >= 4)
    })?;
    let rows = store.job_periods(STATS_JOB, first + 2, first + 5)?;
    let mut per_period = Vec::new();
    for r in &rows {
        let total: Activity = r
            .rows
            .iter()
            .find(|(k, _)| k == "total")
            .and_then(|(_, v)| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        per_period.push(
            (total.jumps + total.trades + total.campaign_events) as f64
                / (PERIOD_MS as f64 / 1000.0),
        );
    }
    let ops = per_period.iter().sum::<f64>() / per_period.len().max(1) as f64;
    println!(
        "\n## NPC activity: {ops:.0} operations/s across the cluster (asked: {} per node = {}), over {} periods of {} s",
        npc_ops_per_s,
        u64::from(npc_ops_per_s) * nodes,
        per_period.len(),
        PERIOD_MS / 1000
    );

    // Failover: kill the holder while it runs (the job works 1.5 s).
    println!("\n## singleton job failover ({} s periods, 1.5 s of work per run; holder SIGKILLed mid-run)", PERIOD_MS / 1000);
    let mut times = Vec::new();
    for trial in 0..failovers {
        let (period, holder) = wait_for_running_holder(&c)?;
        let t0 = Instant::now();
        c.procs.kill(holder);
        let s = c.wait(
            Duration::from_secs(30),
            "the period committed by another node",
            |s| {
                s.jobs
                    .jobs
                    .get(STATS_JOB)
                    .and_then(|j| j.commits.get(&period))
                    .is_some_and(|cm| cm.holder != holder)
            },
        )?;
        let took = t0.elapsed().as_millis() as u64;
        let cm = &s.jobs.jobs[STATS_JOB].commits[&period];
        println!(
            "trial {trial}: period {period}: holder node {holder} killed; node {} committed it (lease epoch {}) {took} ms later",
            cm.holder, cm.lease_epoch
        );
        times.push(took);
        c.procs.start(holder)?;
        c.wait(Duration::from_secs(60), "the killed node back", |s| {
            s.members
                .get(&holder)
                .is_some_and(|m| m.status == MemberStatus::Active && m.report.stage == Stage::READY)
        })?;
    }
    // Exactly one committed output per period, never a stale token.
    let s = c.state()?;
    let job = &s.jobs.jobs[STATS_JOB];
    let periods: Vec<u64> = job.commits.keys().copied().collect();
    let stored = store.job_periods(STATS_JOB, periods[0], periods[periods.len() - 1] + 1)?;
    let mut twice = 0;
    for p in &periods {
        let n = stored.iter().filter(|r| r.period == *p).count();
        let cm = &job.commits[p];
        if n != 1
            || stored
                .iter()
                .any(|r| r.period == *p && r.lease_epoch != cm.lease_epoch)
        {
            twice += 1;
        }
    }
    let late = job.commits.values().filter(|cm| cm.late).count();
    println!(
        "{} periods committed, {} processed twice or under another token, {} committed after the deadline",
        periods.len(),
        twice,
        late
    );
    if twice > 0 {
        bail!("a period was committed twice");
    }
    let orrery_line = summary("orrery job failover", times.clone());
    drop(c);

    if etcd {
        println!("\n## etcd leader election on this machine (etcdctl elect, default session TTL)");
        match etcd_failover() {
            Ok(ms) => {
                println!("{orrery_line}");
                println!("{}", summary("etcd elect failover", vec![ms]));
            }
            Err(e) => {
                println!("etcd not measured: {e:#} (apt-get install etcd-server etcd-client)")
            }
        }
    } else {
        println!("{orrery_line}");
    }
    println!("\ntarget: failover faster than etcd's election with its default lease, no period processed twice");
    Ok(())
}

/// Waits until the statistics job's current period is granted and not yet
/// committed (the holder is running it); returns (period, holder).
fn wait_for_running_holder(c: &BenchCluster) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(s) = c.state() {
            if let Some(j) = s.jobs.jobs.get(STATS_JOB) {
                if let Some(l) = &j.lease {
                    let now = orrery_node::clock::now_ms();
                    let into = now.saturating_sub(l.period * PERIOD_MS);
                    // Not the coordinator: the job prefers other holders,
                    // and a leader's death is the election's benchmark.
                    let leader = s.leader == Some(l.holder);
                    if !leader && !j.commits.contains_key(&l.period) && into > 300 && into < 1_000 {
                        return Ok((l.period, l.holder));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("never saw the job's holder running")
}

/// One etcd failover: two `etcdctl elect` candidates; the leader is
/// SIGKILLed; time until the other one leads.
fn etcd_failover() -> Result<u64> {
    let dir = tempfile::tempdir()?;
    let ports: Vec<u16> = (0..2)
        .map(|_| -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<Result<_>>()?;
    let client = format!("http://127.0.0.1:{}", ports[0]);
    let peer = format!("http://127.0.0.1:{}", ports[1]);
    let mut server = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("bench={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start etcd")?;
    let result = (|| -> Result<u64> {
        let candidate = |name: &str| -> Result<std::process::Child> {
            Command::new("etcdctl")
                .args(["--endpoints", &client, "elect", "orrery-bench", name])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start etcdctl")
        };
        // Wait for the server, then elect A.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut a = loop {
            let mut a = candidate("a")?;
            let out = a.stdout.take().expect("piped");
            let mut lines = BufReader::new(out).lines();
            match lines.next() {
                Some(Ok(_)) => {
                    // Keep reading A's output in the background.
                    std::thread::spawn(move || for _ in lines {});
                    break a;
                }
                _ => {
                    let _ = a.kill();
                    let _ = a.wait();
                    if Instant::now() > deadline {
                        bail!("etcd did not come up");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let mut b = candidate("b")?;
        let out = b.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Some(Ok(_)) = BufReader::new(out).lines().next() {
                let _ = tx.send(Instant::now());
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        a.kill()?;
        let _ = a.wait();
        let elected = rx
            .recv_timeout(Duration::from_secs(120))
            .context("the second candidate was not elected within 120 s")?;
        let _ = b.kill();
        let _ = b.wait();
        Ok(elected.duration_since(t0).as_millis() as u64)
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
