//! Configuration drift: where this node's own file disagrees with the
//! cluster configuration in the replicated state ([`Drift`]).
//!
//! The cluster-wide keys (`[[nodes]]`, the start-up deadline, policy and
//! liveness window, `[membership]`, `[placement]`) are replicated once, when
//! the control plane is bootstrapped; from then on every decision reads
//! them from the replicated state. A node whose file says otherwise (an
//! edited file, a `--set`, an old binary with other defaults) still runs
//! its own timers from its file, which is how the second post-mortem's
//! standby drifted silently. The node compares the two and raises an alarm
//! naming every key, its value here and the cluster's.
//!
//! This module owns the comparison only; it never changes either side.

use orrery_core::ClusterConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most keys one comparison reports (the rest are counted, not listed).
pub const MAX_DRIFT_KEYS: usize = 32;

/// Longest value shown, in bytes.
const MAX_VALUE_BYTES: usize = 200;

/// One key whose value here differs from the cluster's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// Dotted, as in the node's file (`membership.lease_ttl_ms`).
    pub key: String,
    /// This node's value (`-` if its file lacks the key).
    pub here: String,
    /// The replicated value, which the cluster's decisions use.
    pub cluster: String,
}

/// Every cluster-wide key whose value in `here` (this node's file) differs
/// from `cluster` (the replicated configuration), in key order, at most
/// [`MAX_DRIFT_KEYS`].
pub fn compare(here: &ClusterConfig, cluster: &ClusterConfig) -> Vec<Drift> {
    // Every node runs this every second against a config that names every
    // node: flattening both (thousands of keys) when they agree took most
    // of the CPU of 1,000 nodes in one process.
    if here == cluster {
        return vec![];
    }
    let (mine, theirs) = (flatten(here), flatten(cluster));
    let mut keys: Vec<&String> = mine.keys().chain(theirs.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| mine.get(*k) != theirs.get(*k))
        .take(MAX_DRIFT_KEYS)
        .map(|k| Drift {
            key: file_key(k),
            here: shown(mine.get(k)),
            cluster: shown(theirs.get(k)),
        })
        .collect()
}

/// The alarm text for a drift set: node, then every key with both values.
pub fn alarm_text(node: u64, drift: &[Drift]) -> String {
    let keys: Vec<String> = drift
        .iter()
        .map(|d| format!("{} = {} here, {} in the cluster", d.key, d.here, d.cluster))
        .collect();
    format!(
        "config drift on node {node}: {} (the cluster's values are in force for its decisions; this node's own timers use its file)",
        keys.join("; ")
    )
}

/// The replicated config's field names, as the node's file spells them.
fn file_key(k: &str) -> String {
    orrery_core::config::FILE_KEYS
        .iter()
        .find(|(field, _)| *field == k)
        .map_or(k, |(_, key)| *key)
        .to_string()
}

fn shown(v: Option<&String>) -> String {
    let mut s = v.cloned().unwrap_or_else(|| "-".into());
    if s.len() > MAX_VALUE_BYTES {
        let mut cut = MAX_VALUE_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Leaves of the config as dotted key -> JSON text (arrays whole).
fn flatten(cfg: &ClusterConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(v) = serde_json::to_value(cfg) {
        walk("", &v, &mut out);
    }
    out
}

fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

/// The keys of a node's file that are its own by nature (paths and
/// addresses): they may differ on every node and say nothing about drift.
pub const LOCAL_ONLY: [&str; 6] = [
    "node_id",
    "data_dir",
    "listen",
    "admin_listen",
    "tls",
    "store",
];

/// A digest (SHA-256, hex, first 16 bytes) of a node's effective
/// configuration per class: `cluster` (the replicated keys, as this node's
/// file has them: equal everywhere when nothing drifts), `node` (the
/// per-node keys: may differ, but nodes of one role usually agree),
/// `local` (paths and addresses). Credentials are left out of all three.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDigests {
    pub cluster: String,
    pub node: String,
    pub local: String,
}

/// [`ConfigDigests`] of `cfg`.
pub fn digests(cfg: &crate::NodeConfig) -> ConfigDigests {
    let cluster = serde_json::to_value(cfg.cluster_config()).unwrap_or_default();
    let mut all = serde_json::to_value(cfg).unwrap_or_default();
    let mut local = serde_json::Map::new();
    // The cluster-wide sections go before redaction: the node list alone
    // is most of a 1,000-node file, and every node digests its own.
    if let Some(map) = all.as_object_mut() {
        for key in ["nodes", "startup", "membership", "placement"] {
            map.remove(key);
        }
        for key in LOCAL_ONLY {
            if let Some(v) = map.remove(key) {
                local.insert(key.to_string(), v);
            }
        }
    }
    crate::console::redact_credentials(&mut all);
    let mut local = serde_json::Value::Object(local);
    crate::console::redact_credentials(&mut local);
    ConfigDigests {
        cluster: digest(&cluster),
        node: digest(&all),
        local: digest(&local),
    }
}

fn digest(v: &serde_json::Value) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(v.to_string().as_bytes());
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;

    fn config() -> ClusterConfig {
        let cfg: NodeConfig = toml::from_str(&crate::config::tests::sample()).unwrap();
        cfg.cluster_config()
    }

    #[test]
    fn digests_change_only_in_the_class_of_the_key_that_changed() {
        let base: NodeConfig = toml::from_str(&crate::config::tests::sample()).unwrap();
        let d0 = digests(&base);
        let mut c = base.clone();
        c.membership.lease_ttl_ms += 1;
        let d = digests(&c);
        assert!(d.cluster != d0.cluster && d.node == d0.node && d.local == d0.local);
        let mut c = base.clone();
        c.data_dir = "/elsewhere".into();
        let d = digests(&c);
        assert!(d.cluster == d0.cluster && d.node == d0.node && d.local != d0.local);
        let mut c = base.clone();
        c.watchdog.alarm_interval_ms += 1;
        let d = digests(&c);
        assert!(d.cluster == d0.cluster && d.node != d0.node && d.local == d0.local);
        let mut c = base;
        c.secret = "another secret".into();
        assert_eq!(digests(&c), d0, "credentials are in no digest");
    }

    #[test]
    fn equal_configs_do_not_drift() {
        assert!(compare(&config(), &config()).is_empty());
    }

    #[test]
    fn every_differing_key_is_named_with_both_values() {
        let cluster = config();
        let mut here = config();
        here.membership.lease_ttl_ms += 2_000;
        here.stage_deadline_ms = 5_000;
        let d = compare(&here, &cluster);
        let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            ["membership.lease_ttl_ms", "startup.stage_deadline_ms"]
        );
        assert_eq!(
            d[0].here,
            (cluster.membership.lease_ttl_ms + 2_000).to_string()
        );
        assert_eq!(d[0].cluster, cluster.membership.lease_ttl_ms.to_string());
        let text = alarm_text(4, &d);
        assert!(
            text.starts_with("config drift on node 4: membership.lease_ttl_ms = "),
            "{text}"
        );
    }

    #[test]
    fn a_node_list_that_differs_is_drift_too_and_the_report_is_bounded() {
        let cluster = config();
        let mut here = config();
        for id in 100..200 {
            let spec = here.nodes.values().next().unwrap().clone();
            here.nodes.insert(id, spec);
        }
        let d = compare(&here, &cluster);
        assert_eq!(d.len(), MAX_DRIFT_KEYS);
        assert!(d
            .iter()
            .all(|d| d.key.starts_with("nodes.") && d.cluster == "-"));
    }
}
