//! Per-period singleton jobs with real processes (issue 6): one committed
//! output per period while holders are killed mid-run, and never a holder
//! that fails its self-checks. The demo job `demo-stats` writes one row per
//! run into the SQLite store the local cluster shares; the tests read that
//! file directly and compare it with the replicated commits.

use crate::cluster::{show, TestCluster};
use orrery::local::{Manifest, Plan};
use orrery_core::{ClusterState, EventKind, JobLease, MemberStatus, NodeId, Stage};
use orrery_node::config::DemoConfig;
use orrery_node::health::HealthFaults;
use orrery_node::service::DEMO_JOB;
use orrery_store::{JobCommitRow, StoreConfig};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Every node runs the demo job with these timings.
fn demo_job(p: &mut Plan, period_ms: u64, deadline_ms: u64, work_ms: u64) {
    p.demo = (1..=p.nodes)
        .map(|id| {
            (
                id,
                DemoConfig {
                    job_period_ms: period_ms,
                    job_deadline_ms: deadline_ms,
                    job_work_ms: work_ms,
                    ..Default::default()
                },
            )
        })
        .collect();
}

fn ready(s: &ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

fn lease(s: &ClusterState) -> Option<&JobLease> {
    s.jobs.get(DEMO_JOB)?.lease.as_ref()
}

fn committed(s: &ClusterState, period: u64) -> Option<&orrery_core::JobCommit> {
    s.jobs.get(DEMO_JOB)?.committed(period)
}

fn now_ms() -> u64 {
    orrery_node::clock::now_ms()
}

/// The rows the store holds for periods `from..to`.
fn store_periods(c: &TestCluster, from: u64, to: u64) -> Vec<JobCommitRow> {
    let store = orrery_store::open(&StoreConfig::sqlite(Manifest::store_path(c.dir.path())))
        .expect("open the cluster's store");
    store.job_periods(DEMO_JOB, from, to).expect("job periods")
}

/// `(period, node, lease epoch)` of a `JobCommitted` event's detail:
/// "job J period P committed by node N (epoch E, lease epoch L) ...".
fn parse_commit_event(detail: &str) -> Option<(u64, NodeId, u64)> {
    let word_after = |key: &str| -> Option<u64> {
        let rest = &detail[detail.find(key)? + key.len()..];
        rest.split(|ch: char| !ch.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((
        word_after(" period ")?,
        word_after("committed by node ")?,
        word_after("lease epoch ")?,
    ))
}

/// Checks one stored period against the replicated commit: one row `run`
/// naming the committing node, the period and the lease epoch.
fn check_row(row: &JobCommitRow, commit: &orrery_core::JobCommit) {
    let p = row.period;
    assert_eq!(
        row.lease_epoch, commit.lease_epoch,
        "period {p}: the store holds lease epoch {} but the control plane committed {}",
        row.lease_epoch, commit.lease_epoch
    );
    assert_eq!(row.rows.len(), 1, "period {p}: {:?}", row.rows);
    assert_eq!(row.rows[0].0, "run");
    let v: serde_json::Value = serde_json::from_slice(&row.rows[0].1).expect("json row");
    assert_eq!(
        v,
        serde_json::json!({"node": commit.holder, "period": p, "lease_epoch": commit.lease_epoch}),
        "period {p}: the row was written by another run than the committed one"
    );
}

/// Over 20 consecutive periods with the job's holder killed at random
/// moments, every period has exactly one stats row: none missing, none
/// duplicated, and no row committed by a stale token.
///
/// Each period, once the lease is granted, the holder is SIGKILLed at a
/// seeded random moment within its run (before its output can be written:
/// within 3/4 of `WORK` ms after the grant, while the run works `WORK` ms
/// after it learns the lease) and restarted at
/// once; its restart supersedes its epoch and the coordinator grants the
/// period again. A holder that is the Raft leader is not killed: a leader's
/// death costs an election plus one liveness window before the new
/// coordinator judges anyone, more than a period here (that is the
/// failure detector's budget, not the job runner's).
#[test]
fn every_period_has_exactly_one_row_while_holders_are_killed() {
    const PERIOD: u64 = 2_500;
    const DEADLINE: u64 = 2_300;
    const WORK: u64 = 500;
    const PERIODS: u64 = 20;
    const SEED: u64 = 0x006a_6f62;
    let started = Instant::now();
    let mut c = TestCluster::new(5, 3, |p| {
        demo_job(p, PERIOD, DEADLINE, WORK);
        // Restarted nodes become eligible again quickly, and come back
        // without long backoffs.
        p.membership.eligibility_window_ms = 1_000;
        p.membership.removal_backoff_base_ms = 200;
        p.membership.removal_backoff_max_ms = 1_000;
    });
    c.start_all();
    c.wait_for("ready", T, ready);
    let s = c.wait_for("the job declared and a period committed", T, |s| {
        s.jobs.get(DEMO_JOB).is_some_and(|j| !j.commits.is_empty())
    });
    let spec = s.jobs.get(DEMO_JOB).expect("declared").spec.clone();
    assert_eq!((spec.period_ms, spec.deadline_ms), (PERIOD, DEADLINE));
    let first = spec.period_at(now_ms()) + 1;
    let last = first + PERIODS - 1;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(SEED);
    let mut kills: Vec<(u64, NodeId, u64)> = vec![];
    let mut leader_held = vec![];
    for p in first..=last {
        let s = c.wait_for(&format!("period {p} granted"), T, |s| {
            lease(s).is_some_and(|l| l.period >= p) || committed(s, p).is_some()
        });
        let l = lease(&s).expect("a lease").clone();
        if l.period != p || committed(&s, p).is_some() {
            continue; // Done before we looked: nothing to kill.
        }
        if s.leader == Some(l.holder) {
            leader_held.push(p);
            continue;
        }
        // A random moment of the run, before it can have written its row
        // (it works WORK ms after the grant at the earliest).
        let latest = l.granted_at + WORK * 3 / 4;
        let delay = rng.gen_range(0..=latest.saturating_sub(now_ms()));
        std::thread::sleep(Duration::from_millis(delay));
        c.kill(l.holder);
        c.start(l.holder);
        kills.push((p, l.holder, l.lease_epoch));
        eprintln!(
            "period {p}: killed node {} (lease epoch {}) {} ms into the period",
            l.holder,
            l.lease_epoch,
            now_ms().saturating_sub(spec.starts(p))
        );
    }
    let s = c.wait_for(
        &format!("period {last} committed"),
        Duration::from_millis(3 * PERIOD),
        |s| committed(s, last).is_some(),
    );
    // The replicated state: exactly one commit per period of the window.
    let commits: BTreeMap<u64, orrery_core::JobCommit> = (first..=last)
        .map(|p| {
            let c = committed(&s, p).unwrap_or_else(|| {
                panic!("period {p} was never committed:\n{}", show(Some(s.clone())))
            });
            (p, c.clone())
        })
        .collect();
    // The store: one row per period, written by the committed run.
    let rows = store_periods(&c, first, last + 1);
    let periods: Vec<u64> = rows.iter().map(|r| r.period).collect();
    assert_eq!(
        periods,
        (first..=last).collect::<Vec<_>>(),
        "every period has exactly one stored output"
    );
    for row in &rows {
        check_row(row, &commits[&row.period]);
    }
    // Every stored output since the cluster started was committed with the
    // token the control plane accepted: no row under a stale token.
    let all = store_periods(&c, 0, last + 1);
    let retained = &s.jobs.get(DEMO_JOB).expect("declared").commits;
    for row in &all {
        let commit = retained.get(&row.period).unwrap_or_else(|| {
            panic!(
                "period {} has a stored output the control plane never committed (lease epoch {})",
                row.period, row.lease_epoch
            )
        });
        check_row(row, commit);
    }
    // Every JobCommitted event names the token the store holds.
    let by_period: BTreeMap<u64, &JobCommitRow> = all.iter().map(|r| (r.period, r)).collect();
    let mut events = 0;
    for e in s
        .events
        .iter()
        .filter(|e| e.kind == EventKind::JobCommitted)
    {
        let (p, node, lease_epoch) =
            parse_commit_event(&e.detail).unwrap_or_else(|| panic!("event {:?}", e.detail));
        let row = by_period
            .get(&p)
            .unwrap_or_else(|| panic!("{:?}: no stored output", e.detail));
        assert_eq!(row.lease_epoch, lease_epoch, "{:?}", e.detail);
        assert_eq!(e.node, Some(node));
        events += 1;
    }
    // The killed holders' tokens: superseded, never the committed one.
    let mut taken_over = 0;
    for (p, node, lease_epoch) in &kills {
        let c = &commits[p];
        assert!(
            c.lease_epoch > *lease_epoch,
            "period {p}: committed under the killed node {node}'s lease epoch {lease_epoch}"
        );
        taken_over += 1;
    }
    let late = commits.values().filter(|c| c.late).count();
    eprintln!(
        "{PERIODS} periods {first}..={last}: {} holders killed mid-run and taken over ({taken_over}), \
         {} periods held by the leader (not killed): {leader_held:?}; {late} committed late; \
         {events} commit events checked against the store; {} s",
        kills.len(),
        leader_held.len(),
        started.elapsed().as_secs()
    );
    assert!(
        kills.len() as u64 >= PERIODS / 2,
        "only {} of {PERIODS} periods had a holder killed",
        kills.len()
    );
    c.stop_all();
}

/// A node failing its self-checks (a CPU hog blocks its runtime: impaired)
/// is never chosen as the job's holder: over 8 periods no JobGranted event
/// names it and every period is committed by another node.
#[test]
fn a_node_failing_its_self_checks_never_holds_the_job() {
    const PERIOD: u64 = 2_000;
    const PERIODS: u64 = 8;
    const SICK: NodeId = 5;
    let mut c = TestCluster::new(5, 3, |p| {
        demo_job(p, PERIOD, 1_800, 100);
        p.faults = vec![(
            SICK,
            HealthFaults {
                event_loop_lag_ms: 300,
                ..Default::default()
            },
        )];
    });
    c.start_all();
    c.wait_for("ready", T, ready);
    c.wait_for("node 5 reported impaired", T, |s| {
        !s.members[&SICK].health.healthy
    });
    let spec = c
        .wait_for("the job declared", T, |s| s.jobs.get(DEMO_JOB).is_some())
        .jobs
        .get(DEMO_JOB)
        .expect("declared")
        .spec
        .clone();
    let first = spec.period_at(now_ms()) + 1;
    let last = first + PERIODS - 1;
    let s = c.wait_for(
        &format!("periods {first}..={last} committed"),
        Duration::from_millis((PERIODS + 3) * PERIOD),
        |s| committed(s, last).is_some(),
    );
    assert_eq!(
        s.members[&SICK].status,
        MemberStatus::Active,
        "impaired, not removed"
    );
    assert!(!s.members[&SICK].health.healthy, "still impaired");
    let mut holders = BTreeMap::new();
    for p in first..=last {
        let c = committed(&s, p)
            .unwrap_or_else(|| panic!("period {p} not committed:\n{}", show(Some(s.clone()))));
        assert_ne!(c.holder, SICK, "period {p} committed by the impaired node");
        *holders.entry(c.holder).or_insert(0) += 1;
    }
    let grants: Vec<&str> = s
        .events
        .iter()
        .filter(|e| e.kind == EventKind::JobGranted && e.node == Some(SICK))
        .map(|e| e.detail.as_str())
        .collect();
    assert!(
        grants.is_empty(),
        "the impaired node was granted: {grants:?}"
    );
    let st = c.node_status(SICK).expect("node 5 answers");
    assert_eq!(st.jobs.started, 0, "node 5 ran a period: {:?}", st.jobs);
    let rows = store_periods(&c, first, last + 1);
    assert_eq!(rows.len() as u64, PERIODS);
    for row in &rows {
        check_row(row, committed(&s, row.period).expect("committed"));
    }
    eprintln!("periods {first}..={last} committed by {holders:?}; node {SICK} never granted");
    c.stop_all();
}

#[test]
fn a_holder_dying_between_its_two_commits_has_its_output_adopted() {
    const CRASHER: NodeId = 4;
    let mut c = TestCluster::new(5, 3, |p| {
        demo_job(p, 4_000, 3_600, 100);
        // A restarted node may hold the job again after 1 s of health.
        p.membership.eligibility_window_ms = 1_000;
    });
    c.start_all();
    c.wait_for("ready", T, ready);
    // In steady state (leases granted early in each period), node 4 comes
    // back with the fault: it will die inside the window between its store
    // commit and its cluster commit.
    c.wait_for("a period committed", T, |s| {
        s.jobs.get(DEMO_JOB).is_some_and(|j| !j.commits.is_empty())
    });
    c.kill(CRASHER);
    c.edit_config(CRASHER, |cfg| cfg.faults.job_exit_after_store_commit = true);
    c.start(CRASHER);
    // The job rotates onto node 4; it writes the period's output to the
    // store and dies before committing it to the cluster.
    let s = c.wait_for(
        "node 4's stored output adopted by the next holder",
        Duration::from_secs(120),
        |s| {
            s.jobs.get(DEMO_JOB).is_some_and(|j| {
                j.commits
                    .values()
                    .any(|cm| cm.summary.starts_with("adopted"))
            })
        },
    );
    c.wait_log(CRASHER, "fault hook: exiting after the store commit", T);
    let (period, cm) = s
        .jobs
        .get(DEMO_JOB)
        .unwrap()
        .commits
        .iter()
        .find(|(_, cm)| cm.summary.starts_with("adopted"))
        .map(|(p, cm)| (*p, cm.clone()))
        .unwrap();
    assert_ne!(cm.holder, CRASHER, "another node committed it");
    let rows = store_periods(&c, period, period + 1);
    assert_eq!(rows.len(), 1, "one stored output for period {period}");
    assert_eq!(
        rows[0].lease_epoch,
        cm.lease_epoch,
        "committed under the stored token: {}",
        show(Some(s.clone()))
    );
    // The period was not run twice: its one row names node 4.
    let row: serde_json::Value = serde_json::from_slice(&rows[0].rows[0].1).unwrap();
    assert_eq!(row["node"], CRASHER, "{row}");
    c.kill(CRASHER);
    c.stop_all();
}

#[test]
fn commit_events_parse() {
    assert_eq!(
        parse_commit_event(
            "job demo-stats period 7 committed by node 2 (epoch 3, lease epoch 11) 500 ms into the period: 1 row"
        ),
        Some((7, 2, 11))
    );
}
