//! One orrery node process: listener, control plane (on voters),
//! coordinator (on the leader), and the start-up driver.
//!
//! This module owns the wiring between the pieces and the node's local view
//! of itself. It must never make a cluster decision on its own: decisions are
//! orrery-core's (gate, coordinator, apply), replicated through
//! orrery-control; this module only feeds them time and inputs.

use crate::authz::{self, Caller, Refusal};
use crate::clock::now_ms;
use crate::config::NodeConfig;
use crate::health::{self, HealthHandle, HealthReport};
use crate::lease::{self, Lease};
use crate::logfwd::{ClusterLog, Destination, ForwardSink};
use crate::messages::{MembershipView, Reply, Request};
use crate::metrics::RpcMetrics;
use crate::quorum::{AskError, Contacts, NoQuorum};
use crate::service::{ConsoleExtension, PeriodicJob, Service, StageContext};
use crate::shards::{CallCtx, CallError, Hop, Router, ShardFuture, ShardHost, ShardService};
use crate::transport::{Endpoint, MemNetwork, MemTransport, TcpTransport, Transport};
use crate::watchdog::Watchdog;
use orrery_control::{
    ControlConfig, ControlError, ControlPlane, RaftTransport, ReplicatedState, TransportError,
    TransportFuture,
};
use orrery_core::shardmap::{ShardId, ShardMap};
use orrery_core::{
    ClusterState, Command, Coordinator, Fence, Gate, NodeId, Response, Role, Stage, Wait,
};
use orrery_log::LogChannels;
use orrery_wire::{
    AdmitError, BoxFuture, CancellationToken, Handler, PeerInfo, WireConfig, WireStats,
    WireStatsSnapshot,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

const LOG: &str = "orrery::node";

/// The replicated state as orrery-control sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ControlState(pub ClusterState);

impl ReplicatedState for ControlState {
    type Command = Command;
    type Response = Response;
    fn apply(&mut self, index: u64, command: Command) -> Response {
        self.0.apply(index, command)
    }
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    Control(#[from] ControlError),
    #[error("the control plane refused this node: {0}")]
    Refused(String),
    #[error("no usable node certificate in {}: {source} (create one with `orrery ca issue --node N --role R`, or set tls.disabled = true)", dir.display())]
    Trust {
        dir: std::path::PathBuf,
        source: orrery_trust::TrustError,
    },
}

/// What a node says about itself (`GET /status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub role: Option<Role>,
    pub addr: String,
    pub epoch: u64,
    /// Last stage completed.
    pub stage: i8,
    pub stage_since_ms: u64,
    /// When this process completed each stage (ms since the Unix epoch).
    pub stage_completed_at: BTreeMap<i8, u64>,
    pub started_at_ms: u64,
    pub waiting: Option<Wait>,
    pub progress: Option<orrery_core::Progress>,
    pub unreachable: Vec<NodeId>,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub fenced: Option<String>,
    /// Serving: joined, not fenced, and its lease is fresh.
    pub serving: bool,
    /// The services this node runs (none on an arbiter).
    pub services: Vec<String>,
    /// Its own health, as its self-checks see it.
    pub health: Option<HealthReport>,
    /// Version of the membership view it enforces.
    pub membership_version: u64,
    /// Requests refused by authorisation, by reason (`authz::Refusal::kind`):
    /// the same counters as `orrery_rpc_refused_total`.
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    /// While coordinating: accusations dropped because the accuser was not
    /// eligible (impaired, or without a perfect health record).
    pub ignored_accusations: u64,
    pub wire: WireStatsSnapshot,
    /// Version (log index) of the address cache this node holds.
    pub address_cache_version: u64,
    /// Per-period jobs this process ran, committed, or was refused as a
    /// stale holder.
    #[serde(default)]
    pub jobs: crate::jobs::JobStats,
    /// Set while this node sees no quorum: who it can reach, since when.
    #[serde(default)]
    pub no_quorum: Option<NoQuorum>,
    /// Control-plane alarms in force (no quorum, failing replication, slow
    /// proposals), kept here because they cannot commit without a quorum.
    #[serde(default)]
    pub control_alarms: Vec<crate::watchdog::Alarm>,
    /// Cluster-wide keys whose value in this node's file differs from the
    /// replicated one (`orrery config diff`).
    #[serde(default)]
    pub config_drift: Vec<crate::drift::Drift>,
    /// On voters: (applied index, SHA-256 of the applied cluster state).
    /// Voters at one index must show one digest.
    #[serde(default)]
    pub raft_digest: Option<(u64, String)>,
    /// On voters: catching up after `orrery repair` (granting no votes yet).
    #[serde(default)]
    pub raft_catching_up: bool,
    /// Set once the node is leaving the cluster (SIGTERM): where it is.
    #[serde(default)]
    pub leaving: Option<String>,
    /// The scheduled backup (`[backup]`), when configured: last good one,
    /// last failure, overdue (see [`crate::backup::BackupStatus`]).
    #[serde(default)]
    pub backup: Option<crate::backup::BackupStatus>,
    /// On voters: set while its Raft core is stopped (a full disk, a
    /// storage error): it takes no part in votes or commits, and says why.
    #[serde(default)]
    pub voter_down: Option<String>,
    /// Resources past a threshold (disk space, store sizes, descriptors).
    #[serde(default)]
    pub resources: Vec<crate::resources::Finding>,
    /// Every alarm in force on this node (`crate::alarms`): kind,
    /// severity, first and last seen, acknowledged.
    #[serde(default)]
    pub alarms: Vec<crate::alarms::ActiveAlarm>,
    /// Digests of its effective configuration per class (cluster-wide,
    /// per-node, local-only): `crate::drift::ConfigDigests`.
    #[serde(default)]
    pub config_digests: crate::drift::ConfigDigests,
    /// The binary's version (`CARGO_PKG_VERSION`).
    #[serde(default)]
    pub version: String,
    /// The node-to-node protocol versions it speaks (oldest, newest); a
    /// peer whose range does not overlap is refused at the handshake,
    /// both ranges named.
    #[serde(default)]
    pub protocol: (u16, u16),
}

/// What application code a node runs: stage hooks and, optionally, a
/// service owning shard kinds.
#[derive(Clone, Default)]
pub struct Services {
    pub stages: Vec<Arc<dyn Service>>,
    pub shards: Option<Arc<dyn ShardService>>,
    /// Per-period singleton jobs.
    pub jobs: Vec<Arc<dyn PeriodicJob>>,
    /// Where application data and job output are stored (fenced).
    pub store: Option<Arc<dyn orrery_store::Store>>,
    /// Console commands the services add.
    pub console: Vec<Arc<dyn ConsoleExtension>>,
}

impl From<Vec<Arc<dyn Service>>> for Services {
    fn from(stages: Vec<Arc<dyn Service>>) -> Self {
        Services {
            stages,
            ..Default::default()
        }
    }
}

/// A running node. Dropping it does not stop it: call [`Node::shutdown`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: NodeConfig,
    stats: Arc<WireStats>,
    control: Option<ControlPlane<ControlState>>,
    /// How this node reaches its peers (real TCP, or an in-process network).
    net: Arc<dyn Transport>,
    /// (drift now, drift last announced by an alarm): see [`crate::drift`].
    drift: Mutex<(Vec<crate::drift::Drift>, Vec<crate::drift::Drift>)>,
    /// The scheduled backup's state ([`crate::backup::run`]).
    pub(crate) backup: crate::backup::Runner,
    /// The last resource sample, for `/metrics`.
    resources: Mutex<Option<crate::resources::Sample>>,
    /// First-seen times and acknowledgements of the alarms in force.
    alarm_book: Mutex<crate::alarms::AlarmBook>,
    /// Probes: connections of their own.
    control_net: Arc<dyn Transport>,
    /// Heartbeats: connections of their own, used from the heartbeat thread.
    hb_net: Arc<dyn Transport>,
    pub(crate) epoch: AtomicU64,
    pub(crate) leader_hint: AtomicU64,
    status: Mutex<NodeStatus>,
    activity: StageContext,
    coordinator: Mutex<Option<Coordinator>>,
    cache: Mutex<Option<Arc<ClusterState>>>,
    services: Vec<Arc<dyn Service>>,
    /// Console commands the services add, by first word.
    pub(crate) console_ext: Vec<Arc<dyn ConsoleExtension>>,
    pub(crate) shards: Arc<ShardHost>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) health: HealthHandle,
    pub(crate) lease: Lease,
    started: tokio::time::Instant,
    /// Woken when the node is fenced, so start-up can rejoin.
    fenced_notify: tokio::sync::Notify,
    /// A handle on itself, for routers handed to shard handlers.
    me: OnceLock<std::sync::Weak<Inner>>,
    /// Event-loop lag, handlers in flight, alarms.
    pub(crate) watchdog: Arc<Watchdog>,
    /// The process's logging channels, when the binary handed them over.
    pub(crate) log: OnceLock<LogChannels>,
    /// The cluster-wide log, if this node is the collector.
    pub(crate) cluster_log: OnceLock<Arc<ClusterLog>>,
    /// Requests served, by kind, and their latency.
    pub(crate) rpc: RpcMetrics,
    /// Per-period jobs: the leases held, the runs, their counters.
    pub(crate) jobs: crate::jobs::JobRunner,
    /// When each peer was last heard and a quorum last seen.
    pub(crate) contacts: Arc<Contacts>,
    /// [`RUNNING`], [`LEAVING`] (draining; no rejoin) or [`RETIRED`]
    /// (serves nothing any more, telling the cluster it leaves).
    leave_phase: AtomicU8,
}

/// Leave phases ([`Node::leave`]).
const RUNNING: u8 = 0;
const LEAVING: u8 = 1;
const RETIRED: u8 = 2;

/// Carries the control plane's opaque Raft RPCs over the node's transport.
struct RaftOverWire(Arc<dyn Transport>, Arc<Contacts>);

impl RaftTransport for RaftOverWire {
    fn call(
        &self,
        target: NodeId,
        addr: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> TransportFuture<'_> {
        let _ = addr; // The transport knows every configured voter's address.
        Box::pin(async move {
            let r = match self.0.call(target, Request::Raft(payload), timeout).await {
                Ok(Reply::Raft(Ok(bytes))) => Ok(bytes),
                Ok(Reply::Raft(Err(e))) | Ok(Reply::Error(e)) => Err(TransportError::Remote(e)),
                Ok(other) => Err(TransportError::Remote(format!(
                    "unexpected reply {other:?}"
                ))),
                Err(e) => {
                    self.1.failed(target, &e.to_string());
                    Err(TransportError::Unreachable(e.to_string()))
                }
            };
            match &r {
                Ok(_) => self.1.heard(target),
                Err(TransportError::Remote(e)) => {
                    self.1.heard(target);
                    self.1.raft_failed(target, e);
                }
                Err(e) => self.1.raft_failed(target, &e.to_string()),
            }
            r
        })
    }
}

impl Node {
    /// Starts a node on real TCP: binds its port, opens the control plane
    /// on voters, and runs start-up in the background.
    pub async fn start(cfg: NodeConfig, services: impl Into<Services>) -> Result<Node, NodeError> {
        let stats = Arc::new(WireStats::new());
        let listen = cfg.listen_addr();
        let listener = TcpListener::bind(&listen)
            .await
            .map_err(|source| NodeError::Listen {
                addr: listen.clone(),
                source,
            })?;
        let revocations = orrery_trust::Revocations::default();
        let mut wire0 = wire_config(&cfg, 0);
        if !cfg.tls.disabled {
            let dir = cfg.tls_dir();
            let trust = orrery_trust::TrustConfig::load(&dir, revocations.clone())
                .map_err(|source| NodeError::Trust { dir, source })?;
            check_certificate(&cfg, trust.identity())?;
            wire0.trust = Some(trust);
        }
        let addrs = cfg.nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
        let connect_timeout = Duration::from_millis(cfg.rpc.connect_timeout_ms);
        let net = Arc::new(TcpTransport::new(
            wire0.clone(),
            stats.clone(),
            connect_timeout,
            addrs,
        ));
        let server = Arc::new(Server::new(&cfg));
        let shutdown = CancellationToken::new();
        // Serve before the control plane starts, so peers' Raft RPCs find us.
        tokio::spawn(orrery_wire::serve(
            listener,
            Arc::new(wire0),
            server.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
        info!(target: LOG, node = cfg.node_id, addr = %listen, tls = !cfg.tls.disabled, "node listening");
        Node::launch(cfg, services, net, stats, server, shutdown, revocations).await
    }

    /// Starts a node inside an in-process [`MemNetwork`] (tests, benchmarks):
    /// the same node code, with the network simulated.
    pub async fn start_in(
        cfg: NodeConfig,
        services: impl Into<Services>,
        network: Arc<MemNetwork>,
    ) -> Result<Node, NodeError> {
        let server = Arc::new(Server::new(&cfg));
        network.register(cfg.node_id, server.clone());
        let net = Arc::new(MemTransport::new(cfg.node_id, network));
        let stats = Arc::new(WireStats::new());
        let (revocations, shutdown) = (Default::default(), CancellationToken::new());
        Node::launch(cfg, services, net, stats, server, shutdown, revocations).await
    }

    async fn launch(
        cfg: NodeConfig,
        services: impl Into<Services>,
        net: Arc<dyn Transport>,
        stats: Arc<WireStats>,
        server: Arc<Server>,
        shutdown: CancellationToken,
        revocations: orrery_trust::Revocations,
    ) -> Result<Node, NodeError> {
        let me = cfg.me().clone();
        let status = NodeStatus {
            node_id: cfg.node_id,
            role: Some(me.role),
            addr: me.addr.clone(),
            stage: Stage::NOT_STARTED.number(),
            started_at_ms: now_ms(),
            config_digests: crate::drift::digests(&cfg),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: (orrery_wire::PROTOCOL_MIN, orrery_wire::PROTOCOL_MAX),
            stage_since_ms: now_ms(),
            ..Default::default()
        };
        // The data directory holds the Raft store and the logs: the node's
        // user only.
        if let Err(e) = crate::private::private_dir(&cfg.data_dir) {
            warn!(target: LOG, "cannot make {} private: {e}", cfg.data_dir.display());
        }
        let contacts = Contacts::new(cfg.quorum.lost_after_ms);
        let mut control = None;
        if me.role.is_voter() {
            let mut cc = ControlConfig::new(cfg.node_id, cfg.data_dir.join("raft"), cfg.voters());
            cc.heartbeat_interval = Duration::from_millis(cfg.raft.heartbeat_ms);
            cc.election_timeout_min = Duration::from_millis(cfg.raft.election_min_ms);
            cc.election_timeout_max = Duration::from_millis(cfg.raft.election_max_ms);
            cc.max_proposal_bytes = cfg.raft.max_proposal_bytes;
            cc.snapshot_chunk_bytes = cfg.raft.snapshot_chunk_bytes;
            cc.max_snapshot_bytes = cfg.raft.max_snapshot_bytes;
            cc.max_message_bytes = cfg.raft_message_bytes();
            cc.write_timeout = Duration::from_millis(cfg.raft.write_timeout_ms);
            let raft_net = RaftOverWire(net.clone(), contacts.clone());
            let c = ControlPlane::start(cc, Arc::new(raft_net)).await?;
            let _ = server.control.set(c.clone());
            control = Some(c);
        }
        let health = health::start(
            cfg.health.clone(),
            cfg.faults.clone(),
            now_ms,
            shutdown.clone(),
        );
        let services: Services = services.into();
        let shards = Arc::new(ShardHost::new(
            cfg.node_id,
            cfg.shards.clone(),
            Duration::from_millis(cfg.membership.self_fence_after_ms),
            services.shards.clone(),
        ));
        let jobs = crate::jobs::JobRunner::new(services.jobs.clone(), services.store.clone());
        let console_ext = services.console.clone();
        let services = services.stages;
        let inner = Arc::new(Inner {
            drift: Mutex::default(),
            backup: Default::default(),
            resources: Mutex::default(),
            alarm_book: Mutex::default(),
            jobs,
            shards,
            contacts,

            stats,
            control,
            control_net: net.sibling(),
            hb_net: net.sibling(),
            net,
            health,
            lease: Lease::new(revocations, server.views.clone()),
            started: tokio::time::Instant::now(),
            fenced_notify: tokio::sync::Notify::new(),
            me: OnceLock::new(),
            watchdog: Watchdog::new(cfg.watchdog.clone()),
            log: OnceLock::new(),
            cluster_log: OnceLock::new(),
            rpc: server.rpc.clone(),
            epoch: AtomicU64::new(0),
            leader_hint: AtomicU64::new(0),
            status: Mutex::new(status),
            leave_phase: AtomicU8::new(RUNNING),
            activity: StageContext::default(),
            coordinator: Mutex::new(None),
            cache: Mutex::new(None),
            services,
            console_ext,
            shutdown,
            cfg,
        });
        if inner.cfg.log_forward.collector == Some(inner.cfg.node_id) {
            match ClusterLog::open(&inner.cfg.data_dir, &inner.cfg.log_forward) {
                Ok(l) => {
                    let _ = inner.cluster_log.set(Arc::new(l));
                }
                Err(e) => warn!(target: LOG, "cannot collect the cluster's logs: {e}"),
            }
        }
        if let Err(e) = crate::private::narrow_dirs(&inner.cfg.data_dir) {
            warn!(target: LOG, "cannot make {} private: {e}", inner.cfg.data_dir.display());
        }
        let _ = server.node.set(inner.clone());
        let _ = inner.me.set(Arc::downgrade(&inner));
        tokio::spawn(sync_shards(inner.clone()));
        if inner.control.is_some() {
            tokio::spawn(coordinate(inner.clone()));
        }
        tokio::spawn(supervise(inner.clone()));
        tokio::spawn(watch_fail_stop(inner.clone()));
        inner.watchdog.spawn(inner.shutdown.clone(), now_ms);
        tokio::spawn(record_alarms(inner.clone()));
        tokio::spawn(crate::backup::run(Node {
            inner: inner.clone(),
        }));
        tokio::spawn(crate::quorum::watch(inner.clone()));
        tokio::spawn(crate::resources::watch(inner.clone()));
        tokio::spawn(crate::drills::run(inner.clone()));
        if inner.cfg.me().role.hosts_services() && !inner.jobs.specs().is_empty() {
            tokio::spawn(crate::jobs::run(inner.clone()));
        }
        lease::spawn_heartbeats(inner.clone(), inner.hb_net.clone());
        Ok(Node { inner })
    }

    /// This node's own view of itself.
    pub fn status(&self) -> NodeStatus {
        self.inner.status_now()
    }

    /// The cluster state, read linearizably from the leader.
    pub async fn cluster_state(&self) -> Result<ClusterState, String> {
        match self.inner.ask(Request::FetchState).await? {
            Reply::State(s) => Ok(*s),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// Stops serving and leaves the control plane cleanly.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        if let Some(c) = &self.inner.control {
            if let Err(e) = c.shutdown().await {
                warn!(target: LOG, "control plane shutdown: {e}");
            }
        }
    }

    /// Leaves the cluster, as SIGTERM asks: drains this node's shards (up
    /// to `shutdown.drain_timeout_ms`), stops serving, then tells the
    /// control plane (`Leave`, up to `shutdown.leave_timeout_ms`), so the
    /// node is never suspected and its shards move at once. It never
    /// rejoins afterwards; call [`Node::shutdown`] next. Every step is
    /// bounded: without a quorum it says why and returns (the node is then
    /// suspected and removed as a silent node would be). `Err` says why the
    /// cluster was not told.
    pub async fn leave(&self) -> Result<(), String> {
        let inner = &self.inner;
        if inner.leave_phase.swap(LEAVING, Ordering::SeqCst) != RUNNING {
            return Err("already leaving".into());
        }
        let me = inner.cfg.node_id;
        let epoch = inner.epoch.load(Ordering::Relaxed);
        if epoch == 0 {
            inner.retire("not joined: nothing to tell the cluster");
            info!(target: LOG, node = me, "leaving: not joined (epoch 0), nothing to tell the cluster");
            return Ok(());
        }
        let sc = inner.cfg.shutdown.clone();
        let started = tokio::time::Instant::now();
        if inner.cfg.me().role.hosts_services() && sc.drain_timeout_ms > 0 {
            inner.set_leaving("draining its shards before it leaves");
            let within = Duration::from_millis(sc.drain_timeout_ms);
            let drained = tokio::time::timeout(within, inner.drain_before_leaving()).await;
            let still = inner.shards.status().assigned;
            match drained {
                Ok(how) => {
                    info!(target: LOG, node = me, epoch, "leaving: {how} ({} ms)", started.elapsed().as_millis())
                }
                Err(_) => {
                    warn!(target: LOG, node = me, epoch, "leaving: drain not done within shutdown.drain_timeout_ms = {} ({still} shard(s) still assigned here); they move once it has left", sc.drain_timeout_ms)
                }
            }
        }
        // Fence first: nothing is served from here on, then the cluster hears of it.
        inner.retire("stopped serving; telling the cluster it leaves");
        let cmd = Command::Leave {
            node: me,
            epoch,
            at: now_ms(),
        };
        let within = Duration::from_millis(sc.leave_timeout_ms);
        let why = match tokio::time::timeout(within, inner.propose(cmd)).await {
            Ok(Ok(Response::Ok)) => {
                inner.set_leaving("left the cluster");
                info!(target: LOG, node = me, epoch, "left the cluster (epoch {epoch} revoked, {} ms): not a failure; what it still owned moves now", started.elapsed().as_millis());
                inner.hand_off_leadership(within).await;
                return Ok(());
            }
            Ok(Ok(Response::Rejected { reason, .. })) => {
                format!("the control plane refused it: {reason}")
            }
            Ok(Ok(other)) => format!("unexpected answer {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no answer within shutdown.leave_timeout_ms = {}",
                sc.leave_timeout_ms
            ),
        };
        let why = format!("could not tell the cluster that node {me} leaves ({why}); exiting anyway: it will be suspected and removed like a silent node");
        inner.set_leaving(why.clone());
        warn!(target: LOG, node = me, epoch, "{why}");
        Err(why)
    }

    /// Calls `call` on `shard` wherever its owner is, within `timeout`.
    pub async fn call(
        &self,
        shard: ShardId,
        call: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        NodeRouter(Arc::downgrade(&self.inner))
            .route(shard, call.to_string(), payload, deadline, vec![])
            .await
    }

    /// Drains (or undrains) `node`: it hands all its shards off and takes
    /// none until undrained. Goes through the control plane.
    pub async fn drain(&self, node: NodeId, drain: bool) -> Result<(), AskError> {
        match self
            .inner
            .propose(Command::Drain {
                node,
                drain,
                at: now_ms(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            Response::Rejected { reason, .. } => Err(AskError::Rejected(reason)),
            other => Err(AskError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Revokes `node`'s certificates below `min_serial` cluster-wide (an
    /// operator's decision, through the console of a voter).
    pub async fn revoke_certificates(&self, node: NodeId, min_serial: u64) -> Result<(), AskError> {
        let cmd = Command::RevokeCertificates {
            node,
            min_serial,
            at: now_ms(),
        };
        match self.inner.propose(cmd).await? {
            Response::Ok => Ok(()),
            Response::Rejected { reason, .. } => Err(AskError::Rejected(reason)),
            other => Err(AskError::Unexpected(format!("{other:?}"))),
        }
    }

    /// `config set KEY VALUE`: changes a cluster-wide key in the replicated
    /// configuration (validated by `apply`, recorded with old and new value).
    pub async fn set_config(&self, key: &str, value: &str) -> Result<(), AskError> {
        let cmd = Command::SetConfig {
            key: key.to_string(),
            value: value.to_string(),
            at: now_ms(),
        };
        match self.inner.propose(cmd).await? {
            Response::Ok => Ok(()),
            Response::Rejected { reason, .. } => Err(AskError::Rejected(reason)),
            other => Err(AskError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Hands Raft leadership to voter `to` (`orrery drill leader`, through
    /// the leader's console); refused on any node but the leader.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), String> {
        let me = self.inner.cfg.node_id;
        let Some(control) = &self.inner.control else {
            return Err(format!("node {me} is not a voter: it holds no leadership"));
        };
        control.transfer_leader(to).await.map_err(|e| e.to_string())
    }

    /// The shard map this node routes by, and what it hosts.
    pub fn shards(&self) -> (Arc<ShardMap>, crate::shards::HostedShards) {
        (self.inner.shards.map(), self.inner.shards.status())
    }

    /// Fault hook for tests: change this node's injected health faults at
    /// run time (e.g. corrupt its health verification).
    pub fn set_health_faults(&self, faults: crate::health::HealthFaults) {
        self.inner.health.set_faults(faults);
    }

    /// Hands the process's logging channels to the node, so the console
    /// and the admin API can read and change them. Once per node.
    /// With `log_forward.collector` set, it also adds the `collector` sink
    /// (this node's warnings to the collector node); call it from within
    /// the node's runtime.
    pub fn attach_log(&self, log: LogChannels) {
        let inner = &self.inner;
        let fwd = &inner.cfg.log_forward;
        if let Some(collector) = fwd.collector {
            let to = if collector == inner.cfg.node_id {
                inner.cluster_log.get().cloned().map(Destination::Local)
            } else {
                tokio::runtime::Handle::try_current()
                    .ok()
                    .map(|runtime| Destination::Remote {
                        collector,
                        net: inner.net.sibling(),
                        runtime,
                    })
            };
            let min_level = orrery_log::parse_level(&fwd.min_level)
                .unwrap_or(tracing::level_filters::LevelFilter::WARN);
            match to {
                Some(to) => {
                    let sink = ForwardSink {
                        me: inner.cfg.node_id,
                        to,
                        min_level,
                        batch_max: fwd.batch_max,
                        timeout: Duration::from_millis(fwd.timeout_ms),
                        batch: Vec::new(),
                    };
                    if let Err(e) = log.add_sink("collector", Box::new(sink)) {
                        warn!(target: LOG, "cannot forward logs to node {collector}: {e}");
                    }
                }
                None => {
                    warn!(target: LOG, "cannot forward logs to node {collector}: no runtime or no cluster log")
                }
            }
        }
        let _ = inner.log.set(log);
    }

    /// The cluster-wide log, if this node collects it.
    pub fn cluster_log(&self) -> Option<Arc<ClusterLog>> {
        self.inner.cluster_log.get().cloned()
    }

    /// The node's watchdog (lag, handlers in flight, alarms).
    pub fn watchdog(&self) -> Arc<Watchdog> {
        self.inner.watchdog.clone()
    }

    /// The configuration this node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Resolves when the node has been asked to shut down.
    pub async fn stopped(&self) {
        self.inner.shutdown.cancelled().await
    }
}

/// The certificate must be this node's, in this cluster, for its role: a
/// node started with another node's directory would otherwise be refused by
/// every peer with a less helpful error.
fn check_certificate(cfg: &NodeConfig, id: &orrery_trust::PeerIdentity) -> Result<(), NodeError> {
    let role = cfg.me().role;
    if id.node_id == cfg.node_id && id.role == role && id.cluster_id.as_str() == cfg.cluster_id {
        return Ok(());
    }
    Err(NodeError::Refused(format!(
        "the certificate in {} is for node {} ({:?}) of cluster {}, this is node {} ({role:?}) of cluster {}",
        cfg.tls_dir().display(),
        id.node_id,
        id.role,
        id.cluster_id.as_str(),
        cfg.node_id,
        cfg.cluster_id
    )))
}

fn wire_config(cfg: &NodeConfig, epoch: u64) -> WireConfig {
    let mut w = WireConfig::new(
        cfg.cluster_id.clone(),
        cfg.secret.as_bytes().to_vec(),
        cfg.node_id,
        epoch,
    );
    w.max_frame_bytes = cfg.rpc.max_frame_bytes;
    w.max_inflight_per_connection = cfg.rpc.max_inflight_per_connection;
    w.max_connections = cfg.rpc.max_connections_for(cfg.nodes.len());
    w.max_handshakes = cfg.rpc.max_handshakes;
    w
}

/// The node's server side, for both transports. It exists before the node
/// is fully built (peers' Raft RPCs arrive while the control plane starts),
/// hence the late binding.
#[derive(Default)]
struct Server {
    /// The roles in this node's own file, for requests that arrive before
    /// the node (and its replicated configuration) is built.
    roles: BTreeMap<NodeId, Role>,
    /// Bumped with every membership view the node installs: open
    /// connections then check their peer's epoch again.
    views: Arc<tokio::sync::watch::Sender<u64>>,
    node: OnceLock<Arc<Inner>>,
    control: OnceLock<ControlPlane<ControlState>>,
    /// RPC counters, refusals included (the node's own, once it is built).
    rpc: RpcMetrics,
}

impl Server {
    fn new(cfg: &NodeConfig) -> Self {
        Server {
            roles: cfg.nodes.iter().map(|n| (n.id, n.role)).collect(),
            ..Default::default()
        }
    }
}

/// What this node knows of the membership when a request arrives, for
/// [`authz`]: a voter's own replica (authoritative while it leads: the
/// leader applies a join before it answers it), else the view its
/// heartbeats bring and the configuration in its address cache.
enum Known {
    Replica {
        state: Arc<ControlState>,
        leading: bool,
    },
    Heard {
        view: Arc<MembershipView>,
        cache: Option<Arc<ClusterState>>,
    },
}

impl Known {
    fn view(&self) -> authz::View<'_> {
        match self {
            Known::Replica { state, leading } => authz::View {
                members: &state.0,
                authoritative: *leading,
            },
            Known::Heard { view, .. } => authz::View {
                members: view.as_ref(),
                authoritative: false,
            },
        }
    }

    /// The replicated configuration, once committed.
    fn config(&self) -> Option<&ClusterState> {
        let state = match self {
            Known::Replica { state, .. } => Some(&state.0),
            Known::Heard { cache, .. } => cache.as_deref(),
        };
        state.filter(|s| s.configured)
    }
}

impl Server {
    fn known(&self) -> Known {
        if let Some(c) = self.control.get() {
            let leading = c.is_leader();
            return Known::Replica {
                state: c.state().state,
                leading,
            };
        }
        match self.node.get() {
            Some(n) => Known::Heard {
                view: n.lease.view(),
                cache: n.cache.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            },
            None => Known::Heard {
                view: Arc::default(),
                cache: None,
            },
        }
    }

    /// Who calls: node and epoch from the connection, never from the
    /// message; the role from the replicated configuration, else this
    /// node's own file.
    fn caller(&self, known: &Known, node: NodeId, epoch: u64) -> Caller {
        let role = match known.config() {
            Some(state) => state.role_of(node),
            None => self.roles.get(&node).copied(),
        };
        Caller { node, epoch, role }
    }

    /// Answers a refused request (`Fenced` for a fenced process, else
    /// `Error`), counted by reason and logged at debug with it.
    fn refuse(&self, caller: &Caller, what: &str, refusal: Refusal) -> Reply {
        let reason = refusal.kind();
        self.rpc.refused(reason);
        debug!(target: LOG, node = caller.node, epoch = caller.epoch, reason, "refused {what} from node {}: {refusal}", caller.node);
        if refusal.fences() {
            Reply::Fenced {
                reason: refusal.to_string(),
            }
        } else {
            Reply::Error(refusal.to_string())
        }
    }

    /// Every request passes [`authz::authorize`] first; only then does it
    /// count as contact with its sender, and reach Raft or the node.
    async fn dispatch(&self, from: NodeId, epoch: u64, req: Request) -> Reply {
        let raft = matches!(req, Request::Raft(_));
        if self.node.get().is_none() && !raft {
            return Reply::Error("node still starting".into());
        }
        let known = self.known();
        let caller = self.caller(&known, from, epoch);
        if let Err(refusal) = authz::authorize(&caller, &req, &known.view()) {
            return self.refuse(&caller, req.kind(), refusal);
        }
        drop(known);
        if let Some(n) = self.node.get() {
            n.contacts.heard(from);
            if matches!(req, Request::Ping) {
                n.contacts.pinged(from);
            }
        }
        if let Request::Raft(bytes) = req {
            return match self.control.get() {
                Some(c) => Reply::Raft(c.handle_rpc(bytes).await.map_err(|e| e.to_string())),
                None => Reply::Raft(Err("control plane not started yet".into())),
            };
        }
        let Some(n) = self.node.get() else {
            return Reply::Error("node still starting".into());
        };
        if n.shutdown.is_cancelled() {
            return Reply::Error("node shutting down".into());
        }
        let kind = req.kind();
        let what = match &req {
            Request::ShardCall { shard, call, .. } => {
                format!("rpc shard_call {shard} {call} from node {from}")
            }
            _ => format!("rpc {kind} from node {from}"),
        };
        let _guard = n.watchdog.begin(what);
        let started = tokio::time::Instant::now();
        let reply = n.handle(from, req).await;
        n.rpc
            .observe(kind, started.elapsed(), matches!(reply, Reply::Error(_)));
        reply
    }
}

/// Records the watchdog's alarms (and log sinks that drop lines) in the
/// cluster's timeline, at most one per `watchdog.alarm_interval_ms`.
async fn record_alarms(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dropped_before: BTreeMap<String, u64> = BTreeMap::new();
    let mine = inner.cfg.cluster_config();
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        inner.refresh_stale_cache().await;
        inner.check_drift(&mine);
        if let Some(log) = inner.log.get() {
            for sink in log.stats().sinks {
                let before = dropped_before
                    .insert(sink.name.clone(), sink.dropped)
                    .unwrap_or(0);
                if sink.dropped > before {
                    inner.watchdog.raise(
                        now_ms(),
                        format!(
                            "log sink {} dropped {} lines{}",
                            sink.name,
                            sink.dropped - before,
                            if sink.stalled {
                                " (sink stalled)"
                            } else {
                                " (sink slower than the logging)"
                            }
                        ),
                    );
                }
            }
        }
        let epoch = inner.epoch.load(Ordering::Relaxed);
        if epoch != 0 {
            record_alarm_outbox(&inner, epoch).await;
        }
    }
}

/// Commits the watchdog's pending alarms in order; the first that fails
/// goes back with the rest, to be tried next second (an alarm about a
/// voter's own dead Raft core needs the other voters, and may need a
/// moment to find them).
async fn record_alarm_outbox(inner: &Inner, epoch: u64) {
    let mut pending = inner.watchdog.take_alarms().into_iter();
    while let Some(alarm) = pending.next() {
        let cmd = Command::Alarm {
            node: inner.cfg.node_id,
            epoch,
            what: alarm.what.clone(),
            at: alarm.at_ms,
        };
        if let Err(e) = inner.propose(cmd).await {
            debug!(target: LOG, "could not record an alarm (tried again next second): {e}");
            for a in std::iter::once(alarm)
                .chain(pending)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                inner.watchdog.requeue(a);
            }
            return;
        }
    }
}

impl Handler<Request, Reply> for Server {
    fn handle<'a>(&'a self, peer: &'a PeerInfo, req: Request) -> BoxFuture<'a, Reply> {
        Box::pin(self.dispatch(peer.node_id, peer.epoch, req))
    }

    /// The handshake refuses strangers and fenced processes (superseded,
    /// revoked); each request is then authorised on its own.
    fn admit(&self, peer: &PeerInfo) -> Result<(), AdmitError> {
        if self.node.get().is_none() {
            return Ok(()); // Nothing to judge by yet; requests wait for the node.
        }
        let known = self.known();
        let caller = self.caller(&known, peer.node_id, peer.epoch);
        let certified = peer.cert.as_ref().map(|c| c.role);
        authz::admit(&caller, certified, &known.view()).map_err(|refusal| {
            let reason = refusal.kind();
            self.rpc.refused(reason);
            debug!(target: LOG, node = caller.node, epoch = caller.epoch, reason, "refused a connection: {refusal}");
            if refusal.fences() {
                AdmitError::Fenced(refusal.to_string())
            } else {
                AdmitError::Refused(refusal.to_string())
            }
        })
    }

    fn admission(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.views.subscribe())
    }
}

impl Endpoint for Server {
    fn deliver(&self, from: NodeId, epoch: u64, req: Request) -> BoxFuture<'_, Reply> {
        Box::pin(self.dispatch(from, epoch, req))
    }
}

impl Inner {
    pub(crate) fn status_now(&self) -> NodeStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let a = self.activity.snapshot();
        s.waiting = a.waiting;
        s.progress = a.progress;
        s.wire = self.stats.snapshot();
        s.serving = self.serving();
        s.services = if self.cfg.me().role.hosts_services() {
            self.services
                .iter()
                .map(|svc| svc.name().to_string())
                .collect()
        } else {
            vec![]
        };
        s.health = Some(self.health.report());
        s.jobs = self.jobs.stats();
        s.membership_version = self.lease.view().version;
        s.config_drift = self
            .drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        s.refused = self.rpc.refusals();
        s.ignored_accusations = self
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.ignored_accusations())
            .unwrap_or(0);
        s.no_quorum = self.no_quorum();
        s.control_alarms = self.contacts.alarms();
        s.backup = self.backup.status(now_ms());
        if let Some(c) = &self.control {
            s.raft_digest = Some(c.state_digest());
            s.raft_catching_up = c.is_catching_up();
        }
        s.is_leader = self.is_leading();
        // A leader not heard from within the election timeout is not named.
        s.leader = match &s.no_quorum {
            Some(_) => None,
            None => self.known_leader(),
        };
        let conditions = self.alarm_conditions(&s);
        s.alarms = self
            .alarm_book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(self.cfg.node_id, now_ms(), conditions);
        s
    }

    /// Every condition this node alarms about now, from where each is kept.
    fn alarm_conditions(&self, s: &NodeStatus) -> Vec<crate::alarms::Condition> {
        use crate::alarms::{Condition, Severity::*};
        use crate::quorum::AlarmKey as K;
        let cond = |kind, subject: String, severity, what: String, since_ms| Condition {
            kind,
            subject,
            severity,
            what,
            since_ms,
        };
        let mut out: Vec<Condition> = self
            .contacts
            .keyed_alarms()
            .into_iter()
            .map(|(key, a)| {
                let (kind, subject, severity) = match key {
                    K::NoQuorum => ("no_quorum", String::new(), Critical),
                    K::Replication(v) => ("replication", v.to_string(), Warning),
                    K::SlowProposal => ("slow_proposal", String::new(), Warning),
                    K::VoterDown => ("voter_down", String::new(), Critical),
                    K::Resource(w) => {
                        let critical = s.resources.iter().any(|f| {
                            f.watched == w && f.level == crate::resources::Level::Critical
                        });
                        (
                            "resource",
                            w.name().to_string(),
                            if critical { Critical } else { Warning },
                        )
                    }
                };
                cond(kind, subject, severity, a.what, Some(a.at_ms))
            })
            .collect();
        if !s.config_drift.is_empty() {
            let what = crate::drift::alarm_text(self.cfg.node_id, &s.config_drift);
            out.push(cond("drift", String::new(), Warning, what, None));
        }
        if let Some(why) = s.backup.as_ref().and_then(|b| b.alarm()) {
            out.push(cond("backup", String::new(), Critical, why, None));
        }
        if let Some(log) = self.log.get() {
            for sink in log.stats().sinks.into_iter().filter(|k| k.stalled) {
                let what = format!(
                    "log sink {} stalled: lines are dropped and counted",
                    sink.name
                );
                out.push(cond("log_sink", sink.name, Warning, what, None));
            }
        }
        if let Some(h) = &s.health {
            if !h.state.reasons().is_empty() {
                let severity = if h.state.is_fail_stop() {
                    Critical
                } else {
                    Warning
                };
                let what = format!("self-checks failing: {}", h.state.reasons().join("; "));
                out.push(cond("health", String::new(), severity, what, None));
            }
        }
        out
    }

    /// Leaving while it leads: hands Raft leadership to the voter heard
    /// from most recently and waits (at most `within`) until it no longer
    /// leads, so the cluster does not sit out an election timeout.
    async fn hand_off_leadership(&self, within: Duration) {
        let Some(control) = self.control.as_ref().filter(|c| c.is_leader()) else {
            return;
        };
        let me = self.cfg.node_id;
        let voters: Vec<NodeId> = control.voters().into_keys().collect();
        let peers = self.contacts.snapshot(&voters).peers;
        let to = voters
            .into_iter()
            .filter(|v| *v != me)
            .max_by_key(|v| peers.get(v).map_or(0, |c| c.heard_mono));
        let Some(to) = to else { return };
        let handed = tokio::time::timeout(within, async {
            control
                .transfer_leader(to)
                .await
                .map_err(|e| e.to_string())?;
            while control.is_leader() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<(), String>(())
        })
        .await;
        match handed {
            Ok(Ok(())) => info!(target: LOG, "leaving: leadership handed to node {to}"),
            Ok(Err(e)) => {
                warn!(target: LOG, "leaving: handing leadership to node {to} failed: {e}; the others elect a leader")
            }
            Err(_) => {
                warn!(target: LOG, "leaving: node {to} did not take leadership within {within:?}; the others elect a leader")
            }
        }
    }

    /// `alarm ack NAME` (`kind` or `kind:subject`): false if none in force.
    pub(crate) fn ack_alarm(&self, name: &str) -> bool {
        self.status_now();
        self.alarm_book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ack(name)
    }

    /// Every service's own counters, for `/metrics`.
    pub(crate) fn service_counters(&self) -> Vec<crate::service::ServiceCounter> {
        self.services.iter().flat_map(|s| s.counters()).collect()
    }

    /// Whether this node leads the control plane (as openraft sees it).
    pub(crate) fn is_leading(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.is_leader())
    }

    /// The leader this node knows of, if it heard from it recently: within
    /// the election timeout (a worker: two heartbeat intervals, if longer).
    fn known_leader(&self) -> Option<NodeId> {
        let me = self.cfg.node_id;
        let (leader, within) = match &self.control {
            Some(c) => (c.current_leader(), self.cfg.raft.election_max_ms),
            None => {
                let hint = self.leader_hint.load(Ordering::Relaxed);
                let hb = self.cfg.membership.heartbeat_interval_ms.saturating_mul(2);
                (
                    (hint != 0).then_some(hint),
                    hb.max(self.cfg.raft.election_max_ms),
                )
            }
        };
        leader.filter(|l| *l == me || self.contacts.heard_within(*l, within))
    }

    /// Whether this node sees a quorum: `Some` names whom it can reach.
    pub(crate) fn no_quorum(&self) -> Option<NoQuorum> {
        // A voter whose Raft core is stopped hears no Raft traffic: its own
        // view of the quorum says nothing (`voter_down` says why), and its
        // proposals (the alarm about it) must still try the other voters.
        if self.control.as_ref().is_some_and(|c| c.health().is_err()) {
            return None;
        }
        let voters: Vec<NodeId> = self.cfg.voters().keys().copied().collect();
        let leading_ack_age_ms = self.control.as_ref().filter(|c| c.is_leader()).map(|c| {
            c.quorum_ack_age()
                .map_or(u64::MAX, |a| a.as_millis() as u64)
        });
        let inputs = crate::quorum::Inputs {
            me: self.cfg.node_id,
            voters: &voters,
            leading_ack_age_ms,
            lost_after_ms: self.cfg.quorum.lost_after_ms,
        };
        crate::quorum::assess(&inputs, &self.contacts.snapshot(&voters))
    }

    /// Monotonic milliseconds since this process started.
    /// The freshest cluster state this node holds without asking anyone:
    /// a voter's own applied replica, else the address cache it fetched.
    /// Not linearizable: for metrics and displays, never for decisions.
    pub(crate) fn local_state(&self) -> Option<Arc<ClusterState>> {
        if let Some(c) = &self.control {
            return Some(Arc::new(c.state().state.0.clone()));
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A node without a replica refetches its copy of the cluster state
    /// when the membership view says the configuration changed since.
    async fn refresh_stale_cache(&self) {
        if self.control.is_some() {
            return;
        }
        let have = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.config_index);
        let Some(have) = have else { return };
        if self.lease.view().config_index <= have {
            return;
        }
        match self.ask(Request::FetchState).await {
            Ok(Reply::State(state)) => {
                *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(*state));
            }
            Ok(other) => debug!(target: LOG, "refetch after a config change: unexpected {other:?}"),
            Err(e) => debug!(target: LOG, "refetch after a config change: {e}"),
        }
    }

    /// Compares this node's cluster-wide keys with the replicated ones and
    /// raises an alarm naming each difference when the set changes (again
    /// next second if the watchdog's alarm budget held it back).
    fn check_drift(&self, mine: &orrery_core::ClusterConfig) {
        let compare =
            |s: &ClusterState| s.configured.then(|| crate::drift::compare(mine, &s.config));
        let now = match &self.control {
            Some(c) => compare(&c.state().state.0),
            None => {
                let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
                cached.as_deref().and_then(compare)
            }
        };
        let Some(now) = now else {
            return;
        };
        let mut d = self.drift.lock().unwrap_or_else(|e| e.into_inner());
        if now == d.1 {
            d.0 = now;
            return;
        }
        if now.is_empty() {
            info!(target: LOG, "config drift resolved: this node's file agrees with the cluster again");
            *d = (vec![], vec![]);
            return;
        }
        let text = crate::drift::alarm_text(self.cfg.node_id, &now);
        if self.watchdog.raise(now_ms(), text).is_some() {
            d.1 = now.clone();
        }
        d.0 = now;
    }

    pub(crate) fn mono_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether this process has completed start-up (stage 0).
    pub(crate) fn ready(&self) -> bool {
        let st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.stage == Stage::READY.number()
    }

    /// Serving: ready, not fenced, and the lease is fresh.
    pub(crate) fn serving(&self) -> bool {
        let st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.stage == Stage::READY.number()
            && st.fenced.is_none()
            && !self.retired()
            && !self.lease.is_fenced()
            && self
                .lease
                .fresh(self.mono_ms(), self.cfg.membership.self_fence_after_ms)
    }

    /// Whether this node may serve shard calls: not fenced, lease fresh, and
    /// past stage -2 (it holds the shard map). Shards load during stage -1
    /// and call each other while loading (a campaign system asks its
    /// alliance for the capital), so serving must not wait for stage 0;
    /// ownership safety comes from the lease and the ownership epoch.
    pub(crate) fn serves_shards(&self) -> bool {
        let st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.stage >= Stage::ADDRESSED.number()
            && st.fenced.is_none()
            && !self.retired()
            && !self.lease.is_fenced()
            && self
                .lease
                .fresh(self.mono_ms(), self.cfg.membership.self_fence_after_ms)
    }

    /// Serves a call for a shard that should live here: only while this node
    /// serves shards (fresh lease, not fenced, map held).
    async fn serve_shard(
        self: &Inner,
        shard: ShardId,
        epoch: Option<u64>,
        call: String,
        payload: Vec<u8>,
        deadline: tokio::time::Instant,
        chain: Vec<Hop>,
    ) -> Result<Vec<u8>, CallError> {
        let refused = if self.serves_shards() {
            None
        } else if self.retired() {
            Some(format!("node {} is leaving the cluster", self.cfg.node_id))
        } else {
            Some(
                self.status_now()
                    .fenced
                    .unwrap_or_else(|| "its lease is not fresh (self-fenced)".into()),
            )
        };
        let router = self.router();
        let ctx = CallCtx::new(deadline, chain, router);
        let mut detected = None;
        let r = self
            .shards
            .serve(shard, epoch, call, payload, ctx, refused, |cycle| {
                detected = Some(cycle.to_vec())
            })
            .await;
        if let Some(cycle) = detected {
            warn!(target: LOG, "wait cycle detected: {}", CallError::Deadlock { cycle: cycle.clone() });
            let cmd = Command::Deadlock {
                cycle: orrery_core::state::limits::clip_list(
                    cycle.iter().map(|h| h.to_string()).collect(),
                    orrery_core::state::limits::MAX_CYCLE_ENTRIES,
                    orrery_core::state::limits::MAX_CYCLE_ENTRY,
                ),
                at: now_ms(),
            };
            let _ = self.propose(cmd).await;
        }
        r
    }

    fn router(&self) -> Option<Arc<dyn Router>> {
        self.me
            .get()
            .and_then(|w| w.upgrade())
            .map(|n| Arc::new(NodeRouter(Arc::downgrade(&n))) as Arc<dyn Router>)
    }

    /// Fetches the shard map from the leader and adopts it.
    async fn refresh_shards(&self) -> Result<(), String> {
        match self.ask(Request::FetchShards).await? {
            Reply::Shards(map) => {
                if let Some(router) = self.router() {
                    self.shards.adopt(Arc::new(*map), router);
                }
                Ok(())
            }
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// Every transport announces `epoch` from now on.
    fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
        for t in [&self.net, &self.control_net, &self.hb_net] {
            t.set_epoch(epoch);
        }
    }

    /// Leaving (SIGTERM): this process never rejoins.
    pub(crate) fn leaving(&self) -> bool {
        self.leave_phase.load(Ordering::SeqCst) != RUNNING
    }

    /// Leaving and past its drain: it serves nothing any more.
    fn retired(&self) -> bool {
        self.leave_phase.load(Ordering::SeqCst) == RETIRED
    }

    fn set_leaving(&self, what: impl Into<String>) {
        let what = what.into();
        self.watchdog
            .set_doing("supervisor", format!("leaving: {what}"));
        self.update_status(|s| s.leaving = Some(what));
    }

    /// Stops serving for good (shards, jobs): the step before `Leave`.
    fn retire(&self, what: &str) {
        self.leave_phase.store(RETIRED, Ordering::SeqCst);
        self.set_leaving(what);
    }

    /// Drains this node and waits until the committed map gives it no
    /// shard, or no other node could take them (the whole cluster is
    /// stopping). Unbounded by itself: [`Node::leave`] bounds it. Says how
    /// it ended.
    async fn drain_before_leaving(&self) -> String {
        let me = self.cfg.node_id;
        let cmd = Command::Drain {
            node: me,
            drain: true,
            at: now_ms(),
        };
        match self.propose(cmd).await {
            Ok(Response::Ok) => {}
            // Already draining (an operator asked): wait for it the same way.
            Ok(Response::Rejected { reason, .. }) if reason == "no change" => {}
            Ok(Response::Rejected { reason, .. }) => return format!("drain refused ({reason})"),
            Ok(other) => return format!("drain: unexpected answer {other:?}"),
            Err(e) => return format!("cannot drain ({e})"),
        }
        loop {
            match self.ask(Request::FetchState).await {
                Ok(Reply::State(s)) => {
                    let owned = s.shards.entries.values().filter(|e| e.owner == me).count();
                    if owned == 0 {
                        return "its shards were handed off".into();
                    }
                    if !s.members.keys().any(|id| *id != me && s.may_host(*id)) {
                        return format!("no other node can take its {owned} shard(s)");
                    }
                }
                Ok(other) => debug!(target: LOG, "leaving: unexpected state reply {other:?}"),
                Err(AskError::NoQuorum(nq)) => return format!("drain stopped: {nq}"),
                Err(e) => debug!(target: LOG, "leaving: cannot read the cluster state: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster revoked this process's epoch (or it stopped itself): stop
    /// serving at once and let start-up rejoin under a new epoch.
    pub(crate) fn fence(&self, reason: String) {
        self.lease.set_fenced(true);
        self.update_status(|s| s.fenced = Some(reason));
        self.fenced_notify.notify_waiters();
        self.fenced_notify.notify_one();
    }

    pub(crate) fn control_plane(&self) -> Option<&ControlPlane<ControlState>> {
        self.control.as_ref()
    }

    /// Publishes a resource sample, what is past a threshold, and whether
    /// this voter's Raft core is down.
    pub(crate) fn set_resources(
        &self,
        s: crate::resources::Sample,
        found: Vec<crate::resources::Finding>,
        voter_down: Option<String>,
    ) {
        *self.resources.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        self.update_status(|st| {
            st.resources = found;
            st.voter_down = voter_down;
        });
    }

    pub(crate) fn resource_sample(&self) -> Option<crate::resources::Sample> {
        self.resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update_status(&self, f: impl FnOnce(&mut NodeStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Server side of every non-Raft request from node `from`, once
    /// `authz` let it through. A node that does not lead answers
    /// control-plane requests with who leads (`Inner::ask` follows it) and
    /// forwards nothing: the leader authorises every proposer on its own
    /// connection, so no hop can lend a request its identity.
    async fn handle(&self, from: NodeId, req: Request) -> Reply {
        match req {
            Request::Ping => Reply::Pong,
            Request::ShardCall {
                shard,
                epoch,
                call,
                payload,
                deadline_ms,
                chain,
            } => {
                let deadline =
                    tokio::time::Instant::now() + Duration::from_millis(u64::from(deadline_ms));
                Reply::ShardReply(
                    self.serve_shard(shard, epoch, call, payload, deadline, chain)
                        .await,
                )
            }
            Request::Logs(lines) => match self.cluster_log.get() {
                Some(log) => {
                    log.accept(lines);
                    Reply::Ok
                }
                None => Reply::Error(format!(
                    "node {} is not the log collector",
                    self.cfg.node_id
                )),
            },
            Request::HealthProbe { nonce } => Reply::HealthProof(self.health.proof(nonce)),
            Request::Probe { suspect, .. } => {
                lease::probe(self, self.control_net.as_ref(), suspect).await
            }
            Request::Raft(_) => Reply::Error("routed by Server".into()),
            req => match &self.control {
                Some(c) => self.control_request(c, from, req).await,
                None => Reply::Error(format!("node {} is not a voter", self.cfg.node_id)),
            },
        }
    }

    /// The requests only the leader answers (on a voter).
    async fn control_request(
        &self,
        c: &ControlPlane<ControlState>,
        from: NodeId,
        req: Request,
    ) -> Reply {
        let not_leader = || Reply::NotLeader {
            leader: c.current_leader(),
        };
        match req {
            Request::FetchShards | Request::Participants if !c.is_leader() => not_leader(),
            Request::Participants => {
                let view = c.state();
                let state = &view.state.0;
                let ids = state.participants();
                let lagging = state.laggards(Stage::CONNECTED);
                let connected = ids
                    .iter()
                    .copied()
                    .filter(|p| !lagging.contains(p))
                    .collect();
                Reply::Participants { ids, connected }
            }
            Request::FetchShards => {
                Reply::Shards(Box::new(ShardMap::clone(&c.state().state.0.shards)))
            }
            Request::Accuse { .. } | Request::Poll { .. } if !c.is_leader() => not_leader(),
            Request::Accuse {
                suspect,
                epoch,
                detail,
            } => {
                if let Some(co) = self
                    .coordinator
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    co.on_accusation(from, suspect, epoch, detail);
                }
                Reply::Pong
            }
            Request::Heartbeat {
                node,
                epoch,
                health,
                view_version,
            } => self.renew_lease(c, node, epoch, health, view_version),
            Request::Propose(cmd) => self.commit(c, cmd).await,
            Request::Poll { node, epoch, next } => {
                self.contact(node, epoch);
                Reply::Gate {
                    gate: c.state().state.0.gate(node, epoch, next),
                    next,
                }
            }
            Request::FetchState => match c.read_linearizable().await {
                Ok(v) => Reply::State(Box::new(v.state.0.clone())),
                Err(ControlError::NotLeader { leader }) => Reply::NotLeader {
                    leader: leader.map(|(id, _)| id),
                },
                Err(e) => Reply::Error(e.to_string()),
            },
            other => Reply::Error(format!("{} is not a control-plane request", other.kind())),
        }
    }

    /// The leader renews `node`'s lease (process `hb_epoch`): only while a
    /// quorum follows it and the coordinator is not removing the node.
    fn renew_lease(
        &self,
        c: &ControlPlane<ControlState>,
        node: NodeId,
        hb_epoch: u64,
        health: orrery_core::Health,
        view_version: u64,
    ) -> Reply {
        if !c.is_leader() {
            return Reply::NotLeader {
                leader: c.current_leader(),
            };
        }
        // The rule is `orrery_core::lease`, which the simulator runs too.
        let quorum_fresh = c
            .quorum_ack_age()
            .is_some_and(|age| age.as_millis() as u64 <= self.cfg.raft.election_min_ms);
        let state = c.state();
        let hb = orrery_core::lease::Heartbeat {
            node,
            epoch: hb_epoch,
            health,
        };
        let answer = orrery_core::lease::answer_heartbeat(
            now_ms(),
            quorum_fresh,
            &state.state.0,
            self.coordinator
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut(),
            hb,
        );
        use orrery_core::lease::LeaseAnswer as A;
        match answer {
            A::NotLeader => Reply::NotLeader { leader: None },
            // `authz` refuses a fenced epoch before this on the same replica.
            A::Fenced { reason, .. } => Reply::Error(format!(
                "lease of node {node} epoch {hb_epoch} not renewed: {reason}"
            )),
            A::NotVouched => Reply::Error(format!(
                "lease of node {node} epoch {hb_epoch} not renewed: the coordinator is removing it or not yet coordinating"
            )),
            A::Renewed {
                shards_version,
                jobs,
            } => {
                let view = self.lease.view();
                Reply::HeartbeatAck {
                    view: (view.version != view_version).then(|| Box::new((*view).clone())),
                    shards_version,
                    jobs,
                }
            }
        }
    }

    /// Writes a peer's proposal (`authz` let it through) on the leader.
    async fn commit(&self, c: &ControlPlane<ControlState>, cmd: Command) -> Reply {
        // Budgets and windows in `apply` run on proposers' clocks: a
        // command dated beyond the allowed skew is refused here, so a
        // node whose clock runs ahead (or a hostile one) cannot use
        // up the cluster's alarm budget with far-future dates.
        let (at, now) = (cmd.at(), now_ms());
        let skew = self.cfg.raft.max_clock_skew_ms;
        if c.is_leader() && at > now.saturating_add(skew) {
            return Reply::Error(format!(
                "proposal dated {} ms ahead of the leader's clock (raft.max_clock_skew_ms = {skew})",
                at - now
            ));
        }
        match c.write(cmd.clone()).await {
            Ok((index, response)) => {
                // Liveness counts only for a report that passed validation.
                if let (Command::Report { node, epoch, .. }, Response::Ok) = (&cmd, &response) {
                    self.contact(*node, *epoch);
                }
                Reply::Committed { index, response }
            }
            Err(ControlError::NotLeader { leader }) => Reply::NotLeader {
                leader: leader.map(|(id, _)| id),
            },
            Err(e) => Reply::Error(e.to_string()),
        }
    }

    fn contact(&self, node: NodeId, epoch: u64) {
        if let Some(c) = self
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            c.on_contact(now_ms(), node, epoch);
        }
    }

    /// Sends a control-plane request to the leader, following "not leader"
    /// hints; tries each voter at most twice. Refused at once while this
    /// node has joined and sees no quorum: its heartbeats keep looking, and
    /// the first renewed lease lifts the refusal. A proposal still waiting
    /// after `quorum.slow_proposal_ms` raises an alarm naming the cause.
    async fn ask(&self, req: Request) -> Result<Reply, AskError> {
        if self.epoch.load(Ordering::Relaxed) != 0 {
            if let Some(nq) = self.no_quorum() {
                return Err(AskError::NoQuorum(nq));
            }
        }
        let proposal = match &req {
            Request::Propose(cmd) => Some(cmd.name()),
            _ => None,
        };
        let slow = Duration::from_millis(self.cfg.quorum.slow_proposal_ms);
        let asked = self.ask_voters(req);
        tokio::pin!(asked);
        let result = match &proposal {
            None => asked.await,
            Some(name) => tokio::select! {
                r = &mut asked => {
                    if r.is_ok() {
                        self.contacts.clear_alarm(crate::quorum::AlarmKey::SlowProposal);
                    }
                    r
                }
                _ = tokio::time::sleep(slow) => {
                    crate::quorum::slow_proposal(self, name, slow);
                    asked.await
                }
            },
        };
        result.map_err(|last| match self.no_quorum() {
            Some(nq) => AskError::NoQuorum(nq),
            None => AskError::Unreachable(last),
        })
    }

    /// [`Self::ask`]'s tries; the error is the last failure. Every answer
    /// (and every failure) is a contact with that voter; a commit or a
    /// linearizable read proves a working quorum.
    async fn ask_voters(&self, req: Request) -> Result<Reply, String> {
        let voters: Vec<NodeId> = self.cfg.voters().keys().copied().collect();
        let mut last = String::from("no voter configured");
        for attempt in 0..(2 * voters.len() + 1) {
            let hint = self.leader_hint.load(Ordering::Relaxed);
            let target = if hint != 0 {
                hint
            } else {
                voters[attempt % voters.len()]
            };
            let reply = self
                .net
                .call(target, req.clone(), self.cfg.call_timeout())
                .await;
            match &reply {
                Ok(Reply::Committed { .. } | Reply::State(_)) => {
                    self.contacts.heard(target);
                    self.contacts.quorum_seen();
                }
                Ok(_) => self.contacts.heard(target),
                Err(e) => self.contacts.failed(target, &e.to_string()),
            }
            match reply {
                Ok(Reply::NotLeader { leader }) => {
                    let next = leader
                        .filter(|l| *l != target)
                        .unwrap_or(voters[(attempt + 1) % voters.len()]);
                    self.leader_hint.store(next, Ordering::Relaxed);
                    last = format!("node {target} is not the leader");
                    if leader.is_none() {
                        tokio::time::sleep(Duration::from_millis(
                            self.cfg.startup.poll_interval_ms,
                        ))
                        .await;
                    }
                }
                Ok(Reply::Error(e)) => {
                    self.leader_hint.store(0, Ordering::Relaxed);
                    last = format!("node {target}: {e}");
                    tokio::time::sleep(Duration::from_millis(self.cfg.startup.poll_interval_ms))
                        .await;
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.leader_hint
                        .store(voters[(attempt + 1) % voters.len()], Ordering::Relaxed);
                    last = format!("node {target}: {e}");
                }
            }
        }
        Err(last)
    }

    pub(crate) async fn propose(&self, cmd: Command) -> Result<Response, AskError> {
        match self.ask(Request::Propose(cmd)).await? {
            Reply::Committed { response, .. } => Ok(response),
            other => Err(AskError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn report(&self) -> Result<Response, AskError> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let s = self.status_now();
        let stage = Stage::from_number(s.stage).unwrap_or(Stage::NOT_STARTED);
        self.propose(Command::Report {
            node: self.cfg.node_id,
            epoch,
            stage,
            waiting: s.waiting,
            progress: s.progress,
            unreachable: s.unreachable,
            at: now_ms(),
        })
        .await
    }

    fn interval(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

/// The coordinator loop, on every voter; acts only while leader.
async fn coordinate(node: Arc<Inner>) {
    let control = node.control.clone().expect("voters only");
    let mut tick = tokio::time::interval(Inner::interval(node.cfg.startup.coordinator_tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut doing = "";
    let mut job_declaration_refused = false;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_doing = if control.is_leader() {
            "leading: start-up barrier, failure detection, shard placement"
        } else {
            "following the leader"
        };
        if now_doing != doing {
            node.watchdog.set_doing("coordinator", now_doing);
            doing = now_doing;
        }
        if !control.is_leader() {
            node.coordinator
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            continue;
        }
        let term = control.current_term();
        let state = control.state().state;
        if !state.0.configured {
            let cmd = Command::Configure {
                config: node.cfg.cluster_config(),
                at: now_ms(),
            };
            if let Err(e) = control.write(cmd).await {
                debug!(target: LOG, "configure: {e}");
            }
            continue;
        }
        lease::refresh_view(&node, &state.0);
        // The leader declares the shard kinds its services own.
        let kinds = node.shards.kinds();
        if !kinds.is_empty() && state.0.shards.kinds != kinds {
            let cmd = Command::DeclareShards {
                kinds,
                at: now_ms(),
            };
            if let Err(e) = control.write(cmd).await {
                debug!(target: LOG, "declare shards: {e}");
            }
            continue;
        }
        // ... and the per-period jobs they define (once: when the
        // replicated declaration differs). A declaration the control plane
        // would refuse is reported once and not proposed.
        let specs = node.jobs.specs();
        if !specs.is_empty() && state.0.jobs.specs() != specs {
            if let Err(e) = orrery_core::jobs::validate_declaration(specs) {
                if !job_declaration_refused {
                    warn!(target: LOG, "the services' jobs are not declared: {e}");
                    job_declaration_refused = true;
                }
            } else {
                let cmd = Command::DeclareJobs {
                    jobs: specs.to_vec(),
                    at: now_ms(),
                };
                match control.write(cmd).await {
                    Ok((_, Response::Rejected { reason, .. })) => {
                        warn!(target: LOG, "job declaration rejected: {reason}")
                    }
                    Ok(_) => info!(target: LOG, jobs = specs.len(), "declared the services' jobs"),
                    Err(e) => debug!(target: LOG, "declare jobs: {e}"),
                }
                continue;
            }
        }
        // The coordinator's own health counts like anyone's: an impaired
        // leader accuses, excludes and removes nobody (`tick_impaired`).
        let me = node.cfg.node_id;
        let my_health = lease::verdict(&node.health.report().state);
        let my_epoch = node.epoch.load(Ordering::Relaxed);
        let (cmds, probes) = {
            let mut guard = node.coordinator.lock().unwrap_or_else(|e| e.into_inner());
            if guard.as_ref().map(|c| c.term()) != Some(term) {
                info!(target: LOG, term, "this node now coordinates start-up");
                *guard = Some(Coordinator::new(me, term, now_ms()));
            }
            let co = guard.as_mut().expect("just set");
            if my_epoch > 0 {
                co.on_heartbeat(now_ms(), me, my_epoch, my_health.clone());
            }
            if my_health.is_healthy() {
                (co.tick(now_ms(), &state.0), co.take_probes())
            } else {
                (co.tick_impaired(now_ms(), &state.0), vec![])
            }
        };
        for p in probes {
            let node = node.clone();
            tokio::spawn(async move {
                let timeout = Duration::from_millis(3 * node.cfg.membership.probe_timeout_ms);
                let reply = if p.prober == node.cfg.node_id {
                    Ok(lease::probe(&node, node.control_net.as_ref(), p.suspect).await)
                } else {
                    let req = Request::Probe {
                        round: p.round,
                        suspect: p.suspect,
                        epoch: p.epoch,
                    };
                    node.control_net.call(p.prober, req, timeout).await
                };
                if let Ok(Reply::ProbeResult { ok, detail }) = reply {
                    info!(target: LOG, prober = p.prober, suspect = p.suspect, ok, "probe result {detail}");
                    if let Some(co) = node
                        .coordinator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                    {
                        co.on_probe_result(p.round, p.prober, p.suspect, ok, detail);
                    }
                }
            });
        }
        for cmd in cmds {
            match control.write(cmd.clone()).await {
                Ok((_, Response::Rejected { reason, .. })) => {
                    debug!(target: LOG, ?cmd, "rejected: {reason}")
                }
                Ok(_) => info!(target: LOG, ?cmd, "coordinator decided"),
                Err(e) => {
                    debug!(target: LOG, "coordinator write failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Runs start-up, then watches for the node being fenced; a fenced node
/// (its epoch revoked while it was paused or cut off) stops serving at once
/// and rejoins under a new epoch, which the coordinator grants after a
/// confidence vote. A node that failed-stop stays down.
async fn supervise(node: Arc<Inner>) {
    let mut rejoins = 0u32;
    loop {
        node.watchdog
            .set_doing("supervisor", "starting up (stages -4 .. 0)");
        // A node excluded while it starts (paused past a stage deadline)
        // learns it from its heartbeats' answers: start-up is abandoned
        // wherever it waits, or it would wait at a barrier it may no longer
        // pass, under an epoch the cluster revoked, for ever.
        tokio::select! {
            _ = start_up(node.clone()) => {}
            _ = until_fenced(&node) => {
                let why = node.status_now().fenced.unwrap_or_default();
                warn!(target: LOG, "start-up abandoned: this node was fenced ({why})");
            }
        }
        node.watchdog
            .set_doing("supervisor", "running; watching for a fence");
        if !until_fenced(&node).await {
            return;
        }
        let reason = node.status_now().fenced.unwrap_or_default();
        if node.leaving() {
            info!(target: LOG, "fenced while leaving ({reason}): not rejoining");
            return;
        }
        if node.health.report().state.is_fail_stop() {
            warn!(target: LOG, "fail-stop: this node stays down and needs a person ({reason})");
            return;
        }
        let pause = Duration::from_millis((100u64 << rejoins.min(6)).min(5_000));
        rejoins += 1;
        warn!(target: LOG, "fenced ({reason}); rejoining under a new epoch in {pause:?}");
        node.watchdog
            .set_doing("supervisor", format!("fenced ({reason}); rejoining"));
        node.set_epoch(0);
        node.activity.clear();
        node.update_status(|s| {
            s.stage = Stage::NOT_STARTED.number();
            s.stage_since_ms = now_ms();
            s.stage_completed_at.clear();
            s.unreachable.clear();
        });
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        node.lease.set_fenced(false);
        node.update_status(|s| s.fenced = None);
    }
}

/// Resolves `true` once this node is fenced, `false` at shutdown.
async fn until_fenced(node: &Inner) -> bool {
    loop {
        if node.shutdown.is_cancelled() {
            return false;
        }
        if node.status_now().fenced.is_some() {
            return true;
        }
        tokio::select! {
            _ = node.shutdown.cancelled() => return false,
            _ = node.fenced_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// A fatal self-check failure: stop serving, stop voting (a voter shuts its
/// control plane down), keep the admin endpoint up, and say so. The
/// heartbeats go on carrying the verdict, so the coordinator removes it.
async fn watch_fail_stop(node: Arc<Inner>) {
    let mut rx = node.health.watch();
    loop {
        let report = rx.borrow_and_update().clone();
        if report.state.is_fail_stop() {
            let reasons = report.state.reasons().join("; ");
            tracing::error!(target: LOG, "FAIL-STOP: {reasons}; this node stops serving and voting and needs a person");
            node.fence(format!("fail-stop: {reasons}"));
            if let Some(c) = &node.control {
                if let Err(e) = c.shutdown().await {
                    warn!(target: LOG, "control plane shutdown after fail-stop: {e}");
                }
            }
            return;
        }
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// The start-up driver: join, then for each stage wait at the barrier, do
/// the stage's work, report it.
async fn start_up(node: Arc<Inner>) {
    let id = node.cfg.node_id;
    // Peers reach this node once it has joined, possibly before it reaches
    // stage -3 itself: what it hears from then on counts (`connect_peers`).
    let began = node.contacts.mono_ms();
    let poll = Inner::interval(node.cfg.startup.poll_interval_ms);
    // -4: reach the control plane.
    let mut last_err = String::new();
    let mut attempt = 0u32;
    node.activity
        .wait("start-up", "join", None, "reaching the control plane");
    let epoch = loop {
        if node.leaving() {
            return;
        }
        match node
            .propose(Command::Join {
                node: id,
                at: now_ms(),
            })
            .await
        {
            Ok(Response::Joined { epoch }) => break epoch,
            Ok(Response::Rejected {
                kind: orrery_core::Rejection::NotConfigured,
                ..
            }) => {}
            Ok(Response::Rejected { reason, .. }) => {
                warn!(target: LOG, "join refused: {reason}");
                node.update_status(|s| s.fenced = Some(reason));
                return;
            }
            Ok(r) => warn!(target: LOG, "unexpected join response {r:?}"),
            Err(e) => {
                let e = e.to_string();
                if e != last_err {
                    warn!(target: LOG, "cannot join yet: {e}");
                    last_err = e.clone();
                }
                node.activity.wait("start-up", "join", None, &e)
            }
        }
        // Backed off and jittered: a cluster without a leader yet is
        // asked by every node at once.
        let cap = node.cfg.startup.report_interval_ms;
        let pause = startup_backoff(id, attempt, node.cfg.startup.poll_interval_ms, cap);
        attempt = attempt.saturating_add(1);
        tokio::select! { _ = node.shutdown.cancelled() => return, _ = tokio::time::sleep(pause) => {} }
    };
    node.epoch.store(epoch, Ordering::Relaxed);
    // From now on every connection announces this process's epoch.
    node.set_epoch(epoch);
    complete(&node, Stage::RUNNING);
    info!(target: LOG, node = id, epoch, "joined the control plane (stage -4)");
    tokio::spawn(reporter(node.clone(), epoch));
    let mut stage = Stage::RUNNING;
    while let Some(next) = stage.next() {
        // The barrier.
        loop {
            let r = tokio::select! {
                _ = node.shutdown.cancelled() => return,
                r = node.ask(Request::Poll { node: id, epoch, next }) => r,
            };
            match r {
                Ok(Reply::Gate {
                    gate: Gate::Open,
                    next: n,
                }) if n == next => break,
                Ok(Reply::Gate {
                    gate: Gate::Fenced { reason, .. },
                    ..
                }) => {
                    warn!(target: LOG, "fenced: {reason}");
                    node.update_status(|s| s.fenced = Some(reason));
                    return;
                }
                Ok(Reply::Gate {
                    gate: Gate::Closed { reason },
                    ..
                }) => node.activity.wait(
                    "start-up",
                    format!("barrier before stage {next}"),
                    None,
                    &reason,
                ),
                Ok(Reply::Fenced { reason }) => {
                    warn!(target: LOG, "the cluster refused this node's poll: {reason}");
                    node.fence(reason);
                    return;
                }
                Ok(other) => debug!(target: LOG, "poll: unexpected {other:?}"),
                Err(e) => node.activity.wait(
                    "start-up",
                    format!("barrier before stage {next}"),
                    None,
                    &e.to_string(),
                ),
            }
            tokio::time::sleep(poll).await;
        }
        node.activity.clear();
        let work = stage_work(&node, next, began);
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            r = work => if let Err(e) = r {
                warn!(target: LOG, "stage {next} failed: {e}");
                node.activity.wait("start-up", format!("stage {next} failed"), None, &e);
                return;
            }
        }
        complete(&node, next);
        info!(target: LOG, node = id, stage = next.number(), "stage complete");
        // Report now rather than at the next heartbeat: the barrier waits on it.
        loop {
            match node.report().await {
                Ok(Response::Ok) => break,
                Ok(Response::Rejected { reason, .. }) => {
                    warn!(target: LOG, "report refused: {reason}");
                    node.update_status(|s| s.fenced = Some(reason));
                    return;
                }
                _ => tokio::time::sleep(poll).await,
            }
        }
        stage = next;
    }
}

fn complete(node: &Inner, stage: Stage) {
    node.activity.clear();
    let now = now_ms();
    node.update_status(|s| {
        s.stage = stage.number();
        s.stage_since_ms = now;
        s.stage_completed_at.insert(stage.number(), now);
        s.epoch = node.epoch.load(Ordering::Relaxed);
    });
}

/// The runtime's own work for `stage`, then every service's hook for it.
/// `began`: when this start-up attempt began (`Contacts::mono_ms`).
async fn stage_work(node: &Arc<Inner>, stage: Stage, began: u64) -> Result<(), String> {
    match stage {
        Stage::CONNECTED => connect_peers(node, began).await?,
        Stage::ADDRESSED => {
            node.activity
                .step("start-up", "fetch the cluster state (address cache)");
            let state = loop {
                match node.ask(Request::FetchState).await {
                    Ok(Reply::State(s)) => break s,
                    Ok(other) => debug!(target: LOG, "fetch: unexpected {other:?}"),
                    Err(e) => node.activity.wait(
                        "start-up",
                        "fetch the cluster state",
                        None,
                        &e.to_string(),
                    ),
                }
                tokio::time::sleep(Inner::interval(node.cfg.startup.poll_interval_ms)).await;
            };
            let version = state.applied_index;
            // The address cache: which node runs which shard.
            if let Some(router) = node.router() {
                node.shards.adopt(state.shards.clone(), router);
            }
            *node.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(*state));
            node.update_status(|s| s.address_cache_version = version);
        }
        _ => {}
    }
    if !node.cfg.me().role.hosts_services() {
        return Ok(()); // Arbiters vote and probe; they run no services.
    }
    for svc in &node.services {
        svc.on_stage(stage, &node.activity)
            .await
            .map_err(|e| e.to_string())?;
    }
    if stage == Stage::PRELOADED {
        // Preloading includes loading every shard placed here.
        loop {
            let h = node.shards.status();
            node.activity.progress(h.loaded as u64, h.assigned as u64);
            if h.loading == 0 && h.loaded >= h.assigned {
                break;
            }
            let what = match &h.last_failure {
                Some(f) => format!(
                    "load shards ({}/{}; {} failing, {f})",
                    h.loaded, h.assigned, h.failing
                ),
                None => format!("load shards ({}/{})", h.loaded, h.assigned),
            };
            node.activity.step("shards", what);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Stage -3: a live, authenticated connection to every participating peer.
///
/// Hundreds of nodes leave the barrier together, so this must not turn
/// into a storm: at most `startup.dial_concurrency` dials are in flight,
/// the peers still missing are tried again after a jittered pause that
/// doubles per round (two poll intervals up to the report interval), and
/// the participants come from the leader's `Participants` answer, a list
/// of ids, asked again each round so that peers excluded meanwhile are no
/// longer waited for. (Each node asking for the whole state each round
/// stalled a 100-node cluster's leader for seconds at a time.)
///
/// One handshake per pair: of two nodes only `stage_minus_3_dialer` dials;
/// the other counts a ping from it since this start-up began as the pair
/// connected. It dials the peer itself once that peer is past
/// stage -3 (it dials nobody any more) or after `startup.inbound_grace_ms`
/// (it may reach the peer that cannot reach it). Without this, 250
/// processes did 62,000 handshakes on 2 cores and missed the deadline.
async fn connect_peers(node: &Arc<Inner>, began: u64) -> Result<(), String> {
    let me = node.cfg.node_id;
    let started = node.contacts.mono_ms();
    let began = began.min(started);
    let poll = node.cfg.startup.poll_interval_ms;
    let (base, cap) = (2 * poll, node.cfg.startup.report_interval_ms.max(2 * poll));
    // Waiting for a peer's dial never outlasts a quarter of the stage
    // deadline: by the deadline every node has tried every missing peer
    // itself, and its report names all it cannot reach.
    let grace = node
        .cfg
        .startup
        .inbound_grace_ms
        .min(node.cfg.startup.stage_deadline_ms / 4);
    let mut round = 0u32;
    loop {
        let (ids, connected) = match participants(node).await {
            Ok(p) => p,
            Err(e) => {
                node.activity
                    .wait("peers", "learn the participants", None, &e);
                tokio::time::sleep(Inner::interval(poll)).await;
                continue;
            }
        };
        // A peer a ping crossed with since this start-up began (its dial
        // reached this node, or this node's reached it) is connected.
        let missing: BTreeSet<NodeId> = ids
            .into_iter()
            .filter(|p| *p != me && !node.contacts.pinged_since(*p, began))
            .collect();
        if missing.is_empty() {
            node.update_status(|s| s.unreachable.clear());
            return Ok(());
        }
        // Dial the peers this node is the dialer of, those past stage -3
        // (they dial nobody any more: this node joined late, or rejoined),
        // and, after the grace, everyone still unheard.
        let waited = node.contacts.mono_ms().saturating_sub(started);
        let mut dial: BTreeSet<NodeId> = missing
            .iter()
            .copied()
            .filter(|p| {
                waited >= grace || stage_minus_3_dialer(me, *p) == me || connected.contains(p)
            })
            .collect();
        let dialled = dial.clone();
        let failure = dial_missing(node, &mut dial).await;
        // Every peer still without a connection, dialled or awaited, is
        // what this node waits on: the coordinator's diagnosis counts it.
        let unconnected: Vec<NodeId> = missing
            .iter()
            .copied()
            .filter(|p| !dialled.contains(p) || dial.contains(p))
            .collect();
        node.update_status(|s| s.unreachable = unconnected);
        let pause = match failure {
            Some((p, err)) => {
                node.activity.wait(
                    "peers",
                    "connect",
                    Some(p),
                    &format!("{} peer(s) not connected; node {p}: {err}", missing.len()),
                );
                round = round.saturating_add(1);
                startup_backoff(me, round - 1, base, cap)
            }
            None => {
                if let Some(p) = missing.iter().find(|p| !dialled.contains(p)) {
                    node.activity.wait(
                        "peers",
                        "be connected to",
                        Some(*p),
                        &format!(
                            "{} peer(s) not connected yet; node {p} dials this node",
                            missing.len()
                        ),
                    );
                }
                Inner::interval(poll)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// Which of `a` and `b` opens their connection at stage -3: the lower id
/// when the ids' sum is even, else the higher, so that every node dials
/// about half of its peers (lowest-dials-highest would leave node 1 dialling
/// all of them, the critical path of a 250-node start).
fn stage_minus_3_dialer(a: NodeId, b: NodeId) -> NodeId {
    let (lo, hi) = (a.min(b), a.max(b));
    if a.wrapping_add(b) % 2 == 0 {
        lo
    } else {
        hi
    }
}

/// The pause before retry `attempt` (from 0) of a start-up step that
/// hundreds of nodes may fail together: `base` doubling per attempt up to
/// `cap` ms, then a jitter seeded by node and attempt down to half of it,
/// so that nodes that failed together do not come back together.
fn startup_backoff(node: NodeId, attempt: u32, base: u64, cap: u64) -> Duration {
    let pause = base.saturating_mul(1 << attempt.min(16)).min(cap).max(1);
    let seed = node.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    Duration::from_millis(rand::Rng::gen_range(&mut rng, pause / 2..=pause))
}

/// The current start-up's participants and those past stage -3, from the
/// leader.
async fn participants(node: &Inner) -> Result<(Vec<NodeId>, Vec<NodeId>), String> {
    match node.ask(Request::Participants).await {
        Ok(Reply::Participants { ids, connected }) => Ok((ids, connected)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Pings every peer in `missing`, at most `startup.dial_concurrency` at
/// once, and drops those that answered. Returns the first failure, `None`
/// once all answered. (`connect_peers` publishes what is still missing.)
async fn dial_missing(
    node: &Arc<Inner>,
    missing: &mut BTreeSet<NodeId>,
) -> Option<(NodeId, String)> {
    use futures::StreamExt;
    let timeout = Duration::from_millis(node.cfg.rpc.connect_timeout_ms);
    // Each node starts with the peers just above its own id: in id order
    // every node would dial node 1 first, and a few nodes would take the
    // whole cluster's handshakes at once.
    let me = node.cfg.node_id;
    let order: Vec<NodeId> = missing
        .range(me.saturating_add(1)..)
        .chain(missing.range(..me))
        .copied()
        .collect();
    let results: Vec<(NodeId, Result<Reply, _>)> = futures::stream::iter(order)
        .map(|p| {
            let net = node.net.clone();
            async move { (p, net.call(p, Request::Ping, timeout).await) }
        })
        .buffer_unordered(node.cfg.startup.dial_concurrency.max(1))
        .collect()
        .await;
    let mut first_err = None;
    for (p, r) in results {
        match r {
            Ok(Reply::Pong) => {
                node.contacts.pinged(p);
                missing.remove(&p);
            }
            Ok(other) => first_err = first_err.or(Some((p, format!("unexpected {other:?}")))),
            Err(e) => first_err = first_err.or(Some((p, e.to_string()))),
        }
    }
    first_err
}

/// Re-reports the node's stage and waits every `report_interval`: the
/// stuck-node diagnosis and the coordinator's liveness view come from here.
async fn reporter(node: Arc<Inner>, epoch: u64) {
    let mut tick = tokio::time::interval(Inner::interval(node.cfg.startup.report_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if node.status_now().fenced.is_some() || node.epoch.load(Ordering::Relaxed) != epoch {
            return;
        }
        match node.report().await {
            Ok(Response::Rejected {
                reason,
                kind: orrery_core::Rejection::Fenced(Fence::Superseded | Fence::Excluded),
            }) => {
                warn!(target: LOG, "fenced: {reason}");
                node.fence(reason);
                return;
            }
            Ok(_) => {}
            Err(e) => debug!(target: LOG, "report: {e}"),
        }
    }
}

/// Routes calls to shard owners for one node.
struct NodeRouter(std::sync::Weak<Inner>);

/// How often a remote shard call in flight checks whether the map moved
/// the shard away from the owner it was sent to.
const MOVE_CHECK: Duration = Duration::from_millis(50);

/// Resolves (with the map's version) once this node's shard map names
/// another owner (or ownership epoch) for `shard` than `sent_to`.
async fn owner_moves(
    node: &Inner,
    shard: ShardId,
    sent_to: orrery_core::shardmap::ShardEntry,
) -> u64 {
    loop {
        tokio::time::sleep(MOVE_CHECK).await;
        let map = node.shards.map();
        let now = map.owner(shard).map(|e| (e.owner, e.epoch));
        if now != Some((sent_to.owner, sent_to.epoch)) {
            return map.version;
        }
    }
}

/// One remote shard call to `entry.owner`. A call to an owner that stops
/// answering (paused, cut off) must not wait out its whole deadline once the
/// map has moved the shard; but the owner may already have run it, so it is
/// never re-sent: once the move is seen, the owner gets
/// `shards.moved_owner_grace_ms` more to answer (a live owner finishes its
/// in-flight calls before it hands over), then the call fails `InDoubt`.
async fn call_owner(
    node: &Inner,
    shard: ShardId,
    entry: orrery_core::shardmap::ShardEntry,
    req: Request,
    left: Duration,
) -> Result<Reply, crate::transport::TransportError> {
    let call = node.net.call(entry.owner, req, left);
    tokio::pin!(call);
    tokio::select! {
        r = &mut call => r,
        version = owner_moves(node, shard, entry) => {
            let grace = Duration::from_millis(node.cfg.shards.moved_owner_grace_ms);
            match tokio::time::timeout(grace, &mut call).await {
                Ok(r) => r,
                Err(_) => Ok(Reply::ShardReply(Err(CallError::InDoubt {
                    owner: entry.owner,
                    version,
                }))),
            }
        }
    }
}

impl Router for NodeRouter {
    fn route(
        &self,
        shard: ShardId,
        call: String,
        payload: Vec<u8>,
        deadline: tokio::time::Instant,
        chain: Vec<Hop>,
    ) -> ShardFuture<'_, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            let Some(node) = self.0.upgrade() else {
                return Err(CallError::Unavailable("node shut down".into()));
            };
            let mut attempt = 0u32;
            loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(CallError::Timeout);
                }
                let map = node.shards.map();
                let Some(entry) = map.owner(shard).copied() else {
                    if !map.is_declared(shard) && map.version > 0 {
                        return Err(CallError::UnknownShard {
                            kind: shard.kind,
                            key: shard.key,
                        });
                    }
                    // Not placed yet (or our map is empty): refresh and retry.
                    let _ = node.refresh_shards().await;
                    backoff(&mut attempt, deadline).await;
                    continue;
                };
                let result = if entry.owner == node.cfg.node_id {
                    let _handler = node
                        .watchdog
                        .begin(format!("shard {shard} call {call} (local caller)"));
                    node.serve_shard(
                        shard,
                        Some(entry.epoch),
                        call.clone(),
                        payload.clone(),
                        deadline,
                        chain.clone(),
                    )
                    .await
                } else {
                    let left = deadline.saturating_duration_since(now);
                    let req = Request::ShardCall {
                        shard,
                        epoch: Some(entry.epoch),
                        call: call.clone(),
                        payload: payload.clone(),
                        deadline_ms: left.as_millis().min(u128::from(u32::MAX)) as u32,
                        chain: chain.clone(),
                    };
                    let answer = call_owner(&node, shard, entry, req, left).await;
                    match answer {
                        Ok(Reply::ShardReply(r)) => r,
                        Ok(Reply::Fenced { reason }) => Err(CallError::Fenced {
                            node: entry.owner,
                            reason,
                        }),
                        Ok(other) => Err(CallError::Unavailable(format!(
                            "unexpected reply {other:?}"
                        ))),
                        Err(crate::transport::TransportError::Timeout { .. }) => {
                            Err(CallError::Timeout)
                        }
                        Err(e @ crate::transport::TransportError::Overloaded { .. }) => {
                            Err(CallError::Overloaded(e.to_string()))
                        }
                        Err(e) => Err(CallError::Unavailable(e.to_string())),
                    }
                };
                match result {
                    // The owner changed: get the newer map and try again.
                    Err(CallError::Moved { version }) => {
                        if node.shards.map().version < version {
                            let _ = node.refresh_shards().await;
                        }
                        backoff(&mut attempt, deadline).await;
                    }
                    // The owner is loading it, or is gone and not yet replaced.
                    Err(CallError::Unavailable(_)) | Err(CallError::Fenced { .. })
                        if attempt < 50 =>
                    {
                        let _ = node.refresh_shards().await;
                        backoff(&mut attempt, deadline).await;
                    }
                    other => return other,
                }
            }
        })
    }
}

/// Bounded exponential backoff between retries of one call (10 ms doubling,
/// at most 200 ms, never past the deadline).
async fn backoff(attempt: &mut u32, deadline: tokio::time::Instant) {
    let wait = Duration::from_millis((10u64 << (*attempt).min(5)).min(200));
    *attempt += 1;
    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + wait)).await;
}

/// Keeps the address cache current: the leader's heartbeat acknowledgements
/// say which shard map version it holds; a node behind fetches the map.
/// Woken by the announcement itself (a poll every 50 ms cost every node
/// process 20 wake-ups a second for nothing), with a slow tick as a safety
/// net and a quick retry after a failed fetch.
async fn sync_shards(node: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = false;
    loop {
        if retry {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = tokio::time::sleep(MOVE_CHECK) => {}
            }
        } else {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = node.shards.announced_rises() => {}
                _ = tick.tick() => {}
            }
        }
        retry = false;
        let latest = node.shards.announced();
        if node.epoch.load(Ordering::Relaxed) == 0 || latest <= node.shards.map().version {
            continue;
        }
        if let Err(e) = node.refresh_shards().await {
            debug!(target: LOG, "shard map refresh: {e}");
            retry = true;
        }
    }
}
