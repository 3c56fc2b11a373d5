//! Rollback by redeploying the Serverless environment's last known-good build.

use super::known::{Artifact, Live};
use super::{Attempt, BoxFuture, Decision, Effect, Integration, Known, Plan, PlanError};
use crate::sid::{EnvironmentSid, ServiceSid};
use crate::twilio::TwilioClient;
use crate::twilio::serverless::{Deployment, Serverless};

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

/// Newest first; a stable sort keeps Twilio's order among equal timestamps.
fn newest_first(mut deployments: Vec<Deployment>) -> Vec<Deployment> {
    deployments.sort_by(|a, b| b.date_created.cmp(&a.date_created));
    deployments
}

impl Redeploy {
    fn api(&self) -> Serverless<'_> {
        Serverless {
            client: &self.client,
            base_url: &self.base_url,
        }
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, String> {
        self.api()
            .deployments(&self.service, &self.environment)
            .await
            .map(newest_first)
            .map_err(|e| e.to_string())
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
            let deployments = self.deployments().await.map_err(PlanError::Read)?;
            let history: Vec<Live> = deployments
                .iter()
                .filter_map(|d| {
                    Some(Live {
                        sid: d.build_sid.clone()?,
                        since_ms: created_ms(d.date_created.as_deref())?,
                    })
                })
                .collect();
            let target = known.view(Artifact::Build).target(
                Artifact::Build,
                &history,
                known.deploy_window,
            )?;
            Ok(Plan {
                artifact: Some(Artifact::Build),
                target: Some(target),
                replacing: history.first().map(|l| l.sid.clone()),
            })
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

    /// Took effect when a deployment of the target build was created in or after the second
    /// of the intent (Twilio stamps whole seconds).
    fn took_effect<'a>(
        &'a self,
        plan: &'a Plan,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<Effect, String>> {
        Box::pin(async move {
            let build = plan.target.as_deref().ok_or("the plan names no build")?;
            let since_s = since_ms.div_euclid(1000) * 1000;
            let deployments = self.deployments().await?;
            Ok(deployments
                .iter()
                .find(|d| {
                    d.build_sid.as_deref() == Some(build)
                        && created_ms(d.date_created.as_deref()).is_some_and(|t| t >= since_s)
                })
                .map_or(Effect::NotApplied, |d| {
                    Effect::Applied(format!(
                        "build {build} is deployed as {} (created {})",
                        d.sid.as_deref().unwrap_or("?"),
                        d.date_created.as_deref().unwrap_or("?")
                    ))
                }))
        })
    }
}
