//! Alert rules, dashboards and /metrics proven with the real tools: promtool, Prometheus and
//! Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`, installed by `.ci/run`).
//! Without them each test says so on standard error and does nothing; with
//! `TRANSFER_GUARD_REQUIRE_TOOLS=1` (as `.ci/run` sets) a missing tool fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::process::Command;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::{SimTwilio, TaskEvent};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

async fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().await.unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn promtool_checks_and_unit_tests_the_alert_rules() {
    let Some(promtool) = tool("promtool", "prometheus", "alert rules") else {
        return;
    };
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(Path::new(ROOT).join("alerts/transfer-guard.rules.yml")))
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 27 rules found"), "{out}");
    let tests: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("alerts/tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    assert!(!tests.is_empty());
    let (ok, out) = run(Command::new(&promtool).args(["test", "rules"]).args(&tests)).await;
    assert!(ok, "{out}");
}

/// A daemon with every kind of series present: transfers, a breach (dry run, so actions are
/// counted), TaskRouter statistics, a validation window.
async fn busy_daemon(extra: &str) -> (App, SimTwilio) {
    let sim = SimTwilio::start(Clock::new()).await;
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
        sim.record_tasks(ac, ww, TaskEvent::Entered, 50);
        sim.record_tasks(ac, ww, TaskEvent::Canceled, 1);
    }
    let text = config_text_with(&sim.url(), extra);
    let app = App::start(lenient(&text)).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut lines = Vec::new();
    for (i, ago) in [150_000i64, 90_000, 30_000, 20_000, 10_000]
        .into_iter()
        .enumerate()
    {
        let id = format!(r#","transfer_id":"b{i}""#);
        lines.push(event("initiated", now - ago, i as u32, &id));
        lines.push(event("notified", now - ago + 900, i as u32, &id));
        lines.push(if i < 3 {
            event(
                "failed",
                now - ago + 500,
                i as u32,
                &(id + r#","error":{"status":400,"message":"TaskRouter error: Bad Request"}"#),
            )
        } else {
            event(
                "completed",
                now - ago + 4_000,
                i as u32,
                &(id + r#","history_preserved":true"#),
            )
        });
    }
    let resp = post_ndjson(&app.url(), TOKEN_A, &lines).await;
    assert_eq!(resp.status(), 202);
    app.shared
        .validations
        .start(
            "a",
            "ZD1",
            Duration::from_secs(900),
            20,
            "api",
            app.shared.clock.now_ms(),
        )
        .unwrap();
    // Polls and a tick or two.
    for _ in 0..50 {
        let m = app.shared.metrics.render();
        if m.contains("transfer_guard_taskrouter_error_ratio{")
            && metric_sum(&m, "transfer_guard_actions_total", &[r#"result="dry_run""#]) > 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (app, sim)
}

async fn scrape(app: &App) -> String {
    reqwest::get(format!("{}/metrics", app.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_metrics_output_passes_promtool_check_metrics() {
    let Some(promtool) = tool("promtool", "prometheus", "check metrics") else {
        return;
    };
    let (app, _sim) = busy_daemon("").await;
    let text = scrape(&app).await;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    app.shutdown().await;
}

/// A series as `name{k1,k2}`: its name and label names, sorted, leaving out `instance` and
/// `job` (Prometheus adds them) and `le`.
fn shape(series: &str) -> Option<String> {
    let series = series.trim();
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.rsplit_once('}')?.0),
        None => (series.split_whitespace().next()?, ""),
    };
    let mut keys: Vec<&str> = labels
        .split(',')
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| !matches!(*k, "instance" | "job" | "le"))
        .collect();
    keys.sort();
    Some(format!("{name}{{{}}}", keys.join(",")))
}

#[tokio::test]
async fn the_alert_tests_feed_only_series_the_daemon_really_exports() {
    let (app, _sim) = busy_daemon("").await;
    let capture = scrape(&app).await;
    let exported: std::collections::BTreeSet<String> = capture
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| shape(l.rsplit_once(' ')?.0))
        .collect();
    for entry in std::fs::read_dir(Path::new(ROOT).join("alerts/tests")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for series in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- series: "))
        {
            let series = series.trim_matches('\'');
            if series.starts_with("up{") {
                continue; // Prometheus's own.
            }
            let s = shape(series).unwrap();
            assert!(
                exported.contains(&s),
                "{}: {series} ({s}) is not a series of a real /metrics capture",
                path.display()
            );
        }
    }
    app.shutdown().await;
}

/// Every PromQL expression of the dashboards, with Grafana's variables filled in.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in ["transfer-guard-overview.json", "transfer-guard-fleet.json"] {
        let dash: Value = serde_json::from_slice(
            &std::fs::read(Path::new(ROOT).join("dashboards").join(name)).unwrap(),
        )
        .unwrap();
        assert!(
            dash["schemaVersion"].as_u64().unwrap() >= 36,
            "{name}: schemaVersion"
        );
        let text = dash.to_string();
        assert!(
            !text.contains("\"uid\":\"prometheus\""),
            "{name}: a hard-coded datasource UID"
        );
        let mut exprs: Vec<String> = Vec::new();
        for p in dash["panels"].as_array().unwrap() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: panel {}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                exprs.push(t["expr"].as_str().unwrap().to_string());
            }
        }
        for a in dash["annotations"]["list"].as_array().unwrap() {
            if let Some(e) = a["expr"].as_str() {
                exprs.push(e.to_string());
            }
        }
        for e in exprs {
            let filled = e
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$cbo", "nss|quiet")
                .replace("$job", "transfer-guard")
                .replace("$instance", ".*");
            out.push((name.to_string(), filled));
        }
    }
    out
}

#[tokio::test]
async fn every_promql_expression_parses_and_names_only_exported_metrics() {
    let Some(promtool) = tool("promtool", "prometheus", "PromQL in dashboards") else {
        return;
    };
    // promtool parses an expression when it is a recording rule.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15, "{}", exprs.len());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("dashboards.rules.yml");
    let mut yaml = String::from("groups:\n- name: dashboards\n  rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        yaml += &format!(
            "  - record: dashboard:expr_{i}\n    expr: {}\n",
            serde_json::to_string(e).unwrap()
        );
    }
    std::fs::write(&rules, yaml).unwrap();
    let (ok, out) = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules)).await;
    assert!(ok, "a dashboard expression does not parse:\n{out}");

    // Every transfer_guard_* name in the rules and dashboards is on a running daemon's /metrics.
    let (app, _sim) = busy_daemon("").await;
    let exported = scrape(&app).await;
    let exported: std::collections::HashSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let mut sources = vec![
        std::fs::read_to_string(Path::new(ROOT).join("alerts/transfer-guard.rules.yml")).unwrap(),
    ];
    sources.extend(exprs.iter().map(|(_, e)| e.clone()));
    let mut used = std::collections::BTreeSet::new();
    for text in &sources {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("transfer_guard_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            used.insert(name);
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn prometheus_scraping_the_demo_fires_the_action_alert_for_its_real_rollback() {
    let Some(prometheus) = tool("prometheus", "prometheus", "end to end") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (demo_port, prom_port) = (free_port(), free_port());
    let mut demo = Command::new(env!("CARGO_BIN_EXE_transfer-guard"))
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{demo_port}"),
            "--breach-after",
            "5s",
            "--duration",
            "150s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: transfer-guard\n    static_configs:\n      - targets: ['127.0.0.1:{demo_port}']\n",
            Path::new(ROOT).join("alerts/transfer-guard.rules.yml").display()
        ),
    )
    .unwrap();
    let mut prom = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{prom_port}/api/v1/alerts");
    let mut seen = Value::Null;
    let mut firing = false;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(resp) = reqwest::get(&url).await else {
            continue;
        };
        seen = resp.json().await.unwrap_or(Value::Null);
        firing = seen["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| {
                a["labels"]["alertname"] == "TransferGuardActionFired"
                    && a["labels"]["cbo"] == "nss"
                    && a["labels"]["action"] == "rollback"
                    && a["state"] == "firing"
            });
        if firing {
            break;
        }
    }
    // The demo's bad deploy is rolled back on the simulated Twilio; the series the daemon
    // exports for it makes the shipped rule fire.
    assert!(
        firing,
        "TransferGuardActionFired never fired; last answer: {seen}"
    );
    let alert = seen["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "TransferGuardActionFired")
        .unwrap();
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("CBO nss"),
        "{alert}"
    );
    let _ = prom.kill().await;
    let _ = demo.kill().await;
}

#[tokio::test]
async fn a_real_alertmanager_receives_transfer_guards_notifications() {
    let Some(alertmanager) = tool(
        "prometheus-alertmanager",
        "prometheus-alertmanager",
        "notify",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
    )
    .unwrap();
    let mut am = Command::new(&alertmanager)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let am_url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{am_url}/-/ready"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An HA pair of which one is down: the live one still gets every alert.
    let (app, _sim) = busy_daemon(&format!(
        "[actions.alertmanager]\nurls = [\"http://127.0.0.1:9\", \"{am_url}\"]\n"
    ))
    .await;
    let mut got = Value::Null;
    let mut found = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = reqwest::get(format!("{am_url}/api/v2/alerts"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        found = got.as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == "TransferGuardRuleBreached"
                && a["labels"]["cbo"] == "a"
                && a["labels"]["rule"] == "bad_requests"
                && a["labels"]["severity"] == "page"
        });
        if found {
            break;
        }
    }
    assert!(found, "Alertmanager holds: {got}");
    let m = app.shared.metrics.render();
    assert!(
        metric_sum(
            &m,
            "transfer_guard_actions_total",
            &[r#"integration="alertmanager""#, r#"result="fired""#]
        ) >= 1.0
    );
    app.shutdown().await;
    let _ = am.kill().await;
}

#[tokio::test]
async fn metrics_answer_gzip_when_asked_and_plain_text_otherwise() {
    let (app, _sim) = busy_daemon("").await;
    let client = reqwest::Client::new();
    let url = format!("{}/metrics", app.url());
    let plain = client.get(&url).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let plain = plain.text().await.unwrap();
    let zipped = client
        .get(&url)
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    assert_eq!(zipped.headers()["vary"], "Accept-Encoding");
    let bytes = zipped.bytes().await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .unwrap();
    assert!(
        bytes.len() * 5 < text.len(),
        "{} of {}",
        bytes.len(),
        text.len()
    );
    // The same families either way (the values move on between scrapes).
    let families = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("# TYPE"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(families(&text), families(&plain));
    // `q=0` refuses gzip.
    let refused = client
        .get(&url)
        .header("accept-encoding", "gzip;q=0, identity")
        .send()
        .await
        .unwrap();
    assert!(refused.headers().get("content-encoding").is_none());
    app.shutdown().await;
}
