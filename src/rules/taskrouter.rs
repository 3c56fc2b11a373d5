//! Rules on what polling sees: the TaskRouter error rate and configuration corruption.

use std::time::Duration;

use serde_json::json;

use super::{Cond, Params, Verdict};
use crate::health::TaskRouterStatus;

/// Statistics older than this many poll intervals decide nothing (a TaskRouter outage is not a
/// transfer failure).
const STALE_AFTER_POLLS: u32 = 3;

pub fn error_rate(
    p: &Params,
    tr: &TaskRouterStatus,
    poll_interval: Duration,
    now_ms: i64,
) -> Verdict {
    let fresh = tr
        .statistics_at_ms
        .is_some_and(|at| now_ms - at <= (poll_interval * STALE_AFTER_POLLS).as_millis() as i64);
    let cond = match tr.error_ratio {
        Some(r) if fresh && r > p.threshold => Cond::True,
        Some(_) if fresh => Cond::False,
        _ => Cond::Inconclusive,
    };
    Verdict {
        cond,
        evidence: json!({
            "taskrouter_error_ratio": tr.error_ratio, "threshold": p.threshold, "fresh": fresh,
            "statistics": tr.statistics, "last_poll": tr.last_poll, "last_result": tr.last_result,
        }),
    }
}

pub fn corruption(tr: &TaskRouterStatus) -> Verdict {
    Verdict {
        cond: match tr.config_ok {
            Some(false) => Cond::True,
            Some(true) => Cond::False,
            None if !tr.problems.is_empty() => Cond::True,
            None => Cond::Inconclusive,
        },
        evidence: json!({
            "problems": tr.problems, "functions_workflow_sid": tr.functions_workflow_sid,
            "baseline": tr.baseline, "latest_deployment": tr.latest_deployment,
        }),
    }
}
