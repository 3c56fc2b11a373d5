//! `transfer-guard ingest`: sends a file or standard input to a running daemon in NDJSON batches and reports each rejected line.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::task::JoinSet;

use crate::config::Secret;

/// Lines per request, and bytes per request. A batch ends at the line that reaches
/// `BATCH_BYTES`, so a body is at most `BATCH_BYTES + MAX_LINE_BYTES + 1` bytes: under the
/// daemon's 1 MiB default. Large batches are cheaper to take (a lock, a journal write and a
/// thread hop per request); a daemon with a smaller limit answers 413 and gets halves.
pub const BATCH_LINES: usize = 5000;
pub const BATCH_BYTES: usize = 896 * 1024;
/// A longer line is no event: reported by its number, not sent, not held in memory whole.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
const _: () = assert!(BATCH_BYTES + MAX_LINE_BYTES < 1024 * 1024);
/// The read buffer for a file: each read of a tokio file is a hop to a blocking thread.
pub const READ_BUFFER: usize = 1024 * 1024;
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
    /// Rejected lines the daemon counted without listing them (beyond 100 in one batch).
    pub rejected_unlisted: u64,
}

/// One line of the input: its bytes (at most `MAX_LINE_BYTES`, without the newline), or how
/// long it was when longer. `None` at the end.
async fn next_line(
    input: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Result<(), usize>>> {
    buf.clear();
    let mut len = 0usize;
    let mut any = false;
    loop {
        let chunk = input.fill_buf().await?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (part, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        len += part.len();
        if len <= MAX_LINE_BYTES {
            buf.extend_from_slice(part);
        }
        let used = done.unwrap_or(chunk.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if len > MAX_LINE_BYTES {
        buf.clear();
        return Ok(Some(Err(len)));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(Ok(())))
}

/// A batch's text, with room for the largest batch: it is not copied as it grows.
fn batch_buffer() -> String {
    String::with_capacity(BATCH_BYTES + MAX_LINE_BYTES + 1)
}

/// Appends to `batch` the complete lines already read that go as they are (UTF-8, no
/// carriage return or byte-order mark, none too long), at most `room` (lines, bytes: a batch
/// ends at the line that reaches its bytes); how many (0 when the next line is not such).
async fn clean_lines(
    input: &mut (impl AsyncBufRead + Unpin),
    batch: &mut String,
    (lines, bytes): (usize, usize),
) -> std::io::Result<usize> {
    let chunk = input.fill_buf().await?;
    // Not further than the room can take, so the searches below stay within one batch.
    let chunk = &chunk[..chunk.len().min(bytes + MAX_LINE_BYTES + 1)];
    let changed = memchr::memchr(b'\r', chunk)
        .into_iter()
        .chain(memchr::memmem::find(chunk, "\u{feff}".as_bytes()))
        .min()
        .unwrap_or(chunk.len());
    let valid = match std::str::from_utf8(&chunk[..changed]) {
        Ok(text) => text.len(),
        Err(e) => e.valid_up_to(),
    };
    let (mut end, mut taken) = (0, 0);
    for newline in memchr::memchr_iter(b'\n', &chunk[..valid]) {
        if newline - end > MAX_LINE_BYTES {
            break;
        }
        end = newline + 1;
        taken += 1;
        if taken == lines || end >= bytes {
            break;
        }
    }
    if taken > 0 {
        batch.push_str(std::str::from_utf8(&chunk[..end]).expect("checked above"));
        input.consume(end);
    }
    Ok(taken)
}

#[derive(Deserialize)]
struct Reply {
    accepted: u64,
    #[serde(default)]
    rejected: Vec<RejectedLine>,
    #[serde(default)]
    rejected_more: u64,
}

#[derive(Deserialize)]
struct RejectedLine {
    index: u64,
    error: String,
}

/// Batches in flight at once: the daemon parses some while it takes another, and the next
/// is read meanwhile. Events of two batches may be taken in either order, as events posted by
/// two browsers are: a transfer's events are paired by conversation, not by arrival. Six kept
/// a 2-core daemon busier than four (BENCHMARKS.md, thirteenth round); more gained nothing.
const IN_FLIGHT: usize = 6;

/// What the daemon said of one batch: accepted, rejected lines (numbered in the input), and
/// rejected lines it did not list.
type Answer = (u64, Vec<(u64, String)>, u64);

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
    let endpoint = Arc::new(Endpoint {
        client,
        url: format!("{}/v1/events", server.trim_end_matches('/')),
        server: server.to_string(),
        token: token.clone(),
    });
    let mut report = Report::default();
    // Whichever batch is answered first frees its place: one waiting for the CBO's lock
    // does not hold back the next batch while the others are done.
    let mut flying: JoinSet<Result<Answer, IngestError>> = JoinSet::new();
    let result = async {
        let mut batch = batch_buffer();
        let mut batch_first_line = 1;
        let mut batch_lines: u64 = 0;
        let mut line = Vec::new();
        loop {
            // Whole lines as they are, many at a time; a line to report or change, or one
            // not yet read whole, goes alone through `next_line`.
            let room = (
                BATCH_LINES - batch_lines as usize,
                BATCH_BYTES.saturating_sub(batch.len()),
            );
            let clean = clean_lines(&mut input, &mut batch, room).await?;
            report.lines += clean as u64;
            batch_lines += clean as u64;
            let read = if clean == 0 {
                next_line(&mut input, &mut line).await?
            } else {
                None
            };
            let n = clean.max(usize::from(read.is_some()));
            if let Some(read) = read {
                report.lines += 1;
                let number = batch_first_line + batch_lines;
                // A line that cannot be an event is reported here and an empty line sent in
                // its place, so the daemon's indexes still map to line numbers.
                let text = match (read, std::str::from_utf8(&line)) {
                    (Err(len), _) => {
                        report.rejected.push((
                            number,
                            format!("line of {len} bytes, over {MAX_LINE_BYTES}: not sent"),
                        ));
                        ""
                    }
                    (Ok(()), Err(e)) => {
                        report
                            .rejected
                            .push((number, format!("line is not UTF-8 ({e}): not sent")));
                        ""
                    }
                    (Ok(()), Ok(text)) => text.strip_prefix('\u{feff}').unwrap_or(text),
                };
                batch.push_str(text);
                batch.push('\n');
                batch_lines += 1;
            }
            let full = batch_lines >= BATCH_LINES as u64 || batch.len() >= BATCH_BYTES;
            if (n == 0 || full) && !batch.trim().is_empty() {
                if flying.len() >= IN_FLIGHT {
                    let answer = flying.join_next().await.expect("one is in flight");
                    merge(&mut report, server, answer)?;
                }
                let body = Bytes::from(std::mem::replace(&mut batch, batch_buffer()));
                flying.spawn(post_split(endpoint.clone(), body, batch_first_line));
            }
            if n == 0 || full {
                batch.clear();
                batch_first_line += batch_lines;
                batch_lines = 0;
            }
            if n == 0 {
                while let Some(answer) = flying.join_next().await {
                    merge(&mut report, server, answer)?;
                }
                return Ok(());
            }
        }
    }
    .await;
    flying.abort_all();
    result.map(|()| {
        report.rejected.sort_by_key(|(line, _)| *line);
        report
    })
}

/// Adds one batch's answer to the report, or says why the batch has none.
fn merge(
    report: &mut Report,
    server: &str,
    answer: Result<Result<Answer, IngestError>, tokio::task::JoinError>,
) -> Result<(), IngestError> {
    let (accepted, rejected, unlisted) = answer.map_err(|e| IngestError::Unreachable {
        server: server.to_string(),
        message: format!("the request's task ended: {e}"),
    })??;
    report.accepted += accepted;
    report.rejected.extend(rejected);
    report.rejected_unlisted += unlisted;
    Ok(())
}

/// Sends one batch; a batch the daemon refuses as too large (413: its `max_body_bytes` is
/// smaller than this batch) is sent again as two halves, one after the other, until each fits
/// or is one line. Nothing of a body refused with 413 was taken, so no event is sent twice.
async fn post_split(
    endpoint: Arc<Endpoint>,
    batch: Bytes,
    first_line: u64,
) -> Result<Answer, IngestError> {
    let mut answer: Answer = (0, Vec::new(), 0);
    // Parts still to send, the next one last.
    let mut parts = vec![(batch, first_line)];
    while let Some((part, first)) = parts.pop() {
        let sent = post(&endpoint, part.clone(), first).await;
        let split = match &sent {
            Err(IngestError::Server { status: 413, .. }) => halves(&part),
            _ => None,
        };
        if let Some((head, tail)) = split {
            let tail_first = first + memchr::memchr_iter(b'\n', &head).count() as u64;
            parts.push((tail, tail_first));
            parts.push((head, first));
            continue;
        }
        let (accepted, rejected, unlisted) = sent?;
        answer.0 += accepted;
        answer.1.extend(rejected);
        answer.2 += unlisted;
    }
    Ok(answer)
}

/// A batch of more than one line cut at a line boundary near its middle.
fn halves(batch: &Bytes) -> Option<(Bytes, Bytes)> {
    let body = &batch[..batch.len().saturating_sub(1)];
    let mid = body.len() / 2;
    let cut = memchr::memrchr(b'\n', &body[..mid])
        .or_else(|| memchr::memchr(b'\n', &body[mid..]).map(|i| mid + i))?
        + 1;
    Some((batch.slice(..cut), batch.slice(cut..)))
}

/// Where the batches go: a daemon's events endpoint, and the token to send.
struct Endpoint {
    client: reqwest::Client,
    url: String,
    /// As the user gave it, for errors.
    server: String,
    token: Secret,
}

async fn post(endpoint: &Endpoint, batch: Bytes, first_line: u64) -> Result<Answer, IngestError> {
    let server = &endpoint.server;
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=ATTEMPTS {
        let sent = endpoint
            .client
            .post(&endpoint.url)
            .bearer_auth(endpoint.token.expose())
            .header("content-type", "application/x-ndjson")
            .body(batch.clone())
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
                                server: server.clone(),
                                status,
                                body: body.clone(),
                            })?;
                        let rejected = reply
                            .rejected
                            .into_iter()
                            .map(|r| (first_line + r.index, r.error))
                            .collect();
                        return Ok((reply.accepted, rejected, reply.rejected_more));
                    }
                    401 => {
                        return Err(IngestError::Unauthorized {
                            server: server.clone(),
                        });
                    }
                    429 | 500..=599 => IngestError::Server {
                        server: server.clone(),
                        status,
                        body,
                    },
                    _ => {
                        return Err(IngestError::Server {
                            server: server.clone(),
                            status,
                            body,
                        });
                    }
                }
            }
            Err(e) => IngestError::Unreachable {
                server: server.clone(),
                message: crate::net::cause(&e),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// What the fake daemon saw: bodies received, and whether the first one was let go because
    /// enough others came after it (not because it waited too long).
    #[derive(Default)]
    struct Seen {
        bodies: Mutex<usize>,
        more: Notify,
        released_by_count: Mutex<Option<bool>>,
    }

    /// A fake daemon on loopback that answers `POST /v1/events` with `handler`; its URL.
    async fn fake_daemon<H, T>(handler: H) -> String
    where
        H: axum::handler::Handler<T, ()>,
        T: 'static,
    {
        let app = axum::Router::new().route("/v1/events", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    /// The daemon's answer when it took every line of a body of `lines`.
    fn all_taken(lines: usize) -> (axum::http::StatusCode, String) {
        (
            axum::http::StatusCode::ACCEPTED,
            format!(r#"{{"accepted":{lines}}}"#),
        )
    }

    /// Lines go as they are, many at a time, or one at a time when one must be changed or
    /// reported; either way each line is sent as the line-by-line rule says, wherever the read
    /// buffer cuts the input.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_is_sent_as_the_line_by_line_rule_says_whatever_the_read_buffer() {
        let mut input = Vec::new();
        for i in 0..12_000 {
            if i % 1999 == 5 {
                input.extend_from_slice("\u{feff}".as_bytes());
            }
            let line = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 300));
            input.extend_from_slice(line.as_bytes());
            match i % 997 {
                1 => input.extend_from_slice(b"\r"),
                2 => input.extend_from_slice(b"\xff"),
                3 => input.extend_from_slice(&vec![b'y'; MAX_LINE_BYTES]),
                _ => {}
            }
            input.push(b'\n');
        }
        input.extend_from_slice(b"last line, no newline");
        // The rule, one line at a time: too long or not UTF-8 is reported and sent empty; a
        // carriage return at the end and a byte-order mark at the start are dropped.
        let mut want = Vec::new();
        let mut rejected = Vec::new();
        for (i, raw) in input.split(|b| *b == b'\n').enumerate() {
            let raw = if raw.len() > MAX_LINE_BYTES {
                rejected.push(i as u64 + 1);
                &[][..]
            } else {
                raw.strip_suffix(b"\r").unwrap_or(raw)
            };
            match std::str::from_utf8(raw) {
                Ok(text) => want.push(text.strip_prefix('\u{feff}').unwrap_or(text).to_string()),
                Err(_) => {
                    rejected.push(i as u64 + 1);
                    want.push(String::new());
                }
            }
        }
        want.sort();
        for capacity in [100, 4096, READ_BUFFER] {
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let handler = {
                let bodies = bodies.clone();
                move |body: Bytes| {
                    let lines = memchr::memchr_iter(b'\n', &body).count();
                    bodies.lock().unwrap().push(body);
                    async move { all_taken(lines) }
                }
            };
            let server = fake_daemon(handler).await;
            let reader = tokio::io::BufReader::with_capacity(capacity, &input[..]);
            let report = send(&server, &Secret::new("t"), reader).await.unwrap();
            assert_eq!(report.lines, want.len() as u64, "capacity {capacity}");
            let numbers: Vec<u64> = report.rejected.iter().map(|(n, _)| *n).collect();
            assert_eq!(numbers, rejected, "capacity {capacity}");
            let mut sent: Vec<String> = Vec::new();
            for body in bodies.lock().unwrap().iter() {
                assert!(body.len() <= BATCH_BYTES + MAX_LINE_BYTES + 1);
                let text = std::str::from_utf8(body).unwrap();
                let text = text.strip_suffix('\n').expect("a body ends with a newline");
                sent.extend(text.split('\n').map(str::to_string));
            }
            sent.sort();
            assert!(sent == want, "capacity {capacity}: the lines sent differ");
        }
    }

    /// A batch still unanswered does not hold back the next ones: while the first waits (the
    /// CBO's lock, say), the others are answered and their places go to further batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_batch_does_not_hold_back_the_batches_after_it() {
        let seen = Arc::new(Seen::default());
        // The first body is answered only once this many bodies arrived in all: more than
        // fit in flight beside it, so the client must have refilled the others' places.
        let wanted = IN_FLIGHT + 2;
        let handler = {
            let seen = seen.clone();
            move |body: Bytes| {
                let seen = seen.clone();
                async move {
                    let lines = memchr::memchr_iter(b'\n', &body).count();
                    let first = {
                        let mut n = seen.bodies.lock().unwrap();
                        *n += 1;
                        *n == 1
                    };
                    seen.more.notify_waiters();
                    if first {
                        let waited = tokio::time::timeout(Duration::from_secs(10), async {
                            loop {
                                let notified = seen.more.notified();
                                if *seen.bodies.lock().unwrap() >= wanted {
                                    break;
                                }
                                notified.await;
                            }
                        })
                        .await;
                        *seen.released_by_count.lock().unwrap() = Some(waited.is_ok());
                    }
                    all_taken(lines)
                }
            }
        };
        let server = fake_daemon(handler).await;
        let lines = BATCH_LINES * (wanted + 1);
        let input = "x\n".repeat(lines);
        let report = send(&server, &Secret::new("t"), input.as_bytes())
            .await
            .unwrap();
        assert_eq!(report.lines, lines as u64);
        assert_eq!(report.accepted, lines as u64);
        assert_eq!(*seen.bodies.lock().unwrap(), wanted + 1);
        assert_eq!(
            *seen.released_by_count.lock().unwrap(),
            Some(true),
            "the first batch was answered only after waiting 10 s for the others"
        );
    }
}
