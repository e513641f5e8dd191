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
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::seal::{seal, unseal, SEAL_VERSION};
use crate::types::{ApplyReply, Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, Tc, Vote};
use crate::{ReplicatedState, StateView};

pub(crate) const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// The file name of the Raft store inside the control plane's data directory.
pub(crate) const DB_FILE: &str = "raft.redb";

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";
/// The record layout of the file (`seal::SEAL_VERSION`); absent in stores written before
/// records were sealed.
const KEY_FORMAT: &str = "format";
/// Present while a repaired voter has not caught up with its leader (see `crate::repair`).
pub(crate) const KEY_REPAIRED: &str = "repaired";

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Where a record lives, for error messages: table and key.
fn corrupt(table: &str, key: &dyn std::fmt::Display, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{DB_FILE}: table {table}, key {key}: {why}"),
    )
}

/// Unseals and decodes one stored record, or says why it is damaged.
fn open_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let payload = unseal(bytes).map_err(|e| e.to_string())?;
    postcard::from_bytes(payload).map_err(|e| format!("undecodable: {e}"))
}

/// Unseals and decodes one stored record; a damaged record names its table and key.
fn decode<T: DeserializeOwned>(
    table: &str,
    key: &dyn std::fmt::Display,
    bytes: &[u8],
) -> io::Result<T> {
    open_record(bytes).map_err(|why| corrupt(table, key, why))
}

/// Encodes and seals one record.
fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(v)
        .map(|b| seal(&b))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Opens (or creates) the redb file and makes sure both tables exist and every record is
/// sealed (a store from before sealing is sealed in place, in one transaction).
pub(crate) fn open_db(dir: &Path) -> io::Result<Arc<Database>> {
    crate::private::create_private_dir(dir)?;
    let path = dir.join(DB_FILE);
    let db = Database::create(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            io::Error::new(io::ErrorKind::WouldBlock, e.to_string())
        }
        // redb verifies its page checksums when it recovers a file that was not closed
        // cleanly (e.g. after SIGKILL); a damaged page is found there, before our own check.
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => {
            io::Error::new(io::ErrorKind::InvalidData, m)
        }
        e => io_err(e),
    })?;
    crate::private::restrict_file(&path)?;
    let tx = db.begin_write().map_err(io_err)?;
    {
        let mut logs = tx.open_table(LOGS).map_err(io_err)?;
        let mut meta = tx.open_table(META).map_err(io_err)?;
        if meta.get(KEY_FORMAT).map_err(io_err)?.is_none() {
            seal_legacy(&mut logs, &mut meta)?;
        }
    }
    tx.commit().map_err(io_err)?;
    Ok(Arc::new(db))
}

/// Seals every record of a store written before records carried checksums.
fn seal_legacy(
    logs: &mut redb::Table<u64, &[u8]>,
    meta: &mut redb::Table<&str, &[u8]>,
) -> io::Result<()> {
    let mut rows = Vec::new();
    for item in logs.iter().map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        rows.push((k.value(), seal(v.value())));
    }
    for (k, v) in &rows {
        logs.insert(*k, v.as_slice()).map_err(io_err)?;
    }
    let mut keys = Vec::new();
    for item in meta.iter().map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        keys.push((k.value().to_string(), seal(v.value())));
    }
    for (k, v) in &keys {
        meta.insert(k.as_str(), v.as_slice()).map_err(io_err)?;
    }
    if !rows.is_empty() || !keys.is_empty() {
        tracing::info!(
            entries = rows.len(),
            keys = keys.len(),
            "sealed a raft store written before checksums"
        );
    }
    let format = encode(&SEAL_VERSION)?;
    meta.insert(KEY_FORMAT, format.as_slice()).map_err(io_err)?;
    Ok(())
}

/// A record that failed verification: which table, which key, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DamagedRecord {
    pub(crate) table: &'static str,
    pub(crate) key: String,
    pub(crate) reason: String,
}

/// Unseals and decodes every record in the store, in key order, and returns the first one
/// that is damaged. Run at start, before Raft sees the store: a voter must never vote or
/// replicate from a record it cannot trust.
pub(crate) fn verify_all(db: &Database) -> io::Result<Option<DamagedRecord>> {
    let tx = db.begin_read().map_err(io_err)?;
    let meta = tx.open_table(META).map_err(io_err)?;
    for item in meta.iter().map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        let (key, bytes) = (k.value(), v.value());
        let check = match key {
            KEY_VOTE => open_record::<Vote>(bytes).map(drop),
            KEY_COMMITTED | KEY_PURGED => open_record::<LogId>(bytes).map(drop),
            KEY_SNAPSHOT => open_record::<StoredSnapshot>(bytes).map(drop),
            _ => unseal(bytes).map(drop).map_err(|e| e.to_string()),
        };
        if let Err(reason) = check {
            let key = key.to_string();
            return Ok(Some(DamagedRecord {
                table: META.name(),
                key,
                reason,
            }));
        }
    }
    let logs = tx.open_table(LOGS).map_err(io_err)?;
    for item in logs.iter().map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        let index = k.value();
        let reason = match open_record::<Entry>(v.value()) {
            Ok(e) if e.log_id.index() == index => continue,
            Ok(e) => format!("entry claims index {}", e.log_id.index()),
            Err(reason) => reason,
        };
        let key = index.to_string();
        return Ok(Some(DamagedRecord {
            table: LOGS.name(),
            key,
            reason,
        }));
    }
    Ok(None)
}

/// Reads the vote of a store if it is intact (used by repair to carry it over).
pub(crate) fn intact_vote(db: &Database) -> Option<Vote> {
    get_meta(db, KEY_VOTE).ok().flatten()
}

/// Whether the store carries the repair marker.
pub(crate) fn is_repaired(db: &Database) -> io::Result<bool> {
    let tx = db.begin_read().map_err(io_err)?;
    let table = tx.open_table(META).map_err(io_err)?;
    Ok(table.get(KEY_REPAIRED).map_err(io_err)?.is_some())
}

/// Writes (`Some`) or clears (`None`) the repair marker and, with it, a carried-over vote.
pub(crate) fn set_repaired(db: &Database, vote: Option<Option<Vote>>) -> io::Result<()> {
    let tx = db.begin_write().map_err(io_err)?;
    {
        let mut table = tx.open_table(META).map_err(io_err)?;
        match vote {
            Some(v) => {
                let marker = encode(&true)?;
                table
                    .insert(KEY_REPAIRED, marker.as_slice())
                    .map_err(io_err)?;
                if let Some(v) = v {
                    let bytes = encode(&v)?;
                    table.insert(KEY_VOTE, bytes.as_slice()).map_err(io_err)?;
                }
            }
            None => {
                table.remove(KEY_REPAIRED).map_err(io_err)?;
            }
        }
    }
    tx.commit().map_err(io_err)
}

/// Whether another instance in this process still holds the store at `path`.
pub(crate) async fn still_open(path: &Path) -> bool {
    let path = path.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || match Database::open(&path) {
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => true,
        Ok(db) => {
            drop(db);
            false
        }
        Err(_) => false,
    });
    probe.await.unwrap_or(false)
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
        Some(v) => Ok(Some(decode(META.name(), &key, v.value())?)),
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
                let (k, v) = item.map_err(io_err)?;
                let (k, v) = (k.value(), v.value());
                out.push(decode::<Entry>(LOGS.name(), &k, v)?);
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
                Some((k, v)) => Some(decode::<Entry>(LOGS.name(), &k.value(), v.value())?.log_id),
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
                postcard::from_bytes::<S>(&s.data)
                    .map_err(|e| corrupt(META.name(), &KEY_SNAPSHOT, format!("state: {e}")))?,
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
        // The state travels to followers as is: raw postcard, sealed only when stored.
        let data = postcard::to_stdvec(self.state.as_ref())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
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
        let state: S = postcard::from_bytes(&snapshot)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
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
