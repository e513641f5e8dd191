//! orrery-node: the runtime of one orrery node process.
//!
//! A node listens for authenticated peers (orrery-wire), runs the Raft
//! control plane if it is a voter (orrery-control), coordinates start-up
//! while it leads, and drives its own start-up through the stages -4 to 0,
//! calling the application's [`Service`] hooks. Its admin HTTP endpoint
//! tells operators what it is doing and what it waits on.
//!
//! What it must never do: decide cluster policy itself (that is
//! orrery-core's state machines, fed by this crate), block the async
//! runtime, or let one bad peer affect another.

pub mod admin;
pub mod admin_host;
pub mod alarms;
mod authz;
pub mod backup;
pub mod clock;
pub mod config;
pub mod console;
pub mod drift;
pub mod drills;
pub mod health;
pub mod history;
pub mod jobs;
mod lease;
pub mod logfwd;
pub mod messages;
mod metrics;
pub mod node;
pub mod private;
pub mod quorum;
pub mod resources;
pub mod service;
pub mod shards;
pub mod transport;
mod voter;
pub mod watchdog;

pub use config::NodeConfig;
pub use jobs::JobStats;
pub use node::{ControlState, Node, NodeError, NodeStatus, Services};
pub use service::{
    BoxedFuture, ConsoleExtension, DemoService, DemoShards, DemoStatsJob, JobOutput, JobRun,
    PeriodicJob, Service, ServiceCounter, ServiceError, ServiceFuture, StageContext,
};
pub use transport::{MemFaults, MemNetwork, Transport};
