//! One transfer's events -> its outcome and latencies: correlation, duplicates, out-of-order events, timeouts, a memory cap.

use std::collections::VecDeque;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

/// A map keyed by a transfer's key: already a 64-bit hash under a secret per-process seed
/// (transfer ids come from authenticated sources; a fast keyed hasher is enough), so the
/// map takes it as its hash instead of hashing it again, a dozen times per event.
pub type Keyed<V> = std::collections::HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// The hasher of [`Keyed`]: a `u64` key is its own hash.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    /// Not reached for `u64` keys; kept correct for anything else (FNV-1a).
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

use crate::event::{ErrorClass, Event, EventKind, TargetType, TransferType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    Failed,
    TimedOut,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome a terminal event kind ends a transfer with.
    pub fn of(kind: EventKind) -> Option<Outcome> {
        match kind {
            EventKind::Completed => Some(Outcome::Completed),
            EventKind::Failed => Some(Outcome::Failed),
            EventKind::TimedOut => Some(Outcome::TimedOut),
            EventKind::Cancelled => Some(Outcome::Cancelled),
            _ => None,
        }
    }
}

/// What the tracker learned from an event or from the passing of time.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A transfer ended. `at_ms` is the event time the outcome belongs to; `initiated_ms`
    /// says which deployment it belongs to.
    Finished {
        at_ms: i64,
        initiated_ms: Option<i64>,
        outcome: Outcome,
        transfer_type: Option<TransferType>,
        target_type: Option<TargetType>,
        class: Option<ErrorClass>,
        completion_secs: Option<f64>,
        /// TaskRouter's outcome replacing the one the plugin reported (after a `Retracted`):
        /// counted in the windows, not again in the counters.
        correction: bool,
    },
    /// An outcome taken back from the windows (TaskRouter's record says otherwise).
    Retracted {
        at_ms: i64,
        initiated_ms: Option<i64>,
        outcome: Outcome,
        class: Option<ErrorClass>,
    },
    /// `notified` - `initiated` of one transfer.
    Notified { at_ms: i64, secs: f64 },
    /// A `completed` with `history_preserved: false`.
    HistoryLost {
        at_ms: i64,
        initiated_ms: Option<i64>,
    },
    /// The same event (transfer, kind, timestamp) seen again: ignored.
    Duplicate,
    /// The cap on tracked transfers pushed out an unfinished one.
    Evicted,
}

#[derive(Debug)]
struct Transfer {
    /// Insertion order, to find the oldest when the cap is reached.
    seq: u64,
    /// Bit per `EventKind` seen, and the timestamp of the first of each kind.
    seen: u8,
    seen_ts: [i64; 7],
    transfer_type: Option<TransferType>,
    target_type: Option<TargetType>,
    terminal: Option<(EventKind, i64)>,
    class: Option<ErrorClass>,
    history_lost: bool,
    notification_done: bool,
    finished: bool,
    /// Daemon time of the last event, to drop finished or orphaned records.
    touched_ms: i64,
}

impl Transfer {
    fn new(seq: u64, now_ms: i64) -> Transfer {
        Transfer {
            seq,
            seen: 0,
            seen_ts: [0; 7],
            transfer_type: None,
            target_type: None,
            terminal: None,
            class: None,
            history_lost: false,
            notification_done: false,
            finished: false,
            touched_ms: now_ms,
        }
    }

    fn ts(&self, kind: EventKind) -> Option<i64> {
        (self.seen & kind.bit() != 0).then(|| self.seen_ts[kind as usize])
    }

    fn finish(&mut self, at_ms: i64, outcome: Outcome, out: &mut Vec<Effect>) {
        let initiated = self.ts(EventKind::Initiated);
        let completion_secs = match (outcome, initiated) {
            (Outcome::Completed, Some(start)) if at_ms >= start => {
                Some((at_ms - start) as f64 / 1000.0)
            }
            _ => None,
        };
        out.push(Effect::Finished {
            at_ms,
            initiated_ms: initiated,
            outcome,
            transfer_type: self.transfer_type,
            target_type: self.target_type,
            class: self.class,
            completion_secs,
            correction: false,
        });
        if self.history_lost {
            out.push(Effect::HistoryLost {
                at_ms,
                initiated_ms: initiated,
            });
        }
        self.finished = true;
    }

    /// Emits what the events seen so far make known and was not emitted yet.
    fn progress(&mut self, out: &mut Vec<Effect>) {
        if !self.notification_done
            && let (Some(start), Some(notified)) =
                (self.ts(EventKind::Initiated), self.ts(EventKind::Notified))
        {
            self.notification_done = true;
            if notified >= start {
                out.push(Effect::Notified {
                    at_ms: notified,
                    secs: (notified - start) as f64 / 1000.0,
                });
            }
        }
        if !self.finished
            && self.ts(EventKind::Initiated).is_some()
            && let Some((kind, at)) = self.terminal
        {
            let outcome = Outcome::of(kind).expect("terminal kinds have outcomes");
            self.finish(at, outcome, out);
        }
    }
}

/// What is kept of a finished transfer until late events are unlikely: enough to tell a late
/// repeat (a duplicate) from a new transfer of the same conversation, and to pair a late
/// `notified`. 16 bytes, against ~100 for an open transfer.
#[derive(Debug, Clone, Copy)]
struct Done {
    /// The `initiated` timestamp; `i64::MIN` when there was none.
    initiated_ms: i64,
    /// Daemon time of the last event, in seconds.
    touched_s: u32,
    /// Bit per `EventKind` seen.
    seen: u8,
}

/// Tracks the transfers of one CBO. Transfers are keyed by a 64-bit hash of their key (the
/// transfer id or conversation SID) under a per-tracker random seed: no key strings are kept.
pub struct Tracker {
    timeout_ms: i64,
    max_open: usize,
    hasher: ahash::RandomState,
    open: Keyed<Transfer>,
    /// Open transfers in the order they were opened (`seq`, key), for eviction at the cap;
    /// entries of transfers since finished are skipped.
    order: VecDeque<(u64, u64)>,
    done: Keyed<Done>,
    next_seq: u64,
}

impl Tracker {
    pub fn new(timeout: Duration, max_open: usize) -> Tracker {
        Tracker {
            timeout_ms: timeout.as_millis() as i64,
            max_open: max_open.max(1),
            hasher: ahash::RandomState::new(),
            open: Keyed::default(),
            order: VecDeque::new(),
            done: Keyed::default(),
            next_seq: 0,
        }
    }

    /// The transfer timeout now (the functions' `CONVERSATION_TRANSFER_TIMEOUT` can change it).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms as u64)
    }

    /// Open transfers time out after `timeout` from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout_ms = timeout.as_millis() as i64;
    }

    /// Transfers held now (open, or finished and kept a while for late events).
    pub fn len(&self) -> usize {
        self.open.len() + self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Transfers not finished yet.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    pub fn apply(&mut self, event: &Event, now_ms: i64, out: &mut Vec<Effect>) {
        let key = self.hasher.hash_one(event.transfer_key());
        self.apply_hashed(key, event, now_ms, out)
    }

    /// Applies `event` to the transfer known by `key`, a hash of the name the sources were
    /// joined under (see `reconcile`).
    pub fn apply_hashed(&mut self, key: u64, event: &Event, now_ms: i64, out: &mut Vec<Effect>) {
        let is_open = self.open.contains_key(&key);
        if !is_open && let Some(d) = self.done.get_mut(&key) {
            let bit = event.kind.bit();
            let again = event.kind == EventKind::Initiated && d.initiated_ms != event.timestamp_ms;
            if !again {
                d.touched_s = seconds(now_ms);
                if d.seen & bit != 0 {
                    // A kind the transfer already had, after it ended: a repeat.
                    out.push(Effect::Duplicate);
                } else {
                    d.seen |= bit;
                    if event.kind == EventKind::Notified
                        && d.initiated_ms != i64::MIN
                        && event.timestamp_ms >= d.initiated_ms
                    {
                        out.push(Effect::Notified {
                            at_ms: event.timestamp_ms,
                            secs: (event.timestamp_ms - d.initiated_ms) as f64 / 1000.0,
                        });
                    }
                }
                return;
            }
            // A conversation transferred again after its last transfer ended: a new transfer.
            self.done.remove(&key);
        }
        let t = match is_open {
            true => self.open.get_mut(&key).expect("looked up above"),
            false => self.insert(key, now_ms, out),
        };
        t.touched_ms = now_ms;
        if let Some(ts) = t.ts(event.kind) {
            if ts == event.timestamp_ms {
                out.push(Effect::Duplicate);
            }
            if event.kind == EventKind::Initiated {
                // A second source's `initiated` may say what the first could not: TaskRouter
                // only guesses cold from warm, the plugin knows.
                if event.source.is_taskrouter() {
                    t.transfer_type = t.transfer_type.or(event.transfer_type);
                    t.target_type = t.target_type.or(event.target_type);
                } else {
                    t.transfer_type = event.transfer_type.or(t.transfer_type);
                    t.target_type = event.target_type.or(t.target_type);
                }
            }
            // Another event of a kind already seen: the first one stands.
            return;
        }
        t.seen |= event.kind.bit();
        t.seen_ts[event.kind as usize] = event.timestamp_ms;
        match event.kind {
            EventKind::Initiated => {
                t.transfer_type = event.transfer_type;
                t.target_type = event.target_type;
            }
            kind if kind.is_terminal() && t.terminal.is_none() => {
                t.terminal = Some((kind, event.timestamp_ms));
                t.class = event.error.as_ref().map(|e| e.class());
                t.history_lost =
                    kind == EventKind::Completed && event.history_preserved == Some(false);
            }
            _ => {}
        }
        t.progress(out);
        if t.finished {
            let (initiated, seen) = (t.ts(EventKind::Initiated), t.seen);
            self.open.remove(&key);
            self.retire(key, initiated, seen, now_ms);
        }
    }

    /// Keeps what late events need of a finished transfer, within the cap.
    fn retire(&mut self, key: u64, initiated: Option<i64>, seen: u8, now_ms: i64) {
        if self.done.len() >= self.max_open {
            self.forget_done(now_ms);
            if self.done.len() >= self.max_open {
                // Still full: keep the more recently touched half.
                let (lo, hi) = self.done.values().fold((u32::MAX, 0), |(lo, hi), d| {
                    (lo.min(d.touched_s), hi.max(d.touched_s))
                });
                let mid = lo + (hi - lo) / 2;
                self.done.retain(|_, d| d.touched_s > mid);
                if self.done.len() >= self.max_open {
                    self.done.clear();
                }
            }
        }
        self.done.insert(
            key,
            Done {
                initiated_ms: initiated.unwrap_or(i64::MIN),
                touched_s: seconds(now_ms),
                seen,
            },
        );
    }

    /// A new open transfer for `key`, evicting the oldest open one at the cap.
    fn insert(&mut self, key: u64, now_ms: i64, out: &mut Vec<Effect>) -> &mut Transfer {
        while self.open.len() >= self.max_open {
            let Some((seq, old)) = self.order.pop_front() else {
                break;
            };
            if self.open.get(&old).is_some_and(|t| t.seq == seq) {
                self.open.remove(&old);
                out.push(Effect::Evicted);
            }
        }
        if self.order.len() > 2 * self.open.len() + 64 {
            let open = &self.open;
            self.order
                .retain(|(seq, k)| open.get(k).is_some_and(|t| t.seq == *seq));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((seq, key));
        self.open
            .entry(key)
            .insert_entry(Transfer::new(seq, now_ms))
            .into_mut()
    }

    /// Times out transfers whose `initiated` is older than the timeout, settles terminal events
    /// whose `initiated` never came, and forgets finished transfers once late events are unlikely.
    pub fn sweep(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        let timeout = self.timeout_ms;
        let mut finished = Vec::new();
        self.open.retain(|key, t| {
            if let Some(start) = t.ts(EventKind::Initiated) {
                if now_ms >= start + timeout {
                    t.finish(start + timeout, Outcome::TimedOut, out);
                    finished.push((*key, start, t.seen));
                    return false;
                }
            } else if now_ms >= t.touched_ms + timeout {
                // No `initiated` arrived: settle what is known, without types or latency.
                if let Some((kind, at)) = t.terminal {
                    t.finish(at, Outcome::of(kind).expect("terminal"), out);
                }
                return false;
            }
            true
        });
        // Kept from the moment they timed out, so a late terminal event is not counted again.
        for (key, start, seen) in finished {
            self.retire(key, Some(start), seen, now_ms);
        }
        self.forget_done(now_ms);
    }

    /// Drops the finished transfers whose late events are no longer expected. The map is
    /// rebuilt rather than thinned in place: deletions leave tombstones that would make it
    /// double its table while holding no more.
    fn forget_done(&mut self, now_ms: i64) {
        let (now_s, timeout_s) = (seconds(now_ms), seconds(self.timeout_ms));
        let live = |d: &Done| now_s < d.touched_s.saturating_add(timeout_s);
        let keep = self.done.values().filter(|d| live(d)).count();
        if keep == self.done.len() {
            return;
        }
        let mut fresh = Keyed::with_capacity_and_hasher(keep + keep / 4 + 8, Default::default());
        fresh.extend(self.done.drain().filter(|(_, d)| live(d)));
        self.done = fresh;
    }
}

/// Daemon time in whole seconds, as kept for finished transfers (good until 2106).
fn seconds(ms: i64) -> u32 {
    (ms.max(0) / 1000).min(i64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_json;

    const CH: &str = "CH0123456789abcdef0123456789abcdef";
    const T0: i64 = 1_800_000_000_000;

    fn ev(kind: &str, at_ms: i64, extra: &str) -> Event {
        let ts = chrono::DateTime::from_timestamp_millis(at_ms)
            .unwrap()
            .to_rfc3339();
        parse_json(&format!(
            r#"{{"event":"{kind}","timestamp":"{ts}","conversation_sid":"{CH}","transfer_type":"cold","target_type":"worker"{extra}}}"#
        ))
        .unwrap()
    }

    fn finished(out: &[Effect]) -> Vec<(Outcome, Option<f64>)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Finished {
                    outcome,
                    completion_secs,
                    ..
                } => Some((*outcome, *completion_secs)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn initiated_then_completed_seven_seconds_later_is_one_completion_of_7s() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 7000, ""), T0 + 7000, &mut out);
        assert_eq!(finished(&out), vec![(Outcome::Completed, Some(7.0))]);
    }

    #[test]
    fn completed_before_its_initiated_still_pairs() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("completed", T0 + 7000, ""), T0 + 7000, &mut out);
        assert!(finished(&out).is_empty());
        t.apply(&ev("initiated", T0, ""), T0 + 7100, &mut out);
        assert_eq!(finished(&out), vec![(Outcome::Completed, Some(7.0))]);
    }

    #[test]
    fn duplicate_event_counts_once() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        for _ in 0..2 {
            t.apply(&ev("initiated", T0, ""), T0, &mut out);
            t.apply(&ev("completed", T0 + 1000, ""), T0 + 1000, &mut out);
        }
        assert_eq!(finished(&out).len(), 1);
        assert_eq!(out.iter().filter(|e| **e == Effect::Duplicate).count(), 2);
    }

    #[test]
    fn initiated_without_end_times_out_exactly_at_the_timeout() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.sweep(T0 + 299_999, &mut out);
        assert!(finished(&out).is_empty());
        t.sweep(T0 + 300_000, &mut out);
        assert_eq!(finished(&out), vec![(Outcome::TimedOut, None)]);
        match &out[0] {
            Effect::Finished { at_ms, .. } => assert_eq!(*at_ms, T0 + 300_000),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn notification_latency_pairs_with_initiated() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("notified", T0 + 2500, ""), T0 + 2500, &mut out);
        t.apply(&ev("initiated", T0, ""), T0 + 2600, &mut out);
        assert_eq!(
            out,
            vec![Effect::Notified {
                at_ms: T0 + 2500,
                secs: 2.5
            }]
        );
    }

    #[test]
    fn failed_carries_its_error_class_and_history_loss_is_reported() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        let tid = |id: &str| format!(r#","transfer_id":"{id}""#);
        t.apply(&ev("initiated", T0, &tid("a")), T0, &mut out);
        t.apply(
            &ev("failed", T0 + 1, &(tid("a") + r#","error":{"code":20001}"#)),
            T0,
            &mut out,
        );
        t.apply(&ev("initiated", T0, &tid("b")), T0, &mut out);
        t.apply(
            &ev(
                "completed",
                T0 + 1,
                &(tid("b") + r#","history_preserved":false"#),
            ),
            T0,
            &mut out,
        );
        assert!(matches!(
            out[0],
            Effect::Finished {
                class: Some(ErrorClass::AgentUnavailable),
                ..
            }
        ));
        assert!(matches!(
            out.last(),
            Some(&Effect::HistoryLost { at_ms, .. }) if at_ms == T0 + 1
        ));
    }

    #[test]
    fn cap_evicts_the_oldest_open_transfer() {
        let mut t = Tracker::new(Duration::from_secs(300), 2);
        let mut out = Vec::new();
        for id in ["a", "b", "c"] {
            t.apply(
                &ev("initiated", T0, &format!(r#","transfer_id":"{id}""#)),
                T0,
                &mut out,
            );
        }
        assert_eq!(out, vec![Effect::Evicted]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_conversation_transferred_again_is_a_new_transfer() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 1000, ""), T0, &mut out);
        t.apply(&ev("initiated", T0 + 60_000, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 63_000, ""), T0, &mut out);
        assert_eq!(
            finished(&out),
            vec![
                (Outcome::Completed, Some(1.0)),
                (Outcome::Completed, Some(3.0))
            ]
        );
    }

    #[test]
    fn finished_transfers_are_forgotten_after_the_timeout() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 1000, ""), T0 + 1000, &mut out);
        t.sweep(T0 + 301_000, &mut out);
        assert!(t.is_empty());
    }

    #[test]
    fn a_late_repeat_of_a_finished_transfer_is_a_duplicate_not_a_new_transfer() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 1000, ""), T0 + 1000, &mut out);
        // A log re-read two minutes later delivers both again.
        t.apply(&ev("initiated", T0, ""), T0 + 120_000, &mut out);
        t.apply(&ev("completed", T0 + 1000, ""), T0 + 120_000, &mut out);
        t.sweep(T0 + 900_000, &mut out);
        assert_eq!(finished(&out), vec![(Outcome::Completed, Some(1.0))]);
        assert_eq!(out.iter().filter(|e| **e == Effect::Duplicate).count(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn a_notified_after_the_transfer_ended_still_gives_the_notification_latency() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.apply(&ev("completed", T0 + 9000, ""), T0 + 9000, &mut out);
        t.apply(&ev("notified", T0 + 1500, ""), T0 + 9500, &mut out);
        assert_eq!(
            out.last(),
            Some(&Effect::Notified {
                at_ms: T0 + 1500,
                secs: 1.5
            })
        );
    }

    #[test]
    fn finished_transfers_kept_for_late_events_stay_within_the_cap() {
        let mut t = Tracker::new(Duration::from_secs(300), 1000);
        let mut out = Vec::new();
        for i in 0..10_000 {
            let id = format!(r#","transfer_id":"t{i}""#);
            t.apply(&ev("initiated", T0 + i, &id), T0 + i, &mut out);
            t.apply(&ev("completed", T0 + i + 1, &id), T0 + i, &mut out);
            assert!(t.len() <= 1000, "{} held", t.len());
        }
        assert_eq!(finished(&out).len(), 10_000);
        assert!(!out.contains(&Effect::Evicted));
    }

    #[test]
    fn a_timed_out_transfer_ignores_its_late_completion() {
        let mut t = Tracker::new(Duration::from_secs(300), 100);
        let mut out = Vec::new();
        t.apply(&ev("initiated", T0, ""), T0, &mut out);
        t.sweep(T0 + 300_000, &mut out);
        t.apply(&ev("completed", T0 + 310_000, ""), T0 + 310_000, &mut out);
        t.sweep(T0 + 620_000, &mut out);
        assert_eq!(finished(&out), vec![(Outcome::TimedOut, None)]);
    }
}
