//! Restarts of the embedded default (SPEC §12): the same timeline run once straight through
//! and once with a restart in the middle must end the same way. Windows, open transfers,
//! `for` timers and file positions survive; a journal from a newer build is refused by name.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use transfer_guard::App;
use transfer_guard::rules::{RuleId, RuleState};
use transfer_guard::validation::{State, Validation};

const MIN: Duration = Duration::from_secs(60);

fn transfer_id(id: &str) -> String {
    format!(r#","transfer_id":"{id}""#)
}

/// A transfer of cbo a that started 5 s ago: completed 3 s later, or (`answered` false) failed
/// after half a second because no agent took it (not a Bad Request).
fn transfer(app: &App, n: u32, answered: bool) {
    let t = app.shared.clock.now_ms() - 5_000;
    let id = transfer_id(&format!("t{n}"));
    let end = if answered {
        event("completed", t + 3_000, n, &id)
    } else {
        event(
            "failed",
            t + 500,
            n,
            &format!(r#"{id},"error":{{"code":20001}}"#),
        )
    };
    ingest_lines(app, "a", &[event("initiated", t, n, &id), end]);
}

fn healthy(app: &App, n: u32) {
    transfer(app, n, true);
}

/// Shuts `app` down at the current instant and starts it again on the same state; the clock
/// reads on from where it was.
async fn restart(app: App, text: &str) -> App {
    let at = app.shared.clock.now_ms();
    app.shutdown().await;
    start_at(text, at).await
}

/// Lets `d` pass a second at a time (the ticker runs every second).
async fn wait(d: Duration) {
    for _ in 0..d.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
    }
}

/// A 15-minute validation window of cbo a. Healthy transfers every 10 s; at 4:50 six
/// transfers start and are still open at 5:00; at 5:10 all six fail; healthy again to the
/// end. `restart_at_five`: the daemon restarts at 5:00, with the six open.
async fn validation_timeline(restart_at_five: bool) -> Validation {
    let dir = tempfile::tempdir().unwrap().keep();
    let text = config_text_in(Path::new(&dir), NO_TWILIO, "");
    let mut app = start_at(&text, T0).await;
    let id = app
        .shared
        .validations
        .start("a", "ZD1", 15 * MIN, 20, "api", T0)
        .unwrap()
        .id;
    let mut n = 0;
    for _ in 0..29 {
        n += 1;
        healthy(&app, n);
        wait(Duration::from_secs(10)).await;
    }
    let at = app.shared.clock.now_ms();
    let open: Vec<String> = (0..6)
        .map(|k| event("initiated", at, 1000 + k, &transfer_id(&format!("o{k}"))))
        .collect();
    ingest_lines(&app, "a", &open);
    wait(Duration::from_secs(10)).await;
    if restart_at_five {
        app = restart(app, &text).await;
    }
    wait(Duration::from_secs(10)).await;
    let at = app.shared.clock.now_ms();
    let failed: Vec<String> = (0..6)
        .map(|k| {
            let id = transfer_id(&format!("o{k}"));
            event(
                "failed",
                at,
                1000 + k,
                &format!(r#"{id},"error":{{"code":20001}}"#),
            )
        })
        .collect();
    ingest_lines(&app, "a", &failed);
    while app.shared.validations.get(&id).unwrap().state == State::Running {
        n += 1;
        healthy(&app, n);
        wait(Duration::from_secs(10)).await;
        assert!(n < 200, "the window never ended");
    }
    let v = app.shared.validations.get(&id).unwrap();
    app.shutdown().await;
    v
}

#[tokio::test(start_paused = true)]
async fn a_restart_inside_a_validation_window_gives_the_verdict_it_would_have_without_one() {
    let straight = validation_timeline(false).await;
    let restarted = validation_timeline(true).await;
    // The six that were open at the restart failed after it: they count, as they do without
    // the restart, and the window misses its success rate.
    assert_eq!(straight.state, State::Failed, "{straight:?}");
    let rate = |v: &Validation| {
        v.criteria
            .iter()
            .find(|c| c.name == "success_rate")
            .unwrap()
            .value
            .clone()
    };
    let failed = |v: &Validation| {
        (v.carried.decided + v.measured.decided) - (v.carried.completed + v.measured.completed)
    };
    assert_eq!(failed(&straight), 6, "{straight:?}");
    assert_eq!(rate(&restarted), rate(&straight));
    assert_eq!(
        (restarted.state, &restarted.reason, restarted.end_ms),
        (straight.state, &straight.reason, straight.end_ms)
    );
    let shown = |v: &Validation| {
        v.criteria
            .iter()
            .map(|c| (c.name.clone(), c.value.clone(), c.verdict))
            .collect::<Vec<_>>()
    };
    assert_eq!(shown(&restarted), shown(&straight));
}

/// cbo a's success rate falls under 90 % from 2:00 (failures every 10 s); the rule waits
/// `for` 2 minutes. `restart_at_three`: the daemon restarts at 3:00, the rule pending.
/// Returns when the rule breached, from T0.
async fn breach_timeline(restart_at_three: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap().keep();
    let rules = "[rules.success_rate]\nthreshold = 0.9\nwindow = \"5m\"\nfor = \"2m\"\nmin_samples = 5\nfast_min_samples = 5\n";
    let text = config_text_in(Path::new(&dir), NO_TWILIO, rules);
    let mut app = start_at(&text, T0).await;
    let state = |app: &App| {
        app.shared
            .engine()
            .state("a", RuleId::SuccessRate)
            .unwrap()
            .state
    };
    for n in 0..12 {
        healthy(&app, n);
        wait(Duration::from_secs(10)).await;
    }
    let mut n = 100;
    let mut restarted = !restart_at_three;
    loop {
        let elapsed = app.shared.clock.now_ms() - T0;
        if !restarted && elapsed >= 180_000 {
            assert_eq!(state(&app), RuleState::Pending, "pending at the restart");
            app = restart(app, &text).await;
            assert_eq!(state(&app), RuleState::Pending, "still pending after it");
            restarted = true;
        }
        if state(&app) == RuleState::Breached {
            app.shutdown().await;
            return Duration::from_millis(elapsed as u64);
        }
        assert!(elapsed < 600_000, "never breached");
        n += 1;
        transfer(&app, n, false);
        wait(Duration::from_secs(1)).await;
        if n % 10 == 0 {
            // One in ten answered: the rate keeps falling.
            healthy(&app, 10_000 + n);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_rule_pending_at_a_restart_breaches_when_it_would_have_without_one() {
    let straight = breach_timeline(false).await;
    let restarted = breach_timeline(true).await;
    assert!(
        straight > Duration::from_secs(180) + Duration::from_secs(20),
        "the scenario breaches after the restart: {straight:?}"
    );
    let apart = straight.abs_diff(restarted);
    assert!(
        apart <= Duration::from_secs(2),
        "breached at {straight:?} straight through, at {restarted:?} with the restart"
    );
}

#[tokio::test(start_paused = true)]
async fn a_file_source_resumes_where_it_stopped_across_a_rotation_and_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = tempfile::tempdir().unwrap().keep();
    let path = dir.path().join("transfers.log");
    std::fs::write(&path, "").unwrap();
    let extra = format!(
        "[[sources.file]]\npath = {:?}\ncbo = \"b\"\n",
        path.display().to_string()
    );
    let text = config_text_in(&state_dir, NO_TWILIO, &extra);
    let line = |kind: &str, at: i64, n: u32| {
        format!(
            "[ConversationTransfer] {kind}: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\",\"transferType\":\"warm\",\"targetType\":\"queue\"}}\n",
            rfc3339(at),
            ch(n)
        )
    };
    let append = |text: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    let app = start_at(&text, T0).await;
    settle().await;
    let mut lines = String::new();
    for n in 0..3 {
        lines += &line("initiated", T0 + i64::from(n) * 1000, n);
        lines += &line("completed", T0 + i64::from(n) * 1000 + 500, n);
    }
    // The fourth starts before the restart and ends while the daemon is down.
    lines += &line("initiated", T0 + 4000, 3);
    append(&lines);
    wait(Duration::from_secs(1)).await;
    let completed = |app: &App| {
        let now = app.shared.clock.now_ms();
        let b = app.shared.fleet.get("b").unwrap();
        b.stats(now, Duration::from_secs(900)).counts.completed
    };
    assert_eq!(completed(&app), 3);

    let at = app.shared.clock.now_ms();
    app.shutdown().await;
    // While it is down: the fourth ends in the file it was reading, which is then rotated
    // away, and a fifth transfer goes to the new file.
    append(&line("completed", T0 + 4500, 3));
    std::fs::rename(&path, dir.path().join("transfers.log.1")).unwrap();
    std::fs::write(
        &path,
        line("initiated", T0 + 5000, 4) + &line("completed", T0 + 5500, 4),
    )
    .unwrap();

    let app = start_at(&text, at + 1000).await;
    wait(Duration::from_secs(1)).await;
    // Three from before the restart (the journal: their lines read again from the rotated
    // file), one from the rotated file's tail, one from the new file, none twice.
    assert_eq!(completed(&app), 5);
    let m = app.shared.metrics.render();
    assert_eq!(
        metric(&m, r#"transfer_guard_events_duplicate_total{cbo="b"}"#),
        Some(0.0),
        "nothing read twice"
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_events_ingested_total{cbo="b",event="completed"}"#
        ),
        Some(2.0),
        "the metrics count what this process took, the journal's events not again"
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_journal_of_a_newer_build_is_refused_by_name_and_the_daemon_starts_without_it() {
    let state_dir = tempfile::tempdir().unwrap().keep();
    let text = config_text_in(&state_dir, NO_TWILIO, "");
    let app = start_at(&text, T0).await;
    healthy(&app, 1);
    let at = app.shared.clock.now_ms();
    app.shutdown().await;
    // A later build wrote this journal segment and checkpoint.
    let segment = std::fs::read_dir(state_dir.join("journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text_of = std::fs::read_to_string(&segment).unwrap();
    std::fs::write(
        &segment,
        text_of.replacen(
            "{\"transfer_guard_journal\":1}",
            "{\"transfer_guard_journal\":9}",
            1,
        ),
    )
    .unwrap();
    let checkpoint = state_dir.join("checkpoint.json");
    let saved = std::fs::read_to_string(&checkpoint).unwrap();
    std::fs::write(
        &checkpoint,
        saved.replace("\"version\": 1", "\"version\": 9"),
    )
    .unwrap();

    let (_, _, restored) = {
        let config = lenient(&text);
        let metrics = std::sync::Arc::new(transfer_guard::metrics::Metrics::new());
        let journal =
            std::sync::Arc::new(transfer_guard::journal::Journal::open(&state_dir).unwrap());
        transfer_guard::checkpoint::Checkpoints::restore(&config, journal, &metrics, at, Vec::new())
    };
    assert_eq!(restored.records, 0);
    let refused = restored.refused.join("\n");
    assert!(
        refused.contains("checkpoint.json: checkpoint version 9, this build reads version 1"),
        "{refused}"
    );
    assert!(
        refused.contains(&format!(
            "{}: journal version 9, this build reads version 1",
            segment.display()
        )),
        "{refused}"
    );
    assert_eq!(restored.whole_since_ms, None);
    // The daemon starts, blind to what it cannot read, and guards from now on.
    let app = start_at(&text, at).await;
    healthy(&app, 2);
    let a = app.shared.fleet.get("a").unwrap();
    let now = app.shared.clock.now_ms();
    assert_eq!(a.stats(now, Duration::from_secs(900)).counts.completed, 1);
    app.shutdown().await;
}

/// The daemon as a process on `config`, logging JSON: the child and its address.
async fn spawn_daemon(config: &Path) -> (tokio::process::Child, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_transfer-guard"));
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (addr, mut lines) = listening(&mut child).await;
    // Keep reading its log, so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"))
}

#[tokio::test]
async fn after_kill_9_a_restarted_daemon_judges_with_the_windows_it_had() {
    let state_dir = tempfile::tempdir().unwrap();
    let config = state_dir.path().join("transfer-guard.toml");
    std::fs::write(&config, config_text_in(state_dir.path(), NO_TWILIO, "")).unwrap();
    let (mut child, url) = spawn_daemon(&config).await;
    let now = transfer_guard::clock::Clock::new().now_ms();
    let mut body = Vec::new();
    for n in 0..22u32 {
        let id = transfer_id(&format!("k{n}"));
        body.push(event(
            "initiated",
            now - 60_000 + i64::from(n) * 1000,
            n,
            &id,
        ));
        body.push(if n < 20 {
            event("completed", now - 57_000 + i64::from(n) * 1000, n, &id)
        } else {
            event(
                "failed",
                now - 59_000 + i64::from(n) * 1000,
                n,
                &format!(r#"{id},"error":{{"code":20001}}"#),
            )
        });
    }
    let http = reqwest::Client::new();
    assert_eq!(post_ndjson(&url, TOKEN_A, &body).await.status(), 202);
    // The journal is written out every second: wait until the 44 events are on disk.
    let on_disk = || {
        std::fs::read_dir(state_dir.path().join("journal"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .map(|t| t.matches(r#""op":{"event""#).count())
            .sum::<usize>()
    };
    for _ in 0..100 {
        if on_disk() == 44 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on_disk(), 44);
    let ratio = |text: &str| metric(text, r#"transfer_guard_success_ratio{cbo="a",window="5m"}"#);
    let before = http.get(format!("{url}/metrics")).send().await.unwrap();
    let before = before.text().await.unwrap();
    assert_eq!(ratio(&before), Some(20.0 / 22.0));

    child.kill().await.unwrap();
    let (_child, url) = spawn_daemon(&config).await;
    let after = http.get(format!("{url}/metrics")).send().await.unwrap();
    let after = after.text().await.unwrap();
    assert_eq!(ratio(&after), Some(20.0 / 22.0), "the windows it had");
    assert_eq!(
        metric_sum(
            &after,
            "transfer_guard_events_ingested_total",
            &[r#"cbo="a""#]
        ),
        0.0,
        "the replayed events are not counted again"
    );
    assert_eq!(
        metric(&after, r#"transfer_guard_store_errors_total{op="journal"}"#),
        Some(0.0)
    );
}
