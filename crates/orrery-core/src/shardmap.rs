//! The shard map and the placement algorithm.
//!
//! Applications declare shard *kinds* (`solar_system`, `alliance`,
//! `market_region`, ...), each with a set of `u64` keys; each (kind, key) is
//! one shard, owned by exactly one node at a time. The owner holds an
//! *ownership epoch* for it, a fencing token: a node serves a shard only while
//! it holds the shard's current ownership epoch. Every node keeps a copy of
//! the [`ShardMap`] (the address cache) and routes calls by it.
//!
//! What this module owns:
//! - [`ShardMap`]: declared kinds, who owns each shard under which ownership
//!   epoch, and [`ShardMap::apply`], the deterministic transition the
//!   replicated state machine runs for a batch of [`Move`]s (compare-and-set
//!   on the current owner, a fresh epoch per changed shard);
//! - [`plan`]: the placement decision the coordinator makes — which shards to
//!   move now, given the map and the nodes that may own shards.
//!
//! Placement is weighted rendezvous (highest-random-weight) hashing with a
//! bounded-load cap, made sticky: a shard stays where it is unless its owner
//! is gone, its owner is above its cap, or an under-filled node needs it. See
//! [`plan`] for the rules and [`bounds`] for the exact load bounds.
//!
//! What it must never do: perform I/O, read a clock (time arrives as
//! [`Millis`] arguments), use randomness, or depend on iteration order of a
//! hash map (only `BTreeMap`/`BTreeSet` and sorted vectors are used). The
//! placement hash is fixed: SHA-256 of a versioned seed for kind names and
//! node ids, MurmurHash3's 64-bit finaliser to combine them, and an
//! integer-only logarithm — never `std`'s `DefaultHasher`/`RandomState` or a
//! platform `ln` — so that any node, on any platform, computes the same plan
//! from the same inputs.

use crate::{Millis, NodeId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Seed of the placement hash. Changing it reshuffles every cluster's
/// preferred placement, so it is versioned and never changed in place.
pub const PLACEMENT_SEED: &[u8] = b"orrery/shardmap/placement/v1";

/// One shard: a key of a declared kind. `kind` indexes [`ShardMap::kinds`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId {
    pub kind: u16,
    pub key: u64,
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.key)
    }
}

/// A shard kind as the application declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindSpec {
    /// Unique among the declared kinds; it also seeds the kind's placement
    /// hash, so reordering kinds moves nothing.
    pub name: String,
    pub keys: BTreeSet<u64>,
}

impl KindSpec {
    pub fn new(name: impl Into<String>, keys: impl IntoIterator<Item = u64>) -> Self {
        KindSpec {
            name: name.into(),
            keys: keys.into_iter().collect(),
        }
    }
}

/// Who owns one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub owner: NodeId,
    /// Ownership epoch: issued from [`ShardMap::last_epoch`] on every change
    /// of owner, so it strictly increases per shard (and map-wide). Never 0.
    pub epoch: u64,
    /// When the current owner got the shard (the proposer's clock).
    pub since: Millis,
    /// The owner before this one, if any: a shard taken over from a node
    /// that may still be serving it needs a hand-over delay; a shard placed
    /// for the first time does not.
    #[serde(default)]
    pub previous: Option<NodeId>,
}

/// Why [`ShardMap::declare`] refused a declaration (the map is unchanged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeclareError {
    #[error("shard kind {0:?} is declared twice")]
    DuplicateKind(String),
    #[error("{0} shard kinds declared: at most 65536 fit a ShardId")]
    TooManyKinds(usize),
}

/// The shard map: declared kinds and the owner of each owned shard.
///
/// Invariant kept by [`ShardMap::declare`] and [`ShardMap::apply`]: every key
/// of `entries` is a declared shard. A declared shard without an entry is
/// unowned (e.g. just declared) until a plan places it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Bumped by every `declare` or `apply` that changes anything.
    pub version: u64,
    /// Index = [`ShardId::kind`].
    pub kinds: Vec<KindSpec>,
    /// Serialized as a list of pairs: a struct key cannot be a JSON object key.
    #[serde(with = "entries_as_pairs")]
    pub entries: BTreeMap<ShardId, ShardEntry>,
    /// The last ownership epoch issued (0: none yet).
    pub last_epoch: u64,
}

impl ShardMap {
    /// Replaces the declared kinds. Entries of shards still declared (same
    /// kind *name*, same key) are kept — re-indexed if the kind moved in the
    /// list — and the others are dropped. Returns whether anything changed
    /// (then `version` was bumped). A duplicate kind name or more than 65536
    /// kinds is refused and changes nothing.
    pub fn declare(&mut self, kinds: Vec<KindSpec>) -> Result<bool, DeclareError> {
        if kinds.len() > usize::from(u16::MAX) + 1 {
            return Err(DeclareError::TooManyKinds(kinds.len()));
        }
        let mut names = BTreeSet::new();
        for k in &kinds {
            if !names.insert(k.name.as_str()) {
                return Err(DeclareError::DuplicateKind(k.name.clone()));
            }
        }
        let old: BTreeMap<&str, u16> = self
            .kinds
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name.as_str(), i as u16))
            .collect();
        let mut entries = BTreeMap::new();
        for (new_kind, spec) in kinds.iter().enumerate() {
            let Some(&old_kind) = old.get(spec.name.as_str()) else {
                continue;
            };
            for &key in &spec.keys {
                if let Some(e) = self.entries.get(&ShardId {
                    kind: old_kind,
                    key,
                }) {
                    let id = ShardId {
                        kind: new_kind as u16,
                        key,
                    };
                    entries.insert(id, *e);
                }
            }
        }
        let changed = kinds != self.kinds || entries != self.entries;
        if changed {
            self.kinds = kinds;
            self.entries = entries;
            self.version += 1;
        }
        Ok(changed)
    }

    /// Every declared shard, in `ShardId` order.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.kinds.iter().enumerate().flat_map(|(i, k)| {
            k.keys.iter().map(move |&key| ShardId {
                kind: i as u16,
                key,
            })
        })
    }

    /// How many shards are declared.
    pub fn shard_count(&self) -> usize {
        self.kinds.iter().map(|k| k.keys.len()).sum()
    }

    /// Whether `shard` is declared.
    pub fn is_declared(&self, shard: ShardId) -> bool {
        self.kinds
            .get(usize::from(shard.kind))
            .is_some_and(|k| k.keys.contains(&shard.key))
    }

    /// Applies moves as the replicated state machine does. Each move is a
    /// compare-and-set: it takes effect only if the shard is declared, its
    /// current owner is `from` (`None`: unowned) and `to` differs from it;
    /// otherwise (a stale or duplicate move) it is skipped. A move that takes
    /// effect sets owner = `to`, epoch = a newly issued ownership epoch,
    /// since = `at`. Bumps `version` once if anything changed; returns how
    /// many moves took effect.
    pub fn apply(&mut self, moves: &[Move], at: Millis) -> usize {
        let mut changed = 0;
        for m in moves {
            if !self.is_declared(m.shard) {
                continue;
            }
            let current = self.entries.get(&m.shard).map(|e| e.owner);
            if current != m.from || current == Some(m.to) {
                continue;
            }
            self.last_epoch += 1;
            self.entries.insert(
                m.shard,
                ShardEntry {
                    owner: m.to,
                    epoch: self.last_epoch,
                    since: at,
                    previous: current,
                },
            );
            changed += 1;
        }
        if changed > 0 {
            self.version += 1;
        }
        changed
    }

    /// The owner of `shard`, if it is declared and owned.
    pub fn owner(&self, shard: ShardId) -> Option<&ShardEntry> {
        self.entries.get(&shard)
    }

    /// How many declared shards each node owns (nodes owning none are absent).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for (id, e) in &self.entries {
            if self.is_declared(*id) {
                *load.entry(e.owner).or_insert(0) += 1;
            }
        }
        load
    }

    /// The index of the kind named `name`.
    pub fn kind_id(&self, name: &str) -> Option<u16> {
        self.kinds
            .iter()
            .position(|k| k.name == name)
            .map(|i| i as u16)
    }
}

/// A node that may own shards now, with its capacity weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub node: NodeId,
    /// Relative capacity. A host of weight 0 is ignored (owns nothing).
    pub weight: u32,
}

/// Tuning of [`plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementConfig {
    /// Rate limit on *rebalancing*: how many shards on live owners one plan
    /// may move (overload fixes, filling a joined or under-filled host,
    /// drains — a draining node is simply left out of `hosts`, which makes
    /// its shards orphans, see below). Values below 1 count as 1.
    pub max_moves_per_step: usize,
    /// Rate limit on *orphans*: shards whose owner is not among the hosts
    /// (dead, removed, draining) or that have no owner. `None` (the default)
    /// places every orphan at once, because an orphan is unavailable until
    /// placed: availability beats a gentle ramp. `Some(n)` places at most n
    /// per plan (values below 1 count as 1) for clusters where a new owner
    /// loading many shards at once hurts more than the outage.
    pub max_orphan_moves_per_step: Option<usize>,
    /// Allowed deviation from a host's weighted even share (0.10: 10 %);
    /// see [`bounds`]. Negative or non-finite values count as 0.
    pub load_slack: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            max_moves_per_step: 64,
            max_orphan_moves_per_step: None,
            load_slack: 0.10,
        }
    }
}

/// One planned change of owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub shard: ShardId,
    /// The owner the plan saw (`None`: unowned). [`ShardMap::apply`] skips
    /// the move if the owner changed since.
    pub from: Option<NodeId>,
    pub to: NodeId,
}

/// The load bounds of one host.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadBound {
    /// Weighted even share: `total * weight / total_weight`.
    pub share: f64,
    /// `min(floor(share), floor(share * (1 - slack)))`: a converged map has
    /// every host at or above it; a host below it pulls shards.
    pub low: usize,
    /// `floor(share)`: a host above it may give shards to one below `low`.
    pub fair: usize,
    /// The cap: `max(ceil(share), ceil(share * (1 + slack)))`, at most
    /// `total`. A converged map has every host at or below it; a host above
    /// it sheds shards. The caps add up to at least `total`.
    pub high: usize,
}

/// The per-host load bounds [`plan`] uses for `total` shards over `hosts`
/// (hosts of weight 0 and repeated node ids after the first are ignored), with
/// `slack` normalised as in [`PlacementConfig::load_slack`]. `floor`/`ceil` of
/// the exact share are computed in integers; the slack terms in IEEE-754
/// `f64` (basic operations only, so identical on every platform).
pub fn bounds(hosts: &[Host], total: usize, slack: f64) -> BTreeMap<NodeId, LoadBound> {
    let hosts = normalize(hosts);
    let b = compute_bounds(&hosts, total, slack);
    hosts.iter().map(|h| h.node).zip(b).collect()
}

fn normalize_slack(slack: f64) -> f64 {
    if slack.is_finite() && slack > 0.0 {
        slack
    } else {
        0.0
    }
}

/// Hosts of positive weight, first occurrence of each node, sorted by node.
fn normalize(hosts: &[Host]) -> Vec<Host> {
    let mut by_node: BTreeMap<NodeId, u32> = BTreeMap::new();
    for h in hosts {
        if h.weight > 0 {
            by_node.entry(h.node).or_insert(h.weight);
        }
    }
    by_node
        .into_iter()
        .map(|(node, weight)| Host { node, weight })
        .collect()
}

fn compute_bounds(hosts: &[Host], total: usize, slack: f64) -> Vec<LoadBound> {
    let slack = normalize_slack(slack);
    let total_weight: u128 = hosts.iter().map(|h| u128::from(h.weight)).sum();
    hosts
        .iter()
        .map(|h| {
            let num = total as u128 * u128::from(h.weight);
            let fair = (num / total_weight) as usize;
            let ceil = num.div_ceil(total_weight) as usize;
            let share = total as f64 * f64::from(h.weight) / total_weight as f64;
            // `as usize` saturates (and maps NaN to 0); slack is finite here.
            let up = (share * (1.0 + slack)).ceil() as usize;
            let down = (share * (1.0 - slack).max(0.0)).floor() as usize;
            LoadBound {
                share,
                low: fair.min(down),
                fair,
                high: ceil.max(up).min(total),
            }
        })
        .collect()
}

/// Plans the next step: the moves to make now, given the current map and the
/// hosts that may own shards now (live, not impaired, not draining, not
/// arbiters: the caller decides). Deterministic: the same inputs give the
/// same moves, in the same order. O(shards x hosts) plus a sort of the
/// shards per under-filled host.
///
/// Each shard `s` ranks the hosts by weighted rendezvous hashing: cost(s, h)
/// = -log2(u(s, h)) / weight(h), with u uniform in (0, 1) from the stable
/// hash; the cheapest host is the one it would be placed on with no other
/// constraint (host h is cheapest for a fraction weight(h)/total_weight of
/// the shards). Bounds are those of [`bounds`]. In order, within one plan:
///
/// 1. **Orphans** (owner not among `hosts`, or unowned), in hash order, each
///    go to a host below its cap: preferring one below `low`, then one below
///    `fair`, then any; within that, the cheapest. Limited by
///    `max_orphan_moves_per_step` only. A plan that places orphans stops
///    there: the plan after a removal (or drain) moves exactly the removed
///    host's shards, all of them unless the orphan limit is set.
/// 2. **Overload**: a host above `high` sheds the shards that prefer another
///    host most (largest cost(s, h) - cheapest other cost), each placed as in
///    1, until it is at `high`.
/// 3. **Under-fill** (a host joined, or a removal left one short): a host
///    below `low` pulls, until it reaches `low`, the shards it is most
///    preferred for relative to their owner (smallest cost(s, h) -
///    cost(s, owner)) — on a join, first those the hash would place on it —
///    from hosts above `fair`, which therefore never drop below `low`.
///
/// Steps 2 and 3 share the budget `max_moves_per_step`. Shards on remaining
/// hosts move only in 2 and 3. Iterating plan/apply converges (every move
/// lowers the number of orphans, then the total excess above `high`, then the
/// total deficit below `low`, and none raises an earlier one) to a map where
/// every declared shard is owned by a host and every host's load `l` has
/// `low <= l <= high`; in particular `l <= ceil(share * (1 + slack))`. A plan
/// returns no moves exactly when the map is so converged (or there are no
/// hosts, or no shards). Shards that are not declared are never moved.
///
/// From a converged map:
/// - **removing a host** moves its shards (all in the first plan) and, since
///   the remaining hosts' caps only grow, nothing else — except that per-host
///   rounding of `low` can leave fewer than N (hosts before the removal)
///   shards to pull among the remaining hosts afterwards, which happens only
///   when `shards * slack` is small next to N;
/// - **adding a host** moves shards only as needed to bring the others under
///   their (now lower) caps and the new host up to its `low`: about its
///   weighted share, at most `max_moves_per_step` per plan, all of them to
///   the new host in practice (total at most the new host's `high` + 2,
///   plus up to N from rounding of the old caps when `shards * slack` is
///   small next to N); the new host converges at `low` (with slack 0.10,
///   about 90 % of its share) unless the others' excess gives it more.
pub fn plan(map: &ShardMap, hosts: &[Host], cfg: &PlacementConfig) -> Vec<Move> {
    let hosts = normalize(hosts);
    let shards: Vec<ShardId> = map.shards().collect();
    if hosts.is_empty() || shards.is_empty() {
        return Vec::new();
    }
    let bounds = compute_bounds(&hosts, shards.len(), cfg.load_slack);
    let index: BTreeMap<NodeId, usize> =
        hosts.iter().enumerate().map(|(i, h)| (h.node, i)).collect();
    let kind_keys: Vec<u64> = map
        .kinds
        .iter()
        .map(|k| stable_u64(b"kind", k.name.as_bytes()))
        .collect();
    let host_keys: Vec<u64> = hosts
        .iter()
        .map(|h| stable_u64(b"node", &h.node.to_le_bytes()))
        .collect();
    let shard_keys: Vec<u64> = shards
        .iter()
        .map(|s| fmix64(kind_keys[usize::from(s.kind)] ^ fmix64(s.key)))
        .collect();

    let mut p = Planner {
        hosts: &hosts,
        bounds: &bounds,
        host_keys: &host_keys,
        shards: &shards,
        shard_keys: &shard_keys,
        owner: shards
            .iter()
            .map(|s| map.owner(*s).and_then(|e| index.get(&e.owner).copied()))
            .collect(),
        load: vec![0; hosts.len()],
        moves: Vec::new(),
        from: shards
            .iter()
            .map(|s| map.owner(*s).map(|e| e.owner))
            .collect(),
    };
    for h in p.owner.iter().flatten() {
        p.load[*h] += 1;
    }

    // 1. Orphans, in hash order (no kind or key range is favoured).
    let mut orphans: Vec<usize> = (0..shards.len())
        .filter(|&s| p.owner[s].is_none())
        .collect();
    orphans.sort_by_key(|&s| (shard_keys[s], shards[s]));
    let orphan_budget = cfg
        .max_orphan_moves_per_step
        .map_or(usize::MAX, |n| n.max(1));
    for &s in orphans.iter().take(orphan_budget) {
        if let Some(to) = p.destination(s) {
            p.relocate(s, to);
        }
    }
    if !p.moves.is_empty() {
        // Restoring availability is this plan's whole job: a removal's plan
        // moves only the removed host's shards. Rebalancing comes next plan.
        return p.moves;
    }

    let mut budget = cfg.max_moves_per_step.max(1);
    // 2. Overload.
    for (h, bound) in bounds.iter().enumerate() {
        if budget == 0 {
            break;
        }
        if p.load[h] <= bound.high {
            continue;
        }
        let mut mine: Vec<(f64, usize)> = (0..shards.len())
            .filter(|&s| p.owner[s] == Some(h))
            .map(|s| {
                let here = p.cost(s, h);
                let best_other = (0..hosts.len())
                    .filter(|&g| g != h)
                    .map(|g| p.cost(s, g))
                    .fold(f64::INFINITY, f64::min);
                (here - best_other, s)
            })
            .collect();
        // Largest preference for elsewhere first; ties by shard order.
        mine.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, s) in mine {
            if budget == 0 || p.load[h] <= bound.high {
                break;
            }
            if let Some(to) = p.destination(s) {
                p.relocate(s, to);
                budget -= 1;
            }
        }
    }

    // 3. Under-fill.
    for h in 0..hosts.len() {
        if budget == 0 {
            break;
        }
        if p.load[h] >= bounds[h].low {
            continue;
        }
        let mut candidates: Vec<(f64, usize)> = (0..shards.len())
            .filter_map(|s| {
                let o = p.owner[s]?;
                (o != h && p.load[o] > bounds[o].fair).then(|| (p.cost(s, h) - p.cost(s, o), s))
            })
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (_, s) in candidates {
            if budget == 0 || p.load[h] >= bounds[h].low {
                break;
            }
            let Some(o) = p.owner[s] else { continue };
            if p.load[o] > bounds[o].fair {
                p.relocate(s, h);
                budget -= 1;
            }
        }
    }
    p.moves
}

/// Working state of one [`plan`] call: the map as it will be after the moves
/// planned so far.
struct Planner<'a> {
    hosts: &'a [Host],
    bounds: &'a [LoadBound],
    host_keys: &'a [u64],
    shards: &'a [ShardId],
    shard_keys: &'a [u64],
    /// Host index of each shard's owner, if the owner is a host.
    owner: Vec<Option<usize>>,
    /// The owner as the map has it (for `Move::from`).
    from: Vec<Option<NodeId>>,
    load: Vec<usize>,
    moves: Vec<Move>,
}

impl Planner<'_> {
    /// Rendezvous cost of shard `s` on host `h` (lower is preferred).
    fn cost(&self, s: usize, h: usize) -> f64 {
        let u = rendezvous_draw(self.shard_keys[s], self.host_keys[h]);
        neg_log2_q30(u) as f64 / f64::from(self.hosts[h].weight)
    }

    /// Where a shard that must move goes: a host below its cap, preferring
    /// one below `low`, then below `fair`, then the cheapest.
    fn destination(&self, s: usize) -> Option<usize> {
        (0..self.hosts.len())
            .filter(|&h| Some(h) != self.owner[s] && self.load[h] < self.bounds[h].high)
            .map(|h| {
                let b = &self.bounds[h];
                let tier = if self.load[h] < b.low {
                    0
                } else if self.load[h] < b.fair {
                    1
                } else {
                    2
                };
                (tier, self.cost(s, h), h)
            })
            .min_by(|a, b| {
                a.0.cmp(&b.0)
                    .then(a.1.total_cmp(&b.1))
                    .then(self.hosts[a.2].node.cmp(&self.hosts[b.2].node))
            })
            .map(|(_, _, h)| h)
    }

    fn relocate(&mut self, s: usize, to: usize) {
        if let Some(o) = self.owner[s] {
            self.load[o] -= 1;
        }
        self.load[to] += 1;
        self.owner[s] = Some(to);
        self.moves.push(Move {
            shard: self.shards[s],
            from: self.from[s],
            to: self.hosts[to].node,
        });
    }
}

/// SHA-256 of (seed, domain, bytes), first 8 bytes little-endian.
fn stable_u64(domain: &[u8], bytes: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update((PLACEMENT_SEED.len() as u64).to_le_bytes());
    h.update(PLACEMENT_SEED);
    h.update((domain.len() as u64).to_le_bytes());
    h.update(domain);
    h.update(bytes);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

/// MurmurHash3's 64-bit finaliser: a bijection with full avalanche.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The rendezvous draw of one (shard, host) pair: non-linear in both keys.
fn rendezvous_draw(shard_key: u64, host_key: u64) -> u64 {
    fmix64(shard_key ^ fmix64(host_key ^ shard_key.rotate_left(32)))
}

const Q: u32 = 30;

/// `-log2(u)` in fixed point with `Q` fractional bits, where u = max(x, 1) /
/// 2^64 (so the result is in (0, 64 * 2^Q]). Integer-only, hence identical
/// on every platform; accurate to about 2^-28.
fn neg_log2_q30(x: u64) -> u64 {
    let x = x.max(1);
    let p = 63 - x.leading_zeros(); // floor(log2 x)
                                    // Mantissa in [1, 2) as Q1.31: in [2^31, 2^32).
    let mut m: u64 = if p >= 31 {
        x >> (p - 31)
    } else {
        x << (31 - p)
    };
    let mut frac: u64 = 0;
    for _ in 0..Q {
        m = m.wrapping_mul(m) >> 31; // m < 2^32, so m * m < 2^64: never wraps
        frac <<= 1;
        if m >= 1 << 32 {
            m >>= 1;
            frac |= 1;
        }
    }
    // log2(x) = p + frac / 2^Q, and -log2(x / 2^64) = 64 - log2(x).
    (u64::from(64 - p) << Q) - frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn cfg(budget: usize, slack: f64) -> PlacementConfig {
        PlacementConfig {
            max_moves_per_step: budget,
            max_orphan_moves_per_step: None,
            load_slack: slack,
        }
    }

    fn hosts_of(spec: &[(NodeId, u32)]) -> Vec<Host> {
        spec.iter()
            .map(|&(node, weight)| Host { node, weight })
            .collect()
    }

    fn map_with(counts: &[usize]) -> ShardMap {
        let mut map = ShardMap::default();
        let kinds = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| KindSpec::new(format!("kind{i}"), (0..n as u64).map(|k| k * 7 + 3)))
            .collect();
        map.declare(kinds).unwrap();
        map
    }

    /// Iterates plan/apply until a plan is empty; returns the moves applied.
    /// Panics if it takes more steps than the convergence argument allows.
    fn converge(
        map: &mut ShardMap,
        hosts: &[Host],
        cfg: &PlacementConfig,
        at: &mut Millis,
    ) -> Vec<Move> {
        let limit = 3 * map.shard_count() + 10;
        let mut all = Vec::new();
        for _ in 0..limit {
            let moves = plan(map, hosts, cfg);
            if moves.is_empty() {
                return all;
            }
            *at += 1;
            assert_eq!(
                map.apply(&moves, *at),
                moves.len(),
                "every planned move applies"
            );
            all.extend(moves);
        }
        panic!("no convergence after {limit} steps");
    }

    /// The converged-map properties of `plan`'s doc comment.
    fn assert_converged(map: &ShardMap, hosts: &[Host], slack: f64) {
        let live: BTreeSet<NodeId> = normalize(hosts).iter().map(|h| h.node).collect();
        let total = map.shard_count();
        for s in map.shards() {
            let e = map.owner(s).expect("every declared shard is owned");
            assert!(live.contains(&e.owner), "{s} owned by non-host {}", e.owner);
        }
        assert!(map.entries.keys().all(|s| map.is_declared(*s)));
        let load = map.load();
        let total_weight: u64 = normalize(hosts).iter().map(|h| u64::from(h.weight)).sum();
        let s = normalize_slack(slack);
        for h in normalize(hosts) {
            let l = load.get(&h.node).copied().unwrap_or(0);
            let b = bounds(hosts, total, slack)[&h.node];
            assert!(
                b.low <= l && l <= b.high,
                "host {} load {l} outside {b:?}",
                h.node
            );
            // The stated bound, recomputed independently.
            let share = total as f64 * f64::from(h.weight) / total_weight as f64;
            let cap = ((share * (1.0 + s)).ceil() as usize).max(share.ceil() as usize);
            assert!(l <= cap, "host {} load {l} above {cap}", h.node);
        }
    }

    #[test]
    fn neg_log2_matches_float() {
        for x in [
            1u64,
            2,
            3,
            1000,
            1 << 31,
            (1 << 40) + 12345,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let got = neg_log2_q30(x) as f64 / f64::from(1u32 << Q);
            let want = -((x as f64) / 2f64.powi(64)).log2();
            assert!((got - want).abs() < 1e-7, "{x}: {got} vs {want}");
        }
    }

    #[test]
    fn weighted_rendezvous_follows_weights() {
        let mut map = map_with(&[6000]);
        let hosts = hosts_of(&[(1, 1), (2, 2), (3, 3)]);
        // A loose cap: placement follows the hash alone.
        converge(&mut map, &hosts, &cfg(100_000, 10.0), &mut 0);
        let load = map.load();
        for (node, want) in [(1, 1000.0), (2, 2000.0), (3, 3000.0)] {
            let got = load[&node] as f64;
            assert!(
                (got - want).abs() < want * 0.1,
                "node {node}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn declare_apply_and_lookups() {
        let mut map = ShardMap::default();
        assert!(map
            .declare(vec![
                KindSpec::new("solar_system", [1, 2, 3]),
                KindSpec::new("alliance", [10]),
            ])
            .unwrap());
        assert_eq!(map.version, 1);
        assert_eq!(map.shard_count(), 4);
        assert_eq!(map.kind_id("alliance"), Some(1));
        assert_eq!(map.kind_id("nope"), None);
        let sys2 = ShardId { kind: 0, key: 2 };
        let ally = ShardId { kind: 1, key: 10 };
        let moves = [
            Move {
                shard: sys2,
                from: None,
                to: 7,
            },
            Move {
                shard: ally,
                from: None,
                to: 8,
            },
            // Stale: the owner is not 9.
            Move {
                shard: ShardId { kind: 0, key: 1 },
                from: Some(9),
                to: 8,
            },
            // Not declared.
            Move {
                shard: ShardId { kind: 0, key: 99 },
                from: None,
                to: 8,
            },
            // Duplicate of the first: its `from` no longer holds.
            Move {
                shard: sys2,
                from: None,
                to: 8,
            },
        ];
        assert_eq!(map.apply(&moves, 50), 2);
        assert_eq!(map.version, 2);
        assert_eq!(
            map.owner(sys2),
            Some(&ShardEntry {
                owner: 7,
                epoch: 1,
                since: 50,
                previous: None,
            })
        );
        assert_eq!(map.owner(ally).unwrap().epoch, 2);
        assert_eq!(
            map.apply(
                &[Move {
                    shard: sys2,
                    from: Some(7),
                    to: 7
                }],
                60
            ),
            0
        );
        assert_eq!(map.version, 2, "no change, no new version");
        assert_eq!(map.load(), BTreeMap::from([(7, 1), (8, 1)]));

        // Reorder kinds and drop a key: entries follow the kind by name.
        assert_eq!(
            map.declare(vec![
                KindSpec::new("alliance", [10]),
                KindSpec::new("solar_system", [1, 3]),
            ]),
            Ok(true)
        );
        assert_eq!(map.owner(ShardId { kind: 0, key: 10 }).unwrap().owner, 8);
        assert_eq!(map.entries.len(), 1, "key 2 is no longer declared");
        assert_eq!(map.kind_id("solar_system"), Some(1));
        let v = map.version;
        assert_eq!(map.declare(map.kinds.clone()), Ok(false));
        assert_eq!(map.version, v);
        assert_eq!(
            map.declare(vec![KindSpec::new("a", [1]), KindSpec::new("a", [2])]),
            Err(DeclareError::DuplicateKind("a".into()))
        );
        assert_eq!(map.version, v, "a refused declaration changes nothing");
        assert_eq!(
            map.shards().collect::<Vec<_>>(),
            vec![
                ShardId { kind: 0, key: 10 },
                ShardId { kind: 1, key: 1 },
                ShardId { kind: 1, key: 3 }
            ]
        );
    }

    #[test]
    fn bounds_are_as_documented() {
        let hosts = hosts_of(&[(1, 1), (2, 3), (3, 0), (1, 5)]);
        let b = bounds(&hosts, 100, 0.1);
        assert_eq!(b.len(), 2, "weight 0 and repeated ids are ignored");
        assert_eq!(b[&1].share, 25.0);
        assert_eq!((b[&1].low, b[&1].fair, b[&1].high), (22, 25, 28));
        assert_eq!((b[&2].low, b[&2].fair, b[&2].high), (67, 75, 83));
        let b0 = bounds(&hosts_of(&[(1, 1), (2, 1), (3, 1)]), 100, 0.0);
        assert_eq!((b0[&1].low, b0[&1].fair, b0[&1].high), (33, 33, 34));
    }

    #[test]
    fn no_hosts_or_no_shards_plan_nothing() {
        let map = map_with(&[10]);
        assert!(plan(&map, &[], &PlacementConfig::default()).is_empty());
        assert!(plan(&map, &hosts_of(&[(1, 0)]), &PlacementConfig::default()).is_empty());
        assert!(plan(
            &ShardMap::default(),
            &hosts_of(&[(1, 1)]),
            &PlacementConfig::default()
        )
        .is_empty());
    }

    #[test]
    fn orphan_limit_is_applied_when_configured() {
        let mut map = map_with(&[100]);
        let hosts = hosts_of(&[(1, 1), (2, 1)]);
        let mut c = cfg(5, 0.1);
        assert_eq!(
            plan(&map, &hosts, &c).len(),
            100,
            "orphans are not rate-limited"
        );
        c.max_orphan_moves_per_step = Some(7);
        assert_eq!(plan(&map, &hosts, &c).len(), 7);
        converge(&mut map, &hosts, &c, &mut 0);
        assert_converged(&map, &hosts, 0.1);
    }

    #[test]
    fn join_then_removal_of_equal_hosts() {
        let mut map = map_with(&[3000, 2000]);
        let mut hosts = hosts_of(&(1..=10).map(|n| (n, 1)).collect::<Vec<_>>());
        let c = cfg(50, 0.1);
        let mut at = 0;
        converge(&mut map, &hosts, &c, &mut at);
        assert_converged(&map, &hosts, 0.1);

        hosts.push(Host {
            node: 11,
            weight: 1,
        });
        let moved = converge(&mut map, &hosts, &c, &mut at);
        assert_converged(&map, &hosts, 0.1);
        assert!(
            moved.iter().all(|m| m.to == 11),
            "a join only feeds the new host"
        );
        let share = 5000 / 11;
        assert!(moved.len() <= share * 11 / 10 + 1, "{} moved", moved.len());
        assert!(moved.len() >= share * 9 / 10, "{} moved", moved.len());

        let gone = hosts.remove(3).node;
        let before = map.clone();
        let moved = converge(&mut map, &hosts, &c, &mut at);
        assert_converged(&map, &hosts, 0.1);
        assert!(moved.iter().all(|m| m.from == Some(gone)));
        assert_eq!(moved.len(), before.load()[&gone]);
    }

    #[test]
    fn epochs_strictly_increase_per_shard() {
        let mut map = map_with(&[200]);
        let mut at = 0;
        let mut seen: BTreeMap<ShardId, u64> = BTreeMap::new();
        let mut check = |map: &ShardMap| {
            for (s, e) in &map.entries {
                let prev = seen.insert(*s, e.epoch).unwrap_or(0);
                assert!(e.epoch >= prev);
            }
        };
        for hosts in [
            vec![(1, 1)],
            vec![(1, 1), (2, 2)],
            vec![(2, 2), (3, 1)],
            vec![(4, 1)],
        ] {
            let hosts = hosts_of(&hosts);
            let before = map.clone();
            converge(&mut map, &hosts, &cfg(13, 0.1), &mut at);
            for (s, e) in &map.entries {
                match before.owner(*s) {
                    Some(b) if b.owner == e.owner => assert_eq!(b, e),
                    Some(b) => assert!(e.epoch > b.epoch && e.since > b.since),
                    None => assert!(e.epoch > before.last_epoch),
                }
            }
            check(&map);
        }
    }

    #[test]
    fn performance_sanity_5000_over_10() {
        // Not timed: keeps the O(shards x hosts) path exercised at size.
        let mut map = map_with(&[5000]);
        let hosts = hosts_of(
            &(1..=10)
                .map(|n| (n, 1 + (n % 3) as u32))
                .collect::<Vec<_>>(),
        );
        let moves = plan(&map, &hosts, &PlacementConfig::default());
        assert_eq!(moves.len(), 5000);
        map.apply(&moves, 1);
        assert_converged(&map, &hosts, 0.1);
    }

    /// A random starting point: hosts, declared shards, and an arbitrary
    /// assignment including unowned shards and owners that are not hosts.
    #[derive(Debug, Clone)]
    struct Scenario {
        hosts: Vec<Host>,
        map: ShardMap,
        cfg: PlacementConfig,
    }

    fn scenario(seed: u64, n_hosts: usize, n_shards: usize, budget: usize, slack: f64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut nodes = BTreeSet::new();
        while nodes.len() < n_hosts {
            nodes.insert(rng.gen_range(1..=1000u64));
        }
        let hosts: Vec<Host> = nodes
            .iter()
            .map(|&node| Host {
                node,
                weight: rng.gen_range(1..=4),
            })
            .collect();
        let n_kinds = rng.gen_range(1..=3usize);
        let mut map = ShardMap::default();
        let kinds = (0..n_kinds)
            .map(|k| {
                let n = n_shards / n_kinds + usize::from(k < n_shards % n_kinds);
                let base = rng.gen_range(0..1_000_000u64);
                KindSpec::new(format!("k{k}"), (0..n as u64).map(|i| base + i * 3))
            })
            .collect();
        map.declare(kinds).unwrap();
        let shards: Vec<ShardId> = map.shards().collect();
        // Skewed: sometimes most shards on one host.
        let skew = rng.gen_bool(0.3);
        let moves: Vec<Move> = shards
            .iter()
            .filter_map(|&shard| {
                let to = match rng.gen_range(0..10) {
                    0 => return None,
                    1 => 5000 + rng.gen_range(0..5u64),
                    _ if skew => hosts[0].node,
                    _ => hosts[rng.gen_range(0..hosts.len())].node,
                };
                Some(Move {
                    shard,
                    from: None,
                    to,
                })
            })
            .collect();
        map.apply(&moves, 1);
        Scenario {
            hosts,
            map,
            cfg: cfg(budget, slack),
        }
    }

    fn arb_scenario() -> impl Strategy<Value = Scenario> {
        (
            any::<u64>(),
            1usize..=20,
            0usize..=2000,
            prop_oneof![16usize..=64, Just(100_000usize)],
            prop_oneof![Just(0.0), Just(0.05), Just(0.1), Just(0.25)],
        )
            .prop_map(|(seed, h, s, b, slack)| scenario(seed, h, s, b, slack))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// From any starting map: every shard ends owned by a host, within
        /// the bounds; each plan respects the rebalancing budget once the
        /// orphans are placed; plans are deterministic.
        #[test]
        fn converges_within_bounds(sc in arb_scenario()) {
            let Scenario { hosts, mut map, cfg } = sc;
            let first = plan(&map, &hosts, &cfg);
            prop_assert_eq!(&first, &plan(&map, &hosts, &cfg), "deterministic");
            let mut shuffled = hosts.clone();
            shuffled.reverse();
            prop_assert_eq!(&first, &plan(&map, &shuffled, &cfg), "host order is irrelevant");
            // One plan places every orphan.
            let live: BTreeSet<NodeId> = hosts.iter().map(|h| h.node).collect();
            let mut once = map.clone();
            once.apply(&first, 2);
            for s in once.shards() {
                prop_assert!(once.owner(s).is_some_and(|e| live.contains(&e.owner)));
            }
            let orphans = first.iter().filter(|m| !m.from.is_some_and(|f| live.contains(&f))).count();
            prop_assert!(first.len() - orphans <= cfg.max_moves_per_step);

            let mut at = 10;
            converge(&mut map, &hosts, &cfg, &mut at);
            assert_converged(&map, &hosts, cfg.load_slack);
        }

        /// From a converged map, removing a host moves only its shards, all
        /// in the first plan; later plans pull fewer than N, and only when
        /// shards x slack is small next to N (rounding of the lower bounds).
        #[test]
        fn removal_moves_only_the_removed_hosts_shards(sc in arb_scenario(), pick in any::<usize>()) {
            let Scenario { mut hosts, mut map, cfg } = sc;
            prop_assume!(hosts.len() >= 2);
            let mut at = 10;
            converge(&mut map, &hosts, &cfg, &mut at);
            let gone = hosts.remove(pick % hosts.len()).node;
            let had = map.load().get(&gone).copied().unwrap_or(0);
            let first = plan(&map, &hosts, &cfg);
            prop_assert!(first.iter().all(|m| m.from == Some(gone)));
            prop_assert_eq!(first.len(), had, "all at once");
            prop_assert_eq!(map.apply(&first, at + 1), had);
            at += 1;
            // Afterwards, only rounding of the lower bounds may pull a few.
            let n_before = hosts.len() + 1;
            let pulled = converge(&mut map, &hosts, &cfg, &mut at).len();
            prop_assert!(pulled < n_before);
            let total = map.shard_count() as f64;
            prop_assert!(
                pulled == 0 || total * cfg.load_slack < 2.0 * n_before as f64,
                "{} pulled: {} shards, slack {}, {} hosts", pulled, total, cfg.load_slack, n_before
            );
            assert_converged(&map, &hosts, cfg.load_slack);
        }

        /// From a converged map over N hosts, a join moves about the new
        /// host's share (at most its cap + 2 unless shards x slack is small
        /// next to N), each plan within the budget.
        #[test]
        fn join_moves_about_one_share(
            sc in arb_scenario(),
            weight in 1u32..=4,
            budget in prop_oneof![1usize..=8, Just(100_000usize)],
        ) {
            let Scenario { mut hosts, mut map, mut cfg } = sc;
            let mut at = 10;
            converge(&mut map, &hosts, &cfg, &mut at);
            cfg.max_moves_per_step = budget;
            let joined = Host { node: 2000, weight };
            hosts.push(joined);
            let total = map.shard_count();
            let cap = bounds(&hosts, total, cfg.load_slack)[&2000].high;
            let mut moved = 0;
            let mut to_others = 0;
            loop {
                let moves = plan(&map, &hosts, &cfg);
                prop_assert!(moves.len() <= cfg.max_moves_per_step);
                if moves.is_empty() { break; }
                to_others += moves.iter().filter(|m| m.to != 2000).count();
                moved += moves.len();
                at += 1;
                map.apply(&moves, at);
            }
            assert_converged(&map, &hosts, cfg.load_slack);
            // cap = ceil(share * (1 + slack)) for the new host's weighted
            // share. Beyond it, rounding: each old host's cap may drop by
            // one more than its exact share does.
            let n = hosts.len();
            let rounding = if total as f64 * cfg.load_slack >= 2.0 * n as f64 { 2 } else { n };
            prop_assert!(
                moved <= cap + rounding,
                "moved {} cap {} to others {}, {} shards over {} hosts", moved, cap, to_others, total, n
            );
        }
    }
}

/// Serde for the entries map as `[(shard, entry), ...]`, so the map also
/// renders as JSON (the admin API), whose object keys must be strings.
mod entries_as_pairs {
    use super::{ShardEntry, ShardId};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<ShardId, ShardEntry>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ShardId, ShardEntry>, D::Error> {
        let pairs: Vec<(ShardId, ShardEntry)> = Vec::deserialize(d)?;
        Ok(pairs.into_iter().collect())
    }
}
