//! Which `Host` names the admin port answers to: [`AllowedHosts`].
//!
//! A browser that loads a page from `evil.example` can be made to send
//! requests to this node if the attacker's DNS answers `evil.example` with
//! the node's address (DNS rebinding); the browser still sends `Host:
//! evil.example`, so checking the header shuts that door. The node answers
//! to its own admin addresses (`admin_listen`, its `admin_addr` in the node
//! list), to loopback names on its port, and to `admin.allowed_hosts`.
//!
//! This module owns only the decision; it must never read the network.

use crate::config::NodeConfig;

/// The names a node's admin port answers to.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    /// Exact `host:port` (lower case) or bare `host` entries.
    names: Vec<String>,
    /// The port the admin endpoint listens on (0: any, for loopback names).
    port: u16,
}

const LOOPBACK: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

impl AllowedHosts {
    /// The names `cfg` implies.
    pub fn of(cfg: &NodeConfig) -> Self {
        let listen = cfg.admin_listen_addr();
        let port = listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        let mut names: Vec<String> = [listen, cfg.me().admin_addr.clone()]
            .into_iter()
            .chain(cfg.admin.allowed_hosts.iter().cloned())
            .map(|n| n.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        AllowedHosts { names, port }
    }

    /// Whether a request carrying `Host: host` is answered.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let (name, port) = match host.rsplit_once(':') {
            // `[::1]` alone has colons inside the brackets.
            Some((n, p)) if !p.ends_with(']') => (n, p.parse::<u16>().ok()),
            _ => (host.as_str(), None),
        };
        if self.names.iter().any(|n| *n == host || *n == name) {
            return true;
        }
        LOOPBACK.contains(&name) && (self.port == 0 || port == Some(self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, admin_addr: &str, extra: &[&str]) -> AllowedHosts {
        let mut cfg: NodeConfig = toml::from_str(&crate::config::tests::sample()).unwrap();
        cfg.admin_listen = Some(listen.into());
        let me = cfg.node_id;
        if let Some(n) = cfg.nodes.iter_mut().find(|n| n.id == me) {
            n.admin_addr = admin_addr.into();
        }
        cfg.admin.allowed_hosts = extra.iter().map(|s| s.to_string()).collect();
        AllowedHosts::of(&cfg)
    }

    #[test]
    fn its_own_addresses_and_loopback_on_its_port_are_answered() {
        let h = hosts("0.0.0.0:9100", "10.1.2.3:9100", &["ops.example.net"]);
        for ok in [
            "10.1.2.3:9100",
            "localhost:9100",
            "127.0.0.1:9100",
            "[::1]:9100",
            "LOCALHOST:9100",
            "ops.example.net",
            "ops.example.net:443",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
    }

    #[test]
    fn a_rebound_name_or_another_port_is_refused() {
        let h = hosts("0.0.0.0:9100", "10.1.2.3:9100", &[]);
        for bad in [
            "evil.example:9100",
            "evil.example",
            "localhost:9101",
            "127.0.0.1",
            "10.1.2.3:80",
            "",
            "localhost.evil.example:9100",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }
}
