//! The `orrery` command: run a node, a local cluster, its status, benchmarks.
//!
//! This is the binary's edge: errors carry context (anyhow) and are printed
//! for a person; nothing here decides cluster policy. It measures wall time
//! (launch to ready, benchmark runs), so the determinism lints are off here.
#![allow(clippy::disallowed_methods)]

mod bench;
mod bench_apply;
mod bench_logging;
mod bench_universe;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use orrery::exec;
use orrery::local::{self, AdminClient, Manifest, Plan};
use orrery_core::{Stage, StuckPolicy};
use orrery_node::clock::now_ms;
use orrery_node::{
    DemoService, DemoShards, DemoStatsJob, Node, NodeConfig, PeriodicJob, Service, Services,
};
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
        /// Run the built-in demo service instead of the universe.
        #[arg(long)]
        demo: bool,
        /// Systems of the universe generated on a new cluster's first start.
        #[arg(long, default_value_t = 1000)]
        universe_systems: usize,
        /// NPC operations per second started by each node.
        #[arg(long, default_value_t = 20)]
        npc_ops_per_s: u32,
        /// The statistics job's period.
        #[arg(long, default_value_t = 60_000)]
        stats_period_ms: u64,
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
    /// Run one console command on many nodes in parallel and print a table:
    /// node, ok/error/timeout, result. E.g. `orrery exec --nodes all -- log stats`.
    Exec {
        /// `all`, ids (`1,2,5`) or `role=voter|worker|arbiter`.
        #[arg(long, default_value = "all")]
        nodes: String,
        /// Per-node deadline, e.g. `5s`, `500ms`.
        #[arg(long, default_value = "5s")]
        timeout: String,
        #[command(flatten)]
        target: ClusterTarget,
        /// Print the answers as JSON.
        #[arg(long)]
        json: bool,
        /// The command and its arguments (after `--`); `help` lists them.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Interactive console: line editing, history, completion; every line is
    /// run on the chosen nodes as with `exec` (`:nodes SPEC` changes them).
    Console {
        #[arg(long, default_value = "all")]
        nodes: String,
        #[arg(long, default_value = "5s")]
        timeout: String,
        #[command(flatten)]
        target: ClusterTarget,
    },
    /// Every node's alarms in force: severity, node, kind, first and last
    /// seen, acknowledged, what. Exits 2 while a critical one is not
    /// acknowledged (`alarm ack` in the console).
    Alarms {
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The cluster's decisions as a post-mortem timeline.
    Timeline {
        /// Only events since: an RFC 3339 time, a duration ago (`10m`), or ms.
        #[arg(long)]
        since: Option<String>,
        /// `md` (a table for a post-mortem) or `json`.
        #[arg(long, default_value = "md")]
        format: String,
        #[command(flatten)]
        target: ClusterTarget,
    },
    /// The universe example: generate or check a universe file.
    Universe {
        #[command(subcommand)]
        which: UniverseCmd,
    },
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Ask one node of a local cluster to leave and exit (as SIGTERM does:
    /// it drains its shards, commits its `Leave`, exits); waits for it.
    Stop {
        #[arg(long)]
        node: u64,
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
        /// How long to wait for it to exit.
        #[arg(long, default_value_t = 15)]
        timeout_s: u64,
    },
    /// Start one stopped node of a local cluster (detached: it outlives this
    /// command), on the binary recorded for it; waits until it runs.
    Start(orrery::roll::StartArgs),
    /// Monitored rolling restart (or upgrade, with --binary): one batch at a
    /// time, workers first, voters last, the leader last; each node back at
    /// stage 0 with its shards and the cluster healthy for --stable-ms
    /// before the next; stops (or rolls back) at the first node that fails.
    Roll(orrery::roll::RollArgs),
    /// Seeded fault schedules in the deterministic simulator on every core:
    /// every violation with the command that replays it, then
    /// `N seeds, K violations, S seeds/s`; exits 1 if K > 0.
    Sim(orrery::sweep::SweepArgs),
    /// Failover drills: `leader` (hand leadership over and back), `node N`
    /// (drain, stop, restart, readmit, shards back), `history`.
    Drill {
        #[command(subcommand)]
        which: orrery::drill::DrillCmd,
    },
    /// Back a local cluster up: the replicated state at one applied index,
    /// the store (SQLite online backup) and the layout, then restore it into
    /// a scratch directory and check it; prints the manifest.
    Backup(orrery::backup::BackupArgs),
    /// Lay a local cluster's data directory down from a verified backup
    /// (`orrery up` then reaches stage 0 with the same universe).
    Restore(orrery::backup::RestoreArgs),
    /// Configuration: `diff` prints every node whose file disagrees with
    /// the replicated cluster-wide keys (node, key, its value, the cluster's).
    Config {
        #[command(subcommand)]
        which: ConfigCmd,
    },
    /// The cluster's certificate authority, for machines set up by hand
    /// (`orrery up` makes its own).
    Ca {
        #[command(subcommand)]
        which: CaCmd,
    },
    /// Rebuild a stopped voter whose Raft store is damaged: the damaged file is
    /// moved aside and the voter is brought back by its peers (it votes again
    /// once it has caught up). Name the node by its config file, or by a local
    /// cluster's data directory and node id.
    Repair {
        /// The node's TOML configuration.
        #[arg(long, conflicts_with_all = ["data_dir", "node"])]
        config: Option<PathBuf>,
        /// A local cluster's data directory (as given to `orrery up`).
        #[arg(long, requires = "node")]
        data_dir: Option<PathBuf>,
        /// The node id within `--data-dir`.
        #[arg(long, requires = "data_dir")]
        node: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Where each node's file drifts from the replicated configuration;
    /// exits 3 if any node drifts (for scripts).
    Diff {
        #[command(flatten)]
        target: ClusterTarget,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the CA (key and certificate) for a cluster id in DIR. Keep DIR
    /// off the nodes: whoever holds its key can issue node certificates.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster id every node's `cluster_id` must equal (a-z, 0-9, '-').
        #[arg(long)]
        cluster_id: String,
    },
    /// Issue node N a certificate for its role (the next serial) and write
    /// its directory (`ca.crt`, `node.crt`, `node.key`; the node's
    /// `tls.dir`, default `data_dir/tls`). Issuing again replaces a revoked
    /// certificate.
    Issue {
        /// The CA's directory (from `orrery ca init`).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        node: u64,
        /// voter, worker or arbiter: as in the cluster's node list.
        #[arg(long)]
        role: String,
        /// Where to write the node's credentials.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum UniverseCmd {
    /// Generate a universe (regions, constellations, systems with jump
    /// links, alliances with capitals, campaigns, market orders,
    /// characters) and write it as JSON; the same seed gives the same universe.
    Generate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5000)]
        systems: usize,
        /// Campaigns (default: about 300 per 5,000 systems).
        #[arg(long)]
        campaigns: Option<usize>,
        #[arg(long, default_value = "universe.json")]
        out: PathBuf,
    },
    /// Validate a universe file: every broken row is named and the file refused.
    Check { file: PathBuf },
    /// Import a universe file into a local cluster's store (validated
    /// first; the meta row is written last, so a cut-short import is redone).
    Import {
        file: PathBuf,
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
    },
    /// The latest committed statistics periods of a local cluster.
    Stats {
        #[arg(long, default_value = "orrery-data")]
        data_dir: PathBuf,
        /// How many periods.
        #[arg(long, default_value_t = 10)]
        last: u64,
    },
}

/// Which cluster a console command goes to, and with which token.
#[derive(clap::Args)]
struct ClusterTarget {
    /// A local cluster's data directory (its manifest lists the nodes).
    #[arg(long, default_value = "orrery-data")]
    data_dir: PathBuf,
    /// Instead: a node's admin address (repeatable); the nodes are read
    /// from the first. The admin token is sent only to the addresses named
    /// here, never to one a node's answer lists (name each node you want
    /// to reach, or use --data-dir, whose manifest is your own).
    #[arg(long)]
    admin: Vec<String>,
    /// Admin token (else ORRERY_ADMIN_TOKEN, else DATA_DIR/admin.token).
    #[arg(long)]
    token: Option<String>,
}

impl ClusterTarget {
    fn fleet(&self, timeout: Duration) -> Result<exec::Fleet> {
        if self.admin.is_empty() {
            exec::Fleet::local(&self.data_dir)
        } else {
            exec::Fleet::discover(&self.admin, timeout)
        }
    }

    fn token(&self) -> Option<String> {
        exec::find_token(self.token.clone(), &self.data_dir)
    }
}

/// `orrery config diff`: one row per drifting key of every node that
/// answers; nodes that do not answer are named, not skipped.
fn config_diff(fleet: &exec::Fleet) -> Result<()> {
    let client = AdminClient::default();
    let mut rows = vec![];
    let mut digests = vec![];
    for n in &fleet.nodes {
        match client.node_status(&n.admin_addr) {
            Ok(st) => {
                let d = &st.config_digests;
                digests.push(format!(
                    "{:<5} {:<8} {:<32} {:<32} {:<32} {}",
                    n.id,
                    n.role.to_string(),
                    d.cluster,
                    d.node,
                    d.local,
                    st.version
                ));
                rows.extend(
                    st.config_drift
                        .into_iter()
                        .map(|d| (n.id, d.key, d.here, d.cluster)),
                )
            }
            Err(e) => println!("node {}: no answer ({e})", n.id),
        }
    }
    println!(
        "{:<5} {:<8} {:<32} {:<32} {:<32} VERSION",
        "NODE", "ROLE", "CLUSTER-WIDE DIGEST", "PER-NODE DIGEST", "LOCAL DIGEST"
    );
    for line in digests {
        println!("{line}");
    }
    if rows.is_empty() {
        println!("no drift: every node that answered runs the cluster's values");
        return Ok(());
    }
    println!("{:<5} {:<36} {:<20} CLUSTER", "NODE", "KEY", "HERE");
    for (node, key, here, cluster) in rows {
        println!("{node:<5} {key:<36} {here:<20} {cluster}");
    }
    std::process::exit(3);
}

fn parse_timeout(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s)
        .with_context(|| format!("--timeout {s:?}: expected a duration such as 5s or 500ms"))?;
    if d.is_zero() || d > Duration::from_secs(600) {
        bail!("--timeout must be between 1ms and 10m");
    }
    Ok(d)
}

#[derive(Subcommand)]
enum Bench {
    /// The universe on real processes: time to stage 0 with 5,000 systems
    /// and 300 campaigns, sustained NPC operations/s, and the singleton
    /// job's failover beside etcd's leader election (`etcdctl elect`).
    Universe {
        #[arg(long, default_value_t = 10)]
        nodes: u64,
        #[arg(long, default_value_t = 5000)]
        systems: usize,
        /// NPC operations per second each node starts.
        #[arg(long, default_value_t = 200)]
        npc_ops_per_s: u32,
        /// Holder kills.
        #[arg(long, default_value_t = 5)]
        failovers: u64,
        /// Skip the etcd measurement.
        #[arg(long)]
        no_etcd: bool,
    },
    /// Logging: orrery-log vs tracing-appender (lossy, lossless): file
    /// throughput from several threads, and event-loop lag while the sink
    /// is stalled.
    Logging {
        #[arg(long, default_value_t = 200_000)]
        lines: u64,
        #[arg(long, default_value_t = 2)]
        threads: u64,
        /// Lift the stall after this many seconds (bounds the lossless run).
        #[arg(long, default_value_t = 3)]
        stall_secs: u64,
    },
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
    /// Proposals/s and commit latency on 3 in-process voters holding a large
    /// state (members and shards): the cost of applying a command.
    Apply {
        #[arg(long, default_value_t = 250)]
        members: u64,
        #[arg(long, default_value_t = 10_000)]
        shards: u64,
        #[arg(long, default_value_t = 2_000)]
        proposals: u64,
    },
    /// Backup + verify + restore of a universe's store (`--systems`):
    /// times and sizes.
    Backup {
        #[arg(long, default_value_t = 5000)]
        systems: usize,
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

/// `orrery repair`: finds the node's Raft directory and rebuilds it.
fn run_repair(config: Option<PathBuf>, data_dir: Option<PathBuf>, node: Option<u64>) -> Result<()> {
    let config = match (config, data_dir, node) {
        (Some(c), _, _) => c,
        (None, Some(d), Some(n)) => orrery::local::Manifest::node_config_path(&d, n),
        _ => anyhow::bail!("name the node: --config FILE, or --data-dir DIR --node N"),
    };
    let cfg = orrery_node::NodeConfig::load(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    if !cfg.me().role.is_voter() {
        anyhow::bail!(
            "node {} is not a voter: it keeps no Raft store (nothing to repair)",
            cfg.node_id
        );
    }
    let raft_dir = cfg.data_dir.join("raft");
    let report = orrery_control::repair(&raft_dir)
        .with_context(|| format!("repairing node {}", cfg.node_id))?;
    match &report.damage {
        Some(d) => println!("node {}: damage found: {d}", cfg.node_id),
        None => println!("node {}: no damaged record found", cfg.node_id),
    }
    if let Some(p) = &report.moved_to {
        println!(
            "node {}: damaged store kept as {}",
            cfg.node_id,
            p.display()
        );
    }
    println!(
        "node {}: fresh Raft store in {} ({}); start the node: it catches up from the leader and votes again once it has",
        cfg.node_id,
        raft_dir.display(),
        if report.kept_vote { "vote kept" } else { "no intact vote to keep" }
    );
    Ok(())
}

/// Runs the command; an error is printed for a person (see
/// [`error_report`]) and the exit code is 1 (commands that exit with their
/// own code, e.g. `exec`'s 2, do so themselves).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error: WHAT`, then `  caused by: WHY` for each source in the chain;
/// a stack backtrace only if one was captured, i.e. the user asked for it
/// (`RUST_BACKTRACE=1` or `RUST_LIB_BACKTRACE=1`).
fn error_report(e: &anyhow::Error) -> String {
    use std::fmt::Write;
    let mut out = format!("error: {e}\n");
    for cause in e.chain().skip(1) {
        let _ = writeln!(out, "  caused by: {cause}");
    }
    let bt = e.backtrace();
    if bt.status() == std::backtrace::BacktraceStatus::Captured {
        let _ = writeln!(out, "stack backtrace (RUST_BACKTRACE is set):\n{bt}");
    }
    out
}

#[cfg(test)]
mod error_report_tests {
    #[test]
    fn an_error_prints_its_chain() {
        let e = anyhow::anyhow!("No such file or directory")
            .context("cannot read /nonexistent/orrery.json")
            .context("no local cluster in /nonexistent");
        let text = super::error_report(&e);
        assert!(
            text.starts_with(
                "error: no local cluster in /nonexistent\n  caused by: cannot read /nonexistent/orrery.json\n  caused by: No such file or directory\n"
            ),
            "{text}"
        );
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Node { config, overrides } => run_node(config, overrides),
        Cmd::Repair {
            config,
            data_dir,
            node,
        } => run_repair(config, data_dir, node),
        Cmd::Ca {
            which: CaCmd::Init { dir, cluster_id },
        } => {
            let ca = orrery::ca::init(&dir, &cluster_id)?;
            println!(
                "created the CA of cluster {} in {} (keep ca.key off the nodes)",
                ca.cluster_id().as_str(),
                dir.display()
            );
            Ok(())
        }
        Cmd::Ca {
            which:
                CaCmd::Issue {
                    ca,
                    node,
                    role,
                    out,
                },
        } => {
            let role = orrery::ca::parse_role(&role)?;
            let creds = orrery::ca::issue(&ca, node, role, &out)?;
            println!(
                "issued node {node} ({}) certificate serial {} into {}",
                orrery_trust::names::role_name(role),
                creds.serial(),
                out.display()
            );
            Ok(())
        }
        Cmd::Up {
            nodes,
            voters,
            arbiters,
            data_dir,
            exit_when_ready,
            ready_timeout_s,
            stage_deadline_ms,
            stuck_policy,
            demo,
            universe_systems,
            npc_ops_per_s,
            stats_period_ms,
        } => {
            // Refused at once if the directory is in use (another `orrery
            // up`, or node processes running on it); held until we exit.
            let up_lock = local::lock_for_up(&data_dir)?;
            let mut plan = Plan::new(nodes, voters, data_dir);
            plan.arbiters = arbiters;
            plan.stage_deadline_ms = stage_deadline_ms;
            plan.stuck_policy = stuck_policy;
            if !demo {
                let cfg = orrery_universe::UniverseConfig {
                    npc_ops_per_s,
                    stats_period_ms,
                    ..Default::default()
                };
                local::with_universe(&mut plan, &cfg)?;
                local::prepare(&plan)?;
                prepare_universe(&plan.data_dir, 1, universe_systems)?;
            }
            up(
                plan,
                exit_when_ready,
                Duration::from_secs(ready_timeout_s),
                &up_lock,
            )
        }
        Cmd::Status {
            data_dir,
            json,
            events,
            shards,
        } => status(data_dir, json, events, shards),
        Cmd::Alarms { data_dir, json } => alarms(data_dir, json),
        Cmd::Exec {
            nodes,
            timeout,
            target,
            json,
            command,
        } => {
            let timeout = parse_timeout(&timeout)?;
            // The line is checked (and `help` answered) before anything
            // is sent; `help` needs no cluster.
            let fleet = target.fleet(timeout);
            let chosen = match &fleet {
                Ok(f) => f.select(&nodes.parse()?)?,
                Err(_) => Vec::new(),
            };
            let mut vocab = exec::Vocabulary::default();
            if let exec::Line::Help {
                lines,
                services_known,
            } = exec::prepare(&command, &mut vocab, &chosen, timeout)?
            {
                if json {
                    println!("{}", serde_json::to_string_pretty(&lines)?);
                } else {
                    print!("{}", exec::Line::render_help(&lines, services_known));
                }
                return Ok(());
            }
            let fleet = fleet?;
            let token = target.token();
            if token.is_none() {
                bail!("no admin token: pass --token, set ORRERY_ADMIN_TOKEN, or run against a local cluster whose data dir holds admin.token");
            }
            let out = exec::exec(&fleet, &chosen, &command, token.as_deref(), timeout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&exec::to_json(&out))?);
            } else {
                print!("{}", exec::render(&out));
            }
            if out
                .iter()
                .all(|o| matches!(o.outcome, exec::Outcome::Ok { .. }))
            {
                Ok(())
            } else {
                std::process::exit(2)
            }
        }
        Cmd::Console {
            nodes,
            timeout,
            target,
        } => console(nodes, parse_timeout(&timeout)?, target),
        Cmd::Config {
            which: ConfigCmd::Diff { target },
        } => config_diff(&target.fleet(Duration::from_secs(3))?),
        Cmd::Stop {
            node,
            data_dir,
            timeout_s,
        } => {
            let t0 = Instant::now();
            let pid = local::stop_node(&data_dir, node, Duration::from_secs(timeout_s))?;
            println!(
                "node {node} (pid {pid}) left the cluster and exited in {} ms",
                t0.elapsed().as_millis()
            );
            Ok(())
        }
        Cmd::Start(args) => orrery::roll::start(args),
        Cmd::Backup(args) => orrery::backup::backup(args),
        Cmd::Restore(args) => orrery::backup::restore(args),
        Cmd::Bench {
            which: Bench::Backup { systems, runs },
        } => orrery::backup::bench(systems, runs),
        Cmd::Roll(args) => orrery::roll::run(args),
        Cmd::Sim(args) => {
            if !orrery::sweep::main(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Drill { which } => orrery::drill::run(which),
        Cmd::Timeline {
            since,
            format,
            target,
        } => {
            let since = since
                .as_deref()
                .map(exec::parse_since)
                .transpose()?
                .unwrap_or(0);
            let fleet = target.fleet(Duration::from_secs(3))?;
            let events = exec::fetch_timeline(&fleet, since, Duration::from_secs(3))?;
            match format.as_str() {
                "md" => print!("{}", exec::timeline_markdown(&events)),
                "json" => println!("{}", serde_json::to_string_pretty(&events)?),
                other => bail!("--format {other:?}: expected md or json"),
            }
            Ok(())
        }
        Cmd::Universe {
            which:
                UniverseCmd::Generate {
                    seed,
                    systems,
                    campaigns,
                    out,
                },
        } => {
            let mut sizes = orrery_universe::Sizes::for_systems(systems);
            if let Some(c) = campaigns {
                sizes.campaigns = c;
            }
            let u = orrery_universe::generate(seed, sizes)?;
            u.save(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "universe {seed}: {} regions, {} constellations, {} systems, {} jump links, {} alliances, {} campaigns, {} market orders, {} characters -> {}",
                u.regions.len(),
                u.constellations.len(),
                u.systems.len(),
                u.systems.iter().map(|s| s.jumps.len()).sum::<usize>() / 2,
                u.alliances.len(),
                u.campaigns.len(),
                u.market_orders.len(),
                u.characters.len(),
                out.display()
            );
            Ok(())
        }
        Cmd::Universe {
            which: UniverseCmd::Import { file, data_dir },
        } => {
            let u = orrery_universe::Universe::load(&file)?;
            let store = local_store(&data_dir)?;
            let m = orrery_universe::import(&*store, &u)?;
            println!(
                "imported universe {} ({} systems, {} campaigns) into {}",
                m.seed,
                m.systems,
                m.campaign_systems.len(),
                Manifest::store_path(&data_dir).display()
            );
            Ok(())
        }
        Cmd::Universe {
            which: UniverseCmd::Stats { data_dir, last },
        } => universe_stats(&data_dir, last),
        Cmd::Universe {
            which: UniverseCmd::Check { file },
        } => {
            let u = orrery_universe::Universe::load(&file)?;
            println!(
                "{}: valid ({} systems, {} campaigns)",
                file.display(),
                u.systems.len(),
                u.campaigns.len()
            );
            Ok(())
        }
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
                Bench::Universe {
                    nodes,
                    systems,
                    npc_ops_per_s,
                    failovers,
                    no_etcd,
                },
        } => bench_universe::universe(nodes, systems, npc_ops_per_s, failovers, !no_etcd),
        Cmd::Bench {
            which:
                Bench::Detection {
                    trials,
                    starve_secs,
                },
        } => bench::detection(trials, starve_secs),
        Cmd::Bench {
            which:
                Bench::Apply {
                    members,
                    shards,
                    proposals,
                },
        } => bench_apply::apply(members, shards, proposals),
        Cmd::Bench {
            which:
                Bench::Remap {
                    nodes,
                    per_node,
                    runs,
                },
        } => bench::remap(nodes, per_node, runs),
        Cmd::Bench {
            which:
                Bench::Logging {
                    lines,
                    threads,
                    stall_secs,
                },
        } => bench_logging::logging(lines, threads, stall_secs),
    }
}

fn run_node(config: PathBuf, overrides: Vec<String>) -> Result<()> {
    let cfg = NodeConfig::load_with(&config, &overrides)?;
    // One process per data directory (two on one Raft store would corrupt
    // it): refused before anything is bound; held until the process exits.
    let _lock = local::lock_for_node(cfg.node_id, &cfg.data_dir, &cfg.admin_listen_addr())?;
    // Logging channels: bounded queues, never waited for (see orrery-log).
    let log =
        orrery_log::install(&cfg.log, Some(&cfg.data_dir)).context("cannot set up logging")?;
    if cfg.runtime.nice != 0 {
        rustix::process::setpriority_process(None, cfg.runtime.nice)
            .with_context(|| format!("cannot set runtime.nice = {}", cfg.runtime.nice))?;
    }
    let rt = cfg
        .runtime
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let admin_addr = cfg.admin_listen_addr();
        let admin = tokio::net::TcpListener::bind(&admin_addr)
            .await
            .with_context(|| format!("cannot listen on admin address {admin_addr}"))?;
        // The fenced store for application data and job output.
        let store_cfg = cfg.store_config();
        let store = tokio::task::spawn_blocking(move || orrery_store::open(&store_cfg))
            .await?
            .context("cannot open the store")?;
        let store: Arc<dyn orrery_store::Store> = Arc::from(store);
        // `[app.universe]` runs the universe; otherwise the built-in demo.
        let universe = match cfg.app.get("universe") {
            Some(v) => {
                let ucfg: orrery_universe::UniverseConfig =
                    v.clone().try_into().context("invalid [app.universe]")?;
                let s = store.clone();
                let u = tokio::task::spawn_blocking(move || {
                    orrery_universe::UniverseService::open(ucfg, s)
                })
                .await?
                .map_err(|e| anyhow::anyhow!("cannot run the universe: {e}"))?;
                Some(u)
            }
            None => None,
        };
        let services = match &universe {
            Some(u) => Services {
                stages: vec![
                    Arc::new(orrery_universe::UniverseStages(u.clone())) as Arc<dyn Service>
                ],
                shards: Some(u.clone()),
                jobs: vec![Arc::new(orrery_universe::StatsJob(u.clone())) as Arc<dyn PeriodicJob>],
                store: Some(store.clone()),
                console: vec![Arc::new(orrery_universe::UniverseConsole(u.clone()))
                    as Arc<dyn orrery_node::ConsoleExtension>],
            },
            None => Services {
                stages: vec![Arc::new(DemoService::new(cfg.demo.clone())) as Arc<dyn Service>],
                shards: Some(Arc::new(DemoShards::new(cfg.demo.shards))),
                jobs: DemoStatsJob::new(&cfg.demo)
                    .map(|j| Arc::new(j) as Arc<dyn PeriodicJob>)
                    .into_iter()
                    .collect(),
                store: Some(store.clone()),
                ..Default::default()
            },
        };
        let node = Node::start(cfg, services).await?;
        if let Some(u) = &universe {
            u.attach(node.clone());
        }
        node.attach_log(log.clone());
        let admin_task = tokio::spawn(orrery_node::admin::serve(admin, node.clone()));
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // SIGTERM and SIGINT are an operator's decision: the node leaves the
        // cluster (drain, stop serving, `Leave`), bounded by `[shutdown]`,
        // instead of vanishing and being suspected. While it leaves, SIGTERM
        // is ignored; a second SIGINT (Ctrl-C twice) skips the rest.
        let how = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!("{how}: leaving the cluster");
        tokio::select! {
            _ = node.leave() => {}
            _ = int.recv() => tracing::warn!("SIGINT again: exiting without finishing leaving"),
        }
        tracing::info!("shutting down");
        node.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
        log.shutdown(Duration::from_secs(2));
        Ok(())
    })
}

fn up(
    plan: Plan,
    exit_when_ready: bool,
    ready_timeout: Duration,
    lock: &local::DirLock,
) -> Result<()> {
    let manifest = local::prepare(&plan)?;
    lock.describe(manifest.nodes.first().map(|n| n.admin_addr.as_str()))?;
    // A node whose file does not load would exit at once: say which, now.
    for n in &manifest.nodes {
        let path = Manifest::node_config_path(&plan.data_dir, n.id);
        NodeConfig::load(&path).with_context(|| format!("node {} cannot start", n.id))?;
    }
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
    if let Some(first) = manifest.nodes.first() {
        println!(
            "orrery: dashboard at http://{}/ (every node serves it); console: `orrery console --data-dir {}`",
            first.admin_addr,
            plan.data_dir.display()
        );
    }
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
        // A node that exits before stage 0 will not come back by itself:
        // stop waiting and say why, in its own words.
        if !ready_reported {
            if let Some((id, st)) = children.exited().into_iter().next() {
                bars.clear().ok();
                let log_path = children.log_path(id);
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let reason = local::log_reason(&log, 12).join("\n  ");
                children.stop_all();
                bail!(
                    "node {id} exited ({st}) before the cluster reached stage 0; the end of its log ({}):\n  {reason}",
                    log_path.display()
                );
            }
        }
        for (id, st) in children.exited() {
            if reported_exits.insert(id) {
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
    let state = match client.cluster_state(&manifest) {
        Ok(s) => s,
        // No quorum (or no voter up): the nodes still say what they see.
        Err(e) if !json && !shards => {
            let live = client.node_statuses(&manifest);
            let why = format!("{e:#}");
            print!("{}", local::render_nodes(&manifest, &live, &why, now_ms()));
            return status_exit(&live);
        }
        Err(e) => return Err(e),
    };
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
    status_exit(&live)
}

/// Prints the backup and alarm lines; exits 2 while a backup alarm or a
/// critical alarm nobody acknowledged is in force (for scripts and cron).
fn status_exit(live: &[(orrery_core::NodeId, Option<orrery_node::NodeStatus>)]) -> Result<()> {
    let (lines, backup_alarm) = orrery::backup::status_lines(live, now_ms());
    for l in lines {
        println!("{l}");
    }
    let (table, critical) = local::render_alarms(live, now_ms());
    if !table.is_empty() {
        print!("alarms in force:\n{table}");
    }
    if backup_alarm || critical {
        std::process::exit(2);
    }
    Ok(())
}

/// `orrery alarms`: every node's alarms in force.
fn alarms(data_dir: PathBuf, json: bool) -> Result<()> {
    let manifest = Manifest::load(&data_dir)?;
    let live = AdminClient::default().node_statuses(&manifest);
    let (table, critical) = local::render_alarms(&live, now_ms());
    if json {
        let all: Vec<&orrery_node::alarms::ActiveAlarm> = live
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .flat_map(|s| s.alarms.iter())
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if table.is_empty() {
        println!("no alarms in force");
    } else {
        print!("{table}");
    }
    for (id, st) in &live {
        if st.is_none() {
            eprintln!("node {id} did not answer: its alarms are unknown");
        }
    }
    if critical {
        std::process::exit(2);
    }
    Ok(())
}

/// `orrery console`: a read-eval-print loop over `exec`.
fn console(nodes: String, timeout: Duration, target: ClusterTarget) -> Result<()> {
    use rustyline::error::ReadlineError;
    let fleet = target.fleet(timeout)?;
    let Some(token) = target.token() else {
        bail!("no admin token: pass --token, set ORRERY_ADMIN_TOKEN, or run against a local cluster whose data dir holds admin.token");
    };
    let mut chosen = fleet.select(&nodes.parse()?)?;
    let mut vocab = exec::Vocabulary::default();
    let config = rustyline::Config::builder()
        .max_history_size(1000)?
        .auto_add_history(true)
        .build();
    let mut rl: rustyline::Editor<exec::ConsoleHelper, rustyline::history::DefaultHistory> =
        rustyline::Editor::with_config(config)?;
    rl.set_helper(Some(exec::ConsoleHelper));
    let history = target.data_dir.join(".console_history");
    let _ = rl.load_history(&history);
    println!(
        "orrery console: {} nodes chosen; `help` lists commands, `:nodes all|1,2|role=worker` chooses, `:quit` leaves",
        chosen.len()
    );
    loop {
        let line = match rl.readline(&format!("orrery[{}]> ", chosen.len())) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        match words.first().map(String::as_str) {
            None => continue,
            Some(":quit") | Some(":q") | Some("exit") | Some("quit") => break,
            Some(":nodes") => {
                match words
                    .get(1)
                    .ok_or_else(|| anyhow::anyhow!("usage: :nodes all|1,2|role=worker"))
                    .and_then(|s| s.parse())
                    .and_then(|t| fleet.select(&t))
                {
                    Ok(c) => {
                        chosen = c;
                        println!("{} nodes chosen", chosen.len());
                    }
                    Err(e) => println!("error: {e}"),
                }
            }
            // Checked here first: `help` is answered here, and a line that
            // does not parse is refused once, before anything is sent.
            Some(_) => match exec::prepare(&words, &mut vocab, &chosen, timeout) {
                Ok(exec::Line::Help {
                    lines,
                    services_known,
                }) => {
                    print!("{}", exec::Line::render_help(&lines, services_known));
                    if words.len() == 1 {
                        println!(":nodes all|1,2|role=worker (choose the nodes)\n:quit");
                    }
                }
                Ok(exec::Line::Run) => {
                    match exec::exec(&fleet, &chosen, &words, Some(&token), timeout) {
                        Ok(out) => print!("{}", exec::render(&out)),
                        Err(e) => println!("error: {e:#}"),
                    }
                }
                Err(e) => println!("error: {e:#}"),
            },
        }
    }
    let _ = rl.save_history(&history);
    Ok(())
}

/// The local cluster's shared store.
fn local_store(data_dir: &std::path::Path) -> Result<Box<dyn orrery_store::Store>> {
    let path = Manifest::store_path(data_dir);
    orrery_store::open(&orrery_store::StoreConfig::sqlite(&path))
        .with_context(|| format!("cannot open the store {}", path.display()))
}

/// On a new cluster's first start: generate a universe and import it.
fn prepare_universe(data_dir: &std::path::Path, seed: u64, systems: usize) -> Result<()> {
    let store = local_store(data_dir)?;
    match orrery_universe::import::meta(&*store) {
        Ok(m) => {
            // Every row is checked before the cluster loads any of it.
            orrery_universe::import::read_back(&*store).with_context(|| {
                format!(
                    "the universe in {} is broken; refusing to start",
                    Manifest::store_path(data_dir).display()
                )
            })?;
            println!(
                "orrery: universe {} ({} systems, {} campaigns) already in {}, every row valid",
                m.seed,
                m.systems,
                m.campaign_systems.len(),
                Manifest::store_path(data_dir).display()
            );
            Ok(())
        }
        Err(orrery_universe::ImportError::Incomplete) => {
            let t = Instant::now();
            let u = orrery_universe::generate(seed, orrery_universe::Sizes::for_systems(systems))?;
            u.save(&data_dir.join("universe.json"))?;
            let m = orrery_universe::import(&*store, &u)?;
            println!(
                "orrery: generated and imported universe {seed}: {} systems, {} alliances, {} campaigns, {} regions in {:.1} s",
                m.systems,
                m.alliances,
                m.campaign_systems.len(),
                m.regions,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// `orrery universe stats`: committed periods of the statistics job.
fn universe_stats(data_dir: &std::path::Path, last: u64) -> Result<()> {
    let store = local_store(data_dir)?;
    let job = orrery_universe::service::STATS_JOB;
    let now = orrery_node::clock::now_ms();
    let manifest_cfg = local::universe_config(data_dir)?;
    let current = now / manifest_cfg.stats_period_ms.max(1);
    let rows = store.job_periods(job, current.saturating_sub(last), current + 1)?;
    println!(
        "{:>10}  {:>11}  {:>8}  {:>8}  {:>15}  committed",
        "period", "lease epoch", "jumps", "trades", "campaign events"
    );
    for r in &rows {
        let total: orrery_universe::service::Activity = r
            .rows
            .iter()
            .find(|(k, _)| k == "total")
            .and_then(|(_, v)| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        println!(
            "{:>10}  {:>11}  {:>8}  {:>8}  {:>15}  {}",
            r.period,
            r.lease_epoch,
            total.jumps,
            total.trades,
            total.campaign_events,
            exec::format_ms(r.committed_at_ms)
        );
    }
    println!("{} committed periods", rows.len());
    Ok(())
}
