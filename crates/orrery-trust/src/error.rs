//! [`TrustError`]: what can go wrong making, saving, loading or configuring credentials.
//! (Handshake failures are [`crate::HandshakeError`]; a refused peer certificate is a
//! [`crate::Refusal`].)

use crate::identity::IdentityError;
use crate::names::InvalidClusterId;
use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// An error of the CA, of credential files or of building the TLS configuration.
#[derive(Debug, Error)]
pub enum TrustError {
    /// The cluster id cannot be used in certificates.
    #[error(transparent)]
    InvalidClusterId(#[from] InvalidClusterId),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file larger than any certificate or key orrery writes.
    #[error("{}: larger than {max} bytes, not a certificate or key file", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The bound.
        max: usize,
    },
    /// Text that is not the PEM expected (no block, a truncated block, several blocks).
    #[error("{}: malformed PEM: {reason}", path.display())]
    Pem {
        /// The file, or a description of in-memory input (e.g. `<node certificate>`).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A private key that cannot be used (truncated, unsupported algorithm).
    #[error("{what}: unusable private key: {reason}")]
    Key {
        /// Which key.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A private key that does not belong to its certificate.
    #[error("{what}: the private key does not match the certificate")]
    KeyMismatch {
        /// Which pair.
        what: String,
    },
    /// A certificate that is not DER X.509.
    #[error("{what}: not an X.509 certificate: {reason}")]
    BadCertificate {
        /// Which certificate.
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A CA certificate that is not an orrery cluster CA.
    #[error("not an orrery cluster CA certificate: {0}")]
    NotACa(String),
    /// A node certificate that the cluster CA did not sign.
    #[error("the node certificate was not issued by this cluster's CA")]
    NotIssuedByCa,
    /// A node certificate that does not name a node of the CA's cluster.
    #[error("the node certificate does not name a node of this cluster: {0}")]
    Identity(#[from] IdentityError),
    /// A serial number not above the last one this CA issued.
    #[error("serial {serial} is not above {last}, the last serial this CA issued")]
    SerialNotIncreasing {
        /// Requested.
        serial: u64,
        /// Last issued.
        last: u64,
    },
    /// The serial counter file does not hold a serial number.
    #[error("{}: corrupt serial counter: {reason}", path.display())]
    BadSerialFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process has this CA directory open (serials must come from one issuer).
    #[error("{}: the CA is in use by another process", path.display())]
    Busy {
        /// The lock file.
        path: PathBuf,
    },
    /// The CA would overwrite an existing CA (every certificate it issued would be lost).
    #[error("{}: a CA already exists there; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Certificate generation failed (rcgen).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Building the rustls configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Building a rustls certificate verifier failed.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
