//! `transfer-guard validate`: starts (or follows) a post-deploy validation window, shows its progress, prints the criteria table, exits 0 passed, 1 failed, 2 inconclusive, 3 could not run.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::Secret;

pub const PASSED: i32 = 0;
pub const FAILED: i32 = 1;
pub const INCONCLUSIVE: i32 = 2;
pub const COULD_NOT_RUN: i32 = 3;

/// How long the daemon may be unreachable mid-window before giving up.
const UNREACHABLE_FOR: Duration = Duration::from_secs(120);

pub enum Target {
    Start {
        cbo: String,
        deployment: String,
        duration: Option<String>,
    },
    Follow {
        id: String,
    },
}

pub struct Options {
    pub server: String,
    pub token: Secret,
    pub target: Target,
    pub json: bool,
    /// Progress redraws one line on a terminal; elsewhere it prints plain lines.
    pub tty: bool,
    pub poll: Duration,
}

fn progress_line(v: &Value, now_ms: i64) -> String {
    let start = v["start_ms"].as_i64().unwrap_or(0);
    let end = v["end_ms"].as_i64().unwrap_or(start).max(start + 1);
    let done = ((now_ms - start) as f64 / (end - start) as f64).clamp(0.0, 1.0);
    let width = 20;
    let filled = (done * width as f64).round() as usize;
    let bar = format!("[{}{}]", "=".repeat(filled), " ".repeat(width - filled));
    let left = Duration::from_secs(((end - now_ms).max(0) / 1000) as u64);
    let criteria: Vec<String> = v["criteria"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let mark = match c["verdict"].as_str() {
                Some("met") => "ok",
                Some("missed") => "MISSED",
                _ => "..",
            };
            format!(
                "{} {} {mark}",
                c["name"].as_str().unwrap_or(""),
                c["value"].as_str().unwrap_or("")
            )
        })
        .collect();
    format!(
        "{bar} {:>3}% {} left | {}",
        (done * 100.0) as u32,
        humantime::format_duration(left),
        criteria.join(" | ")
    )
}

/// The final criteria table.
pub fn table(v: &Value) -> String {
    let mut out = format!(
        "validation {} of cbo {}, deployment {}: {}\n  from {} to {}\n",
        v["id"].as_str().unwrap_or(""),
        v["cbo"].as_str().unwrap_or(""),
        v["deployment"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or("").to_uppercase(),
        v["start"].as_str().unwrap_or(""),
        v["end"].as_str().unwrap_or(""),
    );
    if let Some(reason) = v["reason"].as_str() {
        out += &format!("  reason: {reason}\n");
    }
    out += &format!(
        "  {:<22} {:<20} {:<10} {}\n",
        "criterion", "value", "threshold", "verdict"
    );
    for c in v["criteria"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:<22} {:<20} {:<10} {}\n",
            c["name"].as_str().unwrap_or(""),
            c["value"].as_str().unwrap_or(""),
            c["threshold"].as_str().unwrap_or(""),
            c["verdict"].as_str().unwrap_or(""),
        );
    }
    out
}

async fn request(req: reqwest::RequestBuilder, what: &str) -> Result<Value, (bool, String)> {
    let resp = req.send().await.map_err(|e| {
        let daemon = e
            .url()
            .map(|u| format!("{}://{}", u.scheme(), u.authority()))
            .unwrap_or_else(|| "the daemon".into());
        (
            true,
            format!("{what}: cannot reach {daemon}: {}", crate::net::cause(&e)),
        )
    })?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(body)
    } else {
        let message = body["error"].as_str().unwrap_or("").to_string();
        // 5xx may pass; 4xx (a bad token, an unknown CBO) will not.
        Err((
            status.is_server_error(),
            format!("{what}: {status} {message}"),
        ))
    }
}

/// Runs the command; returns the exit code. Progress goes to `progress`, the result to `out`.
pub async fn run(opts: Options, out: &mut dyn Write, progress: &mut dyn Write) -> i32 {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a plain HTTP client builds");
    let base = opts.server.trim_end_matches('/').to_string();
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth(opts.token.expose());
    let id = match &opts.target {
        Target::Follow { id } => id.clone(),
        Target::Start {
            cbo,
            deployment,
            duration,
        } => {
            let body = json!({"cbo": cbo, "deployment": deployment, "duration": duration});
            let body = if duration.is_none() {
                json!({"cbo": cbo, "deployment": deployment})
            } else {
                body
            };
            match request(
                auth(http.post(format!("{base}/v1/validations")).json(&body)),
                "starting the validation",
            )
            .await
            {
                Ok(v) => {
                    let id = v["id"].as_str().unwrap_or_default().to_string();
                    let _ = writeln!(
                        progress,
                        "started validation {id} of cbo {cbo}, deployment {deployment}, until {}",
                        v["end"].as_str().unwrap_or("")
                    );
                    id
                }
                Err((_, e)) => {
                    let _ = writeln!(progress, "transfer-guard validate: {e}");
                    return COULD_NOT_RUN;
                }
            }
        }
    };
    let url = format!("{base}/v1/validations/{id}");
    let mut last_ok = tokio::time::Instant::now();
    let mut last_line = String::new();
    let mut last_print = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        match request(auth(http.get(&url)), "reading the validation").await {
            Ok(v) => {
                last_ok = tokio::time::Instant::now();
                let state = v["state"].as_str().unwrap_or("");
                if state != "running" {
                    if opts.tty {
                        let _ = write!(progress, "\r\x1b[2K");
                    }
                    if opts.json {
                        let _ = writeln!(
                            out,
                            "{}",
                            serde_json::to_string_pretty(&v).unwrap_or_default()
                        );
                    } else {
                        let _ = write!(out, "{}", table(&v));
                    }
                    return match state {
                        "passed" => PASSED,
                        "failed" => FAILED,
                        "inconclusive" => INCONCLUSIVE,
                        _ => COULD_NOT_RUN,
                    };
                }
                let now_ms = chrono::Utc::now().timestamp_millis();
                let line = progress_line(&v, now_ms);
                if opts.tty {
                    let _ = write!(progress, "\r\x1b[2K{line}");
                    let _ = progress.flush();
                } else {
                    // Plain lines: when the criteria change, and at least every 30 s.
                    let criteria = line
                        .split_once('|')
                        .map(|(_, c)| c.to_string())
                        .unwrap_or_default();
                    if criteria != last_line || last_print.elapsed() >= Duration::from_secs(30) {
                        let _ = writeln!(progress, "{line}");
                        last_line = criteria;
                        last_print = tokio::time::Instant::now();
                    }
                }
            }
            Err((transient, e)) => {
                if !transient || last_ok.elapsed() > UNREACHABLE_FOR {
                    let _ = writeln!(progress, "\ntransfer-guard validate: {e}");
                    return COULD_NOT_RUN;
                }
            }
        }
        tokio::time::sleep(opts.poll).await;
    }
}
