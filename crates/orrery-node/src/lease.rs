//! The node's side of membership: its liveness lease, self-fencing, the
//! membership view it uses to refuse revoked epochs, and probing.
//!
//! Why a thread of its own: a node busy with user work, logging or disk I/O
//! must not be declared dead because its heartbeats waited behind that
//! work. The heartbeat loop runs on a dedicated OS thread with its own
//! single-threaded runtime and its own connections, so only a truly stopped
//! process (crash, SIGSTOP, cut links) stops renewing its lease. A stalled
//! *work path* is the health monitor's business: it reports the node
//! impaired, and the coordinator acts on that.
//!
//! Self-fencing: the node serves only while its last *acknowledged*
//! heartbeat was sent less than `self_fence_after_ms` ago. The coordinator
//! may suspect it only after `lease_ttl_ms` without a heartbeat, and
//! `self_fence_after_ms + fence_margin_ms <= lease_ttl_ms` is asserted at
//! start, so a node always stops serving before it can be declared dead.
//!
//! What it must never do: decide membership (the coordinator does), or let a
//! heartbeat wait on anything but the network.

use crate::clock::now_ms;
use crate::health::{HealthProof, HealthState};
use crate::messages::{MembershipView, Reply, Request};
use crate::node::Inner;
use crate::transport::Transport;
use orrery_core::{Health, NodeId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

const LOG: &str = "orrery::lease";

/// The lease as this node sees it.
#[derive(Default)]
pub(crate) struct Lease {
    /// Monotonic ms (since process start) at which the last acknowledged
    /// heartbeat was sent; 0 = never.
    last_acked_send: AtomicU64,
    /// The node was told its epoch is revoked (or it failed-stop).
    fenced: AtomicBool,
    view: RwLock<Arc<MembershipView>>,
    /// What the TLS layer refuses, kept in step with every view installed.
    revocations: orrery_trust::Revocations,
    /// The version of every view installed, for open connections to check
    /// their peer's epoch again (`Handler::admission`).
    views: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Lease {
    /// Whether the lease is fresh enough to serve, at monotonic time `mono`.
    pub fn fresh(&self, mono: u64, self_fence_after: u64) -> bool {
        let at = self.last_acked_send.load(Ordering::Relaxed);
        at > 0 && orrery_core::lease::lease_fresh(mono, at, self_fence_after)
    }

    /// How long ago (monotonic ms) the last acknowledged heartbeat was
    /// sent, if one ever was.
    pub fn age_ms(&self, mono: u64) -> Option<u64> {
        let at = self.last_acked_send.load(Ordering::Relaxed);
        (at > 0).then(|| mono.saturating_sub(at))
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::Relaxed);
        if fenced {
            self.last_acked_send.store(0, Ordering::Relaxed);
        }
    }

    pub fn view(&self) -> Arc<MembershipView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A lease whose views also feed `revocations` (the node's TLS layer)
    /// and announce themselves on `views`.
    pub fn new(
        revocations: orrery_trust::Revocations,
        views: Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Self {
        Lease {
            revocations,
            views,
            ..Default::default()
        }
    }

    /// Installs a newer view; the certificates it revokes are refused from
    /// now on, and open connections made with them are closed.
    pub fn set_view(&self, v: MembershipView) {
        self.revocations.replace(v.revocations());
        let version = v.version;
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
        self.views.send_replace(version);
    }
}

/// The core verdict from the node's health monitor.
pub(crate) fn verdict(state: &HealthState) -> Health {
    match state {
        HealthState::Healthy => Health::Healthy,
        HealthState::Impaired { reasons } => Health::Impaired(reasons.join("; ")),
        HealthState::FailStop { reasons } => Health::FailStop(reasons.join("; ")),
    }
}

/// Starts the heartbeat loop on its own OS thread.
pub(crate) fn spawn_heartbeats(node: Arc<Inner>, net: Arc<dyn Transport>) {
    let name = format!("orrery-heartbeat-{}", node.cfg.node_id);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!(target: LOG, "cannot start the heartbeat runtime: {e}");
                return;
            }
        };
        rt.block_on(heartbeats(node, net));
    });
    if let Err(e) = spawned {
        warn!(target: LOG, "cannot start the heartbeat thread: {e}");
    }
}

async fn heartbeats(node: Arc<Inner>, net: Arc<dyn Transport>) {
    let mc = node.cfg.membership.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(mc.heartbeat_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_millis(mc.heartbeat_interval_ms.max(100));
    let voters: Vec<NodeId> = node.cfg.voters().keys().copied().collect();
    let mut target_i = 0usize;
    let mut peer_i = 0usize;
    let mut last_peer_probe = 0u64;
    let mut probing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let epoch = node.epoch.load(Ordering::Relaxed);
        if epoch == 0 {
            continue;
        }
        // A probe (up to 4x probe_timeout_ms when impaired) and the
        // accusation after it run beside the heartbeats, never before one:
        // a hung peer must not make this node miss its own lease. One at a
        // time: the next waits until the last one has finished.
        // Only once this node is ready: before that its accusations do not
        // count (eligibility needs stage 0), and during start-up each probe
        // of a random peer is one more handshake in the storm.
        let idle = probing.as_ref().is_none_or(|p| p.is_finished());
        let ready = node.ready();
        if idle
            && ready
            && node.mono_ms().saturating_sub(last_peer_probe) >= mc.peer_probe_interval_ms
        {
            last_peer_probe = node.mono_ms();
            peer_i += 1;
            let (node, net) = (node.clone(), net.clone());
            probing = Some(tokio::spawn(async move {
                probe_a_peer(&node, net.as_ref(), peer_i).await
            }));
        }
        let health = verdict(&node.health.report().state);
        let sent = node.mono_ms();
        let hint = node.leader_hint.load(Ordering::Relaxed);
        let target = if hint != 0 {
            hint
        } else {
            voters[target_i % voters.len()]
        };
        let req = Request::Heartbeat {
            node: node.cfg.node_id,
            epoch,
            health,
            view_version: node.lease.view().version,
        };
        let reply = net.call(target, req, timeout).await;
        note_contact(&node, target, &reply);
        match reply {
            Ok(Reply::HeartbeatAck {
                view,
                shards_version,
                jobs,
            }) => {
                // Only the leader acknowledges heartbeats: remember it (the
                // accusations and other leader-only requests go there).
                node.leader_hint.store(target, Ordering::Relaxed);
                node.shards.announce(shards_version);
                if node.epoch.load(Ordering::Relaxed) == epoch && !node.lease.is_fenced() {
                    node.lease
                        .last_acked_send
                        .store(sent.max(1), Ordering::Relaxed);
                    // The job leases held under this epoch: the runner
                    // starts what it has not started yet.
                    node.jobs.offer(epoch, jobs);
                }
                if let Some(v) = view {
                    node.lease.set_view(*v);
                }
            }
            Ok(Reply::NotLeader { leader }) => match leader {
                Some(l) if l != target => node.leader_hint.store(l, Ordering::Relaxed),
                _ => {
                    node.leader_hint.store(0, Ordering::Relaxed);
                    target_i += 1;
                }
            },
            Ok(Reply::Fenced { reason }) => {
                if node.epoch.load(Ordering::Relaxed) == epoch && !node.lease.is_fenced() {
                    warn!(target: LOG, "the cluster revoked this node's epoch {epoch}: {reason}");
                    node.fence(reason);
                }
            }
            Ok(_) | Err(_) => {
                node.leader_hint.store(0, Ordering::Relaxed);
                target_i += 1;
            }
        }
    }
}

/// A heartbeat's answer is a contact with `target`; an acknowledgement
/// proves a working quorum (the leader renews a lease only while a quorum
/// acknowledges it), which is how a worker, or a follower, knows the
/// control plane still commits.
fn note_contact(
    node: &Inner,
    target: NodeId,
    reply: &Result<Reply, crate::transport::TransportError>,
) {
    match reply {
        Ok(Reply::HeartbeatAck { .. }) => {
            node.contacts.heard(target);
            node.contacts.quorum_seen();
        }
        Ok(_) => node.contacts.heard(target),
        Err(e) => node.contacts.failed(target, &e.to_string()),
    }
}

/// Checks one peer's health proof (round-robin over the members the view
/// says are current) and accuses it to the leader if it fails. The node
/// does not censor itself when it is unhealthy: the coordinator decides
/// whose accusations count.
async fn probe_a_peer(node: &Inner, net: &dyn Transport, i: usize) {
    let view = node.lease.view();
    let peers: Vec<(NodeId, u64)> = view
        .members
        .iter()
        .filter(|(id, (e, fenced))| **id != node.cfg.node_id && *e > 0 && fenced.is_none())
        .map(|(id, (e, _))| (*id, *e))
        .collect();
    if peers.is_empty() {
        return;
    }
    let (suspect, suspect_epoch) = peers[i % peers.len()];
    let Reply::ProbeResult { ok: false, detail } = probe_raw(node, net, suspect).await else {
        return;
    };
    let hint = node.leader_hint.load(Ordering::Relaxed);
    let leader = if hint != 0 { hint } else { return };
    let req = Request::Accuse {
        suspect,
        epoch: suspect_epoch,
        detail,
    };
    let timeout = Duration::from_millis(node.cfg.membership.probe_timeout_ms);
    let _ = net.call(leader, req, timeout).await;
}

/// Prober side: probe `suspect` directly with a health challenge and verify
/// its proof. A node that is not healthy itself refuses to probe.
pub(crate) async fn probe(node: &Inner, net: &dyn Transport, suspect: NodeId) -> Reply {
    if !node.health.is_healthy() {
        return Reply::Error(format!(
            "node {} is not healthy and does not probe",
            node.cfg.node_id
        ));
    }
    probe_raw(node, net, suspect).await
}

/// How much an impaired node lengthens its own probe timeouts (as
/// Lifeguard does): a slow node should doubt its own verdicts first.
const IMPAIRED_TIMEOUT_FACTOR: u64 = 4;

async fn probe_raw(node: &Inner, net: &dyn Transport, suspect: NodeId) -> Reply {
    let nonce = now_ms() ^ (suspect << 48) ^ node.mono_ms().rotate_left(17);
    let factor = if node.health.is_healthy() {
        1
    } else {
        IMPAIRED_TIMEOUT_FACTOR
    };
    let timeout = Duration::from_millis(node.cfg.membership.probe_timeout_ms * factor);
    // The whole probe, connecting included, is bounded by probe_timeout.
    let started = tokio::time::Instant::now();
    let call = net.call(suspect, Request::HealthProbe { nonce }, timeout);
    let answer = tokio::time::timeout(timeout, call).await;
    if answer.is_err() && prober_stalled(started.elapsed(), timeout) {
        // Our own timer fired this late: we were stalled (a blocked worker,
        // a paused process), so the silence proves nothing about the
        // suspect. Give no verdict rather than a false failure.
        return Reply::Error(format!(
            "probe of node {suspect} inconclusive: this node stalled ({:?} for a {timeout:?} probe)",
            started.elapsed()
        ));
    }
    if let Ok(r) = &answer {
        note_contact(node, suspect, r);
    }
    let (ok, detail) = match answer {
        Ok(Ok(Reply::HealthProof(p))) => check_proof(node, &p, nonce),
        Ok(Ok(Reply::Fenced { reason })) => (false, format!("it refused us: {reason}")),
        Ok(Ok(other)) => (false, format!("unexpected answer {other:?}")),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("no answer within {timeout:?}")),
    };
    Reply::ProbeResult { ok, detail }
}

/// Whether a probe that timed out took so much longer than its timeout
/// that the prober itself, not the suspect, was the one not running.
fn prober_stalled(elapsed: Duration, timeout: Duration) -> bool {
    elapsed > timeout + timeout / 2
}

fn check_proof(node: &Inner, p: &HealthProof, nonce: u64) -> (bool, String) {
    if p.nonce != nonce {
        return (false, "stale health proof".into());
    }
    if !node.health.verify_peer_response(p) {
        return (false, "invalid health proof".into());
    }
    // Alive and able to prove it: an impaired node (slow, say) is not dead;
    // only a node that stopped itself counts as gone.
    if p.node_state == (HealthState::FailStop { reasons: vec![] }).code() {
        return (
            false,
            "it reports that it stopped itself (fail-stop)".into(),
        );
    }
    (true, String::new())
}

/// Leader side: the compact membership view, re-versioned when it changes.
pub(crate) fn refresh_view(node: &Inner, state: &orrery_core::ClusterState) -> Arc<MembershipView> {
    let mut fresh = MembershipView::of(state);
    let current = node.lease.view();
    if current.members == fresh.members
        && current.cert_floor == fresh.cert_floor
        && current.config_index == fresh.config_index
    {
        return current;
    }
    // Raft log indexes only grow, so versions stay monotonic across leaders.
    fresh.version = state.applied_index.max(current.version + 1);
    info!(target: LOG, version = fresh.version, "membership view changed");
    node.lease.set_view(fresh);
    node.lease.view()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_timer_is_the_probers_stall_not_the_suspects_silence() {
        let t = Duration::from_millis(300);
        assert!(!prober_stalled(Duration::from_millis(310), t));
        assert!(!prober_stalled(Duration::from_millis(450), t));
        assert!(prober_stalled(Duration::from_millis(451), t));
        assert!(prober_stalled(Duration::from_millis(1800), t));
    }
}
