//! On-call from a shell (SPEC §13): `status` (every CBO on one line each), `ack` (silence a
//! CBO's breached rules until they recover) and `switch` (transfers off or back on), against a
//! running daemon with a token from the environment. Exit 0, or 3 when the command could not run.

use std::io::Write;

use serde_json::{Value, json};

use crate::config::Secret;

pub const OK: i32 = 0;
pub const COULD_NOT_RUN: i32 = 3;

/// A daemon and the token to talk to it with.
pub struct Server {
    pub url: String,
    pub token: Secret,
}

impl Server {
    /// One request; the answer's JSON, or why there is none, one cause said once.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = reqwest::Client::new()
            .request(method, &url)
            .query(query)
            .bearer_auth(self.token.expose())
            .timeout(std::time::Duration::from_secs(30));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{url}: {}", crate::net::cause(&e)))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let why = body["error"].as_str().unwrap_or("no reason given");
            return Err(format!("{url}: {status}: {why}"));
        }
        Ok(body)
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// One CBO of `/v1/status` as a line.
fn status_line(key: &str, c: &Value) -> String {
    let mut rules: Vec<String> = c["rules"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(rule, r)| {
            let state = r["state"].as_str().unwrap_or("");
            (state != "ok").then(|| format!("{rule}={state}"))
        })
        .collect();
    rules.sort();
    let w = &c["windows"]["5m"];
    let switch = &c["switch"];
    let off: Vec<&str> = [
        ("transfers_enabled", "all"),
        ("cold_transfer", "cold"),
        ("multi_participant", "multi"),
    ]
    .into_iter()
    .filter(|(k, _)| switch[*k] == Value::Bool(false))
    .map(|(_, name)| name)
    .collect();
    let tr = &c["taskrouter"];
    let workflow = match tr["config_ok"].as_bool() {
        Some(true) => "sound".to_string(),
        Some(false) => {
            let problems: Vec<&str> = tr["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["problem"].as_str())
                .collect();
            format!("CORRUPTED ({})", problems.join(","))
        }
        None => "unknown".into(),
    };
    let validation = c["validation"]["state"].as_str().unwrap_or("-");
    format!(
        "{key:<12} {:>7} {:>4} {:>5} {:<10} {:<9} {:<11} {:<10} {}",
        pct(&w["success_rate"]),
        w["counts"]["completed"].as_u64().unwrap_or(0)
            + w["counts"]["failed"].as_u64().unwrap_or(0)
            + w["counts"]["timed_out"].as_u64().unwrap_or(0),
        w["counts"]["bad_request"].as_u64().unwrap_or(0)
            + w["counts"]["taskrouter_bad_request"].as_u64().unwrap_or(0),
        if off.is_empty() {
            "on".to_string()
        } else {
            format!("OFF:{}", off.join("+"))
        },
        validation,
        workflow,
        tr["last_result"].as_str().unwrap_or("-"),
        if rules.is_empty() {
            "all ok".to_string()
        } else {
            rules.join(" ")
        }
    )
}

/// `transfer-guard status`: every CBO the token may read, one line each.
pub async fn status(
    server: &Server,
    cbo: Option<&str>,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let body = match server
        .call(reqwest::Method::GET, "/v1/status", &[], None)
        .await
    {
        Ok(b) => b,
        Err(e) => {
            let _ = writeln!(err, "transfer-guard status: {e}");
            return COULD_NOT_RUN;
        }
    };
    let mut cbos: Vec<(&String, &Value)> = body["cbos"].as_object().into_iter().flatten().collect();
    if let Some(want) = cbo {
        cbos.retain(|(k, _)| k.as_str() == want);
        if cbos.is_empty() {
            let _ = writeln!(
                err,
                "transfer-guard status: cbo {want:?} is not configured (or not readable with this token)"
            );
            return COULD_NOT_RUN;
        }
    }
    if json {
        let map: serde_json::Map<String, Value> = cbos
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let _ = writeln!(out, "{}", Value::Object(map));
        return OK;
    }
    let _ = writeln!(
        out,
        "{:<12} {:>7} {:>4} {:>5} {:<10} {:<9} {:<11} {:<10} rules not ok",
        "CBO", "success", "n", "400s", "switch", "validate", "workflow", "poll"
    );
    for (k, c) in cbos {
        let _ = writeln!(out, "{}", status_line(k, c));
    }
    let _ = writeln!(
        out,
        "(the last 5 minutes; 400s: Bad Requests; details: --json, or transfer-guard decisions --cbo X)"
    );
    OK
}

/// `transfer-guard ack`: silences `cbo`'s breached or pending rules (or `rule`) until they
/// recover.
pub async fn ack(
    server: &Server,
    cbo: &str,
    rule: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let body = rule.map(|r| json!({ "rule": r })).unwrap_or(json!({}));
    match server
        .call(
            reqwest::Method::POST,
            &format!("/v1/cbos/{cbo}/ack"),
            &[],
            Some(body),
        )
        .await
    {
        Ok(v) => {
            let rules: Vec<&str> = v["acknowledged"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let _ = writeln!(
                out,
                "{cbo}: acknowledged {} until they recover",
                if rules.is_empty() {
                    v.to_string()
                } else {
                    rules.join(", ")
                }
            );
            OK
        }
        Err(e) => {
            let _ = writeln!(err, "transfer-guard ack: {e}");
            COULD_NOT_RUN
        }
    }
}

/// `transfer-guard switch`: transfers of `cbo` back on (restoring the Flex flags), or off
/// (all of them, or `features` alone).
pub async fn switch(
    server: &Server,
    cbo: &str,
    on: bool,
    features: &[String],
    reason: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let mut body = json!({ "transfers_enabled": on });
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    if !features.is_empty() {
        body["features"] = json!(features);
    }
    match server
        .call(
            reqwest::Method::PUT,
            &format!("/v1/switch/{cbo}"),
            &[],
            Some(body),
        )
        .await
    {
        Ok(s) => {
            let state = |k: &str| {
                if s[k] == Value::Bool(false) {
                    "off"
                } else {
                    "on"
                }
            };
            let _ = writeln!(
                out,
                "{cbo}: transfers {}, cold transfers {}, multi-participant {} ({})",
                state("transfers_enabled"),
                state("cold_transfer"),
                state("multi_participant"),
                s["reason"].as_str().unwrap_or("")
            );
            OK
        }
        Err(e) => {
            let _ = writeln!(err, "transfer-guard switch: {e}");
            COULD_NOT_RUN
        }
    }
}
