//! The HTTP server bounded (SPEC §13): idle sockets cannot exhaust it, a half-sent request is
//! cut off, a slow body gets 408, and a stop drains what is in flight.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transfer_guard::App;

const BOUNDED: &str = "header_read_timeout = \"2s\"\nrequest_timeout = \"3s\"\nmax_connections = 50\ndrain = \"1s\"\n";

async fn start() -> App {
    let text = config_text("").replacen("[server]\n", &format!("[server]\n{BOUNDED}"), 1);
    start_at(&text, T0).await
}

/// Whether the server closed `s` (a read returns end of file) within `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(start_paused = true)]
async fn an_idle_socket_flood_is_bounded_and_passes() {
    let app = start().await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(app.addr).await.unwrap());
    }
    // Past the cap, new connections are closed at once.
    let mut refused = 0;
    for s in idle.iter_mut().skip(60) {
        if closed(s, Duration::from_millis(100)).await {
            refused += 1;
        }
    }
    assert!(refused >= 230, "{refused} of 240 over the cap were closed");
    // The ones held open say nothing: each is closed after header_read_timeout...
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut still_open = 0;
    for s in idle.iter_mut().take(50) {
        if !closed(s, Duration::from_millis(100)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0);
    // ...and the server answers again.
    let health = reqwest::get(format!("{}/healthz", app.url()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_half_sent_request_is_cut_off_and_a_stalled_body_gets_408() {
    let app = start().await;
    // Headers that never end.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s, Duration::from_secs(5)).await);
    // A body announced but never sent.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Type: application/x-ndjson\r\nContent-Length: 1000\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("server.request_timeout"), "{answer}");
    app.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_is_not_held_by_a_half_sent_request() {
    let app = start().await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    tokio::task::yield_now().await;
    // Shutdown finishes within the drain time although the request never completes.
    tokio::time::timeout(Duration::from_secs(5), app.shutdown())
        .await
        .expect("stopped within the drain");
}
