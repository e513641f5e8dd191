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
    /// A voter that hosts no services and takes no client traffic: it only
    /// keeps the control plane's quorum and settles disputes (post-mortem
    /// 003's two hidden nodes).
    Arbiter,
}

impl Role {
    /// Holds a Raft vote.
    pub fn is_voter(self) -> bool {
        matches!(self, Role::Voter | Role::Arbiter)
    }

    /// Runs application services.
    pub fn hosts_services(self) -> bool {
        matches!(self, Role::Voter | Role::Worker)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Voter => "voter",
            Role::Worker => "worker",
            Role::Arbiter => "arbiter",
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
    /// Failure detection and reinstatement (config section `[membership]`).
    #[serde(default)]
    pub membership: MembershipConfig,
    /// Shard placement (config section `[placement]`).
    #[serde(default)]
    pub placement: PlacementSettings,
}

/// How the coordinator places shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementSettings {
    /// Shards moved between live owners per coordinator step (rebalancing,
    /// joins, drains): a rolling restart never reloads everything at once.
    /// Default 64.
    pub max_moves_per_step: usize,
    /// Allowed load above or below a host's weighted even share, in percent.
    /// Default 10.
    pub load_slack_percent: u32,
    /// Capacity weights, as `[node, weight]` pairs: a node of weight 2 gets
    /// about twice the shards of one of weight 1. Unlisted nodes weigh 1;
    /// weight 0 hosts nothing.
    pub weights: Vec<(NodeId, u32)>,
}

impl PlacementSettings {
    /// The capacity weight of `node`.
    pub fn weight(&self, node: NodeId) -> u32 {
        self.weights
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(1, |(_, w)| *w)
    }
}

impl Default for PlacementSettings {
    fn default() -> Self {
        PlacementSettings {
            max_moves_per_step: 64,
            load_slack_percent: 10,
            weights: vec![],
        }
    }
}

/// Failure detection: leases, probes, health-gated voting, backoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipConfig {
    /// A node not heard from for this long is suspected (the coordinator's
    /// side of the lease). Default 1000.
    pub lease_ttl_ms: Millis,
    /// How often a node renews its lease (heartbeat). Default 200.
    pub heartbeat_interval_ms: Millis,
    /// A node whose last acknowledged heartbeat was sent this long ago stops
    /// serving. Must leave `fence_margin_ms` before `lease_ttl_ms`. Default 600.
    pub self_fence_after_ms: Millis,
    /// Minimum gap between a node fencing itself and the control plane being
    /// allowed to declare it dead; asserted at start. Default 300.
    pub fence_margin_ms: Millis,
    /// How many eligible nodes probe a suspect; a majority of them must fail
    /// to reach it for a removal. Default 3.
    pub probe_count: u32,
    /// Deadline of one probe. Default 300.
    pub probe_timeout_ms: Millis,
    /// Every node checks one peer's health proof this often, and reports a
    /// failure to the coordinator (an accusation, acted on only if the
    /// accuser is eligible). Default 500.
    pub peer_probe_interval_ms: Millis,
    /// Only nodes whose health has been perfect this long (or since the
    /// cluster became ready) may probe and vote. Default 180000.
    pub eligibility_window_ms: Millis,
    /// Reinstatement after the n-th removal waits base * 2^(n-1), at most
    /// max: a flapping node cannot churn the cluster. Defaults 1000, 60000.
    pub removal_backoff_base_ms: Millis,
    pub removal_backoff_max_ms: Millis,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            lease_ttl_ms: 1_000,
            heartbeat_interval_ms: 200,
            self_fence_after_ms: 600,
            fence_margin_ms: 300,
            probe_count: 3,
            probe_timeout_ms: 300,
            peer_probe_interval_ms: 500,
            eligibility_window_ms: 180_000,
            removal_backoff_base_ms: 1_000,
            removal_backoff_max_ms: 60_000,
        }
    }
}

impl MembershipConfig {
    /// Checks the timing rules; the error names the keys.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms >= self.self_fence_after_ms
        {
            return Err(format!(
                "membership.heartbeat_interval_ms ({}) must be positive and below membership.self_fence_after_ms ({})",
                self.heartbeat_interval_ms, self.self_fence_after_ms
            ));
        }
        if self.self_fence_after_ms + self.fence_margin_ms > self.lease_ttl_ms {
            return Err(format!(
                "membership.self_fence_after_ms ({}) + membership.fence_margin_ms ({}) must not exceed membership.lease_ttl_ms ({}): a node must stop serving before the cluster may declare it dead",
                self.self_fence_after_ms, self.fence_margin_ms, self.lease_ttl_ms
            ));
        }
        if self.probe_count == 0 || self.probe_timeout_ms == 0 {
            return Err(
                "membership.probe_count and membership.probe_timeout_ms must be positive".into(),
            );
        }
        if self.removal_backoff_base_ms > self.removal_backoff_max_ms {
            return Err("membership.removal_backoff_base_ms must not exceed membership.removal_backoff_max_ms".into());
        }
        Ok(())
    }

    /// How long after its `removals`-th removal a node must wait to be reinstated.
    pub fn backoff(&self, removals: u32) -> Millis {
        if removals == 0 {
            return 0;
        }
        let shift = (removals - 1).min(20);
        self.removal_backoff_base_ms
            .saturating_mul(1 << shift)
            .min(self.removal_backoff_max_ms)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: BTreeMap::new(),
            stage_deadline_ms: 60_000,
            stuck_policy: StuckPolicy::Exclude,
            liveness_window_ms: 1_500,
            membership: MembershipConfig::default(),
            placement: PlacementSettings::default(),
        }
    }
}

/// The replicated fields whose key in `node.toml` differs from the field
/// name (they live in the `[startup]` section there): (field, file key).
pub const FILE_KEYS: [(&str, &str); 3] = [
    ("stage_deadline_ms", "startup.stage_deadline_ms"),
    ("stuck_policy", "startup.stuck_policy"),
    ("liveness_window_ms", "startup.liveness_window_ms"),
];

/// Longest key and value `config set` takes, in bytes.
pub const MAX_SET_KEY_BYTES: usize = 128;
pub const MAX_SET_VALUE_BYTES: usize = 256;

impl ClusterConfig {
    /// `config set`: this configuration with `key` (spelt as in `node.toml`,
    /// e.g. `membership.lease_ttl_ms`) set to `value`, and the key's old
    /// value. Refused, naming why: an unknown key, the node list (members
    /// change by joining and leaving, not by a config edit), a value of
    /// another type than the key's, or a result that does not validate.
    pub fn with_key(&self, key: &str, value: &str) -> Result<(ClusterConfig, String), String> {
        if key.len() > MAX_SET_KEY_BYTES || value.len() > MAX_SET_VALUE_BYTES {
            return Err(format!(
                "key or value too long (at most {MAX_SET_KEY_BYTES} and {MAX_SET_VALUE_BYTES} bytes)"
            ));
        }
        let field = FILE_KEYS
            .iter()
            .find(|(_, file)| *file == key)
            .map_or(key, |(field, _)| *field);
        if field == "nodes" || field.starts_with("nodes.") {
            return Err("the node list is not a config key: nodes join and leave".into());
        }
        let mut tree = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let leaf = field
            .split('.')
            .try_fold(&mut tree, |v, part| v.get_mut(part))
            .filter(|v| !v.is_object())
            .ok_or_else(|| format!("unknown cluster-wide key {key:?}"))?;
        let new = serde_json::from_str::<serde_json::Value>(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        let same_kind = matches!(
            (&*leaf, &new),
            (serde_json::Value::Number(_), serde_json::Value::Number(_))
                | (serde_json::Value::String(_), serde_json::Value::String(_))
                | (serde_json::Value::Bool(_), serde_json::Value::Bool(_))
        );
        if !same_kind {
            return Err(format!("{key} takes a value like {leaf}, not {value:?}"));
        }
        let old = std::mem::replace(leaf, new).to_string();
        let cfg: ClusterConfig =
            serde_json::from_value(tree).map_err(|e| format!("{key} = {value}: {e}"))?;
        cfg.membership.validate()?;
        if cfg.stage_deadline_ms == 0 || cfg.liveness_window_ms == 0 {
            return Err(
                "startup.stage_deadline_ms and startup.liveness_window_ms must be positive".into(),
            );
        }
        Ok((cfg, old))
    }

    /// Ids of the voters, ascending.
    pub fn voters(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, s)| s.role.is_voter())
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod set_key_tests {
    use super::*;

    #[test]
    fn a_key_is_set_by_its_file_name_and_the_old_value_returned() {
        let c = ClusterConfig::default();
        let (n, old) = c.with_key("membership.lease_ttl_ms", "3000").unwrap();
        assert_eq!(n.membership.lease_ttl_ms, 3_000);
        assert_eq!(old, c.membership.lease_ttl_ms.to_string());
        let (n, _) = c.with_key("startup.stuck_policy", "wait").unwrap();
        assert_eq!(n.stuck_policy, StuckPolicy::Wait);
        let (n, _) = c.with_key("startup.stage_deadline_ms", "5000").unwrap();
        assert_eq!(n.stage_deadline_ms, 5_000);
    }

    #[test]
    fn bad_keys_and_values_are_refused_and_change_nothing() {
        let c = ClusterConfig::default();
        for (k, v, says) in [
            ("membership.nope", "1", "unknown"),
            ("membership", "1", "unknown"),
            ("nodes", "{}", "node list"),
            ("nodes.1.addr", "x", "node list"),
            ("membership.lease_ttl_ms", "soon", "takes a value like"),
            ("membership.lease_ttl_ms", "-5", "lease_ttl_ms"),
            ("membership.lease_ttl_ms", "10", "must not exceed"),
            ("startup.stuck_policy", "maybe", "stuck_policy"),
            ("startup.stage_deadline_ms", "0", "positive"),
        ] {
            let e = c.with_key(k, v).unwrap_err();
            assert!(e.contains(says), "{k} = {v}: {e}");
        }
        let long = "9".repeat(MAX_SET_VALUE_BYTES + 1);
        assert!(c.with_key("membership.lease_ttl_ms", &long).is_err());
    }
}
