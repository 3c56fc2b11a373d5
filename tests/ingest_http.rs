//! POST /v1/events, /metrics, /v1/status, /healthz and /readyz through a real listening daemon.

mod common;

use common::*;
use serde_json::Value;
use transfer_guard::App;

async fn start() -> App {
    App::start(config("")).await.unwrap()
}

async fn post(app: &App, token: Option<&str>, content_type: &str, body: String) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/events", app.url()))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn ndjson(app: &App, token: &str, lines: &[String]) -> (u16, Value) {
    post(app, Some(token), "application/x-ndjson", lines.join("\n")).await
}

async fn metrics(app: &App) -> String {
    reqwest::get(format!("{}/metrics", app.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn mixed_ndjson_batch_counts_valid_lines_and_reports_each_invalid_one() {
    let app = start().await;
    let t = now() - 30_000;
    let lines = vec![
        event("initiated", t, 1, ""),
        r#"{"event":"initiated","timestamp":"yesterday"}"#.to_string(),
        event("notified", t + 1000, 1, ""),
        "this is not json".to_string(),
        event("completed", t + 5000, 1, r#","history_preserved":true"#),
        format!(
            "[ConversationTransfer] failed: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\",\"error\":{{\"message\":\"TaskRouter error: Bad Request\"}}}}",
            rfc3339(t),
            ch(2)
        ),
        event("completed", t, 3, "").replace(&ch(3), "CH123"),
        event("initiated", t, 2, ""),
    ];
    let (status, body) = ndjson(&app, TOKEN_A, &lines).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 5);
    let rejected = body["rejected"].as_array().unwrap();
    let indexes: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 3, 6]);
    assert!(
        rejected[0]["error"]
            .as_str()
            .unwrap()
            .contains("field `timestamp`")
    );
    assert!(
        rejected[1]["error"]
            .as_str()
            .unwrap()
            .contains("not a JSON event")
    );
    assert!(
        rejected[2]["error"]
            .as_str()
            .unwrap()
            .contains("field `conversation_sid`")
    );

    let text = metrics(&app).await;
    assert_eq!(
        metric_sum(
            &text,
            "transfer_guard_events_ingested_total",
            &[r#"cbo="a""#]
        ),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_ingested_total{cbo="a",event="initiated"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_rejected_total{cbo="a",reason="invalid"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_rejected_total{cbo="a",reason="malformed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_transfer_errors_total{cbo="a",class="bad_request"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_transfers_total{cbo="a",outcome="completed",target_type="worker",transfer_type="cold"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_cbo_token_writes_only_its_own_cbo_whatever_the_body_says() {
    let app = start().await;
    let t = now() - 10_000;
    let line = event("initiated", t, 1, r#","cbo":"b""#);
    let (status, body) = ndjson(&app, TOKEN_A, &[line]).await;
    assert_eq!(status, 202, "{body}");
    let text = metrics(&app).await;
    assert_eq!(
        metric_sum(
            &text,
            "transfer_guard_events_ingested_total",
            &[r#"cbo="a""#]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "transfer_guard_events_ingested_total",
            &[r#"cbo="b""#]
        ),
        0.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_admin_token_writes_the_cbo_each_event_names() {
    let app = start().await;
    let t = now() - 10_000;
    let lines = vec![
        event("initiated", t, 1, r#","cbo":"b""#),
        event("initiated", t, 2, ""),
        event("initiated", t, 3, r#","cbo":"zzz""#),
    ];
    let (status, body) = ndjson(&app, ADMIN, &lines).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let errors: Vec<&str> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert!(errors[0].contains("field `cbo`: required"), "{errors:?}");
    assert!(
        errors[1].contains("\"zzz\" is not a configured CBO"),
        "{errors:?}"
    );
    let text = metrics(&app).await;
    assert_eq!(
        metric_sum(
            &text,
            "transfer_guard_events_ingested_total",
            &[r#"cbo="b""#]
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401() {
    let app = start().await;
    let line = event("initiated", now(), 1, "");
    let (status, body) = post(&app, None, "application/x-ndjson", line.clone()).await;
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("token"));
    let (status, _) = post(&app, Some("token-c"), "application/x-ndjson", line).await;
    assert_eq!(status, 401);
    let text = metrics(&app).await;
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_rejected_total{cbo="",reason="unauthorized"}"#
        ),
        Some(2.0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_two_mebibyte_body_gets_413_and_text_plain_gets_415() {
    let app = start().await;
    let big = event("initiated", now(), 1, "").repeat(2 * 1024 * 1024 / 150);
    assert!(big.len() > 2 * 1024 * 1024 - 1000);
    let (status, body) = post(&app, Some(TOKEN_A), "application/x-ndjson", big).await;
    assert_eq!(status, 413, "{body}");
    let line = event("initiated", now(), 1, "");
    let (status, body) = post(&app, Some(TOKEN_A), "text/plain", line).await;
    assert_eq!(status, 415, "{body}");
    assert!(body["error"].as_str().unwrap().contains("text/plain"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_body_where_nothing_parses_gets_400() {
    let app = start().await;
    let (status, body) = ndjson(&app, TOKEN_A, &["nope".into(), "{\"a\":1}".into()]).await;
    assert_eq!(status, 400);
    assert_eq!(body["rejected"].as_array().unwrap().len(), 2);
    let (status, _) = post(&app, Some(TOKEN_A), "application/json", "[1,".into()).await;
    assert_eq!(status, 400);
    app.shutdown().await;
}

#[tokio::test]
async fn a_json_object_and_a_json_array_are_both_taken() {
    let app = start().await;
    let t = now() - 5000;
    let (status, body) = post(
        &app,
        Some(TOKEN_A),
        "application/json",
        event("initiated", t, 1, ""),
    )
    .await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)));
    let array = format!(
        "[{}, {}, 17]",
        event("notified", t + 1000, 1, ""),
        event("completed", t + 2000, 1, "")
    );
    let (status, body) = post(&app, Some(TOKEN_A), "application/json", array).await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(2)));
    assert_eq!(body["rejected"][0]["index"], 2);
    app.shutdown().await;
}

#[tokio::test]
async fn initiated_and_completed_seven_seconds_later_is_one_completion_of_seven_seconds() {
    let app = start().await;
    let t = now() - 60_000;
    let lines = [
        event("initiated", t, 1, ""),
        event("completed", t + 7000, 1, ""),
    ];
    let (status, _) = ndjson(&app, TOKEN_A, &lines).await;
    assert_eq!(status, 202);
    let text = metrics(&app).await;
    assert_eq!(
        metric_sum(
            &text,
            "transfer_guard_transfers_total",
            &[r#"cbo="a""#, r#"outcome="completed""#]
        ),
        1.0
    );
    let series = r#"{cbo="a",transfer_type="cold"}"#;
    assert_eq!(
        metric(
            &text,
            &format!("transfer_guard_transfer_completion_seconds_sum{series}")
        ),
        Some(7.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_transfer_completion_seconds_bucket{cbo="a",transfer_type="cold",le="5"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_transfer_completion_seconds_bucket{cbo="a",transfer_type="cold",le="10"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn success_ratio_after_95_completed_and_5_failed_is_095() {
    let app = start().await;
    let t = now() - 120_000;
    let mut lines = Vec::new();
    for i in 0..100 {
        lines.push(event("initiated", t + i as i64 * 100, i, ""));
        lines.push(if i < 95 {
            event("completed", t + i as i64 * 100 + 3000, i, "")
        } else {
            event(
                "failed",
                t + i as i64 * 100 + 500,
                i,
                r#","error":{"code":20001}"#,
            )
        });
    }
    let (status, body) = ndjson(&app, TOKEN_A, &lines).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(200)),
        "{body}"
    );
    let text = metrics(&app).await;
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_success_ratio{cbo="a",window="5m"}"#
        ),
        Some(0.95)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_success_ratio{cbo="a",window="15m"}"#
        ),
        Some(0.95)
    );
    // A CBO without transfers has no ratio rather than a made-up one.
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_success_ratio{cbo="b",window="5m"}"#
        ),
        None
    );
    app.shutdown().await;
}

#[tokio::test]
async fn events_older_than_the_longest_window_or_a_minute_ahead_are_rejected() {
    let app = start().await;
    let lines = [
        event("initiated", now() - 3_700_000, 1, ""),
        event("initiated", now() + 120_000, 2, ""),
        event("initiated", now() + 20_000, 3, ""),
    ];
    let (status, body) = ndjson(&app, TOKEN_A, &lines).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    let text = metrics(&app).await;
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_rejected_total{cbo="a",reason="too_old"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"transfer_guard_events_rejected_total{cbo="a",reason="in_future"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn status_shows_every_cbo_to_the_admin_and_one_cbo_to_its_token() {
    let app = start().await;
    let t = now() - 30_000;
    ndjson(
        &app,
        TOKEN_A,
        &[
            event("initiated", t, 1, ""),
            event("completed", t + 2000, 1, ""),
        ],
    )
    .await;
    let get = |token: Option<&'static str>| {
        let mut req = reqwest::Client::new().get(format!("{}/v1/status", app.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, admin) = get(Some(ADMIN)).await;
    assert_eq!(status, 200);
    let keys: Vec<&String> = admin["cbos"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(
        admin["cbos"]["a"]["windows"]["5m"]["counts"]["completed"],
        1
    );
    assert_eq!(admin["cbos"]["a"]["windows"]["5m"]["success_rate"], 1.0);
    let (_, b) = get(Some(TOKEN_B)).await;
    let keys: Vec<&String> = b["cbos"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["b"]);
    assert_eq!(get(None).await.0, 401);
    app.shutdown().await;
}

#[tokio::test]
async fn health_ready_and_unknown_paths_answer_json() {
    let app = start().await;
    let get = |path: &str| reqwest::get(format!("{}{path}", app.url()));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    // Not ready until each CBO's first TaskRouter poll is done, and it says what it waits for.
    if ready.status() == 503 {
        let body: Value = ready.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("first TaskRouter poll"),
            "{body}"
        );
    } else {
        assert_eq!(ready.status(), 200);
    }
    let missing = get("/nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.json::<Value>().await.unwrap()["error"].is_string());
    // A method the path does not take: 405, with a JSON body like every error.
    let wrong = reqwest::Client::new()
        .delete(format!("{}/metrics", app.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "DELETE is not allowed on /metrics");
    let text = metrics(&app).await;
    // The version and the source revision (the checkout's commit).
    let build = text
        .lines()
        .find(|l| l.starts_with("transfer_guard_build_info{"))
        .unwrap();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(
        build.contains(&format!(
            "revision=\"{}\"",
            transfer_guard::metrics::REVISION
        )),
        "{build}"
    );
    // One process, without a store: it is the one that acts.
    assert_eq!(metric(&text, "transfer_guard_leader"), Some(1.0));
    app.shutdown().await;
}

#[tokio::test]
async fn a_gzip_body_is_taken_and_a_bad_one_says_why() {
    let app = start().await;
    let t = now() - 30_000;
    let body = [
        event("initiated", t, 1, ""),
        event("completed", t + 3_000, 1, ""),
    ]
    .join("\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, body.as_bytes()).unwrap();
    let zipped = gz.finish().unwrap();
    let send = |bytes: Vec<u8>, encoding: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/v1/events", app.url()))
            .bearer_auth(TOKEN_A)
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", encoding)
            .body(bytes)
            .send()
    };
    let resp = send(zipped, "gzip").await.unwrap();
    assert_eq!(resp.status(), 202);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["accepted"], 2, "{reply}");
    let resp = send(b"not gzip at all".to_vec(), "gzip").await.unwrap();
    assert_eq!(resp.status(), 400);
    let reply: Value = resp.json().await.unwrap();
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("does not decompress"),
        "{reply}"
    );
    let resp = send(body.into_bytes(), "br").await.unwrap();
    assert_eq!(resp.status(), 415);
    app.shutdown().await;
}

#[tokio::test]
async fn a_body_of_bad_lines_answers_the_first_hundred_and_a_count() {
    let app = start().await;
    let t = now() - 30_000;
    let mut lines: Vec<String> = (0..5_000).map(|i| format!("bad line {i}")).collect();
    lines.push(event("initiated", t, 1, ""));
    let sent: usize = lines.iter().map(|l| l.len() + 1).sum();
    let (status, reply) = ndjson(&app, TOKEN_A, &lines).await;
    assert_eq!(status, 202);
    let text = reply.to_string();
    assert_eq!(reply["accepted"], 1);
    assert_eq!(reply["rejected"].as_array().unwrap().len(), 100);
    assert_eq!(reply["rejected"][99]["index"], 99);
    assert_eq!(reply["rejected_more"], 4_900);
    assert!(
        text.len() < sent / 4,
        "a {}-byte reply to {sent} bytes",
        text.len()
    );
    app.shutdown().await;
}

/// A body over 64 KiB is parsed and taken on a blocking thread: the same answer, line for
/// line, as a small one gets, with the admin token's events split between the CBOs they name.
#[tokio::test]
async fn a_large_admin_body_is_taken_line_for_line_for_each_cbo_it_names() {
    let app = start().await;
    let t = now() - 60_000;
    let mut lines = Vec::new();
    for i in 0..1_500u32 {
        let cbo = if i % 3 == 0 { "b" } else { "a" };
        lines.push(event("initiated", t, i + 1, &format!(r#","cbo":"{cbo}""#)));
    }
    lines[10] = "not an event".to_string();
    lines[700] = event("initiated", now() - 3 * 3_600_000, 9_999, r#","cbo":"a""#);
    lines[1_499] = event("initiated", t, 10_000, r#","cbo":"zzz""#);
    let size: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert!(size > 64 * 1024, "the body is {size} bytes");
    let (status, body) = ndjson(&app, ADMIN, &lines).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1_497, "{body}");
    let rejected: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected.iter().map(|r| r.0).collect::<Vec<_>>(),
        [10, 700, 1_499],
        "{body}"
    );
    assert!(
        rejected[1].1.contains("older than the longest window"),
        "{body}"
    );
    assert!(
        rejected[2].1.contains("\"zzz\" is not a configured CBO"),
        "{body}"
    );
    let text = metrics(&app).await;
    let ingested = |cbo: &str| {
        metric_sum(
            &text,
            "transfer_guard_events_ingested_total",
            &[&format!(r#"cbo="{cbo}""#)],
        )
    };
    // Indexes 0, 3, …, 1497 name "b" (500 of them); the rest of the 1,497 taken are "a"'s.
    assert_eq!(ingested("b"), 500.0);
    assert_eq!(ingested("a"), 997.0);
    app.shutdown().await;
}

#[tokio::test]
async fn decisions_come_in_pages_that_follow_a_cursor() {
    use transfer_guard::decisions::{Entry, Kind};
    let app = start().await;
    let before = app.shared.actions.log.last_seq();
    for i in 0..2_500 {
        let mut e = Entry::new("a", Kind::Note, now() + i);
        e.detail = Some(format!("note {i}"));
        app.shared.actions.log.append(e).unwrap();
    }
    let client = reqwest::Client::new();
    let get = |after: u64, limit: &str| {
        client
            .get(format!("{}/v1/decisions", app.url()))
            .query(&[
                ("cbo", "a"),
                ("limit", limit),
                ("after", &after.to_string()),
            ])
            .bearer_auth(ADMIN)
            .send()
    };
    let mut after = before;
    let mut pages = Vec::new();
    loop {
        let page: Value = get(after, "1000").await.unwrap().json().await.unwrap();
        let n = page["decisions"].as_array().unwrap().len();
        pages.push(n);
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(pages, vec![1000, 1000, 500]);
    let bad = get(0, "0").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(
        bad.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
    app.shutdown().await;
}
