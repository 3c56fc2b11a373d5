//! The rollback story's pieces: a simulated Twilio with a build history, a live-actions
//! configuration for cbo a, transfers fed a step at a time, and what the metrics and the log say.

use std::path::Path;
use std::time::Duration;

use super::*;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::SimTwilio;

pub const ZS_A: &str = "ZS0000000000000000000000000000000a";
pub const ZE_A: &str = "ZE0000000000000000000000000000000a";
pub const ZS_B: &str = "ZS0000000000000000000000000000000b";
pub const ZE_B: &str = "ZE0000000000000000000000000000000b";

/// The simulator: both accounts with sound workflows; cbo a with a build and a plugin
/// configuration that ran for hours (known good by Twilio's history), then a new build and
/// configuration deployed a minute before the daemon starts.
pub async fn sim() -> SimTwilio {
    let sim = SimTwilio::start(Clock::starting_at(T0)).await;
    for (ac, ws, ww) in [(AC_A, WS_A, WW_A), (AC_B, WS_B, WW_B)] {
        sim.add_account(ac, "twilio-secret");
        sim.add_workflow(ac, ws, ww);
    }
    sim.add_service(AC_A, ZS_A, ZE_A, WW_A);
    sim.release_plugin_configuration(AC_A, "v1");
    sim.age_history(AC_A, Duration::from_secs(3 * 3600));
    sim.deploy(AC_A, ZS_A, ZE_A, None);
    sim.release_plugin_configuration(AC_A, "v2");
    sim.age_history(AC_A, Duration::from_secs(60));
    sim
}

/// cbo a: live actions (serverless + plugin release rollback, Flex flag disable); `a_extra` and
/// `extra` go into cbo a's block and after everything.
pub fn text(state_dir: &Path, sim: &SimTwilio, a_extra: &str, extra: &str) -> String {
    let a = format!(
        "workflow_sid = \"{WW_A}\"\nserverless_service_sid = \"{ZS_A}\"\nserverless_environment_sid = \"{ZE_A}\"\n\
         rollback = [\"serverless\", \"plugin_release\"]\ndisable = [\"flex_flag\"]\n{a_extra}"
    );
    config_text_in(state_dir, &sim.url(), extra)
        .replacen(&format!("workflow_sid = \"{WW_A}\"\n"), &a, 1)
        .replacen("[server]\n", "[actions]\ndry_run = false\n\n[server]\n", 1)
}

pub fn now(app: &App) -> i64 {
    app.shared.clock.now_ms()
}

/// The simulated Twilio's now.
pub fn now_sim(sim: &SimTwilio) -> i64 {
    sim.now_ms()
}

pub fn ingest(app: &App, cbo: &str, lines: Vec<String>) {
    ingest_lines(app, cbo, &lines);
}

/// The error of a failed transfer: TaskRouter's Bad Request.
pub const BAD_REQUEST: &str = r#"{"status":400,"message":"TaskRouter error: Bad Request"}"#;
/// The error of a failed transfer: the target agent unavailable (not a Bad Request).
pub const AGENT_UNAVAILABLE: &str = r#"{"code":20001}"#;

/// One transfer of `cbo`: completed after 3 s, or failed with a Bad Request.
pub fn transfer(app: &App, cbo: &str, n: u32, ok: bool) {
    transfer_failing_with(app, cbo, n, (!ok).then_some(BAD_REQUEST));
}

/// One transfer of `cbo`, initiated 5 s ago: completed after 3 s, or failed after 0.5 s with
/// `error` (a JSON object).
pub fn transfer_failing_with(app: &App, cbo: &str, n: u32, error: Option<&str>) {
    let t = now(app) - 5_000;
    let tid = format!(r#","transfer_id":"{cbo}-{n}""#);
    let end = match error {
        None => event("completed", t + 3_000, n, &tid),
        Some(e) => event("failed", t + 500, n, &format!(r#"{tid},"error":{e}"#)),
    };
    ingest(app, cbo, vec![event("initiated", t, n, &tid), end]);
}

/// Runs `minutes` of traffic, one step every 10 s, `per_step(app, step)` feeding it.
pub async fn run(app: &App, seconds: u64, mut per_step: impl FnMut(&App, u64)) {
    for step in 0..seconds / 10 {
        per_step(app, step);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

pub fn metrics(app: &App) -> String {
    app.shared.metrics.render()
}

/// `actions_total` of `cbo` for `what` (an action: rollback, disable, alert; else an
/// integration) and `result`.
pub fn actions(app: &App, cbo: &str, what: &str, result: &str) -> f64 {
    let label = if matches!(what, "rollback" | "disable" | "alert") {
        "action"
    } else {
        "integration"
    };
    let (cbo, action, result) = (
        format!("cbo=\"{cbo}\""),
        format!("{label}=\"{what}\""),
        format!("result=\"{result}\""),
    );
    metric_sum(
        &metrics(app),
        "transfer_guard_actions_total",
        &[&cbo, &action, &result],
    )
}

pub fn state(app: &App, cbo: &str, rule: &str) -> String {
    app.shared.engine().states(cbo)[rule]
        .state
        .as_str()
        .to_string()
}

pub fn posts(sim: &SimTwilio) -> Vec<String> {
    sim.requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path.clone())
        .collect()
}

pub fn fresh_dir() -> std::path::PathBuf {
    tempfile::tempdir().unwrap().keep()
}

/// Whether `cbo`'s log holds an action held back for a reason containing `why`.
pub fn suppressed_because(app: &App, cbo: &str, why: &str) -> bool {
    app.shared
        .actions
        .log
        .query(Some(cbo), None)
        .iter()
        .any(|e| {
            e.result.as_deref() == Some("suppressed")
                && e.detail.as_deref().unwrap_or("").contains(why)
        })
}
