//! The `orrery` command: run a node, a local cluster, its status, benchmarks.
//!
//! This is the binary's edge: errors carry context (anyhow) and are printed
//! for a person; nothing here decides cluster policy. It measures wall time
//! (launch to ready, benchmark runs), so the determinism lints are off here.
#![allow(clippy::disallowed_methods)]

mod bench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use orrery::local::{self, AdminClient, Manifest, Plan};
use orrery_core::{Stage, StuckPolicy};
use orrery_node::clock::now_ms;
use orrery_node::{DemoService, DemoShards, Node, NodeConfig, Service, Services};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "orrery",
    version,
    about = "A cluster runtime for sharded, stateful, real-time services"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node.
    Node {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Override a config key, e.g. `--set startup.stage_deadline_ms=5000` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Start a local cluster of real node processes on 127.0.0.1.
    Up {
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        #[arg(long, default_value_t = 3)]
        voters: u64,
        /// How many of the voters are arbiters: they vote and probe but host
        /// no services and take no client traffic.
        #[arg(long, default_value_t = 0)]
        arbiters: u64,
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
        /// Exit 0 once stage 0 is reached (non-zero with the diagnosis if not).
        #[arg(long)]
        exit_when_ready: bool,
        /// With --exit-when-ready: give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        ready_timeout_s: u64,
        /// Per-stage deadline written into a new cluster's config.
        #[arg(long, default_value_t = 60_000)]
        stage_deadline_ms: u64,
        /// `exclude` or `wait`, for a new cluster's config.
        #[arg(long, default_value = "exclude")]
        stuck_policy: StuckPolicy,
    },
    /// Print a table of the nodes of a local cluster.
    Status {
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
        /// Print the replicated state as JSON instead.
        #[arg(long)]
        json: bool,
        /// How many of the latest cluster events to show.
        #[arg(long, default_value_t = 15)]
        events: usize,
        /// Show shards per node, moves in progress and the map version instead.
        #[arg(long)]
        shards: bool,
    },
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Failure detection with real processes: crash and pause detection
    /// times, false removals under CPU starvation and log bursts.
    Detection {
        /// Crash trials (each on a fresh cluster); pause trials are a quarter.
        #[arg(long, default_value_t = 20)]
        trials: u64,
        /// How long to run the CPU-starvation and log-burst fault.
        #[arg(long, default_value_t = 60)]
        starve_secs: u64,
    },
    /// Remap: kill a node hosting `per_node` shards; time until all of them
    /// answer on survivors (real node code, in-process network).
    Remap {
        #[arg(long, default_value_t = 10)]
        nodes: u64,
        #[arg(long, default_value_t = 1000)]
        per_node: u64,
        #[arg(long, default_value_t = 3)]
        runs: u64,
    },
    /// Start-up of a large cluster in the deterministic simulator.
    Startup {
        #[arg(long, default_value_t = 250)]
        nodes: u64,
        #[arg(long, default_value_t = 3)]
        voters: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5)]
        runs: u64,
        /// Run the real node code (openraft, redb on disk) for every node in
        /// this process over an in-process network instead of the simulator.
        #[arg(long)]
        inproc: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Node { config, overrides } => run_node(config, overrides),
        Cmd::Up {
            nodes,
            voters,
            arbiters,
            data_dir,
            exit_when_ready,
            ready_timeout_s,
            stage_deadline_ms,
            stuck_policy,
        } => {
            let mut plan = Plan::new(nodes, voters, data_dir);
            plan.arbiters = arbiters;
            plan.stage_deadline_ms = stage_deadline_ms;
            plan.stuck_policy = stuck_policy;
            up(plan, exit_when_ready, Duration::from_secs(ready_timeout_s))
        }
        Cmd::Status {
            data_dir,
            json,
            events,
            shards,
        } => status(data_dir, json, events, shards),
        Cmd::Bench {
            which:
                Bench::Startup {
                    nodes,
                    voters,
                    seed,
                    runs,
                    inproc,
                },
        } => {
            if inproc {
                bench::startup_inproc(nodes, voters, seed, runs)
            } else {
                bench::startup(nodes, voters, seed, runs)
            }
        }
        Cmd::Bench {
            which:
                Bench::Detection {
                    trials,
                    starve_secs,
                },
        } => bench::detection(trials, starve_secs),
        Cmd::Bench {
            which:
                Bench::Remap {
                    nodes,
                    per_node,
                    runs,
                },
        } => bench::remap(nodes, per_node, runs),
    }
}

fn run_node(config: PathBuf, overrides: Vec<String>) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = NodeConfig::load_with(&config, &overrides)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let admin_addr = cfg.admin_listen_addr();
        let admin = tokio::net::TcpListener::bind(&admin_addr)
            .await
            .with_context(|| format!("cannot listen on admin address {admin_addr}"))?;
        let services = Services {
            stages: vec![Arc::new(DemoService::new(cfg.demo.clone())) as Arc<dyn Service>],
            shards: Some(Arc::new(DemoShards::new(cfg.demo.shards))),
        };
        let node = Node::start(cfg, services).await?;
        let admin_task = tokio::spawn(orrery_node::admin::serve(admin, node.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        node.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
        Ok(())
    })
}

fn up(plan: Plan, exit_when_ready: bool, ready_timeout: Duration) -> Result<()> {
    let manifest = local::prepare(&plan)?;
    let exe = std::env::current_exe().context("cannot find the orrery binary")?;
    let launched = Instant::now();
    let launched_ms = now_ms();
    let mut children = orrery::procs::NodeProcs::new(exe, &plan.data_dir);
    children.start_all(&manifest)?;
    println!(
        "orrery: {} nodes ({} voters) starting; data in {}",
        manifest.nodes.len(),
        plan.voters,
        plan.data_dir.display()
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook_consts::SIGINT, signal_hook_consts::SIGTERM] {
        let _ = register_stop(sig, stop.clone());
    }
    let client = AdminClient::default();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("stage {prefix:>2} {bar:30} {pos}/{len} nodes {msg}")
        .expect("valid template");
    let stage_bars: Vec<(Stage, ProgressBar)> = Stage::ALL
        .iter()
        .map(|s| {
            let b = bars.add(ProgressBar::new(manifest.nodes.len() as u64));
            b.set_style(style.clone());
            b.set_prefix(s.to_string());
            b.set_message(s.name());
            (*s, b)
        })
        .collect();
    let mut ready_reported = false;
    let mut reported_exits = std::collections::BTreeSet::new();
    let mut last_state = None;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            println!("\norrery: stopping {} nodes", children.running().len());
            children.stop_all();
            return Ok(());
        }
        for (id, st) in children.exited() {
            if !ready_reported && reported_exits.insert(id) {
                bars.println(format!("node {id} exited ({st}); see its node.log"))
                    .ok();
            }
        }
        if let Ok(state) = client.cluster_state(&manifest) {
            let participants = state.participants().len() as u64;
            for (s, bar) in &stage_bars {
                bar.set_length(participants);
                let done = state
                    .members
                    .values()
                    .filter(|m| {
                        m.report.stage >= *s && m.status == orrery_core::MemberStatus::Active
                    })
                    .count();
                bar.set_position(done as u64);
                if let Some(at) = state.stage_reached_at.get(&s.number()) {
                    let prev = Stage::from_number(s.number() - 1)
                        .and_then(|p| state.stage_reached_at.get(&p.number()))
                        .copied()
                        .unwrap_or(state.boot_started_at);
                    if !bar.is_finished() {
                        bar.finish_with_message(format!(
                            "{} in {} ms",
                            s.name(),
                            at.saturating_sub(prev)
                        ));
                    }
                }
            }
            if local::is_ready(&state, launched_ms) && !ready_reported {
                ready_reported = true;
                let secs = launched.elapsed().as_secs_f64();
                bars.clear().ok();
                print!("{}", local::render_status(&state, &[], now_ms()));
                println!("orrery: cluster ready (stage 0) {secs:.2} s after launch");
                println!(
                    "orrery: `orrery status --data-dir {}` shows it; Ctrl-C stops it",
                    plan.data_dir.display()
                );
                if exit_when_ready {
                    children.stop_all();
                    return Ok(());
                }
            }
            last_state = Some(state);
        }
        if exit_when_ready && launched.elapsed() > ready_timeout {
            let diag = last_state
                .map(|s| local::render_status(&s, &[], now_ms()))
                .unwrap_or_else(|| "no node answered".into());
            children.stop_all();
            bail!(
                "the cluster did not reach stage 0 in {} s:\n{diag}",
                ready_timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

mod signal_hook_consts {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

/// Sets `flag` when `signal` arrives (a tiny tokio runtime on its own thread).
fn register_stop(signal: i32, flag: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let kind = tokio::signal::unix::SignalKind::from_raw(signal);
            if let Ok(mut s) = tokio::signal::unix::signal(kind) {
                s.recv().await;
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
    });
    Ok(())
}

fn status(data_dir: PathBuf, json: bool, events: usize, shards: bool) -> Result<()> {
    let manifest = Manifest::load(&data_dir)?;
    let client = AdminClient::default();
    let state = client.cluster_state(&manifest)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    if shards {
        let hosted: Vec<_> = manifest
            .admin_addrs()
            .into_iter()
            .map(|(id, addr)| (id, client.node_shards(&addr).ok()))
            .collect();
        print!("{}", local::render_shards(&state, &hosted));
        return Ok(());
    }
    let live: Vec<_> = manifest
        .admin_addrs()
        .into_iter()
        .map(|(id, addr)| (id, client.node_status(&addr).ok()))
        .collect();
    print!("{}", local::render_status(&state, &live, now_ms()));
    if events > 0 {
        println!("latest events:");
        print!("{}", local::render_events(&state, events, now_ms()));
    }
    Ok(())
}
