//! `orrery roll` (a monitored rolling restart or upgrade of a local cluster)
//! and `orrery start` (start one stopped node, detached).
//!
//! It owns the decisions of a roll as pure functions of what the nodes
//! report: whether the cluster is healthy ([`unhealthy`]), the order and
//! batches and whether stopping a batch would lose quorum ([`plan`],
//! [`keeps_quorum`]), and whether a restarted batch is back and the whole
//! cluster has stayed healthy long enough ([`Watch`]); and a thin shell
//! ([`Observer`]) that polls the nodes, stops and starts their processes
//! and records the roll in the timeline. It must never stop a node while
//! doing so would lose quorum, never proceed past a node that is not
//! healthy, and never wait without a bound.
#![allow(clippy::disallowed_methods)] // The shell measures real time; verdicts take it as an argument.

use crate::exec;
use crate::local::{self, AdminClient, DirLock, Manifest};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use orrery_core::{ClusterState, Epoch, MemberStatus, NodeId};
use orrery_node::config::NodeEntry;
use orrery_node::health::HealthState;
use orrery_node::shards::HostedShards;
use orrery_node::NodeStatus;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `orrery roll`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct RollArgs {
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Upgrade: every node restarts on this binary (each node's previous
    /// binary is kept for --rollback-on-failure).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Nodes restarted together (workers and voters never share a batch).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// How long the whole cluster must stay healthy after a batch is back
    /// before the next batch stops.
    #[arg(long, default_value_t = 5_000)]
    pub stable_ms: u64,
    /// How long a restarted batch gets to be back and stable.
    #[arg(long, default_value_t = 120)]
    pub node_timeout_s: u64,
    /// How long a node gets to leave and exit when stopped.
    #[arg(long, default_value_t = 15)]
    pub stop_timeout_s: u64,
    /// On a failed health check, restart the failed batch on its previous
    /// binary and wait (--node-timeout-s) for it to be healthy again.
    #[arg(long)]
    pub rollback_on_failure: bool,
    /// Admin token for the timeline records (else ORRERY_ADMIN_TOKEN, else
    /// DATA_DIR/admin.token).
    #[arg(long)]
    pub token: Option<String>,
    /// How often the nodes are polled, in ms.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
}

/// `orrery start`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct StartArgs {
    #[arg(long)]
    pub node: NodeId,
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Run (and from now on record for this node) this binary.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// How long to wait for the process to take its data directory.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// One node as a roll sees it: its row of the replicated state and its own
/// reports (`/status`, `/shards`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeObs {
    pub id: NodeId,
    pub voter: bool,
    /// Hosts services (not an arbiter): must have its shards loaded.
    pub hosts: bool,
    /// A process runs for it.
    pub running: bool,
    /// The process the roll started exited, and how.
    pub exited: Option<String>,
    /// Its current epoch (replicated; its own report without a state).
    pub epoch: Epoch,
    /// Why it is not an active member (left, removed, excluded, unknown).
    pub inactive: Option<String>,
    /// Last stage it completed (replicated).
    pub stage: i8,
    pub impaired: Option<String>,
    pub draining: bool,
    /// Shards the replicated map assigns it.
    pub owned: usize,
    /// Answered `/status`.
    pub answering: bool,
    pub is_leader: bool,
    pub serving: bool,
    pub no_quorum: Option<String>,
    pub leaving: Option<String>,
    /// It failed a fatal self-check.
    pub fail_stop: Option<String>,
    /// Its own shard report.
    pub shards: Option<ShardCounts>,
}

/// A node's own shard counts (`/shards`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounts {
    pub assigned: usize,
    pub loaded: usize,
    pub loading: usize,
    pub map_version: u64,
}

impl From<&HostedShards> for ShardCounts {
    fn from(h: &HostedShards) -> Self {
        ShardCounts {
            assigned: h.assigned,
            loaded: h.loaded,
            loading: h.loading,
            map_version: h.map_version,
        }
    }
}

/// The whole cluster at one poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterObs {
    pub at_ms: u64,
    /// Why no node could read the replicated state.
    pub state_error: Option<String>,
    pub stage: i8,
    /// The coordinator (Raft leader) of the replicated state.
    pub leader: Option<NodeId>,
    /// Shards in the replicated map.
    pub shard_total: usize,
    pub nodes: Vec<NodeObs>,
}

impl NodeObs {
    /// Why this node is not healthy; `None` when it is.
    pub fn trouble(&self) -> Option<String> {
        let id = self.id;
        let why = if let Some(why) = &self.exited {
            format!("node {id} exited: {why}")
        } else if !self.running {
            format!("node {id} is not running")
        } else if let Some(why) = &self.inactive {
            format!("node {id} {why}")
        } else if !self.answering {
            format!("node {id} does not answer on its admin port")
        } else if let Some(why) = &self.fail_stop {
            format!("node {id} failed a fatal self-check: {why}")
        } else if let Some(why) = &self.leaving {
            format!("node {id} is leaving: {why}")
        } else if self.epoch == 0 {
            format!("node {id} has not joined")
        } else if self.stage != 0 {
            format!("node {id} is at stage {}, not 0", self.stage)
        } else if let Some(why) = &self.impaired {
            format!("node {id} is impaired: {why}")
        } else if let Some(nq) = &self.no_quorum {
            format!("node {id} sees {nq}")
        } else if !self.serving {
            format!("node {id} is not serving")
        } else if self.draining {
            format!("node {id} is draining")
        } else {
            return self.shard_trouble();
        };
        Some(why)
    }

    /// 0: not running or not a member; 1: not answering; 2: anything else.
    fn gone_rank(&self) -> u8 {
        if self.exited.is_some() || !self.running || self.inactive.is_some() {
            0
        } else if !self.answering {
            1
        } else {
            2
        }
    }

    fn shard_trouble(&self) -> Option<String> {
        if !self.hosts {
            return None;
        }
        let id = self.id;
        match &self.shards {
            None => Some(format!("node {id} does not report its shards")),
            Some(h) if h.loading > 0 || h.loaded < h.assigned => Some(format!(
                "node {id} has loaded {} of its {} shards ({} loading)",
                h.loaded, h.assigned, h.loading
            )),
            Some(_) => None,
        }
    }
}

/// Why the cluster is not healthy (not at stage 0, no coordinator, or a
/// node in trouble: the first one); `None` when it is.
pub fn unhealthy(obs: &ClusterObs) -> Option<String> {
    if let Some(e) = &obs.state_error {
        return Some(e.clone());
    }
    if obs.stage != 0 {
        return Some(format!("the cluster is at stage {}, not 0", obs.stage));
    }
    if obs.leader.is_none() {
        return Some("the cluster has no coordinator (no Raft leader)".into());
    }
    // The root cause first: a node that is gone, before those that suffer
    // from it (a voter down leaves the others briefly not serving).
    obs.nodes
        .iter()
        .filter_map(|n| n.trouble().map(|t| (n.gone_rank(), t)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, t)| t)
}

/// Whether stopping `batch` still leaves a quorum of healthy voters; `Err`
/// says why not.
pub fn keeps_quorum(obs: &ClusterObs, batch: &[NodeId]) -> Result<(), String> {
    let voters: Vec<&NodeObs> = obs.nodes.iter().filter(|n| n.voter).collect();
    let majority = voters.len() / 2 + 1;
    let left: Vec<String> = voters
        .iter()
        .filter(|n| n.trouble().is_none() && !batch.contains(&n.id))
        .map(|n| n.id.to_string())
        .collect();
    if left.len() >= majority {
        return Ok(());
    }
    let ids: Vec<String> = batch.iter().map(|i| i.to_string()).collect();
    Err(format!(
        "stopping node(s) {} would leave {} healthy voter(s) of {} ({}); a quorum needs {majority}",
        ids.join(", "),
        left.len(),
        voters.len(),
        if left.is_empty() {
            "none".to_string()
        } else {
            format!("node(s) {}", left.join(", "))
        }
    ))
}

/// The batches of a roll, in order: workers first, then voters, the
/// current leader last; `batch` nodes at a time. Refused (with the reason)
/// when the cluster is not healthy or when stopping any batch would lose
/// quorum.
pub fn plan(obs: &ClusterObs, batch: usize) -> Result<Vec<Vec<NodeId>>, String> {
    if batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    if let Some(why) = unhealthy(obs) {
        return Err(format!("the cluster is not healthy: {why}"));
    }
    let leader = obs.leader;
    let mut workers: Vec<NodeId> = obs
        .nodes
        .iter()
        .filter(|n| !n.voter)
        .map(|n| n.id)
        .collect();
    let mut voters: Vec<NodeId> = obs
        .nodes
        .iter()
        .filter(|n| n.voter && Some(n.id) != leader)
        .map(|n| n.id)
        .collect();
    workers.sort_unstable();
    voters.sort_unstable();
    voters.extend(leader.filter(|l| obs.nodes.iter().any(|n| n.id == *l && n.voter)));
    let batches: Vec<Vec<NodeId>> = workers
        .chunks(batch)
        .chain(voters.chunks(batch))
        .map(|c| c.to_vec())
        .collect();
    for b in &batches {
        keeps_quorum(obs, b)?;
    }
    Ok(batches)
}

/// What a [`Watch`] concludes from one poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet: what it waits on.
    Waiting(String),
    /// Every node of the batch is back and the cluster was healthy for the
    /// whole stable time.
    Stable,
    /// The health check failed: why.
    Failed(String),
}

/// Watches a restarted batch: each node must come back under a new epoch
/// at stage 0 with its shards loaded, then the whole cluster must stay
/// healthy for `stable_ms` without a break, all within `timeout_ms` of the
/// start. A process that exits or fail-stops fails it at once.
#[derive(Clone, Debug)]
pub struct Watch {
    /// The restarted nodes and the epoch each had before.
    pub nodes: Vec<(NodeId, Epoch)>,
    pub started_ms: u64,
    pub timeout_ms: u64,
    pub stable_ms: u64,
    back: BTreeMap<NodeId, u64>,
    healthy_since: Option<u64>,
    stable_at: Option<u64>,
}

impl Watch {
    pub fn new(
        nodes: Vec<(NodeId, Epoch)>,
        started_ms: u64,
        timeout_ms: u64,
        stable_ms: u64,
    ) -> Self {
        Watch {
            nodes,
            started_ms,
            timeout_ms,
            stable_ms,
            back: BTreeMap::new(),
            healthy_since: None,
            stable_at: None,
        }
    }

    /// When node `id` was first back, in ms after the start.
    pub fn back_after(&self, id: NodeId) -> Option<u64> {
        self.back
            .get(&id)
            .map(|t| t.saturating_sub(self.started_ms))
    }

    /// When the batch was found stable, in ms after the start.
    pub fn stable_after(&self) -> Option<u64> {
        self.stable_at.map(|t| t.saturating_sub(self.started_ms))
    }

    pub fn observe(&mut self, obs: &ClusterObs) -> Verdict {
        let now = obs.at_ms;
        let mut waiting = None;
        for (id, old) in &self.nodes {
            let Some(n) = obs.nodes.iter().find(|n| n.id == *id) else {
                return Verdict::Failed(format!("node {id} is not in the cluster's manifest"));
            };
            if let Some(why) = &n.exited {
                return Verdict::Failed(format!("node {id} exited: {why}"));
            }
            if let Some(why) = &n.fail_stop {
                return Verdict::Failed(format!("node {id} failed a fatal self-check: {why}"));
            }
            match n.trouble() {
                // Back: a new process, and (if it hosts services) shards
                // placed on it again.
                None if n.hosts && n.owned == 0 && obs.shard_total > 0 && n.epoch > *old => {
                    waiting.get_or_insert(format!("node {id} hosts no shards yet"));
                }
                None if n.epoch > *old => {
                    self.back.entry(*id).or_insert(now);
                }
                None => {
                    waiting.get_or_insert(format!("node {id} has not rejoined (epoch {old})"));
                }
                Some(why) => {
                    waiting.get_or_insert(why);
                }
            }
        }
        let why = waiting.or_else(|| unhealthy(obs));
        if let Some(why) = why {
            self.healthy_since = None;
            if now >= self.started_ms + self.timeout_ms {
                return Verdict::Failed(format!(
                    "not healthy within {} s: {why}",
                    self.timeout_ms / 1000
                ));
            }
            return Verdict::Waiting(why);
        }
        let since = *self.healthy_since.get_or_insert(now);
        let held = now.saturating_sub(since);
        if held >= self.stable_ms {
            self.stable_at.get_or_insert(now);
            return Verdict::Stable;
        }
        if now >= self.started_ms + self.timeout_ms {
            return Verdict::Failed(format!(
                "healthy for only {held} ms of --stable-ms {} within {} s",
                self.stable_ms,
                self.timeout_ms / 1000
            ));
        }
        Verdict::Waiting(format!("healthy for {held} of {} ms", self.stable_ms))
    }
}

/// One node's row of the final table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTiming {
    pub id: NodeId,
    pub role: String,
    pub stop_ms: Option<u64>,
    /// From its start until it was back (new epoch, stage 0, shards loaded).
    pub back_ms: Option<u64>,
    /// From its start until the cluster had been healthy for the stable time.
    pub stable_ms: Option<u64>,
    pub result: String,
}

/// The table printed at the end of a roll.
pub fn render_timings(rows: &[NodeTiming]) -> String {
    use std::fmt::Write;
    let ms = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<5} {:<8} {:>8} {:>8} {:>10} {:>9}  RESULT\n",
        "NODE", "ROLE", "STOP ms", "BACK ms", "STABLE ms", "TOTAL ms"
    );
    for r in rows {
        let total = match (r.stop_ms, r.stable_ms) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        let _ = writeln!(
            out,
            "{:<5} {:<8} {:>8} {:>8} {:>10} {:>9}  {}",
            r.id,
            r.role,
            ms(r.stop_ms),
            ms(r.back_ms),
            ms(r.stable_ms),
            ms(total),
            r.result
        );
    }
    out
}

/// Builds one node's row from what was read (pure: the shell reads).
pub fn node_obs(
    n: &NodeEntry,
    state: Option<&ClusterState>,
    st: Option<&NodeStatus>,
    shards: Option<HostedShards>,
    running: bool,
    exited: Option<String>,
) -> NodeObs {
    let member = state.and_then(|s| s.members.get(&n.id));
    let inactive = match (state, member) {
        (None, _) => None,
        (Some(_), None) => Some("is not a member".to_string()),
        (Some(_), Some(m)) => match &m.status {
            MemberStatus::Active => None,
            MemberStatus::Left { .. } => Some("left the cluster".into()),
            MemberStatus::Removed { reason, .. } => Some(format!("was removed: {reason}")),
            MemberStatus::Excluded { reason, .. } => Some(format!("is excluded: {reason}")),
        },
    };
    let own_health = st.and_then(|s| s.health.as_ref()).map(|h| &h.state);
    let fail_stop = match own_health {
        Some(HealthState::FailStop { reasons }) => Some(reasons.join("; ")),
        _ => None,
    };
    let impaired = match (member, own_health) {
        (Some(m), _) if !m.health.healthy => Some(
            m.health
                .reason
                .clone()
                .unwrap_or_else(|| "self-checks failing".into()),
        ),
        (_, Some(HealthState::Impaired { reasons })) => Some(reasons.join("; ")),
        _ => None,
    };
    let shards = shards.as_ref().map(ShardCounts::from);
    NodeObs {
        id: n.id,
        voter: n.role.is_voter(),
        hosts: n.role.hosts_services(),
        running,
        exited,
        epoch: member.map(|m| m.epoch).or(st.map(|s| s.epoch)).unwrap_or(0),
        inactive,
        stage: member
            .map(|m| m.report.stage.number())
            .or(st.map(|s| s.stage))
            .unwrap_or(-5),
        impaired,
        draining: member.is_some_and(|m| m.draining),
        owned: state.map_or(0, |s| {
            s.shards
                .entries
                .values()
                .filter(|e| e.owner == n.id)
                .count()
        }),
        answering: st.is_some(),
        is_leader: st.is_some_and(|s| s.is_leader),
        serving: st.is_some_and(|s| s.serving),
        no_quorum: st.and_then(|s| s.no_quorum.as_ref()).map(|q| q.to_string()),
        leaving: st.and_then(|s| s.leaving.clone()),
        fail_stop,
        shards,
    }
}

/// The file naming the binary node `id` runs (`orrery start`, `orrery
/// roll`); absent: the `orrery` binary that starts it.
pub fn binary_record_path(data_dir: &Path, id: NodeId) -> PathBuf {
    data_dir.join(format!("node-{id}")).join("binary")
}

/// The binary recorded for node `id`, if any.
pub fn recorded_binary(data_dir: &Path, id: NodeId) -> Result<Option<PathBuf>> {
    let p = binary_record_path(data_dir, id);
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(PathBuf::from(t.trim()))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// Records (or, with `None`, forgets) the binary node `id` runs from its
/// next start on.
pub fn record_binary(data_dir: &Path, id: NodeId, binary: Option<&Path>) -> Result<()> {
    let p = binary_record_path(data_dir, id);
    match binary {
        Some(b) => std::fs::write(&p, format!("{}\n", b.display()))
            .with_context(|| format!("cannot write {}", p.display())),
        None => match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", p.display()))
            }
            _ => Ok(()),
        },
    }
}

/// An executable file, as an absolute path; refused with the reason.
pub fn check_binary(path: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let abs = path
        .canonicalize()
        .with_context(|| format!("--binary {}: no such file", path.display()))?;
    let meta = std::fs::metadata(&abs).with_context(|| format!("cannot read {}", abs.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--binary {}: not an executable file", abs.display());
    }
    Ok(abs)
}

/// Starts node `id` of the local cluster in `data_dir` as a detached
/// process (its own process group, output appended to its `node.log`) on
/// its recorded binary, and waits (at most `within`) until it holds its
/// data directory. A process that exits first is an error quoting its log.
pub fn start_node(data_dir: &Path, id: NodeId, within: Duration) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let node_dir = data_dir.join(format!("node-{id}"));
    let config = Manifest::node_config_path(data_dir, id);
    anyhow::ensure!(config.exists(), "node {id} has no {}", config.display());
    let lock = local::node_lock_path(&node_dir);
    if let Some(held) = DirLock::holder(&lock)? {
        bail!("node {id} is already running: {held}");
    }
    let exe = match recorded_binary(data_dir, id)? {
        Some(b) => b,
        None => std::env::current_exe().context("cannot find the orrery binary")?,
    };
    let log_path = node_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut child = std::process::Command::new(&exe)
        .args(["node", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {} for node {id}", exe.display()))?;
    let mine = format!("pid {}\n", child.id());
    let deadline = Instant::now() + within;
    loop {
        // Its lock file names it once it holds the directory (read, never
        // locked here: taking the lock could make the node refuse to start).
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.starts_with(&mine)) {
            return Ok(child);
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "node {id} ({}) exited ({st}) before it took its data directory:\n  {}",
                exe.display(),
                log_tail(&log_path, offset).join("\n  ")
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("node {id} did not take its data directory within {within:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The error lines a node logged since `offset`.
fn log_tail(path: &Path, offset: u64) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let from = (offset as usize).min(text.len());
    local::log_reason(&String::from_utf8_lossy(&text[from..]), 12)
}

/// `orrery start --node N`.
pub fn start(args: StartArgs) -> Result<()> {
    Manifest::load(&args.data_dir)?;
    if let Some(b) = &args.binary {
        let b = check_binary(b)?;
        record_binary(&args.data_dir, args.node, Some(&b))?;
    }
    let t0 = Instant::now();
    let child = start_node(
        &args.data_dir,
        args.node,
        Duration::from_secs(args.timeout_s),
    )?;
    println!(
        "node {} started (pid {}) in {} ms; `orrery status --data-dir {}` shows it rejoin",
        args.node,
        child.id(),
        t0.elapsed().as_millis(),
        args.data_dir.display()
    );
    Ok(())
}

/// Polls a local cluster and runs its node processes: the I/O shell of
/// rolls and drills.
pub struct Observer {
    pub data_dir: PathBuf,
    pub manifest: Manifest,
    client: AdminClient,
    token: Option<String>,
    /// Processes started here, so their exits are seen (and reaped).
    children: BTreeMap<NodeId, Child>,
    epoch0: Instant,
    wall0: u64,
}

impl Observer {
    pub fn new(data_dir: &Path, token: Option<String>) -> Result<Observer> {
        let manifest = Manifest::load(data_dir)?;
        Ok(Observer {
            data_dir: data_dir.to_owned(),
            token: exec::find_token(token, data_dir),
            manifest,
            client: AdminClient::default(),
            children: BTreeMap::new(),
            epoch0: Instant::now(),
            wall0: orrery_node::clock::now_ms(),
        })
    }

    /// Milliseconds on a monotonic clock (wall-clock based at the start).
    pub fn now_ms(&self) -> u64 {
        self.wall0 + self.epoch0.elapsed().as_millis() as u64
    }

    /// Whether node `id` runs, and how it exited if it was started here.
    fn running(&mut self, id: NodeId) -> (bool, Option<String>) {
        if let Some(c) = self.children.get_mut(&id) {
            return match c.try_wait() {
                Ok(None) => (true, None),
                Ok(Some(st)) => {
                    let log = self.data_dir.join(format!("node-{id}")).join("node.log");
                    let why = log_tail(&log, 0).last().cloned().unwrap_or_default();
                    (false, Some(format!("{st}: {why}")))
                }
                Err(e) => (false, Some(e.to_string())),
            };
        }
        let lock = local::node_lock_path(&self.data_dir.join(format!("node-{id}")));
        (DirLock::holder(&lock).ok().flatten().is_some(), None)
    }

    pub fn observe(&mut self) -> ClusterObs {
        let state = self.client.cluster_state(&self.manifest);
        let nodes = self.manifest.nodes.clone();
        let mut rows = Vec::with_capacity(nodes.len());
        for n in &nodes {
            let (running, exited) = self.running(n.id);
            let st = running
                .then(|| self.client.node_status(&n.admin_addr).ok())
                .flatten();
            let sh = (running && n.role.hosts_services())
                .then(|| self.client.node_shards(&n.admin_addr).ok())
                .flatten();
            rows.push(node_obs(
                n,
                state.as_ref().ok(),
                st.as_ref(),
                sh,
                running,
                exited,
            ));
        }
        ClusterObs {
            at_ms: self.now_ms(),
            state_error: state.as_ref().err().map(|e| e.to_string()),
            stage: state.as_ref().map_or(-5, |s| s.stage.number()),
            leader: state.as_ref().ok().and_then(|s| s.leader),
            shard_total: state.as_ref().map_or(0, |s| s.shards.entries.len()),
            nodes: rows,
        }
    }

    /// Stops node `id` (it drains and leaves); its stop time in ms.
    pub fn stop(&mut self, id: NodeId, within: Duration) -> Result<u64> {
        let t0 = Instant::now();
        local::stop_node(&self.data_dir, id, within)?;
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.wait();
        }
        Ok(t0.elapsed().as_millis() as u64)
    }

    pub fn start(&mut self, id: NodeId, within: Duration) -> Result<()> {
        let child = start_node(&self.data_dir, id, within)?;
        self.children.insert(id, child);
        Ok(())
    }

    /// Records an operator's action in the timeline, through a voter's
    /// console (the leader's first). A failure is returned, not fatal.
    pub fn record(&self, leader: Option<NodeId>, what: &str, detail: &str) -> Result<()> {
        let Some(token) = self.token.as_deref() else {
            bail!("no admin token (--token, ORRERY_ADMIN_TOKEN or DATA_DIR/admin.token)");
        };
        let mut voters: Vec<&NodeEntry> = self
            .manifest
            .nodes
            .iter()
            .filter(|n| n.role.is_voter())
            .collect();
        voters.sort_by_key(|n| (Some(n.id) != leader, n.id));
        let args: Vec<String> = ["operation", "record", what, detail]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let mut last = String::from("no voter in the manifest");
        for n in voters {
            match exec::run_one(&agent, &n.admin_addr, Some(token), &args) {
                exec::Outcome::Ok { .. } => return Ok(()),
                exec::Outcome::Error(e) => last = format!("node {}: {e}", n.id),
                exec::Outcome::Timeout => last = format!("node {}: timed out", n.id),
            }
        }
        bail!("{last}")
    }

    /// Polls until `watch` concludes (bounded by its timeout); `tick` sees
    /// every verdict on the way.
    pub fn watch(
        &mut self,
        watch: &mut Watch,
        poll: Duration,
        mut tick: impl FnMut(&ClusterObs, &Verdict),
    ) -> Verdict {
        loop {
            let obs = self.observe();
            let v = watch.observe(&obs);
            tick(&obs, &v);
            if !matches!(v, Verdict::Waiting(_)) {
                return v;
            }
            std::thread::sleep(poll);
        }
    }
}

/// What a roll prints: bars on a terminal, plain lines otherwise.
struct Out {
    multi: Option<MultiProgress>,
    bars: BTreeMap<NodeId, ProgressBar>,
}

/// Steps of one node's restart, for its bar.
const STEPS: u64 = 4;

impl Out {
    fn new(order: &[NodeId]) -> Out {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Out {
                multi: None,
                bars: BTreeMap::new(),
            };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("node {prefix:>3} {bar:20} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bars = order
            .iter()
            .map(|id| {
                let b = multi.add(ProgressBar::new(STEPS));
                b.set_style(style.clone());
                b.set_prefix(id.to_string());
                b.set_message("waiting its turn");
                (*id, b)
            })
            .collect();
        Out {
            multi: Some(multi),
            bars,
        }
    }

    fn say(&self, line: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn step(&self, id: NodeId, pos: u64, msg: &str) {
        if let Some(b) = self.bars.get(&id) {
            b.set_position(pos);
            b.set_message(msg.to_string());
        }
    }

    fn done(&self, id: NodeId, msg: &str) {
        if let Some(b) = self.bars.get(&id) {
            b.finish_with_message(msg.to_string());
        }
    }

    fn clear(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// How one batch went.
struct BatchRun {
    failed: Option<String>,
    /// The binary each node of the batch ran before (for a rollback).
    previous: Vec<(NodeId, Option<PathBuf>)>,
}

/// `orrery roll`.
pub fn run(args: RollArgs) -> Result<()> {
    let binary = args.binary.as_deref().map(check_binary).transpose()?;
    let mut o = Observer::new(&args.data_dir, args.token.clone())?;
    let obs = o.observe();
    let batches = plan(&obs, args.batch).map_err(|why| anyhow::anyhow!("roll refused: {why}"))?;
    let order: Vec<NodeId> = batches.iter().flatten().copied().collect();
    let out = Out::new(&order);
    let started = Instant::now();
    let ids: Vec<String> = order.iter().map(|i| i.to_string()).collect();
    let what = match &binary {
        Some(b) => format!("upgrade to {}", b.display()),
        None => "restart".to_string(),
    };
    let intro = format!(
        "roll started: {what} of {} nodes in {} batch(es), order {}; stable time {} ms",
        order.len(),
        batches.len(),
        ids.join(", "),
        args.stable_ms
    );
    out.say(&format!("orrery: {intro}"));
    note(&o, &out, obs.leader, &intro);
    let mut rows: BTreeMap<NodeId, NodeTiming> = order
        .iter()
        .map(|id| {
            let role = o
                .manifest
                .nodes
                .iter()
                .find(|n| n.id == *id)
                .map(|n| n.role.to_string())
                .unwrap_or_default();
            (
                *id,
                NodeTiming {
                    id: *id,
                    role,
                    result: "not reached".into(),
                    ..Default::default()
                },
            )
        })
        .collect();
    for batch in &batches {
        let run = roll_batch(&mut o, &out, &args, binary.as_deref(), batch, &mut rows);
        let Some(why) = run.failed else { continue };
        let ids: Vec<String> = batch.iter().map(|i| i.to_string()).collect();
        let mut text = format!("roll failed at node(s) {}: {why}", ids.join(", "));
        if args.rollback_on_failure {
            text.push_str(&format!(
                "; {}",
                rollback(&mut o, &out, &args, &run.previous, &mut rows)
            ));
        }
        out.clear();
        let leader = o.observe().leader;
        note(&o, &out, leader, &text);
        print!(
            "{}",
            render_timings(&rows.values().cloned().collect::<Vec<_>>())
        );
        bail!("{text}");
    }
    out.clear();
    let done = format!(
        "roll finished: {} nodes restarted in {} ms",
        order.len(),
        started.elapsed().as_millis()
    );
    let leader = o.observe().leader;
    note(&o, &out, leader, &done);
    print!(
        "{}",
        render_timings(&rows.values().cloned().collect::<Vec<_>>())
    );
    println!("orrery: {done}");
    Ok(())
}

/// Records a line of the roll in the timeline; a failure is said, not fatal.
fn note(o: &Observer, out: &Out, leader: Option<NodeId>, text: &str) {
    if let Err(e) = o.record(leader, "roll", text) {
        out.say(&format!(
            "orrery: warning: not recorded in the timeline ({e}): {text}"
        ));
    }
}

/// Stops, (re)starts and watches one batch.
fn roll_batch(
    o: &mut Observer,
    out: &Out,
    args: &RollArgs,
    binary: Option<&Path>,
    batch: &[NodeId],
    rows: &mut BTreeMap<NodeId, NodeTiming>,
) -> BatchRun {
    let mut run = BatchRun {
        failed: None,
        previous: vec![],
    };
    let obs = o.observe();
    if let Some(why) = unhealthy(&obs) {
        run.failed = Some(format!(
            "the cluster is not healthy before the batch: {why}"
        ));
        return run;
    }
    if let Err(why) = keeps_quorum(&obs, batch) {
        run.failed = Some(why);
        return run;
    }
    let epochs: Vec<(NodeId, Epoch)> = batch
        .iter()
        .map(|id| {
            (
                *id,
                obs.nodes
                    .iter()
                    .find(|n| n.id == *id)
                    .map_or(0, |n| n.epoch),
            )
        })
        .collect();
    for id in batch {
        out.step(*id, 1, "stopping (drain, leave)");
        match o.stop(*id, Duration::from_secs(args.stop_timeout_s)) {
            Ok(ms) => rows.entry(*id).or_default().stop_ms = Some(ms),
            Err(e) => {
                run.failed = Some(format!("node {id} did not stop: {e:#}"));
                return run;
            }
        }
        let prev = recorded_binary(&o.data_dir, *id).unwrap_or(None);
        run.previous.push((*id, prev));
        if let Some(b) = binary {
            if let Err(e) = record_binary(&o.data_dir, *id, Some(b)) {
                run.failed = Some(format!("{e:#}"));
                return run;
            }
        }
        out.step(*id, 2, "starting");
        if let Err(e) = o.start(*id, Duration::from_secs(args.node_timeout_s)) {
            rows.entry(*id).or_default().result = "failed to start".into();
            run.failed = Some(format!("{e:#}"));
            return run;
        }
        out.step(*id, 3, "rejoining");
    }
    let timeout = args.node_timeout_s * 1000;
    let mut w = Watch::new(epochs, o.now_ms(), timeout, args.stable_ms);
    let poll = Duration::from_millis(args.poll_ms.max(10));
    let verdict = o.watch(&mut w, poll, |_, v| {
        if let Verdict::Waiting(why) = v {
            for id in batch {
                out.step(*id, 3, why);
            }
        }
    });
    for id in batch {
        let row = rows.entry(*id).or_default();
        row.back_ms = w.back_after(*id);
        row.stable_ms = w.stable_after();
    }
    match verdict {
        Verdict::Stable => {
            for id in batch {
                let row = &rows[id];
                let line = format!(
                    "node {id} restarted in {} ms (stopped in {} ms, back at stage 0 with its shards in {} ms, cluster stable after {} ms)",
                    row.stop_ms.unwrap_or(0) + row.stable_ms.unwrap_or(0),
                    row.stop_ms.unwrap_or(0),
                    row.back_ms.unwrap_or(0),
                    row.stable_ms.unwrap_or(0)
                );
                out.done(*id, "restarted");
                out.say(&format!("orrery: {line}"));
                note(o, out, None, &line);
                rows.entry(*id).or_default().result = "restarted".into();
            }
        }
        Verdict::Failed(why) | Verdict::Waiting(why) => {
            for id in batch {
                out.done(*id, "FAILED");
                rows.entry(*id).or_default().result = "FAILED".into();
            }
            run.failed = Some(why);
        }
    }
    run
}

/// Puts the failed batch back on its previous binaries and waits for it to
/// be healthy; says how it went.
fn rollback(
    o: &mut Observer,
    out: &Out,
    args: &RollArgs,
    previous: &[(NodeId, Option<PathBuf>)],
    rows: &mut BTreeMap<NodeId, NodeTiming>,
) -> String {
    let t0 = o.now_ms();
    let mut epochs = vec![];
    for (id, prev) in previous {
        out.say(&format!(
            "orrery: rolling node {id} back to {}",
            describe(prev.as_deref())
        ));
        let obs = o.observe();
        let n = obs
            .nodes
            .iter()
            .find(|n| n.id == *id)
            .cloned()
            .unwrap_or_default();
        if n.running {
            if let Err(e) = o.stop(*id, Duration::from_secs(args.stop_timeout_s)) {
                return format!("rollback failed: node {id} did not stop: {e:#}");
            }
        }
        let epoch = o
            .observe()
            .nodes
            .iter()
            .find(|n| n.id == *id)
            .map_or(0, |n| n.epoch);
        epochs.push((*id, epoch));
        if let Err(e) = record_binary(&o.data_dir, *id, prev.as_deref()) {
            return format!("rollback failed: {e:#}");
        }
        if let Err(e) = o.start(*id, Duration::from_secs(args.node_timeout_s)) {
            return format!("rollback failed: {e:#}");
        }
    }
    let mut w = Watch::new(
        epochs,
        o.now_ms(),
        args.node_timeout_s * 1000,
        args.stable_ms,
    );
    let poll = Duration::from_millis(args.poll_ms.max(10));
    let ids: Vec<String> = previous.iter().map(|(id, _)| id.to_string()).collect();
    match o.watch(&mut w, poll, |_, _| {}) {
        Verdict::Stable => {
            for (id, _) in previous {
                rows.entry(*id).or_default().result = "FAILED, rolled back".into();
            }
            format!(
                "rolled back node(s) {} to the previous binary: healthy again in {} ms",
                ids.join(", "),
                o.now_ms().saturating_sub(t0)
            )
        }
        Verdict::Failed(why) | Verdict::Waiting(why) => {
            format!("rollback of node(s) {} failed: {why}", ids.join(", "))
        }
    }
}

fn describe(binary: Option<&Path>) -> String {
    match binary {
        Some(b) => b.display().to_string(),
        None => "the binary that starts it".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, voter: bool) -> NodeObs {
        NodeObs {
            id,
            voter,
            hosts: true,
            running: true,
            epoch: 10 + id,
            answering: true,
            serving: true,
            owned: 4,
            shards: Some(ShardCounts {
                assigned: 4,
                loaded: 4,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// 5 nodes, voters 1-3, leader `leader`.
    fn cluster(leader: NodeId) -> ClusterObs {
        ClusterObs {
            at_ms: 1_000,
            leader: Some(leader),
            nodes: (1..=5).map(|id| node(id, id <= 3)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn workers_first_voters_last_the_leader_last() {
        let c = cluster(2);
        assert_eq!(
            plan(&c, 1).unwrap(),
            vec![vec![4], vec![5], vec![1], vec![3], vec![2]]
        );
        // Batches of two: workers together, voters never with workers; two
        // of three voters at once would lose the quorum.
        let e = plan(&c, 2).unwrap_err();
        assert!(
            e.contains("stopping node(s) 1, 3") && e.contains("a quorum needs 2"),
            "{e}"
        );
        let mut five = cluster(1);
        for n in &mut five.nodes {
            n.voter = true;
        }
        assert_eq!(
            plan(&five, 2).unwrap(),
            vec![vec![2, 3], vec![4, 5], vec![1]]
        );
        assert!(plan(&c, 0).is_err());
    }

    #[test]
    fn an_unhealthy_cluster_is_refused_with_the_reason() {
        let mut c = cluster(1);
        c.nodes[4].running = false;
        let e = plan(&c, 1).unwrap_err();
        assert_eq!(e, "the cluster is not healthy: node 5 is not running");
        // The node that is gone, not those suffering from it.
        c.nodes[0].serving = false;
        assert_eq!(unhealthy(&c).unwrap(), "node 5 is not running");
        let mut c = cluster(1);
        c.nodes[3].shards.as_mut().unwrap().loading = 2;
        assert!(unhealthy(&c)
            .unwrap()
            .contains("node 4 has loaded 4 of its 4 shards (2 loading)"));
        let mut c = cluster(1);
        c.stage = -1;
        assert_eq!(unhealthy(&c).unwrap(), "the cluster is at stage -1, not 0");
        let mut c = cluster(1);
        c.leader = None;
        assert!(unhealthy(&c).unwrap().contains("no coordinator"));
        let mut c = cluster(1);
        c.nodes[1].no_quorum = Some("no quorum: 1 of 3 voters reachable".into());
        assert!(unhealthy(&c).unwrap().starts_with("node 2 sees no quorum"));
        // An arbiter hosts nothing: no shard report needed.
        let mut c = cluster(1);
        c.nodes[2].hosts = false;
        c.nodes[2].shards = None;
        assert_eq!(unhealthy(&c), None);
    }

    #[test]
    fn one_voter_cannot_be_rolled_and_a_sick_voter_counts_against_the_quorum() {
        let mut c = cluster(1);
        for n in &mut c.nodes {
            n.voter = n.id == 1;
        }
        let e = keeps_quorum(&c, &[1]).unwrap_err();
        assert!(e.contains("leave 0 healthy voter(s) of 1 (none)"), "{e}");
        let mut c = cluster(1);
        c.nodes[2].impaired = Some("lag".into());
        assert!(keeps_quorum(&c, &[4]).is_ok());
        assert!(keeps_quorum(&c, &[2]).unwrap_err().contains("node(s) 1"));
    }

    #[test]
    fn a_batch_is_stable_only_after_a_new_epoch_and_an_unbroken_stable_time() {
        let mut c = cluster(1);
        let mut w = Watch::new(vec![(4, 14)], 1_000, 10_000, 500);
        // Still the old process's row: not rejoined.
        let v = w.observe(&c);
        assert_eq!(
            v,
            Verdict::Waiting("node 4 has not rejoined (epoch 14)".into())
        );
        c.nodes[3].epoch = 20;
        c.at_ms = 1_200;
        assert!(matches!(w.observe(&c), Verdict::Waiting(s) if s.starts_with("healthy for 0")));
        assert_eq!(w.back_after(4), Some(200));
        // A break resets the stable time.
        c.at_ms = 1_500;
        c.nodes[0].serving = false;
        assert_eq!(
            w.observe(&c),
            Verdict::Waiting("node 1 is not serving".into())
        );
        c.nodes[0].serving = true;
        c.at_ms = 1_600;
        assert!(matches!(w.observe(&c), Verdict::Waiting(_)));
        c.at_ms = 2_000;
        assert!(matches!(w.observe(&c), Verdict::Waiting(_)));
        c.at_ms = 2_100;
        assert_eq!(w.observe(&c), Verdict::Stable);
        assert_eq!(
            (w.back_after(4), w.stable_after()),
            (Some(200), Some(1_100))
        );
    }

    #[test]
    fn an_exit_fails_at_once_and_an_unhealthy_node_fails_at_the_timeout() {
        let mut c = cluster(1);
        let mut w = Watch::new(vec![(4, 14)], 1_000, 10_000, 500);
        c.nodes[3].exited = Some("exit status: 1".into());
        c.nodes[3].running = false;
        assert_eq!(
            w.observe(&c),
            Verdict::Failed("node 4 exited: exit status: 1".into())
        );
        let mut c = cluster(1);
        let mut w = Watch::new(vec![(4, 14)], 1_000, 10_000, 500);
        c.nodes[3].epoch = 20;
        c.nodes[3].impaired = Some("health_verification: own proof invalid".into());
        assert!(matches!(w.observe(&c), Verdict::Waiting(_)));
        c.at_ms = 11_000;
        let Verdict::Failed(why) = w.observe(&c) else {
            panic!("not failed")
        };
        assert!(
            why.contains("within 10 s: node 4 is impaired: health_verification"),
            "{why}"
        );
        c.nodes[3].fail_stop = Some("constant tables".into());
        let mut w = Watch::new(vec![(4, 14)], 1_000, 10_000, 500);
        assert!(matches!(w.observe(&c), Verdict::Failed(s) if s.contains("fatal self-check")));
    }

    #[test]
    fn the_table_has_a_row_per_node() {
        let rows = vec![
            NodeTiming {
                id: 4,
                role: "worker".into(),
                stop_ms: Some(3_000),
                back_ms: Some(2_000),
                stable_ms: Some(2_500),
                result: "restarted".into(),
            },
            NodeTiming {
                id: 1,
                role: "voter".into(),
                result: "not reached".into(),
                ..Default::default()
            },
        ];
        let t = render_timings(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].contains("5500") && lines[1].ends_with("restarted"),
            "{t}"
        );
        assert!(
            lines[2].contains(" - ") && lines[2].ends_with("not reached"),
            "{t}"
        );
    }
}
