//! Rolling windows per CBO in event time: fixed 10 s buckets of counts and mergeable quantile sketches.

use std::time::Duration;

use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use crate::config::FUTURE_TOLERANCE;
use crate::event::{ErrorClass, TransferType};
use crate::tracker::Outcome;

/// Width of one bucket; a window's edge is exact to this much.
pub const BUCKET: Duration = Duration::from_secs(10);
const BUCKET_MS: i64 = BUCKET.as_millis() as i64;

/// `a / b` rounded up, for non-negative `a` and positive `b`.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Relative accuracy of the latency quantiles (1 %).
fn sketch() -> Box<DDSketch> {
    Box::new(DDSketch::new(SketchConfig::new(0.01, 1024, 1e-3)))
}

/// Counts in one bucket or summed over a window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub completed: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    pub bad_request: u64,
    pub agent_unavailable: u64,
    pub target_not_found: u64,
    pub other_error: u64,
    pub history_lost: u64,
    /// Polls where TaskRouter answered 400 for the workflow: a Bad Request signal outside any transfer.
    pub taskrouter_bad_request: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.completed += o.completed;
        self.failed += o.failed;
        self.timed_out += o.timed_out;
        self.cancelled += o.cancelled;
        self.bad_request += o.bad_request;
        self.agent_unavailable += o.agent_unavailable;
        self.target_not_found += o.target_not_found;
        self.other_error += o.other_error;
        self.history_lost += o.history_lost;
        self.taskrouter_bad_request += o.taskrouter_bad_request;
    }

    /// Transfers that count in the success rate (cancelled ones are neutral).
    pub fn decided(&self) -> u64 {
        self.completed + self.failed + self.timed_out
    }

    /// completed / (completed + failed + timed_out); `None` without a decided transfer.
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.decided();
        (n > 0).then(|| self.completed as f64 / n as f64)
    }
}

struct Bucket {
    /// `timestamp / BUCKET`; `i64::MIN` while unused.
    epoch: i64,
    counts: Counts,
    cold: Option<Box<DDSketch>>,
    warm: Option<Box<DDSketch>>,
    notification: Option<Box<DDSketch>>,
}

impl Bucket {
    fn empty() -> Bucket {
        Bucket {
            epoch: i64::MIN,
            counts: Counts::default(),
            cold: None,
            warm: None,
            notification: None,
        }
    }
}

/// What a window holds at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowStats {
    pub counts: Counts,
    pub success_rate: Option<f64>,
    /// Distinct wall-clock minutes with at least one Bad Request, from a transfer or from
    /// TaskRouter (the seed's "consistently").
    pub bad_request_minutes: u32,
    pub cold_completion_p95: Option<f64>,
    pub warm_completion_p95: Option<f64>,
    pub notification_p95: Option<f64>,
    pub cold_completions: u64,
    pub notifications: u64,
}

/// The ring of buckets for one CBO. Memory is fixed by the longest window, not by traffic.
pub struct Windows {
    buckets: Vec<Bucket>,
    /// Buckets older than this many behind "now" are out of every window.
    span: i64,
}

impl Windows {
    pub fn new(max_window: Duration) -> Windows {
        let span = ceil_div(max_window.as_millis() as i64, BUCKET_MS);
        let ahead = ceil_div(FUTURE_TOLERANCE.as_millis() as i64, BUCKET_MS) + 1;
        let len = (span + ahead + 1) as usize;
        Windows {
            buckets: (0..len).map(|_| Bucket::empty()).collect(),
            span,
        }
    }

    /// The bucket for `ts_ms`, reset if it last held an older epoch; `None` when `ts_ms` is
    /// outside what the ring keeps relative to `now_ms`.
    fn bucket(&mut self, ts_ms: i64, now_ms: i64) -> Option<&mut Bucket> {
        let epoch = ts_ms.div_euclid(BUCKET_MS);
        let now_epoch = now_ms.div_euclid(BUCKET_MS);
        let len = self.buckets.len() as i64;
        if epoch <= now_epoch - self.span || epoch >= now_epoch - self.span + len {
            return None;
        }
        let b = &mut self.buckets[epoch.rem_euclid(len) as usize];
        if b.epoch != epoch {
            if b.epoch > epoch {
                return None;
            }
            *b = Bucket::empty();
            b.epoch = epoch;
        }
        Some(b)
    }

    pub fn record_outcome(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        outcome: Outcome,
        class: Option<ErrorClass>,
    ) {
        let Some(b) = self.bucket(ts_ms, now_ms) else {
            return;
        };
        let c = &mut b.counts;
        match outcome {
            Outcome::Completed => c.completed += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::TimedOut => c.timed_out += 1,
            Outcome::Cancelled => c.cancelled += 1,
        }
        match class {
            Some(ErrorClass::BadRequest) => c.bad_request += 1,
            Some(ErrorClass::AgentUnavailable) => c.agent_unavailable += 1,
            Some(ErrorClass::TargetNotFound) => c.target_not_found += 1,
            Some(ErrorClass::Other) => c.other_error += 1,
            None => {}
        }
    }

    pub fn record_completion(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        transfer_type: Option<TransferType>,
        seconds: f64,
    ) {
        if let Some(b) = self.bucket(ts_ms, now_ms) {
            let slot = match transfer_type {
                Some(TransferType::Cold) => &mut b.cold,
                Some(TransferType::Warm) => &mut b.warm,
                None => return,
            };
            slot.get_or_insert_with(sketch).add(seconds);
        }
    }

    pub fn record_notification(&mut self, ts_ms: i64, now_ms: i64, seconds: f64) {
        if let Some(b) = self.bucket(ts_ms, now_ms) {
            b.notification.get_or_insert_with(sketch).add(seconds);
        }
    }

    pub fn record_history_lost(&mut self, ts_ms: i64, now_ms: i64) {
        if let Some(b) = self.bucket(ts_ms, now_ms) {
            b.counts.history_lost += 1;
        }
    }

    pub fn record_taskrouter_bad_request(&mut self, now_ms: i64) {
        if let Some(b) = self.bucket(now_ms, now_ms) {
            b.counts.taskrouter_bad_request += 1;
        }
    }

    /// Sums the buckets of the trailing `window` (the current bucket included, and the few
    /// ahead that hold events stamped up to a minute in the future).
    pub fn stats(&self, now_ms: i64, window: Duration) -> WindowStats {
        let now_epoch = now_ms.div_euclid(BUCKET_MS);
        let n = ceil_div(window.as_millis() as i64, BUCKET_MS).clamp(1, self.span);
        self.stats_from(now_epoch - n + 1)
    }

    /// Sums the buckets from the one holding `since_ms` on (a validation window's start).
    pub fn stats_since(&self, now_ms: i64, since_ms: i64) -> WindowStats {
        let now_epoch = now_ms.div_euclid(BUCKET_MS);
        self.stats_from(
            since_ms
                .div_euclid(BUCKET_MS)
                .max(now_epoch - self.span + 1),
        )
    }

    fn stats_from(&self, oldest: i64) -> WindowStats {
        let mut counts = Counts::default();
        let mut minutes: Vec<i64> = Vec::new();
        let mut cold: Option<DDSketch> = None;
        let mut warm: Option<DDSketch> = None;
        let mut notification: Option<DDSketch> = None;
        for b in self.buckets.iter().filter(|b| b.epoch >= oldest) {
            counts.add(&b.counts);
            if b.counts.bad_request + b.counts.taskrouter_bad_request > 0 {
                let minute = b.epoch * BUCKET_MS / 60_000;
                if !minutes.contains(&minute) {
                    minutes.push(minute);
                }
            }
            for (acc, s) in [
                (&mut cold, &b.cold),
                (&mut warm, &b.warm),
                (&mut notification, &b.notification),
            ] {
                if let Some(s) = s {
                    match acc {
                        Some(acc) => acc.merge(s).expect("sketches share one config"),
                        None => *acc = Some((**s).clone()),
                    }
                }
            }
        }
        let p95 = |s: &Option<DDSketch>| s.as_ref().and_then(|s| s.quantile(0.95).ok().flatten());
        WindowStats {
            success_rate: counts.success_rate(),
            counts,
            bad_request_minutes: minutes.len() as u32,
            cold_completion_p95: p95(&cold),
            warm_completion_p95: p95(&warm),
            notification_p95: p95(&notification),
            cold_completions: cold.as_ref().map_or(0, |s| s.count() as u64),
            notifications: notification.as_ref().map_or(0, |s| s.count() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn ninety_five_completed_and_five_failed_is_095() {
        let mut w = Windows::new(Duration::from_secs(3600));
        for i in 0..100 {
            let outcome = if i < 95 {
                Outcome::Completed
            } else {
                Outcome::Failed
            };
            w.record_outcome(T0 - i * 1000, T0, outcome, None);
        }
        let s = w.stats(T0, Duration::from_secs(300));
        assert_eq!(s.success_rate, Some(0.95));
        assert_eq!(s.counts.decided(), 100);
    }

    #[test]
    fn events_older_than_the_window_drop_out() {
        let mut w = Windows::new(Duration::from_secs(3600));
        w.record_outcome(T0, T0, Outcome::Failed, Some(ErrorClass::Other));
        w.record_outcome(T0 + 4 * MIN, T0 + 4 * MIN, Outcome::Completed, None);
        let five = Duration::from_secs(300);
        assert_eq!(w.stats(T0 + 4 * MIN, five).success_rate, Some(0.5));
        assert_eq!(w.stats(T0 + 6 * MIN, five).success_rate, Some(1.0));
        assert_eq!(w.stats(T0 + 10 * MIN, five).success_rate, None);
        // The hour window still holds both.
        assert_eq!(
            w.stats(T0 + 10 * MIN, Duration::from_secs(3600))
                .counts
                .decided(),
            2
        );
    }

    #[test]
    fn bucket_reuse_after_an_hour_forgets_the_old_counts() {
        let mut w = Windows::new(Duration::from_secs(3600));
        w.record_outcome(T0, T0, Outcome::Failed, None);
        let later = T0 + 2 * 3600 * 1000;
        w.record_outcome(later, later, Outcome::Completed, None);
        let s = w.stats(later, Duration::from_secs(3600));
        assert_eq!((s.counts.failed, s.counts.completed), (0, 1));
    }

    #[test]
    fn bad_request_minutes_are_distinct_minutes() {
        let mut w = Windows::new(Duration::from_secs(3600));
        let start = T0 - T0.rem_euclid(MIN);
        for ts in [start, start + 10_000, start + MIN, start + 3 * MIN + 5_000] {
            w.record_outcome(
                ts,
                start + 4 * MIN,
                Outcome::Failed,
                Some(ErrorClass::BadRequest),
            );
        }
        let s = w.stats(start + 4 * MIN, Duration::from_secs(300));
        assert_eq!((s.counts.bad_request, s.bad_request_minutes), (4, 3));
    }

    #[test]
    fn p95_of_latencies_is_within_one_percent() {
        let mut w = Windows::new(Duration::from_secs(3600));
        for i in 1..=100 {
            w.record_completion(T0 - i * 1000, T0, Some(TransferType::Cold), i as f64 / 10.0);
        }
        let p95 = w
            .stats(T0, Duration::from_secs(300))
            .cold_completion_p95
            .unwrap();
        assert!((p95 - 9.5).abs() <= 0.1, "{p95}");
    }
}
