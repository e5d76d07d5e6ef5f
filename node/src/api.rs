//! The node's HTTP API (axum).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;

/// What the API handlers share.
pub struct ApiState {
    pub info: NodeInfo,
    pub ready: AtomicBool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub version: &'static str,
    pub api_url: String,
    pub data_dir: String,
    pub listen: Vec<String>,
    pub models: Vec<String>,
    pub backend: String,
}

pub fn router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/node", get(node_info))
        .fallback(not_found)
        .with_state(state)
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(s): State<Arc<ApiState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, Json(serde_json::json!({"ready": true}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"ready": false}))).into_response()
    }
}

async fn node_info(State(s): State<Arc<ApiState>>) -> Json<NodeInfo> {
    Json(s.info.clone())
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "invalid_request_error", "no such route")
}

/// An OpenAI-style JSON error body.
pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(serde_json::json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})))
        .into_response()
}
