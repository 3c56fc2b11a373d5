//! The axum router: metrics, health, status, and the token checks every handler shares.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::Shared;
use crate::config::WorkflowSource;
use crate::health::TaskRouterStatus;
use crate::sources;
use crate::window::WindowStats;

/// Who is calling, by bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Cbo(String),
}

/// Compares the bearer token with every configured token in constant time, without stopping
/// at the first match, so the time taken says nothing about which token (if any) was close.
pub fn caller(shared: &Shared, headers: &HeaderMap) -> Option<Caller> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim()
        .as_bytes();
    let mut found = None;
    if let Some(admin) = &shared.config.admin_token
        && admin.matches(token)
    {
        found = Some(Caller::Admin);
    }
    for cbo in &shared.config.cbos {
        if let Some(t) = &cbo.ingest_token
            && t.matches(token)
            && found.is_none()
        {
            found = Some(Caller::Cbo(cbo.key.to_string()));
        }
    }
    found
}

pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/events", post(sources::http::ingest))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared.fleet.refresh_gauges(shared.clock.now_ms());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let waiting = shared.not_ready();
    if waiting.is_empty() {
        Json(serde_json::json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "ready": false,
                "error": format!("waiting for {}", waiting.join(", ")),
                "waiting_for": waiting,
            })),
        )
            .into_response()
    }
}

/// The windows `/v1/status` reports, clamped to the longest window kept.
const STATUS_WINDOWS: [(&str, Duration); 3] = [
    ("5m", Duration::from_secs(300)),
    ("15m", Duration::from_secs(900)),
    ("1h", Duration::from_secs(3600)),
];

#[derive(Serialize)]
struct WorkflowStatus {
    sid: Option<String>,
    source: WorkflowSource,
    problem: Option<String>,
}

#[derive(Serialize)]
struct CboStatus {
    open_transfers: usize,
    workflow: WorkflowStatus,
    taskrouter: TaskRouterStatus,
    windows: BTreeMap<&'static str, WindowStats>,
}

#[derive(Serialize)]
struct StatusReply {
    version: &'static str,
    now: String,
    cbos: BTreeMap<String, CboStatus>,
}

async fn status(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let Some(who) = caller(&shared, &headers) else {
        return json_error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    };
    let now_ms = shared.clock.now_ms();
    let max = shared.config.transfers.max_window;
    let mut cbos = BTreeMap::new();
    for cbo in &shared.config.cbos {
        if let Caller::Cbo(k) = &who
            && k != cbo.key.as_str()
        {
            continue;
        }
        let state = shared
            .fleet
            .get(cbo.key.as_str())
            .expect("fleet holds every cbo");
        let windows = STATUS_WINDOWS
            .iter()
            .filter(|(_, w)| *w <= max)
            .map(|(name, w)| (*name, state.stats(now_ms, *w)))
            .collect();
        cbos.insert(
            cbo.key.to_string(),
            CboStatus {
                open_transfers: state.open_transfers(),
                workflow: WorkflowStatus {
                    sid: cbo.workflow.raw.clone(),
                    source: cbo.workflow.source.clone(),
                    problem: cbo.workflow.sid.as_ref().err().cloned(),
                },
                taskrouter: state.taskrouter().clone(),
                windows,
            },
        );
    }
    let now = chrono::DateTime::from_timestamp_millis(now_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    Json(StatusReply {
        version: env!("CARGO_PKG_VERSION"),
        now,
        cbos,
    })
    .into_response()
}
