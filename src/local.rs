//! A local cluster of real node processes on 127.0.0.1: its plan on disk
//! and how to ask it what it is doing.
//!
//! `orrery up` and the integration tests both use this module, so the tests
//! start clusters exactly the way users do. It owns the layout of a local
//! cluster's data directory (`cluster.toml` plus one `node-N/` directory per
//! node) and must never hold cluster state of its own: what the cluster
//! decided is read from the nodes.

use anyhow::{bail, Context, Result};
use orrery_core::{
    ClusterState, MembershipConfig, NodeId, PlacementSettings, Role, Stage, StuckPolicy,
};
use orrery_node::config::{
    AdminConfig, DemoConfig, NodeConfig, NodeEntry, RaftTiming, RpcConfig, StartupConfig,
};
use orrery_node::health::{HealthConfig, HealthFaults};
use orrery_node::logfwd::ForwardConfig;
use orrery_node::watchdog::WatchdogConfig;
use orrery_node::NodeStatus;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `orrery up` was asked for.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: u64,
    pub voters: u64,
    pub data_dir: PathBuf,
    pub stage_deadline_ms: u64,
    pub stuck_policy: StuckPolicy,
    /// How many of the voters are arbiters (vote, host nothing).
    pub arbiters: u64,
    /// Per-node demo settings (fault hooks), by node id.
    pub demo: Vec<(NodeId, DemoConfig)>,
    /// Per-node health fault hooks, by node id.
    pub faults: Vec<(NodeId, HealthFaults)>,
    pub membership: MembershipConfig,
    pub health: HealthConfig,
    pub placement: PlacementSettings,
    /// Logging channels of every node.
    pub log: orrery_log::LogConfig,
    /// Allow the console's `fault ...` commands (tests).
    pub fault_commands: bool,
    /// The event-loop watchdog of every node.
    pub watchdog: WatchdogConfig,
    /// Where every node forwards its warnings.
    pub log_forward: ForwardConfig,
    /// The `[store]` of every node; `path` is always `DATA_DIR/store.db`,
    /// one SQLite file shared by the whole local cluster.
    pub store: orrery_store::StoreConfig,
    /// Application sections of every node (`[app.universe]`).
    pub app: toml::Table,
}

impl Plan {
    /// The no-false-removal fault load: node `starved` has its runtime
    /// blocked 300 ms at a time (a CPU hog) and every node logs a burst of
    /// 500 warnings once ready.
    pub fn starve_and_burst(&mut self, starved: NodeId) {
        self.faults = vec![(
            starved,
            HealthFaults {
                event_loop_lag_ms: 300,
                ..Default::default()
            },
        )];
        self.demo = (1..=self.nodes)
            .map(|id| {
                (
                    id,
                    DemoConfig {
                        log_burst_lines: 500,
                        ..Default::default()
                    },
                )
            })
            .collect();
    }

    pub fn new(nodes: u64, voters: u64, data_dir: impl Into<PathBuf>) -> Self {
        Plan {
            nodes,
            voters,
            data_dir: data_dir.into(),
            stage_deadline_ms: StartupConfig::default().stage_deadline_ms,
            stuck_policy: StuckPolicy::Exclude,
            arbiters: 0,
            demo: vec![],
            faults: vec![],
            membership: MembershipConfig::default(),
            health: HealthConfig::default(),
            placement: PlacementSettings::default(),
            log: orrery_node::config::default_log(),
            fault_commands: false,
            watchdog: WatchdogConfig::default(),
            log_forward: ForwardConfig {
                collector: Some(1),
                ..Default::default()
            },
            store: orrery_store::StoreConfig::default(),
            app: toml::Table::new(),
        }
    }
}

/// The manifest of a local cluster (`DATA_DIR/cluster.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub cluster_id: String,
    pub nodes: Vec<NodeEntry>,
}

impl Manifest {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("cluster.toml")
    }

    pub fn load(data_dir: &Path) -> Result<Manifest> {
        let p = Manifest::path(data_dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no local cluster at {} (run `orrery up` first)",
                data_dir.display()
            )
        })?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid cluster manifest", p.display()))
    }

    /// The admin token of a local cluster (readable by its owner only).
    pub fn token_path(data_dir: &Path) -> PathBuf {
        data_dir.join("admin.token")
    }

    /// The SQLite store every node of a local cluster shares.
    pub fn store_path(data_dir: &Path) -> PathBuf {
        data_dir.join("store.db")
    }

    pub fn node_config_path(data_dir: &Path, id: NodeId) -> PathBuf {
        data_dir.join(format!("node-{id}")).join("node.toml")
    }

    pub fn admin_addrs(&self) -> Vec<(NodeId, String)> {
        self.nodes
            .iter()
            .map(|n| (n.id, n.admin_addr.clone()))
            .collect()
    }
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("cannot reserve ports on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes (or reuses) the cluster's configuration files. An existing
/// manifest with the same node count is reused as is, so a restart runs on
/// the same ids, ports, secret and data directories.
pub fn prepare(plan: &Plan) -> Result<Manifest> {
    if plan.voters == 0 || plan.voters % 2 == 0 || plan.voters > plan.nodes {
        bail!(
            "--voters must be odd and at most --nodes (got {} of {})",
            plan.voters,
            plan.nodes
        );
    }
    if plan.arbiters >= plan.voters {
        bail!(
            "--arbiters must be fewer than --voters: at least one voter hosts services (got {} of {})",
            plan.arbiters,
            plan.voters
        );
    }
    std::fs::create_dir_all(&plan.data_dir)
        .with_context(|| format!("cannot create {}", plan.data_dir.display()))?;
    if Manifest::path(&plan.data_dir).exists() {
        let m = Manifest::load(&plan.data_dir)?;
        if m.nodes.len() as u64 == plan.nodes {
            return Ok(m);
        }
        bail!(
            "{} holds a {}-node cluster; use another --data-dir for {} nodes",
            plan.data_dir.display(),
            m.nodes.len(),
            plan.nodes
        );
    }
    let ports = free_ports(2 * plan.nodes as usize)?;
    let nodes: Vec<NodeEntry> = (1..=plan.nodes)
        .map(|id| NodeEntry {
            id,
            addr: format!("127.0.0.1:{}", ports[2 * (id as usize - 1)]),
            admin_addr: format!("127.0.0.1:{}", ports[2 * (id as usize - 1) + 1]),
            role: if id + plan.arbiters <= plan.voters {
                Role::Voter
            } else if id <= plan.voters {
                Role::Arbiter
            } else {
                Role::Worker
            },
        })
        .collect();
    let secret = random_secret();
    let token = random_secret();
    write_private(&Manifest::token_path(&plan.data_dir), &token)?;
    let manifest = Manifest {
        cluster_id: format!("orrery-local-{}", &secret[..8]),
        nodes: nodes.clone(),
    };
    let store_path = Manifest::store_path(&plan.data_dir.canonicalize()?);
    for n in &nodes {
        let dir = plan.data_dir.join(format!("node-{}", n.id));
        std::fs::create_dir_all(&dir)?;
        let cfg = NodeConfig {
            node_id: n.id,
            cluster_id: manifest.cluster_id.clone(),
            secret: secret.clone(),
            data_dir: dir.canonicalize()?,
            listen: None,
            admin_listen: None,
            startup: StartupConfig {
                stage_deadline_ms: plan.stage_deadline_ms,
                stuck_policy: plan.stuck_policy,
                ..Default::default()
            },
            raft: RaftTiming::default(),
            rpc: RpcConfig::default(),
            demo: plan
                .demo
                .iter()
                .find(|(id, _)| *id == n.id)
                .map(|(_, d)| d.clone())
                .unwrap_or_default(),
            membership: plan.membership.clone(),
            health: plan.health.clone(),
            shards: Default::default(),
            placement: plan.placement.clone(),
            faults: plan
                .faults
                .iter()
                .find(|(id, _)| *id == n.id)
                .map(|(_, f)| f.clone())
                .unwrap_or_default(),
            admin: AdminConfig {
                token: Some(token.clone()),
                fault_commands: plan.fault_commands,
                ..Default::default()
            },
            log: plan.log.clone(),
            watchdog: plan.watchdog.clone(),
            log_forward: plan.log_forward.clone(),
            // One SQLite file shared by every node of the local cluster.
            store: match plan.store.backend {
                orrery_store::BackendKind::Sqlite => orrery_store::StoreConfig {
                    path: Some(store_path.clone()),
                    ..plan.store.clone()
                },
                orrery_store::BackendKind::Postgres => plan.store.clone(),
            },
            app: plan.app.clone(),
            nodes: nodes.clone(),
        };
        cfg.validate()?;
        std::fs::write(
            Manifest::node_config_path(&plan.data_dir, n.id),
            toml::to_string(&cfg)?,
        )?;
    }
    std::fs::write(Manifest::path(&plan.data_dir), toml::to_string(&manifest)?)?;
    Ok(manifest)
}

/// Runs the universe on every node of the plan (`[app.universe]`).
pub fn with_universe(plan: &mut Plan, cfg: &orrery_universe::UniverseConfig) -> Result<()> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    let value = toml::Value::try_from(cfg).context("encode the universe config")?;
    plan.app.insert("universe".into(), value);
    Ok(())
}

/// The universe settings node 1 of a local cluster runs with.
pub fn universe_config(data_dir: &Path) -> Result<orrery_universe::UniverseConfig> {
    let cfg = NodeConfig::load(&Manifest::node_config_path(data_dir, 1))?;
    match cfg.app.get("universe") {
        Some(v) => Ok(v.clone().try_into().context("[app.universe]")?),
        None => bail!("{} does not run the universe", data_dir.display()),
    }
}

/// Writes a file only its owner may read (the admin token).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Talks to a local cluster's admin endpoints.
pub struct AdminClient {
    agent: ureq::Agent,
}

impl Default for AdminClient {
    fn default() -> Self {
        AdminClient {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_millis(1500))
                .build(),
        }
    }
}

impl AdminClient {
    pub fn node_shards(&self, admin_addr: &str) -> Result<orrery_node::shards::HostedShards> {
        Ok(self
            .agent
            .get(&format!("http://{admin_addr}/shards"))
            .call()?
            .into_json()?)
    }

    pub fn node_status(&self, admin_addr: &str) -> Result<NodeStatus> {
        Ok(self
            .agent
            .get(&format!("http://{admin_addr}/status"))
            .call()?
            .into_json()?)
    }

    /// The replicated state, from the first node that can read it.
    pub fn cluster_state(&self, manifest: &Manifest) -> Result<ClusterState> {
        let mut last = None;
        for (_, addr) in manifest.admin_addrs() {
            match self.agent.get(&format!("http://{addr}/cluster")).call() {
                Ok(r) => return Ok(r.into_json()?),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(anyhow::anyhow!("no node could read the cluster state: {e}")),
            None => bail!("the manifest lists no nodes"),
        }
    }
}

/// Is the start-up of processes launched at `launched_ms` done: cluster at
/// 0, and every participant rejoined since the launch and reported 0?
pub fn is_ready(state: &ClusterState, launched_ms: u64) -> bool {
    state.stage == Stage::READY
        && state.laggards(Stage::READY).is_empty()
        && state.members.values().all(|m| {
            m.status != orrery_core::MemberStatus::Active
                || m.report
                    .completed_at
                    .get(&Stage::RUNNING.number())
                    .is_some_and(|t| *t >= launched_ms)
        })
}

/// The `orrery status` table.
pub fn render_status(
    state: &ClusterState,
    nodes: &[(NodeId, Option<NodeStatus>)],
    now_ms: u64,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = state
        .leader
        .map(|l| l.to_string())
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "cluster: start-up {} at stage {} ({}), coordinator node {leader}, state version {}",
        state.boot,
        state.stage,
        state.stage.name(),
        state.applied_index
    );
    let mut timings = vec![];
    let mut prev = state.boot_started_at;
    for s in Stage::ALL {
        if let Some(at) = state.stage_reached_at.get(&s.number()) {
            timings.push(format!("{s}: {} ms", at.saturating_sub(prev)));
            prev = *at;
        }
    }
    let total = state
        .stage_reached_at
        .get(&0)
        .map(|at| format!(" (total {} ms)", at.saturating_sub(state.boot_started_at)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "stage timings: {}{total}",
        if timings.is_empty() {
            "-".into()
        } else {
            timings.join(", ")
        }
    );
    let cut: Vec<String> = state
        .members
        .iter()
        .filter(|(_, m)| !m.report.unreachable.is_empty())
        .map(|(id, m)| format!("{id} cannot reach {:?}", m.report.unreachable))
        .collect();
    if !cut.is_empty() {
        let _ = writeln!(out, "connectivity (stage -3): {}", cut.join("; "));
    }
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<7} {:<6} {:<6} {:>10}  WAITING ON",
        "NODE", "ADDRESS", "ROLE", "EPOCH", "STAGE", "IN STAGE"
    );
    for (id, m) in &state.members {
        let spec = state.config.nodes.get(id);
        let live = nodes
            .iter()
            .find(|(n, _)| n == id)
            .and_then(|(_, s)| s.as_ref());
        let since = m.report.completed_at.get(&m.report.stage.number()).copied();
        let in_stage = since
            .map(|t| format!("{:.1}s", now_ms.saturating_sub(t) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let waiting = match (&m.status, &m.report.waiting, live) {
            (orrery_core::MemberStatus::Excluded { reason, .. }, _, _) => {
                format!("EXCLUDED: {reason}")
            }
            (orrery_core::MemberStatus::Removed { reason, .. }, _, _) => {
                format!("REMOVED: {reason}")
            }
            (_, _, _) if !m.health.healthy => format!(
                "IMPAIRED: {}",
                m.health.reason.as_deref().unwrap_or("self-checks failing")
            ),
            (_, _, None) if !nodes.is_empty() && m.report.stage != Stage::NOT_STARTED => {
                "not answering".into()
            }
            (_, Some(w), _) => {
                let mut s = format!(
                    "{w} for {:.1}s",
                    now_ms.saturating_sub(w.since) as f64 / 1000.0
                );
                if let Some(p) = m.report.progress {
                    s.push_str(&format!(" [{}/{}]", p.done, p.total));
                }
                s
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<7} {:<6} {:<6} {:>10}  {}",
            id,
            spec.map(|s| s.addr.as_str()).unwrap_or("?"),
            spec.map(|s| s.role.to_string()).unwrap_or_default(),
            m.epoch,
            m.report.stage.to_string(),
            in_stage,
            waiting
        );
    }
    out
}

/// The last `n` events of the replicated event list, oldest first, as lines
/// an engineer would put in a post-mortem timeline.
pub fn render_events(state: &ClusterState, n: usize, now_ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let skip = state.events.len().saturating_sub(n);
    for e in state.events.iter().skip(skip) {
        let ago = now_ms.saturating_sub(e.at) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "{ago:>9.1}s ago  {:<17} {}",
            format!("{:?}", e.kind),
            e.detail
        );
    }
    out
}

/// The `orrery status --shards` table: per node, shards the replicated map
/// assigns it, what it has loaded, moves still loading, and the map version
/// it routes by.
pub fn render_shards(
    state: &ClusterState,
    hosted: &[(NodeId, Option<orrery_node::shards::HostedShards>)],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let load = state.shards.load();
    let _ = writeln!(
        out,
        "shard map version {}: {} shards of {} kind(s) ({})",
        state.shards.version,
        state.shards.shard_count(),
        state.shards.kinds.len(),
        state
            .shards
            .kinds
            .iter()
            .map(|k| format!("{} x{}", k.name, k.keys.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "{:<5} {:>8} {:>8} {:>8} {:>8}",
        "NODE", "ASSIGNED", "LOADED", "LOADING", "MAP VER"
    );
    for (id, h) in hosted {
        let assigned = load.get(id).copied().unwrap_or(0);
        match h {
            Some(h) => {
                let _ = writeln!(
                    out,
                    "{:<5} {:>8} {:>8} {:>8} {:>8}",
                    id, assigned, h.loaded, h.loading, h.map_version
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:<5} {:>8} {:>8} {:>8} {:>8}",
                    id, assigned, "-", "-", "-"
                );
            }
        }
    }
    out
}
