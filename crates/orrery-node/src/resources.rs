//! What a node runs on, watched ([`Sample`], [`assess`]): free space on the
//! filesystems of its data directory, its Raft store and its application
//! store; the size of the Raft store and of the application store and how
//! fast the latter grows; open file descriptors against the limit.
//!
//! The second post-mortem's standby filled its disk without a word until the
//! game crashed. Here every resource has a warning and a critical threshold
//! (`[resources]`), a metric, and an alarm naming node and path, raised when
//! a level is entered and cleared when it is left. A voter whose Raft
//! filesystem is critical stops its Raft core before a write fails on it
//! (see [`crate::voter`]), so the other voters carry on and it comes back by
//! itself once space is freed.
//!
//! This module owns sampling and the pure assessment; it never deletes,
//! moves or writes anything it watches.

use crate::node::Inner;
use crate::quorum::{raise, AlarmKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

const LOG: &str = "orrery::resources";

/// `[resources]`: thresholds and how often they are checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// How often the resources are sampled, in ms. Default 1000.
    pub check_interval_ms: u64,
    /// A filesystem with less free space than this (bytes) or than
    /// `disk_warn_free_pct` percent is a warning. Default 256 MiB.
    pub disk_warn_free_bytes: u64,
    /// Default 5.
    pub disk_warn_free_pct: u8,
    /// Below this (bytes) or `disk_critical_free_pct` percent it is
    /// critical: a voter stops its Raft core. Default 32 MiB.
    pub disk_critical_free_bytes: u64,
    /// Default 1.
    pub disk_critical_free_pct: u8,
    /// The Raft store (log since the last snapshot plus the snapshot), in
    /// bytes: warning / critical. Default 1 GiB / 4 GiB.
    pub raft_store_warn_bytes: u64,
    pub raft_store_critical_bytes: u64,
    /// The application store (SQLite file), in bytes. Default 16 GiB / 64 GiB.
    pub store_warn_bytes: u64,
    pub store_critical_bytes: u64,
    /// Open file descriptors, percent of the soft limit. Default 80 / 95.
    pub fds_warn_pct: u8,
    pub fds_critical_pct: u8,
}

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig {
            check_interval_ms: 1_000,
            disk_warn_free_bytes: 256 * MIB,
            disk_warn_free_pct: 5,
            disk_critical_free_bytes: 32 * MIB,
            disk_critical_free_pct: 1,
            raft_store_warn_bytes: GIB,
            raft_store_critical_bytes: 4 * GIB,
            store_warn_bytes: 16 * GIB,
            store_critical_bytes: 64 * GIB,
            fds_warn_pct: 80,
            fds_critical_pct: 95,
        }
    }
}

impl ResourcesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=600_000).contains(&self.check_interval_ms) {
            return Err("resources.check_interval_ms must be in 100..=600000".into());
        }
        let pairs = [
            (
                "disk_*_free_bytes",
                self.disk_critical_free_bytes,
                self.disk_warn_free_bytes,
            ),
            (
                "disk_*_free_pct",
                self.disk_critical_free_pct.into(),
                self.disk_warn_free_pct.into(),
            ),
            (
                "raft_store_*_bytes",
                self.raft_store_warn_bytes,
                self.raft_store_critical_bytes,
            ),
            (
                "store_*_bytes",
                self.store_warn_bytes,
                self.store_critical_bytes,
            ),
            (
                "fds_*_pct",
                self.fds_warn_pct.into(),
                self.fds_critical_pct.into(),
            ),
        ];
        for (name, lower, upper) in pairs {
            if lower > upper {
                return Err(format!(
                    "resources.{name}: the critical threshold must lie beyond the warning one"
                ));
            }
        }
        if self.disk_warn_free_pct > 100 || self.fds_critical_pct > 100 {
            return Err("resources: percentages must be at most 100".into());
        }
        Ok(())
    }
}

/// What is watched: a fixed set, so alarm keys and metric labels stay bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Watched {
    /// The filesystem of the node's data directory.
    DataDisk,
    /// The filesystem of the Raft store, when it is another one (voters).
    RaftDisk,
    /// The filesystem of the application store, when it is another one.
    StoreDisk,
    RaftStore,
    Store,
    Fds,
}

impl Watched {
    pub fn name(self) -> &'static str {
        match self {
            Watched::DataDisk => "data_disk",
            Watched::RaftDisk => "raft_disk",
            Watched::StoreDisk => "store_disk",
            Watched::RaftStore => "raft_store",
            Watched::Store => "store",
            Watched::Fds => "fds",
        }
    }
}

/// One filesystem's space, as `statvfs` reports it to an unprivileged user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub watched: Watched,
    pub path: PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// One sample of everything watched; a part that could not be read is
/// absent (and said so in `errors`), never guessed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub disks: Vec<Disk>,
    pub raft_store: Option<(PathBuf, u64)>,
    pub store: Option<(PathBuf, u64)>,
    /// Growth of the application store since the previous sample, bytes/s.
    pub store_growth_bytes_per_s: Option<f64>,
    pub open_fds: Option<u64>,
    pub fd_limit: Option<u64>,
    /// What could not be read, at most [`MAX_ERRORS`].
    pub errors: Vec<String>,
}

/// Most read errors one sample keeps.
pub const MAX_ERRORS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Warning,
    Critical,
}

/// A resource past a threshold, with the alarm text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub watched: Watched,
    pub level: Level,
    pub text: String,
}

fn level(past_warn: bool, past_critical: bool) -> Option<Level> {
    match (past_warn, past_critical) {
        (_, true) => Some(Level::Critical),
        (true, false) => Some(Level::Warning),
        _ => None,
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Every resource of `s` past a threshold of `c`, on node `node`.
pub fn assess(node: u64, s: &Sample, c: &ResourcesConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    for d in &s.disks {
        let below = |bytes: u64, pct: u8| {
            d.free_bytes < bytes
                || (d.free_bytes as u128) * 100 < (d.total_bytes as u128) * pct as u128
        };
        let lv = level(
            below(c.disk_warn_free_bytes, c.disk_warn_free_pct),
            below(c.disk_critical_free_bytes, c.disk_critical_free_pct),
        );
        if let Some(level) = lv {
            out.push(Finding {
                watched: d.watched,
                level,
                text: format!(
                    "node {node}: {} free of {} on {} ({})",
                    mib(d.free_bytes),
                    mib(d.total_bytes),
                    d.path.display(),
                    d.watched.name()
                ),
            });
        }
    }
    let sized = [
        (
            Watched::RaftStore,
            &s.raft_store,
            c.raft_store_warn_bytes,
            c.raft_store_critical_bytes,
        ),
        (
            Watched::Store,
            &s.store,
            c.store_warn_bytes,
            c.store_critical_bytes,
        ),
    ];
    for (watched, v, warn, crit) in sized {
        let Some((path, bytes)) = v else { continue };
        if let Some(level) = level(*bytes >= warn, *bytes >= crit) {
            out.push(Finding {
                watched,
                level,
                text: format!(
                    "node {node}: {} is {} ({})",
                    path.display(),
                    mib(*bytes),
                    watched.name()
                ),
            });
        }
    }
    if let (Some(open), Some(limit)) = (s.open_fds, s.fd_limit.filter(|l| *l > 0)) {
        let pct = |p: u8| open as u128 * 100 >= limit as u128 * p as u128;
        if let Some(level) = level(pct(c.fds_warn_pct), pct(c.fds_critical_pct)) {
            out.push(Finding {
                watched: Watched::Fds,
                level,
                text: format!("node {node}: {open} open file descriptors of a limit of {limit}"),
            });
        }
    }
    out
}

/// Where a node's resources live.
#[derive(Clone, Debug)]
pub struct Places {
    pub data_dir: PathBuf,
    /// The Raft store's directory (voters only).
    pub raft_dir: Option<PathBuf>,
    /// The SQLite store file, if the store is SQLite.
    pub store_file: Option<PathBuf>,
}

/// Reads one sample. `previous` gives the store's growth rate.
pub fn sample(p: &Places, previous: Option<(&Sample, f64)>) -> Sample {
    let mut s = Sample::default();
    let mut devices = Vec::new();
    let store_dir = p
        .store_file
        .as_ref()
        .and_then(|f| f.parent().map(Path::to_path_buf));
    let dirs = [
        (Watched::DataDisk, Some(p.data_dir.clone())),
        (Watched::RaftDisk, p.raft_dir.clone()),
        (Watched::StoreDisk, store_dir),
    ];
    for (watched, dir) in dirs {
        let Some(dir) = dir else { continue };
        match disk(watched, &dir) {
            Ok((dev, d)) if !devices.contains(&dev) => {
                devices.push(dev);
                s.disks.push(d);
            }
            Ok(_) => {}
            Err(e) => note(&mut s, format!("statvfs {}: {e}", dir.display())),
        }
    }
    if let Some(dir) = &p.raft_dir {
        s.raft_store = dir_bytes(dir).map(|b| (dir.clone(), b));
    }
    if let Some(f) = &p.store_file {
        s.store = file_bytes(f).map(|b| (f.clone(), b));
    }
    if let (Some((prev, secs)), Some((_, now))) = (previous, &s.store) {
        if let (Some((_, before)), true) = (&prev.store, secs > 0.0) {
            s.store_growth_bytes_per_s = Some((*now as f64 - *before as f64) / secs);
        }
    }
    fds(&mut s);
    s
}

fn note(s: &mut Sample, e: String) {
    if s.errors.len() < MAX_ERRORS {
        s.errors.push(e);
    }
}

fn disk(watched: Watched, dir: &Path) -> std::io::Result<(u64, Disk)> {
    let st = rustix::fs::stat(dir)?;
    let v = rustix::fs::statvfs(dir)?;
    Ok((
        st.st_dev,
        Disk {
            watched,
            path: dir.to_path_buf(),
            free_bytes: v.f_bavail.saturating_mul(v.f_frsize),
            total_bytes: v.f_blocks.saturating_mul(v.f_frsize),
        },
    ))
}

/// Bytes of the regular files directly in `dir` (the Raft store is flat).
fn dir_bytes(dir: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .take(10_000)
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
    )
}

/// A SQLite store is its file plus its write-ahead log.
fn file_bytes(f: &Path) -> Option<u64> {
    let main = std::fs::metadata(f).ok()?.len();
    let wal = std::fs::metadata(f.with_extension("db-wal")).map_or(0, |m| m.len());
    Some(main + wal)
}

/// How long one count of the process's open descriptors stands for every
/// node the process hosts. The fd table belongs to the process: counting it
/// once per node made 1,000 in-process nodes (`bench startup --inproc`)
/// list a table of ~10,000 entries 1,000 times a second, which starved the
/// voters' Raft until leadership churned and start-up never began.
const FD_COUNT_REUSE_MS: u64 = 500;

/// The last count of `/proc/self/fd`: (taken at, in ms; count).
static FD_COUNT: std::sync::Mutex<Option<(u64, u64)>> = std::sync::Mutex::new(None);

fn fds(s: &mut Sample) {
    let now = crate::clock::now_ms();
    let mut last = FD_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    match *last {
        Some((at, n)) if now.abs_diff(at) < FD_COUNT_REUSE_MS => s.open_fds = Some(n),
        _ => match std::fs::read_dir("/proc/self/fd") {
            // Bounded by the limit itself (at most 1 M entries).
            Ok(rd) => {
                let n = rd.take(1 << 20).count() as u64;
                *last = Some((now, n));
                s.open_fds = Some(n);
            }
            Err(e) => note(s, format!("/proc/self/fd: {e}")),
        },
    }
    s.fd_limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
}

/// The watcher: samples every `check_interval_ms`, keeps one alarm per
/// watched resource (raised when a level is entered, cleared when left),
/// publishes the sample for `/status` and `/metrics`, and on a voter keeps
/// its Raft core ([`crate::voter::CoreKeeper`]).
pub(crate) async fn watch(node: Arc<Inner>) {
    let every = Duration::from_millis(node.cfg.resources.check_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let places = places(&node.cfg);
    let mut levels: BTreeMap<Watched, Level> = BTreeMap::new();
    let mut keeper = crate::voter::CoreKeeper::default();
    let mut prev: Option<(Sample, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let p = places.clone();
        let before = prev
            .as_ref()
            .map(|(s, at)| (s.clone(), at.elapsed().as_secs_f64()));
        let taken = tokio::task::spawn_blocking(move || {
            sample(&p, before.as_ref().map(|(s, secs)| (s, *secs)))
        })
        .await;
        let Ok(s) = taken else { continue };
        let found = assess(node.cfg.node_id, &s, &node.cfg.resources);
        alarms(&node, &found, &mut levels);
        if node.control_plane().is_some() {
            keep_core(&node, &mut keeper, &s, &found).await;
        }
        node.set_resources(s.clone(), found, keeper.down_reason());
        prev = Some((s, tokio::time::Instant::now()));
    }
}

fn places(cfg: &crate::NodeConfig) -> Places {
    let store = cfg.store_config();
    Places {
        data_dir: cfg.data_dir.clone(),
        raft_dir: cfg.me().role.is_voter().then(|| cfg.data_dir.join("raft")),
        store_file: match store.backend {
            orrery_store::BackendKind::Sqlite => store.path,
            _ => None,
        },
    }
}

fn alarms(node: &Inner, found: &[Finding], levels: &mut BTreeMap<Watched, Level>) {
    for f in found {
        let key = AlarmKey::Resource(f.watched);
        let severity = match f.level {
            Level::Warning => "warning",
            Level::Critical => "CRITICAL",
        };
        let text = format!("resource {severity}: {}", f.text);
        match levels.insert(f.watched, f.level) {
            Some(l) if l == f.level => {
                node.contacts.update_alarm(key, text);
            }
            _ => raise(node, key, text),
        }
    }
    levels.retain(|w, _| {
        let still = found.iter().any(|f| f.watched == *w);
        if !still && node.contacts.clear_alarm(AlarmKey::Resource(*w)) {
            info!(target: LOG, "resource back within its thresholds: {}", w.name());
        }
        still
    });
}

/// One tick of the voter's core keeper: observe, decide, act.
async fn keep_core(
    node: &Inner,
    keeper: &mut crate::voter::CoreKeeper,
    s: &Sample,
    found: &[Finding],
) {
    use crate::voter::{Observed, Step};
    let Some(control) = node.control_plane() else {
        return;
    };
    let raft_own_disk = s.disks.iter().any(|d| d.watched == Watched::RaftDisk);
    let critical_disk = found
        .iter()
        .find(|f| {
            f.level == Level::Critical
                && (f.watched == Watched::RaftDisk
                    || (f.watched == Watched::DataDisk && !raft_own_disk))
        })
        .map(|f| f.text.clone());
    let health = control.health();
    let observed = Observed {
        running: health.is_ok(),
        error: health.err().map(|e| e.to_string()),
        critical_disk,
    };
    let me = node.cfg.node_id;
    for step in keeper.on(crate::clock::now_ms(), &observed) {
        match step {
            Step::Stop { reason } => {
                error!(target: LOG, "stopping this voter's Raft core: {reason}");
                if let Err(e) = control.stop_core().await {
                    warn!(target: LOG, "stopping the Raft core: {e}");
                }
            }
            Step::Alarm { text } => {
                let what = format!("voter {me} takes no part in the control plane: {text}; its Raft core restarts by itself once the cause is gone");
                error!(target: LOG, "{what}");
                raise(node, AlarmKey::VoterDown, what);
            }
            Step::Restart => match control.restart().await {
                Ok(()) => info!(target: LOG, "Raft core restarted"),
                Err(e) => warn!(target: LOG, "Raft core restart failed: {e}"),
            },
            Step::Recovered { down_ms } => {
                node.contacts.clear_alarm(AlarmKey::VoterDown);
                info!(target: LOG, "voter {me} is back in the control plane after {down_ms} ms");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_sample(free: u64, total: u64) -> Sample {
        Sample {
            disks: vec![Disk {
                watched: Watched::RaftDisk,
                path: "/d/raft".into(),
                free_bytes: free,
                total_bytes: total,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_filling_disk_warns_then_turns_critical_naming_node_and_path() {
        let c = ResourcesConfig::default();
        assert!(assess(3, &disk_sample(100 * GIB, 200 * GIB), &c).is_empty());
        let w = assess(3, &disk_sample(200 * MIB, 2 * GIB), &c);
        assert_eq!(w[0].level, Level::Warning);
        let f = assess(3, &disk_sample(0, 32 * MIB), &c);
        assert_eq!(f[0].level, Level::Critical);
        assert!(
            f[0].text.contains("node 3") && f[0].text.contains("/d/raft"),
            "{}",
            f[0].text
        );
    }

    #[test]
    fn percent_thresholds_apply_to_small_filesystems() {
        let c = ResourcesConfig {
            disk_warn_free_bytes: 0,
            disk_critical_free_bytes: 0,
            disk_warn_free_pct: 20,
            disk_critical_free_pct: 10,
            ..Default::default()
        };
        assert!(assess(1, &disk_sample(50, 100), &c).is_empty());
        assert_eq!(
            assess(1, &disk_sample(15, 100), &c)[0].level,
            Level::Warning
        );
        assert_eq!(
            assess(1, &disk_sample(9, 100), &c)[0].level,
            Level::Critical
        );
        // A filesystem reporting no size gives no verdict (and no division error).
        assert_eq!(assess(1, &disk_sample(0, 0), &c).len(), 0);
    }

    #[test]
    fn sizes_and_descriptors_past_their_thresholds_are_found() {
        let c = ResourcesConfig::default();
        let s = Sample {
            raft_store: Some(("/d/raft".into(), 5 * GIB)),
            store: Some(("/d/store.db".into(), 17 * GIB)),
            open_fds: Some(900),
            fd_limit: Some(1_000),
            ..Default::default()
        };
        let f = assess(2, &s, &c);
        let by = |w| f.iter().find(|x| x.watched == w).map(|x| x.level);
        assert_eq!(by(Watched::RaftStore), Some(Level::Critical));
        assert_eq!(by(Watched::Store), Some(Level::Warning));
        assert_eq!(by(Watched::Fds), Some(Level::Warning));
        // No limit known: no verdict, not a division by zero.
        let s = Sample {
            open_fds: Some(900),
            fd_limit: Some(0),
            ..Default::default()
        };
        assert!(assess(2, &s, &c).is_empty());
    }

    #[test]
    fn thresholds_in_the_wrong_order_are_refused() {
        let c = ResourcesConfig {
            disk_critical_free_bytes: GIB,
            disk_warn_free_bytes: MIB,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("disk_*_free_bytes"));
        assert!(ResourcesConfig::default().validate().is_ok());
    }

    #[test]
    fn a_real_sample_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let p = Places {
            data_dir: dir.path().to_path_buf(),
            raft_dir: Some(dir.path().to_path_buf()),
            store_file: None,
        };
        let s = sample(&p, None);
        assert_eq!(s.disks.len(), 1, "one filesystem, counted once: {s:?}");
        assert!(s.disks[0].total_bytes > 0);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.fd_limit.is_some());
    }
}
