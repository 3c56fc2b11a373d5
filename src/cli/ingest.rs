//! `transfer-guard ingest`: sends a file or standard input to a running daemon in NDJSON batches and reports each rejected line.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::config::Secret;

/// Lines per request, and bytes per request, well under the daemon's 1 MiB default.
pub const BATCH_LINES: usize = 1000;
pub const BATCH_BYTES: usize = 512 * 1024;
const ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{server} refused the token (401): check --token-env")]
    Unauthorized { server: String },
    #[error("cannot reach {server}: {message}")]
    Unreachable { server: String, message: String },
    #[error("{server} answered {status}: {body}")]
    Server {
        server: String,
        status: u16,
        body: String,
    },
    #[error("reading input: {0}")]
    Input(#[from] std::io::Error),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub lines: u64,
    pub accepted: u64,
    /// (1-based line number, why).
    pub rejected: Vec<(u64, String)>,
}

#[derive(Deserialize)]
struct Reply {
    accepted: u64,
    #[serde(default)]
    rejected: Vec<RejectedLine>,
}

#[derive(Deserialize)]
struct RejectedLine {
    index: u64,
    error: String,
}

/// Sends every line of `input` to `server` (e.g. `http://127.0.0.1:9843`).
pub async fn send(
    server: &str,
    token: &Secret,
    mut input: impl AsyncBufRead + Unpin,
) -> Result<Report, IngestError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a plain HTTP client builds");
    let url = format!("{}/v1/events", server.trim_end_matches('/'));
    let mut report = Report::default();
    let mut batch = String::new();
    let mut batch_first_line = 1;
    let mut batch_lines: u64 = 0;
    let mut line = String::new();
    loop {
        line.clear();
        let n = input.read_line(&mut line).await?;
        if n > 0 {
            let text = line.trim_end_matches(['\n', '\r']);
            batch.push_str(text);
            batch.push('\n');
            batch_lines += 1;
            report.lines += 1;
        }
        let full = batch_lines >= BATCH_LINES as u64 || batch.len() >= BATCH_BYTES;
        if (n == 0 || full) && !batch.trim().is_empty() {
            post(
                &client,
                &url,
                server,
                token,
                &batch,
                batch_first_line,
                &mut report,
            )
            .await?;
        }
        if n == 0 || full {
            batch.clear();
            batch_first_line += batch_lines;
            batch_lines = 0;
        }
        if n == 0 {
            return Ok(report);
        }
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    server: &str,
    token: &Secret,
    batch: &str,
    first_line: u64,
    report: &mut Report,
) -> Result<(), IngestError> {
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=ATTEMPTS {
        let sent = client
            .post(url)
            .bearer_auth(token.expose())
            .header("content-type", "application/x-ndjson")
            .body(batch.to_string())
            .send()
            .await;
        let retry = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                match status {
                    202 | 400 => {
                        // 400 means nothing in this batch parsed: every line comes back rejected.
                        let reply: Reply =
                            serde_json::from_str(&body).map_err(|_| IngestError::Server {
                                server: server.into(),
                                status,
                                body: body.clone(),
                            })?;
                        report.accepted += reply.accepted;
                        report.rejected.extend(
                            reply
                                .rejected
                                .into_iter()
                                .map(|r| (first_line + r.index, r.error)),
                        );
                        return Ok(());
                    }
                    401 => {
                        return Err(IngestError::Unauthorized {
                            server: server.into(),
                        });
                    }
                    429 | 500..=599 => IngestError::Server {
                        server: server.into(),
                        status,
                        body,
                    },
                    _ => {
                        return Err(IngestError::Server {
                            server: server.into(),
                            status,
                            body,
                        });
                    }
                }
            }
            Err(e) => IngestError::Unreachable {
                server: server.into(),
                message: e.to_string(),
            },
        };
        if attempt == ATTEMPTS {
            return Err(retry);
        }
        tracing::warn!(attempt, error = %retry, "retrying batch");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    unreachable!("the last attempt returns")
}
