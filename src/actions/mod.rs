//! Actions (SPEC §5): the `Integration` trait, and the one pipeline around every integration that adds acks, once per deployment, cooldown, dry run, retries with backoff and the decision log.

pub mod alertmanager;
pub mod command;
pub mod flex;
pub mod serverless;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{Clock, rfc3339};
use crate::config::{Cbo, Config, DisableKind, RollbackKind};
use crate::decisions::{DecisionLog, Entry, Kind};
use crate::metrics::Metrics;
use crate::rules::RuleId;
use crate::sid::AccountSid;
use crate::twilio::TwilioClient;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a decision does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Rollback,
    Disable,
    Alert,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Rollback => "rollback",
            ActionKind::Disable => "disable",
            ActionKind::Alert => "alert",
        }
    }
}

/// One decision to act on one CBO.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub cbo: String,
    pub rule: RuleId,
    pub kind: ActionKind,
    pub evidence: Value,
    pub deployment: Option<String>,
    pub decided_at: String,
}

/// One receiver of a decision (a Twilio API, a webhook, a command). It does its one thing;
/// retries, dedup and logging are the pipeline's.
pub trait Integration: Send + Sync {
    fn name(&self) -> &'static str;
    /// Does it; `Ok` says what was done.
    fn run<'a>(&'a self, decision: &'a Decision) -> BoxFuture<'a, Result<String, String>>;
}

/// The transfers' switch of one CBO (`GET /v1/switch/{cbo}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Switch {
    pub cbo: String,
    pub transfers_enabled: bool,
    pub reason: Option<String>,
    pub since: Option<String>,
    /// The Flex flag values seen before the switch went off, restored when it goes back on.
    #[serde(skip)]
    pub previous_flags: Option<Value>,
}

impl Switch {
    /// Transfers on, as every CBO starts.
    fn on(cbo: &str) -> Switch {
        Switch {
            cbo: cbo.to_string(),
            transfers_enabled: true,
            reason: None,
            since: None,
            previous_flags: None,
        }
    }
}

/// Everything the pipeline remembers, rebuilt from the decision log on start.
#[derive(Default)]
struct Memory {
    /// (cbo, deployment) with a rollback fired.
    rolled_back: HashSet<(String, String)>,
    /// (cbo, kind) -> when an action of that kind was last attempted.
    last_attempt: HashMap<(String, ActionKind), i64>,
    /// Rules on-call silenced until they recover.
    acked: HashSet<(String, String)>,
    in_flight: HashSet<(String, ActionKind)>,
    switches: BTreeMap<String, Switch>,
}

pub struct Actions {
    config: Arc<Config>,
    pub log: Arc<DecisionLog>,
    metrics: Arc<Metrics>,
    clock: Clock,
    clients: HashMap<AccountSid, TwilioClient>,
    memory: Mutex<Memory>,
    http: reqwest::Client,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1 << attempt.min(6)).mul_f64(0.5 + fastrand::f64() / 2.0)
}

impl Actions {
    pub fn new(
        config: Arc<Config>,
        log: Arc<DecisionLog>,
        metrics: Arc<Metrics>,
        clock: Clock,
        clients: HashMap<AccountSid, TwilioClient>,
    ) -> Actions {
        let mut memory = Memory::default();
        for cbo in &config.cbos {
            memory
                .switches
                .insert(cbo.key.to_string(), Switch::on(cbo.key.as_str()));
        }
        // Replay the log: what fired, when, what is acked, where each switch stands.
        log.for_each(|e| match e.kind {
            Kind::Action if e.result.as_deref() == Some("fired") => {
                let kind = match e.action.as_deref() {
                    Some("rollback") => ActionKind::Rollback,
                    Some("disable") => ActionKind::Disable,
                    _ => return,
                };
                if kind == ActionKind::Rollback
                    && let Some(d) = &e.deployment
                {
                    memory.rolled_back.insert((e.cbo.clone(), d.clone()));
                }
                memory.last_attempt.insert((e.cbo.clone(), kind), e.at_ms);
            }
            Kind::Action if e.result.as_deref() == Some("failed") => {
                if let Some(kind) = match e.action.as_deref() {
                    Some("rollback") => Some(ActionKind::Rollback),
                    Some("disable") => Some(ActionKind::Disable),
                    _ => None,
                } {
                    memory.last_attempt.insert((e.cbo.clone(), kind), e.at_ms);
                }
            }
            Kind::Ack => {
                if let Some(rule) = &e.rule {
                    memory.acked.insert((e.cbo.clone(), rule.clone()));
                }
            }
            Kind::State if e.to.as_deref() == Some("ok") => {
                if let Some(rule) = &e.rule {
                    memory.acked.remove(&(e.cbo.clone(), rule.clone()));
                }
            }
            Kind::Switch => {
                if let Ok(s) = serde_json::from_value::<Switch>(e.evidence.clone()) {
                    let previous = e
                        .evidence
                        .get("previous_flags")
                        .cloned()
                        .filter(|v| !v.is_null());
                    memory.switches.insert(
                        e.cbo.clone(),
                        Switch {
                            previous_flags: previous,
                            ..s
                        },
                    );
                }
            }
            _ => {}
        });
        for (cbo, s) in &memory.switches {
            if let Some(m) = metrics.cbo(cbo) {
                m.set_disabled(!s.transfers_enabled);
            }
        }
        Actions {
            config,
            log,
            metrics,
            clock,
            clients,
            memory: Mutex::new(memory),
            http: reqwest::Client::new(),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn switch(&self, cbo: &str) -> Option<Switch> {
        self.memory().switches.get(cbo).cloned()
    }

    /// A rule recovered: its ack ends.
    pub fn recovered(&self, cbo: &str, rule: RuleId) {
        self.memory()
            .acked
            .remove(&(cbo.to_string(), rule.as_str().to_string()));
    }

    /// Appends to the log; a log that cannot be written is loud, never silent.
    pub fn record(&self, entry: Entry) -> Option<Entry> {
        match self.log.append(entry) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the decision log");
                None
            }
        }
    }

    fn count(&self, cbo: &str, integration: &str, result: &str) {
        if let Some(m) = self.metrics.cbo(cbo) {
            m.action(integration, result);
        }
    }

    fn entry(&self, d: &Decision, integration: &str, result: &str, detail: String) -> Entry {
        let mut e = Entry::new(&d.cbo, Kind::Action, self.clock.now_ms());
        e.rule = Some(d.rule.as_str().into());
        e.action = Some(d.kind.as_str().into());
        e.integration = Some(integration.into());
        e.result = Some(result.into());
        e.detail = Some(detail);
        e.deployment = d.deployment.clone();
        e.evidence = d.evidence.clone();
        e
    }

    fn integrations(self: &Arc<Self>, cbo: &Cbo, kind: ActionKind) -> Vec<Box<dyn Integration>> {
        let client = cbo.account_sid.and_then(|a| self.clients.get(&a).cloned());
        let mut out: Vec<Box<dyn Integration>> = Vec::new();
        let webhook = || {
            self.config.actions.webhook.as_ref().map(|w| {
                Box::new(webhook::Webhook {
                    http: self.http.clone(),
                    url: w.url.clone(),
                    secret: self.config.webhook_secret.clone(),
                    timeout: w.timeout,
                }) as Box<dyn Integration>
            })
        };
        match kind {
            ActionKind::Rollback => {
                for r in &cbo.rollback {
                    match (r, &client) {
                        (RollbackKind::Serverless, Some(c)) => {
                            if let (Some(service), Some(env)) =
                                (cbo.serverless_service_sid, cbo.serverless_environment_sid)
                            {
                                out.push(Box::new(serverless::Redeploy {
                                    client: c.clone(),
                                    base_url: self.config.twilio.serverless_url.clone(),
                                    service,
                                    environment: env,
                                }));
                            }
                        }
                        (RollbackKind::PluginRelease, Some(c)) => {
                            out.push(Box::new(flex::PreviousRelease {
                                client: c.clone(),
                                base_url: self.config.twilio.flex_url.clone(),
                            }))
                        }
                        (RollbackKind::Webhook, _) => out.extend(webhook()),
                        (RollbackKind::Command, _) => {
                            if let Some(c) = &self.config.actions.command {
                                out.push(Box::new(command::Command {
                                    argv: c.argv.clone(),
                                    timeout: c.timeout,
                                }));
                            }
                        }
                        _ => {}
                    }
                }
            }
            ActionKind::Disable => {
                for d in &cbo.disable {
                    match (d, &client) {
                        (DisableKind::FlexFlag, Some(c)) => out.push(Box::new(flex::FlagOff {
                            client: c.clone(),
                            base_url: self.config.twilio.flex_url.clone(),
                            actions: Arc::downgrade(self),
                        })),
                        (DisableKind::Webhook, _) => out.extend(webhook()),
                        _ => {}
                    }
                }
            }
            ActionKind::Alert => {}
        }
        out
    }

    /// Records that a decision's action was held back, and why.
    pub fn suppress(&self, d: &Decision, why: String) {
        tracing::info!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), why, "action suppressed");
        self.count(&d.cbo, d.kind.as_str(), "suppressed");
        self.record(self.entry(d, d.kind.as_str(), "suppressed", why));
    }

    /// Runs a decision through the pipeline: ack, once per deployment, cooldown, in flight,
    /// dry run; then each integration with retries, each attempt in the decision log. Returns
    /// at once; the integrations run on their own task so one CBO never waits for another.
    pub fn decide(self: &Arc<Self>, d: Decision) {
        let Some(cbo) = self.config.cbo(&d.cbo).cloned() else {
            return;
        };
        let now = self.clock.now_ms();
        let suppressed = |why: String| self.suppress(&d, why);
        if d.kind == ActionKind::Alert {
            tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), evidence = %d.evidence, "rule breached: alert");
            self.count(&d.cbo, "alert", "fired");
            self.record(self.entry(
                &d,
                "alert",
                "fired",
                "on-call alerted through rule_state and the log".into(),
            ));
            return;
        }
        {
            let mut m = self.memory();
            let key = (d.cbo.clone(), d.kind);
            let why = if m
                .acked
                .contains(&(d.cbo.clone(), d.rule.as_str().to_string()))
            {
                Some("acknowledged by on-call until the rule recovers".to_string())
            } else if d.kind == ActionKind::Rollback
                && d.deployment
                    .as_ref()
                    .is_some_and(|dep| m.rolled_back.contains(&(d.cbo.clone(), dep.clone())))
            {
                Some(format!(
                    "already rolled back deployment {}",
                    d.deployment.as_deref().unwrap_or("")
                ))
            } else if d.kind == ActionKind::Disable
                && m.switches.get(&d.cbo).is_some_and(|s| !s.transfers_enabled)
            {
                Some("transfers are already disabled".into())
            } else if let Some(at) = m
                .last_attempt
                .get(&key)
                .filter(|at| now - **at < self.config.actions.cooldown.as_millis() as i64)
            {
                Some(format!(
                    "cooldown: last {} at {}",
                    d.kind.as_str(),
                    rfc3339(*at)
                ))
            } else if m.in_flight.contains(&key) {
                Some(format!("a {} is already running", d.kind.as_str()))
            } else {
                m.in_flight.insert(key.clone());
                m.last_attempt.insert(key, now);
                None
            };
            drop(m);
            if let Some(why) = why {
                suppressed(why);
                return;
            }
        }
        let integrations = self.integrations(&cbo, d.kind);
        if integrations.is_empty() && d.kind == ActionKind::Rollback {
            self.memory().in_flight.remove(&(d.cbo.clone(), d.kind));
            suppressed("no rollback integration is configured for this CBO".into());
            return;
        }
        if self.config.actions.dry_run {
            let names: Vec<&str> = integrations.iter().map(|i| i.name()).collect();
            let switch = if d.kind == ActionKind::Disable {
                ["switch"].as_slice()
            } else {
                &[]
            };
            for name in names.iter().chain(switch) {
                self.count(&d.cbo, name, "dry_run");
                tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), integration = name, "dry run: would act");
                self.record(self.entry(
                    &d,
                    name,
                    "dry_run",
                    "actions.dry_run is on: nothing was sent".into(),
                ));
            }
            self.memory().in_flight.remove(&(d.cbo.clone(), d.kind));
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.fire(d, integrations).await;
        });
    }

    async fn fire(self: Arc<Self>, d: Decision, integrations: Vec<Box<dyn Integration>>) {
        if d.kind == ActionKind::Disable {
            self.set_switch(&d.cbo, false, format!("{} breached", d.rule.as_str()));
            self.count(&d.cbo, "switch", "fired");
            self.record(self.entry(
                &d,
                "switch",
                "fired",
                "GET /v1/switch reports transfers disabled".into(),
            ));
        }
        let attempts = self.config.actions.attempts.max(1);
        let mut any_fired = false;
        for integration in &integrations {
            let name = integration.name();
            let mut attempt = 0;
            loop {
                attempt += 1;
                match integration.run(&d).await {
                    Ok(done) => {
                        any_fired = true;
                        tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), integration = name, done, "action fired");
                        self.count(&d.cbo, name, "fired");
                        let mut e = self.entry(&d, name, "fired", done);
                        e.attempt = Some(attempt);
                        self.record(e);
                        break;
                    }
                    Err(error) if attempt < attempts => {
                        tracing::warn!(cbo = %d.cbo, integration = name, attempt, error, "action failed; retrying");
                        let mut e = self.entry(&d, name, "retrying", error);
                        e.attempt = Some(attempt);
                        self.record(e);
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                    Err(error) => {
                        tracing::error!(cbo = %d.cbo, rule = d.rule.as_str(), integration = name, attempt, error, "action failed");
                        self.count(&d.cbo, name, "failed");
                        let mut e = self.entry(&d, name, "failed", error);
                        e.attempt = Some(attempt);
                        self.record(e);
                        break;
                    }
                }
            }
        }
        // The decision as a whole: fired when any integration did it.
        let result = if any_fired || integrations.is_empty() {
            "fired"
        } else {
            "failed"
        };
        let detail = format!(
            "{} of {} integrations",
            if any_fired {
                "done by some"
            } else {
                "done by none"
            },
            integrations.len()
        );
        self.record(self.entry(&d, d.kind.as_str(), result, detail));
        let mut m = self.memory();
        if d.kind == ActionKind::Rollback
            && any_fired
            && let Some(dep) = &d.deployment
        {
            m.rolled_back.insert((d.cbo.clone(), dep.clone()));
        }
        m.in_flight.remove(&(d.cbo.clone(), d.kind));
    }

    /// Sets the daemon's own switch and logs it. Turning it on forgets the Flex values kept
    /// for restoring.
    pub fn set_switch(&self, cbo: &str, enabled: bool, reason: String) {
        let now = self.clock.now_ms();
        let switch = {
            let mut m = self.memory();
            let s = m
                .switches
                .entry(cbo.to_string())
                .or_insert_with(|| Switch::on(cbo));
            s.transfers_enabled = enabled;
            s.reason = Some(reason);
            s.since = Some(rfc3339(now));
            if enabled {
                s.previous_flags = None;
            }
            s.clone()
        };
        if let Some(m) = self.metrics.cbo(cbo) {
            m.set_disabled(!enabled);
        }
        self.log_switch(&switch);
    }

    /// Remembers the Flex flags seen before the flag went off (for re-enabling).
    pub fn remember_flags(&self, cbo: &str, flags: Value) {
        let switch = {
            let mut m = self.memory();
            let Some(s) = m.switches.get_mut(cbo) else {
                return;
            };
            if s.previous_flags.is_none() {
                s.previous_flags = Some(flags);
            }
            s.clone()
        };
        self.log_switch(&switch);
    }

    /// A switch entry carries the whole switch, the flags to restore included, so a restart
    /// rebuilds it from the last one.
    fn log_switch(&self, switch: &Switch) {
        let mut e = Entry::new(&switch.cbo, Kind::Switch, self.clock.now_ms());
        e.detail = switch.reason.clone();
        e.action = Some(
            if switch.transfers_enabled {
                "enable"
            } else {
                "disable"
            }
            .into(),
        );
        let mut evidence = serde_json::to_value(switch).expect("switch serializes");
        evidence["previous_flags"] = switch.previous_flags.clone().unwrap_or(Value::Null);
        e.evidence = evidence;
        self.record(e);
    }

    /// On-call acknowledges `rules` of `cbo`: their actions stay silent until they recover.
    pub fn ack(&self, cbo: &str, rules: &[RuleId], by: &str) {
        for rule in rules {
            self.memory()
                .acked
                .insert((cbo.to_string(), rule.as_str().to_string()));
            let mut e = Entry::new(cbo, Kind::Ack, self.clock.now_ms());
            e.rule = Some(rule.as_str().into());
            e.detail = Some(format!("acknowledged by {by}"));
            self.record(e);
        }
    }

    /// Re-enables transfers: the Flex flag values seen before the switch come back (when the
    /// flag was switched and actions are live), then the daemon's switch.
    pub async fn enable(&self, cbo: &Cbo, reason: String) -> Result<Switch, String> {
        let previous = self.switch(cbo.key.as_str()).and_then(|s| s.previous_flags);
        if let (Some(previous), false) = (previous, self.config.actions.dry_run)
            && cbo.disable.contains(&DisableKind::FlexFlag)
        {
            let client = cbo
                .account_sid
                .and_then(|a| self.clients.get(&a).cloned())
                .ok_or("no Twilio credentials for this CBO")?;
            flex::restore_flags(&client, &self.config.twilio.flex_url, &previous).await?;
            self.count(cbo.key.as_str(), "flex_flag", "fired");
        }
        self.set_switch(cbo.key.as_str(), true, reason);
        Ok(self
            .switch(cbo.key.as_str())
            .expect("every cbo has a switch"))
    }

    /// Sends breaches and recoveries to the configured Alertmanager, on its own task. These are
    /// notifications, not actions on Twilio: they are sent in dry run too.
    pub fn notify(self: &Arc<Self>, alerts: Vec<Value>) {
        let Some(am) = self.config.actions.alertmanager.clone() else {
            return;
        };
        if alerts.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let cbos: Vec<String> = alerts
                .iter()
                .filter_map(|a| a["labels"]["cbo"].as_str().map(str::to_string))
                .collect();
            let result = alertmanager::post(&this.http, &am.url, am.timeout, &alerts).await;
            let label = if result.is_ok() { "fired" } else { "failed" };
            for cbo in &cbos {
                this.count(cbo, "alertmanager", label);
            }
            if let Err(e) = result {
                tracing::error!(error = %e, alerts = alerts.len(), "cannot notify Alertmanager");
            }
        });
    }
}
