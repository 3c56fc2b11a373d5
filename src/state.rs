//! Per-CBO state (tracker and windows behind one lock) and the fleet of CBOs: events in, effects to metrics and windows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter};

use crate::config::{Config, FUTURE_TOLERANCE};
use crate::event::{Event, EventKind, TransferType};
use crate::health::TaskRouterStatus;
use crate::metrics::{Metrics, RATIO_WINDOWS, Reject};
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
}

/// Metric handles resolved once per CBO, so the hot path does no label lookups.
struct Handles {
    ingested: [IntCounter; 7],
    /// `transfers_total` by transfer type (cold, warm), target (worker, queue) and outcome; a
    /// transfer whose `initiated` never came is counted by label lookup (rare).
    transfers: Vec<IntCounter>,
    duplicate: IntCounter,
    evicted: IntCounter,
    history_lost: IntCounter,
    cold: Histogram,
    warm: Histogram,
    notification: Histogram,
}

pub struct CboState {
    pub key: String,
    inner: Mutex<Inner>,
    taskrouter: Mutex<TaskRouterStatus>,
    handles: Handles,
    metrics: Arc<Metrics>,
    max_window_ms: i64,
}

impl CboState {
    fn new(key: &str, config: &Config, metrics: Arc<Metrics>) -> CboState {
        metrics.init_cbo(key);
        let handles = Handles {
            ingested: EventKind::ALL.map(|k| {
                metrics
                    .events_ingested
                    .with_label_values(&[key, k.as_str()])
            }),
            transfers: ["cold", "warm"]
                .iter()
                .flat_map(|tt| {
                    ["worker", "queue"].iter().flat_map(move |target| {
                        crate::tracker::Outcome::ALL
                            .into_iter()
                            .map(move |o| (*tt, *target, o))
                    })
                })
                .map(|(tt, target, o)| {
                    metrics
                        .transfers
                        .with_label_values(&[key, tt, target, o.as_str()])
                })
                .collect(),
            duplicate: metrics.events_duplicate.with_label_values(&[key]),
            evicted: metrics.transfers_evicted.with_label_values(&[key]),
            history_lost: metrics.history_lost.with_label_values(&[key]),
            cold: metrics.completion_seconds.with_label_values(&[key, "cold"]),
            warm: metrics.completion_seconds.with_label_values(&[key, "warm"]),
            notification: metrics.notification_seconds.with_label_values(&[key]),
        };
        CboState {
            key: key.to_string(),
            inner: Mutex::new(Inner {
                tracker: Tracker::new(config.transfers.timeout, config.transfers.max_open),
                windows: Windows::new(config.transfers.max_window),
                effects: Vec::new(),
            }),
            taskrouter: Mutex::new(TaskRouterStatus::default()),
            handles,
            metrics,
            max_window_ms: config.transfers.max_window.as_millis() as i64,
        }
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
        let mut accepted = 0;
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (index, event) in events {
            let age = now_ms - event.timestamp_ms;
            let bad = if age >= self.max_window_ms {
                Some((Reject::TooOld, "older than the longest window".to_string()))
            } else if -age > FUTURE_TOLERANCE.as_millis() as i64 {
                Some((
                    Reject::InFuture,
                    format!("{} s ahead of this daemon's clock", -age / 1000),
                ))
            } else {
                None
            };
            if let Some((reason, detail)) = bad {
                self.metrics.reject(&self.key, reason);
                rejected.push(Rejection {
                    index,
                    reason,
                    error: format!("field `timestamp`: {detail}"),
                });
                continue;
            }
            accepted += 1;
            self.handles.ingested[event.kind as usize].inc();
            inner.tracker.apply(&event, now_ms, &mut inner.effects);
            self.drain(inner, now_ms);
        }
        accepted
    }

    /// Lets time pass: timeouts, orphaned terminal events, forgetting finished transfers.
    pub fn sweep(&self, now_ms: i64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.tracker.sweep(now_ms, &mut inner.effects);
        self.drain(inner, now_ms);
        self.metrics
            .open_transfers
            .with_label_values(&[&self.key])
            .set(inner.tracker.open() as i64);
    }

    fn drain(&self, inner: &mut Inner, now_ms: i64) {
        for effect in inner.effects.drain(..) {
            match effect {
                Effect::Finished {
                    at_ms,
                    outcome,
                    transfer_type,
                    target_type,
                    class,
                    completion_secs,
                } => {
                    // Only a failure has an error class (a `completed` may still carry an error).
                    let class = class.filter(|_| outcome == crate::tracker::Outcome::Failed);
                    match (transfer_type, target_type) {
                        (Some(tt), Some(target)) => {
                            let i = (tt as usize * 2 + target as usize) * 4 + outcome as usize;
                            self.handles.transfers[i].inc();
                        }
                        (tt, target) => self
                            .metrics
                            .transfers
                            .with_label_values(&[
                                self.key.as_str(),
                                tt.map_or("unknown", |t| t.as_str()),
                                target.map_or("unknown", |t| t.as_str()),
                                outcome.as_str(),
                            ])
                            .inc(),
                    }
                    if let Some(class) = class {
                        self.metrics
                            .transfer_errors
                            .with_label_values(&[&self.key, class.as_str()])
                            .inc();
                    }
                    if let Some(secs) = completion_secs {
                        match transfer_type {
                            Some(TransferType::Cold) => self.handles.cold.observe(secs),
                            Some(TransferType::Warm) => self.handles.warm.observe(secs),
                            None => {}
                        }
                        inner
                            .windows
                            .record_completion(at_ms, now_ms, transfer_type, secs);
                    }
                    inner.windows.record_outcome(at_ms, now_ms, outcome, class);
                }
                Effect::Notified { at_ms, secs } => {
                    self.handles.notification.observe(secs);
                    inner.windows.record_notification(at_ms, now_ms, secs);
                }
                Effect::HistoryLost { at_ms } => {
                    self.handles.history_lost.inc();
                    inner.windows.record_history_lost(at_ms, now_ms);
                }
                Effect::Duplicate => self.handles.duplicate.inc(),
                Effect::Evicted => self.handles.evicted.inc(),
            }
        }
    }

    /// What polling knows about this CBO's workflow.
    pub fn taskrouter(&self) -> std::sync::MutexGuard<'_, TaskRouterStatus> {
        self.taskrouter.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_taskrouter_bad_request(&self, now_ms: i64) {
        self.lock().windows.record_taskrouter_bad_request(now_ms);
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
        for (name, window) in RATIO_WINDOWS {
            let labels = [self.key.as_str(), name];
            match self.stats(now_ms, window).success_rate {
                Some(r) => self.metrics.success_ratio.with_label_values(&labels).set(r),
                None => {
                    let _ = self.metrics.success_ratio.remove_label_values(&labels);
                }
            }
        }
    }
}

/// Every configured CBO's state, by key.
pub struct Fleet {
    cbos: BTreeMap<String, Arc<CboState>>,
}

impl Fleet {
    pub fn new(config: &Config, metrics: &Arc<Metrics>) -> Fleet {
        let cbos = config
            .cbos
            .iter()
            .map(|c| {
                let key = c.key.as_str();
                (
                    key.to_string(),
                    Arc::new(CboState::new(key, config, metrics.clone())),
                )
            })
            .collect();
        Fleet { cbos }
    }

    pub fn get(&self, key: &str) -> Option<&Arc<CboState>> {
        self.cbos.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<CboState>> {
        self.cbos.values()
    }

    pub fn sweep(&self, now_ms: i64) {
        for cbo in self.iter() {
            cbo.sweep(now_ms);
        }
    }

    pub fn refresh_gauges(&self, now_ms: i64) {
        for cbo in self.iter() {
            cbo.refresh_gauges(now_ms);
        }
    }
}
