//! `transfer-guard demo`: the daemon with an embedded two-CBO config, simulated traffic through the real ingest path, and a live summary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::App;
use crate::clock::Clock;
use crate::config::{Config, check_str};
use crate::sim::traffic::{self, Generator, Profile};
use crate::sim::twilio::{SimTwilio, TaskEvent};

/// The demo's two CBOs: their keys, ingest tokens and traffic.
fn cbos() -> Vec<(&'static str, &'static str, Profile)> {
    vec![
        ("nss", "demo-token-nss", Profile::default()),
        (
            "clienta",
            "demo-token-clienta",
            Profile {
                rate: 1.0,
                bad_request: 0.01,
                agent_unavailable: 0.04,
                ..Profile::default()
            },
        ),
    ]
}

pub const ADMIN_TOKEN: &str = "demo-admin-token";

const CONFIG: &str = r#"
[server]
admin_token_env = "DEMO_ADMIN"

[twilio]
poll_interval = "5s"

[[cbo]]
key = "nss"
ingest_token_env = "DEMO_TOKEN_NSS"
account_sid = "AC00000000000000000000000000000001"
auth_token_env = "DEMO_TWILIO_TOKEN"
workspace_sid = "WS00000000000000000000000000000001"
workflow_sid = "WW00000000000000000000000000000001"
serverless_service_sid = "ZS00000000000000000000000000000001"
serverless_environment_sid = "ZE00000000000000000000000000000001"

[[cbo]]
key = "clienta"
ingest_token_env = "DEMO_TOKEN_CLIENTA"
account_sid = "AC00000000000000000000000000000002"
auth_token_env = "DEMO_TWILIO_TOKEN"
workspace_sid = "WS00000000000000000000000000000002"
workflow_sid = "WW00000000000000000000000000000002"
"#;

/// The demo CBOs' Twilio accounts, workspaces, workflows and (for nss) serverless environment.
const ACCOUNTS: [(&str, &str, &str, &str); 2] = [
    (
        "nss",
        "AC00000000000000000000000000000001",
        "WS00000000000000000000000000000001",
        "WW00000000000000000000000000000001",
    ),
    (
        "clienta",
        "AC00000000000000000000000000000002",
        "WS00000000000000000000000000000002",
        "WW00000000000000000000000000000002",
    ),
];
const TWILIO_TOKEN: &str = "demo-twilio-auth-token";

/// The embedded configuration, listening on `listen`, with Twilio at `twilio`. Its secrets are
/// the demo's own, not the environment's.
pub fn config(listen: SocketAddr, twilio: &str) -> Config {
    let env: HashMap<&str, &str> = HashMap::from([
        ("DEMO_ADMIN", ADMIN_TOKEN),
        ("DEMO_TOKEN_NSS", "demo-token-nss"),
        ("DEMO_TOKEN_CLIENTA", "demo-token-clienta"),
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
    config
}

/// A simulated Twilio holding the demo CBOs' accounts, each with a sound workflow.
pub async fn twilio(clock: Clock) -> SimTwilio {
    let sim = SimTwilio::start(clock).await;
    for (key, account, workspace, workflow) in ACCOUNTS {
        sim.add_account(account, TWILIO_TOKEN);
        sim.add_workflow(account, workspace, workflow);
        if key == "nss" {
            sim.add_service(
                account,
                "ZS00000000000000000000000000000001",
                "ZE00000000000000000000000000000001",
                workflow,
            );
        }
    }
    sim
}

/// What TaskRouter would have seen of a transfer event: the invite's task and its reservation.
fn record_task(sim: &SimTwilio, cbo: &str, line: &str) {
    let Some((_, account, _, workflow)) = ACCOUNTS.iter().find(|a| a.0 == cbo) else {
        return;
    };
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

/// Runs the demo until Ctrl-C / SIGTERM, or for `duration` when given.
pub async fn run(listen: SocketAddr, duration: Option<Duration>) -> Result<(), crate::StartError> {
    let clock = Clock::new();
    let sim = twilio(clock).await;
    let app = App::start(config(listen, &sim.url())).await?;
    let server = app.url();
    println!(
        "transfer-guard demo: two simulated CBOs (nss, clienta) on a simulated Twilio at {}",
        sim.url()
    );
    println!("  metrics: {server}/metrics");
    println!("  status:  curl -H 'Authorization: Bearer {ADMIN_TOKEN}' {server}/v1/status");
    println!("  stop:    Ctrl-C");

    let client = reqwest::Client::new();
    let mut generators: Vec<(&str, &str, Generator)> = cbos()
        .into_iter()
        .enumerate()
        .map(|(i, (key, token, profile))| {
            // Ten minutes of history first, so the windows and panels have data at once.
            let start = clock.now_ms() - 10 * 60 * 1000;
            (key, token, Generator::new(profile, 42 + i as u64, start))
        })
        .collect();

    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => crate::shutdown_signal().await,
        }
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let every = Duration::from_secs(5);
    let mut summary = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let now = clock.now_ms();
                for (key, token, g) in &mut generators {
                    g.start_until(now);
                    let lines = g.due(now);
                    for line in &lines {
                        record_task(&sim, key, line);
                    }
                    if let Err(e) = traffic::post(&client, &server, token, &lines).await {
                        eprintln!("demo traffic for {key}: {e}");
                    }
                }
            }
            _ = summary.tick() => print_summary(&app),
        }
    }
    app.shutdown().await;
    Ok(())
}

fn print_summary(app: &App) {
    let now = app.shared.clock.now_ms();
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}s"));
    for cbo in app.shared.fleet.iter() {
        let s = cbo.stats(now, Duration::from_secs(300));
        let tr = cbo.taskrouter().clone();
        let rate = s
            .success_rate
            .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
        println!(
            "{:<8} 5m: {:>4} transfers  success {:>6}  bad requests {:>2}  failed {:>2}  timed out {:>2}  cold p95 {:>6}  notify p95 {:>5}  history lost {}  open {}  | TaskRouter errors {}  workflow {}",
            cbo.key,
            s.counts.decided() + s.counts.cancelled,
            rate,
            s.counts.bad_request,
            s.counts.failed,
            s.counts.timed_out,
            secs(s.cold_completion_p95),
            secs(s.notification_p95),
            s.counts.history_lost,
            cbo.open_transfers(),
            tr.error_ratio
                .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0)),
            match tr.config_ok {
                Some(true) => "ok".to_string(),
                Some(false) => tr
                    .problems
                    .iter()
                    .map(|p| p.id())
                    .collect::<Vec<_>>()
                    .join(","),
                None => "?".to_string(),
            },
        );
    }
}
