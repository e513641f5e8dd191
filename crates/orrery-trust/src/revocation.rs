//! [`Revocations`]: the certificates the cluster no longer accepts, checked at every
//! handshake on both sides.
//!
//! The source of truth is the replicated cluster state (issue 10: removal revokes); the
//! node copies it here whenever its view changes ([`Revocations::replace`]). Two rules,
//! both by serial number:
//! - a **per-node minimum serial**: every certificate of node N with a serial below
//!   `min_serial[N]` is refused. This is the main tool: removing a node whose certificate
//!   has serial S sets its minimum to S + 1, and the node can come back only with a newly
//!   issued certificate (serials only grow, see [`crate::ClusterCa`]). It is bounded by
//!   the number of nodes.
//! - a set of **revoked serials**, for revoking one certificate without touching the
//!   node's later ones.
//!
//! A certificate is only ever checked against the list in force when its handshake runs;
//! connections established before a change are the caller's to re-check
//! ([`Revocations::check`]) and close: [`Revocations::subscribe`] tells it when.

use crate::identity::PeerIdentity;
use orrery_core::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::watch;

/// What is revoked: a plain value, as the replicated state would hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// Individually revoked serials (any node).
    pub revoked_serials: BTreeSet<u64>,
    /// Per node: the lowest serial still accepted.
    pub min_serial: BTreeMap<NodeId, u64>,
}

/// Why a verified certificate is nonetheless refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Revoked {
    /// Its serial is on the revoked list.
    #[error("certificate serial {serial} of node {node} is revoked")]
    Serial {
        /// The node it names.
        node: NodeId,
        /// Its serial.
        serial: u64,
    },
    /// Its serial is below the node's minimum: the node was removed (or re-issued) since.
    #[error(
        "certificate serial {serial} of node {node} is below the node's minimum serial {min}: \
         issue the node a new certificate"
    )]
    Superseded {
        /// The node it names.
        node: NodeId,
        /// Its serial.
        serial: u64,
        /// The lowest serial accepted for the node.
        min: u64,
    },
}

impl RevocationList {
    /// Whether `id`'s certificate is still accepted.
    pub fn check(&self, id: &PeerIdentity) -> Result<(), Revoked> {
        if self.revoked_serials.contains(&id.serial) {
            return Err(Revoked::Serial {
                node: id.node_id,
                serial: id.serial,
            });
        }
        match self.min_serial.get(&id.node_id) {
            Some(&min) if id.serial < min => Err(Revoked::Superseded {
                node: id.node_id,
                serial: id.serial,
                min,
            }),
            _ => Ok(()),
        }
    }
}

/// A shared, cheaply updatable [`RevocationList`]: clones share one list. Reading it (at
/// every handshake) takes a read lock for the length of one map look-up; writers replace
/// or amend it and wake every [`subscribe`](Revocations::subscribe)r.
#[derive(Clone, Debug)]
pub struct Revocations {
    list: Arc<watch::Sender<RevocationList>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new(RevocationList::default())
    }
}

impl Revocations {
    /// A shared list starting as `list`.
    pub fn new(list: RevocationList) -> Self {
        Revocations {
            list: Arc::new(watch::Sender::new(list)),
        }
    }

    /// Checks a peer against the list in force now.
    pub fn check(&self, id: &PeerIdentity) -> Result<(), Revoked> {
        self.list.borrow().check(id)
    }

    /// Replaces the whole list (what a node does when the replicated state changes).
    /// Subscribers are woken only if the list changed.
    pub fn replace(&self, list: RevocationList) {
        self.list.send_if_modified(|cur| {
            let changed = *cur != list;
            *cur = list;
            changed
        });
    }

    /// Revokes one serial.
    pub fn revoke_serial(&self, serial: u64) {
        self.list
            .send_if_modified(|cur| cur.revoked_serials.insert(serial));
    }

    /// Raises `node`'s minimum accepted serial to `min` (never lowers it).
    pub fn raise_min_serial(&self, node: NodeId, min: u64) {
        self.list.send_if_modified(|cur| {
            let slot = cur.min_serial.entry(node).or_insert(0);
            let raised = min > *slot;
            *slot = (*slot).max(min);
            raised
        });
    }

    /// A copy of the list in force.
    pub fn snapshot(&self) -> RevocationList {
        self.list.borrow().clone()
    }

    /// A receiver that wakes (`changed().await`) whenever the list changes: the moment to
    /// re-check established connections and close the revoked ones.
    pub fn subscribe(&self) -> watch::Receiver<RevocationList> {
        self.list.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::ClusterId;
    use orrery_core::Role;

    fn id(node: NodeId, serial: u64) -> PeerIdentity {
        PeerIdentity {
            cluster_id: ClusterId::new("alpha").unwrap(),
            node_id: node,
            role: Role::Worker,
            serial,
        }
    }

    #[test]
    fn min_serial_and_revoked_serials_refuse() {
        let r = Revocations::default();
        let mut rx = r.subscribe();
        assert_eq!(r.check(&id(1, 5)), Ok(()));
        r.raise_min_serial(1, 6);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(
            r.check(&id(1, 5)),
            Err(Revoked::Superseded {
                node: 1,
                serial: 5,
                min: 6
            })
        );
        assert_eq!(r.check(&id(1, 6)), Ok(()));
        assert_eq!(r.check(&id(2, 5)), Ok(()));
        r.raise_min_serial(1, 3); // never lowers
        assert!(!rx.has_changed().unwrap());
        assert!(r.check(&id(1, 5)).is_err());
        r.revoke_serial(9);
        assert_eq!(
            r.check(&id(2, 9)),
            Err(Revoked::Serial { node: 2, serial: 9 })
        );
        let snap = r.snapshot();
        rx.borrow_and_update();
        r.replace(snap.clone());
        assert!(!rx.has_changed().unwrap(), "an identical list wakes nobody");
        r.replace(RevocationList::default());
        assert!(rx.has_changed().unwrap());
        assert_eq!(r.check(&id(1, 5)), Ok(()));
    }
}
