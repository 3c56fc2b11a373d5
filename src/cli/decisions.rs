//! `transfer-guard decisions --server URL --cbo X`: the decision log for on-call, one line per entry, with the failing conversations (SID and error) each breach and action carries for Connie Support.

use std::io::Write;

use serde_json::Value;

use crate::config::Secret;

pub const OK: i32 = 0;
pub const COULD_NOT_RUN: i32 = 3;

pub struct Options {
    pub server: String,
    pub token: Secret,
    pub cbo: Option<String>,
    pub since: Option<String>,
    pub json: bool,
}

/// One entry as a line: time, CBO, what happened.
fn line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("");
    let what = match s("kind") {
        "state" => format!("rule {} {} -> {}", s("rule"), s("from"), s("to")),
        "intent" => format!(
            "intent: {} ({}) for {}: {}",
            s("action"),
            s("integration"),
            s("rule"),
            s("detail")
        ),
        "action" => format!(
            "{} ({}) for {}: {}: {}",
            s("action"),
            s("integration"),
            s("rule"),
            s("result"),
            s("detail")
        ),
        "switch" => format!("transfers switch: {} ({})", s("action"), s("detail")),
        "ack" => format!("{} acknowledged: {}", s("rule"), s("detail")),
        "known" => format!(
            "{} {} known {}: {}",
            s("integration"),
            s("detail"),
            s("result"),
            e["evidence"]["why"].as_str().unwrap_or("")
        ),
        _ => s("detail").to_string(),
    };
    let cbo = if s("cbo").is_empty() { "-" } else { s("cbo") };
    format!("{}  {cbo:<12} {what}", s("at"))
}

/// The failing conversations an entry's evidence names (under `breach` for actions).
fn failing(e: &Value) -> Vec<&Value> {
    let ev = &e["evidence"];
    [
        &ev["failing_conversations"],
        &ev["breach"]["failing_conversations"],
        &ev["measured"]["failing_conversations"],
    ]
    .into_iter()
    .find_map(|f| f.as_array())
    .map(|a| a.iter().collect())
    .unwrap_or_default()
}

/// Prints the log; returns the exit code (0, or 3 when it could not be read).
pub async fn run(opts: Options, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let mut query = Vec::new();
    if let Some(c) = &opts.cbo {
        query.push(("cbo", c.clone()));
    }
    if let Some(s) = &opts.since {
        query.push(("since", s.clone()));
    }
    let server = crate::cli::oncall::Server {
        url: opts.server.clone(),
        token: opts.token.clone(),
    };
    // Page by page (the daemon answers at most a page at a time), following `next`.
    let mut entries = Vec::new();
    let mut after = 0u64;
    loop {
        let mut q = query.clone();
        q.push(("after", after.to_string()));
        let body = match server
            .call(reqwest::Method::GET, "/v1/decisions", &q, None)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let _ = writeln!(err, "transfer-guard decisions: {e}");
                return COULD_NOT_RUN;
            }
        };
        if let Some(page) = body["decisions"].as_array() {
            entries.extend(page.iter().cloned());
        }
        match body["next"].as_u64() {
            Some(next) if next > after => after = next,
            _ => break,
        }
    }
    if opts.json {
        let _ = writeln!(out, "{}", Value::Array(entries));
        return OK;
    }
    for e in &entries {
        let _ = writeln!(out, "{}", line(e));
        for f in failing(e) {
            let _ = writeln!(
                out,
                "      conversation {}{} at {}: {}",
                f["conversation_sid"].as_str().unwrap_or("?"),
                f["transfer_id"]
                    .as_str()
                    .map(|t| format!(" (transfer {t})"))
                    .unwrap_or_default(),
                f["at"].as_str().unwrap_or("?"),
                f["error"].as_str().unwrap_or("")
            );
        }
    }
    if entries.is_empty() {
        let _ = writeln!(out, "no decisions");
    }
    OK
}
