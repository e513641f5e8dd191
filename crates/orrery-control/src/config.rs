//! Configuration of the control plane.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ControlError, NodeId};

/// Configuration of one control-plane voter. Build with [`ControlConfig::new`], which fills
/// every tunable with its documented default, then override fields as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// This node's id; must be a key of `voters`.
    pub node_id: NodeId,
    /// Directory holding the Raft store (`raft.redb`). Created if missing.
    pub data_dir: PathBuf,
    /// The initial voter set (id -> address handed to [`crate::RaftTransport::call`]).
    /// Every voter must be started with the identical map. Used only to initialize a pristine
    /// store; afterwards membership comes from the replicated log.
    pub voters: BTreeMap<NodeId, String>,
    /// Cluster name, used in logs. Default `"orrery"`.
    pub cluster_name: String,
    /// Leader heartbeat period. Default 100 ms.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout. Default 400 ms.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout. Default 800 ms.
    pub election_timeout_max: Duration,
    /// Upper bound on any single append/vote RPC (openraft may pick a shorter one). Default 1 s.
    pub rpc_timeout: Duration,
    /// Timeout for sending and installing a full snapshot on a follower. Default 10 s.
    pub install_snapshot_timeout: Duration,
    /// Build a snapshot after this many log entries since the last one. Default 1000.
    pub snapshot_every_n_logs: u64,
    /// Log entries already covered by a snapshot that are kept (so a slightly lagging follower
    /// gets entries instead of a snapshot). Default 1000.
    pub logs_to_keep_after_snapshot: u64,
    /// Maximum entries per AppendEntries RPC. Default 300.
    pub max_payload_entries: u64,
    /// How long [`crate::ControlPlane::shutdown`] waits for the Raft core. Default 5 s.
    pub shutdown_timeout: Duration,
    /// Largest encoded command [`crate::ControlPlane::write`] accepts; a larger one is refused
    /// before it reaches the log ([`ControlError::ProposalTooLarge`]). Default 64 KiB.
    pub max_proposal_bytes: usize,
    /// Largest payload handed to [`crate::RaftTransport::call`] (the transport's frame limit
    /// less its own envelope). AppendEntries are cut to fit and snapshots travel in chunks
    /// below it. Default 4 MiB - 16 KiB.
    pub max_message_bytes: usize,
    /// Bytes of snapshot per chunk. Default 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Largest snapshot this node accepts from a leader (buffered while it arrives).
    /// Default 1 GiB.
    pub max_snapshot_bytes: u64,
    /// How long [`crate::ControlPlane::write`] waits for its entry to commit and apply; past
    /// it the write fails [`ControlError::Timeout`] (commit status unknown). openraft keeps a
    /// deposed leader's pending writes open until their entries are applied or reverted, which
    /// can be never (e.g. the entry arrives inside a snapshot). Default 10 s.
    pub write_timeout: Duration,
}

/// Bytes an AppendEntries request adds around its entries, and one entry around its
/// command (log id, variant tags, lengths), with a wide margin.
pub(crate) const MESSAGE_OVERHEAD: usize = 4096;

impl ControlConfig {
    /// A config with every tunable at its default.
    pub fn new(
        node_id: NodeId,
        data_dir: impl Into<PathBuf>,
        voters: BTreeMap<NodeId, String>,
    ) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            voters,
            cluster_name: "orrery".to_string(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            rpc_timeout: Duration::from_secs(1),
            install_snapshot_timeout: Duration::from_secs(10),
            snapshot_every_n_logs: 1000,
            logs_to_keep_after_snapshot: 1000,
            max_payload_entries: 300,
            shutdown_timeout: Duration::from_secs(5),
            max_proposal_bytes: 64 * 1024,
            max_message_bytes: 4 * 1024 * 1024 - 16 * 1024,
            snapshot_chunk_bytes: 1024 * 1024,
            max_snapshot_bytes: 1 << 30,
            write_timeout: Duration::from_secs(10),
        }
    }

    /// Checks the config for consistency.
    pub fn validate(&self) -> Result<(), ControlError> {
        let err = |m: String| Err(ControlError::Config(m));
        if self.voters.is_empty() {
            return err("voters is empty".into());
        }
        if !self.voters.contains_key(&self.node_id) {
            return err(format!(
                "node_id {} is not among voters {:?}",
                self.node_id,
                self.voters.keys()
            ));
        }
        let ms = |d: Duration| d.as_millis();
        if ms(self.heartbeat_interval) == 0 {
            return err("heartbeat_interval must be at least 1ms".into());
        }
        if ms(self.election_timeout_min) <= ms(self.heartbeat_interval) {
            return err("election_timeout_min must exceed heartbeat_interval".into());
        }
        if ms(self.election_timeout_max) <= ms(self.election_timeout_min) {
            return err("election_timeout_max must exceed election_timeout_min".into());
        }
        if self.rpc_timeout.is_zero()
            || self.install_snapshot_timeout.is_zero()
            || self.write_timeout.is_zero()
        {
            return err("rpc, snapshot and write timeouts must be non-zero".into());
        }
        if self.snapshot_every_n_logs == 0 {
            return err("snapshot_every_n_logs must be at least 1".into());
        }
        if self.max_payload_entries == 0 {
            return err("max_payload_entries must be at least 1".into());
        }
        self.validate_sizes()
    }

    /// One proposal and one snapshot chunk must each fit in a message with room to spare,
    /// so a committed entry can always be replicated. (Part of [`Self::validate`]; public so
    /// a node that is not a voter can check its configuration the same way.)
    pub fn validate_sizes(&self) -> Result<(), ControlError> {
        let err = |m: String| Err(ControlError::Config(m));
        if self.max_proposal_bytes == 0 || self.snapshot_chunk_bytes == 0 {
            return err("max_proposal_bytes and snapshot_chunk_bytes must be at least 1".into());
        }
        let room = self.max_message_bytes.saturating_sub(2 * MESSAGE_OVERHEAD);
        for (key, bytes) in [
            ("max_proposal_bytes", self.max_proposal_bytes),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
        ] {
            if bytes > room {
                return err(format!(
                    "{key} ({bytes}) must leave {} bytes of overhead under max_message_bytes ({})",
                    2 * MESSAGE_OVERHEAD,
                    self.max_message_bytes
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn to_openraft(&self) -> Result<openraft::Config, ControlError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let cfg = openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.install_snapshot_timeout),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_n_logs),
            max_in_snapshot_log_to_keep: self.logs_to_keep_after_snapshot,
            max_payload_entries: self.max_payload_entries,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| ControlError::Config(e.to_string()))
    }
}
