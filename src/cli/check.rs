//! `transfer-guard check --config FILE [--online]`: every problem of a configuration, one line each; with `--online`, each CBO's workflow and variables at Twilio too.

use std::io::Write;
use std::path::Path;

use crate::config::check_str;
use crate::health::Corruption;
use crate::sources::poll::{Poller, clients};

/// What a configuration that `run` accepts may still leave undone: a guard that decides but
/// cannot act. `--strict` counts them as problems (for pipelines that install production
/// configurations); plain `check` leaves them out, one line per problem.
pub fn notes(config: &crate::config::Config) -> Vec<String> {
    let mut notes = Vec::new();
    if config.actions.dry_run {
        notes.push(
            "actions.dry_run is on (the default): breaches are decided and logged, nothing is rolled back or disabled"
                .to_string(),
        );
    }
    for cbo in &config.cbos {
        if cbo.rollback.is_empty() && cbo.disable.is_empty() {
            notes.push(format!(
                "cbo {}: no rollback and no disable integration: its breaches only alert",
                cbo.key
            ));
        }
    }
    notes
}

/// Prints one line per problem to `out`; returns the process exit code (0 clean, 1 problems).
/// `strict`: the notes count as problems too.
pub async fn run(
    path: &Path,
    online: bool,
    strict: bool,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> i32 {
    let name = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out, "{name}: cannot read: {e}");
            return 1;
        }
    };
    let checked = check_str(&text, env);
    let mut problems = checked.problems.len();
    for p in &checked.problems {
        let _ = writeln!(out, "{name}: {p}");
    }
    let Some(config) = checked.config else {
        return 1;
    };
    if strict {
        for note in notes(&config) {
            problems += 1;
            let _ = writeln!(out, "{name}: {note}");
        }
    }
    if online {
        let clients = clients(&config, crate::clock::Clock::new());
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for cbo in &config.cbos {
            let mut poller = Poller::new(&config, cbo, &clients);
            if !poller.pollable() {
                // The offline lines above already say what is missing.
                continue;
            }
            let cycle = poller.cycle(&now).await;
            // The offline lines above already named what the config alone shows.
            for p in cycle.problems.iter().filter(|p| {
                !matches!(
                    p,
                    Corruption::Missing(_) | Corruption::Malformed(_) | Corruption::Shared { .. }
                )
            }) {
                problems += 1;
                let _ = writeln!(out, "{name}: cbo {}: {p}", cbo.key);
            }
            if !cycle.mismatch.is_empty() {
                // What a daemon starting now would make of it.
                let _ = writeln!(
                    out,
                    "{name}: cbo {}: config_mismatch: present before any deployment a daemon would see, so it would hold this CBO's actions and page rather than roll back",
                    cbo.key
                );
            }
            // A 404 or 400 on the workflow is already the not_found / bad_request line above.
            let named = |e: &&crate::twilio::TwilioError| {
                matches!(e.status(), Some(400 | 404))
                    && cycle.problems.iter().any(|p| {
                        matches!(
                            p,
                            Corruption::NotFound { .. } | Corruption::BadRequest { .. }
                        )
                    })
            };
            for e in cycle.errors.iter().filter(|e| !named(e)) {
                problems += 1;
                let _ = writeln!(out, "{name}: cbo {}: Twilio: {e}", cbo.key);
            }
        }
    }
    if problems == 0 {
        let mode = if online { "online" } else { "offline" };
        let _ = writeln!(out, "{name}: ok ({} CBOs, {mode})", config.cbos.len());
        0
    } else {
        1
    }
}
