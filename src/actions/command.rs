//! Rollback by running a command: argv as configured, the decision in `TRANSFER_GUARD_*` variables, a timeout, the exit code recorded.

use std::time::Duration;

use super::{BoxFuture, Decision, Integration};

pub struct Command {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl Integration for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn run<'a>(&'a self, d: &'a Decision) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let (program, args) = self
                .argv
                .split_first()
                .ok_or("actions.command.argv is empty")?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env("TRANSFER_GUARD_CBO", &d.cbo)
                .env("TRANSFER_GUARD_RULE", d.rule.as_str())
                .env("TRANSFER_GUARD_ACTION", d.kind.as_str())
                .env(
                    "TRANSFER_GUARD_DEPLOYMENT",
                    d.deployment.as_deref().unwrap_or(""),
                )
                .env("TRANSFER_GUARD_EVIDENCE", d.evidence.to_string())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout(self.timeout, cmd.output())
                .await
                .map_err(|_| format!("{program}: still running after {:?}; killed", self.timeout))?
                .map_err(|e| format!("{program}: {e}"))?;
            let tail = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .trim()
                    .chars()
                    .rev()
                    .take(300)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            };
            match out.status.code() {
                Some(0) => Ok(format!("{program} exited 0: {}", tail(&out.stdout))),
                Some(code) => Err(format!("{program} exited {code}: {}", tail(&out.stderr))),
                None => Err(format!("{program} was killed by a signal")),
            }
        })
    }
}
