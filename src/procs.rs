//! Real `orrery node` processes of a local cluster: start, signal, kill,
//! stop. `orrery up`, `orrery bench detection` and the integration tests
//! all run nodes through this one type.
//!
//! It owns the child processes and nothing else; it must never wait without
//! a bound (stopping gives each node [`STOP_GRACE`] before killing it).
#![allow(clippy::disallowed_methods)] // Process supervision measures real time.

use crate::local::Manifest;
use anyhow::{Context, Result};
use orrery_core::NodeId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a node gets to exit after SIGTERM before it is killed. On
/// SIGTERM a node leaves the cluster (drain, `Leave`: at most
/// `shutdown.drain_timeout_ms + shutdown.leave_timeout_ms`, 5 s by
/// default), then stops its control plane and admin port.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The running node processes of one local cluster.
pub struct NodeProcs {
    exe: PathBuf,
    data_dir: PathBuf,
    procs: BTreeMap<NodeId, Child>,
    env: Vec<(String, String)>,
}

impl NodeProcs {
    /// Nodes of the cluster laid out in `data_dir`, run with the `orrery`
    /// binary at `exe`.
    pub fn new(exe: impl Into<PathBuf>, data_dir: &Path) -> Self {
        NodeProcs {
            exe: exe.into(),
            data_dir: data_dir.to_owned(),
            procs: BTreeMap::new(),
            env: vec![],
        }
    }

    /// An environment variable for every node started from now on.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    /// The node's log file (stdout and stderr, appended).
    pub fn log_path(&self, id: NodeId) -> PathBuf {
        self.data_dir.join(format!("node-{id}")).join("node.log")
    }

    pub fn start(&mut self, id: NodeId) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .with_context(|| format!("cannot open node {id}'s log"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["node", "--config"])
            .arg(Manifest::node_config_path(&self.data_dir, id))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        self.procs.insert(id, child);
        Ok(())
    }

    pub fn start_all(&mut self, manifest: &Manifest) -> Result<()> {
        for n in &manifest.nodes {
            self.start(n.id)?;
        }
        Ok(())
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.procs.get(&id).map(|c| c.id())
    }

    pub fn running(&self) -> Vec<NodeId> {
        self.procs.keys().copied().collect()
    }

    /// SIGKILL: the process dies without a word.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (at most `within`) for node `id`'s process to exit and returns
    /// how; `None` if it is still running (or was never started).
    pub fn wait_exit(&mut self, id: NodeId, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let st = self.procs.get_mut(&id)?.try_wait().ok().flatten();
            if let Some(st) = st {
                self.procs.remove(&id);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name ("STOP", "CONT", "TERM") to node `id`.
    pub fn signal(&self, id: NodeId, sig: &str) -> Result<()> {
        let pid = self.procs.get(&id).context("node not running")?.id();
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(st.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// Nodes whose process has exited, with how.
    pub fn exited(&mut self) -> Vec<(NodeId, ExitStatus)> {
        self.procs
            .iter_mut()
            .filter_map(|(id, c)| c.try_wait().ok().flatten().map(|st| (*id, st)))
            .collect()
    }

    /// SIGTERM to every node, then wait up to [`STOP_GRACE`]; nodes still
    /// running are killed. Returns each node's exit status (None if killed).
    pub fn stop_all(&mut self) -> Vec<(NodeId, Option<ExitStatus>)> {
        for c in self.procs.values() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut out = vec![];
        for (id, mut c) in std::mem::take(&mut self.procs) {
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        out.push((id, Some(st)));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        out.push((id, None));
                        break;
                    }
                }
            }
        }
        out
    }
}

impl Drop for NodeProcs {
    fn drop(&mut self) {
        for c in self.procs.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
