//! Rollback by redeploying the Serverless environment's last known-good build.

use super::known::{Artifact, Live};
use super::{
    Attempt, BoxFuture, Decision, Effect, Integration, Known, Plan, PlanError, plan_rollback,
    rolled_back,
};
use crate::sid::{EnvironmentSid, ServiceSid};
use crate::twilio::TwilioClient;
use crate::twilio::serverless::Serverless;

pub struct Redeploy {
    pub client: TwilioClient,
    pub base_url: String,
    pub service: ServiceSid,
    pub environment: EnvironmentSid,
}

/// Milliseconds since the epoch of a Twilio `date_created` (whole seconds).
pub(crate) fn created_ms(date: Option<&str>) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(date?)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl Redeploy {
    fn api(&self) -> Serverless<'_> {
        Serverless {
            client: &self.client,
            base_url: &self.base_url,
        }
    }

    /// The environment's builds as they went live, newest first (a stable sort keeps
    /// Twilio's order among equal timestamps).
    async fn history(&self) -> Result<Vec<Live>, String> {
        let mut deployments = self
            .api()
            .deployments(&self.service, &self.environment)
            .await
            .map_err(|e| e.to_string())?;
        deployments.sort_by(|a, b| b.date_created.cmp(&a.date_created));
        Ok(deployments
            .into_iter()
            .filter_map(|d| {
                Some(Live {
                    since_ms: created_ms(d.date_created.as_deref())?,
                    sid: d.build_sid?,
                    via: d.sid.unwrap_or_default(),
                })
            })
            .collect())
    }
}

impl Integration for Redeploy {
    fn name(&self) -> &'static str {
        "serverless"
    }

    fn plan<'a>(
        &'a self,
        _: &'a Decision,
        known: &'a Known,
    ) -> BoxFuture<'a, Result<Plan, PlanError>> {
        Box::pin(async move {
            let history = self.history().await.map_err(PlanError::Read)?;
            plan_rollback(Artifact::Build, &history, known)
        })
    }

    fn run<'a>(&'a self, a: Attempt<'a>) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let build = a.plan.target.as_deref().ok_or("the plan names no build")?;
            let created = self
                .api()
                .create_deployment(&self.service, &self.environment, build)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "redeployed build {build}{} as deployment {}",
                a.plan
                    .replacing
                    .as_ref()
                    .map(|r| format!(" (replacing {r})"))
                    .unwrap_or_default(),
                created.sid.unwrap_or_default()
            ))
        })
    }

    fn took_effect<'a>(
        &'a self,
        plan: &'a Plan,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<Effect, String>> {
        Box::pin(async move { rolled_back(&self.history().await?, plan, since_ms) })
    }
}
