//! orrery's integration tests: one binary, one module per area.
//!
//! `sim` drives the start-up state machines in the deterministic simulator;
//! `startup` starts real `orrery node` processes on 127.0.0.1 through the
//! harness in `cluster`.

mod cluster;
mod sim;
mod startup;
