//! `orrery backup`, `orrery restore` and `orrery bench backup` for a local
//! cluster: owns what a local cluster's backup holds besides the state and
//! the store (its layout: `cluster.toml`, `admin.token`, the CA, every
//! node's `node.toml` and credentials, under `config/`), laying a data
//! directory down again from a verified backup, and the backup lines of
//! `orrery status`. The format, writing and proving a backup are
//! `orrery_node::backup`'s.
//!
//! What it must never do: restore anything that was not first verified
//! (checksums, state digest, SQLite integrity, migrations, row counts)
//! from a scratch copy, write into a directory that holds a cluster (or a
//! running one), or restore the control plane's Raft log: a restored
//! cluster bootstraps a fresh control plane (see ARCHITECTURE.md, Backups).

use crate::local::{self, Manifest};
use anyhow::{bail, Context, Result};
use orrery_core::NodeId;
use orrery_node::backup::{self as nb, BackupManifest, Inputs, Verified};
use orrery_node::{NodeConfig, NodeStatus};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `orrery backup`.
#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The local cluster's data directory.
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Destination directory (default: node 1's `backup.dir`, else
    /// `DATA_DIR/node-1/backups`, where its scheduled backups go).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Keep only the newest N backups in the destination afterwards.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Admin token (else ORRERY_ADMIN_TOKEN, else DATA_DIR/admin.token).
    #[arg(long)]
    pub token: Option<String>,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `orrery restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The backup directory (`backup-<ms>-<index>`).
    #[arg(long)]
    pub from: PathBuf,
    /// Where to lay the cluster down: a new or empty directory for a
    /// backup taken by `orrery backup`; an existing, stopped local cluster
    /// (with --replace) for a scheduled one, which holds no layout.
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Only verify the backup (restore it into a scratch directory and
    /// check it); change nothing.
    #[arg(long)]
    pub check: bool,
    /// With a backup without layout: replace the store of the existing
    /// cluster in --data-dir (the old store and Raft stores are kept
    /// beside, as `*.before-restore-<ms>`).
    #[arg(long)]
    pub replace: bool,
}

/// The `[backup]` of node 1 of a local cluster (defaults if unreadable).
fn node1(data_dir: &Path, m: &Manifest) -> Option<NodeConfig> {
    let id = m.nodes.first()?.id;
    NodeConfig::load(&Manifest::node_config_path(data_dir, id)).ok()
}

/// `orrery backup`: the state (through a node's `GET /backup/state`), the
/// store (SQLite online backup), the layout; written, verified, summarised.
pub fn backup(args: BackupArgs) -> Result<()> {
    let d = &args.data_dir;
    let m = Manifest::load(d)?;
    let cfg = node1(d, &m);
    let bcfg = cfg.as_ref().map(|c| c.backup.clone()).unwrap_or_default();
    let dest = match (&args.to, &cfg) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => bcfg.dir_for(&c.data_dir),
        (None, None) => d.join("backups"),
    };
    let Some(token) = crate::exec::find_token(args.token.clone(), d) else {
        bail!("no admin token: pass --token, set ORRERY_ADMIN_TOKEN, or keep DATA_DIR/admin.token");
    };
    let (state, index) = fetch_state(&m, &token, bcfg.max_state_bytes)?;
    let store = Manifest::store_path(d);
    let inputs = Inputs {
        cluster_id: m.cluster_id.clone(),
        taken_by: "orrery backup".into(),
        source_data_dir: Some(d.canonicalize()?),
        state,
        store: store.exists().then_some(store),
        extra: layout_files(d, &m)?,
        busy_timeout: Duration::from_millis(cfg.as_ref().map_or(5000, |c| c.store.busy_timeout_ms)),
        scratch: bcfg.scratch(),
        max_state_bytes: bcfg.max_state_bytes,
    };
    let r = nb::take(&dest, &inputs)
        .with_context(|| format!("the backup to {} failed", dest.display()))?;
    if let Some(keep) = args.keep {
        for p in nb::prune(&dest, keep)? {
            println!("removed the old backup {}", p.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r.manifest)?);
    } else {
        print!("{}", summary(&r.manifest, &r.dir));
        println!(
            "verified: restored into a scratch directory and checked; written in {} ms, checked in {} ms (state read at index {index})",
            r.write_ms, r.verify_ms
        );
    }
    Ok(())
}

/// The replicated state as one node's `GET /backup/state` answers it,
/// checked against the digest it sends: (postcard bytes, applied index).
fn fetch_state(m: &Manifest, token: &str, max: u64) -> Result<(Vec<u8>, u64)> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut why = vec![];
    for (id, addr) in m.admin_addrs() {
        let r = match agent
            .get(&format!("http://{addr}/backup/state"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let e = r
                    .into_json::<orrery_node::admin::ConsoleAnswer>()
                    .ok()
                    .and_then(|a| a.error)
                    .unwrap_or_default();
                why.push(format!("node {id}: {code} {e}"));
                continue;
            }
            Err(e) => {
                why.push(format!("node {id}: {e}"));
                continue;
            }
        };
        let digest = r.header("x-orrery-state-digest").unwrap_or("").to_string();
        let index = r
            .header("x-orrery-applied-index")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut bytes = vec![];
        r.into_reader().take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            bail!("node {id}'s state is over backup.max_state_bytes = {max}");
        }
        if nb::digest_hex(&bytes) != digest {
            bail!("node {id}'s state does not match the digest it sent ({digest})");
        }
        return Ok((bytes, index));
    }
    bail!("no node gave its state: {}", why.join("; "))
}

/// The layout files of a local cluster, as (name in the backup, path).
fn layout_files(d: &Path, m: &Manifest) -> Result<Vec<(String, PathBuf)>> {
    let mut out = vec![
        ("config/cluster.toml".into(), Manifest::path(d)),
        ("config/admin.token".into(), Manifest::token_path(d)),
    ];
    let mut dirs = vec![("config/ca".to_string(), Manifest::ca_path(d))];
    for n in &m.nodes {
        let cfg = NodeConfig::load(&Manifest::node_config_path(d, n.id))
            .with_context(|| format!("node {}'s config", n.id))?;
        out.push((
            format!("config/node-{}/node.toml", n.id),
            Manifest::node_config_path(d, n.id),
        ));
        dirs.push((format!("config/node-{}/tls", n.id), cfg.tls_dir()));
    }
    for (prefix, dir) in dirs {
        let rd =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for e in rd {
            let e = e?;
            if e.file_type()?.is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.push((format!("{prefix}/{name}"), e.path()));
            }
        }
    }
    Ok(out.into_iter().filter(|(_, p)| p.exists()).collect())
}

/// A manifest for a person.
pub fn summary(m: &BackupManifest, dir: &Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "backup {}", dir.display());
    let _ = writeln!(
        s,
        "  cluster {}, taken by {} at {} ms, orrery {}",
        m.cluster_id, m.taken_by, m.created_at_ms, m.orrery_version
    );
    let _ = writeln!(
        s,
        "  control plane: applied index {}, state digest {}",
        m.applied_index, m.state_digest
    );
    if let Some(st) = &m.store {
        let rows: Vec<String> = st
            .row_counts
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "  store: {} schema v{}, rows: {}; data digest {}, job output digest {}",
            st.backend,
            st.schema_version,
            rows.join(", "),
            st.data_digest,
            st.job_digest
        );
    }
    let _ = writeln!(s, "  {} files, {} bytes", m.files.len(), m.total_bytes());
    s
}

/// `orrery restore`: verified first, from a scratch copy; then laid down.
pub fn restore(args: RestoreArgs) -> Result<()> {
    let scratch = nb::BackupConfig::default();
    let v =
        nb::verify(&args.from, &scratch.scratch(), scratch.max_state_bytes).with_context(|| {
            format!(
                "{} is not a good backup; nothing was restored or changed",
                args.from.display()
            )
        })?;
    print!("{}", summary(&v.manifest, &args.from));
    println!("verified: every checksum, the state digest, the store's integrity, migrations and row counts");
    if args.check {
        return Ok(());
    }
    let d = &args.data_dir;
    if v.manifest.file("config/cluster.toml").is_some() {
        restore_layout(&v, d)?;
    } else {
        restore_store_only(&v, d, args.replace)?;
    }
    let m = Manifest::load(d)?;
    let voters = m.nodes.iter().filter(|n| n.role.is_voter()).count();
    let arbiters = m
        .nodes
        .iter()
        .filter(|n| n.role == orrery_core::Role::Arbiter)
        .count();
    let demo = node1(d, &m).is_some_and(|c| !c.app.contains_key("universe"));
    println!(
        "restored into {}: start it with `orrery up --data-dir {} --nodes {} --voters {voters}{}{}`",
        d.display(),
        d.display(),
        m.nodes.len(),
        if arbiters > 0 { format!(" --arbiters {arbiters}") } else { String::new() },
        if demo { " --demo" } else { "" }
    );
    println!("the control plane starts fresh (new boot, epochs and timeline); the store's fences were reset for it");
    for (node, floor) in &v.state.cert_floor {
        println!("note: node {node}'s certificates below serial {floor} were revoked: run `cert revoke {node} {floor}` on a voter's console again");
    }
    Ok(())
}

/// Lays a whole local cluster down in `d` (new or empty) from the
/// backup's layout, paths moved from the source directory to `d`.
fn restore_layout(v: &Verified, d: &Path) -> Result<()> {
    let not_empty = std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some());
    if not_empty {
        bail!(
            "{} is not empty: restore into a new or empty directory (nothing was changed)",
            d.display()
        );
    }
    let Some(old) = v.manifest.source_data_dir.clone() else {
        bail!("the backup names no source data directory to move paths from");
    };
    let _lock = local::lock_for_up(d)?;
    let new = d.canonicalize()?;
    for f in &v.manifest.files {
        let Some(rel) = f.name.strip_prefix("config/") else {
            continue;
        };
        let dst = new.join(rel);
        if let Some(parent) = dst.parent() {
            orrery_node::private::private_dir(parent)?;
        }
        let src = v.path(&f.name);
        let bytes = if rel.ends_with("/node.toml") {
            rebased_node_config(&src, &old, &new)?.into_bytes()
        } else {
            std::fs::read(&src)?
        };
        orrery_node::private::write_private(&dst, &bytes)
            .with_context(|| format!("cannot write {}", dst.display()))?;
    }
    place_store(v, &Manifest::store_path(&new))?;
    local::harden(&new, &Manifest::load(&new)?)
}

/// A node's config with every path under `old` moved under `new`.
fn rebased_node_config(src: &Path, old: &Path, new: &Path) -> Result<String> {
    let rebase = |p: &Path| match p.strip_prefix(old) {
        Ok(rest) => new.join(rest),
        Err(_) => p.to_path_buf(),
    };
    let mut cfg = NodeConfig::load(src).context("a node config in the backup")?;
    cfg.data_dir = rebase(&cfg.data_dir);
    cfg.store.path = cfg.store.path.as_deref().map(rebase);
    cfg.tls.dir = cfg.tls.dir.as_deref().map(rebase);
    cfg.backup.dir = cfg.backup.dir.as_deref().map(rebase);
    orrery_node::private::private_dir(&cfg.data_dir)?;
    Ok(toml::to_string(&cfg)?)
}

/// Copies the verified store to `dst` (must not exist), resets its fences
/// and checks it once more where it lies.
fn place_store(v: &Verified, dst: &Path) -> Result<()> {
    let Some(expected) = &v.manifest.store else {
        println!("the backup holds no store: the cluster starts with an empty one");
        return Ok(());
    };
    std::fs::copy(v.path(nb::STORE_FILE), dst)
        .with_context(|| format!("cannot write {}", dst.display()))?;
    orrery_node::private::restrict_file(dst)?;
    let (shards, jobs) = orrery_store::backup::reset_fences(dst)?;
    let got = orrery_store::backup::inspect_sqlite(dst)?;
    if got.row_counts != expected.row_counts
        || got.data_digest != expected.data_digest
        || got.job_digest != expected.job_digest
    {
        bail!(
            "the restored store {} differs from the backup's (rows {:?}, digest {})",
            dst.display(),
            got.row_counts,
            got.data_digest
        );
    }
    println!(
        "store restored to {}: rows and data digest as the manifest says; {shards} shard fences and {jobs} job fences reset for the fresh control plane",
        dst.display()
    );
    Ok(())
}

/// A backup without layout (a scheduled one) into the existing, stopped
/// local cluster in `d`: its store is replaced, its Raft stores set aside.
fn restore_store_only(v: &Verified, d: &Path, replace: bool) -> Result<()> {
    let m = Manifest::load(d)
        .context("a backup without layout restores into an existing local cluster")?;
    if m.cluster_id != v.manifest.cluster_id {
        bail!(
            "{} holds cluster {}, the backup is of {} (nothing was changed)",
            d.display(),
            m.cluster_id,
            v.manifest.cluster_id
        );
    }
    if !replace {
        bail!("this backup holds no layout: pass --replace to replace the store of the cluster in {} (nothing was changed)", d.display());
    }
    let _lock = local::lock_for_up(d)?;
    let stamp = orrery_node::clock::now_ms();
    let store = Manifest::store_path(d);
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", store.display()));
        if p.exists() {
            std::fs::rename(&p, format!("{}.before-restore-{stamp}", p.display()))?;
        }
    }
    for n in &m.nodes {
        let raft = d.join(format!("node-{}", n.id)).join("raft");
        if raft.exists() {
            std::fs::rename(
                &raft,
                raft.with_extension(format!("before-restore-{stamp}")),
            )?;
        }
    }
    place_store(v, &store)
}

/// The backup lines of `orrery status` (one per node running the scheduled
/// backup, and one per alarm in force); `true` if any alarm is in force.
pub fn status_lines(nodes: &[(NodeId, Option<NodeStatus>)], now: u64) -> (Vec<String>, bool) {
    let mut lines = vec![];
    let mut alarm = false;
    for (id, st) in nodes {
        let Some(b) = st.as_ref().and_then(|s| s.backup.as_ref()) else {
            continue;
        };
        if let Some(a) = b.alarm() {
            alarm = true;
            lines.push(format!("ALARM node {id}: {a}"));
        } else if b.runner {
            let last = match b.last_success_age_s(now) {
                Some(age) => format!("last good backup {age:.0} s ago"),
                None => "no backup yet".into(),
            };
            lines.push(format!(
                "backup: node {id} backs up to {} every {} s; {last}",
                b.dir,
                b.period_ms / 1000
            ));
        }
    }
    (lines, alarm)
}

/// `orrery bench backup`: a universe of `systems` systems imported into a
/// fresh store, then backed up (online copy + verification) and restored
/// (verification + copy); prints times and sizes.
pub fn bench(systems: usize, runs: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("store.db");
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(&store_path))?;
    let u = orrery_universe::generate(1, orrery_universe::Sizes::for_systems(systems))?;
    orrery_universe::import(&*store, &u)?;
    drop(store);
    let state = orrery_core::ClusterState::default();
    let inputs = Inputs {
        cluster_id: "bench".into(),
        taken_by: "orrery bench backup".into(),
        source_data_dir: None,
        state: nb::encode_state(&state)?,
        store: Some(store_path.clone()),
        extra: vec![],
        busy_timeout: Duration::from_secs(5),
        scratch: dir.path().to_path_buf(),
        max_state_bytes: 1 << 30,
    };
    let db_bytes = std::fs::metadata(&store_path)?.len();
    println!(
        "universe: {systems} systems, {} campaigns; store {db_bytes} bytes",
        u.campaigns.len()
    );
    println!(
        "{:>4} {:>10} {:>10} {:>12} {:>12}",
        "run", "write ms", "verify ms", "restore ms", "backup bytes"
    );
    for run in 1..=runs {
        let r = nb::take(&dir.path().join("backups"), &inputs)?;
        let t = orrery_node::clock::now_ms();
        let v = nb::verify(&r.dir, dir.path(), 1 << 30)?;
        let dst = dir.path().join(format!("restored-{run}.db"));
        std::fs::copy(v.path(nb::STORE_FILE), &dst)?;
        orrery_store::backup::reset_fences(&dst)?;
        let restore_ms = orrery_node::clock::now_ms().saturating_sub(t);
        println!(
            "{run:>4} {:>10} {:>10} {restore_ms:>12} {:>12}",
            r.write_ms,
            r.verify_ms,
            r.manifest.total_bytes()
        );
    }
    Ok(())
}
