//! `cross_cbo`: `success_rate` or `bad_requests` breached, or agents reporting failures, on several CBOs at once (a shared cause).

use serde_json::{Value, json};

use super::{Cond, Params, Verdict};

/// True for `cbo` when it is one of at least `min_cbos` CBOs that are breached now or whose
/// agents reported failing transfers (at least `min_samples` within `window`, 15m): the seed's
/// "multiple agent reports of consistent failures across CBOs". Either kind of evidence
/// counts; the evidence lists both, the reports with their conversation SIDs and notes.
pub fn verdict(
    p: &Params,
    cbo: &str,
    breached: &[(String, Value)],
    reporting: &[(String, Value)],
) -> Verdict {
    let mut cbos: Vec<&str> = breached
        .iter()
        .chain(reporting)
        .map(|(k, _)| k.as_str())
        .collect();
    cbos.sort_unstable();
    cbos.dedup();
    let involved = cbos.contains(&cbo);
    let many = cbos.len() as u32 >= p.min_cbos.max(2);
    let mut evidence = json!({
        "breached_cbos": breached.iter().map(|(k, rules)| json!({"cbo": k, "rules": rules})).collect::<Vec<_>>(),
        "min_cbos": p.min_cbos,
        "deploy_window": humantime::format_duration(p.deploy_window).to_string(),
    });
    if !reporting.is_empty() {
        evidence["agent_reports"] = json!(
            reporting
                .iter()
                .map(|(k, reports)| json!({"cbo": k, "reports": reports}))
                .collect::<Vec<_>>()
        );
        evidence["reports_window"] = json!(humantime::format_duration(p.window).to_string());
    }
    Verdict {
        cond: if involved && many {
            Cond::True
        } else {
            Cond::False
        },
        evidence,
    }
}
