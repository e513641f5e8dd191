//! Errors of the control plane. They carry strings, never openraft types.

use std::time::Duration;

use crate::NodeId;

/// An error from [`crate::ControlPlane`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// This node is not the leader; forward to `leader` (id and address) if known.
    #[error("not the leader; leader is {}", fmt_leader(.leader))]
    NotLeader {
        /// The current leader, if this node knows it.
        leader: Option<(NodeId, String)>,
    },
    /// The proposal was appended locally but discarded when this node lost leadership.
    /// It may or may not commit through the new leader: callers must deduplicate retries.
    #[error("proposal discarded on leader change, commit status unknown; leader is {}", fmt_leader(.leader))]
    CommitUnknown {
        /// The new leader, if known.
        leader: Option<(NodeId, String)>,
    },
    /// A linearizable read could not confirm leadership with a quorum.
    #[error("quorum not reached: {0}")]
    QuorumNotReached(String),
    /// The configuration is invalid.
    #[error("invalid control-plane config: {0}")]
    Config(String),
    /// Opening or using the on-disk store failed.
    #[error("raft storage error: {0}")]
    Storage(String),
    /// A command, response or state could not be (de)serialized.
    #[error("codec error: {0}")]
    Codec(String),
    /// An incoming RPC payload was malformed.
    #[error("malformed raft rpc: {0}")]
    MalformedRpc(String),
    /// The Raft core stopped: shut down, or failed fatally (e.g. a storage error).
    /// openraft does not recover from this; the process should restart the control plane.
    #[error("raft core stopped: {0}")]
    Fatal(String),
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Any other Raft error.
    #[error("raft error: {0}")]
    Raft(String),
    /// A proposal is larger than `max_proposal_bytes`; it was not appended.
    #[error(
        "proposal of {bytes} bytes exceeds the limit of {limit} bytes (raft.max_proposal_bytes)"
    )]
    ProposalTooLarge {
        /// Encoded size of the refused command.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A record in the Raft store failed its checksum or does not decode. The node must not
    /// start on it: run `orrery repair` to rebuild this voter's Raft data from its peers.
    #[error("raft store {file} is damaged: table {table}, key {key}: {reason}; run `orrery repair` to rebuild this voter from its peers")]
    Corrupt {
        /// The store file.
        file: std::path::PathBuf,
        /// The redb table (`raft_log` or `raft_meta`).
        table: String,
        /// The log index (in `raft_log`) or the meta key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This voter was repaired and has not caught up with the leader yet: it grants no
    /// votes until it has, so it cannot help elect a leader that lacks committed entries.
    #[error("voter {0} is catching up after a repair and grants no votes yet")]
    CatchingUp(NodeId),
}

fn fmt_leader(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!("{id} at {addr}"),
        None => "unknown".to_string(),
    }
}

/// An error from a [`crate::RaftTransport`] call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The target could not be reached (connection refused, reset, node down).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The call did not complete within its timeout.
    #[error("rpc timed out")]
    Timeout,
    /// The remote handled the call but failed (e.g. its `handle_rpc` returned an error).
    #[error("remote error: {0}")]
    Remote(String),
}
