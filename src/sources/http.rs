//! `POST /v1/events`: a JSON object, a JSON array or NDJSON; per-CBO bearer tokens; per-line rejections.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::Shared;
use crate::api::{Caller, caller, json_error, unauthorized};
use crate::event::{self, Event, EventError};
use crate::metrics::Reject;
use crate::state::Rejection;

#[derive(Debug, Serialize)]
struct RejectedLine {
    index: usize,
    error: String,
}

#[derive(Debug, Serialize)]
struct IngestReply {
    accepted: usize,
    rejected: Vec<RejectedLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Ndjson,
}

fn format_of(headers: &HeaderMap) -> Result<Format, String> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Format::Ndjson),
        "" => Err("missing Content-Type: use application/json or application/x-ndjson".into()),
        other => Err(format!(
            "Content-Type {other} is not accepted: use application/json or application/x-ndjson"
        )),
    }
}

/// One piece of a body: its index and what it parsed to.
type Item = (usize, Result<Event, EventError>);

/// Splits a body into (index, parse result) items. `Err` when the body as a whole is not JSON.
fn parse_body(body: &str, format: Format) -> Result<Vec<Item>, String> {
    let trimmed = body.trim_start();
    if format == Format::Json {
        if trimmed.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(body)
                .map_err(|e| format!("body is not a JSON array of events: {e}"))?;
            return Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, raw)| (i, event::parse_json(raw.get())))
                .collect());
        }
        if trimmed.starts_with('{') {
            // One object; several objects on their own lines are taken as NDJSON.
            if serde_json::from_str::<&RawValue>(body).is_ok() || !trimmed.trim_end().contains('\n')
            {
                return Ok(vec![(0, event::parse_json(body))]);
            }
        } else {
            return Err("body is neither a JSON object nor a JSON array".into());
        }
    }
    Ok(body
        .split('\n')
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| (i, event::parse_line(line)))
        .collect())
}

pub async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let metrics = &shared.metrics;
    let Some(who) = caller(&shared, &headers) else {
        metrics.reject("", Reject::Unauthorized);
        return unauthorized();
    };
    let who_cbo = match &who {
        Caller::Cbo(k) => k.as_str(),
        Caller::Admin => "",
    };
    let format = match format_of(&headers) {
        Ok(f) => f,
        Err(message) => {
            metrics.reject(who_cbo, Reject::UnsupportedMediaType);
            return json_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &message);
        }
    };
    let limit = shared.config.server.max_body_bytes;
    let too_large = || {
        metrics.reject(who_cbo, Reject::TooLarge);
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes: send smaller batches"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            metrics.reject(who_cbo, Reject::Malformed);
            return json_error(StatusCode::BAD_REQUEST, &format!("body is not UTF-8: {e}"));
        }
    };
    let items = match parse_body(text, format) {
        Ok(items) => items,
        Err(message) => {
            metrics.reject(who_cbo, Reject::Malformed);
            return json_error(StatusCode::BAD_REQUEST, &message);
        }
    };

    let now_ms = shared.clock.now_ms();
    let mut rejected: Vec<Rejection> = Vec::new();
    let mut parsed = 0;
    let mut by_cbo: BTreeMap<&str, Vec<(usize, Event)>> = BTreeMap::new();
    for (index, item) in items {
        let event = match item {
            Ok(event) => event,
            Err(err) => {
                let reason = match err {
                    EventError::Malformed(_) => Reject::Malformed,
                    EventError::Field { .. } => Reject::Invalid,
                };
                metrics.reject(who_cbo, reason);
                rejected.push(Rejection {
                    index,
                    reason,
                    error: err.to_string(),
                });
                continue;
            }
        };
        parsed += 1;
        // A CBO's token writes that CBO's events whatever the body says; only the admin
        // token may name the CBO.
        let cbo = match &who {
            Caller::Cbo(k) => shared.fleet.get(k).map(|c| c.key.as_str()),
            Caller::Admin => match event.cbo.as_deref() {
                None => {
                    rejected.push(unknown(index, "required with the admin token".into()));
                    metrics.reject("", Reject::UnknownCbo);
                    continue;
                }
                Some(k) => match shared.fleet.get(k) {
                    Some(c) => Some(c.key.as_str()),
                    None => {
                        rejected.push(unknown(index, format!("{k:?} is not a configured CBO")));
                        metrics.reject("", Reject::UnknownCbo);
                        continue;
                    }
                },
            },
        };
        if let Some(cbo) = cbo {
            by_cbo.entry(cbo).or_default().push((index, event));
        }
    }
    let mut accepted = 0;
    for (cbo, events) in by_cbo {
        let state = shared.fleet.get(cbo).expect("looked up above");
        accepted += state.ingest(events, now_ms, &mut rejected);
    }
    rejected.sort_by_key(|r| r.index);
    let reply = IngestReply {
        accepted,
        rejected: rejected
            .into_iter()
            .map(|r| RejectedLine {
                index: r.index,
                error: r.error,
            })
            .collect(),
        error: (parsed == 0).then(|| "nothing in the body is a transfer event".to_string()),
    };
    let status = if parsed == 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::ACCEPTED
    };
    (status, axum::Json(reply)).into_response()
}

fn unknown(index: usize, why: String) -> Rejection {
    Rejection {
        index,
        reason: Reject::UnknownCbo,
        error: format!("field `cbo`: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_indexes_count_blank_lines_so_they_map_to_line_numbers() {
        let items = parse_body("\n{}\n\nnot json\n", Format::Ndjson).unwrap();
        let idx: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![1, 3]);
    }

    #[test]
    fn json_body_that_is_not_json_is_refused_whole() {
        assert!(parse_body("hello", Format::Json).is_err());
        assert!(parse_body("[1, 2", Format::Json).is_err());
    }
}
