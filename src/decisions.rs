//! The durable decision log: every rule state change, action attempt, ack and switch, appended as JSON lines and fsynced before it counts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const FILE_NAME: &str = "decisions.jsonl";
/// Where each entry starts in the log, by CBO: a read goes straight to the entries it returns.
pub const INDEX_FILE: &str = "decisions.index";
/// What the log says, folded up to one entry (`actions::Replayed`): a start reads it and the
/// entries after it, not the whole history.
pub const SNAPSHOT_FILE: &str = "decisions.snapshot.json";
/// Entries between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 10_000;
const SNAPSHOT_VERSION: u32 = 1;

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
    #[error("decision log in the store: {0}")]
    Store(String),
    /// A leader's write, refused because the store names another leader (or none).
    #[error("this replica does not hold the leader's lease: not written")]
    NotLeader,
    /// Refused by the store's constraint (once per deployment).
    #[error("refused by the store: {0}")]
    Refused(String),
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

    pub(crate) fn set(&self, broken: Option<String>) {
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = broken;
    }
}

/// Where one entry is: its sequence number, the byte its line starts at, and its time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rec {
    seq: u64,
    off: u64,
    at_ms: i64,
}

/// Every entry's place in the file, in order, and each CBO's entries (positions in `all`):
/// 28 bytes an entry in memory, against some 500 on disk.
#[derive(Default)]
struct Index {
    all: Vec<Rec>,
    by_cbo: std::collections::HashMap<String, Vec<u32>>,
}

impl Index {
    fn push(&mut self, rec: Rec, cbo: &str) {
        let pos = self.all.len() as u32;
        self.all.push(rec);
        match self.by_cbo.get_mut(cbo) {
            Some(v) => v.push(pos),
            None => {
                self.by_cbo.insert(cbo.to_string(), vec![pos]);
            }
        }
    }

    /// One line of the index file: `seq offset at_ms "cbo"`.
    fn line(rec: &Rec, cbo: &str, out: &mut Vec<u8>) {
        let cbo = serde_json::to_string(cbo).expect("a string serializes");
        let _ = writeln!(out, "{} {} {} {cbo}", rec.seq, rec.off, rec.at_ms);
    }

    fn parse(line: &[u8]) -> Option<(Rec, String)> {
        let line = std::str::from_utf8(line).ok()?;
        let mut parts = line.splitn(4, ' ');
        let rec = Rec {
            seq: parts.next()?.parse().ok()?,
            off: parts.next()?.parse().ok()?,
            at_ms: parts.next()?.parse().ok()?,
        };
        let quoted = parts.next()?;
        let cbo = match quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
            // The common case: nothing escaped.
            Some(plain) if !plain.contains(['\\', '"']) => plain.to_string(),
            _ => serde_json::from_str(quoted).ok()?,
        };
        Some((rec, cbo))
    }

    /// The whole index file.
    fn lines(&self) -> Vec<u8> {
        let mut cbos = vec![""; self.all.len()];
        for (cbo, positions) in &self.by_cbo {
            for p in positions {
                cbos[*p as usize] = cbo;
            }
        }
        let mut out = Vec::with_capacity(self.all.len() * 40);
        for (rec, cbo) in self.all.iter().zip(cbos) {
            Index::line(rec, cbo, &mut out);
        }
        out
    }

    /// Where entry `pos` starts and where the next one does (or the file ends).
    fn span(&self, pos: usize, len: u64) -> (u64, u64) {
        let end = self.all.get(pos + 1).map_or(len, |r| r.off);
        (self.all[pos].off, end)
    }

    fn position_of(&self, seq: u64) -> Option<usize> {
        self.all.binary_search_by_key(&seq, |r| r.seq).ok()
    }
}

/// The folded state saved every `SNAPSHOT_EVERY` entries and at a clean stop.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// The newest entry folded in, and the byte its line starts at: a log whose entry of that
    /// number is elsewhere (another log) does not take this snapshot.
    seq: u64,
    #[serde(default)]
    off: Option<u64>,
    replayed: crate::actions::Replayed,
}

struct Inner {
    file: File,
    /// The file's length after the last complete append: a failed append is cut back to it.
    len: u64,
    /// A failed append may have left part of a line that could not be cut: the next one
    /// starts on a line of its own.
    torn: bool,
    last_seq: u64,
    index: Index,
    /// The index file, appended after each commit (not fsynced: the log is the truth, and a
    /// start checks the index against it). `None` once a write to it failed: the next start
    /// indexes what it misses.
    index_file: Option<File>,
    /// Every entry folded in order.
    replayed: crate::actions::Replayed,
    /// Entries folded since the last snapshot.
    since_snapshot: u64,
}

pub struct FileLog {
    dir: PathBuf,
    path: PathBuf,
    /// For reads at an offset (`pread`), without the writer's lock.
    reader: File,
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

/// Every readable entry of the file at `path` from byte `from` on, oldest first, with the byte
/// its line starts at; `warn` names unreadable lines (a torn last line after a crash, or one
/// being written right now).
fn scan(
    path: &Path,
    from: u64,
    warn: bool,
    mut each: impl FnMut(u64, Entry),
) -> std::io::Result<()> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut off = from;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let at = off;
        off += n as u64;
        // Lines as bytes: a damaged line (a torn multi-byte character, say) is skipped with
        // where it is; it never stops the daemon from starting.
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => each(at, e),
            Err(e) if warn => {
                tracing::warn!(path = %path.display(), byte = at, error = %e, "skipping an unreadable decision log line")
            }
            Err(_) => {}
        }
    }
}

/// Writes `bytes` to `dir/name` whole or not at all (a temporary file, fsync, rename).
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The index file's records that agree with the log of length `len`, the byte after the last
/// entry they cover, and whether the file held those records and nothing else (else it is
/// written again whole). An index that disagrees with the log (another log's, say) is dropped
/// and built again from the log.
fn load_index(dir: &Path, reader: &File, len: u64) -> (Index, u64, bool) {
    let mut index = Index::default();
    let Ok(bytes) = std::fs::read(dir.join(INDEX_FILE)) else {
        return (index, 0, false);
    };
    let mut last: Option<Rec> = None;
    let mut used = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let Some((rec, cbo)) = line.strip_suffix(b"\n").and_then(Index::parse) else {
            // A torn line: what follows it, if anything, is not trusted.
            break;
        };
        if last.is_some_and(|l| rec.seq <= l.seq || rec.off <= l.off) || rec.off >= len {
            break;
        }
        index.push(rec, &cbo);
        last = Some(rec);
        used += line.len();
    }
    let whole = used == bytes.len();
    let Some(last) = last else {
        return (Index::default(), 0, whole);
    };
    // The newest record must name the entry that is there.
    match read_line_at(reader, last.off, len) {
        Some((e, n)) if e.seq == last.seq => (index, last.off + n, whole),
        _ => {
            tracing::warn!(path = %dir.join(INDEX_FILE).display(), "the decision log index does not match the log: building it again");
            (Index::default(), 0, false)
        }
    }
}

/// The fold saved in the snapshot and the entry it goes up to, when that entry is this log's
/// (same number, same place); else nothing folded yet (the whole log is replayed).
fn load_snapshot(dir: &Path, index: &Index) -> (crate::actions::Replayed, u64) {
    let Ok(bytes) = std::fs::read(dir.join(SNAPSHOT_FILE)) else {
        return Default::default();
    };
    match serde_json::from_slice::<Snapshot>(&bytes) {
        Err(e) => {
            tracing::warn!(error = %e, "the decision log snapshot is unreadable: replaying the log");
            Default::default()
        }
        Ok(s) if s.version != SNAPSHOT_VERSION => {
            tracing::warn!(
                version = s.version,
                "the decision log snapshot is of another version: replaying the log"
            );
            Default::default()
        }
        Ok(s) => {
            let ours = s.seq == 0
                || index
                    .position_of(s.seq)
                    .is_some_and(|p| s.off.is_none_or(|o| index.all[p].off == o));
            if ours {
                (s.replayed, s.seq)
            } else {
                tracing::warn!("the decision log snapshot is not of this log: replaying the log");
                Default::default()
            }
        }
    }
}

/// The entry whose line starts at `off`, and the line's length with its newline.
fn read_line_at(reader: &File, off: u64, len: u64) -> Option<(Entry, u64)> {
    use std::os::unix::fs::FileExt;
    let mut size = 4096u64;
    loop {
        let want = size.min(len.saturating_sub(off)) as usize;
        let mut buf = vec![0u8; want];
        reader.read_exact_at(&mut buf, off).ok()?;
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let e = serde_json::from_slice(&buf[..nl]).ok()?;
            return Some((e, nl as u64 + 1));
        }
        if off + want as u64 >= len {
            let e = serde_json::from_slice(&buf).ok()?;
            return Some((e, want as u64));
        }
        size *= 4;
    }
}

impl FileLog {
    /// Opens (creating) `state_dir/decisions.jsonl`. A start reads the index and the snapshot
    /// and then only the entries written after them, so it does not grow with the history; a
    /// missing or disagreeing index or snapshot is built again from the log. A torn last line
    /// (a crash mid-write) is skipped with a warning; the log is never rewritten.
    pub fn open(state_dir: &Path) -> Result<FileLog, LogError> {
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
        let reader = File::open(&path).map_err(io)?;
        // After a torn write, start the next entry on a line of its own.
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8; 1];
            reader.read_exact_at(&mut last, len - 1).map_err(io)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io)?;
            }
        }
        let len = file.metadata().map_err(io)?.len();

        // What the index misses (entries written after its last record; all of them when
        // there is no index) is read from the log.
        let (mut index, indexed_to, index_whole) = load_index(state_dir, &reader, len);
        let mut missed = Vec::new();
        let mut indexed = 0usize;
        scan(&path, indexed_to, true, |off, e| {
            if index.all.last().is_none_or(|r| e.seq > r.seq) {
                let rec = Rec {
                    seq: e.seq,
                    off,
                    at_ms: e.at_ms,
                };
                index.push(rec, &e.cbo);
                Index::line(&rec, &e.cbo, &mut missed);
                indexed += 1;
            }
        })
        .map_err(io)?;
        let index_path = state_dir.join(INDEX_FILE);
        let index_file = if index_whole {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&index_path)
                .and_then(|mut f| f.write_all(&missed).map(|()| f))
        } else {
            replace_file(state_dir, INDEX_FILE, &index.lines())
                .and_then(|()| OpenOptions::new().append(true).open(&index_path))
        };
        let index_file = match index_file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %index_path.display(), error = %e, "cannot write the decision log index: the next start reads the log instead");
                None
            }
        };

        // The fold: from the snapshot when it names an entry of this log, then the entries
        // after it.
        let (mut replayed, folded_to) = load_snapshot(state_dir, &index);
        let from = index.all.partition_point(|r| r.seq <= folded_to);
        let mut folded = 0u64;
        if let Some(rec) = index.all.get(from) {
            scan(&path, rec.off, false, |_, e| {
                if e.seq > folded_to {
                    replayed.apply(&e);
                    folded += 1;
                }
            })
            .map_err(io)?;
        }
        let last_seq = index.all.last().map_or(0, |r| r.seq);
        if folded > 0 || indexed > 0 {
            tracing::info!(
                entries = index.all.len(),
                indexed,
                folded,
                "decision log opened"
            );
        }
        let log = FileLog {
            dir: state_dir.to_path_buf(),
            path,
            reader,
            inner: Mutex::new(Inner {
                file,
                len,
                torn: false,
                last_seq,
                index,
                index_file,
                replayed,
                since_snapshot: folded,
            }),
            health: Arc::default(),
            group: Mutex::default(),
            committed: std::sync::Condvar::new(),
            commits: Default::default(),
        };
        if folded >= SNAPSHOT_EVERY {
            log.checkpoint();
        }
        Ok(log)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What every entry so far says, folded in order (what a start resumes from).
    pub fn replayed(&self) -> crate::actions::Replayed {
        self.lock().replayed.clone()
    }

    /// Saves the fold, so the next start reads only what comes after (done every
    /// `SNAPSHOT_EVERY` entries and at a clean stop). A failure is reported, never fatal: the
    /// next start replays more.
    pub fn checkpoint(&self) {
        let mut inner = self.lock();
        self.checkpoint_locked(&mut inner);
    }

    fn checkpoint_locked(&self, inner: &mut Inner) {
        // The index covers what the snapshot names before the snapshot is written.
        if let Some(f) = &inner.index_file
            && let Err(e) = f.sync_data()
        {
            tracing::warn!(error = %e, "cannot sync the decision log index");
        }
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            seq: inner.last_seq,
            off: inner.index.all.last().map(|r| r.off),
            replayed: std::mem::take(&mut inner.replayed),
        };
        let bytes = serde_json::to_vec(&snapshot).expect("the fold serializes");
        inner.replayed = snapshot.replayed;
        match replace_file(&self.dir, SNAPSHOT_FILE, &bytes) {
            Ok(()) => inner.since_snapshot = 0,
            Err(e) => {
                tracing::warn!(path = %self.dir.join(SNAPSHOT_FILE).display(), error = %e, "cannot write the decision log snapshot: the next start replays more of the log")
            }
        }
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
                Err(e) => {
                    let (kind, message) = match e {
                        LogError::Io { source, .. } => (source.kind(), source.to_string()),
                        other => (std::io::ErrorKind::Other, other.to_string()),
                    };
                    for (t, _) in sizes {
                        group.done.insert(t, Err((kind, message.clone())));
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

    /// Writes `entries` with one write and one fsync, then indexes and folds them.
    fn commit(&self, mut entries: Vec<Entry>) -> Result<Vec<Entry>, LogError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let mut seq = inner.last_seq;
        let mut buf = Vec::new();
        if inner.torn {
            buf.push(b'\n');
        }
        let mut starts = Vec::with_capacity(entries.len());
        for entry in &mut entries {
            seq += 1;
            entry.seq = seq;
            starts.push(buf.len() as u64);
            serde_json::to_writer(&mut buf, &entry).expect("entries serialize");
            buf.push(b'\n');
        }
        let base = inner.len;
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
        inner.last_seq = seq;
        let mut lines = Vec::new();
        for (entry, start) in entries.iter().zip(starts) {
            let rec = Rec {
                seq: entry.seq,
                off: base + start,
                at_ms: entry.at_ms,
            };
            inner.index.push(rec, &entry.cbo);
            Index::line(&rec, &entry.cbo, &mut lines);
            inner.replayed.apply(entry);
        }
        if let Some(f) = &mut inner.index_file
            && let Err(e) = f.write_all(&lines)
        {
            tracing::warn!(error = %e, "cannot write the decision log index: the next start reads the log instead");
            inner.index_file = None;
        }
        inner.since_snapshot += entries.len() as u64;
        if inner.since_snapshot >= SNAPSHOT_EVERY {
            self.checkpoint_locked(&mut inner);
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

    /// One page of entries of `cbo` (all when `None`) at or after `since_ms`, with a sequence
    /// number above `after` (the cursor: the last one of the page before), oldest first, at
    /// most `limit`; and whether more follow. The index picks the entries; only they are read.
    pub fn page(
        &self,
        cbo: Option<&str>,
        since_ms: Option<i64>,
        after: u64,
        limit: usize,
    ) -> (Vec<Entry>, bool) {
        let mut spans = Vec::new();
        let mut more = false;
        {
            let inner = self.lock();
            let index = &inner.index;
            let mut take = |pos: usize| {
                if since_ms.is_some_and(|s| index.all[pos].at_ms < s) {
                    return true;
                }
                if spans.len() == limit {
                    more = true;
                    return false;
                }
                spans.push(index.span(pos, inner.len));
                true
            };
            match cbo {
                Some(cbo) => {
                    let mine = index.by_cbo.get(cbo).map_or(&[][..], |v| &v[..]);
                    let start = mine.partition_point(|p| index.all[*p as usize].seq <= after);
                    for p in &mine[start..] {
                        if !take(*p as usize) {
                            break;
                        }
                    }
                }
                None => {
                    let start = index.all.partition_point(|r| r.seq <= after);
                    for p in start..index.all.len() {
                        if !take(p) {
                            break;
                        }
                    }
                }
            }
        }
        let out = spans
            .into_iter()
            .filter_map(|(off, end)| match read_line_at(&self.reader, off, end) {
                Some((e, _)) => Some(e),
                None => {
                    tracing::error!(path = %self.path.display(), byte = off, "cannot read a decision log entry");
                    None
                }
            })
            .collect();
        (out, more)
    }

    /// Entries of `cbo` (all when `None`) at or after `since_ms`, oldest first.
    pub fn query(&self, cbo: Option<&str>, since_ms: Option<i64>) -> Vec<Entry> {
        self.page(cbo, since_ms, 0, usize::MAX).0
    }

    /// The sequence number of the newest entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Entries with a sequence number above `seq` (those written since one was read).
    pub fn after(&self, seq: u64) -> Vec<Entry> {
        self.page(None, None, seq, usize::MAX).0
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.after(0)
    }

    /// How many entries the log holds.
    pub fn len(&self) -> usize {
        self.lock().index.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the log lives: a file under the state dir (one process), or the store's table, which
/// every replica reads and only the leader writes to for its decisions.
enum Backend {
    File(Box<FileLog>),
    Store(Arc<crate::pg::Store>),
}

/// The decision log, whichever the backend.
pub struct DecisionLog {
    backend: Backend,
    pub health: Arc<Health>,
}

/// Entries read from the store at once.
const STORE_PAGE: usize = 10_000;

impl DecisionLog {
    /// The file log under `state_dir` (`FileLog::open`).
    pub fn open(state_dir: &Path) -> Result<DecisionLog, LogError> {
        let file = FileLog::open(state_dir)?;
        Ok(DecisionLog {
            health: file.health.clone(),
            backend: Backend::File(Box::new(file)),
        })
    }

    /// The log in the store's `tg_decisions`.
    pub fn in_store(store: Arc<crate::pg::Store>) -> DecisionLog {
        DecisionLog {
            health: store.health.clone(),
            backend: Backend::Store(store),
        }
    }

    pub fn store(&self) -> Option<&Arc<crate::pg::Store>> {
        match &self.backend {
            Backend::File(_) => None,
            Backend::Store(s) => Some(s),
        }
    }

    /// Whether this process may act: always with the file log; with the store, only the
    /// replica holding the lease, once it has read the log.
    pub fn leading(&self) -> bool {
        match &self.backend {
            Backend::File(_) => true,
            Backend::Store(s) => s.leading(),
        }
    }

    /// What every entry so far says, folded in order (what a start resumes from).
    pub fn replayed(&self) -> Result<crate::actions::Replayed, LogError> {
        match &self.backend {
            Backend::File(f) => Ok(f.replayed()),
            Backend::Store(s) => {
                let mut folded = crate::actions::Replayed::default();
                let mut after = 0;
                loop {
                    let page = s.read(None, None, after, STORE_PAGE, false)?;
                    for e in &page {
                        folded.apply(e);
                        after = e.seq;
                    }
                    if page.len() < STORE_PAGE {
                        break;
                    }
                }
                s.log_seq.store(after, Ordering::Release);
                Ok(folded)
            }
        }
    }

    /// Entries other replicas wrote since this one last read (the store only; the file log
    /// has no other writer).
    pub fn others(&self) -> Result<Vec<Entry>, LogError> {
        let Backend::Store(s) = &self.backend else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        loop {
            let after = s.log_seq.load(Ordering::Acquire);
            let page = s.read(None, None, after, STORE_PAGE, true)?;
            if let Some(last) = page.last() {
                s.log_seq.store(last.seq, Ordering::Release);
            }
            let done = page.len() < STORE_PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Saves the file log's fold (nothing to do for the store).
    pub fn checkpoint(&self) {
        if let Backend::File(f) = &self.backend {
            f.checkpoint();
        }
    }

    /// Appends one entry; durable (or refused) when this returns.
    pub fn append(&self, entry: Entry) -> Result<Entry, LogError> {
        Ok(self.append_all(vec![entry])?.remove(0))
    }

    /// Appends entries of this process's decisions: in the store, only while it leads.
    pub fn append_all(&self, entries: Vec<Entry>) -> Result<Vec<Entry>, LogError> {
        match &self.backend {
            Backend::File(f) => f.append_all(entries),
            Backend::Store(s) => s.append(entries, true),
        }
    }

    /// Appends what on-call did through this replica (an ack, transfers back on): any replica
    /// takes those.
    pub fn append_oncall(&self, entry: Entry) -> Result<Entry, LogError> {
        match &self.backend {
            Backend::File(f) => f.append(entry),
            Backend::Store(s) => Ok(s.append(vec![entry], false)?.remove(0)),
        }
    }

    /// Writes with their fsync so far (the file log's group commits).
    pub fn commits(&self) -> u64 {
        match &self.backend {
            Backend::File(f) => f.commits(),
            Backend::Store(_) => 0,
        }
    }

    /// While the log is not writable, tries again; true when it just came back.
    pub fn probe(&self, now_ms: i64) -> bool {
        match &self.backend {
            Backend::File(f) => f.probe(now_ms),
            Backend::Store(s) => {
                if self.health.writable() || s.ping().is_err() {
                    return false;
                }
                tracing::warn!("the store answers again");
                self.health.set(None);
                true
            }
        }
    }

    /// One page of entries (`FileLog::page`); from the store, a read that fails is logged and
    /// answers nothing.
    pub fn page(
        &self,
        cbo: Option<&str>,
        since_ms: Option<i64>,
        after: u64,
        limit: usize,
    ) -> (Vec<Entry>, bool) {
        match &self.backend {
            Backend::File(f) => f.page(cbo, since_ms, after, limit),
            Backend::Store(s) => match s.read(cbo, since_ms, after, limit.saturating_add(1), false)
            {
                Ok(mut v) => {
                    let more = v.len() > limit;
                    v.truncate(limit);
                    (v, more)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the decision log");
                    (Vec::new(), false)
                }
            },
        }
    }

    /// Entries of `cbo` (all when `None`) at or after `since_ms`, oldest first.
    pub fn query(&self, cbo: Option<&str>, since_ms: Option<i64>) -> Vec<Entry> {
        self.page(cbo, since_ms, 0, usize::MAX).0
    }

    /// The sequence number of the newest entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        match &self.backend {
            Backend::File(f) => f.last_seq(),
            Backend::Store(_) => self.entries().last().map_or(0, |e| e.seq),
        }
    }

    /// Entries with a sequence number above `seq`.
    pub fn after(&self, seq: u64) -> Vec<Entry> {
        self.page(None, None, seq, usize::MAX).0
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.after(0)
    }

    /// How many entries the log holds.
    pub fn len(&self) -> usize {
        match &self.backend {
            Backend::File(f) => f.len(),
            Backend::Store(_) => self.entries().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let log = FileLog::open(dir.path()).unwrap();
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
    fn pages_follow_the_cursor_before_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        for i in 0..45 {
            let cbo = if i % 3 == 0 { "b" } else { "a" };
            log.append(Entry::new(cbo, Kind::Note, 1_000 + i)).unwrap();
        }
        let pages = |log: &DecisionLog| {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let (page, more) = log.page(Some("a"), None, after, 7);
                assert!(page.len() <= 7);
                assert!(page.iter().all(|e| e.cbo == "a"));
                seen.extend(page.iter().map(|e| e.seq));
                if !more {
                    break;
                }
                after = page.last().unwrap().seq;
            }
            seen
        };
        let want: Vec<u64> = (1..=45).filter(|s| (s - 1) % 3 != 0).collect();
        assert_eq!(pages(&log), want);
        let (page, more) = log.page(None, None, 40, 100);
        assert_eq!((page.len(), more), (5, false));
        let (page, more) = log.page(Some("b"), Some(1_030), 0, 2);
        assert_eq!(
            (page.iter().map(|e| e.at_ms).collect::<Vec<_>>(), more),
            (vec![1_030, 1_033], true)
        );
        assert!(log.page(Some("nobody"), None, 0, 10).0.is_empty());
        drop(log);
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!(pages(&log), want);
        assert_eq!(log.len(), 45);
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

    /// An entry that changes what a start resumes from: on-call acknowledged `rule` of `cbo`.
    fn ack(cbo: &str, rule: &str, at_ms: i64) -> Entry {
        let mut e = Entry::new(cbo, Kind::Ack, at_ms);
        e.rule = Some(rule.into());
        e
    }

    fn state(cbo: &str, rule: &str, to: &str, at_ms: i64) -> Entry {
        let mut e = Entry::new(cbo, Kind::State, at_ms);
        e.rule = Some(rule.into());
        e.to = Some(to.into());
        e
    }

    /// Overwrites the line of entry `seq` with spaces: what a start no longer reads from the
    /// log must come from the snapshot.
    fn blank(dir: &Path, seq: u64) {
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let mut start = 0;
        for line in bytes.clone().split_inclusive(|b| *b == b'\n') {
            let e: Entry = serde_json::from_slice(line).unwrap();
            if e.seq == seq {
                bytes[start..start + line.len() - 1].fill(b' ');
                break;
            }
            start += line.len();
        }
        std::fs::write(&path, bytes).unwrap();
    }

    #[test]
    fn a_start_resumes_from_the_snapshot_and_reads_only_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        log.append(ack("a", "success_rate", 1_000)).unwrap();
        log.append(state("a", "history_loss", "inconclusive", 1_500))
            .unwrap();
        log.checkpoint();
        log.append(ack("b", "bad_requests", 2_000)).unwrap();
        drop(log);
        // The first entry is gone from the log: only the snapshot still knows it.
        blank(dir.path(), 1);
        let log = DecisionLog::open(dir.path()).unwrap();
        let acked = |log: &DecisionLog| {
            let mut v: Vec<String> =
                serde_json::to_value(log.replayed().unwrap()).unwrap()["acked"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| format!("{}/{}", p[0].as_str().unwrap(), p[1].as_str().unwrap()))
                    .collect();
            v.sort();
            v
        };
        assert_eq!(acked(&log), ["a/success_rate", "b/bad_requests"]);
        let replayed = log.replayed().unwrap();
        let states: Vec<_> = replayed
            .rule_states()
            .map(|(c, r, s)| format!("{c}/{r}/{s}"))
            .collect();
        assert_eq!(states, ["a/history_loss/inconclusive"]);
        assert_eq!(log.last_seq(), 3);
        assert_eq!(
            log.append(Entry::new("c", Kind::Note, 3_000)).unwrap().seq,
            4
        );
        drop(log);
        // Without the snapshot the whole log is replayed: the blanked entry is lost.
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!(acked(&log), ["b/bad_requests"]);
    }

    #[test]
    fn a_switch_and_the_flags_to_restore_come_back_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        let mut e = Entry::new("a", Kind::Switch, 1_000);
        e.evidence = serde_json::json!({
            "cbo": "a", "transfers_enabled": false, "cold_transfer": true,
            "multi_participant": true, "reason": "success_rate breached",
            "since": "2026-11-26T10:00:00.000Z",
            "previous_flags": {"conversation_transfer": {"enabled": true}},
        });
        log.append(e).unwrap();
        log.append(Entry::new("b", Kind::Note, 2_000)).unwrap();
        log.checkpoint();
        drop(log);
        // The switch's entry is gone from the log (the index still agrees with its last).
        blank(dir.path(), 1);
        let log = DecisionLog::open(dir.path()).unwrap();
        let saved = serde_json::to_value(log.replayed().unwrap()).unwrap();
        let (switch, flags) = (&saved["switches"][0][0], &saved["switches"][0][1]);
        assert_eq!(
            (
                switch["cbo"].as_str(),
                switch["transfers_enabled"].as_bool()
            ),
            (Some("a"), Some(false))
        );
        assert_eq!(flags["conversation_transfer"]["enabled"], true);
    }

    #[test]
    fn another_logs_snapshot_is_not_taken() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let log = DecisionLog::open(a.path()).unwrap();
        log.append(ack("a", "success_rate", 1_000)).unwrap();
        log.append(Entry::new("a", Kind::Note, 2_000)).unwrap();
        log.checkpoint();
        drop(log);
        let log = DecisionLog::open(b.path()).unwrap();
        let mut long = Entry::new("b", Kind::Note, 1_000);
        long.detail = Some("a longer entry: the second one starts elsewhere".into());
        log.append(long).unwrap();
        log.append(Entry::new("b", Kind::Note, 2_000)).unwrap();
        drop(log);
        std::fs::copy(a.path().join(SNAPSHOT_FILE), b.path().join(SNAPSHOT_FILE)).unwrap();
        let log = DecisionLog::open(b.path()).unwrap();
        let saved = serde_json::to_value(log.replayed().unwrap()).unwrap();
        assert_eq!(saved["acked"], serde_json::json!([]), "{saved}");
    }

    #[test]
    fn an_index_that_lags_or_disagrees_with_the_log_is_mended_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        for i in 0..20 {
            let cbo = if i % 2 == 0 { "a" } else { "b" };
            log.append(Entry::new(cbo, Kind::Note, i)).unwrap();
        }
        drop(log);
        let index = dir.path().join(INDEX_FILE);
        let whole = std::fs::read(&index).unwrap();
        let cbo_a = |log: &DecisionLog| {
            log.query(Some("a"), None)
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        };
        let want: Vec<u64> = (1..=20).step_by(2).collect();

        // A crash before the index caught up: its last records (and half of one) are missing.
        let lines: Vec<&[u8]> = whole.split_inclusive(|b| *b == b'\n').collect();
        let mut lagging = lines[..12].concat();
        lagging.extend_from_slice(&lines[12][..5]);
        std::fs::write(&index, &lagging).unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!((cbo_a(&log), log.len()), (want.clone(), 20));
        drop(log);
        assert_eq!(
            std::fs::read(&index).unwrap(),
            whole,
            "the torn record is mended"
        );
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!(cbo_a(&log), want);
        drop(log);

        // An index of another log: built again.
        std::fs::write(&index, b"1 0 0 \"x\"\n2 3 0 \"x\"\n").unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!((cbo_a(&log), log.len()), (want.clone(), 20));
        drop(log);
        assert_eq!(std::fs::read(&index).unwrap(), whole);

        // No index at all.
        std::fs::remove_file(&index).unwrap();
        let log = DecisionLog::open(dir.path()).unwrap();
        assert_eq!(cbo_a(&log), want);
        assert_eq!(log.after(18).len(), 2);
    }
}
