//! How a node reaches its peers: the small interface the node code is
//! written against, with two implementations.
//!
//! - [`TcpTransport`]: the product. Authenticated orrery-wire connections
//!   over real TCP, one lazily (re)connected channel per peer.
//! - [`MemNetwork`]: many nodes in one process, for tests and the
//!   in-process start-up benchmark. Calls go straight to the target node's
//!   handler through a network that can cut nodes off, lose messages and
//!   delay them (seeded), so the *same node code* runs on real TCP and in a
//!   simulated network.
//!
//! This module owns delivery only. It must never interpret requests (that
//! is `node.rs`), and every call it makes is bounded by the caller's timeout.

use crate::messages::{Reply, Request};
use orrery_core::NodeId;
use orrery_wire::{BoxFuture, PeerPool, WireConfig, WireStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A call that got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("node {node} unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("node {node} did not answer within {timeout:?}")]
    Timeout { node: NodeId, timeout: Duration },
    /// Too many calls in flight to that node: refused at once, not queued.
    #[error("too many calls in flight to node {node}")]
    Overloaded { node: NodeId },
}

/// The node code's view of the network.
pub trait Transport: Send + Sync + 'static {
    /// Sends `req` to `target` and waits at most `timeout` for the reply.
    fn call(
        &self,
        target: NodeId,
        req: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Reply, TransportError>>;
    /// From now on, connections announce this process epoch.
    fn set_epoch(&self, epoch: u64);
    /// A second attachment with connections of its own, for traffic that
    /// must not queue behind the node's other work (heartbeats, probes).
    fn sibling(&self) -> Arc<dyn Transport>;
}

/// The server side of a node, as a network delivers to it.
pub trait Endpoint: Send + Sync + 'static {
    /// `req` from node `from`, running under `epoch`.
    fn deliver(&self, from: NodeId, epoch: u64, req: Request) -> BoxFuture<'_, Reply>;
}

/// Real TCP through orrery-wire.
pub struct TcpTransport {
    base: WireConfig,
    epoch: AtomicU64,
    stats: Arc<WireStats>,
    connect_timeout: Duration,
    addrs: BTreeMap<NodeId, String>,
    pool: RwLock<Arc<PeerPool<Request, Reply>>>,
}

impl TcpTransport {
    pub fn new(
        base: WireConfig,
        stats: Arc<WireStats>,
        connect_timeout: Duration,
        addrs: BTreeMap<NodeId, String>,
    ) -> Self {
        let pool = Self::pool_for(&base, &stats, connect_timeout, &addrs);
        TcpTransport {
            epoch: AtomicU64::new(base.epoch),
            base,
            stats,
            connect_timeout,
            addrs,
            pool: RwLock::new(pool),
        }
    }

    fn pool_for(
        cfg: &WireConfig,
        stats: &Arc<WireStats>,
        connect_timeout: Duration,
        addrs: &BTreeMap<NodeId, String>,
    ) -> Arc<PeerPool<Request, Reply>> {
        let pool = Arc::new(PeerPool::new(
            Arc::new(cfg.clone()),
            stats.clone(),
            connect_timeout,
        ));
        for (id, addr) in addrs {
            pool.set_addr(*id, addr.clone());
        }
        pool
    }

    fn pool(&self) -> Arc<PeerPool<Request, Reply>> {
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Transport for TcpTransport {
    fn call(
        &self,
        target: NodeId,
        req: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Reply, TransportError>> {
        Box::pin(async move {
            let pool = self.pool();
            // The pool bounds connecting by connect_timeout; the call by `timeout`.
            match tokio::time::timeout(
                timeout + self.connect_timeout,
                pool.call(target, req, timeout),
            )
            .await
            {
                Ok(Ok(r)) => Ok(r),
                // The peer refused our handshake because this process is
                // fenced: the same answer a request on an open connection
                // gets, so the node rejoins instead of retrying forever.
                Ok(Err(orrery_wire::PoolError::Connect { source, .. }))
                    if source.fenced().is_some() =>
                {
                    Ok(Reply::Fenced {
                        reason: source.fenced().map(str::to_string).unwrap_or_default(),
                    })
                }
                Ok(Err(orrery_wire::PoolError::Call(
                    orrery_wire::CallError::Overloaded
                    | orrery_wire::CallError::Remote(orrery_wire::RemoteError::Overloaded),
                ))) => Err(TransportError::Overloaded { node: target }),
                Ok(Err(orrery_wire::PoolError::Call(orrery_wire::CallError::Timeout))) => {
                    Err(TransportError::Timeout {
                        node: target,
                        timeout,
                    })
                }
                Ok(Err(e)) => Err(TransportError::Unreachable {
                    node: target,
                    reason: e.to_string(),
                }),
                Err(_) => Err(TransportError::Timeout {
                    node: target,
                    timeout,
                }),
            }
        })
    }

    fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
        let mut cfg = self.base.clone();
        cfg.epoch = epoch;
        let fresh = Self::pool_for(&cfg, &self.stats, self.connect_timeout, &self.addrs);
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    fn sibling(&self) -> Arc<dyn Transport> {
        let mut base = self.base.clone();
        base.epoch = self.epoch.load(Ordering::Relaxed);
        Arc::new(TcpTransport::new(
            base,
            self.stats.clone(),
            self.connect_timeout,
            self.addrs.clone(),
        ))
    }
}

/// Fault settings of a [`MemNetwork`].
#[derive(Clone, Debug, Default)]
pub struct MemFaults {
    /// Nodes cut off from everyone (both directions).
    pub isolated: BTreeSet<NodeId>,
    /// Probability that a request or its reply is lost.
    pub drop_rate: f64,
    /// One-way delay range in milliseconds (0, 0 = none).
    pub delay_ms: (u64, u64),
    /// A partition: every link between these nodes and the others is cut.
    pub split: BTreeSet<NodeId>,
    /// One-way links cut: (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
}

/// An in-process network of nodes.
pub struct MemNetwork {
    endpoints: RwLock<BTreeMap<NodeId, Arc<dyn Endpoint>>>,
    faults: RwLock<MemFaults>,
    rng: Mutex<ChaCha8Rng>,
    delivered: AtomicU64,
    lost: AtomicU64,
}

impl MemNetwork {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(MemNetwork {
            endpoints: RwLock::new(BTreeMap::new()),
            faults: RwLock::new(MemFaults::default()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    pub(crate) fn register(&self, id: NodeId, ep: Arc<dyn Endpoint>) {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, ep);
    }

    /// Removes a node: calls to it fail as if its process died.
    pub fn crash(&self, id: NodeId) {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Changes the fault settings.
    pub fn set_faults(&self, f: impl FnOnce(&mut MemFaults)) {
        f(&mut self.faults.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// (messages delivered, messages lost to faults).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }

    /// Whether a message between `a` and `b` gets through, and after how long.
    fn hop(&self, a: NodeId, b: NodeId) -> Option<Duration> {
        let f = self
            .faults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if f.isolated.contains(&a)
            || f.isolated.contains(&b)
            || f.split.contains(&a) != f.split.contains(&b)
            || f.cut.contains(&(a, b))
        {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if f.drop_rate > 0.0 && rng.gen_bool(f.drop_rate.min(1.0)) {
            return None;
        }
        let (lo, hi) = f.delay_ms;
        Some(Duration::from_millis(if hi > lo {
            rng.gen_range(lo..=hi)
        } else {
            lo
        }))
    }

    fn endpoint(&self, id: NodeId) -> Option<Arc<dyn Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

/// One node's attachment to a [`MemNetwork`].
pub struct MemTransport {
    me: NodeId,
    epoch: Arc<AtomicU64>,
    net: Arc<MemNetwork>,
}

impl MemTransport {
    pub fn new(me: NodeId, net: Arc<MemNetwork>) -> Self {
        MemTransport {
            me,
            epoch: Arc::new(AtomicU64::new(0)),
            net,
        }
    }
}

impl Transport for MemTransport {
    fn call(
        &self,
        target: NodeId,
        req: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Reply, TransportError>> {
        Box::pin(async move {
            let lost = || TransportError::Timeout {
                node: target,
                timeout,
            };
            let exchange = async {
                if self.net.endpoint(self.me).is_none() {
                    // This node crashed: nothing it sends leaves the process.
                    return Err(TransportError::Unreachable {
                        node: target,
                        reason: "this node is down".into(),
                    });
                }
                let Some(there) = self.net.hop(self.me, target) else {
                    self.net.lost.fetch_add(1, Ordering::Relaxed);
                    return std::future::pending().await;
                };
                if !there.is_zero() {
                    tokio::time::sleep(there).await;
                }
                let Some(ep) = self.net.endpoint(target) else {
                    return Err(TransportError::Unreachable {
                        node: target,
                        reason: "connection refused".into(),
                    });
                };
                let reply = ep
                    .deliver(self.me, self.epoch.load(Ordering::Relaxed), req)
                    .await;
                let Some(back) = self.net.hop(target, self.me) else {
                    self.net.lost.fetch_add(1, Ordering::Relaxed);
                    return std::future::pending().await;
                };
                if !back.is_zero() {
                    tokio::time::sleep(back).await;
                }
                self.net.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(reply)
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or_else(|_| Err(lost()))
        })
    }

    fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    fn sibling(&self) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            me: self.me,
            epoch: self.epoch.clone(),
            net: self.net.clone(),
        })
    }
}
