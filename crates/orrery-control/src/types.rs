//! The openraft type configuration. Private to this crate: nothing here is re-exported.
//!
//! The Raft log carries opaque postcard bytes (`CmdBytes`) rather than `S::Command` so that the
//! openraft type configuration is not generic over the application state; the state machine
//! (`store::StateMachine<S>`) decodes commands when it applies them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A postcard-encoded `S::Command`, as stored in the Raft log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CmdBytes(pub(crate) Vec<u8>);

impl fmt::Debug for CmdBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CmdBytes({} bytes)", self.0.len())
    }
}

impl fmt::Display for CmdBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The result of applying one log entry: a postcard-encoded `S::Response`, or why the
/// command could not be decoded (e.g. a version skew between nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ApplyReply {
    Applied(Vec<u8>),
    Undecodable(String),
    /// Blank and membership entries carry no application response.
    Internal,
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the control plane.
    pub(crate) Tc:
        D = CmdBytes,
        R = ApplyReply,
        NodeId = u64,
        Node = openraft::BasicNode,
        AsyncRuntime = openraft::TokioRuntime,
);

pub(crate) type LogId = openraft::type_config::alias::LogIdOf<Tc>;
pub(crate) type Vote = openraft::type_config::alias::VoteOf<Tc>;
pub(crate) type Entry = openraft::type_config::alias::EntryOf<Tc>;
pub(crate) type StoredMembership = openraft::type_config::alias::StoredMembershipOf<Tc>;
pub(crate) type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<Tc>;
pub(crate) type Snapshot = openraft::type_config::alias::SnapshotOf<Tc, Vec<u8>>;
