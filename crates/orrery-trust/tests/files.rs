//! The CA and node directories: modes, round trips, the serial counter, the lock, and
//! typed errors (never a panic) for every malformed or truncated file.

use orrery_core::Role;
use orrery_trust::ca::{CA_CERT_FILE, CA_KEY_FILE, CA_SERIAL_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use orrery_trust::{ClusterCa, NodeCredentials, Revocations, TrustConfig, TrustError};
use std::fs;
use std::path::Path;

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_ca_round_trips_through_private_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let mut ca = ClusterCa::init("alpha").unwrap();
    ca.save(&dir).unwrap();
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_SERIAL_FILE)), 0o600);
    }
    let first = ca.issue_next(1, Role::Voter).unwrap();
    assert_eq!(first.serial(), 1);
    // Another process (here: another open) cannot use the CA while it is open.
    assert!(matches!(
        ClusterCa::load(&dir),
        Err(TrustError::Busy { .. })
    ));
    drop(ca);

    let mut ca = ClusterCa::load(&dir).unwrap();
    assert_eq!(ca.cluster_id().as_str(), "alpha");
    assert_eq!(ca.last_serial(), 1, "the counter survived");
    let second = ca.issue_next(2, Role::Worker).unwrap();
    assert_eq!(second.serial(), 2);
    // Certificates of the reloaded CA chain to the original certificate.
    let a = TrustConfig::new(&first, Revocations::default()).unwrap();
    let b = TrustConfig::new(&second, Revocations::default()).unwrap();
    assert_eq!(a.cluster_id(), b.cluster_id());

    // `orrery ca init` twice must not orphan every certificate.
    drop(ca);
    let mut again = ClusterCa::init("alpha").unwrap();
    assert!(matches!(
        again.save(&dir),
        Err(TrustError::AlreadyExists { .. })
    ));
}

#[test]
fn serials_strictly_increase() {
    let mut ca = ClusterCa::init("alpha").unwrap();
    assert_eq!(ca.issue(1, Role::Voter, 5).unwrap().serial(), 5);
    for stale in [5, 3] {
        assert!(matches!(
            ca.issue(2, Role::Voter, stale),
            Err(TrustError::SerialNotIncreasing { last: 5, .. })
        ));
    }
    assert_eq!(ca.issue_next(2, Role::Voter).unwrap().serial(), 6);
    assert!(matches!(
        ca.issue(2, Role::Voter, 0),
        Err(TrustError::SerialNotIncreasing { .. })
    ));
    assert_eq!(
        ca.issue(3, Role::Arbiter, u64::MAX).unwrap().serial(),
        u64::MAX
    );
    assert!(matches!(
        ca.issue_next(4, Role::Voter),
        Err(TrustError::SerialNotIncreasing { .. })
    ));
}

#[test]
fn node_credentials_round_trip_and_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = ClusterCa::init("alpha").unwrap();
    let creds = ca.issue_next(7, Role::Arbiter).unwrap();
    let dir = tmp.path().join("node-7");
    creds.save(&dir).unwrap();
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(NODE_KEY_FILE)), 0o600);
    }
    assert!(
        !dir.join(CA_KEY_FILE).exists(),
        "a node never gets the CA key"
    );
    let loaded = NodeCredentials::load(&dir).unwrap();
    assert_eq!(loaded.identity(), creds.identity());
    let cfg = TrustConfig::load(&dir, Revocations::default()).unwrap();
    assert_eq!(cfg.identity().node_id, 7);
}

/// Writes `text` over `dir/name` and returns what loading the node directory says.
fn node_load_with(dir: &Path, name: &str, text: &[u8]) -> TrustError {
    let saved = fs::read(dir.join(name)).unwrap();
    fs::write(dir.join(name), text).unwrap();
    let err = NodeCredentials::load(dir).unwrap_err();
    fs::write(dir.join(name), saved).unwrap();
    err
}

#[test]
fn malformed_node_files_give_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = ClusterCa::init("alpha").unwrap();
    let creds = ca.issue_next(1, Role::Voter).unwrap();
    let other_node = ca.issue_next(2, Role::Voter).unwrap();
    let foreign = ClusterCa::init("alpha")
        .unwrap()
        .issue_next(1, Role::Voter)
        .unwrap();
    let dir = tmp.path().join("n");
    creds.save(&dir).unwrap();

    let key = creds.key_pem().as_bytes();
    let cert = creds.cert_pem().as_bytes();
    let e = node_load_with(&dir, NODE_KEY_FILE, &key[..key.len() / 2]);
    assert!(matches!(e, TrustError::Pem { .. }), "truncated key: {e}");
    // Lines cut out of the middle, armour intact: base64 or DER broken.
    let lines: Vec<&str> = creds.key_pem().lines().collect();
    let cut = [lines[0], lines[2], lines[lines.len() - 1]].join("\n");
    let e = node_load_with(&dir, NODE_KEY_FILE, cut.as_bytes());
    assert!(
        matches!(e, TrustError::Pem { .. } | TrustError::Key { .. }),
        "cut key: {e}"
    );
    let e = node_load_with(&dir, NODE_KEY_FILE, other_node.key_pem().as_bytes());
    assert!(
        matches!(e, TrustError::KeyMismatch { .. }),
        "another node's key: {e}"
    );
    let e = node_load_with(&dir, NODE_CERT_FILE, b"");
    assert!(matches!(e, TrustError::Pem { .. }), "empty cert: {e}");
    let e = node_load_with(&dir, NODE_CERT_FILE, &cert[..cert.len() - 40]);
    assert!(matches!(e, TrustError::Pem { .. }), "truncated cert: {e}");
    let two = [creds.cert_pem(), other_node.cert_pem()].concat();
    let e = node_load_with(&dir, NODE_CERT_FILE, two.as_bytes());
    assert!(matches!(e, TrustError::Pem { .. }), "two certs: {e}");
    let e = node_load_with(&dir, NODE_CERT_FILE, foreign.cert_pem().as_bytes());
    assert!(matches!(e, TrustError::NotIssuedByCa), "foreign cert: {e}");
    let e = node_load_with(&dir, CA_CERT_FILE, creds.cert_pem().as_bytes());
    assert!(matches!(e, TrustError::NotACa(_)), "node cert as CA: {e}");
    let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let e = node_load_with(&dir, CA_CERT_FILE, garbage);
    assert!(
        matches!(e, TrustError::BadCertificate { .. }),
        "garbage DER: {e}"
    );
    let e = node_load_with(&dir, CA_CERT_FILE, &[0xff; 70 * 1024]);
    assert!(matches!(e, TrustError::FileTooLarge { .. }), "huge: {e}");
    let e = node_load_with(&dir, CA_CERT_FILE, &[0xff, 0xfe]);
    assert!(matches!(e, TrustError::Pem { .. }), "binary: {e}");
    fs::remove_file(dir.join(NODE_KEY_FILE)).unwrap();
    assert!(matches!(
        NodeCredentials::load(&dir),
        Err(TrustError::Io { .. })
    ));
}

#[test]
fn malformed_ca_files_give_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let mut ca = ClusterCa::init("alpha").unwrap();
    ca.save(&dir).unwrap();
    let key_pem = ca.key_pem();
    let cert_pem = ca.cert_pem().to_owned();
    drop(ca);
    let load_with = |name: &str, text: &[u8]| {
        let saved = fs::read(dir.join(name)).unwrap();
        fs::write(dir.join(name), text).unwrap();
        let err = ClusterCa::load(&dir).unwrap_err();
        fs::write(dir.join(name), saved).unwrap();
        err
    };
    let e = load_with(CA_KEY_FILE, &key_pem.as_bytes()[..key_pem.len() - 30]);
    assert!(matches!(e, TrustError::Pem { .. }), "truncated CA key: {e}");
    let other = ClusterCa::init("alpha").unwrap().key_pem();
    let e = load_with(CA_KEY_FILE, other.as_bytes());
    assert!(
        matches!(e, TrustError::KeyMismatch { .. }),
        "other CA key: {e}"
    );
    let e = load_with(CA_CERT_FILE, &cert_pem.as_bytes()[..100]);
    assert!(
        matches!(e, TrustError::Pem { .. }),
        "truncated CA cert: {e}"
    );
    let e = load_with(CA_SERIAL_FILE, b"twelve");
    assert!(matches!(e, TrustError::BadSerialFile { .. }), "serial: {e}");
    assert!(ClusterCa::load(&dir).is_ok(), "restored files load");
    assert!(matches!(
        ClusterCa::from_pem(&cert_pem, "not a key", 0),
        Err(TrustError::Pem { .. })
    ));
    assert!(matches!(
        ClusterCa::init("Not Valid"),
        Err(TrustError::InvalidClusterId(_))
    ));
}
