//! The cluster configuration that lives in the replicated state.
//!
//! One source of truth (post-mortem 002: a standby ran a config nobody had
//! tested): the expected members, their roles, and the start-up policy are
//! part of [`crate::ClusterState`], written once when the control plane is
//! bootstrapped, and every node reads them from there.

use crate::{Millis, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What a node does in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds a Raft vote and hosts services.
    Voter,
    /// Hosts services; reaches the control plane through the voters.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Voter => "voter",
            Role::Worker => "worker",
        })
    }
}

/// What the coordinator does with a node that misses a stage deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StuckPolicy {
    /// Keep the barrier closed and keep reporting the stuck node.
    Wait,
    /// Fence the stuck node out of this start-up and let the rest proceed:
    /// a cluster that starts with fewer nodes beats one that does not start.
    #[default]
    Exclude,
}

impl FromStr for StuckPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wait" => Ok(StuckPolicy::Wait),
            "exclude" => Ok(StuckPolicy::Exclude),
            other => Err(format!(
                "unknown stuck policy {other:?}: expected \"wait\" or \"exclude\""
            )),
        }
    }
}

/// One expected member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Node-to-node address (host:port).
    pub addr: String,
    /// Admin HTTP address (host:port), for `orrery status` and operators.
    pub admin_addr: String,
    pub role: Role,
}

/// Replicated cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Every node expected in the cluster, by id.
    pub nodes: BTreeMap<NodeId, NodeSpec>,
    /// How long the cluster may spend completing one stage before the
    /// coordinator declares the laggards stuck (config key `stage_deadline`).
    pub stage_deadline_ms: Millis,
    /// What to do with a stuck node (config key `stuck_policy`).
    pub stuck_policy: StuckPolicy,
    /// How recently a node must have been heard from to count as running;
    /// used to tell a node rejoining a running cluster from a cluster-wide
    /// restart (config key `liveness_window`).
    pub liveness_window_ms: Millis,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: BTreeMap::new(),
            stage_deadline_ms: 60_000,
            stuck_policy: StuckPolicy::Exclude,
            liveness_window_ms: 1_500,
        }
    }
}

impl ClusterConfig {
    /// Ids of the voters, ascending.
    pub fn voters(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, s)| s.role == Role::Voter)
            .map(|(id, _)| *id)
            .collect()
    }
}
