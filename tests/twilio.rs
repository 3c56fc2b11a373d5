//! TaskRouter polling against the simulated Twilio, on tokio's paused clock: workflow health and
//! every corruption case, retries, 429, timeouts, secrets, per-account concurrency.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::config::check_str;
use transfer_guard::sim::twilio::{Fault, SimTwilio, TaskEvent};

const ZS: &str = "ZS0000000000000000000000000000000b";
const ZE: &str = "ZE0000000000000000000000000000000b";
const TWILIO_SECRET: &str = "twilio-secret";

/// The simulator with both test accounts and a sound workflow each.
async fn sim() -> SimTwilio {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    for (ac, ws, ww) in [(AC_A, WS_A, WW_A), (AC_B, WS_B, WW_B)] {
        sim.add_account(ac, TWILIO_SECRET);
        sim.add_workflow(ac, ws, ww);
    }
    sim
}

async fn start(text: String) -> App {
    start_at(&text, T0).await
}

/// Lets virtual time pass while the daemon polls.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

fn metrics(app: &App) -> String {
    app.shared.fleet.refresh_gauges(app.shared.clock.now_ms());
    app.shared.metrics.render()
}

fn config_ok(app: &App, cbo: &str) -> Option<f64> {
    metric(
        &metrics(app),
        &format!("transfer_guard_workflow_config_ok{{cbo=\"{cbo}\"}}"),
    )
}

fn problems(app: &App, cbo: &str) -> Vec<(String, String)> {
    let status = app.shared.fleet.get(cbo).unwrap().taskrouter().clone();
    serde_json::to_value(&status.problems)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["problem"].as_str().unwrap().to_string(),
                p["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn problem_ids(app: &App, cbo: &str) -> Vec<String> {
    problems(app, cbo).into_iter().map(|(id, _)| id).collect()
}

fn serverless_b() -> String {
    // cbo b's serverless environment: appended to the second [[cbo]] block.
    format!("serverless_service_sid = \"{ZS}\"\nserverless_environment_sid = \"{ZE}\"\n")
}

#[tokio::test(start_paused = true)]
async fn a_sound_workflow_gives_config_ok_1_and_its_statistics() {
    let sim = sim().await;
    sim.record_tasks(AC_A, WW_A, TaskEvent::Entered, 100);
    sim.record_tasks(AC_A, WW_A, TaskEvent::Canceled, 4);
    sim.record_tasks(AC_A, WW_A, TaskEvent::TimedOutInWorkflow, 2);
    sim.record_tasks(AC_A, WW_A, TaskEvent::ReservationAccepted, 90);
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "a"), Some(1.0));
    assert_eq!(config_ok(&app, "b"), Some(1.0));
    assert!(problem_ids(&app, "a").is_empty());
    let m = metrics(&app);
    assert_eq!(
        metric(&m, r#"transfer_guard_taskrouter_error_ratio{cbo="a"}"#),
        Some(0.06)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_tasks{cbo="a",kind="entered"}"#
        ),
        Some(100.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_reservations{cbo="a",kind="accepted"}"#
        ),
        Some(90.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="ok"}"#
        ),
        Some(1.0)
    );
    assert!(app.shared.not_ready().is_empty());
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_workflow_sid_is_corruption() {
    let sim = sim().await;
    let text =
        config_text_with(&sim.url(), "").replace(&format!("workflow_sid = \"{WW_B}\"\n"), "");
    let app = start(text).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "b"), Some(0.0));
    let p = problems(&app, "b");
    assert_eq!(p[0].0, "missing");
    assert!(
        p[0].1.contains("TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_B"),
        "{p:?}"
    );
    assert_eq!(config_ok(&app, "a"), Some(1.0));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_33_character_or_non_hex_workflow_sid_is_corruption() {
    let sim = sim().await;
    let text = config_text_with(&sim.url(), "")
        .replace(WW_A, &WW_A[..33])
        .replace(WW_B, "WWxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    let app = start(text).await;
    run_for(Duration::from_secs(2)).await;
    for cbo in ["a", "b"] {
        assert_eq!(config_ok(&app, cbo), Some(0.0));
        assert_eq!(problem_ids(&app, cbo), ["malformed"]);
    }
    assert!(problems(&app, "a")[0].1.contains("33 characters"));
    // A malformed SID is never sent to Twilio.
    assert!(
        sim.requests()
            .iter()
            .all(|r| !r.path.contains("/Workflows/"))
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_workflow_twilio_does_not_know_is_not_found() {
    let sim = sim().await;
    sim.remove_workflow(AC_B, WS_B, WW_B);
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "b"), Some(0.0));
    assert_eq!(problem_ids(&app, "b"), ["not_found"]);
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_taskrouter_polls_total{cbo="b",result="client_error"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_400_on_the_workflow_is_corruption_and_counts_as_a_bad_request() {
    let sim = sim().await;
    sim.inject(
        &format!("/Workflows/{WW_B}"),
        Fault::Status {
            status: 400,
            code: 20001,
        },
        None,
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "b"), Some(0.0));
    let p = problems(&app, "b");
    assert_eq!(p[0].0, "bad_request");
    assert!(p[0].1.contains("400 Bad Request"), "{p:?}");
    let m = metrics(&app);
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_bad_requests_total{cbo="b"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_bad_requests_total{cbo="a"}"#
        ),
        Some(0.0)
    );
    // It is a Bad Request minute for the rules, without being a transfer.
    let state = app.shared.fleet.get("b").unwrap();
    let s = state.stats(app.shared.clock.now_ms(), Duration::from_secs(300));
    assert_eq!(
        (s.bad_request_minutes, s.counts.taskrouter_bad_request),
        (1, 1)
    );
    assert_eq!(
        metric_sum(&m, "transfer_guard_transfers_total", &[r#"cbo="b""#]),
        0.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_workflow_without_the_queue_route_is_reported() {
    let sim = sim().await;
    let only_worker = r#"{"task_routing":{"filters":[{"expression":"transferTargetType == 'worker'","targets":[{"queue":"everyone"}]}]}}"#;
    sim.set_workflow(AC_A, WS_A, WW_A, only_worker);
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "a"), Some(0.0));
    let p = problems(&app, "a");
    assert_eq!(p[0].0, "route_missing");
    assert!(
        p[0].1
            .contains("does not route transferTargetType == 'queue'"),
        "{p:?}"
    );
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_workflow_problem{cbo="a",problem="route_missing"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn valid_ways_of_writing_the_routing_are_sound() {
    let sim = sim().await;
    for (i, expressions) in [
        vec![
            "'worker' == transferTargetType",
            "\"queue\" == transferTargetType",
        ],
        vec!["transferTargetType IN ['worker', 'queue']"],
        vec!["transferTargetType == \"worker\" OR transferTargetType == \"queue\""],
    ]
    .into_iter()
    .enumerate()
    {
        let filters: Vec<serde_json::Value> = expressions
            .iter()
            .map(|e| serde_json::json!({"expression": e, "targets": [{"queue": "everyone"}]}))
            .collect();
        let configuration = serde_json::json!({"task_routing": {"filters": filters}}).to_string();
        sim.set_workflow(AC_A, WS_A, WW_A, &configuration);
        let app = start(config_text_with(&sim.url(), "")).await;
        run_for(Duration::from_secs(2)).await;
        assert_eq!(
            config_ok(&app, "a"),
            Some(1.0),
            "variant {i}: {:?}",
            problems(&app, "a")
        );
        app.shutdown().await;
    }
    // A malformed one is named as such.
    let malformed = r#"{"task_routing":{"filters":[{"expression":"transferTargetType IN ['worker' 'queue']","targets":[{"queue":"everyone"}]}]}}"#;
    sim.set_workflow(AC_A, WS_A, WW_A, malformed);
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(2)).await;
    let p = problems(&app, "a");
    assert_eq!(p[0].0, "route_missing");
    assert!(p[0].1.contains("cannot parse filter 1 expression"), "{p:?}");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_same_workflow_sid_on_two_cbos_is_corruption_on_both() {
    let sim = sim().await;
    sim.add_workflow(AC_B, WS_B, WW_A);
    let text = config_text_with(&sim.url(), "").replace(WW_B, WW_A);
    let app = start(text).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(problem_ids(&app, "a"), ["shared"]);
    assert_eq!(problem_ids(&app, "b"), ["shared"]);
    assert!(
        problems(&app, "b")[0]
            .1
            .contains("also configured for cbo a")
    );
    assert_eq!(config_ok(&app, "a"), Some(0.0));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_functions_variable_missing_or_naming_another_workflow_is_corruption() {
    let sim = sim().await;
    sim.add_service(AC_B, ZS, ZE, WW_B);
    let app = start(config_text_with(&sim.url(), &serverless_b())).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "b"), Some(1.0));
    let other = "WW000000000000000000000000000000ff";
    sim.set_variable(
        AC_B,
        ZS,
        ZE,
        "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID",
        Some(other),
    );
    run_for(Duration::from_secs(20)).await;
    assert_eq!(config_ok(&app, "b"), Some(0.0));
    let ids = problem_ids(&app, "b");
    assert!(ids.contains(&"variable_mismatch".to_string()), "{ids:?}");
    // Changed without a deployment: the baseline taken at the last deployment no longer holds.
    assert!(
        ids.contains(&"changed_since_deployment".to_string()),
        "{ids:?}"
    );
    sim.set_variable(AC_B, ZS, ZE, "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID", None);
    run_for(Duration::from_secs(20)).await;
    assert!(problem_ids(&app, "b").contains(&"variable_missing".to_string()));
    sim.set_variable(
        AC_B,
        ZS,
        ZE,
        "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID",
        Some(WW_B),
    );
    run_for(Duration::from_secs(20)).await;
    assert_eq!(config_ok(&app, "b"), Some(1.0));
    assert!(problem_ids(&app, "b").is_empty());
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_deploy_that_resets_the_workflow_sid_is_caught_and_rebaselined() {
    let sim = sim().await;
    sim.add_service(AC_B, ZS, ZE, WW_B);
    let app = start(config_text_with(&sim.url(), &serverless_b())).await;
    run_for(Duration::from_secs(2)).await;
    let before = app
        .shared
        .fleet
        .get("b")
        .unwrap()
        .taskrouter()
        .baseline
        .clone()
        .unwrap();
    assert_eq!(before.workflow_sid, WW_B);
    let reset = "WW000000000000000000000000000000ee";
    let deployment = sim.deploy(AC_B, ZS, ZE, Some(reset));
    run_for(Duration::from_secs(20)).await;
    let status = app.shared.fleet.get("b").unwrap().taskrouter().clone();
    assert_eq!(
        status.latest_deployment.as_deref(),
        Some(deployment.sid.as_str())
    );
    let baseline = status.baseline.unwrap();
    assert_eq!(
        (
            baseline.workflow_sid.as_str(),
            baseline.deployment.as_deref()
        ),
        (reset, Some(deployment.sid.as_str()))
    );
    assert_eq!(problem_ids(&app, "b"), ["variable_mismatch"]);
    app.shutdown().await;
}

fn seen_at(sim: &SimTwilio, path: &str) -> Vec<tokio::time::Instant> {
    sim.requests()
        .iter()
        .filter(|r| r.path.ends_with(path))
        .map(|r| r.at)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_2_delays_the_next_request_by_2_seconds() {
    let sim = sim().await;
    let path = format!("/Workflows/{WW_A}");
    sim.inject(
        &path,
        Fault::RateLimit {
            retry_after_secs: 2,
        },
        Some(1),
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(4)).await;
    let at = seen_at(&sim, &path);
    assert!(at.len() >= 2, "{at:?}");
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_millis(2100),
        "{gap:?}"
    );
    // The retry succeeded: the poll is ok, the workflow sound.
    assert_eq!(config_ok(&app, "a"), Some(1.0));
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="ok"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_of_an_hour_is_capped_to_five_minutes_and_shown() {
    let sim = sim().await;
    let path = format!("/Workflows/{WW_A}");
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(20)).await;
    let last_ok = metric(
        &metrics(&app),
        r#"transfer_guard_taskrouter_last_success_timestamp_seconds{cbo="a"}"#,
    )
    .expect("a successful poll is stamped");
    sim.inject(
        &path,
        Fault::RateLimit {
            retry_after_secs: 3600,
        },
        Some(1),
    );
    let throttled_at = tokio::time::Instant::now();
    run_for(Duration::from_secs(6 * 60)).await;
    let at: Vec<_> = seen_at(&sim, &path)
        .into_iter()
        .filter(|t| *t >= throttled_at)
        .collect();
    assert!(at.len() >= 2, "{at:?}");
    // Not retried inside the call, not left for an hour: the next poll comes after the cap.
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_secs(300) && gap < Duration::from_secs(320),
        "{gap:?}"
    );
    let m = metrics(&app);
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="rate_limited"}"#
        ),
        Some(1.0)
    );
    let now_ok = metric(
        &m,
        r#"transfer_guard_taskrouter_last_success_timestamp_seconds{cbo="a"}"#,
    )
    .unwrap();
    assert!(now_ok >= last_ok + 300.0, "{last_ok} -> {now_ok}");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn while_throttled_the_status_says_until_when() {
    let sim = sim().await;
    sim.inject(
        &format!("/Workflows/{WW_A}"),
        Fault::RateLimit {
            retry_after_secs: 3600,
        },
        None,
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(5)).await;
    let status = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert_eq!(status.last_result, Some("rate_limited"));
    assert!(status.throttled_until.is_some(), "{status:?}");
    assert!(status.last_success.is_none());
    assert!(
        status.last_error.unwrap().contains("wait 5m"),
        "the cap is named"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_500_is_retried_with_backoff_then_counted_as_server_error() {
    let sim = sim().await;
    let path = format!("/Workflows/{WW_A}");
    sim.inject(
        &path,
        Fault::Status {
            status: 500,
            code: 20500,
        },
        None,
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(8)).await;
    let at = seen_at(&sim, &path);
    assert_eq!(at.len(), 3, "three attempts in the first cycle: {at:?}");
    let (first, second) = (at[1] - at[0], at[2] - at[1]);
    assert!(
        first >= Duration::from_millis(500) && second >= Duration::from_secs(1),
        "{first:?} {second:?}"
    );
    let m = metrics(&app);
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="server_error"}"#
        ),
        Some(1.0)
    );
    // A failing poll says nothing about the workflow: no verdict yet, no corruption claimed.
    assert_eq!(config_ok(&app, "a"), None);
    let status = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert!(status.last_error.unwrap().contains("Twilio 500"));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_request_times_out_and_is_counted_timeout() {
    let sim = sim().await;
    sim.inject(
        &format!("/Workflows/{WW_A}"),
        Fault::Delay(Duration::from_secs(3600)),
        None,
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(45)).await;
    let m = metrics(&app);
    assert!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="timeout"}"#
        )
        .unwrap()
            >= 1.0
    );
    let status = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert!(status.last_error.unwrap().contains("no answer within 10s"));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poll_failure_never_changes_a_transfer_metric() {
    let sim = sim().await;
    let app = start(config_text_with(&sim.url(), "")).await;
    let transfer_series = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| {
                [
                    "transfers_total",
                    "transfer_errors_total",
                    "events_",
                    "history_lost",
                    "success_ratio",
                    "transfer_completion",
                ]
                .iter()
                .any(|n| l.starts_with(&format!("transfer_guard_{n}")))
            })
            .map(str::to_string)
            .collect()
    };
    run_for(Duration::from_secs(2)).await;
    let before = transfer_series(&metrics(&app));
    for (status, code) in [(400, 20001), (404, 20404), (500, 20500)] {
        sim.inject("/Workflows/", Fault::Status { status, code }, None);
        run_for(Duration::from_secs(40)).await;
        sim.clear_faults();
    }
    sim.inject(
        "/Workflows/",
        Fault::RateLimit {
            retry_after_secs: 1,
        },
        None,
    );
    run_for(Duration::from_secs(40)).await;
    let m = metrics(&app);
    assert!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="rate_limited"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(transfer_series(&m), before);
    app.shutdown().await;
}

/// Collects every log line the daemon writes while the test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn the_auth_token_never_appears_in_logs_errors_status_or_metrics() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let sim = sim().await;
    // cbo a's token is wrong at this Twilio (401); b's requests fail with 500s and 400s.
    sim.add_account(AC_A, "another-token");
    sim.add_workflow(AC_A, WS_A, WW_A);
    sim.inject(
        &format!("/Workflows/{WW_B}/Cumulative"),
        Fault::Status {
            status: 500,
            code: 20500,
        },
        None,
    );
    sim.inject(
        &format!("/Workflows/{WW_B}"),
        Fault::Status {
            status: 400,
            code: 20001,
        },
        Some(1),
    );
    let app = start(config_text_with(&sim.url(), "")).await;
    run_for(Duration::from_secs(60)).await;
    let status = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert!(
        status.last_error.as_deref().unwrap().contains("401"),
        "{status:?}"
    );
    let status_json = {
        let a = app.shared.fleet.get("a").unwrap().taskrouter().clone();
        let b = app.shared.fleet.get("b").unwrap().taskrouter().clone();
        serde_json::to_string(&(a, b)).unwrap()
    };
    let m = metrics(&app);
    app.shutdown().await;
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("TaskRouter poll failed"),
        "the failures were logged"
    );
    let basic = base64_basic(AC_A, TWILIO_SECRET);
    for (what, text) in [("logs", &logs), ("status", &status_json), ("metrics", &m)] {
        assert!(
            !text.contains(TWILIO_SECRET),
            "the token leaked into {what}"
        );
        assert!(
            !text.contains(&basic),
            "the Basic credentials leaked into {what}"
        );
    }
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test(start_paused = true)]
async fn fifty_cbos_polled_every_second_never_exceed_the_per_account_limit() {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    sim.set_latency(Duration::from_millis(300));
    let accounts = [
        "AC000000000000000000000000000000a1",
        "AC000000000000000000000000000000a2",
    ];
    for ac in accounts {
        sim.add_account(ac, TWILIO_SECRET);
    }
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[twilio]\ntaskrouter_url = \"{0}\"\nserverless_url = \"{0}\"\nflex_url = \"{0}\"\nmonitor_url = \"{0}\"\npoll_interval = \"1s\"\nmax_concurrent_requests = 3\n",
        sim.url()
    );
    for i in 0..50 {
        let ac = accounts[i % 2];
        let ws = format!("WS{i:032x}");
        let ww = format!("WW{i:032x}");
        sim.add_workflow(ac, &ws, &ww);
        text += &format!(
            "[[cbo]]\nkey = \"c{i}\"\naccount_sid = \"{ac}\"\nauth_token_env = \"TWILIO\"\nworkspace_sid = \"{ws}\"\nworkflow_sid = \"{ww}\"\n"
        );
    }
    let app = App::start_with_clock(lenient(&text), Clock::starting_at(T0))
        .await
        .unwrap();
    run_for(Duration::from_secs(60)).await;
    for ac in accounts {
        let max = sim.max_in_flight(ac);
        assert!(max <= 3, "{ac}: {max} requests in flight at once");
        assert_eq!(
            max, 3,
            "{ac}: the limit was reached, so the test measured something"
        );
    }
    let polls: HashMap<String, usize> = sim.requests().iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.account.clone().unwrap()).or_default() += 1;
        m
    });
    // 25 CBOs x 3 requests per cycle, limited to 3 at once of 300 ms: ~10 requests/s per account.
    assert!(polls.values().all(|n| *n > 300), "{polls:?}");
    let m = metrics(&app);
    assert!(
        metric_sum(
            &m,
            "transfer_guard_taskrouter_polls_total",
            &[r#"result="ok""#]
        ) > 100.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_api_key_authenticates_instead_of_the_auth_token() {
    let sim = sim().await;
    let key = "SK0000000000000000000000000000000a";
    sim.add_api_key(AC_A, key, "key-secret");
    let text = config_text_with(&sim.url(), "").replacen(
        "auth_token_env = \"TWILIO\"",
        &format!("api_key_sid = \"{key}\"\napi_key_secret_env = \"API_SECRET\""),
        1,
    );
    let mut env = env();
    env.insert("API_SECRET", "key-secret");
    let checked = check_str(&text, &|k| env.get(k).map(|v| v.to_string()));
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    let app = App::start_with_clock(checked.config.unwrap(), Clock::starting_at(T0))
        .await
        .unwrap();
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "a"), Some(1.0));
    assert!(
        sim.requests()
            .iter()
            .any(|r| r.account.as_deref() == Some(AC_A) && r.status == 200)
    );
    app.shutdown().await;
}

fn timed_out(app: &App, cbo: &str) -> f64 {
    metric_sum(
        &metrics(app),
        "transfer_guard_transfers_total",
        &[&format!("cbo=\"{cbo}\""), "outcome=\"timed_out\""],
    )
}

#[tokio::test(start_paused = true)]
async fn the_functions_conversation_transfer_timeout_is_the_cbos_timeout() {
    let sim = sim().await;
    sim.add_service(AC_B, ZS, ZE, WW_B);
    sim.set_variable(AC_B, ZS, ZE, "CONVERSATION_TRANSFER_TIMEOUT", Some("120"));
    let app = start(config_text_with(&sim.url(), &serverless_b())).await;
    run_for(Duration::from_secs(2)).await;
    let tr = app.shared.fleet.get("b").unwrap().taskrouter().clone();
    assert_eq!(
        (tr.transfer_timeout.seconds, tr.transfer_timeout.source),
        (120, "CONVERSATION_TRANSFER_TIMEOUT")
    );
    let a = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert_eq!(
        (a.transfer_timeout.seconds, a.transfer_timeout.source),
        (300, "transfers.timeout")
    );
    // A transfer that never ends times out after the functions' 120 s, not the default 300 s.
    let now = app.shared.clock.now_ms();
    ingest_lines(&app, "b", &[event("initiated", now, 1, "")]);
    run_for(Duration::from_secs(119)).await;
    assert_eq!(timed_out(&app, "b"), 0.0);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(timed_out(&app, "b"), 1.0);
    // A deployment that changes it is logged.
    sim.set_variable(AC_B, ZS, ZE, "CONVERSATION_TRANSFER_TIMEOUT", Some("200"));
    sim.deploy(AC_B, ZS, ZE, None);
    run_for(Duration::from_secs(30)).await;
    assert_eq!(
        app.shared.fleet.get("b").unwrap().transfer_timeout(),
        Duration::from_secs(200)
    );
    let notes: Vec<String> = app
        .shared
        .actions
        .log
        .query(Some("b"), None)
        .into_iter()
        .filter_map(|e| e.detail.filter(|d| d.starts_with("transfer timeout")))
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("2m -> 3m 20s (CONVERSATION_TRANSFER_TIMEOUT, deployment ZD")),
        "{notes:?}"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_functions_workspace_other_than_the_configured_one_is_reported() {
    let sim = sim().await;
    sim.add_service(AC_B, ZS, ZE, WW_B);
    sim.set_variable(AC_B, ZS, ZE, "TWILIO_WORKSPACE_SID", Some(WS_B));
    let app = start(config_text_with(&sim.url(), &serverless_b())).await;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(config_ok(&app, "b"), Some(1.0), "{:?}", problems(&app, "b"));
    app.shutdown().await;
    sim.set_variable(AC_B, ZS, ZE, "TWILIO_WORKSPACE_SID", Some(WS_A));
    let app = start(config_text_with(&sim.url(), &serverless_b())).await;
    run_for(Duration::from_secs(2)).await;
    let p = problems(&app, "b");
    assert_eq!(p[0].0, "workspace_mismatch", "{p:?}");
    assert!(p[0].1.contains(&format!(
        "TWILIO_WORKSPACE_SID is {WS_A}, not the configured workspace {WS_B}"
    )));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cbos_sharing_an_environment_need_their_own_distinct_workflow_variables() {
    let sim = sim().await;
    // One account runs the functions for both CBOs (the seed's multi-account deployment).
    sim.add_workflow(AC_A, WS_B, WW_B);
    sim.add_service(AC_A, ZS, ZE, WW_A);
    sim.set_variable(
        AC_A,
        ZS,
        ZE,
        "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_A",
        Some(WW_A),
    );
    let shared_env =
        format!("serverless_service_sid = \"{ZS}\"\nserverless_environment_sid = \"{ZE}\"\n");
    let text = config_text_with(&sim.url(), "")
        .replace(AC_B, AC_A)
        .replacen(
            &format!("workflow_sid = \"{WW_A}\"\n"),
            &format!("workflow_sid = \"{WW_A}\"\n{shared_env}"),
            1,
        )
        .replacen(
            &format!("workflow_sid = \"{WW_B}\"\n"),
            &format!("workflow_sid = \"{WW_B}\"\n{shared_env}"),
            1,
        );
    let app = start(text.clone()).await;
    run_for(Duration::from_secs(2)).await;
    assert!(
        problem_ids(&app, "a").is_empty(),
        "{:?}",
        problems(&app, "a")
    );
    let p = problems(&app, "b");
    assert!(
        p.iter().any(|(id, m)| id == "variable_missing"
            && m.contains("TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_B")),
        "{p:?}"
    );
    app.shutdown().await;
    // b's variable set to a's workflow: shared, on both.
    sim.set_variable(
        AC_A,
        ZS,
        ZE,
        "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_B",
        Some(WW_A),
    );
    let app = start(text).await;
    run_for(Duration::from_secs(2)).await;
    for (cbo, other) in [("a", "b"), ("b", "a")] {
        let p = problems(&app, cbo);
        assert!(
            p.iter()
                .any(|(id, m)| id == "variable_shared" && m.contains(&format!("cbo {other}'s"))),
            "{cbo}: {p:?}"
        );
    }
    app.shutdown().await;
}
