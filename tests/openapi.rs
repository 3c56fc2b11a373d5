//! Every kind of body the simulated Twilio produces validates against Twilio's OpenAPI schema for its path.

use std::path::PathBuf;

use serde_json::{Value, json};
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::{SimTwilio, TaskEvent};

const SPECS: [&str; 4] = [
    "twilio_taskrouter_v1.json",
    "twilio_serverless_v1.json",
    "twilio_flex_v1.json",
    "twilio_monitor_v1.json",
];

/// The shared copy when it is beside the project, else the vendored one; they must agree.
fn load_specs() -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let vendored = root.join("tests/twilio-oai");
    let shared = root.join("../shared/twilio-oai");
    SPECS
        .iter()
        .map(|name| {
            let ours = std::fs::read(vendored.join(name)).unwrap();
            if let Ok(theirs) = std::fs::read(shared.join(name)) {
                assert!(
                    ours == theirs,
                    "tests/twilio-oai/{name} differs from ../shared/twilio-oai/{name}"
                );
            }
            serde_json::from_slice(&ours).unwrap()
        })
        .collect()
}

/// OpenAPI 3.0 to JSON Schema: `nullable: true` becomes a `null` alternative.
fn convert(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let nullable = map.remove("nullable") == Some(Value::Bool(true));
            for child in map.values_mut() {
                convert(child);
            }
            if nullable {
                if let Some(Value::String(t)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                } else if let Some(r) = map.remove("$ref") {
                    map.insert("anyOf".into(), json!([{"$ref": r}, {"type": "null"}]));
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(convert),
        _ => {}
    }
}

/// The response schema for `method path` answering `status`, with the spec's components beside it.
fn schema_for(specs: &[Value], method: &str, path: &str, status: u16) -> Value {
    for spec in specs {
        for (template, item) in spec["paths"].as_object().unwrap() {
            if !template_matches(template, path) {
                continue;
            }
            let op = &item[method.to_ascii_lowercase()];
            let schema =
                op["responses"][status.to_string()]["content"]["application/json"]["schema"]
                    .clone();
            assert!(
                !schema.is_null(),
                "no {status} schema for {method} {template}"
            );
            let mut root = schema;
            root.as_object_mut()
                .unwrap()
                .insert("components".into(), spec["components"].clone());
            convert(&mut root);
            return root;
        }
    }
    panic!("no OpenAPI path matches {method} {path}");
}

/// `/v1/Services/{ServiceSid}/Builds` matches `/v1/Services/ZS…/Builds`.
fn template_matches(template: &str, path: &str) -> bool {
    let want: Vec<&str> = template.split('/').collect();
    let got: Vec<&str> = path.split('/').collect();
    want.len() == got.len()
        && want
            .iter()
            .zip(&got)
            .all(|(w, g)| (w.starts_with('{') && !g.is_empty()) || w == g)
}

#[tokio::test]
async fn every_simulator_body_validates_against_twilios_openapi() {
    let specs = load_specs();
    let sim = SimTwilio::start(Clock::new()).await;
    let (ac, ws, ww) = (
        "AC0123456789abcdef0123456789abcdef",
        "WS0123456789abcdef0123456789abcdef",
        "WW0123456789abcdef0123456789abcdef",
    );
    let (zs, ze) = (
        "ZS0123456789abcdef0123456789abcdef",
        "ZE0123456789abcdef0123456789abcdef",
    );
    sim.add_account(ac, "token");
    sim.add_workflow(ac, ws, ww);
    sim.record_tasks(ac, ww, TaskEvent::Entered, 10);
    sim.record_tasks(ac, ww, TaskEvent::Canceled, 1);
    sim.add_service(ac, zs, ze, ww);
    sim.deploy(ac, zs, ze, None);
    let client = reqwest::Client::new();
    let base = sim.url();

    let mut checked = Vec::new();
    let mut call = async |method: &str,
                          path: String,
                          form: Option<Vec<(&str, String)>>,
                          body: Option<Value>|
           -> Value {
        let mut req = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .basic_auth(ac, Some("token"));
        if let Some(f) = form {
            req = req.form(&f);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let value: Value = resp.json().await.unwrap();
        assert!(
            status == 200 || status == 201,
            "{method} {path}: {status} {value}"
        );
        let schema = schema_for(&specs, method, path.split('?').next().unwrap(), status);
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft7)
            .should_validate_formats(false)
            .build(&schema)
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path}:\n{}\n{value}",
            errors.join("\n")
        );
        checked.push(format!("{method} {path}"));
        value
    };

    let wf = format!("/v1/Workspaces/{ws}/Workflows/{ww}");
    call("GET", wf.clone(), None, None).await;
    let stats = call("GET", format!("{wf}/CumulativeStatistics"), None, None).await;
    assert_eq!(stats["tasks_entered"], 10);
    call("GET", format!("{wf}/RealTimeStatistics"), None, None).await;
    let builds = call("GET", format!("/v1/Services/{zs}/Builds"), None, None).await;
    let first_build = builds["builds"].as_array().unwrap().last().unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    call("GET", format!("/v1/Services/{zs}/Environments"), None, None).await;
    call(
        "GET",
        format!("/v1/Services/{zs}/Environments/{ze}"),
        None,
        None,
    )
    .await;
    let env = format!("/v1/Services/{zs}/Environments/{ze}");
    call("GET", format!("{env}/Deployments"), None, None).await;
    let redeployed = call(
        "POST",
        format!("{env}/Deployments"),
        Some(vec![("BuildSid", first_build.clone())]),
        None,
    )
    .await;
    assert_eq!(redeployed["build_sid"], first_build.as_str());
    call("GET", format!("{env}/Variables"), None, None).await;
    let config = call("GET", "/v1/Configuration".into(), None, None).await;
    let mut ui = config["ui_attributes"].clone();
    ui["custom_data"]["features"]["conversation_transfer"]["enabled"] = json!(false);
    let updated = call(
        "POST",
        "/v1/Configuration".into(),
        None,
        Some(json!({"account_sid": ac, "ui_attributes": ui})),
    )
    .await;
    assert_eq!(
        updated["ui_attributes"]["custom_data"]["features"]["conversation_transfer"]["enabled"],
        false
    );
    assert_eq!(
        updated["ui_attributes"]["colorTheme"],
        config["ui_attributes"]["colorTheme"]
    );
    let pc = call(
        "POST",
        "/v1/PluginService/Configurations".into(),
        Some(vec![("Name", "v2".to_string())]),
        None,
    )
    .await;
    call("GET", "/v1/PluginService/Configurations".into(), None, None).await;
    let pc_sid = pc["sid"].as_str().unwrap().to_string();
    call(
        "POST",
        "/v1/PluginService/Releases".into(),
        Some(vec![("ConfigurationId", pc_sid.clone())]),
        None,
    )
    .await;
    let releases = call("GET", "/v1/PluginService/Releases".into(), None, None).await;
    assert_eq!(
        releases["releases"][0]["configuration_sid"],
        pc_sid.as_str()
    );
    // Test transfers: the queue, then a task created, read, listed, canceled.
    let wq = "WQ0123456789abcdef0123456789abcdef";
    sim.add_queue(ac, ws, wq, "transfer-guard-probe");
    call(
        "GET",
        format!("/v1/Workspaces/{ws}/TaskQueues/{wq}"),
        None,
        None,
    )
    .await;
    let attributes = json!({
        "transferTargetType": "queue", "transferTargetSid": wq,
        "transferQueueName": "transfer-guard-probe", "transferGuardProbe": true,
        "conversations": {"conversation_id": "CH0123456789abcdef0123456789abcdef"},
    });
    let task = call(
        "POST",
        format!("/v1/Workspaces/{ws}/Tasks"),
        Some(vec![
            ("WorkflowSid", ww.to_string()),
            ("TaskChannel", "chat".to_string()),
            ("Attributes", attributes.to_string()),
        ]),
        None,
    )
    .await;
    let task_sid = task["sid"].as_str().unwrap().to_string();
    call(
        "GET",
        format!("/v1/Workspaces/{ws}/Tasks/{task_sid}"),
        None,
        None,
    )
    .await;
    let listed = call(
        "GET",
        format!(
            "/v1/Workspaces/{ws}/Tasks?EvaluateTaskAttributes=transferGuardProbe%20%3D%3D%20true"
        ),
        None,
        None,
    )
    .await;
    assert_eq!(listed["tasks"][0]["sid"], task_sid.as_str());
    let canceled = call(
        "POST",
        format!("/v1/Workspaces/{ws}/Tasks/{task_sid}"),
        Some(vec![("AssignmentStatus", "canceled".to_string())]),
        None,
    )
    .await;
    assert_eq!(canceled["assignment_status"], "canceled");
    let deleted = client
        .delete(format!("{base}/v1/Workspaces/{ws}/Tasks/{task_sid}"))
        .basic_auth(ac, Some("token"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);

    // Twilio's record (SPEC 2b): TaskRouter's events (the test transfer's own among them),
    // paged; the functions' logs; the debugger's alerts.
    let now = Clock::new().now_ms();
    let t = json!({"transferTargetType": "worker", "conversations": {"conversation_id": "CH0123456789abcdef0123456789abcdef"}});
    let wt = "WT00000000000000000000000000000abc";
    sim.taskrouter_event(ac, ws, ww, "task.created", now, wt, &t, None);
    sim.taskrouter_event(ac, ws, ww, "reservation.created", now + 1, wt, &t, None);
    let since = "StartDate=2020-01-01T00:00:00Z";
    let events = call(
        "GET",
        format!("/v1/Workspaces/{ws}/Events?WorkflowSid={ww}&{since}&PageSize=2"),
        None,
        None,
    )
    .await;
    let listed: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    // Newest first; the test transfer's creation and cancellation were recorded too.
    assert_eq!(listed, ["reservation.created", "task.created"]);
    let next = events["meta"]["next_page_url"].as_str().unwrap();
    let next = &next[next.find("/v1/").unwrap()..];
    let rest = call("GET", next.to_string(), None, None).await;
    let rest: Vec<&str> = rest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["task.canceled", "task.created"]);
    sim.function_log(ac, zs, ze, "error", "TaskRouter error: Bad Request", now);
    let logs = call("GET", format!("{env}/Logs?{since}"), None, None).await;
    assert_eq!(logs["logs"][0]["level"], "error");
    sim.debugger_alert(
        ac,
        "error",
        "20001",
        "httpResponse=400",
        "https://taskrouter.twilio.com/v1/Workspaces/WS/Tasks",
        now,
    );
    let alerts = call(
        "GET",
        format!("/v1/Alerts?LogLevel=error&{since}"),
        None,
        None,
    )
    .await;
    assert_eq!(alerts["alerts"][0]["error_code"], "20001");
    assert_eq!(checked.len(), 24, "{checked:?}");
}

#[test]
fn the_schemas_do_refuse_a_body_that_breaks_them() {
    let specs = load_specs();
    let path = "/v1/Workspaces/WS0123456789abcdef0123456789abcdef/Workflows/WW0123456789abcdef0123456789abcdef";
    let schema = schema_for(&specs, "GET", path, 200);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .should_validate_formats(false)
        .build(&schema)
        .unwrap();
    assert!(
        validator
            .is_valid(&json!({"sid": "WW0123456789abcdef0123456789abcdef", "configuration": null}))
    );
    assert!(!validator.is_valid(&json!({"sid": "WW0123"})));
    assert!(!validator.is_valid(&json!({"task_reservation_timeout": "120"})));
}

#[tokio::test]
async fn the_simulator_refuses_bad_credentials_with_twilios_error_body() {
    let sim = SimTwilio::start(Clock::new()).await;
    sim.add_account("AC0123456789abcdef0123456789abcdef", "token");
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/Configuration", sim.url()))
        .basic_auth("AC0123456789abcdef0123456789abcdef", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 20003);
    assert_eq!(body["status"], 401);
    assert!(body["more_info"].as_str().unwrap().ends_with("/20003"));
}
