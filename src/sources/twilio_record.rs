//! Twilio's own record of a transfer, mapped onto transfer events (SPEC §2b): TaskRouter events
//! (from the Events API, the workspace's `EventCallbackUrl` or an Event Streams sink), the
//! functions' log lines and the debugger's alerts.

use serde_json::{Map, Value};

use crate::event::{Event, EventKind, Source, TargetType, TransferError, TransferType};
use crate::sid::{ConversationSid, TaskSid, WorkflowSid};

use super::probe::PROBE_ATTRIBUTE;

/// One TaskRouter event, whichever way it came. Field names differ by path (`task_sid` in the
/// Events API and Event Streams, `TaskSid` in the callback); they are read without case or
/// underscores.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRouterEvent {
    /// `EV…`, when the path gives one: duplicates are dropped by it.
    pub sid: Option<String>,
    pub event_type: String,
    pub at_ms: i64,
    pub task_sid: Option<String>,
    pub workflow_sid: Option<String>,
    pub attributes: Option<Value>,
    pub reason: Option<String>,
}

/// What a TaskRouter event means for transfers.
#[derive(Debug, PartialEq)]
pub enum Mapped {
    Event(Box<Event>),
    /// A reservation rejected (`true`) or timed out: a failed attempt, not an outcome.
    FailedAttempt(bool),
    /// Not a transfer event; the reason, for debugging.
    Ignored(&'static str),
}

/// `TaskSid`, `task_sid` and `tasksid` read alike.
fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A flat view of the fields of one event, keyed by normalised name; the first spelling wins.
struct Fields<'a>(std::collections::HashMap<String, &'a Value>);

impl<'a> Fields<'a> {
    fn of(maps: &[&'a Map<String, Value>]) -> Fields<'a> {
        let mut out = std::collections::HashMap::new();
        for m in maps {
            for (k, v) in *m {
                out.entry(norm(k)).or_insert(v);
            }
        }
        Fields(out)
    }

    fn text(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(|v| text(v))
    }

    fn first(&self, names: &[&str]) -> Option<String> {
        names.iter().find_map(|n| self.text(n))
    }
}

fn parse_time(s: &str) -> Option<i64> {
    if let Ok(n) = s.parse::<i64>() {
        // Seconds (the callback's `Timestamp`) or milliseconds (`event_date_ms`).
        return Some(if n < 100_000_000_000 { n * 1000 } else { n });
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl TaskRouterEvent {
    fn from_fields(
        f: &Fields<'_>,
        fallback_type: Option<String>,
        fallback_time: Option<i64>,
    ) -> Result<TaskRouterEvent, String> {
        let event_type = f
            .first(&["eventtype"])
            .or(fallback_type)
            .ok_or("no event type")?;
        let at_ms = f
            .first(&["eventdatems", "eventdate", "timestampms", "timestamp"])
            .and_then(|t| parse_time(&t))
            .or(fallback_time)
            .ok_or("no event time")?;
        let attributes = f.0.get("taskattributes").and_then(|v| match v {
            Value::String(s) => serde_json::from_str(s).ok(),
            Value::Object(_) => Some((*v).clone()),
            _ => None,
        });
        let task_sid = f.first(&["tasksid"]).or_else(|| {
            (f.text("resourcetype").as_deref() == Some("task"))
                .then(|| f.text("resourcesid"))
                .flatten()
        });
        Ok(TaskRouterEvent {
            sid: f
                .first(&["sid", "eventsid"])
                .filter(|s| s.starts_with("EV")),
            event_type,
            at_ms,
            task_sid,
            workflow_sid: f.first(&["workflowsid"]),
            attributes,
            reason: f.first(&[
                "taskcanceledreason",
                "taskcancelledreason",
                "reason",
                "taskcompletedreason",
                "taskdeletedreason",
            ]),
        })
    }

    /// An Event resource of `GET /v1/Workspaces/{WS}/Events`: its `event_data` holds the task.
    pub fn from_api(v: &Value) -> Result<TaskRouterEvent, String> {
        let top = v.as_object().ok_or("not an object")?;
        let empty = Map::new();
        let data = top
            .get("event_data")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        TaskRouterEvent::from_fields(&Fields::of(&[top, data]), None, None)
    }

    /// The form of a workspace's `EventCallbackUrl` request.
    pub fn from_form(params: &[(String, String)]) -> Result<TaskRouterEvent, String> {
        let map: Map<String, Value> = params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        TaskRouterEvent::from_fields(&Fields::of(&[&map]), None, None)
    }

    /// One CloudEvent of an Event Streams webhook sink (`type`
    /// `com.twilio.taskrouter.task.created`, the TaskRouter event in `data.payload`).
    pub fn from_cloud_event(v: &Value) -> Result<TaskRouterEvent, String> {
        let top = v.as_object().ok_or("not an object")?;
        let ty = top.get("type").and_then(Value::as_str).unwrap_or_default();
        let Some(short) = ty.strip_prefix("com.twilio.taskrouter.") else {
            return Err(format!("type {ty:?} is not a TaskRouter event"));
        };
        let empty = Map::new();
        let data = top.get("data").and_then(Value::as_object).unwrap_or(&empty);
        let payload = data
            .get("payload")
            .and_then(Value::as_object)
            .unwrap_or(data);
        let time = top.get("time").and_then(Value::as_str).and_then(parse_time);
        let mut e = TaskRouterEvent::from_fields(
            &Fields::of(&[payload, data]),
            Some(short.to_string()),
            time,
        )?;
        if e.sid.is_none() {
            e.sid = top.get("id").and_then(Value::as_str).map(str::to_string);
        }
        Ok(e)
    }

    fn attribute(&self, path: &[&str]) -> Option<&Value> {
        let mut v = self.attributes.as_ref()?;
        for p in path {
            v = v.get(p)?;
        }
        Some(v)
    }

    /// The conversation the transfer moves: `conversations.conversation_id` (set by the
    /// template's `create-transfer-task`), else `originalConversationSid` or `conversationSid`.
    fn conversation(&self) -> Option<ConversationSid> {
        [
            &["conversations", "conversation_id"][..],
            &["originalConversationSid"],
            &["conversationSid"],
            &["conversation_sid"],
        ]
        .iter()
        .filter_map(|p| self.attribute(p)?.as_str())
        .find_map(|s| ConversationSid::parse(s).ok())
    }

    /// Maps it for the CBO whose chat-transfer workflow is `workflow` (SPEC §2b).
    pub fn map(&self, workflow: &WorkflowSid, source: Source) -> Mapped {
        if self
            .workflow_sid
            .as_deref()
            .is_none_or(|w| w != workflow.as_str())
        {
            return Mapped::Ignored("not a task of the chat-transfer workflow");
        }
        if self
            .attribute(&[PROBE_ATTRIBUTE])
            .is_some_and(|v| v == &Value::Bool(true))
        {
            return Mapped::Ignored("a test transfer (it reports itself)");
        }
        let (kind, error) = match self.event_type.as_str() {
            "task.created" => (EventKind::Initiated, None),
            "reservation.created" => (EventKind::Notified, None),
            "reservation.accepted" => (EventKind::Completed, None),
            "reservation.rejected" => return Mapped::FailedAttempt(true),
            "reservation.timeout" => return Mapped::FailedAttempt(false),
            "workflow.timeout" | "task-queue.timeout" => (EventKind::TimedOut, None),
            "task.canceled" | "task.deleted" | "task.system-deleted" => self.ended(),
            _ => return Mapped::Ignored("an event that does not change a transfer"),
        };
        let Some(conversation_sid) = self.conversation() else {
            return Mapped::Ignored("the task names no conversation");
        };
        let Some(task_sid) = self
            .task_sid
            .as_deref()
            .and_then(|t| TaskSid::parse(t).ok())
        else {
            return Mapped::Ignored("no task SID");
        };
        let target_type = match self
            .attribute(&["transferTargetType"])
            .and_then(Value::as_str)
        {
            Some("worker") => Some(TargetType::Worker),
            Some("queue") => Some(TargetType::Queue),
            _ => None,
        };
        // TaskRouter cannot tell a warm invite from a cold transfer; an attribute may, and the
        // plugin's event, joined, does. Without either it is a cold transfer.
        let transfer_type = match self.attribute(&["transferType"]).and_then(Value::as_str) {
            Some("warm") => TransferType::Warm,
            _ => TransferType::Cold,
        };
        Mapped::Event(Box::new(Event {
            kind,
            timestamp_ms: self.at_ms,
            conversation_sid,
            transfer_id: Some(task_sid.as_str().into()),
            transfer_type: Some(transfer_type),
            target_type,
            error,
            history_preserved: None,
            cbo: None,
            task_sid: Some(task_sid),
            source,
        }))
    }

    /// A task canceled or deleted: `cancelled` when the conversation ended or the agent
    /// withdrew the transfer, `timed_out` for a TTL, else `failed` with the reason's class.
    fn ended(&self) -> (EventKind, Option<TransferError>) {
        let reason = self.reason.clone().unwrap_or_default();
        let r = reason.to_ascii_lowercase();
        if r.contains("ttl") || r.contains("timeout") || r.contains("timed out") {
            return (EventKind::TimedOut, None);
        }
        let neutral = (r.contains("conversation")
            && ["ended", "closed", "completed", "inactive"]
                .iter()
                .any(|w| r.contains(w)))
            || r.contains("withdr")
            || r.contains("cancelled by agent")
            || r.contains("canceled by agent")
            || r.contains("customer left");
        if neutral {
            return (EventKind::Cancelled, None);
        }
        let (code, status) = if r.contains("bad request") || r.contains("400") {
            (None, Some(400))
        } else if r.contains("20001") || r.contains("not available") || r.contains("unavailable") {
            (Some(20001), None)
        } else if r.contains("20404") || r.contains("not found") {
            (Some(20404), Some(404))
        } else {
            (None, None)
        };
        let message = if reason.is_empty() {
            format!("TaskRouter {}", self.event_type)
        } else {
            format!("TaskRouter {}: {reason}", self.event_type)
        };
        (
            EventKind::Failed,
            Some(TransferError {
                code,
                status,
                message: Some(message),
            }),
        )
    }
}

/// A Bad Request in words: the seed's "TaskRouter error: Bad Request", or a 400 from TaskRouter.
fn says_bad_request(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("bad request")
        || (t.contains("400")
            && (t.contains("taskrouter") || t.contains("status") || t.contains("httpresponse")))
}

/// The first conversation SID written in `text`.
pub fn conversation_in(text: &str) -> Option<ConversationSid> {
    text.match_indices("CH").find_map(|(i, _)| {
        text.get(i..i + crate::sid::SID_LEN)
            .and_then(|s| ConversationSid::parse(s).ok())
    })
}

/// One line of the functions' logs (`GET /v1/Services/{ZS}/Environments/{ZE}/Logs`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub sid: String,
    pub level: String,
    pub message: String,
    pub at_ms: i64,
}

/// What a log line means.
#[derive(Debug, PartialEq)]
pub enum LogMeaning {
    /// A `[ConversationTransfer] <event>: {json}` line: a plugin event.
    Event(Box<Event>),
    /// A marker line that is not a valid event.
    Invalid(String),
    /// An error-level line carrying a TaskRouter 400 / Bad Request.
    BadRequest {
        at_ms: i64,
        conversation: Option<ConversationSid>,
    },
    Other,
}

impl LogLine {
    pub fn from_api(v: &Value) -> Result<LogLine, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Ok(LogLine {
            sid: s("sid").ok_or("no sid")?,
            level: s("level").unwrap_or_default(),
            message: s("message").unwrap_or_default(),
            at_ms: s("date_created")
                .and_then(|t| parse_time(&t))
                .ok_or("no date_created")?,
        })
    }

    pub fn meaning(&self) -> LogMeaning {
        if crate::event::find_marker(&self.message).is_some() {
            return match crate::event::parse_line(&self.message) {
                Ok(mut e) => {
                    e.source = Source::ServerlessLogs;
                    e.cbo = None;
                    LogMeaning::Event(Box::new(e))
                }
                Err(e) => LogMeaning::Invalid(e.to_string()),
            };
        }
        if self.level.eq_ignore_ascii_case("error") && says_bad_request(&self.message) {
            return LogMeaning::BadRequest {
                at_ms: self.at_ms,
                conversation: conversation_in(&self.message),
            };
        }
        LogMeaning::Other
    }
}

/// One error-level alert of Twilio's debugger (`GET /v1/Alerts`, Monitor API).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub sid: String,
    pub code: String,
    pub at_ms: i64,
    /// A 400 from TaskRouter's Tasks endpoint or from a transfer function.
    pub bad_request: bool,
    pub conversation: Option<ConversationSid>,
}

impl Alert {
    pub fn from_api(v: &Value) -> Result<Alert, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
        let sid = s("sid");
        if sid.is_empty() {
            return Err("no sid".into());
        }
        let at_ms = parse_time(s("date_generated"))
            .or_else(|| parse_time(s("date_created")))
            .ok_or("no date_generated or date_created")?;
        let url = s("request_url").to_ascii_lowercase();
        let about_transfers =
            (url.contains("taskrouter") && url.contains("/tasks")) || url.contains("transfer");
        let text = s("alert_text");
        Ok(Alert {
            sid: sid.to_string(),
            code: s("error_code").to_string(),
            at_ms,
            bad_request: about_transfers && says_bad_request(text),
            conversation: conversation_in(text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const WW: &str = "WW0000000000000000000000000000000a";
    const WT: &str = "WT0000000000000000000000000000000a";
    const CH: &str = "CH0000000000000000000000000000000a";

    fn workflow() -> WorkflowSid {
        WorkflowSid::parse(WW).unwrap()
    }

    fn api(event_type: &str, reason: Option<&str>) -> Value {
        json!({
            "sid": "EV00000000000000000000000000000001",
            "event_type": event_type,
            "event_date": "2027-01-15T08:00:00Z",
            "event_date_ms": 1_800_000_000_000i64,
            "resource_type": "task",
            "resource_sid": WT,
            "event_data": {
                "task_sid": WT,
                "workflow_sid": WW,
                "task_canceled_reason": reason,
                "task_attributes": json!({
                    "transferTargetType": "queue",
                    "transferQueueName": "support",
                    "conversations": {"conversation_id": CH}
                }).to_string(),
            }
        })
    }

    fn kind(v: &Value) -> Option<(EventKind, Option<crate::event::ErrorClass>)> {
        match TaskRouterEvent::from_api(v)
            .unwrap()
            .map(&workflow(), Source::TaskRouterEvents)
        {
            Mapped::Event(e) => Some((e.kind, e.error.map(|e| e.class()))),
            _ => None,
        }
    }

    #[test]
    fn the_spec_mapping_of_taskrouter_events() {
        use crate::event::ErrorClass::*;
        assert_eq!(
            kind(&api("task.created", None)),
            Some((EventKind::Initiated, None))
        );
        assert_eq!(
            kind(&api("reservation.created", None)),
            Some((EventKind::Notified, None))
        );
        assert_eq!(
            kind(&api("reservation.accepted", None)),
            Some((EventKind::Completed, None))
        );
        assert_eq!(
            kind(&api("workflow.timeout", None)),
            Some((EventKind::TimedOut, None))
        );
        assert_eq!(
            kind(&api("task-queue.timeout", None)),
            Some((EventKind::TimedOut, None))
        );
        assert_eq!(
            kind(&api("task.canceled", Some("Task TTL Exceeded"))),
            Some((EventKind::TimedOut, None))
        );
        assert_eq!(
            kind(&api("task.canceled", Some("Conversation ended"))),
            Some((EventKind::Cancelled, None))
        );
        assert_eq!(
            kind(&api("task.canceled", Some("Transfer withdrawn by agent"))),
            Some((EventKind::Cancelled, None))
        );
        assert_eq!(
            kind(&api(
                "task.canceled",
                Some("Worker is not available (20001)")
            )),
            Some((EventKind::Failed, Some(AgentUnavailable)))
        );
        assert_eq!(
            kind(&api("task.system-deleted", None)),
            Some((EventKind::Failed, Some(Other)))
        );
        let e = TaskRouterEvent::from_api(&api("reservation.rejected", None)).unwrap();
        assert_eq!(
            e.map(&workflow(), Source::TaskRouterEvents),
            Mapped::FailedAttempt(true)
        );
        assert_eq!(kind(&api("task.completed", None)), None);
    }

    #[test]
    fn tasks_of_other_workflows_and_test_transfers_are_not_transfers() {
        let mut other = api("task.created", None);
        other["event_data"]["workflow_sid"] = json!("WW0000000000000000000000000000000b");
        assert_eq!(kind(&other), None);
        let mut probe = api("task.created", None);
        probe["event_data"]["task_attributes"] = json!(
            json!({"conversations": {"conversation_id": CH}, PROBE_ATTRIBUTE: true}).to_string()
        );
        assert_eq!(kind(&probe), None);
    }

    #[test]
    fn callback_form_and_cloud_event_read_like_the_api() {
        let attributes =
            json!({"transferTargetType": "worker", "conversations": {"conversation_id": CH}})
                .to_string();
        let form: Vec<(String, String)> = [
            ("EventType", "task.created"),
            ("Sid", "EV00000000000000000000000000000002"),
            ("Timestamp", "1800000000"),
            ("TaskSid", WT),
            ("WorkflowSid", WW),
            ("TaskAttributes", &attributes),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let e = TaskRouterEvent::from_form(&form).unwrap();
        assert_eq!(e.at_ms, 1_800_000_000_000);
        let Mapped::Event(ev) = e.map(&workflow(), Source::TaskRouterCallback) else {
            panic!("{e:?}");
        };
        assert_eq!(
            (ev.kind, ev.target_type),
            (EventKind::Initiated, Some(TargetType::Worker))
        );
        assert_eq!(ev.conversation_sid.as_str(), CH);

        let cloud = json!({
            "specversion": "1.0",
            "type": "com.twilio.taskrouter.reservation.accepted",
            "id": "EV00000000000000000000000000000003",
            "time": "2027-01-15T08:00:05.000Z",
            "data": {"name": "reservation.accepted", "payload": {
                "task_sid": WT, "workflow_sid": WW, "task_attributes": attributes,
            }}
        });
        let e = TaskRouterEvent::from_cloud_event(&cloud).unwrap();
        assert_eq!(e.sid.as_deref(), Some("EV00000000000000000000000000000003"));
        assert_eq!(e.at_ms, 1_800_000_005_000);
        assert!(
            matches!(e.map(&workflow(), Source::EventStreams), Mapped::Event(ev) if ev.kind == EventKind::Completed)
        );
    }

    #[test]
    fn log_lines_are_plugin_events_or_bad_requests() {
        let line = |level: &str, message: &str| LogLine {
            sid: "NO00000000000000000000000000000001".into(),
            level: level.into(),
            message: message.into(),
            at_ms: 1_800_000_000_000,
        };
        let event = line(
            "info",
            &format!(
                r#"[ConversationTransfer] initiated: {{"timestamp":"2027-01-15T08:00:00Z","conversationSid":"{CH}","transferType":"cold","targetType":"queue"}}"#
            ),
        );
        assert!(
            matches!(event.meaning(), LogMeaning::Event(e) if e.source == Source::ServerlessLogs)
        );
        let bad = line(
            "error",
            &format!("create-transfer-task {CH}: TaskRouter error: Bad Request"),
        );
        assert_eq!(
            bad.meaning(),
            LogMeaning::BadRequest {
                at_ms: 1_800_000_000_000,
                conversation: ConversationSid::parse(CH).ok()
            }
        );
        assert_eq!(
            line("info", "TaskRouter error: Bad Request").meaning(),
            LogMeaning::Other
        );
        assert_eq!(
            line("error", "Conversation not found").meaning(),
            LogMeaning::Other
        );
    }

    #[test]
    fn a_400_alert_of_the_tasks_endpoint_is_a_bad_request() {
        let alert = |url: &str, text: &str| {
            Alert::from_api(&json!({
                "sid": "NO00000000000000000000000000000009",
                "error_code": "20001",
                "log_level": "error",
                "alert_text": text,
                "request_url": url,
                "date_generated": "2027-01-15T08:00:00Z",
            }))
            .unwrap()
        };
        let tasks =
            "https://taskrouter.twilio.com/v1/Workspaces/WS0000000000000000000000000000000a/Tasks";
        assert!(alert(tasks, "Msg=Bad Request&httpResponse=400").bad_request);
        assert!(!alert(tasks, "Msg=Internal error&httpResponse=500").bad_request);
        assert!(
            !alert(
                "https://api.twilio.com/2010-04-01/Accounts/AC/Messages",
                "httpResponse=400"
            )
            .bad_request
        );
        assert!(
            alert(
                "https://connie-1234.twil.io/create-transfer-task",
                "status 400 Bad Request"
            )
            .bad_request
        );
    }
}
