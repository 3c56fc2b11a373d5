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
use crate::state::{CboState, Rejection};

#[derive(Debug, Serialize)]
struct RejectedLine {
    index: usize,
    error: String,
}

/// Rejections listed in one reply; the rest are counted (a body of bad lines must not answer
/// many times its own size).
const REJECTIONS_LISTED: usize = 100;

#[derive(Debug, Serialize)]
struct IngestReply {
    accepted: usize,
    rejected: Vec<RejectedLine>,
    /// Rejections beyond the first `REJECTIONS_LISTED`.
    #[serde(skip_serializing_if = "is_zero")]
    rejected_more: usize,
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

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Parses a body of bytes, handing each item to `each` as it is parsed: a UTF-8 byte-order
/// mark is ignored; NDJSON is decoded line by line, so a line that is not UTF-8 is rejected
/// alone and the good ones are kept.
fn parse_bytes(bytes: &[u8], format: Format, mut each: impl FnMut(Item)) -> Result<(), String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_body(text, format, each),
        Err(e) if format == Format::Json => Err(format!("body is not UTF-8: {e}")),
        Err(_) => {
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                each((
                    i,
                    match std::str::from_utf8(line) {
                        Ok(line) => event::parse_line(line),
                        Err(e) => Err(EventError::Malformed(format!("line is not UTF-8: {e}"))),
                    },
                ));
            }
            Ok(())
        }
    }
}

/// The body, decompressed when its `Content-Encoding` (lowercase) is gzip, within `limit` bytes
/// either way.
fn decoded(encoding: &str, bytes: Bytes, limit: usize) -> Result<Bytes, (StatusCode, String)> {
    match encoding {
        "" | "identity" => Ok(bytes),
        "gzip" | "x-gzip" => {
            use std::io::Read;
            let mut out = Vec::new();
            let mut gz = flate2::read::GzDecoder::new(&bytes[..]).take(limit as u64 + 1);
            gz.read_to_end(&mut out).map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("Content-Encoding gzip, but the body does not decompress: {e}"),
                )
            })?;
            if out.len() > limit {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "body larger than {limit} bytes once decompressed: send smaller batches"
                    ),
                ));
            }
            Ok(Bytes::from(out))
        }
        other => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other} is not accepted: use gzip or none"),
        )),
    }
}

/// One piece of a body: its index and what it parsed to.
type Item = (usize, Result<Event, EventError>);

/// Parses a body, handing each (index, parse result) item to `each`, in order, as it is
/// parsed (a thousand events are not collected first). `Err`, before any item, when the body
/// as a whole is not JSON.
fn parse_body(body: &str, format: Format, mut each: impl FnMut(Item)) -> Result<(), String> {
    let trimmed = body.trim_start();
    if format == Format::Json {
        if trimmed.starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(body)
                .map_err(|e| format!("body is not a JSON array of events: {e}"))?;
            for (i, raw) in items.into_iter().enumerate() {
                each((i, event::parse_json(raw.get())));
            }
            return Ok(());
        }
        if trimmed.starts_with('{') {
            // One object; several objects on their own lines are taken as NDJSON.
            if serde_json::from_str::<&RawValue>(body).is_ok() || !trimmed.trim_end().contains('\n')
            {
                each((0, event::parse_json(body)));
                return Ok(());
            }
        } else {
            return Err("body is neither a JSON object nor a JSON array".into());
        }
    }
    for (i, line) in lines(body) {
        if !line.trim().is_empty() {
            each((i, event::parse_line(line)));
        }
    }
    Ok(())
}

/// The lines of `text` with their indexes, as `text.split('\n').enumerate()` gives them, found
/// with `memchr` (a body is a thousand lines; core's search for a char is slower).
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', text.as_bytes())
        .map(Some)
        .chain([None])
        .enumerate()
        .map(move |(i, end)| {
            let end = end.unwrap_or(text.len());
            let line = &text[start..end];
            start = end + 1;
            (i, line)
        })
}

/// Bodies at least this large (and compressed ones) are decoded, parsed and taken on a
/// blocking thread, so that neither their parse (about a millisecond for a thousand lines) nor
/// a wait for the CBO's lock holds an async worker; smaller ones are taken in place, where a
/// thread hop would cost more.
const OFF_WORKER_BYTES: usize = 64 * 1024;

pub async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let metrics = &shared.metrics;
    let Some(who) = caller(&shared, &headers) else {
        metrics.reject("", Reject::Unauthorized);
        return unauthorized();
    };
    let who_cbo = who.cbo_label();
    let format = match format_of(&headers) {
        Ok(f) => f,
        Err(message) => {
            metrics.reject(who_cbo, Reject::UnsupportedMediaType);
            return json_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &message);
        }
    };
    let limit = shared.config().server.max_body_bytes;
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
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let store = shared.actions.log.store().cloned();
    // A compressed body is decompressed there too, whatever its size as sent.
    let big = bytes.len() >= OFF_WORKER_BYTES || !matches!(encoding.as_str(), "" | "identity");
    let taking = {
        let shared = shared.clone();
        let local = store.is_none();
        move || take(&shared, &who, &encoding, format, bytes, limit, local)
    };
    let taken = if big {
        match tokio::task::spawn_blocking(taking).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::error!(error = %e, "taking a body of events failed");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "taking the events failed; send them again",
                );
            }
        }
    } else {
        taking()
    };
    let Taken {
        mut accepted,
        mut rejected,
        parsed,
        stored,
    } = match taken {
        Ok(taken) => taken,
        Err((status, message)) => return json_error(status, &message),
    };
    // Replicas: the events go to the store, and every replica (this one too) takes them
    // from there; 202 means they are committed.
    if let (Some(store), Some((records, now_ms))) = (store, stored) {
        let n = records.len();
        let result = tokio::task::spawn_blocking(move || store.push_events(records, now_ms))
            .await
            .unwrap_or_else(|e| Err(format!("the task storing them ended: {e}")));
        if let Err(why) = result {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the store cannot be written ({why}): nothing in this body was taken; send it again"
                ),
            );
        }
        accepted = n;
    }
    rejected.sort_by_key(|r| r.index);
    let rejected_more = rejected.len().saturating_sub(REJECTIONS_LISTED);
    let reply = IngestReply {
        accepted,
        rejected: rejected
            .into_iter()
            .take(REJECTIONS_LISTED)
            .map(|r| RejectedLine {
                index: r.index,
                error: r.error,
            })
            .collect(),
        rejected_more,
        error: (parsed == 0).then(|| "nothing in the body is a transfer event".to_string()),
    };
    let status = if parsed == 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::ACCEPTED
    };
    (status, axum::Json(reply)).into_response()
}

/// What became of a body's events.
struct Taken {
    accepted: usize,
    rejected: Vec<Rejection>,
    /// Events that parsed, whether or not a CBO took them.
    parsed: usize,
    /// For the store (replicas): the records to push, and when they were received.
    stored: Option<(Vec<String>, i64)>,
}

/// Decodes and parses a body and has each CBO take its events (`local`), or encodes them for
/// the store; `Err` is the answer's status and message when the body as a whole is refused.
fn take(
    shared: &Shared,
    who: &Caller,
    encoding: &str,
    format: Format,
    bytes: Bytes,
    limit: usize,
    local: bool,
) -> Result<Taken, (StatusCode, String)> {
    let metrics = &shared.metrics;
    let who_cbo = who.cbo_label();
    let bytes = match decoded(encoding, bytes, limit) {
        Ok(b) => b,
        Err((status, message)) => {
            let reason = match status {
                StatusCode::PAYLOAD_TOO_LARGE => Reject::TooLarge,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => Reject::UnsupportedMediaType,
                _ => Reject::Malformed,
            };
            metrics.reject(who_cbo, reason);
            return Err((status, message));
        }
    };
    let now_ms = shared.clock.now_ms();
    let mut rejected: Vec<Rejection> = Vec::new();
    let mut parsed = 0;
    // Each CBO's state is taken once: a reload that drops it mid-request cannot lose the batch.
    let mut by_cbo: BTreeMap<String, (Arc<CboState>, Batch)> = BTreeMap::new();
    // A CBO's token sends one CBO's events: its batch gets room for every line at once.
    let room = match who {
        Caller::Cbo(_) => memchr::memchr_iter(b'\n', &bytes).count() + 1,
        Caller::Admin => 16,
    };
    let each = |(index, item): Item| {
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
                return;
            }
        };
        parsed += 1;
        // A CBO's token writes that CBO's events whatever the body says; only the admin
        // token may name the CBO.
        let key = match who {
            Caller::Cbo(k) => k.as_str(),
            Caller::Admin => match event.cbo.as_deref() {
                Some(k) => k,
                None => {
                    rejected.push(unknown(index, "required with the admin token".into()));
                    metrics.reject("", Reject::UnknownCbo);
                    return;
                }
            },
        };
        // The fleet is looked up once per CBO of the body, not once per event.
        if let Some((_, batch)) = by_cbo.get_mut(key) {
            batch.push((index, event));
            return;
        }
        match shared.fleet.get(key) {
            Some(state) => {
                let key = key.to_string();
                let mut batch = Vec::with_capacity(room);
                batch.push((index, event));
                by_cbo.insert(key, (state, batch));
            }
            None if *who == Caller::Admin => {
                rejected.push(unknown(index, format!("{key:?} is not a configured CBO")));
                metrics.reject("", Reject::UnknownCbo);
            }
            // A reload dropped the token's CBO during the request: nothing to take it.
            None => {}
        }
    };
    if let Err(message) = parse_bytes(&bytes, format, each) {
        metrics.reject(who_cbo, Reject::Malformed);
        return Err((StatusCode::BAD_REQUEST, message));
    }
    let (accepted, stored) = if local {
        let accepted = by_cbo
            .into_values()
            .map(|(state, events)| state.ingest(events, now_ms, &mut rejected))
            .sum();
        (accepted, None)
    } else {
        (0, Some((to_records(by_cbo, now_ms, &mut rejected), now_ms)))
    };
    Ok(Taken {
        accepted,
        rejected,
        parsed,
        stored,
    })
}

/// One CBO's events of a body, with their indexes in it.
type Batch = Vec<(usize, Event)>;

/// The events each CBO would take now, as the journal records them (what the store keeps);
/// those it refuses (too old, from the future) are rejected here, as `ingest` would.
fn to_records(
    by_cbo: BTreeMap<String, (Arc<CboState>, Batch)>,
    now_ms: i64,
    rejected: &mut Vec<Rejection>,
) -> Vec<String> {
    let mut records = Vec::new();
    let mut line = Vec::new();
    for (state, events) in by_cbo.into_values() {
        let encoder = crate::journal::EventLines::new(&state.key, now_ms);
        for (index, event) in events {
            if let Some((reason, detail)) = state.refuses(&event, now_ms) {
                state.count_refused(reason);
                rejected.push(Rejection {
                    index,
                    reason,
                    error: format!("field `timestamp`: {detail}"),
                });
                continue;
            }
            line.clear();
            encoder.encode(&event, &mut line);
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            records.push(String::from_utf8_lossy(&line).into_owned());
        }
    }
    records
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

    fn collect_bytes(bytes: &[u8], format: Format) -> Result<Vec<Item>, String> {
        let mut items = Vec::new();
        parse_bytes(bytes, format, |item| items.push(item)).map(|()| items)
    }

    fn collect_body(body: &str, format: Format) -> Result<Vec<Item>, String> {
        let mut items = Vec::new();
        parse_body(body, format, |item| items.push(item)).map(|()| items)
    }

    #[test]
    fn ndjson_indexes_count_blank_lines_so_they_map_to_line_numbers() {
        let items = collect_body("\n{}\n\nnot json\n", Format::Ndjson).unwrap();
        let idx: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![1, 3]);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_rejected_alone_and_a_bom_is_ignored() {
        let good = r#"{"event":"initiated","timestamp":"2027-01-15T08:00:00Z","conversation_sid":"CH0123456789abcdef0123456789abcdef","transfer_type":"cold","target_type":"queue"}"#;
        let mut body = b"\xEF\xBB\xBF".to_vec();
        body.extend_from_slice(good.as_bytes());
        body.extend_from_slice(b"\n{\"event\":\"fa\xFFiled\"}\n");
        body.extend_from_slice(good.as_bytes());
        let items = collect_bytes(&body, Format::Ndjson).unwrap();
        let ok: Vec<(usize, bool)> = items.iter().map(|(i, r)| (*i, r.is_ok())).collect();
        assert_eq!(ok, vec![(0, true), (1, false), (2, true)]);
        let Err(EventError::Malformed(why)) = &items[1].1 else {
            panic!("{:?}", items[1]);
        };
        assert!(why.starts_with("line is not UTF-8"), "{why}");
        // A JSON document must be UTF-8 as a whole.
        assert!(collect_bytes(b"[{\"a\":\"\xFF\"}]", Format::Json).is_err());
    }

    #[test]
    fn json_body_that_is_not_json_is_refused_whole() {
        assert!(collect_body("hello", Format::Json).is_err());
        assert!(collect_body("[1, 2", Format::Json).is_err());
    }
}
