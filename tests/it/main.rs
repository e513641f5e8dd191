//! orrery's integration tests: one binary, one module per area.
//!
//! `sim` drives the start-up state machines in the deterministic simulator;
//! `inproc` runs the node code itself, 20 nodes in one process, on a
//! simulated network;
//! `startup` starts real `orrery node` processes on 127.0.0.1 through the
//! harness in `cluster`.

// Tests run real processes against real time; the determinism rules bind
// decision logic, not the harness that watches it.
#![allow(clippy::disallowed_methods)]

mod cluster;
mod inproc;
mod membership;
mod shards;
mod sim;
mod startup;
