//! Rules on transfers: success rate (with a Wilson interval), Bad Request minutes, cold and notification latency, history loss.

use serde_json::json;

use super::{Cond, Params, Verdict};
use crate::window::WindowStats;

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The 95 % Wilson score interval of `successes` out of `n`.
pub fn wilson(successes: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = Z95 * Z95;
    let centre = p + z2 / (2.0 * n);
    let spread = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z2 / n;
    (
        ((centre - spread) / denom).max(0.0),
        ((centre + spread) / denom).min(1.0),
    )
}

/// Below the threshold only when the whole 95 % interval is: few transfers or a rate near the
/// threshold decide nothing.
pub fn success_rate(p: &Params, s: &WindowStats) -> Verdict {
    let n = s.counts.decided();
    let (low, high) = wilson(s.counts.completed, n);
    let evidence = json!({
        "completed": s.counts.completed, "failed": s.counts.failed, "timed_out": s.counts.timed_out,
        "decided": n, "success_rate": s.success_rate, "wilson_95": [low, high],
        "threshold": p.threshold, "min_samples": p.min_samples,
        "window": humantime::format_duration(p.window).to_string(),
    });
    let cond = match s.success_rate {
        _ if n < p.min_samples.max(1) => Cond::Inconclusive,
        _ if high < p.threshold => Cond::True,
        Some(rate) if rate < p.threshold => Cond::Inconclusive,
        _ => Cond::False,
    };
    Verdict { cond, evidence }
}

/// The seed's "appearing consistently": Bad Requests in at least `minutes` distinct minutes.
pub fn bad_requests(p: &Params, s: &WindowStats) -> Verdict {
    Verdict {
        cond: if s.bad_request_minutes >= p.minutes.max(1) {
            Cond::True
        } else {
            Cond::False
        },
        evidence: json!({
            "bad_requests": s.counts.bad_request, "taskrouter_bad_requests": s.counts.taskrouter_bad_request,
            "minutes_with_bad_requests": s.bad_request_minutes, "minutes": p.minutes,
            "window": humantime::format_duration(p.window).to_string(),
        }),
    }
}

fn latency(p: &Params, p95: Option<f64>, samples: u64, what: &str) -> Verdict {
    let cond = match p95 {
        _ if samples < p.min_samples.max(1) => Cond::Inconclusive,
        Some(v) if v > p.threshold => Cond::True,
        _ => Cond::False,
    };
    Verdict {
        cond,
        evidence: json!({
            what: p95, "samples": samples, "threshold_seconds": p.threshold,
            "min_samples": p.min_samples, "window": humantime::format_duration(p.window).to_string(),
        }),
    }
}

pub fn cold_latency(p: &Params, s: &WindowStats) -> Verdict {
    latency(
        p,
        s.cold_completion_p95,
        s.cold_completions,
        "cold_completion_p95_seconds",
    )
}

pub fn notification_latency(p: &Params, s: &WindowStats) -> Verdict {
    latency(
        p,
        s.notification_p95,
        s.notifications,
        "notification_p95_seconds",
    )
}

/// The seed wants 100 % of histories preserved: any loss in the window.
pub fn history_loss(p: &Params, s: &WindowStats) -> Verdict {
    Verdict {
        cond: if s.counts.history_lost > 0 {
            Cond::True
        } else {
            Cond::False
        },
        evidence: json!({
            "history_lost": s.counts.history_lost, "completed": s.counts.completed,
            "window": humantime::format_duration(p.window).to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleId;
    use crate::window::Counts;

    fn stats(completed: u64, failed: u64) -> WindowStats {
        let counts = Counts {
            completed,
            failed,
            ..Counts::default()
        };
        WindowStats {
            success_rate: counts.success_rate(),
            counts,
            ..WindowStats::default()
        }
    }

    #[test]
    fn wilson_interval_matches_known_values() {
        let (low, high) = wilson(85, 100);
        assert!(
            (low - 0.7672).abs() < 1e-3 && (high - 0.9069).abs() < 1e-3,
            "{low} {high}"
        );
    }

    #[test]
    fn two_failures_out_of_three_at_night_are_inconclusive() {
        let p = Params::default_for(RuleId::SuccessRate);
        assert_eq!(success_rate(&p, &stats(1, 2)).cond, Cond::Inconclusive);
    }

    #[test]
    fn eighty_five_percent_of_200_is_statistically_below_ninety() {
        let p = Params::default_for(RuleId::SuccessRate);
        assert_eq!(success_rate(&p, &stats(170, 30)).cond, Cond::True);
        // 85 % of 40 could still be 90 %: not enough to act on.
        assert_eq!(success_rate(&p, &stats(34, 6)).cond, Cond::Inconclusive);
        assert_eq!(success_rate(&p, &stats(190, 10)).cond, Cond::False);
    }
}
