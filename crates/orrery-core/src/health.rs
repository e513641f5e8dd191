//! What a node says about its own health, as the failure detector sees it.
//!
//! The checks themselves run in the node (orrery-node's `health` module);
//! this is only the verdict that travels with every heartbeat.

use serde::{Deserialize, Serialize};

/// A node's verdict on itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Every self-check passes.
    Healthy,
    /// A non-fatal check fails: the node keeps running but must not probe,
    /// vote or accuse, and its work should move elsewhere.
    Impaired(String),
    /// A fatal check failed: the node stops itself and needs a person.
    FailStop(String),
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }

    /// The reason, when not healthy.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Health::Healthy => None,
            Health::Impaired(r) | Health::FailStop(r) => Some(r),
        }
    }
}
