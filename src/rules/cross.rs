//! `cross_cbo`: `success_rate` or `bad_requests` breached on several CBOs at once (a shared cause).

use serde_json::{Value, json};

use super::{Cond, Params, Verdict};

/// True for `cbo` when it is one of at least `min_cbos` CBOs breached now.
pub fn verdict(p: &Params, cbo: &str, breached: &[(String, Value)]) -> Verdict {
    let involved = breached.iter().any(|(k, _)| k == cbo);
    let many = breached.len() as u32 >= p.min_cbos.max(2);
    Verdict {
        cond: if involved && many {
            Cond::True
        } else {
            Cond::False
        },
        evidence: json!({
            "breached_cbos": breached.iter().map(|(k, rules)| json!({"cbo": k, "rules": rules})).collect::<Vec<_>>(),
            "min_cbos": p.min_cbos,
            "deploy_window": humantime::format_duration(p.deploy_window).to_string(),
        }),
    }
}
