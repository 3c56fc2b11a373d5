//! One transfer, counted once, whatever number of sources saw it (SPEC §2b).
//!
//! The plugin's family (its events, and the functions' log lines) and TaskRouter's family
//! (its Events API, the workspace callback, Event Streams) report the same transfers under
//! different keys: the plugin under its transfer id or conversation SID, TaskRouter under the
//! task SID. A plugin event joins the task by `task_sid` when it carries one, else by the
//! conversation SID within `JOIN_WINDOW_MS` of `initiated`. Each transfer is then fed to the
//! tracker under one key, each kind of event once, so nothing counts twice.
//!
//! When sources disagree on the outcome, TaskRouter's wins: a plugin outcome for a transfer
//! TaskRouter already knows is held back (compared, not applied); one applied before TaskRouter
//! spoke is corrected when TaskRouter's differs (the windows that rules, validation windows and
//! the success ratio read move to TaskRouter's outcome; the counters, which cannot go down,
//! keep the first outcome, and `source_disagreements_total{kind="outcome"}` counts it).
//! A transfer only TaskRouter saw is `plugin_missing`; one only the plugin saw, while
//! TaskRouter's record covered its time, is `taskrouter_missing` (a Bad Request, which creates
//! no task, excepted).

use std::collections::VecDeque;

use crate::event::{ErrorClass, Event, EventKind, Source};
use crate::tracker::{Effect, Keyed, Outcome};

/// How far apart the plugin's `initiated` and TaskRouter's `task.created` of one transfer may be.
pub const JOIN_WINDOW_MS: i64 = 60_000;
/// How long a transfer's record is kept after it was first seen, past the transfer timeout:
/// late sources (a log file, the next poll) still join it in that time.
const KEEP_AFTER_TIMEOUT_MS: i64 = 120_000;

/// Disagreements between sources (`source_disagreements_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    Outcome,
    PluginMissing,
    TaskRouterMissing,
}

impl Disagreement {
    pub const ALL: [Disagreement; 3] = [
        Disagreement::Outcome,
        Disagreement::PluginMissing,
        Disagreement::TaskRouterMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Disagreement::Outcome => "outcome",
            Disagreement::PluginMissing => "plugin_missing",
            Disagreement::TaskRouterMissing => "taskrouter_missing",
        }
    }
}

/// What the caller does with one event.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Apply it to the tracker under this key (a 64-bit hash of the transfer's first name).
    Apply(u64),
    /// Nothing more to do (seen already, or held back; its effects, if any, are in `out`).
    Done,
}

/// What became of one transfer, as the tracker finished it.
#[derive(Debug, Clone, PartialEq)]
struct Finished {
    at_ms: i64,
    initiated_ms: Option<i64>,
    outcome: Outcome,
    class: Option<ErrorClass>,
    by_taskrouter: bool,
}

#[derive(Debug)]
struct Joined {
    /// The hash of its conversation SID.
    conversation: u64,
    /// Event time of the first `initiated`, from whichever source.
    initiated_ms: Option<i64>,
    /// Bit per `Source` that reported it.
    sources: u8,
    /// Bit per `EventKind` applied to the tracker.
    applied: u8,
    plugin_outcome: Option<Outcome>,
    taskrouter_outcome: Option<Outcome>,
    finished: Option<Finished>,
    bad_request: bool,
    /// Other keys this transfer is known by (removed with it).
    aliases: Vec<u64>,
    /// Insertion order: an `order` entry of an earlier transfer under the same key is stale.
    seq: u64,
    /// The plugin's outcome, held back while TaskRouter's is awaited; applied if TaskRouter's
    /// never comes before the transfer would time out (its record unreadable, say).
    held: Option<Box<Event>>,
}

/// The `Joined::sources` bits of TaskRouter's family and of the plugin's.
const TASKROUTER_BITS: u8 = (1 << Source::TaskRouterEvents as u8)
    | (1 << Source::TaskRouterCallback as u8)
    | (1 << Source::EventStreams as u8);
const PLUGIN_BITS: u8 = (1 << Source::Plugin as u8) | (1 << Source::ServerlessLogs as u8);

impl Joined {
    fn seen_by_taskrouter(&self) -> bool {
        self.sources & TASKROUTER_BITS != 0
    }

    fn seen_by_plugin(&self) -> bool {
        self.sources & PLUGIN_BITS != 0
    }
}

fn bit(source: Source) -> u8 {
    1 << (source as u8)
}

/// What the reconciler reports besides effects: the sources that saw a transfer for the first
/// time (a bit per `Source`), and disagreements by kind.
#[derive(Debug, Default, PartialEq)]
pub struct Counted {
    pub seen: u8,
    pub disagreements: [u32; 3],
}

impl Counted {
    fn disagree(&mut self, d: Disagreement) {
        self.disagreements[d as usize] += 1;
    }

    /// The sources that saw a transfer for the first time.
    pub fn seen(&self) -> impl Iterator<Item = Source> + '_ {
        Source::SEEING
            .into_iter()
            .filter(|s| self.seen & bit(*s) != 0)
    }
}

/// The join state of one CBO. Bounded: records leave after the transfer timeout plus two
/// minutes, and at most `max` are held.
pub struct Reconciler {
    /// Keys are 64-bit hashes of a transfer's names (task SID, transfer id or conversation
    /// SID) under a per-reconciler random seed, as in the tracker: no strings are kept.
    hasher: ahash::RandomState,
    transfers: Keyed<Joined>,
    alias: Keyed<u64>,
    /// The latest transfer of each conversation, for joining by conversation.
    by_conversation: Keyed<u64>,
    /// (first seen, daemon ms; `Joined::seq`; key), oldest first.
    order: VecDeque<(i64, u64, u64)>,
    next_seq: u64,
    max: usize,
    /// TaskRouter's record is complete up to this event time (the events poller's cursor).
    taskrouter_covered_ms: i64,
    /// Held plugin outcomes: (release at, event time; `Joined::seq`; key), in hold order.
    held: VecDeque<(i64, u64, u64)>,
    /// The transfer timeout in force (from the last sweep).
    timeout_ms: i64,
}

impl Reconciler {
    pub fn new(max: usize) -> Reconciler {
        Reconciler {
            hasher: ahash::RandomState::new(),
            transfers: Keyed::default(),
            alias: Keyed::default(),
            by_conversation: Keyed::default(),
            order: VecDeque::new(),
            next_seq: 0,
            max: max.max(16),
            taskrouter_covered_ms: i64::MIN,
            held: VecDeque::new(),
            timeout_ms: 300_000,
        }
    }

    /// Transfers whose sources are being joined now.
    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }

    /// TaskRouter's record has been read up to `at_ms` (event time).
    pub fn taskrouter_covered(&mut self, at_ms: i64) {
        self.taskrouter_covered_ms = self.taskrouter_covered_ms.max(at_ms);
    }

    /// The key `event` belongs under, joining sources; registers the transfer when new.
    /// An event is known by its task SID when it has one, and by its own key (transfer id or
    /// conversation SID) too.
    fn key_for(&mut self, event: &Event, now_ms: i64, counted: &mut Counted) -> u64 {
        let own = self.hasher.hash_one(event.transfer_key());
        let task = event
            .task_sid
            .as_ref()
            .map(|t| self.hasher.hash_one(t.as_str()));
        let (names, n) = match task {
            Some(t) if t != own => ([t, own], 2),
            Some(t) => ([t, t], 1),
            None => ([own, own], 1),
        };
        let names = &names[..n];
        let known = names.iter().find_map(|n| {
            let key = self.alias.get(n).copied().unwrap_or(*n);
            self.transfers
                .get(&key)
                .filter(|t| !self.restarted_record(t, event))
                .map(|_| key)
        });
        let key = match known {
            Some(key) => key,
            None => {
                // Keys whose transfer ended and began again: the old one is done with.
                for n in names {
                    let stale = self.alias.remove(n).unwrap_or(*n);
                    if self
                        .transfers
                        .get(&stale)
                        .is_some_and(|t| self.restarted_record(t, event))
                        && let Some(t) = self.remove(stale)
                    {
                        self.missing(&t, counted);
                    }
                }
                // A new transfer: join one of the other family started within the window.
                match (event.kind == EventKind::Initiated)
                    .then(|| self.partner(event))
                    .flatten()
                {
                    Some(other) => other,
                    None => {
                        self.insert(names[0], event, now_ms);
                        names[0]
                    }
                }
            }
        };
        for n in names {
            if *n != key && self.alias.get(n) != Some(&key) {
                self.add_alias(*n, key);
            }
        }
        key
    }

    /// A new `initiated` at another time under a key whose transfer already began: the
    /// conversation is transferred again.
    fn restarted_record(&self, t: &Joined, event: &Event) -> bool {
        event.kind == EventKind::Initiated
            && t.initiated_ms.is_some_and(|i| {
                // The same `initiated` again is a repeat, not a new transfer.
                i != event.timestamp_ms
                    && ((i - event.timestamp_ms).abs() > JOIN_WINDOW_MS
                        || (t.finished.is_some() && t.sources & bit(event.source) != 0))
            })
    }

    /// A transfer of the same conversation reported only by the other family, started within
    /// the join window of `event`.
    fn partner(&self, event: &Event) -> Option<u64> {
        let conversation = self.hasher.hash_one(event.conversation_sid.as_str());
        let key = *self.by_conversation.get(&conversation)?;
        let t = self.transfers.get(&key)?;
        let other = if event.source.is_taskrouter() {
            !t.seen_by_taskrouter()
        } else {
            !t.seen_by_plugin()
        };
        let near = t
            .initiated_ms
            .is_some_and(|i| (i - event.timestamp_ms).abs() <= JOIN_WINDOW_MS);
        (other && near).then_some(key)
    }

    fn add_alias(&mut self, alias: u64, key: u64) {
        self.alias.insert(alias, key);
        if let Some(t) = self.transfers.get_mut(&key) {
            t.aliases.push(alias);
        }
    }

    fn insert(&mut self, key: u64, event: &Event, now_ms: i64) {
        while self.transfers.len() >= self.max {
            let Some((_, seq, old)) = self.order.pop_front() else {
                break;
            };
            if self.transfers.get(&old).is_some_and(|t| t.seq == seq) {
                self.remove(old);
            }
        }
        self.next_seq += 1;
        let conversation = self.hasher.hash_one(event.conversation_sid.as_str());
        self.transfers.insert(
            key,
            Joined {
                conversation,
                initiated_ms: None,
                sources: 0,
                applied: 0,
                plugin_outcome: None,
                taskrouter_outcome: None,
                finished: None,
                bad_request: false,
                aliases: Vec::new(),
                seq: self.next_seq,
                held: None,
            },
        );
        self.by_conversation.insert(conversation, key);
        self.order.push_back((now_ms, self.next_seq, key));
    }

    fn remove(&mut self, key: u64) -> Option<Joined> {
        let t = self.transfers.remove(&key)?;
        for a in &t.aliases {
            if self.alias.get(a) == Some(&key) {
                self.alias.remove(a);
            }
        }
        if self.by_conversation.get(&t.conversation) == Some(&key) {
            self.by_conversation.remove(&t.conversation);
        }
        Some(t)
    }

    /// Decides what `event` does. Effects that need no tracker (a held-back plugin outcome's
    /// lost history, a correction) go to `out`.
    pub fn route(
        &mut self,
        event: &Event,
        now_ms: i64,
        out: &mut Vec<Effect>,
        counted: &mut Counted,
    ) -> Route {
        if event.source == Source::Probe {
            return Route::Apply(self.hasher.hash_one(event.transfer_key()));
        }
        let key = self.key_for(event, now_ms, counted);
        let t = self.transfers.get_mut(&key).expect("registered by key_for");
        if t.sources & bit(event.source) == 0 {
            t.sources |= bit(event.source);
            counted.seen |= bit(event.source);
        }
        if event.kind == EventKind::Initiated && t.initiated_ms.is_none() {
            t.initiated_ms = Some(event.timestamp_ms);
        }
        if event
            .error
            .as_ref()
            .is_some_and(|e| e.class() == ErrorClass::BadRequest)
        {
            t.bad_request = true;
        }
        let Some(outcome) = Outcome::of(event.kind) else {
            // Each kind once, from whichever source told first; but the plugin's `initiated`
            // still goes through after TaskRouter's: it knows cold from warm, TaskRouter
            // only guesses (the tracker keeps the first timestamp).
            let plugin_initiated = event.kind == EventKind::Initiated
                && !event.source.is_taskrouter()
                && t.finished.is_none();
            if t.applied & event.kind.bit() != 0 && !plugin_initiated {
                return Route::Done;
            }
            t.applied |= event.kind.bit();
            return Route::Apply(key);
        };
        let taskrouter = event.source.is_taskrouter();
        if taskrouter {
            t.taskrouter_outcome.get_or_insert(outcome);
        } else {
            t.plugin_outcome.get_or_insert(outcome);
        }
        let disagree = matches!(
            (t.plugin_outcome, t.taskrouter_outcome),
            (Some(p), Some(r)) if p != r
        );
        match (t.finished.clone(), taskrouter) {
            // The first terminal of a transfer: it decides, unless it is the plugin's and
            // TaskRouter knows the transfer (TaskRouter's own terminal will decide).
            (None, false) if t.seen_by_taskrouter() => {
                let mut held = event.clone();
                if event.kind == EventKind::Completed && event.history_preserved == Some(false) {
                    out.push(Effect::HistoryLost {
                        at_ms: event.timestamp_ms,
                        initiated_ms: t.initiated_ms,
                    });
                    // Counted now; not again if the held outcome is applied later.
                    held.history_preserved = None;
                }
                if disagree {
                    counted.disagree(Disagreement::Outcome);
                }
                if t.held.is_none() {
                    let start = t.initiated_ms.unwrap_or(event.timestamp_ms);
                    t.held = Some(Box::new(held));
                    self.held
                        .push_back((start + self.timeout_ms - 1_000, t.seq, key));
                }
                Route::Done
            }
            (None, true) => {
                t.held = None;
                if disagree {
                    counted.disagree(Disagreement::Outcome);
                }
                t.applied |= event.kind.bit();
                Route::Apply(key)
            }
            (None, false) => {
                if disagree {
                    counted.disagree(Disagreement::Outcome);
                }
                t.applied |= event.kind.bit();
                Route::Apply(key)
            }
            // The plugin decided first; TaskRouter now says otherwise: TaskRouter's wins.
            (Some(f), true) if !f.by_taskrouter && f.outcome != outcome => {
                counted.disagree(Disagreement::Outcome);
                let class = event.error.as_ref().map(|e| e.class());
                out.push(Effect::Retracted {
                    at_ms: f.at_ms,
                    initiated_ms: f.initiated_ms,
                    outcome: f.outcome,
                    class: f.class,
                });
                let initiated_ms = f.initiated_ms;
                out.push(Effect::Finished {
                    at_ms: event.timestamp_ms,
                    initiated_ms,
                    outcome,
                    transfer_type: None,
                    target_type: None,
                    class: class.filter(|_| outcome == Outcome::Failed),
                    completion_secs: None,
                    correction: true,
                });
                t.finished = Some(Finished {
                    at_ms: event.timestamp_ms,
                    initiated_ms,
                    outcome,
                    class,
                    by_taskrouter: true,
                });
                Route::Done
            }
            // Finished already, and this source agrees or comes second.
            (Some(f), _) => {
                if disagree && f.by_taskrouter != taskrouter {
                    counted.disagree(Disagreement::Outcome);
                }
                Route::Done
            }
        }
    }

    /// The tracker finished the transfer known as `key` with `effect` (from `source`).
    pub fn finished(&mut self, key: u64, effect: &Effect, source: Source) {
        let (
            Some(t),
            Effect::Finished {
                at_ms,
                initiated_ms,
                outcome,
                class,
                ..
            },
        ) = (self.transfers.get_mut(&key), effect)
        else {
            return;
        };
        t.finished.get_or_insert(Finished {
            at_ms: *at_ms,
            initiated_ms: *initiated_ms,
            outcome: *outcome,
            class: *class,
            by_taskrouter: source.is_taskrouter(),
        });
    }

    /// Forgets transfers past the time late sources can still join them, counting those only
    /// one family saw.
    /// Plugin outcomes held for TaskRouter's that did not come in time: the transfer would
    /// time out next, though the plugin said how it ended. Returns (key, event) to apply.
    pub fn release(&mut self, now_ms: i64, timeout_ms: i64) -> Vec<(u64, Event)> {
        self.timeout_ms = timeout_ms;
        let mut out = Vec::new();
        while let Some((at, _, _)) = self.held.front() {
            if now_ms < *at {
                break;
            }
            let (_, seq, key) = self.held.pop_front().expect("peeked");
            let Some(t) = self.transfers.get_mut(&key).filter(|t| t.seq == seq) else {
                continue;
            };
            if t.finished.is_some() {
                continue;
            }
            if let Some(event) = t.held.take() {
                t.applied |= event.kind.bit();
                out.push((key, *event));
            }
        }
        out
    }

    pub fn sweep(&mut self, now_ms: i64, timeout_ms: i64, counted: &mut Counted) {
        while let Some((first_seen, _, _)) = self.order.front() {
            if now_ms - first_seen < timeout_ms + KEEP_AFTER_TIMEOUT_MS {
                break;
            }
            let (_, seq, key) = self.order.pop_front().expect("peeked");
            if self.transfers.get(&key).is_some_and(|t| t.seq == seq)
                && let Some(t) = self.remove(key)
            {
                self.missing(&t, counted);
            }
        }
    }

    /// Counts a transfer, forgotten now, that only one family reported.
    fn missing(&self, t: &Joined, counted: &mut Counted) {
        match (t.seen_by_taskrouter(), t.seen_by_plugin()) {
            (true, false) => counted.disagree(Disagreement::PluginMissing),
            (false, true)
                if !t.bad_request
                    && t.initiated_ms
                        .is_some_and(|i| i + JOIN_WINDOW_MS <= self.taskrouter_covered_ms) =>
            {
                counted.disagree(Disagreement::TaskRouterMissing)
            }
            _ => {}
        }
    }
}
