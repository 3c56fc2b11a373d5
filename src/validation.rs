//! Post-deploy validation windows (SPEC §6): the seed's success metrics over a window after a deployment, failed at once by a rollback trigger, kept across restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::metrics::Metrics;
use crate::window::WindowStats;

pub const FILE_NAME: &str = "validations.json";

/// The seed's "Success Metrics" as validation thresholds.
pub const MIN_SUCCESS_RATE: f64 = 0.95;
pub const MAX_COLD_P95: f64 = 10.0;
pub const MAX_NOTIFICATION_P95: f64 = 5.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Passed,
    Failed,
    Inconclusive,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Running,
        State::Passed,
        State::Failed,
        State::Inconclusive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Passed => "passed",
            State::Failed => "failed",
            State::Inconclusive => "inconclusive",
        }
    }
}

/// One criterion's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    Missed,
    /// Nothing measured yet (no cold transfer, no notification).
    NoData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Criterion {
    pub name: String,
    /// What was measured, as shown (`97.4 %`, `0`, `6.1 s`).
    pub value: String,
    pub threshold: String,
    pub verdict: Verdict,
}

/// What a window has measured; kept with the window so a restart loses nothing before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub completed: u64,
    pub decided: u64,
    pub bad_requests: u64,
    pub history_lost: u64,
    pub cold_p95: Option<f64>,
    pub notification_p95: Option<f64>,
    pub config_ok: Option<bool>,
    /// Test transfers (when the CBO has probes): how many ran, how many were routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<(u64, u64)>,
}

/// Criteria that cannot recover within a window once missed: a Bad Request, a lost history,
/// a test transfer TaskRouter did not route (the seed: validation failed, roll back now).
const FINAL: [&str; 3] = ["bad_requests", "history_preserved", "test_transfers_routed"];

/// A CBO's test transfers since an instant: `None` without probes, else (ran, routed).
pub type Probes<'a> = dyn Fn(&str, i64) -> Option<(u64, u64)> + 'a;

/// Test transfers that let a quiet CBO's window decide without `min_samples` transfers.
pub const MIN_PROBES: u64 = 5;

impl Measured {
    fn from_stats(
        s: &WindowStats,
        config_ok: Option<bool>,
        probes: Option<(u64, u64)>,
    ) -> Measured {
        Measured {
            completed: s.counts.completed,
            decided: s.counts.decided(),
            bad_requests: s.counts.bad_request + s.counts.taskrouter_bad_request,
            history_lost: s.counts.history_lost,
            cold_p95: s.cold_completion_p95,
            notification_p95: s.notification_p95,
            config_ok,
            probes,
        }
    }

    /// What was carried over a restart plus what was measured since. Counts add; a p95 takes
    /// the worse of the two (a bound, since the histograms of the first part are gone).
    fn plus(&self, later: &Measured) -> Measured {
        let worse = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Measured {
            completed: self.completed + later.completed,
            decided: self.decided + later.decided,
            bad_requests: self.bad_requests + later.bad_requests,
            history_lost: self.history_lost + later.history_lost,
            cold_p95: worse(self.cold_p95, later.cold_p95),
            notification_p95: worse(self.notification_p95, later.notification_p95),
            config_ok: later.config_ok.or(self.config_ok),
            probes: match (self.probes, later.probes) {
                (Some((a, b)), Some((c, d))) => Some((a + c, b + d)),
                (a, b) => b.or(a),
            },
        }
    }

    pub fn criteria(&self) -> Vec<Criterion> {
        let rate = (self.decided > 0).then(|| self.completed as f64 / self.decided as f64);
        let c = |name: &str, value: String, threshold: &str, verdict| Criterion {
            name: name.into(),
            value,
            threshold: threshold.into(),
            verdict,
        };
        let under = |v: Option<f64>, max: f64| match v {
            None => Verdict::NoData,
            Some(v) if v < max => Verdict::Met,
            Some(_) => Verdict::Missed,
        };
        let secs = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} s"));
        let probes = self.probes.map(|(n, routed)| {
            c(
                "test_transfers_routed",
                format!("{routed} of {n}"),
                "all",
                match (n, routed) {
                    (0, _) => Verdict::NoData,
                    (n, r) if r == n => Verdict::Met,
                    _ => Verdict::Missed,
                },
            )
        });
        let mut criteria = vec![
            c(
                "success_rate",
                rate.map_or("-".into(), |r| {
                    format!("{:.1} % of {}", r * 100.0, self.decided)
                }),
                "> 95 %",
                match rate {
                    None => Verdict::NoData,
                    Some(r) if r > MIN_SUCCESS_RATE => Verdict::Met,
                    Some(_) => Verdict::Missed,
                },
            ),
            c(
                "bad_requests",
                self.bad_requests.to_string(),
                "0",
                if self.bad_requests == 0 {
                    Verdict::Met
                } else {
                    Verdict::Missed
                },
            ),
            c(
                "cold_completion_p95",
                secs(self.cold_p95),
                "< 10 s",
                under(self.cold_p95, MAX_COLD_P95),
            ),
            c(
                "notification_p95",
                secs(self.notification_p95),
                "< 5 s",
                under(self.notification_p95, MAX_NOTIFICATION_P95),
            ),
            c(
                "history_preserved",
                if self.completed == 0 {
                    "-".into()
                } else {
                    format!(
                        "{:.1} %",
                        100.0 * (1.0 - self.history_lost as f64 / self.completed as f64)
                    )
                },
                "100 %",
                if self.history_lost == 0 {
                    Verdict::Met
                } else {
                    Verdict::Missed
                },
            ),
            c(
                "configuration_sound",
                match self.config_ok {
                    Some(true) => "sound".into(),
                    Some(false) => "corrupted".into(),
                    None => "unknown".into(),
                },
                "sound",
                match self.config_ok {
                    Some(true) => Verdict::Met,
                    Some(false) => Verdict::Missed,
                    None => Verdict::NoData,
                },
            ),
        ];
        criteria.extend(probes);
        criteria
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub id: String,
    pub cbo: String,
    pub deployment: String,
    /// `api` or `deployment_seen`.
    pub started_by: String,
    pub state: State,
    pub start: String,
    pub end: String,
    pub start_ms: i64,
    pub end_ms: i64,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub min_samples: u64,
    pub criteria: Vec<Criterion>,
    pub reason: Option<String>,
    /// What was measured before the last restart, and from when measuring resumed.
    #[serde(default)]
    pub carried: Measured,
    #[serde(default)]
    pub resumed_ms: Option<i64>,
    #[serde(default)]
    pub measured: Measured,
    /// A failed window's failed transfers (up to ten): conversation SID and error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<crate::state::Failing>,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("validations {path}: {message}")]
    Store { path: PathBuf, message: String },
}

/// Every validation window, persisted in `state_dir/validations.json`.
pub struct Validations {
    path: PathBuf,
    windows: Mutex<BTreeMap<String, Validation>>,
    metrics: Arc<Metrics>,
    /// Replicas: the windows live in the store (`tg_validations`); the leader judges them,
    /// and every replica reads them.
    store: Option<Arc<crate::pg::Store>>,
}

impl Validations {
    /// Loads what the state directory holds. A running window that started since
    /// `whole_since_ms` (the restored windows hold everything since then) is measured from
    /// the windows alone, as if there had been no restart; an older one resumes measuring now,
    /// carrying what it had measured.
    pub fn open(
        state_dir: &Path,
        now_ms: i64,
        whole_since_ms: Option<i64>,
        metrics: Arc<Metrics>,
        store: Option<Arc<crate::pg::Store>>,
    ) -> Result<Validations, ValidationError> {
        let path = state_dir.join(FILE_NAME);
        let err = |message: String| ValidationError::Store {
            path: path.clone(),
            message,
        };
        let mut windows: BTreeMap<String, Validation> = match &store {
            Some(store) => {
                let rows = store
                    .load_validations(now_ms - KEEP_FOR_MS)
                    .map_err(|e| err(format!("the store: {e}")))?;
                rows.iter()
                    .filter_map(|r| serde_json::from_str::<Validation>(r).ok())
                    .map(|v| (v.id.clone(), v))
                    .collect()
            }
            None => match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(err(e.to_string())),
            },
        };
        for v in windows.values_mut().filter(|v| v.state == State::Running) {
            if whole_since_ms.is_some_and(|since| v.resumed_ms.unwrap_or(v.start_ms) >= since) {
                // The windows hold what it had measured: measured again from them.
                v.measured = Measured::default();
                continue;
            }
            v.carried = v.carried.plus(&v.measured);
            v.measured = Measured::default();
            v.resumed_ms = Some(now_ms);
        }
        let cbos: Vec<String> = windows.values().map(|v| v.cbo.clone()).collect();
        let this = Validations {
            path,
            windows: Mutex::new(windows),
            metrics,
            store,
        };
        let windows = this.lock();
        for cbo in cbos {
            this.publish(&windows, &cbo);
        }
        drop(windows);
        Ok(this)
    }

    /// Sets `validation_state` of `cbo` from its latest window; called when a window starts or ends.
    fn publish(&self, windows: &BTreeMap<String, Validation>, cbo: &str) {
        let Some(latest) = windows
            .values()
            .filter(|v| v.cbo == cbo)
            .max_by_key(|v| v.start_ms)
        else {
            return;
        };
        if let Some(m) = self.metrics.cbo(cbo) {
            m.set_validation(latest.state);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Validation>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the windows `changed` (ids): the whole set written atomically to the file
    /// (temporary file, fsync, rename); with replicas, those windows written to the store.
    fn save(
        &self,
        windows: &BTreeMap<String, Validation>,
        changed: &[String],
    ) -> Result<(), ValidationError> {
        if let Some(store) = &self.store {
            let rows = changed
                .iter()
                .filter_map(|id| windows.get(id))
                .map(|v| {
                    let body = serde_json::to_string(v).expect("a window serializes");
                    (v.id.clone(), v.cbo.clone(), v.start_ms, body)
                })
                .collect();
            return store
                .save_validations(rows)
                .map_err(|message| ValidationError::Store {
                    path: PathBuf::from("the store's tg_validations"),
                    message,
                });
        }
        let bytes = serde_json::to_vec_pretty(windows).expect("validations serialize");
        crate::store::write_atomic(&self.path, &bytes).map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save validation windows");
            ValidationError::Store {
                path: self.path.clone(),
                message: e.to_string(),
            }
        })
    }

    /// Starts a window (pruning old finished ones first: the file is rewritten whole).
    pub fn start(
        &self,
        cbo: &str,
        deployment: &str,
        duration: Duration,
        min_samples: u64,
        started_by: &str,
        now_ms: i64,
    ) -> Result<Validation, ValidationError> {
        let mut windows = self.lock();
        prune(&mut windows, now_ms);
        let mut n = windows.len() + 1;
        let mut id = format!("v{now_ms}-{n}");
        while windows.contains_key(&id) {
            n += 1;
            id = format!("v{now_ms}-{n}");
        }
        let end_ms = now_ms + duration.as_millis() as i64;
        let v = Validation {
            id: id.clone(),
            cbo: cbo.into(),
            deployment: deployment.into(),
            started_by: started_by.into(),
            state: State::Running,
            start: rfc3339(now_ms),
            end: rfc3339(end_ms),
            start_ms: now_ms,
            end_ms,
            duration,
            min_samples,
            criteria: Measured::default().criteria(),
            reason: None,
            carried: Measured::default(),
            resumed_ms: None,
            measured: Measured::default(),
            failing: Vec::new(),
        };
        windows.insert(id.clone(), v.clone());
        // A window that cannot be kept across a restart is not started.
        if let Err(e) = self.save(&windows, std::slice::from_ref(&id)) {
            windows.remove(&id);
            return Err(e);
        }
        self.publish(&windows, cbo);
        tracing::info!(cbo, deployment, id = %v.id, end = %v.end, started_by, "validation window started");
        Ok(v)
    }

    /// Replicas, at each tick: takes the windows in the store. Windows started elsewhere are
    /// added; a follower takes the leader's verdicts, the leader keeps its own (it writes them).
    pub fn refresh(&self, leading: bool, now_ms: i64) {
        let Some(store) = &self.store else {
            return;
        };
        let Ok(rows) = store.load_validations(now_ms - KEEP_FOR_MS) else {
            return;
        };
        let mut windows = self.lock();
        let mut cbos = std::collections::BTreeSet::new();
        for v in rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Validation>(r).ok())
        {
            if leading && windows.contains_key(&v.id) {
                continue;
            }
            if windows.get(&v.id) != Some(&v) {
                cbos.insert(v.cbo.clone());
                windows.insert(v.id.clone(), v);
            }
        }
        for cbo in cbos {
            self.publish(&windows, &cbo);
        }
    }

    pub fn get(&self, id: &str) -> Option<Validation> {
        self.lock().get(id).cloned()
    }

    pub fn list(&self, cbo: Option<&str>) -> Vec<Validation> {
        self.lock()
            .values()
            .filter(|v| cbo.is_none_or(|c| v.cbo == c))
            .cloned()
            .collect()
    }

    /// Ends `cbo`'s running windows of other deployments as inconclusive: a newer deployment
    /// took effect, so what they judged is no longer live.
    pub fn supersede(&self, cbo: &str, deployment: &str, now_ms: i64) {
        self.end_running(
            cbo,
            |v| v.deployment != deployment,
            &format!("superseded: deployment {deployment} took effect"),
            now_ms,
        );
    }

    /// Ends `cbo`'s running windows as inconclusive for `why` (its CBO was removed by a reload):
    /// a pipeline waiting on one gets its answer instead of waiting out the window.
    pub fn withdraw(&self, cbo: &str, why: &str, now_ms: i64) {
        self.end_running(cbo, |_| true, why, now_ms);
    }

    fn end_running(&self, cbo: &str, which: impl Fn(&Validation) -> bool, why: &str, now_ms: i64) {
        let mut windows = self.lock();
        let mut ended = Vec::new();
        for v in windows
            .values_mut()
            .filter(|v| v.cbo == cbo && v.state == State::Running && which(v))
        {
            v.state = State::Inconclusive;
            v.reason = Some(why.to_string());
            v.end_ms = now_ms;
            v.end = rfc3339(now_ms);
            ended.push(v.id.clone());
            tracing::warn!(id = %v.id, cbo, deployment = %v.deployment, why, "validation window ended");
        }
        if !ended.is_empty() {
            self.publish(&windows, cbo);
            let _ = self.save(&windows, &ended);
        }
    }

    /// Records failed windows' failed transfers, with one save for all of them (a storm ends
    /// a thousand windows in one tick; the file is rewritten whole).
    pub fn set_failing(&self, failing: Vec<(String, Vec<crate::state::Failing>)>) {
        if failing.is_empty() {
            return;
        }
        let mut windows = self.lock();
        let mut changed = Vec::new();
        for (id, f) in failing {
            if let Some(v) = windows.get_mut(&id) {
                v.failing = f;
                changed.push(id);
            }
        }
        if !changed.is_empty() {
            let _ = self.save(&windows, &changed);
        }
    }

    /// Whether a window of `cbo` is running now.
    pub fn running(&self, cbo: &str) -> bool {
        self.lock()
            .values()
            .any(|v| v.cbo == cbo && v.state == State::Running)
    }

    /// Whether a window (running or ended) was ever opened for this deployment.
    pub fn exists_for(&self, cbo: &str, deployment: &str) -> bool {
        self.lock()
            .values()
            .any(|v| v.cbo == cbo && v.deployment == deployment)
    }

    /// Updates every running window at `now_ms`: `stats(cbo, since_ms)` reads a CBO's windows
    /// from `since_ms` on,
    /// `config_ok(cbo)` its configuration, `triggers(cbo, since_ms)` the rollback rules
    /// breached since `since_ms`. Returns the windows that ended.
    pub fn tick(
        &self,
        now_ms: i64,
        stats: &dyn Fn(&str, i64) -> WindowStats,
        probes: &Probes<'_>,
        config_ok: &dyn Fn(&str) -> Option<bool>,
        triggers: &dyn Fn(&str, i64) -> Vec<String>,
    ) -> Vec<Validation> {
        let mut windows = self.lock();
        let mut ended = Vec::new();
        for v in windows.values_mut().filter(|v| v.state == State::Running) {
            let s = stats(&v.cbo, v.resumed_ms.unwrap_or(v.start_ms));
            let since = v.resumed_ms.unwrap_or(v.start_ms);
            v.measured = Measured::from_stats(&s, config_ok(&v.cbo), probes(&v.cbo, since));
            let total = v.carried.plus(&v.measured);
            v.criteria = total.criteria();
            let missed = |name: &str| {
                v.criteria
                    .iter()
                    .any(|c| c.name == name && c.verdict == Verdict::Missed)
            };
            let fired = triggers(&v.cbo, v.start_ms);
            let (state, reason) = if !fired.is_empty() {
                (
                    State::Failed,
                    Some(format!("rollback trigger: {} breached", fired.join(", "))),
                )
            } else if FINAL.iter().any(|c| missed(c)) {
                // These cannot recover within the window: fail now.
                let which: Vec<&str> = v
                    .criteria
                    .iter()
                    .filter(|c| c.verdict == Verdict::Missed && FINAL.contains(&c.name.as_str()))
                    .map(|c| c.name.as_str())
                    .collect();
                (State::Failed, Some(format!("missed: {}", which.join(", "))))
            } else if now_ms < v.end_ms {
                (State::Running, None)
            } else if total.decided < v.min_samples
                && total.probes.is_none_or(|(n, _)| n < MIN_PROBES)
            {
                (
                    State::Inconclusive,
                    Some(crate::rules::transfer::missing(
                        total.decided,
                        v.min_samples,
                        "transfers",
                    )),
                )
            } else if v.criteria.iter().any(|c| c.verdict == Verdict::Missed) {
                let which: Vec<&str> = v
                    .criteria
                    .iter()
                    .filter(|c| c.verdict == Verdict::Missed)
                    .map(|c| c.name.as_str())
                    .collect();
                (State::Failed, Some(format!("missed: {}", which.join(", "))))
            } else {
                (State::Passed, None)
            };
            if state != State::Running {
                v.state = state;
                v.reason = reason;
                if now_ms < v.end_ms {
                    v.end_ms = now_ms;
                    v.end = rfc3339(now_ms);
                }
                tracing::warn!(id = %v.id, cbo = %v.cbo, deployment = %v.deployment, state = state.as_str(), reason = v.reason.as_deref().unwrap_or(""), "validation window ended");
                ended.push(v.clone());
            }
        }
        for v in &ended {
            self.publish(&windows, &v.cbo);
        }
        // Persist on endings, and every ten seconds while a window runs, so a restart loses little.
        let running: Vec<String> = windows
            .values()
            .filter(|v| v.state == State::Running)
            .map(|v| v.id.clone())
            .collect();
        if !ended.is_empty() || (!running.is_empty() && (now_ms / 1000) % 10 == 0) {
            let mut changed: Vec<String> = ended.iter().map(|v| v.id.clone()).collect();
            changed.extend(running);
            let _ = self.save(&windows, &changed);
        }
        ended
    }
}

/// Finished windows are kept this long, and at most `KEEP_MAX` of them; running windows and
/// each CBO's latest (`validation_state`) always stay.
const KEEP_FOR_MS: i64 = 7 * 24 * 3600 * 1000;
const KEEP_MAX: usize = 1000;

fn prune(windows: &mut BTreeMap<String, Validation>, now_ms: i64) {
    let mut latest: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
    for (id, v) in windows.iter() {
        let e = latest.entry(&v.cbo).or_insert((v.start_ms, id));
        if v.start_ms >= e.0 {
            *e = (v.start_ms, id);
        }
    }
    let keep: std::collections::HashSet<String> =
        latest.values().map(|(_, id)| id.to_string()).collect();
    let stays = |id: &str, v: &Validation| v.state == State::Running || keep.contains(id);
    windows.retain(|id, v| stays(id, v) || v.end_ms >= now_ms - KEEP_FOR_MS);
    if windows.len() > KEEP_MAX {
        let mut old: Vec<(i64, String)> = windows
            .iter()
            .filter(|(id, v)| !stays(id, v))
            .map(|(id, v)| (v.end_ms, id.clone()))
            .collect();
        old.sort();
        let excess = windows.len() - KEEP_MAX;
        for (_, id) in old.into_iter().take(excess) {
            windows.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_finished_windows_are_pruned_but_running_and_latest_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validations::open(dir.path(), 0, None, Arc::new(Metrics::new()), None).unwrap();
        let day = 24 * 3600 * 1000;
        let d = Duration::from_secs(60);
        // Ten days of windows on cbo a, one a day, each finished; one old running on b.
        let b = v.start("b", "old", d, 1, "api", 0).unwrap().id;
        for i in 0..10 {
            let id = v
                .start("a", &format!("d{i}"), d, 1, "api", i * day)
                .unwrap()
                .id;
            v.lock().get_mut(&id).unwrap().state = State::Passed;
        }
        let now = 10 * day;
        v.start("c", "new", d, 1, "api", now).unwrap();
        let windows = v.lock();
        let a: Vec<&str> = windows
            .values()
            .filter(|w| w.cbo == "a")
            .map(|w| w.deployment.as_str())
            .collect();
        // Within seven days (ended at or after day 3), and the latest.
        assert_eq!(a.len(), 7, "{a:?}");
        assert!(a.contains(&"d9") && !a.contains(&"d2"), "{a:?}");
        assert!(windows.contains_key(&b), "a running window stays");
        drop(windows);
        // The file holds the same.
        let reopened =
            Validations::open(dir.path(), now, None, Arc::new(Metrics::new()), None).unwrap();
        assert_eq!(reopened.list(None).len(), 9);
    }
}
