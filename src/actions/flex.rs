//! Flex integrations: release the previous plugin configuration (rollback), and the transfers' feature flag (disable, restore).

use std::sync::Weak;

use serde_json::{Value, json};

use super::known::{Artifact, Live};
use super::serverless::created_ms;
use super::{
    Actions, Attempt, BoxFuture, Decision, Effect, Integration, Known, Plan, PlanError,
    plan_rollback, rolled_back,
};
use crate::config::Feature;
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

impl PreviousRelease {
    fn flex(&self) -> Flex<'_> {
        Flex {
            client: &self.client,
            base_url: &self.base_url,
        }
    }

    /// The plugin configurations as they were released, newest first (a stable sort keeps
    /// Twilio's order among equal timestamps).
    async fn history(&self) -> Result<Vec<Live>, String> {
        let mut releases = self.flex().releases().await.map_err(|e| e.to_string())?;
        releases.sort_by(|a, b| b.date_created.cmp(&a.date_created));
        Ok(releases
            .into_iter()
            .filter_map(|r| {
                Some(Live {
                    since_ms: created_ms(r.date_created.as_deref())?,
                    sid: r.configuration_sid?,
                    via: r.sid.unwrap_or_default(),
                })
            })
            .collect())
    }
}

impl Integration for PreviousRelease {
    fn name(&self) -> &'static str {
        "plugin_release"
    }

    fn plan<'a>(
        &'a self,
        _: &'a Decision,
        known: &'a Known,
    ) -> BoxFuture<'a, Result<Plan, PlanError>> {
        Box::pin(async move {
            let history = self.history().await.map_err(PlanError::Read)?;
            plan_rollback(Artifact::PluginConfiguration, &history, known)
        })
    }

    fn run<'a>(&'a self, a: Attempt<'a>) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let config = a
                .plan
                .target
                .as_deref()
                .ok_or("the plan names no plugin configuration")?;
            let release = self
                .flex()
                .create_release(config)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "released plugin configuration {config}{} as {}",
                a.plan
                    .replacing
                    .as_ref()
                    .map(|r| format!(" (replacing {r})"))
                    .unwrap_or_default(),
                release.sid.unwrap_or_default()
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
    /// The flags it turns off (`enabled`, or `cold_transfer` / `multi_participant` alone).
    pub features: Vec<Feature>,
}

impl FlagOff {
    fn names(&self) -> String {
        self.features
            .iter()
            .map(|f| format!("{}.{}", FLAG_PATH[..3].join("."), f.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Integration for FlagOff {
    fn name(&self) -> &'static str {
        "flex_flag"
    }

    fn run<'a>(&'a self, a: Attempt<'a>) -> BoxFuture<'a, Result<String, String>> {
        let d = a.decision;
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
                // Without a record of the values to restore, the flag is not touched.
                actions
                    .remember_flags(&d.cbo, Value::Object(previous.clone()))
                    .map_err(|e| e.to_string())?;
            }
            for feature in &self.features {
                f.insert(feature.as_str().into(), Value::Bool(false));
            }
            flex.update_ui_attributes(&ui)
                .await
                .map_err(|e| e.to_string())?;
            let was: Vec<String> = self
                .features
                .iter()
                .map(|f| previous[f.as_str()].to_string())
                .collect();
            Ok(format!(
                "set ui_attributes.{} = false (was {})",
                self.names(),
                was.join(", ")
            ))
        })
    }

    /// Took effect when every flag it turns off reads false now.
    fn took_effect<'a>(&'a self, _: &'a Plan, _: i64) -> BoxFuture<'a, Result<Effect, String>> {
        Box::pin(async move {
            let flex = Flex {
                client: &self.client,
                base_url: &self.base_url,
            };
            let config = flex.configuration().await.map_err(|e| e.to_string())?;
            let mut node = &config["ui_attributes"];
            for key in &FLAG_PATH[..3] {
                node = &node[key];
            }
            let off = self
                .features
                .iter()
                .all(|f| node[f.as_str()] == Value::Bool(false));
            Ok(if off {
                Effect::Applied(format!("ui_attributes.{} false", self.names()))
            } else {
                Effect::NotApplied
            })
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
