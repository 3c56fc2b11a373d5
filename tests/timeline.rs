//! Timelines on tokio's paused clock: timeouts, windows sliding, file sources.

mod common;

use std::time::Duration;

use common::*;
use transfer_guard::App;
use transfer_guard::clock::Clock;

async fn ingest(app: &App, cbo: &str, lines: &[String]) {
    ingest_lines(app, cbo, lines);
}

fn timed_out(app: &App) -> f64 {
    metric_sum(
        &app.shared.metrics.render(),
        "transfer_guard_transfers_total",
        &[r#"cbo="a""#, r#"outcome="timed_out""#],
    )
}

#[tokio::test(start_paused = true)]
async fn initiated_without_an_end_times_out_exactly_when_the_timeout_passes() {
    let app = App::start_with_clock(config(""), Clock::starting_at(T0))
        .await
        .unwrap();
    ingest(&app, "a", &[event("initiated", T0, 1, "")]).await;
    // `settle` itself lets the paused clock move by 1 ms: 299.998 s + 1 ms is the last
    // instant before the timeout (with 299.999 s the settle reached 300 s, and the tick there
    // sometimes finished before the assertion).
    tokio::time::advance(Duration::from_millis(299_998)).await;
    settle().await;
    assert_eq!(timed_out(&app), 0.0);
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    // The ticker runs every second; the one at 300 s sees the deadline.
    assert_eq!(timed_out(&app), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_transfer_timeout_is_configurable() {
    let app = App::start_with_clock(
        config("[transfers]\ntimeout = \"30s\"\n"),
        Clock::starting_at(T0),
    )
    .await
    .unwrap();
    ingest(&app, "a", &[event("initiated", T0, 1, "")]).await;
    tokio::time::advance(Duration::from_secs(29)).await;
    settle().await;
    assert_eq!(timed_out(&app), 0.0);
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(timed_out(&app), 1.0);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn success_ratio_forgets_transfers_older_than_its_window() {
    let app = App::start_with_clock(config(""), Clock::starting_at(T0))
        .await
        .unwrap();
    let failed = event("failed", T0 + 500, 1, r#","error":{"status":400}"#);
    ingest(&app, "a", &[event("initiated", T0, 1, ""), failed]).await;
    tokio::time::advance(Duration::from_secs(240)).await;
    let t = T0 + 240_000;
    ingest(
        &app,
        "a",
        &[
            event("initiated", t, 2, ""),
            event("completed", t + 1, 2, ""),
        ],
    )
    .await;
    let ratio = |app: &App, w: &str| {
        app.shared.fleet.refresh_gauges(app.shared.clock.now_ms());
        metric(
            &app.shared.metrics.render(),
            &format!("transfer_guard_success_ratio{{cbo=\"a\",window=\"{w}\"}}"),
        )
    };
    assert_eq!(ratio(&app, "5m"), Some(0.5));
    tokio::time::advance(Duration::from_secs(70)).await;
    assert_eq!(ratio(&app, "5m"), Some(1.0));
    assert_eq!(ratio(&app, "15m"), Some(0.5));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_file_source_follows_its_log_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("transfers.log");
    std::fs::write(&path, "").unwrap();
    let extra = format!(
        "[[sources.file]]\npath = {:?}\ncbo = \"b\"\n",
        path.display().to_string()
    );
    let app = App::start_with_clock(config(&extra), Clock::starting_at(T0))
        .await
        .unwrap();
    settle().await;
    let plugin_line = |kind: &str, at: i64, n: u32, extra: &str| {
        format!(
            "[ConversationTransfer] {kind}: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\",\"transferType\":\"warm\",\"targetType\":\"queue\"{extra}}}\n",
            rfc3339(at),
            ch(n)
        )
    };
    let mut text = String::from("GET /health 200\n");
    text += &plugin_line("initiated", T0, 1, "");
    text += &plugin_line("completed", T0 + 4000, 1, r#","historyPreserved":false"#);
    std::fs::write(&path, &text).unwrap();
    tokio::time::advance(Duration::from_millis(300)).await;
    settle().await;
    std::fs::rename(&path, dir.path().join("transfers.log.1")).unwrap();
    std::fs::write(&path, plugin_line("initiated", T0, 2, "")).unwrap();
    tokio::time::advance(Duration::from_millis(300)).await;
    settle().await;
    let m = app.shared.metrics.render();
    assert_eq!(
        metric(&m, r#"transfer_guard_history_lost_total{cbo="b"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"transfer_guard_events_ingested_total{cbo="b",event="initiated"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_sum(&m, "transfer_guard_events_rejected_total", &[r#"cbo="b""#]),
        0.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_backlog_of_several_chunks_is_taken_whole_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("transfers.log");
    // About 3.4 MiB: read a 1 MiB chunk at a time, each parsed while the one before is taken.
    let transfers = 9000;
    let mut text = String::new();
    for n in 0..transfers {
        let at = T0 - 600_000 + i64::from(n) * 50;
        text += &format!(
            "[ConversationTransfer] initiated: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\",\"transferType\":\"warm\",\"targetType\":\"queue\",\"reason\":\"a backlog line padded to the size of the plugin's\"}}\n",
            rfc3339(at),
            ch(n)
        );
        text += &format!(
            "[ConversationTransfer] completed: {{\"timestamp\":\"{}\",\"conversationSid\":\"{}\",\"historyPreserved\":true}}\n",
            rfc3339(at + 20),
            ch(n)
        );
    }
    // One bad line, in the last chunk.
    text += "[ConversationTransfer] completed: {\"timestamp\":\"not a time\"}\n";
    assert!(text.len() > 3 * 1024 * 1024, "{} bytes", text.len());
    std::fs::write(&path, &text).unwrap();
    let extra = format!(
        "[[sources.file]]\npath = {:?}\ncbo = \"b\"\nfrom_beginning = true\n",
        path.display().to_string()
    );
    let app = App::start_with_clock(config(&extra), Clock::starting_at(T0))
        .await
        .unwrap();
    let taken = |app: &App| {
        metric_sum(
            &app.shared.metrics.render(),
            "transfer_guard_events_ingested_total",
            &[r#"cbo="b""#],
        ) + metric_sum(
            &app.shared.metrics.render(),
            "transfer_guard_events_rejected_total",
            &[r#"cbo="b""#],
        )
    };
    let all = f64::from(2 * transfers + 1);
    for _ in 0..200 {
        if taken(&app) >= all {
            break;
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        settle().await;
    }
    let m = app.shared.metrics.render();
    assert_eq!(
        metric_sum(
            &m,
            "transfer_guard_transfers_total",
            &[r#"cbo="b""#, r#"outcome="completed""#]
        ),
        f64::from(transfers)
    );
    assert_eq!(
        metric_sum(&m, "transfer_guard_events_rejected_total", &[r#"cbo="b""#]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "transfer_guard_events_ingested_total", &[r#"cbo="b""#]),
        f64::from(2 * transfers)
    );
    app.shutdown().await;
}
