//! The names a certificate carries: cluster id, node URI, node DNS name, role.
//!
//! A node certificate names its holder twice, in two subject alternative names:
//! - a URI `urn:orrery:<cluster_id>:node:<node_id>:<role>`: the identity
//!   ([`crate::PeerIdentity`] is read from it);
//! - a DNS name `node-<node_id>.<cluster_id>.orrery`: the TLS server name a client asks
//!   for, so rustls' own name check pins the server to the node the client meant.
//!
//! The CA certificate carries the URI `urn:orrery:<cluster_id>:ca`, from which a loaded
//! CA learns its cluster id.

use orrery_core::{NodeId, Role};
use rustls::pki_types::ServerName;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Longest cluster id: one DNS label.
pub const MAX_CLUSTER_ID_LEN: usize = 63;

/// The URI scheme prefix of every orrery identity.
pub(crate) const URN_PREFIX: &str = "urn:orrery:";

/// A cluster id usable inside a DNS name and a URN: 1 to 63 characters of `a-z`, `0-9`
/// and `-`, neither starting nor ending with `-` (one DNS label, lower case only so that
/// comparison is byte equality).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(String);

/// A string that cannot be a [`ClusterId`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid cluster id {id:?}: {reason}")]
pub struct InvalidClusterId {
    /// The refused string (cut to [`MAX_CLUSTER_ID_LEN`] + 1 characters).
    pub id: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl ClusterId {
    /// Validates `id` as a cluster id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidClusterId> {
        let id = id.into();
        let bad = |reason| InvalidClusterId {
            id: id.chars().take(MAX_CLUSTER_ID_LEN + 1).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(bad("empty"));
        }
        if id.len() > MAX_CLUSTER_ID_LEN {
            return Err(bad("longer than 63 characters"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("only a-z, 0-9 and '-' are allowed"));
        }
        if id.starts_with('-') || id.ends_with('-') {
            return Err(bad("must not start or end with '-'"));
        }
        Ok(ClusterId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterId {
    type Err = InvalidClusterId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterId::new(s)
    }
}

/// The role's name as it appears in certificates (`orrery_core::Role`'s `Display`).
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Voter => "voter",
        Role::Worker => "worker",
        Role::Arbiter => "arbiter",
    }
}

/// Parses a role name (`voter`, `worker`, `arbiter`); `None` for anything else.
pub fn parse_role(name: &str) -> Option<Role> {
    [Role::Voter, Role::Worker, Role::Arbiter]
        .into_iter()
        .find(|r| role_name(*r) == name)
}

/// The identity URI of a node certificate.
pub fn node_uri(cluster: &ClusterId, node: NodeId, role: Role) -> String {
    format!("{URN_PREFIX}{cluster}:node:{node}:{}", role_name(role))
}

/// The identity URI of the cluster's CA certificate.
pub fn ca_uri(cluster: &ClusterId) -> String {
    format!("{URN_PREFIX}{cluster}:ca")
}

/// The DNS name a node's certificate is valid for (its TLS server name).
pub fn node_dns_name(cluster: &ClusterId, node: NodeId) -> String {
    format!("node-{node}.{cluster}.orrery")
}

/// The TLS server name to connect to `node` under.
pub fn server_name(cluster: &ClusterId, node: NodeId) -> ServerName<'static> {
    // A validated cluster id and a decimal node id always make a valid DNS name.
    match ServerName::try_from(node_dns_name(cluster, node)) {
        Ok(name) => name,
        Err(_) => unreachable_name(),
    }
}

/// Never reached (see [`server_name`]). Fails closed: no node certificate names an IP
/// address, so a handshake to this name is refused.
#[cold]
fn unreachable_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Parses the cluster id out of a CA URI (`urn:orrery:<cluster>:ca`).
pub(crate) fn parse_ca_uri(uri: &str) -> Option<ClusterId> {
    let rest = uri.strip_prefix(URN_PREFIX)?;
    let cluster = rest.strip_suffix(":ca")?;
    ClusterId::new(cluster).ok()
}

/// Parses a decimal node id in canonical form (no sign, no leading zeros).
pub(crate) fn parse_node_id(s: &str) -> Option<NodeId> {
    let id: NodeId = s.parse().ok()?;
    (id.to_string() == s).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_dns_labels() {
        for ok in ["a", "test", "test-cluster", "orrery-local-0123456789abcdef"] {
            assert!(ClusterId::new(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "a-", "A", "a.b", "a:b", "a b", long.as_str(), "é"] {
            assert!(ClusterId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        let c = ClusterId::new("alpha").unwrap();
        assert_eq!(
            node_uri(&c, 7, Role::Worker),
            "urn:orrery:alpha:node:7:worker"
        );
        assert_eq!(node_dns_name(&c, 7), "node-7.alpha.orrery");
        assert_eq!(parse_ca_uri(&ca_uri(&c)), Some(c.clone()));
        assert!(matches!(server_name(&c, 7), ServerName::DnsName(_)));
        for r in [Role::Voter, Role::Worker, Role::Arbiter] {
            assert_eq!(parse_role(role_name(r)), Some(r));
            assert_eq!(role_name(r), r.to_string());
        }
        assert_eq!(parse_role("Voter"), None);
        assert_eq!(parse_node_id("12"), Some(12));
        for bad in ["012", "+1", "-1", "", "1 ", "18446744073709551616"] {
            assert_eq!(parse_node_id(bad), None, "{bad:?}");
        }
    }
}
