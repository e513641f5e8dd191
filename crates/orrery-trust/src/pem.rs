//! PEM in, DER and keys out, with typed errors (never a panic on a bad file).

use crate::error::TrustError;
use crate::names::{self, ClusterId};
use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn pem_err(path: &Path, reason: impl Into<String>) -> TrustError {
    TrustError::Pem {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Exactly one `CERTIFICATE` block.
pub(crate) fn one_cert(pem: &[u8], path: &Path) -> Result<CertificateDer<'static>, TrustError> {
    let mut blocks = CertificateDer::pem_slice_iter(pem);
    let first = match blocks.next() {
        None => return Err(pem_err(path, "no CERTIFICATE block")),
        Some(block) => block.map_err(|e| pem_err(path, e.to_string()))?,
    };
    if blocks.next().is_some() {
        return Err(pem_err(path, "more than one CERTIFICATE block"));
    }
    Ok(first)
}

/// Exactly one private key block, parsed (so that a truncated key is refused here, not
/// at the first handshake).
pub(crate) fn one_key(
    pem: &[u8],
    path: &Path,
) -> Result<(PrivateKeyDer<'static>, KeyPair), TrustError> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_err(path, e.to_string()))?;
    let pair = KeyPair::try_from(&der).map_err(|e| TrustError::Key {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((der, pair))
}

/// Parses a DER certificate that this crate (or a peer's file) supplied.
pub(crate) fn x509<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, TrustError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(TrustError::BadCertificate {
            what: what.into(),
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(TrustError::BadCertificate {
            what: what.into(),
            reason: e.to_string(),
        }),
    }
}

/// Checks that `key` is the private half of `cert`'s public key.
pub(crate) fn check_key_matches(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    what: &str,
) -> Result<(), TrustError> {
    if cert.public_key().subject_public_key.data.as_ref() == key.der_bytes() {
        Ok(())
    } else {
        Err(TrustError::KeyMismatch { what: what.into() })
    }
}

/// The cluster id of an orrery CA certificate: a self-signed CA certificate whose SAN is
/// the URI `urn:orrery:<cluster>:ca`.
pub(crate) fn ca_cluster(cert: &X509Certificate<'_>) -> Result<ClusterId, TrustError> {
    if !cert.is_ca() {
        return Err(TrustError::NotACa("not a CA certificate".into()));
    }
    cert.verify_signature(None)
        .map_err(|e| TrustError::NotACa(format!("not self-signed: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TrustError::NotACa(e.to_string()))?
        .ok_or_else(|| TrustError::NotACa("no subject alternative name".into()))?;
    let mut found = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => names::parse_ca_uri(u),
        _ => None,
    });
    match (found.next(), found.next()) {
        (Some(cluster), None) => Ok(cluster),
        _ => Err(TrustError::NotACa(
            "SAN does not hold exactly one urn:orrery:<cluster>:ca URI".into(),
        )),
    }
}
