//! TaskRouter and configuration polling per CBO: the workflow, its statistics, the functions' variable and deployments; results to metrics and status.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Shared;
use crate::config::{Cbo, Config, WORKFLOW_SID_VAR};
use crate::health::{Baseline, Corruption, TaskRouterStatus, TransferTimeout, static_problems};
use crate::sid::{AccountSid, EnvironmentSid, ServiceSid, WorkflowSid, WorkspaceSid};
use crate::twilio::serverless::Serverless;
use crate::twilio::taskrouter::{self, CumulativeStatistics, RealTimeStatistics, TaskRouter};
use crate::twilio::{PollResult, Retry, TwilioClient, TwilioError};

/// One client per Twilio account, so every CBO of an account shares its concurrency limit.
pub fn clients(config: &Config, clock: crate::clock::Clock) -> crate::Clients {
    clients_after(config, clock, None)
}

/// The clients of `config`, after a reload from `previous`: an account whose credentials and
/// request settings did not change keeps its client (and with it its concurrency limit, shared
/// with pollers still running).
pub fn clients_after(
    config: &Config,
    clock: crate::clock::Clock,
    previous: Option<(&Config, &crate::Clients)>,
) -> crate::Clients {
    let mut clients = HashMap::new();
    for cbo in &config.cbos {
        let (Some(account), Some(credentials)) = (&cbo.account_sid, &cbo.credentials) else {
            continue;
        };
        if clients.contains_key(account) {
            continue;
        }
        let kept = previous.and_then(|(old, old_clients)| {
            let same = old.twilio.request_timeout == config.twilio.request_timeout
                && old.twilio.max_concurrent_requests == config.twilio.max_concurrent_requests
                && old.twilio.max_retry_after == config.twilio.max_retry_after
                && account_credentials(old, account) == Some(credentials);
            same.then(|| old_clients.get(account).cloned()).flatten()
        });
        let client = kept.unwrap_or_else(|| {
            TwilioClient::new(
                *account,
                credentials,
                config.twilio.request_timeout,
                config.twilio.max_concurrent_requests,
                Retry {
                    max_retry_after: config.twilio.max_retry_after,
                    ..Retry::default()
                },
                clock,
            )
        });
        clients.insert(*account, client);
    }
    clients
}

/// The credentials an account's client is made with: its first CBO's.
fn account_credentials<'a>(
    config: &'a Config,
    account: &AccountSid,
) -> Option<&'a crate::config::Credentials> {
    config
        .cbos
        .iter()
        .filter(|c| c.account_sid.as_ref() == Some(account))
        .find_map(|c| c.credentials.as_ref())
}

/// What one poll cycle of one CBO found.
#[derive(Debug, Default)]
pub struct Cycle {
    /// `ok`, or the class of the first failure.
    pub result: Option<PollResult>,
    pub errors: Vec<TwilioError>,
    /// TaskRouter answered 400 for one of the workflow's resources.
    pub bad_request: bool,
    pub problems: Vec<Corruption>,
    /// `None` when a failure left the workflow's soundness unknown.
    pub config_ok: Option<bool>,
    pub workflow_name: Option<String>,
    pub statistics: Option<CumulativeStatistics>,
    pub real_time: Option<RealTimeStatistics>,
    pub functions_workflow_sid: Option<String>,
    pub latest_deployment: Option<String>,
    pub latest_deployment_at_ms: Option<i64>,
    pub latest_build: Option<String>,
    pub latest_release: Option<String>,
    pub latest_release_at_ms: Option<i64>,
    pub latest_configuration: Option<String>,
    pub new_deployment: bool,
    /// A Flex plugin release seen for the first time (not at start): its SID.
    pub new_release: Option<String>,
    pub baseline: Option<Baseline>,
    /// Problems known since start (`config_mismatch`): not rollback triggers.
    pub mismatch: Vec<Corruption>,
    /// Consecutive fresh polls that saw a problem not known since start (corruption needs two).
    pub new_problem_polls: u32,
    /// What to keep across a restart.
    pub remembered: Option<Remembered>,
    pub duration: Duration,
    /// Twilio throttled this CBO's account and asked to wait this long (capped).
    pub retry_after: Option<Duration>,
    /// The functions' `CONVERSATION_TRANSFER_TIMEOUT`, when set (and `variables_read`).
    pub transfer_timeout: Option<Duration>,
    pub variables_read: bool,
}

/// Polls one CBO, remembering what earlier cycles learned.
pub struct Poller {
    cbo: Cbo,
    client: Option<TwilioClient>,
    taskrouter_url: String,
    serverless_url: String,
    /// Minutes of `CumulativeStatistics` (the `taskrouter_error_rate` window).
    minutes: u64,
    static_problems: Vec<Corruption>,
    workflow_problems: Option<Vec<Corruption>>,
    variable_problems: Option<Vec<Corruption>>,
    functions_sid: Option<String>,
    baseline: Option<Baseline>,
    last_deployment: Option<String>,
    last_deployment_at_ms: Option<i64>,
    flex_url: String,
    /// Polled only for CBOs that roll back plugin releases (they deploy through Flex plugins).
    watch_releases: bool,
    last_release: Option<String>,
    last_release_at_ms: Option<i64>,
    last_build: Option<String>,
    last_configuration: Option<String>,
    /// The current deployment's first instant (set by the daemon after a cut): statistics are
    /// asked from then on while that is nearer than the trailing window.
    pub judged_since_ms: Option<i64>,
    /// Problems present since the daemon started (or, across a restart, before it): the
    /// guard's own configuration or an old state, `config_mismatch`, never a rollback trigger.
    /// `None` until the first verdict, or what a restart restored.
    pub known_problems: Option<BTreeSet<String>>,
    /// Consecutive fresh polls that saw a problem outside `known_problems`.
    pub new_problem_polls: u32,
    /// When the last cycle started (ms since the epoch).
    last_cycle_ms: i64,
    /// Other CBOs configured with the same Serverless environment.
    siblings: Vec<crate::config::CboKey>,
}

/// The functions' `CONVERSATION_TRANSFER_TIMEOUT` (seconds; the per-CBO
/// `CONVERSATION_TRANSFER_TIMEOUT_<KEY>` first), when set to a whole number of seconds.
fn transfer_timeout(vars: &[crate::twilio::serverless::Variable], cbo: &Cbo) -> Option<Duration> {
    let per_cbo = format!("{TIMEOUT_VAR}_{}", cbo.key.env_suffix());
    [per_cbo.as_str(), TIMEOUT_VAR].into_iter().find_map(|name| {
        let v = vars.iter().find(|v| v.key.as_deref() == Some(name))?;
        let raw = v.value.as_deref()?.trim();
        match raw.parse::<u64>() {
            Ok(secs) if secs > 0 => Some(Duration::from_secs(secs)),
            _ => {
                tracing::warn!(cbo = %cbo.key, variable = name, value = raw, "not a whole number of seconds: the configured transfers.timeout applies");
                None
            }
        }
    })
}

/// The template's transfer timeout variable (seconds), as the seed documents it.
pub const TIMEOUT_VAR: &str = "CONVERSATION_TRANSFER_TIMEOUT";

/// What polling keeps across a restart per CBO: the workflow SID baseline and the problems
/// already known when it stopped.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Remembered {
    pub baseline: Option<Baseline>,
    pub known_problems: BTreeSet<String>,
}

/// The workflow variable the template's functions read: the per-CBO one, else the shared one.
fn workflow_variable<'a>(
    vars: &'a [crate::twilio::serverless::Variable],
    cbo: &Cbo,
) -> Option<(String, &'a str)> {
    let per_cbo = format!("{WORKFLOW_SID_VAR}_{}", cbo.key.env_suffix());
    [per_cbo.as_str(), WORKFLOW_SID_VAR]
        .into_iter()
        .find_map(|name| {
            vars.iter()
                .find(|v| v.key.as_deref() == Some(name))
                .and_then(|v| v.value.as_deref())
                .map(|value| (name.to_string(), value))
        })
}

impl Poller {
    pub fn new(config: &Config, cbo: &Cbo, clients: &HashMap<AccountSid, TwilioClient>) -> Poller {
        let minutes = config
            .rules
            .taskrouter_error_rate
            .as_ref()
            .and_then(|r| r.get_ref().window)
            .map_or(5, |w| (w.as_secs() / 60).max(1));
        Poller {
            client: cbo.account_sid.and_then(|a| clients.get(&a).cloned()),
            cbo: cbo.clone(),
            taskrouter_url: config.twilio.taskrouter_url.clone(),
            serverless_url: config.twilio.serverless_url.clone(),
            minutes,
            static_problems: static_problems(config, cbo),
            workflow_problems: None,
            variable_problems: None,
            functions_sid: None,
            baseline: None,
            last_deployment: None,
            last_deployment_at_ms: None,
            flex_url: config.twilio.flex_url.clone(),
            watch_releases: cbo
                .rollback
                .contains(&crate::config::RollbackKind::PluginRelease),
            last_release: None,
            last_release_at_ms: None,
            last_build: None,
            last_configuration: None,
            judged_since_ms: None,
            known_problems: None,
            new_problem_polls: 0,
            last_cycle_ms: i64::MIN,
            siblings: config
                .cbos
                .iter()
                .filter(|o| {
                    o.key != cbo.key
                        && cbo.serverless_service_sid.is_some()
                        && o.serverless_service_sid == cbo.serverless_service_sid
                        && o.serverless_environment_sid == cbo.serverless_environment_sid
                })
                .map(|o| o.key.clone())
                .collect(),
        }
    }

    /// Takes up what an earlier run of the daemon knew.
    pub fn remember(&mut self, r: Remembered) {
        self.baseline = r.baseline;
        self.known_problems = Some(r.known_problems);
    }

    /// The workspace and workflow when TaskRouter can be asked about them.
    fn taskrouter_target(&self) -> Option<(TwilioClient, WorkspaceSid, WorkflowSid)> {
        Some((
            self.client.clone()?,
            self.cbo.workspace_sid?,
            *self.cbo.workflow.sid.as_ref().ok()?,
        ))
    }

    fn serverless_target(&self) -> Option<(TwilioClient, ServiceSid, EnvironmentSid)> {
        Some((
            self.client.clone()?,
            self.cbo.serverless_service_sid?,
            self.cbo.serverless_environment_sid?,
        ))
    }

    /// What the functions' variables say is wrong: the workflow variable missing or naming
    /// another workflow; `TWILIO_WORKSPACE_SID` naming another workspace; and where several
    /// CBOs share this environment (the seed's multi-account deployment), this CBO's own
    /// `…_WORKFLOW_SID_<KEY>` missing or naming a sibling's workflow.
    fn check_variables(
        &mut self,
        vars: &[crate::twilio::serverless::Variable],
        ze: &EnvironmentSid,
    ) -> Vec<Corruption> {
        let value = |name: &str| {
            vars.iter()
                .find(|v| v.key.as_deref() == Some(name))
                .and_then(|v| v.value.as_deref())
                .map(str::trim)
        };
        let mut problems = Vec::new();
        match workflow_variable(vars, &self.cbo) {
            None => {
                self.functions_sid = None;
                problems.push(Corruption::VariableMissing {
                    environment: ze.to_string(),
                    variable: WORKFLOW_SID_VAR.into(),
                });
            }
            Some((name, value)) => {
                self.functions_sid = Some(value.to_string());
                if let Some(configured) = &self.cbo.workflow.raw
                    && value.trim() != configured.trim()
                {
                    problems.push(Corruption::VariableMismatch {
                        variable: name,
                        value: value.to_string(),
                        configured: configured.clone(),
                    });
                }
            }
        }
        if let (Some(ws), Some(configured)) =
            (value("TWILIO_WORKSPACE_SID"), self.cbo.workspace_sid)
            && ws != configured.as_str()
        {
            problems.push(Corruption::WorkspaceMismatch {
                value: ws.to_string(),
                configured: configured.to_string(),
            });
        }
        if !self.siblings.is_empty() {
            let own = format!("{WORKFLOW_SID_VAR}_{}", self.cbo.key.env_suffix());
            match value(&own) {
                None => problems.push(Corruption::VariableMissing {
                    environment: ze.to_string(),
                    variable: own,
                }),
                Some(mine) => {
                    for sibling in &self.siblings {
                        let theirs = format!("{WORKFLOW_SID_VAR}_{}", sibling.env_suffix());
                        if value(&theirs) == Some(mine) {
                            problems.push(Corruption::VariableShared {
                                variable: own.clone(),
                                value: mine.to_string(),
                                other: sibling.to_string(),
                            });
                        }
                    }
                }
            }
        }
        problems
    }

    /// What the configuration alone says is wrong with the workflow SID.
    pub fn config_problems(&self) -> &[Corruption] {
        &self.static_problems
    }

    pub fn pollable(&self) -> bool {
        self.client.is_some() && self.cbo.workspace_sid.is_some()
    }

    pub async fn cycle(&mut self, now: &str) -> Cycle {
        let started = tokio::time::Instant::now();
        let mut cycle = Cycle::default();
        let fail = |cycle: &mut Cycle, e: TwilioError| {
            if cycle.result.is_none() {
                cycle.result = Some(e.poll_result());
            }
            cycle.retry_after = cycle.retry_after.max(e.retry_after());
            cycle.errors.push(e);
        };

        // Whether this cycle read the workflow itself (a verdict, not one kept from before).
        let mut fresh = self.taskrouter_target().is_none();
        if let Some((client, ws, ww)) = self.taskrouter_target() {
            let tr = TaskRouter {
                client: &client,
                base_url: &self.taskrouter_url,
            };
            match tr.workflow(&ws, &ww).await {
                Ok(workflow) => {
                    fresh = true;
                    cycle.workflow_name = workflow.friendly_name.clone();
                    let mut problems = Vec::new();
                    let configuration = workflow.configuration.as_deref().unwrap_or("");
                    match taskrouter::routes(configuration) {
                        Ok(r) if r.worker && r.queue => {}
                        Ok(r) => {
                            let missing = match (r.worker, r.queue) {
                                (false, false) => {
                                    "routes neither transferTargetType == 'worker' nor == 'queue'"
                                }
                                (true, false) => "does not route transferTargetType == 'queue'",
                                _ => "does not route transferTargetType == 'worker'",
                            };
                            let malformed = if r.malformed.is_empty() {
                                String::new()
                            } else {
                                format!(" (cannot parse {})", r.malformed.join("; "))
                            };
                            problems.push(Corruption::RouteMissing {
                                sid: ww.to_string(),
                                missing: format!("{missing}{malformed}"),
                            });
                        }
                        Err(message) => problems.push(Corruption::RouteMissing {
                            sid: ww.to_string(),
                            missing: message,
                        }),
                    }
                    self.workflow_problems = Some(problems);
                    let now_ms = chrono::DateTime::parse_from_rfc3339(now)
                        .map(|t| t.timestamp_millis())
                        .unwrap_or(0);
                    let start = self
                        .judged_since_ms
                        .filter(|s| *s > now_ms - self.minutes as i64 * 60_000 && *s <= now_ms);
                    match tr
                        .cumulative_statistics(&ws, &ww, self.minutes, start)
                        .await
                    {
                        Ok(s) => cycle.statistics = Some(s),
                        Err(e) => {
                            cycle.bad_request |= e.status() == Some(400);
                            fail(&mut cycle, e);
                        }
                    }
                    match tr.real_time_statistics(&ws, &ww).await {
                        Ok(s) => cycle.real_time = Some(s),
                        Err(e) => {
                            cycle.bad_request |= e.status() == Some(400);
                            fail(&mut cycle, e);
                        }
                    }
                }
                Err(e) => {
                    match (&e, e.status()) {
                        (TwilioError::Api { .. }, Some(404)) => {
                            fresh = true;
                            self.workflow_problems = Some(vec![Corruption::NotFound {
                                sid: ww.to_string(),
                            }]);
                        }
                        (TwilioError::Api { body, .. }, Some(400)) => {
                            fresh = true;
                            cycle.bad_request = true;
                            self.workflow_problems = Some(vec![Corruption::BadRequest {
                                sid: ww.to_string(),
                                message: body
                                    .message
                                    .clone()
                                    .unwrap_or_else(|| "Bad Request".into()),
                            }]);
                        }
                        // 401/403/5xx/timeouts say nothing about the workflow itself.
                        _ => {}
                    }
                    fail(&mut cycle, e);
                }
            }
        }

        if let Some((client, zs, ze)) = self.serverless_target() {
            let base_url = self.serverless_url.clone();
            let sl = Serverless {
                client: &client,
                base_url: &base_url,
            };
            match sl.variables(&zs, &ze).await {
                Ok(vars) => {
                    let problems = self.check_variables(&vars, &ze);
                    cycle.variables_read = true;
                    cycle.transfer_timeout = transfer_timeout(&vars, &self.cbo);
                    self.variable_problems = Some(problems);
                }
                Err(e) => fail(&mut cycle, e),
            }
            match sl.deployments(&zs, &ze).await {
                Ok(deployments) => {
                    // Twilio lists newest first; on equal timestamps the listing order decides.
                    let newest = deployments.iter().reduce(|best, d| {
                        if d.date_created > best.date_created {
                            d
                        } else {
                            best
                        }
                    });
                    let latest = newest.and_then(|d| d.sid.clone());
                    self.last_build = newest.and_then(|d| d.build_sid.clone());
                    if let Some(at) = newest
                        .and_then(|d| d.date_created.as_deref())
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    {
                        self.last_deployment_at_ms = Some(at.timestamp_millis());
                    }
                    cycle.new_deployment = self.last_deployment.is_some()
                        && latest.is_some()
                        && latest != self.last_deployment;
                    if latest.is_some() {
                        self.last_deployment = latest;
                    }
                }
                Err(e) => fail(&mut cycle, e),
            }
        }

        if let (true, Some(client)) = (self.watch_releases, self.client.clone()) {
            let flex = crate::twilio::flex::Flex {
                client: &client,
                base_url: &self.flex_url,
            };
            match flex.releases().await {
                Ok(releases) => {
                    let newest_release = releases.iter().reduce(|best, r| {
                        if r.date_created > best.date_created {
                            r
                        } else {
                            best
                        }
                    });
                    self.last_configuration =
                        newest_release.and_then(|r| r.configuration_sid.clone());
                    self.last_release_at_ms = newest_release.and_then(|r| {
                        crate::actions::serverless::created_ms(r.date_created.as_deref())
                    });
                    let newest = newest_release.and_then(|r| r.sid.clone());
                    if self.last_release.is_some()
                        && newest.is_some()
                        && newest != self.last_release
                    {
                        cycle.new_release = newest.clone();
                    }
                    if newest.is_some() {
                        self.last_release = newest;
                    }
                }
                Err(e) => fail(&mut cycle, e),
            }
        }

        // The baseline is the SID the functions use, taken at start and at each new deployment.
        let effective = self
            .functions_sid
            .clone()
            .or_else(|| self.cbo.workflow.raw.clone());
        if let Some(sid) = &effective
            && (self.baseline.is_none() || cycle.new_deployment || cycle.new_release.is_some())
        {
            self.baseline = Some(Baseline {
                workflow_sid: sid.clone(),
                deployment: cycle.new_release.clone().or(self.last_deployment.clone()),
                taken_at: now.to_string(),
            });
        }

        let mut problems = self.static_problems.clone();
        problems.extend(self.workflow_problems.iter().flatten().cloned());
        problems.extend(self.variable_problems.iter().flatten().cloned());
        if let (Some(baseline), Some(sid)) = (&self.baseline, &effective)
            && baseline.workflow_sid != *sid
        {
            problems.push(Corruption::Changed {
                baseline: baseline.workflow_sid.clone(),
                now: sid.clone(),
            });
        }
        let known = self.taskrouter_target().is_none() || self.workflow_problems.is_some();
        cycle.config_ok = if !problems.is_empty() {
            Some(false)
        } else if known {
            Some(true)
        } else {
            None
        };
        if cycle.config_ok.is_some() {
            let ids: BTreeSet<String> = problems.iter().map(|p| p.id().to_string()).collect();
            let before = self.known_problems.clone();
            let known = self.known_problems.get_or_insert_with(|| ids.clone());
            // A known problem that went away is forgotten: if it comes back, it is news.
            known.retain(|id| ids.contains(id));
            // What the configuration alone says is always the guard's own.
            known.extend(self.static_problems.iter().map(|p| p.id().to_string()));
            let known = known.clone();
            let (mismatch, new): (Vec<_>, Vec<_>) =
                problems.iter().partition(|p| known.contains(p.id()));
            if fresh {
                self.new_problem_polls = if new.is_empty() {
                    0
                } else {
                    self.new_problem_polls + 1
                };
            }
            cycle.mismatch = mismatch.into_iter().cloned().collect();
            cycle.new_problem_polls = self.new_problem_polls;
            if before.as_ref() != Some(&known)
                || cycle.new_deployment
                || cycle.new_release.is_some()
            {
                cycle.remembered = Some(Remembered {
                    baseline: self.baseline.clone(),
                    known_problems: known,
                });
            }
        }
        cycle.problems = problems;
        cycle.result.get_or_insert(PollResult::Ok);
        cycle.functions_workflow_sid = self.functions_sid.clone();
        cycle.latest_deployment = self.last_deployment.clone();
        cycle.latest_deployment_at_ms = self.last_deployment_at_ms;
        cycle.latest_build = self.last_build.clone();
        cycle.latest_release = self.last_release.clone();
        cycle.latest_release_at_ms = self.last_release_at_ms;
        cycle.latest_configuration = self.last_configuration.clone();
        cycle.baseline = self.baseline.clone();
        cycle.duration = started.elapsed();
        cycle
    }
}

/// Applies a cycle to the CBO's metrics and status.
pub fn record(shared: &Shared, key: &str, cycle: &Cycle, now: &str) {
    let Some(m) = shared.metrics.cbo(key) else {
        return;
    };
    let result = cycle.result.unwrap_or(PollResult::Ok);
    m.poll(result, cycle.duration.as_secs_f64());
    if cycle.bad_request {
        m.taskrouter_bad_request();
        if let Some(state) = shared.fleet.get(key) {
            state.record_taskrouter_bad_request(shared.clock.now_ms());
        }
    }
    if let Some(s) = &cycle.statistics {
        // In the order of `metrics::TASK_KINDS` and `metrics::RESERVATION_KINDS`.
        m.set_statistics(
            [
                s.tasks_entered,
                s.tasks_completed,
                s.tasks_canceled,
                s.tasks_timed_out_in_workflow,
            ],
            [
                s.reservations_accepted,
                s.reservations_rejected,
                s.reservations_timed_out,
            ],
            s.error_ratio(),
        );
    }
    if let Some(rt) = &cycle.real_time {
        m.set_tasks_in_workflow(rt.total_tasks);
    }
    if let Some(ok) = cycle.config_ok {
        m.set_config(ok, |id| cycle.problems.iter().any(|p| p.id() == id));
        m.set_config_mismatch(!cycle.mismatch.is_empty());
    }
    if let Some(r) = &cycle.remembered {
        shared.remembered.save(key, r);
    }
    for e in &cycle.errors {
        tracing::warn!(cbo = key, result = e.poll_result().as_str(), error = %e, "TaskRouter poll failed");
    }
    let Some(state) = shared.fleet.get(key) else {
        return;
    };
    // The functions' own transfer timeout, else the configured one (a poll that could not
    // read the variables changes nothing).
    let timeout = if cycle.variables_read {
        cycle
            .transfer_timeout
            .unwrap_or(shared.config().transfers.timeout)
    } else {
        state.transfer_timeout()
    };
    if let Some(was) = state.set_transfer_timeout(timeout, shared.clock.now_ms()) {
        let source = if cycle.transfer_timeout.is_some() {
            crate::sources::poll::TIMEOUT_VAR
        } else {
            "transfers.timeout"
        };
        let detail = format!(
            "transfer timeout {} -> {} ({source}{})",
            humantime::format_duration(was),
            humantime::format_duration(timeout),
            cycle
                .latest_deployment
                .as_deref()
                .map(|d| format!(", deployment {d}"))
                .unwrap_or_default()
        );
        tracing::warn!(cbo = key, detail, "transfer timeout changed");
        let mut e =
            crate::decisions::Entry::new(key, crate::decisions::Kind::Note, shared.clock.now_ms());
        e.detail = Some(detail);
        e.deployment = cycle.latest_deployment.clone();
        shared.actions.record(e);
    }
    let mut st = state.taskrouter();
    let was: Vec<String> = st.problems.iter().map(|p| p.to_string()).collect();
    for p in cycle
        .problems
        .iter()
        .filter(|p| !was.contains(&p.to_string()))
    {
        tracing::warn!(cbo = key, problem = p.id(), message = %p, "workflow configuration corrupted");
    }
    let now_ms = shared.clock.now_ms();
    if result == PollResult::Ok {
        m.set_last_success(now_ms);
    }
    *st = TaskRouterStatus {
        polled: true,
        first_poll_done: true,
        last_poll: Some(now.to_string()),
        last_poll_ms: chrono::DateTime::parse_from_rfc3339(now)
            .ok()
            .map(|t| t.timestamp_millis()),
        last_success: if result == PollResult::Ok {
            Some(now.to_string())
        } else {
            st.last_success.take()
        },
        throttled_until: cycle
            .retry_after
            .map(|d| crate::clock::rfc3339(now_ms + d.as_millis() as i64)),
        last_result: Some(result.as_str()),
        last_error: cycle.errors.first().map(|e| e.to_string()),
        workflow_name: cycle.workflow_name.clone().or(st.workflow_name.take()),
        statistics: cycle.statistics.clone().or(st.statistics.take()),
        real_time: cycle.real_time.clone().or(st.real_time.take()),
        error_ratio: cycle
            .statistics
            .as_ref()
            .map_or(st.error_ratio, |s| s.error_ratio()),
        functions_workflow_sid: cycle.functions_workflow_sid.clone(),
        baseline: cycle.baseline.clone(),
        latest_deployment: cycle.latest_deployment.clone(),
        latest_deployment_at_ms: cycle.latest_deployment_at_ms,
        latest_build: cycle.latest_build.clone(),
        latest_release: cycle.latest_release.clone(),
        latest_configuration: cycle.latest_configuration.clone(),
        latest_release_at_ms: cycle.latest_release_at_ms,
        statistics_at_ms: if cycle.statistics.is_some() {
            Some(shared.clock.now_ms())
        } else {
            st.statistics_at_ms
        },
        problems: cycle.problems.clone(),
        mismatch: if cycle.config_ok.is_some() {
            cycle.mismatch.clone()
        } else {
            std::mem::take(&mut st.mismatch)
        },
        new_problem_polls: cycle.new_problem_polls,
        // The record pollers' own.
        sources: std::mem::take(&mut st.sources),
        transfer_timeout: if cycle.variables_read {
            TransferTimeout {
                seconds: timeout.as_secs(),
                source: if cycle.transfer_timeout.is_some() {
                    TIMEOUT_VAR
                } else {
                    "transfers.timeout"
                },
            }
        } else {
            std::mem::take(&mut st.transfer_timeout)
        },
        config_ok: cycle.config_ok.or(st.config_ok),
    };
    drop(st);
    // A new deployment or plugin release: judged on its own traffic from the instant it took
    // effect (Twilio stamps whole seconds: the end of that second, so nothing earlier counts),
    // in a validation window of its own.
    let seen = [
        (
            cycle.new_deployment,
            &cycle.latest_deployment,
            cycle.latest_deployment_at_ms,
        ),
        (
            cycle.new_release.is_some(),
            &cycle.new_release,
            cycle.latest_release_at_ms,
        ),
    ];
    for (new, deployment, at_ms) in seen {
        if let (true, Some(deployment), Some(at_ms)) = (new, deployment, at_ms) {
            crate::guard::deployed(shared, key, deployment, at_ms + 999);
        }
    }
}

/// Polls one CBO until `stop`: first within a second of start (readiness waits for it), the
/// second after a random half to whole `poll_interval` so CBOs spread out, then every interval
/// ±10 %.
pub async fn run(
    shared: Arc<Shared>,
    mut poller: Poller,
    key: String,
    mut stop: watch::Receiver<bool>,
) {
    let interval = shared.config().twilio.poll_interval;
    let mut wait = interval
        .min(Duration::from_secs(1))
        .mul_f64(fastrand::f64());
    let mut cycles = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
        let now = crate::clock::rfc3339(shared.clock.now_ms());
        let judged_since = shared
            .fleet
            .get(&key)
            .map(|s| s.judged_since())
            .filter(|t| *t != i64::MIN);
        if judged_since != poller.judged_since_ms {
            // A deployment took effect after the last poll (this guard's rollback): what that
            // poll saw belongs to the one before, so problems count again from the next poll.
            // One seen by a poll is not such: that poll's sightings are of it already.
            if judged_since.is_some_and(|j| j > poller.last_cycle_ms) {
                poller.new_problem_polls = 0;
            }
            poller.judged_since_ms = judged_since;
        }
        poller.last_cycle_ms = shared.clock.now_ms();
        let cycle = tokio::select! {
            c = poller.cycle(&now) => c,
            _ = stop.changed() => break,
        };
        record(&shared, &key, &cycle, &now);
        shared.poll_done(&key);
        cycles += 1;
        wait = if cycles == 1 {
            interval.mul_f64(0.5 + 0.5 * fastrand::f64())
        } else {
            interval.mul_f64(0.9 + 0.2 * fastrand::f64())
        };
        if let Some(asked) = cycle.retry_after.filter(|d| *d > wait) {
            tracing::warn!(cbo = %key, wait = %humantime::format_duration(asked), "Twilio throttles this account: next poll after its Retry-After");
            wait = asked;
        }
    }
}
