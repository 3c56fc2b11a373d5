//! The embedded default's restart state (SPEC §12): the journal of what each CBO took
//! (`journal`), and `state_dir/checkpoint.json` with what is not rebuilt from it (the rules'
//! `for` timers, the file sources' positions, since when the journal is whole). Written every
//! `EVERY` and at shutdown; read, and the journal replayed, before anything is polled or
//! served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::journal::{self, Journal};
use crate::metrics::Metrics;
use crate::rules::RuleId;
use crate::state::Fleet;

pub const FILE_NAME: &str = "checkpoint.json";
/// The format this build writes and reads.
pub const VERSION: u32 = 1;
/// How often the checkpoint is written and the journal fsynced (the journal is written out
/// every second).
pub const EVERY: Duration = Duration::from_secs(10);

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub written_at_ms: i64,
    /// The journal holds everything taken since this instant (the first start that kept
    /// one, carried from checkpoint to checkpoint).
    pub journal_since_ms: i64,
    #[serde(default)]
    pub timers: Vec<Timer>,
    /// Where each file source had read to, by path.
    #[serde(default)]
    pub files: BTreeMap<PathBuf, Position>,
}

/// A rule whose condition held at the checkpoint, and since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub cbo: String,
    pub rule: String,
    pub since_ms: i64,
}

/// A file source's position: the file (inode) and the end of the last line taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub ino: u64,
    pub offset: u64,
}

/// The restart state of a running daemon.
pub struct Checkpoints {
    dir: PathBuf,
    pub journal: Arc<Journal>,
    journal_since_ms: i64,
    /// File positions read at the start (where each source resumes), then kept current by
    /// the file sources.
    files: Mutex<BTreeMap<PathBuf, Position>>,
    /// Checkpoints that could not be written (`store_errors_total{op="checkpoint"}`).
    pub errors: std::sync::atomic::AtomicU64,
}

/// What a start found.
#[derive(Debug, Default)]
pub struct Restored {
    pub records: u64,
    /// Records that could not be applied, and lines that were not records, named.
    pub skipped: Vec<String>,
    /// Journal segments and checkpoint not read, and why.
    pub refused: Vec<String>,
    /// Since when the restored windows are whole, if they are: validation windows that
    /// started since then are measured from the windows alone.
    pub whole_since_ms: Option<i64>,
    pub timers: Vec<Timer>,
}

/// How far back a start replays: the longest window, and the transfer timeout's reach before it.
pub fn retained(config: &Config) -> Duration {
    config.transfers.max_window + Duration::from_secs(15 * 60)
}

impl Checkpoints {
    /// Reads `state_dir`'s checkpoint and replays its journal into a fleet of `config`'s
    /// CBOs, which it returns, counting in `metrics` and journaling to `journal` from then on
    /// (the replay itself counts nothing twice and journals nothing again).
    pub fn restore(
        config: &Config,
        journal: Arc<Journal>,
        metrics: &Arc<Metrics>,
        now_ms: i64,
        pushed: Vec<journal::Record>,
    ) -> (Fleet, Checkpoints, Restored) {
        let dir = config.server.state_dir.clone();
        let mut restored = Restored::default();
        let saved = match read_saved(&dir) {
            Ok(saved) => saved,
            Err(refused) => {
                restored.refused.push(refused);
                None
            }
        };
        let since_ms = now_ms - retained(config).as_millis() as i64;
        // Replayed into CBOs whose series are counted nowhere and that journal nothing; their
        // series and journal are the daemon's once the replay is done.
        let mut fleet = Fleet::new(config, &Arc::new(Metrics::new()));
        let cbos: BTreeMap<String, (Arc<crate::state::CboState>, std::cell::Cell<i64>)> = fleet
            .iter()
            .map(|s| (s.key.clone(), (s, std::cell::Cell::new(i64::MIN))))
            .collect();
        // Where each file source's last journaled lines end: it resumes there.
        let mut read_to: BTreeMap<PathBuf, Position> = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut apply = |record: journal::Record| {
            let Some((state, swept_s)) = cbos.get(&record.cbo) else {
                return;
            };
            // Time passes for the CBO as it did (a sweep every second): timeouts fire in
            // between its records.
            if record.now / 1000 > swept_s.get() {
                swept_s.set(record.now / 1000);
                state.sweep(record.now);
            }
            let cbo = record.cbo.clone();
            if let Err(e) = state.replay(record) {
                skipped.push(format!("a record of cbo {cbo} not applied: {e}"));
            }
        };
        // Events pushed to the store (replicas) go in among the journal's records, in the
        // order they were taken.
        let mut pushed = pushed.into_iter().peekable();
        let read = journal::read(&dir, since_ms, |record| {
            if let journal::Op::Lines { path, ino, to, .. } = &record.op {
                read_to.insert(
                    path.clone(),
                    Position {
                        ino: *ino,
                        offset: *to,
                    },
                );
            }
            while let Some(p) = pushed.next_if(|p| p.now <= record.now) {
                apply(p);
            }
            apply(record);
        });
        pushed.for_each(&mut apply);
        restored.skipped = skipped;
        drop(cbos);
        fleet.sweep(now_ms);
        fleet.attach(metrics, journal.clone());
        restored.records = read.records;
        restored.skipped.extend(read.skipped);
        restored.refused.extend(read.refused);
        let (journal_since_ms, mut files) = match saved {
            Some(saved) => {
                // Whole since the first start that kept a journal, unless a segment of it
                // could not be read or it reaches back less than that.
                if restored.refused.is_empty() {
                    restored.whole_since_ms = Some(saved.journal_since_ms.max(since_ms));
                }
                restored.timers = saved.timers;
                (saved.journal_since_ms, saved.files)
            }
            None => (now_ms, BTreeMap::new()),
        };
        // The journal is written out every second, the checkpoint every ten: its positions
        // are the later ones.
        files.extend(read_to);
        // A rotated file compressed away leaves one such line per chunk: the first few say
        // what, the count how many.
        for line in restored.skipped.iter().take(10) {
            tracing::warn!("journal: {line}");
        }
        if restored.skipped.len() > 10 {
            tracing::warn!(
                more = restored.skipped.len() - 10,
                "journal: more records or lines not replayed"
            );
        }
        for line in &restored.refused {
            tracing::error!("restart state refused: {line}");
        }
        tracing::info!(
            records = restored.records,
            whole_since = ?restored.whole_since_ms,
            "windows, open transfers and joins restored from the journal"
        );
        let this = Checkpoints {
            dir,
            journal,
            journal_since_ms,
            files: Mutex::new(files),
            errors: Default::default(),
        };
        (fleet, this, restored)
    }

    /// Where the file source of `path` resumes, if it had read it before.
    pub fn file_position(&self, path: &Path) -> Option<Position> {
        self.lock_files().get(path).copied()
    }

    /// A file source took the lines of `path` up to `position`.
    pub fn file_taken(&self, path: &Path, position: Position) {
        self.lock_files().insert(path.to_path_buf(), position);
    }

    fn lock_files(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Position>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the journal out (each second).
    pub fn flush(&self) {
        self.journal.flush(false);
    }

    /// Writes a checkpoint at `now_ms`: the journal fsynced first (a position saved is never
    /// ahead of the events journaled), old segments pruned, then `checkpoint.json`.
    /// `timers` are `Engine::timers()`, taken before (the engine is not held meanwhile).
    pub fn save(
        &self,
        timers: Vec<(String, RuleId, i64)>,
        now_ms: i64,
        retain: Duration,
    ) -> std::io::Result<()> {
        let files = self.lock_files().clone();
        self.journal.flush(true);
        self.journal.prune(now_ms - retain.as_millis() as i64);
        let saved = Saved {
            version: VERSION,
            written_at_ms: now_ms,
            journal_since_ms: self.journal_since_ms,
            timers: timers
                .into_iter()
                .map(|(cbo, rule, since_ms)| Timer {
                    cbo,
                    rule: rule.as_str().to_string(),
                    since_ms,
                })
                .collect(),
            files,
        };
        let bytes = serde_json::to_vec_pretty(&saved).expect("a checkpoint serializes");
        let result = crate::store::write_atomic(&self.dir.join(FILE_NAME), &bytes);
        if let Err(e) = &result {
            self.errors.fetch_add(1, Relaxed);
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot write the checkpoint");
        }
        result
    }

    /// Writes that failed: (journal, checkpoint).
    pub fn error_counts(&self) -> (u64, u64) {
        (self.journal.errors.load(Relaxed), self.errors.load(Relaxed))
    }
}

/// `state_dir/checkpoint.json`: `Ok(None)` when there is none, `Err` naming why one is refused.
fn read_saved(dir: &Path) -> Result<Option<Saved>, String> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Some(v) => Err(format!(
            "{}: checkpoint version {v}, this build reads version {VERSION}",
            path.display()
        )),
        None => Err(format!("{}: no `version`", path.display())),
    }
}
