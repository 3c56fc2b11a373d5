//! A traffic generator: realistic transfers of one CBO (cold and warm, worker and queue, each failure class), posted through the real HTTP ingest path.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use serde_json::json;

use crate::clock::rfc3339;

/// How one CBO's transfers behave. Probabilities are per transfer.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Transfers started per second.
    pub rate: f64,
    pub cold_share: f64,
    pub worker_share: f64,
    pub bad_request: f64,
    /// Only for worker targets (code 20001).
    pub agent_unavailable: f64,
    pub target_not_found: f64,
    pub other_error: f64,
    /// No terminal event at all: the seed's silent failure.
    pub silent: f64,
    pub cancelled: f64,
    pub history_lost: f64,
    /// Cold completion time range in seconds.
    pub cold_secs: (f64, f64),
    pub warm_secs: (f64, f64),
    pub notify_secs: (f64, f64),
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            rate: 2.0,
            cold_share: 0.7,
            worker_share: 0.6,
            bad_request: 0.004,
            agent_unavailable: 0.02,
            target_not_found: 0.005,
            other_error: 0.005,
            silent: 0.003,
            cancelled: 0.02,
            history_lost: 0.001,
            cold_secs: (1.5, 8.0),
            warm_secs: (5.0, 25.0),
            notify_secs: (0.3, 3.5),
        }
    }
}

/// What Twilio records of a generated transfer (SPEC §2b): its task's TaskRouter events, the
/// transfer function's error line and the debugger's alert when TaskRouter refused the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Task {
        event_type: &'static str,
        task: String,
        attributes: serde_json::Value,
        reason: Option<String>,
    },
    FunctionLog {
        level: &'static str,
        message: String,
    },
    Alert {
        code: &'static str,
        text: String,
        url: String,
    },
}

impl Record {
    /// Puts it into the simulated Twilio of the CBO (`functions`: its service and environment).
    pub fn apply(
        &self,
        sim: &crate::sim::twilio::SimTwilio,
        (account, workspace, workflow): (&str, &str, &str),
        functions: Option<(&str, &str)>,
        at_ms: i64,
    ) {
        match self {
            Record::Task {
                event_type,
                task,
                attributes,
                reason,
            } => {
                sim.taskrouter_event(
                    account,
                    workspace,
                    workflow,
                    event_type,
                    at_ms,
                    task,
                    attributes,
                    reason.as_deref(),
                );
            }
            Record::FunctionLog { level, message } => {
                if let Some((service, environment)) = functions {
                    sim.function_log(account, service, environment, level, message, at_ms);
                }
            }
            Record::Alert { code, text, url } => {
                sim.debugger_alert(account, "error", code, text, url, at_ms)
            }
        }
    }
}

/// Generates transfers and holds their events until their timestamps come due.
pub struct Generator {
    rng: fastrand::Rng,
    pub profile: Profile,
    due: BinaryHeap<Reverse<(i64, u64, String)>>,
    /// Twilio's record of the same transfers, by due time.
    records: BinaryHeap<Reverse<(i64, u64)>>,
    record_items: std::collections::HashMap<u64, Record>,
    /// Whether Twilio's record is generated too (benchmarks want the plugin's lines alone).
    with_records: bool,
    seq: u64,
    /// When the next transfer starts (Poisson arrivals), in event time.
    next_start_ms: i64,
}

fn hex(rng: &mut fastrand::Rng) -> String {
    (0..32)
        .map(|_| char::from_digit(rng.u32(0..16), 16).expect("a hex digit"))
        .collect()
}

impl Generator {
    pub fn new(profile: Profile, seed: u64, start_ms: i64) -> Generator {
        Generator {
            rng: fastrand::Rng::with_seed(seed),
            profile,
            due: BinaryHeap::new(),
            records: BinaryHeap::new(),
            record_items: std::collections::HashMap::new(),
            with_records: true,
            seq: 0,
            next_start_ms: start_ms,
        }
    }

    fn between(&mut self, (lo, hi): (f64, f64)) -> i64 {
        ((lo + (hi - lo) * self.rng.f64()) * 1000.0) as i64
    }

    fn push(&mut self, at_ms: i64, line: serde_json::Value) {
        self.seq += 1;
        self.due.push(Reverse((at_ms, self.seq, line.to_string())));
    }

    /// The plugin's lines alone, without Twilio's record.
    pub fn plugin_only(mut self) -> Generator {
        self.with_records = false;
        self
    }

    fn record(&mut self, at_ms: i64, r: Record) {
        if !self.with_records {
            return;
        }
        self.seq += 1;
        self.records.push(Reverse((at_ms, self.seq)));
        self.record_items.insert(self.seq, r);
    }

    /// Twilio's record due at or before `now_ms`, oldest first: (when, what).
    pub fn due_records(&mut self, now_ms: i64) -> Vec<(i64, Record)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, seq))) = self.records.peek().copied() {
            if at > now_ms {
                break;
            }
            self.records.pop();
            if let Some(r) = self.record_items.remove(&seq) {
                out.push((at, r));
            }
        }
        out
    }

    /// Queues every event of one transfer started at `t0`.
    pub fn transfer(&mut self, t0: i64) {
        let p = self.profile.clone();
        let cold = self.rng.f64() < p.cold_share;
        let worker = self.rng.f64() < p.worker_share;
        let conversation = format!("CH{}", hex(&mut self.rng));
        let id = format!("KI{}", hex(&mut self.rng));
        let from = format!("WK{}", hex(&mut self.rng));
        let to = if worker {
            format!("WK{}", hex(&mut self.rng))
        } else {
            ["support", "billing", "spanish", "crisis"][self.rng.usize(0..4)].to_string()
        };
        let base = json!({
            "conversationSid": conversation, "transferId": id,
            "transferType": if cold { "cold" } else { "warm" },
            "targetType": if worker { "worker" } else { "queue" },
            "fromAgent": from, "toTarget": to,
        });
        let event = |kind: &str, at: i64, extra: serde_json::Value| {
            let mut v = base.clone();
            v["event"] = json!(kind);
            v["timestamp"] = json!(rfc3339(at));
            if let serde_json::Value::Object(extra) = extra {
                v.as_object_mut().expect("an object").extend(extra);
            }
            v
        };
        self.push(t0, event("initiated", t0, json!({"reason": "expertise"})));
        // The template's create-transfer-task creates the task a moment later.
        let task = format!("WT{}", hex(&mut self.rng));
        let attributes = json!({
            "transferTargetType": if worker { "worker" } else { "queue" },
            "transferTargetSid": if worker { to.clone() } else { String::new() },
            "transferQueueName": if worker { serde_json::Value::Null } else { json!(to) },
            "transferReason": "expertise",
            "conversations": {"conversation_id": conversation},
        });
        let created_at = t0 + 300;
        let task_event =
            |g: &mut Generator, at: i64, event_type: &'static str, reason: Option<&str>| {
                g.record(
                    at,
                    Record::Task {
                        event_type,
                        task: task.clone(),
                        attributes: attributes.clone(),
                        reason: reason.map(str::to_string),
                    },
                );
            };

        let u = self.rng.f64();
        let mut edge = 0.0;
        let mut next = |share: f64| {
            edge += share;
            u < edge
        };
        let fail_at = t0 + self.between((0.2, 1.5));
        let error = if next(p.bad_request) {
            Some(json!({"status": 400, "code": 20001, "message": "TaskRouter error: Bad Request"}))
        } else if worker && next(p.agent_unavailable) {
            Some(json!({"code": 20001, "message": "Worker is not available"}))
        } else if next(p.target_not_found) {
            Some(json!({"code": 20404, "status": 404, "message": "Transfer target not found"}))
        } else if next(p.other_error) {
            Some(json!({"status": 500, "message": "Internal error"}))
        } else {
            None
        };
        if let Some(error) = error {
            if error["status"] == 400 {
                // TaskRouter refused the task: the function's error line and the debugger's
                // alert are Twilio's only trace.
                self.record(
                    fail_at,
                    Record::FunctionLog {
                        level: "error",
                        message: format!(
                            "create-transfer-task failed for {conversation}: TaskRouter error: Bad Request (status 400)"
                        ),
                    },
                );
                self.record(
                    fail_at,
                    Record::Alert {
                        code: "20001",
                        text: "Msg=Bad Request&httpResponse=400".into(),
                        url: "https://taskrouter.twilio.com/v1/Workspaces/WS/Tasks".into(),
                    },
                );
            } else {
                task_event(self, created_at, "task.created", None);
                let reason = error["message"]
                    .as_str()
                    .map(|m| match error["code"].as_i64() {
                        Some(code) => format!("{m} ({code})"),
                        None => m.to_string(),
                    });
                task_event(
                    self,
                    fail_at.max(created_at + 1),
                    "task.canceled",
                    reason.as_deref(),
                );
            }
            self.push(fail_at, event("failed", fail_at, json!({ "error": error })));
            return;
        }
        task_event(self, created_at, "task.created", None);
        let notified = t0 + self.between(p.notify_secs);
        let notified = notified.max(created_at + 50);
        self.push(notified, event("notified", notified, json!({})));
        task_event(self, notified, "reservation.created", None);
        if next(p.silent) {
            // Nobody accepts; the workflow's timeout ends the task.
            task_event(self, t0 + 300_000, "workflow.timeout", None);
            return;
        }
        if next(p.cancelled) {
            let at = notified + self.between((0.5, 3.0));
            self.push(
                at,
                event("cancelled", at, json!({"reason": "customer left"})),
            );
            task_event(
                self,
                at,
                "task.canceled",
                Some("Conversation ended: customer left"),
            );
            return;
        }
        let done = t0 + self.between(if cold { p.cold_secs } else { p.warm_secs });
        let done = done.max(notified + 200);
        let accepted = notified + (done - notified) / 2;
        self.push(accepted, event("accepted", accepted, json!({})));
        task_event(self, accepted, "reservation.accepted", None);
        let lost = self.rng.f64() < p.history_lost;
        self.push(
            done,
            event("completed", done, json!({ "historyPreserved": !lost })),
        );
    }

    /// Starts transfers at the profile's rate (Poisson arrivals) up to `until_ms`; the arrival
    /// after it waits for the next call.
    pub fn start_until(&mut self, until_ms: i64) {
        let rate = self.profile.rate.max(1e-6);
        while self.next_start_ms <= until_ms {
            self.transfer(self.next_start_ms);
            let gap = -(1.0 - self.rng.f64()).ln() / rate;
            self.next_start_ms += (gap * 1000.0).max(1.0) as i64;
        }
    }

    /// Events whose timestamp is at or before `now_ms`, oldest first, as NDJSON lines.
    pub fn due(&mut self, now_ms: i64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _, _))) = self.due.peek() {
            if *at > now_ms {
                break;
            }
            let Reverse((_, _, line)) = self.due.pop().expect("peeked");
            out.push(line);
        }
        out
    }
}

/// Posts NDJSON lines to a daemon with one CBO's token, in batches of 1,000.
pub async fn post(
    client: &reqwest::Client,
    server: &str,
    token: &str,
    lines: &[String],
) -> Result<u64, String> {
    let mut accepted = 0;
    for chunk in lines.chunks(1000) {
        let resp = client
            .post(format!("{server}/v1/events"))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(chunk.join("\n"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        if status.as_u16() != 202 {
            return Err(format!("{status}: {body}"));
        }
        accepted += body["accepted"].as_u64().unwrap_or(0);
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_line;

    #[test]
    fn many_small_steps_start_as_many_transfers_as_one_big_one() {
        let start = 1_800_000_000_000;
        let mut once = Generator::new(Profile::default(), 7, start);
        once.start_until(start + 600_000);
        let mut stepped = Generator::new(Profile::default(), 7, start);
        for t in (0..=600_000).step_by(250) {
            stepped.start_until(start + t);
        }
        let (a, b) = (once.due(i64::MAX).len(), stepped.due(i64::MAX).len());
        assert_eq!(a, b);
        // 2 transfers a second for 10 minutes, about 5 events each.
        assert!((4000..8000).contains(&a), "{a}");
    }

    #[test]
    fn every_generated_line_is_a_valid_event() {
        let mut g = Generator::new(Profile::default(), 7, 1_800_000_000_000);
        g.start_until(1_800_000_600_000);
        let lines = g.due(1_800_001_000_000);
        assert!(lines.len() > 3000, "{}", lines.len());
        for line in &lines {
            parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
}
