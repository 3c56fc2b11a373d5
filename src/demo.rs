//! `transfer-guard demo`: the whole cycle on a simulated Twilio — healthy traffic on two CBOs, a deploy that resets nss's workflow SID, the breach, the rollback, the recovery — through the real ingest path, with a live terminal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::App;
use crate::clock::Clock;
use crate::config::{Config, WORKFLOW_SID_VAR, check_str};
use crate::decisions::{Entry, Kind};
use crate::sim::traffic::{self, Generator, Profile};
use crate::sim::twilio::{SimTwilio, TaskEvent};

pub const ADMIN_TOKEN: &str = "demo-admin-token";
const TWILIO_TOKEN: &str = "demo-twilio-auth-token";
const NSS_SERVICE: &str = "ZS00000000000000000000000000000001";
const NSS_ENVIRONMENT: &str = "ZE00000000000000000000000000000001";
/// What the bad deploy sets the functions' workflow variable to.
const WRONG_WORKFLOW: &str = "WW000000000000000000000000000000ff";
/// The Bad Request share of nss's transfers while its functions use the wrong workflow.
const BROKEN_BAD_REQUESTS: f64 = 0.6;

/// The quiet CBO's Serverless environment and its test transfers' queue.
const QUIET_SERVICE: &str = "ZS00000000000000000000000000000003";
const QUIET_ENVIRONMENT: &str = "ZE00000000000000000000000000000003";
const QUIET_QUEUE: &str = "WQ00000000000000000000000000000003";
/// When the quiet CBO deploys (a sound build), judged by test transfers alone.
const QUIET_DEPLOYS_AFTER: Duration = Duration::from_secs(5);

/// The demo CBOs: key, ingest token, account, workspace, workflow, healthy traffic.
fn cbos() -> [(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Profile,
); 3] {
    let healthy = Profile {
        bad_request: 0.0,
        cancelled: 0.01,
        history_lost: 0.0,
        ..Profile::default()
    };
    [
        (
            "nss",
            "demo-token-nss",
            "AC00000000000000000000000000000001",
            "WS00000000000000000000000000000001",
            "WW00000000000000000000000000000001",
            healthy.clone(),
        ),
        (
            "clienta",
            "demo-token-clienta",
            "AC00000000000000000000000000000002",
            "WS00000000000000000000000000000002",
            "WW00000000000000000000000000000002",
            Profile {
                rate: 1.0,
                agent_unavailable: 0.03,
                ..healthy.clone()
            },
        ),
        (
            // A community organisation with a handful of transfers an hour.
            "quiet",
            "demo-token-quiet",
            "AC00000000000000000000000000000003",
            "WS00000000000000000000000000000003",
            "WW00000000000000000000000000000003",
            Profile {
                rate: 1.0 / 900.0,
                ..healthy
            },
        ),
    ]
}

/// Demo-sized windows: Bad Requests in the last minute for 10 s are enough, polls every 5 s
/// (so the corrupted variable is usually seen first), and actions are live (against the
/// simulator only).
const CONFIG: &str = r#"
[server]
admin_token_env = "DEMO_ADMIN"

[twilio]
poll_interval = "5s"

[actions]
dry_run = false
cooldown = "5m"

[validation]
duration = "60s"

[[cbo]]
key = "nss"
ingest_token_env = "DEMO_TOKEN_NSS"
account_sid = "AC00000000000000000000000000000001"
auth_token_env = "DEMO_TWILIO_TOKEN"
workspace_sid = "WS00000000000000000000000000000001"
workflow_sid = "WW00000000000000000000000000000001"
serverless_service_sid = "ZS00000000000000000000000000000001"
serverless_environment_sid = "ZE00000000000000000000000000000001"
rollback = ["serverless"]
disable = ["flex_flag"]

[cbo.rules.bad_requests]
minutes = 1
window = "1m"
for = "10s"

[[cbo]]
key = "clienta"
ingest_token_env = "DEMO_TOKEN_CLIENTA"
account_sid = "AC00000000000000000000000000000002"
auth_token_env = "DEMO_TWILIO_TOKEN"
workspace_sid = "WS00000000000000000000000000000002"
workflow_sid = "WW00000000000000000000000000000002"

[[cbo]]
key = "quiet"
ingest_token_env = "DEMO_TOKEN_QUIET"
account_sid = "AC00000000000000000000000000000003"
auth_token_env = "DEMO_TWILIO_TOKEN"
workspace_sid = "WS00000000000000000000000000000003"
workflow_sid = "WW00000000000000000000000000000003"
serverless_service_sid = "ZS00000000000000000000000000000003"
serverless_environment_sid = "ZE00000000000000000000000000000003"
rollback = ["serverless"]

[cbo.probe]
queue_sid = "WQ00000000000000000000000000000003"
interval = "5m"
during_validation = "10s"
"#;

/// The embedded configuration, listening on `listen`, with Twilio at `twilio`. Its secrets are
/// the demo's own, not the environment's.
pub fn config(listen: SocketAddr, twilio: &str) -> Config {
    let env: HashMap<&str, &str> = HashMap::from([
        ("DEMO_ADMIN", ADMIN_TOKEN),
        ("DEMO_TOKEN_NSS", "demo-token-nss"),
        ("DEMO_TOKEN_CLIENTA", "demo-token-clienta"),
        ("DEMO_TOKEN_QUIET", "demo-token-quiet"),
        ("DEMO_TWILIO_TOKEN", TWILIO_TOKEN),
    ]);
    let checked = check_str(CONFIG, &|k| env.get(k).map(|v| v.to_string()));
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    let mut config = checked.config.expect("the demo config is valid");
    config.server.listen = listen;
    config.server.state_dir =
        std::env::temp_dir().join(format!("transfer-guard-demo-{}", std::process::id()));
    config.twilio.taskrouter_url = twilio.to_string();
    config.twilio.serverless_url = twilio.to_string();
    config.twilio.flex_url = twilio.to_string();
    config.twilio.monitor_url = twilio.to_string();
    config
}

/// A simulated Twilio holding the demo CBOs' accounts, each with a sound workflow; nss's
/// functions have two builds deployed in turn, the first live for a day (known good by
/// Twilio's history), the second for two hours.
pub async fn twilio(clock: Clock) -> SimTwilio {
    let sim = SimTwilio::start(clock).await;
    for (key, _, account, workspace, workflow, _) in cbos() {
        sim.add_account(account, TWILIO_TOKEN);
        sim.add_workflow(account, workspace, workflow);
        if key == "nss" {
            sim.add_service(account, NSS_SERVICE, NSS_ENVIRONMENT, workflow);
            sim.age_history(account, Duration::from_secs(22 * 3600));
            sim.deploy(account, NSS_SERVICE, NSS_ENVIRONMENT, None);
            sim.age_history(account, Duration::from_secs(2 * 3600));
        }
        if key == "quiet" {
            sim.add_service(account, QUIET_SERVICE, QUIET_ENVIRONMENT, workflow);
            sim.age_history(account, Duration::from_secs(24 * 3600));
            sim.add_queue(account, workspace, QUIET_QUEUE, "transfer-guard-probe");
        }
    }
    sim
}

/// What TaskRouter would have seen of a transfer event: the invite's task and its reservation.
fn record_task(sim: &SimTwilio, account: &str, workflow: &str, line: &str) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    let event = match v["event"].as_str() {
        Some("initiated") => TaskEvent::Entered,
        Some("accepted") => TaskEvent::ReservationAccepted,
        Some("completed") => TaskEvent::Completed,
        Some("cancelled") => TaskEvent::Canceled,
        // A Bad Request never created a task; other failures cancel it.
        Some("failed") if v["error"]["status"] == 400 => return,
        Some("failed") => TaskEvent::Canceled,
        _ => return,
    };
    sim.record_tasks(account, workflow, event, 1);
}

/// One line of the terminal for a decision-log entry worth showing.
fn describe(e: &Entry) -> Option<String> {
    // An action decided by a failed validation window says so.
    let breach = if e.evidence["breach"].is_null() {
        &e.evidence
    } else {
        &e.evidence["breach"]
    };
    let rule = match breach["validation"].as_str() {
        Some(v) => format!(
            "failed validation window {v} ({})",
            breach["reason"].as_str().unwrap_or("")
        ),
        None => e.rule.clone().unwrap_or_default(),
    };
    match e.kind {
        Kind::State => {
            let (from, to) = (e.from.as_deref()?, e.to.as_deref()?);
            let interesting = matches!(to, "pending" | "breached") || from == "breached";
            interesting.then(|| format!("{}: rule {rule} {from} -> {to}", e.cbo))
        }
        Kind::Action => Some(format!(
            "{}: {} ({}) for {rule}: {}: {}",
            e.cbo,
            e.action.as_deref().unwrap_or(""),
            e.integration.as_deref().unwrap_or(""),
            e.result.as_deref().unwrap_or(""),
            e.detail.as_deref().unwrap_or("")
        )),
        Kind::Switch => Some(format!(
            "{}: transfers switch -> {}",
            e.cbo,
            e.action.as_deref().unwrap_or("")
        )),
        Kind::Ack => Some(format!("{}: {rule} acknowledged", e.cbo)),
        Kind::Intent => Some(format!(
            "{}: intent to {} ({}) for {rule}: {}",
            e.cbo,
            e.action.as_deref().unwrap_or(""),
            e.integration.as_deref().unwrap_or(""),
            e.detail.as_deref().unwrap_or("")
        )),
        Kind::Known => Some(format!(
            "{}: {} {} known {}: {}",
            e.cbo,
            e.integration.as_deref().unwrap_or(""),
            e.detail.as_deref().unwrap_or(""),
            e.result.as_deref().unwrap_or(""),
            e.evidence["why"].as_str().unwrap_or("")
        )),
        Kind::Note => e.detail.as_ref().map(|d| format!("guard: {d}")),
    }
}

/// After the bad deploy, how long the story takes to play out: the breach, the rollback, its
/// validation window and the recovery.
pub const STORY_TAIL: Duration = Duration::from_secs(75);

/// Runs the demo for `duration` (default: `breach_after` + `STORY_TAIL`) or until Ctrl-C /
/// SIGTERM, then prints what happened; the bad deploy comes `breach_after` in.
pub async fn run(
    listen: SocketAddr,
    duration: Option<Duration>,
    breach_after: Duration,
) -> Result<(), crate::StartError> {
    let clock = Clock::new();
    let sim = twilio(clock).await;
    let app = App::start(config(listen, &sim.url())).await?;
    let server = app.url();
    println!(
        "transfer-guard demo: three simulated CBOs (nss, clienta, quiet) on a simulated Twilio at {}",
        sim.url()
    );
    println!("  metrics: {server}/metrics");
    println!("  status:  curl -H 'Authorization: Bearer {ADMIN_TOKEN}' {server}/v1/status");
    println!("  stop:    Ctrl-C");
    println!(
        "  the story: healthy traffic; after {} quiet deploys and its test transfers judge it; after {} a deploy resets nss's {WORKFLOW_SID_VAR} and Bad Requests start; transfer-guard rolls it back",
        humantime::format_duration(QUIET_DEPLOYS_AFTER),
        humantime::format_duration(breach_after)
    );

    let client = reqwest::Client::new();
    let started = clock.now_ms();
    let mut generators: Vec<_> = cbos()
        .into_iter()
        .enumerate()
        .map(|(i, (key, token, account, workspace, workflow, profile))| {
            // Ten minutes of history first, so the windows and panels have data at once.
            let start = started - 10 * 60 * 1000;
            let functions = match key {
                "nss" => Some((NSS_SERVICE, NSS_ENVIRONMENT)),
                "quiet" => Some((QUIET_SERVICE, QUIET_ENVIRONMENT)),
                _ => None,
            };
            (
                key,
                token,
                (account, workspace, workflow),
                functions,
                Generator::new(profile, 42 + i as u64, start),
            )
        })
        .collect();

    let duration = duration.unwrap_or(breach_after + STORY_TAIL);
    let stop = async {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = crate::shutdown_signal() => {}
        }
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let every = Duration::from_secs(10);
    let mut summary = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut deployed = false;
    let mut quiet_deployed = false;
    let mut silenced = false;
    let mut windows_shown = std::collections::BTreeSet::new();
    let mut shown = app.shared.actions.log.last_seq();
    let elapsed = |now: i64| {
        let s = (now - started) / 1000;
        format!("[{:02}:{:02}]", s / 60, s % 60)
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let now = clock.now_ms();
                if !deployed && now - started >= breach_after.as_millis() as i64 {
                    deployed = true;
                    let (_, _, (account, ..), ..) = generators[0];
                    let d = sim.deploy(account, NSS_SERVICE, NSS_ENVIRONMENT, Some(WRONG_WORKFLOW));
                    println!("{} scenario: nss deploys build {} and it resets {WORKFLOW_SID_VAR} to {WRONG_WORKFLOW}", elapsed(now), d.build_sid);
                }
                if !quiet_deployed && now - started >= QUIET_DEPLOYS_AFTER.as_millis() as i64 {
                    quiet_deployed = true;
                    let d = sim.deploy(generators[2].2.0, QUIET_SERVICE, QUIET_ENVIRONMENT, None);
                    println!("{} scenario: quiet (a handful of transfers an hour) deploys build {}; test transfers judge it", elapsed(now), d.build_sid);
                }
                for v in app.shared.validations.list(None) {
                    if v.state != crate::validation::State::Running && windows_shown.insert(v.id.clone()) {
                        let criteria: Vec<String> = v
                            .criteria
                            .iter()
                            .filter(|c| c.verdict != crate::validation::Verdict::NoData)
                            .map(|c| format!("{} {}", c.name, c.value))
                            .collect();
                        println!(
                            "{} {}: validation window for {} {}{}: {}",
                            elapsed(now),
                            v.cbo,
                            v.deployment,
                            v.state.as_str(),
                            v.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                            criteria.join(", ")
                        );
                    }
                }
                for (key, token, (account, workspace, workflow), functions, g) in &mut generators {
                    let mut quiet_plugin = false;
                    if *key == "nss" {
                        // The functions route with whatever the variable says now, and the bad
                        // build breaks the plugin's logging too: only Twilio's record shows it.
                        let broken = sim.variable(account, NSS_SERVICE, NSS_ENVIRONMENT, WORKFLOW_SID_VAR).as_deref() != Some(*workflow);
                        g.profile.bad_request = if broken { BROKEN_BAD_REQUESTS } else { 0.0 };
                        quiet_plugin = broken;
                        if broken != silenced {
                            silenced = broken;
                            if !broken {
                                print_sources(&app, key, elapsed(now));
                            }
                            println!(
                                "{} scenario: nss's plugin {}",
                                elapsed(now),
                                if broken {
                                    "stops logging transfers; transfer-guard still reads TaskRouter's events, the functions' logs and Twilio's debugger"
                                } else {
                                    "logs transfers again"
                                }
                            );
                        }
                    }
                    g.start_until(now);
                    for (at, record) in g.due_records(now) {
                        record.apply(&sim, (account, workspace, workflow), *functions, at);
                    }
                    let lines = g.due(now);
                    for line in &lines {
                        record_task(&sim, account, workflow, line);
                    }
                    if quiet_plugin {
                        continue;
                    }
                    if let Err(e) = traffic::post(&client, &server, token, &lines).await {
                        eprintln!("demo traffic for {key}: {e}");
                    }
                }
                for e in app.shared.actions.log.after(shown) {
                    shown = e.seq;
                    if let Some(line) = describe(&e) {
                        println!("{} {line}", elapsed(now));
                    }
                }
            }
            _ = summary.tick() => {
                print_summary(&app, elapsed(clock.now_ms()));
                if silenced {
                    print_sources(&app, "nss", elapsed(clock.now_ms()));
                }
            }
        }
    }
    print_closing(&app, elapsed(clock.now_ms()));
    app.shutdown().await;
    Ok(())
}

/// What the demo showed, in a few lines: each CBO's transfers, what fired, the windows.
fn print_closing(app: &App, at: String) {
    println!("{at} demo over. What happened:");
    let log = app.shared.actions.log.query(None, None);
    for cbo in app.shared.fleet.iter() {
        let s = cbo.stats(app.shared.clock.now_ms(), Duration::from_secs(3600));
        let fired: Vec<String> = log
            .iter()
            .filter(|e| e.cbo == cbo.key && e.kind == Kind::Action)
            .filter(|e| {
                e.result.as_deref() == Some("fired") && e.integration.as_deref() != Some("rollback")
            })
            .map(|e| {
                format!(
                    "{} ({}) at {}",
                    e.action.as_deref().unwrap_or(""),
                    e.integration.as_deref().unwrap_or(""),
                    e.at
                )
            })
            .collect();
        let windows: Vec<String> = app
            .shared
            .validations
            .list(Some(&cbo.key))
            .iter()
            .map(|v| format!("{} {}", v.deployment, v.state.as_str()))
            .collect();
        println!(
            "  {:<8} {} transfers judged in the last hour ({} completed); actions fired: {}; validation windows: {}",
            cbo.key,
            s.counts.decided() + s.counts.cancelled,
            s.counts.completed,
            if fired.is_empty() {
                "none".to_string()
            } else {
                fired.join(", ")
            },
            if windows.is_empty() {
                "none".to_string()
            } else {
                windows.join(", ")
            },
        );
    }
}

/// What each source has told about `cbo` so far: the plugin is silent, Twilio's record is not.
fn print_sources(app: &App, cbo: &str, at: String) {
    let text = app.shared.metrics.render();
    let sum = |name: &str, label: &str| -> f64 {
        let prefix = format!("transfer_guard_{name}{{");
        let cbo = format!("cbo=\"{cbo}\"");
        text.lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(&cbo) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    println!(
        "{at} {cbo}: sources so far: plugin {:.0} transfers; TaskRouter's events {:.0}; Bad Requests that created no task: {:.0} first seen in the functions' logs, {:.0} first in the debugger (each counted once)",
        sum("transfers_seen_total", "source=\"plugin\""),
        sum("transfers_seen_total", "source=\"taskrouter_events\""),
        sum("bad_request_signals_total", "source=\"serverless_logs\""),
        sum("bad_request_signals_total", "source=\"twilio_alerts\""),
    );
}

fn print_summary(app: &App, at: String) {
    let now = app.shared.clock.now_ms();
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}s"));
    for cbo in app.shared.fleet.iter() {
        let s = cbo.stats(now, Duration::from_secs(60));
        let tr = cbo.taskrouter().clone();
        let rate = s
            .success_rate
            .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
        let workflow = match tr.config_ok {
            Some(true) => "ok".to_string(),
            Some(false) => tr
                .problems
                .iter()
                .map(|p| p.id())
                .collect::<Vec<_>>()
                .join(","),
            None => "?".to_string(),
        };
        let breached: Vec<&str> = app
            .shared
            .engine()
            .states(&cbo.key)
            .into_iter()
            .filter(|(_, t)| t.state == crate::rules::RuleState::Breached)
            .map(|(r, _)| r)
            .collect();
        println!(
            "{at} {:<8} last 1m: {:>3} transfers, success {:>6}, bad requests {:>2}, cold p95 {:>5}, notify p95 {:>5} | TaskRouter errors {} | workflow {workflow} | breached: {}",
            cbo.key,
            s.counts.decided() + s.counts.cancelled,
            rate,
            s.counts.bad_request + s.counts.taskrouter_bad_request,
            secs(s.cold_completion_p95),
            secs(s.notification_p95),
            tr.error_ratio
                .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0)),
            if breached.is_empty() {
                "none".to_string()
            } else {
                breached.join(",")
            },
        );
    }
}
