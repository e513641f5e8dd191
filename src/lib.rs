//! orrery: a cluster runtime for sharded, stateful, real-time services.
//!
//! This crate is the front door: the `orrery` binary (`src/main.rs`) and the
//! pieces it shares with the integration tests ([`local`]: planning and
//! talking to a local cluster of real node processes). The runtime itself
//! lives in the workspace crates re-exported here.

pub mod backup;
pub mod ca;
pub mod drill;
pub mod exec;
pub mod inproc;
pub mod local;
pub mod procs;
pub mod roll;
pub mod sweep;

pub use orrery_core as core;
pub use orrery_node as node;
