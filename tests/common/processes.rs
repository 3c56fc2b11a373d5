//! Real daemons in child processes, and a feed of failing transfers: for kill -9 and replicas.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use transfer_guard::clock::Clock;
use transfer_guard::sim::twilio::SimTwilio;

use super::{AC_A, AC_B, TOKEN_A, WS_A, WS_B, WW_A, WW_B, config_text_in, env, event};

/// The functions' service and environment of cbo a in `serverless_history`.
pub const ZS: &str = "ZS0000000000000000000000000000000a";
pub const ZE: &str = "ZE0000000000000000000000000000000a";

/// The simulated Twilio of a rollback: both CBOs' workflows, and cbo a on a serverless service
/// with a good build three hours old and a new one a minute old. Returns the good build's SID.
pub fn serverless_history(sim: &SimTwilio) -> String {
    for (ac, ws, ww) in [(AC_A, WS_A, WW_A), (AC_B, WS_B, WW_B)] {
        sim.add_account(ac, "twilio-secret");
        sim.add_workflow(ac, ws, ww);
    }
    sim.add_service(AC_A, ZS, ZE, WW_A);
    sim.age_history(AC_A, Duration::from_secs(3 * 3600));
    sim.deploy(AC_A, ZS, ZE, None);
    sim.age_history(AC_A, Duration::from_secs(60));
    sim.deployments(AC_A, ZS, ZE)[0].build_sid.clone()
}

/// A daemon on `port` polling `twilio` every second, actions live, that rolls cbo a's
/// functions back once Bad Requests come one a minute (`bad_requests`, a 1-minute window).
pub fn rollback_config(state_dir: &Path, twilio: &str, port: u16) -> String {
    config_text_in(state_dir, twilio, "")
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen(
            "[twilio]\n",
            "[twilio]\npoll_interval = \"1s\"\nrequest_timeout = \"1s\"\n",
            1,
        )
        .replacen("[server]\n", "[actions]\ndry_run = false\n\n[server]\n", 1)
        .replacen(
            &format!("workflow_sid = \"{WW_A}\"\n"),
            &format!(
                "workflow_sid = \"{WW_A}\"\nserverless_service_sid = \"{ZS}\"\nserverless_environment_sid = \"{ZE}\"\nrollback = [\"serverless\"]\n\n[cbo.rules.bad_requests]\nminutes = 1\nwindow = \"1m\"\n"
            ),
            1,
        )
}

/// Starts the daemon with `config` (and `extra_env`) and waits until `url` answers `/readyz`.
pub async fn daemon(config: &Path, url: &str, extra_env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_transfer-guard"));
    cmd.args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env() {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    for _ in 0..400 {
        if let Ok(r) = reqwest::get(format!("{url}/readyz")).await
            && r.status() == 200
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the daemon at {url} never became ready");
}

/// Failing transfers of cbo a, one Bad Request every 100 ms, posted to each of `urls` in turn,
/// until dropped.
pub fn failures(urls: Vec<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        for n in 0u32.. {
            let now = Clock::new().now_ms();
            let tid = format!(r#","transfer_id":"crash-{n}""#);
            let body = [
                event("initiated", now - 600, n, &tid),
                event(
                    "failed",
                    now - 100,
                    n,
                    &(tid + r#","error":{"status":400,"message":"TaskRouter error: Bad Request"}"#),
                ),
            ]
            .join("\n");
            let url = &urls[n as usize % urls.len()];
            let _ = client
                .post(format!("{url}/v1/events"))
                .bearer_auth(TOKEN_A)
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
