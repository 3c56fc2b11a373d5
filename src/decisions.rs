//! The durable decision log: every rule state change, action attempt, ack and switch, appended as JSON lines and fsynced before it counts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const FILE_NAME: &str = "decisions.jsonl";

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

struct Inner {
    file: File,
    entries: Vec<Entry>,
}

pub struct DecisionLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl DecisionLog {
    /// Opens (creating) `state_dir/decisions.jsonl` and reads what it holds. A torn last line
    /// (a crash mid-write) is skipped with a warning; the file is never rewritten.
    pub fn open(state_dir: &Path) -> Result<DecisionLog, LogError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut entries = Vec::new();
        if let Ok(f) = File::open(&path) {
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let line = line.map_err(io)?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Entry>(&line) {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping an unreadable decision log line")
                    }
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
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
        Ok(DecisionLog {
            path,
            inner: Mutex::new(Inner { file, entries }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends and fsyncs; only then is the entry part of the log.
    pub fn append(&self, entry: Entry) -> Result<Entry, LogError> {
        Ok(self.append_all(vec![entry])?.remove(0))
    }

    /// Appends several entries with one fsync.
    pub fn append_all(&self, mut entries: Vec<Entry>) -> Result<Vec<Entry>, LogError> {
        if entries.is_empty() {
            return Ok(entries);
        }
        let mut inner = self.lock();
        let mut seq = inner.entries.last().map_or(0, |e| e.seq);
        let mut buf = Vec::new();
        for entry in &mut entries {
            seq += 1;
            entry.seq = seq;
            serde_json::to_writer(&mut buf, &entry).expect("entries serialize");
            buf.push(b'\n');
        }
        let io = |source| LogError::Io {
            path: self.path.clone(),
            source,
        };
        inner.file.write_all(&buf).map_err(io)?;
        inner.file.sync_data().map_err(io)?;
        inner.entries.extend(entries.iter().cloned());
        Ok(entries)
    }

    /// Entries of `cbo` (all when `None`) at or after `since_ms`, oldest first.
    pub fn query(&self, cbo: Option<&str>, since_ms: Option<i64>) -> Vec<Entry> {
        self.lock()
            .entries
            .iter()
            .filter(|e| cbo.is_none_or(|c| e.cbo == c))
            .filter(|e| since_ms.is_none_or(|s| e.at_ms >= s))
            .cloned()
            .collect()
    }

    /// The sequence number of the newest entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.lock().entries.last().map_or(0, |e| e.seq)
    }

    /// Entries with a sequence number above `seq` (those written since one was read).
    pub fn after(&self, seq: u64) -> Vec<Entry> {
        let inner = self.lock();
        // Sequence numbers only grow: the new entries are a tail.
        let start = inner.entries.partition_point(|e| e.seq <= seq);
        inner.entries[start..].to_vec()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
