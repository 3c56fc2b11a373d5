//! The notify integration: rule breaches and recoveries posted to an Alertmanager v2 API (`POST /api/v2/alerts`), so transfer-guard's own decisions reach the same receivers as Prometheus' alerts.

use std::time::Duration;

use serde_json::{Value, json};

use crate::clock::rfc3339;
use crate::rules::RuleId;

/// Alertmanager resolves an alert it has not heard of for this long; breaches are re-sent well
/// within it.
pub const RESEND_EVERY: Duration = Duration::from_secs(60);
const VALID_FOR: Duration = Duration::from_secs(5 * 60);

pub fn severity(rule: RuleId) -> &'static str {
    match rule {
        RuleId::ColdTransferLatency | RuleId::NotificationLatency | RuleId::HistoryLoss => "ticket",
        _ => "page",
    }
}

/// Where an alert's links lead: the daemon (`server.external_url`) and the runbook.
pub struct Links {
    pub base: String,
    pub runbook: String,
}

impl Links {
    pub fn of(server: &crate::config::ServerSection) -> Links {
        Links {
            base: server.link_base(),
            runbook: server.runbook_url.clone(),
        }
    }
}

/// One postable alert: firing (`resolved = false`, valid for five minutes) or resolved now.
pub fn alert(
    cbo: &str,
    rule: RuleId,
    evidence: &Value,
    resolved: bool,
    now_ms: i64,
    links: &Links,
) -> Value {
    let mut a = json!({
        "labels": {
            "alertname": "TransferGuardRuleBreached",
            "cbo": cbo,
            "rule": rule.as_str(),
            "severity": severity(rule),
            "source": "transfer-guard",
        },
        "annotations": {
            "summary": format!("transfer-guard: rule {} breached on {cbo}", rule.as_str()),
            "description": format!("CBO {cbo}: rule {} breached; evidence {evidence}", rule.as_str()),
            "runbook_url": format!("{}#{}", links.runbook, rule.as_str().replace('_', "-")),
        },
        "generatorURL": format!("{}/v1/status?cbo={cbo}", links.base),
    });
    if resolved {
        a["endsAt"] = json!(rfc3339(now_ms));
    } else {
        a["endsAt"] = json!(rfc3339(now_ms + VALID_FOR.as_millis() as i64));
    }
    a
}

/// Posts `alerts`, retrying twice with backoff; the error names the Alertmanager and its answer.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    alerts: &[Value],
) -> Result<(), String> {
    let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match tokio::time::timeout(timeout, http.post(&endpoint).json(alerts).send()).await {
            Ok(Ok(r)) if r.status().is_success() => return Ok(()),
            Ok(Ok(r)) => last = format!("{endpoint} answered {}", r.status()),
            Ok(Err(e)) => last = format!("{endpoint}: {}", crate::net::cause(&e)),
            Err(_) => last = format!("{endpoint}: no answer within {timeout:?}"),
        }
    }
    Err(last)
}
