//! orrery-model: an exhaustive model check, with stateright, of orrery's
//! shard ownership and per-period job lease rules. Dev-only; never
//! published, never linked into a node.
//!
//! Its main type is [`OwnershipModel`], a stateright `Model` of a small
//! cluster (3 nodes, 2 shards, one job over 2 periods) on a discrete clock,
//! with crashes, pauses, lost or late heartbeats, commits delayed, reordered
//! or lost, and a leader
//! free to move any shard, remove any node or grant the job to anyone. It
//! owns the model: the node processes' local beliefs, the messages in
//! flight, the fault budgets ([`Bounds`]) and the properties: no two
//! processes serving one shard at once, no two commits of one period
//! accepted (see [`properties`]).
//!
//! What it must never do: re-implement a rule orrery-core decides. Every
//! control-plane decision goes through `ClusterState::apply` with real
//! `Command`s; lease renewal through `lease::answer_heartbeat` (and so
//! `ClusterState::refusal_kind`); start-up through `ClusterState::gate`;
//! the first placement through `shardmap::plan`; nodes hold orrery-core's
//! own `ShardMap`. The only rules written here are the node's (when it
//! serves, from `orrery-node`), each named after the code it mirrors.
#![forbid(unsafe_code)]

pub mod control;
pub mod model;
pub mod node;
pub mod properties;
pub mod world;

pub use model::{Action, Bounds, OwnershipModel};
pub use world::World;

#[cfg(test)]
mod tests;
