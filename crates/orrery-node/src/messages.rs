//! The node-to-node protocol: what one orrery node may ask another.
//!
//! orrery-wire carries these enums in authenticated frames; this module only
//! says what they mean. Adding a variant at the end keeps old peers able to
//! decode the rest (postcard encodes variants by index).

use orrery_core::{ClusterState, Command, Gate, NodeId, Response, Stage};
use serde::{Deserialize, Serialize};

/// A request from one node to another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// An opaque openraft RPC for orrery-control (voters only).
    Raft(Vec<u8>),
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
    /// Connectivity check.
    Ping,
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
    Pong,
    /// Ask the leader instead (if known).
    NotLeader {
        leader: Option<NodeId>,
    },
    Error(String),
}
