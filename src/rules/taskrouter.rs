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
    // Errors among tasks entered, judged like the success rate: above the threshold only when
    // the whole 95 % Wilson interval is, with at least `min_samples` tasks entered.
    let (n, errors) = tr.statistics.as_ref().map_or((0, 0), |s| {
        (
            s.tasks_entered.max(0) as u64,
            (s.tasks_canceled + s.tasks_timed_out_in_workflow).max(0) as u64,
        )
    });
    let errors = errors.min(n);
    let (low, high) = super::transfer::wilson(errors, n);
    let floor = p.min_samples.max(1);
    let (cond, missing) = match tr.error_ratio {
        _ if !fresh => (
            Cond::Inconclusive,
            Some("fresh TaskRouter statistics".to_string()),
        ),
        _ if n < floor => (
            Cond::Inconclusive,
            Some(super::transfer::missing(n, floor, "tasks entered")),
        ),
        _ if low > p.threshold => (Cond::True, None),
        Some(r) if r > p.threshold => (
            Cond::Inconclusive,
            Some(format!(
                "above {:.0} % but not significantly ({n} tasks entered)",
                p.threshold * 100.0
            )),
        ),
        _ => (Cond::False, None),
    };
    Verdict {
        cond,
        evidence: json!({
            "taskrouter_error_ratio": tr.error_ratio, "threshold": p.threshold, "fresh": fresh,
            "method": "wilson_95", "n": n, "errors": errors, "bound": low, "wilson_95": [low, high],
            "min_samples": floor, "missing": missing,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleId;
    use crate::twilio::taskrouter::CumulativeStatistics;

    fn status(entered: i64, canceled: i64) -> TaskRouterStatus {
        let statistics = CumulativeStatistics {
            tasks_entered: entered,
            tasks_canceled: canceled,
            ..Default::default()
        };
        TaskRouterStatus {
            error_ratio: statistics.error_ratio(),
            statistics: Some(statistics),
            statistics_at_ms: Some(0),
            ..Default::default()
        }
    }

    fn verdict(entered: i64, canceled: i64) -> Verdict {
        let p = Params::default_for(RuleId::TaskrouterErrorRate);
        error_rate(
            &p,
            &status(entered, canceled),
            Duration::from_secs(15),
            1_000,
        )
    }

    #[test]
    fn one_canceled_task_of_three_is_inconclusive_not_a_rollback() {
        let v = verdict(3, 1);
        assert_eq!(v.cond, Cond::Inconclusive);
        assert_eq!(v.evidence["missing"], "3 of the 20 tasks entered needed");
    }

    #[test]
    fn an_error_rate_significantly_above_five_percent_holds() {
        assert_eq!(verdict(200, 30).cond, Cond::True);
        // 3 of 40 is 7.5 %, but could well be 5 %.
        assert_eq!(verdict(40, 3).cond, Cond::Inconclusive);
        assert_eq!(verdict(200, 4).cond, Cond::False);
    }
}
