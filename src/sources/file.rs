//! `[[sources.file]]`: follows a log file across rotation (rename or copy-truncate) and feeds its event lines to one CBO.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Shared;
use crate::config::FileSource;
use crate::event::{self, EventError, LOG_MARKER};
use crate::metrics::Reject;
use crate::state::Rejection;

/// How often the file is looked at for new lines and for rotation.
pub const POLL: Duration = Duration::from_millis(250);
/// A line longer than this is dropped rather than buffered without end.
const MAX_LINE: usize = 1024 * 1024;

/// Reads complete new lines from a path, like `tail -F`.
pub struct Follower {
    path: PathBuf,
    file: Option<(File, u64)>,
    offset: u64,
    partial: Vec<u8>,
    /// Whether the next open starts at the beginning (after a rotation, or when asked).
    from_start: bool,
    discarding: bool,
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
        }
    }

    /// New complete lines since the last call. A missing file is not an error: it may appear.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        if self.file.is_none() && !self.open()? {
            return Ok(lines);
        }
        self.read_available(&mut lines)?;
        // Rotation: the path now names another file. The old one was read to its end above.
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                let (_, ino) = self.file.as_ref().expect("opened above");
                if meta.ino() != *ino {
                    self.finish_partial(&mut lines);
                    self.file = None;
                    self.from_start = true;
                    if self.open()? {
                        self.read_available(&mut lines)?;
                    }
                } else if meta.len() < self.offset {
                    // Copy-truncate: the same file, cut short.
                    self.offset = 0;
                    self.partial.clear();
                    let (file, _) = self.file.as_mut().expect("opened above");
                    file.seek(SeekFrom::Start(0))?;
                    self.read_available(&mut lines)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(lines)
    }

    fn open(&mut self) -> io::Result<bool> {
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

    fn read_available(&mut self, lines: &mut Vec<String>) -> io::Result<()> {
        let (file, _) = self.file.as_mut().expect("caller opened it");
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        for chunk in buf.split_inclusive(|b| *b == b'\n') {
            if chunk.last() == Some(&b'\n') {
                if !self.discarding {
                    self.partial.extend_from_slice(&chunk[..chunk.len() - 1]);
                    lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                }
                self.partial.clear();
                self.discarding = false;
            } else if !self.discarding {
                self.partial.extend_from_slice(chunk);
                if self.partial.len() > MAX_LINE {
                    tracing::warn!(path = %self.path.display(), "line longer than {MAX_LINE} bytes dropped");
                    self.partial.clear();
                    self.discarding = true;
                }
            }
        }
        Ok(())
    }

    /// The last line of a rotated-away file may lack its newline; it is still a line.
    fn finish_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() && !self.discarding {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        self.partial.clear();
        self.discarding = false;
    }
}

/// Whether a line is meant as an event; other console output in the same log is skipped.
fn looks_like_event(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with('{') || t.contains(LOG_MARKER)
}

/// Follows one source until `stop` turns true.
pub async fn run(shared: Arc<Shared>, source: FileSource, mut stop: watch::Receiver<bool>) {
    let cbo = shared
        .fleet
        .get(source.cbo.as_str())
        .expect("config checked the source's cbo")
        .clone();
    let mut follower = Follower::new(&source.path, source.from_beginning);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    tracing::info!(path = %source.path.display(), cbo = %source.cbo, "following log file");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let lines = match follower.poll() {
            Ok(lines) => {
                last_error = None;
                lines
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(path = %source.path.display(), error = %message, "cannot read log file");
                    last_error = Some(message);
                }
                continue;
            }
        };
        let mut events = Vec::new();
        let mut rejected = Vec::new();
        for (i, line) in lines
            .iter()
            .enumerate()
            .filter(|(_, l)| looks_like_event(l))
        {
            match event::parse_line(line) {
                Ok(e) => events.push((i, e)),
                Err(err) => {
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
            }
        }
        if !events.is_empty() {
            cbo.ingest(events, shared.clock.now_ms(), &mut rejected);
        }
        for r in rejected {
            tracing::warn!(path = %source.path.display(), cbo = %cbo.key, reason = r.reason.as_str(), error = %r.error, line = %lines[r.index], "log line rejected");
        }
    }
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

    #[test]
    fn starts_at_the_end_and_returns_only_new_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "old\n");
        let mut f = Follower::new(&path, false);
        assert!(f.poll().unwrap().is_empty());
        append(&path, "one\ntw");
        assert_eq!(f.poll().unwrap(), vec!["one"]);
        append(&path, "o\n");
        assert_eq!(f.poll().unwrap(), vec!["two"]);
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
        assert_eq!(f.poll().unwrap(), vec!["a", "b", "c"]);
        append(&path, "d\n");
        assert_eq!(f.poll().unwrap(), vec!["d"]);
    }

    #[test]
    fn follows_copy_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "");
        let mut f = Follower::new(&path, false);
        f.poll().unwrap();
        append(&path, "a\nb\n");
        assert_eq!(f.poll().unwrap(), vec!["a", "b"]);
        std::fs::write(&path, "").unwrap();
        append(&path, "c\n");
        assert_eq!(f.poll().unwrap(), vec!["c"]);
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.log");
        let mut f = Follower::new(&path, false);
        assert!(f.poll().unwrap().is_empty());
        append(&path, "first\n");
        assert_eq!(f.poll().unwrap(), vec!["first"]);
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
}
