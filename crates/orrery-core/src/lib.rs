//! orrery-core: the cluster's decision logic, as deterministic state machines.
//!
//! This crate owns *what the cluster decides*: the replicated [`ClusterState`]
//! and how each [`Command`] changes it, the start-up [`Coordinator`] that the
//! Raft leader runs (stage barrier, stuck-node diagnosis, exclusion, new
//! boots), the stage gate each node consults before starting the next
//! stage's work, and per-period singleton [`jobs`] (which healthy node runs
//! which period, under which fencing token). It also holds [`sim`], an in-process discrete-event
//! simulator that drives exactly these state machines for hundreds of nodes
//! with a seeded network (delay, loss, partitions, crashes).
//!
//! What it must never do: perform I/O, read a clock, use global randomness,
//! or iterate a hash map. Time comes in as [`Millis`] arguments and
//! randomness as a seeded RNG, so that one seed replays a whole cluster.
//! `clippy.toml` at the workspace root forbids `Instant::now`,
//! `SystemTime::now`, `thread_rng` and `HashMap`/`HashSet`; this crate keeps
//! those lints at `deny`.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod config;
pub mod coordinator;
mod detector;
pub mod health;
pub mod invariants;
pub mod jobs;
pub mod lease;
pub mod shardmap;
pub mod sim;
pub mod stage;
pub mod state;
#[cfg(test)]
mod testkit;

pub use config::{ClusterConfig, MembershipConfig, NodeSpec, PlacementSettings, Role, StuckPolicy};
pub use coordinator::{Coordinator, ProbeRequest};
pub use health::Health;
pub use jobs::{JobCommit, JobLease, JobSpec, JobState, Jobs};
pub use stage::Stage;
pub use state::{
    ClusterState, Command, Event, EventKind, Fence, Gate, Member, MemberHealth, MemberStatus,
    Progress, Rejection, Response, StageReport, Wait,
};

/// A node's identity, stable across restarts (it comes from the node's config).
pub type NodeId = u64;

/// Milliseconds on the clock the caller injects (wall-clock milliseconds since
/// the Unix epoch in a real node, virtual milliseconds in the simulator).
pub type Millis = u64;

/// A membership epoch: issued by the control plane each time a node process
/// joins, strictly increasing across the cluster's whole life. It is the
/// node's fencing token: a message or report carrying an older epoch than the
/// member's current one comes from a process that no longer counts.
pub type Epoch = u64;
