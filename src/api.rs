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
use crate::actions::{EnableError, Switch};
use crate::config::WorkflowSource;
use crate::health::TaskRouterStatus;
use crate::rules::{RuleId, RuleState};
use crate::sources;
use crate::window::WindowStats;
use axum::extract::{Path, Query};

/// Who is calling, by bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Cbo(String),
}

impl Caller {
    /// The CBO a rejection of this caller's is counted under (`""` for the admin token).
    pub fn cbo_label(&self) -> &str {
        match self {
            Caller::Cbo(k) => k,
            Caller::Admin => "",
        }
    }
}

/// Who the bearer token is: found by its digest, then compared in constant time.
pub fn caller(shared: &Shared, headers: &HeaderMap) -> Option<Caller> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim()
        .as_bytes();
    shared.live.tokens().who(token)
}

/// `None` for the admin token, else the refusal: 401 (no valid token) or 403 (a CBO's token).
fn refuse_unless_admin(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    match caller(shared, headers) {
        Some(Caller::Admin) => None,
        Some(Caller::Cbo(_)) => Some(json_error(
            StatusCode::FORBIDDEN,
            "this needs the admin token",
        )),
        None => Some(unauthorized()),
    }
}

fn unknown_cbo(cbo: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        &format!("no CBO {cbo:?} is configured"),
    )
}

/// 401 for a request without a valid token.
pub fn unauthorized() -> Response {
    json_error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token")
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
        .route("/v1/reports", post(sources::reports::report))
        .route(
            "/v1/switch/{cbo}",
            get(get_switch).put(put_switch).options(switch_preflight),
        )
        .route(
            "/v1/twilio/{cbo}/taskrouter",
            post(sources::push::taskrouter),
        )
        .route(
            "/v1/twilio/{cbo}/event-streams",
            post(sources::push::event_streams),
        )
        .route("/v1/cbos/{cbo}/ack", post(ack))
        .route("/v1/decisions", get(decisions))
        .route(
            "/v1/validations",
            get(list_validations).post(start_validation),
        )
        .route("/v1/validations/{id}", get(get_validation))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{method} is not allowed on {}", uri.path()),
                )
            },
        )
        .with_state(shared)
}

/// Whether the client takes `gzip` (`Accept-Encoding`, without `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            let mut it = part.split(';');
            let coding = it.next().unwrap_or("").trim();
            let refused = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f64>().is_ok_and(|q| q == 0.0))
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// The exposition, gzipped when Prometheus asks for it (it always does; 80 MB of text is 5 MB
/// gzipped at 5,000 CBOs). Rendering and compressing are blocking work, done off the async
/// workers: `/healthz` and ingest do not wait behind a large scrape.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let gzip = accepts_gzip(&headers);
    let body = tokio::task::spawn_blocking(move || {
        shared.fleet.refresh_gauges(shared.clock.now_ms());
        if gzip {
            (shared.metrics.render_gzip(), true)
        } else {
            (shared.metrics.render().into_bytes(), false)
        }
    })
    .await;
    let Ok((body, gzipped)) = body else {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rendering the metrics failed",
        );
    };
    let content_type = (
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    );
    if gzipped {
        return (
            [content_type, (header::CONTENT_ENCODING, "gzip")],
            [(header::VARY, "Accept-Encoding")],
            body,
        )
            .into_response();
    }
    ([content_type], [(header::VARY, "Accept-Encoding")], body).into_response()
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
    rules: BTreeMap<&'static str, crate::rules::Tracked>,
    switch: Option<Switch>,
    validation: Option<crate::validation::Validation>,
    windows: BTreeMap<&'static str, WindowStats>,
}

#[derive(Serialize)]
struct StatusReply {
    version: &'static str,
    now: String,
    cbos: BTreeMap<String, CboStatus>,
}

async fn status(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let only = match readable_cbo(&shared, &headers, None, "status") {
        Ok(only) => only,
        Err(refused) => return *refused,
    };
    let now_ms = shared.clock.now_ms();
    let max = shared.config().transfers.max_window;
    let mut cbos = BTreeMap::new();
    for cbo in &shared.config().cbos {
        if only.as_deref().is_some_and(|k| k != cbo.key.as_str()) {
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
                rules: shared.engine().states(cbo.key.as_str()),
                switch: shared.actions.switch(cbo.key.as_str()),
                validation: shared
                    .validations
                    .list(Some(cbo.key.as_str()))
                    .into_iter()
                    .max_by_key(|v| v.start_ms),
                windows,
            },
        );
    }
    let now = crate::clock::rfc3339(now_ms);
    Json(StatusReply {
        version: env!("CARGO_PKG_VERSION"),
        now,
        cbos,
    })
    .into_response()
}

/// The CORS headers for a browser at `Origin` when `server.allowed_origins` lists it (the
/// plugin, in Flex, reads the switch); none otherwise, so the browser keeps the answer from it.
fn cors(shared: &Shared, headers: &HeaderMap, mut response: Response) -> Response {
    let origin = headers.get("origin").and_then(|v| v.to_str().ok());
    let allowed = origin.filter(|o| {
        shared
            .config()
            .server
            .allowed_origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
    });
    let h = response.headers_mut();
    h.insert("vary", axum::http::HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed.and_then(|o| o.parse().ok()) {
        h.insert("access-control-allow-origin", origin);
        h.insert(
            "access-control-allow-methods",
            axum::http::HeaderValue::from_static("GET"),
        );
        h.insert(
            "access-control-max-age",
            axum::http::HeaderValue::from_static("600"),
        );
    }
    response
}

async fn get_switch(
    State(shared): State<Arc<Shared>>,
    Path(cbo): Path<String>,
    headers: HeaderMap,
) -> Response {
    let response = match shared.actions.switch(&cbo) {
        Some(s) => Json(s).into_response(),
        None => unknown_cbo(&cbo),
    };
    cors(&shared, &headers, response)
}

/// A browser's preflight before reading the switch.
async fn switch_preflight(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    cors(&shared, &headers, StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
struct SwitchChange {
    transfers_enabled: bool,
    #[serde(default)]
    reason: Option<String>,
    /// Turning off: which flags (default: the CBO's `disable_features`).
    #[serde(default)]
    features: Option<Vec<crate::config::Feature>>,
}

/// On-call turns transfers back on (restoring the Flex flags seen before) or off by hand.
async fn put_switch(
    State(shared): State<Arc<Shared>>,
    Path(cbo): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_admin(&shared, &headers) {
        return refused;
    }
    let Some(config) = shared.config().cbo(&cbo).cloned() else {
        return unknown_cbo(&cbo);
    };
    let change: SwitchChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "body must be {{\"transfers_enabled\": true|false, \"features\": [\"enabled\"|\"cold_transfer\"|\"multi_participant\"]}}: {e}"
                ),
            );
        }
    };
    if change.transfers_enabled {
        let reason = change
            .reason
            .unwrap_or_else(|| "re-enabled by on-call".into());
        match shared.actions.enable(&config, reason).await {
            Ok(s) => Json(s).into_response(),
            Err(e @ EnableError::NotRecorded(_)) => {
                json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
            }
            Err(e) => json_error(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    } else {
        let reason = change
            .reason
            .unwrap_or_else(|| "disabled by on-call".into());
        let off = change
            .features
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| config.disable_features.clone());
        match shared.actions.set_switch(&cbo, &off, reason) {
            Ok(s) => Json(s).into_response(),
            Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct AckBody {
    #[serde(default)]
    rule: Option<String>,
}

/// Silences the actions of a CBO's breached rules (or the one named) until each recovers.
async fn ack(
    State(shared): State<Arc<Shared>>,
    Path(cbo): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_admin(&shared, &headers) {
        return refused;
    }
    if shared.config().cbo(&cbo).is_none() {
        return unknown_cbo(&cbo);
    }
    let body: AckBody = if body.is_empty() {
        AckBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("body must be {{\"rule\": \"…\"}} or empty: {e}"),
                );
            }
        }
    };
    let rules: Vec<RuleId> = match &body.rule {
        Some(name) => match RuleId::parse(name) {
            Some(r) => vec![r],
            None => return json_error(StatusCode::BAD_REQUEST, &format!("no rule {name:?}")),
        },
        None => {
            let engine = shared.engine();
            RuleId::ALL
                .into_iter()
                .filter(|r| {
                    engine.state(&cbo, *r).is_some_and(|t| {
                        matches!(t.state, RuleState::Breached | RuleState::Pending)
                    })
                })
                .collect()
        }
    };
    if rules.is_empty() {
        return json_error(
            StatusCode::CONFLICT,
            "no rule of this CBO is pending or breached",
        );
    }
    if let Err(e) = shared.actions.ack(&cbo, &rules, "the admin token") {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    Json(serde_json::json!({
        "cbo": cbo,
        "acknowledged": rules.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct DecisionQuery {
    cbo: Option<String>,
    since: Option<String>,
    /// Entries per page (default 1,000, at most 10,000).
    limit: Option<usize>,
    /// The cursor: the `next` of the page before.
    after: Option<u64>,
}

const DECISIONS_PAGE: usize = 1_000;
const DECISIONS_PAGE_MAX: usize = 10_000;

/// The decision log, oldest first; a CBO's token reads only that CBO's part.
async fn decisions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<DecisionQuery>,
) -> Response {
    let cbo = match readable_cbo(&shared, &headers, q.cbo.as_deref(), "decisions") {
        Ok(cbo) => cbo,
        Err(refused) => return *refused,
    };
    let since = match q.since.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.timestamp_millis()),
        Some(Err(e)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("since must be RFC 3339: {e}"),
            );
        }
    };
    let limit = q.limit.unwrap_or(DECISIONS_PAGE);
    if !(1..=DECISIONS_PAGE_MAX).contains(&limit) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("limit must be within 1..={DECISIONS_PAGE_MAX}"),
        );
    }
    // Reading the file is blocking work: off the async workers.
    let log = shared.actions.clone();
    let after = q.after.unwrap_or(0);
    let page =
        tokio::task::spawn_blocking(move || log.log.page(cbo.as_deref(), since, after, limit))
            .await;
    let Ok((entries, more)) = page else {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the decision log failed",
        );
    };
    let next = more.then(|| entries.last().map(|e| e.seq)).flatten();
    Json(serde_json::json!({
        "decisions": entries,
        "next": next,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StartValidation {
    cbo: String,
    deployment: String,
    #[serde(default)]
    duration: Option<String>,
}

/// Starts a post-deploy validation window (admin token).
async fn start_validation(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_admin(&shared, &headers) {
        return refused;
    }
    let req: StartValidation = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"cbo\", \"deployment\", \"duration\"}}: {e}"),
            );
        }
    };
    if shared.config().cbo(&req.cbo).is_none() {
        return unknown_cbo(&req.cbo);
    }
    if req.deployment.trim().is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "deployment is empty");
    }
    let duration = match req.duration.as_deref().map(humantime::parse_duration) {
        None => shared.config().validation.duration,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return json_error(StatusCode::BAD_REQUEST, &format!("duration: {e}"));
        }
    };
    let max = shared.config().transfers.max_window;
    if duration.is_zero() || duration > max {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "duration must be within 1s..={}",
                humantime::format_duration(max)
            ),
        );
    }
    if let Some(why) = shared.actions.log.health.broken() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the decision log cannot be written ({why}): no window started"),
        );
    }
    let v = shared.validations.start(
        &req.cbo,
        req.deployment.trim(),
        duration,
        shared.config().validation.min_samples,
        "api",
        shared.clock.now_ms(),
    );
    match v {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The CBO whose part a caller may read (`None`: every CBO, for the admin token), given the one
/// `asked` for; 401 without a valid token, 403 when a CBO's token asks for another CBO.
fn readable_cbo(
    shared: &Shared,
    headers: &HeaderMap,
    asked: Option<&str>,
    what: &str,
) -> Result<Option<String>, Box<Response>> {
    match (caller(shared, headers), asked) {
        (None, _) => Err(Box::new(unauthorized())),
        (Some(Caller::Admin), asked) => Ok(asked.map(str::to_string)),
        (Some(Caller::Cbo(own)), Some(asked)) if asked != own => Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            &format!("a CBO's token reads only its own {what}"),
        ))),
        (Some(Caller::Cbo(own)), _) => Ok(Some(own)),
    }
}

#[derive(serde::Deserialize)]
struct ValidationQuery {
    cbo: Option<String>,
}

async fn list_validations(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ValidationQuery>,
) -> Response {
    match readable_cbo(&shared, &headers, q.cbo.as_deref(), "validations") {
        Err(refused) => *refused,
        Ok(cbo) => Json(serde_json::json!({
            "validations": shared.validations.list(cbo.as_deref()),
        }))
        .into_response(),
    }
}

async fn get_validation(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(v) = shared.validations.get(&id) else {
        return match caller(&shared, &headers) {
            None => unauthorized(),
            Some(_) => json_error(StatusCode::NOT_FOUND, &format!("no validation {id:?}")),
        };
    };
    match readable_cbo(&shared, &headers, Some(&v.cbo), "validations") {
        Err(refused) => *refused,
        Ok(_) => Json(v).into_response(),
    }
}
