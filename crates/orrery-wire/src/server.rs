//! The accepting side: [`serve`] and the [`Handler`] trait.
//!
//! Per connection: handshake (bounded by `handshake_timeout`), the handler's
//! [`Handler::admit`] hook, then a read loop. Each request runs in its own task; at
//! most `max_inflight_per_connection` run at once and any excess request is answered
//! immediately with [`RemoteError::Overloaded`]. Responses go through a bounded queue
//! (`request_queue`) to the connection's single writer task.
//!
//! **Request deadlines:** a request carries the client's `timeout_ms`. When it is
//! non-zero and expires, the handler future is *dropped* (cancelled) and the server
//! answers [`RemoteError::Timeout`] (the client has usually given up by then and
//! discards it). A handler panic is caught and answered with
//! [`RemoteError::Handler`]; it never takes the connection or the process down.
//!
//! **Connection caps** ([`crate::limit`]): at most `max_connections` accepted
//! connections are open and at most `max_handshakes` of them handshaking. A
//! new connection beyond a cap evicts a handshake in progress (the oldest
//! that has sent nothing yet first), or is closed right after `accept` when
//! every open connection is established; both are counted in [`WireStats`]
//! and never stop the accept loop. Handshake timeouts, refusals and
//! evictions are logged at the 1st, 2nd, 4th, 8th... occurrence.
//!
//! **Bad input** (oversized or undecodable frame, a frame of the wrong kind) closes
//! that connection only, logs the reason on target `orrery::wire` and bumps
//! [`WireStats`] counters. In-flight handler tasks of a closed connection are aborted.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::frame::{decode, encode, Envelope, FrameError, RemoteError, WireCodec};
use crate::handshake::{new_framed, server_handshake, AdmitError, HandshakeError, PeerInfo};
use crate::limit::{admit_yielding, first_bytes, ConnLimiter, ConnLimits, ConnSlot, First};
use crate::link::Link;
use crate::stats::WireStats;
use crate::{Message, WireConfig, LOG_TARGET};

/// A boxed, `Send` future (what [`Handler::handle`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Application logic behind [`serve`].
///
/// ```ignore
/// impl Handler<Req, Resp> for MyNode {
///     fn handle<'a>(&'a self, peer: &'a PeerInfo, req: Req) -> BoxFuture<'a, Resp> {
///         Box::pin(async move { self.on_request(peer, req).await })
///     }
/// }
/// ```
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    /// Answer one request from an authenticated peer. Runs in its own task; may be
    /// cancelled (dropped) when the request's deadline passes or the connection closes.
    fn handle<'a>(&'a self, peer: &'a PeerInfo, req: Req) -> BoxFuture<'a, Resp>;

    /// Called once per connection after the peer has proven the cluster secret and
    /// before the server proves it. `Err` refuses the peer, which is told
    /// `RejectReason::Fenced(reason)` for a fenced process (a revoked epoch)
    /// or `RejectReason::NotAdmitted(reason)` for anything else.
    /// The default admits everyone.
    fn admit(&self, peer: &PeerInfo) -> Result<(), AdmitError> {
        let _ = peer;
        Ok(())
    }

    /// Wakes whenever what [`admit`](Self::admit) decides may have changed
    /// (e.g. a new membership view): every open connection then asks
    /// `admit` again and is closed if its peer is refused now (a removed
    /// epoch). `None` (the default): admission never changes.
    fn admission(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Resolves with the reason once `handler` no longer admits `peer`.
async fn until_refused<Req, Resp, H: Handler<Req, Resp>>(
    handler: &H,
    peer: &PeerInfo,
) -> AdmitError {
    let Some(mut changes) = handler.admission() else {
        return std::future::pending().await;
    };
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(reason) = handler.admit(peer) {
            return reason;
        }
    }
}

/// Accept connections on `listener` until `shutdown` is cancelled, then abort all
/// connections (in-flight handlers are dropped) and return.
///
/// Never fails: accept errors (e.g. out of file descriptors) are logged and retried
/// after a short pause; per-connection failures affect only that connection.
pub async fn serve<Req, Resp, H>(
    listener: TcpListener,
    cfg: Arc<WireConfig>,
    handler: Arc<H>,
    stats: Arc<WireStats>,
    shutdown: CancellationToken,
) where
    Req: Message,
    Resp: Message,
    H: Handler<Req, Resp>,
{
    if let Err(e) = crate::limit::widen_backlog(&listener) {
        tracing::warn!(target: LOG_TARGET, "cannot widen the accept queue: {e}");
    }
    let limiter = ConnLimiter::new(
        ConnLimits {
            max_open: cfg.max_connections,
            max_pending: cfg.max_handshakes,
        },
        stats.clone(),
    );
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    WireStats::bump(&stats.connections_accepted);
                    let heard = crate::limit::has_data(&stream);
                    let Some(slot) = admit_yielding(&limiter, heard).await else {
                        // Closed right away: the peer sees EOF.
                        drop(stream);
                        log_refused(&stats, addr);
                        continue;
                    };
                    conns.spawn(connection::<Req, Resp, H>(
                        stream,
                        addr,
                        slot,
                        cfg.clone(),
                        handler.clone(),
                        stats.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(target: LOG_TARGET, "accept failed: {e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
    conns.shutdown().await;
}

/// Logs refusals at the connection cap without flooding the log: the 1st,
/// 2nd, 4th, 8th... refusal is logged (the counter has them all).
fn log_refused(stats: &WireStats, addr: SocketAddr) {
    let n = stats
        .connections_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    if n.is_power_of_two() {
        tracing::warn!(target: LOG_TARGET, "refused connection from {addr}: connection cap reached (rpc.max_connections); {n} refused so far");
    }
}

/// Count and log a frame-level failure; returns nothing, the caller closes.
pub(crate) fn close_bad_input(stats: &WireStats, who: &str, err: &FrameError) {
    match err {
        FrameError::TooLarge { .. } => {
            WireStats::bump(&stats.frames_oversized);
        }
        FrameError::Malformed(_) => {
            WireStats::bump(&stats.frames_malformed);
        }
        // A TLS record that does not authenticate: bytes that did not come
        // from the peer (a relay injecting a frame) or are not TLS at all.
        FrameError::Io(e) if crate::link::is_tls_failure(e) => {
            WireStats::bump(&stats.frames_malformed);
        }
        FrameError::Io(e) => {
            // Transport failure, not the peer's bytes.
            tracing::debug!(target: LOG_TARGET, "connection to {who} failed: {e}");
            return;
        }
    }
    WireStats::bump(&stats.connections_closed_bad_input);
    tracing::warn!(target: LOG_TARGET, "closing connection to {who}: {err}");
}

/// The server side of the handshake on a new connection, within
/// `handshake_timeout`; `None` (counted and logged) if it fails, times out
/// or is evicted. Until its first byte the connection is silent, then it
/// has spoken (evicted later than silent ones; see [`crate::limit`]).
async fn accept_peer<Req, Resp, H>(
    stream: TcpStream,
    addr: SocketAddr,
    slot: &ConnSlot,
    cfg: &WireConfig,
    handler: &H,
    stats: &WireStats,
) -> Option<(PeerInfo, Framed<Link, WireCodec>)>
where
    Req: Message,
    Resp: Message,
    H: Handler<Req, Resp>,
{
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;
    let outcome = match first_bytes(&stream, slot, deadline).await {
        First::Spoke => {
            slot.heard();
            let handshake = async {
                let (link, cert) = secure(stream, cfg).await?;
                let mut framed = new_framed(link);
                let admit = |p: &PeerInfo| handler.admit(p);
                let peer = server_handshake(&mut framed, cfg, addr, stats, cert, admit).await?;
                Ok((peer, framed))
            };
            tokio::select! {
                r = tokio::time::timeout_at(deadline, handshake) => match r {
                    Ok(r) => Ok(r),
                    Err(_) => Err(()),
                },
                _ = slot.evicted(|| false) => return log_evicted(stats, addr),
            }
        }
        First::Evicted => return log_evicted(stats, addr),
        First::Closed => return None,
        First::TimedOut => Err(()),
    };
    match outcome {
        Ok(Ok(done)) => {
            slot.established();
            WireStats::bump(&stats.handshakes_ok);
            Some(done)
        }
        Ok(Err(err)) => {
            match &err {
                // Already counted and logged ("refused node N at ADDR: wrong cluster secret").
                HandshakeError::WrongSecret { .. } | HandshakeError::IdentityMismatch { .. } => {}
                HandshakeError::Tls(e) => {
                    WireStats::bump(&stats.handshakes_refused_tls);
                    if err.is_bad_input() {
                        WireStats::bump(&stats.connections_closed_bad_input);
                    }
                    tracing::warn!(target: LOG_TARGET, "refused connection from {addr}: TLS: {e}");
                }
                err => {
                    WireStats::bump(&stats.handshakes_refused_other);
                    if err.is_bad_input() {
                        WireStats::bump(&stats.connections_closed_bad_input);
                    }
                    tracing::warn!(target: LOG_TARGET, "refused connection from {addr}: {err}");
                }
            }
            None
        }
        Err(_) => {
            WireStats::bump(&stats.handshakes_refused_other);
            // Logged 1st, 2nd, 4th, 8th... time: a flood of idle sockets
            // times out by the hundred.
            let n = WireStats::bump(&stats.connections_timed_out);
            if n.is_power_of_two() {
                tracing::warn!(target: LOG_TARGET, "refused connection from {addr}: handshake timed out; {n} timed out so far");
            }
            None
        }
    }
}

/// The accepted stream as this endpoint runs it: inside TLS (the client's
/// certificate verified, revocation checked) when the config has trust.
async fn secure(
    stream: TcpStream,
    cfg: &WireConfig,
) -> Result<(Link, Option<orrery_trust::PeerIdentity>), HandshakeError> {
    let Some(trust) = &cfg.trust else {
        return Ok((Link::Plain(stream), None));
    };
    let (tls, id) = trust.accept(stream).await.map_err(HandshakeError::Tls)?;
    let tls = orrery_trust::tokio_rustls::TlsStream::Server(tls);
    Ok((Link::Tls(Box::new(tls)), Some(id)))
}

/// Logs evictions without flooding the log (1st, 2nd, 4th, 8th...).
fn log_evicted<T>(stats: &WireStats, addr: SocketAddr) -> Option<T> {
    let n = stats
        .connections_evicted
        .load(std::sync::atomic::Ordering::Relaxed);
    if n.is_power_of_two() {
        tracing::warn!(target: LOG_TARGET, "closed the handshake from {addr} to make room (rpc.max_handshakes); {n} closed so far");
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn connection<Req, Resp, H>(
    stream: TcpStream,
    addr: SocketAddr,
    slot: ConnSlot,
    cfg: Arc<WireConfig>,
    handler: Arc<H>,
    stats: Arc<WireStats>,
    shutdown: CancellationToken,
) where
    Req: Message,
    Resp: Message,
    H: Handler<Req, Resp>,
{
    let Some((peer, mut framed)) =
        accept_peer::<Req, Resp, H>(stream, addr, &slot, &cfg, &*handler, &stats).await
    else {
        return;
    };
    let who = format!("node {} at {addr}", peer.node_id);
    tracing::debug!(target: LOG_TARGET, "accepted {who} (epoch {}, protocol v{})", peer.epoch, peer.protocol_version);

    framed.codec_mut().set_max_frame_bytes(cfg.max_frame_bytes);
    let max_frame = cfg.max_frame_bytes;
    let peer = Arc::new(peer);
    let (sink, mut frames) = framed.split();
    let (tx, rx) = mpsc::channel::<Bytes>(cfg.request_queue.max(1));
    let mut writer = tokio::spawn(crate::frame::writer_loop(sink, rx));
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight_per_connection));
    let mut tasks = JoinSet::new();
    // Running requests by id, so a Cancel can abort one.
    let mut running: std::collections::BTreeMap<u64, tokio::task::AbortHandle> =
        std::collections::BTreeMap::new();

    let revoked = crate::link::until_revoked(cfg.trust.as_ref(), peer.cert.as_ref());
    let refused = until_refused(&*handler, &peer);
    tokio::pin!(revoked, refused);
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            why = &mut revoked => {
                WireStats::bump(&stats.connections_closed_revoked);
                tracing::warn!(target: LOG_TARGET, "closing the connection from {who}: {why}");
                break;
            }
            why = &mut refused => {
                WireStats::bump(&stats.connections_closed_revoked);
                tracing::info!(target: LOG_TARGET, "closing the connection from {who}: no longer admitted: {why}");
                break;
            }
            res = &mut writer => {
                if let Ok(Err(e)) = res {
                    tracing::debug!(target: LOG_TARGET, "writer to {who} failed: {e}");
                }
                break;
            }
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
        let (id, timeout_ms, body) = match decode::<Envelope<Req, Resp>>(&bytes) {
            Ok(Envelope::Request {
                id,
                timeout_ms,
                body,
            }) => (id, timeout_ms, body),
            Ok(Envelope::Cancel { id }) => {
                if let Some(task) = running.remove(&id) {
                    task.abort();
                }
                continue;
            }
            Ok(_) => {
                let err = FrameError::Malformed("client sent a Response/Failure frame".into());
                close_bad_input(&stats, &who, &err);
                break;
            }
            Err(err) => {
                close_bad_input(&stats, &who, &err);
                break;
            }
        };
        match inflight.clone().try_acquire_owned() {
            Ok(permit) => {
                while let Some(Ok((task, ()))) = tasks.try_join_next_with_id() {
                    running.retain(|_, h| h.id() != task);
                }
                let task = tasks.spawn(run_request::<Req, Resp, H>(
                    handler.clone(),
                    peer.clone(),
                    id,
                    timeout_ms,
                    body,
                    tx.clone(),
                    permit,
                    max_frame,
                ));
                // Bounded by max_inflight_per_connection (the permit above).
                running.insert(id, task);
            }
            Err(_) => {
                WireStats::bump(&stats.requests_overloaded);
                let failure = Envelope::<Req, Resp>::Failure {
                    id,
                    error: RemoteError::Overloaded,
                };
                let Ok(frame) = encode(&failure) else { break };
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        }
    }
    writer.abort();
    tasks.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn run_request<Req, Resp, H>(
    handler: Arc<H>,
    peer: Arc<PeerInfo>,
    id: u64,
    timeout_ms: u32,
    body: Req,
    tx: mpsc::Sender<Bytes>,
    permit: OwnedSemaphorePermit,
    max_frame: usize,
) where
    Req: Message,
    Resp: Message,
    H: Handler<Req, Resp>,
{
    let fut = AssertUnwindSafe(handler.handle(&peer, body)).catch_unwind();
    let outcome = if timeout_ms == 0 {
        Some(fut.await)
    } else {
        tokio::time::timeout(Duration::from_millis(u64::from(timeout_ms)), fut)
            .await
            .ok()
    };
    let envelope = match outcome {
        None => Envelope::<Req, Resp>::Failure {
            id,
            error: RemoteError::Timeout,
        },
        Some(Err(panic)) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".to_string());
            tracing::error!(target: LOG_TARGET, "handler panicked on request {id} from node {}: {msg}", peer.node_id);
            Envelope::Failure {
                id,
                error: RemoteError::Handler(format!("handler panicked: {msg}")),
            }
        }
        Some(Ok(resp)) => Envelope::Response { id, body: resp },
    };
    let frame = match encode(&envelope) {
        Ok(frame) if frame.len() <= max_frame => frame,
        Ok(frame) => {
            tracing::warn!(target: LOG_TARGET, "response to request {id} is {} bytes, over the {max_frame}-byte frame limit", frame.len());
            let error = RemoteError::ResponseTooLarge {
                len: frame.len() as u64,
                max: max_frame as u64,
            };
            match encode(&Envelope::<Req, Resp>::Failure { id, error }) {
                Ok(f) => f,
                Err(_) => return,
            }
        }
        Err(e) => match encode(&Envelope::<Req, Resp>::Failure {
            id,
            error: RemoteError::Handler(e.to_string()),
        }) {
            Ok(f) => f,
            Err(_) => return,
        },
    };
    // Queued before the permit is released, so a response waiting for the writer
    // still counts as in flight.
    let _ = tx.send(frame).await;
    drop(permit);
}
