//! [`PeerIdentity`]: who a certificate says its holder is.
//!
//! Read only from a certificate whose chain rustls/webpki already verified against the
//! cluster CA (the verifiers in [`crate::verify`] call it after that check, and
//! [`PeerIdentity::from_connection`] reads the certificate a finished handshake kept).
//! The parse itself is strict: exactly one orrery URI, exactly the matching DNS name,
//! nothing else in the SAN, an end-entity certificate, a serial that fits a `u64`.

use crate::names::{self, ClusterId, URN_PREFIX};
use crate::MAX_CERT_BYTES;
use orrery_core::{NodeId, Role};
use rustls::CommonState;
use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The node a verified certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The cluster the certificate belongs to (always the expected one: another cluster's
    /// certificate is an error, [`IdentityError::OtherCluster`]).
    pub cluster_id: ClusterId,
    /// The node the holder may speak as, and only this one.
    pub node_id: NodeId,
    /// The role the certificate grants.
    pub role: Role,
    /// The certificate's serial number (revocation is by serial).
    pub serial: u64,
}

/// Every way a certificate can fail to name an orrery node of the expected cluster.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// The connection has no peer certificate (not a mutually authenticated handshake).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is larger than [`MAX_CERT_BYTES`].
    #[error("certificate is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Not a DER X.509 certificate.
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    /// A CA certificate used as a node certificate.
    #[error("certificate is a CA certificate, not a node certificate")]
    IsCa,
    /// No subject alternative name extension.
    #[error("certificate has no subject alternative name")]
    NoSan,
    /// A SAN without any `urn:orrery:` URI.
    #[error("certificate names no orrery node (no urn:orrery: URI in its SAN)")]
    NoIdentity,
    /// More than one `urn:orrery:` URI.
    #[error("certificate names more than one orrery identity")]
    AmbiguousIdentity,
    /// A `urn:orrery:` URI that is not `urn:orrery:<cluster>:node:<id>:<role>`.
    #[error("malformed orrery identity {uri:?}: {reason}")]
    MalformedUri {
        /// The URI (cut to 200 characters).
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The identity names another cluster.
    #[error("certificate belongs to cluster {found:?}, not to {expected}")]
    OtherCluster {
        /// Our cluster.
        expected: ClusterId,
        /// The cluster the certificate names (cut to 200 characters).
        found: String,
    },
    /// The node id is not a canonical decimal `u64`.
    #[error("malformed node id {0:?} (expected a decimal number)")]
    MalformedNodeId(String),
    /// The role is not one of orrery's.
    #[error("unknown role {0:?} (expected voter, worker or arbiter)")]
    UnknownRole(String),
    /// The DNS SAN is missing or does not match the URI's node.
    #[error("certificate's DNS names {found:?} do not match its identity (expected {expected:?})")]
    DnsNameMismatch {
        /// `node-<id>.<cluster>.orrery`.
        expected: String,
        /// What the certificate holds.
        found: Vec<String>,
    },
    /// A SAN entry of a kind orrery never issues (IP address, e-mail, other URI, ...).
    #[error("certificate has an unexpected subject alternative name: {0}")]
    UnexpectedSan(String),
    /// Zero or more than 64 bits.
    #[error("certificate serial number is zero or does not fit 64 bits")]
    BadSerial,
}

/// Cuts an attacker-provided string for an error message.
fn cut(s: &str) -> String {
    s.chars().take(200).collect()
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate, which must name `expected` as its
    /// cluster. Does not verify the certificate's signature: call it on a certificate
    /// rustls verified (or use it to explain why a certificate is not acceptable).
    pub fn from_der(der: &[u8], expected: &ClusterId) -> Result<Self, IdentityError> {
        if der.len() > MAX_CERT_BYTES {
            return Err(IdentityError::TooLarge {
                len: der.len(),
                max: MAX_CERT_BYTES,
            });
        }
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::Malformed(cut(&e.to_string())))?;
        if !rest.is_empty() {
            return Err(IdentityError::Malformed("trailing bytes".into()));
        }
        if cert.is_ca() {
            return Err(IdentityError::IsCa);
        }
        let serial = serial_u64(cert.raw_serial()).ok_or(IdentityError::BadSerial)?;
        let (uri, dns) = identity_sans(&cert)?;
        let (node_id, role) = parse_node_uri(uri, expected)?;
        let want = names::node_dns_name(expected, node_id);
        if dns.len() != 1 || dns[0] != want {
            return Err(IdentityError::DnsNameMismatch {
                expected: want,
                found: dns.iter().map(|d| cut(d)).collect(),
            });
        }
        Ok(PeerIdentity {
            cluster_id: expected.clone(),
            node_id,
            role,
            serial,
        })
    }

    /// The identity of the peer of a finished handshake: the leaf of the chain rustls kept
    /// (`stream.get_ref().1` of a `tokio_rustls` stream derefs to [`CommonState`]).
    pub fn from_connection(
        conn: &CommonState,
        expected: &ClusterId,
    ) -> Result<Self, IdentityError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(IdentityError::NoCertificate)?;
        PeerIdentity::from_der(leaf, expected)
    }

    /// The DNS name the certificate is valid for, `node-<id>.<cluster>.orrery`.
    pub fn dns_name(&self) -> String {
        names::node_dns_name(&self.cluster_id, self.node_id)
    }
}

/// A DER INTEGER's content bytes as a positive, non-zero `u64`.
fn serial_u64(raw: &[u8]) -> Option<u64> {
    let first = raw.iter().position(|b| *b != 0)?;
    let digits = &raw[first..];
    if digits.len() > 8 || raw.first().is_some_and(|b| *b >= 0x80) {
        return None; // too large, or negative
    }
    let mut buf = [0u8; 8];
    buf[8 - digits.len()..].copy_from_slice(digits);
    Some(u64::from_be_bytes(buf))
}

/// The single orrery URI and all DNS names of the SAN; refuses any other SAN entry.
fn identity_sans<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<(&'a str, Vec<&'a str>), IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(cut(&e.to_string())))?
        .ok_or(IdentityError::NoSan)?;
    let mut uri = None;
    let mut dns = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) if u.starts_with(URN_PREFIX) => {
                if uri.replace(*u).is_some() {
                    return Err(IdentityError::AmbiguousIdentity);
                }
            }
            GeneralName::DNSName(d) => dns.push(*d),
            GeneralName::URI(u) => {
                return Err(IdentityError::UnexpectedSan(format!("URI {}", cut(u))))
            }
            other => return Err(IdentityError::UnexpectedSan(cut(&format!("{other:?}")))),
        }
    }
    Ok((uri.ok_or(IdentityError::NoIdentity)?, dns))
}

/// Parses `urn:orrery:<cluster>:node:<id>:<role>`, requiring `expected` as the cluster.
fn parse_node_uri(uri: &str, expected: &ClusterId) -> Result<(NodeId, Role), IdentityError> {
    let malformed = |reason| IdentityError::MalformedUri {
        uri: cut(uri),
        reason,
    };
    let rest = uri
        .strip_prefix(URN_PREFIX)
        .ok_or_else(|| malformed("no urn:orrery: prefix"))?;
    let parts: Vec<&str> = rest.splitn(5, ':').collect();
    let [cluster, kind, id, role] = parts[..] else {
        return Err(malformed("expected urn:orrery:<cluster>:node:<id>:<role>"));
    };
    if cluster != expected.as_str() {
        return Err(IdentityError::OtherCluster {
            expected: expected.clone(),
            found: cut(cluster),
        });
    }
    if kind != "node" {
        return Err(malformed("not a node identity"));
    }
    let node = names::parse_node_id(id).ok_or_else(|| IdentityError::MalformedNodeId(cut(id)))?;
    let role = names::parse_role(role).ok_or_else(|| IdentityError::UnknownRole(cut(role)))?;
    Ok((node, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alpha() -> ClusterId {
        ClusterId::new("alpha").unwrap()
    }

    #[test]
    fn serials_are_positive_u64() {
        assert_eq!(serial_u64(&[1]), Some(1));
        assert_eq!(serial_u64(&[0, 0x80]), Some(0x80));
        assert_eq!(
            serial_u64(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Some(u64::MAX)
        );
        assert_eq!(serial_u64(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(serial_u64(&[0]), None);
        assert_eq!(serial_u64(&[]), None);
        assert_eq!(serial_u64(&[0x80]), None);
    }

    #[test]
    fn node_uris_are_parsed_strictly() {
        let c = alpha();
        assert_eq!(
            parse_node_uri("urn:orrery:alpha:node:3:voter", &c),
            Ok((3, Role::Voter))
        );
        assert_eq!(
            parse_node_uri("urn:orrery:alpha:node:0:arbiter", &c),
            Ok((0, Role::Arbiter))
        );
        let err = |u| parse_node_uri(u, &c).unwrap_err();
        assert!(matches!(
            err("urn:orrery:beta:node:3:voter"),
            IdentityError::OtherCluster { .. }
        ));
        assert!(matches!(
            err("urn:orrery:alpha:node:03:voter"),
            IdentityError::MalformedNodeId(_)
        ));
        assert!(matches!(
            err("urn:orrery:alpha:node:x:voter"),
            IdentityError::MalformedNodeId(_)
        ));
        assert!(matches!(
            err("urn:orrery:alpha:node:3:king"),
            IdentityError::UnknownRole(_)
        ));
        assert!(matches!(
            err("urn:orrery:alpha:node:3:voter:x"),
            IdentityError::MalformedUri { .. }
        ));
        assert!(matches!(
            err("urn:orrery:alpha:ca"),
            IdentityError::MalformedUri { .. }
        ));
        assert!(matches!(
            err("urn:orrery:alpha:user:3:voter"),
            IdentityError::MalformedUri { .. }
        ));
    }

    #[test]
    fn garbage_der_is_a_typed_error() {
        let c = alpha();
        assert!(matches!(
            PeerIdentity::from_der(&[], &c),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            PeerIdentity::from_der(&[0x30, 0x82, 0xff, 0xff, 1, 2, 3], &c),
            Err(IdentityError::Malformed(_))
        ));
        let huge = vec![0u8; MAX_CERT_BYTES + 1];
        assert!(matches!(
            PeerIdentity::from_der(&huge, &c),
            Err(IdentityError::TooLarge { .. })
        ));
    }
}
