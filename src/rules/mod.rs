//! Rules (SPEC §4): ids, the seed's defaults and overrides, the ok/pending/breached/inconclusive state machine, and evaluation of every CBO on a tick.

pub mod cross;
pub mod taskrouter;
pub mod transfer;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, RuleAction, RuleOverride, RulesSection};
use crate::health::TaskRouterStatus;
use crate::window::WindowStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleId {
    SuccessRate,
    BadRequests,
    TaskrouterErrorRate,
    ConfigCorruption,
    CrossCbo,
    ColdTransferLatency,
    NotificationLatency,
    HistoryLoss,
}

impl RuleId {
    pub const ALL: [RuleId; 8] = [
        RuleId::SuccessRate,
        RuleId::BadRequests,
        RuleId::TaskrouterErrorRate,
        RuleId::ConfigCorruption,
        RuleId::CrossCbo,
        RuleId::ColdTransferLatency,
        RuleId::NotificationLatency,
        RuleId::HistoryLoss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::SuccessRate => "success_rate",
            RuleId::BadRequests => "bad_requests",
            RuleId::TaskrouterErrorRate => "taskrouter_error_rate",
            RuleId::ConfigCorruption => "config_corruption",
            RuleId::CrossCbo => "cross_cbo",
            RuleId::ColdTransferLatency => "cold_transfer_latency",
            RuleId::NotificationLatency => "notification_latency",
            RuleId::HistoryLoss => "history_loss",
        }
    }

    pub fn parse(s: &str) -> Option<RuleId> {
        RuleId::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn override_in(self, rules: &RulesSection) -> Option<&RuleOverride> {
        let o = match self {
            RuleId::SuccessRate => &rules.success_rate,
            RuleId::BadRequests => &rules.bad_requests,
            RuleId::TaskrouterErrorRate => &rules.taskrouter_error_rate,
            RuleId::ConfigCorruption => &rules.config_corruption,
            RuleId::CrossCbo => &rules.cross_cbo,
            RuleId::ColdTransferLatency => &rules.cold_transfer_latency,
            RuleId::NotificationLatency => &rules.notification_latency,
            RuleId::HistoryLoss => &rules.history_loss,
        };
        o.as_ref().map(|o| o.get_ref())
    }
}

/// Every number a rule uses; defaults from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Params {
    pub threshold: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(rename = "for", with = "humantime_serde")]
    pub for_: Duration,
    pub min_samples: u64,
    pub minutes: u32,
    pub min_cbos: u32,
    #[serde(with = "humantime_serde")]
    pub deploy_window: Duration,
    #[serde(with = "humantime_serde")]
    pub escalate_after: Duration,
    #[serde(with = "humantime_serde")]
    pub horizon: Duration,
    pub fast_min_samples: u64,
    pub action: RuleAction,
}

const MIN: Duration = Duration::from_secs(60);

impl Params {
    /// The seed's numbers ("Rollback Triggers", "Success Metrics").
    pub fn default_for(rule: RuleId) -> Params {
        let base = Params {
            threshold: 0.0,
            window: 5 * MIN,
            for_: Duration::ZERO,
            min_samples: 0,
            minutes: 0,
            min_cbos: 0,
            deploy_window: 60 * MIN,
            escalate_after: 10 * MIN,
            horizon: 15 * MIN,
            fast_min_samples: 0,
            action: RuleAction::Alert,
        };
        match rule {
            // Busy CBOs: 20 finished transfers in 5 minutes, below 90 % for 15 minutes. Quiet
            // ones: 5 finished transfers over the seed's 15-minute horizon (SPEC §4).
            RuleId::SuccessRate => Params {
                threshold: 0.90,
                for_: 15 * MIN,
                min_samples: 5,
                fast_min_samples: 20,
                action: RuleAction::Rollback,
                ..base
            },
            RuleId::BadRequests => Params {
                minutes: 3,
                action: RuleAction::Rollback,
                ..base
            },
            RuleId::TaskrouterErrorRate => Params {
                threshold: 0.05,
                for_: 15 * MIN,
                min_samples: 20,
                action: RuleAction::Rollback,
                ..base
            },
            RuleId::ConfigCorruption => Params {
                action: RuleAction::Rollback,
                ..base
            },
            RuleId::CrossCbo => Params {
                min_cbos: 2,
                // Agent reports: at least `min_samples` from each of `min_cbos` CBOs within
                // the seed's 15 minutes.
                window: 15 * MIN,
                min_samples: 1,
                action: RuleAction::Rollback,
                ..base
            },
            RuleId::ColdTransferLatency => Params {
                threshold: 10.0,
                min_samples: 10,
                ..base
            },
            RuleId::NotificationLatency => Params {
                threshold: 5.0,
                min_samples: 10,
                ..base
            },
            RuleId::HistoryLoss => base,
        }
    }

    fn apply(mut self, o: &RuleOverride) -> Params {
        self.threshold = o.threshold.unwrap_or(self.threshold);
        self.window = o.window.unwrap_or(self.window);
        self.for_ = o.for_.unwrap_or(self.for_);
        self.min_samples = o.min_samples.unwrap_or(self.min_samples);
        self.minutes = o.minutes.unwrap_or(self.minutes);
        self.min_cbos = o.min_cbos.unwrap_or(self.min_cbos);
        self.deploy_window = o.deploy_window.unwrap_or(self.deploy_window);
        self.escalate_after = o.escalate_after.unwrap_or(self.escalate_after);
        self.horizon = o.horizon.unwrap_or(self.horizon);
        self.fast_min_samples = o.fast_min_samples.unwrap_or(self.fast_min_samples);
        self.action = o.action.unwrap_or(self.action);
        self
    }

    /// Defaults, then `[rules.<id>]`, then `[cbo.rules.<id>]`.
    pub fn resolve(rule: RuleId, global: &RulesSection, cbo: &RulesSection) -> Params {
        let mut p = Params::default_for(rule);
        if let Some(o) = rule.override_in(global) {
            p = p.apply(o);
        }
        if let Some(o) = rule.override_in(cbo) {
            p = p.apply(o);
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleState {
    Ok,
    Pending,
    Breached,
    Inconclusive,
}

impl RuleState {
    pub const ALL: [RuleState; 4] = [
        RuleState::Ok,
        RuleState::Pending,
        RuleState::Breached,
        RuleState::Inconclusive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleState::Ok => "ok",
            RuleState::Pending => "pending",
            RuleState::Breached => "breached",
            RuleState::Inconclusive => "inconclusive",
        }
    }
}

/// What a rule's condition says at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    True,
    /// True, and the evidence already spans the rule's horizon: breached without waiting for
    /// `for` (the horizon covers it).
    Held,
    False,
    /// Too few samples, or no fresh data: no decision either way.
    Inconclusive,
}

/// A condition with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub cond: Cond,
    pub evidence: Value,
}

/// One rule of one CBO over time, as Prometheus keeps an alert: the state, since when the
/// condition has held, and when the state last changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tracked {
    pub state: RuleState,
    #[serde(skip)]
    pub holding_since_ms: Option<i64>,
    #[serde(skip)]
    pub changed_at_ms: i64,
    pub evidence: Value,
}

impl Tracked {
    pub fn new(now_ms: i64) -> Tracked {
        Tracked {
            state: RuleState::Ok,
            holding_since_ms: None,
            changed_at_ms: now_ms,
            evidence: Value::Null,
        }
    }

    /// Advances by one evaluation; returns the previous state when it changed.
    pub fn step(&mut self, verdict: Verdict, for_: Duration, now_ms: i64) -> Option<RuleState> {
        let next = match verdict.cond {
            Cond::Held => {
                self.holding_since_ms.get_or_insert(now_ms);
                RuleState::Breached
            }
            Cond::True => {
                let since = *self.holding_since_ms.get_or_insert(now_ms);
                if now_ms - since >= for_.as_millis() as i64 {
                    RuleState::Breached
                } else {
                    RuleState::Pending
                }
            }
            Cond::False => {
                self.holding_since_ms = None;
                RuleState::Ok
            }
            Cond::Inconclusive => {
                self.holding_since_ms = None;
                RuleState::Inconclusive
            }
        };
        self.evidence = verdict.evidence;
        if next == self.state {
            return None;
        }
        let was = self.state;
        self.state = next;
        self.changed_at_ms = now_ms;
        Some(was)
    }
}

/// What one CBO's rules read at one moment.
pub struct Inputs<'a> {
    pub stats: &'a dyn Fn(Duration) -> WindowStats,
    pub taskrouter: &'a TaskRouterStatus,
    /// Agents' reports of failing transfers (the last hour, oldest first).
    pub reports: &'a [crate::state::Report],
    pub poll_interval: Duration,
    pub now_ms: i64,
}

/// The verdict of a per-CBO rule (every rule but `cross_cbo`).
pub fn evaluate(rule: RuleId, p: &Params, i: &Inputs) -> Verdict {
    match rule {
        RuleId::SuccessRate => transfer::success_rate(p, i.stats),
        RuleId::BadRequests => transfer::bad_requests(p, &(i.stats)(p.window)),
        RuleId::ColdTransferLatency => transfer::cold_latency(p, &(i.stats)(p.window)),
        RuleId::NotificationLatency => transfer::notification_latency(p, &(i.stats)(p.window)),
        RuleId::HistoryLoss => transfer::history_loss(p, &(i.stats)(p.window)),
        RuleId::TaskrouterErrorRate => {
            taskrouter::error_rate(p, i.taskrouter, i.poll_interval, i.now_ms)
        }
        RuleId::ConfigCorruption => taskrouter::corruption(i.taskrouter),
        RuleId::CrossCbo => unreachable!("cross_cbo is evaluated across CBOs"),
    }
}

/// A rule's state change on one CBO.
#[derive(Debug, Clone)]
pub struct Transition {
    pub cbo: String,
    pub rule: RuleId,
    pub from: RuleState,
    pub to: RuleState,
    pub evidence: Value,
    pub params: Params,
}

/// Every CBO's rule states.
pub struct Engine {
    params: BTreeMap<(String, RuleId), Params>,
    tracked: BTreeMap<(String, RuleId), Tracked>,
}

impl Engine {
    pub fn new(config: &Config, now_ms: i64) -> Engine {
        let mut engine = Engine {
            params: BTreeMap::new(),
            tracked: BTreeMap::new(),
        };
        engine.reconfigure(config, now_ms);
        engine
    }

    /// Takes the rules and thresholds of `config`: each CBO's rules keep their state (a breach
    /// still standing is judged again at the next tick, on the new thresholds), new CBOs start
    /// ok, removed ones are dropped.
    pub fn reconfigure(&mut self, config: &Config, now_ms: i64) {
        let mut params = BTreeMap::new();
        for cbo in &config.cbos {
            for rule in RuleId::ALL {
                let key = (cbo.key.to_string(), rule);
                params.insert(key, Params::resolve(rule, &config.rules, &cbo.rules));
            }
        }
        self.tracked.retain(|key, _| params.contains_key(key));
        for key in params.keys() {
            self.tracked
                .entry(key.clone())
                .or_insert_with(|| Tracked::new(now_ms));
        }
        self.params = params;
    }

    /// Resumes each rule in the state the decision log last recorded for it (cbo, rule,
    /// state), when that state holds no timer: ok or inconclusive. A restart then logs only
    /// what changes. Pending and breached rules start over from ok and are judged afresh.
    /// Returns the rules resumed in another state than ok.
    pub fn resume<'a>(
        &mut self,
        states: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Vec<(String, RuleId, RuleState)> {
        let mut out = Vec::new();
        for (cbo, rule, state) in states {
            let Some(rule) = RuleId::parse(rule) else {
                continue;
            };
            let state = match state {
                "inconclusive" => RuleState::Inconclusive,
                _ => continue,
            };
            if let Some(t) = self.tracked.get_mut(&(cbo.to_string(), rule)) {
                t.state = state;
                out.push((cbo.to_string(), rule, state));
            }
        }
        out
    }

    /// The rules whose condition holds now, and since when: their `for` timers, for a
    /// checkpoint.
    pub fn timers(&self) -> Vec<(String, RuleId, i64)> {
        self.tracked
            .iter()
            .filter_map(|((cbo, rule), t)| t.holding_since_ms.map(|s| (cbo.clone(), *rule, s)))
            .collect()
    }

    /// Resumes each rule whose condition held before a restart (cbo, rule, since when):
    /// pending, its `for` timer running from then. A rule that had breached is pending too, so
    /// the next tick decides it again (its action, if it already fired, is not repeated:
    /// once-per-deployment). Returns the rules resumed, as `resume` does.
    pub fn resume_timers<'a>(
        &mut self,
        timers: impl IntoIterator<Item = (&'a str, &'a str, i64)>,
        now_ms: i64,
    ) -> Vec<(String, RuleId, RuleState)> {
        let mut out = Vec::new();
        for (cbo, rule, since_ms) in timers {
            let Some(rule) = RuleId::parse(rule) else {
                continue;
            };
            if let Some(t) = self.tracked.get_mut(&(cbo.to_string(), rule)) {
                t.state = RuleState::Pending;
                t.holding_since_ms = Some(since_ms);
                t.changed_at_ms = now_ms;
                out.push((cbo.to_string(), rule, RuleState::Pending));
            }
        }
        out
    }

    pub fn params(&self, cbo: &str, rule: RuleId) -> Option<&Params> {
        self.params.get(&(cbo.to_string(), rule))
    }

    pub fn state(&self, cbo: &str, rule: RuleId) -> Option<&Tracked> {
        self.tracked.get(&(cbo.to_string(), rule))
    }

    pub fn states(&self, cbo: &str) -> BTreeMap<&'static str, Tracked> {
        RuleId::ALL
            .iter()
            .filter_map(|r| self.state(cbo, *r).map(|t| (r.as_str(), t.clone())))
            .collect()
    }

    /// A new deployment of `cbo` took effect: its pending and breached rules start again from
    /// ok, so it is judged on its own evidence (the old evidence is out of its windows).
    pub fn restart(&mut self, cbo: &str, now_ms: i64, evidence: &Value) -> Vec<Transition> {
        let mut out = Vec::new();
        for rule in RuleId::ALL {
            let key = (cbo.to_string(), rule);
            let (Some(t), Some(params)) = (self.tracked.get_mut(&key), self.params.get(&key))
            else {
                continue;
            };
            if matches!(t.state, RuleState::Pending | RuleState::Breached) {
                let from = t.state;
                *t = Tracked::new(now_ms);
                t.evidence = evidence.clone();
                out.push(Transition {
                    cbo: cbo.to_string(),
                    rule,
                    from,
                    to: RuleState::Ok,
                    evidence: evidence.clone(),
                    params: *params,
                });
            }
        }
        out
    }

    /// Evaluates every rule of every CBO at `now_ms`; `inputs(cbo)` gives what one CBO's rules
    /// read. A pure function of the inputs and the time.
    pub fn tick<'a>(
        &mut self,
        cbos: impl IntoIterator<Item = (&'a str, Inputs<'a>)>,
        now_ms: i64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let mut breached_any: Vec<(String, Value)> = Vec::new();
        let mut reporting: Vec<(String, Value)> = Vec::new();
        let mut all: Vec<String> = Vec::new();
        for (cbo, inputs) in cbos {
            // A CBO a reload added or removed since the caller looked is judged from the next
            // tick on (or no more).
            let Some(cross) = self
                .params
                .get(&(cbo.to_string(), RuleId::CrossCbo))
                .copied()
            else {
                continue;
            };
            all.push(cbo.to_string());
            let since = now_ms - cross.window.as_millis() as i64;
            let recent: Vec<_> = inputs.reports.iter().filter(|r| r.at_ms >= since).collect();
            if !recent.is_empty() && recent.len() as u64 >= cross.min_samples.max(1) {
                reporting.push((cbo.to_string(), serde_json::json!(recent)));
            }
            for rule in RuleId::ALL.into_iter().filter(|r| *r != RuleId::CrossCbo) {
                let key = (cbo.to_string(), rule);
                let params = self.params[&key];
                let verdict = evaluate(rule, &params, &Inputs { now_ms, ..inputs });
                let t = self
                    .tracked
                    .get_mut(&key)
                    .expect("every cbo has every rule");
                if let Some(from) = t.step(verdict, params.for_, now_ms) {
                    out.push(Transition {
                        cbo: cbo.to_string(),
                        rule,
                        from,
                        to: t.state,
                        evidence: t.evidence.clone(),
                        params,
                    });
                }
            }
            let breached: Vec<&str> = [RuleId::SuccessRate, RuleId::BadRequests]
                .into_iter()
                .filter(|r| self.tracked[&(cbo.to_string(), *r)].state == RuleState::Breached)
                .map(RuleId::as_str)
                .collect();
            if !breached.is_empty() {
                breached_any.push((cbo.to_string(), serde_json::json!(breached)));
            }
        }
        for cbo in all {
            let key = (cbo.clone(), RuleId::CrossCbo);
            let params = self.params[&key];
            let verdict = cross::verdict(&params, &cbo, &breached_any, &reporting);
            let t = self
                .tracked
                .get_mut(&key)
                .expect("every cbo has every rule");
            if let Some(from) = t.step(verdict, params.for_, now_ms) {
                out.push(Transition {
                    cbo,
                    rule: RuleId::CrossCbo,
                    from,
                    to: t.state,
                    evidence: t.evidence.clone(),
                    params,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(cond: Cond) -> Verdict {
        Verdict {
            cond,
            evidence: Value::Null,
        }
    }

    #[test]
    fn a_condition_is_pending_until_its_for_elapses_then_breached() {
        let mut t = Tracked::new(0);
        let for_ = Duration::from_secs(900);
        assert_eq!(t.step(v(Cond::True), for_, 0), Some(RuleState::Ok));
        assert_eq!(t.state, RuleState::Pending);
        assert_eq!(t.step(v(Cond::True), for_, 899_999), None);
        assert_eq!(t.state, RuleState::Pending);
        t.step(v(Cond::True), for_, 900_000);
        assert_eq!(t.state, RuleState::Breached);
    }

    #[test]
    fn an_interruption_restarts_the_for() {
        let mut t = Tracked::new(0);
        let for_ = Duration::from_secs(60);
        t.step(v(Cond::True), for_, 0);
        t.step(v(Cond::Inconclusive), for_, 30_000);
        t.step(v(Cond::True), for_, 40_000);
        t.step(v(Cond::True), for_, 90_000);
        assert_eq!(t.state, RuleState::Pending);
        t.step(v(Cond::True), for_, 100_000);
        assert_eq!(t.state, RuleState::Breached);
        t.step(v(Cond::False), for_, 101_000);
        assert_eq!(t.state, RuleState::Ok);
    }

    #[test]
    fn overrides_apply_global_then_per_cbo() {
        let global: RulesSection =
            toml::from_str("[success_rate]\nthreshold = 0.8\nfor = \"5m\"\n").unwrap();
        let cbo: RulesSection = toml::from_str("[success_rate]\nthreshold = 0.7\n").unwrap();
        let p = Params::resolve(RuleId::SuccessRate, &global, &cbo);
        assert_eq!((p.threshold, p.for_, p.window), (0.7, 5 * MIN, 5 * MIN));
        let d = Params::resolve(
            RuleId::SuccessRate,
            &RulesSection::default(),
            &RulesSection::default(),
        );
        assert_eq!(
            (
                d.threshold,
                d.for_,
                d.min_samples,
                d.fast_min_samples,
                d.horizon
            ),
            (0.90, 15 * MIN, 5, 20, 15 * MIN)
        );
    }
}
