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

/// "k of the n finished transfers needed", for on-call and the validation result.
pub fn missing(have: u64, need: u64, what: &str) -> String {
    format!("{have} of the {need} {what} needed")
}

/// Below the threshold only when the whole 95 % Wilson interval is, judged two ways:
/// - busy CBOs, the fast path: at least `fast_min_samples` finished transfers in the trailing
///   `window` (5m), held for `for` (15m);
/// - quiet CBOs (too few for the fast path), the seed's horizon: at least `min_samples` (5)
///   finished transfers over the trailing `horizon` (15m) with failures already in its first
///   third (so the failing has lasted most of the horizon): breached at once, the horizon
///   covering `for`.
///
/// `stats(w)` reads the trailing `w`; timed-out transfers count as failures.
pub fn success_rate(p: &Params, stats: &dyn Fn(std::time::Duration) -> WindowStats) -> Verdict {
    let fast = stats(p.window);
    let horizon = stats(p.horizon);
    let later = stats(p.horizon - p.horizon / 3);
    let failures = |s: &WindowStats| s.counts.failed + s.counts.timed_out;
    let early_failures = failures(&horizon).saturating_sub(failures(&later));
    let (n_f, n_h) = (fast.counts.decided(), horizon.counts.decided());
    let (_, high_f) = wilson(fast.counts.completed, n_f);
    let (low_h, high_h) = wilson(horizon.counts.completed, n_h);
    let floor = p.min_samples.max(1);
    let fast_floor = p.fast_min_samples.max(floor);
    let rate_h = horizon.success_rate;
    let busy = n_f >= fast_floor;
    let (cond, missing_text) = if busy && high_f < p.threshold {
        (Cond::True, None)
    } else if !busy && n_h >= floor && high_h < p.threshold && early_failures > 0 {
        (Cond::Held, None)
    } else if n_h < floor {
        (
            Cond::Inconclusive,
            Some(missing(n_h, floor, "finished transfers")),
        )
    } else if rate_h.is_some_and(|r| r >= p.threshold)
        && fast.success_rate.is_none_or(|r| r >= p.threshold)
    {
        (Cond::False, None)
    } else if high_h < p.threshold {
        (
            Cond::Inconclusive,
            Some(format!(
                "failing for less than the {} horizon",
                humantime::format_duration(p.horizon)
            )),
        )
    } else {
        (
            Cond::Inconclusive,
            Some(format!(
                "below {:.0} % but not significantly ({n_h} finished transfers)",
                p.threshold * 100.0
            )),
        )
    };
    let evidence = json!({
        "method": "wilson_95",
        "n": n_h, "successes": horizon.counts.completed, "bound": high_h, "wilson_95": [low_h, high_h],
        "completed": horizon.counts.completed, "failed": horizon.counts.failed, "timed_out": horizon.counts.timed_out,
        "success_rate": rate_h, "horizon": humantime::format_duration(p.horizon).to_string(),
        "fast": {
            "n": n_f, "successes": fast.counts.completed, "bound": high_f, "success_rate": fast.success_rate,
            "window": humantime::format_duration(p.window).to_string(), "min_samples": fast_floor,
        },
        "threshold": p.threshold, "min_samples": floor, "missing": missing_text,
    });
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

    /// The same counts in every window (traffic only within the fast window).
    fn recent(completed: u64, failed: u64) -> impl Fn(std::time::Duration) -> WindowStats {
        move |_| stats(completed, failed)
    }

    /// `early` in the first five minutes of the horizon, `late` in the last ten.
    fn spread(early: (u64, u64), late: (u64, u64)) -> impl Fn(std::time::Duration) -> WindowStats {
        move |w: std::time::Duration| {
            if w > std::time::Duration::from_secs(600) {
                stats(early.0 + late.0, early.1 + late.1)
            } else {
                stats(late.0, late.1)
            }
        }
    }

    #[test]
    fn two_failures_out_of_three_at_night_are_inconclusive_and_say_what_is_missing() {
        let p = Params::default_for(RuleId::SuccessRate);
        let v = success_rate(&p, &spread((0, 1), (1, 1)));
        assert_eq!(v.cond, Cond::Inconclusive);
        assert_eq!(
            v.evidence["missing"],
            "3 of the 5 finished transfers needed"
        );
    }

    #[test]
    fn nine_of_nine_failing_over_the_horizon_is_breached_at_once() {
        let p = Params::default_for(RuleId::SuccessRate);
        let v = success_rate(&p, &spread((0, 3), (0, 6)));
        assert_eq!(v.cond, Cond::Held, "{}", v.evidence);
        assert_eq!(
            (v.evidence["n"].as_u64(), v.evidence["method"].as_str()),
            (Some(9), Some("wilson_95"))
        );
        // The same nine in the last ten minutes only: not yet the seed's 15 minutes.
        assert_eq!(
            success_rate(&p, &spread((0, 0), (0, 9))).cond,
            Cond::Inconclusive
        );
    }

    #[test]
    fn eighty_five_percent_of_200_is_statistically_below_ninety() {
        let p = Params::default_for(RuleId::SuccessRate);
        assert_eq!(success_rate(&p, &recent(170, 30)).cond, Cond::True);
        // 85 % of 40 could still be 90 %: not enough to act on.
        assert_eq!(success_rate(&p, &recent(34, 6)).cond, Cond::Inconclusive);
        assert_eq!(success_rate(&p, &recent(190, 10)).cond, Cond::False);
        // 93 % of 200: not a rollback.
        assert_eq!(success_rate(&p, &recent(186, 14)).cond, Cond::False);
    }
}
