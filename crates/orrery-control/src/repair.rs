//! Rebuilding a voter whose Raft store is damaged.
//!
//! A voter refuses to start on a store with a damaged record ([`crate::ControlError::Corrupt`]).
//! [`repair`] moves the damaged file aside (never deletes it: it is evidence) and lays down
//! a fresh store carrying a *repair marker* and, if it was intact, the old vote. A voter
//! started on a marked store
//! - does not initialize a membership of its own: the leader brings it back, by entries or
//!   by a snapshot, as it would a new member;
//! - grants no votes until it has applied everything its leader had committed. An empty
//!   voter that voted could help elect a leader that lacks committed entries, which is
//!   how wiping a Raft voter's disk loses data;
//! - keeps its old vote when that record was intact, so it cannot vote twice in a term.
//!
//! This module must never run while the node runs: redb's file lock refuses that.

use std::path::{Path, PathBuf};

use crate::store::{self, DB_FILE};
use crate::ControlError;

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Where the damaged store was moved (`None`: there was no store).
    pub moved_to: Option<PathBuf>,
    /// The first damaged record found, as `table key: reason` (`None`: none found, or the
    /// file could not be opened at all).
    pub damage: Option<String>,
    /// Whether the old vote was intact and carried over.
    pub kept_vote: bool,
}

/// Repairs the control-plane store in `raft_dir` (the voter's `data_dir/raft`). The node
/// must be stopped.
pub fn repair(raft_dir: &Path) -> Result<RepairReport, ControlError> {
    let path = raft_dir.join(DB_FILE);
    let storage = |e: std::io::Error| ControlError::Storage(format!("{}: {e}", path.display()));
    let (mut damage, mut vote, mut moved_to) = (None, None, None);
    if path.exists() {
        match redb::Database::open(&path) {
            Ok(db) => {
                damage = store::verify_all(&db)
                    .map_err(storage)?
                    .map(|d| format!("{} {}: {}", d.table, d.key, d.reason));
                vote = store::intact_vote(&db);
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(ControlError::Storage(format!(
                    "{} is in use: stop the node before repairing it",
                    path.display()
                )));
            }
            Err(e) => damage = Some(format!("file does not open: {e}")),
        }
        let aside = free_name(&path);
        std::fs::rename(&path, &aside).map_err(storage)?;
        moved_to = Some(aside);
    }
    let db = store::open_db(raft_dir).map_err(storage)?;
    let kept_vote = vote.is_some();
    store::set_repaired(&db, Some(vote)).map_err(storage)?;
    Ok(RepairReport {
        moved_to,
        damage,
        kept_vote,
    })
}

/// `raft.redb.damaged`, or `.damaged.2`, `.3`, ... whichever is free.
fn free_name(path: &Path) -> PathBuf {
    let base = path.with_extension("redb.damaged");
    std::iter::once(base.clone())
        .chain((2..10_000).map(|n| base.with_extension(format!("damaged.{n}"))))
        .find(|p| !p.exists())
        .unwrap_or(base)
}
