//! Small durable state under `state_dir`: files written whole and atomically, and what polling remembers per CBO across a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sources::poll::Remembered;

pub const REMEMBERED_FILE: &str = "baselines.json";

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, never half of
/// one: a temporary file, fsynced, renamed over it, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Per CBO: the workflow SID baseline and the problems known when the daemon last saw it.
/// With replicas, kept in the store: a replica that starts knows what the others saw.
pub struct RememberedStore {
    path: PathBuf,
    map: Mutex<BTreeMap<String, Remembered>>,
    pg: Option<std::sync::Arc<crate::pg::Store>>,
}

impl RememberedStore {
    /// Reads `state_dir/baselines.json`; a missing file is an empty store, an unreadable one
    /// is named and treated as empty (every problem then counts as known since start: safe).
    pub fn open(state_dir: &Path, pg: Option<std::sync::Arc<crate::pg::Store>>) -> RememberedStore {
        let path = state_dir.join(REMEMBERED_FILE);
        let map = match &pg {
            // A read that fails is the same as none: every problem counts as known (safe).
            Some(pg) => pg
                .load_baselines()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(cbo, body)| Some((cbo, serde_json::from_str(&body).ok()?)))
                .collect(),
            None => match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    tracing::error!(path = %path.display(), error = %e, "cannot read the remembered baselines; starting without them");
                    BTreeMap::new()
                }),
                Err(_) => BTreeMap::new(),
            },
        };
        RememberedStore {
            path,
            map: Mutex::new(map),
            pg,
        }
    }

    pub fn get(&self, cbo: &str) -> Option<Remembered> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cbo)
            .cloned()
    }

    pub fn save(&self, cbo: &str, r: &Remembered) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(cbo) == Some(r) {
            return;
        }
        map.insert(cbo.to_string(), r.clone());
        if let Some(pg) = &self.pg {
            let body = serde_json::to_string(r).expect("remembered state serializes");
            if let Err(e) = pg.save_baseline(cbo.to_string(), body) {
                tracing::error!(cbo, error = %e, "cannot save the remembered baseline in the store");
            }
            return;
        }
        let bytes = serde_json::to_vec_pretty(&*map).expect("remembered state serializes");
        if let Err(e) = write_atomic(&self.path, &bytes) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save the remembered baselines");
        }
    }
}
