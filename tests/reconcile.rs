//! One transfer, counted once, whatever number of sources saw it (SPEC §2b): the plugin's
//! events and TaskRouter's record joined by task SID or conversation, TaskRouter's outcome
//! winning, `plugin_missing` and `taskrouter_missing`, and Bad Requests the logs and the
//! debugger report counted once.

mod common;

use std::time::Duration;

use common::*;
use transfer_guard::App;
use transfer_guard::clock::Clock;
use transfer_guard::event::{Event, Source, parse_line};
use transfer_guard::sid::{ConversationSid, TaskSid};
use transfer_guard::state::SignalSource;

fn wt(n: u32) -> String {
    format!("WT{n:032x}")
}

/// A TaskRouter event of transfer `n` (task `wt(n)`, conversation `ch(n)`), as the mapper
/// makes it.
fn taskrouter(kind: &str, at_ms: i64, n: u32, error: &str) -> Event {
    let mut e = parse_line(&event(
        kind,
        at_ms,
        n,
        &format!(
            r#","transfer_id":"{}","task_sid":"{}"{error}"#,
            wt(n),
            wt(n)
        ),
    ))
    .unwrap();
    e.source = Source::TaskRouterEvents;
    e
}

/// A plugin event of transfer `n`, with its own invite id and no task SID.
fn plugin(kind: &str, at_ms: i64, n: u32, extra: &str) -> Event {
    parse_line(&event(
        kind,
        at_ms,
        n,
        &format!(r#","transfer_id":"KI{n:032x}"{extra}"#),
    ))
    .unwrap()
}

fn give(app: &App, events: Vec<Event>) {
    ingest_events(app, "a", events);
}

async fn start() -> App {
    App::start_with_clock(config(""), Clock::starting_at(T0 + 60_000))
        .await
        .unwrap()
}

fn window(app: &App) -> transfer_guard::window::WindowStats {
    app.shared
        .fleet
        .get("a")
        .unwrap()
        .stats(app.shared.clock.now_ms(), Duration::from_secs(300))
}

#[tokio::test(start_paused = true)]
async fn the_plugin_and_taskrouter_seeing_one_transfer_count_it_once() {
    let app = start().await;
    // The plugin first (its events arrive at once), TaskRouter's a poll later; joined by the
    // conversation, 800 ms apart.
    give(
        &app,
        vec![
            plugin("initiated", T0, 1, ""),
            plugin("notified", T0 + 2_000, 1, ""),
            plugin("completed", T0 + 6_000, 1, r#","history_preserved":true"#),
        ],
    );
    give(
        &app,
        vec![
            taskrouter("initiated", T0 + 800, 1, ""),
            taskrouter("notified", T0 + 2_100, 1, ""),
            taskrouter("completed", T0 + 5_900, 1, ""),
        ],
    );
    // And one the plugin sends its task SID with: joined by it.
    give(
        &app,
        vec![
            taskrouter("initiated", T0 + 10_000, 2, ""),
            plugin(
                "initiated",
                T0 + 9_000,
                2,
                &format!(r#","task_sid":"{}""#, wt(2)),
            ),
            taskrouter("completed", T0 + 14_000, 2, ""),
            plugin("completed", T0 + 14_500, 2, ""),
        ],
    );
    let transfers = sum_a(&app, "transfer_guard_transfers_total", &[]);
    assert_eq!(transfers, 2.0);
    assert_eq!(window(&app).counts.completed, 2);
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_seen_total",
            &[r#"source="plugin""#]
        ),
        2.0
    );
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_seen_total",
            &[r#"source="taskrouter_events""#]
        ),
        2.0
    );
    assert_eq!(
        sum_a(&app, "transfer_guard_source_disagreements_total", &[]),
        0.0
    );
    // Notification latency once per transfer (the first source's).
    assert_eq!(
        sum_a(&app, "transfer_guard_agent_notification_seconds_count", &[]),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_plugin_says_warm_where_taskrouter_only_guesses_cold() {
    let app = start().await;
    // TaskRouter's task first (it cannot tell warm from cold), then the plugin's warm
    // initiated, then TaskRouter's acceptance 20 s later: a warm transfer, not a slow cold one.
    give(&app, vec![taskrouter("initiated", T0, 8, "")]);
    let mut warm = plugin("initiated", T0 - 300, 8, "");
    warm.transfer_type = Some(transfer_guard::event::TransferType::Warm);
    give(&app, vec![warm]);
    give(&app, vec![taskrouter("completed", T0 + 20_000, 8, "")]);
    let s = window(&app);
    assert_eq!(s.counts.completed, 1);
    assert_eq!(s.cold_completion_p95, None);
    assert!(s.warm_completion_p95.is_some());
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_transfers_total",
            &[r#"transfer_type="warm""#]
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transfer_only_taskrouter_saw_counts_fully_and_as_plugin_missing() {
    let app = start().await;
    give(
        &app,
        vec![
            taskrouter("initiated", T0, 3, ""),
            taskrouter("notified", T0 + 1_500, 3, ""),
            taskrouter("completed", T0 + 4_000, 3, ""),
        ],
    );
    let s = window(&app);
    assert_eq!(s.counts.completed, 1);
    // Latencies from TaskRouter's timestamps (quantiles interpolate within buckets).
    let cold = s.cold_completion_p95.unwrap();
    let notification = s.notification_p95.unwrap();
    assert!((2.5..=5.0).contains(&cold), "{cold}");
    assert!((1.0..=2.5).contains(&notification), "{notification}");
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_disagreements_total",
            &[r#"kind="plugin_missing""#]
        ),
        0.0,
        "the plugin may still report it"
    );
    // Past the transfer timeout and the two minutes late sources have to join.
    settle().await;
    tokio::time::advance(Duration::from_secs(300 + 121)).await;
    settle().await;
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_disagreements_total",
            &[r#"kind="plugin_missing""#]
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn taskrouters_outcome_wins_a_disagreement() {
    let app = start().await;
    // The plugin says completed before TaskRouter spoke; TaskRouter then says the task's TTL
    // ran out (the seed's silent failure): the windows move to TaskRouter's outcome.
    give(
        &app,
        vec![
            plugin("initiated", T0, 4, ""),
            plugin("completed", T0 + 3_000, 4, ""),
        ],
    );
    assert_eq!(window(&app).counts.completed, 1);
    give(
        &app,
        vec![
            taskrouter("initiated", T0 + 500, 4, ""),
            taskrouter("timed_out", T0 + 30_000, 4, ""),
        ],
    );
    let s = window(&app);
    assert_eq!((s.counts.completed, s.counts.timed_out), (0, 1));
    assert_eq!(s.success_rate, Some(0.0));

    // TaskRouter knows the transfer before the plugin's outcome comes: the plugin's failure
    // is held back, and TaskRouter's completion decides.
    give(&app, vec![taskrouter("initiated", T0 + 40_000, 5, "")]);
    give(
        &app,
        vec![
            plugin("initiated", T0 + 40_200, 5, ""),
            plugin(
                "failed",
                T0 + 41_000,
                5,
                r#","error":{"status":500,"message":"Internal error"}"#,
            ),
        ],
    );
    give(&app, vec![taskrouter("completed", T0 + 45_000, 5, "")]);
    let s = window(&app);
    assert_eq!((s.counts.completed, s.counts.failed), (1, 0));
    assert_eq!(
        sum_a(
            &app,
            "transfer_guard_source_disagreements_total",
            &[r#"kind="outcome""#]
        ),
        2.0
    );
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_held_plugin_outcome_stands_when_taskrouter_never_tells() {
    let app = start().await;
    // TaskRouter saw the task created, then its record went unreadable: the plugin's
    // completion is held for TaskRouter's, and applied before the transfer would time out.
    give(&app, vec![taskrouter("initiated", T0 + 55_000, 9, "")]);
    give(
        &app,
        vec![
            plugin("initiated", T0 + 55_200, 9, ""),
            plugin("completed", T0 + 58_000, 9, ""),
        ],
    );
    assert_eq!(window(&app).counts.completed, 0, "held for TaskRouter's");
    settle().await;
    tokio::time::advance(Duration::from_secs(300)).await;
    settle().await;
    let completed = sum_a(
        &app,
        "transfer_guard_transfers_total",
        &[r#"outcome="completed""#],
    );
    let timed_out = sum_a(
        &app,
        "transfer_guard_transfers_total",
        &[r#"outcome="timed_out""#],
    );
    assert_eq!((completed, timed_out), (1.0, 0.0));
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_request_reported_by_the_logs_the_debugger_and_the_plugin_counts_once() {
    let app = start().await;
    let state = app.shared.fleet.get("a").unwrap().clone();
    let now = app.shared.clock.now_ms();
    let conv = ConversationSid::parse(&ch(6)).unwrap();
    // The function's error line names the conversation; the debugger's alert does not.
    assert!(state.bad_request_signal(SignalSource::ServerlessLogs, T0, Some(conv), now));
    assert!(!state.bad_request_signal(SignalSource::TwilioAlerts, T0 + 1_000, None, now));
    assert_eq!(window(&app).counts.taskrouter_bad_request, 1);
    // The plugin then reports the failed transfer: it counts with the transfer, not twice.
    give(
        &app,
        vec![
            plugin("initiated", T0 - 500, 6, ""),
            plugin(
                "failed",
                T0 + 200,
                6,
                r#","error":{"status":400,"message":"TaskRouter error: Bad Request"}"#,
            ),
        ],
    );
    let s = window(&app);
    assert_eq!(
        (s.counts.bad_request, s.counts.taskrouter_bad_request),
        (1, 0)
    );
    // A second log line for the same failure (a re-read) is the same Bad Request.
    assert!(!state.bad_request_signal(SignalSource::ServerlessLogs, T0 + 300, Some(conv), now));
    // Another conversation's, a minute and more later, is a new one.
    let other = ConversationSid::parse(&ch(7)).unwrap();
    assert!(state.bad_request_signal(
        SignalSource::ServerlessLogs,
        T0 + 90_000,
        Some(other),
        now + 90_000
    ));
    assert_eq!(
        sum_a(&app, "transfer_guard_bad_request_signals_total", &[]),
        2.0
    );
    let _ = TaskSid::parse(&wt(1)).unwrap();
    app.shutdown().await;
}
