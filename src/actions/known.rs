//! What is known good and known bad per CBO (Serverless builds, Flex plugin configurations), and the one rule that picks a rollback target from it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a rollback puts back live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Artifact {
    /// A Serverless build (`ZB…`), live through a deployment of the environment.
    Build,
    /// A Flex plugin configuration (`FJ…`), live through a release.
    PluginConfiguration,
}

impl Artifact {
    pub const ALL: [Artifact; 2] = [Artifact::Build, Artifact::PluginConfiguration];

    pub fn as_str(self) -> &'static str {
        match self {
            Artifact::Build => "build",
            Artifact::PluginConfiguration => "plugin_configuration",
        }
    }

    pub fn parse(s: &str) -> Option<Artifact> {
        Artifact::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Good or bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Good,
    Bad,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Good => "good",
            Verdict::Bad => "bad",
        }
    }
}

/// One CBO's knowledge of one artifact kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub good: BTreeSet<String>,
    pub bad: BTreeSet<String>,
    /// Put back live by this guard's own rollbacks: never rolled back on the evidence that
    /// caused them (a breach on one pages and disables instead).
    pub own: BTreeSet<String>,
}

/// One entry of Twilio's history: what went live when (a deployment's build, a release's
/// configuration), and through which deployment or release.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub sid: String,
    pub since_ms: i64,
    pub via: String,
}

/// Why no rollback target was chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoTarget {
    #[error("nothing is live to roll back from")]
    NothingLive,
    #[error(
        "{0} is live because this guard rolled back to it: rolling back again cannot help (page and disable instead)"
    )]
    OwnRollback(String),
    #[error(
        "no {artifact} known good other than the live {current}: none passed a validation window or ran {window} without a breach, and none known bad may be a target"
    )]
    NoneGood {
        artifact: &'static str,
        current: String,
        window: String,
    },
}

impl View {
    /// The rollback target: the most recently live artifact that is known good (here, or by
    /// Twilio's history: live for `deploy_window` before something replaced it), is not the
    /// live one and is not known bad. `history` is newest first; its first entry is live.
    pub fn target(
        &self,
        artifact: Artifact,
        history: &[Live],
        deploy_window: Duration,
    ) -> Result<String, NoTarget> {
        let current = history.first().ok_or(NoTarget::NothingLive)?;
        if self.own.contains(&current.sid) {
            return Err(NoTarget::OwnRollback(current.sid.clone()));
        }
        let window = deploy_window.as_millis() as i64;
        history
            .windows(2)
            .map(|pair| (&pair[1], pair[0].since_ms - pair[1].since_ms))
            .filter(|(live, _)| live.sid != current.sid && !self.bad.contains(&live.sid))
            .find(|(live, lived_ms)| self.good.contains(&live.sid) || *lived_ms >= window)
            .map(|(live, _)| live.sid.clone())
            .ok_or_else(|| NoTarget::NoneGood {
                artifact: artifact.as_str(),
                current: current.sid.clone(),
                window: humantime::format_duration(deploy_window).to_string(),
            })
    }
}

/// Every CBO's knowledge, rebuilt from the decision log at start.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(with = "super::pairs")]
    views: BTreeMap<(String, Artifact), View>,
}

impl Ledger {
    pub fn view(&self, cbo: &str, artifact: Artifact) -> View {
        self.views
            .get(&(cbo.to_string(), artifact))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `sid` already has a verdict that `verdict` would not change.
    pub fn knows(&self, cbo: &str, artifact: Artifact, sid: &str, verdict: Verdict) -> bool {
        self.views
            .get(&(cbo.to_string(), artifact))
            .is_some_and(|v| {
                v.bad.contains(sid) || (verdict == Verdict::Good && v.good.contains(sid))
            })
    }

    /// Records a verdict; returns whether it is news (a bad artifact is never made good again).
    pub fn mark(&mut self, cbo: &str, artifact: Artifact, sid: &str, verdict: Verdict) -> bool {
        let v = self.views.entry((cbo.to_string(), artifact)).or_default();
        match verdict {
            Verdict::Good if v.bad.contains(sid) => false,
            Verdict::Good => v.good.insert(sid.to_string()),
            Verdict::Bad => {
                v.good.remove(sid);
                v.bad.insert(sid.to_string())
            }
        }
    }

    /// This guard's rollback made `sid` live.
    pub fn own(&mut self, cbo: &str, artifact: Artifact, sid: &str) {
        self.views
            .entry((cbo.to_string(), artifact))
            .or_default()
            .own
            .insert(sid.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;
    const WINDOW: Duration = Duration::from_secs(3600);

    fn live(sid: &str, since_ms: i64) -> Live {
        Live {
            sid: sid.into(),
            since_ms,
            via: format!("ZD-{sid}"),
        }
    }

    #[test]
    fn the_target_is_the_newest_build_that_ran_the_deploy_window() {
        let v = View::default();
        // b3 live now; b2 lived 10 minutes; b1 lived 5 hours.
        let history = [
            live("b3", 10 * H),
            live("b2", 10 * H - H / 6),
            live("b1", 5 * H),
        ];
        assert_eq!(v.target(Artifact::Build, &history, WINDOW).unwrap(), "b1");
    }

    #[test]
    fn a_build_that_passed_validation_is_a_target_however_short_it_lived() {
        let mut l = Ledger::default();
        l.mark("a", Artifact::Build, "b2", Verdict::Good);
        let history = [
            live("b3", 10 * H),
            live("b2", 10 * H - H / 6),
            live("b1", 5 * H),
        ];
        let v = l.view("a", Artifact::Build);
        assert_eq!(v.target(Artifact::Build, &history, WINDOW).unwrap(), "b2");
    }

    #[test]
    fn a_build_rolled_back_from_is_never_a_target() {
        let mut l = Ledger::default();
        l.mark("a", Artifact::Build, "b1", Verdict::Good);
        l.mark("a", Artifact::Build, "b1", Verdict::Bad);
        assert!(!l.mark("a", Artifact::Build, "b1", Verdict::Good));
        let history = [live("b2", 10 * H), live("b1", 2 * H)];
        let err = l
            .view("a", Artifact::Build)
            .target(Artifact::Build, &history, WINDOW)
            .unwrap_err();
        assert!(matches!(err, NoTarget::NoneGood { .. }), "{err}");
    }

    #[test]
    fn the_live_build_is_never_its_own_target_even_when_redeployed() {
        // b1 was live 5 h, b2 briefly, then b1 again (an earlier rollback): b1 is live now.
        let history = [
            live("b1", 10 * H),
            live("b2", 10 * H - 60_000),
            live("b1", 4 * H),
        ];
        let err = View::default()
            .target(Artifact::Build, &history, WINDOW)
            .unwrap_err();
        assert!(matches!(err, NoTarget::NoneGood { .. }), "{err}");
    }

    #[test]
    fn a_build_this_guard_rolled_back_to_is_not_rolled_back_again() {
        let mut l = Ledger::default();
        l.own("a", Artifact::Build, "b1");
        let history = [live("b1", 10 * H), live("b0", 2 * H)];
        let err = l
            .view("a", Artifact::Build)
            .target(Artifact::Build, &history, WINDOW)
            .unwrap_err();
        assert_eq!(err, NoTarget::OwnRollback("b1".into()));
    }
}
