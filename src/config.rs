//! The TOML configuration file: sections, defaults, environment resolution, problems with line numbers.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::sid::{
    AccountSid, ApiKeySid, EnvironmentSid, ServiceSid, SidError, WorkflowSid, WorkspaceSid,
};

/// The template's variable for the chat-transfer workflow; `_<CBO>` is appended per CBO (SPEC §1).
pub const WORKFLOW_SID_VAR: &str = "TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID";
/// Events further than this ahead of the daemon's clock are rejected (SPEC §2).
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(60);
/// Where `docs/runbook.md` is published; the alert rules link to the same page.
pub const RUNBOOK_URL: &str =
    "https://github.com/connie-rtc/transfer-guard/blob/main/docs/runbook.md";

/// The longest window any rule or the status may ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    twilio: TwilioSection,
    #[serde(default)]
    transfers: TransfersSection,
    #[serde(default)]
    actions: ActionsSection,
    #[serde(default)]
    validation: ValidationSection,
    #[serde(default)]
    rules: RulesSection,
    #[serde(default)]
    sources: SourcesSection,
    #[serde(default, rename = "cbo")]
    cbos: Vec<CboSection>,
    #[serde(default)]
    store: StoreSection,
}

/// `[store]`: where replicas share their state (SPEC §12). Absent: the state dir, one process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Name of the environment variable (or secret file) holding a PostgreSQL URL.
    pub url_env: Option<String>,
    /// How long a leader's lease lasts; it is renewed every second, and a leader that cannot
    /// renew stops acting after half of it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url_env: None,
            lease: Duration::from_secs(10),
        }
    }
}

/// The store as configured: the PostgreSQL URL (a secret: it may hold a password), the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub url: Secret,
    pub lease: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: SocketAddr,
    /// Name of the environment variable holding the admin token.
    pub admin_token_env: Option<String>,
    /// Decision log, validations and switch state live here.
    pub state_dir: PathBuf,
    /// Largest accepted `POST /v1/events` body.
    pub max_body_bytes: usize,
    /// The URL Twilio calls this daemon at (its pushes are signed over it); without it the
    /// push receivers answer 503.
    pub public_url: Option<String>,
    /// Origins allowed to read `GET /v1/switch/{cbo}` from a browser (the plugin, in Flex).
    pub allowed_origins: Vec<String>,
    /// The URL people and Alertmanager reach this daemon at: the links in its alerts
    /// (`generatorURL`). Default: `public_url`, else `http://` + `listen`.
    pub external_url: Option<String>,
    /// The runbook its alerts link to (`runbook_url`, plus `#` and the rule); point it at your
    /// own copy of `docs/runbook.md`.
    pub runbook_url: String,
    /// A request's headers must arrive within this (and a keep-alive connection idle this long
    /// is closed).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request, its body included, is answered within this, else 408.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// On stop, how long requests in flight may finish.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// A directory of secrets, one file per variable name (a Kubernetes Secret volume, or
    /// systemd's `$CREDENTIALS_DIRECTORY`): a variable that a `*_env` key names is read from
    /// its file here when there is one, else from the environment. Read again at every reload,
    /// so a token rotated here takes effect on SIGHUP.
    pub secrets_dir: Option<PathBuf>,
}

impl ServerSection {
    /// The base of the links in alerts: `external_url`, else `public_url`, else the listen address.
    pub fn link_base(&self) -> String {
        let base = self
            .external_url
            .clone()
            .or_else(|| self.public_url.clone())
            .unwrap_or_else(|| format!("http://{}", self.listen));
        base.trim_end_matches('/').to_string()
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 9843)),
            admin_token_env: None,
            state_dir: PathBuf::from("/var/lib/transfer-guard"),
            max_body_bytes: 1024 * 1024,
            public_url: None,
            external_url: None,
            runbook_url: RUNBOOK_URL.to_string(),
            allowed_origins: vec!["https://flex.twilio.com".into()],
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            drain: Duration::from_secs(10),
            secrets_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioSection {
    pub taskrouter_url: String,
    pub serverless_url: String,
    pub flex_url: String,
    /// Twilio's debugger (Monitor API), for its alerts (SPEC §2b).
    pub monitor_url: String,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight at once against one Twilio account.
    pub max_concurrent_requests: usize,
    /// The longest `Retry-After` obeyed: a 429 asking for longer leaves the CBO unpolled this
    /// long at most (and says so), never silently for an hour.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for TwilioSection {
    fn default() -> Self {
        TwilioSection {
            taskrouter_url: "https://taskrouter.twilio.com".into(),
            serverless_url: "https://serverless.twilio.com".into(),
            flex_url: "https://flex-api.twilio.com".into(),
            monitor_url: "https://monitor.twilio.com".into(),
            poll_interval: Duration::from_secs(15),
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 4,
            max_retry_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransfersSection {
    /// No terminal event within this long after `initiated`: the transfer timed out
    /// (the template's `CONVERSATION_TRANSFER_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Open transfers kept per CBO; beyond it the oldest is evicted and counted.
    pub max_open: usize,
    /// The longest window kept; older events are rejected as `too_old`.
    #[serde(with = "humantime_serde")]
    pub max_window: Duration,
}

impl Default for TransfersSection {
    fn default() -> Self {
        TransfersSection {
            timeout: Duration::from_secs(300),
            max_open: 50_000,
            max_window: MAX_WINDOW,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsSection {
    /// Decide, log and count, but fire nothing (the default until configured otherwise).
    pub dry_run: bool,
    /// The least time between two actions of one kind on one CBO.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Attempts per integration before an action is reported failed.
    pub attempts: u32,
    pub webhook: Option<WebhookSection>,
    pub command: Option<CommandSection>,
    pub alertmanager: Option<AlertmanagerSection>,
}

impl Default for ActionsSection {
    fn default() -> Self {
        ActionsSection {
            dry_run: true,
            cooldown: Duration::from_secs(30 * 60),
            attempts: 3,
            webhook: None,
            command: None,
            alertmanager: None,
        }
    }
}

/// `[actions.webhook]`: a signed POST for the `webhook` rollback and disable integrations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    pub url: String,
    /// Variable holding the HMAC-SHA256 key for `X-Transfer-Guard-Signature`.
    pub secret_env: String,
    #[serde(default = "default_action_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `[actions.alertmanager]`: rule breaches and recoveries posted to an Alertmanager v2 API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerSection {
    /// The Alertmanager's base URL, e.g. `http://127.0.0.1:9093`.
    #[serde(default)]
    pub url: Option<String>,
    /// Several Alertmanagers (an HA pair or cluster): each gets every alert, as Prometheus
    /// sends them; they deduplicate among themselves.
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default = "default_action_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl AlertmanagerSection {
    /// Every Alertmanager to notify: `url` and `urls`.
    pub fn endpoints(&self) -> Vec<String> {
        self.url.iter().chain(&self.urls).cloned().collect()
    }
}

/// `[actions.command]`: a program for the `command` rollback integration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSection {
    pub argv: Vec<String>,
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_action_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSection {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub min_samples: u64,
    /// What a failed window does (the seed: "Deployment validation failed: immediate rollback
    /// required"), through the same pipeline as every action.
    pub on_fail: RuleAction,
}

impl Default for ValidationSection {
    fn default() -> Self {
        ValidationSection {
            duration: Duration::from_secs(15 * 60),
            min_samples: 20,
            on_fail: RuleAction::Rollback,
        }
    }
}

/// What a breached rule does for a CBO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Rollback,
    Disable,
    Alert,
}

/// Overrides of one rule's defaults (SPEC §4); every field optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleOverride {
    pub threshold: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Option<Duration>,
    pub min_samples: Option<u64>,
    /// `bad_requests`: distinct minutes with a Bad Request inside `window`.
    pub minutes: Option<u32>,
    /// `cross_cbo`: how many CBOs breached at once make a shared cause.
    pub min_cbos: Option<u32>,
    /// `cross_cbo`: only CBOs deployed this recently are rolled back.
    #[serde(default, with = "humantime_serde")]
    pub deploy_window: Option<Duration>,
    /// `config_corruption`: still breached this long after its rollback fired, disable.
    #[serde(default, with = "humantime_serde")]
    pub escalate_after: Option<Duration>,
    /// `success_rate`: the seed's horizon, judged with `min_samples` for quiet CBOs.
    #[serde(default, with = "humantime_serde")]
    pub horizon: Option<Duration>,
    /// `success_rate`: finished transfers the fast path needs in `window` (busy CBOs).
    pub fast_min_samples: Option<u64>,
    pub action: Option<RuleAction>,
}

impl RuleOverride {
    /// The keys set here, by name.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            ("threshold", self.threshold.is_some()),
            ("window", self.window.is_some()),
            ("for", self.for_.is_some()),
            ("min_samples", self.min_samples.is_some()),
            ("minutes", self.minutes.is_some()),
            ("min_cbos", self.min_cbos.is_some()),
            ("deploy_window", self.deploy_window.is_some()),
            ("escalate_after", self.escalate_after.is_some()),
            ("horizon", self.horizon.is_some()),
            ("fast_min_samples", self.fast_min_samples.is_some()),
            ("action", self.action.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| k)
        .collect()
    }
}

/// The keys each rule reads; any other is refused rather than silently ignored.
pub fn rule_keys(rule: &str) -> &'static [&'static str] {
    match rule {
        "success_rate" => &[
            "threshold",
            "window",
            "for",
            "min_samples",
            "horizon",
            "fast_min_samples",
            "action",
        ],
        "bad_requests" => &["window", "for", "minutes", "action"],
        "taskrouter_error_rate" => &["threshold", "window", "for", "min_samples", "action"],
        "config_corruption" => &["for", "escalate_after", "action"],
        "cross_cbo" => &[
            "for",
            "min_cbos",
            "deploy_window",
            "window",
            "min_samples",
            "action",
        ],
        "cold_transfer_latency" | "notification_latency" => {
            &["threshold", "window", "for", "min_samples", "action"]
        }
        "history_loss" => &["window", "for", "action"],
        _ => &[],
    }
}

/// One optional override per rule id of SPEC §4; an unknown rule id is an unknown key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulesSection {
    pub success_rate: Option<Spanned<RuleOverride>>,
    pub bad_requests: Option<Spanned<RuleOverride>>,
    pub taskrouter_error_rate: Option<Spanned<RuleOverride>>,
    pub config_corruption: Option<Spanned<RuleOverride>>,
    pub cross_cbo: Option<Spanned<RuleOverride>>,
    pub cold_transfer_latency: Option<Spanned<RuleOverride>>,
    pub notification_latency: Option<Spanned<RuleOverride>>,
    pub history_loss: Option<Spanned<RuleOverride>>,
}

impl RulesSection {
    fn each(&self) -> impl Iterator<Item = (&'static str, &Spanned<RuleOverride>)> {
        [
            ("success_rate", &self.success_rate),
            ("bad_requests", &self.bad_requests),
            ("taskrouter_error_rate", &self.taskrouter_error_rate),
            ("config_corruption", &self.config_corruption),
            ("cross_cbo", &self.cross_cbo),
            ("cold_transfer_latency", &self.cold_transfer_latency),
            ("notification_latency", &self.notification_latency),
            ("history_loss", &self.history_loss),
        ]
        .into_iter()
        .filter_map(|(id, o)| o.as_ref().map(|o| (id, o)))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesSection {
    #[serde(default)]
    file: Vec<Spanned<FileSourceSection>>,
    #[serde(default)]
    twilio: TwilioSources,
}

/// `[sources.twilio]`: reading Twilio's own record of transfers (SPEC §2b), every CBO.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioSources {
    /// Poll TaskRouter's Events API.
    pub taskrouter_events: bool,
    /// Poll the functions' logs (when the CBO has `serverless_*` SIDs).
    pub serverless_logs: bool,
    /// Poll the debugger's error-level alerts.
    pub twilio_alerts: bool,
    /// How far each poll reaches back before its cursor (events that show up late).
    #[serde(with = "humantime_serde")]
    pub overlap: Duration,
    /// How far back the first poll of a CBO without a cursor reads.
    #[serde(with = "humantime_serde")]
    pub first_read: Duration,
}

impl Default for TwilioSources {
    fn default() -> Self {
        TwilioSources {
            taskrouter_events: true,
            serverless_logs: true,
            twilio_alerts: true,
            overlap: Duration::from_secs(120),
            first_read: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSourceSection {
    path: PathBuf,
    cbo: String,
    /// Read what the file already holds when the daemon starts (default: only new lines).
    #[serde(default)]
    from_beginning: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackKind {
    Serverless,
    PluginRelease,
    Webhook,
    Command,
}

/// A flag of the template's `conversation_transfer` feature that the disable switch can turn
/// off (SPEC §5): the whole feature, or cold transfers or inviting a second agent alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Enabled,
    ColdTransfer,
    MultiParticipant,
}

impl Feature {
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Enabled => "enabled",
            Feature::ColdTransfer => "cold_transfer",
            Feature::MultiParticipant => "multi_participant",
        }
    }
}

fn default_disable_features() -> Vec<Feature> {
    vec![Feature::Enabled]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisableKind {
    FlexFlag,
    Webhook,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CboSection {
    key: Spanned<String>,
    ingest_token_env: Option<Spanned<String>>,
    account_sid: Option<Spanned<String>>,
    auth_token_env: Option<Spanned<String>>,
    api_key_sid: Option<Spanned<String>>,
    api_key_secret_env: Option<Spanned<String>>,
    workspace_sid: Option<Spanned<String>>,
    workflow_sid: Option<Spanned<String>>,
    serverless_service_sid: Option<Spanned<String>>,
    serverless_environment_sid: Option<Spanned<String>>,
    #[serde(default)]
    rollback: Vec<RollbackKind>,
    #[serde(default)]
    disable: Vec<DisableKind>,
    /// Which flags the disable switch turns off (default: the whole feature).
    #[serde(default = "default_disable_features")]
    disable_features: Vec<Feature>,
    #[serde(default)]
    rules: RulesSection,
    probe: Option<Spanned<ProbeSection>>,
}

/// `[cbo.probe]`: test transfers (SPEC §3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSection {
    queue_sid: String,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    interval: Duration,
    /// How often while a validation window of the CBO runs.
    #[serde(default = "default_probe_during_validation", with = "humantime_serde")]
    during_validation: Duration,
}

fn default_probe_during_validation() -> Duration {
    Duration::from_secs(60)
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(5 * 60)
}

/// A CBO's test transfers: a task through its chat-transfer workflow aimed at `queue`, every
/// `interval` (every minute while a validation window runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub queue: crate::sid::QueueSid,
    pub interval: Duration,
    pub during_validation: Duration,
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration the daemon runs with.

/// A CBO key, `[a-z0-9_-]{1,32}` (SPEC §1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CboKey(String);

impl CboKey {
    pub fn parse(key: &str) -> Result<CboKey, String> {
        let ok = !key.is_empty()
            && key.len() <= 32
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(CboKey(key.to_string()))
        } else {
            Err(format!(
                "CBO key {key:?} must be 1 to 32 characters of a-z, 0-9, '_' or '-'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The suffix of the template's per-CBO variable: `nss` -> `NSS`, `client-a` -> `CLIENT_A`.
    pub fn env_suffix(&self) -> String {
        self.0.to_ascii_uppercase().replace('-', "_")
    }
}

impl fmt::Display for CboKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret read from the environment: never printed, compared in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate).into()
    }
}

/// Compared in constant time, like a candidate token.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Credentials {
    AuthToken(Secret),
    ApiKey { sid: ApiKeySid, secret: Secret },
}

/// Where a CBO's workflow SID came from, so problems can say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum WorkflowSource {
    Config,
    Env(String),
    Missing,
}

impl fmt::Display for WorkflowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkflowSource::Config => f.write_str("workflow_sid"),
            WorkflowSource::Env(var) => write!(f, "${var}"),
            WorkflowSource::Missing => f.write_str("no workflow SID"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowSetting {
    /// The value as configured, even when malformed: corruption is reported, not hidden.
    pub raw: Option<String>,
    pub sid: Result<WorkflowSid, String>,
    pub source: WorkflowSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cbo {
    pub key: CboKey,
    pub ingest_token: Option<Secret>,
    pub account_sid: Option<AccountSid>,
    pub credentials: Option<Credentials>,
    pub workspace_sid: Option<WorkspaceSid>,
    pub workflow: WorkflowSetting,
    pub serverless_service_sid: Option<ServiceSid>,
    pub serverless_environment_sid: Option<EnvironmentSid>,
    pub rollback: Vec<RollbackKind>,
    pub disable: Vec<DisableKind>,
    pub disable_features: Vec<Feature>,
    pub rules: RulesSection,
    pub probe: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSource {
    pub path: PathBuf,
    pub cbo: CboKey,
    pub from_beginning: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSection,
    pub admin_token: Option<Secret>,
    pub webhook_secret: Option<Secret>,
    pub twilio: TwilioSection,
    pub transfers: TransfersSection,
    pub actions: ActionsSection,
    pub validation: ValidationSection,
    pub rules: RulesSection,
    pub file_sources: Vec<FileSource>,
    /// `[sources.twilio]`.
    pub record: TwilioSources,
    pub cbos: Vec<Cbo>,
    /// `[store]`: `None` is the embedded default (the state dir).
    pub store: Option<Store>,
}

// ---------------------------------------------------------------------------------------------
// Problems.

/// One thing wrong with a configuration. `fatal` ones stop `run`; the others (a workflow SID
/// that is missing, malformed or shared) are what the daemon exists to report, so it starts and
/// reports them as configuration corruption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub cbo: Option<String>,
    pub message: String,
    pub fatal: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(cbo) = &self.cbo {
            write!(f, "cbo {cbo}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// The result of reading a file: the configuration (when it could be built) and every problem.
#[derive(Debug)]
pub struct Checked {
    pub config: Option<Config>,
    pub problems: Vec<Problem>,
}

impl Config {
    /// Reads, parses and resolves a file against the process environment; fatal problems refuse it.
    pub fn load(path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let checked = check_str(&text, &|var| std::env::var(var).ok());
        match checked.config {
            Some(config) if !checked.problems.iter().any(|p| p.fatal) => {
                Ok((config, checked.problems))
            }
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: checked.problems.into_iter().filter(|p| p.fatal).collect(),
            }),
        }
    }

    pub fn cbo(&self, key: &str) -> Option<&Cbo> {
        self.cbos.iter().find(|c| c.key.as_str() == key)
    }
}

/// Parses `text` and resolves it against `env`, collecting every problem instead of stopping at
/// the first (what `transfer-guard check` prints).
pub fn check_str(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Checked {
    let file: FileConfig = match toml::from_str(text) {
        Ok(file) => file,
        Err(err) => {
            return Checked {
                config: None,
                problems: vec![Problem {
                    line: err.span().map(|s| line_of(text, s.start)),
                    cbo: None,
                    message: err.message().trim().to_string(),
                    fatal: true,
                }],
            };
        }
    };
    Resolver {
        text,
        env,
        secrets_dir: None,
        problems: Vec::new(),
    }
    .resolve(file)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

struct Resolver<'a> {
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// `server.secrets_dir`, read before the environment.
    secrets_dir: Option<PathBuf>,
    problems: Vec<Problem>,
}

impl Resolver<'_> {
    fn problem(&mut self, at: Option<usize>, cbo: Option<&str>, message: String, fatal: bool) {
        self.problems.push(Problem {
            line: at.map(|offset| line_of(self.text, offset)),
            cbo: cbo.map(str::to_string),
            message,
            fatal,
        });
    }

    /// Where `section.key = …` is written (byte offset of its line), for a problem's line.
    fn key_at(&self, dotted: &str) -> Option<usize> {
        let (section, key) = dotted.rsplit_once('.')?;
        let mut current = "";
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            if let Some(h) = t.strip_prefix('[') {
                current = h
                    .trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or("")
                    .trim();
            } else if current == section
                && t.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return Some(offset);
            }
            offset += line.len();
        }
        None
    }

    /// Reads the secret that variable `var` names; a missing or empty variable is named, at
    /// the line of `at` when the key's position is known.
    fn secret(
        &mut self,
        var: &str,
        at: Option<usize>,
        cbo: Option<&str>,
        what: &str,
    ) -> Option<Secret> {
        if let Some(dir) = self.secrets_dir.clone() {
            let file = dir.join(var);
            match std::fs::read_to_string(&file) {
                // Secret files usually end with a newline; a token never does.
                Ok(v) if !v.trim_end_matches(['\n', '\r']).is_empty() => {
                    return Some(Secret(v.trim_end_matches(['\n', '\r']).to_string()));
                }
                Ok(_) => {
                    let message = format!("{what}: {} is empty", file.display());
                    self.problem(at, cbo, message, true);
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let message = format!("{what}: cannot read {}: {e}", file.display());
                    self.problem(at, cbo, message, true);
                    return None;
                }
            }
        }
        match (self.env)(var) {
            Some(v) if !v.is_empty() => Some(Secret(v)),
            _ => {
                let message = match &self.secrets_dir {
                    Some(dir) => format!(
                        "{what}: no file {var} in {} and environment variable {var} is not set",
                        dir.display()
                    ),
                    None => format!("{what}: environment variable {var} is not set"),
                };
                self.problem(at, cbo, message, true);
                None
            }
        }
    }

    /// `secret` for a key held as a `Spanned` string, at its line.
    fn spanned_secret(
        &mut self,
        var: &Spanned<String>,
        cbo: Option<&str>,
        what: &str,
    ) -> Option<Secret> {
        self.secret(var.get_ref(), Some(var.span().start), cbo, what)
    }

    fn sid<T>(
        &mut self,
        field: &str,
        value: &Option<Spanned<String>>,
        cbo: &str,
        parse: fn(&str) -> Result<T, SidError>,
    ) -> Option<T> {
        let value = value.as_ref()?;
        match parse(value.get_ref()) {
            Ok(sid) => Some(sid),
            Err(err) => {
                self.problem(
                    Some(value.span().start),
                    Some(cbo),
                    format!("{field}: {err}"),
                    true,
                );
                None
            }
        }
    }

    fn rules(&mut self, rules: &RulesSection, cbo: Option<&str>) {
        for (id, o) in rules.each() {
            let at = Some(o.span().start);
            let rule = o.get_ref();
            let known = rule_keys(id);
            for key in rule.set_keys().into_iter().filter(|k| !known.contains(k)) {
                let message = format!(
                    "rules.{id}.{key}: rule {id} does not use {key} (it reads {})",
                    known.join(", ")
                );
                self.problem(at, cbo, message, true);
            }
            for (name, d) in [
                ("window", rule.window),
                ("deploy_window", rule.deploy_window),
                ("horizon", rule.horizon),
            ] {
                if let Some(d) = d
                    && (d.is_zero() || d > MAX_WINDOW)
                {
                    let message = format!(
                        "rules.{id}.{name}: {} is outside 1s..=1h",
                        humantime::format_duration(d)
                    );
                    self.problem(at, cbo, message, true);
                }
            }
            if let Some(t) = rule.threshold
                && !(t.is_finite() && t >= 0.0)
            {
                let message = format!("rules.{id}.threshold: {t} is not a non-negative number");
                self.problem(at, cbo, message, true);
            }
            // Ratios are fractions: `threshold = 90` would breach on every transfer.
            if let Some(t) = rule.threshold
                && matches!(id, "success_rate" | "taskrouter_error_rate")
                && !(0.0..=1.0).contains(&t)
            {
                let message = format!(
                    "rules.{id}.threshold: {t} is a ratio and must be within 0..=1 (0.90 for 90 %)"
                );
                self.problem(at, cbo, message, true);
            }
            if let Some(t) = rule.threshold
                && matches!(id, "cold_transfer_latency" | "notification_latency")
                && !(t > 0.0 && t <= 3600.0)
            {
                let message =
                    format!("rules.{id}.threshold: {t} seconds is outside 0 < threshold <= 3600");
                self.problem(at, cbo, message, true);
            }
            for (name, n) in [
                ("min_samples", rule.min_samples),
                ("minutes", rule.minutes.map(u64::from)),
                ("min_cbos", rule.min_cbos.map(u64::from)),
                ("fast_min_samples", rule.fast_min_samples),
            ] {
                if n == Some(0) {
                    let message = format!("rules.{id}.{name}: must be at least 1");
                    self.problem(at, cbo, message, true);
                }
            }
            if let (Some(m), Some(w)) = (rule.minutes, rule.window)
                && u64::from(m) * 60 > w.as_secs().max(60)
            {
                let message = format!(
                    "rules.{id}.minutes: {m} distinct minutes cannot fit in window {}",
                    humantime::format_duration(w)
                );
                self.problem(at, cbo, message, true);
            }
        }
    }

    fn workflow(&mut self, section: &CboSection, key: &CboKey) -> WorkflowSetting {
        let per_cbo = format!("{WORKFLOW_SID_VAR}_{}", key.env_suffix());
        let (raw, source, at) = if let Some(sid) = &section.workflow_sid {
            (
                Some(sid.get_ref().clone()),
                WorkflowSource::Config,
                Some(sid.span().start),
            )
        } else if let Some(v) = (self.env)(&per_cbo) {
            (Some(v), WorkflowSource::Env(per_cbo.clone()), None)
        } else if let Some(v) = (self.env)(WORKFLOW_SID_VAR) {
            (Some(v), WorkflowSource::Env(WORKFLOW_SID_VAR.into()), None)
        } else {
            (
                None,
                WorkflowSource::Missing,
                Some(section.key.span().start),
            )
        };
        let sid = match &raw {
            None => Err(format!(
                "workflow SID missing: set workflow_sid, {per_cbo} or {WORKFLOW_SID_VAR}"
            )),
            Some(raw) => WorkflowSid::parse(raw.trim()).map_err(|e| format!("{source}: {e}")),
        };
        if let Err(message) = &sid {
            self.problem(at, Some(key.as_str()), message.clone(), false);
        }
        WorkflowSetting { raw, sid, source }
    }

    fn cbo(&mut self, section: &CboSection) -> Option<Cbo> {
        let key = match CboKey::parse(section.key.get_ref()) {
            Ok(key) => key,
            Err(message) => {
                self.problem(Some(section.key.span().start), None, message, true);
                return None;
            }
        };
        let k = key.as_str().to_string();
        let k = k.as_str();
        let ingest_token = section
            .ingest_token_env
            .as_ref()
            .and_then(|var| self.spanned_secret(var, Some(k), "ingest_token_env"));
        let account_sid = self.sid("account_sid", &section.account_sid, k, AccountSid::parse);
        let workspace_sid = self.sid(
            "workspace_sid",
            &section.workspace_sid,
            k,
            WorkspaceSid::parse,
        );
        let serverless_service_sid = self.sid(
            "serverless_service_sid",
            &section.serverless_service_sid,
            k,
            ServiceSid::parse,
        );
        let serverless_environment_sid = self.sid(
            "serverless_environment_sid",
            &section.serverless_environment_sid,
            k,
            EnvironmentSid::parse,
        );
        let key_at = Some(section.key.span().start);
        let credentials = match (
            &section.auth_token_env,
            &section.api_key_sid,
            &section.api_key_secret_env,
        ) {
            (Some(var), None, None) => self
                .spanned_secret(var, Some(k), "auth_token_env")
                .map(Credentials::AuthToken),
            (None, Some(sid), Some(var)) => {
                let sid = self.sid("api_key_sid", &Some(sid.clone()), k, ApiKeySid::parse);
                let secret = self.spanned_secret(var, Some(k), "api_key_secret_env");
                sid.zip(secret)
                    .map(|(sid, secret)| Credentials::ApiKey { sid, secret })
            }
            (None, None, None) => None,
            (Some(_), _, _) => {
                let message =
                    "give either auth_token_env or api_key_sid with api_key_secret_env, not both"
                        .to_string();
                self.problem(key_at, Some(k), message, true);
                None
            }
            _ => {
                let message = "api_key_sid and api_key_secret_env go together".to_string();
                self.problem(key_at, Some(k), message, true);
                None
            }
        };
        if section.account_sid.is_none() {
            let message = "account_sid missing: TaskRouter cannot be polled".to_string();
            self.problem(key_at, Some(k), message, false);
        } else if credentials.is_none()
            && section.auth_token_env.is_none()
            && section.api_key_sid.is_none()
        {
            let message =
                "no credentials: set auth_token_env, or api_key_sid and api_key_secret_env"
                    .to_string();
            self.problem(key_at, Some(k), message, false);
        }
        if section.workspace_sid.is_none() {
            let message = "workspace_sid missing: TaskRouter cannot be polled".to_string();
            self.problem(key_at, Some(k), message, false);
        }
        if section.serverless_service_sid.is_some() != section.serverless_environment_sid.is_some()
        {
            let message =
                "serverless_service_sid and serverless_environment_sid go together".to_string();
            self.problem(key_at, Some(k), message, true);
        }
        self.rules(&section.rules, Some(k));
        let probe = section.probe.as_ref().and_then(|p| {
            let at = Some(p.span().start);
            let p = p.get_ref();
            let queue = match crate::sid::QueueSid::parse(p.queue_sid.trim()) {
                Ok(q) => q,
                Err(e) => {
                    self.problem(at, Some(k), format!("probe.queue_sid: {e}"), true);
                    return None;
                }
            };
            if p.interval < Duration::from_secs(60) || p.interval > Duration::from_secs(24 * 3600) {
                let message = format!(
                    "probe.interval: {} is outside 1m..=24h",
                    humantime::format_duration(p.interval)
                );
                self.problem(at, Some(k), message, true);
                return None;
            }
            if p.during_validation < Duration::from_secs(10) || p.during_validation > p.interval {
                let message = format!(
                    "probe.during_validation: {} is outside 10s..=interval",
                    humantime::format_duration(p.during_validation)
                );
                self.problem(at, Some(k), message, true);
                return None;
            }
            Some(Probe {
                queue,
                interval: p.interval,
                during_validation: p.during_validation,
            })
        });
        let workflow = self.workflow(section, &key);
        Some(Cbo {
            key,
            ingest_token,
            account_sid,
            credentials,
            workspace_sid,
            workflow,
            serverless_service_sid,
            serverless_environment_sid,
            rollback: section.rollback.clone(),
            disable: section.disable.clone(),
            disable_features: section.disable_features.clone(),
            rules: section.rules.clone(),
            probe,
        })
    }

    /// `[store]`: the URL must be a PostgreSQL URL (its secret is never echoed), the lease
    /// long enough to renew several times and short enough to fail over.
    fn store(&mut self, section: &StoreSection) -> Option<Store> {
        let var = section.url_env.as_ref()?;
        let at = self.key_at("store.url_env");
        let url = self.secret(var, at, None, "store.url_env")?;
        if let Err(e) = url.expose().parse::<postgres::Config>() {
            let message = format!("store.url_env: {var} is not a PostgreSQL URL: {e}");
            self.problem(at, None, message, true);
            return None;
        }
        // Acted on for half of it, renewed every second: under 3 s a renewal would be late.
        if section.lease < Duration::from_secs(3) || section.lease > Duration::from_secs(300) {
            let message = format!(
                "store.lease: {} is outside 3s..=5m",
                humantime::format_duration(section.lease)
            );
            let at = self.key_at("store.lease");
            self.problem(at, None, message, true);
            return None;
        }
        Some(Store {
            url,
            lease: section.lease,
        })
    }

    fn resolve(mut self, file: FileConfig) -> Checked {
        self.secrets_dir = file.server.secrets_dir.clone();
        let admin_token = file
            .server
            .admin_token_env
            .as_ref()
            .and_then(|var| self.secret(var, None, None, "server.admin_token_env"));
        for (name, url) in [
            ("twilio.taskrouter_url", &file.twilio.taskrouter_url),
            ("twilio.serverless_url", &file.twilio.serverless_url),
            ("twilio.flex_url", &file.twilio.flex_url),
            ("twilio.monitor_url", &file.twilio.monitor_url),
        ] {
            if let Err(e) = reqwest::Url::parse(url) {
                self.problem(
                    None,
                    None,
                    format!("{name}: {url:?} is not a URL: {e}"),
                    true,
                );
            }
        }
        if file.transfers.max_window.is_zero() || file.transfers.max_window > MAX_WINDOW {
            let message = "transfers.max_window must be within 1s..=1h".to_string();
            let at = self.key_at("transfers.max_window");
            self.problem(at, None, message, true);
        }
        let d = |d: Duration| humantime::format_duration(d).to_string();
        // Limits a value outside of which is a typo, not a choice.
        for (name, value, lo, hi) in [
            (
                "transfers.timeout",
                file.transfers.timeout,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            ),
            (
                "validation.duration",
                file.validation.duration,
                Duration::from_secs(10),
                file.transfers.max_window,
            ),
            (
                "twilio.poll_interval",
                file.twilio.poll_interval,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            ),
            (
                "twilio.request_timeout",
                file.twilio.request_timeout,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            (
                "actions.cooldown",
                file.actions.cooldown,
                Duration::ZERO,
                Duration::from_secs(7 * 24 * 3600),
            ),
            (
                "server.header_read_timeout",
                file.server.header_read_timeout,
                Duration::from_millis(100),
                Duration::from_secs(600),
            ),
            (
                "server.request_timeout",
                file.server.request_timeout,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
            (
                "server.drain",
                file.server.drain,
                Duration::ZERO,
                Duration::from_secs(600),
            ),
        ] {
            if value < lo || value > hi {
                let message = format!(
                    "{name}: {} is outside {}..={}{}",
                    d(value),
                    d(lo),
                    d(hi),
                    if name == "validation.duration" {
                        " (transfers.max_window: windows hold no older evidence)"
                    } else {
                        ""
                    }
                );
                let at = self.key_at(name);
                self.problem(at, None, message, true);
            }
        }
        for (name, n) in [
            ("validation.min_samples", file.validation.min_samples),
            (
                "twilio.max_concurrent_requests",
                file.twilio.max_concurrent_requests as u64,
            ),
            ("transfers.max_open", file.transfers.max_open as u64),
            ("server.max_connections", file.server.max_connections as u64),
        ] {
            if n == 0 {
                let at = self.key_at(name);
                self.problem(at, None, format!("{name}: must be at least 1"), true);
            }
        }
        if let Some(am) = &file.actions.alertmanager {
            let endpoints = am.endpoints();
            if endpoints.is_empty() {
                let message = "actions.alertmanager: set url (or urls for several)".to_string();
                self.problem(None, None, message, true);
            }
            for url in endpoints {
                if let Err(e) = reqwest::Url::parse(&url) {
                    let message = format!("actions.alertmanager: {url:?} is not a URL: {e}");
                    self.problem(None, None, message, true);
                }
            }
        }
        let webhook_secret = file.actions.webhook.as_ref().and_then(|w| {
            if let Err(e) = reqwest::Url::parse(&w.url) {
                self.problem(
                    None,
                    None,
                    format!("actions.webhook.url: {:?} is not a URL: {e}", w.url),
                    true,
                );
            }
            self.secret(&w.secret_env, None, None, "actions.webhook.secret_env")
        });
        if file
            .actions
            .command
            .as_ref()
            .is_some_and(|c| c.argv.is_empty())
        {
            self.problem(None, None, "actions.command.argv is empty".into(), true);
        }
        if file.actions.attempts == 0 {
            self.problem(
                None,
                None,
                "actions.attempts must be at least 1".into(),
                true,
            );
        }
        if file.twilio.max_concurrent_requests == 0 {
            let message = "twilio.max_concurrent_requests must be at least 1".to_string();
            self.problem(None, None, message, true);
        }
        self.rules(&file.rules, None);

        let mut cbos: Vec<Cbo> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for section in &file.cbos {
            let key = section.key.get_ref().clone();
            let at = section.key.span().start;
            if let Some(first) = seen.get(&key) {
                let message = format!("duplicate CBO key {key:?} (first at line {first})");
                self.problem(Some(at), Some(&key), message, true);
                continue;
            }
            seen.insert(key, line_of(self.text, at));
            if let Some(cbo) = self.cbo(section) {
                cbos.push(cbo);
            }
        }
        // A token names one tenant: shared, one CBO's events would count for the other; equal
        // to the admin token, a CBO's client would get admin rights.
        let mut by_token: HashMap<&str, &str> = HashMap::new();
        let mut token_problems = Vec::new();
        for cbo in &cbos {
            let Some(token) = &cbo.ingest_token else {
                continue;
            };
            let at = file
                .cbos
                .iter()
                .find(|s| s.key.get_ref() == cbo.key.as_str())
                .map_or(0, |s| {
                    s.ingest_token_env
                        .as_ref()
                        .map_or(s.key.span().start, |v| v.span().start)
                });
            if admin_token
                .as_ref()
                .is_some_and(|a| a.expose() == token.expose())
            {
                let message = "ingest_token_env: the token equals the admin token; a CBO's token must be its own".to_string();
                token_problems.push((at, cbo.key.to_string(), message));
            }
            if let Some(first) = by_token.insert(token.expose(), cbo.key.as_str()) {
                let message = format!(
                    "ingest_token_env: the same token as cbo {first}; each CBO needs its own, or one tenant's events count for the other"
                );
                token_problems.push((at, cbo.key.to_string(), message));
            }
        }
        for (at, cbo, message) in token_problems {
            self.problem(Some(at), Some(&cbo), message, true);
        }
        // The seed's cross-CBO failure: one workflow SID serving two accounts.
        let mut by_sid: HashMap<WorkflowSid, &Cbo> = HashMap::new();
        let mut shared = Vec::new();
        for cbo in &cbos {
            if let Ok(sid) = &cbo.workflow.sid {
                if let Some(first) = by_sid.get(sid) {
                    shared.push((cbo.key.to_string(), first.key.to_string(), *sid));
                } else {
                    by_sid.insert(*sid, cbo);
                }
            }
        }
        for (cbo, first, sid) in shared {
            let message = format!("workflow SID {sid} is also configured for cbo {first}");
            self.problem(None, Some(&cbo), message, false);
        }

        for (key, url) in [
            ("public_url", file.server.public_url.as_deref()),
            ("external_url", file.server.external_url.as_deref()),
            ("runbook_url", Some(file.server.runbook_url.as_str())),
        ] {
            let Some(url) = url else { continue };
            let absolute = (url.starts_with("https://") || url.starts_with("http://"))
                && reqwest::Url::parse(url).is_ok();
            if !absolute {
                let message =
                    format!("server.{key} {url:?} must be an absolute https:// (or http://) URL");
                let at = self.key_at(&format!("server.{key}"));
                self.problem(at, None, message, true);
            }
        }
        if file.sources.twilio.overlap > Duration::from_secs(3600) {
            let message = "sources.twilio.overlap must be at most 1h".to_string();
            self.problem(None, None, message, true);
        }

        let mut file_sources = Vec::new();
        for src in &file.sources.file {
            let at = Some(src.span().start);
            let s = src.get_ref();
            if seen.contains_key(&s.cbo) {
                file_sources.push(FileSource {
                    path: s.path.clone(),
                    cbo: CboKey(s.cbo.clone()),
                    from_beginning: s.from_beginning,
                });
            } else {
                let message = format!("sources.file {}: unknown cbo {:?}", s.path.display(), s.cbo);
                self.problem(at, None, message, true);
            }
        }

        for cbo in &file.cbos {
            let key = cbo.key.get_ref().as_str();
            let at = Some(cbo.key.span().start);
            let webhook = cbo.rollback.contains(&RollbackKind::Webhook)
                || cbo.disable.contains(&DisableKind::Webhook);
            if webhook && file.actions.webhook.is_none() {
                self.problem(
                    at,
                    Some(key),
                    "a webhook action needs [actions.webhook]".into(),
                    true,
                );
            }
            if cbo.rollback.contains(&RollbackKind::Command) && file.actions.command.is_none() {
                self.problem(
                    at,
                    Some(key),
                    "the command action needs [actions.command]".into(),
                    true,
                );
            }
            if cbo.disable_features.is_empty() {
                let message = "disable_features is empty: the switch would turn nothing off (enabled, cold_transfer or multi_participant)";
                self.problem(at, Some(key), message.into(), true);
            }
            let serverless = cbo.serverless_service_sid.is_some();
            if cbo.rollback.contains(&RollbackKind::Serverless) && !serverless {
                let message = "the serverless rollback needs serverless_service_sid and serverless_environment_sid";
                self.problem(at, Some(key), message.into(), true);
            }
        }
        let store = self.store(&file.store);
        let config = Config {
            server: file.server,
            admin_token,
            webhook_secret,
            twilio: file.twilio,
            transfers: file.transfers,
            actions: file.actions,
            validation: file.validation,
            rules: file.rules,
            file_sources,
            record: file.sources.twilio,
            cbos,
            store,
        };
        Checked {
            config: Some(config),
            problems: self.problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WW1: &str = "WW0123456789abcdef0123456789abcdef";
    const WW2: &str = "WWfedcba9876543210fedcba9876543210";

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn cbo_block(key: &str, workflow: &str) -> String {
        format!(
            "[[cbo]]\nkey = \"{key}\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\n\
             auth_token_env = \"TOK\"\nworkspace_sid = \"WS0123456789abcdef0123456789abcdef\"\n\
             workflow_sid = \"{workflow}\"\n"
        )
    }

    #[test]
    fn spec_example_keys_all_parse() {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:9843\"\nadmin_token_env = \"ADMIN\"\nstate_dir = \"/tmp/tg\"\n\
             [twilio]\ntaskrouter_url = \"https://taskrouter.twilio.com\"\nserverless_url = \"https://serverless.twilio.com\"\n\
             flex_url = \"https://flex-api.twilio.com\"\npoll_interval = \"15s\"\nrequest_timeout = \"10s\"\n\
             [transfers]\ntimeout = \"300s\"\n[actions]\ndry_run = true\ncooldown = \"30m\"\n\
             [validation]\nduration = \"15m\"\nmin_samples = 20\n\
             [rules.success_rate]\nthreshold = 0.90\nwindow = \"5m\"\nfor = \"15m\"\nmin_samples = 20\n\
             {}ingest_token_env = \"ING\"\nserverless_service_sid = \"ZS0123456789abcdef0123456789abcdef\"\n\
             serverless_environment_sid = \"ZE0123456789abcdef0123456789abcdef\"\n\
             rollback = [\"serverless\", \"plugin_release\"]\ndisable = [\"flex_flag\"]\n\
             [cbo.rules.bad_requests]\nminutes = 3\nwindow = \"5m\"\n",
            cbo_block("nss", WW1)
        );
        let checked = check_str(&text, &env(&[("ADMIN", "a"), ("ING", "i"), ("TOK", "t")]));
        assert_eq!(checked.problems, vec![]);
        let config = checked.config.unwrap();
        assert_eq!(
            config.rules.success_rate.unwrap().get_ref().for_,
            Some(Duration::from_secs(900))
        );
        assert_eq!(
            config.cbos[0]
                .rules
                .bad_requests
                .as_ref()
                .unwrap()
                .get_ref()
                .minutes,
            Some(3)
        );
        assert_eq!(config.transfers.timeout, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_refused_with_its_line_and_name() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n";
        let checked = check_str(text, &env(&[]));
        let p = &checked.problems[0];
        assert_eq!(p.line, Some(3), "{p}");
        assert!(p.message.contains("listen_port"), "{p}");
    }

    #[test]
    fn a_store_url_that_is_not_postgresql_or_a_lease_out_of_range_is_refused_without_the_secret() {
        let text = "[store]\nurl_env = \"DB\"\n";
        let ok = check_str(
            text,
            &env(&[("DB", "postgres://guard:pw@db.internal/tg?sslmode=require")]),
        );
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        let store = ok.config.unwrap().store.unwrap();
        assert_eq!(store.lease, Duration::from_secs(10));

        let bad = check_str(
            text,
            &env(&[("DB", "postgres://guard:hunter2@db/tg?sslmode=bogus")]),
        );
        let p = bad.problems.iter().find(|p| p.fatal).unwrap();
        assert!(p.message.contains("DB is not a PostgreSQL URL"), "{p}");
        assert!(
            !p.to_string().contains("hunter2"),
            "the password is echoed: {p}"
        );

        let unset = check_str(text, &env(&[]));
        assert!(
            unset
                .problems
                .iter()
                .any(|p| p.fatal && p.message.contains("DB"))
        );

        let short = "[store]\nurl_env = \"DB\"\nlease = \"1s\"\n";
        let p = &check_str(short, &env(&[("DB", "postgres://db/tg")])).problems[0];
        assert!(
            p.message.contains("store.lease: 1s is outside 3s..=5m"),
            "{p}"
        );
        assert_eq!(p.line, Some(3), "{p}");
    }

    #[test]
    fn bad_duration_is_refused_with_its_line() {
        let text = "[transfers]\n\ntimeout = \"five minutes\"\n";
        let p = &check_str(text, &env(&[])).problems[0];
        assert_eq!(p.line, Some(3), "{p}");
    }

    #[test]
    fn missing_secret_is_named() {
        let text = cbo_block("nss", WW1);
        let checked = check_str(&text, &env(&[]));
        let p = checked.problems.iter().find(|p| p.fatal).unwrap();
        assert!(
            p.to_string()
                .contains("environment variable TOK is not set"),
            "{p}"
        );
        assert_eq!(p.cbo.as_deref(), Some("nss"));
    }

    #[test]
    fn thirty_three_character_workflow_sid_is_a_problem_naming_the_cbo() {
        let text = cbo_block("nss", &WW1[..33]);
        let checked = check_str(&text, &env(&[("TOK", "t")]));
        assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
        let line = checked.problems[0].to_string();
        assert!(
            line.contains("cbo nss") && line.contains("33 characters"),
            "{line}"
        );
    }

    #[test]
    fn shared_workflow_sid_is_a_problem() {
        let text = cbo_block("nss", WW1) + &cbo_block("clienta", WW1);
        let checked = check_str(&text, &env(&[("TOK", "t")]));
        let line = checked.problems[0].to_string();
        assert!(
            line.contains("cbo clienta") && line.contains("also configured for cbo nss"),
            "{line}"
        );
    }

    #[test]
    fn duplicate_cbo_key_is_a_problem_with_both_lines() {
        let text = cbo_block("nss", WW1) + &cbo_block("nss", WW2);
        let checked = check_str(&text, &env(&[("TOK", "t")]));
        let line = checked.problems[0].to_string();
        assert!(
            line.starts_with("line 8: cbo nss: duplicate") && line.contains("line 2"),
            "{line}"
        );
    }

    #[test]
    fn workflow_sid_falls_back_to_per_cbo_then_shared_variable() {
        let text = cbo_block("client-a", WW1).replace(&format!("workflow_sid = \"{WW1}\"\n"), "");
        let both = env(&[
            ("TOK", "t"),
            ("TWILIO_FLEX_CHAT_TRANSFER_WORKFLOW_SID_CLIENT_A", WW2),
            (WORKFLOW_SID_VAR, WW1),
        ]);
        let cbo = &check_str(&text, &both).config.unwrap().cbos[0];
        assert_eq!(cbo.workflow.sid.as_ref().unwrap().as_str(), WW2);
        let shared = env(&[("TOK", "t"), (WORKFLOW_SID_VAR, WW1)]);
        let cbo = &check_str(&text, &shared).config.unwrap().cbos[0];
        assert_eq!(
            cbo.workflow.source,
            WorkflowSource::Env(WORKFLOW_SID_VAR.into())
        );
        let checked = check_str(&text, &env(&[("TOK", "t")]));
        assert!(checked.problems[0].message.contains("workflow SID missing"));
    }

    #[test]
    fn unknown_rule_id_is_refused() {
        let p = &check_str("[rules.succes_rate]\nthreshold = 0.9\n", &env(&[])).problems[0];
        assert!(p.message.contains("succes_rate"), "{p}");
    }

    #[test]
    fn a_key_the_rule_does_not_read_is_refused_not_ignored() {
        let text = "[rules.success_rate]\nminutes = 3\n\n[rules.taskrouter_error_rate]\nmin_samples = 20\n";
        let checked = check_str(text, &env(&[]));
        assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
        let p = &checked.problems[0];
        assert!(p.fatal && p.line == Some(1), "{p}");
        assert!(
            p.message
                .starts_with("rules.success_rate.minutes: rule success_rate does not use minutes"),
            "{p}"
        );
    }

    /// The problems of `text` (fatal ones), as "line N: message".
    fn refusals(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
        check_str(text, &env(vars))
            .problems
            .iter()
            .filter(|p| p.fatal)
            .map(|p| format!("line {}: {}", p.line.unwrap_or(0), p.message))
            .collect()
    }

    #[test]
    fn values_outside_their_range_are_refused_with_their_line() {
        let text = "[validation]\nduration = \"2h\"\nmin_samples = 0\n\n[rules.success_rate]\nthreshold = 90\n\n[rules.bad_requests]\nminutes = 0\n\n[cbo.rules]\n";
        let got = refusals(&text.replace("\n[cbo.rules]\n", ""), &[]);
        let want = [
            "line 2: validation.duration: 2h is outside 10s..=1h",
            "line 3: validation.min_samples: must be at least 1",
            "line 5: rules.success_rate.threshold: 90 is a ratio and must be within 0..=1",
            "line 8: rules.bad_requests.minutes: must be at least 1",
        ];
        for w in want {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "{w:?} not in {got:#?}"
            );
        }
        let text = "[rules.cold_transfer_latency]\nthreshold = 0\n[rules.bad_requests]\nminutes = 10\nwindow = \"5m\"\n[twilio]\npoll_interval = \"0s\"\n";
        let got = refusals(text, &[]);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(
            got.iter()
                .any(|g| g.contains("threshold: 0 seconds is outside"))
        );
        assert!(
            got.iter()
                .any(|g| g.contains("10 distinct minutes cannot fit in window 5m"))
        );
        assert!(
            got.iter()
                .any(|g| g.starts_with("line 7: twilio.poll_interval"))
        );
        // The seed's own numbers pass.
        let ok = "[rules.success_rate]\nthreshold = 0.90\n[rules.bad_requests]\nminutes = 3\nwindow = \"5m\"\n[validation]\nduration = \"15m\"\n";
        assert!(refusals(ok, &[]).is_empty());
    }

    #[test]
    fn link_urls_must_be_absolute() {
        let text =
            "[server]\nexternal_url = \"guard.example.org\"\nrunbook_url = \"docs/runbook.md\"\n";
        let got = refusals(text, &[]);
        assert_eq!(
            got,
            [
                "line 2: server.external_url \"guard.example.org\" must be an absolute https:// (or http://) URL",
                "line 3: server.runbook_url \"docs/runbook.md\" must be an absolute https:// (or http://) URL",
            ]
        );
        let ok = check_str(
            "[server]\npublic_url = \"https://guard.example.org/\"\n",
            &env(&[]),
        );
        let server = ok.config.unwrap().server;
        assert_eq!(server.link_base(), "https://guard.example.org");
        assert_eq!(server.runbook_url, RUNBOOK_URL);
    }

    #[test]
    fn a_shared_ingest_token_or_one_equal_to_the_admin_token_is_refused() {
        let cbo =
            |k: &str, var: &str| format!("[[cbo]]\nkey = \"{k}\"\ningest_token_env = \"{var}\"\n");
        let text = format!(
            "[server]\nadmin_token_env = \"ADMIN\"\n{}{}{}",
            cbo("a", "TA"),
            cbo("b", "TB"),
            cbo("c", "TC")
        );
        let vars = [
            ("ADMIN", "root"),
            ("TA", "same"),
            ("TB", "same"),
            ("TC", "root"),
        ];
        let got = refusals(&text, &vars);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].starts_with("line 8: ingest_token_env: the same token as cbo a"),
            "{got:#?}"
        );
        assert!(
            got[1].starts_with("line 11: ingest_token_env: the token equals the admin token"),
            "{got:#?}"
        );
        let vars = [("ADMIN", "root"), ("TA", "a1"), ("TB", "b1"), ("TC", "c1")];
        assert!(refusals(&text, &vars).is_empty());
    }
}
