//! `orrery exec`, `orrery console` and `orrery timeline`: driving many nodes
//! from one terminal.
//!
//! The post-mortem's engineers found their bad logging channel by driving
//! all 250 nodes from a live console. Here one console command goes to the
//! chosen nodes in parallel (at most [`MAX_PARALLEL`] requests at once), each
//! with the same deadline; a node that does not answer in time is reported
//! as `timeout` while the others' answers come back. The command is checked
//! here first ([`prepare`]) with the nodes' own parser and command list, so
//! a typo is refused once, with the usage or the nearest command, before
//! any command is sent; `help` is answered here.
//!
//! This module owns finding the nodes (a local cluster's manifest, or any
//! node's `/cluster`), choosing them (`all`, ids, `role=...`), fanning out
//! and printing. It must never wait without a bound or retry a mutation.
#![allow(clippy::disallowed_methods)] // Deadlines of a CLI measure real time.

use crate::local::Manifest;
use anyhow::{anyhow, bail, Context, Result};
use orrery_core::state::Event;
use orrery_core::{ClusterState, NodeId, Role};
use orrery_node::admin::{ConsoleAnswer, ConsoleRequest};
use orrery_node::config::NodeEntry;
use orrery_node::console::{self, CommandList, ConsoleCommand, ConsoleError, ServiceCommands};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Requests in flight at once during a fan-out.
pub const MAX_PARALLEL: usize = 64;

/// Which nodes a command goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    All,
    Ids(Vec<NodeId>),
    Role(Role),
}

impl std::str::FromStr for Targets {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Targets> {
        let s = s.trim();
        if s == "all" {
            return Ok(Targets::All);
        }
        if let Some(r) = s.strip_prefix("role=") {
            let role = match r {
                "voter" => Role::Voter,
                "worker" => Role::Worker,
                "arbiter" => Role::Arbiter,
                _ => bail!("unknown role `{r}` (voter, worker or arbiter)"),
            };
            return Ok(Targets::Role(role));
        }
        let ids = s
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<NodeId>()
                    .map_err(|_| anyhow!("`{p}` is not a node id (use all, 1,2,3 or role=worker)"))
            })
            .collect::<Result<Vec<_>>>()?;
        if ids.is_empty() {
            bail!("no nodes chosen");
        }
        Ok(Targets::Ids(ids))
    }
}

/// The nodes of a cluster and how to reach their admin endpoints.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub nodes: Vec<NodeEntry>,
    /// The admin addresses the user vouched for (named with `--admin`):
    /// the only ones the token is sent to. `None`: every address (they come
    /// from the user's own manifest).
    pub vouched: Option<BTreeSet<String>>,
}

impl Fleet {
    /// From a local cluster's manifest.
    pub fn local(data_dir: &Path) -> Result<Fleet> {
        Ok(Fleet {
            nodes: Manifest::load(data_dir)?.nodes,
            vouched: None,
        })
    }

    /// From the first named node's view of the cluster configuration.
    pub fn discover(admin_addrs: &[String], timeout: Duration) -> Result<Fleet> {
        let admin_addr = admin_addrs.first().context("no admin address given")?;
        let state: ClusterState = agent(timeout)
            .get(&format!("http://{admin_addr}/cluster"))
            .call()
            .with_context(|| format!("cannot read the cluster from {admin_addr}"))?
            .into_json()?;
        Ok(Fleet {
            vouched: Some(admin_addrs.iter().cloned().collect()),
            nodes: state
                .config
                .nodes
                .iter()
                .map(|(id, spec)| NodeEntry {
                    id: *id,
                    addr: spec.addr.clone(),
                    admin_addr: spec.admin_addr.clone(),
                    role: spec.role,
                })
                .collect(),
        })
    }

    /// The chosen nodes; an id the cluster does not have is an error.
    pub fn select(&self, t: &Targets) -> Result<Vec<NodeEntry>> {
        match t {
            Targets::All => Ok(self.nodes.clone()),
            Targets::Role(r) => Ok(self
                .nodes
                .iter()
                .filter(|n| n.role == *r)
                .cloned()
                .collect()),
            Targets::Ids(ids) => ids
                .iter()
                .map(|id| {
                    self.nodes
                        .iter()
                        .find(|n| n.id == *id)
                        .cloned()
                        .ok_or_else(|| {
                            anyhow!("unknown node {id}: the cluster has nodes {}", self.ids())
                        })
                })
                .collect(),
        }
    }

    /// Whether the token may be sent to `n`'s admin address.
    pub fn vouches(&self, n: &NodeEntry) -> bool {
        self.vouched
            .as_ref()
            .is_none_or(|v| v.contains(&n.admin_addr))
    }

    fn ids(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One node's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Ok {
        summary: String,
        data: serde_json::Value,
    },
    Error(String),
    Timeout,
}

/// What one node answered, and how long it took.
#[derive(Clone, Debug)]
pub struct NodeOutcome {
    pub node: NodeId,
    pub outcome: Outcome,
    pub took: Duration,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(timeout)
        .timeout(timeout)
        .build()
}

/// The admin token: `--token`, else `ORRERY_ADMIN_TOKEN`, else a local
/// cluster's `admin.token` file.
pub fn find_token(given: Option<String>, data_dir: &Path) -> Option<String> {
    given
        .or_else(|| std::env::var("ORRERY_ADMIN_TOKEN").ok())
        .or_else(|| {
            std::fs::read_to_string(data_dir.join("admin.token"))
                .ok()
                .map(|t| t.trim().to_string())
        })
        .filter(|t| !t.is_empty())
}

/// What the CLI knows of the nodes' commands beyond the built-in ones
/// (which it shares with them): their services', asked of one node
/// (`GET /commands`, a read; no command is sent) the first time a line
/// needs them, and kept once one answered.
#[derive(Debug, Default)]
pub struct Vocabulary {
    services: Option<Vec<ServiceCommands>>,
}

impl Vocabulary {
    /// A vocabulary whose services are already known (tests, or a caller
    /// that asked itself).
    pub fn with_services(services: Vec<ServiceCommands>) -> Vocabulary {
        Vocabulary {
            services: Some(services),
        }
    }

    /// The services' commands, asking `nodes` if not known yet; `None`
    /// when no node answered.
    fn services(&mut self, nodes: &[NodeEntry], timeout: Duration) -> Option<&[ServiceCommands]> {
        if self.services.is_none() {
            self.services = fetch_commands(nodes, timeout).ok().map(|l| l.services);
        }
        self.services.as_deref()
    }
}

/// The commands a node runs (`GET /commands`), from the first of (at most
/// three of) `nodes` that answers.
pub fn fetch_commands(nodes: &[NodeEntry], timeout: Duration) -> Result<CommandList> {
    let agent = agent(timeout);
    let mut last = anyhow!("no nodes chosen");
    for n in nodes.iter().take(3) {
        match agent
            .get(&format!("http://{}/commands", n.admin_addr))
            .call()
        {
            Ok(r) => return Ok(r.into_json()?),
            Err(e) => last = anyhow!("node {}: {e}", n.id),
        }
    }
    Err(last)
}

/// What to do with a line that passed [`prepare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// `help`, answered here: usage lines, one per command, and whether
    /// the services' commands are among them.
    Help {
        lines: Vec<String>,
        services_known: bool,
    },
    /// Send it to the nodes.
    Run,
}

impl Line {
    /// `help`'s answer for a terminal.
    pub fn render_help(lines: &[String], services_known: bool) -> String {
        let mut out = String::new();
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        if !services_known {
            out.push_str("(services' commands not listed: no node answered GET /commands)\n");
        }
        out
    }
}

/// Checks a line before anything is sent: `help [COMMAND]` is answered
/// here; a line that does not parse, or whose first word is neither a
/// built-in command nor one of the nodes' services' (asked of one of
/// `nodes` once, see [`Vocabulary`]), is refused with one message (the
/// reason, and the usage or the nearest command). If no node says which
/// services it has, a word near a built-in command is refused and any
/// other is left to the nodes.
pub fn prepare(
    words: &[String],
    vocab: &mut Vocabulary,
    nodes: &[NodeEntry],
    timeout: Duration,
) -> Result<Line> {
    let cmd = ConsoleCommand::parse(words).map_err(|e| anyhow!(refusal(words, &e)))?;
    match cmd {
        ConsoleCommand::Help => {
            let services = vocab.services(nodes, timeout);
            let services_known = services.is_some();
            let lines = console::help_lines(&words[1..], services.unwrap_or_default())
                .map_err(|e| anyhow!("{e}"))?;
            Ok(Line::Help {
                lines,
                services_known,
            })
        }
        ConsoleCommand::Service { args } => {
            let word = args.first().map(String::as_str).unwrap_or_default();
            match vocab.services(nodes, timeout) {
                Some(s) => {
                    let known: Vec<&str> = s.iter().map(|s| s.word.as_str()).collect();
                    console::check_service(&args, &known).map_err(|e| anyhow!("{e}"))?;
                }
                None => {
                    let e = console::unknown(word, &[]);
                    if matches!(
                        e,
                        ConsoleError::Unknown {
                            suggestion: Some(_),
                            ..
                        }
                    ) {
                        bail!("{e}");
                    }
                }
            }
            Ok(Line::Run)
        }
        _ => Ok(Line::Run),
    }
}

/// A parse error as the operator sees it: a bad argument comes with the
/// command's usage.
fn refusal(words: &[String], e: &ConsoleError) -> String {
    match (e, console::usage_for(words)) {
        (ConsoleError::BadArgument(_), Some(u)) => format!("{e}; usage: {u}"),
        _ => e.to_string(),
    }
}

/// Sends one console command to one node.
pub fn run_one(
    agent: &ureq::Agent,
    admin_addr: &str,
    token: Option<&str>,
    args: &[String],
) -> Outcome {
    let mut req = agent.post(&format!("http://{admin_addr}/console"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let body = ConsoleRequest {
        args: args.to_vec(),
    };
    let answer = match req.send_json(&body) {
        Ok(r) => r.into_json::<ConsoleAnswer>(),
        Err(ureq::Error::Status(code, r)) => match r.into_json::<ConsoleAnswer>() {
            Ok(a) => Ok(a),
            Err(_) => return Outcome::Error(format!("HTTP {code}")),
        },
        Err(ureq::Error::Transport(t)) => {
            let text = t.to_string();
            if text.contains("timed out") || text.contains("Timeout") {
                return Outcome::Timeout;
            }
            return Outcome::Error(text);
        }
    };
    match answer {
        Ok(a) if a.ok => Outcome::Ok {
            summary: a.summary,
            data: a.data,
        },
        Ok(a) => Outcome::Error(a.error.unwrap_or_else(|| "refused".into())),
        Err(e) => Outcome::Error(format!("unreadable answer: {e}")),
    }
}

/// Runs `args` on every node in `nodes` in parallel, all within `timeout`.
/// Every node gets a row: its answer, its error, or `timeout`.
/// A node whose address the user did not name gets an error row instead,
/// and the token is not sent to it.
pub fn exec(
    fleet: &Fleet,
    chosen: &[NodeEntry],
    args: &[String],
    token: Option<&str>,
    timeout: Duration,
) -> Result<Vec<NodeOutcome>> {
    ConsoleCommand::parse(args).map_err(|e| anyhow!("{e}"))?;
    let (nodes, withheld): (Vec<NodeEntry>, Vec<NodeEntry>) = chosen
        .iter()
        .cloned()
        .partition(|n| token.is_none() || fleet.vouches(n));
    let mut got = fan_out(&nodes, args, token, timeout);
    got.extend(withheld.iter().map(|n| NodeOutcome {
        node: n.id,
        outcome: Outcome::Error(format!(
            "token not sent: {} was listed by the cluster, not named by you (add --admin {})",
            n.admin_addr, n.admin_addr
        )),
        took: Duration::ZERO,
    }));
    got.sort_by_key(|o| o.node);
    Ok(got)
}

fn fan_out(
    nodes: &[NodeEntry],
    args: &[String],
    token: Option<&str>,
    timeout: Duration,
) -> Vec<NodeOutcome> {
    let started = Instant::now();
    let deadline = started + timeout;
    let agent = agent(timeout);
    let (tx, rx) = mpsc::channel::<NodeOutcome>();
    let work = std::sync::Arc::new(std::sync::Mutex::new(nodes.to_vec()));
    let workers = nodes.len().clamp(1, MAX_PARALLEL);
    for _ in 0..workers {
        let (tx, work, agent) = (tx.clone(), work.clone(), agent.clone());
        let args = args.to_vec();
        let token = token.map(str::to_string);
        std::thread::spawn(move || loop {
            let next = work.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(n) = next else { return };
            let t0 = Instant::now();
            let outcome = run_one(&agent, &n.admin_addr, token.as_deref(), &args);
            if tx
                .send(NodeOutcome {
                    node: n.id,
                    outcome,
                    took: t0.elapsed(),
                })
                .is_err()
            {
                return;
            }
        });
    }
    drop(tx);
    let mut got: Vec<NodeOutcome> = Vec::with_capacity(nodes.len());
    while got.len() < nodes.len() {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(200);
        match rx.recv_timeout(left) {
            Ok(o) => got.push(o),
            Err(_) => break,
        }
    }
    for n in nodes {
        if !got.iter().any(|o| o.node == n.id) {
            got.push(NodeOutcome {
                node: n.id,
                outcome: Outcome::Timeout,
                took: started.elapsed(),
            });
        }
    }
    got
}

/// The table `orrery exec` prints: node, ok/error/timeout, result.
pub fn render(outcomes: &[NodeOutcome]) -> String {
    use std::fmt::Write;
    let mut out = format!("{:>5}  {:<7}  {:>7}  result\n", "node", "outcome", "ms");
    for o in outcomes {
        let (word, text) = match &o.outcome {
            Outcome::Ok { summary, .. } => ("ok", summary.clone()),
            Outcome::Error(e) => ("error", e.clone()),
            Outcome::Timeout => ("timeout", "no answer within the timeout".to_string()),
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<7}  {:>7}  {}",
            o.node,
            word,
            o.took.as_millis(),
            text
        );
    }
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok { .. }))
        .count();
    let _ = writeln!(out, "{ok} of {} nodes ok", outcomes.len());
    out
}

/// The outcomes as JSON (`orrery exec --json`).
pub fn to_json(outcomes: &[NodeOutcome]) -> serde_json::Value {
    serde_json::Value::Array(
        outcomes
            .iter()
            .map(|o| {
                let (outcome, summary, data, error) = match &o.outcome {
                    Outcome::Ok { summary, data } => ("ok", summary.clone(), data.clone(), None),
                    Outcome::Error(e) => (
                        "error",
                        String::new(),
                        serde_json::Value::Null,
                        Some(e.clone()),
                    ),
                    Outcome::Timeout => ("timeout", String::new(), serde_json::Value::Null, None),
                };
                serde_json::json!({
                    "node": o.node, "outcome": outcome, "ms": o.took.as_millis() as u64,
                    "summary": summary, "data": data, "error": error,
                })
            })
            .collect(),
    )
}

/// Parses `--since`: RFC 3339 (`2026-11-27T15:00:00Z`), a duration ago
/// (`10m`, `90s`), or milliseconds since the Unix epoch.
pub fn parse_since(s: &str) -> Result<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(UNIX_EPOCH)?.as_millis() as u64);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        return Ok(now.saturating_sub(d).as_millis() as u64);
    }
    bail!("--since {s:?}: expected an RFC 3339 time, a duration ago such as 10m, or ms since the epoch")
}

/// Wall time of a timestamp, for people.
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The cluster's timeline, from the first node that answers.
pub fn fetch_timeline(fleet: &Fleet, since: u64, timeout: Duration) -> Result<Vec<Event>> {
    let agent = agent(timeout);
    let mut last = None;
    for n in &fleet.nodes {
        match agent
            .get(&format!("http://{}/timeline", n.admin_addr))
            .query("since", &since.to_string())
            .call()
        {
            Ok(r) => return Ok(r.into_json()?),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow!(
        "no node could read the timeline: {}",
        last.map(|e| e.to_string())
            .unwrap_or_else(|| "no nodes".into())
    ))
}

/// The timeline as the post-mortem table an engineer would write by hand.
pub fn timeline_markdown(events: &[Event]) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "| time (UTC) | +s | node | event | what happened |\n|---|---:|---:|---|---|\n",
    );
    let first = events.first().map(|e| e.at).unwrap_or(0);
    for e in events {
        let node = e.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let detail = e.detail.replace('|', "\\|").replace('\n', " ");
        let _ = writeln!(
            out,
            "| {} | {:.1} | {node} | {:?} | {detail} |",
            format_ms(e.at),
            e.at.saturating_sub(first) as f64 / 1000.0,
            e.kind
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("all".parse::<Targets>().unwrap(), Targets::All);
        assert_eq!("1, 3".parse::<Targets>().unwrap(), Targets::Ids(vec![1, 3]));
        assert_eq!(
            "role=worker".parse::<Targets>().unwrap(),
            Targets::Role(Role::Worker)
        );
        assert!("role=boss".parse::<Targets>().is_err());
        assert!("1,x".parse::<Targets>().is_err());
    }

    #[test]
    fn unknown_nodes_are_refused() {
        let fleet = Fleet {
            nodes: vec![NodeEntry {
                id: 1,
                addr: "a".into(),
                admin_addr: "b".into(),
                role: Role::Voter,
            }],
            vouched: None,
        };
        let e = fleet.select(&Targets::Ids(vec![1, 7])).unwrap_err();
        assert!(e.to_string().contains("unknown node 7"), "{e}");
    }

    #[test]
    fn the_token_goes_only_to_addresses_the_user_named() {
        let node = |id, admin_addr: &str| NodeEntry {
            id,
            addr: "x".into(),
            admin_addr: admin_addr.into(),
            role: Role::Voter,
        };
        // Node 1 is named (and refuses the connection at once); node 2's
        // address came from the cluster's answer: never contacted.
        let fleet = Fleet {
            nodes: vec![node(1, "127.0.0.1:1"), node(2, "198.51.100.7:9")],
            vouched: Some(["127.0.0.1:1".to_string()].into()),
        };
        let args = vec!["status".to_string()];
        let t = Duration::from_secs(5);
        let out = exec(&fleet, &fleet.nodes, &args, Some("0123456789abcdef"), t).unwrap();
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0].outcome, Outcome::Error(e) if !e.contains("not sent")));
        assert!(
            matches!(&out[1].outcome, Outcome::Error(e) if e.contains("token not sent") && e.contains("--admin 198.51.100.7:9")),
            "{:?}",
            out[1]
        );
        assert!(fleet.vouches(&fleet.nodes[0]) && !fleet.vouches(&fleet.nodes[1]));
    }

    #[test]
    fn a_bad_command_is_refused_before_anything_is_sent() {
        let args: Vec<String> = ["log", "level", "x", "loud"].map(String::from).to_vec();
        let fleet = Fleet {
            nodes: vec![],
            vouched: None,
        };
        let e = exec(&fleet, &[], &args, None, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("unknown level"), "{e}");
    }

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_line_is_checked_and_help_answered_here() {
        let t = Duration::from_secs(1);
        let universe = ServiceCommands {
            word: "universe".into(),
            usage: vec!["universe stats [N]".into()],
        };
        let mut vocab = Vocabulary::with_services(vec![universe]);
        // A mistyped command: one message, naming it and the nearest one.
        let e = prepare(&words("lgo level x debug"), &mut vocab, &[], t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown command `lgo` (did you mean `log`?); `help` lists the commands"
        );
        let e = prepare(&words("frobnicate now"), &mut vocab, &[], t).unwrap_err();
        assert!(
            e.to_string().contains("unknown command `frobnicate`"),
            "{e}"
        );
        let e = prepare(&words("univers stats"), &mut vocab, &[], t).unwrap_err();
        assert!(e.to_string().contains("did you mean `universe`"), "{e}");
        // A bad argument comes with the usage.
        let e = prepare(&words("log level x loud"), &mut vocab, &[], t).unwrap_err();
        assert!(
            e.to_string().contains("unknown level `loud`")
                && e.to_string().contains("usage: log level CHANNEL"),
            "{e}"
        );
        let e = prepare(&words("status now"), &mut vocab, &[], t).unwrap_err();
        assert_eq!(e.to_string(), "usage: status");
        // Commands the nodes run go to them.
        assert_eq!(
            prepare(&words("universe stats"), &mut vocab, &[], t).unwrap(),
            Line::Run
        );
        assert_eq!(
            prepare(&words("log level x debug"), &mut vocab, &[], t).unwrap(),
            Line::Run
        );
        // `help`: every command, one per line, the services' too.
        let Line::Help {
            lines,
            services_known,
        } = prepare(&words("help"), &mut vocab, &[], t).unwrap()
        else {
            panic!("help is answered here")
        };
        assert!(services_known);
        assert_eq!(lines.len(), orrery_node::console::COMMANDS.len() + 1);
        assert_eq!(lines.last().unwrap(), "universe stats [N]");
        let Line::Help { lines, .. } = prepare(&words("help drain"), &mut vocab, &[], t).unwrap()
        else {
            panic!("help drain")
        };
        assert_eq!(lines, vec!["drain [on|off]".to_string()]);
        let e = prepare(&words("help lgo"), &mut vocab, &[], t).unwrap_err();
        assert!(e.to_string().contains("did you mean `log`"), "{e}");

        // No node says which services it has: a near miss is still refused
        // here, any other word is left to the nodes.
        let mut unknown = Vocabulary::default();
        let e = prepare(&words("lgo level x debug"), &mut unknown, &[], t).unwrap_err();
        assert!(e.to_string().contains("did you mean `log`"), "{e}");
        assert_eq!(
            prepare(&words("frobnicate"), &mut unknown, &[], t).unwrap(),
            Line::Run
        );
        let Line::Help { services_known, .. } =
            prepare(&words("help"), &mut unknown, &[], t).unwrap()
        else {
            panic!("help")
        };
        assert!(!services_known);
    }

    #[test]
    fn completion_offers_the_next_word() {
        assert_eq!(complete_words("lo"), vec!["log"]);
        assert_eq!(
            complete_words("log "),
            vec!["level", "rate", "stats", "tail"]
        );
        assert_eq!(complete_words("log s"), vec!["stats"]);
        assert!(complete_words("t").contains(&"tasks".to_string()));
        assert!(complete_words("zz").is_empty());
    }

    #[test]
    fn since_accepts_times_durations_and_ms() {
        assert_eq!(parse_since("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        assert!(parse_since("10m").unwrap() > 1_700_000_000_000);
        assert!(parse_since("yesterday-ish").is_err());
    }
}

/// Completion for `orrery console`: command words, then sub-commands.
#[derive(rustyline::Helper, rustyline::Hinter, rustyline::Highlighter, rustyline::Validator)]
pub struct ConsoleHelper;

impl rustyline::completion::Completer for ConsoleHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let typed = &line[..pos];
        let start = typed.rfind(' ').map(|i| i + 1).unwrap_or(0);
        Ok((start, complete_words(typed)))
    }
}

/// The words that may follow what was typed so far.
pub fn complete_words(typed: &str) -> Vec<String> {
    let start = typed.rfind(' ').map(|i| i + 1).unwrap_or(0);
    let (done, partial) = (
        typed[..start].split_whitespace().collect::<Vec<_>>(),
        &typed[start..],
    );
    let mut out: Vec<String> = orrery_node::console::COMMANDS
        .iter()
        .map(|(w, _)| w.split(' ').collect::<Vec<_>>())
        .chain([vec![":nodes"], vec![":quit"]])
        .filter(|w| w.len() > done.len() && w[..done.len()] == done[..])
        .map(|w| w[done.len()].to_string())
        .filter(|w| w.starts_with(partial))
        .collect();
    out.sort();
    out.dedup();
    out
}
