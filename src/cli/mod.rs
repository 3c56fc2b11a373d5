//! The subcommands that do more than start the daemon: `check`, `decisions`, `ingest`, `validate`, and on-call's `status`, `ack` and `switch`.

pub mod check;
pub mod decisions;
pub mod ingest;
pub mod oncall;
pub mod validate;

/// An error with its chain of causes ("error sending request: … Connection refused"), each
/// said once.
pub fn cause(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text = format!("{text}: {s_text}");
        }
        source = s.source();
    }
    text
}
