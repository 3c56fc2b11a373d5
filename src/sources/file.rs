//! `[[sources.file]]`: follows a log file across rotation (rename or copy-truncate) and feeds its event lines to one CBO.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Shared;
use crate::checkpoint::Position;
use crate::config::FileSource;
use crate::event::{self, EventError};
use crate::metrics::Reject;
use crate::state::Rejection;

/// How often the file is looked at for new lines and for rotation.
pub const POLL: Duration = Duration::from_millis(250);
/// A line longer than this is dropped rather than buffered without end.
const MAX_LINE: usize = 1024 * 1024;
/// A backlog is read this much at a time, each chunk taken before the next is read: memory
/// stays bounded whatever the file's size.
pub const CHUNK: usize = 1024 * 1024;

/// Lines read from a file: one buffer of text and where each line lies in it, so a chunk of
/// thousands of lines is one allocation, not one per line.
#[derive(Debug, Default)]
pub struct Lines {
    text: String,
    /// Byte ranges in `text`, newline excluded.
    spans: Vec<(usize, usize)>,
}

impl Lines {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn get(&self, i: usize) -> &str {
        let (from, to) = self.spans[i];
        &self.text[from..to]
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.spans.iter().map(|&(from, to)| &self.text[from..to])
    }

    /// Adds the lines at `spans` of `buf`. Bytes that are not UTF-8 become U+FFFD (the line
    /// is still judged); `buf` is checked whole and kept as it is when it is all UTF-8.
    fn add(&mut self, buf: Vec<u8>, spans: &[(usize, usize)]) {
        match String::from_utf8(buf) {
            Ok(text) if self.text.is_empty() => {
                self.text = text;
                self.spans.extend_from_slice(spans);
            }
            Ok(text) => {
                let base = self.text.len();
                self.text.push_str(&text);
                self.spans
                    .extend(spans.iter().map(|&(from, to)| (base + from, base + to)));
            }
            Err(e) => {
                let buf = e.into_bytes();
                for &(from, to) in spans {
                    self.push(&buf[from..to]);
                }
            }
        }
    }

    fn push(&mut self, line: &[u8]) {
        let from = self.text.len();
        self.text.push_str(&String::from_utf8_lossy(line));
        self.spans.push((from, self.text.len()));
    }
}

/// Reads complete new lines from a path, like `tail -F`.
pub struct Follower {
    path: PathBuf,
    file: Option<(File, u64)>,
    offset: u64,
    partial: Vec<u8>,
    /// Whether the next open starts at the beginning (after a rotation, or when asked).
    from_start: bool,
    discarding: bool,
    /// Where the first open resumes (a restart): the file read before, and how far.
    resume: Option<Position>,
    /// The byte ranges of complete lines read since the last `take_ranges`: (inode, from, to).
    ranges: Vec<(u64, u64, u64)>,
}

impl Follower {
    pub fn new(path: &Path, from_beginning: bool) -> Follower {
        Follower {
            path: path.to_path_buf(),
            file: None,
            offset: 0,
            partial: Vec::new(),
            from_start: from_beginning,
            discarding: false,
            resume: None,
            ranges: Vec::new(),
        }
    }

    /// The byte ranges whose lines were read since the last call, as the journal keeps
    /// them: a restart reads them again from the file rather than from copies.
    pub fn take_ranges(&mut self) -> Vec<(u64, u64, u64)> {
        std::mem::take(&mut self.ranges)
    }

    /// Resumes at `position` when the path still names that file and it is at least that
    /// long; otherwise the file is another (rotated while the daemon was down) or was cut
    /// short, and is read from its start.
    pub fn resuming(mut self, position: Option<Position>) -> Follower {
        self.resume = position;
        self
    }

    /// The end of the last complete line read: where a restart resumes.
    pub fn position(&self) -> Option<Position> {
        let (_, ino) = self.file.as_ref()?;
        Some(Position {
            ino: *ino,
            offset: self.offset - self.partial.len() as u64,
        })
    }

    /// New complete lines since the last call. A missing file is not an error: it may appear.
    pub fn poll(&mut self) -> io::Result<Lines> {
        self.poll_chunk(usize::MAX).map(|(lines, _)| lines)
    }

    /// The complete lines of at most `max` new bytes, and whether more are waiting (a backlog
    /// read a chunk at a time). Rotation is looked for once the file is read to its end.
    pub fn poll_chunk(&mut self, max: usize) -> io::Result<(Lines, bool)> {
        let mut lines = Lines::default();
        if self.file.is_none() && !self.open()? {
            return Ok((lines, false));
        }
        if self.read_available(&mut lines, max)? {
            return Ok((lines, true));
        }
        // Rotation: the path now names another file. The old one was read to its end above.
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                let (_, ino) = self.file.as_ref().expect("opened above");
                if meta.ino() != *ino {
                    self.finish_partial(&mut lines);
                    self.file = None;
                    self.from_start = true;
                    if self.open()? {
                        let more = self.read_available(&mut lines, max)?;
                        return Ok((lines, more));
                    }
                } else if meta.len() < self.offset {
                    // Copy-truncate: the same file, cut short.
                    self.offset = 0;
                    self.partial.clear();
                    let (file, _) = self.file.as_mut().expect("opened above");
                    file.seek(SeekFrom::Start(0))?;
                    let more = self.read_available(&mut lines, max)?;
                    return Ok((lines, more));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok((lines, false))
    }

    fn open(&mut self) -> io::Result<bool> {
        // A restart resumes in the file it was reading, even when that was rotated away
        // meanwhile: its tail is read, then the rotation is followed as usual.
        if let Some(at) = self.resume.take() {
            if let Some(found) = find_inode(&self.path, at.ino) {
                let mut file = File::open(&found)?;
                if file.metadata()?.len() >= at.offset {
                    self.offset = file.seek(SeekFrom::Start(at.offset))?;
                    self.file = Some((file, at.ino));
                    return Ok(true);
                }
            }
            tracing::info!(path = %self.path.display(), was_inode = at.ino, "the file read before the restart is gone or shorter: the file at the path is read from its start");
            self.from_start = true;
        }
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Whatever appears at the path later is new: read it whole.
                self.from_start = true;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let ino = file.metadata()?.ino();
        self.offset = if self.from_start {
            0
        } else {
            file.seek(SeekFrom::End(0))?
        };
        self.file = Some((file, ino));
        Ok(true)
    }

    /// Reads up to `max` bytes; whether it stopped at `max` (more may be waiting).
    fn read_available(&mut self, lines: &mut Lines, max: usize) -> io::Result<bool> {
        let (file, ino) = self.file.as_mut().expect("caller opened it");
        let ino = *ino;
        let from = self.offset - self.partial.len() as u64;
        // The line begun in the last read comes first, then the new bytes.
        let mut buf = std::mem::take(&mut self.partial);
        let kept = buf.len();
        buf.reserve(max.min(CHUNK));
        let read = file.take(max as u64).read_to_end(&mut buf)?;
        self.offset += read as u64;
        let mut spans = Vec::new();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &buf[kept..]).map(|i| kept + i) {
            if end - start > MAX_LINE {
                // As a restart's replay (`read_range`) drops it too.
                if !self.discarding {
                    tracing::warn!(path = %self.path.display(), "line longer than {MAX_LINE} bytes dropped");
                }
            } else if !self.discarding {
                spans.push((start, end));
            }
            self.discarding = false;
            start = end + 1;
        }
        if !self.discarding {
            let rest = &buf[start..];
            if rest.len() > MAX_LINE {
                tracing::warn!(path = %self.path.display(), "line longer than {MAX_LINE} bytes dropped");
                self.discarding = true;
            } else {
                self.partial.extend_from_slice(rest);
            }
        }
        buf.truncate(start);
        lines.add(buf, &spans);
        let to = self.offset - self.partial.len() as u64;
        if to > from {
            self.ranges.push((ino, from, to));
        }
        Ok(max != usize::MAX && read == max)
    }

    /// The last line of a rotated-away file may lack its newline; it is still a line.
    fn finish_partial(&mut self, lines: &mut Lines) {
        if !self.partial.is_empty() && !self.discarding {
            lines.push(&self.partial);
            if let Some((_, ino)) = &self.file {
                let to = self.offset;
                self.ranges.push((*ino, to - self.partial.len() as u64, to));
            }
        }
        self.partial.clear();
        self.discarding = false;
    }
}

/// Whether a line is meant as an event; other console output in the same log is skipped.
fn looks_like_event(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with('{') || event::find_marker(t).is_some()
}

/// Lines read back at a restart, this many or more, are parsed on two threads; fewer, on one.
const PARALLEL_FROM: usize = 1024;

type Parsed = (Vec<(usize, event::Event)>, Vec<(usize, EventError)>);

/// The file `ino`: at `path`, or rotated to a name beside it.
fn find_inode(path: &Path, ino: u64) -> Option<PathBuf> {
    if std::fs::metadata(path).is_ok_and(|m| m.ino() == ino) {
        return Some(path.to_path_buf());
    }
    std::fs::read_dir(path.parent()?)
        .ok()?
        .flatten()
        .find(|e| e.metadata().is_ok_and(|m| m.ino() == ino))
        .map(|e| e.path())
}

/// The events of the lines in bytes `from..to` of the file at `path` (or of the file it was
/// rotated to, found by its inode beside it), for a start replaying the journal.
pub fn read_range(path: &Path, ino: u64, from: u64, to: u64) -> io::Result<Vec<event::Event>> {
    let found = find_inode(path, ino).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "inode {ino} is no longer at {} or beside it",
                path.display()
            ),
        )
    })?;
    let mut file = File::open(&found)?;
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((to - from) as usize);
    file.take(to - from).read_to_end(&mut buf)?;
    let mut spans = Vec::new();
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', &buf).chain([buf.len()]) {
        if end > start && end - start <= MAX_LINE {
            spans.push((start, end));
        }
        start = end + 1;
    }
    let mut lines = Lines::default();
    lines.add(buf, &spans);
    Ok(parse_lines(&lines).0.into_iter().map(|(_, e)| e).collect())
}

/// The event lines of `lines` in `range` parsed, in order, with their indexes: the events,
/// and the errors.
fn parse(lines: &Lines, range: std::ops::Range<usize>) -> Parsed {
    let mut events = Vec::with_capacity(range.len());
    let mut errors = Vec::new();
    for i in range {
        let line = lines.get(i);
        if !looks_like_event(line) {
            continue;
        }
        match event::parse_line(line) {
            Ok(e) => events.push((i, e)),
            Err(err) => errors.push((i, err)),
        }
    }
    (events, errors)
}

/// `parse` of all `lines`, many of them on two threads (nothing else runs beside it).
fn parse_lines(lines: &Lines) -> Parsed {
    if lines.len() < PARALLEL_FROM {
        return parse(lines, 0..lines.len());
    }
    let mid = lines.len() / 2;
    let ((mut events, mut errors), (more_events, more_errors)) =
        crate::join(|| parse(lines, 0..mid), || parse(lines, mid..lines.len()));
    events.extend(more_events);
    errors.extend(more_errors);
    (events, errors)
}

/// One source's reading state, used from a blocking thread.
struct Reader {
    shared: Arc<Shared>,
    cbo: Arc<crate::state::CboState>,
    path: PathBuf,
    follower: Follower,
    last_error: Option<String>,
    /// A backlog's chunk parsed and not yet taken: it is taken while the next one is read
    /// and parsed, so the two cores overlap reading and taking. Never held once the file is
    /// read to its end (a followed file's new lines are taken at once).
    pending: Option<Chunk>,
}

/// A chunk's lines and what parsing them found.
struct Chunk {
    lines: Lines,
    parsed: Parsed,
    /// The file position after its last line.
    end: Option<Position>,
    /// The byte ranges its lines were read from.
    ranges: Vec<(u64, u64, u64)>,
}

impl Reader {
    /// Reads one chunk and hands its events to the CBO (or keeps them until the next chunk
    /// is read, in a backlog); whether more is waiting.
    fn step(&mut self) -> bool {
        let pending = self.pending.take();
        let (shared, cbo, path) = (&self.shared, &self.cbo, &self.path);
        let follower = &mut self.follower;
        let (read, ()) = crate::join(
            || {
                follower.poll_chunk(CHUNK).map(|(lines, more)| {
                    let end = follower.position();
                    let ranges = follower.take_ranges();
                    // On this thread alone: the chunk before is taken on the other one
                    // meanwhile (two threads for two cores; splitting the parse as well made
                    // three, and a backlog 7 % slower).
                    let parsed = parse(&lines, 0..lines.len());
                    (
                        Chunk {
                            lines,
                            parsed,
                            end,
                            ranges,
                        },
                        more,
                    )
                })
            },
            || {
                if let Some(chunk) = pending {
                    take(shared, cbo, path, chunk);
                }
            },
        );
        let (chunk, more) = match read {
            Ok(read) => {
                self.last_error = None;
                read
            }
            Err(e) => {
                let message = e.to_string();
                if self.last_error.as_ref() != Some(&message) {
                    tracing::warn!(path = %self.path.display(), error = %message, "cannot read log file");
                    self.last_error = Some(message);
                }
                return false;
            }
        };
        if more {
            self.pending = Some(chunk);
        } else {
            take(&self.shared, &self.cbo, &self.path, chunk);
        }
        more
    }

    /// Takes the chunk still held, if any (at a stop).
    fn finish(&mut self) {
        if let Some(chunk) = self.pending.take() {
            take(&self.shared, &self.cbo, &self.path, chunk);
        }
    }
}

/// Hands a chunk's events to the CBO and counts and logs its rejected lines.
fn take(shared: &Shared, cbo: &crate::state::CboState, path: &Path, chunk: Chunk) {
    let Chunk {
        lines,
        parsed: (events, errors),
        end,
        ranges,
    } = chunk;
    let mut rejected = Vec::new();
    for (i, err) in errors {
        let reason = match err {
            EventError::Malformed(_) => Reject::Malformed,
            EventError::Field { .. } => Reject::Invalid,
        };
        shared.metrics.reject(&cbo.key, reason);
        rejected.push(Rejection {
            index: i,
            reason,
            error: err.to_string(),
        });
    }
    // The journal keeps where the lines are, not copies of them.
    let read: Vec<crate::journal::Op> = ranges
        .into_iter()
        .map(|(ino, from, to)| crate::journal::Op::Lines {
            path: path.to_path_buf(),
            ino,
            from,
            to,
        })
        .collect();
    cbo.ingest_read(events, shared.clock.now_ms(), &mut rejected, Some(read));
    for r in rejected {
        tracing::warn!(path = %path.display(), cbo = %cbo.key, reason = r.reason.as_str(), error = %r.error, line = %lines.get(r.index), "log line rejected");
    }
    if let Some(end) = end {
        shared.checkpoints.file_taken(path, end);
    }
}

/// Follows one source until `stop` turns true. The file is read and its events taken on a
/// blocking thread, a chunk at a time, each taken before the next is read: a backlog of
/// hundreds of megabytes holds one chunk in memory and never an async worker.
pub async fn run(shared: Arc<Shared>, source: FileSource, mut stop: watch::Receiver<bool>) {
    let Some(cbo) = shared.fleet.get(source.cbo.as_str()) else {
        tracing::warn!(path = %source.path.display(), cbo = %source.cbo, "log file of a CBO not configured: not followed");
        return;
    };
    tracing::info!(path = %source.path.display(), cbo = %source.cbo, "following log file");
    let reader = Arc::new(std::sync::Mutex::new(Reader {
        shared: shared.clone(),
        cbo,
        path: source.path.clone(),
        follower: Follower::new(&source.path, source.from_beginning)
            .resuming(shared.checkpoints.file_position(&source.path)),
        last_error: None,
        pending: None,
    }));
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        loop {
            let r = reader.clone();
            let more = tokio::task::spawn_blocking(move || {
                r.lock().unwrap_or_else(|p| p.into_inner()).step()
            })
            .await
            .unwrap_or(false);
            if !more || *stop.borrow() {
                break;
            }
        }
    }
    // A stop in a backlog: the chunk already parsed is taken, not dropped.
    let _ = tokio::task::spawn_blocking(move || {
        reader.lock().unwrap_or_else(|p| p.into_inner()).finish()
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn all(lines: Lines) -> Vec<String> {
        lines.iter().map(str::to_string).collect()
    }

    #[test]
    fn starts_at_the_end_and_returns_only_new_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "old\n");
        let mut f = Follower::new(&path, false);
        assert!(f.poll().unwrap().is_empty());
        append(&path, "one\ntw");
        assert_eq!(all(f.poll().unwrap()), vec!["one"]);
        append(&path, "o\n");
        assert_eq!(all(f.poll().unwrap()), vec!["two"]);
    }

    #[test]
    fn a_backlog_is_read_a_bounded_chunk_at_a_time_without_losing_or_splitting_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let text: String = (0..1000)
            .map(|i| format!("line {i:04} {}\n", "x".repeat(i % 37)))
            .collect();
        append(&path, &text);
        let mut f = Follower::new(&path, true);
        let mut got = Vec::new();
        let mut chunks = 0;
        loop {
            let (lines, more) = f.poll_chunk(1000).unwrap();
            chunks += 1;
            got.extend(all(lines));
            if !more {
                break;
            }
        }
        assert!(chunks >= text.len() / 1000, "{chunks} chunks");
        let want: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(got, want);
        // New lines after the backlog come as before.
        append(&path, "late\n");
        let (lines, more) = f.poll_chunk(1000).unwrap();
        assert_eq!((all(lines), more), (vec!["late".to_string()], false));
    }

    #[test]
    fn a_line_too_long_is_dropped_and_its_neighbours_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let long = "x".repeat(MAX_LINE + 10);
        append(&path, &format!("a\n{long}\nb\n"));
        let mut f = Follower::new(&path, true);
        let mut got = Vec::new();
        loop {
            let (lines, more) = f.poll_chunk(64 * 1024).unwrap();
            got.extend(all(lines));
            if !more {
                break;
            }
        }
        let lengths: Vec<usize> = got.iter().map(String::len).collect();
        assert!(got == ["a", "b"], "lines of {lengths:?} bytes");
        // Read in one go, the long line is as long and dropped too.
        let got = all(Follower::new(&path, true).poll().unwrap());
        let lengths: Vec<usize> = got.iter().map(String::len).collect();
        assert!(got == ["a", "b"], "lines of {lengths:?} bytes");
    }

    #[test]
    fn bytes_not_utf8_are_replaced_and_a_character_cut_by_a_chunk_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        std::fs::write(&path, b"a\xc3\xa9\n\xff b\nc\n").unwrap();
        // Two bytes a read: `é` is cut in two by the first chunk's end.
        let mut f = Follower::new(&path, true);
        let mut got = Vec::new();
        loop {
            let (lines, more) = f.poll_chunk(2).unwrap();
            got.extend(all(lines));
            if !more {
                break;
            }
        }
        assert_eq!(got, vec!["a\u{e9}", "\u{fffd} b", "c"]);
        // Read whole: the one bad byte spoils only its own line.
        let mut f = Follower::new(&path, true);
        assert_eq!(all(f.poll().unwrap()), vec!["a\u{e9}", "\u{fffd} b", "c"]);
    }

    #[test]
    fn follows_a_renamed_rotation_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "");
        let mut f = Follower::new(&path, false);
        f.poll().unwrap();
        append(&path, "a\nb");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "c\n");
        assert_eq!(all(f.poll().unwrap()), vec!["a", "b", "c"]);
        append(&path, "d\n");
        assert_eq!(all(f.poll().unwrap()), vec!["d"]);
    }

    #[test]
    fn follows_copy_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "");
        let mut f = Follower::new(&path, false);
        f.poll().unwrap();
        append(&path, "a\nb\n");
        assert_eq!(all(f.poll().unwrap()), vec!["a", "b"]);
        std::fs::write(&path, "").unwrap();
        append(&path, "c\n");
        assert_eq!(all(f.poll().unwrap()), vec!["c"]);
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.log");
        let mut f = Follower::new(&path, false);
        assert!(f.poll().unwrap().is_empty());
        append(&path, "first\n");
        assert_eq!(all(f.poll().unwrap()), vec!["first"]);
    }

    #[test]
    fn only_event_lines_are_taken_from_a_mixed_log() {
        assert!(looks_like_event("[ConversationTransfer] initiated: {}"));
        assert!(looks_like_event(
            "2026-11-26 web.1 | [ConversationTransfer] failed: {}"
        ));
        assert!(looks_like_event("{\"event\":\"completed\"}"));
        assert!(!looks_like_event("GET /health 200"));
    }

    #[tokio::test]
    async fn a_stop_in_a_backlog_takes_the_chunk_already_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let now = chrono::Utc::now().timestamp_millis();
        let lines = crate::bench::lines(12_000, now);
        append(&path, &(lines.join("\n") + "\n"));
        let app = crate::App::start(crate::bench::config(1)).await.unwrap();
        let shared = app.shared.clone();
        let cbo = shared.fleet.get("c0").unwrap();
        let mut reader = Reader {
            shared: shared.clone(),
            cbo,
            path: path.clone(),
            follower: Follower::new(&path, true),
            last_error: None,
            pending: None,
        };
        let taken = || {
            let m = shared.metrics.render();
            m.lines()
                .filter(|l| l.starts_with("transfer_guard_events_ingested_total{cbo=\"c0\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        // The first chunk of a backlog is parsed and held: more is waiting.
        assert!(reader.step());
        let first_chunk = {
            let mut f = Follower::new(&path, true);
            f.poll_chunk(CHUNK).unwrap().0.len() as f64
        };
        assert!(first_chunk < 12_000.0, "{first_chunk}");
        // A stop now takes it: nothing read is dropped.
        reader.finish();
        assert_eq!(taken(), first_chunk);
        app.shutdown().await;
    }
}
