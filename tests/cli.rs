//! The binary as operators run it: check, run (with SIGTERM), ingest, demo.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use transfer_guard::App;

const BIN: &str = env!("CARGO_BIN_EXE_transfer-guard");

fn tg() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    for (k, v) in env() {
        cmd.env(k, v);
    }
    cmd
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("transfer-guard.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn check_passes_a_sound_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_text(""));
    let out = tg()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ok (2 CBOs, offline)"), "{stdout}");
}

#[tokio::test]
async fn check_strict_also_fails_a_guard_that_could_not_act() {
    let dir = tempfile::tempdir().unwrap();
    let check = |path: std::path::PathBuf, strict: bool| async move {
        let mut cmd = tg();
        cmd.args(["check", "--config"]).arg(&path);
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd.output().await.unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Dry run (the default) and no integrations: a sound file...
    let path = write_config(&dir, &config_text(""));
    let (code, stdout) = check(path.clone(), false).await;
    assert_eq!(code, Some(0), "{stdout}");
    // ...but a pipeline installing a production file wants a guard that acts.
    let (code, stdout) = check(path, true).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.contains(": actions.dry_run is on"), "{stdout}");
    assert!(
        stdout.contains(": cbo a: no rollback and no disable integration"),
        "{stdout}"
    );
    let acting = config_text("")
        .replace(
            "[[cbo]]\nkey = \"a\"",
            "[actions]\ndry_run = false\n\n[[cbo]]\nkey = \"a\"",
        )
        .replace(
            "\n[[cbo]]\nkey = \"b\"",
            "rollback = [\"plugin_release\"]\n\n[[cbo]]\nkey = \"b\"",
        )
        .replace(
            "workflow_sid = \"WW0000000000000000000000000000000b\"",
            "workflow_sid = \"WW0000000000000000000000000000000b\"\ndisable = [\"flex_flag\"]",
        );
    let path = write_config(&dir, &acting);
    let (code, stdout) = check(path, true).await;
    assert_eq!(code, Some(0), "{acting}\n{stdout}");
    assert!(stdout.contains("ok (2 CBOs, offline)"), "{stdout}");
}

#[tokio::test]
async fn check_names_the_cbo_of_a_33_character_workflow_sid() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("").replace(
        "WW0000000000000000000000000000000b",
        "WW000000000000000000000000000000b",
    );
    let path = write_config(&dir, &text);
    let out = tg()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].contains("cbo b: ") && lines[0].contains("33 characters"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_reports_a_workflow_sid_shared_by_two_cbos_and_every_other_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("")
        .replace(
            "WW0000000000000000000000000000000b",
            "WW0000000000000000000000000000000a",
        )
        .replace(
            "ingest_token_env = \"TOKEN_B\"",
            "ingest_token_env = \"TOKEN_MISSING\"",
        )
        + "[[cbo]]\nkey = \"a\"\n";
    let path = write_config(&dir, &text);
    let out = tg()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "cbo b: workflow SID WW0000000000000000000000000000000a is also configured for cbo a"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("TOKEN_MISSING is not set"), "{stdout}");
    assert!(stdout.contains("duplicate CBO key \"a\""), "{stdout}");
}

#[tokio::test]
async fn run_refuses_an_invalid_file_with_its_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("[transfers]\ntimeout = \"soon\"\n");
    let path = write_config(&dir, &text);
    let out = tg()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = text.lines().position(|l| l.contains("soon")).unwrap() + 1;
    assert!(stderr.contains(&format!("line {line}: ")), "{stderr}");
    assert!(stderr.contains("soon"), "{stderr}");
}

#[tokio::test]
async fn run_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_text(""));
    let mut child = tg()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _lines) = listening(&mut child).await;
    // Ready once every CBO's first poll has finished (here they fail: no Twilio on loopback).
    let mut status = 0;
    for _ in 0..100 {
        status = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `transfer-guard ingest FILE` with cbo a's token: the exit status, stdout and stderr.
async fn ingest_as_a(app: &App, path: &std::path::Path) -> (std::process::Output, String, String) {
    let out = tg()
        .args(["ingest", "--server", &app.url(), "--token-env", "TOKEN_A"])
        .arg(path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// A daemon whose `max_body_bytes` is smaller than the client's batches answers 413; the
/// client sends each batch again in halves until they fit, and still numbers every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_halves_batches_a_daemon_with_a_small_body_limit_refuses() {
    let mut config = config("");
    config.server.max_body_bytes = 64 * 1024;
    let app = App::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = chrono::Utc::now().timestamp_millis() - 60_000;
    // Over 400 KB in one batch: cut at least three times over.
    let mut text = String::new();
    let mut bad = Vec::new();
    for i in 0..3000u32 {
        if i == 1 || i == 1777 || i == 2999 {
            text += "Transfer failed: TypeError: x is undefined\n";
            bad.push(i + 1);
            continue;
        }
        text += &event("initiated", t, i, "");
        text.push('\n');
    }
    assert!(text.len() > 6 * 64 * 1024, "{}", text.len());
    let path = dir.path().join("transfers.log");
    std::fs::write(&path, text).unwrap();
    let (out, stdout, stderr) = ingest_as_a(&app, &path).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("3000 lines, 2997 accepted, 3 rejected"),
        "{stdout}{stderr}"
    );
    for line in bad {
        assert!(
            stderr.contains(&format!("transfers.log:{line}: not a JSON event object")),
            "line {line} not reported: {stderr}"
        );
    }
    let m = app.shared.metrics.render();
    assert_eq!(
        metric_sum(&m, "transfer_guard_events_ingested_total", &[r#"cbo="a""#]),
        2997.0
    );
    assert!(
        metric_sum(
            &m,
            "transfer_guard_events_rejected_total",
            &[r#"cbo="a""#, r#"reason="too_large""#]
        ) >= 4.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sends_a_file_and_reports_rejected_lines_by_number() {
    let app = App::start(config("")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = chrono::Utc::now().timestamp_millis() - 60_000;
    // 5,003 lines in two batches: a bad line in the first, one in the middle and the last is
    // each reported by its own number, in order.
    let mut text = String::from("Transfer failed: TypeError: x is undefined\n");
    for i in 0..2500u32 {
        text += &event("initiated", t, i, "");
        text.push('\n');
        text += &format!(
            "[ConversationTransfer] completed: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\"}}\n",
            rfc3339(t + 3000),
            ch(i)
        );
        if i == 1200 {
            text += "Transfer failed: TypeError: y is undefined\n";
        }
    }
    text += "Transfer failed: TypeError: z is undefined\n";
    let path = dir.path().join("transfers.log");
    std::fs::write(&path, text).unwrap();
    let (out, stdout, stderr) = ingest_as_a(&app, &path).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("5003 lines, 5000 accepted, 3 rejected"),
        "{stdout}"
    );
    let at = |line: &str| {
        stderr
            .find(&format!("transfers.log:{line}: not a JSON event object"))
            .unwrap_or_else(|| panic!("line {line} not reported: {stderr}"))
    };
    assert!(at("1") < at("2404") && at("2404") < at("5003"), "{stderr}");
    let m = app.shared.metrics.render();
    assert_eq!(
        metric_sum(
            &m,
            "transfer_guard_transfers_total",
            &[r#"cbo="a""#, r#"outcome="completed""#]
        ),
        2500.0
    );

    let out = tg()
        .args([
            "ingest",
            "--server",
            &app.url(),
            "--token-env",
            "ADMIN_WRONG",
        ])
        .arg(&path)
        .env("ADMIN_WRONG", "nope")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    app.shutdown().await;
}

/// A server that answers 401 once it has a request's head and 64 KiB of its body, and closes
/// the connection with the rest unread (the kernel resets it) while other batches are being
/// written: `ingest` reports the token (exit 3) and is not killed on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_told_401_in_the_middle_of_a_body_exits_3_naming_the_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                // The head and a little of the body: the client is in the middle of it.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() < 64 * 1024 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"error":"unauthorized"}"#;
                let _ = socket
                    .write_all(
                        format!(
                            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.log");
    // 3.3 MB: batches of 420 KB, four in flight, more than the socket buffers take at once.
    std::fs::write(&path, format!("{}\n", "x".repeat(400)).repeat(8_000)).unwrap();
    for _ in 0..3 {
        let out = tg()
            .args(["ingest", "--server", &url, "--token-env", "T"])
            .arg(&path)
            .env("T", "wrong")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{:?}: {stderr}", out.status);
        assert!(stderr.contains("refused the token (401)"), "{stderr}");
    }
}

#[tokio::test]
async fn ingest_reports_an_unreachable_server_as_could_not_run() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    std::fs::write(&path, event("initiated", 0, 1, "")).unwrap();
    let out = tg()
        .args([
            "ingest",
            "--server",
            &format!("http://{addr}"),
            "--token-env",
            "TOKEN_A",
        ])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn demo_shows_transfers_on_metrics_within_ten_seconds() {
    let mut child = tg()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("demo exited early");
        if let Some(url) = line.trim().strip_prefix("metrics: ") {
            break url.to_string();
        }
    };
    let started = tokio::time::Instant::now();
    let mut total = 0.0;
    while started.elapsed() < Duration::from_secs(10) && total == 0.0 {
        if let Ok(resp) = reqwest::get(&url).await {
            total = metric_sum(
                &resp.text().await.unwrap(),
                "transfer_guard_transfers_total",
                &[],
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(total > 0.0, "no transfers on {url} after 10 s");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn the_example_config_in_deploy_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/transfer-guard.toml");
    let out = tg()
        .args(["check", "--config", path])
        .env("TRANSFER_GUARD_ADMIN_TOKEN", "admin")
        .env("TRANSFER_GUARD_INGEST_TOKEN_NSS", "nss")
        .env("TRANSFER_GUARD_INGEST_TOKEN_CLIENTA", "clienta")
        .env("TWILIO_AUTH_TOKEN_NSS", "x")
        .env("TWILIO_API_KEY_SECRET_CLIENTA", "x")
        .env(
            "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_NSS",
            "WW0123456789abcdef0123456789abcdef",
        )
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_reads_standard_input() {
    use tokio::io::AsyncWriteExt;
    let app = App::start(config("")).await.unwrap();
    let t = chrono::Utc::now().timestamp_millis() - 10_000;
    let mut child = tg()
        .args([
            "ingest",
            "--server",
            &app.url(),
            "--token-env",
            "TOKEN_B",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let body = format!(
        "{}\n{}\n",
        event("initiated", t, 1, ""),
        event("completed", t + 900, 1, "")
    );
    stdin.write_all(body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 lines, 2 accepted, 0 rejected"));
    let m = app.shared.metrics.render();
    assert_eq!(
        metric_sum(
            &m,
            "transfer_guard_transfers_total",
            &[r#"cbo="b""#, r#"outcome="completed""#]
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_asks_twilio_and_names_each_problem() {
    use transfer_guard::sim::twilio::SimTwilio;
    let sim = SimTwilio::start(transfer_guard::clock::Clock::new()).await;
    let a = (
        "AC0000000000000000000000000000000a",
        "WS0000000000000000000000000000000a",
        "WW0000000000000000000000000000000a",
    );
    let b = (
        "AC0000000000000000000000000000000b",
        "WS0000000000000000000000000000000b",
        "WW0000000000000000000000000000000b",
    );
    for (ac, ws, ww) in [a, b] {
        sim.add_account(ac, "twilio-secret");
        sim.add_workflow(ac, ws, ww);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_text_with(&sim.url(), ""));
    let out = tg()
        .args(["check", "--online", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ok (2 CBOs, online)"), "{stdout}");

    sim.remove_workflow(b.0, b.1, b.2);
    let only_worker = r#"{"task_routing":{"filters":[{"expression":"transferTargetType == 'worker'","targets":[{"queue":"everyone"}]}]}}"#;
    sim.set_workflow(a.0, a.1, a.2, only_worker);
    let out = tg()
        .args(["check", "--online", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "cbo a: workflow {}: does not route transferTargetType == 'queue'",
            a.2
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("cbo b: workflow {}: TaskRouter 404", b.2)),
        "{stdout}"
    );
    assert!(
        stdout.contains("cbo a: config_mismatch: present before any deployment"),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_demo_plays_the_whole_cycle_deploy_breach_rollback_recovery() {
    let out = tg()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--breach-after",
            "3s",
            "--duration",
            "75s",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let at = |needle: &str| {
        stdout
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{stdout}"))
    };
    let deploy = at("scenario: nss deploys build");
    // The bad build silences the plugin too: only Twilio's record (the functions' error lines,
    // the debugger) shows the Bad Requests that the rollback is decided on.
    let silent = at("scenario: nss's plugin stops logging transfers");
    assert!(deploy < silent, "{stdout}");
    // The deploy's validation window fails on its first Bad Request, or a rule breaches first:
    // either way the intent, then the rollback to the known-good build.
    let intent = at("nss: intent to rollback (serverless)");
    // Decided while the plugin was silent: the validation window failed (on a Bad Request from
    // the functions' logs, or on the corrupted configuration), or a rule breached first.
    let decided = &stdout[silent..intent];
    assert!(
        decided.contains("nss: validation window for") || decided.contains("nss: rule "),
        "{stdout}"
    );
    assert!(
        stdout.contains("scenario: nss's plugin logs transfers again"),
        "{stdout}"
    );
    let sources = stdout[silent..]
        .lines()
        .find(|l| l.contains("nss: sources so far"))
        .unwrap_or_else(|| panic!("no sources line:\n{stdout}"));
    assert!(
        sources.contains("first seen in the functions' logs"),
        "{sources}"
    );
    let rollback = at("fired: redeployed build");
    let recovered = stdout[rollback..]
        .lines()
        .find(|l| l.contains("] nss ") && l.contains("workflow ok | breached: none"))
        .and_then(|l| stdout[rollback..].find(l))
        .map(|i| i + rollback)
        .unwrap_or_else(|| panic!("nss never recovered:\n{stdout}"));
    assert!(
        deploy < intent && intent < rollback && rollback < recovered,
        "{stdout}"
    );
    assert!(
        !stdout.contains("clienta: rollback"),
        "clienta is left alone: {stdout}"
    );
    // It ends by itself with a summary of what happened.
    let closing = &stdout[at("demo over. What happened:")..];
    let nss = closing
        .lines()
        .find(|l| l.trim_start().starts_with("nss "))
        .unwrap_or_else(|| panic!("{closing}"));
    assert!(nss.contains("rollback (serverless) at"), "{nss}");
    // The quiet CBO's deployment is judged by its test transfers, not left inconclusive.
    let quiet = stdout
        .lines()
        .find(|l| l.contains("quiet: validation window for"))
        .unwrap_or_else(|| panic!("no quiet window ended:\n{stdout}"));
    assert!(
        quiet.contains(" passed: ") && quiet.contains("test_transfers_routed"),
        "{quiet}"
    );
}

#[tokio::test]
async fn decisions_shows_a_breach_with_the_failing_conversations_for_connie_support() {
    // Dry run: a Bad Request minute breaches, its decision is logged with the conversations.
    let app = App::start(lenient(&config_text(
        "[rules.bad_requests]\nminutes = 1\nwindow = \"1m\"\n",
    )))
    .await
    .unwrap();
    let now = app.shared.clock.now_ms();
    let failed = |n: u32| {
        event(
            "failed",
            now - 1_000,
            n,
            &format!(
                r#","transfer_id":"t{n}","error":{{"status":400,"message":"TaskRouter error: Bad Request"}}"#
            ),
        )
    };
    let lines: Vec<String> = (1..=12)
        .flat_map(|n| {
            [
                event(
                    "initiated",
                    now - 2_000,
                    n,
                    &format!(r#","transfer_id":"t{n}""#),
                ),
                failed(n),
            ]
        })
        .collect();
    ingest_lines(&app, "a", &lines);
    let mut logged = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        logged = app
            .shared
            .actions
            .log
            .query(Some("a"), None)
            .iter()
            .any(|e| e.kind == transfer_guard::decisions::Kind::Action);
        if logged {
            break;
        }
    }
    assert!(logged, "the breach was decided");
    let out = tg()
        .args([
            "decisions",
            "--server",
            &app.url(),
            "--cbo",
            "a",
            "--token-env",
            "ADMIN",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("rule bad_requests"), "{stdout}");
    // No rollback integration is configured here: the decision is recorded as held back.
    assert!(
        stdout.contains("for bad_requests: suppressed: "),
        "{stdout}"
    );
    let named = stdout
        .lines()
        .filter(|l| l.contains(&format!("conversation {}", ch(12))))
        .count();
    assert!(named >= 1, "{stdout}");
    assert!(
        stdout.contains("(transfer t12)")
            && stdout.contains(": TaskRouter error: Bad Request (status 400)"),
        "{stdout}"
    );
    // Ten at most per entry, newest first: t1 and t2 are left out.
    assert!(
        !stdout.contains(&format!("conversation {} ", ch(1))),
        "{stdout}"
    );
    // A server that is not there: could not run, and why.
    let out = tg()
        .args([
            "decisions",
            "--server",
            "http://127.0.0.1:9",
            "--token-env",
            "ADMIN",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn usage_errors_exit_3_could_not_run_and_never_2_which_validate_means_inconclusive() {
    for args in [
        vec!["validate", "--cbo", "a"], // --server and --deployment missing
        vec!["validate", "--server", "http://127.0.0.1:9"], // --cbo missing
        vec!["no-such-command"],
        vec!["check"], // --config missing
        vec!["bench", "pipeline", "--events", "many"],
    ] {
        let out = tg().args(&args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty(), "{args:?}");
    }
    let help = tg().arg("--help").output().await.unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("validate"));
}

#[tokio::test]
async fn on_call_status_switch_and_ack_from_a_shell() {
    let app = App::start(lenient(&config_text(""))).await.unwrap();
    let url = app.url();
    let run = |args: Vec<&str>| {
        let mut c = tg();
        c.args(&args).args(["--server", &url]).env("ADMIN", ADMIN);
        c.args(["--token-env", "ADMIN"]);
        c.output()
    };
    let out = run(vec!["status"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.lines().next().unwrap().starts_with("CBO"),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("a ")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("b ")), "{stdout}");

    // Cold transfers off alone, then everything back on.
    let out = run(vec![
        "switch",
        "--cbo",
        "a",
        "off",
        "--feature",
        "cold_transfer",
        "--reason",
        "INC-42",
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("a: transfers on, cold transfers off, multi-participant on (INC-42)"),
        "{stdout}"
    );
    let out = run(vec!["status", "--cbo", "a"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OFF:cold"), "{stdout}");
    let out = run(vec!["switch", "--cbo", "a", "on"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("a: transfers on, cold transfers on"));

    // Nothing to acknowledge: the daemon's reason, exit 3.
    let out = run(vec!["ack", "--cbo", "a"]).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("409"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A CBO's token cannot switch; an unknown CBO is named.
    let out = tg()
        .args([
            "switch",
            "--server",
            &url,
            "--cbo",
            "a",
            "off",
            "--token-env",
            "TA",
        ])
        .env("TA", TOKEN_A)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = run(vec!["status", "--cbo", "zz"]).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"zz\""));
    // A daemon that is not there: the cause, not "error sending request" alone.
    let out = tg()
        .args([
            "status",
            "--server",
            "http://127.0.0.1:9",
            "--token-env",
            "ADMIN",
        ])
        .env("ADMIN", ADMIN)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One cause, said once, the URL once.
    assert_eq!(
        stderr,
        "transfer-guard status: http://127.0.0.1:9/v1/status: connection refused\n"
    );
    let one = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(one.path(), "{}\n").unwrap();
    let one = one.path().to_str().unwrap();
    for args in [
        vec!["decisions"],
        vec![
            "validate",
            "--cbo",
            "a",
            "--deployment",
            "ZE00000000000000000000000000000001",
        ],
        vec!["ingest", one],
    ] {
        let out = tg()
            .args(&args)
            .args(["--server", "http://127.0.0.1:9", "--token-env", "ADMIN"])
            .env("ADMIN", ADMIN)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.ends_with(": connection refused"), "{args:?}: {stderr}");
        assert_eq!(last.matches("127.0.0.1:9").count(), 1, "{args:?}: {stderr}");
        assert!(
            !stderr.contains("error sending request"),
            "{args:?}: {stderr}"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn logs_carry_no_colour_codes_when_not_on_a_terminal() {
    let out = tg()
        .args(["demo", "--listen", "127.0.0.1:0", "--duration", "2s"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("transfer-guard listening"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

#[tokio::test]
async fn ingest_reports_undecodable_and_oversize_lines_by_number_and_sends_every_good_one() {
    let app = App::start(config("")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = chrono::Utc::now().timestamp_millis() - 60_000;
    let mut bytes = b"\xEF\xBB\xBF".to_vec(); // a BOM before the first line
    for i in 0..3u32 {
        bytes.extend_from_slice(event("initiated", t, i, "").as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"{\"event\":\"in\xFFitiated\"}\n"); // line 4: not UTF-8
    bytes.extend_from_slice(&vec![b'x'; 100_000]); // line 5: 100 kB
    bytes.push(b'\n');
    for i in 3..5u32 {
        bytes.extend_from_slice(event("initiated", t, i, "").as_bytes());
        bytes.push(b'\n');
    }
    // 250 lines of garbage: more than the daemon lists in one reply.
    for _ in 0..250 {
        bytes.extend_from_slice(b"garbage\n");
    }
    let path = dir.path().join("mixed.log");
    std::fs::write(&path, &bytes).unwrap();
    let (out, stdout, stderr) = ingest_as_a(&app, &path).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("257 lines, 5 accepted, 252 rejected"),
        "{stdout}"
    );
    assert!(
        stderr.contains("mixed.log:4: line is not UTF-8"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mixed.log:5: line of 100000 bytes, over 65536: not sent"),
        "{stderr}"
    );
    assert!(stderr.contains("mixed.log:8: "), "{stderr}");
    assert!(stderr.contains("and 150 more rejected lines"), "{stderr}");
    app.shutdown().await;
}

#[tokio::test]
async fn under_systemd_run_says_ready_feeds_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_text(""));
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut child = tg()
        .args(["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 512];
    let mut said = Vec::new();
    // READY=1 once it serves, then WATCHDOG=1 every second (half of WATCHDOG_USEC) from the tick.
    while said
        .iter()
        .filter(|s: &&String| s.as_str() == "WATCHDOG=1")
        .count()
        < 2
    {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .expect("systemd hears from the daemon")
            .unwrap();
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        said[0].starts_with("READY=1\nSTATUS=guarding 2 CBOs on 127.0.0.1:"),
        "{said:?}"
    );
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let stopping = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .expect("systemd hears of the stop")
            .unwrap();
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        if s != "WATCHDOG=1" {
            break s;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
