//! orrery-control: the Raft control plane of orrery.
//!
//! # What this crate owns
//! - Running Raft (via openraft) among the 3 or 5 control-plane voters, replicating an
//!   application-defined [`ReplicatedState`] (orrery-core's cluster state implements it).
//! - Durable Raft storage: log, vote, committed id, last-purged id and the latest snapshot live
//!   in one redb file, `data_dir/raft.redb`. A restarted node comes back with the same
//!   membership and state (latest snapshot + replay of committed entries).
//! - The wire encoding of Raft RPCs (postcard, versioned envelope). Bytes travel over the
//!   application's [`RaftTransport`]; incoming bytes are handed to [`ControlPlane::handle_rpc`].
//!
//! # What this crate must never do
//! - Never leak openraft types: openraft 0.10 is alpha and its churn must stay inside this
//!   crate. The public API is [`ControlPlane`], [`ControlConfig`], [`ReplicatedState`],
//!   [`RaftTransport`], [`StateView`], [`LeaderView`] and the error enums, nothing else.
//! - Never decide cluster policy (placement, membership changes, who should lead): it only
//!   orders and applies the commands it is given.
//! - Never forward requests to the leader itself: a non-leader returns
//!   [`ControlError::NotLeader`] and the caller forwards.
//! - Never open sockets: all networking goes through [`RaftTransport`].
//! - Never panic on bad input (malformed RPC bytes, undecodable commands).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod error;
mod network;
mod private;
mod repair;
mod seal;
mod snapshot_recv;
mod store;
mod types;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{
    ClientWriteError, Fatal, ForwardToLeader, InitializeError, LinearizableReadError, RaftError,
};
use openraft::{BasicNode, Raft, ReadPolicy};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

pub use crate::config::ControlConfig;
pub use crate::error::{ControlError, TransportError};
use crate::network::{NetFactory, ReplicationTrouble, RpcRequest, RpcResponse};
pub use crate::repair::{repair, RepairReport};
use crate::snapshot_recv::{SnapshotReceiver, Taken};
use crate::store::{LogStore, StateMachine};
use crate::types::{ApplyReply, CmdBytes, Snapshot, Tc};

/// Identifier of a control-plane voter.
pub type NodeId = u64;

/// The replicated state an application defines.
pub trait ReplicatedState:
    Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// A state-changing command, appended to the Raft log.
    type Command: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The result of applying a command, returned to the proposer.
    type Response: Clone + Debug + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Applies `command`, committed at Raft log index `index`.
    ///
    /// Must be deterministic: the same state and command give the same result on every node.
    /// Must not panic.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Response;
}

/// Boxed future returned by [`RaftTransport::call`].
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send + 'a>>;

/// How the control plane reaches other voters (implemented by orrery-node over its
/// authenticated RPC). Payloads are opaque bytes produced and consumed by this crate: deliver
/// `payload` to the target's [`ControlPlane::handle_rpc`] and return what it returns.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends `payload` to voter `target` at `addr` and returns the reply bytes.
    /// Should give up after `timeout` (the control plane also enforces it).
    fn call(
        &self,
        target: NodeId,
        addr: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> TransportFuture<'_>;
}

/// A view of the applied replicated state.
#[derive(Debug)]
pub struct StateView<S> {
    /// Raft log index of the last applied entry (0 before anything was applied).
    pub applied_index: u64,
    /// The state after applying every entry up to `applied_index`.
    pub state: Arc<S>,
}

impl<S> Clone for StateView<S> {
    fn clone(&self) -> Self {
        Self {
            applied_index: self.applied_index,
            state: self.state.clone(),
        }
    }
}

/// This node's view of leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaderView {
    /// The current Raft term as seen by this node.
    pub term: u64,
    /// The leader of `term`, if known.
    pub leader: Option<NodeId>,
}

/// A handle to this node's control plane. Cheap to clone.
///
/// The Raft core it runs can be restarted in place ([`Self::restart`]): after a fatal
/// storage error (a full disk) openraft stops for good, and the owner brings the same
/// handle back once the cause is gone. Watchers keep their receivers across a restart.
pub struct ControlPlane<S: ReplicatedState> {
    shell: Arc<Shell<S>>,
}

/// What outlives a restart of the Raft core: the configuration, the transport, the
/// channels handed to watchers, and the core currently running.
struct Shell<S: ReplicatedState> {
    cfg: ControlConfig,
    transport: Arc<dyn RaftTransport>,
    core: std::sync::RwLock<Arc<Inner<S>>>,
    state_tx: watch::Sender<StateView<S>>,
    leader_tx: watch::Sender<LeaderView>,
    /// One restart or shutdown at a time.
    lifecycle: tokio::sync::Mutex<()>,
    /// Set by [`ControlPlane::shutdown`]: no restart after it.
    shut: std::sync::atomic::AtomicBool,
    restarts: std::sync::atomic::AtomicU64,
    /// Writes that did not commit within `write_timeout`.
    write_timeouts: std::sync::atomic::AtomicU64,
    /// The last state digest computed, by applied index.
    digest: std::sync::Mutex<Option<(u64, String)>>,
}

impl<S: ReplicatedState> Clone for ControlPlane<S> {
    fn clone(&self) -> Self {
        Self {
            shell: self.shell.clone(),
        }
    }
}

struct Inner<S: ReplicatedState> {
    raft: Raft<Tc, StateMachine<S>>,
    cfg: ControlConfig,
    state_rx: watch::Receiver<StateView<S>>,
    /// Lets `shutdown` wait until every openraft task has released the store.
    db: Weak<redb::Database>,
    /// The snapshot arriving in chunks from the leader, if any.
    receiving: SnapshotReceiver,
    /// The last replication failure per voter (written by the network clients).
    trouble: Arc<ReplicationTrouble>,
    /// Set while this voter is catching up after `repair`: it grants no votes.
    catching_up: std::sync::atomic::AtomicBool,
    /// While catching up: the leader (vote) that agreed to replicate to it from scratch.
    revert_allowed_by: std::sync::Mutex<Option<types::Vote>>,
    /// Reaches other voters (the repaired voter's request to its leader).
    transport: Arc<dyn RaftTransport>,
}

fn fatal(e: &Fatal<Tc>) -> ControlError {
    ControlError::Fatal(e.to_string())
}

impl<S: ReplicatedState> Inner<S> {
    /// Opens the Raft store under `cfg.data_dir`, checks every record, restores the state
    /// and starts a Raft core whose leader changes go to `leader_tx`. Returns the core and
    /// whether the store carries the repair marker.
    async fn open(
        cfg: &ControlConfig,
        transport: Arc<dyn RaftTransport>,
        leader_tx: watch::Sender<LeaderView>,
    ) -> Result<(Self, bool), ControlError> {
        let raft_cfg = Arc::new(cfg.to_openraft()?);
        let db = store::open_db_retrying(&cfg.data_dir, cfg.shutdown_timeout)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => ControlError::Corrupt {
                    file: cfg.data_dir.join(store::DB_FILE),
                    table: "(redb page tree)".into(),
                    key: "(found by redb's recovery)".into(),
                    reason: e.to_string(),
                },
                _ => ControlError::Storage(format!("open {}: {e}", cfg.data_dir.display())),
            })?;
        let repaired = verify_store(cfg, &db).await?;
        let db_weak = Arc::downgrade(&db);
        let (sm, state_rx) = StateMachine::<S>::open(db.clone())
            .await
            .map_err(|e| ControlError::Storage(format!("restore snapshot: {e}")))?;
        let log = LogStore::new(db);
        let trouble = Arc::new(ReplicationTrouble::default());
        let net = NetFactory {
            self_id: cfg.node_id,
            transport: transport.clone(),
            rpc_timeout: cfg.rpc_timeout,
            max_message_bytes: cfg.max_message_bytes,
            snapshot_chunk_bytes: cfg.snapshot_chunk_bytes,
            trouble: trouble.clone(),
        };
        let raft = Raft::new(cfg.node_id, raft_cfg, net, log, sm)
            .await
            .map_err(|e| fatal(&e))?;
        relay_leader(&raft, leader_tx);
        let core = Inner {
            raft,
            cfg: cfg.clone(),
            state_rx,
            db: db_weak,
            receiving: SnapshotReceiver::default(),
            trouble,
            catching_up: std::sync::atomic::AtomicBool::new(repaired),
            revert_allowed_by: std::sync::Mutex::new(None),
            transport,
        };
        Ok((core, repaired))
    }

    /// Stops this core's Raft and waits (at most `shutdown_timeout`) until its tasks have
    /// released the store, so the same `data_dir` can be reopened as soon as this returns.
    async fn stop(&self) -> Result<(), ControlError> {
        let t = self.cfg.shutdown_timeout;
        let stop = async {
            let res = self.raft.shutdown().await;
            // Replication and state-machine workers exit shortly after the core; each holds
            // a handle to the store until then.
            while self.db.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The count drops to 0 before redb's `Drop` has finished closing the file (it
            // marks the file clean last); wait until the file opens, so a caller that reads
            // or copies it next sees a cleanly closed store.
            let path = self.cfg.data_dir.join(store::DB_FILE);
            while store::still_open(&path).await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            res
        };
        match tokio::time::timeout(t, stop).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ControlError::Fatal(format!("raft core task failed: {e}"))),
            Err(_) => Err(ControlError::Timeout(t)),
        }
    }
}

/// Publishes `raft`'s term and leader to `tx` until the core stops.
fn relay_leader<S: ReplicatedState>(
    raft: &Raft<Tc, StateMachine<S>>,
    tx: watch::Sender<LeaderView>,
) {
    tx.send_replace(leader_view(raft));
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        while metrics.changed().await.is_ok() {
            let view = {
                let m = metrics.borrow_watched();
                LeaderView {
                    term: m.current_term,
                    leader: m.current_leader,
                }
            };
            tx.send_if_modified(|cur| {
                let changed = *cur != view;
                *cur = view;
                changed
            });
        }
    });
}

/// Publishes every state `rx` sees to `tx` until its core stops (watchers keep one
/// receiver across restarts of the core).
fn relay_state<S: ReplicatedState>(
    mut rx: watch::Receiver<StateView<S>>,
    tx: watch::Sender<StateView<S>>,
) {
    tx.send_replace(rx.borrow_and_update().clone());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let view = rx.borrow_and_update().clone();
            tx.send_replace(view);
        }
    });
}

impl<S: ReplicatedState> ControlPlane<S> {
    /// Opens or creates the Raft store under `cfg.data_dir`, restores the state (snapshot +
    /// replay of committed entries) and starts Raft with pre-vote enabled.
    ///
    /// If the store is pristine, initializes the cluster with `cfg.voters`. Every voter may do
    /// so with the identical voter map; a node that is already initialized (or that received
    /// the membership from a peer first) skips it.
    pub async fn start(
        cfg: ControlConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Self, ControlError> {
        cfg.validate()?;
        let (leader_tx, _) = watch::channel(LeaderView::default());
        let (core, repaired) = Inner::<S>::open(&cfg, transport.clone(), leader_tx.clone()).await?;
        // A repaired voter waits for the leader to bring it back; initializing would give it
        // a membership log of its own.
        if !repaired {
            initialize_if_pristine(&core.raft, &cfg).await?;
        } else {
            tracing::warn!(node = cfg.node_id, "raft store was repaired: catching up from the leader, granting no votes until then");
        }
        let (state_tx, _) = watch::channel(core.state_rx.borrow().clone());
        relay_state(core.state_rx.clone(), state_tx.clone());
        Ok(Self {
            shell: Arc::new(Shell {
                cfg,
                transport,
                core: std::sync::RwLock::new(Arc::new(core)),
                state_tx,
                leader_tx,
                lifecycle: tokio::sync::Mutex::new(()),
                shut: std::sync::atomic::AtomicBool::new(false),
                restarts: std::sync::atomic::AtomicU64::new(0),
                write_timeouts: std::sync::atomic::AtomicU64::new(0),
                digest: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The Raft core running now.
    fn inner(&self) -> Arc<Inner<S>> {
        self.shell
            .core
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Restarts the Raft core in place: stops the current one (a core stopped by a fatal
    /// error stops at once), reopens the store, checks it and starts Raft again with the
    /// same identity. For a voter whose core died of a storage error (a full disk) once the
    /// cause is gone; the store on disk is what Raft had made durable, so nothing is lost.
    /// On error the old (stopped) core stays in place and a later restart may try again.
    pub async fn restart(&self) -> Result<(), ControlError> {
        let _one = self.shell.lifecycle.lock().await;
        if self.shell.shut.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ControlError::Fatal(
                "the control plane was shut down".into(),
            ));
        }
        let old = self.inner();
        if let Err(e) = old.stop().await {
            tracing::debug!(
                node = self.shell.cfg.node_id,
                "stopping the old raft core: {e}"
            );
        }
        let (core, _) = Inner::<S>::open(
            &self.shell.cfg,
            self.shell.transport.clone(),
            self.shell.leader_tx.clone(),
        )
        .await?;
        relay_state(core.state_rx.clone(), self.shell.state_tx.clone());
        *self.shell.core.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(core);
        self.shell
            .restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node = self.shell.cfg.node_id, "raft core restarted");
        Ok(())
    }

    /// Stops the Raft core without shutting the control plane down (a voter whose disk is
    /// critical stops writing before a write fails); [`Self::restart`] brings it back, and
    /// [`Self::health`] reports it stopped until then.
    pub async fn stop_core(&self) -> Result<(), ControlError> {
        let _one = self.shell.lifecycle.lock().await;
        self.inner().stop().await
    }

    /// How many times the Raft core was restarted in place.
    pub fn restarts(&self) -> u64 {
        self.shell
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn write_timed_out(&self, t: Duration) -> ControlError {
        self.shell
            .write_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            node = self.shell.cfg.node_id,
            "a control-plane write did not commit within {t:?}; its outcome is unknown"
        );
        ControlError::Timeout(t)
    }

    /// How many writes failed [`ControlError::Timeout`] (commit status unknown).
    pub fn write_timeouts(&self) -> u64 {
        self.shell
            .write_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes `cmd`. Returns the log index it was committed at and the response of applying it.
    ///
    /// Returns [`ControlError::NotLeader`] if this node is not the leader (the caller forwards),
    /// and [`ControlError::CommitUnknown`] if leadership was lost after the entry was appended.
    pub async fn write(&self, cmd: S::Command) -> Result<(u64, S::Response), ControlError> {
        self.health()?;
        let bytes = postcard::to_stdvec(&cmd)
            .map_err(|e| ControlError::Codec(format!("encode command: {e}")))?;
        let limit = self.shell.cfg.max_proposal_bytes;
        if bytes.len() > limit {
            return Err(ControlError::ProposalTooLarge {
                bytes: bytes.len(),
                limit,
            });
        }
        let t = self.shell.cfg.write_timeout;
        let resp = tokio::time::timeout(t, self.inner().raft.client_write(CmdBytes(bytes)))
            .await
            .map_err(|_| self.write_timed_out(t))?
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    ControlError::NotLeader {
                        leader: self.leader_of(&f),
                    }
                }
                RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                    ControlError::CommitUnknown {
                        leader: self.leader_of(&f),
                    }
                }
                RaftError::APIError(e) => ControlError::Raft(e.to_string()),
                RaftError::Fatal(e) => fatal(&e),
            })?;
        let index = resp.log_id.index();
        match resp.data {
            ApplyReply::Applied(b) => {
                let r = postcard::from_bytes(&b)
                    .map_err(|e| ControlError::Codec(format!("decode response: {e}")))?;
                Ok((index, r))
            }
            ApplyReply::Undecodable(m) => Err(ControlError::Codec(format!(
                "command at index {index} not applied: {m}"
            ))),
            ApplyReply::Internal => Ok((index, S::Response::default())),
        }
    }

    /// Linearizable read: confirms leadership with a quorum (ReadIndex), waits until the read
    /// index is applied locally, then returns the applied state.
    pub async fn read_linearizable(&self) -> Result<StateView<S>, ControlError> {
        self.health()?;
        self.inner()
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| match e {
                RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => {
                    ControlError::NotLeader {
                        leader: self.leader_of(&f),
                    }
                }
                RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
                    ControlError::QuorumNotReached(q.to_string())
                }
                RaftError::Fatal(e) => fatal(&e),
            })?;
        // `ensure_linearizable` returns once the read index is applied, and the state machine
        // publishes before it reports an apply, so the watch is at least that fresh.
        Ok(self.inner().state_rx.borrow().clone())
    }

    /// Waits (at most `timeout`) until this node has applied everything the cluster had
    /// committed when it restarted. Needs a live leader. Useful before serving local reads.
    pub async fn wait_for_recovery(&self, timeout: Duration) -> Result<(), ControlError> {
        self.inner()
            .raft
            .wait_for_recovery(Some(timeout))
            .await
            .map(|_| ())
            .map_err(|e| ControlError::Raft(format!("wait for recovery: {e}")))
    }

    /// The locally applied state (may be stale on followers); updated on every apply.
    pub fn state(&self) -> StateView<S> {
        self.inner().state_rx.borrow().clone()
    }

    /// Watches the locally applied state; a new value is published after every applied batch.
    pub fn watch_state(&self) -> watch::Receiver<StateView<S>> {
        self.shell.state_tx.subscribe()
    }

    /// Watches this node's view of the term and the leader.
    pub fn watch_leader(&self) -> watch::Receiver<LeaderView> {
        self.shell.leader_tx.subscribe()
    }

    /// The leader this node currently knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        // A stopped core's last view is stale; it knows of no leader.
        self.health().ok()?;
        self.inner().raft.metrics().borrow_watched().current_leader
    }

    /// The current leader with its address, if known.
    pub fn current_leader_addr(&self) -> Option<(NodeId, String)> {
        self.health().ok()?;
        let m = self.inner().raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone());
        Some((
            id,
            addr.or_else(|| self.shell.cfg.voters.get(&id).cloned())
                .unwrap_or_default(),
        ))
    }

    /// Whether this node currently believes it is the leader. Not a fence: use
    /// [`Self::read_linearizable`] or [`Self::write`] for that.
    pub fn is_leader(&self) -> bool {
        self.health().is_ok() && self.inner().raft.is_leader()
    }

    /// While leader: hands leadership to voter `to` (openraft's `transfer_leader`: this
    /// leader stops proposing, `to` campaigns at once once it holds the leader's log).
    /// Returns when the request is handed to the Raft core, not when `to` leads: watch
    /// [`Self::watch_leader`] for that. Refused on a follower and for a non-voter.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ControlError> {
        let me = self.node_id();
        if !self.is_leader() {
            return Err(ControlError::NotLeader {
                leader: self.current_leader_addr(),
            });
        }
        if to == me {
            return Err(ControlError::Raft(format!("node {to} already leads")));
        }
        if !self.voters().contains_key(&to) {
            return Err(ControlError::Raft(format!("node {to} is not a voter")));
        }
        let core = self.inner();
        core.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| fatal(&e))
    }

    /// The current Raft term as seen by this node.
    pub fn current_term(&self) -> u64 {
        self.inner().raft.metrics().borrow_watched().current_term
    }

    /// While leader: how long ago a quorum of voters last acknowledged this
    /// leader. A leader cut off from its quorum sees this grow; callers use
    /// it to stop vouching for anything (e.g. renewing leases). `None` when
    /// not leader or never acknowledged.
    pub fn quorum_ack_age(&self) -> Option<Duration> {
        if !self.is_leader() {
            return None;
        }
        let m = self.inner().raft.metrics();
        let m = m.borrow_watched();
        m.last_quorum_acked
            .as_ref()
            .map(|t| openraft::Instant::elapsed(&**t))
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shell.cfg.node_id
    }

    /// The current voter set (id -> address) from the replicated membership.
    pub fn voters(&self) -> BTreeMap<NodeId, String> {
        let m = self.inner().raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .map(|id| {
                let addr = membership
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default();
                (id, addr)
            })
            .collect()
    }

    /// `Ok` while the Raft core runs. After a fatal error (e.g. a storage error) or shutdown
    /// it returns [`ControlError::Fatal`]; openraft does not recover from that by itself, so the
    /// owner should restart the control plane (or the process).
    pub fn health(&self) -> Result<(), ControlError> {
        match &self.inner().raft.metrics().borrow_watched().running_state {
            Ok(()) => Ok(()),
            Err(e) => Err(fatal(e)),
        }
    }

    /// Server side of [`RaftTransport`]: decodes an incoming payload, dispatches it to Raft and
    /// returns the encoded reply. Malformed bytes give [`ControlError::MalformedRpc`].
    pub async fn handle_rpc(&self, payload: Vec<u8>) -> Result<Vec<u8>, ControlError> {
        let req: RpcRequest = network::decode(&payload).map_err(ControlError::MalformedRpc)?;
        // A stopped core answers nothing (openraft would log every refused message).
        self.health()?;
        let core = self.inner();
        let raft = &core.raft;
        let raft_err = |e: RaftError<Tc>| match e {
            RaftError::Fatal(f) => fatal(&f),
            RaftError::APIError(never) => match never {},
        };
        let catching_up = self
            .inner()
            .catching_up
            .load(std::sync::atomic::Ordering::Acquire);
        let resp = match req {
            RpcRequest::Vote(_) | RpcRequest::PreVote(_) if catching_up => {
                return Err(ControlError::CatchingUp(self.shell.cfg.node_id));
            }
            RpcRequest::AppendEntries(r) => {
                if catching_up {
                    self.ensure_revert_allowed(&r.vote).await?;
                }
                let leader_commit = r.leader_commit.map(|l| l.index());
                let resp = raft.append_entries(r).await.map_err(raft_err)?;
                if catching_up {
                    self.end_catch_up_once_applied(leader_commit).await;
                }
                RpcResponse::AppendEntries(resp)
            }
            RpcRequest::Vote(r) => RpcResponse::Vote(raft.vote(r).await.map_err(raft_err)?),
            RpcRequest::PreVote(r) => RpcResponse::Vote(raft.pre_vote(r).await.map_err(raft_err)?),
            RpcRequest::SnapshotChunk(chunk) => {
                if catching_up {
                    self.ensure_revert_allowed(&chunk.vote).await?;
                }
                self.take_chunk(chunk).await?
            }
            RpcRequest::AllowRevert { node } => self.allow_revert(node).await?,
            // A repaired voter must not be handed leadership before it caught up.
            RpcRequest::TransferLeader(_) if catching_up => {
                return Err(ControlError::CatchingUp(self.shell.cfg.node_id));
            }
            RpcRequest::TransferLeader(r) => RpcResponse::TransferLeader(
                raft.handle_transfer_leader(r)
                    .await
                    .map_err(|e| fatal(&e))?,
            ),
        };
        network::encode(resp).map_err(ControlError::Codec)
    }

    /// Buffers one snapshot chunk; once the snapshot is whole and its checksum and state
    /// decode, installs it.
    async fn take_chunk(&self, chunk: network::SnapshotChunk) -> Result<RpcResponse, ControlError> {
        let max = self.shell.cfg.max_snapshot_bytes;
        let whole = match self.inner().receiving.take(chunk, max)? {
            Taken::Whole(w) => w,
            Taken::Need(next_offset) => return Ok(RpcResponse::ChunkAccepted { next_offset }),
        };
        // A snapshot that fails to decode would surface as a storage error inside openraft,
        // which makes the core Fatal; reject it here instead.
        postcard::from_bytes::<S>(&whole.data).map_err(|e| {
            ControlError::MalformedRpc(format!("snapshot state does not decode: {e}"))
        })?;
        let last = whole.meta.last_log_id.map(|l| l.index());
        let snap = Snapshot {
            meta: whole.meta,
            snapshot: whole.data,
        };
        let resp = self
            .inner()
            .raft
            .install_full_snapshot(whole.vote, snap)
            .await
            .map_err(|e| fatal(&e))?;
        if self
            .inner()
            .catching_up
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.end_catch_up_once_applied(last).await;
        }
        Ok(RpcResponse::Snapshot(resp))
    }

    /// A repaired voter answers a leader only after that leader agreed to replicate to it from
    /// the beginning: openraft treats a follower whose log went backwards as a bug (and
    /// stops), unless the leader was told first (`allow_next_revert`).
    async fn ensure_revert_allowed(&self, vote: &types::Vote) -> Result<(), ControlError> {
        let me = self.shell.cfg.node_id;
        if self
            .inner()
            .revert_allowed_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(vote)
        {
            return Ok(());
        }
        let leader = vote.leader_id().node_id;
        let addr = self
            .voters()
            .get(&leader)
            .cloned()
            .or_else(|| self.shell.cfg.voters.get(&leader).cloned());
        let (Some(addr), Ok(payload)) =
            (addr, network::encode(RpcRequest::AllowRevert { node: me }))
        else {
            return Err(ControlError::CatchingUp(me));
        };
        let timeout = self.shell.cfg.rpc_timeout;
        let reply = self
            .inner()
            .transport
            .call(leader, addr, payload, timeout)
            .await;
        match reply
            .ok()
            .and_then(|b| network::decode::<RpcResponse>(&b).ok())
        {
            Some(RpcResponse::RevertAllowed { vote: granted }) if granted == *vote => {
                tracing::info!(
                    node = me,
                    leader,
                    "leader will replicate to this repaired voter from the start"
                );
                *self
                    .inner()
                    .revert_allowed_by
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(granted);
                Ok(())
            }
            _ => Err(ControlError::CatchingUp(me)),
        }
    }

    /// Leader side of [`Self::ensure_revert_allowed`].
    async fn allow_revert(&self, node: NodeId) -> Result<RpcResponse, ControlError> {
        let core = self.inner();
        let raft = &core.raft;
        if !raft.is_leader() {
            return Err(ControlError::NotLeader {
                leader: self.current_leader_addr(),
            });
        }
        let vote = raft.metrics().borrow_watched().vote;
        match raft.trigger().allow_next_revert(&node, true).await {
            Ok(Ok(())) => Ok(RpcResponse::RevertAllowed { vote }),
            Ok(Err(e)) => Err(ControlError::Raft(e.to_string())),
            Err(e) => Err(fatal(&e)),
        }
    }

    /// A repaired voter may vote again once it has applied everything its leader had
    /// committed: from then on its log holds every committed entry, as a voter's must.
    async fn end_catch_up_once_applied(&self, leader_commit: Option<u64>) {
        let Some(commit) = leader_commit else { return };
        if self.inner().state_rx.borrow().applied_index < commit {
            return;
        }
        let Some(db) = self.inner().db.upgrade() else {
            return;
        };
        let cleared = tokio::task::spawn_blocking(move || store::set_repaired(&db, None)).await;
        match cleared {
            Ok(Ok(())) => {
                self.inner()
                    .catching_up
                    .store(false, std::sync::atomic::Ordering::Release);
                tracing::info!(
                    node = self.shell.cfg.node_id,
                    applied = commit,
                    "repaired voter caught up; voting again"
                );
            }
            Ok(Err(e)) => tracing::warn!("clearing the repair marker failed: {e}"),
            Err(e) => tracing::warn!("clearing the repair marker failed: {e}"),
        }
    }

    /// A digest of the applied state: (applied index, SHA-256 of its encoding, hex). Two voters
    /// at the same index hold the same state exactly when the digests are equal; used to
    /// check a repaired voter against the others. Cached per applied index.
    pub fn state_digest(&self) -> (u64, String) {
        let view = self.state();
        let mut cache = self.shell.digest.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((index, hex)) = cache.as_ref().filter(|(i, _)| *i == view.applied_index) {
            return (*index, hex.clone());
        }
        let hex = match postcard::to_stdvec(view.state.as_ref()) {
            Ok(bytes) => {
                use sha2::Digest;
                let d = sha2::Sha256::digest(&bytes);
                d.iter().map(|b| format!("{b:02x}")).collect::<String>()
            }
            Err(e) => format!("unencodable: {e}"),
        };
        *cache = Some((view.applied_index, hex.clone()));
        (view.applied_index, hex)
    }

    /// Whether this voter is still catching up after a repair (it grants no votes).
    pub fn is_catching_up(&self) -> bool {
        self.inner()
            .catching_up
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Voters this node's replication is failing towards (when it leads): voter id ->
    /// (how long it has been failing, the last error). Empty while replication is healthy.
    pub fn replication_trouble(&self) -> BTreeMap<NodeId, (Duration, String)> {
        if !self.is_leader() {
            return BTreeMap::new();
        }
        self.inner()
            .trouble
            .snapshot()
            .into_iter()
            .map(|(id, (since, why))| (id, (since.elapsed(), why)))
            .collect()
    }

    /// Stops Raft and waits (at most `shutdown_timeout`) until its tasks have released the
    /// store, so the same `data_dir` can be reopened as soon as this returns `Ok`. Idempotent;
    /// no [`Self::restart`] after it.
    pub async fn shutdown(&self) -> Result<(), ControlError> {
        let _one = self.shell.lifecycle.lock().await;
        self.shell
            .shut
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner().stop().await
    }

    fn leader_of(&self, f: &ForwardToLeader<Tc>) -> Option<(NodeId, String)> {
        let id = f.leader_id?;
        let addr = match &f.leader_node {
            Some(n) => n.addr.clone(),
            None => self.shell.cfg.voters.get(&id).cloned().unwrap_or_default(),
        };
        Some((id, addr))
    }
}

/// Checks every stored record before Raft sees the store. Returns whether the store carries
/// the repair marker (the voter is catching up and must not initialize or vote).
async fn verify_store(cfg: &ControlConfig, db: &Arc<redb::Database>) -> Result<bool, ControlError> {
    let db2 = db.clone();
    let checked = tokio::task::spawn_blocking(move || {
        Ok::<_, std::io::Error>((store::verify_all(&db2)?, store::is_repaired(&db2)?))
    })
    .await
    .map_err(|e| ControlError::Storage(e.to_string()))?;
    let (damage, repaired) = checked.map_err(|e| ControlError::Storage(e.to_string()))?;
    if let Some(d) = damage {
        return Err(ControlError::Corrupt {
            file: cfg.data_dir.join(store::DB_FILE),
            table: d.table.to_string(),
            key: d.key,
            reason: d.reason,
        });
    }
    Ok(repaired)
}

/// Initializes a pristine store with `cfg.voters`. Every voter may do so with the identical
/// voter map; a node that is already initialized (or that received the membership from a
/// peer first) skips it.
async fn initialize_if_pristine<S: ReplicatedState>(
    raft: &Raft<Tc, StateMachine<S>>,
    cfg: &ControlConfig,
) -> Result<(), ControlError> {
    if raft.is_initialized().await.map_err(|e| fatal(&e))? {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = cfg
        .voters
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(node = cfg.node_id, voters = ?cfg.voters, "initialized raft cluster");
            Ok(())
        }
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
            tracing::debug!(node = cfg.node_id, "already initialized: {e}");
            Ok(())
        }
        Err(RaftError::APIError(e)) => {
            let _ = raft.shutdown().await;
            Err(ControlError::Config(e.to_string()))
        }
        Err(RaftError::Fatal(e)) => Err(fatal(&e)),
    }
}

fn leader_view<S: ReplicatedState>(raft: &Raft<Tc, StateMachine<S>>) -> LeaderView {
    let m = raft.metrics();
    let m = m.borrow_watched();
    LeaderView {
        term: m.current_term,
        leader: m.current_leader,
    }
}
