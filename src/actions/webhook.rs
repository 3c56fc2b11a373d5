//! A signed webhook: the decision as JSON, `X-Transfer-Guard-Signature: sha256=<HMAC-SHA256 of the body>`.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{Attempt, BoxFuture, Integration};
use crate::config::Secret;

pub const SIGNATURE_HEADER: &str = "X-Transfer-Guard-Signature";
/// The intent's key: the same on every attempt of one action, so a receiver drops repeats.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct Webhook {
    pub http: reqwest::Client,
    pub url: String,
    pub secret: Option<Secret>,
    pub timeout: Duration,
}

impl Integration for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn run<'a>(&'a self, a: Attempt<'a>) -> BoxFuture<'a, Result<String, String>> {
        let d = a.decision;
        Box::pin(async move {
            let body = serde_json::to_vec(&json!({
                "cbo": d.cbo, "rule": d.rule.as_str(), "action": d.kind.as_str(),
                "deployment": d.deployment, "decided_at": d.decided_at, "evidence": d.evidence,
                "idempotency_key": a.key,
            }))
            .expect("decisions serialize");
            let mut req = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header(IDEMPOTENCY_HEADER, a.key)
                .body(body.clone());
            if let Some(secret) = &self.secret {
                req = req.header(SIGNATURE_HEADER, sign(secret, &body));
            }
            let resp = tokio::time::timeout(self.timeout, req.send())
                .await
                .map_err(|_| format!("webhook {}: no answer within {:?}", self.url, self.timeout))?
                .map_err(|e| format!("webhook {}: {}", self.url, crate::net::cause(&e)))?;
            let status = resp.status();
            if status.is_success() {
                Ok(format!("webhook {} answered {status}", self.url))
            } else {
                Err(format!("webhook {} answered {status}", self.url))
            }
        })
    }
}
