//! Flex integrations: release the previous plugin configuration (rollback), and the transfers' feature flag (disable, restore).

use std::sync::Weak;

use serde_json::{Value, json};

use super::{Actions, BoxFuture, Decision, Integration};
use crate::twilio::TwilioClient;
use crate::twilio::flex::Flex;

/// Where the template's `feature-library/conversation-transfer/config.ts` reads the flags.
pub const FLAG_PATH: [&str; 4] = [
    "custom_data",
    "features",
    "conversation_transfer",
    "enabled",
];
const FLAGS: [&str; 3] = ["enabled", "cold_transfer", "multi_participant"];

pub struct PreviousRelease {
    pub client: TwilioClient,
    pub base_url: String,
}

impl Integration for PreviousRelease {
    fn name(&self) -> &'static str {
        "plugin_release"
    }

    fn run<'a>(&'a self, _: &'a Decision) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let flex = Flex {
                client: &self.client,
                base_url: &self.base_url,
            };
            let mut releases = flex.releases().await.map_err(|e| e.to_string())?;
            releases.sort_by(|a, b| b.date_created.cmp(&a.date_created));
            let current = releases
                .first()
                .and_then(|r| r.configuration_sid.clone())
                .ok_or("no plugin release to roll back")?;
            let previous = releases
                .iter()
                .filter_map(|r| r.configuration_sid.clone())
                .find(|c| *c != current)
                .ok_or_else(|| format!("no plugin configuration released before {current}"))?;
            let release = flex
                .create_release(&previous)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "released plugin configuration {previous} (replacing {current}) as {}",
                release.sid.unwrap_or_default()
            ))
        })
    }
}

/// The `conversation_transfer` object of `ui_attributes`, created when absent.
fn feature(ui: &mut Value) -> Result<&mut serde_json::Map<String, Value>, String> {
    let mut node = ui;
    for key in &FLAG_PATH[..3] {
        if node.get(*key).is_none() {
            node.as_object_mut()
                .ok_or("ui_attributes is not an object")?
                .insert((*key).to_string(), json!({}));
        }
        node = node.get_mut(*key).expect("inserted above");
    }
    node.as_object_mut().ok_or_else(|| {
        "ui_attributes.custom_data.features.conversation_transfer is not an object".to_string()
    })
}

pub struct FlagOff {
    pub client: TwilioClient,
    pub base_url: String,
    pub actions: Weak<Actions>,
}

impl Integration for FlagOff {
    fn name(&self) -> &'static str {
        "flex_flag"
    }

    fn run<'a>(&'a self, d: &'a Decision) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let flex = Flex {
                client: &self.client,
                base_url: &self.base_url,
            };
            let config = flex.configuration().await.map_err(|e| e.to_string())?;
            let mut ui = config
                .get("ui_attributes")
                .cloned()
                .unwrap_or_else(|| json!({}));
            if ui.is_null() {
                ui = json!({});
            }
            let f = feature(&mut ui)?;
            let previous: serde_json::Map<String, Value> = FLAGS
                .iter()
                .map(|k| (k.to_string(), f.get(*k).cloned().unwrap_or(Value::Null)))
                .collect();
            if let Some(actions) = self.actions.upgrade() {
                actions.remember_flags(&d.cbo, Value::Object(previous.clone()));
            }
            f.insert("enabled".into(), Value::Bool(false));
            flex.update_ui_attributes(&ui)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "set ui_attributes.{} = false (was {})",
                FLAG_PATH.join("."),
                previous["enabled"]
            ))
        })
    }
}

/// Writes back the flag values seen before the switch went off, leaving the rest as it is now.
pub async fn restore_flags(
    client: &TwilioClient,
    base_url: &str,
    previous: &Value,
) -> Result<(), String> {
    let flex = Flex { client, base_url };
    let config = flex.configuration().await.map_err(|e| e.to_string())?;
    let mut ui = config
        .get("ui_attributes")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let f = feature(&mut ui)?;
    for k in FLAGS {
        match previous.get(k) {
            Some(Value::Null) | None => {
                f.remove(k);
            }
            Some(v) => {
                f.insert(k.to_string(), v.clone());
            }
        }
    }
    flex.update_ui_attributes(&ui)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
