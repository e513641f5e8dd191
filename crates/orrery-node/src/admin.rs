//! The node's admin HTTP endpoint: JSON reads, Prometheus metrics, the
//! dashboard page, and the console.
//!
//! Reads (`GET`) are open: they answer from the node's own view or from a
//! linearizable read of the replicated state. Everything that changes
//! anything goes through `POST /console`, which requires the admin token
//! (`Authorization: Bearer TOKEN`, compared in constant time) and runs one
//! of the console's fixed commands within `admin.command_timeout_ms`, at
//! most `admin.max_concurrent_commands` at once.
//!
//! What it must never do: mutate without the token, run anything that is
//! not a console command, or hold the node's runtime (every command has a
//! deadline, every body a size bound).

use crate::console::{ConsoleCommand, ConsoleError};
use crate::node::Node;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The dashboard: one static page, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct AdminState {
    node: Node,
    commands: Arc<Semaphore>,
}

/// Routes: `GET /` and `/dashboard` (the page), `/status` (this node),
/// `/cluster` (replicated state, via the leader), `/shards` (what this node
/// hosts), `/health`, `/stage`, `/tasks` (watchdog), `/log/stats`,
/// `/timeline?since=MS&last=N`, `/metrics` (Prometheus); `POST /console`
/// (token required).
pub fn router(node: Node) -> Router {
    let admin = node.config().admin.clone();
    let state = AdminState {
        commands: Arc::new(Semaphore::new(admin.max_concurrent_commands)),
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
        .route("/console", post(console))
        .layer(DefaultBodyLimit::max(admin.max_body_bytes))
        .with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn status(State(s): State<AdminState>) -> Json<crate::node::NodeStatus> {
    Json(s.node.status())
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

/// Runs a read-only console command and answers with its data.
async fn read(node: &Node, cmd: ConsoleCommand) -> Response {
    debug_assert!(!cmd.is_mutation());
    match node.console(cmd).await {
        Ok(r) => Json(r.data).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn stage(State(s): State<AdminState>) -> Response {
    read(&s.node, ConsoleCommand::Stage).await
}

async fn log_stats(State(s): State<AdminState>) -> Response {
    read(&s.node, ConsoleCommand::LogStats).await
}

async fn cluster(State(s): State<AdminState>) -> Response {
    match s.node.cluster_state().await {
        Ok(st) => Json(st).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
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
    match s.node.cluster_state().await {
        Ok(st) => {
            let since = q.since.unwrap_or(0);
            let mut events: Vec<_> = st.events.into_iter().filter(|e| e.at >= since).collect();
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
        crate::metrics::render(s.node.inner()),
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
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON body {{\"args\": [..]}}: {e}"),
            )
        }
    };
    let cmd = match ConsoleCommand::parse(&req.args) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
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
        Ok(Err(e @ ConsoleError::Failed(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the command did not finish within {} ms", limit.as_millis()),
        ),
    }
}

/// Serves the admin API until the node shuts down.
pub async fn serve(listener: TcpListener, node: Node) -> std::io::Result<()> {
    let stop = node.clone();
    axum::serve(listener, router(node))
        .with_graceful_shutdown(async move { stop.stopped().await })
        .await
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
