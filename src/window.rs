//! Rolling windows per CBO in event time: fixed rings of counts and latency histograms, fine over 20 minutes and coarse to the longest window.

use std::sync::LazyLock;
use std::time::Duration;

use serde::Serialize;

use crate::config::FUTURE_TOLERANCE;
use crate::event::{ErrorClass, TransferType};
use crate::tracker::Outcome;

/// Width of one fine count bucket; a window up to [`FINE_SPAN`] long is exact to this much.
pub const BUCKET: Duration = Duration::from_secs(10);
/// How far back the fine rings reach. Windows and validation windows within it are exact to
/// 10 s (counts) and 1 minute (latencies); longer ones to 1 minute and 5 minutes.
pub const FINE_SPAN: Duration = Duration::from_secs(20 * 60);

/// (count bucket, latency slot) widths of the fine and the coarse rings.
const FINE: (i64, i64) = (10_000, 60_000);
const COARSE: (i64, i64) = (60_000, 300_000);

/// `a / b` rounded up, for non-negative `a` and positive `b`.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Latency buckets: upper edges 10 s × 2^(j/6) for j in -33..=29 (0.22 s to 285 s, six per
/// doubling, so a bucket is 12 % wide), below them one bucket from 0 and above them one
/// open-ended bucket. 5 s and 10 s, the seed's bounds, are edges, so "p95 over 10 s" is decided
/// exactly; between edges a quantile is interpolated.
const LATENCY_BUCKETS: usize = 64;
static EDGES: LazyLock<[f64; LATENCY_BUCKETS - 1]> = LazyLock::new(|| {
    std::array::from_fn(|i| {
        let j = i as i32 - 33;
        10.0 * 2f64.powi(j.div_euclid(6)) * 2f64.powf(f64::from(j.rem_euclid(6)) / 6.0)
    })
});

/// The bucket of `seconds`: the first whose upper edge is at or above it.
fn latency_bucket(seconds: f64) -> usize {
    let edges = &*EDGES;
    if seconds.is_nan() || seconds <= edges[0] {
        return 0;
    }
    let guess = (6.0 * (seconds / 10.0).log2()).ceil() as i64 + 33;
    let mut i = guess.clamp(0, LATENCY_BUCKETS as i64 - 1) as usize;
    // The logarithm can be a hair off at an edge; settle on the exact bucket.
    while i > 0 && seconds <= edges[i - 1] {
        i -= 1;
    }
    while i < LATENCY_BUCKETS - 1 && seconds > edges[i] {
        i += 1;
    }
    i
}

/// One latency series of one slot: 16-bit counts kept inline (memory is fixed from the
/// start), moved to 32-bit when one would overflow.
struct Hist {
    narrow: [u16; LATENCY_BUCKETS],
    wide: Option<Box<[u32; LATENCY_BUCKETS]>>,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            narrow: [0; LATENCY_BUCKETS],
            wide: None,
        }
    }
}

impl Hist {
    fn add(&mut self, seconds: f64) {
        let i = latency_bucket(seconds);
        match &mut self.wide {
            Some(wide) => wide[i] = wide[i].saturating_add(1),
            None if self.narrow[i] == u16::MAX => {
                let mut wide = Box::new(self.narrow.map(u32::from));
                wide[i] += 1;
                self.wide = Some(wide);
            }
            None => self.narrow[i] += 1,
        }
    }

    fn add_to(&self, acc: &mut Latencies) {
        match &self.wide {
            Some(wide) => add_counts(wide, acc),
            None => add_counts(&self.narrow, acc),
        }
    }
}

fn add_counts<N: Copy + Into<u64>>(counts: &[N; LATENCY_BUCKETS], acc: &mut Latencies) {
    for (a, n) in acc.0.iter_mut().zip(counts) {
        *a += (*n).into();
    }
}

/// Latency counts summed over a window.
struct Latencies([u64; LATENCY_BUCKETS]);

impl Latencies {
    fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (the ⌈q·n⌉-th smallest), interpolated inside its bucket; the lower
    /// edge for the open-ended last bucket. `None` without samples.
    fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (q * n as f64).ceil().max(1.0) as u64;
        let mut below = 0;
        for (i, &c) in self.0.iter().enumerate() {
            if below + c >= rank {
                let lo = if i == 0 { 0.0 } else { EDGES[i - 1] };
                if i == LATENCY_BUCKETS - 1 {
                    return Some(lo);
                }
                let frac = (rank - below) as f64 / c as f64;
                return Some(lo + (EDGES[i] - lo) * frac);
            }
            below += c;
        }
        unreachable!("rank is at most n")
    }
}

/// Counts in one bucket.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    completed: u32,
    failed: u32,
    timed_out: u32,
    cancelled: u32,
    bad_request: u32,
    agent_unavailable: u32,
    target_not_found: u32,
    other_error: u32,
    history_lost: u32,
    taskrouter_bad_request: u32,
}

/// Counts summed over a window.
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
    fn add(&mut self, o: &Bucket) {
        self.completed += u64::from(o.completed);
        self.failed += u64::from(o.failed);
        self.timed_out += u64::from(o.timed_out);
        self.cancelled += u64::from(o.cancelled);
        self.bad_request += u64::from(o.bad_request);
        self.agent_unavailable += u64::from(o.agent_unavailable);
        self.target_not_found += u64::from(o.target_not_found);
        self.other_error += u64::from(o.other_error);
        self.history_lost += u64::from(o.history_lost);
        self.taskrouter_bad_request += u64::from(o.taskrouter_bad_request);
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

/// The latency histograms of one slot.
#[derive(Default)]
struct Slot {
    cold: Hist,
    warm: Hist,
    notification: Hist,
}

/// Fixed slots of `width_ms` over a span (and a minute ahead), all allocated up front; a slot
/// is reused, and reset, when time comes round to it again.
struct Ring<T> {
    width_ms: i64,
    /// Slots older than this many behind "now" are out of every window.
    span: i64,
    slots: Vec<(i64, T)>,
}

impl<T: Default> Ring<T> {
    fn new(width_ms: i64, span: Duration) -> Ring<T> {
        let span = ceil_div(span.as_millis() as i64, width_ms);
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

    /// The start of the oldest slot still kept at `now_ms`.
    fn oldest_ms(&self, now_ms: i64) -> i64 {
        (self.epoch(now_ms) - self.span + 1) * self.width_ms
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

/// Counts and latencies at one resolution.
struct Tier {
    counts: Ring<Bucket>,
    latency: Ring<Slot>,
}

impl Tier {
    fn new((count_ms, latency_ms): (i64, i64), span: Duration) -> Tier {
        Tier {
            counts: Ring::new(count_ms, span),
            // One slot more, so the latencies reach back at least as far as the counts.
            latency: Ring::new(latency_ms, span + Duration::from_millis(latency_ms as u64)),
        }
    }

    /// Everything from `from_ms` on: counts from the bucket holding it, latencies from the
    /// slot holding it.
    fn stats_from(&self, from_ms: i64) -> WindowStats {
        let mut counts = Counts::default();
        let mut minutes: Vec<i64> = Vec::new();
        let width = self.counts.width_ms;
        for (epoch, c) in self.counts.since(self.counts.epoch(from_ms)) {
            counts.add(c);
            if c.bad_request + c.taskrouter_bad_request > 0 {
                let minute = epoch * width / 60_000;
                if !minutes.contains(&minute) {
                    minutes.push(minute);
                }
            }
        }
        let mut cold = Latencies([0; LATENCY_BUCKETS]);
        let mut warm = Latencies([0; LATENCY_BUCKETS]);
        let mut notification = Latencies([0; LATENCY_BUCKETS]);
        for (_, s) in self.latency.since(self.latency.epoch(from_ms)) {
            s.cold.add_to(&mut cold);
            s.warm.add_to(&mut warm);
            s.notification.add_to(&mut notification);
        }
        WindowStats {
            success_rate: counts.success_rate(),
            counts,
            bad_request_minutes: minutes.len() as u32,
            cold_completion_p95: cold.quantile(0.95),
            warm_completion_p95: warm.quantile(0.95),
            notification_p95: notification.quantile(0.95),
            cold_completions: cold.count(),
            notifications: notification.count(),
        }
    }
}

/// The rings of one CBO. Memory is fixed by the longest window from the start, not by
/// traffic: about 26 KiB with the default hour.
pub struct Windows {
    fine: Tier,
    /// Only when the longest window reaches past the fine rings.
    coarse: Option<Tier>,
}

impl Windows {
    pub fn new(max_window: Duration) -> Windows {
        Windows {
            fine: Tier::new(FINE, max_window.min(FINE_SPAN)),
            coarse: (max_window > FINE_SPAN).then(|| Tier::new(COARSE, max_window)),
        }
    }

    fn tiers(&mut self) -> impl Iterator<Item = &mut Tier> {
        std::iter::once(&mut self.fine).chain(self.coarse.as_mut())
    }

    fn bucket(&mut self, ts_ms: i64, now_ms: i64, f: impl Fn(&mut Bucket)) {
        for tier in self.tiers() {
            if let Some(b) = tier.counts.slot(ts_ms, now_ms) {
                f(b);
            }
        }
    }

    fn latency(&mut self, ts_ms: i64, now_ms: i64, f: impl Fn(&mut Slot)) {
        for tier in self.tiers() {
            if let Some(s) = tier.latency.slot(ts_ms, now_ms) {
                f(s);
            }
        }
    }

    pub fn record_outcome(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        outcome: Outcome,
        class: Option<ErrorClass>,
    ) {
        self.count_outcome(ts_ms, now_ms, outcome, class, 1);
    }

    /// Takes back an outcome recorded before (TaskRouter's record corrected the plugin's).
    pub fn retract_outcome(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        outcome: Outcome,
        class: Option<ErrorClass>,
    ) {
        self.count_outcome(ts_ms, now_ms, outcome, class, -1);
    }

    fn count_outcome(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        outcome: Outcome,
        class: Option<ErrorClass>,
        delta: i32,
    ) {
        self.bucket(ts_ms, now_ms, |c| {
            let n = match outcome {
                Outcome::Completed => &mut c.completed,
                Outcome::Failed => &mut c.failed,
                Outcome::TimedOut => &mut c.timed_out,
                Outcome::Cancelled => &mut c.cancelled,
            };
            *n = n.saturating_add_signed(delta);
            let n = match class {
                Some(ErrorClass::BadRequest) => &mut c.bad_request,
                Some(ErrorClass::AgentUnavailable) => &mut c.agent_unavailable,
                Some(ErrorClass::TargetNotFound) => &mut c.target_not_found,
                Some(ErrorClass::Other) => &mut c.other_error,
                None => return,
            };
            *n = n.saturating_add_signed(delta);
        });
    }

    pub fn record_completion(
        &mut self,
        ts_ms: i64,
        now_ms: i64,
        transfer_type: Option<TransferType>,
        seconds: f64,
    ) {
        match transfer_type {
            Some(TransferType::Cold) => self.latency(ts_ms, now_ms, |s| s.cold.add(seconds)),
            Some(TransferType::Warm) => self.latency(ts_ms, now_ms, |s| s.warm.add(seconds)),
            None => {}
        }
    }

    pub fn record_notification(&mut self, ts_ms: i64, now_ms: i64, seconds: f64) {
        self.latency(ts_ms, now_ms, |s| s.notification.add(seconds));
    }

    pub fn record_history_lost(&mut self, ts_ms: i64, now_ms: i64) {
        self.bucket(ts_ms, now_ms, |c| c.history_lost += 1);
    }

    pub fn record_taskrouter_bad_request(&mut self, now_ms: i64) {
        self.record_bad_request_signal(now_ms, now_ms, 1);
    }

    /// A Bad Request outside any transfer the windows hold (a poll's 400, a function's error
    /// line, a debugger alert) at `ts_ms`; `-1` takes one back (it turned out to be a
    /// transfer's, counted with its outcome).
    pub fn record_bad_request_signal(&mut self, ts_ms: i64, now_ms: i64, delta: i32) {
        self.bucket(ts_ms, now_ms, |c| {
            c.taskrouter_bad_request = c.taskrouter_bad_request.saturating_add_signed(delta)
        });
    }

    /// Sums the trailing `window` (the current bucket included, and the few ahead that hold
    /// events stamped up to a minute in the future), from the fine rings when the window fits
    /// in them.
    pub fn stats(&self, now_ms: i64, window: Duration) -> WindowStats {
        let (tier, first) = self.window(now_ms, window);
        tier.stats_from(first * tier.counts.width_ms)
    }

    /// The tier that serves `window` at `now_ms`, and the epoch of its first count bucket.
    fn window(&self, now_ms: i64, window: Duration) -> (&Tier, i64) {
        let tier = match &self.coarse {
            Some(coarse) if window > FINE_SPAN => coarse,
            _ => &self.fine,
        };
        let width = tier.counts.width_ms;
        let n = ceil_div(window.as_millis() as i64, width).clamp(1, tier.counts.span);
        (tier, tier.counts.epoch(now_ms) - n + 1)
    }

    /// `stats(now_ms, w).success_rate` for each of `windows`, without the latencies and in
    /// one pass over each ring: the scrape's `success_ratio` gauges of every CBO need only
    /// the counts.
    pub fn success_rates<const N: usize>(
        &self,
        now_ms: i64,
        windows: [Duration; N],
    ) -> [Option<f64>; N] {
        let served = windows.map(|w| self.window(now_ms, w));
        let mut counts: [Counts; N] = std::array::from_fn(|_| Counts::default());
        for tier in std::iter::once(&self.fine).chain(&self.coarse) {
            // The first epoch of each window this tier serves.
            let first = served.map(|(t, first)| std::ptr::eq(t, tier).then_some(first));
            let Some(oldest) = first.iter().flatten().min() else {
                continue;
            };
            for (epoch, c) in tier.counts.since(*oldest) {
                for (sum, from) in counts.iter_mut().zip(&first) {
                    if from.is_some_and(|f| epoch >= f) {
                        sum.add(c);
                    }
                }
            }
        }
        counts.map(|c| c.success_rate())
    }

    /// Sums everything from the bucket holding `since_ms` on (a validation window's start).
    pub fn stats_since(&self, now_ms: i64, since_ms: i64) -> WindowStats {
        let tier = match &self.coarse {
            Some(coarse) if since_ms < self.fine.counts.oldest_ms(now_ms) => coarse,
            _ => &self.fine,
        };
        tier.stats_from(since_ms.max(tier.counts.oldest_ms(now_ms)))
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
    fn the_scrapes_success_rate_is_the_windows_stats_at_every_length_and_moment() {
        let mut w = Windows::new(Duration::from_secs(3600));
        let outcomes = [Outcome::Completed, Outcome::Failed, Outcome::TimedOut];
        for i in 0..400i64 {
            let at = T0 + i * 7_919;
            w.record_outcome(at, at, outcomes[(i * i % 7 % 3) as usize], None);
        }
        let mut seen = 0;
        for minutes in [1, 5, 15, 20, 30, 60] {
            let window = Duration::from_secs(minutes * 60);
            for now in (0..80).map(|k| T0 + k * 61_000) {
                let [rate, fine] = w.success_rates(now, [window, Duration::from_secs(300)]);
                assert_eq!(fine, w.stats(now, Duration::from_secs(300)).success_rate);
                assert_eq!(
                    rate,
                    w.stats(now, window).success_rate,
                    "{minutes} min at {now}"
                );
                seen += usize::from(rate.is_some_and(|r| r > 0.0 && r < 1.0));
            }
        }
        assert!(
            seen > 100,
            "the windows held mixed outcomes only {seen} times"
        );
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
    fn p95_of_latencies_is_interpolated_within_its_bucket() {
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

    #[test]
    fn five_and_ten_seconds_are_bucket_edges_so_the_seeds_bounds_are_exact() {
        let b10 = latency_bucket(10.0);
        assert_eq!(EDGES[b10], 10.0);
        assert_eq!(EDGES[latency_bucket(5.0)], 5.0);
        assert_eq!(latency_bucket(10.000_001), b10 + 1);
        assert_eq!(latency_bucket(0.0), 0);
        assert_eq!(latency_bucket(1e9), LATENCY_BUCKETS - 1);
        // Each sample lands in the bucket whose edges hold it.
        for v in [0.3, 1.0, 2.2, 4.99, 7.1, 33.0, 280.0] {
            let i = latency_bucket(v);
            assert!(v <= EDGES[i] && v > EDGES[i - 1], "{v} in bucket {i}");
        }
    }

    #[test]
    fn p95_is_over_ten_seconds_exactly_when_more_than_5_percent_are() {
        let p95 = |slow: i64| {
            let mut w = Windows::new(Duration::from_secs(3600));
            for i in 0..100 {
                let secs = if i < slow { 10.5 } else { 10.0 };
                w.record_completion(T0 - i * 1000, T0, Some(TransferType::Cold), secs);
            }
            w.stats(T0, Duration::from_secs(300))
                .cold_completion_p95
                .unwrap()
        };
        assert!(p95(5) <= 10.0, "{}", p95(5));
        assert!(p95(6) > 10.0, "{}", p95(6));
    }

    #[test]
    fn a_busy_bucket_widens_past_16_bits_without_losing_a_sample() {
        let mut w = Windows::new(Duration::from_secs(3600));
        for _ in 0..70_000 {
            w.record_notification(T0, T0, 2.0);
        }
        let s = w.stats(T0, Duration::from_secs(60));
        assert_eq!(s.notifications, 70_000);
        // Within the 12 %-wide bucket that holds 2 s.
        let (p95, i) = (s.notification_p95.unwrap(), latency_bucket(2.0));
        assert!(p95 > EDGES[i - 1] && p95 <= EDGES[i], "{p95}");
    }

    #[test]
    fn windows_past_twenty_minutes_read_the_coarse_rings_to_the_minute() {
        let mut w = Windows::new(Duration::from_secs(3600));
        let start = T0 - T0.rem_euclid(5 * MIN);
        let now = start + 50 * MIN;
        // Three failures long ago, one completion a minute ago.
        for ts in [start, start + 10 * MIN, start + 25 * MIN] {
            w.record_outcome(ts, now, Outcome::Failed, Some(ErrorClass::Other));
            w.record_completion(ts, now, Some(TransferType::Cold), 30.0);
        }
        w.record_outcome(now - MIN, now, Outcome::Completed, None);
        w.record_completion(now - MIN, now, Some(TransferType::Cold), 2.0);
        let hour = w.stats(now, Duration::from_secs(3600));
        assert_eq!((hour.counts.failed, hour.counts.completed), (3, 1));
        assert_eq!(hour.cold_completions, 4);
        let half = w.stats(now, Duration::from_secs(30 * 60));
        assert_eq!((half.counts.failed, half.counts.completed), (1, 1));
        // A validation window opened 45 minutes ago: its start is inside the coarse rings.
        let since = w.stats_since(now, start + 5 * MIN);
        assert_eq!((since.counts.failed, since.counts.completed), (2, 1));
        // And one opened 10 minutes ago reads the fine rings.
        let recent = w.stats_since(now, now - 10 * MIN);
        assert_eq!((recent.counts.failed, recent.counts.completed), (0, 1));
        assert_eq!(recent.cold_completions, 1);
    }
}
