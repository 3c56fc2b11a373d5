//! Shared helpers: a two-CBO configuration on a loopback port, events, metric lookups.
#![allow(dead_code)]

pub mod processes;
pub mod story;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::config::{Config, check_str};
use transfer_guard::event::parse_line;

/// The instant paused-clock tests start at (2027-01-15).
pub const T0: i64 = 1_800_000_000_000;

/// The Twilio resources of the two CBOs of `config_text`.
pub const AC_A: &str = "AC0000000000000000000000000000000a";
pub const AC_B: &str = "AC0000000000000000000000000000000b";
pub const WS_A: &str = "WS0000000000000000000000000000000a";
pub const WS_B: &str = "WS0000000000000000000000000000000b";
pub const WW_A: &str = "WW0000000000000000000000000000000a";
pub const WW_B: &str = "WW0000000000000000000000000000000b";

pub const ADMIN: &str = "admin-secret";
pub const TOKEN_A: &str = "token-a";
pub const TOKEN_B: &str = "token-b";

/// Nothing listens here: polls fail at once, and nothing leaves the machine.
pub const NO_TWILIO: &str = "http://127.0.0.1:9";

/// Two CBOs, `a` and `b`, listening on `127.0.0.1:0`, with `extra` TOML appended; Twilio is
/// `NO_TWILIO`.
pub fn config_text(extra: &str) -> String {
    config_text_with(NO_TWILIO, extra)
}

/// The same with every Twilio base URL at `twilio`, and a fresh state directory.
pub fn config_text_with(twilio: &str, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    config_text_in(&dir, twilio, extra)
}

/// The same with the state directory `state_dir` (to restart on the same state).
pub fn config_text_in(state_dir: &std::path::Path, twilio: &str, extra: &str) -> String {
    header(state_dir, twilio)
        + &format!(
            r#"
[[cbo]]
key = "a"
ingest_token_env = "TOKEN_A"
account_sid = "AC0000000000000000000000000000000a"
auth_token_env = "TWILIO"
workspace_sid = "WS0000000000000000000000000000000a"
workflow_sid = "WW0000000000000000000000000000000a"

[[cbo]]
key = "b"
ingest_token_env = "TOKEN_B"
account_sid = "AC0000000000000000000000000000000b"
auth_token_env = "TWILIO"
workspace_sid = "WS0000000000000000000000000000000b"
workflow_sid = "WW0000000000000000000000000000000b"
{extra}
"#
        )
}

/// `[server]` on a loopback port with the admin token in `ADMIN` and the state in `state_dir`,
/// and `[twilio]` with every base URL at `twilio`.
pub fn header(state_dir: &std::path::Path, twilio: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_token_env = "ADMIN"
state_dir = "{}"

[twilio]
taskrouter_url = "{twilio}"
serverless_url = "{twilio}"
flex_url = "{twilio}"
monitor_url = "{twilio}"
"#,
        state_dir.display()
    )
}

pub fn env() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        ("ADMIN", ADMIN),
        ("TOKEN_A", TOKEN_A),
        ("TOKEN_B", TOKEN_B),
        ("TWILIO", "twilio-secret"),
    ])
}

pub fn config(extra: &str) -> Config {
    config_with(NO_TWILIO, extra)
}

pub fn config_with(twilio: &str, extra: &str) -> Config {
    let env = env();
    let checked = check_str(&config_text_with(twilio, extra), &|k| {
        env.get(k).map(|v| v.to_string())
    });
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    checked.config.unwrap()
}

/// A config from `text`, keeping the non-fatal problems (a bad workflow SID) that the daemon
/// must report rather than refuse.
pub fn lenient(text: &str) -> Config {
    let env = env();
    let checked = check_str(text, &|k| env.get(k).map(|v| v.to_string()));
    assert!(
        !checked.problems.iter().any(|p| p.fatal),
        "{:?}",
        checked.problems
    );
    checked.config.unwrap()
}

/// The daemon from `text`, its clock reading `at_ms` now.
pub async fn start_at(text: &str, at_ms: i64) -> App {
    App::start_with_clock(lenient(text), Clock::starting_at(at_ms))
        .await
        .unwrap()
}

/// Parses `lines` and hands them to `cbo` at the daemon's now, as an ingest path would; none may
/// be rejected.
pub fn ingest_lines(app: &App, cbo: &str, lines: &[String]) {
    ingest_events(
        app,
        cbo,
        lines.iter().map(|l| parse_line(l).unwrap()).collect(),
    );
}

/// Hands parsed `events` to `cbo` at the daemon's now; none may be rejected.
pub fn ingest_events(app: &App, cbo: &str, events: Vec<transfer_guard::event::Event>) {
    let mut rejected = Vec::new();
    let now = app.shared.clock.now_ms();
    app.shared
        .fleet
        .get(cbo)
        .unwrap()
        .ingest(events.into_iter().enumerate(), now, &mut rejected);
    assert!(rejected.is_empty(), "{rejected:?}");
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `lines` as one NDJSON body to `POST {url}/v1/events` with `token`.
pub async fn post_ndjson(url: &str, token: &str, lines: &[String]) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .bearer_auth(token)
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap()
}

/// A conversation SID that differs by `n`.
pub fn ch(n: u32) -> String {
    format!("CH{n:032x}")
}

/// One event as a JSON line; `extra` is spliced into the object (start it with a comma).
pub fn event(kind: &str, at_ms: i64, conversation: u32, extra: &str) -> String {
    format!(
        r#"{{"event":"{kind}","timestamp":"{}","conversation_sid":"{}","transfer_type":"cold","target_type":"worker"{extra}}}"#,
        rfc3339(at_ms),
        ch(conversation)
    )
}

/// The value of one series in a text exposition, e.g. `transfer_guard_history_lost_total{cbo="a"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

/// The sum of every series of `name` whose labels include all of `labels` (`k="v"` pairs).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The sum of every series of `name` of cbo `a` whose labels include all of `labels`, now.
pub fn sum_a(app: &App, name: &str, labels: &[&str]) -> f64 {
    let mut all = vec![r#"cbo="a""#];
    all.extend_from_slice(labels);
    metric_sum(&app.shared.metrics.render(), name, &all)
}

/// A loopback port free right now (for a daemon that must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tool's path, or `None` after saying (past the test harness' capture) that it is missing.
pub fn tool(name: &str, package: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let message =
            format!("{test}: {name} not found; install Debian's {package} (.ci/run does)");
        if std::env::var("TRANSFER_GUARD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("{message}");
        }
        let _ = writeln!(std::io::stderr(), "SKIPPED {message}");
    }
    found
}

/// Under a paused clock, lets the daemon's tasks run after the clock moved: the ticker and the
/// file sources, whose work runs on blocking threads. A paused clock does not auto-advance
/// while blocking work is in flight, so the short sleep ends only once that work is done.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// The log lines of a daemon spawned with `--log-format json` and a piped stderr.
pub type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Waits until a spawned daemon listens: its address, and its log lines from there on.
pub async fn listening(child: &mut tokio::process::Child) -> (String, LogLines) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("daemon exited before listening");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if v["fields"]["message"] == "transfer-guard listening" {
            return (v["fields"]["addr"].as_str().unwrap().to_string(), lines);
        }
    }
}
