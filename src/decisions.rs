//! The durable decision log: every rule state change, action attempt, ack and switch, appended as JSON lines and fsynced before it counts.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const FILE_NAME: &str = "decisions.jsonl";

/// The newest entries kept in memory; older ones are read back from the file when asked for,
/// so a daemon that runs for months does not grow with its history.
pub const IN_MEMORY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A rule changed state.
    State,
    /// An action was decided or attempted.
    Action,
    /// On-call acknowledged a breached rule.
    Ack,
    /// The transfers' switch changed.
    Switch,
    /// An action's write-ahead intent: written before the first request that changes anything.
    Intent,
    /// A build or plugin configuration learned to be good or bad (a rollback target, or not).
    Known,
    /// Something about the guard itself (the log writable again, an intent settled).
    Note,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub at: String,
    pub at_ms: i64,
    pub cbo: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `rollback`, `disable`, `alert`, `enable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `serverless`, `plugin_release`, `webhook`, `command`, `flex_flag`, `switch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integration: Option<String>,
    /// `fired`, `dry_run`, `failed`, `suppressed`, `retrying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The idempotency key joining an intent to its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub evidence: Value,
}

impl Entry {
    pub fn new(cbo: &str, kind: Kind, at_ms: i64) -> Entry {
        Entry {
            seq: 0,
            at: crate::clock::rfc3339(at_ms),
            at_ms,
            cbo: cbo.to_string(),
            kind,
            rule: None,
            from: None,
            to: None,
            action: None,
            integration: None,
            result: None,
            attempt: None,
            detail: None,
            deployment: None,
            key: None,
            evidence: Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("decision log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether the log can be written now, for `/readyz`, the metrics and the action pipeline:
/// nothing fires without a record.
#[derive(Debug, Default)]
pub struct Health {
    broken: Mutex<Option<String>>,
    errors: AtomicU64,
}

impl Health {
    /// `None` while writable; else why not.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn writable(&self) -> bool {
        self.broken().is_none()
    }

    /// Failed appends since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn set(&self, broken: Option<String>) {
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = broken;
    }
}

struct Inner {
    file: File,
    /// The file's length after the last complete append: a failed append is cut back to it.
    len: u64,
    /// A failed append may have left part of a line that could not be cut: the next one
    /// starts on a line of its own.
    torn: bool,
    /// The newest entries, at most `cap`.
    recent: VecDeque<Entry>,
    cap: usize,
    last_seq: u64,
    /// The latest `at_ms` among entries no longer in memory (`None` while memory holds them all).
    dropped_until_ms: Option<i64>,
}

impl Inner {
    fn keep(&mut self, entry: Entry) {
        self.last_seq = self.last_seq.max(entry.seq);
        self.recent.push_back(entry);
        while self.recent.len() > self.cap {
            let old = self.recent.pop_front().expect("over the cap");
            self.dropped_until_ms = Some(
                self.dropped_until_ms
                    .map_or(old.at_ms, |m| m.max(old.at_ms)),
            );
        }
    }
}

pub struct DecisionLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    pub health: Arc<Health>,
    /// Appends waiting for the commit in progress: they go together in the next one.
    group: Mutex<Group>,
    committed: std::sync::Condvar,
    /// Writes with their fsync so far (each a group of appends).
    commits: std::sync::atomic::AtomicU64,
}

/// Group commit: whoever appends while no commit runs commits everything queued, with one
/// write and one fsync; the others wait for their entries' result.
#[derive(Default)]
struct Group {
    next_ticket: u64,
    queued: Vec<(u64, Vec<Entry>)>,
    done: std::collections::HashMap<u64, Result<Vec<Entry>, (std::io::ErrorKind, String)>>,
    committing: bool,
}

/// Every readable entry of the file at `path`, oldest first; `warn` names unreadable lines (a
/// torn last line after a crash, or one being written right now).
fn read_entries(path: &Path, warn: bool, mut each: impl FnMut(Entry)) -> std::io::Result<()> {
    read_entries_while(path, warn, |e| {
        each(e);
        true
    })
}

/// As `read_entries`, stopping once `each` returns false.
fn read_entries_while(
    path: &Path,
    warn: bool,
    mut each: impl FnMut(Entry) -> bool,
) -> std::io::Result<()> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // Lines as bytes: a damaged line (a torn multi-byte character, say) is skipped with its
    // number; it never stops the daemon from starting.
    for (n, line) in BufReader::new(f).split(b'\n').enumerate() {
        let line = line?;
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => {
                if !each(e) {
                    break;
                }
            }
            Err(e) if warn => {
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping an unreadable decision log line")
            }
            Err(_) => {}
        }
    }
    Ok(())
}

impl DecisionLog {
    /// Opens (creating) `state_dir/decisions.jsonl` and reads what it holds. A torn last line
    /// (a crash mid-write) is skipped with a warning; the file is never rewritten.
    pub fn open(state_dir: &Path) -> Result<DecisionLog, LogError> {
        DecisionLog::open_keeping(state_dir, IN_MEMORY)
    }

    /// As `open`, keeping the newest `cap` entries in memory.
    pub fn open_keeping(state_dir: &Path, cap: usize) -> Result<DecisionLog, LogError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut inner = Inner {
            file: file.try_clone().map_err(io)?,
            len: 0,
            torn: false,
            recent: VecDeque::new(),
            cap: cap.max(1),
            last_seq: 0,
            dropped_until_ms: None,
        };
        read_entries(&path, true, |e| inner.keep(e)).map_err(io)?;
        // After a torn write, start the next entry on a line of its own.
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            let mut r = File::open(&path).map_err(io)?;
            std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(len - 1)).map_err(io)?;
            std::io::Read::read_exact(&mut r, &mut last).map_err(io)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io)?;
            }
        }
        inner.len = file.metadata().map_err(io)?.len();
        Ok(DecisionLog {
            path,
            inner: Mutex::new(inner),
            health: Arc::default(),
            group: Mutex::default(),
            committed: std::sync::Condvar::new(),
            commits: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends and fsyncs; only then is the entry part of the log.
    pub fn append(&self, entry: Entry) -> Result<Entry, LogError> {
        Ok(self.append_all(vec![entry])?.remove(0))
    }

    /// Appends several entries with one fsync, together with whatever other callers append
    /// meanwhile (group commit): a thousand intents written at once cost a few fsyncs, not a
    /// thousand. Returns once this call's entries are durable (or refused, all of them).
    pub fn append_all(&self, entries: Vec<Entry>) -> Result<Vec<Entry>, LogError> {
        if entries.is_empty() {
            return Ok(entries);
        }
        let mut group = self.group.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = group.next_ticket;
        group.next_ticket += 1;
        group.queued.push((ticket, entries));
        loop {
            if let Some(result) = group.done.remove(&ticket) {
                return result.map_err(|(kind, message)| LogError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::new(kind, message),
                });
            }
            if group.committing {
                group = self
                    .committed
                    .wait(group)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Commit everything queued, this call's entries among them.
            group.committing = true;
            let batch = std::mem::take(&mut group.queued);
            drop(group);
            let sizes: Vec<(u64, usize)> = batch.iter().map(|(t, e)| (*t, e.len())).collect();
            let result = self.commit(batch.into_iter().flat_map(|(_, e)| e).collect());
            group = self.group.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(mut written) => {
                    for (t, n) in sizes.into_iter().rev() {
                        let mine = written.split_off(written.len() - n);
                        group.done.insert(t, Ok(mine));
                    }
                }
                Err(LogError::Io { source, .. }) => {
                    for (t, _) in sizes {
                        group
                            .done
                            .insert(t, Err((source.kind(), source.to_string())));
                    }
                }
            }
            group.committing = false;
            self.committed.notify_all();
        }
    }

    /// Commits (one write and one fsync each) since the log was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Writes `entries` with one write and one fsync.
    fn commit(&self, mut entries: Vec<Entry>) -> Result<Vec<Entry>, LogError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let mut seq = inner.last_seq;
        let mut buf = Vec::new();
        for entry in &mut entries {
            seq += 1;
            entry.seq = seq;
            serde_json::to_writer(&mut buf, &entry).expect("entries serialize");
            buf.push(b'\n');
        }
        if inner.torn {
            buf.insert(0, b'\n');
        }
        if let Err(source) = self.write(&mut inner, &buf) {
            let e = LogError::Io {
                path: self.path.clone(),
                source,
            };
            self.health.errors.fetch_add(1, Ordering::Relaxed);
            if self.health.writable() {
                tracing::error!(error = %e, "the decision log cannot be written: no action fires until it can");
            }
            self.health.set(Some(e.to_string()));
            return Err(e);
        }
        if !self.health.writable() {
            tracing::warn!(path = %self.path.display(), "the decision log is writable again");
            self.health.set(None);
        }
        inner.torn = false;
        for e in &entries {
            inner.keep(e.clone());
        }
        Ok(entries)
    }

    /// Writes and fsyncs `buf`; on failure cuts the file back to its last complete entry (a
    /// full disk leaves no half line), reopening the file for the next try.
    fn write(&self, inner: &mut Inner, buf: &[u8]) -> std::io::Result<()> {
        let result = inner
            .file
            .write_all(buf)
            .and_then(|()| inner.file.sync_data());
        match result {
            Ok(()) => {
                inner.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let cut = inner
                    .file
                    .set_len(inner.len)
                    .and_then(|()| inner.file.sync_data());
                inner.torn |= cut.is_err();
                if let Ok(f) = OpenOptions::new().append(true).open(&self.path) {
                    inner.len = f.metadata().map(|m| m.len()).unwrap_or(inner.len);
                    inner.file = f;
                }
                Err(e)
            }
        }
    }

    /// While the log is not writable, tries again with a note saying it is back; a success
    /// makes it writable (the tick calls this every second). True when it just came back.
    pub fn probe(&self, now_ms: i64) -> bool {
        let Some(was) = self.health.broken() else {
            return false;
        };
        let mut e = Entry::new("", Kind::Note, now_ms);
        e.detail = Some(format!("the decision log is writable again (was: {was})"));
        self.append(e).is_ok()
    }

    /// Entries that pass `keep`, from memory when it holds every candidate (`since_ms` after
    /// the newest entry dropped from memory), else from the file.
    fn select(&self, since_ms: Option<i64>, keep: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        {
            let inner = self.lock();
            let in_memory = match (inner.dropped_until_ms, since_ms) {
                (None, _) => true,
                (Some(dropped), Some(since)) => since > dropped,
                (Some(_), None) => false,
            };
            if in_memory {
                return inner.recent.iter().filter(|e| keep(e)).cloned().collect();
            }
        }
        let mut out = Vec::new();
        if let Err(e) = read_entries(&self.path, false, |e| {
            if keep(&e) {
                out.push(e);
            }
        }) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot read the decision log");
        }
        out
    }

    /// Entries of `cbo` (all when `None`) at or after `since_ms`, oldest first.
    pub fn query(&self, cbo: Option<&str>, since_ms: Option<i64>) -> Vec<Entry> {
        self.select(since_ms, |e| {
            cbo.is_none_or(|c| e.cbo == c) && since_ms.is_none_or(|s| e.at_ms >= s)
        })
    }

    /// One page of entries of `cbo` (all when `None`) at or after `since_ms`, with a sequence
    /// number above `after` (the cursor: the last one of the page before), oldest first, at
    /// most `limit`; and whether more follow. Reads from the file only while memory does not
    /// hold the page, and stops reading once the page is full.
    pub fn page(
        &self,
        cbo: Option<&str>,
        since_ms: Option<i64>,
        after: u64,
        limit: usize,
    ) -> (Vec<Entry>, bool) {
        let keep = |e: &Entry| {
            e.seq > after && cbo.is_none_or(|c| e.cbo == c) && since_ms.is_none_or(|s| e.at_ms >= s)
        };
        let mut out = Vec::new();
        let mut more = false;
        {
            let inner = self.lock();
            let covered = inner.dropped_until_ms.is_none()
                || inner.recent.front().is_some_and(|e| e.seq <= after + 1)
                || matches!((inner.dropped_until_ms, since_ms), (Some(d), Some(s)) if s > d);
            if covered {
                for e in inner.recent.iter().filter(|e| keep(e)) {
                    if out.len() == limit {
                        more = true;
                        break;
                    }
                    out.push(e.clone());
                }
                return (out, more);
            }
        }
        if let Err(e) = read_entries_while(&self.path, false, |e| {
            if keep(&e) {
                if out.len() == limit {
                    more = true;
                    return false;
                }
                out.push(e);
            }
            true
        }) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot read the decision log");
        }
        (out, more)
    }

    /// The sequence number of the newest entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Entries with a sequence number above `seq` (those written since one was read).
    pub fn after(&self, seq: u64) -> Vec<Entry> {
        {
            let inner = self.lock();
            // Sequence numbers only grow: the new entries are a tail, in memory unless `seq`
            // is older than everything there.
            if inner.dropped_until_ms.is_none()
                || inner.recent.front().is_some_and(|e| e.seq <= seq + 1)
            {
                let start = inner.recent.partition_point(|e| e.seq <= seq);
                return inner.recent.range(start..).cloned().collect();
            }
        }
        self.select(None, |e| e.seq > seq)
    }

    /// Every entry, oldest first (from the file once memory no longer holds them all).
    pub fn entries(&self) -> Vec<Entry> {
        self.select(None, |_| true)
    }

    /// Visits every entry, oldest first, without holding them all at once (the replay at start).
    pub fn for_each(&self, mut each: impl FnMut(&Entry)) {
        {
            let inner = self.lock();
            if inner.dropped_until_ms.is_none() {
                inner.recent.iter().for_each(each);
                return;
            }
        }
        if let Err(e) = read_entries(&self.path, false, |e| each(&e)) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot read the decision log");
        }
    }

    /// How many entries are held in memory.
    pub fn in_memory(&self) -> usize {
        self.lock().recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_at_once_from_many_threads_are_each_durable_once_in_one_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(DecisionLog::open(dir.path()).unwrap());
        let start = Arc::new(std::sync::Barrier::new(64));
        let threads: Vec<_> = (0..64)
            .map(|i| {
                let (log, start) = (log.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut e = Entry::new(&format!("c{i}"), Kind::Action, 1_000 + i);
                    e.detail = Some(format!("entry {i}"));
                    log.append(e).unwrap()
                })
            })
            .collect();
        let written: Vec<Entry> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Each caller got its own entry back, with the sequence number it has on disk.
        for (i, e) in written.iter().enumerate() {
            assert_eq!(e.cbo, format!("c{i}"));
        }
        let mut seqs: Vec<u64> = written.iter().map(|e| e.seq).collect();
        seqs.sort();
        assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
        let reopened = DecisionLog::open(dir.path()).unwrap();
        let on_disk = reopened.entries();
        assert_eq!(on_disk.len(), 64);
        for e in &written {
            let same = on_disk.iter().find(|d| d.seq == e.seq).unwrap();
            assert_eq!((&same.cbo, &same.detail), (&e.cbo, &e.detail));
        }
    }

    #[test]
    fn a_full_disk_refuses_the_entry_leaves_no_half_line_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        log.append(Entry::new("a", Kind::State, 1_000)).unwrap();
        let size = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        // Every write now fails with ENOSPC, as on a full disk.
        log.lock().file = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let err = log
            .append(Entry::new("a", Kind::Intent, 2_000))
            .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert!(!log.health.writable());
        assert_eq!(log.health.errors(), 1);
        assert!(log.health.broken().unwrap().contains("No space left"));
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            size,
            "nothing of the refused entry reached the file"
        );
        // The failed write reopened the file: the disk has room again, the probe notes it.
        assert!(log.probe(3_000));
        assert!(log.health.writable());
        let all = log.entries();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[1].kind, Kind::Note);
        assert_eq!(all[1].seq, 2, "the refused entry took no sequence number");
        drop(log);
        assert_eq!(DecisionLog::open(dir.path()).unwrap().entries().len(), 2);
    }

    #[test]
    fn pages_follow_the_cursor_from_memory_and_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // Memory holds the newest 10: the older pages come from the file.
        let log = DecisionLog::open_keeping(dir.path(), 10).unwrap();
        for i in 0..45 {
            let cbo = if i % 3 == 0 { "b" } else { "a" };
            log.append(Entry::new(cbo, Kind::Note, 1_000 + i)).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let (page, more) = log.page(Some("a"), None, after, 7);
            assert!(page.len() <= 7);
            seen.extend(page.iter().map(|e| e.seq));
            if !more {
                break;
            }
            after = page.last().unwrap().seq;
        }
        let want: Vec<u64> = (1..=45).filter(|s| (s - 1) % 3 != 0).collect();
        assert_eq!(seen, want);
        let (page, more) = log.page(None, None, 40, 100);
        assert_eq!((page.len(), more), (5, false));
    }

    #[test]
    fn a_line_with_a_torn_character_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        log.append(Entry::new("a", Kind::State, 1_000)).unwrap();
        drop(log);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // Half of a two-byte character, then a line of its own, then a good entry.
        bytes.extend_from_slice(b"{\"cbo\":\"\xC3\n");
        std::fs::write(&path, &bytes).unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        log.append(Entry::new("a", Kind::Note, 2_000)).unwrap();
        drop(log);
        let log = DecisionLog::open(dir.path()).unwrap();
        let kinds: Vec<Kind> = log.entries().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![Kind::State, Kind::Note]);
    }

    #[test]
    fn entries_survive_a_reopen_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        let mut e = Entry::new("nss", Kind::Action, 1_000);
        e.result = Some("fired".into());
        log.append(e.clone()).unwrap();
        log.append(Entry::new("b", Kind::State, 2_000)).unwrap();
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"seq\": 3, \"at\"").unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        let all = log.entries();
        assert_eq!(all.len(), 2);
        log.append(Entry::new("c", Kind::Ack, 3_000)).unwrap();
        drop(log);
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!(
            log.entries().len(),
            3,
            "the entry after a torn line is readable"
        );
        let all = log.entries();
        assert_eq!(all[0].result.as_deref(), Some("fired"));
        assert_eq!(log.query(Some("b"), None).len(), 1);
        assert_eq!(log.query(None, Some(1_500)).len(), 2);
    }

    #[test]
    fn memory_holds_the_newest_entries_and_older_ones_are_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open_keeping(dir.path(), 10).unwrap();
        for i in 0..50 {
            let cbo = if i % 2 == 0 { "a" } else { "b" };
            log.append(Entry::new(cbo, Kind::State, i * 1000)).unwrap();
        }
        assert_eq!(log.in_memory(), 10);
        assert_eq!(log.last_seq(), 50);
        assert_eq!(log.entries().len(), 50);
        assert_eq!(log.query(Some("a"), None).len(), 25);
        assert_eq!(log.query(None, Some(45_000)).len(), 5);
        assert_eq!(log.query(None, Some(10_000)).len(), 40);
        let after = log.after(3);
        assert_eq!((after.len(), after[0].seq), (47, 4));
        assert_eq!(log.after(48).len(), 2);
        drop(log);
        // Reopened, the same: the newest in memory, all of it readable.
        let log = DecisionLog::open_keeping(dir.path(), 10).unwrap();
        assert_eq!((log.in_memory(), log.entries().len()), (10, 50));
        let mut seen = 0;
        log.for_each(|_| seen += 1);
        assert_eq!(seen, 50);
        let e = log.append(Entry::new("a", Kind::Ack, 60_000)).unwrap();
        assert_eq!(e.seq, 51);
    }
}
