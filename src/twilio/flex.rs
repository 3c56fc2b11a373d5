//! Flex: the account's `Configuration` (where the transfers' feature flag lives) and plugin releases.

use serde::Deserialize;
use serde_json::Value;

use super::{TwilioClient, TwilioError};

#[derive(Debug, Clone, Deserialize)]
pub struct Release {
    pub sid: Option<String>,
    pub configuration_sid: Option<String>,
    pub date_created: Option<String>,
}

#[derive(Deserialize)]
struct Releases {
    #[serde(default)]
    releases: Vec<Release>,
}

pub struct Flex<'a> {
    pub client: &'a TwilioClient,
    pub base_url: &'a str,
}

impl Flex<'_> {
    fn url(&self, tail: &str) -> String {
        format!("{}/v1{tail}", self.base_url.trim_end_matches('/'))
    }

    fn resource(&self, what: &str) -> String {
        format!("account {} {what}", self.client.account())
    }

    /// The whole configuration document, kept as JSON (in its key order) so a write changes
    /// only what it means to.
    pub async fn configuration(&self) -> Result<Value, TwilioError> {
        self.client
            .get(
                &self.url("/Configuration"),
                &[],
                &self.resource("Flex configuration"),
            )
            .await
    }

    /// Writes `ui_attributes` back whole.
    pub async fn update_ui_attributes(&self, ui_attributes: &Value) -> Result<Value, TwilioError> {
        let body = serde_json::json!({
            "account_sid": self.client.account().as_str(),
            "ui_attributes": ui_attributes,
        });
        self.client
            .post_json(
                &self.url("/Configuration"),
                &body,
                &self.resource("Flex configuration"),
            )
            .await
    }

    /// Plugin releases, newest first.
    pub async fn releases(&self) -> Result<Vec<Release>, TwilioError> {
        let page: Releases = self
            .client
            .get(
                &self.url("/PluginService/Releases"),
                &[("PageSize", "50".to_string())],
                &self.resource("plugin releases"),
            )
            .await?;
        Ok(page.releases)
    }

    pub async fn create_release(&self, configuration: &str) -> Result<Release, TwilioError> {
        self.client
            .post_form(
                &self.url("/PluginService/Releases"),
                &[("ConfigurationId", configuration.to_string())],
                &self.resource("plugin releases"),
            )
            .await
    }
}
