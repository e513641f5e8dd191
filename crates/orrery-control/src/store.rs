//! Durable Raft storage on redb: the log, vote, committed id, last-purged id and the latest
//! snapshot live in `data_dir/raft.redb`. The state machine itself is in memory and is rebuilt
//! on start from the latest snapshot plus openraft's replay of committed entries.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::types::{ApplyReply, Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, Tc, Vote};
use crate::{ReplicatedState, StateView};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Opens (or creates) the redb file and makes sure both tables exist.
pub(crate) fn open_db(dir: &Path) -> io::Result<Arc<Database>> {
    std::fs::create_dir_all(dir)?;
    let db = Database::create(dir.join("raft.redb")).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            io::Error::new(io::ErrorKind::WouldBlock, e.to_string())
        }
        e => io_err(e),
    })?;
    let tx = db.begin_write().map_err(io_err)?;
    {
        tx.open_table(LOGS).map_err(io_err)?;
        tx.open_table(META).map_err(io_err)?;
    }
    tx.commit().map_err(io_err)?;
    Ok(Arc::new(db))
}

/// Like [`open_db`], but if another instance in this process still holds the file (e.g. its
/// tasks are still winding down after a shutdown), retries for up to `patience`.
pub(crate) async fn open_db_retrying(
    dir: &Path,
    patience: std::time::Duration,
) -> io::Result<Arc<Database>> {
    let step = std::time::Duration::from_millis(20);
    let mut waited = std::time::Duration::ZERO;
    loop {
        let d = dir.to_path_buf();
        let res = tokio::task::spawn_blocking(move || open_db(&d))
            .await
            .map_err(io_err)?;
        match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && waited < patience => {
                tokio::time::sleep(step).await;
                waited += step;
            }
            other => return other,
        }
    }
}

/// Runs blocking redb work off the async executor.
async fn blocking<T, F>(db: &Arc<Database>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> io::Result<T> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(io_err)?
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> io::Result<Option<T>> {
    let tx = db.begin_read().map_err(io_err)?;
    let table = tx.open_table(META).map_err(io_err)?;
    match table.get(key).map_err(io_err)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

fn put_meta(db: &Database, key: &'static str, bytes: Vec<u8>) -> io::Result<()> {
    let tx = db.begin_write().map_err(io_err)?;
    {
        let mut table = tx.open_table(META).map_err(io_err)?;
        table.insert(key, bytes.as_slice()).map_err(io_err)?;
    }
    tx.commit().map_err(io_err)
}

/// The persisted snapshot: `postcard(S)` plus the log position and membership it covers.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn load_snapshot(db: &Database) -> io::Result<Option<StoredSnapshot>> {
    get_meta(db, KEY_SNAPSHOT)
}

async fn save_snapshot(db: &Arc<Database>, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let bytes = encode(&StoredSnapshot {
        meta: meta.clone(),
        data: data.to_vec(),
    })?;
    blocking(db, move |db| put_meta(db, KEY_SNAPSHOT, bytes)).await
}

// ---------------------------------------------------------------------------------------------
// Log store

/// The Raft log store; also its own log reader (it is a cheap `Arc` clone).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

impl RaftLogReader<Tc> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(&self.db, move |db| {
            let tx = db.begin_read().map_err(io_err)?;
            let table = tx.open_table(LOGS).map_err(io_err)?;
            let mut out = Vec::new();
            for item in table.range::<u64>(bounds).map_err(io_err)? {
                let (_k, v) = item.map_err(io_err)?;
                out.push(decode::<Entry>(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        blocking(&self.db, |db| get_meta(db, KEY_VOTE)).await
    }
}

impl RaftLogStorage<Tc> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<Tc>, io::Error> {
        blocking(&self.db, |db| {
            let last_purged_log_id: Option<LogId> = get_meta(db, KEY_PURGED)?;
            let tx = db.begin_read().map_err(io_err)?;
            let table = tx.open_table(LOGS).map_err(io_err)?;
            let last = match table.last().map_err(io_err)? {
                Some((_k, v)) => Some(decode::<Entry>(v.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_log_id: last.or(last_purged_log_id),
                last_purged_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        blocking(&self.db, move |db| put_meta(db, KEY_VOTE, bytes)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let Some(committed) = committed else {
            return Ok(());
        };
        let bytes = encode(&committed)?;
        blocking(&self.db, move |db| put_meta(db, KEY_COMMITTED, bytes)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        blocking(&self.db, |db| get_meta(db, KEY_COMMITTED)).await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Tc>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index(), encode(&e)?));
        }
        // The write is durable (redb's default Immediate durability) once commit returns, so
        // the entries are both readable and flushed when we report completion.
        let res = blocking(&self.db, move |db| {
            let tx = db.begin_write().map_err(io_err)?;
            {
                let mut table = tx.open_table(LOGS).map_err(io_err)?;
                for (idx, bytes) in &rows {
                    table.insert(*idx, bytes.as_slice()).map_err(io_err)?;
                }
            }
            tx.commit().map_err(io_err)
        })
        .await;
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        blocking(&self.db, move |db| {
            let tx = db.begin_write().map_err(io_err)?;
            {
                let mut table = tx.open_table(LOGS).map_err(io_err)?;
                table
                    .retain_in::<u64, _>(from.., |_, _| false)
                    .map_err(io_err)?;
            }
            tx.commit().map_err(io_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let bytes = encode(&log_id)?;
        blocking(&self.db, move |db| {
            let tx = db.begin_write().map_err(io_err)?;
            {
                let mut meta = tx.open_table(META).map_err(io_err)?;
                meta.insert(KEY_PURGED, bytes.as_slice()).map_err(io_err)?;
                let mut table = tx.open_table(LOGS).map_err(io_err)?;
                table
                    .retain_in::<u64, _>(..=upto, |_, _| false)
                    .map_err(io_err)?;
            }
            tx.commit().map_err(io_err)
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// The in-memory replicated state, restored from the latest snapshot at start.
pub(crate) struct StateMachine<S: ReplicatedState> {
    db: Arc<Database>,
    state: Arc<S>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    tx: watch::Sender<StateView<S>>,
}

impl<S: ReplicatedState> StateMachine<S> {
    /// Restores from the persisted snapshot, if any. Returns the machine and the state watch.
    pub(crate) async fn open(
        db: Arc<Database>,
    ) -> io::Result<(Self, watch::Receiver<StateView<S>>)> {
        let snap = blocking(&db, load_snapshot).await?;
        let (state, last_applied, last_membership) = match snap {
            Some(s) => (
                decode::<S>(&s.data)?,
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
            ),
            None => (S::default(), None, StoredMembership::default()),
        };
        let state = Arc::new(state);
        let view = StateView {
            applied_index: index_of(&last_applied),
            state: state.clone(),
        };
        let (tx, rx) = watch::channel(view);
        Ok((
            Self {
                db,
                state,
                last_applied,
                last_membership,
                tx,
            },
            rx,
        ))
    }

    fn publish(&self) {
        let view = StateView {
            applied_index: index_of(&self.last_applied),
            state: self.state.clone(),
        };
        self.tx.send_replace(view);
    }
}

fn index_of(log_id: &Option<LogId>) -> u64 {
    log_id.as_ref().map(|l| l.index()).unwrap_or(0)
}

/// Builds a snapshot from a consistent, cheaply captured copy of the state.
pub(crate) struct SnapshotBuilder<S: ReplicatedState> {
    db: Arc<Database>,
    state: Arc<S>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

impl<S: ReplicatedState> RaftSnapshotBuilder<Tc> for SnapshotBuilder<S> {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let data = encode(self.state.as_ref())?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
        };
        save_snapshot(&self.db, &meta, &data).await?;
        tracing::debug!(last_log_id = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl<S: ReplicatedState> RaftStateMachine<Tc> for StateMachine<S> {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<Tc>, io::Error>> + Unpin + OptionalSend,
    {
        let mut replies = Vec::new();
        let mut res = Ok(());
        loop {
            let (entry, responder) = match entries.try_next().await {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            };
            let index = entry.log_id.index();
            let reply = match entry.payload {
                EntryPayload::Blank => ApplyReply::Internal,
                EntryPayload::Normal(cmd) => match postcard::from_bytes::<S::Command>(&cmd.0) {
                    Ok(cmd) => {
                        let resp = Arc::make_mut(&mut self.state).apply(index, cmd);
                        match postcard::to_stdvec(&resp) {
                            Ok(b) => ApplyReply::Applied(b),
                            Err(e) => ApplyReply::Undecodable(format!("encode response: {e}")),
                        }
                    }
                    Err(e) => {
                        tracing::error!(index, error = %e, "undecodable command in raft log; skipped");
                        ApplyReply::Undecodable(e.to_string())
                    }
                },
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyReply::Internal
                }
            };
            self.last_applied = Some(entry.log_id);
            if let Some(r) = responder {
                replies.push((r, reply));
            }
        }
        // Publish before answering, so a writer that got its reply sees its effect in the watch.
        self.publish();
        for (r, reply) in replies {
            r.send(reply);
        }
        res
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let state: S = decode(&snapshot)?;
        save_snapshot(&self.db, meta, &snapshot).await?;
        self.state = Arc::new(state);
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let snap = blocking(&self.db, load_snapshot).await?;
        Ok(snap.map(|s| Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}
