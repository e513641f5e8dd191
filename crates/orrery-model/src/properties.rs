//! The stateright `Model` impl: the steps, and the properties checked in
//! every state reached.
//!
//! Safety (`always`):
//! - *one server per shard*: at no instant do two processes both pass the
//!   node's own serving check for one shard (owner in the map they hold,
//!   lease fresh, hand-over delay over);
//! - *one commit per period*: `apply` never accepts two `CommitJob`s for one
//!   period of the job.
//!
//! Reachability (`sometimes`), so that neither passes vacuously: a shard
//! taken over from another owner is served by its new owner; a paused
//! owner's shard is served elsewhere while it sleeps; a crashed node is
//! back under a new epoch and serves; a node is told it is fenced; a period is committed; both periods
//! are committed; a stale holder's commit is refused.

use crate::model::{shard, Action, OwnershipModel};
use crate::node::Run;
use crate::world::World;
use stateright::{Model, Property};

impl Model for OwnershipModel {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        vec![self.init()]
    }

    fn actions(&self, w: &World, out: &mut Vec<Action>) {
        if w.now < self.bounds.max_tick {
            out.push(Action::Tick);
        }
        for id in self.node_ids() {
            self.node_actions(w, id, out);
        }
        self.leader_actions(w, out);
        for m in &w.net {
            out.push(Action::Deliver(m.clone()));
            out.push(Action::Lose(m.clone()));
        }
    }

    fn next_state(&self, w: &World, a: Action) -> Option<World> {
        self.step(w, a)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(ONE_SERVER, |m: &OwnershipModel, w: &World| {
                (0..m.bounds.shards).all(|key| m.servers(w, key).len() <= 1)
            }),
            Property::always(ONE_COMMIT, |_, w: &World| {
                let mut periods: Vec<u64> = w.commits.iter().map(|c| c.period).collect();
                let n = periods.len();
                periods.dedup();
                periods.len() == n
            }),
            Property::sometimes(TAKEN_OVER, |m: &OwnershipModel, w: &World| {
                (0..m.bounds.shards).any(|key| {
                    let entry = w.control.state.shards.owner(shard(key)).copied();
                    entry.is_some_and(|e| e.previous.is_some() && m.servers(w, key) == [e.owner])
                })
            }),
            Property::sometimes(PAUSED_OWNER_REPLACED, |m: &OwnershipModel, w: &World| {
                (0..m.bounds.shards).any(|key| {
                    let entry = w.control.state.shards.owner(shard(key)).copied();
                    entry.is_some_and(|e| {
                        let believes = |p: u64| {
                            let old = w.node(p);
                            let held = old.map.0.owner(shard(key)).map(|e| e.owner);
                            old.run == Run::Paused && held == Some(p)
                        };
                        e.previous.is_some_and(believes) && m.servers(w, key) == [e.owner]
                    })
                })
            }),
            Property::sometimes(CRASHED_AND_BACK, |m: &OwnershipModel, w: &World| {
                let fence = m.fence(w);
                w.spent.crashed.iter().any(|id| {
                    let p = w.node(*id);
                    (0..m.bounds.shards)
                        .any(|key| p.serves(shard(key), w.now, fence, m.bounds.handover_margin))
                })
            }),
            Property::sometimes(FENCED_TOLD, |_, w: &World| w.nodes.iter().any(|p| p.fenced)),
            Property::sometimes(COMMITTED, |_, w: &World| !w.commits.is_empty()),
            Property::sometimes(BOTH_PERIODS, |_, w: &World| w.commits.len() >= 2),
            Property::sometimes(STALE_REFUSED, |_, w: &World| w.stale_refused),
        ]
    }
}

pub const ONE_SERVER: &str = "no two processes serve one shard at once";
pub const ONE_COMMIT: &str = "no two commits of one period accepted";
pub const TAKEN_OVER: &str = "a shard taken over is served by its new owner";
pub const PAUSED_OWNER_REPLACED: &str = "a paused owner's shard is served by its new owner";
pub const CRASHED_AND_BACK: &str = "a crashed node serves again under a new epoch";
pub const FENCED_TOLD: &str = "a node is told its epoch is fenced";
pub const COMMITTED: &str = "a period is committed";
pub const BOTH_PERIODS: &str = "two periods are committed";
pub const STALE_REFUSED: &str = "a stale holder's commit is refused";
