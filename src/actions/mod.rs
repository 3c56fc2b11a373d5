//! Actions (SPEC §5): the `Integration` trait, and the one pipeline around every integration that adds acks, once per deployment, cooldown, dry run, retries with backoff and the decision log.

pub mod alertmanager;
pub mod command;
pub mod flex;
pub mod known;
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
use crate::config::{Cbo, Config, DisableKind, Feature, RollbackKind};
use crate::decisions::{DecisionLog, Entry, Kind, LogError};
use crate::metrics::Metrics;
use crate::rules::RuleId;
use known::{Artifact, Ledger, Live, NoTarget, Verdict, View};

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

    pub fn parse(s: &str) -> Option<ActionKind> {
        [ActionKind::Rollback, ActionKind::Disable, ActionKind::Alert]
            .into_iter()
            .find(|k| k.as_str() == s)
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

/// What an integration will change, fixed before anything is sent and written in the intent:
/// a retry or a restart uses this, never a target derived again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// What will be live after (a build, a plugin configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// What is live now and is replaced (known bad once the rollback took effect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacing: Option<String>,
}

impl Plan {
    fn describe(&self) -> String {
        match (&self.artifact, &self.target) {
            (Some(a), Some(t)) => format!(
                "{} {t}{}",
                a.as_str(),
                self.replacing
                    .as_ref()
                    .map(|r| format!(" (replacing {r})"))
                    .unwrap_or_default()
            ),
            _ => "no target to fix".into(),
        }
    }
}

/// Why a plan could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlanError {
    /// Nothing known good to roll back to: page and disable instead of guessing.
    #[error("{0}")]
    NoTarget(#[from] NoTarget),
    /// Twilio could not be read.
    #[error("{0}")]
    Read(String),
}

/// What an integration knows of a CBO when it plans: the known-good ledger's views and the
/// `deploy_window` that makes an old build good by Twilio's history.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub builds: View,
    pub plugin_configurations: View,
    pub deploy_window: Duration,
}

impl Known {
    pub fn view(&self, artifact: Artifact) -> &View {
        match artifact {
            Artifact::Build => &self.builds,
            Artifact::PluginConfiguration => &self.plugin_configurations,
        }
    }
}

/// A rollback's plan from Twilio's history (newest first): the known-good target, and what it
/// replaces.
pub fn plan_rollback(
    artifact: Artifact,
    history: &[Live],
    known: &Known,
) -> Result<Plan, PlanError> {
    let target = known
        .view(artifact)
        .target(artifact, history, known.deploy_window)?;
    Ok(Plan {
        artifact: Some(artifact),
        target: Some(target),
        replacing: history.first().map(|l| l.sid.clone()),
    })
}

/// Whether a rollback took effect: its target went live in or after the second of its intent
/// (Twilio stamps whole seconds).
pub fn rolled_back(history: &[Live], plan: &Plan, since_ms: i64) -> Result<Effect, String> {
    let target = plan.target.as_deref().ok_or("the plan names no target")?;
    let since_s = since_ms.div_euclid(1000) * 1000;
    Ok(history
        .iter()
        .find(|l| l.sid == target && l.since_ms >= since_s)
        .map_or(Effect::NotApplied, |l| {
            Effect::Applied(format!(
                "{} {target} went live as {} at {}",
                plan.artifact.map_or("target", Artifact::as_str),
                l.via,
                rfc3339(l.since_ms)
            ))
        }))
}

/// Whether an earlier attempt took effect, as read back from where it acts.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Applied(String),
    NotApplied,
    /// This integration cannot be read back (a webhook, a command): it carries the intent's
    /// idempotency key instead, for the receiver to drop a repeat.
    Unknown,
}

/// One attempt: the decision, its plan, and the idempotency key of its intent.
#[derive(Clone, Copy)]
pub struct Attempt<'a> {
    pub decision: &'a Decision,
    pub plan: &'a Plan,
    pub key: &'a str,
}

/// One receiver of a decision (a Twilio API, a webhook, a command). It does its one thing;
/// intents, the check of an earlier attempt, retries, dedup and logging are the pipeline's.
pub trait Integration: Send + Sync {
    fn name(&self) -> &'static str;

    /// Reads, changing nothing, what the action will do (the rollback target).
    fn plan<'a>(
        &'a self,
        _d: &'a Decision,
        _known: &'a Known,
    ) -> BoxFuture<'a, Result<Plan, PlanError>> {
        Box::pin(async { Ok(Plan::default()) })
    }

    /// One attempt: its request is sent once.
    fn run<'a>(&'a self, attempt: Attempt<'a>) -> BoxFuture<'a, Result<String, String>>;

    /// Reads whether an attempt made at or after `since_ms` took effect.
    fn took_effect<'a>(
        &'a self,
        _plan: &'a Plan,
        _since_ms: i64,
    ) -> BoxFuture<'a, Result<Effect, String>> {
        Box::pin(async { Ok(Effect::Unknown) })
    }
}

/// The transfers' switch of one CBO (`GET /v1/switch/{cbo}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Switch {
    pub cbo: String,
    /// The feature as a whole (`conversation_transfer.enabled`).
    pub transfers_enabled: bool,
    /// Cold transfers alone (`conversation_transfer.cold_transfer`).
    #[serde(default = "on")]
    pub cold_transfer: bool,
    /// Inviting a second agent alone (`conversation_transfer.multi_participant`).
    #[serde(default = "on")]
    pub multi_participant: bool,
    pub reason: Option<String>,
    pub since: Option<String>,
    /// The Flex flag values seen before the switch went off, restored when it goes back on.
    #[serde(skip)]
    pub previous_flags: Option<Value>,
}

fn on() -> bool {
    true
}

impl Switch {
    /// Transfers on, as every CBO starts.
    fn on(cbo: &str) -> Switch {
        Switch {
            cbo: cbo.to_string(),
            transfers_enabled: true,
            cold_transfer: true,
            multi_participant: true,
            reason: None,
            since: None,
            previous_flags: None,
        }
    }

    /// Some part of the feature is switched off.
    pub fn is_off(&self) -> bool {
        !(self.transfers_enabled && self.cold_transfer && self.multi_participant)
    }

    /// Switches `off` (flag names) off and every other flag on.
    fn set(&mut self, off: &[Feature]) {
        self.transfers_enabled = !off.contains(&Feature::Enabled);
        self.cold_transfer = !off.contains(&Feature::ColdTransfer);
        self.multi_participant = !off.contains(&Feature::MultiParticipant);
    }
}

/// What the decision log says, folded entry by entry in order: everything a start needs. The
/// log keeps one folded to its newest entry and snapshots it, so a start reads the snapshot
/// and the entries after it, not the whole history.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Replayed {
    /// (cbo, deployment) with a rollback fired.
    rolled_back: HashSet<(String, String)>,
    /// (cbo, kind) -> when an action of that kind was last attempted.
    #[serde(with = "pairs")]
    last_attempt: HashMap<(String, ActionKind), i64>,
    /// Rules on-call silenced until they recover.
    acked: HashSet<(String, String)>,
    #[serde(with = "saved_switches")]
    switches: BTreeMap<String, Switch>,
    known: Ledger,
    /// Intents without a result yet, by key: at a start, settled by asking Twilio.
    unsettled: BTreeMap<String, Entry>,
    /// (cbo, rule) -> the state it was last logged in: a start resumes from it, so restarts do
    /// not log again a state that did not change.
    #[serde(with = "pairs")]
    rule_states: BTreeMap<(String, String), String>,
}

impl Replayed {
    /// The state each rule of each CBO was last logged in.
    pub fn rule_states(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.rule_states
            .iter()
            .map(|((cbo, rule), state)| (cbo.as_str(), rule.as_str(), state.as_str()))
    }
}

/// A map with keys that are not strings, saved as a list of pairs.
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<'a, S, M, K, V>(map: &'a M, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        &'a M: IntoIterator<Item = (&'a K, &'a V)>,
        K: Serialize + 'a,
        V: Serialize + 'a,
    {
        s.collect_seq(map)
    }

    pub fn deserialize<'de, D, M, K, V>(d: D) -> Result<M, D::Error>
    where
        D: Deserializer<'de>,
        M: FromIterator<(K, V)>,
        K: Deserialize<'de>,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Switches with the Flex flags to restore (which the API does not show).
mod saved_switches {
    use super::Switch;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, Switch>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values().map(|sw| (sw, &sw.previous_flags)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Switch>, D::Error> {
        Ok(Vec::<(Switch, Option<Value>)>::deserialize(d)?
            .into_iter()
            .map(|(sw, previous_flags)| {
                (
                    sw.cbo.clone(),
                    Switch {
                        previous_flags,
                        ..sw
                    },
                )
            })
            .collect())
    }
}

/// Everything the pipeline remembers: what the log says, and what is under way now.
#[derive(Default)]
struct Memory {
    replayed: Replayed,
    in_flight: HashSet<(String, ActionKind)>,
    /// Rollbacks that took effect since the tick last looked: (cbo, when).
    landed: Vec<(String, i64)>,
}

impl std::ops::Deref for Memory {
    type Target = Replayed;
    fn deref(&self) -> &Replayed {
        &self.replayed
    }
}

impl std::ops::DerefMut for Memory {
    fn deref_mut(&mut self) -> &mut Replayed {
        &mut self.replayed
    }
}

impl Replayed {
    /// What one entry of the log says, folded in order.
    pub fn apply(&mut self, e: &Entry) {
        let kind = e.action.as_deref().and_then(ActionKind::parse);
        match e.kind {
            Kind::Intent => {
                if let (Some(key), Some(kind)) = (&e.key, kind) {
                    self.unsettled.insert(key.clone(), e.clone());
                    self.last_attempt.insert((e.cbo.clone(), kind), e.at_ms);
                }
            }
            Kind::Action => {
                // Only a result settles an intent: a `retrying` entry says an attempt failed,
                // not whether the next one (or that one, late) took effect.
                if let Some(key) = &e.key
                    && matches!(e.result.as_deref(), Some("fired" | "failed"))
                {
                    self.unsettled.remove(key);
                }
                let Some(kind) = kind.filter(|k| *k != ActionKind::Alert) else {
                    return;
                };
                match e.result.as_deref() {
                    Some("fired") => {
                        if kind == ActionKind::Rollback
                            && let Some(d) = &e.deployment
                        {
                            self.rolled_back.insert((e.cbo.clone(), d.clone()));
                        }
                        self.last_attempt.insert((e.cbo.clone(), kind), e.at_ms);
                        if let Ok(plan) = serde_json::from_value::<Plan>(e.evidence["plan"].clone())
                        {
                            self.took_effect(&e.cbo, &plan);
                        }
                    }
                    Some("failed") => {
                        self.last_attempt.insert((e.cbo.clone(), kind), e.at_ms);
                    }
                    _ => {}
                }
            }
            Kind::Known => {
                let artifact = e.integration.as_deref().and_then(Artifact::parse);
                let verdict = match e.result.as_deref() {
                    Some("good") => Some(Verdict::Good),
                    Some("bad") => Some(Verdict::Bad),
                    _ => None,
                };
                if let (Some(a), Some(v), Some(sid)) = (artifact, verdict, &e.detail) {
                    self.known.mark(&e.cbo, a, sid, v);
                }
            }
            Kind::Ack => {
                if let Some(rule) = &e.rule {
                    self.acked.insert((e.cbo.clone(), rule.clone()));
                }
            }
            Kind::State => {
                if let (Some(rule), Some(to)) = (&e.rule, &e.to) {
                    let key = (e.cbo.clone(), rule.clone());
                    if to == "ok" {
                        self.acked.remove(&key);
                    }
                    self.rule_states.insert(key, to.clone());
                }
            }
            Kind::Switch => {
                if let Ok(s) = serde_json::from_value::<Switch>(e.evidence.clone()) {
                    let previous = e
                        .evidence
                        .get("previous_flags")
                        .cloned()
                        .filter(|v| !v.is_null());
                    self.switches.insert(
                        e.cbo.clone(),
                        Switch {
                            previous_flags: previous,
                            ..s
                        },
                    );
                }
            }
            _ => {}
        }
    }

    /// A rollback's plan took effect: what it replaced is known bad, what it put back is this
    /// guard's own.
    fn took_effect(&mut self, cbo: &str, plan: &Plan) {
        if let Some(artifact) = plan.artifact {
            if let Some(old) = &plan.replacing {
                self.known.mark(cbo, artifact, old, Verdict::Bad);
            }
            if let Some(target) = &plan.target {
                self.known.own(cbo, artifact, target);
            }
        }
    }
}

/// How one integration's part of a decision ended.
enum Ran {
    Fired,
    Failed,
    /// No known-good target: nothing was sent.
    NoTarget(String),
    /// The intent could not be written: nothing was sent, and nothing else may be.
    NotRecorded,
}

/// Appends `entry`; a log that cannot be written is loud, never silent.
fn append_logged(log: &DecisionLog, entry: Entry) -> Option<Entry> {
    match log.append(entry) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "cannot write the decision log");
            None
        }
    }
}

thread_local! {
    /// The records noted during a tick on this thread (`Actions::in_one_commit`).
    static TICK_NOTES: std::cell::RefCell<Option<Vec<Entry>>> = const { std::cell::RefCell::new(None) };
}

pub struct Actions {
    live: Arc<crate::Live>,
    pub log: Arc<DecisionLog>,
    metrics: Arc<Metrics>,
    clock: Clock,
    memory: Mutex<Memory>,
    http: reqwest::Client,
    /// Set when something that held actions back has cleared (intents settled): breaches
    /// still standing are decided again.
    recheck: std::sync::atomic::AtomicBool,
    /// Whether this replica led at the last `follow`.
    led: std::sync::atomic::AtomicBool,
    runtime: ActionRuntime,
}

/// Where actions and notifications run. On the daemon's multi-threaded runtime they get a
/// runtime (and thread) of their own: a thousand rollbacks at once, each a few requests to
/// Twilio, then do not queue `/healthz`, ingest and the pollers behind them (p99 of `/healthz`
/// through a 1,000-CBO storm: 67 ms shared, 2.7 ms apart). On a current-thread runtime (the
/// tests' paused clock) they stay on it, where the clock is.
struct ActionRuntime(Option<tokio::runtime::Runtime>);

impl ActionRuntime {
    fn new() -> ActionRuntime {
        let shared = tokio::runtime::Handle::try_current().map_or(true, |h| {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
        if shared {
            return ActionRuntime(None);
        }
        let own = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("transfer-guard-actions")
            .enable_all()
            .build();
        match own {
            Ok(rt) => ActionRuntime(Some(rt)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a runtime for actions: they share the daemon's");
                ActionRuntime(None)
            }
        }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        match &self.0 {
            Some(rt) => {
                rt.spawn(task);
            }
            None => {
                tokio::spawn(task);
            }
        }
    }
}

impl Drop for ActionRuntime {
    fn drop(&mut self) {
        // Never blocks (a runtime dropped in async code would panic): what is still running
        // was recorded as an intent, settled with Twilio at the next start.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1 << attempt.min(6)).mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Why transfers could not be turned back on.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    #[error("the decision log cannot be written ({0}): nothing was changed")]
    NotRecorded(String),
    #[error("cannot restore the Flex flags: {0}")]
    Twilio(String),
}

/// The on-call change could not be recorded, so it was not made.
#[derive(Debug, thiserror::Error)]
#[error("not recorded, so not done: {0}")]
pub struct NotRecorded(#[from] LogError);

impl Actions {
    /// `replayed`: what `log` says (`DecisionLog::replayed`): what fired, when, what is acked,
    /// known good and bad, where each switch stands, which intents still need settling.
    pub fn new(
        live: Arc<crate::Live>,
        log: Arc<DecisionLog>,
        replayed: Replayed,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Actions {
        let mut memory = Memory {
            replayed,
            ..Memory::default()
        };
        for cbo in &live.config().cbos {
            let key = cbo.key.as_str();
            memory
                .switches
                .entry(key.to_string())
                .or_insert_with(|| Switch::on(key));
        }
        for (cbo, s) in &memory.switches {
            if let Some(m) = metrics.cbo(cbo) {
                m.set_disabled(s.is_off());
            }
        }
        Actions {
            live,
            log,
            metrics,
            clock,
            memory: Mutex::new(memory),
            http: reqwest::Client::new(),
            recheck: Default::default(),
            led: Default::default(),
            runtime: ActionRuntime::new(),
        }
    }

    /// Whether this process acts (fires actions, notifies): always with the file log; with
    /// the store, only on the leader.
    pub fn leading(&self) -> bool {
        self.log.leading()
    }

    /// Replicas, at each tick: takes what the other replicas wrote to the decision log
    /// (rollbacks fired, switches, acks, known builds, intents under way), then says whether
    /// this replica leads. On becoming the leader (having read the log to its end since taking
    /// the lease) breaches still standing are decided again and intents the last leader left
    /// without a result are settled with Twilio.
    pub fn follow(&self) {
        let Some(store) = self.log.store() else {
            return;
        };
        let epoch = store.epoch();
        let entries = match self.log.others() {
            Ok(entries) => entries,
            // Counted and logged once per spell by the store; /readyz says why.
            Err(_) => {
                self.metrics.set_leader(store.leading());
                return;
            }
        };
        {
            let mut m = self.memory();
            for e in &entries {
                m.apply(e);
                if e.kind == Kind::Switch
                    && let (Some(series), Some(s)) =
                        (self.metrics.cbo(&e.cbo), m.switches.get(&e.cbo))
                {
                    series.set_disabled(s.is_off());
                }
            }
        }
        store.caught_up(epoch);
        let leading = store.leading();
        self.metrics.set_leader(leading);
        let before = self.led.swap(leading, std::sync::atomic::Ordering::AcqRel);
        if leading && !before {
            tracing::warn!(replica = %store.me, epoch, "this replica leads: standing breaches are decided again");
            self.recheck
                .store(true, std::sync::atomic::Ordering::Release);
        } else if !leading && before {
            tracing::warn!(replica = %store.me, "this replica no longer leads: it acts on nothing");
        }
    }

    /// Whether breaches still standing should be decided again (something that held them
    /// back has cleared since the last call).
    pub fn take_recheck(&self) -> bool {
        self.recheck
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// A reload added CBOs: their switches start on (unless the log says otherwise).
    pub fn reconfigure(&self, config: &Config) {
        let mut memory = self.memory();
        for cbo in &config.cbos {
            let key = cbo.key.as_str();
            memory
                .switches
                .entry(key.to_string())
                .or_insert_with(|| Switch::on(key));
            if let (Some(m), Some(s)) = (self.metrics.cbo(key), memory.switches.get(key)) {
                m.set_disabled(s.is_off());
            }
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn switch(&self, cbo: &str) -> Option<Switch> {
        self.memory().switches.get(cbo).cloned()
    }

    /// Actions being carried out now.
    pub fn in_flight(&self) -> usize {
        self.memory().in_flight.len()
    }

    /// Waits until no action is being carried out, or `deadline` passes (a stop finishes what
    /// it can; an intent not finished is settled with Twilio at the next start). Whether all
    /// finished.
    pub async fn finish_in_flight(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        while self.in_flight() > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// A rule recovered: its ack ends.
    pub fn recovered(&self, cbo: &str, rule: RuleId) {
        self.memory()
            .acked
            .remove(&(cbo.to_string(), rule.as_str().to_string()));
    }

    /// Appends to the log; a log that cannot be written is loud, never silent.
    pub fn record(&self, entry: Entry) -> Option<Entry> {
        append_logged(&self.log, entry)
    }

    /// A record that nothing waits on (an alert, a suppression, a dry run): inside a tick it
    /// joins the tick's other such records in one commit at the tick's end; elsewhere it is
    /// written at once.
    fn note(&self, entry: Entry) {
        let deferred = TICK_NOTES.with(|notes| match notes.borrow_mut().as_mut() {
            Some(batch) => {
                batch.push(entry);
                None
            }
            None => Some(entry),
        });
        if let Some(entry) = deferred {
            self.record(entry);
        }
    }

    /// Runs `tick` with the records it notes gathered, then written with one commit: a storm
    /// of a thousand breaches costs one fsync for them, not a thousand in a row.
    pub fn in_one_commit<T>(&self, tick: impl FnOnce() -> T) -> T {
        struct Flush<'a>(&'a Actions);
        impl Drop for Flush<'_> {
            fn drop(&mut self) {
                let notes = TICK_NOTES
                    .with(|n| n.borrow_mut().take())
                    .unwrap_or_default();
                if let Err(e) = self.0.log.append_all(notes) {
                    tracing::error!(error = %e, "cannot write the decision log");
                }
            }
        }
        TICK_NOTES.with(|n| *n.borrow_mut() = Some(Vec::new()));
        let _flush = Flush(self);
        tick()
    }

    /// `record` from an action in flight: the write waits on a blocking thread, where it joins
    /// the other actions' writes in one fsync (group commit) instead of holding a worker.
    async fn durable(&self, entry: Entry) -> Option<Entry> {
        let log = self.log.clone();
        match tokio::task::spawn_blocking(move || append_logged(&log, entry)).await {
            Ok(written) => written,
            Err(e) => {
                tracing::error!(error = %e, "cannot write the decision log");
                None
            }
        }
    }

    fn count(&self, cbo: &str, kind: ActionKind, integration: &str, result: &str) {
        if let Some(m) = self.metrics.cbo(cbo) {
            m.action(kind.as_str(), integration, result);
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

    /// What integrations plan with for `cbo`.
    fn known(&self, cbo: &str) -> Known {
        let deploy_window = self
            .config()
            .cbo(cbo)
            .map(|c| {
                crate::rules::Params::resolve(RuleId::CrossCbo, &self.config().rules, &c.rules)
                    .deploy_window
            })
            .unwrap_or(Duration::from_secs(3600));
        let m = self.memory();
        Known {
            builds: m.known.view(cbo, Artifact::Build),
            plugin_configurations: m.known.view(cbo, Artifact::PluginConfiguration),
            deploy_window,
        }
    }

    /// Learns that `sid` is good or bad (a validation window passed, `deploy_window` ran
    /// without a breach); news is written to the decision log first.
    pub fn learn(&self, cbo: &str, artifact: Artifact, sid: &str, verdict: Verdict, why: &str) {
        // Followers learn it from the leader's log.
        if !self.leading() || self.memory().known.knows(cbo, artifact, sid, verdict) {
            return;
        }
        let mut e = Entry::new(cbo, Kind::Known, self.clock.now_ms());
        e.integration = Some(artifact.as_str().into());
        e.result = Some(verdict.as_str().into());
        e.detail = Some(sid.to_string());
        e.evidence = serde_json::json!({ "why": why });
        if self.record(e).is_some() {
            tracing::info!(
                cbo,
                artifact = artifact.as_str(),
                sid,
                verdict = verdict.as_str(),
                why,
                "learned"
            );
            self.memory().known.mark(cbo, artifact, sid, verdict);
        }
    }

    pub fn known_view(&self, cbo: &str, artifact: Artifact) -> View {
        self.memory().known.view(cbo, artifact)
    }

    fn integrations(self: &Arc<Self>, cbo: &Cbo, kind: ActionKind) -> Vec<Box<dyn Integration>> {
        let client = cbo
            .account_sid
            .and_then(|a| self.live.clients().get(&a).cloned());
        let mut out: Vec<Box<dyn Integration>> = Vec::new();
        let webhook = || {
            self.config().actions.webhook.as_ref().map(|w| {
                Box::new(webhook::Webhook {
                    http: self.http.clone(),
                    url: w.url.clone(),
                    secret: self.config().webhook_secret.clone(),
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
                                    base_url: self.config().twilio.serverless_url.clone(),
                                    service,
                                    environment: env,
                                }));
                            }
                        }
                        (RollbackKind::PluginRelease, Some(c)) => {
                            out.push(Box::new(flex::PreviousRelease {
                                client: c.clone(),
                                base_url: self.config().twilio.flex_url.clone(),
                            }))
                        }
                        (RollbackKind::Webhook, _) => out.extend(webhook()),
                        (RollbackKind::Command, _) => {
                            if let Some(c) = &self.config().actions.command {
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
                            base_url: self.config().twilio.flex_url.clone(),
                            actions: Arc::downgrade(self),
                            features: cbo.disable_features.clone(),
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

    /// The integration names a decision of `kind` would reach on `cbo`, for counting.
    fn names(self: &Arc<Self>, cbo: &Cbo, kind: ActionKind) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .integrations(cbo, kind)
            .iter()
            .map(|i| i.name())
            .collect();
        match kind {
            ActionKind::Disable => names.push("switch"),
            ActionKind::Alert => names.push("log"),
            ActionKind::Rollback => {}
        }
        names
    }

    /// Records that a decision's action was held back, and why.
    pub fn suppress(self: &Arc<Self>, d: &Decision, why: String) {
        if !self.leading() {
            return;
        }
        tracing::info!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), why, "action suppressed");
        if let Some(cbo) = self.config().cbo(&d.cbo) {
            for name in self.names(cbo, d.kind) {
                self.count(&d.cbo, d.kind, name, "suppressed");
            }
        }
        self.note(self.entry(d, d.kind.as_str(), "suppressed", why));
    }

    /// Runs a decision through the pipeline: a writable log, ack, intents still settling, once
    /// per deployment, cooldown, in flight, dry run; then each integration: plan, intent,
    /// attempts that first read whether the last one took effect, result. Returns at once; the
    /// integrations run on their own task so one CBO never waits for another.
    pub fn decide(self: &Arc<Self>, d: Decision) {
        // A follower decides nothing: the leader does, once.
        if !self.leading() {
            return;
        }
        let Some(cbo) = self.config().cbo(&d.cbo).cloned() else {
            return;
        };
        let now = self.clock.now_ms();
        if d.kind == ActionKind::Alert {
            tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), evidence = %d.evidence, "rule breached: alert");
            self.count(&d.cbo, ActionKind::Alert, "log", "fired");
            self.note(self.entry(
                &d,
                "log",
                "fired",
                "on-call alerted through rule_state and the log".into(),
            ));
            return;
        }
        if let Some(why) = self.log.health.broken() {
            // No action without a record: /readyz and an alert say why.
            tracing::error!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), why, "action held: the decision log cannot be written");
            for name in self.names(&cbo, d.kind) {
                self.count(&d.cbo, d.kind, name, "suppressed");
            }
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
            } else if let Some(e) = m.unsettled.values().find(|e| e.cbo == d.cbo) {
                Some(format!(
                    "an intent without a result ({}) is still being settled with Twilio",
                    e.key.as_deref().unwrap_or("")
                ))
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
                && m.switches.get(&d.cbo).is_some_and(Switch::is_off)
            {
                Some("transfers are already disabled".into())
            } else if let Some(at) = m
                .last_attempt
                .get(&key)
                .filter(|at| now - **at < self.config().actions.cooldown.as_millis() as i64)
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
                self.suppress(&d, why);
                return;
            }
        }
        let integrations = self.integrations(&cbo, d.kind);
        if integrations.is_empty() && d.kind == ActionKind::Rollback {
            self.memory().in_flight.remove(&(d.cbo.clone(), d.kind));
            self.suppress(
                &d,
                "no rollback integration is configured for this CBO".into(),
            );
            return;
        }
        if self.config().actions.dry_run {
            for name in self.names(&cbo, d.kind) {
                self.count(&d.cbo, d.kind, name, "dry_run");
                tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), integration = name, "dry run: would act");
                self.note(self.entry(
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
        self.runtime.spawn(async move {
            this.fire(d, integrations).await;
        });
    }

    async fn fire(self: Arc<Self>, d: Decision, integrations: Vec<Box<dyn Integration>>) {
        if d.kind == ActionKind::Disable {
            let reason = format!("{} breached", d.rule.as_str());
            let off = self
                .config()
                .cbo(&d.cbo)
                .map_or(vec![Feature::Enabled], |c| c.disable_features.clone());
            if self.set_switch_as(&d.cbo, &off, reason, false).is_err() {
                // Not recorded, so not done: no cooldown runs from it.
                self.count(&d.cbo, d.kind, "switch", "failed");
                let mut m = self.memory();
                m.in_flight.remove(&(d.cbo.clone(), d.kind));
                m.last_attempt.remove(&(d.cbo.clone(), d.kind));
                return;
            }
            self.count(&d.cbo, d.kind, "switch", "fired");
            self.record(self.entry(
                &d,
                "switch",
                "fired",
                "GET /v1/switch reports transfers disabled".into(),
            ));
        }
        let known = self.known(&d.cbo);
        let (mut fired, mut no_target, mut unrecorded) = (0, Vec::new(), false);
        for integration in &integrations {
            match self.run_one(&d, integration.as_ref(), &known).await {
                Ran::Fired => fired += 1,
                Ran::Failed => {}
                Ran::NoTarget(why) => no_target.push(why),
                Ran::NotRecorded => {
                    unrecorded = true;
                    break;
                }
            }
        }
        if unrecorded && fired == 0 {
            // Nothing was sent: no cooldown runs from it, and once the log is writable again
            // the breach still standing is decided afresh.
            let mut m = self.memory();
            m.in_flight.remove(&(d.cbo.clone(), d.kind));
            m.last_attempt.remove(&(d.cbo.clone(), d.kind));
            return;
        }
        // The decision as a whole: fired when any integration did it.
        let result = if fired > 0 || integrations.is_empty() {
            "fired"
        } else {
            "failed"
        };
        let detail = format!("done by {fired} of {} integrations", integrations.len());
        self.durable(self.entry(&d, d.kind.as_str(), result, detail))
            .await;
        {
            let mut m = self.memory();
            if d.kind == ActionKind::Rollback
                && fired > 0
                && let Some(dep) = &d.deployment
            {
                m.rolled_back.insert((d.cbo.clone(), dep.clone()));
            }
            m.in_flight.remove(&(d.cbo.clone(), d.kind));
        }
        if d.kind == ActionKind::Rollback && fired == 0 && !no_target.is_empty() {
            self.no_good_target(&d, no_target.join("; "));
        }
    }

    /// No known-good target: page, and disable where the CBO is configured to, instead of
    /// guessing what to roll back to.
    fn no_good_target(self: &Arc<Self>, d: &Decision, why: String) {
        tracing::error!(cbo = %d.cbo, rule = d.rule.as_str(), why, "no known-good rollback target: paging, and disabling where configured");
        let evidence = serde_json::json!({ "no_rollback_target": why, "breach": d.evidence });
        self.decide(Decision {
            kind: ActionKind::Alert,
            evidence: evidence.clone(),
            ..d.clone()
        });
        if self
            .config()
            .cbo(&d.cbo)
            .is_some_and(|c| !c.disable.is_empty())
        {
            self.decide(Decision {
                kind: ActionKind::Disable,
                evidence,
                ..d.clone()
            });
        }
    }

    /// One integration's part: plan, the intent (durable before any request), attempts that
    /// each first read whether the one before took effect, the result.
    async fn run_one(&self, d: &Decision, integration: &dyn Integration, known: &Known) -> Ran {
        let name = integration.name();
        let plan = match integration.plan(d, known).await {
            Ok(plan) => plan,
            Err(e) => {
                let no_target = matches!(e, PlanError::NoTarget(_));
                tracing::error!(cbo = %d.cbo, integration = name, error = %e, "action not planned");
                self.count(&d.cbo, d.kind, name, "failed");
                self.durable(self.entry(d, name, "failed", format!("nothing sent: {e}")))
                    .await;
                return if no_target {
                    Ran::NoTarget(e.to_string())
                } else {
                    Ran::Failed
                };
            }
        };
        let now = self.clock.now_ms();
        let key = format!("{}-{}-{name}-{now}", d.cbo, d.kind.as_str());
        let mut intent = self.entry(d, name, "intent", plan.describe());
        intent.kind = Kind::Intent;
        intent.result = None;
        intent.key = Some(key.clone());
        intent.evidence = serde_json::json!({ "plan": plan, "breach": d.evidence });
        let log = self.log.clone();
        let written = tokio::task::spawn_blocking(move || log.append(intent))
            .await
            .unwrap_or_else(|e| Err(LogError::Store(format!("the write's task ended: {e}"))));
        let intent = match written {
            Ok(intent) => intent,
            // Replicas: another leader's intent for this deployment is on record, or this one
            // lost the lease since it decided. Nothing is sent.
            Err(e @ (LogError::Refused(_) | LogError::NotLeader)) => {
                tracing::warn!(cbo = %d.cbo, integration = name, error = %e, "action not sent");
                self.count(&d.cbo, d.kind, name, "suppressed");
                if matches!(e, LogError::Refused(_))
                    && d.kind == ActionKind::Rollback
                    && let Some(dep) = &d.deployment
                {
                    self.memory()
                        .rolled_back
                        .insert((d.cbo.clone(), dep.clone()));
                }
                return Ran::NotRecorded;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the decision log");
                self.count(&d.cbo, d.kind, name, "failed");
                return Ran::NotRecorded;
            }
        };
        let attempts = self.config().actions.attempts.max(1);
        let attempt_of = Attempt {
            decision: d,
            plan: &plan,
            key: &key,
        };
        let mut last_error = String::new();
        for attempt in 1..=attempts + 1 {
            if attempt > 1 {
                tokio::time::sleep(backoff(attempt - 1)).await;
                // Never send a change again blindly: read first whether the last one took
                // effect, and send nothing while that cannot be read.
                match integration.took_effect(&plan, intent.at_ms).await {
                    Ok(Effect::Applied(detail)) => {
                        let done = format!(
                            "{detail} (took effect, though attempt {} answered: {last_error})",
                            attempt - 1
                        );
                        return self.done(d, name, &plan, &intent, attempt - 1, done).await;
                    }
                    Ok(Effect::NotApplied | Effect::Unknown) => {}
                    Err(e) => {
                        last_error = format!(
                            "{last_error}; could not read whether it took effect, so not sent again: {e}"
                        );
                        continue;
                    }
                }
                if attempt > attempts {
                    break;
                }
            }
            match integration.run(attempt_of).await {
                Ok(done) => return self.done(d, name, &plan, &intent, attempt, done).await,
                Err(error) => {
                    tracing::warn!(cbo = %d.cbo, integration = name, attempt, error, "action attempt failed");
                    if attempt < attempts {
                        let mut e = self.entry(d, name, "retrying", error.clone());
                        e.attempt = Some(attempt);
                        e.key = Some(key.clone());
                        self.durable(e).await;
                    }
                    last_error = error;
                }
            }
        }
        tracing::error!(cbo = %d.cbo, rule = d.rule.as_str(), integration = name, error = last_error, "action failed");
        self.count(&d.cbo, d.kind, name, "failed");
        let mut e = self.entry(d, name, "failed", last_error);
        e.attempt = Some(attempts);
        e.key = Some(key);
        e.evidence = serde_json::json!({ "plan": plan, "breach": d.evidence });
        if self.durable(e).await.is_none() {
            self.unrecorded(&intent);
        }
        Ran::Failed
    }

    /// An action's result could not be written (a full disk, the store away): its intent is
    /// settled with Twilio like one found at a start, once the log can be written, and the
    /// CBO's actions wait until then.
    fn unrecorded(&self, intent: &Entry) {
        let Some(key) = intent.key.clone() else {
            return;
        };
        tracing::warn!(cbo = %intent.cbo, key, "an action's result was not recorded: it is settled with Twilio once the log can be written");
        self.memory().unsettled.insert(key, intent.clone());
    }

    /// An integration's action took effect: the result joins its intent by key, and carries
    /// the plan so a restart knows what is bad and what is this guard's own.
    async fn done(
        &self,
        d: &Decision,
        name: &str,
        plan: &Plan,
        intent: &Entry,
        attempt: u32,
        done: String,
    ) -> Ran {
        tracing::warn!(cbo = %d.cbo, rule = d.rule.as_str(), action = d.kind.as_str(), integration = name, done, "action fired");
        self.count(&d.cbo, d.kind, name, "fired");
        let mut e = self.entry(d, name, "fired", done);
        e.attempt = Some(attempt);
        e.key = intent.key.clone();
        e.evidence = serde_json::json!({ "plan": plan, "breach": d.evidence });
        if self.durable(e).await.is_none() {
            self.unrecorded(intent);
        }
        let mut m = self.memory();
        m.took_effect(&d.cbo, plan);
        if plan.artifact.is_some() {
            m.landed.push((d.cbo.clone(), self.clock.now_ms()));
        }
        Ran::Fired
    }

    /// Rollbacks that took effect since the last call: the tick judges what they put live from
    /// then on.
    pub fn take_landed(&self) -> Vec<(String, i64)> {
        std::mem::take(&mut self.memory().landed)
    }

    /// Settles every intent without a result (read back at start, left by a leader that died,
    /// or whose result could not be written): asks Twilio whether it took effect and logs the
    /// answer; never sends it again. Until settled, the CBO's actions wait.
    pub async fn settle(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut round = 0;
        // An intent may need settling at any time (a result that could not be written; with
        // replicas, a leader that died mid-action): this goes on for the daemon's life.
        loop {
            let pending: Vec<Entry> = if self.leading() {
                self.memory().unsettled.values().cloned().collect()
            } else {
                Vec::new()
            };
            if pending.is_empty() {
                round = 0;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
            round += 1;
            for intent in pending {
                if let Some(outcome) = self.settle_one(&intent).await {
                    let key = intent.key.clone().unwrap_or_default();
                    if self.record(outcome).is_some() {
                        self.memory().unsettled.remove(&key);
                        self.recheck
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(round)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// The result entry settling `intent`, or `None` while Twilio cannot tell yet.
    async fn settle_one(self: &Arc<Self>, intent: &Entry) -> Option<Entry> {
        let kind = intent.action.as_deref().and_then(ActionKind::parse)?;
        let name = intent.integration.clone().unwrap_or_default();
        let plan: Plan =
            serde_json::from_value(intent.evidence["plan"].clone()).unwrap_or_default();
        let rule = intent
            .rule
            .as_deref()
            .and_then(RuleId::parse)
            .unwrap_or(RuleId::ConfigCorruption);
        let d = Decision {
            cbo: intent.cbo.clone(),
            rule,
            kind,
            evidence: intent.evidence["breach"].clone(),
            deployment: intent.deployment.clone(),
            decided_at: intent.at.clone(),
        };
        let integration = self
            .config()
            .cbo(&intent.cbo)
            .map(|c| self.integrations(c, kind))
            .unwrap_or_default()
            .into_iter()
            .find(|i| i.name() == name);
        let (result, detail) = match integration {
            None => (
                "failed",
                format!(
                    "settled at start: {name} is no longer configured for this CBO; whether it took effect is unknown, and it is not sent again"
                ),
            ),
            Some(i) => match i.took_effect(&plan, intent.at_ms).await {
                Ok(Effect::Applied(detail)) => {
                    ("fired", format!("settled at start: took effect: {detail}"))
                }
                Ok(Effect::NotApplied) => (
                    "failed",
                    "settled at start: it did not take effect, and it is not sent again".into(),
                ),
                Ok(Effect::Unknown) => (
                    "failed",
                    format!(
                        "settled at start: {name} cannot be read back; not sent again (its receiver has the idempotency key)"
                    ),
                ),
                Err(e) => {
                    tracing::warn!(cbo = %intent.cbo, key = intent.key.as_deref().unwrap_or(""), error = %e, "cannot settle an intent yet");
                    return None;
                }
            },
        };
        tracing::warn!(cbo = %intent.cbo, integration = %name, key = intent.key.as_deref().unwrap_or(""), result, detail, "intent settled");
        self.count(&intent.cbo, kind, &name, result);
        let never_acted = detail.contains("did not take effect");
        let mut e = self.entry(&d, &name, result, detail);
        e.key = intent.key.clone();
        e.evidence = serde_json::json!({ "plan": plan, "breach": d.evidence, "settled": true });
        if never_acted {
            // It never acted: no cooldown runs from it.
            let mut m = self.memory();
            if m.last_attempt.get(&(d.cbo.clone(), kind)) == Some(&intent.at_ms) {
                m.last_attempt.remove(&(d.cbo.clone(), kind));
            }
        }
        if result == "fired" {
            let mut m = self.memory();
            m.took_effect(&d.cbo, &plan);
            if plan.artifact.is_some() {
                m.landed.push((d.cbo.clone(), self.clock.now_ms()));
            }
            if kind == ActionKind::Rollback
                && let Some(dep) = &d.deployment
            {
                m.rolled_back.insert((d.cbo.clone(), dep.clone()));
            }
        }
        Some(e)
    }

    /// Sets the daemon's own switch: the `off` features off, the rest on (none: all back
    /// on); logged first, then changed (an unrecorded change is not made). Turning it all on
    /// forgets the Flex values kept for restoring.
    pub fn set_switch(
        &self,
        cbo: &str,
        off: &[Feature],
        reason: String,
    ) -> Result<Switch, NotRecorded> {
        self.set_switch_as(cbo, off, reason, true)
    }

    /// `oncall`: a person's change (any replica takes it); else the leader's decision.
    fn set_switch_as(
        &self,
        cbo: &str,
        off: &[Feature],
        reason: String,
        oncall: bool,
    ) -> Result<Switch, NotRecorded> {
        let now = self.clock.now_ms();
        let mut switch = self.switch(cbo).unwrap_or_else(|| Switch::on(cbo));
        switch.set(off);
        switch.reason = Some(reason);
        switch.since = Some(rfc3339(now));
        if off.is_empty() {
            switch.previous_flags = None;
        }
        self.log_switch(&switch, oncall)?;
        self.memory()
            .switches
            .insert(cbo.to_string(), switch.clone());
        if let Some(m) = self.metrics.cbo(cbo) {
            m.set_disabled(switch.is_off());
        }
        Ok(switch)
    }

    /// Remembers the Flex flags seen before the flag went off (for re-enabling).
    pub fn remember_flags(&self, cbo: &str, flags: Value) -> Result<(), NotRecorded> {
        let Some(mut switch) = self.switch(cbo) else {
            return Ok(());
        };
        if switch.previous_flags.is_some() {
            return Ok(());
        }
        switch.previous_flags = Some(flags);
        self.log_switch(&switch, false)?;
        self.memory().switches.insert(cbo.to_string(), switch);
        Ok(())
    }

    /// A switch entry carries the whole switch, the flags to restore included, so a restart
    /// rebuilds it from the last one.
    fn log_switch(&self, switch: &Switch, oncall: bool) -> Result<(), NotRecorded> {
        let mut e = Entry::new(&switch.cbo, Kind::Switch, self.clock.now_ms());
        e.detail = switch.reason.clone();
        e.action = Some(if switch.is_off() { "disable" } else { "enable" }.into());
        let mut evidence = serde_json::to_value(switch).expect("switch serializes");
        evidence["previous_flags"] = switch.previous_flags.clone().unwrap_or(Value::Null);
        e.evidence = evidence;
        if oncall {
            self.log.append_oncall(e)?;
        } else {
            self.log.append(e)?;
        }
        Ok(())
    }

    /// On-call acknowledges `rules` of `cbo`: their actions stay silent until they recover.
    /// Each ack is recorded before it counts.
    pub fn ack(&self, cbo: &str, rules: &[RuleId], by: &str) -> Result<(), NotRecorded> {
        for rule in rules {
            let mut e = Entry::new(cbo, Kind::Ack, self.clock.now_ms());
            e.rule = Some(rule.as_str().into());
            e.detail = Some(format!("acknowledged by {by}"));
            self.log.append_oncall(e)?;
            self.memory()
                .acked
                .insert((cbo.to_string(), rule.as_str().to_string()));
        }
        Ok(())
    }

    /// Re-enables transfers: the Flex flag values seen before the switch come back (when the
    /// flag was switched and actions are live), then the daemon's switch. Refused while the
    /// decision log cannot be written.
    pub async fn enable(&self, cbo: &Cbo, reason: String) -> Result<Switch, EnableError> {
        if let Some(why) = self.log.health.broken() {
            return Err(EnableError::NotRecorded(why));
        }
        let previous = self.switch(cbo.key.as_str()).and_then(|s| s.previous_flags);
        if let (Some(previous), false) = (previous, self.config().actions.dry_run)
            && cbo.disable.contains(&DisableKind::FlexFlag)
        {
            let client = cbo
                .account_sid
                .and_then(|a| self.live.clients().get(&a).cloned())
                .ok_or_else(|| EnableError::Twilio("no Twilio credentials for this CBO".into()))?;
            flex::restore_flags(&client, &self.config().twilio.flex_url, &previous)
                .await
                .map_err(EnableError::Twilio)?;
            self.count(cbo.key.as_str(), ActionKind::Disable, "flex_flag", "fired");
        }
        self.set_switch(cbo.key.as_str(), &[], reason)
            .map_err(|e| EnableError::NotRecorded(e.to_string()))
    }

    /// Sends breaches and recoveries to the configured Alertmanager, on its own task. These are
    /// notifications, not actions on Twilio: they are sent in dry run too.
    pub fn notify(self: &Arc<Self>, alerts: Vec<Value>) {
        let Some(am) = self.config().actions.alertmanager.clone() else {
            return;
        };
        if !self.leading() {
            return;
        }
        if alerts.is_empty() {
            return;
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            let cbos: Vec<String> = alerts
                .iter()
                .filter_map(|a| a["labels"]["cbo"].as_str().map(str::to_string))
                .collect();
            // Every Alertmanager gets every alert (they deduplicate among themselves); the
            // notification went out when one of them took it.
            let shared_alerts = Arc::new(alerts.clone());
            let mut sends = tokio::task::JoinSet::new();
            for url in am.endpoints() {
                let (http, alerts) = (this.http.clone(), shared_alerts.clone());
                sends.spawn(
                    async move { alertmanager::post(&http, &url, am.timeout, &alerts).await },
                );
            }
            let mut results = Vec::new();
            while let Some(r) = sends.join_next().await {
                results.extend(r.ok());
            }
            let delivered = results.iter().any(Result::is_ok);
            let label = if delivered { "fired" } else { "failed" };
            for cbo in &cbos {
                this.count(cbo, ActionKind::Alert, "alertmanager", label);
            }
            for e in results.into_iter().filter_map(Result::err) {
                tracing::error!(error = %e, alerts = alerts.len(), delivered, "cannot notify an Alertmanager");
            }
        });
    }
}
