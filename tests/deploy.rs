//! The deployment files say what the code does: the systemd unit's hardening (scored by
//! `systemd-analyze security --offline`), and the Kubernetes PrometheusRule generated from
//! `alerts/`, kept in sync.

mod common;

use common::tool;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const RULE_HEADER: &str = r"# Generated from alerts/transfer-guard.rules.yml (tests/deploy.rs keeps it in sync;
# the test prints the file to write when it differs). For the Prometheus Operator.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: transfer-guard
  labels: {app.kubernetes.io/name: transfer-guard}
spec:
";

/// The PrometheusRule for `rules` (the rules file's groups under `spec`, its comments left out).
fn prometheus_rule(rules: &str) -> String {
    let mut out = RULE_HEADER.to_string();
    for line in rules.lines().skip_while(|l| l.starts_with('#')) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_kubernetes_prometheus_rule_is_the_alert_rules() {
    let rules = std::fs::read_to_string(format!("{ROOT}/alerts/transfer-guard.rules.yml")).unwrap();
    let want = prometheus_rule(&rules);
    let path = format!("{ROOT}/deploy/kubernetes/prometheusrule.yaml");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{path} is not alerts/transfer-guard.rules.yml any more; write this:\n{want}"
    );
}

#[tokio::test]
async fn the_systemd_unit_is_hardened_to_at_most_3_0() {
    let Some(analyze) = tool("systemd-analyze", "systemd", "systemd unit hardening") else {
        return;
    };
    // --offline scores the file as written, without a running systemd.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("transfer-guard.service");
    std::fs::copy(format!("{ROOT}/deploy/transfer-guard.service"), &unit).unwrap();
    let out = tokio::process::Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("transfer-guard.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 3.0, "exposure {score}:\n{text}");
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    assert!(
        readme.contains(&format!("exposure {score:.1}")),
        "the README should quote the unit's score ({score:.1})"
    );
}

#[tokio::test]
async fn the_alertmanager_example_is_valid_routes_pages_and_inhibits_only_real_alerts() {
    let Some(amtool) = tool("amtool", "prometheus-alertmanager", "Alertmanager example") else {
        return;
    };
    let config = format!("{ROOT}/deploy/alertmanager.yml");
    let out = tokio::process::Command::new(&amtool)
        .args(["check-config", &config])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("5 inhibit rules"), "{text}");
    for (labels, receiver) in [
        ("severity=page", "on-call-page"),
        ("severity=ticket", "on-call-ticket"),
    ] {
        let out = tokio::process::Command::new(&amtool)
            .args(["config", "routes", "test", "--config.file", &config, labels])
            .output()
            .await
            .unwrap();
        let routed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(routed.trim(), receiver, "{labels}");
    }
    // Every alert name the inhibit rules match is one the rules file (or the daemon) raises.
    let rules = std::fs::read_to_string(format!("{ROOT}/alerts/transfer-guard.rules.yml")).unwrap();
    let mut known: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    known.push("TransferGuardRuleBreached");
    let example = std::fs::read_to_string(&config).unwrap();
    for name in example
        .split(|c: char| !(c.is_ascii_alphanumeric()))
        .filter(|w| w.starts_with("TransferGuard") && *w != "TransferGuard")
    {
        assert!(
            known.contains(&name),
            "{name} is no alert of alerts/ or the daemon"
        );
    }
}

/// The configuration files shipped in `deploy/` are ones `run` accepts, with every secret they
/// name given (by the environment, or a file in `secrets_dir`).
#[test]
fn the_shipped_configurations_are_accepted() {
    let example = std::fs::read_to_string(format!("{ROOT}/deploy/transfer-guard.toml")).unwrap();
    let manifest =
        std::fs::read_to_string(format!("{ROOT}/deploy/kubernetes/transfer-guard.yaml")).unwrap();
    // The ConfigMap's file: the block under `transfer-guard.toml: |`, unindented.
    let embedded: String = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("transfer-guard.toml: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(embedded.contains("[[cbo]]"), "{embedded}");
    for (name, text) in [
        ("deploy/transfer-guard.toml", example),
        ("the ConfigMap", embedded),
    ] {
        // Each variable a value of its own (tokens must differ from one another).
        let checked =
            transfer_guard::config::check_str(&text, &|var| Some(format!("value of {var}")));
        let fatal: Vec<_> = checked.problems.iter().filter(|p| p.fatal).collect();
        assert!(fatal.is_empty(), "{name}: {fatal:?}");
    }
}

/// Every runbook link (the alert rules', and the daemon's own alerts' for each rule) is absolute
/// and lands on a section of `docs/runbook.md`.
#[test]
fn every_runbook_link_is_absolute_and_lands_on_a_section() {
    use transfer_guard::config::RUNBOOK_URL;
    let runbook = std::fs::read_to_string(format!("{ROOT}/docs/runbook.md")).unwrap();
    let sections: std::collections::BTreeSet<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    let rules = std::fs::read_to_string(format!("{ROOT}/alerts/transfer-guard.rules.yml")).unwrap();
    let mut links: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(str::to_string)
        .collect();
    assert_eq!(links.len(), rules.matches("- alert: ").count());
    let links_of_the_daemon = transfer_guard::rules::RuleId::ALL.map(|rule| {
        let a = transfer_guard::actions::alertmanager::alert(
            "nss",
            rule,
            &serde_json::json!({}),
            false,
            0,
            &transfer_guard::actions::alertmanager::Links::of(&Default::default()),
        );
        a["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .to_string()
    });
    links.extend(links_of_the_daemon);
    for link in links {
        let anchor = link
            .strip_prefix(&format!("{RUNBOOK_URL}#"))
            .unwrap_or_else(|| panic!("{link} is not under {RUNBOOK_URL}"));
        assert!(
            sections.contains(anchor),
            "{link}: no section `## {anchor}`"
        );
    }
}
