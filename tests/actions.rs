//! Rules and actions as timelines on tokio's paused clock, against the simulated Twilio: each
//! rollback trigger fires once with its effect visible at Twilio; nothing fires on thin or
//! missing evidence; dry run; restarts; failing webhooks; on-call controls.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::story::*;
use common::*;
use serde_json::Value;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::config::check_str;
use transfer_guard::decisions::Kind;
use transfer_guard::sim::twilio::{Fault, SimTwilio, TaskEvent};

#[tokio::test(start_paused = true)]
async fn bad_requests_in_three_minutes_roll_back_once_to_the_previous_build_and_release() {
    let sim = sim().await;
    let before = sim.deployments(AC_A, ZS_A, ZE_A);
    let (first_build, current_build) = (before[0].build_sid.clone(), before[1].build_sid.clone());
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    let mut n = 0;
    // Healthy traffic, one Bad Request a minute from minute 2 on.
    run(&app, 600, |app, step| {
        n += 1;
        transfer(app, "a", n, !(step >= 12 && step.is_multiple_of(6)));
    })
    .await;
    assert_eq!(state(&app, "a", "bad_requests"), "breached");
    let after = sim.deployments(AC_A, ZS_A, ZE_A);
    assert_eq!(after.len(), before.len() + 1, "exactly one redeploy");
    assert_eq!(after.last().unwrap().build_sid, first_build);
    assert_ne!(first_build, current_build);
    let releases = sim.releases(AC_A);
    assert_eq!(releases.len(), 3);
    assert_eq!(
        releases[2].configuration_sid, releases[0].configuration_sid,
        "v1 released again"
    );
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    assert_eq!(actions(&app, "a", "plugin_release", "fired"), 1.0);
    let fired: Vec<_> = app
        .shared
        .actions
        .log
        .query(Some("a"), None)
        .into_iter()
        .filter(|e| e.kind == Kind::Action && e.result.as_deref() == Some("fired"))
        .collect();
    assert!(
        fired
            .iter()
            .any(|e| e.rule.as_deref() == Some("bad_requests")
                && e.evidence["minutes_with_bad_requests"].as_u64() >= Some(3))
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn success_rate_at_85_percent_rolls_back_only_after_its_for() {
    let sim = sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    let mut n = 0;
    let mut pending_at = None;
    let mut fired_at = None;
    let mut prev = String::new();
    for step in 0..150u64 {
        for _ in 0..10 {
            n += 1;
            // 17 of 20 complete: 85 %; failures are agent_unavailable, not Bad Requests.
            transfer_failing_with(&app, "a", n, (n % 20 >= 17).then_some(AGENT_UNAVAILABLE));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The `for` runs from the last time the condition started holding.
        let s = state(&app, "a", "success_rate");
        if s == "pending" && prev != "pending" && fired_at.is_none() {
            pending_at = Some(step);
        }
        prev = s;
        if actions(&app, "a", "serverless", "fired") > 0.0 && fired_at.is_none() {
            fired_at = Some(step);
        }
    }
    let (pending_at, fired_at) = (pending_at.expect("went pending"), fired_at.expect("fired"));
    // 15 minutes are 90 steps of 10 s: not one step before.
    assert!(
        fired_at >= pending_at + 89,
        "pending at step {pending_at}, fired at {fired_at}"
    );
    assert!(
        fired_at <= pending_at + 91,
        "pending at step {pending_at}, fired at {fired_at}"
    );
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_taskrouter_error_rate_over_5_percent_for_15_minutes_rolls_back() {
    let sim = sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    let mut n = 0;
    run(&app, 25 * 60, |app, _| {
        n += 1;
        transfer(app, "a", n, true);
        sim.record_tasks(AC_A, WW_A, TaskEvent::Entered, 10);
        sim.record_tasks(AC_A, WW_A, TaskEvent::Canceled, 1);
    })
    .await;
    let breached = app
        .shared
        .actions
        .log
        .query(Some("a"), None)
        .into_iter()
        .any(|e| {
            e.rule.as_deref() == Some("taskrouter_error_rate")
                && e.to.as_deref() == Some("breached")
        });
    assert!(breached);
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    let m = metrics(&app);
    assert!(metric(&m, r#"transfer_guard_taskrouter_error_ratio{cbo="a"}"#).unwrap() > 0.05);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_deploy_that_resets_the_workflow_sid_is_rolled_back_and_the_configuration_recovers() {
    let sim = sim().await;
    // The current build has run for two hours: known good by Twilio's history.
    sim.age_history(AC_A, Duration::from_secs(2 * 3600));
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    let good_build = sim
        .deployments(AC_A, ZS_A, ZE_A)
        .last()
        .unwrap()
        .build_sid
        .clone();
    sim.deploy(AC_A, ZS_A, ZE_A, Some("WW00000000000000000000000000000bad"));
    // Seen on two polls in a row, then rolled back, then the next poll sees it sound.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    let redeployed = sim
        .deployments(AC_A, ZS_A, ZE_A)
        .last()
        .unwrap()
        .build_sid
        .clone();
    assert_eq!(redeployed, good_build, "the build before the bad deploy");
    let var = sim.variable(AC_A, ZS_A, ZE_A, "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID");
    assert_eq!(
        var.as_deref(),
        Some(WW_A),
        "its variables came back with it"
    );
    let log = app.shared.actions.log.query(Some("a"), None);
    let states: Vec<(&str, &str)> = log
        .iter()
        .filter(|e| e.kind == Kind::State && e.rule.as_deref() == Some("config_corruption"))
        .map(|e| (e.from.as_deref().unwrap(), e.to.as_deref().unwrap()))
        .collect();
    // Seen once (inconclusive), seen again (breached), then the rollback's deployment is
    // judged afresh; breached once only.
    assert!(
        states.starts_with(&[
            ("ok", "inconclusive"),
            ("inconclusive", "breached"),
            ("breached", "ok")
        ]),
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|(_, to)| *to == "breached").count(),
        1,
        "{states:?}"
    );
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn corruption_a_rollback_cannot_fix_disables_transfers_with_other_flex_values_untouched() {
    let sim = sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    let flex_before = sim.flex_configuration(AC_A);
    // Someone deletes the workflow in the console: no redeploy brings it back.
    sim.remove_workflow(AC_A, WS_A, WW_A);
    // Two polls in a row see the 404, then the rollback.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    assert_eq!(
        actions(&app, "a", "flex_flag", "fired"),
        0.0,
        "no disable before escalate_after"
    );
    // The rollback did not bring the workflow back: after 10 minutes, transfers go off.
    tokio::time::sleep(Duration::from_secs(11 * 60)).await;
    assert_eq!(actions(&app, "a", "flex_flag", "fired"), 1.0);
    let flex_after = sim.flex_configuration(AC_A);
    let flag = |c: &Value| {
        c["ui_attributes"]["custom_data"]["features"]["conversation_transfer"]["enabled"].clone()
    };
    assert_eq!(
        (flag(&flex_before), flag(&flex_after)),
        (Value::Bool(true), Value::Bool(false))
    );
    let mut expected = flex_before["ui_attributes"].clone();
    expected["custom_data"]["features"]["conversation_transfer"]["enabled"] = Value::Bool(false);
    assert_eq!(
        serde_json::to_string(&flex_after["ui_attributes"]).unwrap(),
        serde_json::to_string(&expected).unwrap(),
        "every other ui_attributes value, byte for byte"
    );
    let switch = app.shared.actions.switch("a").unwrap();
    assert!(!switch.transfers_enabled);
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_transfers_disabled{cbo="a"}"#
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_cbos_breached_at_once_page_and_roll_back_only_the_recently_deployed_one() {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    for (ac, ws, ww) in [(AC_A, WS_A, WW_A), (AC_B, WS_B, WW_B)] {
        sim.add_account(ac, "twilio-secret");
        sim.add_workflow(ac, ws, ww);
    }
    // b was deployed two hours ago; a is deployed just before the breach.
    sim.add_service(AC_B, ZS_B, ZE_B, WW_B);
    sim.deploy(AC_B, ZS_B, ZE_B, None);
    sim.add_service(AC_A, ZS_A, ZE_A, WW_A);
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    sim.deploy(AC_A, ZS_A, ZE_A, None);
    let b_block = format!(
        "workflow_sid = \"{WW_B}\"\nserverless_service_sid = \"{ZS_B}\"\nserverless_environment_sid = \"{ZE_B}\"\nrollback = [\"serverless\"]\n"
    );
    let text = text(&fresh_dir(), &sim, "", "").replacen(
        &format!("workflow_sid = \"{WW_B}\"\n"),
        &b_block,
        1,
    );
    let app = start_at(&text, T0 + 2 * 3600 * 1000).await;
    let b_before = sim.deployments(AC_B, ZS_B, ZE_B).len();
    let a_before = sim.deployments(AC_A, ZS_A, ZE_A).len();
    let mut n = 0;
    run(&app, 600, |app, step| {
        for cbo in ["a", "b"] {
            n += 1;
            transfer(app, cbo, n, !(step >= 12 && step.is_multiple_of(6)));
        }
    })
    .await;
    assert_eq!(state(&app, "a", "cross_cbo"), "breached");
    assert_eq!(state(&app, "b", "cross_cbo"), "breached");
    assert_eq!(
        sim.deployments(AC_A, ZS_A, ZE_A).len(),
        a_before + 1,
        "a rolled back"
    );
    assert_eq!(
        sim.deployments(AC_B, ZS_B, ZE_B).len(),
        b_before,
        "b left alone"
    );
    // Paged when cross_cbo breached, and again when failures went on after a's rollback (a
    // shared cause): the rollback itself is not "a recent deployment" to roll back again.
    assert!(
        actions(&app, "a", "alert", "fired") >= 1.0,
        "on-call paged for a"
    );
    assert!(app.shared.actions.switch("a").unwrap().transfers_enabled);
    assert!(
        actions(&app, "b", "alert", "fired") >= 1.0,
        "on-call paged for b"
    );
    assert!(suppressed_because(
        &app,
        "b",
        "no deployment younger than 1h"
    ));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn two_failures_out_of_three_transfers_at_night_stay_inconclusive() {
    let sim = sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    let t = now(&app);
    ingest(
        &app,
        "a",
        vec![
            event("initiated", t, 1, r#","transfer_id":"n1""#),
            event(
                "failed",
                t + 500,
                1,
                r#","transfer_id":"n1","error":{"code":20001}"#,
            ),
            event("initiated", t, 2, r#","transfer_id":"n2""#),
            event(
                "failed",
                t + 500,
                2,
                r#","transfer_id":"n2","error":{"code":20404}"#,
            ),
            event("initiated", t, 3, r#","transfer_id":"n3""#),
            event("completed", t + 3000, 3, r#","transfer_id":"n3""#),
        ],
    );
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    assert_eq!(state(&app, "a", "success_rate"), "inconclusive");
    assert!(posts(&sim).is_empty(), "{:?}", posts(&sim));
    assert_eq!(
        metric_sum(
            &metrics(&app),
            "transfer_guard_actions_total",
            &[r#"cbo="a""#]
        ),
        0.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_ten_minute_taskrouter_outage_with_healthy_transfers_fires_nothing() {
    let sim = sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, "", ""), T0).await;
    let mut n = 0;
    run(&app, 60, |app, _| {
        n += 1;
        transfer(app, "a", n, true);
    })
    .await;
    sim.inject(
        "/v1/",
        Fault::Status {
            status: 503,
            code: 20503,
        },
        None,
    );
    run(&app, 600, |app, _| {
        n += 1;
        transfer(app, "a", n, true);
    })
    .await;
    let m = metrics(&app);
    assert!(
        metric(
            &m,
            r#"transfer_guard_taskrouter_polls_total{cbo="a",result="server_error"}"#
        )
        .unwrap()
            >= 10.0
    );
    assert_eq!(state(&app, "a", "taskrouter_error_rate"), "inconclusive");
    assert_eq!(state(&app, "a", "config_corruption"), "ok");
    assert_eq!(metric_sum(&m, "transfer_guard_actions_total", &[]), 0.0);
    assert!(posts(&sim).is_empty());
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_right_after_a_rollback_does_not_roll_back_again() {
    let sim = sim().await;
    let dir = fresh_dir();
    let text = text(&dir, &sim, "", "");
    let app = start_at(&text, T0).await;
    let mut n = 0;
    let mut bad = |app: &App, step: u64| {
        n += 1;
        transfer(app, "a", n, !step.is_multiple_of(6));
    };
    run(&app, 300, &mut bad).await;
    assert_eq!(actions(&app, "a", "serverless", "fired"), 1.0);
    let deployments = sim.deployments(AC_A, ZS_A, ZE_A).len();
    app.shutdown().await;

    let app = start_at(&text, T0).await;
    run(&app, 600, &mut bad).await;
    assert_eq!(state(&app, "a", "bad_requests"), "breached");
    assert_eq!(
        sim.deployments(AC_A, ZS_A, ZE_A).len(),
        deployments,
        "no second rollback"
    );
    assert_eq!(actions(&app, "a", "serverless", "suppressed"), 1.0);
    let url = app.url();
    let shared = app.shared.clone();
    let listed = shared.actions.log.query(Some("a"), None);
    assert!(
        listed
            .iter()
            .any(|e| e.action.as_deref() == Some("rollback")
                && e.integration.as_deref() == Some("serverless")
                && e.result.as_deref() == Some("fired"))
    );
    assert!(!url.is_empty());
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_logs_no_rule_state_that_did_not_change() {
    let sim = sim().await;
    let dir = fresh_dir();
    let text = text(&dir, &sim, "", "");
    let states = |app: &App| {
        app.shared
            .actions
            .log
            .query(Some("a"), None)
            .iter()
            .filter(|e| e.kind == Kind::State)
            .count()
    };
    // No transfers: the rules that need samples say so.
    let app = start_at(&text, T0).await;
    run(&app, 120, |_, _| {}).await;
    assert_eq!(state(&app, "a", "success_rate"), "inconclusive");
    let logged = states(&app);
    assert!(logged > 0, "{logged}");
    app.shutdown().await;

    // Still none after two restarts: nothing new to say, nothing logged.
    for _ in 0..2 {
        let app = start_at(&text, T0).await;
        let m = metrics(&app);
        assert_eq!(
            metric(
                &m,
                r#"transfer_guard_rule_state{cbo="a",rule="success_rate",state="inconclusive"}"#
            ),
            Some(1.0),
            "resumed, and shown as resumed"
        );
        run(&app, 120, |_, _| {}).await;
        assert_eq!(state(&app, "a", "success_rate"), "inconclusive");
        assert_eq!(states(&app), logged);
        app.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn dry_run_reaches_nothing_and_counts_the_decisions() {
    let sim = sim().await;
    let text = text(&fresh_dir(), &sim, "", "").replacen("dry_run = false", "dry_run = true", 1);
    let app = start_at(&text, T0).await;
    let mut n = 0;
    run(&app, 600, |app, step| {
        n += 1;
        transfer(app, "a", n, !(step >= 12 && step.is_multiple_of(6)));
    })
    .await;
    assert_eq!(state(&app, "a", "bad_requests"), "breached");
    assert!(posts(&sim).is_empty(), "{:?}", posts(&sim));
    assert_eq!(actions(&app, "a", "serverless", "dry_run"), 1.0);
    assert_eq!(actions(&app, "a", "plugin_release", "dry_run"), 1.0);
    app.shutdown().await;
}

/// A webhook receiver on loopback that answers `status` and records when each call came.
async fn receiver(
    status: u16,
) -> (
    String,
    Arc<Mutex<Vec<(tokio::time::Instant, Value, String)>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let s = s.clone();
            async move {
                let sig = headers
                    .get("x-transfer-guard-signature")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                s.lock().unwrap().push((
                    tokio::time::Instant::now(),
                    serde_json::from_str(&body).unwrap(),
                    sig + "|" + &body,
                ));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(start_paused = true)]
async fn a_failing_webhook_is_retried_with_backoff_and_fails_without_holding_up_other_cbos() {
    let sim = sim().await;
    sim.add_service(AC_B, ZS_B, ZE_B, WW_B);
    sim.age_history(AC_B, Duration::from_secs(3 * 3600));
    sim.deploy(AC_B, ZS_B, ZE_B, None);
    let (url, seen) = receiver(500).await;
    let extra = format!("[actions.webhook]\nurl = \"{url}\"\nsecret_env = \"HOOK_SECRET\"\n");
    let b_block = format!(
        "workflow_sid = \"{WW_B}\"\nserverless_service_sid = \"{ZS_B}\"\nserverless_environment_sid = \"{ZE_B}\"\nrollback = [\"serverless\"]\n"
    );
    let text = text(&fresh_dir(), &sim, "", "")
        .replacen(
            "rollback = [\"serverless\", \"plugin_release\"]",
            "rollback = [\"webhook\"]",
            1,
        )
        .replacen(&format!("workflow_sid = \"{WW_B}\"\n"), &b_block, 1)
        .replacen("[server]\n", &format!("{extra}\n[server]\n"), 1);
    let mut env = env();
    env.insert("HOOK_SECRET", "hook-secret");
    let checked = check_str(&text, &|k| env.get(k).map(|v| v.to_string()));
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    let app = App::start_with_clock(checked.config.unwrap(), Clock::starting_at(T0))
        .await
        .unwrap();
    let mut n = 0;
    run(&app, 600, |app, step| {
        n += 1;
        transfer(app, "a", n, !(step >= 12 && step.is_multiple_of(6)));
        // b breaches on Bad Requests too, but a minute later, alone (no cross-CBO).
        n += 1;
        transfer(app, "b", n, !(step >= 30 && step.is_multiple_of(6)));
    })
    .await;
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "three attempts");
    assert!(calls[1].0 - calls[0].0 >= Duration::from_secs(1));
    assert!(
        calls[2].0 - calls[1].0 >= Duration::from_secs(2),
        "backoff grows"
    );
    let (_, body, signed) = &calls[0];
    assert_eq!(
        (body["cbo"].as_str(), body["rule"].as_str()),
        (Some("a"), Some("bad_requests"))
    );
    let (sig, raw) = signed.split_once('|').unwrap();
    assert_eq!(
        sig,
        transfer_guard::actions::webhook::sign(
            &transfer_guard::config::Secret::new("hook-secret"),
            raw.as_bytes()
        )
    );
    assert_eq!(actions(&app, "a", "webhook", "failed"), 1.0);
    let log = app.shared.actions.log.query(Some("a"), None);
    let attempts: Vec<(Option<u32>, Option<String>)> = log
        .iter()
        .filter(|e| e.kind == Kind::Action && e.integration.as_deref() == Some("webhook"))
        .map(|e| (e.attempt, e.result.clone()))
        .collect();
    assert_eq!(
        attempts,
        vec![
            (Some(1), Some("retrying".into())),
            (Some(2), Some("retrying".into())),
            (Some(3), Some("failed".into()))
        ]
    );
    assert_eq!(
        actions(&app, "b", "serverless", "fired"),
        1.0,
        "b rolled back on its own"
    );
    app.shutdown().await;
}
