//! The tick: sweep transfers, evaluate every rule of every CBO, log state changes, and hand breaches to the actions.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::Shared;
use crate::actions::known::{Artifact, Verdict};
use crate::actions::{ActionKind, Decision};
use crate::clock::rfc3339;
use crate::config::RuleAction;
use crate::decisions::{Entry, Kind};
use crate::rules::{Inputs, RuleId, RuleState, Transition};

/// What the tick remembers between runs.
#[derive(Default)]
pub struct Memory {
    /// When a rollback trigger last breached on each CBO (for "ran deploy_window without a
    /// breach").
    last_breach: std::collections::HashMap<String, i64>,
    /// config_corruption breaches (cbo, breached at) already escalated to disable.
    escalated: HashSet<(String, i64)>,
    /// When each breached rule was last sent to Alertmanager.
    notified: std::collections::HashMap<(String, RuleId), i64>,
}

/// One evaluation at `now_ms`.
pub fn tick(shared: &Shared, memory: &mut Memory, now_ms: i64) {
    // Replicas: what the others wrote, and whether this one leads.
    shared.actions.follow();
    // A log writable again, intents settled, or leading anew: breaches that were held are
    // decided again.
    let recheck = shared.actions.log.probe(now_ms) | shared.actions.take_recheck();
    // This guard's own rollbacks that took effect: the new deployment is judged from then on.
    for (cbo, at_ms) in shared.actions.take_landed() {
        cut(shared, &cbo, at_ms, "this guard's rollback took effect");
    }
    shared.fleet.sweep(now_ms);
    let statuses: Vec<_> = shared
        .fleet
        .iter()
        .map(|c| (c.key.clone(), c.taskrouter().clone()))
        .collect();
    let transitions = {
        let stats: Vec<_> = shared
            .fleet
            .iter()
            .map(|c| move |w: Duration| c.stats(now_ms, w))
            .collect();
        // Reports about an earlier deployment are old evidence, like its transfers.
        let hour_ago = now_ms - 3_600_000;
        let reports: Vec<_> = shared
            .fleet
            .iter()
            .map(|c| c.reports_since(hour_ago.max(c.judged_since())))
            .collect();
        let inputs =
            statuses
                .iter()
                .zip(&stats)
                .zip(&reports)
                .map(|(((key, tr), stats), reports)| {
                    (
                        key.as_str(),
                        Inputs {
                            stats,
                            taskrouter: tr,
                            reports,
                            poll_interval: shared.config().twilio.poll_interval,
                            now_ms,
                        },
                    )
                });
        shared.engine().tick(inputs, now_ms)
    };

    log_transitions(shared, &transitions, now_ms);
    for t in transitions.iter().filter(|t| t.to == RuleState::Breached) {
        if TRIGGERS.contains(&t.rule) {
            memory.last_breach.insert(t.cbo.clone(), now_ms);
        }
    }
    let shared_cause: HashSet<String> = {
        let engine = shared.engine();
        statuses
            .iter()
            .filter(|(k, _)| {
                engine
                    .state(k, RuleId::CrossCbo)
                    .is_some_and(|t| t.state == RuleState::Breached)
            })
            .map(|(k, _)| k.clone())
            .collect()
    };
    let again = if recheck {
        standing(shared, &transitions)
    } else {
        Vec::new()
    };
    for t in transitions
        .iter()
        .filter(|t| t.to == RuleState::Breached)
        .chain(&again)
    {
        let per_cbo = matches!(t.rule, RuleId::SuccessRate | RuleId::BadRequests);
        if per_cbo && t.params.action != RuleAction::Alert && shared_cause.contains(&t.cbo) {
            // Several CBOs at once: cross_cbo decides who is rolled back.
            suppress(
                shared,
                t,
                None,
                now_ms,
                "cross_cbo is breached: it decides, rolling back only recently deployed CBOs"
                    .into(),
            );
            continue;
        }
        act(shared, t, &statuses, now_ms);
    }

    escalate(shared, memory, &statuses, now_ms);
    validate(shared, &statuses, now_ms);
    learn_good(shared, memory, &statuses, now_ms);
    notify(shared, memory, &transitions, now_ms);
}

/// Rule state changes: metrics, the decision log (durable before any action they cause is
/// reported), acks ended by recovery, and the log lines.
fn log_transitions(shared: &Shared, transitions: &[Transition], now_ms: i64) {
    let mut entries = Vec::new();
    for t in transitions {
        if let Some(m) = shared.metrics.cbo(&t.cbo) {
            m.set_rule_state(t.rule, t.to);
        }
        let mut e = Entry::new(&t.cbo, Kind::State, now_ms);
        e.rule = Some(t.rule.as_str().into());
        e.from = Some(t.from.as_str().into());
        e.to = Some(t.to.as_str().into());
        e.evidence = serde_json::json!({"measured": t.evidence, "params": t.params});
        if t.to == RuleState::Breached {
            let since = now_ms - t.params.window.as_millis() as i64;
            e.evidence = with_failing(shared, &t.cbo, e.evidence, since);
        }
        entries.push(e);
        if t.to == RuleState::Ok {
            shared.actions.recovered(&t.cbo, t.rule);
        }
        if matches!(t.to, RuleState::Breached | RuleState::Pending) {
            tracing::warn!(cbo = %t.cbo, rule = t.rule.as_str(), from = t.from.as_str(), to = t.to.as_str(), evidence = %t.evidence, "rule state changed");
        } else {
            tracing::info!(cbo = %t.cbo, rule = t.rule.as_str(), from = t.from.as_str(), to = t.to.as_str(), "rule state changed");
        }
    }
    // Replicas: the leader records state changes; the others evaluate the same rules.
    if !shared.actions.leading() {
        return;
    }
    if let Err(e) = shared.actions.log.append_all(entries) {
        tracing::error!(error = %e, "cannot write the decision log");
    }
}

/// A new deployment took effect on `cbo` at `at_ms`: its windows restart from that instant and
/// its pending or breached rules from ok, so neither it nor a rollback is judged on evidence
/// from before it. Returns the instant it is judged from.
fn cut(shared: &Shared, cbo: &str, at_ms: i64, why: &str) -> Option<i64> {
    let state = shared.fleet.get(cbo)?;
    let now_ms = shared.clock.now_ms();
    let before = state.judged_since();
    let since = state.cut(at_ms, now_ms);
    if since > before {
        // What polling saw before a cut that comes after its last poll (this guard's own
        // rollback) is evidence about the old deployment.
        let mut tr = state.taskrouter();
        if tr.last_poll_ms.is_some_and(|p| p < since) {
            tr.new_problem_polls = 0;
        }
        drop(tr);
        tracing::info!(cbo, judged_since = %rfc3339(since), why, "a new deployment is judged on its own traffic");
        let evidence = serde_json::json!({"judged_since": rfc3339(since), "why": why});
        let transitions = shared.engine().restart(cbo, now_ms, &evidence);
        log_transitions(shared, &transitions, now_ms);
    }
    Some(since)
}

/// A deployment (or plugin release) seen by polling took effect at `at_ms`: judged from then
/// on, in a validation window of its own; windows of what it replaced end.
pub fn deployed(shared: &Shared, cbo: &str, deployment: &str, at_ms: i64) {
    let Some(since) = cut(shared, cbo, at_ms, &format!("deployment {deployment}")) else {
        return;
    };
    let now_ms = shared.clock.now_ms();
    // Replicas: every one judges the deployment on its own traffic; the leader opens (and
    // ends) its validation window, which the others read from the store.
    if !shared.actions.leading() {
        return;
    }
    shared.validations.supersede(cbo, deployment, now_ms);
    if !shared.validations.exists_for(cbo, deployment) {
        let v = &shared.config().validation;
        let _ = shared.validations.start(
            cbo,
            deployment,
            v.duration,
            v.min_samples,
            "deployment_seen",
            since,
        );
    }
}

/// Breaches standing now that did not just happen, as transitions to act on again (the
/// pipeline's gates keep a decision from firing twice).
fn standing(shared: &Shared, fresh: &[Transition]) -> Vec<Transition> {
    let engine = shared.engine();
    let mut out = Vec::new();
    for cbo in shared.fleet.iter() {
        for rule in RuleId::ALL {
            let (Some(t), Some(params)) =
                (engine.state(&cbo.key, rule), engine.params(&cbo.key, rule))
            else {
                continue;
            };
            if t.state == RuleState::Breached
                && !fresh.iter().any(|f| f.cbo == cbo.key && f.rule == rule)
            {
                out.push(Transition {
                    cbo: cbo.key.clone(),
                    rule,
                    from: RuleState::Breached,
                    to: RuleState::Breached,
                    evidence: t.evidence.clone(),
                    params: *params,
                });
            }
        }
    }
    out
}

/// Breaches go to Alertmanager when they start and every minute while they last; recoveries
/// resolve them.
fn notify(shared: &Shared, memory: &mut Memory, transitions: &[Transition], now_ms: i64) {
    use crate::actions::alertmanager::{RESEND_EVERY, alert};
    if shared.config().actions.alertmanager.is_none() {
        return;
    }
    if !shared.actions.leading() {
        // The leader notifies; one that takes over sends every breach at once.
        memory.notified.clear();
        return;
    }
    let links = crate::actions::alertmanager::Links::of(&shared.config().server);
    let mut alerts = Vec::new();
    for t in transitions.iter().filter(|t| t.from == RuleState::Breached) {
        memory.notified.remove(&(t.cbo.clone(), t.rule));
        alerts.push(alert(&t.cbo, t.rule, &t.evidence, true, now_ms, &links));
    }
    let engine = shared.engine();
    for cbo in shared.fleet.iter() {
        for rule in RuleId::ALL {
            let Some(t) = engine
                .state(&cbo.key, rule)
                .filter(|t| t.state == RuleState::Breached)
            else {
                continue;
            };
            let key = (cbo.key.clone(), rule);
            if memory
                .notified
                .get(&key)
                .is_some_and(|at| now_ms - at < RESEND_EVERY.as_millis() as i64)
            {
                continue;
            }
            memory.notified.insert(key, now_ms);
            alerts.push(alert(&cbo.key, rule, &t.evidence, false, now_ms, &links));
        }
    }
    drop(engine);
    shared.actions.notify(alerts);
}

/// Rules whose breach is a rollback trigger (and so fails a validation window at once).
const TRIGGERS: [RuleId; 5] = [
    RuleId::SuccessRate,
    RuleId::BadRequests,
    RuleId::TaskrouterErrorRate,
    RuleId::ConfigCorruption,
    RuleId::CrossCbo,
];

fn validate(shared: &Shared, statuses: &[(String, crate::health::TaskRouterStatus)], now_ms: i64) {
    // Replicas: the leader judges the windows; the others read its verdicts (and every
    // replica sees windows started through another).
    let leading = shared.actions.leading();
    shared.validations.refresh(leading, now_ms);
    if !leading {
        return;
    }
    let stats = |cbo: &str, since: i64| {
        shared
            .fleet
            .get(cbo)
            .map(|c| c.stats_since(now_ms, since))
            .unwrap_or_default()
    };
    let config_ok = |cbo: &str| {
        statuses
            .iter()
            .find(|(k, _)| k == cbo)
            .and_then(|(_, s)| s.config_ok)
    };
    let triggers = |cbo: &str, since: i64| {
        let engine = shared.engine();
        TRIGGERS
            .into_iter()
            .filter(|r| {
                engine
                    .state(cbo, *r)
                    .is_some_and(|t| t.state == RuleState::Breached && t.changed_at_ms >= since)
            })
            .map(|r| r.as_str().to_string())
            .collect()
    };
    // With probes on, a window counts its test transfers (a quiet CBO's evidence).
    let probes = |cbo: &str, since: i64| {
        let on = shared.config().cbo(cbo).is_some_and(|c| c.probe.is_some());
        on.then(|| shared.fleet.get(cbo).map(|c| c.probes_since(since)))
            .flatten()
    };
    let ended = shared
        .validations
        .tick(now_ms, &stats, &probes, &config_ok, &triggers);
    let failing: Vec<_> = ended
        .iter()
        .filter(|v| v.state == crate::validation::State::Failed)
        .filter_map(|v| {
            let state = shared.fleet.get(&v.cbo)?;
            Some((v.id.clone(), state.failing(v.start_ms)))
        })
        .collect();
    shared.validations.set_failing(failing);
    for v in ended {
        let Some((_, tr)) = statuses.iter().find(|(k, _)| *k == v.cbo) else {
            continue;
        };
        match v.state {
            crate::validation::State::Passed => {
                // What was live through the whole window passed it.
                for (artifact, sid, since) in live(tr) {
                    if since <= v.start_ms {
                        shared.actions.learn(
                            &v.cbo,
                            artifact,
                            &sid,
                            Verdict::Good,
                            &format!("passed validation window {}", v.id),
                        );
                    }
                }
            }
            crate::validation::State::Failed => validation_failed(shared, &v, tr, now_ms),
            _ => {}
        }
    }
}

/// What is live on a CBO, as polling saw it: (artifact, SID, since when).
fn live(tr: &crate::health::TaskRouterStatus) -> Vec<(Artifact, String, i64)> {
    let mut out = Vec::new();
    if let (Some(b), Some(at)) = (&tr.latest_build, tr.latest_deployment_at_ms) {
        out.push((Artifact::Build, b.clone(), at));
    }
    if let (Some(c), Some(at)) = (&tr.latest_configuration, tr.latest_release_at_ms) {
        out.push((Artifact::PluginConfiguration, c.clone(), at));
    }
    out
}

/// A failed window acts (`validation.on_fail`) through the same pipeline as a breach: dry
/// run, once per deployment, cooldown, intent. Its rule is the first criterion it missed.
fn validation_failed(
    shared: &Shared,
    v: &crate::validation::Validation,
    tr: &crate::health::TaskRouterStatus,
    now_ms: i64,
) {
    use crate::validation::Verdict as Met;
    if let Some(why) = held(tr) {
        tracing::warn!(cbo = %v.cbo, id = %v.id, why, "validation failed; its action is held");
        return;
    }
    // The rule behind the failure: the trigger it names, else the first criterion its reason
    // names as missed (Bad Requests before a rate that they also pull down).
    let reason = v.reason.as_deref().unwrap_or("");
    let criterion = |name: &str| match name {
        "success_rate" => Some(RuleId::SuccessRate),
        "bad_requests" => Some(RuleId::BadRequests),
        "cold_completion_p95" => Some(RuleId::ColdTransferLatency),
        "notification_p95" => Some(RuleId::NotificationLatency),
        "history_preserved" => Some(RuleId::HistoryLoss),
        "configuration_sound" => Some(RuleId::ConfigCorruption),
        _ => None,
    };
    let named = reason
        .trim_start_matches("missed: ")
        .split(", ")
        .find_map(criterion);
    let rule = TRIGGERS
        .into_iter()
        .find(|t| reason.contains(&format!("{} breached", t.as_str())))
        .or(named)
        .or_else(|| {
            v.criteria
                .iter()
                .find(|c| c.verdict == Met::Missed)
                .and_then(|c| criterion(&c.name))
        })
        .unwrap_or(RuleId::SuccessRate);
    let kind = action_kind(shared.config().validation.on_fail);
    tracing::error!(cbo = %v.cbo, id = %v.id, deployment = %v.deployment, action = kind.as_str(), reason = v.reason.as_deref().unwrap_or(""), "deployment validation failed");
    let evidence = serde_json::json!({
        "validation": v.id, "deployment": v.deployment, "reason": v.reason,
        "criteria": v.criteria, "on_fail": kind.as_str(),
    });
    shared.actions.decide(Decision {
        cbo: v.cbo.clone(),
        rule,
        kind,
        evidence: with_failing(shared, &v.cbo, evidence, v.start_ms),
        deployment: tr.latest_deployment.clone(),
        decided_at: rfc3339(now_ms),
    });
}

/// A live build or plugin configuration that ran `deploy_window` without a rollback trigger
/// breaching is known good (Twilio's history covers the time before this daemon started).
fn learn_good(
    shared: &Shared,
    memory: &Memory,
    statuses: &[(String, crate::health::TaskRouterStatus)],
    now_ms: i64,
) {
    for (cbo, tr) in statuses {
        let window = shared
            .engine()
            .params(cbo, RuleId::CrossCbo)
            .map(|p| p.deploy_window)
            .unwrap_or(Duration::from_secs(3600));
        let breach = memory.last_breach.get(cbo).copied().unwrap_or(i64::MIN);
        for (artifact, sid, since) in live(tr) {
            if now_ms - since >= window.as_millis() as i64 && breach < since {
                shared.actions.learn(
                    cbo,
                    artifact,
                    &sid,
                    Verdict::Good,
                    &format!(
                        "live {} without a breach",
                        humantime::format_duration(window)
                    ),
                );
            }
        }
    }
}

fn decision(
    shared: &Shared,
    t: &Transition,
    kind: ActionKind,
    deployment: Option<String>,
    now_ms: i64,
) -> Decision {
    Decision {
        cbo: t.cbo.clone(),
        rule: t.rule,
        kind,
        evidence: with_failing(
            shared,
            &t.cbo,
            t.evidence.clone(),
            now_ms - t.params.window.as_millis() as i64,
        ),
        deployment,
        decided_at: rfc3339(now_ms),
    }
}

/// `evidence` with the CBO's failed transfers since `since_ms` (this deployment's only): up to
/// ten conversation SIDs with their errors, what Connie Support asks for.
fn with_failing(shared: &Shared, cbo: &str, mut evidence: Value, since_ms: i64) -> Value {
    let Some(state) = shared.fleet.get(cbo) else {
        return evidence;
    };
    let failing = state.failing(since_ms.max(state.judged_since()));
    if failing.is_empty() {
        return evidence;
    }
    let failing = serde_json::to_value(failing).expect("failures serialize");
    match evidence.as_object_mut() {
        Some(o) => {
            o.insert("failing_conversations".into(), failing);
        }
        None => {
            evidence = serde_json::json!({"measured": evidence, "failing_conversations": failing});
        }
    }
    evidence
}

/// Why a CBO's actions are held: a workflow problem known since start is the guard's own
/// configuration (or an old state), and a guard that is misconfigured for a CBO does not act
/// on it; on-call is paged through `config_mismatch`.
fn held(tr: &crate::health::TaskRouterStatus) -> Option<String> {
    (!tr.mismatch.is_empty()).then(|| {
        let what: Vec<String> = tr.mismatch.iter().map(|p| p.to_string()).collect();
        format!(
            "config_mismatch (present since transfer-guard started, not caused by a deployment): {}",
            what.join("; ")
        )
    })
}

fn act(
    shared: &Shared,
    t: &Transition,
    statuses: &[(String, crate::health::TaskRouterStatus)],
    now_ms: i64,
) {
    let tr = statuses.iter().find(|(k, _)| *k == t.cbo).map(|(_, s)| s);
    if t.params.action != RuleAction::Alert
        && let Some(why) = tr.and_then(held)
    {
        suppress(
            shared,
            t,
            tr.and_then(|s| s.latest_deployment.clone()),
            now_ms,
            why,
        );
        return;
    }
    let deployment = tr.and_then(|s| s.latest_deployment.clone());
    let kind = action_kind(t.params.action);
    if t.rule == RuleId::CrossCbo {
        // Page on-call always; roll back only the CBOs deployed recently (a common release).
        shared.actions.decide(decision(
            shared,
            t,
            ActionKind::Alert,
            deployment.clone(),
            now_ms,
        ));
        if kind == ActionKind::Alert {
            return;
        }
        // This guard's own rollback is not a common release.
        let own = tr.and_then(|s| s.latest_build.as_ref()).is_some_and(|b| {
            shared
                .actions
                .known_view(&t.cbo, Artifact::Build)
                .own
                .contains(b)
        });
        let recent = !own
            && tr
                .and_then(|s| s.latest_deployment_at_ms)
                .is_some_and(|at| now_ms - at < t.params.deploy_window.as_millis() as i64);
        if !recent {
            let why = format!(
                "no deployment younger than {} (a shared cause elsewhere, such as a Twilio incident)",
                humantime::format_duration(t.params.deploy_window)
            );
            suppress(shared, t, deployment, now_ms, why);
            return;
        }
    }
    shared
        .actions
        .decide(decision(shared, t, kind, deployment, now_ms));
}

/// Records that a breach's action was held back, and why.
fn suppress(shared: &Shared, t: &Transition, deployment: Option<String>, now_ms: i64, why: String) {
    let d = decision(shared, t, action_kind(t.params.action), deployment, now_ms);
    shared.actions.suppress(&d, why);
}

fn action_kind(action: RuleAction) -> ActionKind {
    match action {
        RuleAction::Rollback => ActionKind::Rollback,
        RuleAction::Disable => ActionKind::Disable,
        RuleAction::Alert => ActionKind::Alert,
    }
}

/// `config_corruption` that outlives its rollback by `escalate_after` turns transfers off.
fn escalate(
    shared: &Shared,
    memory: &mut Memory,
    statuses: &[(String, crate::health::TaskRouterStatus)],
    now_ms: i64,
) {
    let engine = shared.engine();
    for (cbo, tr) in statuses {
        let Some(t) = engine.state(cbo, RuleId::ConfigCorruption) else {
            continue;
        };
        let params = engine
            .params(cbo, RuleId::ConfigCorruption)
            .expect("every rule has params");
        if t.state != RuleState::Breached
            || held(tr).is_some()
            || params.action != RuleAction::Rollback
            || now_ms - t.changed_at_ms < params.escalate_after.as_millis() as i64
            || !memory.escalated.insert((cbo.clone(), t.changed_at_ms))
        {
            continue;
        }
        shared.actions.decide(Decision {
            cbo: cbo.clone(),
            rule: RuleId::ConfigCorruption,
            kind: ActionKind::Disable,
            evidence: serde_json::json!({
                "breached_since": rfc3339(t.changed_at_ms),
                "escalate_after": humantime::format_duration(params.escalate_after).to_string(),
                "measured": t.evidence,
            }),
            deployment: tr.latest_deployment.clone(),
            decided_at: rfc3339(now_ms),
        });
    }
}
