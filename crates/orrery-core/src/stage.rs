//! Start-up stages, -4 to 0, as in the post-mortem's cluster (seed 001).
//!
//! A node's stage is the last stage it has *completed*; the cluster's stage is
//! the last stage that *every* participating node has completed. A node works
//! towards `stage.next()` only once the cluster has completed its own stage:
//! that is the barrier.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One start-up stage. Ordered: `NOT_STARTED < RUNNING < ... < READY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stage(i8);

impl Stage {
    /// Not yet reached the control plane (no join committed in this boot).
    pub const NOT_STARTED: Stage = Stage(-5);
    /// -4: the process is up and the control plane has accepted its join.
    pub const RUNNING: Stage = Stage(-4);
    /// -3: connected to every peer it must talk to.
    pub const CONNECTED: Stage = Stage(-3);
    /// -2: address cache primed (holds the current cluster-state version).
    pub const ADDRESSED: Stage = Stage(-2);
    /// -1: services initialised and preloaded.
    pub const PRELOADED: Stage = Stage(-1);
    /// 0: told the cluster is ready; serving.
    pub const READY: Stage = Stage(0);

    /// Every stage a node passes through, in order.
    pub const ALL: [Stage; 5] = [
        Stage::RUNNING,
        Stage::CONNECTED,
        Stage::ADDRESSED,
        Stage::PRELOADED,
        Stage::READY,
    ];

    /// The stage as the signed number operators know (-5 .. 0).
    pub fn number(self) -> i8 {
        self.0
    }

    /// Parses the signed number; `None` outside -5..=0.
    pub fn from_number(n: i8) -> Option<Stage> {
        (-5..=0).contains(&n).then_some(Stage(n))
    }

    /// The stage after this one, or `None` at READY.
    pub fn next(self) -> Option<Stage> {
        (self.0 < 0).then_some(Stage(self.0 + 1))
    }

    /// Short name of what completing this stage means.
    pub fn name(self) -> &'static str {
        match self.0 {
            -5 => "not started",
            -4 => "running",
            -3 => "connected",
            -2 => "address cache primed",
            -1 => "preloaded",
            _ => "ready",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Stage::NOT_STARTED {
            write!(f, "-")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_ordered_and_walk_to_ready() {
        let mut s = Stage::NOT_STARTED;
        let mut seen = vec![];
        while let Some(n) = s.next() {
            assert!(n > s);
            seen.push(n);
            s = n;
        }
        assert_eq!(seen, Stage::ALL.to_vec());
        assert_eq!(Stage::from_number(1), None);
        assert_eq!(Stage::from_number(-1), Some(Stage::PRELOADED));
    }
}
