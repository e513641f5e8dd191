//! A node's configuration file (TOML), every key with its default.
//!
//! This module owns parsing and validating the file; it never starts
//! anything. A wrong file is refused whole with an error that names the key.

use crate::health::{HealthConfig, HealthFaults};
use crate::logfwd::ForwardConfig;
use crate::shards::ShardsConfig;
use crate::watchdog::WatchdogConfig;
use orrery_core::{
    ClusterConfig, MembershipConfig, NodeId, NodeSpec, PlacementSettings, Role, StuckPolicy,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// One node's configuration. See README.md ("Configuration") for a sample.
/// Its `Debug` shows no credential (the secret, tokens, passwords in URLs).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; must appear in `nodes`.
    pub node_id: NodeId,
    /// Cluster identity, checked in every handshake.
    pub cluster_id: String,
    /// Shared cluster secret (HMAC key for the handshake; never sent).
    pub secret: String,
    /// Where the Raft log, snapshots and node files live.
    pub data_dir: PathBuf,
    /// Node-to-node listen address; defaults to this node's `addr` in `nodes`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Admin HTTP listen address; defaults to this node's `admin_addr`.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Start-up policy and timing.
    #[serde(default)]
    pub startup: StartupConfig,
    /// Control-plane (Raft) timing.
    #[serde(default)]
    pub raft: RaftTiming,
    /// Node-to-node RPC bounds.
    #[serde(default)]
    pub rpc: RpcConfig,
    /// Node identity: mutual TLS with certificates of the cluster's CA.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The built-in demo service.
    #[serde(default)]
    pub demo: DemoConfig,
    /// Failure detection: leases, self-fencing, probes, backoff.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// Self-diagnosis.
    #[serde(default)]
    pub health: HealthConfig,
    /// Fault-injection hooks for tests (all off by default).
    #[serde(default)]
    pub faults: HealthFaults,
    /// The shard runtime's bounds.
    #[serde(default)]
    pub shards: ShardsConfig,
    /// Shard placement (replicated from the bootstrapping leader's file).
    #[serde(default)]
    pub placement: PlacementSettings,
    /// The admin console and HTTP API: token, bounds, fault commands.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging channels: levels, rate limits, sinks, queue bounds.
    #[serde(default = "default_log")]
    pub log: orrery_log::LogConfig,
    /// Forwarding warnings to a collector node (the cluster-wide log).
    #[serde(default)]
    pub log_forward: ForwardConfig,
    /// The event-loop watchdog.
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    /// The node process's async runtime: worker and blocking threads.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// When the node calls its control plane stuck (no quorum, slow proposals).
    #[serde(default)]
    pub quorum: crate::quorum::QuorumConfig,
    /// Leaving on SIGTERM: how long to wait for the drain and the `Leave`.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Disk space, store sizes and descriptors: thresholds and check period.
    #[serde(default)]
    pub resources: crate::resources::ResourcesConfig,
    /// Scheduled failover drills (off by default).
    #[serde(default)]
    pub drills: crate::drills::DrillsConfig,
    /// Scheduled, verified backups run by the Raft leader (off by default).
    #[serde(default)]
    pub backup: crate::backup::BackupConfig,
    /// Where application data and per-period job output are stored
    /// (fenced). Default: SQLite at `data_dir/store.db`.
    #[serde(default)]
    pub store: orrery_store::StoreConfig,
    /// Application sections (e.g. `[app.universe]`), passed to the
    /// services untouched; each service validates its own.
    #[serde(default)]
    pub app: toml::Table,
    /// Every node of the cluster.
    pub nodes: Vec<NodeEntry>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        crate::console::redact_credentials(&mut v);
        write!(f, "NodeConfig {v}")
    }
}

/// The node's logging defaults: orrery-log's, with the Raft library's
/// chatter at `warn`.
pub fn default_log() -> orrery_log::LogConfig {
    let mut log = orrery_log::LogConfig::default();
    log.channels.insert(
        "openraft".into(),
        orrery_log::ChannelConfig {
            level: Some("warn".into()),
            ..Default::default()
        },
    );
    log
}

/// `[tls]`: every node-to-node connection runs inside mutual TLS 1.3, and a
/// peer may speak only as the node its certificate names.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Run plain TCP instead (the HMAC handshake alone). Default false:
    /// only for a trusted, isolated network, and never mixed with TLS nodes
    /// in one cluster (they cannot talk to each other).
    pub disabled: bool,
    /// The node's certificate directory (`ca.crt`, `node.crt`, `node.key`,
    /// as `orrery ca issue` writes it). Default `data_dir/tls`.
    pub dir: Option<PathBuf>,
}

/// `[admin]`: who may run console commands and mutate through the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Token required (`Authorization: Bearer TOKEN`) by `POST /console`
    /// and every admin mutation. Unset: console and mutations are refused.
    /// At least 16 characters.
    pub token: Option<String>,
    /// Allow the `fault ...` console commands (tests only). Default false.
    pub fault_commands: bool,
    /// Bound on one console command on the node. Default 5000.
    pub command_timeout_ms: u64,
    /// Console commands running at once; more are refused as busy. Default 8.
    pub max_concurrent_commands: usize,
    /// Largest admin request body. Default 16384.
    pub max_body_bytes: usize,
    /// Admin connections open at once. At the cap a new connection closes
    /// the oldest one that has not sent a byte yet, or is closed at once.
    /// Default 128.
    pub max_connections: usize,
    /// Time a connection has to deliver a complete request head, counted
    /// from when it opens or its previous response was sent (so it also
    /// bounds idle keep-alive connections). Default 5000.
    pub header_timeout_ms: u64,
    /// A connection that moves no byte either way for this long is closed
    /// (stalled bodies, unread responses). Must exceed
    /// `command_timeout_ms`, within which every request is answered.
    /// Default 60000.
    pub idle_timeout_ms: u64,
    /// Names under which this node's admin port is reached besides its own
    /// addresses (`admin_listen`, its `admin_addr`, and loopback names on
    /// its port), as `HOST` or `HOST:PORT`, e.g. a DNS name in front of it.
    /// Requests whose `Host` header names anything else are refused (DNS
    /// rebinding). At most 32 entries. Default none.
    pub allowed_hosts: Vec<String>,
}

/// Most entries in `admin.allowed_hosts`.
pub const MAX_ALLOWED_HOSTS: usize = 32;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            fault_commands: false,
            command_timeout_ms: 5_000,
            max_concurrent_commands: 8,
            max_body_bytes: 16 * 1024,
            max_connections: 128,
            header_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            allowed_hosts: vec![],
        }
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err("admin.token must be at least 16 characters".into());
        }
        if !(1..=600_000).contains(&self.command_timeout_ms) {
            return Err("admin.command_timeout_ms must be in 1..=600000".into());
        }
        if !(1..=1024).contains(&self.max_concurrent_commands) {
            return Err("admin.max_concurrent_commands must be in 1..=1024".into());
        }
        if !(256..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err("admin.max_body_bytes must be in 256..=16777216".into());
        }
        if !(2..=65_536).contains(&self.max_connections) {
            return Err("admin.max_connections must be in 2..=65536".into());
        }
        if !(100..=600_000).contains(&self.header_timeout_ms) {
            return Err("admin.header_timeout_ms must be in 100..=600000".into());
        }
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return Err("admin.idle_timeout_ms must be in 100..=3600000".into());
        }
        if self.allowed_hosts.len() > MAX_ALLOWED_HOSTS
            || self
                .allowed_hosts
                .iter()
                .any(|h| h.is_empty() || h.len() > 255)
        {
            return Err(format!(
                "admin.allowed_hosts takes at most {MAX_ALLOWED_HOSTS} names of 1..=255 bytes"
            ));
        }
        if self.idle_timeout_ms <= self.command_timeout_ms {
            return Err(format!(
                "admin.idle_timeout_ms ({}) must exceed admin.command_timeout_ms ({}): a request still being answered would be cut off",
                self.idle_timeout_ms, self.command_timeout_ms
            ));
        }
        Ok(())
    }
}

/// `[shutdown]`: a node stopped with SIGTERM (or SIGINT) leaves the
/// cluster: it drains its shards, stops serving, tells the control plane
/// (`Leave`) and exits. Every step is bounded; without a quorum it says why
/// and exits anyway. The two bounds together must stay under the time the
/// supervisor gives it (`orrery up` and the tests: 10 s).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long the node waits for its shards to be handed off before it
    /// stops serving them anyway (their new owners then take them at
    /// once). 0: no drain. Default 3000.
    pub drain_timeout_ms: u64,
    /// How long it tries to have its `Leave` committed. Default 2000.
    pub leave_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout_ms: 3_000,
            leave_timeout_ms: 2_000,
        }
    }
}

impl ShutdownConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.drain_timeout_ms > 600_000 {
            return Err("shutdown.drain_timeout_ms must be at most 600000".into());
        }
        if !(100..=600_000).contains(&self.leave_timeout_ms) {
            return Err("shutdown.leave_timeout_ms must be in 100..=600000".into());
        }
        Ok(())
    }
}

/// One `[[nodes]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: NodeId,
    pub addr: String,
    pub admin_addr: String,
    pub role: Role,
}

/// `[startup]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StartupConfig {
    /// Time the cluster may take to complete one stage before laggards are
    /// declared stuck. Default 60000.
    pub stage_deadline_ms: u64,
    /// `exclude` (default) or `wait`.
    pub stuck_policy: StuckPolicy,
    /// A node unheard for longer than this is not running. Default 1500.
    pub liveness_window_ms: u64,
    /// How often a node asks whether it may start the next stage. Default 100.
    pub poll_interval_ms: u64,
    /// How often a node re-reports its stage and waits. Default 1000.
    pub report_interval_ms: u64,
    /// How often the coordinator (the Raft leader) decides. Default 100.
    pub coordinator_tick_ms: u64,
    /// Connections a node opens at once at stage -3 (every peer is dialled,
    /// at most this many in flight). With hundreds of nodes released by one
    /// barrier an unbounded dial is a handshake storm: every server sheds
    /// half-done handshakes and every client retries. Default 2: at 250
    /// processes on 2 cores, 8 each (2,000 handshakes in flight) queued
    /// longer than the connect timeout and 37 nodes got through stage -3
    /// in 300 s; with 2, 162 did (100 nodes: stage -3 in 16 s either way).
    pub dial_concurrency: usize,
    /// Stage -3 opens one connection per pair of nodes (see
    /// `connect_peers`); a peer that should dial this node but has not been
    /// heard from within this many ms (at most a quarter of
    /// `stage_deadline_ms`) is dialled anyway. 0: dial every peer.
    /// Default 10000.
    pub inbound_grace_ms: u64,
}

impl Default for StartupConfig {
    fn default() -> Self {
        StartupConfig {
            stage_deadline_ms: 60_000,
            stuck_policy: StuckPolicy::Exclude,
            liveness_window_ms: 1_500,
            poll_interval_ms: 100,
            report_interval_ms: 1_000,
            coordinator_tick_ms: 100,
            dial_concurrency: 2,
            inbound_grace_ms: 10_000,
        }
    }
}

/// `[raft]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTiming {
    /// Leader heartbeat. Default 100.
    pub heartbeat_ms: u64,
    /// Election timeout range. Default 400..800.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Largest encoded command the control plane accepts; a larger proposal
    /// is refused before it reaches the log. Must leave room under
    /// `rpc.max_frame_bytes` (validated). Default 65536.
    pub max_proposal_bytes: usize,
    /// Snapshot bytes per message when a follower is brought back by a
    /// snapshot. Default 1048576.
    pub snapshot_chunk_bytes: usize,
    /// Largest snapshot a voter accepts from its leader. Default 1 GiB.
    pub max_snapshot_bytes: u64,
    /// A peer's proposal dated more than this ahead of the leader's clock
    /// is refused (alarm budgets are kept on proposers' timestamps).
    /// Default 5000.
    pub max_clock_skew_ms: u64,
    /// How long a voter's own write to the control plane (the coordinator's
    /// decisions, a leader's proposals) waits to commit before it fails as
    /// "commit unknown" and is decided again. Default 10000.
    pub write_timeout_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 100,
            election_min_ms: 400,
            election_max_ms: 800,
            max_proposal_bytes: 64 * 1024,
            snapshot_chunk_bytes: 1024 * 1024,
            max_snapshot_bytes: 1 << 30,
            max_clock_skew_ms: 5_000,
            write_timeout_ms: 10_000,
        }
    }
}

/// Bytes the node-to-node frame adds around a Raft message (request id,
/// deadline, variant tags), with a wide margin.
const RAFT_FRAME_OVERHEAD: usize = 16 * 1024;

/// `[runtime]`: the threads of the node process's async runtime. Every
/// thread is a bound: hundreds of node processes on one machine (a local
/// 250-node cluster) each with a worker per core and Tokio's default of up
/// to 512 blocking threads spent the machine on waking threads.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 0: one per core. Default 0.
    pub worker_threads: usize,
    /// Threads for blocking work (store calls, file I/O); calls beyond it
    /// queue. Default 64.
    pub max_blocking_threads: usize,
    /// Scheduling niceness the process gives itself at start (0..=19;
    /// higher yields the CPU to others). Default 0. A local cluster of
    /// hundreds of processes on a few cores runs its workers at 10 so that
    /// the voters, the control plane everyone waits on, are not starved:
    /// what dedicated voter machines give a real deployment.
    pub nice: i32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 0,
            max_blocking_threads: 64,
            nice: 0,
        }
    }
}

impl RuntimeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_threads > 1_024 {
            return Err("runtime.worker_threads must be in 0..=1024".into());
        }
        if !(1..=4_096).contains(&self.max_blocking_threads) {
            return Err("runtime.max_blocking_threads must be in 1..=4096".into());
        }
        if !(0..=19).contains(&self.nice) {
            return Err("runtime.nice must be in 0..=19".into());
        }
        Ok(())
    }

    /// The runtime these settings describe.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if self.worker_threads > 0 {
            b.worker_threads(self.worker_threads);
        }
        b.max_blocking_threads(self.max_blocking_threads)
            .enable_all()
            .build()
    }
}

/// `[rpc]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Deadline of one node-to-node call. Default 2000.
    pub call_timeout_ms: u64,
    /// Bound on opening a connection (incl. handshake). Default 1000.
    pub connect_timeout_ms: u64,
    /// Largest frame accepted. Default 4 MiB.
    pub max_frame_bytes: usize,
    /// Concurrent requests per connection. Default 256.
    pub max_inflight_per_connection: usize,
    /// Accepted connections open at once on the cluster port (handshaking
    /// ones included); the excess is closed at once. 0 (default): sized to
    /// the cluster, [`RpcConfig::PER_PEER`] per other node in `[[nodes]]`
    /// and at least 512. A fixed 512 refused the 250th node's connections
    /// on every voter (each peer holds a data and a control-plane
    /// connection) and held a 250-process start at stage -3 for 100 s.
    pub max_connections: usize,
    /// Handshakes in progress at once on the cluster port; beyond it the
    /// oldest is closed to make room. Default 64.
    pub max_handshakes: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            call_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            max_frame_bytes: 4 * 1024 * 1024,
            max_inflight_per_connection: 256,
            max_connections: 0,
            max_handshakes: orrery_wire::config::DEFAULT_MAX_HANDSHAKES,
        }
    }
}

impl RpcConfig {
    /// Connections one peer may hold open to a node: its data and
    /// control-plane connections, each possibly being replaced.
    pub const PER_PEER: usize = 4;

    /// The connection cap in force for a cluster of `nodes` nodes.
    pub fn max_connections_for(&self, nodes: usize) -> usize {
        match self.max_connections {
            0 => (Self::PER_PEER * nodes.saturating_sub(1))
                .clamp(orrery_wire::config::DEFAULT_MAX_CONNECTIONS, 65_536),
            n => n,
        }
    }

    /// `nodes`: how many nodes `[[nodes]]` names. A cap below two
    /// connections per peer would refuse the cluster's own members.
    pub fn validate(&self, nodes: usize) -> Result<(), String> {
        if self.max_connections > 65_536 {
            return Err(
                "rpc.max_connections must be in 0..=65536 (0: sized to the cluster)".into(),
            );
        }
        let peers = nodes.saturating_sub(1);
        if self.max_connections != 0 && self.max_connections < 2 * peers {
            return Err(format!(
                "rpc.max_connections ({}) cannot hold the cluster's own connections: each of the \
                 {peers} other nodes opens up to 2; set at least {} or 0 (sized to the cluster)",
                self.max_connections,
                2 * peers
            ));
        }
        let cap = self.max_connections_for(nodes);
        if !(1..=cap).contains(&self.max_handshakes) {
            return Err(format!(
                "rpc.max_handshakes must be in 1..=rpc.max_connections ({cap})"
            ));
        }
        Ok(())
    }
}

/// `[demo]`: the built-in demo service's preload.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Items preloaded at stage -1. Default 20.
    pub preload_items: u64,
    /// Time per item. Default 10.
    pub preload_item_ms: u64,
    /// Fault hook: the preload never finishes this item (0: off).
    pub hang_at_item: u64,
    /// Fault hook: log this many warnings in one burst once ready (0: off).
    pub log_burst_lines: u64,
    /// Shards of the demo shard kind `demo` (keys 0..shards). Default 64.
    pub shards: u64,
    /// The demo per-period job `demo-stats`: its period (0: off). Default 0.
    pub job_period_ms: u64,
    /// Its deadline within the period (0: the whole period). Default 0.
    pub job_deadline_ms: u64,
    /// Fault hook: each run works this long before writing its row, so a
    /// holder can be killed mid-run. Default 0.
    pub job_work_ms: u64,
}

impl DemoConfig {
    /// The demo job's spec, if it is enabled.
    pub fn job_spec(&self) -> Option<orrery_core::JobSpec> {
        if self.job_period_ms == 0 {
            return None;
        }
        let deadline = if self.job_deadline_ms == 0 {
            self.job_period_ms
        } else {
            self.job_deadline_ms
        };
        Some(orrery_core::JobSpec::new(
            crate::service::DEMO_JOB,
            self.job_period_ms,
            deadline,
        ))
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            preload_items: 20,
            preload_item_ms: 10,
            hang_at_item: 0,
            log_burst_lines: 0,
            shards: 64,
            job_period_ms: 0,
            job_deadline_ms: 0,
            job_work_ms: 0,
        }
    }
}

impl NodeConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &[])
    }

    /// Reads a TOML file, applies command-line overrides (`KEY=VALUE`, with
    /// dotted keys such as `startup.stage_deadline_ms=5000`; the value is
    /// read as TOML, or as a string if it is not), then validates.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let cfg: NodeConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Where this node's certificate and key live.
    pub fn tls_dir(&self) -> PathBuf {
        self.tls
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls"))
    }

    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty".into());
        }
        if !self.tls.disabled {
            if let Err(e) = orrery_trust::ClusterId::new(self.cluster_id.clone()) {
                return bad(format!(
                    "cluster_id cannot name certificates: {e} (or set tls.disabled = true)"
                ));
            }
        }
        if self.secret.len() < 16 {
            return bad("secret must be at least 16 characters".into());
        }
        let mut ids = BTreeMap::new();
        for n in &self.nodes {
            if ids.insert(n.id, n).is_some() {
                return bad(format!("node id {} appears twice in [[nodes]]", n.id));
            }
        }
        if !ids.contains_key(&self.node_id) {
            return bad(format!(
                "node_id {} is not listed in [[nodes]]",
                self.node_id
            ));
        }
        let voters = self.nodes.iter().filter(|n| n.role.is_voter()).count();
        if voters == 0 || voters % 2 == 0 {
            return bad(format!(
                "the cluster needs an odd number of voters (3 or 5 recommended), found {voters}"
            ));
        }
        let s = &self.startup;
        if s.poll_interval_ms == 0 || s.report_interval_ms == 0 || s.coordinator_tick_ms == 0 {
            return bad("startup intervals must be positive".into());
        }
        if !(1..=1_024).contains(&s.dial_concurrency) {
            return bad("startup.dial_concurrency must be in 1..=1024".into());
        }
        if s.inbound_grace_ms > 600_000 {
            return bad("startup.inbound_grace_ms must be in 0..=600000".into());
        }
        if s.liveness_window_ms <= s.report_interval_ms {
            return bad(format!(
                "startup.liveness_window_ms ({}) must exceed startup.report_interval_ms ({}), or running nodes look dead",
                s.liveness_window_ms, s.report_interval_ms
            ));
        }
        self.membership.validate().map_err(ConfigError::Invalid)?;
        self.health.validate().map_err(ConfigError::Invalid)?;
        self.admin.validate().map_err(ConfigError::Invalid)?;
        self.rpc
            .validate(self.nodes.len())
            .map_err(ConfigError::Invalid)?;
        self.runtime.validate().map_err(ConfigError::Invalid)?;
        self.watchdog.validate().map_err(ConfigError::Invalid)?;
        self.quorum
            .validate(
                self.raft.election_max_ms,
                self.membership.heartbeat_interval_ms,
            )
            .map_err(ConfigError::Invalid)?;
        self.log_forward.validate().map_err(ConfigError::Invalid)?;
        self.shutdown.validate().map_err(ConfigError::Invalid)?;
        self.resources.validate().map_err(ConfigError::Invalid)?;
        self.drills.validate().map_err(ConfigError::Invalid)?;
        self.shards.validate().map_err(ConfigError::Invalid)?;
        self.backup
            .validate(&self.store)
            .map_err(ConfigError::Invalid)?;
        if let Some(c) = self.log_forward.collector {
            if !ids.contains_key(&c) {
                return bad(format!(
                    "log_forward.collector {c} is not listed in [[nodes]]"
                ));
            }
        }
        self.log
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("log: {e}")))?;
        if let Some(spec) = self.demo.job_spec() {
            spec.validate()
                .map_err(|e| ConfigError::Invalid(format!("demo.job_period_ms: {e}")))?;
        }
        if self.demo.job_work_ms > 600_000 {
            return bad("demo.job_work_ms must be at most 600000".into());
        }
        self.store_config()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let r = &self.raft;
        if !(100..=600_000).contains(&r.max_clock_skew_ms) {
            return bad("raft.max_clock_skew_ms must be in 100..=600000".into());
        }
        if !(100..=600_000).contains(&r.write_timeout_ms) {
            return bad("raft.write_timeout_ms must be in 100..=600000".into());
        }
        if !(r.heartbeat_ms < r.election_min_ms && r.election_min_ms < r.election_max_ms) {
            return bad(
                "raft timing must satisfy heartbeat_ms < election_min_ms < election_max_ms".into(),
            );
        }
        self.control_sizes()
    }

    /// The Raft size keys, checked by the control plane's own rule.
    fn control_sizes(&self) -> Result<(), ConfigError> {
        let mut cc = orrery_control::ControlConfig::new(self.node_id, "", BTreeMap::new());
        cc.max_proposal_bytes = self.raft.max_proposal_bytes;
        cc.snapshot_chunk_bytes = self.raft.snapshot_chunk_bytes;
        cc.max_snapshot_bytes = self.raft.max_snapshot_bytes;
        cc.max_message_bytes = self.raft_message_bytes();
        cc.validate_sizes().map_err(|e| {
            ConfigError::Invalid(format!(
                "raft.max_proposal_bytes / raft.snapshot_chunk_bytes / rpc.max_frame_bytes: {e}"
            ))
        })
    }

    /// This node's `[[nodes]]` entry.
    pub fn me(&self) -> &NodeEntry {
        self.nodes
            .iter()
            .find(|n| n.id == self.node_id)
            .expect("validated: node_id is listed")
    }

    pub fn listen_addr(&self) -> String {
        self.listen
            .clone()
            .unwrap_or_else(|| self.me().addr.clone())
    }

    pub fn admin_listen_addr(&self) -> String {
        self.admin_listen
            .clone()
            .unwrap_or_else(|| self.me().admin_addr.clone())
    }

    /// Voters by id with their node-to-node addresses.
    pub fn voters(&self) -> BTreeMap<NodeId, String> {
        self.nodes
            .iter()
            .filter(|n| n.role.is_voter())
            .map(|n| (n.id, n.addr.clone()))
            .collect()
    }

    /// The cluster configuration the bootstrapping leader replicates.
    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.id,
                        NodeSpec {
                            addr: n.addr.clone(),
                            admin_addr: n.admin_addr.clone(),
                            role: n.role,
                        },
                    )
                })
                .collect(),
            stage_deadline_ms: self.startup.stage_deadline_ms,
            stuck_policy: self.startup.stuck_policy,
            liveness_window_ms: self.startup.liveness_window_ms,
            membership: self.membership.clone(),
            placement: self.placement.clone(),
        }
    }

    /// The `[store]` section with its default filled in: a SQLite store
    /// without a `path` lives at `data_dir/store.db`.
    pub fn store_config(&self) -> orrery_store::StoreConfig {
        let mut s = self.store.clone();
        if s.backend == orrery_store::BackendKind::Sqlite && s.path.is_none() && s.url.is_none() {
            s.path = Some(self.data_dir.join("store.db"));
        }
        s
    }

    /// The largest Raft message that fits in one frame.
    pub fn raft_message_bytes(&self) -> usize {
        self.rpc.max_frame_bytes.saturating_sub(RAFT_FRAME_OVERHEAD)
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc.call_timeout_ms)
    }
}

/// Sets one dotted key in a TOML document.
fn apply_override(doc: &mut toml::Table, o: &str) -> Result<(), ConfigError> {
    let bad = |m: String| ConfigError::Invalid(format!("override {o:?}: {m}"));
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE".into()))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("empty key".into()));
    }
    let (last, path) = parts.split_last().expect("non-empty");
    let mut table = doc;
    for p in path {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| bad(format!("{p} is not a table")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid node file (one voter).
    pub(crate) fn sample() -> String {
        r#"
node_id = 1
cluster_id = "test"
secret = "0123456789abcdef0123"
data_dir = "/tmp/x"
[[nodes]]
id = 1
addr = "127.0.0.1:1"
admin_addr = "127.0.0.1:2"
role = "voter"
"#
        .into()
    }

    #[test]
    fn sample_parses_with_defaults() {
        let c: NodeConfig = toml::from_str(&sample()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.startup.stage_deadline_ms, 60_000);
        assert_eq!(c.startup.stuck_policy, StuckPolicy::Exclude);
        assert_eq!(
            c.store_config().validate().unwrap(),
            orrery_store::Backend::Sqlite {
                path: "/tmp/x/store.db".into()
            }
        );
        assert!(
            c.demo.job_spec().is_none(),
            "the demo job is off by default"
        );
        assert_eq!(
            (c.shutdown.drain_timeout_ms, c.shutdown.leave_timeout_ms),
            (3_000, 2_000)
        );
    }

    #[test]
    fn shutdown_keys_parse_and_are_bounded() {
        let text = sample().replace(
            "[[nodes]]",
            "[shutdown]\ndrain_timeout_ms = 0\nleave_timeout_ms = 500\n[[nodes]]",
        );
        let c: NodeConfig = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.shutdown.drain_timeout_ms, c.shutdown.leave_timeout_ms),
            (0, 500)
        );
        let mut bad = c.clone();
        bad.shutdown.leave_timeout_ms = 0;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("shutdown.leave_timeout_ms"), "{e}");
        let unknown = sample().replace("[[nodes]]", "[shutdown]\ngrace = 1\n[[nodes]]");
        assert!(toml::from_str::<NodeConfig>(&unknown)
            .unwrap_err()
            .to_string()
            .contains("grace"));
    }

    #[test]
    fn store_and_demo_job_keys() {
        let text = sample().replace(
            "[[nodes]]",
            "[store]\npath = \"/tmp/shared.db\"\nbusy_timeout_ms = 100\n[demo]\njob_period_ms = 2000\njob_deadline_ms = 1800\n[[nodes]]",
        );
        let c: NodeConfig = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.store_config().path, Some("/tmp/shared.db".into()));
        assert_eq!(c.store_config().busy_timeout_ms, 100);
        let spec = c.demo.job_spec().unwrap();
        assert_eq!((spec.period_ms, spec.deadline_ms), (2000, 1800));
        let mut bad = c.clone();
        bad.demo.job_period_ms = 10;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("demo.job_period_ms"));
        let mut bad = c.clone();
        bad.demo.job_deadline_ms = 5000;
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.store.pool_size = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("store.pool_size"));
    }

    #[test]
    fn overrides_set_dotted_keys_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.toml");
        std::fs::write(&p, sample()).unwrap();
        let c = NodeConfig::load_with(
            &p,
            &[
                "startup.stage_deadline_ms=5000".into(),
                "startup.stuck_policy=wait".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.startup.stage_deadline_ms, 5000);
        assert_eq!(c.startup.stuck_policy, StuckPolicy::Wait);
        let e = NodeConfig::load_with(&p, &["startup.bogus=1".into()]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = NodeConfig::load_with(&p, &["nonsense".into()]).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn connection_caps_have_defaults_and_are_validated() {
        let c: NodeConfig = toml::from_str(&sample()).unwrap();
        assert_eq!((c.rpc.max_connections, c.rpc.max_handshakes), (0, 64));
        assert_eq!(c.rpc.max_connections_for(3), 512);
        assert_eq!(c.rpc.max_connections_for(250), 996);
        assert_eq!(c.admin.max_connections, 128);
        assert_eq!(
            (c.admin.header_timeout_ms, c.admin.idle_timeout_ms),
            (5_000, 60_000)
        );
        let refused = |f: &dyn Fn(&mut NodeConfig), key: &str| {
            let mut bad = c.clone();
            f(&mut bad);
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        refused(&|c| c.rpc.max_connections = 70_000, "rpc.max_connections");
        refused(
            &|c| {
                for id in 2..=3 {
                    let mut peer = c.nodes[0].clone();
                    peer.id = id;
                    c.nodes.push(peer);
                }
                c.rpc.max_connections = 3;
                c.rpc.max_handshakes = 1;
            },
            "cannot hold the cluster's own",
        );
        refused(&|c| c.rpc.max_handshakes = 600, "rpc.max_handshakes");
        refused(&|c| c.admin.max_connections = 1, "admin.max_connections");
        refused(
            &|c| c.admin.header_timeout_ms = 0,
            "admin.header_timeout_ms",
        );
        refused(&|c| c.admin.idle_timeout_ms = 10, "admin.idle_timeout_ms");
        refused(
            &|c| c.admin.command_timeout_ms = 60_000,
            "admin.idle_timeout_ms",
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_key() {
        let unknown = sample() + "bogus = 1\n";
        assert!(toml::from_str::<NodeConfig>(&unknown)
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        let mut c: NodeConfig = toml::from_str(&sample()).unwrap();
        c.node_id = 9;
        assert!(c.validate().unwrap_err().to_string().contains("node_id 9"));
        let mut c: NodeConfig = toml::from_str(&sample()).unwrap();
        c.secret = "short".into();
        assert!(c.validate().unwrap_err().to_string().contains("secret"));
        // A proposal that could not be replicated in one frame is refused.
        let mut c: NodeConfig = toml::from_str(&sample()).unwrap();
        c.raft.max_proposal_bytes = c.rpc.max_frame_bytes;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_proposal_bytes"), "{e}");
        c.raft.max_proposal_bytes = 64 * 1024;
        c.rpc.max_frame_bytes = 32 * 1024;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_frame_bytes"), "{e}");
        // A control-plane write is bounded in time, but not so tightly that it never commits.
        for ms in [0, 99, 600_001] {
            let mut c: NodeConfig = toml::from_str(&sample()).unwrap();
            c.raft.write_timeout_ms = ms;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("raft.write_timeout_ms"), "{e}");
        }
        let policy = sample().replace(
            "[[nodes]]",
            "[startup]\nstuck_policy = \"maybe\"\n[[nodes]]",
        );
        assert!(toml::from_str::<NodeConfig>(&policy).is_err());
    }
}
