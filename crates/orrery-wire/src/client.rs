//! The connecting side: [`connect`] and the multiplexed [`Channel`].
//!
//! A `Channel` owns one TCP connection with a reader task (completing pending calls
//! by request id) and a writer task (draining a bounded queue). It is cheap to clone;
//! the connection closes when the last clone is dropped, when [`Channel::close`] is
//! called, or when the peer goes away / sends bad input — then every pending call
//! fails promptly with [`CallError::Closed`].

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::frame::{decode, encode, writer_loop, Envelope, FrameError, RemoteError, WireCodec};
use crate::handshake::{client_handshake, new_framed, HandshakeError, Offer, PeerInfo};
use crate::link::Link;
use crate::server::close_bad_input;
use crate::stats::WireStats;
use crate::{Message, WireConfig, LOG_TARGET};

/// Why a [`Channel::call`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer within the call's timeout (the request may still have run remotely).
    #[error("call timed out")]
    Timeout,
    /// The connection is closed (or closed while the call was pending).
    #[error("connection closed")]
    Closed,
    /// This channel already has `max_inflight_per_connection` calls pending; the call
    /// was not sent (fail fast, nothing is queued).
    #[error("too many calls in flight on this connection")]
    Overloaded,
    /// The server answered with an error.
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// The request could not be encoded.
    #[error("could not encode request: {0}")]
    Encode(String),
    /// The encoded request exceeds `max_frame_bytes`; it was not sent.
    #[error("request of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// Frame limit.
        max: usize,
    },
}

type Pending<Resp> = BTreeMap<u64, oneshot::Sender<Result<Resp, RemoteError>>>;

/// State shared by the `Channel` handles and its reader/writer tasks.
struct Shared<Resp> {
    /// `None` once closed: nothing can be registered any more.
    pending: Mutex<Option<Pending<Resp>>>,
    closed: CancellationToken,
}

impl<Resp> Shared<Resp> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending<Resp>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark closed and fail every pending call (their senders are dropped).
    fn close(&self) {
        self.closed.cancel();
        let pending = self.lock().take();
        drop(pending);
    }

    fn complete(&self, id: u64, outcome: Result<Resp, RemoteError>) {
        let waiter = self.lock().as_mut().and_then(|p| p.remove(&id));
        match waiter {
            Some(tx) => {
                let _ = tx.send(outcome);
            }
            None => tracing::trace!(target: LOG_TARGET, "late or unknown response id {id} ignored"),
        }
    }
}

struct Inner<Req, Resp> {
    shared: Arc<Shared<Resp>>,
    tx: mpsc::Sender<Bytes>,
    peer: PeerInfo,
    next_id: AtomicU64,
    inflight: Semaphore,
    max_frame: usize,
    stats: Arc<WireStats>,
    _req: PhantomData<fn(Req)>,
}

impl<Req, Resp> Drop for Inner<Req, Resp> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// A multiplexed request/response channel to one peer. Clone freely.
pub struct Channel<Req, Resp> {
    inner: Arc<Inner<Req, Resp>>,
}

impl<Req, Resp> Clone for Channel<Req, Resp> {
    fn clone(&self) -> Self {
        Channel {
            inner: self.inner.clone(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Channel<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.inner.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Connect to node `node` at `addr`, run the handshake (connect, TLS and
/// handshake together bounded by `cfg.handshake_timeout`) and start the
/// channel's reader and writer tasks. Under TLS the server's certificate
/// must name `node`; without it, the caller checks [`Channel::peer`].
/// Must be called inside a Tokio runtime.
pub async fn connect<Req: Message, Resp: Message>(
    node: u64,
    addr: &str,
    cfg: Arc<WireConfig>,
    stats: Arc<WireStats>,
) -> Result<Channel<Req, Resp>, HandshakeError> {
    connect_with_offer(node, addr, cfg, stats, Offer::default()).await
}

pub(crate) async fn connect_with_offer<Req: Message, Resp: Message>(
    node: u64,
    addr: &str,
    cfg: Arc<WireConfig>,
    stats: Arc<WireStats>,
    offer: Offer,
) -> Result<Channel<Req, Resp>, HandshakeError> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let peer_addr = stream.peer_addr()?;
        let (link, cert) = secure(stream, node, &cfg).await?;
        let mut framed = new_framed(link);
        let peer = client_handshake(&mut framed, &cfg, peer_addr, &stats, offer, cert).await?;
        Ok::<_, HandshakeError>((framed, peer))
    };
    let (mut framed, peer) = match tokio::time::timeout(cfg.handshake_timeout, attempt).await {
        Ok(Ok(done)) => done,
        Ok(Err(err)) => {
            if err.is_bad_input() {
                WireStats::bump(&stats.connections_closed_bad_input);
            }
            if matches!(err, HandshakeError::Tls(_)) {
                WireStats::bump(&stats.handshakes_refused_tls);
            }
            tracing::debug!(target: LOG_TARGET, "handshake with {addr} failed: {err}");
            return Err(err);
        }
        Err(_) => return Err(HandshakeError::Timeout),
    };
    WireStats::bump(&stats.handshakes_ok);
    framed.codec_mut().set_max_frame_bytes(cfg.max_frame_bytes);
    Ok(Channel::start(framed, peer, cfg, stats))
}

/// The dialled stream as this endpoint runs it: inside TLS (the server's
/// certificate must name `node`) when the config has trust. Our own
/// certificate may still be refused by the server: TLS 1.3 reports that at
/// the first read, which the handshake that follows makes at once.
async fn secure(
    stream: TcpStream,
    node: u64,
    cfg: &WireConfig,
) -> Result<(Link, Option<orrery_trust::PeerIdentity>), HandshakeError> {
    let Some(trust) = &cfg.trust else {
        return Ok((Link::Plain(stream), None));
    };
    let (tls, id) = trust
        .connect(stream, node)
        .await
        .map_err(HandshakeError::Tls)?;
    let tls = orrery_trust::tokio_rustls::TlsStream::Client(tls);
    Ok((Link::Tls(Box::new(tls)), Some(id)))
}

impl<Req: Message, Resp: Message> Channel<Req, Resp> {
    fn start(
        framed: Framed<Link, WireCodec>,
        peer: PeerInfo,
        cfg: Arc<WireConfig>,
        stats: Arc<WireStats>,
    ) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(BTreeMap::new())),
            closed: CancellationToken::new(),
        });
        let (tx, rx) = mpsc::channel(cfg.request_queue.max(1));
        let (sink, frames) = framed.split();
        let who = format!("node {} at {}", peer.node_id, peer.addr);

        let writer_shared = shared.clone();
        let writer_who = who.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = writer_shared.closed.cancelled() => {}
                res = writer_loop(sink, rx) => {
                    if let Err(e) = res {
                        tracing::debug!(target: LOG_TARGET, "writer to {writer_who} failed: {e}");
                    }
                }
            }
            writer_shared.close();
        });
        tokio::spawn(reader_loop::<Req, Resp>(
            frames,
            shared.clone(),
            stats.clone(),
            who.clone(),
        ));
        if let (Some(_), Some(cert)) = (&cfg.trust, peer.cert.clone()) {
            tokio::spawn(close_when_revoked(
                cfg.clone(),
                cert,
                shared.clone(),
                stats.clone(),
                who,
            ));
        }

        Channel {
            inner: Arc::new(Inner {
                shared,
                tx,
                peer,
                next_id: AtomicU64::new(1),
                inflight: Semaphore::new(cfg.max_inflight_per_connection),
                max_frame: cfg.max_frame_bytes,
                stats,
                _req: PhantomData,
            }),
        }
    }

    /// Send `req` and wait for its response, for at most `timeout` (which is also
    /// sent to the server as the request's deadline).
    ///
    /// Fails fast with [`CallError::Overloaded`] when `max_inflight_per_connection`
    /// calls are already pending on this channel, and with [`CallError::Closed`] when
    /// the connection is (or becomes) closed. Cancel-safe: dropping the future
    /// forgets the pending call.
    pub async fn call(&self, req: Req, timeout: Duration) -> Result<Resp, CallError> {
        let inner = &*self.inner;
        if inner.shared.closed.is_cancelled() {
            return Err(CallError::Closed);
        }
        let Ok(_permit) = inner.inflight.try_acquire() else {
            WireStats::bump(&inner.stats.requests_overloaded);
            return Err(CallError::Overloaded);
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        // 0 means "no deadline" on the wire, so round a zero timeout up.
        let timeout_ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let frame = encode(&Envelope::<Req, Resp>::Request {
            id,
            timeout_ms,
            body: req,
        })
        .map_err(|e| CallError::Encode(e.to_string()))?;
        if frame.len() > inner.max_frame {
            return Err(CallError::TooLarge {
                len: frame.len(),
                max: inner.max_frame,
            });
        }
        let (done_tx, done_rx) = oneshot::channel();
        match inner.shared.lock().as_mut() {
            Some(pending) => {
                pending.insert(id, done_tx);
            }
            None => return Err(CallError::Closed),
        }
        let cancel = encode(&Envelope::<Req, Resp>::Cancel { id })
            .ok()
            .map(|f| (&inner.tx, f));
        let _forget = ForgetOnDrop {
            shared: &inner.shared,
            id,
            cancel,
        };

        let exchange = async {
            inner.tx.send(frame).await.map_err(|_| CallError::Closed)?;
            match done_rx.await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(remote)) => Err(CallError::Remote(remote)),
                Err(_) => Err(CallError::Closed),
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => {
                WireStats::bump(&inner.stats.calls_timed_out);
                Err(CallError::Timeout)
            }
        }
    }
}

impl<Req, Resp> Channel<Req, Resp> {
    /// The server's identity as established by the handshake.
    pub fn peer(&self) -> &PeerInfo {
        &self.inner.peer
    }

    /// True once the connection is closed; a closed channel never reopens.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.is_cancelled()
    }

    /// Resolves when the connection closes.
    pub async fn closed(&self) {
        self.inner.shared.closed.cancelled().await
    }

    /// Close the connection now; pending calls fail with [`CallError::Closed`].
    pub fn close(&self) {
        self.inner.shared.close();
    }

    /// True if both handles share the same underlying connection.
    pub fn same_connection(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Number of calls currently awaiting a response.
    pub fn pending_calls(&self) -> usize {
        self.inner.shared.lock().as_ref().map_or(0, |p| p.len())
    }
}

/// Removes a call's pending entry however the call ends (answer, timeout, cancel).
struct ForgetOnDrop<'a, Resp> {
    shared: &'a Shared<Resp>,
    id: u64,
    /// Set when the caller gave up (dropped or timed out) before an answer
    /// came: the server is told to drop the handler.
    cancel: Option<(&'a mpsc::Sender<Bytes>, Bytes)>,
}

impl<Resp> Drop for ForgetOnDrop<'_, Resp> {
    fn drop(&mut self) {
        let unanswered = match self.shared.lock().as_mut() {
            Some(pending) => pending.remove(&self.id).is_some(),
            None => false,
        };
        if unanswered {
            if let Some((tx, frame)) = self.cancel.take() {
                // Best effort and never blocking: a full queue drops it.
                let _ = tx.try_send(frame);
            }
        }
    }
}

/// Closes the channel once the server's certificate is revoked (or the
/// channel closes first).
async fn close_when_revoked<Resp>(
    cfg: Arc<WireConfig>,
    cert: orrery_trust::PeerIdentity,
    shared: Arc<Shared<Resp>>,
    stats: Arc<WireStats>,
    who: String,
) {
    tokio::select! {
        _ = shared.closed.cancelled() => {}
        why = crate::link::until_revoked(cfg.trust.as_ref(), Some(&cert)) => {
            WireStats::bump(&stats.connections_closed_revoked);
            tracing::warn!(target: LOG_TARGET, "closing the connection to {who}: {why}");
            shared.close();
        }
    }
}

async fn reader_loop<Req: Message, Resp: Message>(
    mut frames: futures::stream::SplitStream<Framed<Link, WireCodec>>,
    shared: Arc<Shared<Resp>>,
    stats: Arc<WireStats>,
    who: String,
) {
    loop {
        let frame = tokio::select! {
            _ = shared.closed.cancelled() => break,
            frame = frames.next() => frame,
        };
        let bytes = match frame {
            None => {
                tracing::debug!(target: LOG_TARGET, "{who} closed the connection");
                break;
            }
            Some(Err(err)) => {
                close_bad_input(&stats, &who, &err);
                break;
            }
            Some(Ok(bytes)) => bytes,
        };
        match decode::<Envelope<Req, Resp>>(&bytes) {
            Ok(Envelope::Response { id, body }) => shared.complete(id, Ok(body)),
            Ok(Envelope::Failure { id, error }) => shared.complete(id, Err(error)),
            Ok(Envelope::Request { .. }) | Ok(Envelope::Cancel { .. }) => {
                close_bad_input(
                    &stats,
                    &who,
                    &FrameError::Malformed("server sent a Request frame".into()),
                );
                break;
            }
            Err(err) => {
                close_bad_input(&stats, &who, &err);
                break;
            }
        }
    }
    shared.close();
}
