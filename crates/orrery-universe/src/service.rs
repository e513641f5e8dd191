//! The universe as an orrery service: three shard kinds, NPC activity, the
//! per-minute statistics job and console commands — written against
//! orrery-node's public API only (`ShardService`, `ShardActor`, `CallCtx`,
//! `Service`, `PeriodicJob`, `ConsoleExtension`, `Node::call`).
//!
//! - `solar_system` (one per system): loads its row and campaigns from the
//!   store; a system with a campaign asks its defender's alliance shard
//!   for the capital at load time (the post-mortem's cross-node call).
//!   NPC jumps and campaign progress land here; campaign rows are written
//!   back with the shard's ownership epoch, so a former owner's late write
//!   is refused as stale.
//! - `alliance`: answers `capital`; `set_capital` pushes the change to the
//!   old and new capital systems. Fault hook: answering `capital` first
//!   pushes to the capital system (the post-mortem's deadlock shape); the
//!   runtime detects the wait cycle and the load fails with it.
//! - `market_region`: orders, NPC trades, and the region's per-period
//!   activity counts, which the statistics job sums.
//!
//! NPC calls are counted as they end: made, by call, and failed, by call and
//! [`CallError::kind`] (`orrery_app_calls_total`,
//! `orrery_app_call_failures_total` in `/metrics`), so errors during a roll
//! are visible; a failed NPC call is never retried (the next tick makes
//! new ones).
//!
//! What it must never do: write without the ownership epoch, block the
//! runtime on the store (every store call runs on the blocking pool), or
//! hold unbounded history (per-period counts keep [`KEEP_PERIODS`]).

use crate::import::{self, UniverseMeta};
use crate::model::{Alliance, Campaign, MarketOrder, System};
use orrery_core::shardmap::{KindSpec, ShardId};
use orrery_core::{JobSpec, Stage};
use orrery_node::shards::{CallCtx, CallError, ShardActor, ShardFuture, ShardService};
use orrery_node::{
    BoxedFuture, ConsoleExtension, JobOutput, JobRun, Node, PeriodicJob, Service, ServiceCounter,
    ServiceFuture, StageContext,
};
use orrery_store::{Op, Store};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const SOLAR_SYSTEM: u16 = 0;
pub const ALLIANCE: u16 = 1;
pub const MARKET_REGION: u16 = 2;
/// Periods of activity counts a region keeps.
pub const KEEP_PERIODS: usize = 16;
const LOG: &str = "universe";

/// `[app.universe]` in a node's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UniverseConfig {
    /// NPC operations per second started by each node. Default 50.
    pub npc_ops_per_s: u32,
    /// The statistics period. Default 60000.
    pub stats_period_ms: u64,
    /// Deadline of each call an NPC makes. Default 2000.
    pub call_timeout_ms: u64,
    /// Fault hook: an alliance answering `capital` first pushes the
    /// capital status to its capital system (the post-mortem's deadlock).
    pub fault_capital_push_on_lookup: bool,
    /// Fault hook: a campaign write waits this long between reading the
    /// campaign and writing it (a write in flight when the owner pauses).
    pub fault_campaign_write_delay_ms: u64,
    /// Extra work the statistics job does per run, in ms (a heavier
    /// aggregation; `bench universe` uses it to kill holders mid-run).
    /// Default 0.
    pub stats_work_ms: u64,
}

impl Default for UniverseConfig {
    fn default() -> Self {
        UniverseConfig {
            npc_ops_per_s: 50,
            stats_period_ms: 60_000,
            call_timeout_ms: 2_000,
            fault_capital_push_on_lookup: false,
            fault_campaign_write_delay_ms: 0,
            stats_work_ms: 0,
        }
    }
}

impl UniverseConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.npc_ops_per_s > 100_000 {
            return Err("universe.npc_ops_per_s must be at most 100000".into());
        }
        if !(1_000..=86_400_000).contains(&self.stats_period_ms) {
            return Err("universe.stats_period_ms must be in 1000..=86400000".into());
        }
        if self.stats_work_ms >= self.stats_period_ms {
            return Err("universe.stats_work_ms must be shorter than the period".into());
        }
        if self.fault_campaign_write_delay_ms > 60_000 {
            return Err("universe.fault_campaign_write_delay_ms must be at most 60000".into());
        }
        if !(1..=60_000).contains(&self.call_timeout_ms) {
            return Err("universe.call_timeout_ms must be in 1..=60000".into());
        }
        Ok(())
    }
}

/// The universe service of one node.
pub struct Universe {
    cfg: UniverseConfig,
    meta: UniverseMeta,
    store: Arc<dyn Store>,
    /// Set once the node runs (NPCs, the job and the console call shards).
    node: OnceLock<Node>,
    loaded: Mutex<u64>,
    /// The NPC driver's calls, counted by outcome.
    calls: CallCounts,
}

/// The calls the NPC driver makes (a fixed label set).
pub const NPC_CALLS: [&str; 4] = ["jump", "trade", "campaign_tick", "record"];

/// NPC calls made (by call) and failed (by call and [`CallError::kind`]).
/// Both label sets are fixed: [`NPC_CALLS`] and [`CallError::KINDS`].
#[derive(Debug, Default)]
pub struct CallCounts {
    inner: Mutex<CallTally>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CallTally {
    made: BTreeMap<&'static str, u64>,
    failed: BTreeMap<(&'static str, &'static str), u64>,
}

impl CallCounts {
    /// One call of `call` ended with `result`.
    pub fn record(&self, call: &'static str, result: Result<(), &CallError>) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *t.made.entry(call).or_default() += 1;
        if let Err(e) = result {
            *t.failed.entry((call, e.kind())).or_default() += 1;
        }
    }

    /// Failed calls so far, by (call, kind).
    pub fn failures(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .clone()
    }

    /// As `/metrics` exports them: every NPC call's count (0 included),
    /// and the failures seen.
    pub fn counters(&self, service: &str) -> Vec<ServiceCounter> {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: Vec<ServiceCounter> = NPC_CALLS
            .iter()
            .map(|call| ServiceCounter {
                name: "app_calls",
                help: "Calls the application made (the universe's NPC driver), by call",
                labels: vec![("service", service.to_string()), ("call", call.to_string())],
                value: t.made.get(call).copied().unwrap_or(0),
            })
            .collect();
        out.extend(t.failed.iter().map(|((call, kind), n)| ServiceCounter {
            name: "app_call_failures",
            help: "Application calls that failed, by call and error kind (CallError::kind), never dropped silently",
            labels: vec![
                ("service", service.to_string()),
                ("call", call.to_string()),
                ("kind", kind.to_string()),
            ],
            value: *n,
        }));
        out
    }
}

fn err(e: impl std::fmt::Display) -> CallError {
    CallError::Handler(e.to_string())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(v).map_err(err)
}

fn parse<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, CallError> {
    serde_json::from_slice(b).map_err(|e| CallError::Handler(format!("bad payload: {e}")))
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, orrery_store::StoreError> + Send + 'static,
) -> Result<T, CallError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(&*s))
        .await
        .map_err(err)?
        // A stale owner's refusal is typed (retried on the new owner).
        .map_err(CallError::from)
}

fn period_of(now_ms: u64, period_ms: u64) -> u64 {
    now_ms / period_ms.max(1)
}

impl Universe {
    /// Reads the imported universe's meta row (refusing a half-written one).
    pub fn open(cfg: UniverseConfig, store: Arc<dyn Store>) -> Result<Arc<Universe>, String> {
        cfg.validate()?;
        let meta = import::meta(&*store).map_err(|e| e.to_string())?;
        Ok(Arc::new(Universe {
            cfg,
            meta,
            store,
            node: OnceLock::new(),
            loaded: Mutex::new(0),
            calls: CallCounts::default(),
        }))
    }

    /// Hands the running node to the service.
    pub fn attach(&self, node: Node) {
        let _ = self.node.set(node);
    }

    pub fn meta(&self) -> &UniverseMeta {
        &self.meta
    }

    /// The NPC driver's calls, counted by outcome.
    pub fn calls(&self) -> &CallCounts {
        &self.calls
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.call_timeout_ms)
    }

    async fn call(&self, shard: ShardId, call: &str, payload: Vec<u8>) -> Result<Vec<u8>, String> {
        let node = self.node.get().ok_or("the node is not running yet")?;
        node.call(shard, call, payload, self.call_timeout())
            .await
            .map_err(|e| e.to_string())
    }

    /// The NPCs of this node: jumps, trades and campaign progress at
    /// `npc_ops_per_s`, counted per region and reported to the regions.
    async fn npcs(self: Arc<Self>) {
        let per_tick = (self.cfg.npc_ops_per_s / 10).max(1);
        if self.cfg.npc_ops_per_s == 0 || self.meta.systems == 0 {
            return;
        }
        let mut rng = rand::rngs::SmallRng::from_entropy();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut counts: BTreeMap<u32, Activity> = BTreeMap::new();
        let mut ticks = 0u64;
        let mut failures_logged = 0u64;
        loop {
            tick.tick().await;
            let Some(node) = self.node.get() else {
                continue;
            };
            let period = period_of(orrery_node::clock::now_ms(), self.cfg.stats_period_ms);
            let mut calls = Vec::with_capacity(per_tick as usize);
            for _ in 0..per_tick {
                let roll = rng.gen_range(0..10);
                let (shard, call, region, kind) = if roll < 6 {
                    let s = rng.gen_range(0..self.meta.systems) as u32;
                    (
                        ShardId {
                            kind: SOLAR_SYSTEM,
                            key: s as u64,
                        },
                        "jump",
                        self.meta.system_region[s as usize],
                        0,
                    )
                } else if roll < 9 {
                    let r = rng.gen_range(0..self.meta.regions) as u32;
                    (
                        ShardId {
                            kind: MARKET_REGION,
                            key: r as u64,
                        },
                        "trade",
                        r,
                        1,
                    )
                } else {
                    if self.meta.campaign_systems.is_empty() {
                        continue;
                    }
                    let s = self.meta.campaign_systems
                        [rng.gen_range(0..self.meta.campaign_systems.len())];
                    (
                        ShardId {
                            kind: SOLAR_SYSTEM,
                            key: s as u64,
                        },
                        "campaign_tick",
                        self.meta.system_region[s as usize],
                        2,
                    )
                };
                let delta: i8 = rng.gen_range(-3..=5);
                let payload = if kind == 2 { vec![delta as u8] } else { vec![] };
                calls.push((shard, call, region, kind, payload));
            }
            let results = futures_join(node, calls, self.call_timeout()).await;
            for (region, kind, call, result) in results {
                self.calls.record(call, result.as_ref().map(|_| ()));
                if result.is_err() {
                    continue;
                }
                let a = counts.entry(region).or_default();
                match kind {
                    0 => a.jumps += 1,
                    2 => a.campaign_events += 1,
                    _ => {}
                }
            }
            ticks += 1;
            if ticks % 10 == 0 && !counts.is_empty() {
                for (region, a) in std::mem::take(&mut counts) {
                    let shard = ShardId {
                        kind: MARKET_REGION,
                        key: region as u64,
                    };
                    let rec = Record {
                        period,
                        jumps: a.jumps,
                        campaign_events: a.campaign_events,
                    };
                    if let Ok(p) = serde_json::to_vec(&rec) {
                        let r = node.call(shard, "record", p, self.call_timeout()).await;
                        self.calls.record("record", r.as_ref().map(|_| ()));
                    }
                }
            }
            // Failures are counted in /metrics; the log says so at most
            // every 10 s, with the counts by kind.
            if ticks % 100 == 0 {
                let failed = self.calls.failures();
                let total: u64 = failed.values().sum();
                if total > failures_logged {
                    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
                    for ((_, kind), n) in &failed {
                        *by_kind.entry(kind).or_default() += n;
                    }
                    let text: Vec<String> =
                        by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    tracing::warn!(target: LOG, "NPC calls failed: {} so far ({})", total, text.join(", "));
                    failures_logged = total;
                }
            }
        }
    }
}

/// Runs the calls at once; each ends with (region, kind, call, result).
async fn futures_join(
    node: &Node,
    calls: Vec<(ShardId, &'static str, u32, u8, Vec<u8>)>,
    timeout: Duration,
) -> Vec<(u32, u8, &'static str, Result<(), CallError>)> {
    let mut set = tokio::task::JoinSet::new();
    for (shard, call, region, kind, payload) in calls {
        let node = node.clone();
        set.spawn(async move {
            let r = node.call(shard, call, payload, timeout).await.map(|_| ());
            (region, kind, call, r)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub jumps: u64,
    pub trades: u64,
    pub campaign_events: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    period: u64,
    jumps: u64,
    campaign_events: u64,
}

#[derive(Serialize, Deserialize)]
struct CapitalChanged {
    alliance: u32,
    is_capital: bool,
}

// ---- shards ----

struct SystemShard {
    write_delay: Duration,
    system: System,
    campaigns: Vec<Campaign>,
    capital_of: Option<u32>,
    store: Arc<dyn Store>,
    name: String,
    epoch: u64,
    jumps: u64,
}

struct AllianceShard {
    alliance: Alliance,
    store: Arc<dyn Store>,
    name: String,
    epoch: u64,
    fault_push: bool,
}

struct RegionShard {
    id: u32,
    orders: Vec<MarketOrder>,
    store: Arc<dyn Store>,
    name: String,
    epoch: u64,
    period_ms: u64,
    activity: BTreeMap<u64, Activity>,
}

impl ShardService for Universe {
    fn kinds(&self) -> Vec<KindSpec> {
        vec![
            KindSpec::new("solar_system", 0..self.meta.systems),
            KindSpec::new("alliance", 0..self.meta.alliances),
            KindSpec::new("market_region", 0..self.meta.regions),
        ]
    }

    fn load(
        &self,
        shard: ShardId,
        ctx: CallCtx,
    ) -> ShardFuture<'_, Result<Box<dyn ShardActor>, CallError>> {
        Box::pin(async move {
            let epoch = ctx.owner_epoch.ok_or_else(|| err("no ownership epoch"))?;
            let actor: Box<dyn ShardActor> = match shard.kind {
                SOLAR_SYSTEM => Box::new(self.load_system(shard.key as u32, epoch, &ctx).await?),
                ALLIANCE => {
                    let name = import::alliance_shard(shard.key as u32);
                    let (n, e) = (name.clone(), epoch);
                    let row = blocking(&self.store, move |s| {
                        s.claim_shard(&n, e)?;
                        s.get(&n, "alliance", "row")
                    })
                    .await?
                    .ok_or_else(|| err(format!("{name}: no row in the store")))?;
                    Box::new(AllianceShard {
                        alliance: parse(&row)?,
                        store: self.store.clone(),
                        name,
                        epoch,
                        fault_push: self.cfg.fault_capital_push_on_lookup,
                    })
                }
                MARKET_REGION => {
                    let name = import::region_shard(shard.key as u32);
                    let (n, e) = (name.clone(), epoch);
                    let rows = blocking(&self.store, move |s| {
                        s.claim_shard(&n, e)?;
                        s.scan(&n, "order", None, 10_000)
                    })
                    .await?;
                    let orders = rows
                        .iter()
                        .map(|(_, v)| parse(v))
                        .collect::<Result<Vec<MarketOrder>, _>>()?;
                    Box::new(RegionShard {
                        id: shard.key as u32,
                        orders,
                        store: self.store.clone(),
                        name,
                        epoch,
                        period_ms: self.cfg.stats_period_ms,
                        activity: BTreeMap::new(),
                    })
                }
                other => {
                    return Err(CallError::UnknownShard {
                        kind: other,
                        key: shard.key,
                    })
                }
            };
            *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            Ok(actor)
        })
    }
}

impl Universe {
    async fn load_system(
        &self,
        id: u32,
        epoch: u64,
        ctx: &CallCtx,
    ) -> Result<SystemShard, CallError> {
        let name = import::system_shard(id);
        let (n, e) = (name.clone(), epoch);
        let (row, campaigns) = blocking(&self.store, move |s| {
            s.claim_shard(&n, e)?;
            Ok((
                s.get(&n, "system", "row")?,
                s.scan(&n, "campaign", None, 1_000)?,
            ))
        })
        .await?;
        let system: System =
            parse(&row.ok_or_else(|| err(format!("{name}: no row in the store")))?)?;
        let campaigns = campaigns
            .iter()
            .map(|(_, v)| parse(v))
            .collect::<Result<Vec<Campaign>, _>>()?;
        let mut capital_of = None;
        // The post-mortem's load-time call: a system with a campaign asks
        // the defending alliance (usually on another node) for its capital.
        for c in &campaigns {
            let alliance = ShardId {
                kind: ALLIANCE,
                key: c.defender as u64,
            };
            let capital: u32 = parse(&ctx.call(alliance, "capital", vec![]).await?)?;
            if capital == id {
                capital_of = Some(c.defender);
            }
        }
        Ok(SystemShard {
            write_delay: Duration::from_millis(self.cfg.fault_campaign_write_delay_ms),
            system,
            campaigns,
            capital_of,
            store: self.store.clone(),
            name,
            epoch,
            jumps: 0,
        })
    }
}

impl ShardActor for SystemShard {
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        _ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            match call {
                "jump" => {
                    self.jumps += 1;
                    json(&self.jumps)
                }
                "campaign_tick" => {
                    let delta = payload.first().map(|b| *b as i8).unwrap_or(1);
                    let Some(c) = self.campaigns.first_mut() else {
                        return Err(err(format!("system {} has no campaign", self.system.id)));
                    };
                    let mut next = c.clone();
                    next.score = (i16::from(next.score) + i16::from(delta)).clamp(0, 100) as u8;
                    let (n, e, key, row) = (
                        self.name.clone(),
                        self.epoch,
                        next.id.to_string(),
                        json(&next)?,
                    );
                    // Fenced: refused as stale if this node lost the shard.
                    // Once issued, a write completes even if the caller gives
                    // up (as a statement sent to a database does).
                    let (store, delay) = (self.store.clone(), self.write_delay);
                    let write = tokio::spawn(async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let label = n.clone();
                        let r = blocking(&store, move |s| {
                            s.write(&n, e, &[Op::put("campaign", key, row)])
                        })
                        .await;
                        if let Err(why) = &r {
                            tracing::warn!(target: LOG, "campaign write for {label} at ownership epoch {e} refused: {why}");
                        }
                        r
                    });
                    write.await.map_err(err)??;
                    *c = next;
                    json(&c.score)
                }
                "capital_changed" => {
                    let m: CapitalChanged = parse(&payload)?;
                    self.capital_of = if m.is_capital { Some(m.alliance) } else { None };
                    Ok(vec![])
                }
                "campaigns" => json(&serde_json::json!({
                    "system": self.system.id, "name": self.system.name, "region": self.system.region,
                    "sovereign": self.system.sovereign, "capital_of": self.capital_of,
                    "campaigns": self.campaigns, "jumps_since_load": self.jumps, "owner_epoch": self.epoch,
                })),
                other => Err(CallError::UnknownCall {
                    kind: "solar_system".into(),
                    call: other.into(),
                }),
            }
        })
    }
}

impl AllianceShard {
    async fn push(&self, system: u32, is_capital: bool, ctx: &CallCtx) -> Result<(), CallError> {
        let msg = json(&CapitalChanged {
            alliance: self.alliance.id,
            is_capital,
        })?;
        ctx.call(
            ShardId {
                kind: SOLAR_SYSTEM,
                key: system as u64,
            },
            "capital_changed",
            msg,
        )
        .await?;
        Ok(())
    }
}

impl ShardActor for AllianceShard {
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            match call {
                "capital" => {
                    if self.fault_push {
                        // The post-mortem: the alliance will not answer until
                        // the system asking (which is loading its campaign)
                        // acknowledges the capital status it pushes first.
                        let asking = ctx
                            .chain
                            .iter()
                            .find(|h| h.shard.kind == SOLAR_SYSTEM)
                            .map(|h| h.shard.key as u32)
                            .unwrap_or(self.alliance.capital);
                        let is_capital = asking == self.alliance.capital;
                        self.push(asking, is_capital, &ctx).await?;
                    }
                    json(&self.alliance.capital)
                }
                "set_capital" => {
                    let system: u32 = parse(&payload)?;
                    let old = self.alliance.capital;
                    let mut next = self.alliance.clone();
                    next.capital = system;
                    let (n, e, row) = (self.name.clone(), self.epoch, json(&next)?);
                    blocking(&self.store, move |s| {
                        s.write(&n, e, &[Op::put("alliance", "row", row)])
                    })
                    .await?;
                    self.alliance = next;
                    if old != system {
                        self.push(old, false, &ctx).await?;
                    }
                    self.push(system, true, &ctx).await?;
                    json(&system)
                }
                other => Err(CallError::UnknownCall {
                    kind: "alliance".into(),
                    call: other.into(),
                }),
            }
        })
    }
}

impl RegionShard {
    fn activity(&mut self, period: u64) -> &mut Activity {
        while self.activity.len() >= KEEP_PERIODS && !self.activity.contains_key(&period) {
            let oldest = *self.activity.keys().next().expect("non-empty");
            self.activity.remove(&oldest);
        }
        self.activity.entry(period).or_default()
    }
}

impl ShardActor for RegionShard {
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        _ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            match call {
                "trade" => {
                    let period = period_of(orrery_node::clock::now_ms(), self.period_ms);
                    if let Some(o) = self.orders.iter_mut().find(|o| o.quantity > 0) {
                        o.quantity -= 1;
                        let (n, e, key, row) =
                            (self.name.clone(), self.epoch, o.id.to_string(), json(&*o)?);
                        blocking(&self.store, move |s| {
                            s.write(&n, e, &[Op::put("order", key, row)])
                        })
                        .await?;
                    }
                    self.activity(period).trades += 1;
                    Ok(vec![])
                }
                "record" => {
                    let r: Record = parse(&payload)?;
                    let a = self.activity(r.period);
                    a.jumps += r.jumps;
                    a.campaign_events += r.campaign_events;
                    Ok(vec![])
                }
                "stats" => {
                    let period: u64 = parse(&payload)?;
                    json(&self.activity.get(&period).copied().unwrap_or_default())
                }
                "orders" => json(&serde_json::json!({
                    "region": self.id,
                    "orders": self.orders.len(),
                    "open_quantity": self.orders.iter().map(|o| u64::from(o.quantity)).sum::<u64>(),
                    "best_sell": self.orders.iter().filter(|o| !o.buy && o.quantity > 0).map(|o| o.price).min(),
                    "best_buy": self.orders.iter().filter(|o| o.buy && o.quantity > 0).map(|o| o.price).max(),
                    "activity": self.activity,
                })),
                other => Err(CallError::UnknownCall {
                    kind: "market_region".into(),
                    call: other.into(),
                }),
            }
        })
    }
}

// ---- stages, job, console ----

/// Starts the NPCs once the cluster is ready.
pub struct UniverseStages(pub Arc<Universe>);

impl Service for UniverseStages {
    fn name(&self) -> &str {
        "universe"
    }

    fn counters(&self) -> Vec<ServiceCounter> {
        self.0.calls.counters("universe")
    }

    fn on_stage<'a>(&'a self, stage: Stage, ctx: &'a StageContext) -> ServiceFuture<'a> {
        Box::pin(async move {
            if stage == Stage::READY {
                ctx.step("universe", "starting NPC activity");
                tracing::info!(target: LOG, "NPC activity starts: {} ops/s from this node", self.0.cfg.npc_ops_per_s);
                let u = self.0.clone();
                tokio::spawn(u.npcs());
            }
            Ok(())
        })
    }
}

/// The per-minute statistics job: sums every region's activity of the
/// period before the one it runs in.
pub struct StatsJob(pub Arc<Universe>);

pub const STATS_JOB: &str = "universe_stats";

impl PeriodicJob for StatsJob {
    fn spec(&self) -> JobSpec {
        let p = self.0.cfg.stats_period_ms;
        JobSpec::new(STATS_JOB, p, p * 9 / 10)
    }

    fn run(&self, run: JobRun) -> BoxedFuture<'_, Result<JobOutput, String>> {
        Box::pin(async move {
            let of = run.period.saturating_sub(1);
            if self.0.cfg.stats_work_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.0.cfg.stats_work_ms)).await;
            }
            let mut rows = Vec::new();
            let mut total = Activity::default();
            for r in 0..self.0.meta.regions {
                let shard = ShardId {
                    kind: MARKET_REGION,
                    key: r,
                };
                let a: Activity = serde_json::from_slice(
                    &self
                        .0
                        .call(
                            shard,
                            "stats",
                            serde_json::to_vec(&of).map_err(|e| e.to_string())?,
                        )
                        .await?,
                )
                .map_err(|e| e.to_string())?;
                total.jumps += a.jumps;
                total.trades += a.trades;
                total.campaign_events += a.campaign_events;
                rows.push((
                    format!("region/{r}"),
                    serde_json::to_vec(&a).map_err(|e| e.to_string())?,
                ));
            }
            rows.push((
                "total".into(),
                serde_json::to_vec(&total).map_err(|e| e.to_string())?,
            ));
            Ok(JobOutput {
                rows,
                summary: format!(
                    "period {of}: {} jumps, {} trades, {} campaign events in {} regions",
                    total.jumps, total.trades, total.campaign_events, self.0.meta.regions
                ),
            })
        })
    }
}

/// `universe campaigns SYSTEM`, `universe market REGION`, `universe stats`.
pub struct UniverseConsole(pub Arc<Universe>);

impl ConsoleExtension for UniverseConsole {
    fn word(&self) -> &'static str {
        "universe"
    }

    fn usage(&self) -> Vec<&'static str> {
        vec![
            "universe campaigns SYSTEM",
            "universe market REGION",
            "universe stats [N]",
            "universe tick SYSTEM [DELTA] (progress the system's campaign)",
        ]
    }

    fn is_mutation(&self, args: &[String]) -> bool {
        args.first().is_some_and(|a| a == "tick")
    }

    fn run<'a>(
        &'a self,
        args: &'a [String],
    ) -> BoxedFuture<'a, Result<(String, serde_json::Value), String>> {
        Box::pin(async move {
            let number = |i: usize, what: &str, max: u64| -> Result<u64, String> {
                let v: u64 = args
                    .get(i)
                    .ok_or_else(|| format!("usage: universe {what}"))?
                    .parse()
                    .map_err(|_| format!("{} is not a number", args[i]))?;
                if v >= max {
                    return Err(format!("no such {what}: {v} (the universe has {max})"));
                }
                Ok(v)
            };
            let reply = |b: Vec<u8>| -> Result<serde_json::Value, String> {
                serde_json::from_slice(&b).map_err(|e| e.to_string())
            };
            match args.first().map(String::as_str) {
                Some("campaigns") if args.len() == 2 => {
                    let s = number(1, "campaigns SYSTEM", self.0.meta.systems)?;
                    let v = reply(
                        self.0
                            .call(
                                ShardId {
                                    kind: SOLAR_SYSTEM,
                                    key: s,
                                },
                                "campaigns",
                                vec![],
                            )
                            .await?,
                    )?;
                    let n = v["campaigns"].as_array().map(|a| a.len()).unwrap_or(0);
                    Ok((
                        format!(
                            "system {s}: {n} campaign(s), capital of {}",
                            v["capital_of"]
                        ),
                        v,
                    ))
                }
                Some("tick") if (2..=3).contains(&args.len()) => {
                    let s = number(1, "tick SYSTEM", self.0.meta.systems)?;
                    let delta: i8 = match args.get(2) {
                        Some(d) => d
                            .parse()
                            .map_err(|_| format!("{d} is not a delta (-100..100)"))?,
                        None => 1,
                    };
                    let v = reply(
                        self.0
                            .call(
                                ShardId {
                                    kind: SOLAR_SYSTEM,
                                    key: s,
                                },
                                "campaign_tick",
                                vec![delta as u8],
                            )
                            .await?,
                    )?;
                    Ok((format!("system {s}: campaign score {v}"), v))
                }
                Some("market") if args.len() == 2 => {
                    let r = number(1, "market REGION", self.0.meta.regions)?;
                    let v = reply(
                        self.0
                            .call(
                                ShardId {
                                    kind: MARKET_REGION,
                                    key: r,
                                },
                                "orders",
                                vec![],
                            )
                            .await?,
                    )?;
                    Ok((
                        format!(
                            "region {r}: {} orders, best sell {}, best buy {}",
                            v["orders"], v["best_sell"], v["best_buy"]
                        ),
                        v,
                    ))
                }
                Some("stats") if args.len() <= 2 => {
                    let n = args
                        .get(1)
                        .and_then(|x| x.parse::<u64>().ok())
                        .unwrap_or(5)
                        .clamp(1, 100);
                    let store = self.0.store.clone();
                    let now = period_of(orrery_node::clock::now_ms(), self.0.cfg.stats_period_ms);
                    let rows = tokio::task::spawn_blocking(move || {
                        store.job_periods(STATS_JOB, now.saturating_sub(n), now + 1)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    let periods: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            let total = r.rows.iter().find(|(k, _)| k == "total").and_then(|(_, v)| serde_json::from_slice::<Activity>(v).ok()).unwrap_or_default();
                            serde_json::json!({"period": r.period, "lease_epoch": r.lease_epoch, "total": total})
                        })
                        .collect();
                    Ok((
                        format!("{} committed periods", periods.len()),
                        serde_json::Value::Array(periods),
                    ))
                }
                _ => Err(format!("usage: {}", self.usage().join(" | "))),
            }
        })
    }
}

/// Loaded shards on this node (for progress reports).
pub fn loaded(u: &Universe) -> u64 {
    *u.loaded.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npc_call_failures_are_counted_by_typed_kind() {
        let c = CallCounts::default();
        c.record("jump", Ok(()));
        c.record("jump", Err(&CallError::Moved { version: 3 }));
        c.record("jump", Err(&CallError::Moved { version: 4 }));
        c.record("trade", Err(&CallError::Timeout));
        // The message text plays no part: a handler error mentioning a
        // timeout is a handler error.
        c.record(
            "record",
            Err(&CallError::Handler("timeout talking to the store".into())),
        );
        let f = c.failures();
        assert_eq!(f[&("jump", "moved")], 2);
        assert_eq!(f[&("trade", "timeout")], 1);
        assert_eq!(f[&("record", "handler")], 1);
        assert_eq!(f.len(), 3);
        let out = c.counters("universe");
        let made: Vec<(String, u64)> = out
            .iter()
            .filter(|k| k.name == "app_calls")
            .map(|k| (k.labels[1].1.clone(), k.value))
            .collect();
        assert_eq!(
            made,
            vec![
                ("jump".into(), 3),
                ("trade".into(), 1),
                ("campaign_tick".into(), 0),
                ("record".into(), 1)
            ]
        );
        let moved = out
            .iter()
            .find(|k| k.name == "app_call_failures" && k.labels.contains(&("kind", "moved".into())))
            .unwrap();
        assert_eq!(moved.value, 2);
        assert_eq!(moved.labels[0], ("service", "universe".to_string()));
        assert!(out
            .iter()
            .filter(|k| k.name == "app_call_failures")
            .all(|k| CallError::KINDS.contains(&k.labels[2].1.as_str())));
    }
}
