//! `orrery drill`: failover drills on a local cluster, on demand.
//! `drill leader` hands Raft leadership to another voter and back, timing
//! each hand-over; `drill node N` drains node N, stops it, restarts it and
//! times its readmission and its shards coming back; `drill history` lists
//! past drills from the timeline, where every drill records its result.
//!
//! It owns the drills' preconditions and records as pure functions
//! ([`leader_pair`], [`node_drill_check`], [`history`]) over what
//! [`crate::roll::Observer`] reads, and the steps of each drill. It must
//! never start a drill on an unhealthy cluster or one that stopping a node
//! would leave without a quorum (it says why instead), and never wait
//! without a bound.
#![allow(clippy::disallowed_methods)] // Drills time real hand-overs.

use crate::exec;
use crate::roll::{keeps_quorum, unhealthy, ClusterObs, Observer, Verdict, Watch};
use anyhow::{bail, Result};
use orrery_core::{Event, EventKind, NodeId};
use std::path::PathBuf;
use std::time::Duration;

/// `orrery drill ...`.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum DrillCmd {
    /// Hand Raft leadership to another voter and back, timing each.
    Leader(LeaderArgs),
    /// Drain node N, stop it, restart it: time its readmission and its
    /// shards coming back.
    Node(NodeArgs),
    /// Back the cluster up into a scratch directory, then restore that
    /// backup into another and check it (`orrery restore --check`): timed,
    /// the outcome in the timeline. Nothing of the cluster changes.
    Backup(BackupDrillArgs),
    /// Past drills, from the timeline.
    History(HistoryArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct BackupDrillArgs {
    /// Where the drill's backup goes (default: a temporary directory,
    /// removed afterwards).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// What every drill needs.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Admin token (else ORRERY_ADMIN_TOKEN, else DATA_DIR/admin.token).
    #[arg(long)]
    pub token: Option<String>,
    /// How long each step may take.
    #[arg(long, default_value_t = 60)]
    pub step_timeout_s: u64,
    /// How long the cluster must stay healthy after each step.
    #[arg(long, default_value_t = 1_000)]
    pub stable_ms: u64,
    /// How often the nodes are polled, in ms.
    #[arg(long, default_value_t = 50)]
    pub poll_ms: u64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LeaderArgs {
    /// The voter to hand leadership to (default: the lowest-numbered other
    /// voter that hosts services, else any other voter).
    #[arg(long)]
    pub to: Option<NodeId>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    pub node: NodeId,
    /// How long the node gets to leave and exit when stopped.
    #[arg(long, default_value_t = 15)]
    pub stop_timeout_s: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Clone, Debug)]
pub struct HistoryArgs {
    #[arg(long, default_value = "orrery-data")]
    pub data_dir: PathBuf,
    /// Print the records as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The timeline's name for each drill (`Command::Operation`'s `what`).
pub const LEADER: &str = "drill-leader";
pub const NODE: &str = "drill-node";
pub const BACKUP: &str = "drill-backup";

/// Who leads now and who takes over: refused (with the reason) on an
/// unhealthy cluster, without another voter, or for a `to` that is not one.
pub fn leader_pair(obs: &ClusterObs, to: Option<NodeId>) -> Result<(NodeId, NodeId), String> {
    if let Some(why) = unhealthy(obs) {
        return Err(format!("the cluster is not healthy: {why}"));
    }
    let from = obs.leader.ok_or("the cluster has no leader")?;
    let others: Vec<_> = obs
        .nodes
        .iter()
        .filter(|n| n.voter && n.id != from)
        .collect();
    let to = match to {
        Some(t) if t == from => return Err(format!("node {t} already leads")),
        Some(t) if !others.iter().any(|n| n.id == t) => {
            return Err(format!("node {t} is not a voter: only voters can lead"))
        }
        Some(t) => t,
        None => others
            .iter()
            .find(|n| n.hosts)
            .or(others.first())
            .map(|n| n.id)
            .ok_or_else(|| {
                format!("node {from} is the only voter: there is nobody to hand leadership to")
            })?,
    };
    Ok((from, to))
}

/// Whether node `node` may be drilled: a node of the cluster, the cluster
/// healthy, and a quorum left while it is down.
pub fn node_drill_check(obs: &ClusterObs, node: NodeId) -> Result<(), String> {
    if !obs.nodes.iter().any(|n| n.id == node) {
        let ids: Vec<String> = obs.nodes.iter().map(|n| n.id.to_string()).collect();
        return Err(format!(
            "unknown node {node}: the cluster has nodes {}",
            ids.join(",")
        ));
    }
    if let Some(why) = unhealthy(obs) {
        return Err(format!("the cluster is not healthy: {why}"));
    }
    keeps_quorum(obs, &[node])
}

/// A past drill, as the timeline recorded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DrillRecord {
    pub at: u64,
    pub drill: String,
    pub result: String,
}

/// The drills among the timeline's events, oldest first.
pub fn history(events: &[Event]) -> Vec<DrillRecord> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Operation)
        .filter_map(|e| {
            let (what, result) = e.detail.split_once(": ")?;
            what.starts_with("drill-").then(|| DrillRecord {
                at: e.at,
                drill: what.trim_start_matches("drill-").to_string(),
                result: result.to_string(),
            })
        })
        .collect()
}

pub fn render_history(records: &[DrillRecord]) -> String {
    use std::fmt::Write;
    if records.is_empty() {
        return "no drill in the timeline\n".into();
    }
    let mut out = format!("{:<24} {:<7} RESULT\n", "TIME (UTC)", "DRILL");
    for r in records {
        let _ = writeln!(
            out,
            "{:<24} {:<7} {}",
            exec::format_ms(r.at),
            r.drill,
            r.result
        );
    }
    out
}

/// `orrery drill ...`.
pub fn run(cmd: DrillCmd) -> Result<()> {
    match cmd {
        DrillCmd::Leader(a) => leader(a),
        DrillCmd::Node(a) => node(a),
        DrillCmd::Backup(a) => backup(a),
        DrillCmd::History(a) => {
            let fleet = exec::Fleet::local(&a.data_dir)?;
            let events = exec::fetch_timeline(&fleet, 0, Duration::from_secs(3))?;
            let records = history(&events);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                print!("{}", render_history(&records));
            }
            Ok(())
        }
    }
}

/// Records a drill's result (best effort: a refusal on a cluster without a
/// quorum cannot be recorded) and returns it as the command's outcome.
fn finish(
    o: &Observer,
    leader: Option<NodeId>,
    what: &str,
    outcome: Result<String, String>,
) -> Result<()> {
    let detail = match &outcome {
        Ok(s) => format!("ok: {s}"),
        Err(e) => e.clone(),
    };
    if let Err(e) = o.record(leader, what, &detail) {
        eprintln!("orrery: warning: not recorded in the timeline ({e:#})");
    }
    match outcome {
        Ok(s) => {
            println!("orrery: {what}: ok: {s}");
            Ok(())
        }
        Err(e) => bail!("{what}: {e}"),
    }
}

/// Waits (bounded) until `done` holds for a poll; its time in ms.
fn wait_until(
    o: &mut Observer,
    c: &Common,
    what: &str,
    mut done: impl FnMut(&ClusterObs) -> bool,
) -> Result<u64, String> {
    let t0 = o.now_ms();
    let deadline = t0 + c.step_timeout_s * 1000;
    loop {
        let obs = o.observe();
        if done(&obs) {
            return Ok(obs.at_ms.saturating_sub(t0));
        }
        if obs.at_ms >= deadline {
            let why = unhealthy(&obs).unwrap_or_else(|| "no trouble reported".into());
            return Err(format!("{what}: not within {} s ({why})", c.step_timeout_s));
        }
        std::thread::sleep(Duration::from_millis(c.poll_ms.max(10)));
    }
}

/// Waits until the cluster has been healthy for the stable time; in ms.
fn settle(o: &mut Observer, c: &Common, nodes: Vec<(NodeId, u64)>) -> Result<(Watch, u64), String> {
    let t0 = o.now_ms();
    let mut w = Watch::new(nodes, t0, c.step_timeout_s * 1000, c.stable_ms);
    let poll = Duration::from_millis(c.poll_ms.max(10));
    match o.watch(&mut w, poll, |_, _| {}) {
        Verdict::Stable => {
            let ms = w.stable_after().unwrap_or(0);
            Ok((w, ms))
        }
        Verdict::Failed(why) | Verdict::Waiting(why) => Err(why),
    }
}

/// One hand-over: asks the leader's console, then times until `to` leads
/// (its own report), coordinates (the replicated state names it) and the
/// cluster is healthy again.
fn hand_over(o: &mut Observer, c: &Common, from: NodeId, to: NodeId) -> Result<String, String> {
    let admin = o
        .manifest
        .nodes
        .iter()
        .find(|n| n.id == from)
        .map(|n| n.admin_addr.clone())
        .ok_or(format!("node {from} is not in the manifest"))?;
    let token = exec::find_token(c.token.clone(), &c.data_dir);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let args = ["leader", "transfer", &to.to_string()].map(String::from);
    let t0 = o.now_ms();
    match exec::run_one(&agent, &admin, token.as_deref(), &args) {
        exec::Outcome::Ok { .. } => {}
        exec::Outcome::Error(e) => return Err(format!("node {from} refused the hand-over: {e}")),
        exec::Outcome::Timeout => return Err(format!("node {from} did not answer the hand-over")),
    }
    let mut elected = None;
    let coord = wait_until(o, c, &format!("node {to} leading"), |obs| {
        let leads = obs.nodes.iter().any(|n| n.id == to && n.is_leader);
        if leads && elected.is_none() {
            elected = Some(obs.at_ms.saturating_sub(t0));
        }
        leads && obs.leader == Some(to)
    })?;
    let (_, healthy) = settle(o, c, vec![])?;
    let elected = elected.unwrap_or(coord);
    Ok(format!(
        "{from} -> {to} in {elected} ms (coordinating after {} ms, stable after {} ms more)",
        coord.max(elected),
        healthy
    ))
}

fn leader(a: LeaderArgs) -> Result<()> {
    let c = &a.common;
    let mut o = Observer::new(&c.data_dir, c.token.clone())?;
    let obs = o.observe();
    let (from, to) = match leader_pair(&obs, a.to) {
        Ok(p) => p,
        Err(why) => return finish(&o, obs.leader, LEADER, Err(format!("refused: {why}"))),
    };
    println!("orrery: drill leader: handing leadership {from} -> {to} and back");
    let there = hand_over(&mut o, c, from, to);
    let outcome = there.and_then(|there| {
        println!("orrery:   {there}");
        let back = hand_over(&mut o, c, to, from)?;
        println!("orrery:   {back}");
        Ok(format!("leadership {there}; back {back}"))
    });
    let outcome = outcome.map_err(|e| format!("failed: {e}"));
    let leader = o.observe().leader;
    finish(&o, leader, LEADER, outcome)
}

/// `drill backup`: refused on an unhealthy cluster; else backup, then a
/// restore check of exactly that backup, each timed.
fn backup(a: BackupDrillArgs) -> Result<()> {
    let c = &a.common;
    let mut o = Observer::new(&c.data_dir, c.token.clone())?;
    let obs = o.observe();
    if let Some(why) = unhealthy(&obs) {
        let why = format!("refused: the cluster is not healthy: {why}");
        return finish(&o, obs.leader, BACKUP, Err(why));
    }
    let temp = tempfile::tempdir()?;
    let dest = a
        .scratch
        .clone()
        .unwrap_or_else(|| temp.path().join("backups"));
    let outcome = backup_and_check(c, &dest).map_err(|e| format!("failed: {e:#}"));
    let leader = o.observe().leader;
    finish(&o, leader, BACKUP, outcome)
}

fn backup_and_check(c: &Common, dest: &std::path::Path) -> Result<String> {
    let t0 = std::time::Instant::now();
    crate::backup::backup(crate::backup::BackupArgs {
        data_dir: c.data_dir.clone(),
        to: Some(dest.to_path_buf()),
        keep: None,
        token: c.token.clone(),
        json: false,
    })?;
    let took_backup = t0.elapsed().as_millis();
    let newest = std::fs::read_dir(dest)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("backup-"))
        })
        .max()
        .ok_or_else(|| anyhow::anyhow!("no backup in {} after the backup", dest.display()))?;
    let t1 = std::time::Instant::now();
    crate::backup::restore(crate::backup::RestoreArgs {
        from: newest.clone(),
        data_dir: dest.join("restore-check"),
        check: true,
        replace: false,
    })?;
    Ok(format!(
        "backup {} written and verified in {took_backup} ms, restore check {} ms",
        newest.display(),
        t1.elapsed().as_millis()
    ))
}

fn node(a: NodeArgs) -> Result<()> {
    let c = &a.common;
    let id = a.node;
    let mut o = Observer::new(&c.data_dir, c.token.clone())?;
    let obs = o.observe();
    if let Err(why) = node_drill_check(&obs, id) {
        return finish(
            &o,
            obs.leader,
            NODE,
            Err(format!("node {id}: refused: {why}")),
        );
    }
    let leader = obs.leader;
    let outcome = node_steps(&mut o, &a, &obs).map_err(|e| format!("node {id}: failed: {e}"));
    let outcome = outcome.map(|s| format!("node {id}: {s}"));
    let leader = o.observe().leader.or(leader);
    finish(&o, leader, NODE, outcome)
}

/// Drain, stop, start, readmission, shards back: each timed.
fn node_steps(o: &mut Observer, a: &NodeArgs, obs: &ClusterObs) -> Result<String, String> {
    let (c, id) = (&a.common, a.node);
    let me = obs
        .nodes
        .iter()
        .find(|n| n.id == id)
        .cloned()
        .unwrap_or_default();
    let mut steps = vec![];
    if me.hosts && me.owned > 0 {
        let admin = o
            .manifest
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.admin_addr.clone())
            .unwrap_or_default();
        let token = exec::find_token(c.token.clone(), &c.data_dir);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let args = ["drain", "on"].map(String::from);
        if let exec::Outcome::Error(e) = exec::run_one(&agent, &admin, token.as_deref(), &args) {
            return Err(format!("drain refused: {e}"));
        }
        let ms = wait_until(o, c, &format!("node {id} drained"), |obs| {
            obs.nodes
                .iter()
                .any(|n| n.id == id && n.owned == 0 && n.shards.is_some_and(|h| h.loaded == 0))
        })?;
        steps.push(format!("drained in {ms} ms"));
    }
    let ms = o
        .stop(id, Duration::from_secs(a.stop_timeout_s))
        .map_err(|e| format!("stop: {e:#}"))?;
    steps.push(format!("stopped in {ms} ms"));
    let t0 = o.now_ms();
    o.start(id, Duration::from_secs(c.step_timeout_s))
        .map_err(|e| format!("start: {e:#}"))?;
    let readmitted = wait_until(o, c, &format!("node {id} readmitted"), |obs| {
        obs.nodes
            .iter()
            .any(|n| n.id == id && n.epoch > me.epoch && n.inactive.is_none() && n.stage == 0)
    })?;
    let (w, stable) = settle(o, c, vec![(id, me.epoch)])?;
    let back = w
        .back_after(id)
        .map(|b| b + (w.started_ms - t0))
        .unwrap_or(0);
    steps.push(format!("readmitted {readmitted} ms after its start"));
    steps.push(format!("shards back {back} ms after it"));
    steps.push(format!(
        "cluster stable {} ms after it",
        stable + (w.started_ms - t0)
    ));
    Ok(steps.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roll::{NodeObs, ShardCounts};

    fn cluster() -> ClusterObs {
        ClusterObs {
            leader: Some(1),
            nodes: (1..=4)
                .map(|id| NodeObs {
                    id,
                    voter: id <= 3,
                    hosts: id != 2,
                    running: true,
                    epoch: id,
                    answering: true,
                    serving: true,
                    shards: Some(ShardCounts::default()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_leader_goes_to_a_hosting_voter_unless_told() {
        let c = cluster();
        assert_eq!(leader_pair(&c, None), Ok((1, 3)));
        assert_eq!(leader_pair(&c, Some(2)), Ok((1, 2)));
        assert!(leader_pair(&c, Some(4))
            .unwrap_err()
            .contains("not a voter"));
        assert!(leader_pair(&c, Some(1))
            .unwrap_err()
            .contains("already leads"));
        let mut lone = cluster();
        lone.nodes.iter_mut().for_each(|n| n.voter = n.id == 1);
        assert!(leader_pair(&lone, None).unwrap_err().contains("only voter"));
    }

    #[test]
    fn a_drill_refuses_an_unhealthy_cluster_and_a_lost_quorum_saying_why() {
        let mut c = cluster();
        c.nodes[3].running = false;
        assert_eq!(
            node_drill_check(&c, 1),
            Err("the cluster is not healthy: node 4 is not running".into())
        );
        assert!(leader_pair(&c, None)
            .unwrap_err()
            .contains("node 4 is not running"));
        let mut c = cluster();
        c.nodes.retain(|n| n.id != 3);
        assert!(node_drill_check(&c, 1)
            .unwrap_err()
            .contains("a quorum needs 2"));
        assert!(node_drill_check(&c, 4).is_ok());
        assert!(node_drill_check(&c, 9)
            .unwrap_err()
            .contains("unknown node 9"));
    }

    #[test]
    fn history_keeps_drills_only() {
        let ev = |at, kind, detail: &str| Event {
            index: at,
            at,
            kind,
            node: None,
            detail: detail.into(),
        };
        let events = vec![
            ev(1, EventKind::Operation, "roll: roll started"),
            ev(
                2,
                EventKind::Operation,
                "drill-leader: ok: leadership 1 -> 2 in 300 ms",
            ),
            ev(3, EventKind::NodeLeft, "drill-node: not an operation"),
            ev(
                4,
                EventKind::Operation,
                "drill-node: node 3: refused: no quorum",
            ),
        ];
        let h = history(&events);
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].drill.as_str(), h[0].at), ("leader", 2));
        assert_eq!(h[1].result, "node 3: refused: no quorum");
        assert!(render_history(&h).lines().count() == 3);
        assert_eq!(render_history(&[]), "no drill in the timeline\n");
    }
}
