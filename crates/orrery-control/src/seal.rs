//! Checksummed records at rest.
//!
//! Every value orrery-control keeps in `raft.redb` (log entries, the vote, the committed and
//! purged ids, the snapshot, the repair marker) is *sealed*: a version byte, a CRC-32 of the
//! payload, then the payload. Every read unseals, so a flipped bit anywhere in a value is
//! found the moment the value is used, and [`crate::store::verify_all`] finds it at start,
//! before the node serves or votes with it.
//!
//! redb keeps its own page checksums only for crash recovery; it does not verify the bytes
//! it hands out on a normal read, which is how a flipped byte used to be re-saved and
//! replicated as if it were true.
//!
//! This module owns the byte layout and nothing else: it never opens files.

/// The layout version of a sealed record. A store whose `format` key is missing holds
/// unsealed (version 1) records and is sealed in place when it is opened.
pub(crate) const SEAL_VERSION: u8 = 2;

/// Bytes a seal adds in front of a payload.
pub(crate) const SEAL_OVERHEAD: usize = 5;

/// Why a stored record could not be unsealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SealError {
    #[error("record of {0} bytes is shorter than its seal")]
    Short(usize),
    #[error("record seal version {0} (expected {SEAL_VERSION})")]
    Version(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
}

/// Seals `payload`: `[SEAL_VERSION][crc32 LE][payload]`.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + SEAL_OVERHEAD);
    out.push(SEAL_VERSION);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Returns the payload of a sealed record, or why it is not intact.
pub(crate) fn unseal(bytes: &[u8]) -> Result<&[u8], SealError> {
    if bytes.len() < SEAL_OVERHEAD {
        return Err(SealError::Short(bytes.len()));
    }
    if bytes[0] != SEAL_VERSION {
        return Err(SealError::Version(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[SEAL_OVERHEAD..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(SealError::Checksum { stored, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_found() {
        let payload = b"node 2 at 127.0.0.1:42695".to_vec();
        let sealed = seal(&payload);
        assert_eq!(unseal(&sealed).unwrap(), payload.as_slice());
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    unseal(&bad).is_err(),
                    "flip of bit {bit} in byte {byte} passed"
                );
            }
        }
    }

    #[test]
    fn short_and_foreign_records_are_refused() {
        assert_eq!(unseal(&[]), Err(SealError::Short(0)));
        assert_eq!(unseal(&[2, 0, 0]), Err(SealError::Short(3)));
        assert_eq!(unseal(&[1, 0, 0, 0, 0, 9]), Err(SealError::Version(1)));
        assert_eq!(unseal(&seal(&[])).unwrap(), &[] as &[u8]);
    }
}
