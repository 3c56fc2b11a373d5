//! Every exported Prometheus metric, named once (SPEC §8): per-CBO series in fixed arrays, written straight to the text format.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{
    AtomicI64, AtomicU8, AtomicU16, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::event::{ErrorClass, EventKind, TargetType, TransferType};
use crate::health::Corruption;
use crate::rules::{RuleId, RuleState};
use crate::tracker::Outcome;
use crate::twilio::PollResult;

pub const NAMESPACE: &str = "transfer_guard";

/// Completion buckets: the seed's 10 s cold-transfer bound and 5 s among them. Few, because
/// every CBO has two of these histograms (at 5,000 CBOs each bucket is 10,000 series); the
/// rules' p95 comes from the exact samples in the windows, not from these buckets.
pub const COMPLETION_BUCKETS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 20.0, 60.0, 300.0];
/// Notification buckets: the seed's 5 s bound among them (few, as above).
pub const NOTIFICATION_BUCKETS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Probe routing buckets: the 10 s a test transfer has to be routed among them.
pub const PROBE_BUCKETS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0];
/// `probes_total{result}`.
pub const PROBE_RESULTS: [&str; 4] = ["routed", "not_routed", "bad_request", "error"];

/// Poll-cycle duration buckets.
pub const POLL_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Windows exported as `success_ratio{window}`.
pub const RATIO_WINDOWS: [(&str, std::time::Duration); 2] = [
    ("5m", std::time::Duration::from_secs(300)),
    ("15m", std::time::Duration::from_secs(900)),
];

/// The `kind` values of `taskrouter_tasks` and `taskrouter_reservations`.
pub const TASK_KINDS: [&str; 4] = ["entered", "completed", "canceled", "timed_out_in_workflow"];
pub const RESERVATION_KINDS: [&str; 3] = ["accepted", "rejected", "timed_out"];

/// `actions_total{action,integration}`: each action with the integrations that can carry it
/// (`switch` is the daemon's own disable switch, `log` the alert recorded in the decision log).
pub const ACTION_SERIES: [(&str, &str); 9] = [
    ("alert", "alertmanager"),
    ("alert", "log"),
    ("disable", "flex_flag"),
    ("disable", "switch"),
    ("disable", "webhook"),
    ("rollback", "command"),
    ("rollback", "plugin_release"),
    ("rollback", "serverless"),
    ("rollback", "webhook"),
];
/// `actions_total{result}`.
pub const ACTION_RESULTS: [&str; 4] = ["dry_run", "failed", "fired", "suppressed"];

/// Rejection reasons, the values of `events_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    /// Not JSON, not an object, not a log line.
    Malformed,
    /// A field missing or wrong.
    Invalid,
    TooOld,
    InFuture,
    TooLarge,
    UnsupportedMediaType,
    UnknownCbo,
    Unauthorized,
}

impl Reject {
    /// Reasons a CBO's own events or requests can be rejected for (the first six variants).
    pub const PER_CBO: [Reject; 6] = [
        Reject::Malformed,
        Reject::Invalid,
        Reject::TooOld,
        Reject::InFuture,
        Reject::TooLarge,
        Reject::UnsupportedMediaType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Invalid => "invalid",
            Reject::TooOld => "too_old",
            Reject::InFuture => "in_future",
            Reject::UnknownCbo => "unknown_cbo",
            Reject::Unauthorized => "unauthorized",
            Reject::TooLarge => "too_large",
            Reject::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

/// A Prometheus histogram: a count per bucket (not cumulative; the last is `+Inf`) and the sum.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    /// f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        // `le` buckets: the first bound at or above v.
        let i = self.bounds.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Relaxed);
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Relaxed))
    }

    /// `observe` for each of `values`, with one atomic add per bucket they fall in.
    fn observe_all(&self, values: &[f64]) {
        if values.is_empty() {
            return;
        }
        let mut counts = vec![0u64; self.buckets.len()];
        let mut sum = 0.0;
        for v in values.iter().filter(|v| !v.is_nan()) {
            counts[self.bounds.partition_point(|b| b < v)] += 1;
            sum += v;
        }
        for (bucket, n) in self.buckets.iter().zip(counts) {
            if n > 0 {
                bucket.fetch_add(n, Relaxed);
            }
        }
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + sum).to_bits())
        });
    }
}

/// A gauge that may be absent (no series): f64 bits, NaN for absent.
struct MaybeGauge(AtomicU64);

impl MaybeGauge {
    fn absent() -> MaybeGauge {
        MaybeGauge(AtomicU64::new(f64::NAN.to_bits()))
    }
    /// Sets the value; true when it is another than before.
    fn set(&self, v: Option<f64>) -> bool {
        let bits = v.unwrap_or(f64::NAN).to_bits();
        self.0.swap(bits, Relaxed) != bits
    }
    fn get(&self) -> Option<f64> {
        Some(f64::from_bits(self.0.load(Relaxed))).filter(|v| !v.is_nan())
    }
}

fn zeros<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// `transfers_total` slots: transfer type (cold, warm, unknown) × target (worker, queue,
/// unknown) × outcome.
const TYPE_VALUES: [&str; 3] = ["cold", "warm", "unknown"];
const TARGET_VALUES: [&str; 3] = ["worker", "queue", "unknown"];

fn transfer_slot(tt: Option<TransferType>, target: Option<TargetType>, outcome: Outcome) -> usize {
    let tt = tt.map_or(2, |t| t as usize);
    let target = target.map_or(2, |t| t as usize);
    (tt * 3 + target) * 4 + outcome as usize
}

/// A batch's changes to one CBO's transfer series, counted in plain memory while the CBO's
/// lock is held and added to the series once a batch ([`CboSeries::add`]). An atomic add is
/// a full barrier: five or six of them per event made the lock wait out every cache miss of
/// the event before them.
pub struct Tally {
    any: bool,
    ingested: [u64; EventKind::ALL.len()],
    transfers: [u64; 36],
    errors: [u64; 4],
    duplicate: u64,
    evicted: u64,
    history_lost: u64,
    seen: [u64; 5],
    disagreements: [u64; 3],
    /// Observations of the cold and warm completion histograms.
    completion: [Vec<f64>; 2],
    notification: Vec<f64>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            any: false,
            ingested: [0; EventKind::ALL.len()],
            transfers: [0; 36],
            errors: [0; 4],
            duplicate: 0,
            evicted: 0,
            history_lost: 0,
            seen: [0; 5],
            disagreements: [0; 3],
            completion: [Vec::new(), Vec::new()],
            notification: Vec::new(),
        }
    }
}

impl Tally {
    /// An event taken.
    pub fn ingested(&mut self, kind: EventKind) {
        self.ingested[kind as usize] += 1;
        self.any = true;
    }

    pub fn transfer(&mut self, tt: Option<TransferType>, target: Option<TargetType>, o: Outcome) {
        self.transfers[transfer_slot(tt, target, o)] += 1;
        self.any = true;
    }

    pub fn error(&mut self, class: ErrorClass) {
        self.errors[class as usize] += 1;
        self.any = true;
    }

    pub fn completion(&mut self, tt: TransferType, secs: f64) {
        self.completion[tt as usize].push(secs);
        self.any = true;
    }

    pub fn notification(&mut self, secs: f64) {
        self.notification.push(secs);
        self.any = true;
    }

    pub fn duplicate(&mut self) {
        self.duplicate += 1;
        self.any = true;
    }

    pub fn evicted(&mut self) {
        self.evicted += 1;
        self.any = true;
    }

    pub fn history_lost(&mut self) {
        self.history_lost += 1;
        self.any = true;
    }

    /// A source saw a transfer for the first time.
    pub fn seen(&mut self, source: crate::event::Source) {
        if let Some(i) = crate::event::Source::SEEING
            .iter()
            .position(|s| *s == source)
        {
            self.seen[i] += 1;
            self.any = true;
        }
    }

    pub fn disagreement(&mut self, kind: crate::reconcile::Disagreement, n: u32) {
        self.disagreements[kind as usize] += u64::from(n);
        self.any = true;
    }
}

/// Adds `counts` to `counters`, zeroing `counts`.
fn add_all<'a>(
    counters: impl IntoIterator<Item = &'a AtomicU64>,
    counts: impl IntoIterator<Item = &'a mut u64>,
) {
    for (counter, n) in counters.into_iter().zip(counts) {
        if *n > 0 {
            counter.fetch_add(std::mem::take(n), Relaxed);
        }
    }
}

/// Every per-CBO series of one CBO.
pub struct CboSeries {
    /// Unique among all series ever made (the scrape cache tells a CBO removed and added
    /// again from the one it had).
    id: u64,
    pub key: String,
    /// `cbo="…"`, escaped once.
    label: String,
    ingested: [AtomicU64; 7],
    rejected: [AtomicU64; 6],
    duplicate: AtomicU64,
    evicted: AtomicU64,
    history_lost: AtomicU64,
    agent_reports: AtomicU64,
    probes: [AtomicU64; 4],
    probe_routing: Histogram,
    transfers: [AtomicU64; 36],
    errors: [AtomicU64; 4],
    completion: [Histogram; 2],
    notification: Histogram,
    success_ratio: [MaybeGauge; 2],
    open: AtomicU64,
    polls: [AtomicU64; 5],
    /// ms since the epoch of the last poll without an error; i64::MIN before one.
    last_poll_ok_ms: AtomicI64,
    /// The fleet's `taskrouter_poll_duration_seconds` (one for all CBOs).
    poll_seconds: Arc<Histogram>,
    taskrouter_bad_requests: AtomicU64,
    taskrouter_error_ratio: MaybeGauge,
    /// Set once statistics were read: tasks and reservations by kind.
    statistics: AtomicU8,
    tasks: [AtomicU64; 4],
    reservations: [AtomicU64; 3],
    /// i64::MIN until real-time statistics were read.
    tasks_in_workflow: AtomicI64,
    /// 0 before the first check of the configuration, 1 sound, 2 corrupted.
    config: AtomicU8,
    /// Bit per `Corruption::IDS` entry present now.
    problems: AtomicU16,
    /// 1 while a problem known since start holds the CBO's actions.
    config_mismatch: AtomicU8,
    /// The current state of each rule (`RuleState` as u8).
    rule_state: [AtomicU8; 8],
    /// `actions_total`, in the order of `ACTION_SERIES` × `ACTION_RESULTS`.
    actions: [AtomicU64; ACTION_SERIES.len() * ACTION_RESULTS.len()],
    disabled: AtomicU8,
    /// 0 before any validation window, else 1 + the latest window's `State`.
    validation: AtomicU8,
    /// `transfers_seen_total`, in the order of `Source::SEEING`.
    seen: [AtomicU64; 5],
    /// `source_disagreements_total`, in the order of `Disagreement::ALL`.
    disagreements: [AtomicU64; 3],
    /// `source_polls_total`, `POLLED_SOURCES` × `PollResult::ALL`.
    source_polls: [AtomicU64; 15],
    /// `bad_request_signals_total`, in the order of `SignalSource::ALL`.
    signals: [AtomicU64; 2],
    /// `pushes_total`, `PUSH_SOURCES` × `PUSH_RESULTS`.
    pushes: [AtomicU64; 6],
    /// `reservation_failures_total`: rejected, timeout.
    reservation_failures: [AtomicU64; 2],
    /// `twilio_alerts_total` by error code (at most `ALERT_CODES_KEPT` codes, then `other`).
    alerts: Mutex<BTreeMap<String, u64>>,
    /// Moves after every change of a series but the pollers' (`touch`): the scrape cache
    /// does not read again a block whose CBOs' `changed` and `polled` did not move.
    changed: AtomicU64,
    /// The same for the pollers' families (`POLL_FAMILIES`), which change at every poll.
    polled: AtomicU64,
}

/// The families `CboSeries::polled` covers (and only those change with a poll).
const POLL_FAMILIES: [&str; 5] = [
    "taskrouter_polls_total",
    "taskrouter_polls_total:failed",
    "taskrouter_last_success_timestamp_seconds",
    "source_polls_total",
    "source_polls_total:failed",
];

/// The sources transfer-guard polls itself (SPEC §2b), in `source_polls_total`'s order.
pub const POLLED_SOURCES: [&str; 3] = ["taskrouter_events", "serverless_logs", "twilio_alerts"];
/// The push receivers and what became of a push.
pub const PUSH_SOURCES: [&str; 2] = ["taskrouter_callback", "event_streams"];
pub const PUSH_RESULTS: [&str; 3] = ["accepted", "bad_signature", "malformed"];
/// Distinct debugger error codes counted per CBO; the rest count as `other`.
const ALERT_CODES_KEPT: usize = 32;

impl CboSeries {
    fn new(key: &str, poll_seconds: Arc<Histogram>) -> CboSeries {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        CboSeries {
            id: NEXT.fetch_add(1, Relaxed),
            key: key.to_string(),
            label: format!("cbo=\"{}\"", escape(key)),
            ingested: zeros(),
            rejected: zeros(),
            duplicate: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            history_lost: AtomicU64::new(0),
            agent_reports: AtomicU64::new(0),
            probes: zeros(),
            probe_routing: Histogram::new(PROBE_BUCKETS),
            transfers: zeros(),
            errors: zeros(),
            completion: [
                Histogram::new(COMPLETION_BUCKETS),
                Histogram::new(COMPLETION_BUCKETS),
            ],
            notification: Histogram::new(NOTIFICATION_BUCKETS),
            success_ratio: [MaybeGauge::absent(), MaybeGauge::absent()],
            open: AtomicU64::new(0),
            polls: zeros(),
            last_poll_ok_ms: AtomicI64::new(i64::MIN),
            poll_seconds,
            taskrouter_bad_requests: AtomicU64::new(0),
            taskrouter_error_ratio: MaybeGauge::absent(),
            statistics: AtomicU8::new(0),
            tasks: zeros(),
            reservations: zeros(),
            tasks_in_workflow: AtomicI64::new(i64::MIN),
            config: AtomicU8::new(0),
            problems: AtomicU16::new(0),
            config_mismatch: AtomicU8::new(0),
            rule_state: std::array::from_fn(|_| AtomicU8::new(RuleState::Ok as u8)),
            actions: zeros(),
            disabled: AtomicU8::new(0),
            validation: AtomicU8::new(0),
            seen: zeros(),
            disagreements: zeros(),
            source_polls: zeros(),
            signals: zeros(),
            pushes: zeros(),
            reservation_failures: zeros(),
            alerts: Mutex::new(BTreeMap::new()),
            changed: AtomicU64::new(0),
            polled: AtomicU64::new(0),
        }
    }

    /// Says that a series other than the pollers' changed, after it did (`changed`).
    fn touch(&self) {
        self.changed.fetch_add(1, Release);
    }

    /// `touch` when `moved`.
    fn touch_if(&self, moved: bool) {
        if moved {
            self.touch();
        }
    }

    /// Says that a pollers' series changed (`polled`).
    fn touch_polled(&self) {
        self.polled.fetch_add(1, Release);
    }

    /// One poll of `source` (one of `POLLED_SOURCES`).
    pub fn source_poll(&self, source: &str, result: PollResult) {
        if let Some(i) = POLLED_SOURCES.iter().position(|s| *s == source) {
            self.source_polls[i * PollResult::ALL.len() + result as usize].fetch_add(1, Relaxed);
            self.touch_polled();
        }
    }

    pub fn bad_request_signal(&self, source: crate::state::SignalSource) {
        self.signals[source as usize].fetch_add(1, Relaxed);
        self.touch();
    }

    /// One push to a receiver (one of `PUSH_SOURCES`) with its result (one of `PUSH_RESULTS`).
    pub fn push(&self, source: &str, result: &str) {
        let s = PUSH_SOURCES.iter().position(|x| *x == source);
        let r = PUSH_RESULTS.iter().position(|x| *x == result);
        if let (Some(s), Some(r)) = (s, r) {
            self.pushes[s * PUSH_RESULTS.len() + r].fetch_add(1, Relaxed);
            self.touch();
        }
    }

    /// A reservation rejected (`false`: timed out): a failed attempt, not an outcome.
    pub fn reservation_failure(&self, rejected: bool) {
        self.reservation_failures[usize::from(!rejected)].fetch_add(1, Relaxed);
        self.touch();
    }

    /// One error-level debugger alert with its error code.
    pub fn twilio_alert(&self, code: &str) {
        let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        let code = if alerts.contains_key(code) || alerts.len() < ALERT_CODES_KEPT {
            code
        } else {
            "other"
        };
        *alerts.entry(code.to_string()).or_default() += 1;
        drop(alerts);
        self.touch();
    }

    /// Counts a rejection of one of the `Reject::PER_CBO` reasons; false for the others.
    pub fn reject(&self, reason: Reject) -> bool {
        let slot = Reject::PER_CBO.iter().position(|r| *r == reason);
        if let Some(i) = slot {
            self.rejected[i].fetch_add(1, Relaxed);
            self.touch();
        }
        slot.is_some()
    }

    /// Adds a batch's tally and empties it (its buffers are kept for the next batch).
    pub fn add(&self, t: &mut Tally) {
        if !std::mem::take(&mut t.any) {
            return;
        }
        add_all(&self.ingested, &mut t.ingested);
        add_all(&self.transfers, &mut t.transfers);
        add_all(&self.errors, &mut t.errors);
        add_all(&self.seen, &mut t.seen);
        add_all(&self.disagreements, &mut t.disagreements);
        add_all(
            [&self.duplicate, &self.evicted, &self.history_lost],
            [&mut t.duplicate, &mut t.evicted, &mut t.history_lost],
        );
        for (histogram, values) in self.completion.iter().zip(&mut t.completion) {
            histogram.observe_all(values);
            values.clear();
        }
        self.notification.observe_all(&t.notification);
        t.notification.clear();
        self.touch();
    }

    /// The changes `f` tallies, added at once as a batch's are (benches and tests).
    pub fn tallied(&self, f: impl FnOnce(&mut Tally)) {
        let mut t = Tally::default();
        f(&mut t);
        self.add(&mut t);
    }

    /// One test transfer's result (one of `PROBE_RESULTS`), and its routing time when routed.
    pub fn probe(&self, result: &str, routing_secs: Option<f64>) {
        if let Some(i) = PROBE_RESULTS.iter().position(|r| *r == result) {
            self.probes[i].fetch_add(1, Relaxed);
        }
        if let Some(secs) = routing_secs {
            self.probe_routing.observe(secs);
        }
        self.touch();
    }

    pub fn agent_report(&self) {
        self.agent_reports.fetch_add(1, Relaxed);
        self.touch();
    }

    pub fn set_success_ratio(&self, window: usize, ratio: Option<f64>) {
        self.touch_if(self.success_ratio[window].set(ratio));
    }

    pub fn set_open(&self, n: usize) {
        self.touch_if(self.open.swap(n as u64, Relaxed) != n as u64);
    }

    pub fn poll(&self, result: PollResult, seconds: f64) {
        self.polls[result as usize].fetch_add(1, Relaxed);
        self.poll_seconds.observe(seconds);
        self.touch_polled();
    }

    pub fn set_last_success(&self, at_ms: i64) {
        if self.last_poll_ok_ms.swap(at_ms, Relaxed) != at_ms {
            self.touch_polled();
        }
    }

    pub fn taskrouter_bad_request(&self) {
        self.taskrouter_bad_requests.fetch_add(1, Relaxed);
        self.touch();
    }

    /// The workflow's cumulative statistics: tasks and reservations by kind (in the order of
    /// `TASK_KINDS` and `RESERVATION_KINDS`) and the error ratio.
    pub fn set_statistics(&self, tasks: [i64; 4], reservations: [i64; 3], ratio: Option<f64>) {
        let mut moved = false;
        for (slot, n) in self.tasks.iter().zip(tasks) {
            moved |= slot.swap(n as u64, Relaxed) != n as u64;
        }
        for (slot, n) in self.reservations.iter().zip(reservations) {
            moved |= slot.swap(n as u64, Relaxed) != n as u64;
        }
        moved |= self.taskrouter_error_ratio.set(ratio);
        moved |= self.statistics.swap(1, Relaxed) != 1;
        self.touch_if(moved);
    }

    pub fn set_tasks_in_workflow(&self, n: i64) {
        let n = n.max(i64::MIN + 1);
        self.touch_if(self.tasks_in_workflow.swap(n, Relaxed) != n);
    }

    /// The configuration check: sound or not, and which `Corruption::IDS` are present.
    pub fn set_config(&self, ok: bool, present: impl Fn(&str) -> bool) {
        let bits = Corruption::IDS
            .iter()
            .enumerate()
            .filter(|(_, id)| present(id))
            .fold(0u16, |b, (i, _)| b | 1 << i);
        let state = if ok { 1 } else { 2 };
        let moved = self.problems.swap(bits, Relaxed) != bits;
        self.touch_if(self.config.swap(state, Relaxed) != state || moved);
    }

    pub fn set_config_mismatch(&self, mismatch: bool) {
        let v = u8::from(mismatch);
        self.touch_if(self.config_mismatch.swap(v, Relaxed) != v);
    }

    pub fn set_rule_state(&self, rule: RuleId, state: RuleState) {
        let v = state as u8;
        self.touch_if(self.rule_state[rule as usize].swap(v, Relaxed) != v);
    }

    /// Counts one `actions_total{action,integration,result}`; false for a combination that
    /// does not exist (a bug, reported by the caller's tests rather than a new series).
    pub fn action(&self, action: &str, integration: &str, result: &str) -> bool {
        let series = ACTION_SERIES
            .iter()
            .position(|(a, i)| *a == action && *i == integration);
        let slot = ACTION_RESULTS.iter().position(|r| *r == result);
        if let (Some(s), Some(r)) = (series, slot) {
            self.actions[s * ACTION_RESULTS.len() + r].fetch_add(1, Relaxed);
            self.touch();
            return true;
        }
        debug_assert!(
            false,
            "no actions_total series {action}/{integration}/{result}"
        );
        false
    }

    pub fn set_disabled(&self, disabled: bool) {
        let v = u8::from(disabled);
        self.touch_if(self.disabled.swap(v, Relaxed) != v);
    }

    pub fn set_validation(&self, state: crate::validation::State) {
        let v = 1 + state as u8;
        self.touch_if(self.validation.swap(v, Relaxed) != v);
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The source revision the binary was built from (`build.rs`).
pub const REVISION: &str = env!("TRANSFER_GUARD_REVISION");

/// Per-CBO series are arrays of atomics in one [`CboSeries`] per CBO (every label set is a
/// known enum, so no label strings are stored per series); the prometheus crate's registry
/// holds what is not per CBO: `build_info` and the process collector.
pub struct Metrics {
    /// `build_info` and the process collector.
    registry: Registry,
    cbos: RwLock<BTreeMap<String, Arc<CboSeries>>>,
    /// Rejections that belong to no configured CBO (unauthenticated, unknown CBO, admin
    /// requests): (cbo, reason) → count.
    other_rejects: Mutex<BTreeMap<(String, Reject), u64>>,
    /// The decision log's health, once the log is open.
    log_health: std::sync::OnceLock<Arc<crate::decisions::Health>>,
    /// The journal's and checkpoint's failed writes, once they are open.
    store: std::sync::OnceLock<Arc<crate::checkpoint::Checkpoints>>,
    /// The PostgreSQL store, when there is one (`store_errors_total{op="store"}`).
    pg: std::sync::OnceLock<Arc<crate::pg::Store>>,
    leader: prometheus::IntGauge,
    /// `config_reloads_total{result}`: `applied` or `refused`.
    reloads: prometheus::IntCounterVec,
    /// `config_last_reload_successful`: 0 while the file on disk is one the daemon refused.
    reload_ok: prometheus::IntGauge,
    /// `taskrouter_poll_duration_seconds`, shared by every CBO's series.
    poll_seconds: Arc<Histogram>,
    /// What the last gzipped scrape wrote, by block of CBOs (`render_gzip`).
    scrape_cache: Mutex<Vec<CachedBlock>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; the running version and the source revision it was built from.",
            )
            .namespace(NAMESPACE),
            &["version", "revision"],
        )
        .expect("a valid definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("registered once");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        let reloads = prometheus::IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads (SIGHUP), by result: applied, or refused and the configuration in force kept.",
            )
            .namespace(NAMESPACE),
            &["result"],
        )
        .expect("a valid definition");
        for result in ["applied", "refused"] {
            reloads.with_label_values(&[result]);
        }
        let reload_ok = prometheus::IntGauge::with_opts(
            Opts::new(
                "config_last_reload_successful",
                "1 when the last reload was applied (or none was asked), 0 when it was refused.",
            )
            .namespace(NAMESPACE),
        )
        .expect("a valid definition");
        reload_ok.set(1);
        // SPEC §12: the replica that fires actions and notifies Alertmanager. Without a
        // `[store]` there is one process, and it always does.
        let leader = prometheus::IntGauge::with_opts(
            Opts::new(
                "leader",
                "1 on the replica that acts (fires actions, notifies Alertmanager), 0 on a follower; the one process of the embedded default always acts.",
            )
            .namespace(NAMESPACE),
        )
        .expect("a valid definition");
        leader.set(1);
        registry
            .register(Box::new(leader.clone()))
            .expect("registered once");
        registry
            .register(Box::new(reloads.clone()))
            .expect("registered once");
        registry
            .register(Box::new(reload_ok.clone()))
            .expect("registered once");
        // Requests without a valid token belong to no CBO.
        let other = BTreeMap::from([((String::new(), Reject::Unauthorized), 0)]);
        Metrics {
            registry,
            cbos: RwLock::new(BTreeMap::new()),
            other_rejects: Mutex::new(other),
            log_health: std::sync::OnceLock::new(),
            store: std::sync::OnceLock::new(),
            pg: std::sync::OnceLock::new(),
            leader,
            reloads,
            reload_ok,
            poll_seconds: Arc::new(Histogram::new(POLL_BUCKETS)),
            scrape_cache: Mutex::default(),
        }
    }

    /// Counts a reload: applied, or refused (the configuration in force kept).
    pub fn reloaded(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.with_label_values(&[result]).inc();
        self.reload_ok.set(applied as i64);
    }

    /// Exports `decision_log_writable` and `decision_log_errors_total` from `health`.
    pub fn watch_log(&self, health: Arc<crate::decisions::Health>) {
        let _ = self.log_health.set(health);
    }

    /// Exports `store_errors_total{op="store"}` from the PostgreSQL store.
    pub fn watch_pg(&self, store: Arc<crate::pg::Store>) {
        let _ = self.pg.set(store);
    }

    /// `transfer_guard_leader`: whether this replica acts now.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Exports `store_errors_total` from the journal and checkpoint of `store`.
    pub fn watch_store(&self, store: Arc<crate::checkpoint::Checkpoints>) {
        let _ = self.store.set(store);
    }

    /// The series of `cbo`, created (at zero) on first use.
    pub fn init_cbo(&self, cbo: &str) -> Arc<CboSeries> {
        if let Some(s) = self.cbo(cbo) {
            return s;
        }
        let mut cbos = self.cbos.write().unwrap_or_else(|p| p.into_inner());
        cbos.entry(cbo.to_string())
            .or_insert_with(|| Arc::new(CboSeries::new(cbo, self.poll_seconds.clone())))
            .clone()
    }

    /// The series of a configured CBO.
    pub fn cbo(&self, cbo: &str) -> Option<Arc<CboSeries>> {
        let cbos = self.cbos.read().unwrap_or_else(|p| p.into_inner());
        cbos.get(cbo).cloned()
    }

    /// Drops the series of a CBO no longer configured (a reload removed it).
    pub fn remove_cbo(&self, cbo: &str) {
        let mut cbos = self.cbos.write().unwrap_or_else(|p| p.into_inner());
        cbos.remove(cbo);
    }

    pub fn reject(&self, cbo: &str, reason: Reject) {
        if self.cbo(cbo).is_some_and(|s| s.reject(reason)) {
            return;
        }
        let mut other = self.other_rejects.lock().unwrap_or_else(|p| p.into_inner());
        *other.entry((cbo.to_string(), reason)).or_default() += 1;
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        // The registry first: a scrape that shows a reload applied shows its CBOs too (a
        // reload counts itself once its CBOs' series are in place).
        let mut registry = Vec::new();
        self.registry_text(&mut registry);
        let cbos = self.cbo_list();
        let mut w = Writer::new(Mode::Text, cbos.len() * 12_000);
        render_cbos(&mut w, &cbos, None);
        let mut out = Vec::with_capacity(w.out.len() + 65_536);
        for (header, global, family) in self.global_families() {
            let body = w.body(&family);
            if global.is_empty() && body.is_none() {
                continue;
            }
            out.extend_from_slice(&header);
            out.extend_from_slice(&global);
            out.extend_from_slice(body.unwrap_or_default());
        }
        out.extend_from_slice(&registry);
        String::from_utf8(out).expect("exposition is UTF-8")
    }

    /// The exposition gzipped, as `/metrics` answers Prometheus: the same text as `render`, as
    /// one gzip stream made of deflated chunks (one per family and block of `BLOCK` CBOs), each
    /// kept from the scrape before while the values it shows did not change. Reading a
    /// block's values costs a fraction of writing its text, and at a CBO's volume most blocks
    /// of most families (all but the pollers' counters) are unchanged between two scrapes.
    pub fn render_gzip(&self) -> Vec<u8> {
        if self.cbos.read().unwrap_or_else(|p| p.into_inner()).len() < 4 * BLOCK {
            // Small enough to write whole, and compressed as one it is smaller.
            return gzip(self.render().as_bytes());
        }
        // The registry first, as in `render`.
        let mut registry = Vec::new();
        self.registry_text(&mut registry);
        let cbos = self.cbo_list();
        let mut cache =
            std::mem::take(&mut *self.scrape_cache.lock().unwrap_or_else(|p| p.into_inner()));
        cache.resize_with(cbos.len().div_ceil(BLOCK), Default::default);
        let chunks: Vec<&[Arc<CboSeries>]> = cbos.chunks(BLOCK).collect();
        // Blocks are independent: half of them on another thread.
        let half = chunks.len() / 2;
        let (first, second) = cache.split_at_mut(half);
        let update = |blocks: &[&[Arc<CboSeries>]], cached: &mut [CachedBlock]| {
            let mut z = Zip::new();
            for (block, cached) in blocks.iter().zip(cached) {
                cached.update(block, &mut z);
            }
        };
        crate::join(
            || update(&chunks[..half], first),
            || update(&chunks[half..], second),
        );
        // Each family's header and its kept chunks, in order; then put together in two
        // halves of about the same size on two threads (5 MB of copying and a CRC combine
        // per chunk at 5,000 CBOs), the second half appended to the first.
        let mut z = Zip::new();
        let mut parts: Vec<(Chunk, Vec<&Chunk>)> = Vec::new();
        for (header, global, family) in self.global_families() {
            let kept: Vec<&Chunk> = cache
                .iter()
                .filter_map(|b| b.chunks.get(&family))
                .filter(|c| !c.is_empty())
                .collect();
            if global.is_empty() && kept.is_empty() {
                continue;
            }
            let mut head = header;
            head.extend_from_slice(&global);
            parts.push((z.chunk(&head), kept));
        }
        parts.push((z.chunk(&registry), Vec::new()));
        let size = |p: &(Chunk, Vec<&Chunk>)| {
            p.0.deflated.len() + p.1.iter().map(|c| c.deflated.len()).sum::<usize>()
        };
        let total: usize = parts.iter().map(size).sum();
        let mut half = 0;
        let mut first_bytes = 0;
        while half < parts.len() && first_bytes < total / 2 {
            first_bytes += size(&parts[half]);
            half += 1;
        }
        let join = |parts: &[(Chunk, Vec<&Chunk>)], mut out: Gzip| {
            for (head, kept) in parts {
                out.push(head);
                kept.iter().for_each(|c| out.push(c));
            }
            out
        };
        let (mut out, second) = crate::join(
            || join(&parts[..half], Gzip::new(total + 64)),
            || join(&parts[half..], Gzip::headless(total - first_bytes)),
        );
        out.append(second);
        drop(parts);
        *self.scrape_cache.lock().unwrap_or_else(|p| p.into_inner()) = cache;
        out.finish()
    }

    fn cbo_list(&self) -> Vec<Arc<CboSeries>> {
        let cbos = self.cbos.read().unwrap_or_else(|p| p.into_inner());
        cbos.values().cloned().collect()
    }

    /// Every family in order: its header, its series that belong to no CBO, its name.
    fn global_families(&self) -> Vec<(Vec<u8>, Vec<u8>, String)> {
        let mut w = Writer::new(Mode::Text, 65_536);
        render_cbos(&mut w, &[], Some(self));
        w.sections
            .iter()
            .map(|s| {
                (
                    w.out[s.header.clone()].to_vec(),
                    w.out[s.body.clone()].to_vec(),
                    s.name.clone(),
                )
            })
            .collect()
    }

    /// The series of the Prometheus registry (build info, reloads, leader...).
    fn registry_text(&self, out: &mut Vec<u8>) {
        TextEncoder::new()
            .encode(&self.registry.gather(), out)
            .expect("text encoding cannot fail");
    }
}

/// CBOs per block of the scrape cache.
pub const BLOCK: usize = 25;

/// One block of CBOs in the scrape cache: which CBOs, and per family the values it showed and
/// its text deflated (empty when the block had no series of the family).
#[derive(Default)]
struct CachedBlock {
    ids: Vec<u64>,
    /// Each CBO's `changed` and `polled` when the block was last read.
    moved: Vec<(u64, u64)>,
    values: HashMap<String, Vec<u64>>,
    chunks: HashMap<String, Chunk>,
}

impl CachedBlock {
    /// Brings the block up to date: families whose values changed are written and deflated
    /// again, the others kept.
    /// A block whose CBOs' series did not change since (`CboSeries::touch`) is not read at
    /// all; one where only polls happened has only the pollers' families read.
    fn update(&mut self, block: &[Arc<CboSeries>], z: &mut Zip) {
        let ids: Vec<u64> = block.iter().map(|c| c.id).collect();
        if ids != self.ids {
            *self = CachedBlock {
                ids,
                ..Default::default()
            };
        }
        // Read before the values: a change that lands meanwhile moves them again.
        let moved: Vec<(u64, u64)> = block
            .iter()
            .map(|c| (c.changed.load(Acquire), c.polled.load(Acquire)))
            .collect();
        let fresh = self.moved.len() != moved.len();
        let rest = fresh || moved.iter().zip(&self.moved).any(|(a, b)| a.0 != b.0);
        let polls = fresh || moved.iter().zip(&self.moved).any(|(a, b)| a.1 != b.1);
        self.moved = moved;
        let mut v = Writer::new(Mode::Values, 0);
        if !rest {
            // Debug builds read every family anyway and check that a method that changed a
            // series said so (`touch`): a stale scrape is a test failure, not a silent one.
            #[cfg(debug_assertions)]
            self.check_untouched(block, polls);
            if !polls {
                return;
            }
            v.wanted = Some(POLL_FAMILIES.iter().map(|f| f.to_string()).collect());
        }
        render_cbos(&mut v, block, None);
        let mut changed = std::collections::HashSet::new();
        for s in &v.sections {
            if v.wanted.as_ref().is_some_and(|w| !w.contains(&s.name)) {
                continue;
            }
            let now = &v.values[s.values.clone()];
            if self.values.get(&s.name).is_none_or(|was| was[..] != *now) {
                changed.insert(s.name.clone());
                self.values.insert(s.name.clone(), now.to_vec());
            }
        }
        if changed.is_empty() {
            return;
        }
        let mut w = Writer::new(Mode::Text, block.len() * 12_000);
        w.wanted = Some(changed);
        render_cbos(&mut w, block, None);
        for s in &w.sections {
            if w.wanted.as_ref().is_some_and(|c| c.contains(&s.name)) {
                self.chunks
                    .insert(s.name.clone(), z.chunk(&w.out[s.body.clone()]));
            }
        }
    }
}

#[cfg(debug_assertions)]
impl CachedBlock {
    /// Panics when a family outside `POLL_FAMILIES` (or, unless `polls`, any family) shows
    /// other values than the cache holds although no CBO of the block said it changed.
    /// A change made while the scrape runs (its value written, its `touch` not yet) is not
    /// one: the check waits a moment and lets it pass when the block's marks moved meanwhile.
    fn check_untouched(&self, block: &[Arc<CboSeries>], polls: bool) {
        let mut v = Writer::new(Mode::Values, 0);
        render_cbos(&mut v, block, None);
        for s in &v.sections {
            if polls && POLL_FAMILIES.contains(&s.name.as_str()) {
                continue;
            }
            let now = &v.values[s.values.clone()];
            let was = self.values.get(&s.name).map_or(&[][..], |v| &v[..]);
            if was == now {
                continue;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            let polled = POLL_FAMILIES.contains(&s.name.as_str());
            let concurrent = block.iter().zip(&self.moved).any(|(c, m)| {
                if polled {
                    c.polled.load(Acquire) != m.1
                } else {
                    c.changed.load(Acquire) != m.0
                }
            });
            assert!(
                concurrent,
                "{} changed but no CboSeries method said so (touch or touch_polled)",
                s.name
            );
        }
    }
}

/// Some text deflated on its own, ending byte-aligned and not final (a sync flush), with its
/// CRC: chunks put one after another are one deflate stream of their texts (as pigz does).
#[derive(Default)]
struct Chunk {
    deflated: Vec<u8>,
    crc: flate2::Crc,
}

impl Chunk {
    fn is_empty(&self) -> bool {
        self.crc.amount() == 0
    }
}

/// Deflates chunks, one compressor reused for all of them.
struct Zip {
    z: flate2::Compress,
}

impl Zip {
    fn new() -> Zip {
        Zip {
            z: flate2::Compress::new(flate2::Compression::fast(), false),
        }
    }

    fn chunk(&mut self, text: &[u8]) -> Chunk {
        let mut crc = flate2::Crc::new();
        if text.is_empty() {
            return Chunk::default();
        }
        crc.update(text);
        // A fresh start: nothing refers back to the chunks before it.
        self.z.reset();
        let mut out = Vec::with_capacity(text.len() / 6 + 64);
        let mut input = text;
        loop {
            let before = self.z.total_in();
            self.z
                .compress_vec(input, &mut out, flate2::FlushCompress::Sync)
                .expect("deflate into memory cannot fail");
            input = &input[(self.z.total_in() - before) as usize..];
            // Done when all went in and the flush had room to finish.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(1024));
        }
        Chunk { deflated: out, crc }
    }
}

/// One gzip member (RFC 1952) put together from deflated chunks.
struct Gzip {
    out: Vec<u8>,
    crc: flate2::Crc,
}

impl Gzip {
    fn new(capacity: usize) -> Gzip {
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        Gzip {
            out,
            crc: flate2::Crc::new(),
        }
    }

    /// The middle of a member, without the header: `append`ed to one that has it.
    fn headless(capacity: usize) -> Gzip {
        Gzip {
            out: Vec::with_capacity(capacity),
            crc: flate2::Crc::new(),
        }
    }

    fn push(&mut self, chunk: &Chunk) {
        self.out.extend_from_slice(&chunk.deflated);
        self.crc.combine(&chunk.crc);
    }

    /// `next`'s chunks after these.
    fn append(&mut self, next: Gzip) {
        self.out.extend_from_slice(&next.out);
        self.crc.combine(&next.crc);
    }

    fn finish(mut self) -> Vec<u8> {
        // An empty final block with fixed codes ends the deflate stream.
        self.out.extend_from_slice(&[0x03, 0x00]);
        self.out.extend_from_slice(&self.crc.sum().to_le_bytes());
        self.out.extend_from_slice(&self.crc.amount().to_le_bytes());
        self.out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `text` gzipped, as `/metrics` answers when asked.
pub fn gzip(text: &[u8]) -> Vec<u8> {
    let mut out = Gzip::new(text.len() / 8);
    out.push(&Zip::new().chunk(text));
    out.finish()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The exposition text.
    Text,
    /// Only what the text would show: each series' labels (hashed) and value, to tell
    /// whether a family's text changed without writing it.
    Values,
}

/// A fast hash of `bytes` (eight at a time) continuing from `h`: tells one series' labels
/// from another's in the scrape cache.
fn hash(mut h: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(last)).wrapping_mul(K);
    (h.rotate_left(5) ^ bytes.len() as u64).wrapping_mul(K)
}

/// One family written: its name, its header, its series (byte ranges of `out`) and, in
/// values mode, its values (a range of `values`).
struct Section {
    name: String,
    header: std::ops::Range<usize>,
    body: std::ops::Range<usize>,
    values: std::ops::Range<usize>,
}

/// The text format, written straight into one buffer, family by family.
struct Writer {
    mode: Mode,
    out: Vec<u8>,
    values: Vec<u64>,
    int: itoa::Buffer,
    sections: Vec<Section>,
    /// Only these families are written (the others are skipped); all when `None`.
    wanted: Option<std::collections::HashSet<String>>,
    skip: bool,
}

impl Writer {
    fn new(mode: Mode, capacity: usize) -> Writer {
        Writer {
            mode,
            out: Vec::with_capacity(capacity),
            values: Vec::new(),
            int: itoa::Buffer::new(),
            sections: Vec::new(),
            wanted: None,
            skip: false,
        }
    }

    fn begin(&mut self, name: &str, kind: &str, help: &str) {
        self.skip = self.wanted.as_ref().is_some_and(|w| !w.contains(name));
        let start = self.out.len();
        if self.mode == Mode::Text && !self.skip {
            for part in ["# HELP ", NAMESPACE, "_", name, " ", help, "\n# TYPE "] {
                self.out.extend_from_slice(part.as_bytes());
            }
            for part in [NAMESPACE, "_", name, " ", kind, "\n"] {
                self.out.extend_from_slice(part.as_bytes());
            }
        }
        let (end, values) = (self.out.len(), self.values.len());
        self.sections.push(Section {
            name: name.to_string(),
            header: start..end,
            body: end..end,
            values: values..values,
        });
    }

    /// A second part of the family begun last (`begin`), closed by `end`: written right after
    /// the first, without a header; `part` names it in the scrape cache (`<name>:<part>`).
    fn more(&mut self, name: &str, part: &str) {
        let name = format!("{name}:{part}");
        self.skip = self.wanted.as_ref().is_some_and(|w| !w.contains(&name));
        let (at, values) = (self.out.len(), self.values.len());
        self.sections.push(Section {
            name,
            header: at..at,
            body: at..at,
            values: values..values,
        });
    }

    /// Closes the family begun last.
    fn end(&mut self) {
        let (end, values) = (self.out.len(), self.values.len());
        if let Some(s) = self.sections.last_mut() {
            s.body.end = end;
            s.values.end = values;
        }
        self.skip = false;
    }

    /// The series of `family` written in text mode, if any.
    fn body(&self, family: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|s| s.name == family && !s.body.is_empty())
            .map(|s| &self.out[s.body.clone()])
    }

    /// `transfer_guard_<name><suffix>{<labels…>} ` (the value follows).
    fn start(&mut self, name: &str, suffix: &str, labels: &[Label]) {
        if self.skip {
            return;
        }
        if self.mode == Mode::Values {
            // Which series: a series that appears or goes, or a label that changes, changes
            // the text as a value does. A CBO's label and a fixed list's by where they live
            // (one multiply each, independent of the others), a label made for this scrape
            // (a debugger code) by its bytes.
            let mut h = suffix.len() as u64;
            for (i, label) in labels.iter().enumerate() {
                h = match label {
                    Label::Cbo(l) | Label::Fixed(l) => {
                        let at = (l.as_ptr() as u64 ^ (l.len() as u64) << 48)
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        h ^ at.rotate_left(13 * i as u32)
                    }
                    Label::Text(l) => hash(h, l.as_bytes()),
                };
            }
            self.values.push(h);
            return;
        }
        for part in [NAMESPACE, "_", name, suffix, "{"] {
            self.out.extend_from_slice(part.as_bytes());
        }
        for label in labels {
            self.out.extend_from_slice(label.text().as_bytes());
        }
        self.out.extend_from_slice(b"} ");
    }

    fn int(&mut self, name: &str, labels: &[Label], v: u64) {
        self.start(name, "", labels);
        self.u64(v);
    }

    fn u64(&mut self, v: u64) {
        match (self.skip, self.mode) {
            (true, _) => {}
            (false, Mode::Values) => self.values.push(v),
            (false, Mode::Text) => {
                let s = self.int.format(v);
                self.out.extend_from_slice(s.as_bytes());
                self.out.push(b'\n');
            }
        }
    }

    fn i64(&mut self, v: i64) {
        match (self.skip, self.mode) {
            (true, _) => {}
            (false, Mode::Values) => self.values.push(v as u64),
            (false, Mode::Text) => {
                let s = self.int.format(v);
                self.out.extend_from_slice(s.as_bytes());
                self.out.push(b'\n');
            }
        }
    }

    fn f64(&mut self, v: f64) {
        use std::io::Write;
        match (self.skip, self.mode) {
            (true, _) => {}
            (false, Mode::Values) => self.values.push(v.to_bits()),
            (false, Mode::Text) if v.is_infinite() => {
                let s: &[u8] = if v > 0.0 { b"+Inf\n" } else { b"-Inf\n" };
                self.out.extend_from_slice(s);
            }
            (false, Mode::Text) => {
                let _ = writeln!(self.out, "{v}");
            }
        }
    }

    /// One histogram's `_bucket`, `_sum` and `_count` lines; `labels` end with a comma.
    fn histogram(&mut self, name: &str, labels: &[Label], h: &Histogram, les: &'static [String]) {
        // The series' labels and `le` after them, without an allocation per histogram.
        let mut buf = [Label::Fixed(""); 4];
        let last = labels.len();
        buf[..last].copy_from_slice(labels);
        let labels_le = &mut buf[..=last];
        let mut cumulative = 0;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            labels_le[last] = Label::Fixed(&les[i]);
            self.start(name, "_bucket", labels_le);
            self.u64(cumulative);
        }
        self.start(name, "_sum", labels);
        self.f64(h.sum());
        self.start(name, "_count", labels);
        self.u64(cumulative);
    }
}

/// A series' label, as the scrape cache tells whether it changed.
#[derive(Clone, Copy)]
enum Label<'a> {
    /// A CBO's `cbo="…"`: it lives as long as the CBO's series, and a block of the cache
    /// whose CBOs change is made again.
    Cbo(&'a str),
    /// A label from a list made once for the process (`fixed`).
    Fixed(&'static str),
    /// A label made for this scrape (a debugger's error code): compared by its bytes.
    Text(&'a str),
}

impl Label<'_> {
    fn text(&self) -> &str {
        match self {
            Label::Cbo(l) | Label::Fixed(l) | Label::Text(l) => l,
        }
    }
}

/// The label list `key` names, made by `make` the first time and kept for the process: a
/// scrape compares its labels by where they live, not by their bytes (most of 940,000 series
/// at 5,000 CBOs carry one). Each `key` names one list.
fn fixed(key: &'static str, make: impl FnOnce() -> Vec<String>) -> &'static [String] {
    static LISTS: std::sync::LazyLock<Mutex<HashMap<&'static str, &'static [String]>>> =
        std::sync::LazyLock::new(Default::default);
    let mut lists = LISTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(list) = lists.get(key) {
        #[cfg(debug_assertions)]
        assert_eq!(*list, &make()[..], "two label lists under the key {key}");
        return list;
    }
    let list: &'static [String] = Vec::leak(make());
    lists.insert(key, list);
    list
}

/// `,le="…"` for each bound and `+Inf`.
fn le_labels(bounds: &[f64]) -> Vec<String> {
    bounds
        .iter()
        .map(|b| format!(",le=\"{b}\""))
        .chain(std::iter::once(",le=\"+Inf\"".to_string()))
        .collect()
}

/// `,<name>="<value>"` for each value.
fn labels_of<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    values
        .into_iter()
        .map(|v| format!(",{name}=\"{v}\""))
        .collect()
}

/// A family with one series per CBO, `value` read from its `CboSeries`.
fn per_cbo(
    w: &mut Writer,
    cbos: &[Arc<CboSeries>],
    (name, kind, help): (&str, &str, &str),
    value: impl Fn(&CboSeries) -> u64,
) {
    w.begin(name, kind, help);
    for c in cbos {
        w.int(name, &[Label::Cbo(&c.label)], value(c));
    }
    w.end();
}

/// A family with one series per CBO and value of `label`, read from an array of counters in
/// the order of `values`.
fn per_cbo_and<'a>(
    w: &mut Writer,
    cbos: &'a [Arc<CboSeries>],
    (name, kind, help): (&'static str, &str, &str),
    (label, values): (&str, &[&str]),
    counters: impl Fn(&'a CboSeries) -> &'a [AtomicU64],
) {
    let labels = fixed(name, || labels_of(label, values.iter().copied()));
    w.begin(name, kind, help);
    for c in cbos {
        for (l, n) in labels.iter().zip(counters(c)) {
            w.int(
                name,
                &[Label::Cbo(&c.label), Label::Fixed(l)],
                n.load(Relaxed),
            );
        }
    }
    w.end();
}

/// A pollers' counter family, by CBO and `labels` (which end with `result`, in the order of
/// `PollResult::ALL`, as `counters` do). Every CBO is polled in every scrape interval, so its
/// `ok` series change each time while the failures' seldom do: the `ok` series of every CBO
/// come first and the others after them, as a second part of the family (`Writer::more`), so
/// that the scrape cache writes and compresses again only the first part (a fifth of the
/// text) after an interval. Series of one family may come in any order.
fn polls_family<'a>(
    w: &mut Writer,
    cbos: &'a [Arc<CboSeries>],
    (name, help): (&'static str, &str),
    labels: &'static [String],
    counters: impl Fn(&'a CboSeries) -> &'a [AtomicU64],
) {
    let results = PollResult::ALL.len();
    let ok = PollResult::Ok as usize;
    for oks in [true, false] {
        if oks {
            w.begin(name, "counter", help);
        } else {
            w.more(name, "failed");
        }
        for c in cbos {
            for (i, (l, n)) in labels.iter().zip(counters(c)).enumerate() {
                if (i % results == ok) == oks {
                    w.int(
                        name,
                        &[Label::Cbo(&c.label), Label::Fixed(l)],
                        n.load(Relaxed),
                    );
                }
            }
        }
        w.end();
    }
}

/// Every family of `cbos`' series, and with `global` the series that belong to no CBO.
fn render_cbos(w: &mut Writer, cbos: &[Arc<CboSeries>], global: Option<&Metrics>) {
    // Made once: the scrape cache knows these labels by where they live.
    static ACTION_LABELS: std::sync::LazyLock<Vec<(String, String)>> =
        std::sync::LazyLock::new(|| {
            let mut labels = Vec::new();
            for (action, integration) in ACTION_SERIES {
                for result in ACTION_RESULTS {
                    labels.push((
                        format!("action=\"{action}\","),
                        format!(",integration=\"{integration}\",result=\"{result}\""),
                    ));
                }
            }
            labels
        });
    let action_labels = &*ACTION_LABELS;
    w.begin(
        "actions_total",
        "counter",
        "Actions by action (rollback, disable, alert), integration and result (fired, dry_run, failed, suppressed); every combination from the start.",
    );
    for c in cbos {
        for ((a, ir), n) in action_labels.iter().zip(&c.actions) {
            w.int(
                "actions_total",
                &[Label::Fixed(a), Label::Cbo(&c.label), Label::Fixed(ir)],
                n.load(Relaxed),
            );
        }
    }
    w.end();

    per_cbo(
        w,
        cbos,
        (
            "agent_reports_total",
            "counter",
            "Agents' reports of a failing transfer (POST /v1/reports).",
        ),
        |c| c.agent_reports.load(Relaxed),
    );

    let les = fixed("agent_notification_seconds", || {
        le_labels(NOTIFICATION_BUCKETS)
    });
    w.begin(
        "agent_notification_seconds",
        "histogram",
        "Time from initiated to the target agent's reservation (notified).",
    );
    for c in cbos {
        w.histogram(
            "agent_notification_seconds",
            &[Label::Cbo(&c.label)],
            &c.notification,
            les,
        );
    }
    w.end();

    per_cbo(
        w,
        cbos,
        (
            "config_mismatch",
            "gauge",
            "1 while a workflow problem present since transfer-guard started (its own configuration, or an old state) holds the CBO's actions; 0 otherwise.",
        ),
        |c| u64::from(c.config_mismatch.load(Relaxed)),
    );

    if let Some(h) = global.and_then(|m| m.log_health.get()) {
        w.begin(
            "decision_log_errors_total",
            "counter",
            "Appends to the decision log that failed (a full or read-only disk); nothing fires while it cannot be written.",
        );
        w.int("decision_log_errors_total", &[], h.errors());
        w.end();
        w.begin(
            "decision_log_writable",
            "gauge",
            "1 while the decision log can be written; 0 holds every action and makes /readyz answer 503.",
        );
        w.int("decision_log_writable", &[], u64::from(h.writable()));
        w.end();
    }

    if let Some(store) = global.and_then(|m| m.store.get()) {
        let (journal, checkpoint) = store.error_counts();
        w.begin(
            "store_errors_total",
            "counter",
            "Failures of the state kept beyond this process, by op: writes of the restart state (journal of what each CBO took, checkpoint: a full or read-only disk; guarding goes on from memory) and calls to the PostgreSQL store of replicas (store; actions are held while it cannot be reached).",
        );
        w.int(
            "store_errors_total",
            &[Label::Fixed("op=\"journal\"")],
            journal,
        );
        w.int(
            "store_errors_total",
            &[Label::Fixed("op=\"checkpoint\"")],
            checkpoint,
        );
        if let Some(pg) = global.and_then(|m| m.pg.get()) {
            w.int(
                "store_errors_total",
                &[Label::Fixed("op=\"store\"")],
                pg.errors(),
            );
        }
        w.end();
    }

    per_cbo(
        w,
        cbos,
        (
            "events_duplicate_total",
            "counter",
            "Accepted events that repeated one already seen (same transfer, event and timestamp) and were ignored.",
        ),
        |c| c.duplicate.load(Relaxed),
    );
    per_cbo_and(
        w,
        cbos,
        (
            "events_ingested_total",
            "counter",
            "Transfer events accepted, by event type.",
        ),
        ("event", &EventKind::ALL.map(|k| k.as_str())),
        |c| &c.ingested,
    );

    let reasons = fixed("events_rejected_total", || {
        labels_of("reason", Reject::PER_CBO.map(|r| r.as_str()))
    });
    w.begin(
        "events_rejected_total",
        "counter",
        "Transfer events or requests rejected, by reason (cbo empty when unauthenticated).",
    );
    let other = global.map_or_else(BTreeMap::new, |m| {
        m.other_rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    });
    for ((cbo, reason), n) in other {
        let (c, r) = (
            format!("cbo=\"{}\"", escape(&cbo)),
            format!(",reason=\"{}\"", reason.as_str()),
        );
        w.int(
            "events_rejected_total",
            &[Label::Text(&c), Label::Text(&r)],
            n,
        );
    }
    for c in cbos {
        for (i, l) in reasons.iter().enumerate() {
            w.int(
                "events_rejected_total",
                &[Label::Cbo(&c.label), Label::Fixed(l)],
                c.rejected[i].load(Relaxed),
            );
        }
    }
    w.end();

    per_cbo(
        w,
        cbos,
        (
            "history_lost_total",
            "counter",
            "Completed transfers whose conversation history was not carried over.",
        ),
        |c| c.history_lost.load(Relaxed),
    );
    per_cbo(
        w,
        cbos,
        (
            "open_transfers",
            "gauge",
            "Transfers tracked and not ended yet.",
        ),
        |c| c.open.load(Relaxed),
    );

    let les = fixed("probe_routing_seconds", || le_labels(PROBE_BUCKETS));
    w.begin(
        "probe_routing_seconds",
        "histogram",
        "Time TaskRouter took to route a test transfer to its queue.",
    );
    for c in cbos {
        w.histogram(
            "probe_routing_seconds",
            &[Label::Cbo(&c.label)],
            &c.probe_routing,
            les,
        );
    }
    w.end();
    per_cbo_and(
        w,
        cbos,
        (
            "probes_total",
            "counter",
            "Test transfers by result: routed, not_routed (not in the queue within 10 s), bad_request (TaskRouter 400), error.",
        ),
        ("result", &PROBE_RESULTS),
        |c| &c.probes,
    );

    let rule_labels = fixed("rule_state", || {
        let mut labels = Vec::new();
        for rule in RuleId::ALL {
            for state in RuleState::ALL {
                labels.push(format!(
                    ",rule=\"{}\",state=\"{}\"",
                    rule.as_str(),
                    state.as_str()
                ));
            }
        }
        labels
    });
    w.begin(
        "rule_state",
        "gauge",
        "1 for each rule's current state (ok, pending, breached, inconclusive), 0 for the others.",
    );
    for c in cbos {
        for (r, states) in rule_labels.chunks(4).enumerate() {
            let current = c.rule_state[r].load(Relaxed) as usize;
            for (s, l) in states.iter().enumerate() {
                w.int(
                    "rule_state",
                    &[Label::Cbo(&c.label), Label::Fixed(l)],
                    u64::from(s == current),
                );
            }
        }
    }
    w.end();

    let windows = fixed("success_ratio", || {
        labels_of("window", RATIO_WINDOWS.map(|(n, _)| n))
    });
    w.begin(
        "success_ratio",
        "gauge",
        "completed / (completed + failed + timed_out) over the trailing window, in event time; absent without transfers.",
    );
    for c in cbos {
        for (i, l) in windows.iter().enumerate() {
            if let Some(r) = c.success_ratio[i].get() {
                w.start(
                    "success_ratio",
                    "",
                    &[Label::Cbo(&c.label), Label::Fixed(l)],
                );
                w.f64(r);
            }
        }
    }
    w.end();

    per_cbo(
        w,
        cbos,
        (
            "taskrouter_bad_requests_total",
            "counter",
            "Polls where TaskRouter answered 400 Bad Request for the chat-transfer workflow.",
        ),
        |c| c.taskrouter_bad_requests.load(Relaxed),
    );

    w.begin(
        "taskrouter_error_ratio",
        "gauge",
        "(tasks canceled + tasks timed out in workflow) / tasks entered over the polled window; absent without tasks.",
    );
    for c in cbos {
        if let Some(r) = c.taskrouter_error_ratio.get() {
            w.start("taskrouter_error_ratio", "", &[Label::Cbo(&c.label)]);
            w.f64(r);
        }
    }
    w.end();

    w.begin(
        "taskrouter_last_success_timestamp_seconds",
        "gauge",
        "When the last TaskRouter poll without an error ended (Unix seconds); absent before one. A throttled or failing CBO shows here.",
    );
    for c in cbos {
        let ms = c.last_poll_ok_ms.load(Relaxed);
        if ms != i64::MIN {
            w.start(
                "taskrouter_last_success_timestamp_seconds",
                "",
                &[Label::Cbo(&c.label)],
            );
            w.f64(ms as f64 / 1000.0);
        }
    }
    w.end();

    w.begin(
        "taskrouter_poll_duration_seconds",
        "histogram",
        "Time one TaskRouter poll cycle took, retries included, over all CBOs.",
    );
    // One histogram for the fleet: Twilio's API answers every CBO alike, and a CBO that is
    // throttled or failing shows in its own polls_total and last_success series.
    if let Some(m) = global.filter(|m| m.poll_seconds.count() > 0) {
        // No label before `le`: no comma either.
        let les = fixed("taskrouter_poll_duration_seconds", || {
            le_labels(POLL_BUCKETS)
                .iter()
                .map(|l| l[1..].to_string())
                .collect()
        });
        w.histogram(
            "taskrouter_poll_duration_seconds",
            &[],
            &m.poll_seconds,
            les,
        );
    }
    w.end();

    per_cbo_and(
        w,
        cbos,
        (
            "transfers_seen_total",
            "counter",
            "Transfers each source reported (SPEC 2b); a transfer seen by several sources counts once in transfers_total.",
        ),
        ("source", &crate::event::Source::SEEING.map(|s| s.as_str())),
        |c| &c.seen,
    );

    per_cbo_and(
        w,
        cbos,
        (
            "source_disagreements_total",
            "counter",
            "Transfers the sources disagree on: outcome (TaskRouter's wins), plugin_missing (TaskRouter saw it, the plugin never reported it), taskrouter_missing.",
        ),
        (
            "kind",
            &crate::reconcile::Disagreement::ALL.map(|d| d.as_str()),
        ),
        |c| &c.disagreements,
    );

    let poll_labels = fixed("source_polls_total", || {
        let mut labels = Vec::new();
        for source in POLLED_SOURCES {
            for result in PollResult::ALL {
                labels.push(format!(
                    ",source=\"{source}\",result=\"{}\"",
                    result.as_str()
                ));
            }
        }
        labels
    });
    polls_family(
        w,
        cbos,
        (
            "source_polls_total",
            "Polls of Twilio's record (taskrouter_events, serverless_logs, twilio_alerts), by result.",
        ),
        poll_labels,
        |c| &c.source_polls,
    );

    per_cbo_and(
        w,
        cbos,
        (
            "bad_request_signals_total",
            "counter",
            "Bad Requests that left no transfer event (a function's error line, a debugger alert), each counted once across sources.",
        ),
        (
            "source",
            &crate::state::SignalSource::ALL.map(|s| s.as_str()),
        ),
        |c| &c.signals,
    );

    let push_labels = fixed("pushes_total", || {
        let mut labels = Vec::new();
        for source in PUSH_SOURCES {
            for result in PUSH_RESULTS {
                labels.push(format!(",source=\"{source}\",result=\"{result}\""));
            }
        }
        labels
    });
    w.begin(
        "pushes_total",
        "counter",
        "Requests Twilio pushed (taskrouter_callback, event_streams), by result: accepted, bad_signature (answered 403), malformed.",
    );
    for c in cbos {
        for (l, n) in push_labels.iter().zip(&c.pushes) {
            w.int(
                "pushes_total",
                &[Label::Cbo(&c.label), Label::Fixed(l)],
                n.load(Relaxed),
            );
        }
    }
    w.end();

    per_cbo_and(
        w,
        cbos,
        (
            "reservation_failures_total",
            "counter",
            "Reservations of transfer tasks rejected or timed out: failed attempts, not outcomes.",
        ),
        ("kind", &["rejected", "timeout"]),
        |c| &c.reservation_failures,
    );

    w.begin(
        "twilio_alerts_total",
        "counter",
        "Error-level alerts in Twilio's debugger (Monitor API), by error code.",
    );
    for c in cbos {
        let alerts = c.alerts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (code, n) in alerts {
            let code = format!(",code=\"{}\"", escape(&code));
            w.int(
                "twilio_alerts_total",
                &[Label::Cbo(&c.label), Label::Text(&code)],
                n,
            );
        }
    }
    w.end();

    polls_family(
        w,
        cbos,
        (
            "taskrouter_polls_total",
            "TaskRouter poll cycles, by result (ok, or the class of the first failure).",
        ),
        fixed("taskrouter_polls_total", || {
            labels_of("result", PollResult::ALL.map(|r| r.as_str()))
        }),
        |c| &c.polls,
    );

    for (name, help, kinds, values) in [
        (
            "taskrouter_reservations",
            "The workflow's reservations over the polled window (CumulativeStatistics), by kind.",
            &RESERVATION_KINDS[..],
            (|c: &CboSeries| &c.reservations[..]) as fn(&CboSeries) -> &[AtomicU64],
        ),
        (
            "taskrouter_tasks",
            "The workflow's tasks over the polled window (CumulativeStatistics), by kind.",
            &TASK_KINDS[..],
            |c: &CboSeries| &c.tasks[..],
        ),
    ] {
        let kinds = fixed(name, || labels_of("kind", kinds.iter().copied()));
        w.begin(name, "gauge", help);
        for c in cbos.iter().filter(|c| c.statistics.load(Relaxed) == 1) {
            for (l, v) in kinds.iter().zip(values(c)) {
                w.start(name, "", &[Label::Cbo(&c.label), Label::Fixed(l)]);
                w.i64(v.load(Relaxed) as i64);
            }
        }
        w.end();
    }

    w.begin(
        "taskrouter_tasks_in_workflow",
        "gauge",
        "Tasks in the workflow now (RealTimeStatistics total_tasks).",
    );
    for c in cbos {
        let n = c.tasks_in_workflow.load(Relaxed);
        if n != i64::MIN {
            w.start("taskrouter_tasks_in_workflow", "", &[Label::Cbo(&c.label)]);
            w.i64(n);
        }
    }
    w.end();

    let les = fixed("transfer_completion_seconds", || {
        le_labels(COMPLETION_BUCKETS)
    });
    let types = fixed("transfer_completion_seconds:transfer_type", || {
        labels_of("transfer_type", ["cold", "warm"])
    });
    w.begin(
        "transfer_completion_seconds",
        "histogram",
        "Time from initiated to completed.",
    );
    for c in cbos {
        for (h, tt) in c.completion.iter().zip(types) {
            w.histogram(
                "transfer_completion_seconds",
                &[Label::Cbo(&c.label), Label::Fixed(tt)],
                h,
                les,
            );
        }
    }
    w.end();

    per_cbo_and(
        w,
        cbos,
        (
            "transfer_errors_total",
            "counter",
            "Failed transfers by error class.",
        ),
        ("class", &ErrorClass::ALL.map(|c| c.as_str())),
        |c| &c.errors,
    );
    per_cbo(
        w,
        cbos,
        (
            "transfers_disabled",
            "gauge",
            "1 while transfer-guard's switch has transfers disabled for the CBO.",
        ),
        |c| u64::from(c.disabled.load(Relaxed)),
    );
    per_cbo(
        w,
        cbos,
        (
            "transfers_evicted_total",
            "counter",
            "Open transfers dropped because the per-CBO cap (transfers.max_open) was reached.",
        ),
        |c| c.evicted.load(Relaxed),
    );

    // Slot by slot: the transfer type, the target, then the outcome, as `transfers` counts.
    let slots = fixed("transfers_total", || {
        let mut labels = Vec::new();
        for tt in TYPE_VALUES {
            for target in TARGET_VALUES {
                for outcome in Outcome::ALL {
                    labels.push(format!(
                        ",outcome=\"{}\",target_type=\"{target}\",transfer_type=\"{tt}\"",
                        outcome.as_str()
                    ));
                }
            }
        }
        labels
    });
    let per_type = TARGET_VALUES.len() * Outcome::ALL.len();
    w.begin(
        "transfers_total",
        "counter",
        "Transfers ended, by type, target and outcome.",
    );
    for c in cbos {
        for (i, l) in slots.iter().enumerate() {
            let n = c.transfers[i].load(Relaxed);
            // Transfers whose `initiated` never came (the last type, or the last target)
            // have a series only once there is one.
            let (t, g) = (i / per_type, i % per_type / Outcome::ALL.len());
            let unknown = t == TYPE_VALUES.len() - 1 || g == TARGET_VALUES.len() - 1;
            if !unknown || n > 0 {
                w.int(
                    "transfers_total",
                    &[Label::Cbo(&c.label), Label::Fixed(l)],
                    n,
                );
            }
        }
    }
    w.end();

    let states = fixed("validation_state", || {
        labels_of("state", crate::validation::State::ALL.map(|s| s.as_str()))
    });
    w.begin(
        "validation_state",
        "gauge",
        "1 for the state of the CBO's latest post-deploy validation window (running, passed, failed, inconclusive), 0 for the others.",
    );
    for c in cbos {
        let v = c.validation.load(Relaxed) as usize;
        if v > 0 {
            for (i, l) in states.iter().enumerate() {
                w.int(
                    "validation_state",
                    &[Label::Cbo(&c.label), Label::Fixed(l)],
                    u64::from(i + 1 == v),
                );
            }
        }
    }
    w.end();

    w.begin(
        "workflow_config_ok",
        "gauge",
        "1 when the chat-transfer workflow configuration is sound, 0 when corrupted (SPEC §3).",
    );
    for c in cbos {
        match c.config.load(Relaxed) {
            0 => {}
            v => w.int(
                "workflow_config_ok",
                &[Label::Cbo(&c.label)],
                u64::from(v == 1),
            ),
        }
    }
    w.end();

    let problems = fixed("workflow_problem", || labels_of("problem", Corruption::IDS));
    w.begin(
        "workflow_problem",
        "gauge",
        "1 for each configuration-corruption case present now, by problem id.",
    );
    for c in cbos.iter().filter(|c| c.config.load(Relaxed) != 0) {
        let bits = c.problems.load(Relaxed);
        for (i, l) in problems.iter().enumerate() {
            w.int(
                "workflow_problem",
                &[Label::Cbo(&c.label), Label::Fixed(l)],
                u64::from(bits >> i & 1),
            );
        }
    }
    w.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_observed_at_once_fills_the_buckets_and_sum_one_by_one_would() {
        let values = [0.2, 1.0, 1.0001, 5.0, 7.5, 299.0, 301.0, f64::NAN, 2.5];
        let (one, all) = (
            Histogram::new(COMPLETION_BUCKETS),
            Histogram::new(COMPLETION_BUCKETS),
        );
        for v in values {
            one.observe(v);
        }
        all.observe_all(&values);
        let counts = |h: &Histogram| {
            h.buckets
                .iter()
                .map(|b| b.load(Relaxed))
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(&all), counts(&one));
        assert_eq!(counts(&all), [2, 2, 1, 1, 0, 0, 1, 1]);
        assert!(
            (all.sum() - one.sum()).abs() < 1e-9,
            "{} {}",
            all.sum(),
            one.sum()
        );
    }

    #[test]
    fn a_tally_adds_to_the_series_once_and_empties() {
        let m = Metrics::new();
        let c = m.init_cbo("a");
        let mut t = Tally::default();
        c.add(&mut t);
        let untouched = c.changed.load(Relaxed);
        t.transfer(Some(TransferType::Cold), None, Outcome::Completed);
        t.transfer(Some(TransferType::Cold), None, Outcome::Completed);
        t.error(ErrorClass::BadRequest);
        t.completion(TransferType::Warm, 12.0);
        t.notification(0.7);
        t.duplicate();
        t.history_lost();
        t.ingested(EventKind::Failed);
        c.add(&mut t);
        assert_eq!(c.changed.load(Relaxed), untouched + 1);
        let slot = transfer_slot(Some(TransferType::Cold), None, Outcome::Completed);
        assert_eq!(c.transfers[slot].load(Relaxed), 2);
        assert_eq!(c.errors[ErrorClass::BadRequest as usize].load(Relaxed), 1);
        assert_eq!(c.completion[TransferType::Warm as usize].count(), 1);
        assert_eq!(c.notification.count(), 1);
        assert_eq!(c.duplicate.load(Relaxed), 1);
        assert_eq!(c.history_lost.load(Relaxed), 1);
        assert_eq!(c.ingested[EventKind::Failed as usize].load(Relaxed), 1);
        // Emptied: adding it again changes nothing.
        c.add(&mut t);
        assert_eq!(c.transfers[slot].load(Relaxed), 2);
        assert_eq!(c.completion[TransferType::Warm as usize].count(), 1);
        assert_eq!(c.changed.load(Relaxed), untouched + 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_is_the_inf_bucket() {
        let m = Metrics::new();
        let c = m.init_cbo("a");
        for v in [0.4, 4.0, 5.0, 9.0, 500.0] {
            c.tallied(|t| t.completion(TransferType::Cold, v));
        }
        let text = m.render();
        let line = |s: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(s)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {s}"))
                .to_string()
        };
        let b =
            "transfer_guard_transfer_completion_seconds_bucket{cbo=\"a\",transfer_type=\"cold\",";
        assert_eq!(line(&format!("{b}le=\"1\"}}")), "1");
        assert_eq!(line(&format!("{b}le=\"5\"}}")), "3");
        assert_eq!(line(&format!("{b}le=\"10\"}}")), "4");
        assert_eq!(line(&format!("{b}le=\"+Inf\"}}")), "5");
        assert_eq!(
            line(
                "transfer_guard_transfer_completion_seconds_count{cbo=\"a\",transfer_type=\"cold\"}"
            ),
            "5"
        );
        assert_eq!(
            line(
                "transfer_guard_transfer_completion_seconds_sum{cbo=\"a\",transfer_type=\"cold\"}"
            ),
            "518.4"
        );
    }

    #[test]
    fn absent_gauges_have_no_series_and_empty_families_no_header() {
        let m = Metrics::new();
        let c = m.init_cbo("a");
        let text = m.render();
        assert!(!text.contains("transfer_guard_success_ratio"));
        assert!(!text.contains("transfer_guard_validation_state"));
        assert!(!text.contains("transfer_guard_workflow_config_ok"));
        assert!(text.contains(
            "transfer_guard_actions_total{action=\"rollback\",cbo=\"a\",integration=\"serverless\",result=\"fired\"} 0\n"
        ), "every combination is there from the start");
        assert!(text.contains(
            "transfer_guard_rule_state{cbo=\"a\",rule=\"success_rate\",state=\"ok\"} 1\n"
        ));
        c.set_success_ratio(0, Some(0.5));
        c.set_rule_state(RuleId::SuccessRate, RuleState::Breached);
        assert!(c.action("rollback", "serverless", "fired"));
        let text = m.render();
        assert!(text.contains("transfer_guard_success_ratio{cbo=\"a\",window=\"5m\"} 0.5\n"));
        assert!(text.contains(
            "transfer_guard_rule_state{cbo=\"a\",rule=\"success_rate\",state=\"ok\"} 0\n"
        ));
        assert!(text.contains(
            "transfer_guard_rule_state{cbo=\"a\",rule=\"success_rate\",state=\"breached\"} 1\n"
        ));
        assert!(text.contains(
            "transfer_guard_actions_total{action=\"rollback\",cbo=\"a\",integration=\"serverless\",result=\"fired\"} 1\n"
        ));
        c.set_success_ratio(0, None);
        assert!(!m.render().contains("transfer_guard_success_ratio"));
    }

    #[test]
    fn rejections_of_no_cbo_and_of_a_cbo_are_both_counted() {
        let m = Metrics::new();
        m.init_cbo("a");
        m.reject("", Reject::UnknownCbo);
        m.reject("a", Reject::TooOld);
        m.reject("a", Reject::TooOld);
        let text = m.render();
        assert!(text.contains(
            "transfer_guard_events_rejected_total{cbo=\"\",reason=\"unauthorized\"} 0\n"
        ));
        assert!(
            text.contains(
                "transfer_guard_events_rejected_total{cbo=\"\",reason=\"unknown_cbo\"} 1\n"
            )
        );
        assert!(
            text.contains("transfer_guard_events_rejected_total{cbo=\"a\",reason=\"too_old\"} 2\n")
        );
    }

    /// `render_gzip` unzipped is `render`, but for the process's own gauges (memory, CPU),
    /// which move between the two.
    fn same(m: &Metrics, why: &str) {
        use std::io::Read;
        let mut zipped = String::new();
        flate2::read::GzDecoder::new(&m.render_gzip()[..])
            .read_to_string(&mut zipped)
            .unwrap();
        let text = m.render();
        let steady = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.contains("process_"))
                .map(str::to_string)
                .collect()
        };
        let (a, b) = (steady(&zipped), steady(&text));
        if let Some(i) = (0..a.len().max(b.len())).find(|i| a.get(*i) != b.get(*i)) {
            panic!(
                "{why}: line {i} of the gzipped scrape is {:?}, of the text {:?}",
                a.get(i),
                b.get(i)
            );
        }
        // Each family once, each series once, and a family's series together after its
        // header (a family in two parts is still one run of lines).
        let mut seen = std::collections::HashSet::new();
        let (mut families, mut current) = (std::collections::HashSet::new(), String::new());
        for line in text.lines().filter(|l| !l.starts_with("# HELP")) {
            if let Some(typed) = line.strip_prefix("# TYPE ") {
                current = typed.split(' ').next().unwrap().to_string();
                assert!(families.insert(current.clone()), "{why}: {current} twice");
                continue;
            }
            let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
            assert!(seen.insert(series.to_string()), "{why}: {line:?} twice");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            assert_eq!(family, current, "{why}: {line:?} outside its family");
        }
    }

    /// Every method that changes a CBO's series, one at a time, each followed by a scrape:
    /// the cache skips a block only when its CBOs said nothing changed (`touch`), so a method
    /// that forgets to say so shows a stale series here (and panics in `check_untouched`).
    #[test]
    fn every_change_of_a_cbos_series_reaches_the_cached_scrape() {
        use crate::rules::{RuleId, RuleState};
        let m = Metrics::new();
        let keys: Vec<String> = (0..4 * BLOCK).map(|i| format!("c{i:03}")).collect();
        for k in &keys {
            m.init_cbo(k);
        }
        same(&m, "the first");
        let c = m.cbo(&keys[77]).unwrap();
        type Change<'a> = (&'a str, Box<dyn Fn() + 'a>);
        let changes: Vec<Change> = vec![
            (
                "seen",
                Box::new(|| c.tallied(|t| t.seen(crate::event::Source::EventStreams))),
            ),
            (
                "disagreement",
                Box::new(|| {
                    c.tallied(|t| t.disagreement(crate::reconcile::Disagreement::ALL[1], 2))
                }),
            ),
            (
                "source_poll",
                Box::new(|| c.source_poll("twilio_alerts", PollResult::RateLimited)),
            ),
            (
                "bad_request_signal",
                Box::new(|| c.bad_request_signal(crate::state::SignalSource::TwilioAlerts)),
            ),
            ("push", Box::new(|| c.push("event_streams", "malformed"))),
            (
                "reservation_failure",
                Box::new(|| c.reservation_failure(false)),
            ),
            ("twilio_alert", Box::new(|| c.twilio_alert("45001"))),
            ("reject", Box::new(|| assert!(c.reject(Reject::TooOld)))),
            (
                "ingested",
                Box::new(|| c.tallied(|t| t.ingested(EventKind::Failed))),
            ),
            ("duplicate", Box::new(|| c.tallied(Tally::duplicate))),
            ("evicted", Box::new(|| c.tallied(Tally::evicted))),
            ("probe", Box::new(|| c.probe("routed", Some(2.5)))),
            ("agent_report", Box::new(|| c.agent_report())),
            ("history_lost", Box::new(|| c.tallied(Tally::history_lost))),
            (
                "transfer",
                Box::new(|| {
                    c.tallied(|t| t.transfer(Some(TransferType::Warm), None, Outcome::TimedOut))
                }),
            ),
            (
                "error",
                Box::new(|| c.tallied(|t| t.error(ErrorClass::AgentUnavailable))),
            ),
            (
                "completion",
                Box::new(|| c.tallied(|t| t.completion(TransferType::Warm, 12.0))),
            ),
            (
                "notification",
                Box::new(|| c.tallied(|t| t.notification(0.7))),
            ),
            (
                "set_success_ratio",
                Box::new(|| c.set_success_ratio(1, Some(0.5))),
            ),
            ("set_open", Box::new(|| c.set_open(3))),
            ("poll", Box::new(|| c.poll(PollResult::ServerError, 1.0))),
            (
                "set_last_success",
                Box::new(|| c.set_last_success(1_800_000_000_000)),
            ),
            (
                "taskrouter_bad_request",
                Box::new(|| c.taskrouter_bad_request()),
            ),
            (
                "set_statistics",
                Box::new(|| c.set_statistics([5, 4, 1, 0], [4, 1, 0], Some(0.1))),
            ),
            (
                "set_tasks_in_workflow",
                Box::new(|| c.set_tasks_in_workflow(2)),
            ),
            (
                "set_config",
                Box::new(|| c.set_config(false, |id| id == Corruption::IDS[3])),
            ),
            (
                "set_config_mismatch",
                Box::new(|| c.set_config_mismatch(true)),
            ),
            (
                "set_rule_state",
                Box::new(|| c.set_rule_state(RuleId::ALL[2], RuleState::Breached)),
            ),
            (
                "action",
                Box::new(|| assert!(c.action("disable", "switch", "fired"))),
            ),
            ("set_disabled", Box::new(|| c.set_disabled(true))),
            (
                "set_validation",
                Box::new(|| c.set_validation(crate::validation::State::Failed)),
            ),
        ];
        for (what, change) in &changes {
            let before = m.render();
            change();
            assert_ne!(m.render(), before, "{what} changed no series");
            same(&m, what);
        }
    }

    #[test]
    fn the_gzipped_scrape_is_the_text_scrape_after_any_change_its_cache_keeps_nothing_stale() {
        let m = Metrics::new();
        // More CBOs than one block, so some blocks change and others are kept.
        let keys: Vec<String> = (0..6 * BLOCK + 10).map(|i| format!("c{i:03}")).collect();
        for k in &keys {
            m.init_cbo(k);
        }
        m.reject("nobody", Reject::Unauthorized);
        same(&m, "the first");
        same(&m, "from the cache alone");

        let c = |i: usize| m.cbo(&keys[i]).unwrap();
        // A counter, a histogram, a series that appears, labels that appear, a state.
        c(3).tallied(|t| t.ingested(EventKind::Initiated));
        c(60).tallied(|t| t.completion(TransferType::Cold, 4.2));
        c(61).set_success_ratio(0, Some(0.93));
        c(62).twilio_alert("20001");
        c(150).set_rule_state(RuleId::SuccessRate, RuleState::Breached);
        same(&m, "changes");
        // Polls: the `ok` part of the pollers' families alone, then a failure in the other.
        for i in 0..keys.len() {
            c(i).poll(PollResult::Ok, 0.2);
            c(i).source_poll("serverless_logs", PollResult::Ok);
        }
        same(&m, "every CBO polled");
        c(31).poll(PollResult::RateLimited, 0.2);
        c(131).source_poll("twilio_alerts", PollResult::Timeout);
        same(&m, "a failed poll");
        assert!(m.render().contains(
            r#"transfer_guard_source_polls_total{cbo="c131",source="twilio_alerts",result="timeout"} 1"#
        ));
        // A series that goes, and another label of the same family.
        c(61).set_success_ratio(0, None);
        c(62).twilio_alert("20404");
        same(&m, "a series gone, a label added");
        // A CBO removed and one added with the same key: other series, other blocks.
        m.remove_cbo(&keys[100]);
        m.init_cbo("c100b");
        let again = m.init_cbo(&keys[5]);
        again.agent_report();
        same(&m, "CBOs removed and added");
        m.remove_cbo(&keys[5]);
        m.init_cbo(&keys[5]);
        same(&m, "the new series of a key is not the old one's");
        assert!(
            m.render()
                .contains(r#"transfer_guard_agent_reports_total{cbo="c005"} 0"#)
        );
    }
}
