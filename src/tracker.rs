//! One transfer's events -> its outcome and latencies: correlation, duplicates, out-of-order events, timeouts, a memory cap.

use std::collections::VecDeque;

/// Transfer ids come from authenticated sources; a fast keyed hasher is enough.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
use std::time::Duration;

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

    fn of(kind: EventKind) -> Option<Outcome> {
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
    /// A transfer ended. `at_ms` is the event time the outcome belongs to.
    Finished {
        at_ms: i64,
        outcome: Outcome,
        transfer_type: Option<TransferType>,
        target_type: Option<TargetType>,
        class: Option<ErrorClass>,
        completion_secs: Option<f64>,
    },
    /// `notified` - `initiated` of one transfer.
    Notified { at_ms: i64, secs: f64 },
    /// A `completed` with `history_preserved: false`.
    HistoryLost { at_ms: i64 },
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
            outcome,
            transfer_type: self.transfer_type,
            target_type: self.target_type,
            class: self.class,
            completion_secs,
        });
        if self.history_lost {
            out.push(Effect::HistoryLost { at_ms });
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

/// Tracks the transfers of one CBO.
pub struct Tracker {
    timeout_ms: i64,
    max_open: usize,
    transfers: HashMap<Box<str>, Transfer>,
    order: VecDeque<(u64, Box<str>)>,
    next_seq: u64,
}

impl Tracker {
    pub fn new(timeout: Duration, max_open: usize) -> Tracker {
        Tracker {
            timeout_ms: timeout.as_millis() as i64,
            max_open: max_open.max(1),
            transfers: HashMap::default(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// Transfers held now (open, or finished and kept a while for late events).
    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }

    /// Transfers not finished yet.
    pub fn open(&self) -> usize {
        self.transfers.values().filter(|t| !t.finished).count()
    }

    pub fn apply(&mut self, event: &Event, now_ms: i64, out: &mut Vec<Effect>) {
        let key = event.transfer_key();
        let known = self.transfers.get(key).map(|t| {
            // A conversation transferred again after its last transfer ended: a new transfer.
            t.finished
                && event.kind == EventKind::Initiated
                && t.ts(EventKind::Initiated) != Some(event.timestamp_ms)
        });
        let t = match known {
            Some(false) => self.transfers.get_mut(key).expect("looked up above"),
            Some(true) => self.insert(key, true, now_ms, out),
            None => self.insert(key, false, now_ms, out),
        };
        t.touched_ms = now_ms;
        if let Some(ts) = t.ts(event.kind) {
            if ts == event.timestamp_ms {
                out.push(Effect::Duplicate);
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
            kind if kind.is_terminal() && t.terminal.is_none() && !t.finished => {
                t.terminal = Some((kind, event.timestamp_ms));
                t.class = event.error.as_ref().map(|e| e.class());
                t.history_lost =
                    kind == EventKind::Completed && event.history_preserved == Some(false);
            }
            _ => {}
        }
        t.progress(out);
    }

    /// A new record for `key` (`replacing` one that ended), evicting the oldest at the cap.
    fn insert(
        &mut self,
        key: &str,
        replacing: bool,
        now_ms: i64,
        out: &mut Vec<Effect>,
    ) -> &mut Transfer {
        if !replacing {
            while self.transfers.len() >= self.max_open {
                let Some((seq, old)) = self.order.pop_front() else {
                    break;
                };
                if self.transfers.get(&old).is_some_and(|t| t.seq == seq)
                    && let Some(t) = self.transfers.remove(&old)
                    && !t.finished
                {
                    out.push(Effect::Evicted);
                }
            }
        }
        if self.order.len() > 2 * self.transfers.len() + 64 {
            let transfers = &self.transfers;
            self.order
                .retain(|(seq, k)| transfers.get(k).is_some_and(|t| t.seq == *seq));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let key: Box<str> = key.into();
        self.order.push_back((seq, key.clone()));
        self.transfers
            .entry(key)
            .insert_entry(Transfer::new(seq, now_ms))
            .into_mut()
    }

    /// Times out transfers whose `initiated` is older than the timeout, settles terminal events
    /// whose `initiated` never came, and forgets finished transfers once late events are unlikely.
    pub fn sweep(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        let timeout = self.timeout_ms;
        self.transfers.retain(|_, t| {
            if !t.finished {
                if let Some(start) = t.ts(EventKind::Initiated) {
                    if now_ms >= start + timeout {
                        t.finish(start + timeout, Outcome::TimedOut, out);
                    }
                } else if now_ms >= t.touched_ms + timeout {
                    // No `initiated` arrived: settle what is known, without types or latency.
                    if let Some((kind, at)) = t.terminal {
                        t.finish(at, Outcome::of(kind).expect("terminal"), out);
                    }
                    return false;
                }
            }
            !(t.finished && now_ms >= t.touched_ms + timeout)
        });
    }
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
        assert_eq!(out.last(), Some(&Effect::HistoryLost { at_ms: T0 + 1 }));
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
}
