//! Serverless: the environment's variables (the workflow SID the functions really use) and deployments.

use serde::Deserialize;

use super::{TwilioClient, TwilioError};
use crate::sid::{EnvironmentSid, ServiceSid};

#[derive(Debug, Clone, Deserialize)]
pub struct Variable {
    pub sid: Option<String>,
    pub key: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Deployment {
    pub sid: Option<String>,
    pub build_sid: Option<String>,
    pub date_created: Option<String>,
}

#[derive(Deserialize)]
struct Variables {
    #[serde(default)]
    variables: Vec<Variable>,
}

#[derive(Deserialize)]
struct Deployments {
    #[serde(default)]
    deployments: Vec<Deployment>,
}

pub struct Serverless<'a> {
    pub client: &'a TwilioClient,
    pub base_url: &'a str,
}

impl Serverless<'_> {
    fn url(&self, service: &ServiceSid, env: &EnvironmentSid, tail: &str) -> String {
        format!(
            "{}/v1/Services/{service}/Environments/{env}{tail}",
            self.base_url.trim_end_matches('/')
        )
    }

    pub async fn variables(
        &self,
        service: &ServiceSid,
        env: &EnvironmentSid,
    ) -> Result<Vec<Variable>, TwilioError> {
        let resource = format!("environment {env} variables");
        let query = [("PageSize", "1000".to_string())];
        let page: Variables = self
            .client
            .get(&self.url(service, env, "/Variables"), &query, &resource)
            .await?;
        Ok(page.variables)
    }

    /// The environment's deployments, newest first as Twilio lists them.
    pub async fn deployments(
        &self,
        service: &ServiceSid,
        env: &EnvironmentSid,
    ) -> Result<Vec<Deployment>, TwilioError> {
        let resource = format!("environment {env} deployments");
        let query = [("PageSize", "50".to_string())];
        let page: Deployments = self
            .client
            .get(&self.url(service, env, "/Deployments"), &query, &resource)
            .await?;
        Ok(page.deployments)
    }
}

impl Serverless<'_> {
    /// Deploys `build` to the environment (a rollback is a new deployment of an earlier build).
    pub async fn create_deployment(
        &self,
        service: &ServiceSid,
        env: &EnvironmentSid,
        build: &str,
    ) -> Result<Deployment, TwilioError> {
        let resource = format!("environment {env} deployments");
        self.client
            .post_form(
                &self.url(service, env, "/Deployments"),
                &[("BuildSid", build.to_string())],
                &resource,
            )
            .await
    }
}
