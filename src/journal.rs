//! What each CBO's windows were built from, kept under `state_dir/journal/` (SPEC §12): every
//! event and signal a CBO took, with the daemon's time, in segment files of five minutes. A
//! start replays the last hour through the same code that took them, so rolling windows, open
//! transfers and the joins of sources come back as they were (without counting anything twice
//! in the metrics), and a restart inside a 15-minute validation window loses no evidence.
//!
//! Lines are JSON. A segment starts with `{"transfer_guard_journal":1}`; a segment of another
//! version is refused by name, and a line cut short by a crash is skipped, never the lines
//! around it. Appends are buffered: written out every second and fsynced every checkpoint
//! (`checkpoint::EVERY`), so a kill -9 loses at most the last second of pushed events (a file
//! source's are read again from its saved position).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, Source, TargetType, TransferError, TransferId, TransferType};
use crate::sid::{ConversationSid, TaskSid};

/// The format this build writes and reads.
pub const VERSION: u32 = 1;
pub const DIR: &str = "journal";
/// A segment holds the appends of this much daemon time; whole segments are pruned.
pub const SEGMENT_MS: i64 = 300_000;
const HEADER_KEY: &str = "transfer_guard_journal";

/// One thing a CBO took, at the daemon's `now`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub cbo: String,
    pub now: i64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Event(Stored),
    /// A Bad Request the functions' logs or the debugger reported.
    Signal {
        source: String,
        at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation: Option<String>,
    },
    /// TaskRouter's record read up to `at`.
    Covered {
        at: i64,
    },
    /// A new deployment judged from `at`.
    Cut {
        at: i64,
    },
    /// A test transfer and what became of it.
    Probed {
        started: i64,
        result: String,
    },
    /// An agent's report.
    Report {
        conversation_sid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        at: String,
        at_ms: i64,
    },
    /// The functions' transfer timeout changed.
    Timeout {
        ms: u64,
    },
    /// A poll where TaskRouter answered 400 for the workflow.
    TaskrouterBadRequest,
    /// The lines a file source read from bytes `from..to` of the file `ino` at `path`:
    /// a backlog journals one record a chunk, and a restart reads the lines again.
    Lines {
        path: PathBuf,
        ino: u64,
        from: u64,
        to: u64,
    },
}

/// A transfer event as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub kind: String,
    pub ts: i64,
    pub conversation_sid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether the event carried an `error` object (it may have no field set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub error: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_preserved: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_sid: Option<String>,
    pub source: String,
}

const SOURCES: [Source; 6] = [
    Source::Plugin,
    Source::ServerlessLogs,
    Source::TaskRouterEvents,
    Source::TaskRouterCallback,
    Source::EventStreams,
    Source::Probe,
];

impl Stored {
    pub fn of(e: &Event) -> Stored {
        let error = e.error.as_ref();
        Stored {
            kind: e.kind.as_str().to_string(),
            ts: e.timestamp_ms,
            conversation_sid: e.conversation_sid.as_str().to_string(),
            transfer_id: e.transfer_id.as_deref().map(str::to_string),
            transfer_type: e.transfer_type.map(|t| t.as_str().to_string()),
            target_type: e.target_type.map(|t| t.as_str().to_string()),
            code: error.and_then(|e| e.code),
            status: error.and_then(|e| e.status),
            message: error.and_then(|e| e.message.clone()),
            error: error.is_some(),
            history_preserved: e.history_preserved,
            task_sid: e.task_sid.as_ref().map(|t| t.as_str().to_string()),
            source: e.source.as_str().to_string(),
        }
    }

    /// The event again; an error names the field that does not read back.
    pub fn event(&self) -> Result<Event, String> {
        let kind = EventKind::parse(&self.kind).ok_or(format!("kind `{}`", self.kind))?;
        let transfer_type = match self.transfer_type.as_deref() {
            None => None,
            Some("cold") => Some(TransferType::Cold),
            Some("warm") => Some(TransferType::Warm),
            Some(other) => return Err(format!("transfer_type `{other}`")),
        };
        let target_type = match self.target_type.as_deref() {
            None => None,
            Some("worker") => Some(TargetType::Worker),
            Some("queue") => Some(TargetType::Queue),
            Some(other) => return Err(format!("target_type `{other}`")),
        };
        let source = SOURCES
            .into_iter()
            .find(|s| s.as_str() == self.source)
            .ok_or(format!("source `{}`", self.source))?;
        let task_sid = match &self.task_sid {
            Some(t) => Some(TaskSid::parse(t).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Event {
            kind,
            timestamp_ms: self.ts,
            conversation_sid: ConversationSid::parse(&self.conversation_sid)
                .map_err(|e| e.to_string())?,
            transfer_id: self.transfer_id.as_deref().map(TransferId::new),
            transfer_type,
            target_type,
            error: self.error.then(|| TransferError {
                code: self.code,
                status: self.status,
                message: self.message.clone(),
            }),
            history_preserved: self.history_preserved,
            cbo: None,
            task_sid,
            source,
        })
    }
}

/// `record` as one journal line, appended to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, record).expect("a record serializes");
    out.push(b'\n');
}

/// A JSON string: written as it is when nothing in it needs escaping (ids and keys nearly
/// always), else by serde_json.
fn json_text(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    }
}

/// The journal lines of events one CBO took at one instant, as `encode` writes them but field
/// by field (every accepted event is journaled, a million a second in a backlog): what every
/// line begins with (the CBO, the instant) is written once, not once per event.
pub struct EventLines {
    head: Vec<u8>,
}

impl EventLines {
    pub fn new(cbo: &str, now_ms: i64) -> EventLines {
        let mut head = Vec::with_capacity(cbo.len() + 64);
        head.extend_from_slice(b"{\"cbo\":");
        json_text(&mut head, cbo);
        head.extend_from_slice(b",\"now\":");
        head.extend_from_slice(itoa::Buffer::new().format(now_ms).as_bytes());
        head.extend_from_slice(b",\"op\":{\"event\":{\"kind\":\"");
        EventLines { head }
    }

    /// `event`'s line, appended to `out`.
    pub fn encode(&self, e: &Event, out: &mut Vec<u8>) {
        let mut int = itoa::Buffer::new();
        out.extend_from_slice(&self.head);
        out.extend_from_slice(e.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"ts\":");
        out.extend_from_slice(int.format(e.timestamp_ms).as_bytes());
        out.extend_from_slice(b",\"conversation_sid\":\"");
        out.extend_from_slice(e.conversation_sid.as_str().as_bytes());
        out.push(b'"');
        if let Some(id) = &e.transfer_id {
            out.extend_from_slice(b",\"transfer_id\":");
            json_text(out, id);
        }
        for (key, value) in [
            ("transfer_type", e.transfer_type.map(|t| t.as_str())),
            ("target_type", e.target_type.map(|t| t.as_str())),
        ] {
            if let Some(v) = value {
                for part in [",\"", key, "\":\"", v, "\""] {
                    out.extend_from_slice(part.as_bytes());
                }
            }
        }
        if let Some(err) = &e.error {
            for (key, value) in [("code", err.code), ("status", err.status)] {
                if let Some(v) = value {
                    for part in [",\"", key, "\":"] {
                        out.extend_from_slice(part.as_bytes());
                    }
                    out.extend_from_slice(int.format(v).as_bytes());
                }
            }
            if let Some(m) = &err.message {
                out.extend_from_slice(b",\"message\":");
                json_text(out, m);
            }
            out.extend_from_slice(b",\"error\":true");
        }
        if let Some(h) = e.history_preserved {
            out.extend_from_slice(if h {
                b",\"history_preserved\":true"
            } else {
                b",\"history_preserved\":false"
            });
        }
        if let Some(t) = &e.task_sid {
            out.extend_from_slice(b",\"task_sid\":\"");
            out.extend_from_slice(t.as_str().as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"source\":\"");
        out.extend_from_slice(e.source.as_str().as_bytes());
        out.extend_from_slice(b"\"}}}\n");
    }
}

/// The segment file being appended to.
struct Segment {
    start_ms: i64,
    out: BufWriter<File>,
    /// The same file, to fsync without holding the journal (appends go on meanwhile).
    sync: Arc<File>,
}

/// The journal being written. Appends never fail the caller: a write that fails (a full disk)
/// is counted in `errors` and logged once per failing spell; what the CBO took stays in memory.
pub struct Journal {
    dir: PathBuf,
    segment: Mutex<Option<Segment>>,
    /// Writes that failed (`store_errors_total{op="journal"}`).
    pub errors: AtomicU64,
    failing: std::sync::atomic::AtomicBool,
}

impl Journal {
    /// The journal under `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> io::Result<Journal> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(Journal {
            dir,
            segment: Mutex::new(None),
            errors: AtomicU64::new(0),
            failing: Default::default(),
        })
    }

    /// Appends encoded lines (`encode`) taken at `now_ms`.
    pub fn append(&self, now_ms: i64, lines: &[u8]) {
        if !lines.is_empty() {
            self.hold().append(now_ms, lines);
        }
    }

    /// The right to append next. Taken while the caller still holds what orders its records
    /// (a CBO's lock), and used after letting that go: the records keep their order, and the
    /// write does not keep the CBO waiting.
    pub fn hold(&self) -> Appender<'_> {
        Appender {
            journal: self,
            segment: self.segment.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Opens the segment starting at `start_ms` for appending: a new file starts with the
    /// header; one a crash left without its last newline gets one first (its cut line is then
    /// skipped on reading, not glued to the next).
    fn create(&self, start_ms: i64) -> io::Result<Segment> {
        let path = self.dir.join(format!("{start_ms}.jsonl"));
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let mut out = Vec::new();
        if len == 0 {
            out.extend_from_slice(format!("{{\"{HEADER_KEY}\":{VERSION}}}\n").as_bytes());
        } else {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                out.push(b'\n');
            }
        }
        file.write_all(&out)?;
        Ok(Segment {
            start_ms,
            sync: Arc::new(file.try_clone()?),
            out: BufWriter::with_capacity(256 * 1024, file),
        })
    }

    /// Writes out what is buffered; `sync`: and fsyncs it.
    /// The fsync holds nothing: a slow disk never makes a CBO's ingest wait for it.
    pub fn flush(&self, sync: bool) {
        let file = {
            let mut segment = self.segment.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = segment.as_mut() else { return };
            let result = s.out.flush();
            let file = s.sync.clone();
            if self.failed(result, "cannot write the journal out") {
                *segment = None;
            }
            file
        };
        if sync {
            self.failed(file.sync_data(), "cannot fsync the journal");
        }
    }

    /// Counts and logs a failed write; whether `result` failed.
    fn failed(&self, result: io::Result<()>, what: &str) -> bool {
        match result {
            Ok(()) => {
                if self.failing.swap(false, Relaxed) {
                    tracing::info!(dir = %self.dir.display(), "the journal is written again");
                }
                false
            }
            Err(e) => {
                self.errors.fetch_add(1, Relaxed);
                if !self.failing.swap(true, Relaxed) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "{what}: windows are kept in memory, a restart now would lose what was not written");
                }
                true
            }
        }
    }

    /// Deletes segments wholly older than `before_ms`.
    pub fn prune(&self, before_ms: i64) {
        for (start, path) in segments(&self.dir) {
            if start + SEGMENT_MS < before_ms
                && let Err(e) = std::fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old journal segment");
            }
        }
    }
}

/// The journal held for one append (`Journal::hold`).
pub struct Appender<'a> {
    journal: &'a Journal,
    segment: std::sync::MutexGuard<'a, Option<Segment>>,
}

impl Appender<'_> {
    /// Appends encoded lines (`encode`) taken at `now_ms`.
    pub fn append(mut self, now_ms: i64, lines: &[u8]) {
        if lines.is_empty() {
            return;
        }
        let start_ms = now_ms.div_euclid(SEGMENT_MS) * SEGMENT_MS;
        let result = (|| {
            // Appends come a little out of order across CBOs: a segment is only ever left for
            // a later one.
            if self.segment.as_ref().is_none_or(|s| s.start_ms < start_ms) {
                if let Some(mut old) = self.segment.take() {
                    old.out.flush()?;
                }
                *self.segment = Some(self.journal.create(start_ms)?);
            }
            let s = self.segment.as_mut().expect("opened above");
            s.out.write_all(lines)
        })();
        if self.journal.failed(result, "cannot write the journal") {
            // Its buffer may hold half a line: the next append reopens the file on a fresh line.
            *self.segment = None;
        }
    }
}

/// The segment files of `dir`, oldest first: (start, path).
fn segments(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let start = path
                .file_name()?
                .to_str()?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((start, path))
        })
        .collect();
    out.sort();
    out
}

/// What reading the journal found.
#[derive(Debug, Default)]
pub struct Read {
    pub records: u64,
    /// Lines that are not records (a line cut short by a crash), with where they are.
    pub skipped: Vec<String>,
    /// Segments not read, and why (another version's).
    pub refused: Vec<String>,
}

/// Reads every record of `state_dir`'s journal taken at or after `since_ms`, oldest segment
/// first, handing each to `take`.
pub fn read(state_dir: &Path, since_ms: i64, mut take: impl FnMut(Record)) -> Read {
    let mut found = Read::default();
    for (start, path) in segments(&state_dir.join(DIR)) {
        if start + SEGMENT_MS < since_ms {
            continue;
        }
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                found.refused.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let mut lines = BufReader::with_capacity(256 * 1024, file).lines();
        match lines.next() {
            Some(Ok(header)) => match header_version(&header) {
                Some(VERSION) => {}
                Some(v) => {
                    found.refused.push(format!(
                        "{}: journal version {v}, this build reads version {VERSION}",
                        path.display()
                    ));
                    continue;
                }
                None => {
                    found.refused.push(format!(
                        "{}: no journal header on its first line",
                        path.display()
                    ));
                    continue;
                }
            },
            // Created and not yet written.
            None => continue,
            Some(Err(e)) => {
                found.refused.push(format!("{}: {e}", path.display()));
                continue;
            }
        }
        for (n, line) in lines.enumerate() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    found
                        .skipped
                        .push(format!("{} line {}: {e}", path.display(), n + 2));
                    continue;
                }
            };
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(&line) {
                Ok(r) if r.now >= since_ms => {
                    found.records += 1;
                    take(r);
                }
                Ok(_) => {}
                Err(e) => found
                    .skipped
                    .push(format!("{} line {}: {e}", path.display(), n + 2)),
            }
        }
    }
    found
}

fn header_version(line: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(HEADER_KEY)?.as_u64().map(|v| v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cbo: &str, now: i64, n: u32) -> Record {
        Record {
            cbo: cbo.to_string(),
            now,
            op: Op::Event(Stored::of(
                &crate::event::parse_json(&format!(
                    r#"{{"event":"failed","timestamp":"2027-01-15T08:00:00Z","conversation_sid":"CH{n:032x}","transfer_type":"cold","error":{{"status":400,"message":"Bad Request"}},"task_sid":"WT{n:032x}"}}"#
                ))
                .unwrap(),
            )),
        }
    }

    fn all(dir: &Path, since: i64) -> (Vec<Record>, Read) {
        let mut got = Vec::new();
        let read = read(dir, since, |r| got.push(r));
        (got, read)
    }

    #[test]
    fn an_event_reads_back_as_it_was_taken() {
        let r = record("a", 1, 7);
        let Op::Event(stored) = &r.op else {
            unreachable!()
        };
        let event = stored.event().unwrap();
        assert_eq!(Stored::of(&event), *stored);
        assert_eq!(event.error.unwrap().status, Some(400));
        assert_eq!(event.task_sid.unwrap().as_str(), format!("WT{:032x}", 7));
    }

    #[test]
    fn an_event_written_field_by_field_is_the_record_serde_writes() {
        let lines = [
            r#"{"event":"failed","timestamp":"2027-01-15T08:00:00Z","conversation_sid":"CH0000000000000000000000000000000a","transfer_id":"t\"1\\","transfer_type":"warm","target_type":"queue","error":{"code":20001,"status":400,"message":"Bad \"Request\"\n"},"history_preserved":false,"task_sid":"WT0000000000000000000000000000000a"}"#,
            r#"{"event":"initiated","timestamp":"2027-01-15T08:00:00.123Z","conversation_sid":"CH0000000000000000000000000000000b","transfer_type":"cold","target_type":"worker"}"#,
            r#"{"event":"cancelled","timestamp":"2027-01-15T08:00:00Z","conversation_sid":"CH0000000000000000000000000000000c","error":{}}"#,
            r#"{"event":"completed","timestamp":"2027-01-15T08:00:00Z","conversation_sid":"CH0000000000000000000000000000000d","transfer_id":"KI0000000000000000000000000000000d","error":{"message":"plain é"}}"#,
        ];
        // A key and ids that need escaping, and ones written as they are.
        for (line, cbo) in lines
            .iter()
            .flat_map(|l| [(l, "cbo \"é\"\u{7f}"), (l, "c0")])
        {
            let event = crate::event::parse_json(line).unwrap();
            let mut fast = Vec::new();
            EventLines::new(cbo, 42).encode(&event, &mut fast);
            let mut slow = Vec::new();
            encode(
                &Record {
                    cbo: cbo.into(),
                    now: 42,
                    op: Op::Event(Stored::of(&event)),
                },
                &mut slow,
            );
            assert_eq!(
                serde_json::from_slice::<Record>(&fast).unwrap(),
                serde_json::from_slice::<Record>(&slow).unwrap(),
                "{}",
                String::from_utf8_lossy(&fast)
            );
            assert_eq!(fast.last(), Some(&b'\n'));
            let Op::Event(back) = serde_json::from_slice::<Record>(&fast).unwrap().op else {
                unreachable!()
            };
            assert_eq!(back.event().unwrap(), event);
        }
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut lines = Vec::new();
        for (i, now) in [1_000, 2_000, SEGMENT_MS + 5, 3 * SEGMENT_MS]
            .iter()
            .enumerate()
        {
            lines.clear();
            encode(&record("a", *now, i as u32), &mut lines);
            j.append(*now, &lines);
        }
        j.flush(true);
        let (got, read) = all(dir.path(), 0);
        assert_eq!(
            got.iter().map(|r| r.now).collect::<Vec<_>>(),
            [1_000, 2_000, SEGMENT_MS + 5, 3 * SEGMENT_MS]
        );
        assert!(
            read.skipped.is_empty() && read.refused.is_empty(),
            "{read:?}"
        );
        // Only what is at or after `since` is handed over.
        assert_eq!(all(dir.path(), 2_000).0.len(), 3);
        j.prune(2 * SEGMENT_MS - 1);
        assert_eq!(
            all(dir.path(), 0)
                .0
                .iter()
                .map(|r| r.now)
                .collect::<Vec<_>>(),
            [SEGMENT_MS + 5, 3 * SEGMENT_MS]
        );
    }

    #[test]
    fn a_line_cut_by_a_crash_is_skipped_and_appends_after_it_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut lines = Vec::new();
        encode(&record("a", 10, 1), &mut lines);
        encode(&record("a", 11, 2), &mut lines);
        j.append(10, &lines);
        j.flush(false);
        drop(j);
        // kill -9 in the middle of the third line.
        let path = dir.path().join(DIR).join("0.jsonl");
        let mut third = Vec::new();
        encode(&record("a", 12, 3), &mut third);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&third[..third.len() / 2]).unwrap();
        drop(f);
        // The restarted daemon appends to the same segment.
        let j = Journal::open(dir.path()).unwrap();
        let mut lines = Vec::new();
        encode(&record("a", 13, 4), &mut lines);
        j.append(13, &lines);
        j.flush(true);
        let (got, read) = all(dir.path(), 0);
        assert_eq!(got.iter().map(|r| r.now).collect::<Vec<_>>(), [10, 11, 13]);
        assert_eq!(read.skipped.len(), 1, "{read:?}");
        assert!(read.skipped[0].contains("line 4"), "{read:?}");
    }

    #[test]
    fn a_segment_of_another_version_is_refused_by_name_and_the_others_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut lines = Vec::new();
        encode(&record("a", SEGMENT_MS, 1), &mut lines);
        j.append(SEGMENT_MS, &lines);
        j.flush(true);
        std::fs::write(
            dir.path().join(DIR).join("0.jsonl"),
            "{\"transfer_guard_journal\":2}\n{\"whatever\":true}\n",
        )
        .unwrap();
        let (got, read) = all(dir.path(), 0);
        assert_eq!(got.len(), 1);
        assert_eq!(read.refused.len(), 1, "{read:?}");
        assert!(
            read.refused[0].contains("0.jsonl: journal version 2, this build reads version 1"),
            "{read:?}"
        );
    }

    #[test]
    fn a_full_disk_is_counted_and_the_journal_writes_again_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        // The directory gone: the segment cannot be created (as a full disk refuses it).
        std::fs::remove_dir_all(dir.path().join(DIR)).unwrap();
        let mut lines = Vec::new();
        encode(&record("a", 10, 1), &mut lines);
        j.append(10, &lines);
        assert_eq!(j.errors.load(Relaxed), 1);
        std::fs::create_dir_all(dir.path().join(DIR)).unwrap();
        j.append(11, &lines);
        j.flush(true);
        assert_eq!(all(dir.path(), 0).0.len(), 1);
    }
}
