//! The one error type of the store.

/// Everything a store operation can refuse or fail with.
///
/// The first three are *answers* (the caller lost a race it must respect);
/// `InvalidInput`, `Limit` and `Config` are the caller's mistakes; `Corrupt`
/// and `Migration` mean the database is not what this build expects and is
/// refused whole; `Busy` is transient (retry later); `Backend` is anything
/// else the database said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The shard's fence was raised past `epoch` by a newer owner.
    #[error("stale owner: shard {shard} epoch {epoch} < current {current}")]
    StaleOwner {
        shard: String,
        epoch: u64,
        current: u64,
    },
    /// A newer holder fenced this job's period with a higher lease epoch.
    #[error(
        "stale token: job {job} period {period} lease epoch {lease_epoch} < current {current}"
    )]
    StaleToken {
        job: String,
        period: u64,
        lease_epoch: u64,
        current: u64,
    },
    /// The job's period already has its output (committed under `committed_by`).
    #[error(
        "already committed: job {job} period {period} (committed under lease epoch {committed_by})"
    )]
    AlreadyCommitted {
        job: String,
        period: u64,
        committed_by: u64,
    },
    /// A stored row fails validation, or the schema is half-applied.
    #[error("corrupt {what}: {row}")]
    Corrupt { what: String, row: String },
    /// The database's recorded migrations do not match this build's.
    #[error("schema migration: {0}")]
    Migration(String),
    /// An argument is malformed (empty or over-long name, NUL byte, epoch out of range...).
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: &'static str, reason: String },
    /// An argument or a result exceeds a configured bound.
    #[error("limit exceeded: {what} is {actual}, limit {limit} (config key store.{key})")]
    Limit {
        what: &'static str,
        key: &'static str,
        limit: u64,
        actual: u64,
    },
    /// The store configuration is invalid.
    #[error("store config: {0}")]
    Config(String),
    /// Transient: the database stayed locked, or no pooled connection came free, within its timeout.
    #[error("store busy: {0}")]
    Busy(String),
    /// Any other error from the database or its driver.
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    /// True for errors worth retrying as they are (`Busy`).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy(_))
    }

    /// True for the fencing refusals (`StaleOwner`, `StaleToken`, `AlreadyCommitted`):
    /// the caller must give up its write, never retry it.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            StoreError::StaleOwner { .. }
                | StoreError::StaleToken { .. }
                | StoreError::AlreadyCommitted { .. }
        )
    }
}
