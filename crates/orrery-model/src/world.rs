//! The model's state ([`World`]): the clock, the replicated state, the
//! node processes, the messages in flight, and what the faults have used
//! of their budgets; and the messages themselves.

use crate::control::Control;
use crate::node::{Proc, Tick, Token};
use orrery_core::lease::LeaseAnswer;
use orrery_core::NodeId;
use std::collections::BTreeSet;

/// How the bounded model may spend its faults and moves (see
/// [`crate::Bounds`] for the limits).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Spent {
    pub crashes: u8,
    pub pauses: u8,
    pub moves: u8,
    pub removals: u8,
    /// Nodes that crashed at least once.
    pub crashed: BTreeSet<NodeId>,
}

/// What a heartbeat's answer carried, as the node reads it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    Renewed {
        shards_version: u64,
        jobs: Vec<Token>,
    },
    Fenced,
    /// Not the leader, or not vouched for: no renewal, nothing else.
    Refused,
}

impl From<LeaseAnswer> for Answer {
    fn from(a: LeaseAnswer) -> Self {
        match a {
            LeaseAnswer::Renewed {
                shards_version,
                jobs,
            } => Answer::Renewed {
                shards_version,
                jobs: jobs
                    .iter()
                    .map(|l| Token {
                        period: l.period,
                        lease_epoch: l.lease_epoch,
                        holder_epoch: l.holder_epoch,
                    })
                    .collect(),
            },
            LeaseAnswer::Fenced { .. } => Answer::Fenced,
            LeaseAnswer::NotLeader | LeaseAnswer::NotVouched => Answer::Refused,
        }
    }
}

/// A message in flight: it may be delivered at any later step (delay,
/// reordering) or lost. Heartbeats and their acknowledgements are not
/// messages here (see [`crate::model`]: a round trip is one step).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Msg {
    /// Holder to leader: `Command::CommitJob` with the token, proposed at `at`.
    Commit {
        node: NodeId,
        token: Token,
        at: Tick,
    },
}

/// A `CommitJob` that `apply` accepted.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Accepted {
    pub period: u64,
    pub holder: NodeId,
    pub token: Token,
}

/// The whole model state.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct World {
    pub now: Tick,
    pub control: Control,
    /// Node `i + 1` is `nodes[i]`.
    pub nodes: Vec<Proc>,
    pub net: BTreeSet<Msg>,
    pub spent: Spent,
    /// Every `CommitJob` that `apply` accepted, in order.
    pub commits: Vec<Accepted>,
    /// `apply` refused a commit as a stale token at least once.
    pub stale_refused: bool,
}

impl World {
    pub fn node(&self, id: NodeId) -> &Proc {
        &self.nodes[(id - 1) as usize]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Proc {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Time-normalises every process (see [`Proc::normalise`]).
    pub fn normalise(&mut self, fence: Tick, margin: Tick) {
        let now = self.now;
        for p in &mut self.nodes {
            p.normalise(now, fence, margin);
        }
    }
}
