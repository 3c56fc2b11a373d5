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

/// Polls in a row that must see a new problem before it is corruption: one 404 between good
/// polls is Twilio's, not the deployment's.
pub const CORRUPTION_POLLS: u32 = 2;

/// Corruption is a problem that appeared while the daemon watched, seen on two polls in a
/// row; a problem known since start is `config_mismatch` (paged, never rolled back).
pub fn corruption(tr: &TaskRouterStatus) -> Verdict {
    let new: Vec<_> = tr.new_problems().collect();
    Verdict {
        cond: match tr.config_ok {
            _ if !new.is_empty() && tr.new_problem_polls >= CORRUPTION_POLLS => Cond::True,
            // Seen once: looked at again on the next poll before anything is decided.
            _ if !new.is_empty() => Cond::Inconclusive,
            None if tr.mismatch.is_empty() => Cond::Inconclusive,
            _ => Cond::False,
        },
        evidence: json!({
            "problems": new, "config_mismatch": tr.mismatch,
            "polls_in_a_row": tr.new_problem_polls,
            "functions_workflow_sid": tr.functions_workflow_sid,
            "baseline": tr.baseline, "latest_deployment": tr.latest_deployment,
        }),
    }
}
