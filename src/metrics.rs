//! Every exported Prometheus metric, named once (SPEC §8): per-CBO series in fixed arrays, written straight to the text format.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::event::{ErrorClass, EventKind, TargetType, TransferType};
use crate::health::Corruption;
use crate::rules::{RuleId, RuleState};
use crate::tracker::Outcome;
use crate::twilio::PollResult;

pub const NAMESPACE: &str = "transfer_guard";

/// Completion buckets: the seed's 10 s cold-transfer bound and 5 s among them.
pub const COMPLETION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Notification buckets: the seed's 5 s bound among them.
pub const NOTIFICATION_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
];
/// Probe routing buckets: the 10 s a test transfer has to be routed among them.
pub const PROBE_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0];
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
}

/// A gauge that may be absent (no series): f64 bits, NaN for absent.
struct MaybeGauge(AtomicU64);

impl MaybeGauge {
    fn absent() -> MaybeGauge {
        MaybeGauge(AtomicU64::new(f64::NAN.to_bits()))
    }
    fn set(&self, v: Option<f64>) {
        self.0.store(v.unwrap_or(f64::NAN).to_bits(), Relaxed);
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

/// Every per-CBO series of one CBO.
pub struct CboSeries {
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
    poll_seconds: Histogram,
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
}

/// The sources transfer-guard polls itself (SPEC §2b), in `source_polls_total`'s order.
pub const POLLED_SOURCES: [&str; 3] = ["taskrouter_events", "serverless_logs", "twilio_alerts"];
/// The push receivers and what became of a push.
pub const PUSH_SOURCES: [&str; 2] = ["taskrouter_callback", "event_streams"];
pub const PUSH_RESULTS: [&str; 3] = ["accepted", "bad_signature", "malformed"];
/// Distinct debugger error codes counted per CBO; the rest count as `other`.
const ALERT_CODES_KEPT: usize = 32;

impl CboSeries {
    fn new(key: &str) -> CboSeries {
        CboSeries {
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
            poll_seconds: Histogram::new(POLL_BUCKETS),
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
        }
    }

    /// A source reported a transfer for the first time.
    pub fn seen(&self, source: crate::event::Source) {
        if let Some(i) = crate::event::Source::SEEING
            .iter()
            .position(|s| *s == source)
        {
            self.seen[i].fetch_add(1, Relaxed);
        }
    }

    pub fn disagreement(&self, kind: crate::reconcile::Disagreement, n: u32) {
        self.disagreements[kind as usize].fetch_add(u64::from(n), Relaxed);
    }

    /// One poll of `source` (one of `POLLED_SOURCES`).
    pub fn source_poll(&self, source: &str, result: PollResult) {
        if let Some(i) = POLLED_SOURCES.iter().position(|s| *s == source) {
            self.source_polls[i * PollResult::ALL.len() + result as usize].fetch_add(1, Relaxed);
        }
    }

    pub fn bad_request_signal(&self, source: crate::state::SignalSource) {
        self.signals[source as usize].fetch_add(1, Relaxed);
    }

    /// One push to a receiver (one of `PUSH_SOURCES`) with its result (one of `PUSH_RESULTS`).
    pub fn push(&self, source: &str, result: &str) {
        let s = PUSH_SOURCES.iter().position(|x| *x == source);
        let r = PUSH_RESULTS.iter().position(|x| *x == result);
        if let (Some(s), Some(r)) = (s, r) {
            self.pushes[s * PUSH_RESULTS.len() + r].fetch_add(1, Relaxed);
        }
    }

    /// A reservation rejected (`false`: timed out): a failed attempt, not an outcome.
    pub fn reservation_failure(&self, rejected: bool) {
        self.reservation_failures[usize::from(!rejected)].fetch_add(1, Relaxed);
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
    }

    /// Counts a rejection of one of the `Reject::PER_CBO` reasons; false for the others.
    pub fn reject(&self, reason: Reject) -> bool {
        let slot = Reject::PER_CBO.iter().position(|r| *r == reason);
        if let Some(i) = slot {
            self.rejected[i].fetch_add(1, Relaxed);
        }
        slot.is_some()
    }

    pub fn ingested(&self, kind: EventKind) {
        self.ingested[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn duplicate(&self) {
        self.duplicate.fetch_add(1, Relaxed);
    }

    pub fn evicted(&self) {
        self.evicted.fetch_add(1, Relaxed);
    }

    /// One test transfer's result (one of `PROBE_RESULTS`), and its routing time when routed.
    pub fn probe(&self, result: &str, routing_secs: Option<f64>) {
        if let Some(i) = PROBE_RESULTS.iter().position(|r| *r == result) {
            self.probes[i].fetch_add(1, Relaxed);
        }
        if let Some(secs) = routing_secs {
            self.probe_routing.observe(secs);
        }
    }

    pub fn agent_report(&self) {
        self.agent_reports.fetch_add(1, Relaxed);
    }

    pub fn history_lost(&self) {
        self.history_lost.fetch_add(1, Relaxed);
    }

    pub fn transfer(&self, tt: Option<TransferType>, target: Option<TargetType>, o: Outcome) {
        self.transfers[transfer_slot(tt, target, o)].fetch_add(1, Relaxed);
    }

    pub fn error(&self, class: ErrorClass) {
        self.errors[class as usize].fetch_add(1, Relaxed);
    }

    pub fn completion(&self, tt: TransferType, secs: f64) {
        self.completion[tt as usize].observe(secs);
    }

    pub fn notification(&self, secs: f64) {
        self.notification.observe(secs);
    }

    pub fn set_success_ratio(&self, window: usize, ratio: Option<f64>) {
        self.success_ratio[window].set(ratio);
    }

    pub fn set_open(&self, n: usize) {
        self.open.store(n as u64, Relaxed);
    }

    pub fn poll(&self, result: PollResult, seconds: f64) {
        self.polls[result as usize].fetch_add(1, Relaxed);
        self.poll_seconds.observe(seconds);
    }

    pub fn set_last_success(&self, at_ms: i64) {
        self.last_poll_ok_ms.store(at_ms, Relaxed);
    }

    pub fn taskrouter_bad_request(&self) {
        self.taskrouter_bad_requests.fetch_add(1, Relaxed);
    }

    /// The workflow's cumulative statistics: tasks and reservations by kind (in the order of
    /// `TASK_KINDS` and `RESERVATION_KINDS`) and the error ratio.
    pub fn set_statistics(&self, tasks: [i64; 4], reservations: [i64; 3], ratio: Option<f64>) {
        for (slot, n) in self.tasks.iter().zip(tasks) {
            slot.store(n as u64, Relaxed);
        }
        for (slot, n) in self.reservations.iter().zip(reservations) {
            slot.store(n as u64, Relaxed);
        }
        self.taskrouter_error_ratio.set(ratio);
        self.statistics.store(1, Relaxed);
    }

    pub fn set_tasks_in_workflow(&self, n: i64) {
        self.tasks_in_workflow.store(n.max(i64::MIN + 1), Relaxed);
    }

    /// The configuration check: sound or not, and which `Corruption::IDS` are present.
    pub fn set_config(&self, ok: bool, present: impl Fn(&str) -> bool) {
        let bits = Corruption::IDS
            .iter()
            .enumerate()
            .filter(|(_, id)| present(id))
            .fold(0u16, |b, (i, _)| b | 1 << i);
        self.problems.store(bits, Relaxed);
        self.config.store(if ok { 1 } else { 2 }, Relaxed);
    }

    pub fn set_config_mismatch(&self, mismatch: bool) {
        self.config_mismatch.store(u8::from(mismatch), Relaxed);
    }

    pub fn set_rule_state(&self, rule: RuleId, state: RuleState) {
        self.rule_state[rule as usize].store(state as u8, Relaxed);
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
            return true;
        }
        debug_assert!(
            false,
            "no actions_total series {action}/{integration}/{result}"
        );
        false
    }

    pub fn set_disabled(&self, disabled: bool) {
        self.disabled.store(u8::from(disabled), Relaxed);
    }

    pub fn set_validation(&self, state: crate::validation::State) {
        self.validation.store(1 + state as u8, Relaxed);
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
    /// `config_reloads_total{result}`: `applied` or `refused`.
    reloads: prometheus::IntCounterVec,
    /// `config_last_reload_successful`: 0 while the file on disk is one the daemon refused.
    reload_ok: prometheus::IntGauge,
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
            reloads,
            reload_ok,
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

    /// The series of `cbo`, created (at zero) on first use.
    pub fn init_cbo(&self, cbo: &str) -> Arc<CboSeries> {
        if let Some(s) = self.cbo(cbo) {
            return s;
        }
        let mut cbos = self.cbos.write().unwrap_or_else(|p| p.into_inner());
        cbos.entry(cbo.to_string())
            .or_insert_with(|| Arc::new(CboSeries::new(cbo)))
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
        let cbos: Vec<Arc<CboSeries>> = {
            let cbos = self.cbos.read().unwrap_or_else(|p| p.into_inner());
            cbos.values().cloned().collect()
        };
        let mut w = Writer::new(cbos.len() * 12_000 + 4096);
        render_cbos(&mut w, &cbos, self);
        let mut buf = w.out;
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The text format, written straight into one buffer.
struct Writer {
    out: Vec<u8>,
    int: itoa::Buffer,
    /// Where the current family's header starts, and whether it has a series yet.
    family: (usize, bool),
}

impl Writer {
    fn new(capacity: usize) -> Writer {
        Writer {
            out: Vec::with_capacity(capacity),
            int: itoa::Buffer::new(),
            family: (0, false),
        }
    }

    fn begin(&mut self, name: &str, kind: &str, help: &str) {
        self.family = (self.out.len(), false);
        for part in ["# HELP ", NAMESPACE, "_", name, " ", help, "\n# TYPE "] {
            self.out.extend_from_slice(part.as_bytes());
        }
        for part in [NAMESPACE, "_", name, " ", kind, "\n"] {
            self.out.extend_from_slice(part.as_bytes());
        }
    }

    /// Drops the header of a family that got no series.
    fn end(&mut self) {
        if !self.family.1 {
            self.out.truncate(self.family.0);
        }
    }

    /// `transfer_guard_<name><suffix>{<labels…>} ` (the value follows).
    fn start(&mut self, name: &str, suffix: &str, labels: &[&str]) {
        self.family.1 = true;
        for part in [NAMESPACE, "_", name, suffix, "{"] {
            self.out.extend_from_slice(part.as_bytes());
        }
        for part in labels {
            self.out.extend_from_slice(part.as_bytes());
        }
        self.out.extend_from_slice(b"} ");
    }

    fn int(&mut self, name: &str, labels: &[&str], v: u64) {
        self.start(name, "", labels);
        self.u64(v);
    }

    fn u64(&mut self, v: u64) {
        let s = self.int.format(v);
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'\n');
    }

    fn i64(&mut self, v: i64) {
        let s = self.int.format(v);
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'\n');
    }

    fn f64(&mut self, v: f64) {
        use std::io::Write;
        if v.is_infinite() {
            let s: &[u8] = if v > 0.0 { b"+Inf\n" } else { b"-Inf\n" };
            self.out.extend_from_slice(s);
        } else {
            let _ = writeln!(self.out, "{v}");
        }
    }

    /// One histogram's `_bucket`, `_sum` and `_count` lines; `labels` end with a comma.
    fn histogram(&mut self, name: &str, labels: &[&str], h: &Histogram, les: &[String]) {
        let mut labels_le: Vec<&str> = labels.to_vec();
        labels_le.push("");
        let last = labels_le.len() - 1;
        let mut cumulative = 0;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            labels_le[last] = &les[i];
            self.start(name, "_bucket", &labels_le);
            self.u64(cumulative);
        }
        self.start(name, "_sum", labels);
        self.f64(h.sum());
        self.start(name, "_count", labels);
        self.u64(cumulative);
    }
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
        w.int(name, &[&c.label], value(c));
    }
    w.end();
}

/// A family with one series per CBO and value of `label`, read from an array of counters in
/// the order of `values`.
fn per_cbo_and<'a>(
    w: &mut Writer,
    cbos: &'a [Arc<CboSeries>],
    (name, kind, help): (&str, &str, &str),
    (label, values): (&str, &[&str]),
    counters: impl Fn(&'a CboSeries) -> &'a [AtomicU64],
) {
    let labels = labels_of(label, values.iter().copied());
    w.begin(name, kind, help);
    for c in cbos {
        for (l, n) in labels.iter().zip(counters(c)) {
            w.int(name, &[&c.label, l], n.load(Relaxed));
        }
    }
    w.end();
}

fn render_cbos(w: &mut Writer, cbos: &[Arc<CboSeries>], metrics: &Metrics) {
    let mut action_labels = Vec::new();
    for (action, integration) in ACTION_SERIES {
        for result in ACTION_RESULTS {
            action_labels.push((
                format!("action=\"{action}\","),
                format!(",integration=\"{integration}\",result=\"{result}\""),
            ));
        }
    }
    w.begin(
        "actions_total",
        "counter",
        "Actions by action (rollback, disable, alert), integration and result (fired, dry_run, failed, suppressed); every combination from the start.",
    );
    for c in cbos {
        for ((a, ir), n) in action_labels.iter().zip(&c.actions) {
            w.int("actions_total", &[a, &c.label, ir], n.load(Relaxed));
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

    let les = le_labels(NOTIFICATION_BUCKETS);
    w.begin(
        "agent_notification_seconds",
        "histogram",
        "Time from initiated to the target agent's reservation (notified).",
    );
    for c in cbos {
        w.histogram(
            "agent_notification_seconds",
            &[&c.label],
            &c.notification,
            &les,
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

    if let Some(h) = metrics.log_health.get() {
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

    let reasons = labels_of("reason", Reject::PER_CBO.map(|r| r.as_str()));
    w.begin(
        "events_rejected_total",
        "counter",
        "Transfer events or requests rejected, by reason (cbo empty when unauthenticated).",
    );
    let other = metrics
        .other_rejects
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for ((cbo, reason), n) in other {
        let (c, r) = (
            format!("cbo=\"{}\"", escape(&cbo)),
            format!(",reason=\"{}\"", reason.as_str()),
        );
        w.int("events_rejected_total", &[&c, &r], n);
    }
    for c in cbos {
        for (i, l) in reasons.iter().enumerate() {
            w.int(
                "events_rejected_total",
                &[&c.label, l],
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

    let les = le_labels(PROBE_BUCKETS);
    w.begin(
        "probe_routing_seconds",
        "histogram",
        "Time TaskRouter took to route a test transfer to its queue.",
    );
    for c in cbos {
        w.histogram("probe_routing_seconds", &[&c.label], &c.probe_routing, &les);
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

    let mut rule_labels = Vec::new();
    for rule in RuleId::ALL {
        for state in RuleState::ALL {
            rule_labels.push(format!(
                ",rule=\"{}\",state=\"{}\"",
                rule.as_str(),
                state.as_str()
            ));
        }
    }
    w.begin(
        "rule_state",
        "gauge",
        "1 for each rule's current state (ok, pending, breached, inconclusive), 0 for the others.",
    );
    for c in cbos {
        for (r, states) in rule_labels.chunks(4).enumerate() {
            let current = c.rule_state[r].load(Relaxed) as usize;
            for (s, l) in states.iter().enumerate() {
                w.int("rule_state", &[&c.label, l], u64::from(s == current));
            }
        }
    }
    w.end();

    let windows = labels_of("window", RATIO_WINDOWS.map(|(n, _)| n));
    w.begin(
        "success_ratio",
        "gauge",
        "completed / (completed + failed + timed_out) over the trailing window, in event time; absent without transfers.",
    );
    for c in cbos {
        for (i, l) in windows.iter().enumerate() {
            if let Some(r) = c.success_ratio[i].get() {
                w.start("success_ratio", "", &[&c.label, l]);
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
            w.start("taskrouter_error_ratio", "", &[&c.label]);
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
            w.start("taskrouter_last_success_timestamp_seconds", "", &[&c.label]);
            w.f64(ms as f64 / 1000.0);
        }
    }
    w.end();

    let les = le_labels(POLL_BUCKETS);
    w.begin(
        "taskrouter_poll_duration_seconds",
        "histogram",
        "Time one poll cycle took, retries included.",
    );
    for c in cbos.iter().filter(|c| c.poll_seconds.count() > 0) {
        w.histogram(
            "taskrouter_poll_duration_seconds",
            &[&c.label],
            &c.poll_seconds,
            &les,
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

    let mut poll_labels = Vec::new();
    for source in POLLED_SOURCES {
        for result in PollResult::ALL {
            poll_labels.push(format!(
                ",source=\"{source}\",result=\"{}\"",
                result.as_str()
            ));
        }
    }
    w.begin(
        "source_polls_total",
        "counter",
        "Polls of Twilio's record (taskrouter_events, serverless_logs, twilio_alerts), by result.",
    );
    for c in cbos {
        for (l, n) in poll_labels.iter().zip(&c.source_polls) {
            w.int("source_polls_total", &[&c.label, l], n.load(Relaxed));
        }
    }
    w.end();

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

    let mut push_labels = Vec::new();
    for source in PUSH_SOURCES {
        for result in PUSH_RESULTS {
            push_labels.push(format!(",source=\"{source}\",result=\"{result}\""));
        }
    }
    w.begin(
        "pushes_total",
        "counter",
        "Requests Twilio pushed (taskrouter_callback, event_streams), by result: accepted, bad_signature (answered 403), malformed.",
    );
    for c in cbos {
        for (l, n) in push_labels.iter().zip(&c.pushes) {
            w.int("pushes_total", &[&c.label, l], n.load(Relaxed));
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
            w.int("twilio_alerts_total", &[&c.label, &code], n);
        }
    }
    w.end();

    per_cbo_and(
        w,
        cbos,
        (
            "taskrouter_polls_total",
            "counter",
            "TaskRouter poll cycles, by result (ok, or the class of the first failure).",
        ),
        ("result", &PollResult::ALL.map(|r| r.as_str())),
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
        let kinds = labels_of("kind", kinds.iter().copied());
        w.begin(name, "gauge", help);
        for c in cbos.iter().filter(|c| c.statistics.load(Relaxed) == 1) {
            for (l, v) in kinds.iter().zip(values(c)) {
                w.start(name, "", &[&c.label, l]);
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
            w.start("taskrouter_tasks_in_workflow", "", &[&c.label]);
            w.i64(n);
        }
    }
    w.end();

    let les = le_labels(COMPLETION_BUCKETS);
    let types = labels_of("transfer_type", ["cold", "warm"]);
    w.begin(
        "transfer_completion_seconds",
        "histogram",
        "Time from initiated to completed.",
    );
    for c in cbos {
        for (h, tt) in c.completion.iter().zip(&types) {
            w.histogram("transfer_completion_seconds", &[&c.label, tt], h, &les);
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

    let mut slots = Vec::new();
    for (t, tt) in TYPE_VALUES.iter().enumerate() {
        for (g, target) in TARGET_VALUES.iter().enumerate() {
            for outcome in Outcome::ALL {
                slots.push((
                    t == 2 || g == 2,
                    format!(
                        ",outcome=\"{}\",target_type=\"{target}\",transfer_type=\"{tt}\"",
                        outcome.as_str()
                    ),
                ));
            }
        }
    }
    w.begin(
        "transfers_total",
        "counter",
        "Transfers ended, by type, target and outcome.",
    );
    for c in cbos {
        for (i, (unknown, l)) in slots.iter().enumerate() {
            let n = c.transfers[i].load(Relaxed);
            // Transfers whose `initiated` never came have a series only once there is one.
            if !unknown || n > 0 {
                w.int("transfers_total", &[&c.label, l], n);
            }
        }
    }
    w.end();

    let states = labels_of("state", crate::validation::State::ALL.map(|s| s.as_str()));
    w.begin(
        "validation_state",
        "gauge",
        "1 for the state of the CBO's latest post-deploy validation window (running, passed, failed, inconclusive), 0 for the others.",
    );
    for c in cbos {
        let v = c.validation.load(Relaxed) as usize;
        if v > 0 {
            for (i, l) in states.iter().enumerate() {
                w.int("validation_state", &[&c.label, l], u64::from(i + 1 == v));
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
            v => w.int("workflow_config_ok", &[&c.label], u64::from(v == 1)),
        }
    }
    w.end();

    let problems = labels_of("problem", Corruption::IDS);
    w.begin(
        "workflow_problem",
        "gauge",
        "1 for each configuration-corruption case present now, by problem id.",
    );
    for c in cbos.iter().filter(|c| c.config.load(Relaxed) != 0) {
        let bits = c.problems.load(Relaxed);
        for (i, l) in problems.iter().enumerate() {
            w.int("workflow_problem", &[&c.label, l], u64::from(bits >> i & 1));
        }
    }
    w.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_is_the_inf_bucket() {
        let m = Metrics::new();
        let c = m.init_cbo("a");
        for v in [0.4, 4.0, 5.0, 9.0, 500.0] {
            c.completion(TransferType::Cold, v);
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
        assert_eq!(line(&format!("{b}le=\"0.5\"}}")), "1");
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
}
