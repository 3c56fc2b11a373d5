//! Every exported Prometheus metric, named once (SPEC §8).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub const NAMESPACE: &str = "transfer_guard";

/// Completion buckets: the seed's 10 s cold-transfer bound and 5 s among them.
pub const COMPLETION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Notification buckets: the seed's 5 s bound among them.
pub const NOTIFICATION_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
];

/// Windows exported as `success_ratio{window}`.
pub const RATIO_WINDOWS: [(&str, std::time::Duration); 2] = [
    ("5m", std::time::Duration::from_secs(300)),
    ("15m", std::time::Duration::from_secs(900)),
];

/// Rejection reasons, the values of `events_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not JSON, not an object, not a log line.
    Malformed,
    /// A field missing or wrong.
    Invalid,
    TooOld,
    InFuture,
    UnknownCbo,
    Unauthorized,
    TooLarge,
    UnsupportedMediaType,
}

impl Reject {
    /// Reasons a CBO's own events or requests can be rejected for.
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

pub struct Metrics {
    pub registry: Registry,
    pub events_ingested: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub events_duplicate: IntCounterVec,
    pub transfers: IntCounterVec,
    pub transfer_errors: IntCounterVec,
    pub completion_seconds: HistogramVec,
    pub notification_seconds: HistogramVec,
    pub history_lost: IntCounterVec,
    pub success_ratio: GaugeVec,
    pub open_transfers: IntGaugeVec,
    pub transfers_evicted: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub taskrouter_polls: IntCounterVec,
    pub taskrouter_poll_seconds: HistogramVec,
    pub taskrouter_error_ratio: GaugeVec,
    pub taskrouter_bad_requests: IntCounterVec,
    pub taskrouter_tasks: IntGaugeVec,
    pub taskrouter_reservations: IntGaugeVec,
    pub taskrouter_tasks_in_workflow: IntGaugeVec,
    pub workflow_config_ok: IntGaugeVec,
    pub workflow_problem: IntGaugeVec,
    pub rule_state: IntGaugeVec,
    pub actions_total: IntCounterVec,
    pub transfers_disabled: IntGaugeVec,
    pub validation_state: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let m = Metrics {
            events_ingested: reg!(IntCounterVec::new(
                opts(
                    "events_ingested_total",
                    "Transfer events accepted, by event type."
                ),
                &["cbo", "event"]
            )),
            events_rejected: reg!(IntCounterVec::new(
                opts(
                    "events_rejected_total",
                    "Transfer events or requests rejected, by reason (cbo empty when unauthenticated)."
                ),
                &["cbo", "reason"]
            )),
            events_duplicate: reg!(IntCounterVec::new(
                opts(
                    "events_duplicate_total",
                    "Accepted events that repeated one already seen (same transfer, event and timestamp) and were ignored."
                ),
                &["cbo"]
            )),
            transfers: reg!(IntCounterVec::new(
                opts(
                    "transfers_total",
                    "Transfers ended, by type, target and outcome."
                ),
                &["cbo", "transfer_type", "target_type", "outcome"]
            )),
            transfer_errors: reg!(IntCounterVec::new(
                opts("transfer_errors_total", "Failed transfers by error class."),
                &["cbo", "class"]
            )),
            completion_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "transfer_completion_seconds",
                    "Time from initiated to completed."
                )
                .namespace(NAMESPACE)
                .buckets(COMPLETION_BUCKETS.to_vec()),
                &["cbo", "transfer_type"]
            )),
            notification_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "agent_notification_seconds",
                    "Time from initiated to the target agent's reservation (notified)."
                )
                .namespace(NAMESPACE)
                .buckets(NOTIFICATION_BUCKETS.to_vec()),
                &["cbo"]
            )),
            history_lost: reg!(IntCounterVec::new(
                opts(
                    "history_lost_total",
                    "Completed transfers whose conversation history was not carried over."
                ),
                &["cbo"]
            )),
            success_ratio: reg!(GaugeVec::new(
                opts(
                    "success_ratio",
                    "completed / (completed + failed + timed_out) over the trailing window, in event time; absent without transfers."
                ),
                &["cbo", "window"]
            )),
            open_transfers: reg!(IntGaugeVec::new(
                opts("open_transfers", "Transfers tracked and not ended yet."),
                &["cbo"]
            )),
            transfers_evicted: reg!(IntCounterVec::new(
                opts(
                    "transfers_evicted_total",
                    "Open transfers dropped because the per-CBO cap (transfers.max_open) was reached."
                ),
                &["cbo"]
            )),
            build_info: reg!(IntGaugeVec::new(
                opts("build_info", "Always 1; the running version."),
                &["version"]
            )),
            taskrouter_polls: reg!(IntCounterVec::new(
                opts(
                    "taskrouter_polls_total",
                    "TaskRouter poll cycles, by result (ok, or the class of the first failure)."
                ),
                &["cbo", "result"]
            )),
            taskrouter_poll_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "taskrouter_poll_duration_seconds",
                    "Time one poll cycle took, retries included."
                )
                .namespace(NAMESPACE)
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                &["cbo"]
            )),
            taskrouter_error_ratio: reg!(GaugeVec::new(
                opts(
                    "taskrouter_error_ratio",
                    "(tasks canceled + tasks timed out in workflow) / tasks entered over the polled window; absent without tasks."
                ),
                &["cbo"]
            )),
            taskrouter_bad_requests: reg!(IntCounterVec::new(
                opts(
                    "taskrouter_bad_requests_total",
                    "Polls where TaskRouter answered 400 Bad Request for the chat-transfer workflow."
                ),
                &["cbo"]
            )),
            taskrouter_tasks: reg!(IntGaugeVec::new(
                opts(
                    "taskrouter_tasks",
                    "The workflow's tasks over the polled window (CumulativeStatistics), by kind."
                ),
                &["cbo", "kind"]
            )),
            taskrouter_reservations: reg!(IntGaugeVec::new(
                opts(
                    "taskrouter_reservations",
                    "The workflow's reservations over the polled window (CumulativeStatistics), by kind."
                ),
                &["cbo", "kind"]
            )),
            taskrouter_tasks_in_workflow: reg!(IntGaugeVec::new(
                opts(
                    "taskrouter_tasks_in_workflow",
                    "Tasks in the workflow now (RealTimeStatistics total_tasks)."
                ),
                &["cbo"]
            )),
            workflow_config_ok: reg!(IntGaugeVec::new(
                opts(
                    "workflow_config_ok",
                    "1 when the chat-transfer workflow configuration is sound, 0 when corrupted (SPEC §3)."
                ),
                &["cbo"]
            )),
            workflow_problem: reg!(IntGaugeVec::new(
                opts(
                    "workflow_problem",
                    "1 for each configuration-corruption case present now, by problem id."
                ),
                &["cbo", "problem"]
            )),
            rule_state: reg!(IntGaugeVec::new(
                opts(
                    "rule_state",
                    "1 for each rule's current state (ok, pending, breached, inconclusive), 0 for the others."
                ),
                &["cbo", "rule", "state"]
            )),
            actions_total: reg!(IntCounterVec::new(
                opts(
                    "actions_total",
                    "Action decisions and attempts, by integration (or rollback/disable/alert) and result."
                ),
                &["cbo", "action", "result"]
            )),
            transfers_disabled: reg!(IntGaugeVec::new(
                opts(
                    "transfers_disabled",
                    "1 while transfer-guard's switch has transfers disabled for the CBO."
                ),
                &["cbo"]
            )),
            validation_state: reg!(IntGaugeVec::new(
                opts(
                    "validation_state",
                    "1 for the state of the CBO's latest post-deploy validation window (running, passed, failed, inconclusive), 0 for the others."
                ),
                &["cbo", "state"]
            )),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Requests without a valid token belong to no CBO.
        m.events_rejected
            .with_label_values(&["", Reject::Unauthorized.as_str()]);
        m
    }

    /// Creates every per-CBO series at zero so dashboards and `rate()` see them from the start.
    pub fn init_cbo(&self, cbo: &str) {
        for kind in crate::event::EventKind::ALL {
            self.events_ingested
                .with_label_values(&[cbo, kind.as_str()]);
        }
        for class in crate::event::ErrorClass::ALL {
            self.transfer_errors
                .with_label_values(&[cbo, class.as_str()]);
        }
        for tt in ["cold", "warm"] {
            for target in ["worker", "queue"] {
                for outcome in crate::tracker::Outcome::ALL {
                    self.transfers
                        .with_label_values(&[cbo, tt, target, outcome.as_str()]);
                }
            }
            self.completion_seconds.with_label_values(&[cbo, tt]);
        }
        self.notification_seconds.with_label_values(&[cbo]);
        self.history_lost.with_label_values(&[cbo]);
        for reason in Reject::PER_CBO {
            self.events_rejected
                .with_label_values(&[cbo, reason.as_str()]);
        }
        self.events_duplicate.with_label_values(&[cbo]);
        self.transfers_evicted.with_label_values(&[cbo]);
        self.open_transfers.with_label_values(&[cbo]);
        for result in crate::twilio::PollResult::ALL {
            self.taskrouter_polls
                .with_label_values(&[cbo, result.as_str()]);
        }
        self.taskrouter_bad_requests.with_label_values(&[cbo]);
        self.transfers_disabled.with_label_values(&[cbo]);
        for rule in crate::rules::RuleId::ALL {
            for state in crate::rules::RuleState::ALL {
                let v = i64::from(state == crate::rules::RuleState::Ok);
                self.rule_state
                    .with_label_values(&[cbo, rule.as_str(), state.as_str()])
                    .set(v);
            }
        }
    }

    pub fn reject(&self, cbo: &str, reason: Reject) {
        self.events_rejected
            .with_label_values(&[cbo, reason.as_str()])
            .inc();
    }

    /// The text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
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
