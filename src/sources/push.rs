//! TaskRouter events Twilio pushes (SPEC §2b): `POST /v1/twilio/{cbo}/taskrouter`, the
//! workspace's `EventCallbackUrl` (form-encoded), and `POST /v1/twilio/{cbo}/event-streams`,
//! an Event Streams webhook sink (a JSON array of CloudEvents). Each must carry a valid
//! `X-Twilio-Signature` for the CBO's auth token over `server.public_url` + the path; a bad one
//! is answered 403 and counted. Answers are `204` as soon as the events are taken (Twilio
//! waits 15 s at most).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::Shared;
use crate::api::json_error;
use crate::config::{Cbo, Credentials, Secret};
use crate::event::Source;
use crate::journal::{Op, Record, Stored};
use crate::sources::record::taskrouter_transfers;
use crate::sources::twilio_record::TaskRouterEvent;
use crate::twilio::signature::{self, SignatureError};

const CALLBACK: &str = "taskrouter_callback";
const STREAMS: &str = "event_streams";

/// What a push needs before its signature can be checked: the CBO, the URL Twilio called and
/// the auth token it signs with.
fn signing(shared: &Shared, cbo: &str, uri: &OriginalUri) -> Result<Signed, (StatusCode, String)> {
    let live = shared.config();
    let Some(config) = live.cbo(cbo).cloned() else {
        return Err((StatusCode::NOT_FOUND, format!("unknown cbo {cbo:?}")));
    };
    let Some(base) = live.server.public_url.as_deref() else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "server.public_url is not set: Twilio's signature covers the URL it called, so pushes cannot be verified".into(),
        ));
    };
    let Some(Credentials::AuthToken(token)) = config.credentials.clone() else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cbo {cbo} has no auth token (auth_token_env): Twilio signs pushes with the account's auth token"
            ),
        ));
    };
    let path = uri
        .0
        .path_and_query()
        .map_or_else(|| uri.0.path().to_string(), |p| p.as_str().to_string());
    Ok(Signed {
        config,
        url: format!("{}{path}", base.trim_end_matches('/')),
        token,
    })
}

/// A push's CBO, the URL Twilio signed and the token it signed with.
struct Signed {
    config: Cbo,
    url: String,
    token: Secret,
}

fn signature_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
}

fn refused(shared: &Shared, cbo: &str, source: &str, e: SignatureError) -> Response {
    if let Some(s) = shared.metrics.cbo(cbo) {
        s.push(source, "bad_signature");
    }
    tracing::warn!(cbo, source, error = %e, "refused a push to the Twilio receiver");
    json_error(StatusCode::FORBIDDEN, &e.to_string())
}

fn malformed(shared: &Shared, cbo: &str, source: &str, why: &str) -> Response {
    if let Some(s) = shared.metrics.cbo(cbo) {
        s.push(source, "malformed");
    }
    json_error(StatusCode::BAD_REQUEST, why)
}

/// Takes verified TaskRouter events of `config`'s workspace: the transfers among them go to
/// the CBO (with replicas, to the store for every replica); 503 when the store cannot take
/// them, so Twilio sends them again.
async fn take(
    shared: &Arc<Shared>,
    config: &Cbo,
    source: Source,
    events: Vec<TaskRouterEvent>,
) -> Response {
    let key = config.key.as_str();
    if let Some(s) = shared.metrics.cbo(key) {
        s.push(source.as_str(), "accepted");
    }
    // Without a sound workflow SID nothing tells a transfer task from another: the
    // configuration poll reports that.
    if let Ok(workflow) = &config.workflow.sid {
        let now = shared.clock.now_ms();
        let records = taskrouter_transfers(shared, key, workflow, events, source)
            .iter()
            .map(|e| Record {
                cbo: key.to_string(),
                now,
                op: Op::Event(Stored::of(e)),
            })
            .collect();
        if let Err(why) = shared.share_off_worker(records).await {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the store cannot be written ({why}): send it again"),
            );
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /v1/twilio/{cbo}/taskrouter`: one event, form-encoded, as TaskRouter posts to a
/// workspace's `EventCallbackUrl`.
pub async fn taskrouter(
    State(shared): State<Arc<Shared>>,
    Path(cbo): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Signed { config, url, token } = match signing(&shared, &cbo, &uri) {
        Ok(s) => s,
        Err((status, why)) => return json_error(status, &why),
    };
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return malformed(&shared, &cbo, CALLBACK, "the body is not a form");
    };
    let header = signature_header(&headers);
    if let Err(e) = signature::verify_form(token.expose(), &url, &params, header) {
        return refused(&shared, &cbo, CALLBACK, e);
    }
    match TaskRouterEvent::from_form(&params) {
        Ok(e) => take(&shared, &config, Source::TaskRouterCallback, vec![e]).await,
        Err(why) => malformed(
            &shared,
            &cbo,
            CALLBACK,
            &format!("not a TaskRouter event: {why}"),
        ),
    }
}

/// `POST /v1/twilio/{cbo}/event-streams`: CloudEvents from an Event Streams webhook sink; the
/// TaskRouter ones are taken, the rest ignored.
pub async fn event_streams(
    State(shared): State<Arc<Shared>>,
    Path(cbo): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Signed { config, url, token } = match signing(&shared, &cbo, &uri) {
        Ok(s) => s,
        Err((status, why)) => return json_error(status, &why),
    };
    let header = signature_header(&headers);
    if let Err(e) = signature::verify_json(token.expose(), &url, &body, header) {
        return refused(&shared, &cbo, STREAMS, e);
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return malformed(&shared, &cbo, STREAMS, &format!("not JSON: {e}")),
    };
    let items = match value {
        serde_json::Value::Array(items) => items,
        one @ serde_json::Value::Object(_) => vec![one],
        _ => {
            return malformed(
                &shared,
                &cbo,
                STREAMS,
                "expected a CloudEvent or an array of them",
            );
        }
    };
    let events = items
        .iter()
        .filter_map(|v| TaskRouterEvent::from_cloud_event(v).ok())
        .collect();
    take(&shared, &config, Source::EventStreams, events).await
}
