//! Workflow health: every configuration-corruption case of SPEC §3, and what a CBO's last poll saw.

use std::fmt;

use serde::Serialize;

use crate::config::{Cbo, Config};
use crate::twilio::taskrouter::{CumulativeStatistics, RealTimeStatistics};

/// One way a CBO's chat-transfer workflow configuration is corrupted (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    /// No workflow SID configured anywhere.
    Missing(String),
    /// Not 34 characters, or not `WW` + 32 hex digits.
    Malformed(String),
    /// TaskRouter answered 404 for the workflow.
    NotFound { sid: String },
    /// TaskRouter answered 400 for the workflow: the seed's "Bad Request".
    BadRequest { sid: String, message: String },
    /// The workflow's configuration does not route a target type (or cannot be read).
    RouteMissing { sid: String, missing: String },
    /// The SID the functions use changed since the baseline taken at the last deployment.
    Changed { baseline: String, now: String },
    /// The same workflow SID is configured for another CBO.
    Shared { sid: String, other: String },
    /// The serverless environment's variable names another workflow than the configured one.
    VariableMismatch {
        variable: String,
        value: String,
        configured: String,
    },
    /// The serverless environment has no workflow variable (`variable`: the one it must have).
    VariableMissing {
        environment: String,
        variable: String,
    },
    /// The functions' `TWILIO_WORKSPACE_SID` names another workspace than the configured one.
    WorkspaceMismatch { value: String, configured: String },
    /// CBOs sharing one environment: this CBO's workflow variable has the same value as
    /// another's (the seed's "each CBO requires a unique workflow SID").
    VariableShared {
        variable: String,
        value: String,
        other: String,
    },
}

impl Corruption {
    /// A short stable id, the value of `workflow_problem{problem}` and of `problem` in `/v1/status`.
    pub fn id(&self) -> &'static str {
        match self {
            Corruption::Missing(_) => "missing",
            Corruption::Malformed(_) => "malformed",
            Corruption::NotFound { .. } => "not_found",
            Corruption::BadRequest { .. } => "bad_request",
            Corruption::RouteMissing { .. } => "route_missing",
            Corruption::Changed { .. } => "changed_since_deployment",
            Corruption::Shared { .. } => "shared",
            Corruption::VariableMismatch { .. } => "variable_mismatch",
            Corruption::VariableMissing { .. } => "variable_missing",
            Corruption::WorkspaceMismatch { .. } => "workspace_mismatch",
            Corruption::VariableShared { .. } => "variable_shared",
        }
    }

    pub const IDS: [&'static str; 11] = [
        "missing",
        "malformed",
        "not_found",
        "bad_request",
        "route_missing",
        "changed_since_deployment",
        "shared",
        "variable_mismatch",
        "variable_missing",
        "workspace_mismatch",
        "variable_shared",
    ];
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Missing(m) | Corruption::Malformed(m) => f.write_str(m),
            Corruption::NotFound { sid } => write!(
                f,
                "workflow {sid}: TaskRouter 404 Not Found (wrong account, or deleted)"
            ),
            Corruption::BadRequest { sid, message } => {
                write!(f, "workflow {sid}: TaskRouter 400 Bad Request: {message}")
            }
            Corruption::RouteMissing { sid, missing } => write!(f, "workflow {sid}: {missing}"),
            Corruption::Changed { baseline, now } => write!(
                f,
                "workflow SID changed since the last deployment's baseline: was {baseline}, now {now}"
            ),
            Corruption::Shared { sid, other } => {
                write!(f, "workflow SID {sid} is also configured for cbo {other}")
            }
            Corruption::VariableMismatch {
                variable,
                value,
                configured,
            } => write!(
                f,
                "the functions' {variable} is {value}, not the configured {configured}"
            ),
            Corruption::VariableMissing {
                environment,
                variable,
            } => write!(
                f,
                "serverless environment {environment} has no {variable} variable"
            ),
            Corruption::WorkspaceMismatch { value, configured } => write!(
                f,
                "the functions' TWILIO_WORKSPACE_SID is {value}, not the configured workspace {configured}"
            ),
            Corruption::VariableShared {
                variable,
                value,
                other,
            } => write!(
                f,
                "the functions' {variable} is {value}, the same workflow as cbo {other}'s: each CBO needs its own"
            ),
        }
    }
}

impl Serialize for Corruption {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("problem", self.id())?;
        m.serialize_entry("message", &self.to_string())?;
        m.end()
    }
}

/// The problems a configuration has before anything is asked of Twilio: a workflow SID that is
/// missing, malformed, or shared with another CBO.
pub fn static_problems(config: &Config, cbo: &Cbo) -> Vec<Corruption> {
    let mut problems = Vec::new();
    match &cbo.workflow.sid {
        Err(message) if cbo.workflow.raw.is_none() => {
            problems.push(Corruption::Missing(message.clone()))
        }
        Err(message) => problems.push(Corruption::Malformed(message.clone())),
        Ok(sid) => {
            for other in &config.cbos {
                if other.key != cbo.key && other.workflow.sid.as_ref() == Ok(sid) {
                    problems.push(Corruption::Shared {
                        sid: sid.to_string(),
                        other: other.key.to_string(),
                    });
                }
            }
        }
    }
    problems
}

/// The workflow SID baseline: what the functions used when the last deployment was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Baseline {
    pub workflow_sid: String,
    /// The deployment it was taken at; `None` when taken at start without one.
    pub deployment: Option<String>,
    pub taken_at: String,
}

/// One polled source of Twilio's record, as `/v1/status` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SourceStatus {
    pub last_poll: Option<String>,
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    /// Items (events, log lines, alerts) taken by the last poll.
    pub taken: usize,
    /// Everything before this, less the overlap, has been read.
    pub read_until: Option<String>,
}

/// What a CBO's polling knows, as `/v1/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskRouterStatus {
    /// Whether TaskRouter can be polled for this CBO (account, credentials, workspace and a valid workflow SID).
    pub polled: bool,
    pub first_poll_done: bool,
    pub last_poll: Option<String>,
    /// The last poll that got every answer it asked for.
    pub last_success: Option<String>,
    /// Set while Twilio's `Retry-After` holds the next poll back.
    pub throttled_until: Option<String>,
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    pub workflow_name: Option<String>,
    pub statistics: Option<CumulativeStatistics>,
    pub real_time: Option<RealTimeStatistics>,
    pub error_ratio: Option<f64>,
    /// The workflow SID the serverless functions really use (their environment variable).
    pub functions_workflow_sid: Option<String>,
    pub baseline: Option<Baseline>,
    pub latest_deployment: Option<String>,
    /// The build the latest deployment runs.
    pub latest_build: Option<String>,
    /// The latest Flex plugin release and the configuration it made live.
    pub latest_release: Option<String>,
    pub latest_configuration: Option<String>,
    #[serde(skip)]
    pub latest_release_at_ms: Option<i64>,
    /// When Twilio says the latest deployment was created (ms since the epoch).
    #[serde(skip)]
    pub latest_deployment_at_ms: Option<i64>,
    /// When the last poll started (ms since the epoch).
    #[serde(skip)]
    pub last_poll_ms: Option<i64>,
    /// When `statistics` were last read (ms since the epoch), so stale ones decide nothing.
    #[serde(skip)]
    pub statistics_at_ms: Option<i64>,
    pub problems: Vec<Corruption>,
    /// The problems among `problems` known since the daemon started (or before a restart):
    /// `config_mismatch`, the guard's own configuration or an old state, which holds this
    /// CBO's actions and pages instead of rolling anything back.
    pub mismatch: Vec<Corruption>,
    /// Consecutive polls that saw a problem outside `mismatch`; corruption needs two.
    pub new_problem_polls: u32,
    /// The transfer timeout in force and where it comes from.
    pub transfer_timeout: TransferTimeout,
    /// `None` until the first poll that could tell.
    pub config_ok: Option<bool>,
    /// Twilio's record of transfers (SPEC §2b): each polled source's last poll.
    pub sources: std::collections::BTreeMap<&'static str, SourceStatus>,
}

/// The transfer timeout of a CBO: the functions' `CONVERSATION_TRANSFER_TIMEOUT` when set,
/// else the configured `transfers.timeout`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferTimeout {
    pub seconds: u64,
    pub source: &'static str,
}

impl TaskRouterStatus {
    /// Problems that appeared while the daemon watched (not `config_mismatch`).
    pub fn new_problems(&self) -> impl Iterator<Item = &Corruption> {
        self.problems.iter().filter(|p| !self.mismatch.contains(p))
    }
}
