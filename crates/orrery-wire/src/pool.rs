//! [`PeerPool`]: one lazily (re)connected [`Channel`] per known node.
//!
//! The pool maps node id -> address. [`PeerPool::get`] returns the live channel for a
//! node, connecting on first use and reconnecting once the previous channel has
//! closed. Connects to the same node are single-flight; each attempt is bounded by
//! the pool's `connect_timeout` (and by `handshake_timeout`). The pool verifies that
//! the node that answered is the node id it was asked for.
//!
//! An attempt runs in a task of its own: a caller whose deadline is shorter than a
//! handshake (a Raft heartbeat's, say) gives up waiting, not the attempt, so the
//! next caller finds the channel ready instead of starting over. Under load, calls
//! that each cancelled their own connect would never get a connection at all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{connect, CallError, Channel};
use crate::handshake::HandshakeError;
use crate::stats::WireStats;
use crate::{Message, WireConfig};
use tokio::sync::watch;

/// Why [`PeerPool`] could not produce a channel or complete a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// No address is known for this node id.
    #[error("no address known for node {node_id}")]
    UnknownPeer {
        /// The requested node.
        node_id: u64,
    },
    /// Connecting or the handshake failed.
    #[error("could not connect to node {node_id} at {addr}: {source}")]
    Connect {
        /// The requested node.
        node_id: u64,
        /// Its address.
        addr: String,
        /// The handshake error (shared by every caller that waited on the attempt).
        source: Arc<HandshakeError>,
    },
    /// Connect + handshake exceeded the pool's connect timeout.
    #[error("connecting to node {node_id} at {addr} timed out")]
    ConnectTimeout {
        /// The requested node.
        node_id: u64,
        /// Its address.
        addr: String,
    },
    /// A different node answered at that address.
    #[error("expected node {expected} at {addr}, but node {got} answered")]
    WrongPeer {
        /// The requested node.
        expected: u64,
        /// The node that answered.
        got: u64,
        /// The address.
        addr: String,
    },
    /// The call itself failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// The outcome of a connect attempt, once there is one.
type Attempt<Req, Resp> = watch::Receiver<Option<Result<Channel<Req, Resp>, PoolError>>>;

struct Slot<Req, Resp> {
    addr: String,
    state: Mutex<SlotState<Req, Resp>>,
}

struct SlotState<Req, Resp> {
    chan: Option<Channel<Req, Resp>>,
    /// The latest connect attempt (running while its value is `None`).
    attempt: Option<Attempt<Req, Resp>>,
}

impl<Req, Resp> Slot<Req, Resp> {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState<Req, Resp>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Channels to peers keyed by node id. Share it behind an `Arc`.
pub struct PeerPool<Req, Resp> {
    cfg: Arc<WireConfig>,
    stats: Arc<WireStats>,
    connect_timeout: Duration,
    peers: Mutex<BTreeMap<u64, Arc<Slot<Req, Resp>>>>,
}

impl<Req: Message, Resp: Message> PeerPool<Req, Resp> {
    /// An empty pool; every connect attempt is bounded by `connect_timeout`.
    pub fn new(cfg: Arc<WireConfig>, stats: Arc<WireStats>, connect_timeout: Duration) -> Self {
        PeerPool {
            cfg,
            stats,
            connect_timeout,
            peers: Mutex::new(BTreeMap::new()),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Slot<Req, Resp>>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set (or change) a node's address. Changing it drops the old channel.
    pub fn set_addr(&self, node_id: u64, addr: impl Into<String>) {
        let addr = addr.into();
        let mut peers = self.peers();
        if peers.get(&node_id).is_some_and(|s| s.addr == addr) {
            return;
        }
        peers.insert(
            node_id,
            Arc::new(Slot {
                addr,
                state: Mutex::new(SlotState {
                    chan: None,
                    attempt: None,
                }),
            }),
        );
    }

    /// Forget a node (its channel closes once no caller holds a clone).
    pub fn remove(&self, node_id: u64) {
        self.peers().remove(&node_id);
    }

    /// The address known for a node.
    pub fn addr(&self, node_id: u64) -> Option<String> {
        self.peers().get(&node_id).map(|s| s.addr.clone())
    }

    /// The live channel to `node_id`, connecting (or reconnecting) if needed.
    /// Cancel-safe: dropping the future leaves the attempt running for the
    /// next caller.
    pub async fn get(&self, node_id: u64) -> Result<Channel<Req, Resp>, PoolError> {
        let slot = self
            .peers()
            .get(&node_id)
            .cloned()
            .ok_or(PoolError::UnknownPeer { node_id })?;
        let mut attempt = {
            let mut st = slot.lock();
            if let Some(c) = st.chan.as_ref().filter(|c| !c.is_closed()) {
                return Ok(c.clone());
            }
            st.chan = None;
            match st.attempt.as_ref().filter(|a| a.borrow().is_none()) {
                Some(running) => running.clone(),
                None => {
                    let started = self.start_attempt(node_id, slot.clone());
                    st.attempt = Some(started.clone());
                    started
                }
            }
        };
        let outcome = match attempt.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            // The attempt's task ended without an answer (the runtime is
            // shutting down).
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| {
            Err(PoolError::ConnectTimeout {
                node_id,
                addr: slot.addr.clone(),
            })
        })
    }

    /// Connects to `node_id` in a task of its own; a channel it makes is
    /// kept in `slot` whether or not anyone still waits for it.
    fn start_attempt(&self, node_id: u64, slot: Arc<Slot<Req, Resp>>) -> Attempt<Req, Resp> {
        let (tx, rx) = watch::channel(None);
        let (cfg, stats, limit) = (self.cfg.clone(), self.stats.clone(), self.connect_timeout);
        tokio::spawn(async move {
            let addr = slot.addr.clone();
            let attempt = connect::<Req, Resp>(node_id, &addr, cfg, stats);
            let outcome = match tokio::time::timeout(limit, attempt).await {
                Err(_) => Err(PoolError::ConnectTimeout { node_id, addr }),
                Ok(Err(source)) => Err(PoolError::Connect {
                    node_id,
                    addr,
                    source: Arc::new(source),
                }),
                Ok(Ok(c)) if c.peer().node_id != node_id => {
                    let got = c.peer().node_id;
                    c.close();
                    Err(PoolError::WrongPeer {
                        expected: node_id,
                        got,
                        addr,
                    })
                }
                Ok(Ok(c)) => Ok(c),
            };
            if let Ok(c) = &outcome {
                slot.lock().chan = Some(c.clone());
            }
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// `get(node_id)` then `call(req, timeout)`. The timeout covers only the call.
    pub async fn call(&self, node_id: u64, req: Req, timeout: Duration) -> Result<Resp, PoolError> {
        let chan = self.get(node_id).await?;
        Ok(chan.call(req, timeout).await?)
    }
}
