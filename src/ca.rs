//! `orrery ca`: the cluster's certificate authority on disk, for clusters
//! set up by hand (`orrery up` calls the same two steps for a local one).
//!
//! This module owns the *files* (where the CA and each node's credentials
//! go); what a certificate says and how it is checked is `orrery-trust`'s.
//! It must never print or log a private key.

use anyhow::{bail, Context, Result};
use orrery_core::{NodeId, Role};
use orrery_trust::{ClusterCa, NodeCredentials};
use std::path::Path;

/// Creates a new CA for `cluster_id` in `dir` (0700; key 0600). Refuses to
/// overwrite one: a second CA would split the cluster into two that cannot
/// talk to each other.
pub fn init(dir: &Path, cluster_id: &str) -> Result<ClusterCa> {
    if dir.join(orrery_trust::ca::CA_KEY_FILE).exists() {
        bail!(
            "{} already holds a CA; issue node certificates from it with `orrery ca issue`",
            dir.display()
        );
    }
    let mut ca = ClusterCa::init(cluster_id).context("create the cluster CA")?;
    ca.save(dir)
        .with_context(|| format!("save the CA in {}", dir.display()))?;
    Ok(ca)
}

/// Issues node `node` a certificate for `role` under the CA in `ca_dir`
/// (the next serial: a re-issued certificate supersedes every earlier one
/// once the cluster raises the node's minimum serial) and writes the node's
/// directory `out` (`ca.crt`, `node.crt`, `node.key`).
pub fn issue(ca_dir: &Path, node: NodeId, role: Role, out: &Path) -> Result<NodeCredentials> {
    let mut ca = ClusterCa::load(ca_dir).with_context(|| {
        format!(
            "load the CA in {} (create it with `orrery ca init`)",
            ca_dir.display()
        )
    })?;
    let creds = ca
        .issue_next(node, role)
        .with_context(|| format!("issue a certificate for node {node}"))?;
    creds
        .save(out)
        .with_context(|| format!("write node {node}'s credentials to {}", out.display()))?;
    Ok(creds)
}

/// Parses a role as `--role` takes it.
pub fn parse_role(name: &str) -> Result<Role> {
    orrery_trust::names::parse_role(name)
        .with_context(|| format!("unknown role {name:?}: voter, worker or arbiter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_a_second_ca_and_issue_writes_a_loadable_node_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, "hand-made").unwrap();
        let again = init(&ca_dir, "hand-made").unwrap_err().to_string();
        assert!(again.contains("already holds a CA"), "{again}");
        let out = dir.path().join("node-4/tls");
        let first = issue(&ca_dir, 4, Role::Worker, &out).unwrap();
        let second = issue(&ca_dir, 4, Role::Worker, &out).unwrap();
        assert!(second.serial() > first.serial(), "serials only grow");
        let loaded = NodeCredentials::load(&out).unwrap();
        assert_eq!(loaded.identity().node_id, 4);
        assert_eq!(loaded.serial(), second.serial());
        assert!(parse_role("captain").is_err());
        let missing = issue(&dir.path().join("nope"), 1, Role::Voter, &out);
        assert!(missing.unwrap_err().to_string().contains("orrery ca init"));
    }
}
