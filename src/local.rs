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
use orrery_node::private::private_dir;
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
    /// Every node's runtime threads (`Plan::new`: one worker per node once
    /// the nodes outnumber the cores 16 to 1).
    pub runtime: orrery_node::config::RuntimeConfig,
    /// Where every node forwards its warnings.
    pub log_forward: ForwardConfig,
    /// When every node calls its control plane stuck (`[quorum]`).
    pub quorum: orrery_node::quorum::QuorumConfig,
    /// The `[store]` of every node; `path` is always `DATA_DIR/store.db`,
    /// one SQLite file shared by the whole local cluster.
    pub store: orrery_store::StoreConfig,
    /// Application sections of every node (`[app.universe]`).
    pub app: toml::Table,
    /// What SIGTERM does on every node (`[shutdown]`: drain and leave bounds).
    pub shutdown: orrery_node::config::ShutdownConfig,
    /// The scheduled backup of every node (`[backup]`; off by default).
    pub backup: orrery_node::backup::BackupConfig,
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
            runtime: local_runtime(nodes),
            log_forward: ForwardConfig {
                collector: Some(1),
                ..Default::default()
            },
            quorum: Default::default(),
            store: orrery_store::StoreConfig::default(),
            app: toml::Table::new(),
            shutdown: Default::default(),
            backup: Default::default(),
        }
    }
}

/// Runtime threads for each of `nodes` node processes sharing this machine:
/// the defaults while they are few; one worker each (and fewer blocking
/// threads) once they outnumber the cores 16 to 1, when more threads per
/// process only add wake-ups between them, with the non-voters niced
/// (`RuntimeConfig::nice`).
fn local_runtime(nodes: u64) -> orrery_node::config::RuntimeConfig {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut rt = orrery_node::config::RuntimeConfig::default();
    if nodes > 16 * cores {
        rt.worker_threads = 1;
        rt.max_blocking_threads = 8;
        rt.nice = 10;
    }
    rt
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
    /// The cluster's CA (its key signs node certificates): `data_dir/ca`.
    pub fn ca_path(data_dir: &Path) -> PathBuf {
        data_dir.join("ca")
    }

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

/// `n` random bytes from the OS, as hex.
fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_secret() -> String {
    random_hex(24)
}

/// A fresh cluster id: random, drawn apart from the secret (the id is sent
/// in the clear in every handshake, so it must say nothing about the secret).
fn random_cluster_id() -> String {
    format!("orrery-local-{}", random_hex(8))
}

/// Narrows an existing local cluster's layout to the private modes: the
/// data directory and every node directory 0700, every file that holds a
/// secret or a key (node.toml, admin.token, the shared store) 0600.
pub fn harden(data_dir: &Path, manifest: &Manifest) -> Result<()> {
    let ctx = |p: &Path| format!("cannot restrict {}", p.display());
    private_dir(data_dir).with_context(|| ctx(data_dir))?;
    let store = Manifest::store_path(data_dir);
    let mut files = vec![
        Manifest::path(data_dir),
        Manifest::token_path(data_dir),
        store.with_extension("db-wal"),
        store.with_extension("db-shm"),
        store,
    ];
    for n in &manifest.nodes {
        let dir = data_dir.join(format!("node-{}", n.id));
        private_dir(&dir).with_context(|| ctx(&dir))?;
        files.push(Manifest::node_config_path(data_dir, n.id));
    }
    for f in files {
        orrery_node::private::restrict_file(&f).with_context(|| ctx(&f))?;
    }
    Ok(())
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
    private_dir(&plan.data_dir)
        .with_context(|| format!("cannot create {}", plan.data_dir.display()))?;
    if Manifest::path(&plan.data_dir).exists() {
        let m = Manifest::load(&plan.data_dir)?;
        if m.nodes.len() as u64 == plan.nodes {
            harden(&plan.data_dir, &m)?;
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
        cluster_id: random_cluster_id(),
        nodes: nodes.clone(),
    };
    let shared = Shared {
        cluster_id: manifest.cluster_id.clone(),
        secret,
        token,
        store_path: Manifest::store_path(&plan.data_dir.canonicalize()?),
        nodes: nodes.clone(),
    };
    let ca_dir = Manifest::ca_path(&plan.data_dir);
    crate::ca::init(&ca_dir, &manifest.cluster_id)?;
    for n in &nodes {
        let dir = plan.data_dir.join(format!("node-{}", n.id));
        private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let cfg = node_config(plan, n, &shared, dir.canonicalize()?);
        cfg.validate()?;
        crate::ca::issue(&ca_dir, n.id, n.role, &cfg.tls_dir())?;
        // The secret and the admin token are inside: 0600.
        write_private(
            &Manifest::node_config_path(&plan.data_dir, n.id),
            &toml::to_string(&cfg)?,
        )?;
    }
    write_private(
        &Manifest::path(&plan.data_dir),
        &toml::to_string(&manifest)?,
    )?;
    Ok(manifest)
}

/// What every node of a local cluster shares.
struct Shared {
    cluster_id: String,
    secret: String,
    token: String,
    store_path: PathBuf,
    nodes: Vec<NodeEntry>,
}

/// Node `n`'s configuration file in a local cluster laid out by `plan`.
fn node_config(plan: &Plan, n: &NodeEntry, shared: &Shared, data_dir: PathBuf) -> NodeConfig {
    NodeConfig {
        node_id: n.id,
        cluster_id: shared.cluster_id.clone(),
        secret: shared.secret.clone(),
        data_dir,
        listen: None,
        admin_listen: None,
        startup: StartupConfig {
            stage_deadline_ms: plan.stage_deadline_ms,
            stuck_policy: plan.stuck_policy,
            ..Default::default()
        },
        raft: RaftTiming::default(),
        rpc: RpcConfig::default(),
        tls: Default::default(),
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
            token: Some(shared.token.clone()),
            fault_commands: plan.fault_commands,
            ..Default::default()
        },
        log: plan.log.clone(),
        watchdog: plan.watchdog.clone(),
        runtime: orrery_node::config::RuntimeConfig {
            // The control plane outranks the workers on a shared machine.
            nice: if n.role.is_voter() {
                0
            } else {
                plan.runtime.nice
            },
            ..plan.runtime.clone()
        },
        quorum: plan.quorum.clone(),
        log_forward: plan.log_forward.clone(),
        // One SQLite file shared by every node of the local cluster.
        store: match plan.store.backend {
            orrery_store::BackendKind::Sqlite => orrery_store::StoreConfig {
                path: Some(shared.store_path.clone()),
                ..plan.store.clone()
            },
            orrery_store::BackendKind::Postgres => plan.store.clone(),
        },
        app: plan.app.clone(),
        shutdown: plan.shutdown.clone(),
        resources: Default::default(),
        drills: Default::default(),
        backup: plan.backup.clone(),
        nodes: shared.nodes.clone(),
    }
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

/// `orrery stop --node N`: asks node `node` of the local cluster in
/// `data_dir` to leave (SIGTERM to the process holding its `node.lock`: it
/// drains, commits its `Leave` and exits) and waits until it has exited,
/// at most `within`. Returns its pid. (The front door, not decision logic:
/// it waits on the wall clock.)
#[allow(clippy::disallowed_methods)]
pub fn stop_node(data_dir: &Path, node: NodeId, within: std::time::Duration) -> Result<u32> {
    let lock = node_lock_path(&data_dir.join(format!("node-{node}")));
    let Some(held) = DirLock::holder(&lock)? else {
        bail!(
            "node {node} is not running: no process holds {}",
            lock.display()
        );
    };
    let pid = held
        .pid
        .with_context(|| format!("{} names no pid", lock.display()))?;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("run kill")?;
    anyhow::ensure!(st.success(), "kill -TERM {pid} failed");
    let deadline = std::time::Instant::now() + within;
    while DirLock::holder(&lock)?.is_some() {
        if std::time::Instant::now() >= deadline {
            bail!("node {node} (pid {pid}) still runs {within:?} after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(pid)
}

/// An exclusive `flock` on a file, held as long as this value lives (the
/// kernel releases it when the process dies, however it dies): `orrery up`
/// holds `DATA_DIR/up.lock`, every `orrery node` its data directory's
/// `node.lock`. The file says who holds it (`pid N`, `admin ADDR`).
#[derive(Debug)]
pub struct DirLock {
    file: std::fs::File,
    path: PathBuf,
}

/// A lock somebody else holds, with what its holder wrote in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub path: PathBuf,
    pub pid: Option<u32>,
    pub admin: Option<String>,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(p) => write!(f, "pid {p}")?,
            None => write!(f, "pid unknown")?,
        }
        if let Some(a) = &self.admin {
            write!(f, ", admin {a}")?;
        }
        Ok(())
    }
}

impl DirLock {
    /// Takes the lock on `path` without waiting; `Ok(Err(held))` when
    /// another process holds it.
    pub fn acquire(path: &Path) -> Result<std::result::Result<DirLock, Held>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Ok(DirLock {
                file,
                path: path.to_owned(),
            })),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(Err(Held::read(path))),
            Err(e) => Err(std::io::Error::from(e))
                .with_context(|| format!("cannot lock {}", path.display())),
        }
    }

    /// Whether another process holds the lock on `path` (a missing file:
    /// nobody). Takes and drops the lock when it is free.
    pub fn holder(path: &Path) -> Result<Option<Held>> {
        if !path.exists() {
            return Ok(None);
        }
        Ok(DirLock::acquire(path)?.err())
    }

    /// Says who holds the lock: this process, and its admin address.
    pub fn describe(&self, admin: Option<&str>) -> Result<()> {
        use std::io::{Seek, Write};
        let mut text = format!("pid {}\n", std::process::id());
        if let Some(a) = admin {
            text.push_str(&format!("admin {a}\n"));
        }
        let mut f = &self.file;
        f.set_len(0)
            .and_then(|_| f.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| f.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Held {
    fn read(path: &Path) -> Held {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        Held {
            path: path.to_owned(),
            pid: field("pid ").and_then(|p| p.parse().ok()),
            admin: field("admin "),
        }
    }
}

/// The lock `orrery up` holds on its data directory.
pub fn up_lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("up.lock")
}

/// The lock an `orrery node` process holds on its own data directory.
pub fn node_lock_path(node_data_dir: &Path) -> PathBuf {
    node_data_dir.join("node.lock")
}

/// Takes `orrery up`'s lock on `data_dir` (creating the directory), or
/// refuses at once if the directory is in use: by another `orrery up`, or
/// by any node process running on one of its node directories (started by
/// hand or by a harness).
pub fn lock_for_up(data_dir: &Path) -> Result<DirLock> {
    private_dir(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let lock = match DirLock::acquire(&up_lock_path(data_dir))? {
        Ok(l) => l,
        Err(held) => bail!(
            "a cluster is already running on {}: {held} (`orrery up`); stop it first, or use another --data-dir",
            data_dir.display()
        ),
    };
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir)
        .with_context(|| format!("cannot read {}", data_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("node-")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    dirs.sort();
    for (id, dir) in dirs {
        if let Some(held) = DirLock::holder(&node_lock_path(&dir))? {
            bail!(
                "a cluster is already running on {}: {held} (node {id}); stop it first, or use another --data-dir",
                data_dir.display()
            );
        }
    }
    lock.describe(None)?;
    Ok(lock)
}

/// Takes the lock of a node's own data directory, or refuses at once: two
/// processes on one Raft store would corrupt it.
pub fn lock_for_node(node: NodeId, node_data_dir: &Path, admin: &str) -> Result<DirLock> {
    private_dir(node_data_dir)
        .with_context(|| format!("cannot create {}", node_data_dir.display()))?;
    match DirLock::acquire(&node_lock_path(node_data_dir))? {
        Ok(l) => {
            l.describe(Some(admin))?;
            Ok(l)
        }
        Err(held) => bail!(
            "node {node}'s data directory {} is in use by another process: {held}",
            node_data_dir.display()
        ),
    }
}

/// The lines of a node's log that say why it stopped: its last error
/// report (the binary's `error: ...` with its `caused by:` lines, a logged
/// `ERROR`, a panic) and what follows it, at most `max` lines; without
/// one, the last line naming an error, else the last `max` lines.
pub fn log_reason(log: &str, max: usize) -> Vec<String> {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let report = |l: &str| {
        let t = l.trim_start().to_ascii_lowercase();
        t.starts_with("error") || l.contains(" ERROR ") || t.contains("panicked at")
    };
    let start = lines
        .iter()
        .rposition(|l| report(l))
        .or_else(|| {
            lines
                .iter()
                .rposition(|l| l.to_ascii_lowercase().contains("error"))
        })
        .unwrap_or(lines.len().saturating_sub(max));
    lines[start..]
        .iter()
        .take(max)
        .map(|l| l.to_string())
        .collect()
}

/// Writes a file only its owner may read (node.toml, admin.token).
fn write_private(path: &Path, text: &str) -> Result<()> {
    orrery_node::private::write_private(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
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

    /// Every node's own status, in manifest order (`None`: no answer).
    pub fn node_statuses(&self, manifest: &Manifest) -> Vec<(NodeId, Option<NodeStatus>)> {
        manifest
            .admin_addrs()
            .into_iter()
            .map(|(id, addr)| (id, self.node_status(&addr).ok()))
            .collect()
    }

    /// The replicated state, from the first node that can read it.
    pub fn cluster_state(&self, manifest: &Manifest) -> Result<ClusterState> {
        // A node's own answer (why it could not read it) says more than a
        // refused connection.
        let (mut answered, mut failed) = (None, None);
        for (id, addr) in manifest.admin_addrs() {
            match self.agent.get(&format!("http://{addr}/cluster")).call() {
                Ok(r) => return Ok(r.into_json()?),
                Err(ureq::Error::Status(code, r)) => {
                    let why = r
                        .into_json::<orrery_node::admin::ConsoleAnswer>()
                        .ok()
                        .and_then(|a| a.error)
                        .unwrap_or_else(|| format!("status code {code}"));
                    answered = Some(format!("node {id}: {why}"));
                }
                Err(e) => failed = Some(format!("node {id}: {e}")),
            }
        }
        match answered.or(failed) {
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

/// The "no quorum" lines the nodes report, one per distinct text, with the
/// nodes that report it: the first thing `orrery status` prints.
pub fn quorum_lines(nodes: &[(NodeId, Option<NodeStatus>)]) -> Vec<String> {
    let mut by_text: Vec<(String, Vec<NodeId>)> = vec![];
    for (id, st) in nodes {
        let Some(nq) = st.as_ref().and_then(|s| s.no_quorum.as_ref()) else {
            continue;
        };
        let text = nq.to_string();
        match by_text.iter_mut().find(|(t, _)| *t == text) {
            Some((_, ids)) => ids.push(*id),
            None => by_text.push((text, vec![*id])),
        }
    }
    by_text
        .into_iter()
        .map(|(text, ids)| {
            let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            let who = if ids.len() == 1 { "node" } else { "nodes" };
            format!("{text} [{who} {}]", ids.join(", "))
        })
        .collect()
}

/// The alarms in force on every node that answered, critical first, as a
/// table; and whether one is critical and not acknowledged.
pub fn render_alarms(nodes: &[(NodeId, Option<NodeStatus>)], now_ms: u64) -> (String, bool) {
    use orrery_node::alarms::{unacked_critical, Severity};
    use std::fmt::Write;
    let mut all: Vec<&orrery_node::alarms::ActiveAlarm> = nodes
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .flat_map(|s| s.alarms.iter())
        .collect();
    all.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.first_seen_ms.cmp(&b.first_seen_ms))
    });
    let mut out = String::new();
    if all.is_empty() {
        return (out, false);
    }
    let _ = writeln!(
        out,
        "{:<9} {:<5} {:<22} {:>9} {:>9} {:<4} WHAT",
        "SEVERITY", "NODE", "ALARM", "FOR", "SEEN", "ACK"
    );
    for a in &all {
        let ago = |t: u64| format!("{:.0}s", now_ms.saturating_sub(t) as f64 / 1000.0);
        let sev = match a.severity {
            Severity::Critical => "CRITICAL",
            Severity::Warning => "warning",
        };
        let _ = writeln!(
            out,
            "{sev:<9} {:<5} {:<22} {:>9} {:>9} {:<4} {}",
            a.node,
            a.name(),
            ago(a.first_seen_ms),
            ago(a.last_seen_ms),
            if a.acked { "yes" } else { "no" },
            a.what
        );
    }
    (out, unacked_critical(all))
}

/// A line when the nodes that answered run different binaries or speak
/// different protocol ranges (a roll half done, a forgotten node).
pub fn version_lines(nodes: &[(NodeId, Option<NodeStatus>)]) -> Vec<String> {
    let mut by: std::collections::BTreeMap<(String, (u16, u16)), Vec<String>> =
        std::collections::BTreeMap::new();
    for (id, st) in nodes {
        if let Some(st) = st {
            by.entry((st.version.clone(), st.protocol))
                .or_default()
                .push(id.to_string());
        }
    }
    if by.len() < 2 {
        return vec![];
    }
    let parts: Vec<String> = by
        .iter()
        .map(|((v, (lo, hi)), ids)| {
            format!("{v} (protocol {lo}..={hi}) on nodes {}", ids.join(", "))
        })
        .collect();
    vec![format!("version skew: {}", parts.join("; "))]
}

/// One line per resource past a threshold, on any node that answered
/// (disk space, store sizes, descriptors: `orrery_node::resources`).
pub fn resource_lines(nodes: &[(NodeId, Option<NodeStatus>)]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|(_, st)| st.as_ref())
        .flat_map(|st| st.resources.iter())
        .map(|f| {
            let level = match f.level {
                orrery_node::resources::Level::Warning => "warning",
                orrery_node::resources::Level::Critical => "CRITICAL",
            };
            format!("resource {level}: {}", f.text)
        })
        .collect()
}

/// `orrery status` when no node could read the replicated state (no
/// quorum, or no voter up): the node table from what each node reports
/// about itself, under the nodes' "no quorum" lines.
pub fn render_nodes(
    manifest: &Manifest,
    nodes: &[(NodeId, Option<NodeStatus>)],
    why: &str,
    now_ms: u64,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let lines = quorum_lines(nodes)
        .into_iter()
        .chain(resource_lines(nodes))
        .chain(version_lines(nodes));
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "cluster state unavailable ({why}); each node as it reports itself:"
    );
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<7} {:<6} {:<6} {:>10}  {:<16} STATE",
        "NODE", "ADDRESS", "ROLE", "EPOCH", "STAGE", "IN STAGE", "LEADER"
    );
    for n in &manifest.nodes {
        let st = nodes
            .iter()
            .find(|(id, _)| *id == n.id)
            .and_then(|(_, s)| s.as_ref());
        let Some(st) = st else {
            let _ = writeln!(
                out,
                "{:<5} {:<22} {:<7} {:<6} {:<6} {:>10}  {:<16} not answering",
                n.id,
                n.addr,
                n.role.to_string(),
                "-",
                "-",
                "-",
                "-"
            );
            continue;
        };
        let leader = match (&st.no_quorum, st.leader) {
            (Some(_), _) => "none (no quorum)".to_string(),
            (None, Some(l)) => l.to_string(),
            (None, None) => "none".to_string(),
        };
        let in_stage = format!(
            "{:.1}s",
            now_ms.saturating_sub(st.stage_since_ms) as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<7} {:<6} {:<6} {:>10}  {:<16} {}",
            n.id,
            n.addr,
            n.role.to_string(),
            st.epoch,
            st.stage,
            in_stage,
            leader,
            node_state(st)
        );
    }
    out
}

/// One node's own verdict, for the STATE column.
fn node_state(st: &NodeStatus) -> String {
    let mut s = if st.serving {
        "serving".to_string()
    } else {
        "not serving".to_string()
    };
    if let Some(f) = &st.fenced {
        s.push_str(&format!("; fenced: {f}"));
    }
    if let Some(d) = &st.voter_down {
        s.push_str(&format!("; VOTER DOWN: {d}"));
    }
    if let Some(w) = &st.waiting {
        s.push_str(&format!("; waiting: {w}"));
    }
    if let Some(a) = st.control_alarms.last() {
        s.push_str(&format!("; alarm: {}", a.what));
    }
    s
}

/// The `orrery status` table.
pub fn render_status(
    state: &ClusterState,
    nodes: &[(NodeId, Option<NodeStatus>)],
    now_ms: u64,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let lines = quorum_lines(nodes)
        .into_iter()
        .chain(resource_lines(nodes))
        .chain(version_lines(nodes));
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
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
    for (id, m) in state.members.iter() {
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
            (orrery_core::MemberStatus::Left { .. }, _, _) => {
                "LEFT: stopped by its operator; rejoins when restarted".into()
            }
            (_, _, Some(st)) if st.voter_down.is_some() => format!(
                "VOTER DOWN: {}",
                st.voter_down.as_deref().unwrap_or_default()
            ),
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    }

    /// Every file of the layout that holds a secret, and every directory.
    fn check_private(dir: &Path, m: &Manifest) {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        for f in [Manifest::path(dir), Manifest::token_path(dir)] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        for n in &m.nodes {
            let d = dir.join(format!("node-{}", n.id));
            assert_eq!(mode(&d), 0o700, "{}", d.display());
            let cfg = Manifest::node_config_path(dir, n.id);
            assert_eq!(mode(&cfg), 0o600, "{}", cfg.display());
        }
    }

    #[test]
    fn the_layout_is_private_and_the_cluster_id_is_not_the_secret() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cluster");
        let m = prepare(&Plan::new(4, 3, &dir)).unwrap();
        check_private(&dir, &m);
        let cfg = NodeConfig::load(&Manifest::node_config_path(&dir, 1)).unwrap();
        assert_eq!(cfg.cluster_id, m.cluster_id);
        let id_part = m.cluster_id.trim_start_matches("orrery-local-");
        assert_eq!(id_part.len(), 16, "{}", m.cluster_id);
        assert!(
            !cfg.secret.contains(id_part) && !id_part.contains(&cfg.secret[..8]),
            "cluster id {} derives from the secret",
            m.cluster_id
        );
        // Another cluster: another id, drawn afresh.
        let other = prepare(&Plan::new(4, 3, t.path().join("other"))).unwrap();
        assert_ne!(other.cluster_id, m.cluster_id);
        // A layout left wide open by an older version is narrowed on reuse.
        for p in [dir.clone(), dir.join("node-2")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [
            Manifest::token_path(&dir),
            Manifest::node_config_path(&dir, 3),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let again = prepare(&Plan::new(4, 3, &dir)).unwrap();
        assert_eq!(again.cluster_id, m.cluster_id);
        check_private(&dir, &again);
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn nodes_on_different_binaries_or_protocols_are_called_version_skew() {
        let st = |v: &str, p: (u16, u16)| {
            Some(NodeStatus {
                version: v.into(),
                protocol: p,
                ..Default::default()
            })
        };
        let same = vec![
            (1, st("0.1.0", (1, 1))),
            (2, st("0.1.0", (1, 1))),
            (3, None),
        ];
        assert!(version_lines(&same).is_empty());
        let skew = vec![
            (1, st("0.1.0", (1, 1))),
            (2, st("0.2.0", (1, 2))),
            (3, st("0.1.0", (1, 1))),
        ];
        let l = version_lines(&skew);
        assert_eq!(l.len(), 1);
        assert!(
            l[0].contains("0.1.0 (protocol 1..=1) on nodes 1, 3"),
            "{}",
            l[0]
        );
        assert!(
            l[0].contains("0.2.0 (protocol 1..=2) on nodes 2"),
            "{}",
            l[0]
        );
    }

    #[test]
    fn a_node_log_gives_its_last_error_report() {
        let log = "2026-01-01T00:00:00.000Z  INFO orrery::node: node listening\n\
                   2026-01-01T00:00:01.000Z  WARN orrery::node: a warning, no error here\n\
                   error: cannot listen on admin address 127.0.0.1:9\n\
                   \x20 caused by: Address already in use (os error 98)\n";
        let r = log_reason(log, 12);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("error: cannot listen"));
        assert!(r[1].contains("Address already in use"));
        // A cause without the word "error" still comes with its report.
        let r = log_reason("INFO start\nError: bad config\n  caused by: line 3\n", 12);
        assert_eq!(r, vec!["Error: bad config", "  caused by: line 3"]);
        // No error at all: the tail.
        let r = log_reason("a\nb\nc\n", 2);
        assert_eq!(r, vec!["b", "c"]);
        assert!(log_reason("", 3).is_empty());
    }

    #[test]
    fn a_held_lock_names_its_holder_and_a_free_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        assert_eq!(DirLock::holder(&path).unwrap(), None, "no file: nobody");
        let held = DirLock::acquire(&path).unwrap().unwrap();
        held.describe(Some("127.0.0.1:7")).unwrap();
        // flock is per open file: a second open in this process is refused too.
        let other = DirLock::acquire(&path).unwrap().unwrap_err();
        assert_eq!(other.pid, Some(std::process::id()));
        assert_eq!(other.admin.as_deref(), Some("127.0.0.1:7"));
        assert_eq!(
            other.to_string(),
            format!("pid {}, admin 127.0.0.1:7", std::process::id())
        );
        let up = lock_for_up(dir.path()).unwrap();
        let e = lock_for_up(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("already running") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(up);
        // A node directory in use refuses `up` too, naming the node.
        let node_dir = dir.path().join("node-2");
        let node = lock_for_node(2, &node_dir, "127.0.0.1:8").unwrap();
        let e = lock_for_up(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("(node 2)") && e.contains("admin 127.0.0.1:8"),
            "{e}"
        );
        let e = lock_for_node(2, &node_dir, "127.0.0.1:8")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use by another process"), "{e}");
        drop((node, held));
        assert!(lock_for_up(dir.path()).is_ok());
    }
}
