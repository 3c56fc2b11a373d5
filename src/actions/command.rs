//! Rollback by running a command: argv as configured, the decision in `TRANSFER_GUARD_*` variables, a timeout, the exit code recorded.

use std::time::Duration;

use super::{Attempt, BoxFuture, Integration};

pub struct Command {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

impl Integration for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn run<'a>(&'a self, a: Attempt<'a>) -> BoxFuture<'a, Result<String, String>> {
        let d = a.decision;
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
                // The same on every attempt of one action: the command can drop a repeat.
                .env("TRANSFER_GUARD_IDEMPOTENCY_KEY", a.key)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::{ActionKind, Decision, Plan};
    use crate::rules::RuleId;

    fn decision() -> Decision {
        Decision {
            cbo: "nss".into(),
            rule: RuleId::BadRequests,
            kind: ActionKind::Rollback,
            evidence: serde_json::json!({"minutes_with_bad_requests": 3}),
            deployment: Some("ZD1".into()),
            decided_at: "2026-11-26T00:00:00Z".into(),
        }
    }

    async fn run(c: &Command) -> Result<String, String> {
        let d = decision();
        let plan = Plan::default();
        c.run(Attempt {
            decision: &d,
            plan: &plan,
            key: "nss-rollback-command-1",
        })
        .await
    }

    #[tokio::test]
    async fn the_command_gets_the_decision_in_its_environment_and_its_exit_code_is_recorded() {
        let ok = Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo $TRANSFER_GUARD_CBO $TRANSFER_GUARD_RULE $TRANSFER_GUARD_DEPLOYMENT $TRANSFER_GUARD_IDEMPOTENCY_KEY".into(),
            ],
            timeout: Duration::from_secs(10),
        };
        assert_eq!(
            run(&ok).await.unwrap(),
            "sh exited 0: nss bad_requests ZD1 nss-rollback-command-1"
        );
        let failing = Command {
            argv: vec!["sh".into(), "-c".into(), "echo no >&2; exit 7".into()],
            timeout: Duration::from_secs(10),
        };
        assert_eq!(run(&failing).await.unwrap_err(), "sh exited 7: no");
        let missing = Command {
            argv: vec!["/nonexistent/rollback".into()],
            timeout: Duration::from_secs(10),
        };
        assert!(
            run(&missing)
                .await
                .unwrap_err()
                .starts_with("/nonexistent/rollback: ")
        );
    }
}
