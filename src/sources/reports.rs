//! `POST /v1/reports`: an agent's report of a failing transfer (a CBO's ingest token), the seed's "agent reports of consistent failures across CBOs", kept for `cross_cbo`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::Shared;
use crate::api::{Caller, caller, json_error, unauthorized};
use crate::journal::{Op, Record};
use crate::sid::ConversationSid;
use crate::state::Report;

/// A note longer than this is cut (it is free text, shown in evidence, never a label).
const NOTE_MAX: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    conversation_sid: String,
    #[serde(default)]
    note: Option<String>,
    /// Only with the admin token: whose report it is.
    #[serde(default)]
    cbo: Option<String>,
}

pub async fn report(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(who) = caller(&shared, &headers) else {
        return unauthorized();
    };
    let body: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"conversation_sid\": \"CH…\", \"note\": \"…\"}}: {e}"),
            );
        }
    };
    let cbo = match (who, body.cbo) {
        (Caller::Cbo(k), _) => k,
        (Caller::Admin, Some(k)) => k,
        (Caller::Admin, None) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "with the admin token, name the CBO: {\"cbo\": \"…\"}",
            );
        }
    };
    let Some(state) = shared.fleet.get(&cbo) else {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("no CBO {cbo:?} is configured"),
        );
    };
    let sid = match ConversationSid::parse(body.conversation_sid.trim()) {
        Ok(s) => s,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("conversation_sid: {e}")),
    };
    let now_ms = shared.clock.now_ms();
    let report = Report {
        conversation_sid: sid.to_string(),
        note: body
            .note
            .map(|n| n.trim().chars().take(NOTE_MAX).collect::<String>())
            .filter(|n| !n.is_empty()),
        at: crate::clock::rfc3339(now_ms),
        at_ms: now_ms,
    };
    tracing::warn!(cbo, conversation_sid = %report.conversation_sid, note = report.note.as_deref().unwrap_or(""), "an agent reported a failing transfer");
    drop(state);
    // With replicas, to the store: every replica weighs it.
    let record = Record {
        cbo: cbo.clone(),
        now: now_ms,
        op: Op::Report {
            conversation_sid: report.conversation_sid.clone(),
            note: report.note.clone(),
            at: report.at.clone(),
            at_ms: report.at_ms,
        },
    };
    if let Err(why) = shared.share_off_worker(vec![record]).await {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the store cannot be written ({why}): the report was not taken; send it again"
            ),
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "cbo": cbo, "report": report })),
    )
        .into_response()
}
