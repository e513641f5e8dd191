//! orrery's integration tests: one binary, one module per area.
//!
//! `sim` drives the start-up state machines in the deterministic simulator;
//! `inproc` runs the node code itself, 20 nodes in one process, on a
//! simulated network;
//! `operations` drives real clusters from the console, the admin API, the
//! dashboard (headless Chromium) and the timeline;
//! `startup` starts real `orrery node` processes on 127.0.0.1 through the
//! harness in `cluster`; `jobs` kills per-period jobs' holders and reads
//! the store they share; `trust` attacks the mutual-TLS boundary;
//! `leave` stops nodes with SIGTERM (they leave, never suspected) and runs
//! `orrery up` on a directory in use and on a node that cannot start.

// Tests run real processes against real time; the determinism rules bind
// decision logic, not the harness that watches it.
#![allow(clippy::disallowed_methods)]

mod backup;
mod cluster;
mod conncaps;
mod disk;
mod drift;
mod drill;
mod inproc;
mod integrity;
mod jobs;
mod leave;
mod membership;
mod operations;
mod promlint;
mod quorum;
mod roll;
mod shards;
mod sim;
mod startup;
mod trust;
mod universe;
