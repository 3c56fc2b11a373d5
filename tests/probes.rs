//! Test transfers (SPEC §3) against the simulated Twilio: routed within 10 s, a wrong workflow
//! SID is a Bad Request, a TaskRouter that stops routing fails them, a quiet CBO's validation
//! window decides on them, and no probe task is ever left behind (errors, shutdown mid-probe,
//! orphans of an earlier run).

mod common;

use std::time::Duration;

use common::story::*;
use common::*;
use transfer_guard::App;
use transfer_guard::validation::State;

const WQ: &str = "WQ0000000000000000000000000000000a";
const PROBE: &str =
    "[cbo.probe]\nqueue_sid = \"WQ0000000000000000000000000000000a\"\ninterval = \"5m\"\n";

async fn probe_sim() -> transfer_guard::sim::twilio::SimTwilio {
    let sim = sim().await;
    sim.add_queue(AC_A, WS_A, WQ, "transfer-guard-probe");
    sim
}

fn probes(app: &App, result: &str) -> f64 {
    metric(
        &metrics(app),
        &format!("transfer_guard_probes_total{{cbo=\"a\",result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(start_paused = true)]
async fn a_test_transfer_is_routed_counted_and_removed() {
    let sim = probe_sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, PROBE, ""), T0).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(probes(&app, "routed"), 1.0);
    let m = metrics(&app);
    assert_eq!(
        metric(&m, r#"transfer_guard_probe_routing_seconds_count{cbo="a"}"#),
        Some(1.0)
    );
    // A transfer like any other: completed, queue target.
    assert_eq!(
        metric_sum(
            &m,
            "transfer_guard_transfers_total",
            &[
                r#"cbo="a""#,
                r#"outcome="completed""#,
                r#"target_type="queue""#
            ]
        ),
        1.0
    );
    assert!(sim.api_tasks(AC_A).is_empty(), "{:?}", sim.api_tasks(AC_A));
    // What TaskRouter was asked: create, fetch until routed, cancel, delete.
    let calls: Vec<(String, String)> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/Tasks"))
        .map(|r| (r.method, r.path))
        .collect();
    assert!(
        calls
            .iter()
            .any(|(m, p)| m == "POST" && p.ends_with("/Tasks"))
    );
    assert!(calls.iter().any(|(m, _)| m == "DELETE"));
    // Every five minutes after that.
    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    assert_eq!(probes(&app, "routed"), 2.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_test_transfer_through_a_wrong_workflow_sid_is_a_bad_request() {
    let sim = probe_sim().await;
    let wrong = "WW00000000000000000000000000000bad";
    let text = text(&fresh_dir(), &sim, PROBE, "").replacen(
        &format!("workflow_sid = \"{WW_A}\"\nserverless"),
        &format!("workflow_sid = \"{wrong}\"\nserverless"),
        1,
    );
    let app = start_at(&text, T0).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(probes(&app, "bad_request"), 1.0);
    assert_eq!(
        metric(
            &metrics(&app),
            r#"transfer_guard_transfer_errors_total{cbo="a",class="bad_request"}"#
        ),
        Some(1.0)
    );
    assert!(sim.api_tasks(AC_A).is_empty());
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_quiet_cbos_validation_window_is_decided_by_its_test_transfers() {
    let sim = probe_sim().await;
    let app = start_at(&text(&fresh_dir(), &sim, PROBE, ""), T0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // A deploy, and no real transfer at all in the next 15 minutes.
    let good = sim.deploy(AC_A, ZS_A, ZE_A, None);
    tokio::time::sleep(Duration::from_secs(17 * 60)).await;
    let v = app
        .shared
        .validations
        .list(Some("a"))
        .into_iter()
        .find(|v| v.deployment == good.sid)
        .unwrap();
    assert_eq!(v.state, State::Passed, "{v:#?}");
    let c = v
        .criteria
        .iter()
        .find(|c| c.name == "test_transfers_routed")
        .unwrap();
    assert!(
        c.value.starts_with("1") && c.value.contains(" of 1"),
        "every minute: {c:?}"
    );
    // TaskRouter stops routing; the next deploy's window fails on its test transfers.
    sim.set_routing(AC_A, false);
    let bad = sim.deploy(AC_A, ZS_A, ZE_A, None);
    tokio::time::sleep(Duration::from_secs(3 * 60)).await;
    let v = app
        .shared
        .validations
        .list(Some("a"))
        .into_iter()
        .find(|v| v.deployment == bad.sid)
        .unwrap();
    assert_eq!(v.state, State::Failed, "{v:#?}");
    assert!(probes(&app, "not_routed") >= 1.0);
    assert!(sim.api_tasks(AC_A).is_empty(), "{:?}", sim.api_tasks(AC_A));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_daemon_stopped_mid_probe_leaves_no_task_and_orphans_are_removed_at_start() {
    let sim = probe_sim().await;
    sim.set_routing_delay(AC_A, Duration::from_secs(60));
    let dir = fresh_dir();
    let app = start_at(&text(&dir, &sim, PROBE, ""), T0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sim.api_tasks(AC_A).len(), 1, "a test transfer is waiting");
    app.shutdown().await;
    assert!(sim.api_tasks(AC_A).is_empty(), "{:?}", sim.api_tasks(AC_A));
    // A task a daemon killed mid-probe left: removed when the next one starts.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/Workspaces/{WS_A}/Tasks", sim.url()))
        .basic_auth(AC_A, Some("twilio-secret"))
        .form(&[
            ("WorkflowSid", WW_A),
            ("TaskChannel", "chat"),
            (
                "Attributes",
                r#"{"transferTargetType":"queue","transferGuardProbe":true}"#,
            ),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // An agent's real task is left alone.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/Workspaces/{WS_A}/Tasks", sim.url()))
        .basic_auth(AC_A, Some("twilio-secret"))
        .form(&[
            ("WorkflowSid", WW_A),
            ("Attributes", r#"{"transferTargetType":"worker"}"#),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(sim.api_tasks(AC_A).len(), 2);
    let app = start_at(&text(&dir, &sim, PROBE, ""), T0 + 60_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = sim.api_tasks(AC_A);
    assert_eq!(
        left.len(),
        2,
        "the orphan went, the new probe waits: {left:?}"
    );
    assert!(
        left.iter()
            .all(|(_, _, a)| !a.contains("worker") || !a.contains("transferGuardProbe"))
    );
    assert!(
        left.iter().any(|(_, _, a)| a.contains("\"worker\"")),
        "{left:?}"
    );
    app.shutdown().await;
    assert_eq!(sim.api_tasks(AC_A).len(), 1, "only the agent's task");
}
