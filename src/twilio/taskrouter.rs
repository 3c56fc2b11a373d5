//! TaskRouter: the chat-transfer workflow, its cumulative and real-time statistics, and the seed's routing check.

use serde::Deserialize;

use super::{TwilioClient, TwilioError};
use crate::sid::{WorkflowSid, WorkspaceSid};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Routes {
    pub worker: bool,
    pub queue: bool,
}

/// Reads `task_routing.filters[].expression` for `transferTargetType == 'worker'` and `== 'queue'`
/// (quotes and spacing as written do not matter), each with at least one target.
pub fn routes(configuration: &str) -> Result<Routes, String> {
    let doc: serde_json::Value = serde_json::from_str(configuration)
        .map_err(|e| format!("workflow configuration is not JSON: {e}"))?;
    let filters = doc
        .pointer("/task_routing/filters")
        .and_then(|f| f.as_array())
        .ok_or("workflow configuration has no task_routing.filters")?;
    let mut routes = Routes::default();
    for filter in filters {
        let expression: String = filter
            .get("expression")
            .and_then(|e| e.as_str())
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| if c == '"' { '\'' } else { c })
            .collect();
        let has_targets = filter
            .get("targets")
            .and_then(|t| t.as_array())
            .is_some_and(|t| !t.is_empty());
        if !has_targets {
            continue;
        }
        routes.worker |= expression.contains("transferTargetType=='worker'");
        routes.queue |= expression.contains("transferTargetType=='queue'");
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
                queue: true
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
                queue: false
            }
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
