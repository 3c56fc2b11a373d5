//! A stateful simulated Twilio on loopback: TaskRouter workflows and statistics, Serverless builds/environments/deployments/variables, Flex configuration, plugin configurations and releases; Basic auth, Twilio's error body, injectable faults.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::twilio::taskrouter::SEED_WORKFLOW_CONFIGURATION;

/// What a fault does to a matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status and Twilio error code.
    Status { status: u16, code: i64 },
    /// 429 with `Retry-After: secs`.
    RateLimit { retry_after_secs: u64 },
    /// Hold the answer this long (a hung or slow Twilio).
    Delay(Duration),
    /// Do what was asked, then hold the answer this long: a client that times out has no
    /// answer, though Twilio applied its request.
    ApplyThenDelay(Duration),
    /// Do what was asked, then answer with this error (a 502 from a proxy in front of Twilio).
    ApplyThenStatus { status: u16, code: i64 },
}

#[derive(Debug, Clone)]
struct FaultRule {
    /// Only requests of this method (`None`: any).
    method: Option<String>,
    path_contains: String,
    fault: Fault,
    /// How many more requests it applies to; `None` for all.
    remaining: Option<u32>,
}

/// One request the simulator answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub account: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone)]
struct Workflow {
    friendly_name: String,
    configuration: String,
    created: String,
}

#[derive(Debug, Clone, Copy)]
pub enum TaskEvent {
    Entered,
    Completed,
    Canceled,
    TimedOutInWorkflow,
    ReservationAccepted,
    ReservationRejected,
    ReservationTimedOut,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub sid: String,
    pub build_sid: String,
    pub created: String,
}

#[derive(Debug, Clone)]
struct Variable {
    sid: String,
    key: String,
    value: String,
    created: String,
}

#[derive(Debug, Clone, Default)]
struct Environment {
    unique_name: String,
    created: String,
    deployments: Vec<Deployment>,
    variables: Vec<Variable>,
    /// The variables each build was deployed with (`twilio serverless:deploy` uploads `.env`
    /// with the build), so redeploying an earlier build brings its variables back.
    build_variables: HashMap<String, Vec<Variable>>,
}

#[derive(Debug, Clone, Default)]
struct Service {
    builds: Vec<(String, String)>,
    environments: BTreeMap<String, Environment>,
}

#[derive(Debug, Clone)]
pub struct Release {
    pub sid: String,
    pub configuration_sid: String,
    pub created: String,
}

/// A TaskRouter task created through the API (a test transfer).
#[derive(Debug, Clone)]
struct SimTask {
    workspace: String,
    workflow: String,
    attributes: String,
    status: String,
    reason: Option<String>,
    created_ms: i64,
    /// The queue the workflow routes it to, and from when it is there.
    queue: Option<(String, i64)>,
}

#[derive(Debug, Clone)]
struct Account {
    workflows: BTreeMap<(String, String), Workflow>,
    /// (workspace, queue SID) -> friendly name.
    queues: BTreeMap<(String, String), String>,
    api_tasks: BTreeMap<String, SimTask>,
    /// Whether the workspace routes new tasks (false: they wait in the workflow, unrouted).
    routing: bool,
    /// How long routing a new task takes.
    routing_delay: Duration,
    tasks: HashMap<String, Vec<(i64, TaskEvent)>>,
    services: BTreeMap<String, Service>,
    flex_configuration: Value,
    plugin_configurations: Vec<(String, String, String)>,
    releases: Vec<Release>,
    /// TaskRouter's Event resources, oldest first (SPEC §2b).
    events: Vec<Value>,
    /// The functions' log lines (`serverless.v1.service.environment.log`), oldest first.
    logs: Vec<Value>,
    /// The debugger's alerts (`monitor.v1.alert`), oldest first.
    alerts: Vec<Value>,
    /// The workspace's `EventCallbackUrl`: (where to send, the URL signed).
    callback: Option<(String, String)>,
}

/// The task an event is about.
struct TaskRef<'a> {
    workspace: &'a str,
    workflow: &'a str,
    sid: &'a str,
    /// As TaskRouter keeps them: a JSON string.
    attributes: &'a str,
}

/// Records a TaskRouter event (see `SimTwilio::taskrouter_event`).
fn record_event(
    s: &mut SimState,
    account: &str,
    task: &TaskRef,
    event_type: &str,
    at_ms: i64,
    reason: Option<&str>,
) -> Value {
    let sid = s.sid("EV");
    let (workspace, t) = (task.workspace, task.sid);
    let (resource_type, resource_sid) = if event_type.starts_with("reservation.") {
        ("reservation", s.sid("WR"))
    } else {
        ("task", t.to_string())
    };
    let event = json!({
        "account_sid": account,
        "actor_sid": null,
        "actor_type": null,
        "actor_url": null,
        "description": format!("{event_type} of task {t}"),
        "event_data": {
            "task_sid": t,
            "task_attributes": task.attributes,
            "workflow_sid": task.workflow,
            "workspace_sid": workspace,
            "task_canceled_reason": reason,
            "task_channel_unique_name": "chat",
        },
        "event_date": rfc3339(at_ms),
        "event_date_ms": at_ms,
        "event_type": event_type,
        "resource_sid": resource_sid,
        "resource_type": resource_type,
        "resource_url": format!("{TASKROUTER}/v1/Workspaces/{workspace}/Tasks/{t}"),
        "sid": sid,
        "source": "twilio",
        "source_ip_address": "127.0.0.1",
        "url": format!("{TASKROUTER}/v1/Workspaces/{workspace}/Events/{sid}"),
        "workspace_sid": workspace,
    });
    let token = s.credentials.get(account).map(|(t, _)| t.clone());
    let acc = s.account(account);
    acc.events.push(event.clone());
    if let (Some((send_to, signed)), Some(token)) = (acc.callback.clone(), token) {
        let form = callback_form(&event);
        let signature = crate::twilio::signature::sign(&token, &signed, &form);
        tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .post(send_to)
                .header("x-twilio-signature", signature)
                .form(&form)
                .timeout(Duration::from_secs(15))
                .send()
                .await;
        });
    }
    event
}

/// The form TaskRouter posts to a workspace's `EventCallbackUrl` for `event` (an Event
/// resource as the Events API lists it).
pub fn callback_form(event: &Value) -> Vec<(String, String)> {
    let s = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    };
    let data = &event["event_data"];
    [
        ("Sid", &event["sid"]),
        ("AccountSid", &event["account_sid"]),
        ("WorkspaceSid", &event["workspace_sid"]),
        ("EventType", &event["event_type"]),
        ("EventDescription", &event["description"]),
        ("ResourceType", &event["resource_type"]),
        ("ResourceSid", &event["resource_sid"]),
        ("TaskSid", &data["task_sid"]),
        ("TaskAttributes", &data["task_attributes"]),
        ("WorkflowSid", &data["workflow_sid"]),
        ("TaskCanceledReason", &data["task_canceled_reason"]),
        ("TaskChannelUniqueName", &data["task_channel_unique_name"]),
    ]
    .into_iter()
    .filter_map(|(k, v)| s(v).map(|v| (k.to_string(), v)))
    .chain(std::iter::once((
        "Timestamp".to_string(),
        (event["event_date_ms"].as_i64().unwrap_or(0) / 1000).to_string(),
    )))
    .collect()
}

/// The CloudEvent an Event Streams webhook sink receives for `event`.
pub fn cloud_event(event: &Value) -> Value {
    let ty = event["event_type"].as_str().unwrap_or_default();
    let mut payload = event["event_data"].clone();
    payload["eventtype"] = json!(ty);
    payload["sid"] = event["sid"].clone();
    payload["timestamp"] = event["event_date"].clone();
    json!({
        "specversion": "1.0",
        "type": format!("com.twilio.taskrouter.{ty}"),
        "source": format!("/v1/Workspaces/{}/Events", event["workspace_sid"].as_str().unwrap_or_default()),
        "id": event["sid"],
        "dataschema": "https://events-schemas.twilio.com/TaskRouter.WDSTaskRouterEvent/1",
        "datacontenttype": "application/json",
        "time": event["event_date"],
        "data": {"name": ty, "workspace_sid": event["workspace_sid"], "payload": payload},
    })
}

#[derive(Default)]
struct SimState {
    accounts: BTreeMap<String, Account>,
    /// username -> (password, account).
    credentials: HashMap<String, (String, String)>,
    faults: Vec<FaultRule>,
    seen: Vec<Seen>,
    in_flight: HashMap<String, usize>,
    max_in_flight: HashMap<String, usize>,
    latency: Duration,
    seq: u64,
}

struct Shared {
    state: Mutex<SimState>,
    clock: Clock,
}

/// The running simulator.
pub struct SimTwilio {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimTwilio {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A Twilio error body as Twilio writes it.
fn twilio_error(status: u16, code: i64, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn not_found(path: &str) -> Response {
    twilio_error(
        404,
        20404,
        &format!("The requested resource {path} was not found"),
    )
}

fn meta(url: &str, key: &str) -> Value {
    json!({
        "first_page_url": format!("{url}?PageSize=50&Page=0"),
        "key": key,
        "next_page_url": null,
        "page": 0,
        "page_size": 50,
        "previous_page_url": null,
        "url": format!("{url}?PageSize=50&Page=0"),
    })
}

impl SimState {
    fn sid(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{:032x}", self.seq)
    }

    fn account(&mut self, account: &str) -> &mut Account {
        self.accounts
            .get_mut(account)
            .expect("the account was added")
    }
}

impl SimTwilio {
    /// Starts on `127.0.0.1:0`, with event times from `clock`.
    pub async fn start(clock: Clock) -> SimTwilio {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding loopback");
        let addr = listener.local_addr().expect("bound");
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState::default()),
            clock,
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        SimTwilio { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its clock's now, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    fn now(&self) -> String {
        rfc3339(self.shared.clock.now_ms())
    }

    /// An account with its Auth Token and an empty Flex configuration.
    pub fn add_account(&self, account: &str, auth_token: &str) {
        let created = self.now();
        let mut s = self.state();
        s.credentials
            .insert(account.into(), (auth_token.into(), account.into()));
        s.accounts.insert(
            account.into(),
            Account {
                workflows: BTreeMap::new(),
                queues: BTreeMap::new(),
                api_tasks: BTreeMap::new(),
                routing: true,
                routing_delay: Duration::from_millis(800),
                tasks: HashMap::new(),
                services: BTreeMap::new(),
                flex_configuration: flex_configuration(account, &created),
                plugin_configurations: Vec::new(),
                releases: Vec::new(),
                events: Vec::new(),
                logs: Vec::new(),
                alerts: Vec::new(),
                callback: None,
            },
        );
    }

    /// Records a TaskRouter event of `task` in `workflow` at `at_ms`, as the Events API lists
    /// it, and pushes it to the workspace's `EventCallbackUrl` when one is set. Returns the
    /// Event resource.
    #[allow(clippy::too_many_arguments)]
    pub fn taskrouter_event(
        &self,
        account: &str,
        workspace: &str,
        workflow: &str,
        event_type: &str,
        at_ms: i64,
        task: &str,
        attributes: &Value,
        reason: Option<&str>,
    ) -> Value {
        let task = TaskRef {
            workspace,
            workflow,
            sid: task,
            attributes: &attributes.to_string(),
        };
        record_event(&mut self.state(), account, &task, event_type, at_ms, reason)
    }

    /// Pushes every later TaskRouter event of `account` to `send_to` (the workspace's
    /// `EventCallbackUrl`), signed over `signed_url`, the URL Twilio would have called.
    pub fn set_event_callback(&self, account: &str, send_to: &str, signed_url: &str) {
        self.state().account(account).callback = Some((send_to.into(), signed_url.into()));
    }

    /// Every TaskRouter event recorded for `account`, oldest first.
    pub fn events(&self, account: &str) -> Vec<Value> {
        self.state().account(account).events.clone()
    }

    /// A line of the functions' logs of `service`/`environment`.
    pub fn function_log(
        &self,
        account: &str,
        service: &str,
        environment: &str,
        level: &str,
        message: &str,
        at_ms: i64,
    ) {
        let mut s = self.state();
        let sid = s.sid("NO");
        let function = s.sid("ZH");
        let log = json!({
            "sid": sid,
            "account_sid": account,
            "service_sid": service,
            "environment_sid": environment,
            "build_sid": null,
            "deployment_sid": null,
            "function_sid": function,
            "request_sid": null,
            "level": level,
            "message": message,
            "date_created": rfc3339(at_ms),
            "url": format!("{SERVERLESS}/v1/Services/{service}/Environments/{environment}/Logs/{sid}"),
        });
        s.account(account).logs.push(log);
    }

    /// An alert in the debugger.
    pub fn debugger_alert(
        &self,
        account: &str,
        level: &str,
        code: &str,
        text: &str,
        request_url: &str,
        at_ms: i64,
    ) {
        let mut s = self.state();
        let sid = s.sid("NO");
        let alert = json!({
            "account_sid": account,
            "alert_text": text,
            "api_version": "2010-04-01",
            "date_created": rfc3339(at_ms),
            "date_generated": rfc3339(at_ms),
            "date_updated": rfc3339(at_ms),
            "error_code": code,
            "log_level": level,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "request_method": "POST",
            "request_url": request_url,
            "resource_sid": null,
            "service_sid": null,
            "sid": sid,
            "url": format!("{MONITOR}/v1/Alerts/{sid}"),
        });
        s.account(account).alerts.push(alert);
    }

    pub fn add_api_key(&self, account: &str, key_sid: &str, secret: &str) {
        self.state()
            .credentials
            .insert(key_sid.into(), (secret.into(), account.into()));
    }

    /// A workflow with the seed's configuration (both transfer routes).
    pub fn add_workflow(&self, account: &str, workspace: &str, workflow: &str) {
        self.set_workflow(account, workspace, workflow, SEED_WORKFLOW_CONFIGURATION);
    }

    pub fn set_workflow(
        &self,
        account: &str,
        workspace: &str,
        workflow: &str,
        configuration: &str,
    ) {
        let created = self.now();
        self.state().account(account).workflows.insert(
            (workspace.into(), workflow.into()),
            Workflow {
                friendly_name: "Chat Transfer".into(),
                configuration: configuration.into(),
                created,
            },
        );
    }

    /// A TaskQueue named `name` (a test transfer's target).
    pub fn add_queue(&self, account: &str, workspace: &str, queue: &str, name: &str) {
        self.state()
            .account(account)
            .queues
            .insert((workspace.into(), queue.into()), name.into());
    }

    /// Whether the account's workspaces route new tasks (a TaskRouter that stopped routing).
    pub fn set_routing(&self, account: &str, routing: bool) {
        self.state().account(account).routing = routing;
    }

    /// How long routing a new task takes.
    pub fn set_routing_delay(&self, account: &str, delay: Duration) {
        self.state().account(account).routing_delay = delay;
    }

    /// Tasks created through the API that still exist: (SID, assignment status, attributes).
    pub fn api_tasks(&self, account: &str) -> Vec<(String, String, String)> {
        self.state()
            .account(account)
            .api_tasks
            .iter()
            .map(|(sid, t)| (sid.clone(), t.status.clone(), t.attributes.clone()))
            .collect()
    }

    pub fn remove_workflow(&self, account: &str, workspace: &str, workflow: &str) {
        self.state()
            .account(account)
            .workflows
            .remove(&(workspace.to_string(), workflow.to_string()));
    }

    /// Records TaskRouter task activity on a workflow now (what its statistics report).
    pub fn record_tasks(&self, account: &str, workflow: &str, event: TaskEvent, count: usize) {
        let now = self.shared.clock.now_ms();
        let mut s = self.state();
        let tasks = s.account(account).tasks.entry(workflow.into()).or_default();
        tasks.extend(std::iter::repeat_n((now, event), count));
        // Keep a day at most.
        tasks.retain(|(t, _)| now - t < 24 * 3600 * 1000);
    }

    /// A service with one environment, one build deployed, and the workflow variable set.
    pub fn add_service(&self, account: &str, service: &str, environment: &str, workflow_sid: &str) {
        let created = self.now();
        let mut s = self.state();
        let build = s.sid("ZB");
        let deployment = s.sid("ZD");
        let variable = s.sid("ZV");
        let svc = s
            .account(account)
            .services
            .entry(service.into())
            .or_default();
        svc.builds.push((build.clone(), created.clone()));
        let variables = vec![Variable {
            sid: variable,
            key: crate::config::WORKFLOW_SID_VAR.into(),
            value: workflow_sid.into(),
            created: created.clone(),
        }];
        svc.environments.insert(
            environment.into(),
            Environment {
                unique_name: "production".into(),
                created: created.clone(),
                deployments: vec![Deployment {
                    sid: deployment,
                    build_sid: build.clone(),
                    created,
                }],
                build_variables: HashMap::from([(build, variables.clone())]),
                variables,
            },
        );
    }

    /// Sets (or with `None` removes) an environment variable.
    pub fn set_variable(
        &self,
        account: &str,
        service: &str,
        environment: &str,
        key: &str,
        value: Option<&str>,
    ) {
        let created = self.now();
        let mut s = self.state();
        let sid = s.sid("ZV");
        let env = s
            .account(account)
            .services
            .get_mut(service)
            .and_then(|svc| svc.environments.get_mut(environment))
            .expect("the environment was added");
        env.variables.retain(|v| v.key != key);
        if let Some(value) = value {
            env.variables.push(Variable {
                sid,
                key: key.into(),
                value: value.into(),
                created,
            });
        }
    }

    /// A new build deployed to the environment, as `twilio serverless:deploy` does. With
    /// `workflow_sid`, the deploy also resets the workflow variable (the seed's "SIDs may be
    /// reset during deployments"). Returns the new deployment.
    pub fn deploy(
        &self,
        account: &str,
        service: &str,
        environment: &str,
        workflow_sid: Option<&str>,
    ) -> Deployment {
        let created = self.now();
        let deployment = {
            let mut s = self.state();
            let build = s.sid("ZB");
            let sid = s.sid("ZD");
            let svc = s
                .account(account)
                .services
                .get_mut(service)
                .expect("the service was added");
            svc.builds.push((build.clone(), created.clone()));
            let env = svc
                .environments
                .get_mut(environment)
                .expect("the environment was added");
            let d = Deployment {
                sid,
                build_sid: build,
                created,
            };
            env.deployments.push(d.clone());
            d
        };
        if let Some(sid) = workflow_sid {
            self.set_variable(
                account,
                service,
                environment,
                crate::config::WORKFLOW_SID_VAR,
                Some(sid),
            );
        }
        let mut s = self.state();
        let env = s
            .account(account)
            .services
            .get_mut(service)
            .and_then(|svc| svc.environments.get_mut(environment))
            .expect("the environment was added");
        let vars = env.variables.clone();
        env.build_variables
            .insert(deployment.build_sid.clone(), vars);
        deployment
    }

    /// Moves everything the account has deployed or released so far `by` into the past, so a
    /// history can be laid out before a test starts (the build that ran for hours, then the
    /// one deployed just now).
    pub fn age_history(&self, account: &str, by: Duration) {
        let shift = |t: &mut String| {
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(t) {
                *t = rfc3339(at.timestamp_millis() - by.as_millis() as i64);
            }
        };
        let mut s = self.state();
        let acc = s.account(account);
        for svc in acc.services.values_mut() {
            for (_, created) in &mut svc.builds {
                shift(created);
            }
            for env in svc.environments.values_mut() {
                shift(&mut env.created);
                for d in &mut env.deployments {
                    shift(&mut d.created);
                }
            }
        }
        for (_, _, created) in &mut acc.plugin_configurations {
            shift(created);
        }
        for r in &mut acc.releases {
            shift(&mut r.created);
        }
    }

    pub fn deployments(&self, account: &str, service: &str, environment: &str) -> Vec<Deployment> {
        let mut s = self.state();
        s.account(account).services[service].environments[environment]
            .deployments
            .clone()
    }

    /// The value of an environment variable now.
    pub fn variable(
        &self,
        account: &str,
        service: &str,
        environment: &str,
        key: &str,
    ) -> Option<String> {
        let mut s = self.state();
        s.account(account)
            .services
            .get(service)?
            .environments
            .get(environment)?
            .variables
            .iter()
            .find(|v| v.key == key)
            .map(|v| v.value.clone())
    }

    pub fn flex_configuration(&self, account: &str) -> Value {
        self.state().account(account).flex_configuration.clone()
    }

    /// A plugin configuration named `name`, released now; returns the configuration's SID.
    pub fn release_plugin_configuration(&self, account: &str, name: &str) -> String {
        let created = self.now();
        let mut s = self.state();
        let config = s.sid("FJ");
        let release = s.sid("FK");
        let acc = s.account(account);
        acc.plugin_configurations
            .push((config.clone(), name.into(), created.clone()));
        acc.releases.push(Release {
            sid: release,
            configuration_sid: config.clone(),
            created,
        });
        config
    }

    pub fn releases(&self, account: &str) -> Vec<Release> {
        self.state().account(account).releases.clone()
    }

    /// Applies `fault` to the next `times` requests whose path contains `path_contains`
    /// (`None`: until cleared).
    pub fn inject(&self, path_contains: &str, fault: Fault, times: Option<u32>) {
        self.state().faults.push(FaultRule {
            method: None,
            path_contains: path_contains.into(),
            fault,
            remaining: times,
        });
    }

    /// As `inject`, for requests of `method` only (`POST` for the writes).
    pub fn inject_on(&self, method: &str, path_contains: &str, fault: Fault, times: Option<u32>) {
        self.state().faults.push(FaultRule {
            method: Some(method.to_string()),
            path_contains: path_contains.into(),
            fault,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Every answer takes at least this long (to make concurrency visible).
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// The most requests one account had in flight at once.
    pub fn max_in_flight(&self, account: &str) -> usize {
        self.state()
            .max_in_flight
            .get(account)
            .copied()
            .unwrap_or(0)
    }
}

fn flex_configuration(account: &str, created: &str) -> Value {
    json!({
        "account_sid": account,
        "date_created": created,
        "date_updated": created,
        "attributes": {},
        "status": "ok",
        "taskrouter_workspace_sid": null,
        "ui_language": "en",
        "ui_attributes": {
            "colorTheme": {"baseName": "GreyDark"},
            "custom_data": {
                "features": {
                    "conversation_transfer": {
                        "enabled": true,
                        "cold_transfer": true,
                        "multi_participant": true
                    },
                    "callback_and_voicemail": {"enabled": true}
                }
            }
        },
        "ui_dependencies": {},
        "ui_version": "2.9.0",
        "service_version": "1.0",
        "plugin_service_enabled": true,
        "serverless_service_sids": [],
        "url": "https://flex-api.twilio.com/v1/Configuration"
    })
}

/// Decodes `Authorization: Basic` into the account it authenticates, if the password matches.
fn authenticate(state: &SimState, headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let (expected, account) = state.credentials.get(user)?;
    (expected == password).then(|| account.clone())
}

fn form(body: &Bytes) -> HashMap<String, String> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let (account, fault, latency) = {
        let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let account = authenticate(&s, &headers);
        let mut fault = None;
        for rule in s.faults.iter_mut() {
            if path.contains(&rule.path_contains)
                && rule.remaining != Some(0)
                && rule.method.as_deref().is_none_or(|m| m == method.as_str())
            {
                if let Some(n) = rule.remaining.as_mut() {
                    *n -= 1;
                }
                fault = Some(rule.fault.clone());
                break;
            }
        }
        if let Some(a) = &account {
            let n = s.in_flight.entry(a.clone()).or_default();
            *n += 1;
            let n = *n;
            let max = s.max_in_flight.entry(a.clone()).or_default();
            *max = (*max).max(n);
        }
        (account, fault, s.latency)
    };
    let arrived = Instant::now();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = match (&account, fault) {
        (None, _) => twilio_error(401, 20003, "Authenticate"),
        (Some(_), Some(Fault::Status { status, code })) => {
            let message = match status {
                400 => "Bad Request".to_string(),
                404 => format!("The requested resource {path} was not found"),
                _ => "Internal Server Error".to_string(),
            };
            twilio_error(status, code, &message)
        }
        (Some(_), Some(Fault::RateLimit { retry_after_secs })) => {
            let mut r = twilio_error(429, 20429, "Too Many Requests");
            r.headers_mut().insert(
                "retry-after",
                retry_after_secs.to_string().parse().expect("digits"),
            );
            r
        }
        (Some(account), fault) => {
            if let Some(Fault::Delay(d)) = fault {
                tokio::time::sleep(d).await;
            }
            let applied = {
                let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                let now_ms = shared.clock.now_ms();
                route(&mut s, account, &method, &path, &uri, &body, now_ms)
            };
            match fault {
                Some(Fault::ApplyThenDelay(d)) => {
                    tokio::time::sleep(d).await;
                    applied
                }
                Some(Fault::ApplyThenStatus { status, code }) => {
                    twilio_error(status, code, "Bad Gateway")
                }
                _ => applied,
            }
        }
    };
    let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = &account
        && let Some(n) = s.in_flight.get_mut(a)
    {
        *n -= 1;
    }
    s.seen.push(Seen {
        at: arrived,
        method: method.to_string(),
        path,
        account,
        status: response.status().as_u16(),
    });
    response
}

/// The queue a workflow's filters route `attributes` to: the first filter whose expression
/// holds, its first target's queue (`{{task.x}}` filled in), looked up by name or SID.
fn route_task(acc: &Account, ws: &str, configuration: &str, attributes: &Value) -> Option<String> {
    use crate::twilio::expression::{Truth, eval, known, parse};
    let doc: Value = serde_json::from_str(configuration).ok()?;
    let known = known(attributes);
    for filter in doc.pointer("/task_routing/filters")?.as_array()? {
        let expression = filter["expression"].as_str().unwrap_or("");
        let Ok(e) = parse(expression) else { continue };
        if eval(&e, &known) != Truth::True {
            continue;
        }
        let target = filter["targets"].get(0)?["queue"].as_str()?;
        let target = match target
            .strip_prefix("{{task.")
            .and_then(|t| t.strip_suffix("}}"))
        {
            Some(attr) => attributes[attr].as_str()?.to_string(),
            None => target.to_string(),
        };
        return acc
            .queues
            .iter()
            .find(|((w, sid), name)| w == ws && (**name == target || *sid == target))
            .map(|((_, sid), _)| sid.clone());
    }
    None
}

fn task_json(account: &str, sid: &str, t: &SimTask, acc: &Account, now_ms: i64) -> Value {
    let url = format!("{TASKROUTER}/v1/Workspaces/{}/Tasks/{sid}", t.workspace);
    let queue = t.queue.as_ref().filter(|(_, at)| *at <= now_ms);
    json!({
        "account_sid": account, "age": (now_ms - t.created_ms) / 1000,
        "assignment_status": t.status, "attributes": t.attributes, "addons": "{}",
        "date_created": rfc3339(t.created_ms), "date_updated": rfc3339(now_ms),
        "task_queue_entered_date": queue.map(|(_, at)| rfc3339(*at)),
        "priority": 0, "reason": t.reason, "sid": sid,
        "task_queue_sid": queue.map(|(q, _)| q.clone()),
        "task_queue_friendly_name": queue.and_then(|(q, _)| acc.queues.get(&(t.workspace.clone(), q.clone())).cloned()),
        "task_channel_sid": "TC00000000000000000000000000000001", "task_channel_unique_name": "chat",
        "timeout": 86400, "workflow_sid": t.workflow, "workflow_friendly_name": "Chat Transfer",
        "workspace_sid": t.workspace, "url": url,
        "links": {"reservations": format!("{url}/Reservations"), "workspace": format!("{TASKROUTER}/v1/Workspaces/{}", t.workspace)},
        "virtual_start_time": rfc3339(t.created_ms), "ignore_capacity": false, "routing_target": null,
    })
}

/// TaskRouter's Tasks API: create (routed by the workflow's filters), fetch, update
/// (cancel), delete, list with `EvaluateTaskAttributes`.
#[allow(clippy::too_many_arguments)]
fn tasks_api(
    s: &mut SimState,
    account: &str,
    method: &str,
    ws: &str,
    rest: &[&str],
    uri: &Uri,
    body: &Bytes,
    now_ms: i64,
) -> Response {
    let path = uri.path();
    let f = form(body);
    // Only a create takes a SID.
    let sid_for_new = if (method, rest) == ("POST", &[][..]) {
        s.sid("WT")
    } else {
        String::new()
    };
    let acc = s.account(account);
    match (method, rest) {
        ("POST", []) => {
            let workflow = f.get("WorkflowSid").cloned().unwrap_or_default();
            let Some(wf) = acc.workflows.get(&(ws.to_string(), workflow.clone())) else {
                return twilio_error(
                    400,
                    20001,
                    "Bad Request: WorkflowSid is not a workflow of this workspace",
                );
            };
            let raw = f.get("Attributes").cloned().unwrap_or_else(|| "{}".into());
            let Ok(attributes) = serde_json::from_str::<Value>(&raw) else {
                return twilio_error(400, 20001, "Bad Request: Attributes is not JSON");
            };
            let queue = if acc.routing {
                route_task(acc, ws, &wf.configuration, &attributes)
                    .map(|q| (q, now_ms + acc.routing_delay.as_millis() as i64))
            } else {
                None
            };
            let task = SimTask {
                workspace: ws.to_string(),
                workflow,
                attributes: raw,
                status: "pending".into(),
                reason: None,
                created_ms: now_ms,
                queue,
            };
            let body = task_json(account, &sid_for_new, &task, acc, now_ms);
            acc.api_tasks.insert(sid_for_new.clone(), task.clone());
            let task_ref = TaskRef {
                workspace: ws,
                workflow: &task.workflow,
                sid: &sid_for_new,
                attributes: &task.attributes,
            };
            record_event(s, account, &task_ref, "task.created", now_ms, None);
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        ("GET", []) => {
            let filter = uri
                .query()
                .and_then(|q| serde_urlencoded::from_str::<HashMap<String, String>>(q).ok())
                .and_then(|q| q.get("EvaluateTaskAttributes").cloned());
            let expression = filter.as_deref().map(crate::twilio::expression::parse);
            let list: Vec<Value> = acc
                .api_tasks
                .iter()
                .filter(|(_, t)| t.workspace == ws)
                .filter(|(_, t)| match &expression {
                    Some(Ok(e)) => {
                        let attrs: Value =
                            serde_json::from_str(&t.attributes).unwrap_or(Value::Null);
                        let known = crate::twilio::expression::known(&attrs);
                        crate::twilio::expression::eval(e, &known)
                            == crate::twilio::expression::Truth::True
                    }
                    _ => true,
                })
                .map(|(sid, t)| task_json(account, sid, t, acc, now_ms))
                .collect();
            let url = format!("{TASKROUTER}/v1/Workspaces/{ws}/Tasks");
            axum::Json(json!({ "tasks": list, "meta": meta(&url, "tasks") })).into_response()
        }
        (_, [sid]) => {
            let Some(t) = acc.api_tasks.get(*sid).cloned() else {
                return not_found(path);
            };
            match method {
                "GET" => axum::Json(task_json(account, sid, &t, acc, now_ms)).into_response(),
                "POST" => {
                    let t = acc.api_tasks.get_mut(*sid).expect("looked up above");
                    if let Some(status) = f.get("AssignmentStatus") {
                        t.status = status.clone();
                        t.queue = None;
                    }
                    if let Some(reason) = f.get("Reason") {
                        t.reason = Some(reason.clone());
                    }
                    let t = t.clone();
                    let body = task_json(account, sid, &t, acc, now_ms);
                    if t.status == "canceled" {
                        let task_ref = TaskRef {
                            workspace: ws,
                            workflow: &t.workflow,
                            sid,
                            attributes: &t.attributes,
                        };
                        let reason = t.reason.as_deref();
                        record_event(s, account, &task_ref, "task.canceled", now_ms, reason);
                    }
                    axum::Json(body).into_response()
                }
                "DELETE" => {
                    acc.api_tasks.remove(*sid);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => not_found(path),
            }
        }
        _ => not_found(path),
    }
}

fn query_minutes(uri: &Uri) -> i64 {
    uri.query()
        .and_then(|q| serde_urlencoded::from_str::<HashMap<String, String>>(q).ok())
        .and_then(|q| q.get("Minutes").and_then(|m| m.parse().ok()))
        .unwrap_or(15)
}

fn query_start(uri: &Uri) -> Option<i64> {
    let q = serde_urlencoded::from_str::<HashMap<String, String>>(uri.query()?).ok()?;
    chrono::DateTime::parse_from_rfc3339(q.get("StartDate")?)
        .ok()
        .map(|t| t.timestamp_millis())
}

const TASKROUTER: &str = "https://taskrouter.twilio.com";
const SERVERLESS: &str = "https://serverless.twilio.com";
const FLEX: &str = "https://flex-api.twilio.com";
const MONITOR: &str = "https://monitor.twilio.com";

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let q = serde_urlencoded::from_str::<HashMap<String, String>>(uri.query()?).ok()?;
    q.get(name).cloned()
}

/// One page of a list resource, newest first as Twilio lists them, with `meta` and a
/// `next_page_url` (on Twilio's host) while more remain.
fn paged(uri: &Uri, url: &str, key: &str, mut items: Vec<Value>) -> Response {
    items.reverse();
    let size: usize = query_param(uri, "PageSize")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let page: usize = query_param(uri, "Page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let mut query: Vec<(String, String)> = uri
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    query.retain(|(k, _)| k != "Page" && k != "PageSize" && k != "PageToken");
    let link = |n: usize| {
        let mut q = query.clone();
        q.push(("PageSize".into(), size.to_string()));
        q.push(("Page".into(), n.to_string()));
        format!(
            "{url}?{}",
            serde_urlencoded::to_string(&q).expect("strings encode")
        )
    };
    let more = items.len() > (page + 1) * size;
    let list: Vec<Value> = items.into_iter().skip(page * size).take(size).collect();
    axum::Json(json!({
        key: list,
        "meta": {
            "first_page_url": link(0),
            "key": key,
            "next_page_url": if more { Value::String(link(page + 1)) } else { Value::Null },
            "page": page,
            "page_size": size,
            "previous_page_url": if page > 0 { Value::String(link(page - 1)) } else { Value::Null },
            "url": link(page),
        }
    }))
    .into_response()
}

/// When a listed item happened, from its date field.
fn item_ms(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .or_else(|| {
            v[field]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_millis())
        })
        .unwrap_or(i64::MIN)
}

fn route(
    s: &mut SimState,
    account: &str,
    method: &Method,
    path: &str,
    uri: &Uri,
    body: &Bytes,
    now_ms: i64,
) -> Response {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let now = rfc3339(now_ms);
    let json = |v: Value| axum::Json(v).into_response();
    let created = |v: Value| (StatusCode::CREATED, axum::Json(v)).into_response();
    match (method.as_str(), seg.as_slice()) {
        ("GET", ["v1", "Workspaces", ws, "Events"]) => {
            let since = query_start(uri).unwrap_or(now_ms - query_minutes(uri) * 60_000);
            let workflow = query_param(uri, "WorkflowSid");
            let items = s
                .account(account)
                .events
                .iter()
                .filter(|e| e["workspace_sid"] == *ws && item_ms(e, "event_date_ms") >= since)
                .filter(|e| {
                    workflow
                        .as_deref()
                        .is_none_or(|w| e["event_data"]["workflow_sid"] == w)
                })
                .cloned()
                .collect();
            paged(
                uri,
                &format!("{TASKROUTER}/v1/Workspaces/{ws}/Events"),
                "events",
                items,
            )
        }
        ("GET", ["v1", "Services", zs, "Environments", ze, "Logs"]) => {
            let since = query_start(uri).unwrap_or(i64::MIN);
            let items = s
                .account(account)
                .logs
                .iter()
                .filter(|l| l["service_sid"] == *zs && l["environment_sid"] == *ze)
                .filter(|l| item_ms(l, "date_created") >= since)
                .cloned()
                .collect();
            let url = format!("{SERVERLESS}/v1/Services/{zs}/Environments/{ze}/Logs");
            paged(uri, &url, "logs", items)
        }
        ("GET", ["v1", "Alerts"]) => {
            let since = query_start(uri).unwrap_or(i64::MIN);
            let level = query_param(uri, "LogLevel");
            let items = s
                .account(account)
                .alerts
                .iter()
                .filter(|a| item_ms(a, "date_generated") >= since)
                .filter(|a| level.as_deref().is_none_or(|l| a["log_level"] == l))
                .cloned()
                .collect();
            paged(uri, &format!("{MONITOR}/v1/Alerts"), "alerts", items)
        }
        (_, ["v1", "Workspaces", ws, "Tasks", rest @ ..]) => {
            tasks_api(s, account, method.as_str(), ws, rest, uri, body, now_ms)
        }
        ("GET", ["v1", "Workspaces", ws, "TaskQueues", wq]) => {
            let acc = s.account(account);
            let Some(name) = acc.queues.get(&(ws.to_string(), wq.to_string())) else {
                return not_found(path);
            };
            let url = format!("{TASKROUTER}/v1/Workspaces/{ws}/TaskQueues/{wq}");
            json(json!({
                "account_sid": account, "assignment_activity_sid": null, "assignment_activity_name": null,
                "date_created": now, "date_updated": now, "friendly_name": name,
                "max_reserved_workers": 1, "reservation_activity_sid": null, "reservation_activity_name": null,
                "sid": wq, "target_workers": "1==1", "task_order": "FIFO", "url": url, "workspace_sid": ws,
                "links": {"statistics": format!("{url}/Statistics")},
            }))
        }
        ("GET", ["v1", "Workspaces", ws, "Workflows", ww, rest @ ..]) => {
            let acc = s.account(account);
            let Some(wf) = acc.workflows.get(&(ws.to_string(), ww.to_string())) else {
                return not_found(path);
            };
            let url = format!("{TASKROUTER}/v1/Workspaces/{ws}/Workflows/{ww}");
            match rest {
                [] => json(json!({
                    "account_sid": account,
                    "assignment_callback_url": null,
                    "configuration": wf.configuration,
                    "date_created": wf.created,
                    "date_updated": wf.created,
                    "document_content_type": "application/json",
                    "fallback_assignment_callback_url": null,
                    "friendly_name": wf.friendly_name,
                    "sid": ww,
                    "task_reservation_timeout": 120,
                    "workspace_sid": ws,
                    "url": url,
                    "links": {
                        "statistics": format!("{url}/Statistics"),
                        "real_time_statistics": format!("{url}/RealTimeStatistics"),
                        "cumulative_statistics": format!("{url}/CumulativeStatistics"),
                    },
                })),
                ["CumulativeStatistics"] => {
                    // StartDate when given, else the trailing Minutes (15 by default).
                    let since = query_start(uri).unwrap_or(now_ms - query_minutes(uri) * 60_000);
                    let mut c = HashMap::new();
                    for (t, e) in acc.tasks.get(*ww).into_iter().flatten() {
                        if *t >= since {
                            *c.entry(format!("{e:?}")).or_insert(0i64) += 1;
                        }
                    }
                    let n = |k: &str| c.get(k).copied().unwrap_or(0);
                    let wait = json!({"avg": 0, "min": 0, "max": 0, "total": 0});
                    json(json!({
                        "account_sid": account,
                        "avg_task_acceptance_time": 0,
                        "start_time": rfc3339(since),
                        "end_time": now,
                        "reservations_created": n("ReservationAccepted") + n("ReservationRejected") + n("ReservationTimedOut"),
                        "reservations_accepted": n("ReservationAccepted"),
                        "reservations_rejected": n("ReservationRejected"),
                        "reservations_timed_out": n("ReservationTimedOut"),
                        "reservations_canceled": 0,
                        "reservations_rescinded": 0,
                        "split_by_wait_time": null,
                        "wait_duration_until_accepted": wait,
                        "wait_duration_until_canceled": wait,
                        "tasks_canceled": n("Canceled"),
                        "tasks_completed": n("Completed"),
                        "tasks_entered": n("Entered"),
                        "tasks_deleted": 0,
                        "tasks_moved": 0,
                        "tasks_timed_out_in_workflow": n("TimedOutInWorkflow"),
                        "workflow_sid": ww,
                        "workspace_sid": ws,
                        "url": format!("{url}/CumulativeStatistics"),
                    }))
                }
                ["RealTimeStatistics"] => {
                    let tasks = acc.tasks.get(*ww).map_or(0, |t| {
                        let entered = t
                            .iter()
                            .filter(|(_, e)| matches!(e, TaskEvent::Entered))
                            .count() as i64;
                        let ended = t
                            .iter()
                            .filter(|(_, e)| {
                                matches!(
                                    e,
                                    TaskEvent::Completed
                                        | TaskEvent::Canceled
                                        | TaskEvent::TimedOutInWorkflow
                                )
                            })
                            .count() as i64;
                        (entered - ended).max(0)
                    });
                    json(json!({
                        "account_sid": account,
                        "longest_task_waiting_age": 0,
                        "longest_task_waiting_sid": null,
                        "tasks_by_priority": {},
                        "tasks_by_status": {"pending": tasks, "reserved": 0, "assigned": 0, "wrapping": 0},
                        "total_tasks": tasks,
                        "workflow_sid": ww,
                        "workspace_sid": ws,
                        "url": format!("{url}/RealTimeStatistics"),
                    }))
                }
                _ => not_found(path),
            }
        }
        ("GET", ["v1", "Services", zs, "Builds"]) => {
            let Some(svc) = s.account(account).services.get(*zs) else {
                return not_found(path);
            };
            let url = format!("{SERVERLESS}/v1/Services/{zs}/Builds");
            let builds: Vec<Value> = svc
                .builds
                .iter()
                .rev()
                .map(|(sid, created)| {
                    json!({
                        "sid": sid, "account_sid": account, "service_sid": zs,
                        "status": "completed", "asset_versions": [], "function_versions": [],
                        "dependencies": [], "runtime": "node18",
                        "date_created": created, "date_updated": created,
                        "url": format!("{url}/{sid}"),
                        "links": {"build_status": format!("{url}/{sid}/Status")},
                    })
                })
                .collect();
            json(json!({"builds": builds, "meta": meta(&url, "builds")}))
        }
        ("GET", ["v1", "Services", zs, "Environments", rest @ ..]) if rest.len() <= 1 => {
            let Some(svc) = s.account(account).services.get(*zs) else {
                return not_found(path);
            };
            let url = format!("{SERVERLESS}/v1/Services/{zs}/Environments");
            let env_json = |ze: &str, e: &Environment| {
                json!({
                    "sid": ze, "account_sid": account, "service_sid": zs,
                    "build_sid": e.deployments.last().map(|d| d.build_sid.clone()),
                    "unique_name": e.unique_name,
                    "domain_suffix": null,
                    "domain_name": format!("{}-1234.twil.io", e.unique_name),
                    "date_created": e.created, "date_updated": e.created,
                    "url": format!("{url}/{ze}"),
                    "links": {
                        "variables": format!("{url}/{ze}/Variables"),
                        "deployments": format!("{url}/{ze}/Deployments"),
                        "logs": format!("{url}/{ze}/Logs"),
                    },
                })
            };
            match rest {
                [] => {
                    let envs: Vec<Value> = svc
                        .environments
                        .iter()
                        .map(|(ze, e)| env_json(ze, e))
                        .collect();
                    json(json!({"environments": envs, "meta": meta(&url, "environments")}))
                }
                [ze] => match svc.environments.get(*ze) {
                    Some(e) => json(env_json(ze, e)),
                    None => not_found(path),
                },
                _ => not_found(path),
            }
        }
        (m, ["v1", "Services", zs, "Environments", ze, kind]) => {
            let new_sid = s.sid(if *kind == "Deployments" { "ZD" } else { "ZV" });
            let acc = s.account(account);
            let Some(svc) = acc.services.get_mut(*zs) else {
                return not_found(path);
            };
            let builds: Vec<String> = svc.builds.iter().map(|(b, _)| b.clone()).collect();
            let Some(env) = svc.environments.get_mut(*ze) else {
                return not_found(path);
            };
            let url = format!("{SERVERLESS}/v1/Services/{zs}/Environments/{ze}/{kind}");
            let deployment_json = |d: &Deployment| {
                json!({
                    "sid": d.sid, "account_sid": account, "service_sid": zs, "environment_sid": ze,
                    "build_sid": d.build_sid, "date_created": d.created, "date_updated": d.created,
                    "url": format!("{url}/{}", d.sid),
                })
            };
            match (m, *kind) {
                ("GET", "Deployments") => {
                    let list: Vec<Value> =
                        env.deployments.iter().rev().map(deployment_json).collect();
                    json(json!({"deployments": list, "meta": meta(&url, "deployments")}))
                }
                ("POST", "Deployments") => {
                    let f = form(body);
                    let Some(build) = f.get("BuildSid").filter(|b| builds.contains(b)) else {
                        return twilio_error(400, 20001, "Invalid BuildSid");
                    };
                    let d = Deployment {
                        sid: new_sid,
                        build_sid: build.clone(),
                        created: now,
                    };
                    env.deployments.push(d.clone());
                    if let Some(vars) = env.build_variables.get(build) {
                        env.variables = vars.clone();
                    }
                    created(deployment_json(&d))
                }
                ("GET", "Variables") => {
                    let list: Vec<Value> = env
                        .variables
                        .iter()
                        .map(|v| {
                            json!({
                                "sid": v.sid, "account_sid": account, "service_sid": zs, "environment_sid": ze,
                                "key": v.key, "value": v.value,
                                "date_created": v.created, "date_updated": v.created,
                                "url": format!("{url}/{}", v.sid),
                            })
                        })
                        .collect();
                    json(json!({"variables": list, "meta": meta(&url, "variables")}))
                }
                _ => not_found(path),
            }
        }
        ("GET", ["v1", "Configuration"]) => json(s.account(account).flex_configuration.clone()),
        ("POST", ["v1", "Configuration"]) => {
            let Ok(update) = serde_json::from_slice::<Value>(body) else {
                return twilio_error(400, 20001, "Invalid JSON body");
            };
            let Some(fields) = update.as_object() else {
                return twilio_error(400, 20001, "Body must be a JSON object");
            };
            if fields.get("account_sid").and_then(|a| a.as_str()) != Some(account) {
                return twilio_error(400, 20001, "account_sid is required and must match");
            }
            let config = &mut s.account(account).flex_configuration;
            for (k, v) in fields {
                if k != "account_sid" {
                    config[k] = v.clone();
                }
            }
            config["date_updated"] = json!(now);
            json(config.clone())
        }
        (m, ["v1", "PluginService", kind]) => {
            let url = format!("{FLEX}/v1/PluginService/{kind}");
            let new_sid = s.sid(if *kind == "Releases" { "FK" } else { "FJ" });
            let acc = s.account(account);
            let config_json = |(sid, name, created): &(String, String, String)| {
                json!({
                    "sid": sid, "account_sid": account, "name": name, "description": null,
                    "archived": false, "date_created": created, "url": format!("{url}/{sid}"),
                    "links": {"plugins": format!("{url}/{sid}/Plugins")},
                })
            };
            let release_json = |r: &Release| {
                json!({
                    "sid": r.sid, "account_sid": account, "configuration_sid": r.configuration_sid,
                    "date_created": r.created, "url": format!("{url}/{}", r.sid),
                })
            };
            match (m, *kind) {
                ("GET", "Configurations") => {
                    let list: Vec<Value> = acc
                        .plugin_configurations
                        .iter()
                        .rev()
                        .map(config_json)
                        .collect();
                    json(json!({"configurations": list, "meta": meta(&url, "configurations")}))
                }
                ("POST", "Configurations") => {
                    let f = form(body);
                    let Some(name) = f.get("Name") else {
                        return twilio_error(400, 20001, "Missing required parameter Name");
                    };
                    let c = (new_sid, name.clone(), now);
                    acc.plugin_configurations.push(c.clone());
                    created(config_json(&c))
                }
                ("GET", "Releases") => {
                    let list: Vec<Value> = acc.releases.iter().rev().map(release_json).collect();
                    json(json!({"releases": list, "meta": meta(&url, "releases")}))
                }
                ("POST", "Releases") => {
                    let f = form(body);
                    let Some(id) = f.get("ConfigurationId") else {
                        return twilio_error(
                            400,
                            20001,
                            "Missing required parameter ConfigurationId",
                        );
                    };
                    if !acc
                        .plugin_configurations
                        .iter()
                        .any(|(sid, _, _)| sid == id)
                    {
                        return twilio_error(
                            404,
                            20404,
                            &format!("Configuration {id} was not found"),
                        );
                    }
                    let r = Release {
                        sid: new_sid,
                        configuration_sid: id.clone(),
                        created: now,
                    };
                    acc.releases.push(r.clone());
                    created(release_json(&r))
                }
                _ => not_found(path),
            }
        }
        _ => not_found(path),
    }
}
