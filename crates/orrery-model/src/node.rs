//! One node process as the model sees it: the local beliefs the node code
//! keeps (its epoch, stage, lease, shard map copy, announced map version,
//! when it first saw each shard assigned to it, the job leases it was
//! offered) and the node's own rules over them, written out as
//! orrery-node applies them:
//!
//! - the lease is fresh while the last *acknowledged* heartbeat was sent
//!   less than `self_fence_after` ago (`orrery_core::lease::lease_fresh`,
//!   which `Lease::fresh` runs);
//! - a node serves shard calls while past stage -2, not fenced and its lease
//!   is fresh (`Inner::serves_shards`), and then a shard only if the map it
//!   holds is at least the version the leader announced, names it the
//!   owner, and a shard taken over from a previous owner only from the
//!   hand-over delay after it first saw the assignment (`ShardHost::serve`,
//!   `ShardHost::adopt`);
//! - a job lease is run only by the process it was granted to, while that
//!   process serves (stage 0, not fenced, lease fresh:
//!   `orrery-node/src/jobs.rs`, `still_holds`).
//!
//! Nothing here decides ownership, fencing or lease renewal: that is
//! orrery-core's `apply`, `gate` and `answer_heartbeat`, run by the model.

use orrery_core::shardmap::{ShardId, ShardMap};
use orrery_core::{Epoch, NodeId, Stage};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A model tick (see [`crate::control::TICK_MS`]).
pub type Tick = u64;

/// Whether the process runs.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Run {
    Running,
    /// Stopped (SIGSTOP, a long pause): it keeps every belief but takes no
    /// step, so it serves nothing until it runs again, and then it judges
    /// its lease on the clock, which went on.
    Paused,
    /// Gone: every volatile belief lost; a restart joins under a new epoch.
    Crashed,
}

/// A job lease's token as the node holds it (the one job, [`crate::control::JOB`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Token {
    pub period: u64,
    pub lease_epoch: u64,
    pub holder_epoch: Epoch,
}

/// The node's copy of the shard map (orrery-core's own `ShardMap`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct MapCopy(pub Arc<ShardMap>);

/// Hashed by what the node reads of it: the version and each entry's
/// owner, ownership epoch and previous owner (not `since`, kept for people).
impl Hash for MapCopy {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.version.hash(h);
        for (id, e) in &self.0.entries {
            (id, e.owner, e.epoch, e.previous).hash(h);
        }
    }
}

impl fmt::Debug for MapCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0.version)
    }
}

/// One node process.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Proc {
    pub id: NodeId,
    pub run: Run,
    /// The epoch this process joined under (0: not joined).
    pub epoch: Epoch,
    /// The last start-up stage this process completed.
    pub stage: Stage,
    /// Told its epoch is revoked (or superseded): serves nothing, rejoins.
    pub fenced: bool,
    /// When the last acknowledged heartbeat was sent (`None`: never).
    pub acked_send: Option<Tick>,
    pub map: MapCopy,
    /// The newest map version the leader announced in an acknowledgement.
    pub announced: u64,
    /// When this process first saw each shard assigned to it, by ownership epoch.
    pub assigned_at: BTreeMap<ShardId, (u64, Tick)>,
    /// The highest job token this process admitted (one run per token).
    pub ran_up_to: Option<(u64, u64)>,
    /// Job leases admitted and not run yet.
    pub pending: BTreeSet<Token>,
}

impl Proc {
    /// A process of `id` that joined under `epoch` and has completed `stage`.
    pub fn joined(id: NodeId, epoch: Epoch, stage: Stage) -> Proc {
        Proc {
            id,
            run: Run::Running,
            epoch,
            stage,
            fenced: false,
            acked_send: None,
            map: MapCopy::default(),
            announced: 0,
            assigned_at: BTreeMap::new(),
            ran_up_to: None,
            pending: BTreeSet::new(),
        }
    }

    /// What is left of a crashed process: nothing but its node id.
    pub fn crashed(id: NodeId) -> Proc {
        Proc {
            run: Run::Crashed,
            ..Proc::joined(id, 0, Stage::NOT_STARTED)
        }
    }

    /// `Lease::fresh`: orrery-core's own rule (the last acknowledged
    /// heartbeat was sent less than `fence` ticks ago).
    pub fn fresh(&self, now: Tick, fence: Tick) -> bool {
        self.acked_send
            .is_some_and(|at| orrery_core::lease::lease_fresh(now, at, fence))
    }

    /// `Inner::serves_shards`, for a process that runs at all.
    pub fn serves_shards(&self, now: Tick, fence: Tick) -> bool {
        self.run == Run::Running
            && self.epoch > 0
            && self.stage >= Stage::ADDRESSED
            && !self.fenced
            && self.fresh(now, fence)
    }

    /// `Inner::serving`: as above, at stage 0.
    pub fn serving(&self, now: Tick, fence: Tick) -> bool {
        self.serves_shards(now, fence) && self.stage == Stage::READY
    }

    /// Would this process serve a call for `shard` at `now`? The checks of
    /// `Inner::serve_shard` and `ShardHost::serve`, in their order. The
    /// node's hand-over delay is `fence` (`self_fence_after_ms`); `margin`
    /// lengthens it (0: the shipped rule).
    pub fn serves(&self, shard: ShardId, now: Tick, fence: Tick, margin: Tick) -> bool {
        if !self.serves_shards(now, fence) || self.announced > self.map.0.version {
            return false;
        }
        let Some(entry) = self.map.0.entries.get(&shard) else {
            return false;
        };
        if entry.owner != self.id {
            return false;
        }
        let serve_from = self
            .assigned_at
            .get(&shard)
            .filter(|(epoch, _)| *epoch == entry.epoch && entry.previous.is_some())
            .map(|(_, at)| at + fence + margin);
        serve_from.is_none_or(|t| now >= t)
    }

    /// `ShardHost::adopt`: a newer map replaces the copy, and every shard it
    /// assigns here under a new ownership epoch is noted as seen `now`.
    pub fn adopt(&mut self, map: &Arc<ShardMap>, now: Tick) {
        let cur = &self.map.0;
        if map.version <= cur.version && cur.version != 0 {
            return;
        }
        self.map = MapCopy(map.clone());
        let me = self.id;
        self.assigned_at.retain(|id, (epoch, _)| {
            map.entries
                .get(id)
                .is_some_and(|e| e.owner == me && e.epoch == *epoch)
        });
        for (id, e) in map.entries.iter().filter(|(_, e)| e.owner == me) {
            self.assigned_at.entry(*id).or_insert((e.epoch, now));
        }
    }

    /// Forgets what time has made irrelevant, so that states differing only
    /// there are one: a lease older than `fence` is as good as none (it never
    /// becomes fresh again), and a hand-over that ended is as ended as any.
    pub fn normalise(&mut self, now: Tick, fence: Tick, margin: Tick) {
        if !self.fresh(now, fence) {
            self.acked_send = None;
        }
        for (_, at) in self.assigned_at.values_mut() {
            *at = (*at).max(now.saturating_sub(fence + margin));
        }
    }

    /// `ShardHost::announce`.
    pub fn announce(&mut self, version: u64) {
        self.announced = self.announced.max(version);
    }

    /// The job runner's inbox: leases held under this process's epoch that
    /// it has not run yet.
    pub fn offer(&mut self, tokens: &[Token]) {
        for t in tokens.iter().filter(|t| t.holder_epoch == self.epoch) {
            let key = (t.period, t.lease_epoch);
            if self.ran_up_to.is_none_or(|h| h < key) {
                self.ran_up_to = Some(key);
                self.pending.insert(*t);
            }
        }
    }

    /// `node.fence(reason)`: stop serving at once (the lease is dropped).
    pub fn fence(&mut self) {
        self.fenced = true;
        self.acked_send = None;
    }

    /// The supervisor's rejoin after a fence: a new epoch, start-up again
    /// from stage -4; the process keeps its shard map and its job runs.
    pub fn rejoined(&self, epoch: Epoch) -> Proc {
        Proc {
            epoch,
            stage: Stage::RUNNING,
            fenced: false,
            acked_send: None,
            pending: BTreeSet::new(),
            ..self.clone()
        }
    }
}
