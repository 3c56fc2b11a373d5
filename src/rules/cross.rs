//! `cross_cbo`: `success_rate` or `bad_requests` breached, or agents reporting failures, on several CBOs at once (a shared cause).

use serde_json::{Value, json};

use super::{Cond, Params, Verdict};

/// CBOs named in one decision's evidence (this one first); the others are counted.
pub const LISTED: usize = 10;

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
    // The evidence names this CBO and a few others, and counts the rest: it is copied into
    // every involved CBO's decisions, so listing all of a thousand CBOs in each would cost a
    // thousand times a thousand.
    let listed = |all: &[(String, Value)], field: &str| -> (Vec<Value>, usize) {
        let mine = all.iter().filter(|(k, _)| k == cbo);
        let others = all.iter().filter(|(k, _)| k != cbo);
        let shown: Vec<Value> = mine
            .chain(others)
            .take(LISTED)
            .map(|(k, v)| json!({"cbo": k, field: v}))
            .collect();
        let more = all.len() - shown.len();
        (shown, more)
    };
    let (shown, more) = listed(breached, "rules");
    let mut evidence = json!({
        "breached_cbos": shown,
        "breached_count": breached.len(),
        "min_cbos": p.min_cbos,
        "deploy_window": humantime::format_duration(p.deploy_window).to_string(),
    });
    if more > 0 {
        evidence["breached_not_listed"] = json!(more);
    }
    if !reporting.is_empty() {
        let (shown, more) = listed(reporting, "reports");
        evidence["agent_reports"] = json!(shown);
        if more > 0 {
            evidence["reporting_not_listed"] = json!(more);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleId;

    #[test]
    fn the_evidence_names_this_cbo_and_a_few_others_and_counts_the_rest() {
        let p = Params::default_for(RuleId::CrossCbo);
        let breached: Vec<(String, Value)> = (0..1000)
            .map(|i| (format!("c{i}"), json!(["bad_requests"])))
            .collect();
        let v = verdict(&p, "c999", &breached, &[]);
        assert_eq!(v.cond, Cond::True);
        let listed = v.evidence["breached_cbos"].as_array().unwrap();
        assert_eq!(listed.len(), LISTED);
        assert_eq!(listed[0]["cbo"], "c999");
        assert_eq!(v.evidence["breached_count"], 1000);
        assert_eq!(v.evidence["breached_not_listed"], 1000 - LISTED);
        // A few CBOs are all named, and nothing is said to be left out.
        let v = verdict(&p, "c1", &breached[..3], &[]);
        assert_eq!(v.evidence["breached_cbos"].as_array().unwrap().len(), 3);
        assert!(v.evidence.get("breached_not_listed").is_none());
    }
}
