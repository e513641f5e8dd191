//! One alarm model ([`ActiveAlarm`], [`AlarmBook`]): every condition a node
//! alarms about — no quorum, failing replication, a slow proposal, its Raft
//! core down, a resource past a threshold, config drift, a failing or
//! overdue backup, a stalled log sink, failing self-checks — as one list
//! with a kind, a severity, the node, when it was first and last seen, and
//! whether an operator acknowledged it.
//!
//! The conditions are kept where they are decided (`quorum::Contacts`,
//! `resources`, `drift`, `backup`, the health checks); this module only
//! gathers them ([`Condition`]) and remembers, per alarm, when it was first
//! seen and whether it was acknowledged, forgetting both once the
//! condition clears. The replicated timeline keeps the history as news.
//! `orrery alarms` lists every node's; `orrery status` exits 2 while a
//! critical one is not acknowledged.
//!
//! It never decides anything about membership, and never raises or clears
//! a condition itself.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most alarms one node lists (conditions are a small fixed set per node;
/// the bound keeps a bug from growing the status without limit).
pub const MAX_ALARMS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

/// A condition in force now, as its owner reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// What kind of alarm: `no_quorum`, `replication`, `slow_proposal`,
    /// `voter_down`, `resource`, `drift`, `backup`, `log_sink`, `health`.
    pub kind: &'static str,
    /// Which one of its kind (a voter, a resource, a sink); "" if one only.
    pub subject: String,
    pub severity: Severity,
    pub what: String,
    /// When its owner first saw it, if it knows (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

/// One active alarm, as `/status` and `orrery alarms` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAlarm {
    pub kind: String,
    #[serde(default)]
    pub subject: String,
    pub severity: Severity,
    pub node: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub what: String,
    pub acked: bool,
}

impl ActiveAlarm {
    /// The name `alarm ack` takes: `kind` or `kind:subject`.
    pub fn name(&self) -> String {
        name(&self.kind, &self.subject)
    }
}

fn name(kind: &str, subject: &str) -> String {
    if subject.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}:{subject}")
    }
}

#[derive(Clone, Debug)]
struct Entry {
    first_seen_ms: u64,
    acked: bool,
}

/// First-seen times and acknowledgements of the alarms in force.
#[derive(Debug, Default)]
pub struct AlarmBook {
    entries: BTreeMap<String, Entry>,
}

impl AlarmBook {
    /// The active alarms of node `node` at `now_ms`, given the conditions
    /// in force; forgets every alarm whose condition cleared. Critical
    /// first, then oldest first.
    pub fn update(&mut self, node: u64, now_ms: u64, now: Vec<Condition>) -> Vec<ActiveAlarm> {
        let mut out: Vec<ActiveAlarm> = now
            .into_iter()
            .take(MAX_ALARMS)
            .map(|c| {
                let e = self
                    .entries
                    .entry(name(c.kind, &c.subject))
                    .or_insert(Entry {
                        first_seen_ms: c.since_ms.unwrap_or(now_ms).min(now_ms),
                        acked: false,
                    });
                ActiveAlarm {
                    kind: c.kind.to_string(),
                    subject: c.subject,
                    severity: c.severity,
                    node,
                    first_seen_ms: e.first_seen_ms,
                    last_seen_ms: now_ms,
                    what: c.what,
                    acked: e.acked,
                }
            })
            .collect();
        self.entries
            .retain(|k, _| out.iter().any(|a| a.name() == *k));
        out.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(a.first_seen_ms.cmp(&b.first_seen_ms))
        });
        out
    }

    /// `alarm ack NAME`: acknowledged until it clears. False if no such
    /// alarm is in force.
    pub fn ack(&mut self, name: &str) -> bool {
        match self.entries.get_mut(name) {
            Some(e) => {
                e.acked = true;
                true
            }
            None => false,
        }
    }
}

/// Whether any of `alarms` is critical and not acknowledged (`orrery
/// status` exits 2 then).
pub fn unacked_critical<'a>(alarms: impl IntoIterator<Item = &'a ActiveAlarm>) -> bool {
    alarms
        .into_iter()
        .any(|a| a.severity == Severity::Critical && !a.acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(kind: &'static str, subject: &str, severity: Severity) -> Condition {
        Condition {
            kind,
            subject: subject.into(),
            severity,
            what: format!("{kind} {subject}"),
            since_ms: None,
        }
    }

    #[test]
    fn an_alarm_keeps_its_first_seen_time_until_it_clears() {
        let mut b = AlarmBook::default();
        let a = b.update(3, 1_000, vec![cond("drift", "", Severity::Warning)]);
        assert_eq!(
            (a[0].first_seen_ms, a[0].last_seen_ms, a[0].node),
            (1_000, 1_000, 3)
        );
        let a = b.update(3, 5_000, vec![cond("drift", "", Severity::Warning)]);
        assert_eq!((a[0].first_seen_ms, a[0].last_seen_ms), (1_000, 5_000));
        assert!(b.update(3, 6_000, vec![]).is_empty());
        let a = b.update(3, 7_000, vec![cond("drift", "", Severity::Warning)]);
        assert_eq!(a[0].first_seen_ms, 7_000, "a new occurrence starts afresh");
    }

    #[test]
    fn critical_alarms_come_first_and_an_ack_lasts_until_the_alarm_clears() {
        let mut b = AlarmBook::default();
        let both = || {
            vec![
                cond("resource", "data_disk", Severity::Warning),
                cond("voter_down", "", Severity::Critical),
            ]
        };
        let a = b.update(2, 10, both());
        assert_eq!(a[0].kind, "voter_down");
        assert!(unacked_critical(&a));
        assert!(!b.ack("voter_down:nope"), "no such alarm");
        assert!(b.ack("voter_down"));
        let a = b.update(2, 20, both());
        assert!(a[0].acked && !unacked_critical(&a));
        b.update(2, 30, vec![]);
        let a = b.update(2, 40, both());
        assert!(!a[0].acked, "the ack ended with the alarm");
    }

    #[test]
    fn the_list_is_bounded_and_an_owner_s_since_is_kept() {
        let mut b = AlarmBook::default();
        let many: Vec<Condition> = (0..200)
            .map(|i| cond("replication", &i.to_string(), Severity::Warning))
            .collect();
        assert_eq!(b.update(1, 5, many).len(), MAX_ALARMS);
        let mut c = cond("no_quorum", "", Severity::Critical);
        c.since_ms = Some(2);
        assert_eq!(b.update(1, 9, vec![c])[0].first_seen_ms, 2);
    }
}
