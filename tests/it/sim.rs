//! The staged start-up in the deterministic simulator: the same decision code
//! (replicated state, coordinator, stage gate) as a real node, 20 nodes, with
//! faults. Every scenario is seeded; the determinism test replays one.

use orrery_core::sim::{run, Fault, SimConfig};
use orrery_core::{EventKind, Stage, StuckPolicy};

fn events(out: &orrery_core::sim::SimOutcome, kind: EventKind) -> Vec<String> {
    out.state
        .events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.detail.clone())
        .collect()
}

#[test]
fn twenty_nodes_reach_stage_zero() {
    for seed in 0..10 {
        let out = run(SimConfig::new(20, seed));
        let ready = out
            .ready_at
            .unwrap_or_else(|| panic!("seed {seed}: not ready: {:#?}", out.state.events));
        assert!(out.excluded.is_empty(), "seed {seed}: {:?}", out.excluded);
        for s in Stage::ALL {
            assert!(
                out.stage_reached_at.contains_key(&s.number()),
                "seed {seed}: stage {s} never reached"
            );
        }
        assert!(ready < 10_000, "seed {seed}: ready only at {ready} ms");
    }
}

#[test]
fn same_seed_replays_the_same_events_different_seeds_differ() {
    let mut cfg = SimConfig::new(20, 7);
    cfg.drop_rate = 0.02;
    cfg.link_delay = (1, 30);
    cfg.faults = vec![Fault::CrashLeaderAtStage {
        stage: Stage::ADDRESSED,
    }];
    let a = run(cfg.clone());
    let b = run(cfg.clone());
    assert_eq!(a.trace, b.trace, "same seed, different run");
    assert_eq!(a.state, b.state);
    cfg.seed = 8;
    let c = run(cfg);
    assert_ne!(
        a.trace, c.trace,
        "different seeds should not replay the same run"
    );
}

#[test]
fn lossy_slow_links_still_reach_stage_zero() {
    for seed in 0..5 {
        let mut cfg = SimConfig::new(20, seed);
        cfg.drop_rate = 0.05;
        cfg.link_delay = (1, 80);
        let out = run(cfg);
        assert!(
            out.ready_at.is_some(),
            "seed {seed}: {:#?}",
            out.state.events
        );
        assert!(
            out.excluded.is_empty(),
            "seed {seed}: a lossy link must not exclude anyone: {:?}",
            out.excluded
        );
    }
}

#[test]
fn crashed_coordinator_is_replaced_reported_and_excluded() {
    for (seed, stage) in [
        (1, Stage::ADDRESSED),
        (2, Stage::PRELOADED),
        (3, Stage::CONNECTED),
    ] {
        let mut cfg = SimConfig::new(20, seed);
        cfg.stage_deadline = 3_000;
        cfg.faults = vec![Fault::CrashLeaderAtStage { stage }];
        let out = run(cfg);
        assert!(
            out.ready_at.is_some(),
            "seed {seed}: {:#?}",
            out.state.events
        );
        assert_eq!(out.crashed, vec![1]);
        assert_eq!(out.excluded, vec![1], "the dead leader is excluded");
        assert!(
            out.state.leader.is_some_and(|l| l != 1),
            "a new leader coordinates"
        );
        let stuck = events(&out, EventKind::NodeStuck);
        assert!(
            stuck
                .iter()
                .any(|d| d.contains("no contact") || d.contains("not heard")),
            "{stuck:?}"
        );
        let live_ready = out
            .state
            .members
            .iter()
            .filter(|(_, m)| m.report.stage == Stage::READY)
            .count();
        assert_eq!(live_ready, 19);
    }
}

#[test]
fn partitioned_node_is_reported_stuck_with_what_it_waits_on() {
    let mut cfg = SimConfig::new(20, 11);
    cfg.stage_deadline = 2_000;
    // Node 13 is cut off from everybody after joining, for longer than the deadline.
    cfg.faults = vec![Fault::Partition {
        node: 13,
        from: 250,
        until: 60_000,
    }];
    let out = run(cfg);
    assert!(out.ready_at.is_some());
    assert_eq!(out.excluded, vec![13]);
    let stuck = events(&out, EventKind::NodeStuck);
    assert!(
        stuck
            .iter()
            .any(|d| d.contains("no contact") || d.contains("not heard")),
        "{stuck:?}"
    );
}

#[test]
fn hung_preload_wait_policy_holds_and_names_the_step() {
    let mut cfg = SimConfig::new(20, 5);
    cfg.stage_deadline = 2_000;
    cfg.stuck_policy = StuckPolicy::Wait;
    cfg.max_time = 20_000;
    cfg.faults = vec![Fault::HangPreload { node: 9, item: 4 }];
    let out = run(cfg);
    assert_eq!(out.ready_at, None, "the barrier must hold");
    assert_eq!(out.state.stage, Stage::ADDRESSED);
    let stuck = events(&out, EventKind::NodeStuck);
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert!(stuck[0].contains("demo: preload item 4"), "{}", stuck[0]);
    assert!(stuck[0].contains("progress 3/20"), "{}", stuck[0]);
    assert!(out.excluded.is_empty());
}

#[test]
fn hung_preload_exclude_policy_lets_the_rest_start() {
    let mut cfg = SimConfig::new(20, 5);
    cfg.stage_deadline = 2_000;
    cfg.faults = vec![Fault::HangPreload { node: 9, item: 4 }];
    let out = run(cfg);
    assert!(out.ready_at.is_some());
    assert_eq!(out.excluded, vec![9]);
    let why = events(&out, EventKind::NodeExcluded);
    assert!(
        why[0].contains("deadline for stage -1") && why[0].contains("demo: preload item 4"),
        "{}",
        why[0]
    );
}

#[test]
fn a_node_cut_off_mid_connect_is_the_only_one_excluded() {
    // The in-process network found this: one isolated node makes every
    // other node miss stage -3 too (they cannot connect to it). Only the
    // isolated node may pay for it.
    for seed in 0..5 {
        let mut cfg = SimConfig::new(20, seed);
        cfg.stage_deadline = 2_000;
        cfg.faults = vec![Fault::IsolateAtStage {
            node: 13,
            stage: Stage::RUNNING,
        }];
        let out = run(cfg);
        assert!(
            out.ready_at.is_some(),
            "seed {seed}: {:#?}",
            out.state.events
        );
        assert_eq!(out.excluded, vec![13], "seed {seed}");
        let stuck = events(&out, EventKind::NodeStuck);
        assert_eq!(
            stuck.len(),
            1,
            "seed {seed}: only the culprit is reported stuck: {stuck:?}"
        );
        assert!(
            stuck[0].contains("other node(s) wait on it"),
            "{}",
            stuck[0]
        );
    }
}
