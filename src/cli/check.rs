//! `transfer-guard check --config FILE`: every problem of a configuration, one line each, offline.

use std::io::Write;
use std::path::Path;

use crate::config::check_str;

/// Prints one line per problem to `out`; returns the process exit code (0 clean, 1 problems).
pub fn run(path: &Path, env: &dyn Fn(&str) -> Option<String>, out: &mut dyn Write) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out, "{}: cannot read: {e}", path.display());
            return 1;
        }
    };
    let checked = check_str(&text, env);
    for p in &checked.problems {
        let _ = writeln!(out, "{}: {p}", path.display());
    }
    if checked.problems.is_empty() {
        let cbos = checked.config.map_or(0, |c| c.cbos.len());
        let _ = writeln!(out, "{}: ok ({cbos} CBOs)", path.display());
        0
    } else {
        1
    }
}
