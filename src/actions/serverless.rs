//! Rollback by redeploying the Serverless environment's previous build.

use super::{BoxFuture, Decision, Integration};
use crate::sid::{EnvironmentSid, ServiceSid};
use crate::twilio::TwilioClient;
use crate::twilio::serverless::Serverless;

pub struct Redeploy {
    pub client: TwilioClient,
    pub base_url: String,
    pub service: ServiceSid,
    pub environment: EnvironmentSid,
}

impl Integration for Redeploy {
    fn name(&self) -> &'static str {
        "serverless"
    }

    fn run<'a>(&'a self, _: &'a Decision) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let api = Serverless {
                client: &self.client,
                base_url: &self.base_url,
            };
            let mut deployments = api
                .deployments(&self.service, &self.environment)
                .await
                .map_err(|e| e.to_string())?;
            // Newest first; a stable sort keeps Twilio's order among equal timestamps.
            deployments.sort_by(|a, b| b.date_created.cmp(&a.date_created));
            let current = deployments
                .first()
                .and_then(|d| d.build_sid.clone())
                .ok_or_else(|| {
                    format!(
                        "environment {} has no deployment to roll back",
                        self.environment
                    )
                })?;
            let previous = deployments
                .iter()
                .filter_map(|d| d.build_sid.clone())
                .find(|b| *b != current)
                .ok_or_else(|| {
                    format!(
                        "environment {} has no build before {current}",
                        self.environment
                    )
                })?;
            let created = api
                .create_deployment(&self.service, &self.environment, &previous)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "redeployed build {previous} (replacing {current}) as deployment {}",
                created.sid.unwrap_or_default()
            ))
        })
    }
}
