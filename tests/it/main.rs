//! orrery's integration tests: one binary, one module per area.
//!
//! `sim` drives the start-up state machines in the deterministic simulator;
//! the other modules start real `orrery` node processes on 127.0.0.1.

mod sim;
