//! Backups that are proven, not assumed: owns the backup format (a
//! directory `backup-<unix-ms>-<applied-index>/` holding `state.bin`, the
//! replicated `ClusterState` at one applied index as postcard bytes;
//! `store.db`, an online SQLite copy; optional `config/` files; and
//! `manifest.json` with sizes, SHA-256 checksums, the Raft index, the state
//! digest and the store's row counts), writing one, proving it by restoring
//! it into a scratch directory and checking it there, retention, and the
//! scheduled backup the Raft leader runs (`[backup]`), with its status
//! line, metrics and alarms.
//!
//! What it must never do: call a backup good that was not copied back out
//! of its directory and checked (checksums, state digest, SQLite integrity,
//! migrations, row counts, data digest); leave a failed backup looking
//! like a good one (it is written as `.NAME.partial` and renamed only once
//! verified, removed otherwise); delete anything but the `backup-*`
//! directories retention names; or do file work on the async runtime.

use crate::clock::now_ms;
use crate::node::{Node, NodeStatus};
use orrery_core::ClusterState;
use orrery_store::backup::{inspect_sqlite, sqlite_snapshot, StoreSummary};
use orrery_store::StoreError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

const LOG: &str = "orrery::backup";

/// The layout version this build writes and reads.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const STATE_FILE: &str = "state.bin";
pub const STORE_FILE: &str = "store.db";
/// Where `orrery backup` puts a local cluster's layout (configs, CA, token).
pub const CONFIG_DIR: &str = "config";
/// A manifest larger than this is not one of ours (it lists a few files).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Most files one manifest may list.
const MAX_FILES: usize = 10_000;

/// `[backup]`: the scheduled backup the Raft leader runs.
///
/// ```toml
/// [backup]
/// period_ms = 0              # 0: no scheduled backups; else >= 1000
/// # dir = "/backups/orrery"  # default DATA_DIR/backups
/// retention = 7              # good backups kept; older ones are removed
/// overdue_after_ms = 0       # no good backup this long: alarm (0: 2 x period_ms)
/// timeout_ms = 600000        # one backup (write + verify) must finish within this
/// max_state_bytes = 1073741824  # largest state.bin written or read
/// # scratch_dir = "/tmp"     # where backups are restored to be checked (default: the system's temp dir)
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub period_ms: u64,
    pub dir: Option<PathBuf>,
    pub retention: usize,
    pub overdue_after_ms: u64,
    pub timeout_ms: u64,
    pub max_state_bytes: u64,
    pub scratch_dir: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            period_ms: 0,
            dir: None,
            retention: 7,
            overdue_after_ms: 0,
            timeout_ms: 600_000,
            max_state_bytes: 1 << 30,
            scratch_dir: None,
        }
    }
}

impl BackupConfig {
    /// Checks the keys; a scheduled backup needs the SQLite store
    /// (PostgreSQL is backed up with `pg_dump`, see README.md).
    pub fn validate(&self, store: &orrery_store::StoreConfig) -> Result<(), String> {
        if self.period_ms != 0 && self.period_ms < 1000 {
            return Err(format!(
                "backup.period_ms must be 0 (off) or at least 1000, got {}",
                self.period_ms
            ));
        }
        if !(1..=10_000).contains(&self.retention) {
            return Err(format!(
                "backup.retention must be 1..=10000, got {}",
                self.retention
            ));
        }
        if self.overdue_after_ms != 0 && self.overdue_after_ms < self.period_ms {
            return Err(format!(
                "backup.overdue_after_ms ({}) must be 0 or at least backup.period_ms ({})",
                self.overdue_after_ms, self.period_ms
            ));
        }
        if self.timeout_ms < 1000 || self.max_state_bytes < 1024 {
            return Err(
                "backup.timeout_ms must be >= 1000 and backup.max_state_bytes >= 1024".into(),
            );
        }
        if self.period_ms != 0 && store.backend == orrery_store::BackendKind::Postgres {
            return Err("backup.period_ms: scheduled backups copy the SQLite store; back a PostgreSQL store up with pg_dump (README.md, Backups)".into());
        }
        Ok(())
    }

    /// No good backup for this long raises an alarm.
    pub fn overdue_after(&self) -> u64 {
        match self.overdue_after_ms {
            0 => self.period_ms.saturating_mul(2),
            v => v,
        }
    }

    /// The destination: `dir`, else `data_dir/backups`.
    pub fn dir_for(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("backups"))
    }

    /// Where backups are restored to be checked.
    pub fn scratch(&self) -> PathBuf {
        self.scratch_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

/// One file of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the backup directory (relative, `/`-separated).
    pub name: String,
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// What the backup's `store.db` held when it was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEntry {
    pub backend: String,
    pub schema_version: u32,
    pub row_counts: BTreeMap<String, u64>,
    /// See [`orrery_store::backup::StoreSummary::data_digest`].
    pub data_digest: String,
    /// See [`orrery_store::backup::StoreSummary::job_digest`].
    pub job_digest: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub orrery_version: String,
    pub created_at_ms: u64,
    pub cluster_id: String,
    /// `orrery backup` or `node N (scheduled)`.
    pub taken_by: String,
    /// The local cluster's data directory it was taken from, if any.
    #[serde(default)]
    pub source_data_dir: Option<PathBuf>,
    /// Raft log index of the last entry `state.bin` reflects.
    pub applied_index: u64,
    /// SHA-256 (hex) of `state.bin`: the voters' `raft_digest` at that index.
    pub state_digest: String,
    #[serde(default)]
    pub store: Option<StoreEntry>,
    pub files: Vec<FileEntry>,
}

impl BackupManifest {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Why a backup could not be written, or is not good.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(
        "checksum mismatch in {file}: the manifest says sha256 {expected}, the file has {actual}"
    )]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch in {file}: the manifest says {expected} bytes, the file has {actual}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("state: {0}")]
    State(String),
    #[error("{what} differs: the manifest says {expected}, the restored copy has {actual}")]
    Mismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("the backup failed its verification and was removed: {0}")]
    Unverified(Box<BackupError>),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The replicated state as `state.bin` holds it (postcard, as the voters
/// digest it).
pub fn encode_state(state: &ClusterState) -> Result<Vec<u8>, BackupError> {
    postcard::to_stdvec(state).map_err(|e| BackupError::State(format!("cannot encode: {e}")))
}

/// SHA-256 (hex) of `bytes`: for `state.bin`, the state digest.
pub fn digest_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// What one backup is made of.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub cluster_id: String,
    pub taken_by: String,
    pub source_data_dir: Option<PathBuf>,
    /// [`encode_state`] of the state at one applied index.
    pub state: Vec<u8>,
    /// The SQLite store to copy (online), if any.
    pub store: Option<PathBuf>,
    /// Further files: (name inside the backup, e.g. `config/cluster.toml`, source).
    pub extra: Vec<(String, PathBuf)>,
    pub busy_timeout: Duration,
    /// Where the backup is restored to be checked.
    pub scratch: PathBuf,
    pub max_state_bytes: u64,
}

/// A written and verified backup.
#[derive(Clone, Debug)]
pub struct Report {
    pub dir: PathBuf,
    pub manifest: BackupManifest,
    pub write_ms: u64,
    pub verify_ms: u64,
}

/// A directory in the scratch area, removed (with what it holds) on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(parent: &Path) -> Result<Scratch, BackupError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "orrery-verify-{}-{}-{}",
            std::process::id(),
            now_ms(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        crate::private::private_dir(&path).map_err(io("create the scratch directory", &path))?;
        Ok(Scratch { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes a backup of `inputs` under `root` and proves it ([`verify`]);
/// only a verified backup gets its final name. A backup that cannot be
/// written or fails verification is removed and the reason returned.
pub fn take(root: &Path, inputs: &Inputs) -> Result<Report, BackupError> {
    let t0 = now_ms();
    if inputs.state.len() as u64 > inputs.max_state_bytes {
        return Err(BackupError::State(format!(
            "{} bytes, over backup.max_state_bytes = {}",
            inputs.state.len(),
            inputs.max_state_bytes
        )));
    }
    let state: ClusterState = postcard::from_bytes(&inputs.state)
        .map_err(|e| BackupError::State(format!("does not decode: {e}")))?;
    crate::private::private_dir(root).map_err(io("create the backup directory", root))?;
    let name = format!("backup-{t0}-{}", state.applied_index);
    let partial = root.join(format!(".{name}.partial"));
    let manifest = match write_into(&partial, inputs, &state, t0) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let written = now_ms();
    if let Err(e) = verify(&partial, &inputs.scratch, inputs.max_state_bytes) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(BackupError::Unverified(Box::new(e)));
    }
    let dir = root.join(&name);
    std::fs::rename(&partial, &dir).map_err(io("name the verified backup", &dir))?;
    sync_dir(root);
    Ok(Report {
        dir,
        manifest,
        write_ms: written.saturating_sub(t0),
        verify_ms: now_ms().saturating_sub(written),
    })
}

/// Writes every file and the manifest into the new directory `dir`.
fn write_into(
    dir: &Path,
    inputs: &Inputs,
    state: &ClusterState,
    t0: u64,
) -> Result<BackupManifest, BackupError> {
    crate::private::private_dir(dir).map_err(io("create", dir))?;
    let mut names = vec![STATE_FILE.to_string()];
    write_file(&dir.join(STATE_FILE), &inputs.state)?;
    let mut store = None;
    if let Some(src) = &inputs.store {
        let dst = dir.join(STORE_FILE);
        sqlite_snapshot(src, &dst, inputs.busy_timeout)?;
        store = Some(store_entry(inspect_sqlite(&dst)?));
        names.push(STORE_FILE.into());
    }
    for (name, src) in &inputs.extra {
        let dst = dir.join(safe_name(name)?);
        if let Some(parent) = dst.parent() {
            crate::private::private_dir(parent).map_err(io("create", parent))?;
        }
        let bytes = std::fs::read(src).map_err(io("read", src))?;
        write_file(&dst, &bytes)?;
        names.push(name.clone());
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let (bytes, sha256) = hash_file(&dir.join(&name), u64::MAX)?;
        files.push(FileEntry {
            name,
            bytes,
            sha256,
        });
    }
    let manifest = BackupManifest {
        format: FORMAT,
        orrery_version: env!("CARGO_PKG_VERSION").into(),
        created_at_ms: t0,
        cluster_id: inputs.cluster_id.clone(),
        taken_by: inputs.taken_by.clone(),
        source_data_dir: inputs.source_data_dir.clone(),
        applied_index: state.applied_index,
        state_digest: digest_hex(&inputs.state),
        store,
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Manifest(format!("cannot encode: {e}")))?;
    write_file(&dir.join(MANIFEST), &text)?;
    sync_dir(dir);
    Ok(manifest)
}

fn store_entry(s: StoreSummary) -> StoreEntry {
    StoreEntry {
        backend: "sqlite".into(),
        schema_version: s.schema_version,
        row_counts: s.row_counts,
        data_digest: s.data_digest,
        job_digest: s.job_digest,
    }
}

/// Creates `path` (0600, must not exist), writes `bytes` and fsyncs it.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A manifest's file name as a relative path with no `..`: a doctored
/// manifest cannot make a restore read or write outside its directories.
fn safe_name(name: &str) -> Result<PathBuf, BackupError> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && name.len() <= 512
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(BackupError::Manifest(format!(
            "file name {name:?} is not a plain relative path"
        )));
    }
    Ok(p.to_path_buf())
}

/// (size, SHA-256) of the file at `path`, refusing one over `limit` bytes.
fn hash_file(path: &Path, limit: u64) -> Result<(u64, String), BackupError> {
    copy_hashing(path, None, limit)
}

/// Streams `src` (at most `limit` bytes) into the new file `dst`, if any,
/// hashing what it reads; returns (size, SHA-256 hex).
fn copy_hashing(src: &Path, dst: Option<&Path>, limit: u64) -> Result<(u64, String), BackupError> {
    let mut f = std::fs::File::open(src).map_err(io("open", src))?;
    let mut out = match dst {
        Some(d) => {
            if let Some(parent) = d.parent() {
                crate::private::private_dir(parent).map_err(io("create", parent))?;
            }
            Some(std::fs::File::create_new(d).map_err(io("create", d))?)
        }
        None => None,
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", src))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(BackupError::Size {
                file: src.display().to_string(),
                expected: limit,
                actual: total,
            });
        }
        h.update(&buf[..n]);
        if let (Some(o), Some(d)) = (out.as_mut(), dst) {
            o.write_all(&buf[..n]).map_err(io("write", d))?;
        }
    }
    if let (Some(o), Some(d)) = (out.as_mut(), dst) {
        o.sync_all().map_err(io("sync", d))?;
    }
    Ok((total, hex(&h.finalize())))
}

/// Reads and checks `dir/manifest.json` (bounded, this format, sane names).
pub fn read_manifest(dir: &Path) -> Result<BackupManifest, BackupError> {
    let path = dir.join(MANIFEST);
    let meta = std::fs::metadata(&path).map_err(io("read", &path))?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(BackupError::Manifest(format!(
            "{} is {} bytes: not a backup manifest",
            path.display(),
            meta.len()
        )));
    }
    let text = std::fs::read(&path).map_err(io("read", &path))?;
    let m: BackupManifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Manifest(format!("{} does not parse: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(BackupError::Manifest(format!(
            "format {} (this build reads {FORMAT})",
            m.format
        )));
    }
    if m.files.len() > MAX_FILES {
        return Err(BackupError::Manifest(format!(
            "{} files listed",
            m.files.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &m.files {
        safe_name(&f.name)?;
        if !seen.insert(f.name.as_str()) {
            return Err(BackupError::Manifest(format!("{} is listed twice", f.name)));
        }
    }
    if m.file(STATE_FILE).is_none() {
        return Err(BackupError::Manifest(format!("{STATE_FILE} is not listed")));
    }
    if m.store.is_some() && m.file(STORE_FILE).is_none() {
        return Err(BackupError::Manifest(format!("{STORE_FILE} is not listed")));
    }
    Ok(m)
}

/// A backup restored into a scratch directory and checked there; the
/// verified copies stay in [`Verified::scratch`] until it is dropped.
#[derive(Debug)]
pub struct Verified {
    pub manifest: BackupManifest,
    pub scratch: Scratch,
    pub state: ClusterState,
}

impl Verified {
    /// A verified copy of one file of the backup.
    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

/// Proves the backup in `dir`: copies every file it lists into a new
/// scratch directory under `scratch_parent`, checking size and checksum of
/// each; decodes the state and recomputes its digest and applied index;
/// opens the store copy (integrity check, migrations at this build's
/// version, row counts and data digest as the manifest says).
pub fn verify(
    dir: &Path,
    scratch_parent: &Path,
    max_state_bytes: u64,
) -> Result<Verified, BackupError> {
    let manifest = read_manifest(dir)?;
    let scratch = Scratch::new(scratch_parent)?;
    for f in &manifest.files {
        let name = safe_name(&f.name)?;
        let (bytes, sha) =
            copy_hashing(&dir.join(&name), Some(&scratch.path().join(&name)), f.bytes)?;
        if bytes != f.bytes {
            return Err(BackupError::Size {
                file: f.name.clone(),
                expected: f.bytes,
                actual: bytes,
            });
        }
        if sha != f.sha256 {
            return Err(BackupError::Checksum {
                file: f.name.clone(),
                expected: f.sha256.clone(),
                actual: sha,
            });
        }
    }
    let state = check_state(&scratch.path().join(STATE_FILE), &manifest, max_state_bytes)?;
    if let Some(expected) = &manifest.store {
        let got = store_entry(inspect_sqlite(&scratch.path().join(STORE_FILE))?);
        same(
            "store schema version",
            &expected.schema_version,
            &got.schema_version,
        )?;
        same("store row counts", &expected.row_counts, &got.row_counts)?;
        same("store data digest", &expected.data_digest, &got.data_digest)?;
        same("store job digest", &expected.job_digest, &got.job_digest)?;
    }
    Ok(Verified {
        manifest,
        scratch,
        state,
    })
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    expected: &T,
    got: &T,
) -> Result<(), BackupError> {
    if expected == got {
        return Ok(());
    }
    Err(BackupError::Mismatch {
        what: what.into(),
        expected: format!("{expected:?}"),
        actual: format!("{got:?}"),
    })
}

/// Decodes the restored `state.bin` and checks its digest (recomputed from
/// a fresh encoding) and applied index against the manifest.
fn check_state(
    path: &Path,
    m: &BackupManifest,
    max_state_bytes: u64,
) -> Result<ClusterState, BackupError> {
    let len = std::fs::metadata(path).map_err(io("read", path))?.len();
    if len > max_state_bytes {
        return Err(BackupError::State(format!(
            "{len} bytes, over backup.max_state_bytes = {max_state_bytes}"
        )));
    }
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    let state: ClusterState = postcard::from_bytes(&bytes)
        .map_err(|e| BackupError::State(format!("{STATE_FILE} does not decode: {e}")))?;
    let digest = digest_hex(&encode_state(&state)?);
    same("state digest", &m.state_digest, &digest)?;
    same("applied index", &m.applied_index, &state.applied_index)?;
    Ok(state)
}

/// The backups under `root` by their names (`backup-<ms>-<index>`),
/// oldest first: (directory, created at ms).
pub fn list(root: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut out: Vec<(PathBuf, u64)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("backup-")?;
            let (ms, index) = rest.split_once('-')?;
            index.parse::<u64>().ok()?;
            Some((e.path(), ms.parse::<u64>().ok()?))
        })
        .collect();
    out.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    out
}

/// The newest backup under `root` whose manifest reads.
pub fn newest(root: &Path) -> Option<(PathBuf, BackupManifest)> {
    list(root)
        .into_iter()
        .rev()
        .find_map(|(p, _)| read_manifest(&p).ok().map(|m| (p, m)))
}

/// Removes the oldest backups beyond `keep`; returns those removed.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let all = list(root);
    let cut = all.len().saturating_sub(keep.max(1));
    let mut removed = vec![];
    for (p, _) in all.into_iter().take(cut) {
        std::fs::remove_dir_all(&p).map_err(io("remove the old backup", &p))?;
        removed.push(p);
    }
    Ok(removed)
}

/// The scheduled backup as this node sees it (`NodeStatus.backup`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// This node runs the scheduled backups (it leads the control plane).
    pub runner: bool,
    /// Since when it does (ms since the Unix epoch).
    #[serde(default)]
    pub runner_since_ms: Option<u64>,
    pub dir: String,
    pub period_ms: u64,
    pub overdue_after_ms: u64,
    #[serde(default)]
    pub last_success_at_ms: Option<u64>,
    /// The last good backup's directory.
    #[serde(default)]
    pub last_success: Option<String>,
    pub last_bytes: u64,
    /// Write + verify time of the last good backup.
    pub last_took_ms: u64,
    /// Set while the latest attempt failed: why.
    #[serde(default)]
    pub last_failure: Option<String>,
    #[serde(default)]
    pub last_failure_at_ms: Option<u64>,
    /// Attempts that failed, since the process started.
    pub failures: u64,
    /// The runner has no good backup younger than `overdue_after_ms`.
    pub overdue: bool,
}

impl BackupStatus {
    /// The alarm in force, if any (only the runner's state counts).
    pub fn alarm(&self) -> Option<String> {
        if !self.runner {
            return None;
        }
        if let Some(f) = &self.last_failure {
            return Some(format!("backup to {} failed: {f}", self.dir));
        }
        if self.overdue {
            let last = match self.last_success_at_ms {
                Some(t) => format!("the last good one was taken at {t} ms"),
                None => "none was ever taken here".into(),
            };
            return Some(format!(
                "backup overdue: no good backup in {} within {} ms ({last})",
                self.dir, self.overdue_after_ms
            ));
        }
        None
    }

    /// Age of the last good backup in seconds, if any.
    pub fn last_success_age_s(&self, now: u64) -> Option<f64> {
        self.last_success_at_ms
            .map(|t| now.saturating_sub(t) as f64 / 1000.0)
    }
}

/// The node's scheduled-backup runner: its status and whether a backup is
/// running (set by the blocking work itself, so a timed-out run that is
/// still copying holds off the next one).
#[derive(Debug, Default)]
pub struct Runner {
    status: Mutex<Option<BackupStatus>>,
    running: Arc<AtomicBool>,
    announced: Mutex<Option<String>>,
}

impl Runner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BackupStatus>> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status line (`None`: scheduled backups are off).
    pub fn status(&self, now: u64) -> Option<BackupStatus> {
        let mut s = self.lock().clone()?;
        let since = s.last_success_at_ms.or(s.runner_since_ms).unwrap_or(now);
        s.overdue = s.runner && now.saturating_sub(since) > s.overdue_after_ms;
        Some(s)
    }

    fn update(&self, f: impl FnOnce(&mut BackupStatus)) {
        if let Some(s) = self.lock().as_mut() {
            f(s)
        }
    }
}

/// The `orrery_backup_*` metrics, from the status line.
pub(crate) fn metrics(reg: &mut prometheus_client::registry::Registry, st: &NodeStatus, now: u64) {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    let Some(b) = &st.backup else {
        return;
    };
    let c: Counter = Counter::default();
    c.inc_by(b.failures);
    reg.register(
        "backup_failures",
        "Scheduled backups that failed (write or verification)",
        c,
    );
    let alarm: Gauge = Gauge::default();
    alarm.set(i64::from(b.alarm().is_some()));
    reg.register(
        "backup_alarm",
        "1 while this node's scheduled backup is failing or overdue",
        alarm,
    );
    if let Some(age) = b.last_success_age_s(now) {
        let g: Gauge<f64, AtomicU64> = Gauge::default();
        g.set(age);
        reg.register(
            "backup_last_success_age_seconds",
            "Age of the last good (verified) backup this node knows of",
            g,
        );
    }
}

/// The scheduled backup: while this node leads and serves, one verified
/// backup every `backup.period_ms`, retention applied after each good one;
/// a failure or an overdue backup raises an alarm at once (retried each
/// second while the watchdog's alarm interval holds it back).
pub(crate) async fn run(node: Node) {
    let inner = node.inner();
    let cfg = inner.cfg.backup.clone();
    if cfg.period_ms == 0 {
        return;
    }
    let root = cfg.dir_for(&inner.cfg.data_dir);
    *inner.backup.lock() = Some(BackupStatus {
        dir: root.display().to_string(),
        period_ms: cfg.period_ms,
        overdue_after_ms: cfg.overdue_after(),
        ..Default::default()
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_at: Option<u64> = None;
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        if !(inner.is_leading() && inner.serving()) {
            next_at = None;
            inner.backup.update(|s| {
                s.runner = false;
                s.runner_since_ms = None;
            });
        } else {
            if next_at.is_none() {
                next_at = Some(start_running(&node, &root, now).await);
            }
            if next_at.is_some_and(|t| now >= t) && !inner.backup.running.load(Ordering::Acquire) {
                next_at = Some(now + cfg.period_ms);
                attempt(&node, &cfg, &root).await;
            }
        }
        announce(&node, now_ms());
    }
}

/// This node became the runner: the newest good backup in the destination
/// (another leader's, say) counts as the last success. Returns when the
/// first backup is due.
async fn start_running(node: &Node, root: &Path, now: u64) -> u64 {
    let r = root.to_path_buf();
    let newest = tokio::task::spawn_blocking(move || newest(&r))
        .await
        .ok()
        .flatten();
    let period = node.inner().cfg.backup.period_ms;
    let due = newest
        .as_ref()
        .map_or(now, |(_, m)| (m.created_at_ms + period).max(now));
    node.inner().backup.update(|s| {
        s.runner = true;
        s.runner_since_ms = Some(now);
        if let Some((p, m)) = &newest {
            if s.last_success_at_ms.is_none_or(|t| t < m.created_at_ms) {
                s.last_success_at_ms = Some(m.created_at_ms);
                s.last_success = Some(p.display().to_string());
                s.last_bytes = m.total_bytes();
            }
        }
    });
    due
}

/// One scheduled backup, recorded in the status line.
async fn attempt(node: &Node, cfg: &BackupConfig, root: &Path) {
    let inner = node.inner();
    let started = now_ms();
    let result = take_scheduled(node, cfg, root).await;
    let now = now_ms();
    match result {
        Ok(r) => {
            info!(target: LOG, "backup {} verified: index {}, {} bytes, written in {} ms, checked in {} ms",
                r.dir.display(), r.manifest.applied_index, r.manifest.total_bytes(), r.write_ms, r.verify_ms);
            inner.backup.update(|s| {
                s.last_success_at_ms = Some(r.manifest.created_at_ms);
                s.last_success = Some(r.dir.display().to_string());
                s.last_bytes = r.manifest.total_bytes();
                s.last_took_ms = now.saturating_sub(started);
                s.last_failure = None;
                s.last_failure_at_ms = None;
            });
        }
        Err(why) => {
            warn!(target: LOG, "backup to {} failed: {why}", root.display());
            inner.backup.update(|s| {
                s.failures += 1;
                s.last_failure = Some(orrery_core::state::limits::clip_to(why, 400));
                s.last_failure_at_ms = Some(now);
            });
        }
    }
}

/// Reads the state from the leader (this node), then writes, verifies and
/// prunes on a blocking thread, within `backup.timeout_ms`.
async fn take_scheduled(node: &Node, cfg: &BackupConfig, root: &Path) -> Result<Report, String> {
    let inner = node.inner();
    let store = match inner.cfg.store_config().validate() {
        Ok(orrery_store::Backend::Sqlite { path }) => path,
        Ok(orrery_store::Backend::Postgres { .. }) => {
            return Err("the store is PostgreSQL: back it up with pg_dump".into())
        }
        Err(e) => return Err(format!("store config: {e}")),
    };
    let state = node
        .cluster_state()
        .await
        .map_err(|e| format!("cannot read the cluster state: {e}"))?;
    let inputs = Inputs {
        cluster_id: inner.cfg.cluster_id.clone(),
        taken_by: format!("node {} (scheduled)", inner.cfg.node_id),
        source_data_dir: None,
        state: encode_state(&state).map_err(|e| e.to_string())?,
        store: Some(store),
        extra: vec![],
        busy_timeout: Duration::from_millis(inner.cfg.store.busy_timeout_ms),
        scratch: cfg.scratch(),
        max_state_bytes: cfg.max_state_bytes,
    };
    let (root, keep) = (root.to_path_buf(), cfg.retention);
    let running = inner.backup.running.clone();
    running.store(true, Ordering::Release);
    let work = tokio::task::spawn_blocking(move || {
        let r = take(&root, &inputs).map_err(|e| e.to_string());
        let r = r.and_then(|rep| match prune(&root, keep) {
            Ok(_) => Ok(rep),
            Err(e) => Err(format!(
                "verified {} but retention failed: {e}",
                rep.dir.display()
            )),
        });
        running.store(false, Ordering::Release);
        r
    });
    match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), work).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("the backup task failed: {e}")),
        Err(_) => Err(format!(
            "not finished within backup.timeout_ms = {}",
            cfg.timeout_ms
        )),
    }
}

/// Raises the alarm in force once (again whenever its text changes).
fn announce(node: &Node, now: u64) {
    let inner = node.inner();
    let alarm = inner.backup.status(now).and_then(|s| s.alarm());
    let mut last = inner
        .backup
        .announced
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match alarm {
        None => *last = None,
        Some(text) if last.as_deref() != Some(text.as_str()) => {
            let what = format!("node {}: {text}", inner.cfg.node_id);
            if inner.watchdog.raise(now, what).is_some() {
                *last = Some(text);
            }
        }
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Inputs {
        let store = dir.join("live.db");
        let s = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store)).unwrap();
        s.write("a/1", 1, &[orrery_store::Op::put("t", "k", b"v".to_vec())])
            .unwrap();
        std::fs::write(dir.join("cluster.toml"), "x = 1\n").unwrap();
        let state = ClusterState {
            applied_index: 42,
            ..Default::default()
        };
        Inputs {
            cluster_id: "c".into(),
            taken_by: "test".into(),
            source_data_dir: None,
            state: encode_state(&state).unwrap(),
            store: Some(store),
            extra: vec![("config/cluster.toml".into(), dir.join("cluster.toml"))],
            busy_timeout: Duration::from_secs(2),
            scratch: dir.to_path_buf(),
            max_state_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_backup_is_written_verified_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("backups");
        let r = take(&root, &inputs(d.path())).unwrap();
        assert!(r
            .dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-42"));
        assert_eq!(r.manifest.applied_index, 42);
        assert_eq!(r.manifest.store.as_ref().unwrap().row_counts["kv"], 1);
        assert_eq!(r.manifest.files.len(), 3);
        let v = verify(&r.dir, d.path(), 1 << 20).unwrap();
        assert_eq!(v.state.applied_index, 42);
        assert_eq!(newest(&root).unwrap().0, r.dir);
        // No scratch directory is left behind.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("orrery-verify-")
            })
            .collect();
        assert!(
            left.len() <= 1,
            "only the live Verified's scratch: {left:?}"
        );
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let r = take(&d.path().join("b"), &inputs(d.path())).unwrap();
        let f = r.dir.join(STORE_FILE);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[100] ^= 0x01;
        std::fs::write(&f, bytes).unwrap();
        let e = verify(&r.dir, d.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(&e, BackupError::Checksum { file, .. } if file == STORE_FILE),
            "{e}"
        );
    }

    #[test]
    fn a_doctored_manifest_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = take(&d.path().join("b"), &inputs(d.path())).unwrap();
        let mut m = r.manifest.clone();
        m.files[0].name = "../escape".into();
        std::fs::write(r.dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(
            verify(&r.dir, d.path(), 1 << 20),
            Err(BackupError::Manifest(_))
        ));
        let mut m = r.manifest.clone();
        m.state_digest = "00".into();
        std::fs::write(r.dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = verify(&r.dir, d.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(&e, BackupError::Mismatch { what, .. } if what == "state digest"),
            "{e}"
        );
        let mut m = r.manifest.clone();
        m.store.as_mut().unwrap().row_counts.insert("kv".into(), 2);
        std::fs::write(r.dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = verify(&r.dir, d.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("store row counts"), "{e}");
    }

    #[test]
    fn an_unwritable_destination_fails_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), "x").unwrap();
        let e = take(&d.path().join("file").join("b"), &inputs(d.path())).unwrap_err();
        assert!(
            e.to_string().contains("cannot create the backup directory"),
            "{e}"
        );
    }

    #[test]
    fn retention_keeps_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b");
        for ms in [10, 30, 20] {
            std::fs::create_dir_all(root.join(format!("backup-{ms}-1"))).unwrap();
        }
        std::fs::create_dir_all(root.join("unrelated")).unwrap();
        let gone = prune(&root, 2).unwrap();
        assert_eq!(gone, vec![root.join("backup-10-1")]);
        assert!(root.join("unrelated").exists());
    }

    #[test]
    fn status_alarms_only_on_the_runner() {
        let mut s = BackupStatus {
            runner: false,
            last_failure: Some("disk full".into()),
            dir: "/b".into(),
            ..Default::default()
        };
        assert_eq!(s.alarm(), None);
        s.runner = true;
        assert!(s.alarm().unwrap().contains("disk full"));
        s.last_failure = None;
        s.overdue = true;
        assert!(s.alarm().unwrap().contains("overdue"));
    }

    #[test]
    fn a_runner_without_a_recent_good_backup_is_overdue() {
        let r = Runner::default();
        assert_eq!(r.status(0), None, "off: no status line");
        *r.lock() = Some(BackupStatus {
            runner: true,
            runner_since_ms: Some(1_000),
            overdue_after_ms: 10_000,
            ..Default::default()
        });
        assert!(!r.status(5_000).unwrap().overdue);
        assert!(r
            .status(12_000)
            .unwrap()
            .alarm()
            .unwrap()
            .contains("none was ever taken"));
        r.update(|s| s.last_success_at_ms = Some(11_000));
        assert!(!r.status(12_000).unwrap().overdue);
        assert!(r.status(21_001).unwrap().overdue);
        r.update(|s| s.runner = false);
        assert_eq!(
            r.status(50_000).unwrap().alarm(),
            None,
            "only the runner alarms"
        );
    }

    #[test]
    fn config_bounds() {
        let store = orrery_store::StoreConfig::default();
        let ok = BackupConfig::default();
        assert!(ok.validate(&store).is_ok());
        let c = BackupConfig {
            period_ms: 10,
            ..Default::default()
        };
        assert!(c.validate(&store).is_err());
        let c = BackupConfig {
            period_ms: 5000,
            overdue_after_ms: 1000,
            ..Default::default()
        };
        assert!(c.validate(&store).is_err());
        let c = BackupConfig {
            period_ms: 5000,
            ..Default::default()
        };
        assert_eq!(c.overdue_after(), 10_000);
        let pg = orrery_store::StoreConfig::postgres("postgres://x@h/db");
        assert!(c.validate(&pg).is_err());
    }
}
