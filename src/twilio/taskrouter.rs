//! TaskRouter: the chat-transfer workflow, its cumulative and real-time statistics, and the seed's routing check.

use serde::Deserialize;

use super::{TwilioClient, TwilioError};
use crate::sid::{QueueSid, TaskSid, WorkflowSid, WorkspaceSid};

/// `taskrouter.v1.workspace.task`, the fields we read.
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    pub sid: String,
    pub assignment_status: Option<String>,
    pub task_queue_sid: Option<String>,
    pub attributes: Option<String>,
}

#[derive(Deserialize)]
struct Tasks {
    #[serde(default)]
    tasks: Vec<Task>,
}

/// `taskrouter.v1.workspace.task_queue`, the fields we read.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskQueue {
    pub sid: String,
    pub friendly_name: Option<String>,
}

/// `taskrouter.v1.workspace.workflow`, the fields we read.
#[derive(Debug, Clone, Deserialize)]
pub struct Workflow {
    pub sid: Option<String>,
    pub friendly_name: Option<String>,
    /// The workflow's configuration, a JSON document in a string.
    pub configuration: Option<String>,
}

/// `taskrouter.v1.workspace.workflow.workflow_cumulative_statistics`, the fields we read.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(default)]
pub struct CumulativeStatistics {
    pub tasks_entered: i64,
    pub tasks_completed: i64,
    pub tasks_canceled: i64,
    pub tasks_timed_out_in_workflow: i64,
    pub reservations_accepted: i64,
    pub reservations_rejected: i64,
    pub reservations_timed_out: i64,
}

impl CumulativeStatistics {
    /// SPEC §3: (tasks canceled + tasks timed out in workflow) / tasks entered; `None` without tasks.
    pub fn error_ratio(&self) -> Option<f64> {
        (self.tasks_entered > 0).then(|| {
            (self.tasks_canceled + self.tasks_timed_out_in_workflow) as f64
                / self.tasks_entered as f64
        })
    }
}

/// `taskrouter.v1.workspace.workflow.workflow_real_time_statistics`, the fields we read.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(default)]
pub struct RealTimeStatistics {
    pub total_tasks: i64,
    pub longest_task_waiting_age: i64,
}

pub struct TaskRouter<'a> {
    pub client: &'a TwilioClient,
    pub base_url: &'a str,
}

impl TaskRouter<'_> {
    fn tasks_url(&self, ws: &WorkspaceSid, tail: &str) -> String {
        format!(
            "{}/v1/Workspaces/{ws}/Tasks{tail}",
            self.base_url.trim_end_matches('/')
        )
    }

    pub async fn task_queue(
        &self,
        ws: &WorkspaceSid,
        queue: &QueueSid,
    ) -> Result<TaskQueue, TwilioError> {
        let url = format!(
            "{}/v1/Workspaces/{ws}/TaskQueues/{queue}",
            self.base_url.trim_end_matches('/')
        );
        self.client
            .get(&url, &[], &format!("task queue {queue}"))
            .await
    }

    /// Creates a task through `workflow` on the chat channel with `attributes`.
    pub async fn create_task(
        &self,
        ws: &WorkspaceSid,
        workflow: &WorkflowSid,
        attributes: &serde_json::Value,
    ) -> Result<Task, TwilioError> {
        let form = [
            ("WorkflowSid", workflow.to_string()),
            ("TaskChannel", "chat".to_string()),
            ("Attributes", attributes.to_string()),
        ];
        self.client
            .post_form(
                &self.tasks_url(ws, ""),
                &form,
                &format!("workflow {workflow} task"),
            )
            .await
    }

    pub async fn task(&self, ws: &WorkspaceSid, task: &TaskSid) -> Result<Task, TwilioError> {
        self.client
            .get(
                &self.tasks_url(ws, &format!("/{task}")),
                &[],
                &format!("task {task}"),
            )
            .await
    }

    /// Cancels a task (`AssignmentStatus=canceled`).
    pub async fn cancel_task(
        &self,
        ws: &WorkspaceSid,
        task: &TaskSid,
        reason: &str,
    ) -> Result<Task, TwilioError> {
        let form = [
            ("AssignmentStatus", "canceled".to_string()),
            ("Reason", reason.to_string()),
        ];
        self.client
            .post_form(
                &self.tasks_url(ws, &format!("/{task}")),
                &form,
                &format!("task {task}"),
            )
            .await
    }

    pub async fn delete_task(&self, ws: &WorkspaceSid, task: &TaskSid) -> Result<(), TwilioError> {
        self.client
            .delete(
                &self.tasks_url(ws, &format!("/{task}")),
                &format!("task {task}"),
            )
            .await
    }

    /// Tasks whose attributes satisfy `expression` (TaskRouter's `EvaluateTaskAttributes`).
    pub async fn tasks_where(
        &self,
        ws: &WorkspaceSid,
        expression: &str,
    ) -> Result<Vec<Task>, TwilioError> {
        let query = [
            ("EvaluateTaskAttributes", expression.to_string()),
            ("PageSize", "1000".to_string()),
        ];
        let page: Tasks = self
            .client
            .get(
                &self.tasks_url(ws, ""),
                &query,
                &format!("workspace {ws} tasks"),
            )
            .await?;
        Ok(page.tasks)
    }

    fn url(&self, ws: &WorkspaceSid, ww: &WorkflowSid, tail: &str) -> String {
        format!(
            "{}/v1/Workspaces/{ws}/Workflows/{ww}{tail}",
            self.base_url.trim_end_matches('/')
        )
    }

    pub async fn workflow(
        &self,
        ws: &WorkspaceSid,
        ww: &WorkflowSid,
    ) -> Result<Workflow, TwilioError> {
        let resource = format!("workflow {ww}");
        self.client.get(&self.url(ws, ww, ""), &[], &resource).await
    }

    pub async fn cumulative_statistics(
        &self,
        ws: &WorkspaceSid,
        ww: &WorkflowSid,
        minutes: u64,
        start_ms: Option<i64>,
    ) -> Result<CumulativeStatistics, TwilioError> {
        let resource = format!("workflow {ww} cumulative statistics");
        // From `start_ms` (the current deployment's first instant) when that is nearer than
        // the trailing minutes: a deployment is judged on its own tasks.
        let query = match start_ms {
            Some(ms) => [(
                "StartDate",
                chrono::DateTime::from_timestamp_millis(ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )],
            None => [("Minutes", minutes.to_string())],
        };
        self.client
            .get(
                &self.url(ws, ww, "/CumulativeStatistics"),
                &query,
                &resource,
            )
            .await
    }

    pub async fn real_time_statistics(
        &self,
        ws: &WorkspaceSid,
        ww: &WorkflowSid,
    ) -> Result<RealTimeStatistics, TwilioError> {
        let resource = format!("workflow {ww} real-time statistics");
        self.client
            .get(&self.url(ws, ww, "/RealTimeStatistics"), &[], &resource)
            .await
    }
}

/// Which of the seed's two transfer routes a workflow configuration has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routes {
    pub worker: bool,
    pub queue: bool,
    /// Filters whose expression could not be parsed: `filter N: why`.
    pub malformed: Vec<String>,
}

/// Whether some filter of `task_routing.filters` (with at least one target) routes a transfer
/// task of each type: its expression, parsed as TaskRouter's expression language, holds (or
/// may hold, on attributes the template does not set) for the attributes the template's
/// `create-transfer-task` function sets.
pub fn routes(configuration: &str) -> Result<Routes, String> {
    use super::expression::{Truth, eval, parse, transfer_task};
    let doc: serde_json::Value = serde_json::from_str(configuration)
        .map_err(|e| format!("workflow configuration is not JSON: {e}"))?;
    let filters = doc
        .pointer("/task_routing/filters")
        .and_then(|f| f.as_array())
        .ok_or("workflow configuration has no task_routing.filters")?;
    let (worker, queue) = (transfer_task("worker"), transfer_task("queue"));
    let mut routes = Routes::default();
    for (i, filter) in filters.iter().enumerate() {
        let has_targets = filter
            .get("targets")
            .and_then(|t| t.as_array())
            .is_some_and(|t| !t.is_empty());
        if !has_targets {
            continue;
        }
        let text = filter
            .get("expression")
            .and_then(|e| e.as_str())
            .unwrap_or("");
        match parse(text) {
            Ok(e) => {
                routes.worker |= eval(&e, &worker) != Truth::False;
                routes.queue |= eval(&e, &queue) != Truth::False;
            }
            Err(why) => routes
                .malformed
                .push(format!("filter {} expression {text:?}: {why}", i + 1)),
        }
    }
    Ok(routes)
}

/// The seed's "Chat Transfer" workflow configuration, as the template documents it.
pub const SEED_WORKFLOW_CONFIGURATION: &str = r#"{"task_routing":{"filters":[{"expression":"transferTargetType == 'worker'","targets":[{"queue":"everyone","known_worker_sid":"{{task.transferTargetSid}}"}]},{"expression":"transferTargetType == 'queue'","targets":[{"queue":"{{task.transferQueueName}}"}]}]}}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_workflow_routes_both_target_types() {
        assert_eq!(
            routes(SEED_WORKFLOW_CONFIGURATION).unwrap(),
            Routes {
                worker: true,
                queue: true,
                malformed: vec![],
            }
        );
    }

    #[test]
    fn a_workflow_without_the_queue_filter_is_missing_the_queue_route() {
        let only_worker = r#"{"task_routing":{"filters":[{"expression":"transferTargetType==\"worker\"","targets":[{"queue":"everyone"}]}]}}"#;
        assert_eq!(
            routes(only_worker).unwrap(),
            Routes {
                worker: true,
                queue: false,
                malformed: vec![],
            }
        );
    }

    fn configuration(expressions: &[&str]) -> String {
        let filters: Vec<serde_json::Value> = expressions
            .iter()
            .map(|e| serde_json::json!({"expression": e, "targets": [{"queue": "everyone"}]}))
            .collect();
        serde_json::json!({"task_routing": {"filters": filters}}).to_string()
    }

    #[test]
    fn valid_variants_of_the_routing_are_not_corruption() {
        for exprs in [
            vec![
                "'worker' == transferTargetType",
                "\"queue\"==transferTargetType",
            ],
            vec!["transferTargetType IN ['worker','queue']"],
            vec!["transferTargetType == 'worker' OR transferTargetType == 'queue'"],
            vec![
                "transferTargetType == \"worker\" and 1 == 1",
                "transferTargetType in ['queue']",
            ],
        ] {
            let r = routes(&configuration(&exprs)).unwrap();
            assert!(
                r.worker && r.queue && r.malformed.is_empty(),
                "{exprs:?}: {r:?}"
            );
        }
    }

    #[test]
    fn a_malformed_expression_is_named_and_routes_nothing() {
        let r = routes(&configuration(&[
            "transferTargetType == 'worker'",
            "transferTargetType == 'queue",
        ]))
        .unwrap();
        assert!(r.worker && !r.queue);
        assert_eq!(r.malformed.len(), 1);
        assert!(
            r.malformed[0].starts_with("filter 2 expression"),
            "{:?}",
            r.malformed
        );
    }

    #[test]
    fn a_filter_without_targets_routes_nothing() {
        let empty = r#"{"task_routing":{"filters":[{"expression":"transferTargetType == 'queue'","targets":[]}]}}"#;
        assert_eq!(routes(empty).unwrap(), Routes::default());
        assert!(routes("not json").is_err());
    }

    #[test]
    fn error_ratio_is_canceled_plus_timed_out_over_entered() {
        let s = CumulativeStatistics {
            tasks_entered: 200,
            tasks_canceled: 6,
            tasks_timed_out_in_workflow: 4,
            ..Default::default()
        };
        assert_eq!(s.error_ratio(), Some(0.05));
        assert_eq!(CumulativeStatistics::default().error_ratio(), None);
    }
}
