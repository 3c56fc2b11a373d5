//! kill -9 at random moments around a live rollback, then a restart while the failures go on,
//! against the simulated Twilio applying the rollback and answering late: never a second
//! rollback, never a lost record, the known-good build live at the end. Real processes and the
//! real clock; `TRANSFER_GUARD_CRASH_TRIALS` sets how many trials (30 by default, three at a
//! time).

mod common;

use std::time::Duration;

use common::processes::{ZE, ZS, daemon, failures, rollback_config, serverless_history};
use common::*;
use transfer_guard::clock::Clock;
use transfer_guard::decisions::{DecisionLog, Kind};
use transfer_guard::sim::twilio::{Fault, SimTwilio};

/// One trial: the rollback in flight when the daemon dies at `kill_after`.
async fn trial(kill_after: Duration, answer_after: Duration) -> Result<&'static str, String> {
    let sim = SimTwilio::start(Clock::new()).await;
    serverless_history(&sim);
    let history = sim.deployments(AC_A, ZS, ZE);
    let good = history[0].build_sid.clone();
    // Twilio applies the rollback, then answers after the client gave up (1 s).
    sim.inject_on(
        "POST",
        "/Deployments",
        Fault::ApplyThenDelay(answer_after),
        Some(1),
    );

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let text = rollback_config(&dir.path().join("state"), &sim.url(), port);
    let config = dir.path().join("transfer-guard.toml");
    std::fs::write(&config, text).unwrap();

    let mut first = daemon(&config, &url, &[]).await;
    let feeder = failures(vec![url.clone()]);
    tokio::time::sleep(kill_after).await;
    first.start_kill().unwrap(); // SIGKILL
    let _ = first.wait().await;
    let restarted_ms = Clock::new().now_ms();
    let mut second = daemon(&config, &url, &[]).await;
    // Long enough for a whole rollback from scratch: ready, breach, plan, intent, a late answer
    // (up to 3 s), its backoff, the check.
    tokio::time::sleep(Duration::from_secs(10)).await;
    feeder.abort();
    second.start_kill().unwrap();
    let _ = second.wait().await;

    let after = sim.deployments(AC_A, ZS, ZE);
    let created = after.len() - history.len();
    let log = DecisionLog::open(&dir.path().join("state")).unwrap();
    let entries = log.query(Some("a"), None);
    let intents: Vec<_> = entries.iter().filter(|e| e.kind == Kind::Intent).collect();
    let results: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.kind == Kind::Action
                && e.key.is_some()
                && matches!(e.result.as_deref(), Some("fired" | "failed"))
        })
        .collect();
    let fired = results
        .iter()
        .filter(|e| e.result.as_deref() == Some("fired"))
        .count();
    let unsettled = intents
        .iter()
        .filter(|i| !results.iter().any(|r| r.key == i.key))
        .count();
    let live = after.last().map(|d| d.build_sid.clone());
    if created != 1 || fired != 1 || unsettled != 0 || live.as_deref() != Some(good.as_str()) {
        return Err(format!(
            "killed after {kill_after:?}, Twilio answering after {answer_after:?}: {created} deployments created, {fired} fired records, {unsettled} intents without a result, live build {live:?} (good {good})"
        ));
    }
    // Where the kill fell, as the record tells it.
    let settled = results.iter().find_map(|r| {
        r.detail
            .as_deref()
            .filter(|d| d.starts_with("settled at start"))
    });
    let first_intent = intents.first().map(|i| i.at_ms).unwrap_or(i64::MAX);
    let fired_at = results
        .iter()
        .find(|r| r.result.as_deref() == Some("fired"))
        .map_or(i64::MAX, |r| r.at_ms);
    Ok(match settled {
        Some(d) if d.contains("took effect") => "after the intent, Twilio had applied it",
        Some(_) => "after the intent, before Twilio had it",
        None if fired_at < restarted_ms => "after the result",
        None if first_intent < restarted_ms => "after the intent (result written before the kill)",
        None => "before the intent",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_around_a_rollback_never_rolls_back_twice_nor_loses_a_record() {
    let trials: usize = std::env::var("TRANSFER_GUARD_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut failures = Vec::new();
    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    let mut done = 0;
    while done < trials {
        let batch: Vec<_> = (done..trials.min(done + 3))
            .map(|_| {
                // From before the breach (it comes within a second of the first failure) to
                // well after Twilio's late answer.
                let kill_after = Duration::from_millis(if fastrand::bool() {
                    fastrand::u64(0..800)
                } else {
                    fastrand::u64(800..4_000)
                });
                let answer_after = Duration::from_millis(fastrand::u64(1_200..3_000));
                tokio::spawn(trial(kill_after, answer_after))
            })
            .collect();
        done += batch.len();
        for t in batch {
            match t.await.unwrap() {
                Ok(kind) => *tally.entry(kind).or_default() += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {trials} trials:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{trials} trials: 0 second rollbacks, 0 lost records, the good build live at the end; killed {tally:?}"
    );
}
