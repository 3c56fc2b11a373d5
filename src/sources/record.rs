//! Polls Twilio's own record of each CBO's transfers (SPEC §2b): TaskRouter's Events API
//! (filtered by the chat-transfer workflow), the functions' logs and the debugger's alerts.
//! Each source keeps a durable cursor under `state_dir/cursors/`, reaches back `overlap`
//! before it and drops what it has already taken (by SID), so a restart or an outage neither
//! loses nor double-counts; a 429 pushes the next poll back by Twilio's `Retry-After`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::Shared;
use crate::event::{Event, Source};
use crate::sid::{EnvironmentSid, ServiceSid, WorkflowSid, WorkspaceSid};
use crate::sources::twilio_record::{Alert, LogLine, LogMeaning, Mapped, TaskRouterEvent};
use crate::state::SignalSource;
use crate::twilio::{PollResult, TwilioClient, TwilioError};

pub const CURSORS_DIR: &str = "cursors";
/// Pages followed in one poll of one source (1,000 items each).
const MAX_PAGES: usize = 50;
/// How far behind now Twilio's record is taken as complete: a poll moves its cursor to now
/// less this (or to the newest item, if later), and the next reaches `overlap` further back.
const RECORD_LAG_MS: i64 = 60_000;

/// Where one source has read up to, and the SIDs taken in the overlap it reads again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Everything before this (event time, ms) has been read, less `overlap`.
    #[serde(default)]
    pub since_ms: Option<i64>,
    /// SID -> event time of what was taken at or after `since_ms - overlap`.
    #[serde(default)]
    pub seen: BTreeMap<String, i64>,
}

impl Cursor {
    /// Where the next read starts.
    pub fn start_ms(&self, now_ms: i64, overlap_ms: i64, first_read_ms: i64) -> i64 {
        match self.since_ms {
            Some(s) => s - overlap_ms,
            None => now_ms - first_read_ms,
        }
    }

    /// Of `items` (SID, event time, item), those not taken before, oldest first; remembers
    /// them and moves the cursor to `read_until_ms` (or the newest item, if later).
    pub fn take<T>(
        &mut self,
        items: Vec<(String, i64, T)>,
        read_until_ms: i64,
        overlap_ms: i64,
    ) -> Vec<T> {
        let mut fresh: Vec<(i64, T)> = Vec::new();
        for (sid, at, item) in items {
            if self.seen.insert(sid, at).is_none() {
                fresh.push((at, item));
            }
        }
        fresh.sort_by_key(|(at, _)| *at);
        let newest = fresh.last().map(|(at, _)| *at).unwrap_or(i64::MIN);
        let since = self
            .since_ms
            .unwrap_or(i64::MIN)
            .max(read_until_ms)
            .max(newest);
        self.since_ms = Some(since);
        // `StartDate` has whole seconds: keep a little more than the overlap.
        let keep_from = since - overlap_ms - 2_000;
        self.seen.retain(|_, at| *at >= keep_from);
        fresh.into_iter().map(|(_, t)| t).collect()
    }
}

/// The cursors of one CBO, as saved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursors {
    #[serde(default)]
    pub taskrouter_events: Cursor,
    #[serde(default)]
    pub serverless_logs: Cursor,
    #[serde(default)]
    pub twilio_alerts: Cursor,
}

impl Cursors {
    pub fn path(state_dir: &std::path::Path, cbo: &str) -> PathBuf {
        state_dir.join(CURSORS_DIR).join(format!("{cbo}.json"))
    }

    /// Reads a CBO's cursors; missing is empty, unreadable is named and empty (the first
    /// poll then reads `first_read` back, as on a first start).
    pub fn load(path: &std::path::Path) -> Cursors {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "cannot read the source cursors; reading from first_read back");
                Cursors::default()
            }),
            Err(_) => Cursors::default(),
        }
    }

    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec(self).expect("cursors serialize");
        crate::store::write_atomic(path, &bytes)
    }
}

/// `2027-01-15T08:00:00Z`: Twilio's `StartDate` (whole seconds, rounded down).
fn start_date(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms.div_euclid(1000) * 1000)
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `next_page_url` on the configured base URL (a proxy, or a simulator in tests): Twilio
/// writes its own host there.
fn rebase(base: &str, next: &str) -> String {
    let path = match next.find("://") {
        Some(i) => next[i + 3..].find('/').map_or("/", |j| &next[i + 3 + j..]),
        None => next,
    };
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Every page of a list resource, following `meta.next_page_url`.
pub async fn pages(
    client: &TwilioClient,
    base: &str,
    path: &str,
    query: &[(&str, String)],
    key: &str,
    resource: &str,
) -> Result<Vec<Value>, TwilioError> {
    let mut url = format!("{}{path}", base.trim_end_matches('/'));
    let mut query = query.to_vec();
    let mut items = Vec::new();
    for n in 1.. {
        let page: Value = client.get(&url, &query, resource).await?;
        match page.get(key).and_then(Value::as_array) {
            Some(list) => items.extend(list.iter().cloned()),
            None => {
                return Err(TwilioError::Decode {
                    resource: resource.to_string(),
                    message: format!("no `{key}` list in the answer"),
                });
            }
        }
        let Some(next) = page["meta"]["next_page_url"].as_str() else {
            break;
        };
        if n >= MAX_PAGES {
            tracing::warn!(
                resource,
                pages = n,
                "more pages than one poll reads; the rest comes next poll"
            );
            break;
        }
        url = rebase(base, next);
        query.clear();
    }
    Ok(items)
}

/// Which alerts of an account are this CBO's: those about its workspace or its functions,
/// or every one when it is the account's only CBO.
#[derive(Debug, Clone)]
struct AlertScope {
    workspace: WorkspaceSid,
    service: Option<ServiceSid>,
    only_cbo_of_account: bool,
}

impl AlertScope {
    fn covers(&self, v: &Value) -> bool {
        let url = v["request_url"].as_str().unwrap_or_default();
        self.only_cbo_of_account
            || url.contains(self.workspace.as_str())
            || self
                .service
                .is_some_and(|s| v["service_sid"].as_str() == Some(s.as_str()))
    }
}

/// One CBO's poller of Twilio's record.
pub struct RecordPoller {
    key: String,
    client: TwilioClient,
    workspace: WorkspaceSid,
    workflow: WorkflowSid,
    functions: Option<(ServiceSid, EnvironmentSid)>,
    alerts: AlertScope,
    cursors: Cursors,
    path: PathBuf,
}

impl RecordPoller {
    /// A poller for `cbo`, or `None` when it cannot be polled (no credentials, workspace or
    /// sound workflow SID: those are reported by the configuration poll).
    pub fn new(
        config: &crate::config::Config,
        cbo: &crate::config::Cbo,
        clients: &crate::Clients,
    ) -> Option<RecordPoller> {
        let account = cbo.account_sid?;
        let client = clients.get(&account)?.clone();
        let workspace = cbo.workspace_sid?;
        let workflow = *cbo.workflow.sid.as_ref().ok()?;
        let path = Cursors::path(&config.server.state_dir, cbo.key.as_str());
        let sharing = config
            .cbos
            .iter()
            .filter(|c| c.account_sid == Some(account))
            .count();
        Some(RecordPoller {
            key: cbo.key.to_string(),
            client,
            workspace,
            workflow,
            functions: cbo
                .serverless_service_sid
                .zip(cbo.serverless_environment_sid),
            alerts: AlertScope {
                workspace,
                service: cbo.serverless_service_sid,
                only_cbo_of_account: sharing == 1,
            },
            cursors: Cursors::load(&path),
            path,
        })
    }

    pub fn cursors(&self) -> &Cursors {
        &self.cursors
    }

    /// TaskRouter's events of the chat-transfer workflow since the cursor, as transfers.
    pub async fn taskrouter_events(&mut self, shared: &Shared) -> Result<usize, TwilioError> {
        let record = &shared.config().record;
        let now = shared.clock.now_ms();
        let overlap = record.overlap.as_millis() as i64;
        let start = self.cursors.taskrouter_events.start_ms(
            now,
            overlap,
            record.first_read.as_millis() as i64,
        );
        let path = format!("/v1/Workspaces/{}/Events", self.workspace);
        let query = [
            ("WorkflowSid", self.workflow.to_string()),
            ("StartDate", start_date(start)),
            ("PageSize", "1000".to_string()),
        ];
        let items = pages(
            &self.client,
            &shared.config().twilio.taskrouter_url,
            &path,
            &query,
            "events",
            &format!("TaskRouter events of workspace {}", self.workspace),
        )
        .await?;
        let parsed = items
            .iter()
            .filter_map(|v| match TaskRouterEvent::from_api(v) {
                Ok(e) => Some((e.sid.clone().unwrap_or_default(), e.at_ms, e)),
                Err(why) => {
                    tracing::debug!(cbo = %self.key, why, "a TaskRouter event without what a transfer needs");
                    None
                }
            })
            .filter(|(sid, _, _)| !sid.is_empty())
            .collect();
        let fresh = self
            .cursors
            .taskrouter_events
            .take(parsed, now - RECORD_LAG_MS, overlap);
        let taken = fresh.len();
        take_taskrouter_events(
            shared,
            &self.key,
            &self.workflow,
            fresh,
            Source::TaskRouterEvents,
        );
        if let Some(state) = shared.fleet.get(&self.key) {
            state.taskrouter_covered(now - RECORD_LAG_MS);
        }
        Ok(taken)
    }

    /// The functions' log lines since the cursor: plugin events and Bad Requests.
    pub async fn serverless_logs(&mut self, shared: &Shared) -> Result<usize, TwilioError> {
        let Some((service, environment)) = self.functions else {
            return Ok(0);
        };
        let record = &shared.config().record;
        let now = shared.clock.now_ms();
        let overlap = record.overlap.as_millis() as i64;
        let start = self.cursors.serverless_logs.start_ms(
            now,
            overlap,
            record.first_read.as_millis() as i64,
        );
        let path = format!("/v1/Services/{service}/Environments/{environment}/Logs");
        let query = [
            ("StartDate", start_date(start)),
            ("PageSize", "1000".to_string()),
        ];
        let items = pages(
            &self.client,
            &shared.config().twilio.serverless_url,
            &path,
            &query,
            "logs",
            &format!("logs of serverless environment {environment}"),
        )
        .await?;
        let parsed = items
            .iter()
            .filter_map(|v| LogLine::from_api(v).ok())
            .map(|l| (l.sid.clone(), l.at_ms, l))
            .collect();
        let fresh = self
            .cursors
            .serverless_logs
            .take(parsed, now - RECORD_LAG_MS, overlap);
        let taken = fresh.len();
        let Some(state) = shared.fleet.get(&self.key) else {
            return Ok(taken);
        };
        let mut events = Vec::new();
        for line in fresh {
            match line.meaning() {
                LogMeaning::Event(e) => events.push(*e),
                LogMeaning::BadRequest {
                    at_ms,
                    conversation,
                } => {
                    state.bad_request_signal(
                        SignalSource::ServerlessLogs,
                        at_ms,
                        conversation,
                        now,
                    );
                }
                LogMeaning::Invalid(why) => {
                    tracing::warn!(cbo = %self.key, log = %line.sid, error = %why, "a [ConversationTransfer] line in the functions' logs is not a valid event");
                    state.reject_one(crate::metrics::Reject::Invalid);
                }
                LogMeaning::Other => {}
            }
        }
        ingest(shared, &self.key, events);
        Ok(taken)
    }

    /// The debugger's error-level alerts since the cursor: counted by code; Bad Requests of
    /// TaskRouter's Tasks endpoint or a transfer function count as Bad Requests.
    pub async fn twilio_alerts(&mut self, shared: &Shared) -> Result<usize, TwilioError> {
        let record = &shared.config().record;
        let now = shared.clock.now_ms();
        let overlap = record.overlap.as_millis() as i64;
        let start =
            self.cursors
                .twilio_alerts
                .start_ms(now, overlap, record.first_read.as_millis() as i64);
        let query = [
            ("LogLevel", "error".to_string()),
            ("StartDate", start_date(start)),
            ("PageSize", "1000".to_string()),
        ];
        let items = pages(
            &self.client,
            &shared.config().twilio.monitor_url,
            "/v1/Alerts",
            &query,
            "alerts",
            &format!("debugger alerts of account {}", self.client.account()),
        )
        .await?;
        let parsed = items
            .iter()
            .filter(|v| self.alerts.covers(v))
            .filter(|v| v["log_level"].as_str().is_none_or(|l| l == "error"))
            .filter_map(|v| Alert::from_api(v).ok())
            .map(|a| (a.sid.clone(), a.at_ms, a))
            .collect();
        let fresh = self
            .cursors
            .twilio_alerts
            .take(parsed, now - RECORD_LAG_MS, overlap);
        let taken = fresh.len();
        let (Some(state), Some(series)) =
            (shared.fleet.get(&self.key), shared.metrics.cbo(&self.key))
        else {
            return Ok(taken);
        };
        for alert in fresh {
            series.twilio_alert(&alert.code);
            if alert.bad_request {
                state.bad_request_signal(
                    SignalSource::TwilioAlerts,
                    alert.at_ms,
                    alert.conversation,
                    now,
                );
            }
        }
        Ok(taken)
    }

    /// Writes the cursors when the poll moved them, on a blocking thread (an fsync and a
    /// rename must not hold an async worker).
    async fn save(&self, before: &Cursors) {
        if &self.cursors == before {
            return;
        }
        let (cursors, path) = (self.cursors.clone(), self.path.clone());
        let saved = tokio::task::spawn_blocking(move || cursors.save(&path)).await;
        if let Ok(Err(e)) = saved {
            // Kept in memory; the next poll tries again. A restart before then reads the
            // overlap again, which the windows (empty after a restart) take once.
            tracing::error!(cbo = %self.key, path = %self.path.display(), error = %e, "cannot save the source cursors");
        }
    }

    /// One poll of every source that is on; the wait Twilio asked for, if any.
    pub async fn cycle(&mut self, shared: &Shared) -> Option<Duration> {
        let before = self.cursors.clone();
        let record = shared.config().record.clone();
        let series = shared.metrics.cbo(&self.key);
        let key = self.key.clone();
        let mut retry_after = None;
        let state = shared.fleet.get(&self.key);
        let now = crate::clock::rfc3339(shared.clock.now_ms());
        let mut count = |source: &'static str, r: Result<usize, TwilioError>, cursor: &Cursor| {
            let result = match &r {
                Ok(_) => PollResult::Ok,
                Err(e) => {
                    tracing::warn!(cbo = %key, source, error = %e, "cannot read Twilio's record");
                    retry_after = retry_after.max(e.retry_after());
                    e.poll_result()
                }
            };
            if let Some(s) = &series {
                s.source_poll(source, result);
            }
            if let Some(state) = &state {
                state.taskrouter().sources.insert(
                    source,
                    crate::health::SourceStatus {
                        last_poll: Some(now.clone()),
                        last_result: Some(result.as_str()),
                        last_error: r.as_ref().err().map(|e| e.to_string()),
                        taken: *r.as_ref().unwrap_or(&0),
                        read_until: cursor.since_ms.map(crate::clock::rfc3339),
                    },
                );
            }
        };
        if record.taskrouter_events {
            let r = self.taskrouter_events(shared).await;
            count("taskrouter_events", r, &self.cursors.taskrouter_events);
        }
        if record.serverless_logs && self.functions.is_some() {
            let r = self.serverless_logs(shared).await;
            count("serverless_logs", r, &self.cursors.serverless_logs);
        }
        if record.twilio_alerts {
            let r = self.twilio_alerts(shared).await;
            count("twilio_alerts", r, &self.cursors.twilio_alerts);
        }
        self.save(&before).await;
        retry_after
    }
}

/// Hands plugin-family or TaskRouter events to a CBO at the daemon's now.
fn ingest(shared: &Shared, key: &str, events: Vec<Event>) -> usize {
    let Some(state) = shared.fleet.get(key) else {
        return 0;
    };
    let mut rejected = Vec::new();
    state.ingest(
        events.into_iter().enumerate(),
        shared.clock.now_ms(),
        &mut rejected,
    )
}

/// TaskRouter events (polled or pushed) of one CBO, oldest first: the transfers among them go
/// to its state; failed reservations are counted. Returns how many were transfer events.
pub fn take_taskrouter_events(
    shared: &Shared,
    key: &str,
    workflow: &WorkflowSid,
    events: Vec<TaskRouterEvent>,
    source: Source,
) -> usize {
    let transfers = taskrouter_transfers(shared, key, workflow, events, source);
    let n = transfers.len();
    ingest(shared, key, transfers);
    n
}

/// The transfer events among TaskRouter events of one CBO, oldest first; failed reservations
/// are counted.
pub fn taskrouter_transfers(
    shared: &Shared,
    key: &str,
    workflow: &WorkflowSid,
    mut events: Vec<TaskRouterEvent>,
    source: Source,
) -> Vec<Event> {
    events.sort_by_key(|e| e.at_ms);
    let series = shared.metrics.cbo(key);
    let mut transfers = Vec::new();
    for e in &events {
        match e.map(workflow, source) {
            Mapped::Event(ev) => transfers.push(*ev),
            Mapped::FailedAttempt(rejected) => {
                if let Some(s) = &series {
                    s.reservation_failure(rejected);
                }
            }
            Mapped::Ignored(_) => {}
        }
    }
    transfers
}

/// Polls one CBO's record every `poll_interval` (jittered) until `stop`.
pub async fn run(shared: Arc<Shared>, mut poller: RecordPoller, mut stop: watch::Receiver<bool>) {
    let interval = shared.config().twilio.poll_interval;
    let mut wait = interval.mul_f64(fastrand::f64());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
        let asked = tokio::select! {
            r = poller.cycle(&shared) => r,
            _ = stop.changed() => break,
        };
        wait = interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        if let Some(asked) = asked.filter(|d| *d > wait) {
            tracing::warn!(cbo = %poller.key, wait = %humantime::format_duration(asked), "Twilio throttles this account: next read of its record after its Retry-After");
            wait = asked;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_takes_each_sid_once_and_reaches_back_its_overlap() {
        let mut c = Cursor::default();
        let t = 1_800_000_000_000;
        assert_eq!(c.start_ms(t, 120_000, 900_000), t - 900_000);
        let got = c.take(
            vec![("EV2".into(), t + 2, 2), ("EV1".into(), t + 1, 1)],
            t - 900_000,
            120_000,
        );
        assert_eq!(got, vec![1, 2]);
        assert_eq!(c.since_ms, Some(t + 2));
        // The overlap brings them again, with one new.
        let got = c.take(
            vec![
                ("EV1".into(), t + 1, 1),
                ("EV2".into(), t + 2, 2),
                ("EV3".into(), t + 3, 3),
            ],
            t + 2 - 120_000,
            120_000,
        );
        assert_eq!(got, vec![3]);
        // Far past: what the overlap can no longer return is forgotten.
        c.take(Vec::<(String, i64, ())>::new(), t + 600_000, 120_000);
        assert!(c.seen.is_empty());
        assert_eq!(c.start_ms(t + 700_000, 120_000, 900_000), t + 480_000);
    }

    #[test]
    fn next_page_urls_are_followed_on_the_configured_base() {
        assert_eq!(
            rebase(
                "http://127.0.0.1:5000/",
                "https://taskrouter.twilio.com/v1/Workspaces/WS1/Events?PageSize=1000&Page=1&PageToken=PA1"
            ),
            "http://127.0.0.1:5000/v1/Workspaces/WS1/Events?PageSize=1000&Page=1&PageToken=PA1"
        );
        assert_eq!(start_date(1_800_000_000_999), "2027-01-15T08:00:00Z");
    }
}
