//! Twilio's record as sources (SPEC §2b), end to end through the simulated Twilio: TaskRouter's
//! Events API alone guarding a CBO whose plugin says nothing, across a restart; signed pushes
//! (the workspace callback and Event Streams) taken, forged ones refused; the functions' Bad
//! Request line and the debugger's 400 alert counted once; plugin and TaskRouter joined; the
//! switch readable from Flex (CORS) and switching a sub-feature alone.

mod common;

use std::time::Duration;

use common::story::{self, ZE_A, ZS_A};
use common::*;
use serde_json::{Value, json};
use sha2::Digest;
use transfer_guard::App;
use transfer_guard::sim::traffic::{Generator, Profile};
use transfer_guard::sim::twilio::{SimTwilio, callback_form, cloud_event};
use transfer_guard::twilio::signature::sign;

const PUBLIC: &str = "https://guard.example.org";

fn wt(n: u32) -> String {
    format!("WT{n:032x}")
}

fn attributes(n: u32) -> Value {
    json!({
        "transferTargetType": "queue",
        "transferQueueName": "support",
        "conversations": {"conversation_id": ch(n)},
    })
}

/// TaskRouter's record of transfer `n` of cbo a: created at `at`, reserved 1.5 s later, then
/// accepted after 4 s or canceled as `failed`.
fn record_transfer(sim: &SimTwilio, n: u32, at: i64, ok: bool) {
    let attrs = attributes(n);
    let ev = |ty: &str, t: i64, reason: Option<&str>| {
        sim.taskrouter_event(AC_A, WS_A, WW_A, ty, t, &wt(n), &attrs, reason);
    };
    ev("task.created", at, None);
    ev("reservation.created", at + 1_500, None);
    if ok {
        ev("reservation.accepted", at + 4_000, None);
    } else {
        ev(
            "task.canceled",
            at + 2_000,
            Some("Worker is not available (20001)"),
        );
    }
}

/// cbo a with live actions, polls every 5 s, `public_url` set; `extra` after everything.
fn text(dir: &std::path::Path, sim: &SimTwilio, extra: &str) -> String {
    story::text(dir, sim, "", extra)
        .replacen("[twilio]\n", "[twilio]\npoll_interval = \"5s\"\n", 1)
        .replacen(
            "[server]\n",
            &format!("[server]\npublic_url = \"{PUBLIC}\"\n"),
            1,
        )
}

/// Cbo a with the Events poller off: only pushes report TaskRouter's events.
async fn pushes_only(dir: &std::path::Path, sim: &SimTwilio) -> App {
    start_at(
        &text(dir, sim, "[sources.twilio]\ntaskrouter_events = false\n"),
        T0,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn taskrouter_events_alone_guard_a_cbo_and_a_restart_neither_loses_nor_rereads_them() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = start_at(&text(&dir, &sim, ""), T0).await;
    // Ten transfers TaskRouter recorded, the plugin silent: 7 accepted, 3 not.
    for n in 0..10 {
        record_transfer(&sim, n, T0 + i64::from(n) * 1_000, n >= 3);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let completed = sum_a(
        &app,
        "transfer_guard_transfers_total",
        &[r#"outcome="completed""#],
    );
    let failed = sum_a(
        &app,
        "transfer_guard_transfers_total",
        &[r#"outcome="failed""#],
    );
    assert_eq!((completed, failed), (7.0, 3.0));
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfer_errors_total",
            &[r#"class="agent_unavailable""#]
        ),
        3.0
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_seen_total",
            &[r#"source="taskrouter_events""#]
        ),
        10.0
    );
    assert!(
        sum_a(
            &app,
            "transfer_guard_source_polls_total",
            &[r#"source="taskrouter_events""#, r#"result="ok""#]
        ) >= 5.0
    );
    // Latencies from TaskRouter's timestamps; the rules and status read them.
    let state = app.shared.fleet.get("a").unwrap().clone();
    let s = state.stats(story::now(&app), Duration::from_secs(300));
    assert_eq!(s.counts.completed, 7);
    assert!(s.notification_p95.is_some() && s.cold_completion_p95.is_some());
    assert_eq!(
        sum_a(&app, "transfer_guard_agent_notification_seconds_count", &[]),
        10.0
    );
    // The cursor is on disk, and /v1/status says how far each source has read.
    assert!(dir.join("cursors").join("a.json").exists());
    let status: Value = reqwest::Client::new()
        .get(format!("{}/v1/status", app.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let source = &status["cbos"]["a"]["taskrouter"]["sources"]["taskrouter_events"];
    assert_eq!(source["last_result"], "ok", "{status}");
    assert!(source["read_until"].is_string(), "{source}");
    app.shutdown().await;

    // Two more while the daemon is down, then a restart on the same state: the ten are not
    // taken again (the overlap brings them back), the two are not lost.
    let down = story::now_sim(&sim);
    record_transfer(&sim, 10, down, true);
    record_transfer(&sim, 11, down + 500, false);
    let app = start_at(&text(&dir, &sim, ""), down + 10_000).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_seen_total",
            &[r#"source="taskrouter_events""#]
        ),
        2.0
    );
    assert_eq!(sum_a(&app, "transfer_guard_transfers_total", &[]), 2.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn failures_only_taskrouter_saw_breach_the_success_rate_and_fail_a_validation_window() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    // A failed window only alerts here, so the rule is judged on the same deployment.
    let rules = "[validation]\non_fail = \"alert\"\n[rules.success_rate]\nthreshold = 0.9\nwindow = \"5m\"\nfor = \"1m\"\nmin_samples = 20\nfast_min_samples = 20\n";
    let app = start_at(&text(&dir, &sim, rules), T0).await;
    let id = app
        .shared
        .validations
        .start(
            "a",
            "deploy-1",
            Duration::from_secs(180),
            20,
            "api",
            story::now(&app),
        )
        .unwrap()
        .id;
    // Forty transfers over four minutes, half of them failing, none reported by the plugin.
    for step in 0..24u32 {
        let now = story::now_sim(&sim);
        for k in 0..2 {
            let n = step * 2 + k;
            record_transfer(&sim, n, now + i64::from(k) * 100, n % 2 == 0);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    // The rule breached and rolled back (its windows then restart on the rolled-back build).
    let breached = app
        .shared
        .actions
        .log
        .query(Some("a"), None)
        .iter()
        .any(|e| e.rule.as_deref() == Some("success_rate") && e.to.as_deref() == Some("breached"));
    assert!(breached);
    assert_eq!(story::actions(&app, "a", "serverless", "fired"), 1.0);
    let v = app.shared.validations.get(&id).unwrap();
    assert_eq!(v.state.as_str(), "failed", "{v:?}");
    app.shutdown().await;
}

/// Signs a callback form as TaskRouter does.
fn signed_form(path: &str, form: &[(String, String)]) -> String {
    sign("twilio-secret", &format!("{PUBLIC}{path}"), form)
}

#[tokio::test(start_paused = true)]
async fn signed_pushes_are_taken_and_forged_ones_refused() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = pushes_only(&dir, &sim).await;
    let client = reqwest::Client::new();
    let path = "/v1/twilio/a/taskrouter";
    record_transfer(&sim, 1, T0, true);
    let events = sim.events(AC_A);
    for e in &events {
        let form = callback_form(e);
        let resp = client
            .post(format!("{}{path}", app.url()))
            .header("x-twilio-signature", signed_form(path, &form))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_total",
            &[r#"outcome="completed""#]
        ),
        1.0
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_seen_total",
            &[r#"source="taskrouter_callback""#]
        ),
        1.0
    );

    // Forged: signed with another token, or a parameter changed after signing, or unsigned.
    let mut form = callback_form(&events[0]);
    let good = signed_form(path, &form);
    let forged = sign("not-the-token", &format!("{PUBLIC}{path}"), &form);
    form.push(("Extra".into(), "1".into()));
    for (signature, body) in [
        (Some(forged), callback_form(&events[0])),
        (Some(good), form),
        (None, callback_form(&events[0])),
    ] {
        let mut req = client.post(format!("{}{path}", app.url())).form(&body);
        if let Some(s) = signature {
            req = req.header("x-twilio-signature", s);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("X-Twilio-Signature"),
            "{body}"
        );
    }
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_pushes_total",
            &[
                r#"source="taskrouter_callback""#,
                r#"result="bad_signature""#
            ]
        ),
        3.0
    );

    // Event Streams: a JSON array of CloudEvents, covered by bodySHA256.
    record_transfer(&sim, 2, T0 + 20_000, false);
    let new: Vec<Value> = sim.events(AC_A)[events.len()..]
        .iter()
        .map(cloud_event)
        .collect();
    let body = serde_json::to_vec(&new).unwrap();
    let hash = hex::encode(sha2::Sha256::digest(&body));
    let path = format!("/v1/twilio/a/event-streams?bodySHA256={hash}");
    let signature = sign("twilio-secret", &format!("{PUBLIC}{path}"), &[]);
    let post = |body: Vec<u8>, signature: String| {
        client
            .post(format!("{}{path}", app.url()))
            .header("content-type", "application/json")
            .header("x-twilio-signature", signature)
            .body(body)
            .send()
    };
    assert_eq!(
        post(body.clone(), signature.clone())
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_total",
            &[r#"outcome="failed""#]
        ),
        1.0
    );
    // The same signature on another body: the hash no longer matches.
    assert_eq!(post(b"[]".to_vec(), signature).await.unwrap().status(), 403);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_simulated_workspace_callback_pushes_signed_events_the_daemon_takes() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = pushes_only(&dir, &sim).await;
    let path = "/v1/twilio/a/taskrouter";
    sim.set_event_callback(
        AC_A,
        &format!("{}{path}", app.url()),
        &format!("{PUBLIC}{path}"),
    );
    record_transfer(&sim, 5, T0, true);
    for _ in 0..50 {
        settle().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if sum_a(&app, "transfer_guard_transfers_total", &[]) > 0.0 {
            break;
        }
    }
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_total",
            &[r#"outcome="completed""#]
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_request_line_and_a_400_alert_each_count_once() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = start_at(&text(&dir, &sim, ""), T0).await;
    let tasks = format!("https://taskrouter.twilio.com/v1/Workspaces/{WS_A}/Tasks");
    // The function's error line for a refused transfer, and the debugger's alert of it.
    sim.function_log(
        AC_A,
        ZS_A,
        ZE_A,
        "error",
        &format!(
            "create-transfer-task failed for {}: TaskRouter error: Bad Request",
            ch(1)
        ),
        T0 + 1_000,
    );
    sim.debugger_alert(
        AC_A,
        "error",
        "20001",
        "Msg=Bad Request&httpResponse=400",
        &tasks,
        T0 + 1_200,
    );
    // Lines that are not Bad Requests: an info line, an error of another kind.
    sim.function_log(AC_A, ZS_A, ZE_A, "info", "transfer requested", T0 + 1_300);
    sim.function_log(
        AC_A,
        ZS_A,
        ZE_A,
        "error",
        "Conversation not found",
        T0 + 1_400,
    );
    // Polled many times over (the overlap returns them each time).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let signals = |source: &str| {
        sum_a(
            &app,
            "transfer_guard_bad_request_signals_total",
            &[&format!(r#"source="{source}""#)],
        )
    };
    assert_eq!(
        (signals("serverless_logs"), signals("twilio_alerts")),
        (1.0, 0.0)
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_twilio_alerts_total",
            &[r#"code="20001""#]
        ),
        1.0
    );
    // A 400 alert alone, minutes later: a Bad Request of its own, once.
    let later = story::now_sim(&sim);
    sim.debugger_alert(
        AC_A,
        "error",
        "20001",
        "Msg=Bad Request&httpResponse=400",
        &tasks,
        later,
    );
    // A warning is not read (LogLevel=error).
    sim.debugger_alert(AC_A, "warning", "20002", "httpResponse=400", &tasks, later);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        (signals("serverless_logs"), signals("twilio_alerts")),
        (1.0, 1.0)
    );
    let stats = app
        .shared
        .fleet
        .get("a")
        .unwrap()
        .stats(story::now(&app), Duration::from_secs(600));
    assert_eq!(stats.counts.taskrouter_bad_request, 2);
    assert_eq!(
        story::state(&app, "a", "bad_requests"),
        "ok",
        "two minutes apart, not yet three"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn plugin_and_taskrouter_reporting_the_same_traffic_count_it_once() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = start_at(&text(&dir, &sim, ""), T0).await;
    let profile = Profile {
        rate: 0.5,
        silent: 0.0,
        ..Profile::default()
    };
    let mut g = Generator::new(profile, 7, T0);
    let mut transfers = std::collections::HashSet::new();
    for _ in 0..18 {
        let now = story::now(&app);
        g.start_until(now);
        for (at, r) in g.due_records(now) {
            r.apply(&sim, (AC_A, WS_A, WW_A), Some((ZS_A, ZE_A)), at);
        }
        let lines = g.due(now);
        for l in &lines {
            let v: Value = serde_json::from_str(l).unwrap();
            transfers.insert(v["transferId"].as_str().unwrap().to_string());
        }
        story::ingest(&app, "a", lines);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    // Let the last transfers end and every poll catch up.
    tokio::time::sleep(Duration::from_secs(60)).await;
    g.start_until(0);
    let now = story::now(&app);
    for (at, r) in g.due_records(now) {
        r.apply(&sim, (AC_A, WS_A, WW_A), Some((ZS_A, ZE_A)), at);
    }
    story::ingest(&app, "a", g.due(now));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let counted = sum_a(&app, "transfer_guard_transfers_total", &[]);
    assert!(transfers.len() > 40, "{}", transfers.len());
    assert_eq!(counted, transfers.len() as f64);
    // Past the joining time: nothing TaskRouter saw went unreported by the plugin.
    tokio::time::sleep(Duration::from_secs(430)).await;
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_disagreements_total",
            &[r#"kind="plugin_missing""#]
        ),
        0.0
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_disagreements_total",
            &[r#"kind="outcome""#]
        ),
        0.0
    );
    // Bad Requests the plugin reported are not counted again from the logs and the debugger.
    assert_eq!(
        sum_a(&app, "transfer_guard_bad_request_signals_total", &[]),
        0.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_429_on_the_events_api_is_counted_and_waited_out() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let app = start_at(&text(&dir, &sim, ""), T0).await;
    sim.inject(
        &format!("{WS_A}/Events"),
        transfer_guard::sim::twilio::Fault::RateLimit {
            retry_after_secs: 30,
        },
        Some(1),
    );
    record_transfer(&sim, 1, T0, true);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_polls_total",
            &[r#"source="taskrouter_events""#, r#"result="rate_limited""#]
        ),
        1.0
    );
    assert_eq!(sum_a(&app, "transfer_guard_transfers_total", &[]), 0.0);
    let asked = |sim: &SimTwilio| {
        sim.requests()
            .iter()
            .filter(|r| r.path.ends_with(&format!("{WS_A}/Events")))
            .count()
    };
    let before = asked(&sim);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(asked(&sim), before, "nothing asked before Retry-After");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(sum_a(&app, "transfer_guard_transfers_total", &[]), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn flex_reads_the_switch_and_a_sub_feature_switches_off_alone() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    let text = text(&dir, &sim, "").replacen(
        "disable = [\"flex_flag\"]\n",
        "disable = [\"flex_flag\"]\ndisable_features = [\"cold_transfer\"]\n",
        1,
    );
    let app = start_at(&text, T0).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/switch/a", app.url());
    let resp = client
        .get(&url)
        .header("origin", "https://flex.twilio.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://flex.twilio.com"
    );
    let resp = client
        .get(&url)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let pre = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://flex.twilio.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-methods"], "GET");

    // On-call switches cold transfers off alone.
    let resp = client
        .put(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"transfers_enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let switch: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (
            &switch["transfers_enabled"],
            &switch["cold_transfer"],
            &switch["multi_participant"]
        ),
        (&json!(true), &json!(false), &json!(true))
    );
    assert_eq!(
        metric(
            &app.shared.metrics.render(),
            r#"transfer_guard_transfers_disabled{cbo="a"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn pushes_without_a_public_url_or_to_an_unknown_cbo_say_why() {
    let sim = story::sim().await;
    let dir = story::fresh_dir();
    // No server.public_url: the signature cannot be checked, so nothing is taken.
    let app = start_at(&story::text(&dir, &sim, "", ""), T0).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/v1/twilio/a/taskrouter", app.url()))
        .form(&[("EventType", "task.created")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("server.public_url"),
        "{body}"
    );
    let resp = client
        .post(format!("{}/v1/twilio/nobody/event-streams", app.url()))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    app.shutdown().await;
}
