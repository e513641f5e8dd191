//! The node-to-node protocol: what one orrery node may ask another.
//!
//! orrery-wire carries these enums in authenticated frames; this module only
//! says what they mean. Adding a variant at the end keeps old peers able to
//! decode the rest (postcard encodes variants by index).

use crate::health::HealthProof;
use crate::shards::{CallError, Hop};
use orrery_core::shardmap::{ShardId, ShardMap};
use orrery_core::{ClusterState, Command, Epoch, Gate, Health, JobLease, NodeId, Response, Stage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A request from one node to another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// An opaque openraft RPC for orrery-control (voters only).
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Propose a command to the control plane (leader only; others say who leads).
    Propose(Command),
    /// May `node` (process `epoch`) start work on stage `next`? Also the
    /// node's liveness signal to the coordinator.
    Poll {
        node: NodeId,
        epoch: u64,
        next: Stage,
    },
    /// The current cluster state, read linearizably (leader only).
    FetchState,
    /// The nodes taking part in the current start-up, from the leader's
    /// applied state (leader only): what stage -3 connects to, without the
    /// cost of the whole state (a `FetchState` per node per retry stalled a
    /// 100-node cluster's leader for seconds).
    Participants,
    /// Connectivity check.
    Ping,
    /// Lease renewal to the leader, with the node's own health verdict and
    /// the version of the membership view it holds.
    Heartbeat {
        node: NodeId,
        epoch: Epoch,
        health: Health,
        view_version: u64,
    },
    /// Leader to an eligible node: probe `suspect` directly and say whether
    /// it answered with a valid health proof.
    Probe {
        round: u64,
        suspect: NodeId,
        epoch: Epoch,
    },
    /// Prober to suspect: prove you are alive and sane.
    HealthProbe { nonce: u64 },
    /// To the leader: `suspect` (under `epoch`) failed this node's probe.
    Accuse {
        suspect: NodeId,
        epoch: Epoch,
        detail: String,
    },
    /// A routed call to a shard on its owner.
    ShardCall {
        shard: ShardId,
        /// The ownership epoch the caller believes current, if known.
        epoch: Option<u64>,
        call: String,
        /// Bytes on the wire as one block (not element by element).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Milliseconds left until the caller's deadline.
        deadline_ms: u32,
        /// Callers waiting on this call, outermost first.
        chain: Vec<Hop>,
    },
    /// The current shard map (leader only).
    FetchShards,
    /// Log lines for the collector node (the cluster-wide log view).
    Logs(Vec<crate::logfwd::LogLine>),
}

impl Request {
    /// The request's kind, for metrics and the watchdog.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Raft(_) => "raft",
            Request::Propose(_) => "propose",
            Request::Poll { .. } => "poll",
            Request::FetchState => "fetch_state",
            Request::Participants => "participants",
            Request::Ping => "ping",
            Request::Heartbeat { .. } => "heartbeat",
            Request::Probe { .. } => "probe",
            Request::HealthProbe { .. } => "health_probe",
            Request::Accuse { .. } => "accuse",
            Request::ShardCall { .. } => "shard_call",
            Request::FetchShards => "fetch_shards",
            Request::Logs(_) => "logs",
        }
    }
}

/// Who is a member under which epoch, and who is fenced and why: what every
/// node needs to refuse messages from revoked epochs (the rule itself is
/// `crate::authz`'s).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipView {
    pub version: u64,
    /// node -> (current epoch, why that epoch is fenced if it is)
    pub members: BTreeMap<NodeId, (Epoch, Option<String>)>,
    /// node -> lowest certificate serial still accepted (the replicated
    /// `cert_floor`), enforced by the TLS layer at every handshake.
    #[serde(default)]
    pub cert_floor: BTreeMap<NodeId, u64>,
    /// The state's `config_index`: a node whose copy of the cluster state
    /// is older refetches it (cluster-wide keys changed by `config set`).
    #[serde(default)]
    pub config_index: u64,
}

impl MembershipView {
    /// The compact view of `state`'s membership (version left at 0).
    pub fn of(state: &ClusterState) -> Self {
        let members = state
            .members
            .iter()
            .map(|(id, m)| (*id, (m.epoch, state.refusal(*id, m.epoch))))
            .collect();
        MembershipView {
            version: 0,
            members,
            cert_floor: state.cert_floor.clone(),
            config_index: state.config_index,
        }
    }

    /// The certificates this view revokes, as the TLS layer takes them.
    pub fn revocations(&self) -> orrery_trust::RevocationList {
        orrery_trust::RevocationList {
            revoked_serials: Default::default(),
            min_serial: self.cert_floor.clone(),
        }
    }
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    Raft(Result<Vec<u8>, String>),
    Committed {
        index: u64,
        response: Response,
    },
    Gate {
        gate: Gate,
        next: Stage,
    },
    State(Box<ClusterState>),
    /// Answer to `Participants`: the current start-up's participants, and
    /// those of them that have completed stage -3 (they dial nobody any
    /// more), both ascending.
    Participants {
        ids: Vec<NodeId>,
        connected: Vec<NodeId>,
    },
    Pong,
    /// Ask the leader instead (if known).
    NotLeader {
        leader: Option<NodeId>,
    },
    Error(String),
    /// The lease was renewed; a newer membership view if the node's is
    /// stale, the leader's shard map version (the node refreshes its
    /// address cache when it is behind), and the job leases the node holds
    /// under the epoch it heartbeats with (uncommitted periods only; at most
    /// one per declared job, so at most `orrery_core::jobs::MAX_JOBS`).
    HeartbeatAck {
        view: Option<Box<MembershipView>>,
        shards_version: u64,
        jobs: Vec<JobLease>,
    },
    /// Refused: the sender's epoch is revoked or superseded (which node,
    /// which epoch, why).
    Fenced {
        reason: String,
    },
    /// A probe's verdict.
    ProbeResult {
        ok: bool,
        detail: String,
    },
    HealthProof(HealthProof),
    ShardReply(Result<Vec<u8>, CallError>),
    Shards(Box<ShardMap>),
    /// Done (log lines taken in).
    Ok,
}
