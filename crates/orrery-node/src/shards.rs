//! Shards on a node: single-threaded actors with bounded mailboxes, loaded
//! and unloaded as the replicated shard map says, and routed calls between
//! them with deadlines, typed errors and wait-cycle (deadlock) detection.
//!
//! Why actors: each shard's state is touched by one call at a time, so
//! application code needs no locks; a bounded mailbox turns overload into a
//! fast `Overloaded` error instead of an unbounded queue.
//!
//! Reentrancy rule (explicit): a shard handles one call at a time and is
//! *not reentrant*. A shard that is awaiting a call it made cannot take
//! another call meanwhile; so a call whose chain of waiting callers already
//! contains the target shard can never be served — that is a wait cycle, and
//! it fails at once with [`CallError::Deadlock`] carrying the whole cycle.
//!
//! Fenced ownership: a node serves a shard only while the shard map it holds
//! names it the owner under the current ownership epoch *and* its own lease
//! is fresh; otherwise the call is answered `Moved` or `Fenced`.
//!
//! Hand-over between live owners: a shard taken over from a previous owner
//! is *loaded* — which raises its fence in the store — only `handover`
//! after this node learned of the move, by when the previous owner has
//! heard of it or fenced itself; so a live previous owner is not cut off
//! in the middle of the calls it still accepted. Calls queued at a shard
//! that was unloaded are answered `Moved`, not run, and a write the store
//! refuses as a stale owner's anyway (a call already running when the
//! fence rose) reaches the caller as `Unavailable`, which the router
//! retries on the new owner; the refusal itself stands.
//!
//! What this module must never do: decide placement (the coordinator does),
//! queue without a bound, or wait without a deadline.

use orrery_core::shardmap::{KindSpec, ShardId, ShardMap};
use orrery_core::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

const LOG: &str = "orrery::shards";

/// Boxed future used by the shard traits.
pub type ShardFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One hop of a call chain: who is waiting on whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    pub node: NodeId,
    pub shard: ShardId,
    pub call: String,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} shard {}:{} call {}",
            self.node, self.shard.kind, self.shard.key, self.call
        )
    }
}

/// Why a routed call failed. Every variant says enough to act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CallError {
    #[error("deadline passed before the call completed")]
    Timeout,
    #[error("shard moved: the owner changed (map version {version}); retry with the newer map")]
    Moved { version: u64 },
    #[error("node {node} is fenced and serves no shards: {reason}")]
    Fenced { node: NodeId, reason: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("deadlock: wait cycle {}", render_cycle(.cycle))]
    Deadlock { cycle: Vec<Hop> },
    #[error("no service owns shard kind {kind} key {key}")]
    UnknownShard { kind: u16, key: u64 },
    #[error("unknown call {call:?} for shard kind {kind}")]
    UnknownCall { kind: String, call: String },
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("handler failed: {0}")]
    Handler(String),
    /// The map moved the shard away from `owner` while the call was in
    /// flight there, and `owner` did not answer within
    /// `shards.moved_owner_grace_ms`: it may or may not have run the call.
    /// Never retried by the router (a re-sent call could apply twice).
    #[error("in doubt: the shard moved off node {owner} (map version {version}) while the call was in flight there and node {owner} did not answer; it may or may not have taken effect")]
    InDoubt { owner: NodeId, version: u64 },
}

impl CallError {
    /// Every [`CallError::kind`], for metrics (a fixed, bounded label set).
    pub const KINDS: [&'static str; 11] = [
        "timeout",
        "moved",
        "fenced",
        "overloaded",
        "unavailable",
        "deadlock",
        "unknown_shard",
        "unknown_call",
        "too_large",
        "handler",
        "in_doubt",
    ];

    /// A stable label for the variant (metrics count failures by it; it is
    /// never parsed back from the message text).
    pub fn kind(&self) -> &'static str {
        let i = match self {
            CallError::Timeout => 0,
            CallError::Moved { .. } => 1,
            CallError::Fenced { .. } => 2,
            CallError::Overloaded(_) => 3,
            CallError::Unavailable(_) => 4,
            CallError::Deadlock { .. } => 5,
            CallError::UnknownShard { .. } => 6,
            CallError::UnknownCall { .. } => 7,
            CallError::TooLarge { .. } => 8,
            CallError::Handler(_) => 9,
            CallError::InDoubt { .. } => 10,
        };
        Self::KINDS[i]
    }
}

/// A store error met while serving a call: a fencing refusal of the shard's
/// write ([`orrery_store::StoreError::StaleOwner`]: a newer owner took the
/// shard over) is [`CallError::Unavailable`], which the router retries on
/// the new owner — the write itself stays refused; anything else is the
/// handler's failure.
impl From<orrery_store::StoreError> for CallError {
    fn from(e: orrery_store::StoreError) -> Self {
        match e {
            orrery_store::StoreError::StaleOwner { .. } => CallError::Unavailable(format!(
                "{e} (a newer owner took the shard over; retry there)"
            )),
            e => CallError::Handler(e.to_string()),
        }
    }
}

fn render_cycle(cycle: &[Hop]) -> String {
    cycle
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// What a handler knows about the call it is serving, and how it makes
/// nested calls (the deadline and the chain propagate).
#[derive(Clone)]
pub struct CallCtx {
    pub deadline: Instant,
    /// Callers waiting on this call, outermost first (this hop included).
    pub chain: Vec<Hop>,
    /// The ownership epoch this node holds the shard under (set for loads
    /// and calls served here): the token every store write for the shard
    /// carries, so a former owner's late write is refused as stale.
    pub owner_epoch: Option<u64>,
    router: Option<Arc<dyn Router>>,
}

impl CallCtx {
    pub fn new(deadline: Instant, chain: Vec<Hop>, router: Option<Arc<dyn Router>>) -> Self {
        CallCtx {
            deadline,
            chain,
            owner_epoch: None,
            router,
        }
    }

    /// Calls another shard from inside a handler: the remaining deadline and
    /// the chain of waiting callers go with it (cancelled if this call is).
    pub async fn call(
        &self,
        shard: ShardId,
        call: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, CallError> {
        let Some(r) = &self.router else {
            return Err(CallError::Unavailable("no router in this context".into()));
        };
        r.route(
            shard,
            call.to_string(),
            payload,
            self.deadline,
            self.chain.clone(),
        )
        .await
    }
}

/// Routes calls to shard owners (implemented by the node).
pub trait Router: Send + Sync + 'static {
    fn route(
        &self,
        shard: ShardId,
        call: String,
        payload: Vec<u8>,
        deadline: Instant,
        chain: Vec<Hop>,
    ) -> ShardFuture<'_, Result<Vec<u8>, CallError>>;
}

/// One loaded shard: its state and its call handler.
pub trait ShardActor: Send + 'static {
    /// Handles one call; never runs concurrently with another on this shard.
    fn handle<'a>(
        &'a mut self,
        call: &'a str,
        payload: Vec<u8>,
        ctx: CallCtx,
    ) -> ShardFuture<'a, Result<Vec<u8>, CallError>>;
}

/// A service that owns shard kinds.
pub trait ShardService: Send + Sync + 'static {
    /// The shard kinds (with their keys) this service declares.
    fn kinds(&self) -> Vec<KindSpec>;
    /// Loads `shard` on this node (it was assigned here).
    fn load(
        &self,
        shard: ShardId,
        ctx: CallCtx,
    ) -> ShardFuture<'_, Result<Box<dyn ShardActor>, CallError>>;
}

/// Bounds of the shard runtime (config section `[shards]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// Calls queued per shard before callers get `Overloaded`. Default 256.
    pub mailbox: usize,
    /// A handler running longer than this is reported. Default 500.
    pub slow_handler_ms: u64,
    /// How long a call waits for a shard that is loading. Default 2000.
    pub load_wait_ms: u64,
    /// Largest call payload. Default 1 MiB.
    pub max_payload: usize,
    /// A failed load is retried after 100 ms, doubling up to this. Default 5000.
    pub load_retry_max_ms: u64,
    /// A remote call whose shard the map moves off its owner while the
    /// call is in flight waits this much longer for that owner's answer
    /// (a live owner finishes its in-flight calls before it hands over),
    /// then fails `InDoubt` instead of waiting out its deadline on an owner
    /// that stopped answering. Default 1000.
    pub moved_owner_grace_ms: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            mailbox: 256,
            slow_handler_ms: 500,
            load_wait_ms: 2_000,
            max_payload: 1 << 20,
            load_retry_max_ms: 5_000,
            moved_owner_grace_ms: 1_000,
        }
    }
}

impl ShardsConfig {
    /// Every bound positive and finite, so no call waits without one.
    pub fn validate(&self) -> Result<(), String> {
        let in_range = |name: &str, v: u64| {
            if (1..=600_000).contains(&v) {
                Ok(())
            } else {
                Err(format!("shards.{name} must be 1..=600000 ms, got {v}"))
            }
        };
        in_range("slow_handler_ms", self.slow_handler_ms)?;
        in_range("load_wait_ms", self.load_wait_ms)?;
        in_range("load_retry_max_ms", self.load_retry_max_ms)?;
        in_range("moved_owner_grace_ms", self.moved_owner_grace_ms)?;
        if self.mailbox == 0 || self.max_payload == 0 {
            return Err("shards.mailbox and shards.max_payload must be positive".into());
        }
        Ok(())
    }
}

struct Envelope {
    call: String,
    payload: Vec<u8>,
    ctx: CallCtx,
    reply: oneshot::Sender<Result<Vec<u8>, CallError>>,
}

/// A loaded (or loading) shard on this node.
struct Slot {
    epoch: u64,
    tx: mpsc::Sender<Envelope>,
    /// The call the actor is running now, with its chain (for diagnosis).
    busy: Arc<Mutex<Option<Vec<Hop>>>>,
    /// Set (to the map version that took the shard away) when the slot is
    /// unloaded: the actor answers calls still queued with `Moved`.
    unloaded: Arc<AtomicU64>,
}

/// What this node hosts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostedShards {
    pub map_version: u64,
    /// Shards the map assigns to this node.
    pub assigned: usize,
    /// Shards loaded and serving.
    pub loaded: usize,
    /// Moves in progress: assigned here but not loaded yet.
    pub loading: usize,
    /// Shards whose last load failed (they are retried with backoff).
    #[serde(default)]
    pub failing: usize,
    /// The latest load failure: shard and error.
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// The shards of one node.
pub struct ShardHost {
    me: NodeId,
    cfg: ShardsConfig,
    /// Hand-over delay: a shard taken over from a previous owner is loaded
    /// (its store fence raised) and served only this long after this node
    /// first saw the assignment (the node's `self_fence_after_ms`), by when
    /// the previous owner has either heard of the move or fenced itself.
    /// Never two owners serving at once, and the fence never rises under a
    /// previous owner still serving.
    handover: Duration,
    /// When this node first saw each shard assigned to it, by epoch.
    assigned_at: Mutex<BTreeMap<ShardId, (u64, Instant)>>,
    /// The newest map version the leader announced (heartbeat acks).
    announced: std::sync::atomic::AtomicU64,
    /// Notified when `announced` rises.
    announced_rose: tokio::sync::Notify,
    service: Option<Arc<dyn ShardService>>,
    slots: Mutex<BTreeMap<ShardId, Slot>>,
    loading: Mutex<BTreeMap<ShardId, u64>>,
    /// Shards whose last load failed: attempts so far and the error.
    failures: Mutex<BTreeMap<ShardId, (u32, String)>>,
    map: Mutex<Arc<ShardMap>>,
    changed: tokio::sync::Notify,
}

impl ShardHost {
    pub fn new(
        me: NodeId,
        cfg: ShardsConfig,
        handover: Duration,
        service: Option<Arc<dyn ShardService>>,
    ) -> Self {
        ShardHost {
            me,
            cfg,
            handover,
            assigned_at: Mutex::new(BTreeMap::new()),
            announced: std::sync::atomic::AtomicU64::new(0),
            announced_rose: tokio::sync::Notify::new(),
            service,
            slots: Mutex::new(BTreeMap::new()),
            loading: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            map: Mutex::new(Arc::new(ShardMap::default())),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn cfg(&self) -> &ShardsConfig {
        &self.cfg
    }

    pub fn kinds(&self) -> Vec<KindSpec> {
        self.service.as_ref().map(|s| s.kinds()).unwrap_or_default()
    }

    /// The shard map this node routes by.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn status(&self) -> HostedShards {
        let map = self.map();
        let assigned = map.entries.values().filter(|e| e.owner == self.me).count();
        let loaded = self.slots.lock().unwrap_or_else(|e| e.into_inner()).len();
        let loading = self.loading.lock().unwrap_or_else(|e| e.into_inner()).len();
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let last_failure = failures
            .iter()
            .max_by_key(|(_, (attempts, _))| *attempts)
            .map(|(id, (attempts, e))| format!("shard {id} failed {attempts} time(s): {e}"));
        HostedShards {
            map_version: map.version,
            assigned,
            loaded,
            loading,
            failing: failures.len(),
            last_failure,
        }
    }

    /// The leader holds map version `v`: until this node has it too, it
    /// serves no shard (it may have lost some).
    pub fn announce(&self, v: u64) {
        let was = self
            .announced
            .fetch_max(v, std::sync::atomic::Ordering::Relaxed);
        if v > was {
            self.announced_rose.notify_one();
        }
    }

    /// Resolves once the announced version rose since the last call (a
    /// rise with nobody waiting is kept for the next).
    pub async fn announced_rises(&self) {
        self.announced_rose.notified().await
    }

    /// The newest map version the leader announced.
    pub fn announced(&self) -> u64 {
        self.announced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the map version is at least `v` (bounded by `deadline`).
    pub async fn wait_version(&self, v: u64, deadline: Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            if self.map().version >= v {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.map().version >= v;
            }
        }
    }

    /// Adopts a newer map: unloads shards this node lost, loads those it
    /// gained (in the background). `router` is handed to loading shards.
    pub fn adopt(self: &Arc<Self>, map: Arc<ShardMap>, router: Arc<dyn Router>) {
        {
            let mut cur = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if map.version <= cur.version && cur.version != 0 {
                return;
            }
            *cur = map.clone();
        }
        self.changed.notify_waiters();
        {
            let now = Instant::now();
            let mut at = self.assigned_at.lock().unwrap_or_else(|e| e.into_inner());
            at.retain(|id, (epoch, _)| {
                map.entries
                    .get(id)
                    .is_some_and(|e| e.owner == self.me && e.epoch == *epoch)
            });
            for (id, e) in map.entries.iter().filter(|(_, e)| e.owner == self.me) {
                at.entry(*id).or_insert((e.epoch, now));
            }
        }
        // Unload what we no longer own (at the epoch we hold it under).
        {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|id, slot| {
                let keep = map
                    .entries
                    .get(id)
                    .is_some_and(|e| e.owner == self.me && e.epoch == slot.epoch);
                if !keep {
                    slot.unloaded.store(map.version.max(1), Ordering::SeqCst);
                }
                keep
            });
        }
        let Some(service) = self.service.clone() else {
            return;
        };
        for (id, e) in map.entries.iter().filter(|(_, e)| e.owner == self.me) {
            let have = self
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(id);
            let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            if have || loading.get(id) == Some(&e.epoch) {
                continue;
            }
            loading.insert(*id, e.epoch);
            drop(loading);
            // Taken over from a previous owner: the load raises the shard's
            // fence in the store, so it waits out the hand-over delay.
            let not_before = e
                .previous
                .is_some()
                .then(|| self.assigned_at(*id, e.epoch).map(|at| at + self.handover))
                .flatten();
            let host = self.clone();
            let service = service.clone();
            let router = router.clone();
            let (id, epoch) = (*id, e.epoch);
            tokio::spawn(async move { host.load(service, id, epoch, not_before, router).await });
        }
    }

    /// When this node first saw `id` assigned to it under `epoch`.
    fn assigned_at(&self, id: ShardId, epoch: u64) -> Option<Instant> {
        self.assigned_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, at)| *at)
    }

    /// Whether the map this node holds gives it `id` under `epoch`.
    fn still_mine(&self, id: ShardId, epoch: u64) -> bool {
        self.map()
            .entries
            .get(&id)
            .is_some_and(|e| e.owner == self.me && e.epoch == epoch)
    }

    /// Forgets the load of `id` under `epoch` (not a newer one's).
    fn done_loading(&self, id: ShardId, epoch: u64) {
        let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if loading.get(&id) == Some(&epoch) {
            loading.remove(&id);
        }
    }

    async fn load(
        self: Arc<Self>,
        service: Arc<dyn ShardService>,
        id: ShardId,
        epoch: u64,
        not_before: Option<Instant>,
        router: Arc<dyn Router>,
    ) {
        if let Some(t) = not_before {
            tokio::time::sleep_until(t).await;
            if !self.still_mine(id, epoch) {
                // Moved on before the hand-over ended: never fenced it.
                self.done_loading(id, epoch);
                return;
            }
        }
        let mut attempt = 0u32;
        let result = loop {
            let deadline = Instant::now() + Duration::from_millis(self.cfg.load_wait_ms * 5);
            let hop = Hop {
                node: self.me,
                shard: id,
                call: "load".into(),
            };
            let mut ctx = CallCtx::new(deadline, vec![hop], Some(router.clone()));
            ctx.owner_epoch = Some(epoch);
            let result = service.load(id, ctx).await;
            let still_mine = self.still_mine(id, epoch);
            match &result {
                Err(e) if still_mine => {
                    // Retried with backoff: a callee may not serve yet, a
                    // store may be busy. The failure stays visible.
                    attempt += 1;
                    warn!(target: LOG, shard = ?id, "loading failed (attempt {attempt}): {e}");
                    self.failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, (attempt, e.to_string()));
                    let backoff =
                        (100u64 << attempt.min(10)).min(self.cfg.load_retry_max_ms.max(1));
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                _ => break result,
            }
        };
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.done_loading(id, epoch);
        let still_mine = self.still_mine(id, epoch);
        match result {
            Ok(actor) if still_mine => {
                let (tx, rx) = mpsc::channel(self.cfg.mailbox.max(1));
                let busy = Arc::new(Mutex::new(None));
                let unloaded = Arc::new(AtomicU64::new(0));
                tokio::spawn(run_actor(
                    actor,
                    rx,
                    busy.clone(),
                    unloaded.clone(),
                    self.me,
                    id,
                    self.cfg.slow_handler_ms,
                ));
                let slot = Slot {
                    epoch,
                    tx,
                    busy,
                    unloaded,
                };
                if let Some(old) = self
                    .slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, slot)
                {
                    old.unloaded
                        .store(self.map().version.max(1), Ordering::SeqCst);
                }
                self.changed.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => warn!(target: LOG, shard = ?id, "loading failed: {e}"),
        }
    }

    /// Serves a call for a shard this node should own; `refused` is the
    /// node's reason when it cannot serve (no fresh lease, fenced). A wait
    /// cycle detected *here* (rather than one passed back by a callee) is
    /// reported through `on_cycle`, so it is recorded exactly once.
    #[allow(clippy::too_many_arguments)] // One call's parts, passed through as they arrive.
    pub async fn serve(
        &self,
        shard: ShardId,
        epoch: Option<u64>,
        call: String,
        payload: Vec<u8>,
        ctx: CallCtx,
        refused: Option<String>,
        on_cycle: impl FnOnce(&[Hop]),
    ) -> Result<Vec<u8>, CallError> {
        if let Some(reason) = refused {
            return Err(CallError::Fenced {
                node: self.me,
                reason,
            });
        }
        if payload.len() > self.cfg.max_payload {
            return Err(CallError::TooLarge {
                len: payload.len(),
                max: self.cfg.max_payload,
            });
        }
        // A call whose waiting chain already holds this shard can never be
        // served by a non-reentrant actor: report the cycle now.
        if let Some(pos) = ctx.chain.iter().position(|h| h.shard == shard) {
            let mut cycle: Vec<Hop> = ctx.chain[pos..].to_vec();
            cycle.push(Hop {
                node: self.me,
                shard,
                call: call.clone(),
            });
            on_cycle(&cycle);
            return Err(CallError::Deadlock { cycle });
        }
        let map = self.map();
        let announced = self.announced();
        if announced > map.version {
            // A newer map exists: this node may have lost the shard.
            return Err(CallError::Moved { version: announced });
        }
        let Some(entry) = map.entries.get(&shard) else {
            return Err(CallError::UnknownShard {
                kind: shard.kind,
                key: shard.key,
            });
        };
        if entry.owner != self.me || epoch.is_some_and(|e| e > entry.epoch) {
            return Err(CallError::Moved {
                version: map.version,
            });
        }
        // Wait (bounded) for a shard that is being loaded here.
        let load_deadline = ctx
            .deadline
            .min(Instant::now() + Duration::from_millis(self.cfg.load_wait_ms));
        let serve_from = self
            .assigned_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .filter(|(e, _)| *e == entry.epoch && entry.previous.is_some())
            .map(|(_, at)| *at + self.handover);
        if let Some(t) = serve_from {
            if t > load_deadline {
                return Err(CallError::Unavailable(format!(
                    "shard {}:{} is being handed over to node {}",
                    shard.kind, shard.key, self.me
                )));
            }
            tokio::time::sleep_until(t).await;
        }
        let tx = loop {
            let notified = self.changed.notified();
            if let Some(slot) = self
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&shard)
            {
                if slot.epoch == entry.epoch {
                    break slot.tx.clone();
                }
            }
            if tokio::time::timeout_at(load_deadline, notified)
                .await
                .is_err()
            {
                return Err(CallError::Unavailable(format!(
                    "shard {}:{} is still loading on node {}",
                    shard.kind, shard.key, self.me
                )));
            }
        };
        let (reply, rx) = oneshot::channel();
        let mut served = ctx.clone();
        served.owner_epoch = Some(entry.epoch);
        let env = Envelope {
            call,
            payload,
            ctx: served,
            reply,
        };
        tx.try_send(env).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CallError::Overloaded(format!(
                "shard {}:{} mailbox full ({} calls)",
                shard.kind, shard.key, self.cfg.mailbox
            )),
            mpsc::error::TrySendError::Closed(_) => CallError::Moved {
                version: map.version,
            },
        })?;
        match tokio::time::timeout_at(ctx.deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Unavailable("the shard was unloaded".into())),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// The chains of the calls each local shard is running (diagnosis).
    pub fn busy(&self) -> BTreeMap<ShardId, Vec<Hop>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(id, s)| {
                s.busy
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .map(|c| (*id, c))
            })
            .collect()
    }
}

async fn run_actor(
    mut actor: Box<dyn ShardActor>,
    mut rx: mpsc::Receiver<Envelope>,
    busy: Arc<Mutex<Option<Vec<Hop>>>>,
    unloaded: Arc<AtomicU64>,
    me: NodeId,
    id: ShardId,
    slow_ms: u64,
) {
    while let Some(env) = rx.recv().await {
        let Envelope {
            call,
            payload,
            ctx,
            mut reply,
        } = env;
        if reply.is_closed() || Instant::now() >= ctx.deadline {
            let _ = reply.send(Err(CallError::Timeout));
            continue;
        }
        // Unloaded (it moved) with calls still queued: not run here, the
        // caller retries them on the new owner.
        let version = unloaded.load(Ordering::SeqCst);
        if version > 0 {
            let _ = reply.send(Err(CallError::Moved { version }));
            continue;
        }
        *busy.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctx.chain.clone());
        let started = Instant::now();
        let deadline = ctx.deadline;
        let mut ctx = ctx;
        ctx.chain.push(Hop {
            node: me,
            shard: id,
            call: call.clone(),
        });
        // The caller giving up cancels the handler (and so its nested calls).
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, actor.handle(&call, payload, ctx)) => {
                r.unwrap_or(Err(CallError::Timeout))
            }
            _ = reply.closed() => Err(CallError::Timeout),
        };
        let took = started.elapsed();
        if took.as_millis() as u64 > slow_ms {
            warn!(target: LOG, shard = ?id, call = %call, "slow handler: {} ms (threshold {slow_ms} ms)", took.as_millis());
        }
        *busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::{CallError, ShardsConfig};

    #[test]
    fn every_shard_bound_is_checked() {
        assert!(ShardsConfig::default().validate().is_ok());
        let zero_grace = ShardsConfig {
            moved_owner_grace_ms: 0,
            ..Default::default()
        };
        let e = zero_grace.validate().unwrap_err();
        assert!(e.contains("shards.moved_owner_grace_ms"), "{e}");
        let no_mailbox = ShardsConfig {
            mailbox: 0,
            ..Default::default()
        };
        assert!(no_mailbox.validate().is_err());
    }

    #[test]
    fn in_doubt_has_its_own_kind() {
        let e = CallError::InDoubt {
            owner: 4,
            version: 9,
        };
        assert_eq!(e.kind(), "in_doubt");
        assert!(CallError::KINDS.contains(&e.kind()));
        assert!(e.to_string().contains("node 4"), "{e}");
    }
}
