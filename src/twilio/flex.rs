//! Flex: the account's `Configuration` (where the transfers' feature flag lives).

use super::{TwilioClient, TwilioError};

pub struct Flex<'a> {
    pub client: &'a TwilioClient,
    pub base_url: &'a str,
}

impl Flex<'_> {
    /// The whole configuration document, kept as JSON so a later write changes only what it means to.
    pub async fn configuration(&self) -> Result<serde_json::Value, TwilioError> {
        let url = format!("{}/v1/Configuration", self.base_url.trim_end_matches('/'));
        self.client
            .get(
                &url,
                &[],
                &format!("account {} Flex configuration", self.client.account()),
            )
            .await
    }
}
