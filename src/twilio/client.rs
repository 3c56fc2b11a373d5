//! The Twilio HTTP client: Basic auth, per-request timeout, retries of reads with jittered backoff (never of writes), a capped `Retry-After`, a per-account concurrency limit, typed errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::config::{Credentials, Secret};
use crate::sid::AccountSid;

/// How a failed request is counted in `taskrouter_polls_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PollResult {
    Ok,
    ClientError,
    ServerError,
    Timeout,
    RateLimited,
}

impl PollResult {
    pub const ALL: [PollResult; 5] = [
        PollResult::Ok,
        PollResult::ClientError,
        PollResult::ServerError,
        PollResult::Timeout,
        PollResult::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PollResult::Ok => "ok",
            PollResult::ClientError => "client_error",
            PollResult::ServerError => "server_error",
            PollResult::Timeout => "timeout",
            PollResult::RateLimited => "rate_limited",
        }
    }
}

/// Twilio's error body (`code`, `message`, `more_info`, `status`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
pub struct ApiErrorBody {
    pub code: Option<i64>,
    pub message: Option<String>,
    pub more_info: Option<String>,
    pub status: Option<u16>,
}

/// A failed call. Every variant names the resource; none carries a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TwilioError {
    #[error("{resource}: Twilio {status}{}{}", .body.message.as_ref().map(|m| format!(" {m}")).unwrap_or_default(), .body.code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Api {
        resource: String,
        status: u16,
        body: ApiErrorBody,
    },
    #[error("{resource}: rate limited by Twilio (429) after {attempts} attempts{}", .retry_after.map(|d| format!("; Twilio asks to wait {}", humantime::format_duration(d))).unwrap_or_default())]
    RateLimited {
        resource: String,
        attempts: u32,
        /// What Twilio asked for (capped): the caller waits this long before asking again.
        retry_after: Option<Duration>,
    },
    #[error("{resource}: no answer within {timeout:?}")]
    Timeout { resource: String, timeout: Duration },
    #[error("{resource}: {message}")]
    Transport { resource: String, message: String },
    #[error("{resource}: unexpected answer: {message}")]
    Decode { resource: String, message: String },
}

impl TwilioError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TwilioError::Api { status, .. } => Some(*status),
            TwilioError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    pub fn poll_result(&self) -> PollResult {
        match self {
            TwilioError::Api { status, .. } if *status >= 500 => PollResult::ServerError,
            TwilioError::Api { .. } | TwilioError::Decode { .. } => PollResult::ClientError,
            TwilioError::RateLimited { .. } => PollResult::RateLimited,
            TwilioError::Timeout { .. } => PollResult::Timeout,
            TwilioError::Transport { .. } => PollResult::ServerError,
        }
    }

    /// How long Twilio asked to be left alone, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TwilioError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Retry policy: reads are retried on 5xx, timeouts, transport errors and 429; writes only on
/// 429 (Twilio refused them unprocessed).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
    /// The longest `Retry-After` obeyed; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// The longest `Retry-After` slept inside one call; a longer one returns `RateLimited`
    /// with the wait, so a poller reschedules instead of hanging.
    pub max_inline_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 3,
            base: Duration::from_millis(500),
            max: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(300),
            max_inline_wait: Duration::from_secs(10),
        }
    }
}

/// Parses `Retry-After`: delay-seconds, or an HTTP-date (RFC 9110) measured from `now_ms`.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = (at.timestamp_millis() - now_ms).max(0);
    Some(Duration::from_millis(ms as u64))
}

/// Whether a request changes Twilio: such a request is sent once, never again blindly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Read,
    Write,
}

impl Retry {
    /// Full jitter: a random delay up to base * 2^attempt, capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// A client for one Twilio account: all its CBOs share its concurrency limit.
#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
    account: AccountSid,
    username: String,
    password: Secret,
    limit: Arc<Semaphore>,
    timeout: Duration,
    retry: Retry,
    clock: Clock,
}

impl fmt::Debug for TwilioClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwilioClient")
            .field("account", &self.account)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl TwilioClient {
    pub fn new(
        account: AccountSid,
        credentials: &Credentials,
        timeout: Duration,
        max_concurrent: usize,
        retry: Retry,
        clock: Clock,
    ) -> TwilioClient {
        let (username, password) = match credentials {
            Credentials::AuthToken(token) => (account.to_string(), token.clone()),
            Credentials::ApiKey { sid, secret } => (sid.to_string(), secret.clone()),
        };
        TwilioClient {
            http: reqwest::Client::builder()
                .user_agent(concat!("transfer-guard/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("a rustls client builds"),
            account,
            username,
            password,
            limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
            timeout,
            retry,
            clock,
        }
    }

    pub fn account(&self) -> &AccountSid {
        &self.account
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        url: &str,
        query: &[(&str, String)],
        resource: &str,
    ) -> Result<T, TwilioError> {
        self.call(resource, Method::Read, || self.http.get(url).query(query))
            .await
    }

    pub async fn post_form<T: DeserializeOwned>(
        &self,
        url: &str,
        form: &[(&str, String)],
        resource: &str,
    ) -> Result<T, TwilioError> {
        self.call(resource, Method::Write, || self.http.post(url).form(form))
            .await
    }

    /// DELETE: a write (sent once; only a 429 is retried); the answer has no body.
    pub async fn delete(&self, url: &str, resource: &str) -> Result<(), TwilioError> {
        self.call(resource, Method::Write, || self.http.delete(url))
            .await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        url: &str,
        body: &serde_json::Value,
        resource: &str,
    ) -> Result<T, TwilioError> {
        self.call(resource, Method::Write, || self.http.post(url).json(body))
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        resource: &str,
        method: Method,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, TwilioError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (err, retry_after) = match self.once(resource, &build).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry_after = retry_after.map(|d| d.min(self.retry.max_retry_after));
            let wait = match &err {
                // A write that failed in any other way may have been applied: the caller
                // reads whether it took effect before trying again.
                _ if method == Method::Write && !matches!(err, TwilioError::RateLimited { .. }) => {
                    return Err(err);
                }
                TwilioError::Api { status, .. } if *status >= 500 => self.retry.backoff(attempt),
                TwilioError::Timeout { .. } | TwilioError::Transport { .. } => {
                    self.retry.backoff(attempt)
                }
                TwilioError::RateLimited { .. } => {
                    retry_after.unwrap_or_else(|| self.retry.backoff(attempt))
                }
                _ => return Err(err),
            };
            let throttled = retry_after.is_some_and(|d| d > self.retry.max_inline_wait);
            if attempt >= self.retry.attempts || throttled {
                return Err(match err {
                    TwilioError::RateLimited { resource, .. } => TwilioError::RateLimited {
                        resource,
                        attempts: attempt,
                        retry_after,
                    },
                    e => e,
                });
            }
            tracing::debug!(resource, attempt, wait = ?wait, error = %err, "retrying Twilio request");
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt, holding one of the account's permits only while the request is in flight.
    async fn once<T: DeserializeOwned>(
        &self,
        resource: &str,
        build: &impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, (TwilioError, Option<Duration>)> {
        let _permit = self
            .limit
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let request = build().basic_auth(&self.username, Some(self.password.expose()));
        let exchange = async {
            let resp = request.send().await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, self.clock.now_ms()));
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = match tokio::time::timeout(self.timeout, exchange).await
        {
            Err(_) => {
                return Err((
                    TwilioError::Timeout {
                        resource: resource.to_string(),
                        timeout: self.timeout,
                    },
                    None,
                ));
            }
            Ok(Err(e)) => {
                // reqwest's message names the URL and the cause; never a header.
                let message = crate::net::cause(&e);
                return Err((
                    TwilioError::Transport {
                        resource: resource.to_string(),
                        message,
                    },
                    None,
                ));
            }
            Ok(Ok(answer)) => answer,
        };
        if status == 429 {
            return Err((
                TwilioError::RateLimited {
                    resource: resource.to_string(),
                    attempts: 1,
                    retry_after: None,
                },
                retry_after,
            ));
        }
        if !(200..300).contains(&status) {
            let body =
                serde_json::from_slice::<ApiErrorBody>(&bytes).unwrap_or_else(|_| ApiErrorBody {
                    message: Some(String::from_utf8_lossy(&bytes).chars().take(200).collect()),
                    ..ApiErrorBody::default()
                });
            return Err((
                TwilioError::Api {
                    resource: resource.to_string(),
                    status,
                    body,
                },
                None,
            ));
        }
        // 204 No Content (a DELETE): nothing to read.
        let bytes = if bytes.is_empty() {
            axum::body::Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice::<T>(&bytes).map_err(|e| {
            (
                TwilioError::Decode {
                    resource: resource.to_string(),
                    message: e.to_string(),
                },
                None,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        // A date already past means "now".
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
