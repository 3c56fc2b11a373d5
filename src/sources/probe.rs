//! Test transfers (SPEC §3, the seed's `initiateTestTransfer`): a task through the CBO's chat-transfer workflow aimed at a test queue, routed within 10 s or not, then canceled and deleted on every path; its result is a transfer like any other.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::Shared;
use crate::config::Probe;
use crate::event::{Event, EventKind, TargetType, TransferError, TransferType};
use crate::journal::{Op, Record, Stored};
use crate::sid::{ConversationSid, QueueSid, TaskSid, WorkflowSid, WorkspaceSid};
use crate::twilio::TwilioClient;
use crate::twilio::taskrouter::TaskRouter;

/// How long TaskRouter has to put a test transfer in its queue.
pub const ROUTING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the task is read while waiting.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// The attribute every test transfer carries, by which orphans are found.
pub const PROBE_ATTRIBUTE: &str = "transferGuardProbe";

/// How one test transfer ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// In the test queue after this long.
    Routed(Duration),
    /// Not in the test queue within `ROUTING_TIMEOUT`.
    NotRouted,
    /// TaskRouter refused the task with a 400: the seed's Bad Request.
    BadRequest(String),
    /// Twilio could not be asked (5xx, timeout, 401): not a transfer failure.
    Error(String),
}

impl Outcome {
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Routed(_) => "routed",
            Outcome::NotRouted => "not_routed",
            Outcome::BadRequest(_) => "bad_request",
            Outcome::Error(_) => "error",
        }
    }
}

/// One CBO's test transfers.
pub struct Prober {
    client: TwilioClient,
    base_url: String,
    workspace: WorkspaceSid,
    workflow: WorkflowSid,
    probe: Probe,
    queue_name: Option<String>,
}

impl Prober {
    /// `None` when the CBO has no probe, or cannot be asked (no credentials, workspace or
    /// valid workflow SID).
    pub fn new(
        config: &crate::config::Config,
        cbo: &crate::config::Cbo,
        clients: &crate::Clients,
    ) -> Option<Prober> {
        Some(Prober {
            client: clients.get(&cbo.account_sid?)?.clone(),
            base_url: config.twilio.taskrouter_url.clone(),
            workspace: cbo.workspace_sid?,
            workflow: *cbo.workflow.sid.as_ref().ok()?,
            probe: cbo.probe.clone()?,
            queue_name: None,
        })
    }

    fn api(&self) -> TaskRouter<'_> {
        TaskRouter {
            client: &self.client,
            base_url: &self.base_url,
        }
    }

    /// Deletes every task carrying `transferGuardProbe` (left by a daemon that died
    /// mid-probe); returns how many.
    pub async fn remove_orphans(&self) -> Result<usize, String> {
        let api = self.api();
        let orphans = api
            .tasks_where(&self.workspace, &format!("{PROBE_ATTRIBUTE} == true"))
            .await
            .map_err(|e| e.to_string())?;
        let mut removed = 0;
        for t in orphans {
            if let Ok(sid) = TaskSid::parse(&t.sid) {
                self.clean_up(&sid).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Cancels, then deletes, a test transfer's task; a failure is logged (the next orphan
    /// sweep takes it).
    async fn clean_up(&self, task: &TaskSid) {
        let api = self.api();
        let _ = api
            .cancel_task(&self.workspace, task, "transfer-guard test transfer")
            .await;
        if let Err(e) = api.delete_task(&self.workspace, task).await
            && e.status() != Some(404)
        {
            tracing::warn!(task = %task, error = %e, "cannot delete a test transfer's task; the next sweep will");
        }
    }

    /// The queue's name, as the template's workflow routes by it.
    async fn queue_name(&mut self) -> Result<String, String> {
        if let Some(n) = &self.queue_name {
            return Ok(n.clone());
        }
        let q = self
            .api()
            .task_queue(&self.workspace, &self.probe.queue)
            .await
            .map_err(|e| e.to_string())?;
        let name = q.friendly_name.unwrap_or_default();
        self.queue_name = Some(name.clone());
        Ok(name)
    }

    /// One test transfer: created with the attributes the template's `create-transfer-task`
    /// function sets, watched until TaskRouter puts it in the test queue (or 10 s pass, or
    /// `stop`), then canceled and deleted whatever happened.
    pub async fn once(
        &mut self,
        conversation: &ConversationSid,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let name = match self.queue_name().await {
            Ok(n) => n,
            Err(e) => return Outcome::Error(e),
        };
        let attributes = json!({
            "transferTargetType": "queue",
            "transferTargetSid": self.probe.queue.as_str(),
            "transferQueueName": name,
            "conversations": {"conversation_id": conversation.as_str()},
            PROBE_ATTRIBUTE: true,
        });
        let started = tokio::time::Instant::now();
        let task = match self
            .api()
            .create_task(&self.workspace, &self.workflow, &attributes)
            .await
        {
            Ok(t) => t,
            Err(e) if e.status() == Some(400) => return Outcome::BadRequest(e.to_string()),
            Err(e) => {
                // A create that timed out may have created it: sweep.
                let _ = self.remove_orphans().await;
                return Outcome::Error(e.to_string());
            }
        };
        let Ok(sid) = TaskSid::parse(&task.sid) else {
            return Outcome::Error(format!("TaskRouter answered a task SID {:?}", task.sid));
        };
        let routed = |t: &crate::twilio::taskrouter::Task| {
            t.task_queue_sid.as_deref() == Some(self.probe.queue.as_str())
        };
        let mut outcome = if routed(&task) {
            Outcome::Routed(started.elapsed())
        } else {
            Outcome::NotRouted
        };
        while outcome == Outcome::NotRouted && started.elapsed() < ROUTING_TIMEOUT {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.changed() => {
                    outcome = Outcome::Error("stopped while the test transfer was waiting".into());
                    break;
                }
            }
            match self.api().task(&self.workspace, &sid).await {
                Ok(t) if routed(&t) => outcome = Outcome::Routed(started.elapsed()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(task = %sid, error = %e, "cannot read the test transfer's task")
                }
            }
        }
        self.clean_up(&sid).await;
        outcome
    }

    fn queue(&self) -> &QueueSid {
        &self.probe.queue
    }
}

/// A conversation SID for one test transfer (not a real conversation: the probe's own).
fn conversation_for(n: u64) -> ConversationSid {
    ConversationSid::parse(&format!("CH{:016x}{:016x}", 0x7472_616e_7366_6572_u64, n))
        .expect("34 characters of hex")
}

/// A test transfer's result as transfer events (source `probe`): `initiated`, then
/// `completed` when routed or `failed` (a Bad Request, or not routed); nothing when Twilio
/// could not be asked, which is not a transfer failure.
pub fn events(
    outcome: &Outcome,
    conversation: &ConversationSid,
    queue: &QueueSid,
    started_ms: i64,
    id: &str,
) -> Vec<Event> {
    let event = |kind, at_ms, error| Event {
        kind,
        timestamp_ms: at_ms,
        conversation_sid: *conversation,
        transfer_id: Some(id.into()),
        transfer_type: Some(TransferType::Cold),
        target_type: Some(TargetType::Queue),
        error,
        history_preserved: None,
        cbo: None,
        task_sid: None,
        source: crate::event::Source::Probe,
    };
    let end = match outcome {
        Outcome::Routed(took) => event(
            EventKind::Completed,
            started_ms + took.as_millis() as i64,
            None,
        ),
        Outcome::NotRouted => event(
            EventKind::Failed,
            started_ms + ROUTING_TIMEOUT.as_millis() as i64,
            Some(TransferError {
                code: None,
                status: None,
                message: Some(format!(
                    "test transfer not routed to queue {queue} within {}",
                    humantime::format_duration(ROUTING_TIMEOUT)
                )),
            }),
        ),
        Outcome::BadRequest(why) => event(
            EventKind::Failed,
            started_ms,
            Some(TransferError {
                code: None,
                status: Some(400),
                message: Some(format!("TaskRouter error: Bad Request ({why})")),
            }),
        ),
        Outcome::Error(_) => return Vec::new(),
    };
    vec![event(EventKind::Initiated, started_ms, None), end]
}

/// Runs one CBO's test transfers until `stop`: orphans removed first; then every `interval`,
/// every `during_validation` (a minute) while a validation window of the CBO runs. Test transfers change no
/// configuration, so they run in dry run too.
pub async fn run(
    shared: Arc<Shared>,
    mut prober: Prober,
    key: String,
    mut stop: watch::Receiver<bool>,
) {
    match prober.remove_orphans().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(cbo = %key, removed = n, "removed test transfers left behind by an earlier run")
        }
        Err(e) => {
            tracing::warn!(cbo = %key, error = %e, "cannot look for test transfers left behind")
        }
    }
    let mut n: u64 = 0;
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        let every = if shared.validations.running(&key) {
            prober.probe.during_validation
        } else {
            prober.probe.interval
        };
        let due = last.map_or(tokio::time::Instant::now(), |l| l + every);
        // Look again every few seconds: a validation window may start meanwhile.
        let wake = due.min(tokio::time::Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => break,
        }
        if tokio::time::Instant::now() < due {
            continue;
        }
        last = Some(tokio::time::Instant::now());
        // Replicas: only the leader places test transfers; every replica takes their results
        // from the store.
        if !shared.actions.leading() {
            continue;
        }
        n += 1;
        let started_ms = shared.clock.now_ms();
        let conversation = conversation_for(started_ms as u64 ^ (n << 48));
        let outcome = prober.once(&conversation, &mut stop).await;
        let records = record(
            &shared,
            &key,
            &outcome,
            &conversation,
            prober.queue(),
            started_ms,
            n,
        );
        if let Err(e) = shared.share_off_worker(records).await {
            tracing::error!(cbo = %key, error = %e, "a test transfer's result not taken");
        }
        if *stop.borrow() {
            break;
        }
    }
}

/// Counts and logs a test transfer; returns what the CBO takes of it (its result, and the
/// transfer's events).
fn record(
    shared: &Shared,
    key: &str,
    outcome: &Outcome,
    conversation: &ConversationSid,
    queue: &QueueSid,
    started_ms: i64,
    n: u64,
) -> Vec<Record> {
    let routed = match outcome {
        Outcome::Routed(took) => Some(took.as_secs_f64()),
        _ => None,
    };
    if let Some(m) = shared.metrics.cbo(key) {
        m.probe(outcome.result(), routed);
    }
    match outcome {
        Outcome::Routed(took) => tracing::info!(cbo = key, took = ?took, "test transfer routed"),
        Outcome::Error(e) => tracing::warn!(cbo = key, error = %e, "test transfer could not run"),
        o => tracing::warn!(cbo = key, result = o.result(), "test transfer failed"),
    }
    let id = format!("probe-{started_ms}-{n}");
    let now = shared.clock.now_ms();
    let mut records = vec![Record {
        cbo: key.to_string(),
        now: started_ms,
        op: Op::Probed {
            started: started_ms,
            result: outcome.result().to_string(),
        },
    }];
    records.extend(
        events(outcome, conversation, queue, started_ms, &id)
            .iter()
            .map(|e| Record {
                cbo: key.to_string(),
                now,
                op: Op::Event(Stored::of(e)),
            }),
    );
    records
}
