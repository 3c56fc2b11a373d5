//! Real daemons in child processes, and a feed of failing transfers: for kill -9 and replicas.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use transfer_guard::clock::Clock;

use super::{TOKEN_A, env, event};

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
