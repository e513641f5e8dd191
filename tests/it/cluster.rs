//! A local cluster of real `orrery node` processes for tests, laid out by
//! the same code as `orrery up` (orrery::local). Tests wait for events (the
//! replicated state reaching a condition, a log line appearing) with bounded
//! timeouts; nothing sleeps for correctness.

use orrery::local::{self, AdminClient, Manifest, Plan};
use orrery::procs::NodeProcs;
use orrery_core::{ClusterState, NodeId};
use orrery_node::config::NodeConfig;
use orrery_node::NodeStatus;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, MutexGuard};

/// Real-process clusters run one at a time: the machine has 2 cores and
/// Raft timeouts are real.
pub static SERIAL: Mutex<()> = Mutex::const_new(());

pub const BIN: &str = env!("CARGO_BIN_EXE_orrery");

pub struct TestCluster {
    _serial: MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub manifest: Manifest,
    procs: NodeProcs,
    client: AdminClient,
}

impl TestCluster {
    /// Writes a cluster's configuration; `tweak` adjusts the plan first.
    pub fn new(nodes: u64, voters: u64, tweak: impl FnOnce(&mut Plan)) -> Self {
        let serial = SERIAL.blocking_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut plan = Plan::new(nodes, voters, dir.path());
        tweak(&mut plan);
        let manifest = local::prepare(&plan).expect("prepare cluster");
        let procs = NodeProcs::new(BIN, dir.path());
        TestCluster {
            _serial: serial,
            dir,
            manifest,
            procs,
            client: AdminClient::default(),
        }
    }

    pub fn config_path(&self, id: NodeId) -> PathBuf {
        Manifest::node_config_path(self.dir.path(), id)
    }

    /// Edits one node's configuration file.
    pub fn edit_config(&self, id: NodeId, f: impl FnOnce(&mut NodeConfig)) {
        let path = self.config_path(id);
        let mut cfg = NodeConfig::load(&path).expect("load node config");
        f(&mut cfg);
        std::fs::write(&path, toml::to_string(&cfg).expect("encode")).expect("write config");
    }

    pub fn start_all(&mut self) {
        self.procs.start_all(&self.manifest).expect("start nodes");
    }

    /// Starts (or restarts, after `kill`) node `id`'s process.
    pub fn start(&mut self, id: NodeId) {
        self.procs.start(id).expect("start node");
    }

    /// SIGKILL: the process dies without a word.
    pub fn kill(&mut self, id: NodeId) {
        self.procs.kill(id);
    }

    /// SIGTERM to node `id`; it must exit cleanly within the grace period.
    pub fn stop(&mut self, id: NodeId) {
        self.signal(id, "TERM");
        let st = self.procs.wait_exit(id, orrery::procs::STOP_GRACE);
        assert!(
            st.is_some_and(|s| s.success()),
            "node {id} did not stop cleanly on SIGTERM: {st:?}"
        );
    }

    /// Waits (bounded) for node `id` to exit by itself; returns how.
    pub fn wait_exit(&mut self, id: NodeId, within: Duration) -> std::process::ExitStatus {
        self.procs
            .wait_exit(id, within)
            .unwrap_or_else(|| panic!("node {id} still running after {within:?}"))
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.procs.pid(id)
    }

    /// Sends a signal (e.g. "STOP", "CONT") to node `id`'s process.
    pub fn signal(&self, id: NodeId, sig: &str) {
        self.procs.signal(id, sig).expect("signal");
    }

    /// SIGTERM to all; every node must exit cleanly within the grace period.
    pub fn stop_all(&mut self) {
        for (id, st) in self.procs.stop_all() {
            match st {
                Some(st) => assert!(st.success(), "node {id} exited with {st} on SIGTERM"),
                None => panic!(
                    "node {id} did not stop within {:?} of SIGTERM",
                    orrery::procs::STOP_GRACE
                ),
            }
        }
    }

    pub fn state(&self) -> Option<ClusterState> {
        self.client.cluster_state(&self.manifest).ok()
    }

    pub fn node_status(&self, id: NodeId) -> Option<NodeStatus> {
        let addr = &self.manifest.nodes.iter().find(|n| n.id == id)?.admin_addr;
        self.client.node_status(addr).ok()
    }

    /// Polls the replicated state until `pred` holds; panics with the last
    /// state as `orrery status` renders it after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClusterState) -> bool,
    ) -> ClusterState {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.state() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let shown = last
            .map(|s| {
                local::render_status(&s, &[], orrery_node::clock::now_ms())
                    + &format!("{:#?}", s.events)
            })
            .unwrap_or_else(|| "no node answered".into());
        panic!(
            "timed out after {timeout:?} waiting for {what}:\n{shown}\nlogs:\n{}",
            self.all_logs()
        );
    }

    /// Waits until `pred` holds for a node's own status.
    pub fn wait_node(
        &self,
        id: NodeId,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&NodeStatus) -> bool,
    ) -> NodeStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.node_status(id) {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out after {timeout:?} waiting for node {id}: {what}; last status {last:#?}");
    }

    pub fn log(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.procs.log_path(id)).unwrap_or_default()
    }

    /// Waits until node `id`'s log contains `needle`.
    pub fn wait_log(&self, id: NodeId, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let log = self.log(id);
            if log.contains(needle) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node {id}'s log never said {needle:?}:\n{}", self.log(id));
    }

    fn all_logs(&self) -> String {
        self.manifest
            .nodes
            .iter()
            .map(|n| {
                let log = self.log(n.id);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- node {} ---\n{}",
                    n.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs the real `orrery status` against this cluster.
    pub fn status_command(&self) -> String {
        self.status_command_with(&[])
    }

    /// The real `orrery status` and its exit code (2 while a critical
    /// alarm nobody acknowledged is in force, e.g. no quorum).
    pub fn status_with_code(&self) -> (Option<i32>, String) {
        let out = Command::new(BIN)
            .args(["status", "--data-dir"])
            .arg(self.dir.path())
            .output()
            .expect("run orrery status");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `orrery status` with extra arguments (e.g. `--shards`).
    pub fn status_command_with(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["status", "--data-dir"])
            .arg(self.dir.path())
            .args(args)
            .output()
            .expect("run orrery status");
        assert!(
            out.status.success(),
            "orrery status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }
}

impl TestCluster {
    /// Runs the real `orrery exec` against this cluster: (exit ok, stdout, stderr).
    pub fn exec(&self, opts: &[&str], command: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(["exec", "--data-dir"])
            .arg(self.dir.path())
            .args(opts)
            .arg("--")
            .args(command)
            .env_remove("ORRERY_ADMIN_TOKEN")
            .output()
            .expect("run orrery exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `orrery exec --json`: each node's answer.
    pub fn exec_json(&self, opts: &[&str], command: &[&str]) -> Vec<serde_json::Value> {
        let mut o = vec!["--json"];
        o.extend_from_slice(opts);
        let (_, out, err) = self.exec(&o, command);
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap_or_else(|e| panic!("exec --json printed no JSON ({e}): {out} {err}"))
    }

    /// The local cluster's admin token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(Manifest::token_path(self.dir.path()))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    pub fn admin_addr(&self, id: NodeId) -> String {
        self.manifest
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node")
            .admin_addr
            .clone()
    }
}

/// The details of the replicated events of one kind, oldest first.
pub fn events(s: &ClusterState, kind: orrery_core::EventKind) -> Vec<String> {
    s.events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.detail.clone())
        .collect()
}

/// A state as `orrery status` shows it, plus every event: for failure messages.
pub fn show(s: Option<ClusterState>) -> String {
    s.map(|s| local::render_status(&s, &[], 0) + &format!("{:#?}", s.events))
        .unwrap_or_else(|| "no state".into())
}

/// A tmpfs mounted for a test (a real filesystem that really fills; it
/// needs root, as `.ci/run` has), unmounted lazily when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mkdir");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs `mount -t tmpfs` (root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
