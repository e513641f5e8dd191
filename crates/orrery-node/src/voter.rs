//! A voter's Raft core through disk trouble ([`CoreKeeper`]): when the
//! filesystem under the Raft store is critical the core is stopped before a
//! write fails on it; when the core stops by itself (openraft gives up for
//! good after any storage error, e.g. `No space left on device`) that is
//! called out at once; and once the filesystem has room again the core is
//! restarted in place, with backoff, without a person.
//!
//! Before this, a leader whose disk filled logged one line and went on
//! answering `serving: true` with a dead core: the cluster ran silently on
//! two of three voters (the second post-mortem's silent standby).
//!
//! This module owns the decision only (`on(now, observed) -> steps`); the
//! shell in [`crate::resources`] stops and restarts the core and raises the
//! alarms. It never touches the store on disk.

/// What the shell saw this tick.
#[derive(Clone, Debug, Default)]
pub(crate) struct Observed {
    /// The Raft core runs.
    pub running: bool,
    /// Why it does not, as the control plane says.
    pub error: Option<String>,
    /// The critical finding on the Raft store's filesystem, if any.
    pub critical_disk: Option<String>,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Stop the core now: writing on would fail.
    Stop { reason: String },
    /// The core is down: raise the alarm with this text.
    Alarm { text: String },
    /// Try to bring the core back.
    Restart,
    /// It is back after `down_ms`: clear the alarm.
    Recovered { down_ms: u64 },
}

#[derive(Clone, Debug)]
struct Down {
    since_ms: u64,
    reason: String,
    next_try_ms: u64,
    tries: u32,
}

/// First wait before a restart, and the longest.
const FIRST_TRY_MS: u64 = 1_000;
const MAX_BACKOFF_MS: u64 = 10_000;

/// Keeps one voter's Raft core: see the module docs.
#[derive(Debug, Default)]
pub(crate) struct CoreKeeper {
    down: Option<Down>,
}

impl CoreKeeper {
    /// Why the core is down, while it is (`NodeStatus::voter_down`).
    pub fn down_reason(&self) -> Option<String> {
        self.down.as_ref().map(|d| d.reason.clone())
    }

    pub fn on(&mut self, now_ms: u64, o: &Observed) -> Vec<Step> {
        match (&mut self.down, o.running) {
            (None, true) => match &o.critical_disk {
                Some(c) => vec![Step::Stop {
                    reason: format!("the Raft store's filesystem is critical: {c}"),
                }],
                None => vec![],
            },
            (Some(d), true) => {
                let down_ms = now_ms.saturating_sub(d.since_ms);
                self.down = None;
                vec![Step::Recovered { down_ms }]
            }
            (None, false) => {
                let reason = match (&o.critical_disk, &o.error) {
                    (Some(c), _) => format!("the Raft store's filesystem is critical: {c}"),
                    (None, Some(e)) => format!("its Raft core stopped: {e}"),
                    (None, None) => "its Raft core stopped".to_string(),
                };
                self.down = Some(Down {
                    since_ms: now_ms,
                    reason: reason.clone(),
                    next_try_ms: now_ms + FIRST_TRY_MS,
                    tries: 0,
                });
                vec![Step::Alarm { text: reason }]
            }
            (Some(d), false) => {
                if o.critical_disk.is_some() || now_ms < d.next_try_ms {
                    return vec![];
                }
                d.tries = d.tries.saturating_add(1);
                let backoff = (FIRST_TRY_MS << d.tries.min(4)).min(MAX_BACKOFF_MS);
                d.next_try_ms = now_ms + backoff;
                vec![Step::Restart]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(running: bool, critical: bool) -> Observed {
        Observed {
            running,
            error: (!running).then(|| "No space left on device".into()),
            critical_disk: critical.then(|| "0.0 MiB free of 16.0 MiB on /d/raft".into()),
        }
    }

    #[test]
    fn a_critical_disk_stops_the_core_alarms_and_restarts_only_once_space_is_back() {
        let mut k = CoreKeeper::default();
        assert!(k.on(0, &seen(true, false)).is_empty());
        let s = k.on(1_000, &seen(true, true));
        assert!(matches!(&s[..], [Step::Stop { reason }] if reason.contains("/d/raft")));
        let s = k.on(2_000, &seen(false, true));
        assert!(matches!(&s[..], [Step::Alarm { text }] if text.contains("critical")));
        assert!(k.down_reason().is_some());
        // No restart while the disk is still full, however long it lasts.
        for t in (3_000..60_000).step_by(1_000) {
            assert!(k.on(t, &seen(false, true)).is_empty(), "at {t}");
        }
        assert_eq!(k.on(61_000, &seen(false, false)), vec![Step::Restart]);
        assert_eq!(
            k.on(62_000, &seen(true, false)),
            vec![Step::Recovered { down_ms: 60_000 }]
        );
        assert!(k.down_reason().is_none());
    }

    #[test]
    fn a_core_that_died_by_itself_is_called_out_and_retried_with_backoff() {
        let mut k = CoreKeeper::default();
        let s = k.on(0, &seen(false, false));
        assert!(matches!(&s[..], [Step::Alarm { text }] if text.contains("No space left")));
        assert!(
            k.on(500, &seen(false, false)).is_empty(),
            "waits before the first try"
        );
        let tries: Vec<u64> = (1..=60_000)
            .step_by(100)
            .filter(|t| k.on(*t, &seen(false, false)) == vec![Step::Restart])
            .collect();
        let gaps: Vec<u64> = tries.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0]),
            "backoff grows: {gaps:?}"
        );
        assert!(
            gaps.iter().all(|g| *g <= MAX_BACKOFF_MS + 100),
            "bounded: {gaps:?}"
        );
    }
}
