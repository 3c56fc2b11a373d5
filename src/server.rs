//! The HTTP server, bounded (SPEC §13): at most `max_connections` connections (one over the
//! cap is closed at once, so idle sockets cannot exhaust file descriptors or starve Twilio
//! polling), request headers read within `header_read_timeout` (which also closes a
//! keep-alive connection idle that long), each request, its body included, answered within
//! `request_timeout` (else 408), and on stop the connections in flight drained for at most
//! `drain` before the rest are closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// The server's bounds (`[server]` keys of the same names).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub drain: Duration,
}

/// Connections closed at once because `max_connections` were open.
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Answers 408 when a request (its body included) takes longer than `limit`.
pub fn with_request_timeout(router: Router, limit: Duration) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| async move {
            match tokio::time::timeout(limit, next.run(req)).await {
                Ok(r) => r,
                Err(_) => crate::api::json_error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "the request took longer than {} (server.request_timeout)",
                        humantime::format_duration(limit)
                    ),
                ),
            }
        },
    ))
}

/// Serves `router` on `listener` until `stop`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let router = with_request_timeout(router, limits.request_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_warned = Some(tokio::time::Instant::now());
                tracing::warn!(
                    max = limits.max_connections,
                    "connections at server.max_connections: closing new ones until some end"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(drain = ?limits.drain, "requests still in flight after the drain time: closed");
    }
}
