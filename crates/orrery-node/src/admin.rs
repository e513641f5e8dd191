//! The node's admin HTTP endpoint (JSON), read by `orrery status` and `orrery up`.
//!
//! It owns presentation only: every answer comes from the node's own view or
//! from a linearizable read of the replicated state. It must never mutate
//! cluster state (mutations, with an admin token, come with the console).

use crate::node::Node;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

/// Routes: `GET /status` (this node), `GET /cluster` (replicated state, via
/// the leader), `GET /shards` (what this node hosts).
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/cluster", get(cluster))
        .route("/shards", get(shards))
        .with_state(node)
}

async fn status(State(node): State<Node>) -> Json<crate::node::NodeStatus> {
    Json(node.status())
}

/// What this node hosts: map version, shards assigned, loaded, loading.
async fn shards(State(node): State<Node>) -> Json<crate::shards::HostedShards> {
    Json(node.shards().1)
}

async fn cluster(State(node): State<Node>) -> Response {
    match node.cluster_state().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

/// Serves the admin API until the node shuts down.
pub async fn serve(listener: TcpListener, node: Node) -> std::io::Result<()> {
    let stop = node.clone();
    axum::serve(listener, router(node))
        .with_graceful_shutdown(async move { stop.stopped().await })
        .await
}
