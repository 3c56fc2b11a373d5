//! Post-deploy validation windows as timelines on tokio's paused clock, and `transfer-guard
//! validate` as a process against a test daemon.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::event::parse_line;
use transfer_guard::sim::twilio::SimTwilio;
use transfer_guard::validation::{State, Validation};

const MIN: Duration = Duration::from_secs(60);

fn ingest(app: &App, lines: Vec<String>) {
    let events = lines.iter().map(|l| parse_line(l).unwrap()).enumerate();
    let mut rejected = Vec::new();
    let now = app.shared.clock.now_ms();
    app.shared
        .fleet
        .get("a")
        .unwrap()
        .ingest(events, now, &mut rejected);
    assert!(rejected.is_empty(), "{rejected:?}");
}

/// A transfer of cbo a that started 5 s ago: completed in 3 s, or failed as `error`.
fn transfer(app: &App, n: u32, error: Option<&str>) {
    let t = app.shared.clock.now_ms() - 5_000;
    let id = format!(r#","transfer_id":"t{n}""#);
    let end = match error {
        None => event("completed", t + 3_000, n, &id),
        Some(e) => event("failed", t + 500, n, &format!("{id},\"error\":{e}")),
    };
    ingest(app, vec![event("initiated", t, n, &id), end]);
}

fn window(app: &App, id: &str) -> Validation {
    app.shared.validations.get(id).unwrap()
}

fn begin(app: &App, duration: Duration) -> String {
    let now = app.shared.clock.now_ms();
    app.shared
        .validations
        .start("a", "ZD1", duration, 20, "api", now)
        .unwrap()
        .id
}

/// Healthy traffic, one transfer every 10 s, for `d`.
async fn healthy_for(app: &App, d: Duration, n: &mut u32) {
    for _ in 0..d.as_secs() / 10 {
        *n += 1;
        transfer(app, *n, None);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_window_over_healthy_traffic_passes_at_its_end_and_not_before() {
    let app = start_at(&config_text(""), T0).await;
    let id = begin(&app, 15 * MIN);
    let mut n = 0;
    healthy_for(&app, 15 * MIN - Duration::from_secs(10), &mut n).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        window(&app, &id).state,
        State::Running,
        "not before its end"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Passed, "{v:?}");
    let success = v
        .criteria
        .iter()
        .find(|c| c.name == "success_rate")
        .unwrap();
    // The first transfer completed 2 s before the window opened: it is not the deployment's.
    assert_eq!(success.value, "100.0 % of 88");
    let m = app.shared.metrics.render();
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_validation_state{cbo="a",state="passed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_validation_state{cbo="a",state="running"}"#
        ),
        Some(0.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_bad_request_inside_the_window_fails_it() {
    let app = start_at(&config_text(""), T0).await;
    let id = begin(&app, 15 * MIN);
    let mut n = 0;
    healthy_for(&app, 3 * MIN, &mut n).await;
    transfer(
        &app,
        999,
        Some(r#"{"message":"TaskRouter error: Bad Request"}"#),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Failed);
    assert_eq!(v.reason.as_deref(), Some("missed: bad_requests"));
    let bad = v
        .criteria
        .iter()
        .find(|c| c.name == "bad_requests")
        .unwrap();
    assert_eq!((bad.value.as_str(), bad.threshold.as_str()), ("1", "0"));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn three_transfers_in_fifteen_minutes_are_inconclusive() {
    let app = start_at(&config_text(""), T0).await;
    let id = begin(&app, 15 * MIN);
    for n in 0..3 {
        tokio::time::sleep(MIN).await;
        transfer(&app, n, None);
        tokio::time::sleep(4 * MIN).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Inconclusive, "{v:?}");
    assert_eq!(v.reason.as_deref(), Some("3 of the 20 transfers needed"));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_rollback_trigger_at_minute_four_fails_the_window_at_minute_four() {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    for (ac, ws, ww) in [
        (
            "AC0000000000000000000000000000000a",
            "WS0000000000000000000000000000000a",
            "WW0000000000000000000000000000000a",
        ),
        (
            "AC0000000000000000000000000000000b",
            "WS0000000000000000000000000000000b",
            "WW0000000000000000000000000000000b",
        ),
    ] {
        sim.add_account(ac, "twilio-secret");
        sim.add_workflow(ac, ws, ww);
    }
    let text = config_text_with(&sim.url(), "").replacen(
        "flex_url",
        "poll_interval = \"5s\"\nflex_url",
        1,
    );
    let app = start_at(&text, T0).await;
    let id = begin(&app, 15 * MIN);
    let mut n = 0;
    healthy_for(&app, 4 * MIN, &mut n).await;
    assert_eq!(window(&app, &id).state, State::Running);
    sim.remove_workflow(
        "AC0000000000000000000000000000000a",
        "WS0000000000000000000000000000000a",
        "WW0000000000000000000000000000000a",
    );
    healthy_for(&app, 30 * Duration::from_secs(1), &mut n).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Failed, "{v:?}");
    assert_eq!(
        v.reason.as_deref(),
        Some("rollback trigger: config_corruption breached")
    );
    let ended_after = Duration::from_millis((v.end_ms - v.start_ms) as u64);
    assert!(
        ended_after >= 4 * MIN && ended_after < 5 * MIN,
        "ended {ended_after:?} in"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_deployment_on_twilio_starts_a_window_by_itself() {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    let (ac, ws, ww) = (
        "AC0000000000000000000000000000000a",
        "WS0000000000000000000000000000000a",
        "WW0000000000000000000000000000000a",
    );
    let (zs, ze) = (
        "ZS0000000000000000000000000000000a",
        "ZE0000000000000000000000000000000a",
    );
    sim.add_account(ac, "twilio-secret");
    sim.add_workflow(ac, ws, ww);
    sim.add_account("AC0000000000000000000000000000000b", "twilio-secret");
    sim.add_service(ac, zs, ze, ww);
    let text = config_text_with(&sim.url(), "").replacen(
        &format!("workflow_sid = \"{ww}\"\n"),
        &format!("workflow_sid = \"{ww}\"\nserverless_service_sid = \"{zs}\"\nserverless_environment_sid = \"{ze}\"\n"),
        1,
    );
    let app = start_at(&text, T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        app.shared.validations.list(Some("a")).is_empty(),
        "the deployment there at start is not new"
    );
    let d = sim.deploy(ac, zs, ze, None);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let started = app.shared.validations.list(Some("a"));
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(
        (
            started[0].deployment.as_str(),
            started[0].started_by.as_str()
        ),
        (d.sid.as_str(), "deployment_seen")
    );
    assert_eq!(started[0].duration, 15 * MIN);
    let baseline = app
        .shared
        .fleet
        .get("a")
        .unwrap()
        .taskrouter()
        .baseline
        .clone()
        .unwrap();
    assert_eq!(
        baseline.deployment.as_deref(),
        Some(d.sid.as_str()),
        "the baseline is taken at that deployment"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_window_running_through_a_restart_finishes_correctly() {
    let dir = tempfile::tempdir().unwrap().keep();
    let text = config_text_in(Path::new(&dir), NO_TWILIO, "");
    let app = start_at(&text, T0).await;
    let id = begin(&app, 15 * MIN);
    let mut n = 0;
    healthy_for(&app, 5 * MIN, &mut n).await;
    let before_restart = n;
    app.shutdown().await;

    let app = start_at(&text, T0 + 5 * 60_000).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Running, "still there after the restart");
    healthy_for(&app, 10 * MIN + Duration::from_secs(10), &mut n).await;
    let v = window(&app, &id);
    assert_eq!(v.state, State::Passed, "{v:?}");
    let decided: u32 = v.criteria[0]
        .value
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        decided > before_restart + 55,
        "counts from both sides of the restart: {decided}"
    );
    app.shutdown().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_transfer-guard");

async fn validate_cli(url: &str, args: &[&str], token: &str) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("validate")
        .args(["--server", url])
        .args(args)
        .env("TOKEN", token)
        .args(["--token-env", "TOKEN"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn post(url: &str, lines: Vec<String>) {
    assert_eq!(post_ndjson(url, TOKEN_A, &lines).await.status(), 202);
}

/// Transfers of cbo a stamped `ahead_ms` from now (the window measures from its start).
fn transfers(count: u32, ahead_ms: i64, error: Option<&str>) -> Vec<String> {
    let t = chrono::Utc::now().timestamp_millis() + ahead_ms;
    let mut lines = Vec::new();
    for n in 0..count {
        let id = format!(r#","transfer_id":"c{n}-{t}""#);
        lines.push(event("initiated", t, n, &id));
        lines.push(match error {
            None => event("completed", t + 1_000, n, &id),
            Some(e) => event("failed", t + 500, n, &format!("{id},\"error\":{e}")),
        });
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validate_command_exits_0_1_2_3_and_prints_each_criterion() {
    let app = App::start(config("[validation]\nmin_samples = 5\n"))
        .await
        .unwrap();
    let url = app.url();

    // Passed: healthy transfers inside the window.
    post(&url, transfers(10, 1_500, None)).await;
    let (code, stdout, stderr) = validate_cli(
        &url,
        &["--cbo", "a", "--deployment", "ZDgood", "--duration", "4s"],
        ADMIN,
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("PASSED"), "{stdout}");
    for (name, threshold) in [
        ("success_rate", "> 95 %"),
        ("bad_requests", "0"),
        ("cold_completion_p95", "< 10 s"),
        ("notification_p95", "< 5 s"),
        ("history_preserved", "100 %"),
        ("configuration_sound", "sound"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{stdout}"));
        assert!(line.contains(threshold), "{line}");
    }
    assert!(stdout.contains("100.0 % of 10"), "{stdout}");
    assert!(stderr.contains("started validation"), "{stderr}");

    // Failed: a Bad Request inside the window, as JSON.
    post(&url, transfers(1, 1_000, Some(r#"{"status":400}"#))).await;
    let (code, stdout, _) = validate_cli(
        &url,
        &[
            "--cbo",
            "a",
            "--deployment",
            "ZDbad",
            "--duration",
            "30s",
            "--json",
        ],
        ADMIN,
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["state"], "failed");
    assert_eq!(v["criteria"][1]["name"], "bad_requests");
    assert_eq!(v["criteria"][1]["verdict"], "missed");

    // Inconclusive: no transfers at all (cbo b).
    let (code, stdout, _) = validate_cli(
        &url,
        &["--cbo", "b", "--deployment", "ZDquiet", "--duration", "2s"],
        ADMIN,
    )
    .await;
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.contains("INCONCLUSIVE") && stdout.contains("of the 5 transfers needed"),
        "{stdout}"
    );

    // Could not run: a CBO's token may not start one; a wrong token; no daemon.
    let (code, _, stderr) = validate_cli(&url, &["--cbo", "a", "--deployment", "x"], TOKEN_A).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
    let (code, _, stderr) = validate_cli(&url, &["--cbo", "a", "--deployment", "x"], "wrong").await;
    assert_eq!((code, stderr.contains("401")), (Some(3), true), "{stderr}");
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (code, _, stderr) = validate_cli(&gone, &["--cbo", "a", "--deployment", "x"], ADMIN).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");

    // Following an existing window with the CBO's own token.
    let first = app.shared.validations.list(Some("a"))[0].id.clone();
    let (code, stdout, _) = validate_cli(&url, &["--id", &first], TOKEN_A).await;
    assert_eq!(code, Some(0), "{stdout}");
    app.shutdown().await;
}
