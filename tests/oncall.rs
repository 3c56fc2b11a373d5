//! On-call controls over HTTP: the public switch, ack and re-enable with the admin token only,
//! the decision log's reader.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::SimTwilio;

const AC_A: &str = "AC0000000000000000000000000000000a";
const WS_A: &str = "WS0000000000000000000000000000000a";
const WW_A: &str = "WW0000000000000000000000000000000a";

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn flags(sim: &SimTwilio) -> Value {
    sim.flex_configuration(AC_A)["ui_attributes"]["custom_data"]["features"]["conversation_transfer"].clone()
}

#[tokio::test]
async fn bad_requests_disable_transfers_and_on_call_acks_and_re_enables_with_the_admin_token() {
    let sim = SimTwilio::start(Clock::new()).await;
    sim.add_account(AC_A, "twilio-secret");
    sim.add_workflow(AC_A, WS_A, WW_A);
    sim.add_account("AC0000000000000000000000000000000b", "twilio-secret");
    let text = config_text_with(&sim.url(), "")
        .replacen(
            &format!("workflow_sid = \"{WW_A}\"\n"),
            &format!("workflow_sid = \"{WW_A}\"\ndisable = [\"flex_flag\"]\n[cbo.rules.bad_requests]\naction = \"disable\"\n"),
            1,
        )
        .replacen("[server]\n", "[actions]\ndry_run = false\n\n[server]\n", 1);
    let app = App::start(lenient(&text)).await.unwrap();
    let before = sim.flex_configuration(AC_A)["ui_attributes"].clone();
    let url = app.url();
    let http = reqwest::Client::new();

    // Bad Requests in three distinct minutes, logged a little late.
    let now = chrono::Utc::now().timestamp_millis();
    let mut lines = Vec::new();
    for (i, ago) in [130_000, 70_000, 5_000].into_iter().enumerate() {
        let id = format!(r#","transfer_id":"t{i}""#);
        lines.push(event("initiated", now - ago, i as u32, &id));
        lines.push(event(
            "failed",
            now - ago + 300,
            i as u32,
            &(id + r#","error":{"status":400}"#),
        ));
    }
    let resp = post_ndjson(&url, TOKEN_A, &lines).await;
    assert_eq!(resp.status(), 202);
    until("the flag to go off", async || {
        flags(&sim)["enabled"] == false
    })
    .await;

    let switch: Value = reqwest::get(format!("{url}/v1/switch/a"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(switch["cbo"], "a");
    assert_eq!(switch["transfers_enabled"], false);
    assert!(switch["reason"].as_str().unwrap().contains("bad_requests"));
    assert!(switch["since"].is_string());
    assert_eq!(
        reqwest::get(format!("{url}/v1/switch/zzz"))
            .await
            .unwrap()
            .status(),
        404
    );

    // Ack: admin only.
    let ack = |token: Option<&'static str>| {
        let mut req = http.post(format!("{url}/v1/cbos/a/ack"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(ack(None).await.unwrap().status(), 401);
    assert_eq!(ack(Some(TOKEN_A)).await.unwrap().status(), 403);
    let acked = ack(Some(ADMIN)).await.unwrap();
    assert_eq!(acked.status(), 200);
    let acked: Value = acked.json().await.unwrap();
    assert!(
        acked["acknowledged"]
            .as_array()
            .unwrap()
            .contains(&json!("bad_requests"))
    );

    // Re-enable: admin only; the Flex flags come back, the rest of ui_attributes untouched.
    let put = |token: Option<&'static str>| {
        let mut req = http
            .put(format!("{url}/v1/switch/a"))
            .json(&json!({"transfers_enabled": true}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(put(None).await.unwrap().status(), 401);
    assert_eq!(put(Some(TOKEN_A)).await.unwrap().status(), 403);
    assert_eq!(
        flags(&sim)["enabled"],
        false,
        "refused calls changed nothing"
    );
    let enabled = put(Some(ADMIN)).await.unwrap();
    assert_eq!(enabled.status(), 200);
    let enabled: Value = enabled.json().await.unwrap();
    assert_eq!(enabled["transfers_enabled"], true);
    assert_eq!(sim.flex_configuration(AC_A)["ui_attributes"], before);
    let m = app.shared.metrics.render();
    assert_eq!(
        metric(&m, r#"transfer_guard_transfers_disabled{cbo="a"}"#),
        Some(0.0)
    );

    // The decision log: the CBO's token reads its own part, the admin any.
    let get = |token: &'static str, query: &str| {
        http.get(format!("{url}/v1/decisions{query}"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get(TOKEN_B, "?cbo=a").await.unwrap().status(), 403);
    let own: Value = get(TOKEN_A, "").await.unwrap().json().await.unwrap();
    let entries = own["decisions"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["cbo"] == "a"));
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in ["state", "action", "switch", "ack"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert!(
        entries
            .iter()
            .any(|e| e["integration"] == "flex_flag" && e["result"] == "fired")
    );
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let none: Value = get(
        ADMIN,
        &format!(
            "?since={}",
            future.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(none["decisions"].as_array().unwrap().len(), 0);
    assert_eq!(get(ADMIN, "?since=yesterday").await.unwrap().status(), 400);
    app.shutdown().await;
}
