//! An action never makes production worse: a Twilio that applies a rollback but answers late
//! or with a 502, a second breach after a rollback, the rollback's own validation window, a
//! restart with an intent in flight, a decision log that cannot be written, a configuration
//! typo, a transient 404, and a failed validation window, as timelines on tokio's paused clock
//! against the simulated Twilio.

mod common;

use std::time::Duration;

use common::story::*;
use common::*;
use transfer_guard::App;
use transfer_guard::decisions::{Entry, Kind};
use transfer_guard::sim::twilio::{Fault, SimTwilio};
use transfer_guard::validation::State;

/// cbo a rolling back its Serverless build only, Twilio requests timing out after 2 s.
fn serverless_only(sim: &SimTwilio, state_dir: &std::path::Path, extra: &str) -> String {
    text(state_dir, sim, "", extra)
        .replacen(
            "rollback = [\"serverless\", \"plugin_release\"]",
            "rollback = [\"serverless\"]",
            1,
        )
        .replacen("[twilio]\n", "[twilio]\nrequest_timeout = \"2s\"\n", 1)
}

/// Healthy traffic, then a Bad Request every minute from minute 2 on, for `seconds`.
async fn bad_requests(app: &App, seconds: u64, n: &mut u32) {
    run(app, seconds, |app, step| {
        *n += 1;
        transfer(app, "a", *n, !(step >= 12 && step.is_multiple_of(6)));
    })
    .await;
}

fn log(app: &App) -> Vec<Entry> {
    app.shared.actions.log.query(Some("a"), None)
}

fn of(entries: &[Entry], kind: Kind, integration: &str) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| e.kind == kind && e.integration.as_deref() == Some(integration))
        .cloned()
        .collect()
}

/// One rollback whose answer never came back usable: exactly one deployment, of the last
/// known-good build, one intent and one result joined by key, no second POST.
async fn one_rollback_despite(fault: Fault) {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let good = before[0].build_sid.clone();
    sim.inject_on("POST", "/Deployments", fault, Some(1));
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    let mut n = 0;
    bad_requests(&app, 600, &mut n).await;
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(after.len(), before.len() + 1, "exactly one deployment");
    assert_eq!(after.last().unwrap().build_sid, good);
    let entries = log(&app);
    let intents = of(&entries, Kind::Intent, "serverless");
    let results: Vec<Entry> = of(&entries, Kind::Action, "serverless")
        .into_iter()
        .filter(|e| e.result.as_deref() != Some("retrying"))
        .collect();
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].result.as_deref(), Some("fired"));
    assert_eq!(results[0].key, intents[0].key);
    assert!(
        results[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("took effect"),
        "{:?}",
        results[0].detail
    );
    assert_eq!(intents[0].evidence["plan"]["target"], good.as_str());
    // Up to ten of the failing conversations, newest first, with their errors.
    let failing = intents[0].evidence["breach"]["failing_conversations"]
        .as_array()
        .unwrap();
    assert!((1..=10).contains(&failing.len()), "{failing:?}");
    assert_eq!(
        failing[0]["error"],
        "TaskRouter error: Bad Request (status 400)"
    );
    assert!(
        failing[0]["conversation_sid"]
            .as_str()
            .unwrap()
            .starts_with("CH")
    );
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_rollback_twilio_applies_but_answers_after_the_timeout_is_one_deployment_logged_once() {
    one_rollback_despite(Fault::ApplyThenDelay(Duration::from_secs(30))).await;
}

#[tokio::test(start_paused = true)]
async fn a_rollback_twilio_applies_but_answers_502_is_one_deployment_logged_once() {
    one_rollback_despite(Fault::ApplyThenStatus {
        status: 502,
        code: 20502,
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_second_breach_on_the_rolled_back_deployment_never_redeploys_the_bad_build() {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let (good, bad) = (before[0].build_sid.clone(), before[1].build_sid.clone());
    // A short cooldown: it runs out while the failures go on.
    let text = serverless_only(&sim, &fresh_dir(), "").replacen(
        "dry_run = false\n",
        "dry_run = false\ncooldown = \"1m\"\n",
        1,
    );
    let app = start_at(&text, T0).await;
    let mut n = 0;
    // The failures go on after the rollback: the build is not their cause.
    bad_requests(&app, 20 * 60, &mut n).await;
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(after.len(), before.len() + 1, "one rollback: {after:?}");
    assert_eq!(after.last().unwrap().build_sid, good);
    assert!(after[before.len()..].iter().all(|d| d.build_sid != bad));
    let known = app
        .shared
        .actions
        .known_view("a", transfer_guard::actions::known::Artifact::Build);
    assert!(known.bad.contains(&bad) && known.own.contains(&good));
    // Instead of guessing: paged, and transfers switched off.
    let entries = log(&app);
    assert!(
        entries.iter().any(|e| e.kind == Kind::Action
            && e.action.as_deref() == Some("alert")
            && e.evidence["no_rollback_target"]
                .as_str()
                .is_some_and(|w| w.contains("rolled back to it"))),
        "{entries:#?}"
    );
    assert!(!app.shared.actions.switch("a").unwrap().transfers_enabled);
    assert_eq!(actions(&app, "a", "flex_flag", "fired"), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_validation_window_of_a_rollback_is_judged_on_traffic_after_it_only() {
    let sim = sim().await;
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    let mut n = 0;
    let mut landed = None;
    // Bad Requests until the rollback, healthy transfers after it.
    for step in 0..150u64 {
        n += 1;
        let failing = landed.is_none() && step >= 12 && step.is_multiple_of(6);
        transfer(&app, "a", n, !failing);
        tokio::time::sleep(Duration::from_secs(10)).await;
        if landed.is_none() {
            landed = of(&log(&app), Kind::Action, "serverless")
                .iter()
                .find(|e| e.result.as_deref() == Some("fired"))
                .map(|e| e.at_ms);
        }
    }
    let landed = landed.expect("rolled back");
    let rollback = sim
        .deployments(AC_A, ZS_A, ZE_A)
        .last()
        .unwrap()
        .sid
        .clone();
    let windows = app.shared.validations.list(Some("a"));
    let v = windows
        .iter()
        .find(|v| v.deployment == rollback)
        .expect("the rollback's deployment gets a window");
    assert!(v.start_ms >= landed - 1_000, "{} vs {landed}", v.start_ms);
    assert_eq!(v.state, State::Passed, "{v:#?}");
    assert_eq!(v.measured.bad_requests + v.carried.bad_requests, 0);
    // Having passed, the build it runs is known good.
    let known = app
        .shared
        .actions
        .known_view("a", transfer_guard::actions::known::Artifact::Build);
    let live = sim
        .deployments(AC_A, ZS_A, ZE_A)
        .last()
        .unwrap()
        .build_sid
        .clone();
    assert!(known.good.contains(&live));
    app.shutdown().await;
}

/// An intent as the pipeline writes it before its POST, its first attempt failing (a
/// timeout: `retrying`), then a crash while it waited to look again: no result.
fn crashed_intent(state_dir: &std::path::Path, target: &str, replacing: &str, at_ms: i64) {
    let log = transfer_guard::decisions::DecisionLog::open(state_dir).unwrap();
    let mut e = Entry::new("a", Kind::Intent, at_ms);
    e.rule = Some("bad_requests".into());
    e.action = Some("rollback".into());
    e.integration = Some("serverless".into());
    e.deployment = Some("ZD-bad".into());
    e.key = Some(format!("a-rollback-serverless-{at_ms}"));
    e.evidence = serde_json::json!({
        "plan": {"artifact": "build", "target": target, "replacing": replacing},
        "breach": {"minutes_with_bad_requests": 3},
    });
    let mut retrying = e.clone();
    log.append(e).unwrap();
    retrying.kind = Kind::Action;
    retrying.at_ms = at_ms + 1_000;
    retrying.result = Some("retrying".into());
    retrying.attempt = Some(1);
    retrying.detail = Some("environment deployments: no answer within 1s".into());
    log.append(retrying).unwrap();
}

async fn post_deployment(sim: &SimTwilio, build: &str) {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/Services/{ZS_A}/Environments/{ZE_A}/Deployments",
            sim.url()
        ))
        .basic_auth(AC_A, Some("twilio-secret"))
        .form(&[("BuildSid", build)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
}

#[tokio::test(start_paused = true)]
async fn an_intent_twilio_applied_before_a_crash_is_settled_as_fired_and_never_sent_again() {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let (good, bad) = (before[0].build_sid.clone(), before[1].build_sid.clone());
    let dir = fresh_dir();
    crashed_intent(&dir, &good, &bad, T0 - 2_000);
    // Twilio applied it; the daemon died before it heard.
    post_deployment(&sim, &good).await;
    let count = sim.deployments(AC_A, ZS_A, ZE_A).len();
    let app = start_at(&serverless_only(&sim, &dir, ""), T0).await;
    let mut n = 0;
    bad_requests(&app, 600, &mut n).await;
    assert_eq!(
        sim.deployments(AC_A, ZS_A, ZE_A).len(),
        count,
        "nothing sent again"
    );
    let results: Vec<Entry> = of(&log(&app), Kind::Action, "serverless")
        .into_iter()
        .filter(|e| e.result.as_deref() != Some("retrying"))
        .collect();
    assert_eq!(results.len(), 1, "{results:#?}");
    assert_eq!(results[0].result.as_deref(), Some("fired"));
    assert!(
        results[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("settled at start: took effect")
    );
    let known = app
        .shared
        .actions
        .known_view("a", transfer_guard::actions::known::Artifact::Build);
    assert!(known.bad.contains(&bad) && known.own.contains(&good));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_intent_that_never_reached_twilio_is_settled_as_not_done_and_the_breach_rolls_back_once()
{
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let (good, bad) = (before[0].build_sid.clone(), before[1].build_sid.clone());
    let dir = fresh_dir();
    crashed_intent(&dir, &good, &bad, T0 - 2_000);
    let app = start_at(&serverless_only(&sim, &dir, ""), T0).await;
    let mut n = 0;
    bad_requests(&app, 600, &mut n).await;
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one rollback, by the new decision: {:#?}",
        log(&app)
            .iter()
            .filter(|e| e.kind != Kind::State)
            .collect::<Vec<_>>()
    );
    assert_eq!(after.last().unwrap().build_sid, good);
    let results: Vec<_> = of(&log(&app), Kind::Action, "serverless")
        .into_iter()
        .filter(|e| e.result.as_deref() != Some("retrying"))
        .map(|e| (e.result.unwrap(), e.detail.unwrap()))
        .collect();
    assert!(results[0].1.contains("did not take effect"), "{results:#?}");
    assert_eq!(results.iter().filter(|(r, _)| r == "fired").count(), 1);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_workflow_sid_typo_present_from_the_start_is_config_mismatch_and_nothing_fires() {
    let sim = sim().await;
    let typo = "WW00000000000000000000000000000bad";
    let text = serverless_only(&sim, &fresh_dir(), "").replacen(
        &format!("workflow_sid = \"{WW_A}\"\nserverless"),
        &format!("workflow_sid = \"{typo}\"\nserverless"),
        1,
    );
    let app = start_at(&text, T0).await;
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    assert!(posts(&sim).is_empty(), "{:?}", posts(&sim));
    assert_ne!(state(&app, "a", "config_corruption"), "breached");
    let m = metrics(&app);
    assert_eq!(
        metric(&m, r#"transfer_guard_config_mismatch{cbo="a"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"transfer_guard_config_mismatch{cbo="b"}"#),
        Some(0.0)
    );
    let tr = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert!(
        tr.mismatch
            .iter()
            .any(|p| p.id() == "not_found" || p.id() == "variable_mismatch"),
        "{tr:?}"
    );
    assert!(app.shared.actions.switch("a").unwrap().transfers_enabled);
    // The same typo with failing transfers: the breach is paged, the rollback held.
    let mut n = 0;
    bad_requests(&app, 600, &mut n).await;
    assert_eq!(state(&app, "a", "bad_requests"), "breached");
    assert!(posts(&sim).is_empty());
    assert!(suppressed_because(
        &app,
        "a",
        "config_mismatch (present since"
    ));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_single_404_between_good_polls_does_nothing() {
    let sim = sim().await;
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    sim.inject(
        &format!("/Workflows/{WW_A}"),
        Fault::Status {
            status: 404,
            code: 20404,
        },
        Some(1),
    );
    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    assert!(posts(&sim).is_empty());
    let states: Vec<_> = log(&app)
        .iter()
        .filter(|e| e.rule.as_deref() == Some("config_corruption"))
        .map(|e| e.to.clone().unwrap_or_default())
        .collect();
    assert!(!states.contains(&"breached".to_string()), "{states:?}");
    assert!(
        states.contains(&"inconclusive".to_string()),
        "it was seen: {states:?}"
    );
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_validation_window_rolls_back_once() {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let good = before[0].build_sid.clone();
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let deployed = sim.deploy(AC_A, ZS_A, ZE_A, None);
    let mut n = 0;
    // 93 % of transfers complete: no rule breaches (90 %), but the window wants 95 %.
    for step in 0..200u64 {
        n += 1;
        transfer_failing_with(&app, "a", n, (step % 14 == 13).then_some(AGENT_UNAVAILABLE));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let v = app
        .shared
        .validations
        .list(Some("a"))
        .into_iter()
        .find(|v| v.deployment == deployed.sid)
        .expect("a window for the deployment");
    assert_eq!(v.state, State::Failed, "{v:#?}");
    assert_ne!(state(&app, "a", "success_rate"), "breached");
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(after.len(), before.len() + 2, "the deploy and one rollback");
    assert_eq!(after.last().unwrap().build_sid, good);
    let fired = of(&log(&app), Kind::Action, "serverless");
    assert_eq!(
        fired
            .iter()
            .filter(|e| e.result.as_deref() == Some("fired"))
            .count(),
        1
    );
    assert_eq!(fired[0].evidence["breach"]["validation"], v.id.as_str());
    app.shutdown().await;
}

/// A 256 KiB tmpfs, unmounted on drop; `None` (after saying why) where this user cannot mount,
/// unless `TRANSFER_GUARD_REQUIRE_TOOLS=1` (as `.ci/run`, which runs as root, sets).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let message = "a full state disk: cannot mount a tmpfs (needs root)";
            if std::env::var("TRANSFER_GUARD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
                panic!("{message}");
            }
            eprintln!("SKIPPED {message}");
            return None;
        }
        Some(SmallDisk(dir))
    }

    /// Writes a file until the disk refuses another byte.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0u8; 1]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

async fn http(
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(start_paused = true)]
async fn with_the_state_disk_full_nothing_fires_readyz_is_503_on_call_is_refused_until_it_has_room()
{
    let Some(disk) = SmallDisk::mount() else {
        return;
    };
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A).len();
    // The disk is full before the daemon writes anything: every append needs room it has not
    // got (a small one cannot slip into a block the log already holds).
    let filler = disk.fill();
    let app = start_at(&serverless_only(&sim, disk.0.path(), ""), T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut n = 0;
    bad_requests(&app, 600, &mut n).await;
    assert_eq!(state(&app, "a", "bad_requests"), "breached");
    assert_eq!(
        sim.deployments(AC_A, ZS_A, ZE_A).len(),
        before,
        "nothing fired unrecorded"
    );
    let (status, body) = http(reqwest::Method::GET, format!("{}/readyz", app.url()), None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("writable decision log"),
        "{body}"
    );
    let m = metrics(&app);
    assert_eq!(
        metric(&m, "transfer_guard_decision_log_writable{}"),
        Some(0.0)
    );
    assert!(metric(&m, "transfer_guard_decision_log_errors_total{}").unwrap() >= 1.0);
    assert!(actions(&app, "a", "serverless", "suppressed") >= 1.0);
    let (status, body) = http(
        reqwest::Method::PUT,
        format!("{}/v1/switch/a", app.url()),
        Some(r#"{"transfers_enabled": false}"#),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        app.shared.actions.switch("a").unwrap().transfers_enabled,
        "the change was not made"
    );
    let (status, _) = http(
        reqwest::Method::POST,
        format!("{}/v1/cbos/a/ack", app.url()),
        None,
    )
    .await;
    assert_eq!(status, 503);
    // Room again: the log says so, readiness returns, and the breach still standing acts.
    std::fs::remove_file(filler).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, body) = http(reqwest::Method::GET, format!("{}/readyz", app.url()), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        metric(&metrics(&app), "transfer_guard_decision_log_writable{}"),
        Some(1.0)
    );
    let entries = log(&app);
    assert_eq!(
        sim.deployments(AC_A, ZS_A, ZE_A).len(),
        before + 1,
        "{:#?}",
        entries
            .iter()
            .filter(|e| e.kind != Kind::State)
            .map(|e| (&e.kind, &e.rule, &e.result, &e.detail))
            .collect::<Vec<_>>()
    );
    let intent = of(&entries, Kind::Intent, "serverless");
    assert_eq!(intent.len(), 1, "the rollback that fired has its intent");
    let all = app.shared.actions.log.query(None, None);
    assert!(
        all.iter().any(|e| e.kind == Kind::Note
            && e.detail.as_deref().unwrap_or("").contains("writable again"))
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_problem_that_appears_while_the_daemon_is_down_is_corruption_after_the_restart() {
    let sim = sim().await;
    let dir = fresh_dir();
    let text = serverless_only(&sim, &dir, "");
    let app = start_at(&text, T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    app.shutdown().await;
    // While it is down, a deploy resets the functions' workflow variable.
    sim.deploy(AC_A, ZS_A, ZE_A, Some("WW00000000000000000000000000000bad"));
    let app = start_at(&text, T0 + 60_000).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    // It was sound when the daemon stopped: this is news, not the guard's own configuration.
    let tr = app.shared.fleet.get("a").unwrap().taskrouter().clone();
    assert!(tr.mismatch.is_empty(), "{:?}", tr.mismatch);
    assert_eq!(
        metric(&metrics(&app), r#"transfer_guard_config_mismatch{cbo="a"}"#),
        Some(0.0)
    );
    let breached = log(&app).iter().any(|e| {
        e.rule.as_deref() == Some("config_corruption") && e.to.as_deref() == Some("breached")
    });
    assert!(breached);
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    app.shutdown().await;
}

async fn report(app: &App, token: &str, body: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/reports", app.url()))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(start_paused = true)]
async fn agent_reports_from_two_cbos_within_fifteen_minutes_breach_cross_cbo() {
    let sim = sim().await;
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Bad input is refused, and says what was wrong.
    assert_eq!(
        report(&app, "nobody", r#"{"conversation_sid": "x"}"#)
            .await
            .0,
        401
    );
    let (status, body) = report(&app, TOKEN_A, r#"{"conversation_sid": "CH123"}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("conversation_sid:"),
        "{body}"
    );
    // One CBO's agent: counted, not yet a shared cause.
    let (status, _) = report(
        &app,
        TOKEN_A,
        &format!(
            r#"{{"conversation_sid": "{}", "note": "transfer to billing spins forever"}}"#,
            ch(1)
        ),
    )
    .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state(&app, "a", "cross_cbo"), "ok");
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_agent_reports_total{cbo="a"}"#
        ),
        Some(1.0)
    );
    // Ten minutes later another CBO's agent reports too: within 15 minutes, two CBOs.
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    let (status, _) = report(
        &app,
        TOKEN_B,
        &format!(r#"{{"conversation_sid": "{}"}}"#, ch(2)),
    )
    .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Both breached (a, deployed a minute before the daemon started, is then rolled back,
    // and judged afresh: its reports were about the build it replaced).
    for cbo in ["a", "b"] {
        assert!(
            app.shared
                .actions
                .log
                .query(Some(cbo), None)
                .iter()
                .any(|e| {
                    e.rule.as_deref() == Some("cross_cbo") && e.to.as_deref() == Some("breached")
                }),
            "{cbo}"
        );
    }
    let breach = app
        .shared
        .actions
        .log
        .query(Some("a"), None)
        .into_iter()
        .find(|e| e.rule.as_deref() == Some("cross_cbo") && e.to.as_deref() == Some("breached"));
    let evidence = &breach.expect("logged").evidence["measured"];
    let reports = evidence["agent_reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "{evidence}");
    assert_eq!(reports[0]["reports"][0]["conversation_sid"], ch(1).as_str());
    assert_eq!(
        reports[0]["reports"][0]["note"],
        "transfer to billing spins forever"
    );
    assert!(actions(&app, "a", "alert", "fired") >= 1.0, "on-call paged");
    // Nothing fires twice on those reports: one rollback, no disable.
    tokio::time::sleep(Duration::from_secs(6 * 60)).await;
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    assert!(app.shared.actions.switch("a").unwrap().transfers_enabled);
    assert_eq!(state(&app, "a", "cross_cbo"), "ok");
    assert_eq!(state(&app, "b", "cross_cbo"), "ok");
    app.shutdown().await;
}

/// One transfer of cbo a, failing (not a Bad Request: agent unavailable) or not.
fn quiet_transfer(app: &App, n: u32, ok: bool) {
    transfer_failing_with(app, "a", n, (!ok).then_some(AGENT_UNAVAILABLE));
}

#[tokio::test(start_paused = true)]
async fn nine_of_nine_failing_over_sixteen_minutes_at_a_quiet_cbo_rolls_back() {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    // A total outage at a CBO with a transfer every two minutes.
    for n in 1..=9 {
        quiet_transfer(&app, n, false);
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    let breach = log(&app)
        .into_iter()
        .find(|e| e.rule.as_deref() == Some("success_rate") && e.to.as_deref() == Some("breached"))
        .expect("success_rate breached");
    let measured = &breach.evidence["measured"];
    assert_eq!(measured["method"], "wilson_95");
    assert!(measured["n"].as_u64().unwrap() >= 5, "{measured}");
    assert_eq!(measured["successes"], 0);
    assert!(measured["bound"].as_f64().unwrap() < 0.9);
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(after.len(), before.len() + 1, "rolled back");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_failures_of_three_and_one_canceled_task_of_three_decide_nothing_and_say_what_is_missing()
 {
    let sim = sim().await;
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    for (n, ok) in [(1, false), (2, true), (3, false)] {
        quiet_transfer(&app, n, ok);
        tokio::time::sleep(Duration::from_secs(4 * 60)).await;
    }
    // TaskRouter: 1 of 3 tasks canceled in the last five minutes.
    sim.record_tasks(
        AC_A,
        WW_A,
        transfer_guard::sim::twilio::TaskEvent::Entered,
        3,
    );
    sim.record_tasks(
        AC_A,
        WW_A,
        transfer_guard::sim::twilio::TaskEvent::Canceled,
        1,
    );
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    assert!(posts(&sim).is_empty(), "{:?}", posts(&sim));
    let states = app.shared.engine().states("a");
    assert_eq!(states["success_rate"].state.as_str(), "inconclusive");
    assert_eq!(
        states["success_rate"].evidence["missing"],
        "3 of the 5 finished transfers needed"
    );
    assert_eq!(
        states["taskrouter_error_rate"].state.as_str(),
        "inconclusive"
    );
    assert_eq!(
        states["taskrouter_error_rate"].evidence["missing"],
        "3 of the 20 tasks entered needed"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_rollback_waits_for_its_result_within_the_drain() {
    let sim = sim().await;
    // Twilio takes 1.5 s to answer the redeploy (within the 2 s request timeout).
    sim.inject_on(
        "POST",
        "/Deployments",
        Fault::Delay(Duration::from_millis(1_500)),
        Some(1),
    );
    let app = start_at(&serverless_only(&sim, &fresh_dir(), ""), T0).await;
    let mut n = 0;
    // Until the rollback is under way: its intent is on record, its answer is not.
    // Half-second steps: a transfer every 10 s, a Bad Request every minute from minute 2 on.
    let mut step: u32 = 0;
    while app.shared.actions.in_flight() == 0 && step < 2_400 {
        if step.is_multiple_of(20) {
            n += 1;
            transfer(&app, "a", n, !(step >= 240 && step.is_multiple_of(120)));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        step += 1;
    }
    assert_eq!(app.shared.actions.in_flight(), 1, "no rollback under way");
    let shared = app.shared.clone();
    app.shutdown().await;
    // The stop waited for the answer: the result is on record next to its intent.
    let entries = shared.actions.log.query(Some("a"), None);
    let fired = of(&entries, Kind::Action, "serverless");
    assert_eq!(of(&entries, Kind::Intent, "serverless").len(), 1);
    assert!(
        fired.iter().any(|e| e.result.as_deref() == Some("fired")),
        "{fired:?}"
    );
    assert_eq!(shared.actions.in_flight(), 0);
}
