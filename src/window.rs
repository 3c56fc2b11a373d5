//! Rolling windows per CBO in event time: 10 s buckets of counts and per-minute mergeable quantile sketches.

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

/// Width of one quantile slot: latency sketches are kept per minute (each is ~0.5 KiB once
/// used), counts per 10 s bucket.
const SKETCH_MS: i64 = 60_000;

/// Relative accuracy of the latency quantiles (2 %).
fn sketch() -> Box<DDSketch> {
    Box::new(DDSketch::new(SketchConfig::new(0.02, 512, 1e-3)))
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

/// The latency sketches of one minute.
#[derive(Default)]
struct Sketches {
    cold: Option<Box<DDSketch>>,
    warm: Option<Box<DDSketch>>,
    notification: Option<Box<DDSketch>>,
}

/// Fixed slots of `width_ms` over the longest window (and a minute ahead); a slot is reused,
/// and reset, when time comes round to it again.
struct Ring<T> {
    width_ms: i64,
    /// Slots older than this many behind "now" are out of every window.
    span: i64,
    slots: Vec<(i64, T)>,
}

impl<T: Default> Ring<T> {
    fn new(width_ms: i64, max_window: Duration) -> Ring<T> {
        let span = ceil_div(max_window.as_millis() as i64, width_ms);
        let ahead = ceil_div(FUTURE_TOLERANCE.as_millis() as i64, width_ms) + 1;
        Ring {
            width_ms,
            span,
            slots: (0..span + ahead + 1)
                .map(|_| (i64::MIN, T::default()))
                .collect(),
        }
    }

    fn epoch(&self, ts_ms: i64) -> i64 {
        ts_ms.div_euclid(self.width_ms)
    }

    /// The slot for `ts_ms`; `None` when `ts_ms` is outside what the ring keeps at `now_ms`.
    fn slot(&mut self, ts_ms: i64, now_ms: i64) -> Option<&mut T> {
        let (epoch, now_epoch) = (self.epoch(ts_ms), self.epoch(now_ms));
        let len = self.slots.len() as i64;
        if epoch <= now_epoch - self.span || epoch >= now_epoch - self.span + len {
            return None;
        }
        let (at, value) = &mut self.slots[epoch.rem_euclid(len) as usize];
        if *at != epoch {
            if *at > epoch {
                return None;
            }
            *at = epoch;
            *value = T::default();
        }
        Some(value)
    }

    /// Slots whose epoch is at least `oldest`, with their epochs.
    fn since(&self, oldest: i64) -> impl Iterator<Item = (i64, &T)> {
        self.slots
            .iter()
            .filter(move |(at, _)| *at >= oldest)
            .map(|(at, v)| (*at, v))
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

/// The rings of one CBO: counts every 10 s, latency sketches every minute. Memory is fixed by
/// the longest window, not by traffic.
pub struct Windows {
    counts: Ring<Counts>,
    sketches: Ring<Sketches>,
}

impl Windows {
    pub fn new(max_window: Duration) -> Windows {
        Windows {
            counts: Ring::new(BUCKET_MS, max_window),
            sketches: Ring::new(SKETCH_MS, max_window),
        }
    }

    fn bucket(&mut self, ts_ms: i64, now_ms: i64) -> Option<&mut Counts> {
        self.counts.slot(ts_ms, now_ms)
    }

    pub fn record_outcome(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        outcome: Outcome,
        class: Option<ErrorClass>,
    ) {
        let Some(c) = self.bucket(ts_ms, now_ms) else {
            return;
        };
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
        if let Some(m) = self.sketches.slot(ts_ms, now_ms) {
            let slot = match transfer_type {
                Some(TransferType::Cold) => &mut m.cold,
                Some(TransferType::Warm) => &mut m.warm,
                None => return,
            };
            slot.get_or_insert_with(sketch).add(seconds);
        }
    }

    pub fn record_notification(&mut self, ts_ms: i64, now_ms: i64, seconds: f64) {
        if let Some(m) = self.sketches.slot(ts_ms, now_ms) {
            m.notification.get_or_insert_with(sketch).add(seconds);
        }
    }

    pub fn record_history_lost(&mut self, ts_ms: i64, now_ms: i64) {
        if let Some(c) = self.bucket(ts_ms, now_ms) {
            c.history_lost += 1;
        }
    }

    pub fn record_taskrouter_bad_request(&mut self, now_ms: i64) {
        if let Some(c) = self.bucket(now_ms, now_ms) {
            c.taskrouter_bad_request += 1;
        }
    }

    /// Sums the buckets of the trailing `window` (the current bucket included, and the few
    /// ahead that hold events stamped up to a minute in the future). Counts are exact to 10 s;
    /// latency quantiles take the whole minutes the window touches.
    pub fn stats(&self, now_ms: i64, window: Duration) -> WindowStats {
        let n = ceil_div(window.as_millis() as i64, BUCKET_MS).clamp(1, self.counts.span);
        self.stats_from((self.counts.epoch(now_ms) - n + 1) * BUCKET_MS)
    }

    /// Sums the buckets from the one holding `since_ms` on (a validation window's start).
    pub fn stats_since(&self, now_ms: i64, since_ms: i64) -> WindowStats {
        let oldest = (self.counts.epoch(now_ms) - self.counts.span + 1) * BUCKET_MS;
        self.stats_from(since_ms.max(oldest))
    }

    /// Everything from `from_ms` on.
    fn stats_from(&self, from_ms: i64) -> WindowStats {
        let mut counts = Counts::default();
        let mut minutes: Vec<i64> = Vec::new();
        for (epoch, c) in self.counts.since(self.counts.epoch(from_ms)) {
            counts.add(c);
            if c.bad_request + c.taskrouter_bad_request > 0 {
                let minute = epoch * BUCKET_MS / 60_000;
                if !minutes.contains(&minute) {
                    minutes.push(minute);
                }
            }
        }
        let mut cold: Option<DDSketch> = None;
        let mut warm: Option<DDSketch> = None;
        let mut notification: Option<DDSketch> = None;
        for (_, m) in self.sketches.since(self.sketches.epoch(from_ms)) {
            for (acc, s) in [
                (&mut cold, &m.cold),
                (&mut warm, &m.warm),
                (&mut notification, &m.notification),
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
    fn p95_of_latencies_is_within_two_percent() {
        let mut w = Windows::new(Duration::from_secs(3600));
        for i in 1..=100 {
            w.record_completion(T0 - i * 1000, T0, Some(TransferType::Cold), i as f64 / 10.0);
        }
        let p95 = w
            .stats(T0, Duration::from_secs(300))
            .cold_completion_p95
            .unwrap();
        assert!((p95 - 9.5).abs() <= 0.2, "{p95}");
    }
}
