//! The universe on real `orrery node` processes (issue: the universe): the
//! post-mortem's start-up with 300 campaigns calling alliance shards on
//! other nodes, the same calls forming a wait cycle (reported, not hung),
//! and a paused owner's late write refused as stale.

use crate::cluster::{show, TestCluster};
use orrery::local::{self, Manifest};
use orrery_core::{EventKind, MemberStatus, Stage};
use orrery_universe::service::{ALLIANCE, SOLAR_SYSTEM};
use orrery_universe::{generate, Sizes, UniverseConfig};
use std::time::{Duration, Instant};

fn ready(s: &orrery_core::ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

/// A local cluster running the universe of `systems` systems.
fn universe_cluster(
    nodes: u64,
    systems: usize,
    cfg: UniverseConfig,
) -> (TestCluster, orrery_universe::Universe) {
    let c = TestCluster::new(nodes, 3, |p| {
        local::with_universe(p, &cfg).expect("universe config");
        p.fault_commands = true;
    });
    let u = generate(11, Sizes::for_systems(systems)).expect("generate");
    let store = orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        c.dir.path(),
    )))
    .expect("open the store");
    orrery_universe::import(&*store, &u).expect("import");
    (c, u)
}

/// The node owning shard `key` of `kind` in the replicated map.
fn shard_owner(s: &orrery_core::ClusterState, kind: u16, key: u32) -> Option<orrery_core::NodeId> {
    s.shards
        .owner(orrery_core::shardmap::ShardId {
            kind,
            key: u64::from(key),
        })
        .map(|e| e.owner)
}

fn store(c: &TestCluster) -> Box<dyn orrery_store::Store> {
    orrery_store::open(&orrery_store::StoreConfig::sqlite(Manifest::store_path(
        c.dir.path(),
    )))
    .expect("open the store")
}

#[test]
fn three_hundred_campaigns_calling_alliances_on_other_nodes_reach_stage_zero() {
    let cfg = UniverseConfig {
        npc_ops_per_s: 5,
        ..Default::default()
    };
    let (mut c, u) = universe_cluster(5, 5000, cfg);
    assert_eq!(u.campaigns.len(), 300);
    c.start_all();
    let s = c.wait_for(
        "stage 0 with 5,000 systems and 300 campaigns",
        Duration::from_secs(180),
        ready,
    );
    assert!(
        !s.events.iter().any(|e| e.kind == EventKind::Deadlock),
        "no wait cycle: {}",
        show(Some(s.clone()))
    );
    // Every shard is loaded somewhere, and campaign systems did call their
    // alliances on other nodes.
    // Every shard loaded somewhere (moves after ready may still be loading).
    let all = (5000 + u.alliances.len() + u.regions.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let total: u64 = c
            .exec_json(&[], &["shards"])
            .iter()
            .map(|r| r["data"]["loaded"].as_u64().unwrap_or(0))
            .sum();
        if total == all {
            break;
        }
        assert!(Instant::now() < deadline, "{total} of {all} shards loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let campaign = &u.campaigns[0];
    assert!(shard_owner(&s, SOLAR_SYSTEM, campaign.system).is_some());
    assert!(shard_owner(&s, ALLIANCE, campaign.defender).is_some());
    let cross_node = u
        .campaigns
        .iter()
        .filter(|cm| {
            shard_owner(&s, SOLAR_SYSTEM, cm.system) != shard_owner(&s, ALLIANCE, cm.defender)
        })
        .count();
    assert!(
        cross_node > 200,
        "most campaign systems called another node: {cross_node}"
    );
    let rows = c.exec_json(
        &["--nodes", "1"],
        &["universe", "campaigns", &campaign.system.to_string()],
    );
    assert_eq!(rows[0]["outcome"], "ok", "{rows:#?}");
    assert_eq!(rows[0]["data"]["campaigns"][0]["id"], campaign.id);
    c.stop_all();
}

#[test]
fn campaign_loads_forming_a_wait_cycle_are_reported_not_hung() {
    let cfg = UniverseConfig {
        npc_ops_per_s: 0,
        fault_capital_push_on_lookup: true,
        ..Default::default()
    };
    let (mut c, _u) = universe_cluster(3, 500, cfg);
    c.start_all();
    // The cycle is detected at once and recorded with every hop.
    let s = c.wait_for("a deadlock event", Duration::from_secs(60), |s| {
        s.events.iter().any(|e| e.kind == EventKind::Deadlock)
    });
    let d = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::Deadlock)
        .expect("deadlock");
    assert!(
        d.detail.contains("call load")
            && d.detail.contains("call capital")
            && d.detail.contains("call capital_changed"),
        "{}",
        d.detail
    );
    // And start-up says which shard is stuck on which cycle.
    let st = c.wait_node(
        1,
        "its wait names the cycle",
        Duration::from_secs(60),
        |n| {
            n.waiting
                .as_ref()
                .is_some_and(|w| w.to_string().contains("deadlock: wait cycle"))
        },
    );
    assert!(st.stage < 0, "start-up did not pretend to finish: {st:?}");
    c.stop_all();
}

#[test]
fn a_paused_owner_s_late_write_is_refused_and_the_new_owner_s_data_stands() {
    let cfg = UniverseConfig {
        npc_ops_per_s: 0,
        call_timeout_ms: 15_000,
        fault_campaign_write_delay_ms: 2_000,
        ..Default::default()
    };
    let (mut c, u) = universe_cluster(5, 300, cfg);
    // A write through the new owner may first wait for the system (and its
    // alliance) to load there: give console commands room.
    for id in 1..=5 {
        c.edit_config(id, |cfg| cfg.admin.command_timeout_ms = 30_000);
    }
    c.start_all();
    let s = c.wait_for("stage 0", Duration::from_secs(60), ready);
    // A campaign system owned by a worker.
    let (campaign, owner) = u
        .campaigns
        .iter()
        .find_map(|cm| {
            let o = shard_owner(&s, SOLAR_SYSTEM, cm.system)?;
            (o >= 4).then_some((cm.clone(), o))
        })
        .expect("a campaign system on a worker");
    let system = campaign.system.to_string();
    // The owner starts a write (it takes 2 s) ...
    let writer = {
        let (dir, system, owner) = (c.dir.path().to_owned(), system.clone(), owner.to_string());
        std::thread::spawn(move || {
            std::process::Command::new(crate::cluster::BIN)
                .args(["exec", "--timeout", "4s", "--nodes", &owner, "--data-dir"])
                .arg(&dir)
                .args(["--", "universe", "tick", &system, "7"])
                .output()
                .expect("exec")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = c.exec_json(&["--nodes", &owner.to_string()], &["tasks"]);
        let busy = rows[0]["data"]["in_flight"].as_array().is_some_and(|a| {
            a.iter()
                .any(|h| h["what"].as_str().unwrap_or("").contains("campaign_tick"))
        });
        if busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write never started: {rows:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and pauses mid-write, long enough to be removed.
    let owner_of = |s: &orrery_core::ClusterState| shard_owner(s, SOLAR_SYSTEM, campaign.system);
    c.signal(owner, "STOP");
    let s = c.wait_for(
        "the paused owner removed and the system moved",
        Duration::from_secs(30),
        |s| {
            matches!(s.members[&owner].status, MemberStatus::Removed { .. })
                && owner_of(s).is_some_and(|o| o != owner)
        },
    );
    let new_owner = owner_of(&s).expect("an owner");
    // The new owner writes, once its own shard map has the move (through a
    // map that still names the paused owner the call would go there, and
    // come back in doubt: it may or may not have run).
    let client = local::AdminClient::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .node_shards(&c.admin_addr(new_owner))
        .map_or(true, |h| h.map_version < s.shards.version)
    {
        assert!(
            Instant::now() < deadline,
            "node {new_owner} never adopted shard map version {}",
            s.shards.version
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rows = c.exec_json(
        &["--nodes", &new_owner.to_string(), "--timeout", "30s"],
        &["universe", "tick", &system, "-2"],
    );
    assert_eq!(rows[0]["outcome"], "ok", "{rows:#?}");
    let expected = (i16::from(campaign.score) - 2).clamp(0, 100);
    assert_eq!(
        rows[0]["data"].as_i64(),
        Some(i64::from(expected)),
        "{rows:#?}"
    );
    // The old owner wakes up and its write lands late: refused as stale.
    c.signal(owner, "CONT");
    let needle = format!("stale owner: shard solar_system/{} epoch", campaign.system);
    c.wait_log(owner, &needle, Duration::from_secs(30));
    let _ = writer.join();
    // The new owner's data stands, and no campaign is duplicated.
    let st = store(&c);
    let shard = format!("solar_system/{}", campaign.system);
    let row = st
        .get(&shard, "campaign", &campaign.id.to_string())
        .unwrap()
        .unwrap();
    let stored: orrery_universe::Campaign = serde_json::from_slice(&row).unwrap();
    assert_eq!(
        i16::from(stored.score),
        expected,
        "the new owner's write stands"
    );
    let mut ids = std::collections::BTreeSet::new();
    for cm in &u.campaigns {
        let rows = st
            .scan(
                &format!("solar_system/{}", cm.system),
                "campaign",
                None,
                100,
            )
            .unwrap();
        assert_eq!(rows.len(), 1, "system {} holds one campaign", cm.system);
        for (_, v) in rows {
            let got: orrery_universe::Campaign = serde_json::from_slice(&v).unwrap();
            assert!(ids.insert(got.id), "campaign {} duplicated", got.id);
        }
    }
    assert_eq!(ids.len(), u.campaigns.len());
    c.stop_all();
}
