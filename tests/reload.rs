//! Reloading the configuration in place (SIGHUP): what changes, what is kept, what is refused.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use transfer_guard::config::check_str;
use transfer_guard::rules::RuleId;
use transfer_guard::{App, ReloadError};

/// A configuration with `cbos` as (key, ingest token variable, workflow SID's last character).
fn config_of(state_dir: &Path, cbos: &[(&str, &str, char)], extra: &str) -> String {
    let mut t = header(state_dir, NO_TWILIO);
    for (key, token, ww) in cbos {
        t += &format!(
            r#"
[[cbo]]
key = "{key}"
ingest_token_env = "{token}"
account_sid = "AC0000000000000000000000000000000{key}"
auth_token_env = "TWILIO"
workspace_sid = "WS0000000000000000000000000000000{key}"
workflow_sid = "WW000000000000000000000000000000{ww}{key}"
"#
        );
    }
    t + extra
}

fn vars() -> HashMap<&'static str, &'static str> {
    let mut env = env();
    env.insert("TOKEN_A2", "token-a-rotated");
    env.insert("TOKEN_C", "token-c");
    env
}

fn parsed(text: &str) -> transfer_guard::config::Config {
    let env = vars();
    let checked = check_str(text, &|k| env.get(k).map(|v| v.to_string()));
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    checked.config.unwrap()
}

async fn post_events(app: &App, token: &str, lines: &[String]) -> u16 {
    post_ndjson(&app.url(), token, lines)
        .await
        .status()
        .as_u16()
}

/// A completed transfer at `at_ms`, conversation `n`.
fn transfer(at_ms: i64, n: u32) -> Vec<String> {
    vec![
        event("initiated", at_ms, n, ""),
        event("completed", at_ms + 2_000, n, ""),
    ]
}

fn completed(app: &App, cbo: &str) -> f64 {
    metric_sum(
        &app.shared.metrics.render(),
        "transfer_guard_transfers_total",
        &[&format!("cbo=\"{cbo}\""), "outcome=\"completed\""],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_each_kept_cbos_state_adds_and_removes_cbos_and_rotates_tokens() {
    let state = tempfile::tempdir().unwrap();
    let before = config_of(
        state.path(),
        &[("a", "TOKEN_A", '0'), ("b", "TOKEN_B", '0')],
        "",
    );
    let mut app = App::start(parsed(&before)).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() - 30_000;
    assert_eq!(post_events(&app, TOKEN_A, &transfer(now, 1)).await, 202);
    assert_eq!(post_events(&app, TOKEN_B, &transfer(now, 2)).await, 202);
    assert_eq!(completed(&app, "a"), 1.0);
    // A pipeline waits on a window of b, which the reload removes.
    let started: Value = reqwest::Client::new()
        .post(format!("{}/v1/validations", app.url()))
        .bearer_auth(ADMIN)
        .json(&json!({"cbo": "b", "deployment": "ZE00000000000000000000000000000001"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let window = started["id"].as_str().expect("a window id").to_string();

    // a: a stricter threshold and a rotated token; b removed; c added.
    let after = config_of(
        state.path(),
        &[("a", "TOKEN_A2", '0'), ("c", "TOKEN_C", '0')],
        "\n[rules.success_rate]\nthreshold = 0.99\n",
    );
    let reloaded = app.reload(parsed(&after)).await.unwrap();
    assert_eq!(reloaded.added, vec!["c"]);
    assert_eq!(reloaded.removed, vec!["b"]);
    // Nothing a's pollers read changed: they were not restarted.
    assert!(reloaded.restarted.is_empty(), "{reloaded:?}");

    // a kept its transfers, and judges them on the new threshold.
    assert_eq!(completed(&app, "a"), 1.0);
    let threshold = app
        .shared
        .engine()
        .params("a", RuleId::SuccessRate)
        .unwrap()
        .threshold;
    assert_eq!(threshold, 0.99);
    // The old token no longer writes; the new one does.
    assert_eq!(post_events(&app, TOKEN_A, &transfer(now, 3)).await, 401);
    assert_eq!(
        post_events(&app, "token-a-rotated", &transfer(now, 3)).await,
        202
    );
    assert_eq!(completed(&app, "a"), 2.0);
    // b is gone: its token, its series; its window ended with the reason.
    assert_eq!(post_events(&app, TOKEN_B, &transfer(now, 4)).await, 401);
    let rendered = app.shared.metrics.render();
    assert!(!rendered.contains("cbo=\"b\""), "{rendered}");
    let v = app.shared.validations.get(&window).unwrap();
    assert_eq!(v.state.as_str(), "inconclusive");
    assert!(
        v.reason
            .as_deref()
            .unwrap()
            .contains("removed from the configuration"),
        "{v:?}"
    );
    // c is guarded from now on.
    assert_eq!(post_events(&app, "token-c", &transfer(now, 5)).await, 202);
    assert_eq!(completed(&app, "c"), 1.0);
    assert!(app.shared.actions.switch("c").is_some());

    // A CBO whose workflow changed has its pollers started again (and only that one).
    let moved = config_of(
        state.path(),
        &[("a", "TOKEN_A2", '1'), ("c", "TOKEN_C", '0')],
        "\n[rules.success_rate]\nthreshold = 0.99\n",
    );
    let reloaded = app.reload(parsed(&moved)).await.unwrap();
    assert_eq!(reloaded.restarted, vec!["cbo a"]);
    assert!(reloaded.added.is_empty() && reloaded.removed.is_empty());
    assert_eq!(completed(&app, "a"), 2.0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_needs_a_restart_is_refused_whole() {
    let state = tempfile::tempdir().unwrap();
    let before = config_of(state.path(), &[("a", "TOKEN_A", '0')], "");
    let mut app = App::start(parsed(&before)).await.unwrap();
    let after = config_of(
        state.path(),
        &[("a", "TOKEN_A2", '0'), ("c", "TOKEN_C", '0')],
        "\n[transfers]\ntimeout = \"2m\"\n",
    )
    .replace("127.0.0.1:0", "127.0.0.1:1");
    let err = app.reload(parsed(&after)).await.unwrap_err();
    let ReloadError::NeedsRestart(keys) = &err else {
        panic!("{err}");
    };
    assert_eq!(keys, &["server.listen", "transfers"]);
    assert!(err.to_string().contains("nothing was reloaded"), "{err}");
    // Nothing of it was taken: the old token works, c does not exist.
    let now = chrono::Utc::now().timestamp_millis() - 30_000;
    assert_eq!(post_events(&app, TOKEN_A, &transfer(now, 1)).await, 202);
    assert_eq!(post_events(&app, "token-c", &transfer(now, 2)).await, 401);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_logged_counted_and_the_old_configuration_kept() {
    let state = tempfile::tempdir().unwrap();
    let before = config_of(state.path(), &[("a", "TOKEN_A", '0')], "");
    let mut app = App::start(parsed(&before)).await.unwrap();
    let file = state.path().join("transfer-guard.toml");
    std::fs::write(
        &file,
        before.replace("key = \"a\"", "key = \"a\"\nthreshold = "),
    )
    .unwrap();
    let err = app.reload_file(&file).await.unwrap_err().to_string();
    let line = before.lines().position(|l| l == "key = \"a\"").unwrap() + 2;
    assert!(err.contains(&format!("line {line}: ")), "{err}");
    let metrics = app.shared.metrics.render();
    assert_eq!(
        metric(
            &metrics,
            "transfer_guard_config_reloads_total{result=\"refused\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "transfer_guard_config_last_reload_successful"),
        Some(0.0)
    );
    let now = chrono::Utc::now().timestamp_millis() - 30_000;
    assert_eq!(post_events(&app, TOKEN_A, &transfer(now, 1)).await, 202);
    // A file that is gone is refused too, naming it.
    let gone = state.path().join("missing.toml");
    let err = app.reload_file(&gone).await.unwrap_err().to_string();
    assert!(err.contains("missing.toml"), "{err}");
    app.shutdown().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_transfer-guard");

fn signal(child: &tokio::process::Child, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Polls `url` until `ok` holds for its body (the daemon acts on a signal asynchronously).
async fn eventually(url: &str, token: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    let client = reqwest::Client::new();
    let mut last = String::new();
    for _ in 0..100 {
        let resp = client.get(url).bearer_auth(token).send().await.unwrap();
        let status = resp.status().as_u16();
        last = resp.text().await.unwrap();
        if ok(status, &last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never came true; last answer: {last}");
}

#[tokio::test]
async fn sighup_reloads_a_running_daemon_and_refuses_a_bad_file_without_stopping() {
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("transfer-guard.toml");
    std::fs::write(
        &path,
        config_of(
            state.path(),
            &[("a", "TOKEN_A", '0'), ("b", "TOKEN_B", '0')],
            "",
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    for (k, v) in vars() {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, mut lines) = listening(&mut child).await;
    // The log goes on being read, so the daemon never blocks on a full pipe.
    let (said, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = said.send(line);
        }
    });
    let base = format!("http://{addr}");
    let now = chrono::Utc::now().timestamp_millis() - 30_000;
    let post = |token: &'static str, n: u32| {
        let base = base.clone();
        async move {
            post_ndjson(&base, token, &transfer(now, n))
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(post(TOKEN_A, 1).await, 202);

    // Add c, drop b: SIGHUP takes it without a restart.
    std::fs::write(
        &path,
        config_of(
            state.path(),
            &[("a", "TOKEN_A", '0'), ("c", "TOKEN_C", '0')],
            "",
        ),
    )
    .unwrap();
    signal(&child, "HUP");
    let metrics = eventually(&format!("{base}/metrics"), "", |_, body| {
        body.contains("transfer_guard_config_reloads_total{result=\"applied\"} 1")
    })
    .await;
    assert!(metrics.contains("cbo=\"c\""));
    assert!(!metrics.contains("cbo=\"b\""));
    assert_eq!(
        metric_sum(
            &metrics,
            "transfer_guard_transfers_total",
            &["cbo=\"a\"", "outcome=\"completed\""]
        ),
        1.0,
        "a's transfer outlived the reload"
    );
    assert_eq!(post("token-c", 2).await, 202);
    assert_eq!(post(TOKEN_B, 3).await, 401);

    // A broken file: refused, counted, logged with its line; the daemon goes on as it was.
    std::fs::write(&path, "[server\nlisten = 1\n").unwrap();
    signal(&child, "HUP");
    eventually(&format!("{base}/metrics"), "", |_, body| {
        body.contains("transfer_guard_config_reloads_total{result=\"refused\"} 1")
            && body.contains("transfer_guard_config_last_reload_successful 0")
    })
    .await;
    let refused = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .expect("the refusal is logged")
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("configuration reload refused"))
        {
            break v;
        }
    };
    assert_eq!(refused["level"], "ERROR");
    assert!(
        refused["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{refused}"
    );
    assert_eq!(post("token-c", 4).await, 202);
    assert!(child.try_wait().unwrap().is_none(), "still running");

    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_in_the_secrets_dir_takes_effect_at_the_reload() {
    let state = tempfile::tempdir().unwrap();
    let secrets = state.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    for (var, value) in [("ADMIN", ADMIN), ("TOKEN_A", "first\n"), ("TWILIO", "x")] {
        std::fs::write(secrets.join(var), value).unwrap();
    }
    let text = config_of(state.path(), &[("a", "TOKEN_A", '0')], "").replace(
        "[twilio]",
        &format!("secrets_dir = \"{}\"\n\n[twilio]", secrets.display()),
    );
    let file = state.path().join("transfer-guard.toml");
    std::fs::write(&file, &text).unwrap();
    let (config, _) = transfer_guard::config::Config::load(&file).unwrap();
    let mut app = App::start(config).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() - 30_000;
    // The file's trailing newline is not part of the token.
    assert_eq!(post_events(&app, "first", &transfer(now, 1)).await, 202);

    std::fs::write(secrets.join("TOKEN_A"), "second\n").unwrap();
    // Until the reload, the token in force is the one read at the start.
    assert_eq!(post_events(&app, "second", &transfer(now, 2)).await, 401);
    app.reload_file(&file).await.unwrap();
    assert_eq!(post_events(&app, "first", &transfer(now, 3)).await, 401);
    assert_eq!(post_events(&app, "second", &transfer(now, 4)).await, 202);
    assert_eq!(completed(&app, "a"), 2.0);

    // An empty secret file is refused with its name, and the rotated token stays in force.
    std::fs::write(secrets.join("TOKEN_A"), "\n").unwrap();
    let err = app.reload_file(&file).await.unwrap_err().to_string();
    assert!(err.contains("TOKEN_A is empty"), "{err}");
    assert_eq!(post_events(&app, "second", &transfer(now, 5)).await, 202);
    app.shutdown().await;
}
