//! Per-CBO state (tracker and windows behind one lock) and the fleet of CBOs: events in, effects to metrics and windows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, FUTURE_TOLERANCE};
use crate::event::{ErrorClass, Event};
use crate::health::TaskRouterStatus;
use crate::journal::{self, Journal, Op, Record};
use crate::metrics::{CboSeries, Metrics, RATIO_WINDOWS, Reject, Tally};
use crate::reconcile::{Counted, Disagreement, JOIN_WINDOW_MS, Reconciler, Route};
use crate::sid::ConversationSid;
use crate::tracker::{Effect, Tracker};
use crate::window::{WindowStats, Windows};

/// Why one event of a batch was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub reason: Reject,
    pub error: String,
}

struct Inner {
    tracker: Tracker,
    windows: Windows,
    effects: Vec<Effect>,
    /// The last minute of effects (bounded), so a deployment seen a little after it took
    /// effect is judged from its exact instant: the windows are rebuilt from these.
    /// (arrived, transfer started, effect), in arrival order.
    recent: VecDeque<(i64, i64, Effect)>,
    /// The latest arrival dropped from `recent`.
    pruned_until_ms: i64,
    /// Transfers initiated before this instant belong to an earlier deployment: they count in
    /// the metrics, never in the windows that rules and validation windows read.
    judged_since_ms: i64,
    /// The newest failed transfers (at most `FAILING_KEPT`), for the evidence on-call hands
    /// Connie Support: conversation SID and error.
    failing: VecDeque<Failing>,
    reports: VecDeque<Report>,
    /// Test transfers: (started, routed), the newest `PROBES_KEPT`.
    probes: VecDeque<(i64, bool)>,
    /// Joins the sources that report one transfer (SPEC §2b).
    reconciler: Reconciler,
    /// Changes to the series not yet added to them (`CboSeries::add`, once a batch).
    tally: Tally,
    /// Bad Requests seen outside a transfer event (the functions' logs, the debugger), the
    /// last `SIGNALS_SPAN_MS`, so one Bad Request reported by several sources counts once.
    signals: VecDeque<Signal>,
}

/// One Bad Request reported by the functions' logs or Twilio's debugger.
#[derive(Debug)]
struct Signal {
    at_ms: i64,
    conversation: Option<ConversationSid>,
    /// Bit per `SignalSource` that reported it.
    sources: u8,
    /// Counted in the windows as a Bad Request of its own (not yet known to be a transfer's).
    counted: bool,
}

const SIGNALS_SPAN_MS: i64 = 600_000;
/// The `Signal::sources` bit of a transfer event's own Bad Request.
const TRANSFER_REPORTED: u8 = 1 << 7;
const SIGNALS_MAX: usize = 1024;

/// Where a Bad Request outside a transfer event was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalSource {
    ServerlessLogs,
    TwilioAlerts,
}

impl SignalSource {
    pub const ALL: [SignalSource; 2] = [SignalSource::ServerlessLogs, SignalSource::TwilioAlerts];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalSource::ServerlessLogs => "serverless_logs",
            SignalSource::TwilioAlerts => "twilio_alerts",
        }
    }
}

const PROBES_KEPT: usize = 200;

/// An agent's report of a failing transfer (`POST /v1/reports`): the seed's "agent reports of
/// consistent failures".
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub conversation_sid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
}

/// Reports kept per CBO (the newest), for `cross_cbo` and its evidence.
const REPORTS_KEPT: usize = 100;

/// Failed transfers kept per CBO for evidence.
const FAILING_KEPT: usize = 50;
/// Failed transfers named in one decision's evidence.
pub const FAILING_SHOWN: usize = 10;

/// One failed transfer, as the seed's escalation asks for it ("conversation SID and error
/// details").
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failing {
    pub conversation_sid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
    pub error: String,
}

/// How far back `recent` reaches (two polls), and how many effects it holds at most. A cut older than
/// what it still holds starts at the oldest effect it has (never earlier: old evidence stays
/// out).
const RECENT_SPAN_MS: i64 = 30_000;
const RECENT_MAX: usize = 4096;

pub struct CboState {
    pub key: String,
    inner: Mutex<Inner>,
    taskrouter: Mutex<TaskRouterStatus>,
    series: Arc<CboSeries>,
    max_window_ms: i64,
    max_window: Duration,
    /// Where what it takes is journaled (`None` while a start replays the journal).
    journal: Option<Arc<Journal>>,
}

impl CboState {
    fn new(
        key: &str,
        config: &Config,
        metrics: &Metrics,
        journal: Option<Arc<Journal>>,
    ) -> CboState {
        let series = metrics.init_cbo(key);
        CboState {
            key: key.to_string(),
            inner: Mutex::new(Inner {
                tracker: Tracker::new(config.transfers.timeout, config.transfers.max_open),
                windows: Windows::new(config.transfers.max_window),
                effects: Vec::new(),
                recent: VecDeque::new(),
                failing: VecDeque::new(),
                reports: VecDeque::new(),
                probes: VecDeque::new(),
                reconciler: Reconciler::new(config.transfers.max_open),
                tally: Tally::default(),
                signals: VecDeque::new(),
                pruned_until_ms: i64::MIN,
                judged_since_ms: i64::MIN,
            }),
            taskrouter: Mutex::new(TaskRouterStatus {
                transfer_timeout: crate::health::TransferTimeout {
                    seconds: config.transfers.timeout.as_secs(),
                    source: "transfers.timeout",
                },
                ..TaskRouterStatus::default()
            }),
            series,
            max_window_ms: config.transfers.max_window.as_millis() as i64,
            max_window: config.transfers.max_window,
            journal,
        }
    }

    /// Journals `op`, taken at `now_ms` (called with the CBO's lock held, so its records are
    /// in the order it took them).
    fn journal(&self, now_ms: i64, op: impl FnOnce() -> Op) {
        if let Some(j) = &self.journal {
            let mut line = Vec::with_capacity(256);
            journal::encode(
                &Record {
                    cbo: self.key.clone(),
                    now: now_ms,
                    op: op(),
                },
                &mut line,
            );
            j.append(now_ms, &line);
        }
    }

    /// Applies one journaled record, as the daemon did when it took it.
    pub fn replay(&self, record: Record) -> Result<(), String> {
        self.replay_as(record, true)
    }

    /// `replay`; `journaled` false for what the store of replicas keeps (pushed events, agents'
    /// reports, test transfers): a restart reads those from the store again.
    fn replay_as(&self, record: Record, journaled: bool) -> Result<(), String> {
        let now = record.now;
        match record.op {
            Op::Event(stored) => {
                let event = stored.event()?;
                let read = (!journaled).then(Vec::new);
                self.ingest_read([(0, event)], now, &mut Vec::new(), read);
            }
            Op::Signal {
                source,
                at,
                conversation,
            } => {
                let source = SignalSource::ALL
                    .into_iter()
                    .find(|s| s.as_str() == source)
                    .ok_or(format!("signal source `{source}`"))?;
                let conversation = conversation
                    .map(|c| ConversationSid::parse(&c).map_err(|e| e.to_string()))
                    .transpose()?;
                self.bad_request_signal(source, at, conversation, now);
            }
            Op::Covered { at } => self.taskrouter_covered(at),
            Op::Cut { at } => {
                self.cut(at, now);
            }
            Op::Probed { started, result } => self.probed_as(started, &result, journaled),
            Op::Report {
                conversation_sid,
                note,
                at,
                at_ms,
            } => self.report_as(
                Report {
                    conversation_sid,
                    note,
                    at,
                    at_ms,
                },
                journaled,
            ),
            Op::Timeout { ms } => {
                self.set_transfer_timeout(Duration::from_millis(ms), now);
            }
            Op::TaskrouterBadRequest => self.record_taskrouter_bad_request(now),
            Op::Lines {
                path,
                ino,
                from,
                to,
            } => {
                let events = crate::sources::file::read_range(&path, ino, from, to)
                    .map_err(|e| format!("lines {from}..{to} of {}: {e}", path.display()))?;
                self.ingest(events.into_iter().enumerate(), now, &mut Vec::new());
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counts that are still consistent enough to
        // keep guarding; never take the daemon down over it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a batch of parsed events; returns how many were accepted and adds the rest to
    /// `rejected`.
    pub fn ingest(
        &self,
        events: impl IntoIterator<Item = (usize, Event)>,
        now_ms: i64,
        rejected: &mut Vec<Rejection>,
    ) -> usize {
        self.ingest_read(events, now_ms, rejected, None)
    }

    /// Why an event taken at `now_ms` is refused (too old for any window, or from the
    /// future), if it is.
    pub fn refuses(&self, event: &Event, now_ms: i64) -> Option<(Reject, String)> {
        let age = now_ms - event.timestamp_ms;
        if age >= self.max_window_ms {
            Some((Reject::TooOld, "older than the longest window".to_string()))
        } else if -age > FUTURE_TOLERANCE.as_millis() as i64 {
            Some((
                Reject::InFuture,
                format!("{} s ahead of this daemon's clock", -age / 1000),
            ))
        } else {
            None
        }
    }

    /// Counts an event refused before it reached the store (`refuses`).
    pub fn count_refused(&self, reason: Reject) {
        self.series.reject(reason);
    }

    /// An event pushed to the store (by whichever replica received it), taken at the time it
    /// was received. Not journaled: a restart reads it from the store again.
    pub fn take_stored(&self, record: Record) -> Result<(), String> {
        match record.op {
            Op::Event(_) | Op::Report { .. } | Op::Probed { .. } => self.replay_as(record, false),
            _ => Err("a pushed record that is not an event, a report or a test transfer".into()),
        }
    }

    /// The same, for events whose source keeps them (a file source's lines): `read` says
    /// where they can be read again, and is journaled instead of the events.
    pub fn ingest_read(
        &self,
        events: impl IntoIterator<Item = (usize, Event)>,
        now_ms: i64,
        rejected: &mut Vec<Rejection>,
        read: Option<Vec<Op>>,
    ) -> usize {
        // Refusals and the journal's lines need no lock: the lock is held only to apply. The
        // events are applied by reference and dropped (their strings freed) after it.
        let journaled = self.journal.is_some() && read.is_none();
        let events: Vec<(usize, Event)> = events.into_iter().collect();
        // Journal lines are about 270 bytes: the buffer is sized once, not copied as it grows.
        let mut lines = Vec::with_capacity(if journaled { events.len() * 320 } else { 0 });
        let mut taken = Vec::with_capacity(events.len());
        let encoder = journaled.then(|| journal::EventLines::new(&self.key, now_ms));
        for (index, event) in &events {
            let index = *index;
            if let Some((reason, detail)) = self.refuses(event, now_ms) {
                self.series.reject(reason);
                rejected.push(Rejection {
                    index,
                    reason,
                    error: format!("field `timestamp`: {detail}"),
                });
                continue;
            }
            if let Some(encoder) = &encoder {
                encoder.encode(event, &mut lines);
            }
            taken.push(event);
        }
        let accepted = taken.len();
        if self.journal.is_some() {
            for op in read.into_iter().flatten() {
                journal::encode(
                    &Record {
                        cbo: self.key.clone(),
                        now: now_ms,
                        op,
                    },
                    &mut lines,
                );
            }
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        for event in taken {
            inner.tally.ingested(event.kind);
            let mut counted = Counted::default();
            let route = inner
                .reconciler
                .route(event, now_ms, &mut inner.effects, &mut counted);
            if let Route::Apply(key) = route {
                track(inner, key, event, now_ms);
                if event.kind == crate::event::EventKind::Failed {
                    remember_failing(&mut inner.failing, event);
                    if event
                        .error
                        .as_ref()
                        .is_some_and(|e| e.class() == ErrorClass::BadRequest)
                    {
                        // Its Bad Request counts with the transfer; one the logs or the
                        // debugger reported for this conversation is the same one.
                        settle_signal(inner, event, now_ms);
                    }
                }
            }
            count(&mut inner.tally, &counted);
            self.drain(inner, now_ms);
        }
        self.series.add(&mut inner.tally);
        // Written in the order the events were applied, but not under the CBO's lock: the
        // next batch is applied while this one's lines go out.
        let appender = self
            .journal
            .as_ref()
            .filter(|_| !lines.is_empty())
            .map(|j| j.hold());
        drop(guard);
        if let Some(appender) = appender {
            appender.append(now_ms, &lines);
        }
        drop(events);
        accepted
    }

    /// Counts one rejected event of this CBO that never reached `ingest`.
    pub fn reject_one(&self, reason: Reject) {
        self.series.reject(reason);
    }

    /// A Bad Request the functions' logs or Twilio's debugger reported at `at_ms`, for
    /// `conversation` when the report names one. Counted once: not when a transfer's failure
    /// or another source reported the same one (the same conversation, or, when a report
    /// names none, another source's within a minute).
    /// Returns whether it counted.
    pub fn bad_request_signal(
        &self,
        source: SignalSource,
        at_ms: i64,
        conversation: Option<ConversationSid>,
        now_ms: i64,
    ) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        self.journal(now_ms, || Op::Signal {
            source: source.as_str().to_string(),
            at: at_ms,
            conversation: conversation.map(|c| c.as_str().to_string()),
        });
        let bit = 1u8 << (source as u8);
        let near = |t: i64| (t - at_ms).abs() <= JOIN_WINDOW_MS;
        let same = inner.signals.iter_mut().find(|s| {
            near(s.at_ms)
                && match (&s.conversation, &conversation) {
                    (Some(a), Some(b)) => a == b,
                    _ => s.sources & bit == 0,
                }
        });
        if let Some(s) = same {
            s.sources |= bit;
            s.conversation = s.conversation.or(conversation);
            return false;
        }
        let counts = at_ms >= inner.judged_since_ms;
        push_signal(&mut inner.signals, now_ms);
        inner.signals.push_back(Signal {
            at_ms,
            conversation,
            sources: bit,
            counted: counts,
        });
        if counts {
            inner.windows.record_bad_request_signal(at_ms, now_ms, 1);
        }
        self.series.bad_request_signal(source);
        true
    }

    /// TaskRouter's record has been read up to `at_ms` (for `taskrouter_missing`).
    pub fn taskrouter_covered(&self, at_ms: i64) {
        let mut inner = self.lock();
        self.journal(at_ms, || Op::Covered { at: at_ms });
        inner.reconciler.taskrouter_covered(at_ms);
    }

    /// Lets time pass: timeouts, orphaned terminal events, forgetting finished transfers.
    pub fn sweep(&self, now_ms: i64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut counted = Counted::default();
        let timeout_ms = inner.tracker.timeout().as_millis() as i64;
        for (key, event) in inner.reconciler.release(now_ms, timeout_ms) {
            tracing::debug!(cbo = %self.key, conversation = %event.conversation_sid, "TaskRouter never told this transfer's outcome: the plugin's stands");
            track(inner, key, &event, now_ms);
        }
        inner.reconciler.sweep(now_ms, timeout_ms, &mut counted);
        count(&mut inner.tally, &counted);
        inner.tracker.sweep(now_ms, &mut inner.effects);
        self.drain(inner, now_ms);
        self.series.add(&mut inner.tally);
        self.series.set_open(inner.tracker.open());
    }

    fn drain(&self, inner: &mut Inner, now_ms: i64) {
        let mut effects = std::mem::take(&mut inner.effects);
        for effect in effects.drain(..) {
            match &effect {
                // A correction counts in the windows only: the counters have its first outcome.
                Effect::Finished {
                    correction: true, ..
                }
                | Effect::Retracted { .. } => {}
                Effect::Finished {
                    outcome,
                    transfer_type,
                    target_type,
                    class,
                    completion_secs,
                    ..
                } => {
                    inner.tally.transfer(*transfer_type, *target_type, *outcome);
                    // Only a failure has an error class (a `completed` may still carry an error).
                    if let Some(class) =
                        class.filter(|_| *outcome == crate::tracker::Outcome::Failed)
                    {
                        inner.tally.error(class);
                    }
                    if let (Some(secs), Some(tt)) = (completion_secs, transfer_type) {
                        inner.tally.completion(*tt, *secs);
                    }
                }
                Effect::Notified { secs, .. } => inner.tally.notification(*secs),
                Effect::HistoryLost { .. } => inner.tally.history_lost(),
                Effect::Duplicate => inner.tally.duplicate(),
                Effect::Evicted => inner.tally.evicted(),
            }
            if let Some(started) = judged_by(&effect) {
                record(&mut inner.windows, &effect, inner.judged_since_ms, now_ms);
                while inner.recent.len() >= RECENT_MAX
                    || inner
                        .recent
                        .front()
                        .is_some_and(|(t, _, _)| *t < now_ms - RECENT_SPAN_MS)
                {
                    if let Some((t, _, _)) = inner.recent.pop_front() {
                        inner.pruned_until_ms = inner.pruned_until_ms.max(t);
                    }
                }
                inner.recent.push_back((now_ms, started, effect));
            }
        }
        inner.effects = effects;
    }

    /// A new deployment took effect at `at_ms`: from now on the windows hold only transfers
    /// initiated at or after it (rebuilt from the last minute of effects), so the deployment
    /// is judged on its own traffic. Returns the instant judging starts from: `at_ms`, or
    /// later when the last minute no longer reaches back to it. A cut never moves earlier.
    pub fn cut(&self, at_ms: i64, now_ms: i64) -> i64 {
        let mut inner = self.lock();
        let inner = &mut *inner;
        self.journal(now_ms, || Op::Cut { at: at_ms });
        if at_ms <= inner.judged_since_ms {
            return inner.judged_since_ms;
        }
        // Effects dropped from `recent` arrived before everything it holds; if some arrived
        // after the cut, judging starts after the last of them instead (never earlier).
        let since = at_ms.max(inner.pruned_until_ms + 1);
        inner.judged_since_ms = since;
        inner.windows = Windows::new(self.max_window);
        for (_, _, effect) in &inner.recent {
            record(&mut inner.windows, effect, since, now_ms);
        }
        since
    }

    /// The newest failed transfers at or after `since_ms`, newest first, at most
    /// `FAILING_SHOWN`.
    pub fn failing(&self, since_ms: i64) -> Vec<Failing> {
        self.lock()
            .failing
            .iter()
            .rev()
            .filter(|f| f.at_ms >= since_ms)
            .take(FAILING_SHOWN)
            .cloned()
            .collect()
    }

    /// A test transfer ended with `result` (an error, which is not a transfer, is not kept).
    pub fn probed(&self, started_ms: i64, result: &str) {
        self.probed_as(started_ms, result, true);
    }

    fn probed_as(&self, started_ms: i64, result: &str, journaled: bool) {
        if result == "error" {
            return;
        }
        let mut inner = self.lock();
        if journaled {
            self.journal(started_ms, || Op::Probed {
                started: started_ms,
                result: result.to_string(),
            });
        }
        if inner.probes.len() >= PROBES_KEPT {
            inner.probes.pop_front();
        }
        inner.probes.push_back((started_ms, result == "routed"));
    }

    /// Test transfers started at or after `since_ms`: (how many, how many routed).
    pub fn probes_since(&self, since_ms: i64) -> (u64, u64) {
        let inner = self.lock();
        let ran = inner.probes.iter().filter(|(t, _)| *t >= since_ms);
        ran.fold((0, 0), |(n, ok), (_, routed)| {
            (n + 1, ok + u64::from(*routed))
        })
    }

    /// Takes an agent's report.
    pub fn report(&self, report: Report) {
        self.report_as(report, true);
    }

    fn report_as(&self, report: Report, journaled: bool) {
        self.series.agent_report();
        let mut inner = self.lock();
        if journaled {
            self.journal(report.at_ms, || Op::Report {
                conversation_sid: report.conversation_sid.clone(),
                note: report.note.clone(),
                at: report.at.clone(),
                at_ms: report.at_ms,
            });
        }
        if inner.reports.len() >= REPORTS_KEPT {
            inner.reports.pop_front();
        }
        inner.reports.push_back(report);
    }

    /// Agents' reports at or after `since_ms`, oldest first.
    pub fn reports_since(&self, since_ms: i64) -> Vec<Report> {
        self.lock()
            .reports
            .iter()
            .filter(|r| r.at_ms >= since_ms)
            .cloned()
            .collect()
    }

    /// The transfer timeout in force.
    pub fn transfer_timeout(&self) -> Duration {
        self.lock().tracker.timeout()
    }

    /// Sets the transfer timeout; returns the one it replaces when it changed.
    pub fn set_transfer_timeout(&self, timeout: Duration, now_ms: i64) -> Option<Duration> {
        let mut inner = self.lock();
        let was = inner.tracker.timeout();
        (was != timeout).then(|| {
            self.journal(now_ms, || Op::Timeout {
                ms: timeout.as_millis() as u64,
            });
            inner.tracker.set_timeout(timeout);
            was
        })
    }

    /// The instant this CBO's current deployment is judged from (`i64::MIN` before any cut).
    pub fn judged_since(&self) -> i64 {
        self.lock().judged_since_ms
    }

    /// What polling knows about this CBO's workflow.
    pub fn taskrouter(&self) -> std::sync::MutexGuard<'_, TaskRouterStatus> {
        self.taskrouter.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_taskrouter_bad_request(&self, now_ms: i64) {
        let mut inner = self.lock();
        self.journal(now_ms, || Op::TaskrouterBadRequest);
        inner.windows.record_taskrouter_bad_request(now_ms);
    }

    pub fn stats_since(&self, now_ms: i64, since_ms: i64) -> WindowStats {
        self.lock().windows.stats_since(now_ms, since_ms)
    }

    pub fn stats(&self, now_ms: i64, window: Duration) -> WindowStats {
        self.lock().windows.stats(now_ms, window)
    }

    pub fn open_transfers(&self) -> usize {
        self.lock().tracker.open()
    }

    /// Sets the `success_ratio` gauges from the windows; a window without transfers has no series.
    pub fn refresh_gauges(&self, now_ms: i64) {
        let ratios = self
            .lock()
            .windows
            .success_rates(now_ms, RATIO_WINDOWS.map(|(_, w)| w));
        for (i, ratio) in ratios.into_iter().enumerate() {
            self.series.set_success_ratio(i, ratio);
        }
    }
}

/// Tallies the sources that saw a transfer first and the disagreements the reconciler found.
fn count(tally: &mut Tally, counted: &Counted) {
    if *counted == Counted::default() {
        return;
    }
    for source in counted.seen() {
        tally.seen(source);
    }
    for (d, n) in Disagreement::ALL.iter().zip(counted.disagreements) {
        if n > 0 {
            tally.disagreement(*d, n);
        }
    }
}

/// Applies `event` to the transfer `key` and tells the reconciler how it finished, if it did.
fn track(inner: &mut Inner, key: u64, event: &Event, now_ms: i64) {
    let before = inner.effects.len();
    inner
        .tracker
        .apply_hashed(key, event, now_ms, &mut inner.effects);
    for effect in &inner.effects[before..] {
        inner.reconciler.finished(key, effect, event.source);
    }
}

/// Keeps a failed transfer for the evidence, the newest `FAILING_KEPT`.
fn remember_failing(failing: &mut VecDeque<Failing>, event: &Event) {
    if failing.len() >= FAILING_KEPT {
        failing.pop_front();
    }
    failing.push_back(Failing {
        conversation_sid: event.conversation_sid.to_string(),
        transfer_id: event
            .transfer_id
            .as_deref()
            .map(str::to_string)
            .or_else(|| event.task_sid.map(|t| t.to_string())),
        at: crate::clock::rfc3339(event.timestamp_ms),
        at_ms: event.timestamp_ms,
        error: event
            .error
            .as_ref()
            .map_or("no error details".into(), describe_error),
    });
}

/// Makes room for one more Bad Request report.
fn push_signal(signals: &mut VecDeque<Signal>, now_ms: i64) {
    while signals.len() >= SIGNALS_MAX
        || signals
            .front()
            .is_some_and(|s| s.at_ms < now_ms - SIGNALS_SPAN_MS)
    {
        signals.pop_front();
    }
}

/// A transfer failed with a Bad Request, which counts with the transfer: a logs' or
/// debugger's report of it (the same conversation, or one naming none, within a minute),
/// counted on its own before, is taken back; one coming later finds it here.
fn settle_signal(inner: &mut Inner, event: &Event, now_ms: i64) {
    let near = |t: i64| (t - event.timestamp_ms).abs() <= JOIN_WINDOW_MS;
    let conversation = event.conversation_sid;
    let same = inner.signals.iter_mut().find(|s| {
        near(s.at_ms)
            && s.sources & TRANSFER_REPORTED == 0
            && s.conversation.is_none_or(|c| c == conversation)
    });
    match same {
        Some(s) => {
            s.sources |= TRANSFER_REPORTED;
            s.conversation = Some(conversation);
            if s.counted {
                s.counted = false;
                inner.windows.record_bad_request_signal(s.at_ms, now_ms, -1);
            }
        }
        None => {
            push_signal(&mut inner.signals, now_ms);
            inner.signals.push_back(Signal {
                at_ms: event.timestamp_ms,
                conversation: Some(conversation),
                sources: TRANSFER_REPORTED,
                counted: false,
            });
        }
    }
}

/// A transfer error as on-call reads it: `TaskRouter error: Bad Request (status 400, code 20001)`.
fn describe_error(e: &crate::event::TransferError) -> String {
    let mut parts = Vec::new();
    if let Some(s) = e.status {
        parts.push(format!("status {s}"));
    }
    if let Some(c) = e.code {
        parts.push(format!("code {c}"));
    }
    match (&e.message, parts.is_empty()) {
        (Some(m), true) => m.clone(),
        (Some(m), false) => format!("{m} ({})", parts.join(", ")),
        (None, _) => parts.join(", "),
    }
}

/// When the transfer behind an effect started (`None` for effects the windows do not hold).
fn judged_by(effect: &Effect) -> Option<i64> {
    match effect {
        Effect::Finished {
            at_ms,
            initiated_ms,
            ..
        }
        | Effect::Retracted {
            at_ms,
            initiated_ms,
            ..
        } => Some(initiated_ms.unwrap_or(*at_ms)),
        Effect::Notified { at_ms, secs } => Some(at_ms - (secs * 1000.0).round() as i64),
        Effect::HistoryLost {
            at_ms,
            initiated_ms,
        } => Some(initiated_ms.unwrap_or(*at_ms)),
        Effect::Duplicate | Effect::Evicted => None,
    }
}

/// Adds an effect to the windows when its transfer started at or after `since_ms`.
fn record(windows: &mut Windows, effect: &Effect, since_ms: i64, now_ms: i64) {
    if judged_by(effect).is_none_or(|t| t < since_ms) {
        return;
    }
    match *effect {
        Effect::Finished {
            at_ms,
            outcome,
            transfer_type,
            class,
            completion_secs,
            ..
        } => {
            let class = class.filter(|_| outcome == crate::tracker::Outcome::Failed);
            if let Some(secs) = completion_secs {
                windows.record_completion(at_ms, now_ms, transfer_type, secs);
            }
            windows.record_outcome(at_ms, now_ms, outcome, class);
        }
        Effect::Retracted {
            at_ms,
            outcome,
            class,
            ..
        } => windows.retract_outcome(at_ms, now_ms, outcome, class),
        Effect::Notified { at_ms, secs } => windows.record_notification(at_ms, now_ms, secs),
        Effect::HistoryLost { at_ms, .. } => windows.record_history_lost(at_ms, now_ms),
        Effect::Duplicate | Effect::Evicted => {}
    }
}

/// Every configured CBO's state, by key.
pub struct Fleet {
    cbos: std::sync::RwLock<BTreeMap<String, Arc<CboState>>>,
    journal: Option<Arc<Journal>>,
}

impl Fleet {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Fleet {
        Fleet::journaled(config, metrics, None)
    }

    /// A fleet whose CBOs journal what they take to `journal`.
    pub fn journaled(
        config: &Config,
        metrics: &Arc<Metrics>,
        journal: Option<Arc<Journal>>,
    ) -> Fleet {
        let fleet = Fleet {
            cbos: Default::default(),
            journal,
        };
        fleet.add(config, metrics);
        fleet
    }

    /// Adds the CBOs of `config` not here yet (empty); those already here keep their state.
    /// Returns the keys added.
    pub fn add(&self, config: &Config, metrics: &Metrics) -> Vec<String> {
        let mut cbos = self.cbos.write().unwrap_or_else(|p| p.into_inner());
        let mut added = Vec::new();
        for cbo in &config.cbos {
            let key = cbo.key.as_str();
            if !cbos.contains_key(key) {
                cbos.insert(
                    key.to_string(),
                    Arc::new(CboState::new(key, config, metrics, self.journal.clone())),
                );
                added.push(key.to_string());
            }
        }
        added
    }

    /// Drops the CBOs `config` no longer has, with their series. Returns the keys removed.
    pub fn retain(&self, config: &Config, metrics: &Metrics) -> Vec<String> {
        let mut cbos = self.cbos.write().unwrap_or_else(|p| p.into_inner());
        let removed: Vec<String> = cbos
            .keys()
            .filter(|k| config.cbo(k).is_none())
            .cloned()
            .collect();
        for key in &removed {
            cbos.remove(key);
            metrics.remove_cbo(key);
        }
        removed
    }

    pub fn get(&self, key: &str) -> Option<Arc<CboState>> {
        self.cbos
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// From now on its CBOs count in `metrics` and journal to `journal` (after a start replayed
    /// the journal into them, counted nowhere). Only while nothing else holds them.
    pub fn attach(&mut self, metrics: &Metrics, journal: Arc<Journal>) {
        let cbos = self.cbos.get_mut().unwrap_or_else(|p| p.into_inner());
        for (key, state) in cbos.iter_mut() {
            let state = Arc::get_mut(state).expect("a fleet being restored is not shared yet");
            state.series = metrics.init_cbo(key);
            state.journal = Some(journal.clone());
        }
        self.journal = Some(journal);
    }

    /// Every CBO now, in key order.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<CboState>> {
        let cbos = self.cbos.read().unwrap_or_else(|p| p.into_inner());
        cbos.values().cloned().collect::<Vec<_>>().into_iter()
    }

    pub fn sweep(&self, now_ms: i64) {
        for cbo in self.iter() {
            cbo.sweep(now_ms);
        }
    }

    /// Sets every CBO's window gauges, a large fleet split over two threads (a scrape of
    /// thousands of CBOs reads each one's windows).
    pub fn refresh_gauges(&self, now_ms: i64) {
        let cbos: Vec<_> = self.iter().collect();
        if cbos.len() < 200 {
            return cbos.iter().for_each(|c| c.refresh_gauges(now_ms));
        }
        let (first, second) = cbos.split_at(cbos.len() / 2);
        crate::join(
            || first.iter().for_each(|c| c.refresh_gauges(now_ms)),
            || second.iter().for_each(|c| c.refresh_gauges(now_ms)),
        );
    }
}
