//! The node's admin HTTP endpoint: JSON reads, Prometheus metrics, the
//! dashboard page, and the console.
//!
//! Reads (`GET`) are open: they answer from the node's own view or from a
//! linearizable read of the replicated state. `/cluster` and `/timeline`
//! share those reads: at most one runs at a time per node, and every
//! request is answered by the first read that *started after it arrived*
//! (so it sees every write committed before the request), whatever the
//! number of requests; the answer carries the state's applied index (in the
//! body and in `x-orrery-applied-index`). Everything that changes
//! anything goes through `POST /console`, which requires the admin token
//! (`Authorization: Bearer TOKEN`, compared in constant time) and runs one
//! of the console's fixed commands within `admin.command_timeout_ms`, at
//! most `admin.max_concurrent_commands` at once.
//!
//! Connections go through the node's own accept loop ([`serve`]): at most
//! `admin.max_connections` open (at the cap a new one closes the oldest
//! connection that has not sent a byte yet, or is closed at once), a
//! request head must arrive within `admin.header_timeout_ms` (which also
//! closes idle keep-alive connections), a connection that moves no byte for
//! `admin.idle_timeout_ms` is closed, and every request is answered within
//! `admin.command_timeout_ms` (shorter, validated). Every refusal and
//! timeout is counted (`orrery_admin_connections_*`).
//!
//! What it must never do: mutate without the token, run anything that is
//! not a console command, hold the node's runtime (every command has a
//! deadline, every body a size bound), or keep a connection, or accept one,
//! without a bound.

use crate::admin_host::AllowedHosts;
use crate::console::{ConsoleCommand, ConsoleError};
use crate::node::Node;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::{BoxFuture, FutureExt, Shared};
use orrery_core::ClusterState;
use orrery_wire::{
    admit_yielding, CancellationToken, ConnLimiter, ConnLimits, ConnSlot, WireStats,
};
use serde::{Deserialize, Serialize};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const LOG: &str = "orrery::admin";

/// Counters of the admin endpoint, read by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct AdminStats {
    /// Connection admission and timeouts (the same counters as the
    /// cluster port's, for this endpoint).
    pub conns: Arc<WireStats>,
    /// Requests for the replicated state (`/cluster`, `/timeline`).
    pub state_requests: AtomicU64,
    /// Linearizable reads run for them.
    pub state_reads: AtomicU64,
    /// Requests refused because their `Host` is not one of this node's
    /// names ([`crate::admin_host`]).
    pub host_refused: AtomicU64,
}

type StateRead = Shared<BoxFuture<'static, Result<Arc<ClusterState>, String>>>;

/// The shared linearizable reads behind `/cluster` and `/timeline`.
#[derive(Default)]
struct StateReads {
    /// (reads started so far, the latest read and its number).
    slot: Mutex<(u64, Option<(u64, StateRead)>)>,
}

impl StateReads {
    /// A state read linearizably after this call began.
    async fn read(&self, node: &Node, stats: &AdminStats) -> Result<Arc<ClusterState>, String> {
        stats.state_requests.fetch_add(1, Ordering::Relaxed);
        let arrived = self.lock().0;
        loop {
            let (number, read) = {
                let mut slot = self.lock();
                match &slot.1 {
                    // Started after we arrived: its answer is fresh enough.
                    Some((n, r)) if *n > arrived => (*n, r.clone()),
                    // An older read still running: wait for it, then start ours.
                    Some((n, r)) if r.peek().is_none() => (*n, r.clone()),
                    _ => {
                        slot.0 += 1;
                        let n = slot.0;
                        let r = Self::start(node.clone(), stats);
                        slot.1 = Some((n, r.clone()));
                        (n, r)
                    }
                }
            };
            let answer = read.await;
            if number > arrived {
                return answer;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<(u64, StateRead)>)> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one read in its own task, so it completes (and is shared) even
    /// if every request waiting for it goes away.
    fn start(node: Node, stats: &AdminStats) -> StateRead {
        stats.state_reads.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(async move { node.cluster_state().await.map(Arc::new) });
        async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the state read failed: {e}")))
        }
        .boxed()
        .shared()
    }
}

/// The dashboard: one static page, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct AdminState {
    node: Node,
    commands: Arc<Semaphore>,
    reads: Arc<StateReads>,
    stats: Arc<AdminStats>,
    hosts: Arc<AllowedHosts>,
    /// The chart samples (`GET /history`) and who may read them cross-origin.
    history: Arc<crate::history::History>,
    origins: Arc<crate::history::Origins>,
}

/// Routes: `GET /` and `/dashboard` (the page), `/status` (this node),
/// `/cluster` (replicated state, via the leader), `/shards` (what this node
/// hosts), `/health`, `/stage`, `/tasks` (watchdog), `/log/stats`,
/// `/timeline?since=MS&last=N`, `/metrics` (Prometheus), `/commands` (the
/// console commands this node runs), `/history?since=MS` (the charts'
/// samples, [`crate::history`]), `/backup/state` (token required: the
/// state as `orrery backup` stores it); `POST /console` (token required).
/// `/status` and `/history` alone answer another node's dashboard
/// cross-origin ([`crate::history::Origins`]).
/// Any other path is a 404 and any other method a 405, each with a line
/// naming what exists.
pub fn router(node: Node) -> Router {
    router_with(node, Arc::default(), Arc::default())
}

fn router_with(
    node: Node,
    stats: Arc<AdminStats>,
    history: Arc<crate::history::History>,
) -> Router {
    let admin = node.config().admin.clone();
    let state = AdminState {
        commands: Arc::new(Semaphore::new(admin.max_concurrent_commands)),
        reads: Arc::default(),
        stats,
        hosts: Arc::new(AllowedHosts::of(node.config())),
        history,
        origins: Arc::new(crate::history::Origins::of(node.config())),
        node,
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard", get(dashboard))
        .route("/status", get(status))
        .route("/cluster", get(cluster))
        .route("/shards", get(shards))
        .route("/health", get(health))
        .route("/stage", get(stage))
        .route("/tasks", get(tasks))
        .route("/log/stats", get(log_stats))
        .route("/timeline", get(timeline))
        .route("/metrics", get(metrics))
        .route("/commands", get(commands))
        .route("/history", get(history_samples))
        .route("/console", post(console))
        .route("/backup/state", get(backup_state))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(admin.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .with_state(state)
}

/// Answers only requests addressed to one of this node's names: a page on
/// another site whose DNS name was rebound to this address cannot read the
/// node (see [`crate::admin_host`]).
async fn check_host(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if s.hosts.allows(host) {
        return next.run(req).await;
    }
    let n = s.stats.host_refused.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(target: LOG, "refused a request for Host {host:?}: not one of this node's names (admin.allowed_hosts); {n} so far");
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        format!("this node does not answer to Host {host:?}; add it to admin.allowed_hosts if it is yours\n"),
    )
        .into_response()
}

/// Every endpoint, for the line a 404 or 405 answers with.
const ENDPOINTS: &str = "GET / /dashboard /status /cluster /shards /health /stage /tasks \
/log/stats /timeline /metrics /commands /history /backup/state (token), POST /console";

/// The one line of a 404: which path, and what exists.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}: this node serves {ENDPOINTS}\n",
            uri.path()
        ),
    )
        .into_response()
}

/// The one line of a 405: the path exists, the method is not its.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let allowed = if path == "/console" { "POST" } else { "GET" };
    (
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} does not answer {method}, only {allowed} (this node serves {ENDPOINTS})\n"),
    )
        .into_response()
}

/// The console commands this node runs, with their usage (open, like
/// every read: `orrery exec` checks a line against it before sending it).
async fn commands(State(s): State<AdminState>) -> Json<crate::console::CommandList> {
    Json(s.node.command_list())
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn status(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    cross_origin(&s, &headers, Json(s.node.status()).into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// Only samples taken after this time (ms since the Unix epoch).
    since: Option<u64>,
}

/// The charts' samples of this node ([`crate::history`]).
async fn history_samples(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let answer = s
        .history
        .answer(s.node.config().node_id, q.since.unwrap_or(0));
    cross_origin(&s, &headers, Json(answer).into_response())
}

/// Lets another node's dashboard read this answer: the `Origin` echoed
/// only if it is `http://ADMIN_ADDR` of a configured node. Only `/status`
/// and `/history` call it (simple GETs: no preflight to answer).
fn cross_origin(s: &AdminState, headers: &HeaderMap, mut r: Response) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Some(o) = origin.filter(|o| s.origins.allows(o)) {
        if let Ok(v) = HeaderValue::from_str(o) {
            r.headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
    }
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("origin"));
    r
}

/// What this node hosts: map version, shards assigned, loaded, loading.
async fn shards(State(s): State<AdminState>) -> Json<crate::shards::HostedShards> {
    Json(s.node.shards().1)
}

async fn health(State(s): State<AdminState>) -> Json<crate::health::HealthReport> {
    Json(s.node.inner().health.report())
}

async fn tasks(State(s): State<AdminState>) -> Json<crate::watchdog::WatchdogReport> {
    Json(s.node.watchdog().report())
}

/// Runs a read-only console command and answers with its data, within
/// `admin.command_timeout_ms`.
async fn read(node: &Node, cmd: ConsoleCommand) -> Response {
    debug_assert!(!cmd.is_mutation());
    match bounded(node, node.console(cmd)).await {
        Ok(Ok(r)) => Json(r.data).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(late) => late,
    }
}

/// `fut` within `admin.command_timeout_ms`, else the 504 to send (so every
/// request is answered before the connection's idle bound).
async fn bounded<T>(node: &Node, fut: impl std::future::Future<Output = T>) -> Result<T, Response> {
    let limit = Duration::from_millis(node.config().admin.command_timeout_ms);
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within {} ms (admin.command_timeout_ms)",
                limit.as_millis()
            ),
        )
    })
}

async fn stage(State(s): State<AdminState>) -> Response {
    read(&s.node, ConsoleCommand::Stage).await
}

async fn log_stats(State(s): State<AdminState>) -> Response {
    read(&s.node, ConsoleCommand::LogStats).await
}

/// The replicated state, with its applied index in `x-orrery-applied-index`.
async fn cluster(State(s): State<AdminState>) -> Response {
    let read = match bounded(&s.node, s.reads.read(&s.node, &s.stats)).await {
        Ok(r) => r,
        Err(late) => return late,
    };
    match read {
        Ok(st) => {
            let mut r = Json(&*st).into_response();
            r.headers_mut().insert(
                HeaderName::from_static("x-orrery-applied-index"),
                HeaderValue::from(st.applied_index),
            );
            r
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `GET /backup/state` (admin token required): the replicated state of a
/// linearizable read as `orrery backup` stores it (postcard), with its
/// applied index and SHA-256 digest in `x-orrery-applied-index` and
/// `x-orrery-state-digest`.
async fn backup_state(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s.node, &headers) {
        return *r;
    }
    let st = match bounded(&s.node, s.reads.read(&s.node, &s.stats)).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(late) => return late,
    };
    match crate::backup::encode_state(&st) {
        Ok(bytes) => {
            let digest = crate::backup::digest_hex(&bytes);
            let mut r =
                ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response();
            let h = r.headers_mut();
            h.insert(
                HeaderName::from_static("x-orrery-applied-index"),
                HeaderValue::from(st.applied_index),
            );
            if let Ok(v) = HeaderValue::from_str(&digest) {
                h.insert(HeaderName::from_static("x-orrery-state-digest"), v);
            }
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct TimelineQuery {
    /// Only events at or after this time (ms since the Unix epoch).
    since: Option<u64>,
    /// At most this many of the latest.
    last: Option<usize>,
}

/// The cluster's decisions, oldest first (linearizable read).
async fn timeline(State(s): State<AdminState>, Query(q): Query<TimelineQuery>) -> Response {
    let read = match bounded(&s.node, s.reads.read(&s.node, &s.stats)).await {
        Ok(r) => r,
        Err(late) => return late,
    };
    match read {
        Ok(st) => {
            let since = q.since.unwrap_or(0);
            let mut events: Vec<_> = st.events.iter().filter(|e| e.at >= since).collect();
            if let Some(last) = q.last {
                let cut = events.len().saturating_sub(last);
                events.drain(..cut);
            }
            Json(events).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(s.node.inner(), &s.stats),
    )
        .into_response()
}

/// `POST /console` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// The command's words, e.g. `["log", "level", "noisy", "debug"]`.
    pub args: Vec<String>,
}

/// `POST /console` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleAnswer {
    pub ok: bool,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}

fn error(code: StatusCode, message: String) -> Response {
    (
        code,
        Json(ConsoleAnswer {
            ok: false,
            summary: String::new(),
            data: serde_json::Value::Null,
            error: Some(message),
        }),
    )
        .into_response()
}

/// Whether two byte strings are equal, in time independent of where they
/// differ (the length is not secret).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the admin token; the error is the response to send.
fn authorize(node: &Node, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = node.config().admin.token.as_deref() else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "this node has no admin token configured (admin.token): console commands are refused"
                .into(),
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "admin token required: send `Authorization: Bearer TOKEN` (orrery exec --token, or ORRERY_ADMIN_TOKEN)".into(),
        ))),
        Some(t) if same_token(t.trim().as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "admin token refused".into(),
        ))),
    }
}

async fn console(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<ConsoleRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s.node, &headers) {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        // 413 for a body over admin.max_body_bytes, 415 without the JSON
        // content type, 400 or 422 for a body that is not the request.
        Err(e) => {
            let limit = s.node.config().admin.max_body_bytes;
            let why = match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    format!("the body is over {limit} bytes (admin.max_body_bytes)")
                }
                _ => e.body_text(),
            };
            return error(
                e.status(),
                format!("expected a JSON body {{\"args\": [..]}}: {why}"),
            );
        }
    };
    let line = shown(&req.args);
    let cmd = match ConsoleCommand::parse(&req.args) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(target: LOG, "console: refused `{line}`: {e}");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    // Changes are recorded; reads (polled by tools) only at debug.
    if cmd.is_mutation() {
        tracing::info!(target: LOG, "console: `{line}`");
    } else {
        tracing::debug!(target: LOG, "console: `{line}`");
    }
    let Ok(_permit) = s.commands.clone().try_acquire_owned() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "busy: {} console commands already running (admin.max_concurrent_commands)",
                s.node.config().admin.max_concurrent_commands
            ),
        );
    };
    let limit = Duration::from_millis(s.node.config().admin.command_timeout_ms);
    match tokio::time::timeout(limit, s.node.console(cmd)).await {
        Ok(Ok(r)) => Json(ConsoleAnswer {
            ok: true,
            summary: r.summary,
            data: r.data,
            error: None,
        })
        .into_response(),
        Ok(Err(e @ (ConsoleError::Failed(_) | ConsoleError::NoQuorum(_)))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the command did not finish within {} ms", limit.as_millis()),
        ),
    }
}

/// A console line for the log: control characters escaped, at most 200
/// characters.
fn shown(args: &[String]) -> String {
    let line: String = args.join(" ").escape_debug().collect();
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line,
    }
}

/// The admin port's connection bounds, from `[admin]`.
#[derive(Clone, Copy, Debug)]
struct ConnBounds {
    header: Duration,
    idle: Duration,
}

/// Serves the admin API until the node shuts down: the node's own accept
/// loop (see the module docs for the bounds). Never fails; accept errors
/// are logged and retried after a pause.
pub async fn serve(listener: TcpListener, node: Node) -> io::Result<()> {
    let cfg = node.config().admin.clone();
    if let Err(e) = orrery_wire::limit::widen_backlog(&listener) {
        tracing::warn!(target: LOG, "cannot widen the admin accept queue: {e}");
    }
    let stats = Arc::new(AdminStats::default());
    let history = Arc::new(crate::history::History::default());
    tokio::spawn(crate::history::run(node.clone(), history.clone()));
    let app = router_with(node.clone(), stats.clone(), history);
    let limiter = ConnLimiter::new(
        ConnLimits {
            max_open: cfg.max_connections,
            max_pending: cfg.max_connections,
        },
        stats.conns.clone(),
    );
    let bounds = ConnBounds {
        header: Duration::from_millis(cfg.header_timeout_ms),
        idle: Duration::from_millis(cfg.idle_timeout_ms),
    };
    let stop = CancellationToken::new();
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = node.stopped() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(target: LOG, "admin accept failed: {e}");
                tokio::select! {
                    _ = node.stopped() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        WireStats::bump(&stats.conns.connections_accepted);
        // A request already waiting is not pending: it cannot be evicted.
        let heard = orrery_wire::limit::has_data(&stream);
        let Some(slot) = admit_yielding(&limiter, heard).await else {
            drop(stream);
            log_refused(&stats, cfg.max_connections);
            continue;
        };
        if heard {
            slot.established();
        }
        let conn = connection(
            stream,
            slot,
            app.clone(),
            bounds,
            stats.clone(),
            stop.clone(),
        );
        conns.spawn(conn);
    }
    // Let requests in progress finish (briefly), then close everything.
    stop.cancel();
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    conns.shutdown().await;
    Ok(())
}

/// Logs refusals at the cap without flooding the log: the 1st, 2nd, 4th,
/// 8th... (the counter has them all).
fn log_refused(stats: &AdminStats, cap: usize) {
    let n = stats.conns.connections_refused.load(Ordering::Relaxed);
    if n.is_power_of_two() {
        tracing::warn!(target: LOG, "refused an admin connection: admin.max_connections ({cap}) reached; {n} refused so far");
    }
}

/// One admin connection: until its first byte it is pending (evictable,
/// bounded by the header timeout); then HTTP/1 ([`serve_http`]).
async fn connection(
    stream: TcpStream,
    slot: ConnSlot,
    app: Router,
    bounds: ConnBounds,
    stats: Arc<AdminStats>,
    stop: CancellationToken,
) {
    if first_byte(&stream, &slot, bounds, &stats, &stop).await {
        // Boxed: the HTTP state is allocated only for connections that spoke.
        Box::pin(serve_http(stream, slot, app, bounds, stats, stop)).await;
    }
}

/// HTTP/1 on a connection that has spoken: the header timeout bounds every
/// request head (and so idle keep-alive time), the idle bound a stalled
/// transfer; at shutdown the request in progress finishes first.
async fn serve_http(
    stream: TcpStream,
    slot: ConnSlot,
    app: Router,
    bounds: ConnBounds,
    stats: Arc<AdminStats>,
    stop: CancellationToken,
) {
    // Established: its place is held until it closes, never evicted.
    let _slot = slot;
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::default());
    let io = hyper_util::rt::TokioIo::new(Tracked {
        io: stream,
        activity: activity.clone(),
    });
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(bounds.header)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let idle = idle_watch(&activity, bounds.idle);
    tokio::pin!(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        WireStats::bump(&stats.conns.connections_timed_out);
                    }
                    tracing::debug!(target: LOG, "admin connection ended: {e}");
                }
                return;
            }
            _ = &mut idle => {
                WireStats::bump(&stats.conns.connections_idle_closed);
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Waits for a new connection's first byte (or EOF): until then it costs a
/// task and a socket only, so a flood of idle sockets is evicted or timed
/// out without any HTTP state. `false`: close it.
async fn first_byte(
    stream: &TcpStream,
    slot: &ConnSlot,
    bounds: ConnBounds,
    stats: &AdminStats,
    stop: &CancellationToken,
) -> bool {
    use orrery_wire::limit::First;
    let deadline = tokio::time::Instant::now() + bounds.header;
    let first = tokio::select! {
        f = orrery_wire::limit::first_bytes(stream, slot, deadline) => f,
        _ = stop.cancelled() => First::Closed,
    };
    match first {
        First::Spoke => {
            slot.established();
            true
        }
        First::TimedOut => {
            WireStats::bump(&stats.conns.connections_timed_out);
            false
        }
        First::Closed | First::Evicted => false,
    }
}

/// What a connection has done: how many reads and writes moved bytes.
#[derive(Debug, Default)]
struct Activity {
    progress: AtomicU64,
}

/// Resolves once the connection has moved no byte for `idle` (checked
/// every quarter of it, so within 1.25 x). Handlers answer within
/// `admin.command_timeout_ms`, which is validated to be shorter.
async fn idle_watch(a: &Activity, idle: Duration) {
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut seen = a.progress.load(Ordering::Relaxed);
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        let now = a.progress.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 4 {
                return;
            }
        }
    }
}

/// The socket, counting progress (bytes moved either way).
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl Tracked {
    fn moved(&mut self) {
        self.activity.progress.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_token(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same_token(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same_token(b"", b"x"));
    }
}
