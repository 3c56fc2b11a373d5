//! The subcommands that do more than start the daemon: `check`, `decisions`, `ingest`, `validate`, and on-call's `status`, `ack` and `switch`.

pub mod check;
pub mod decisions;
pub mod ingest;
pub mod oncall;
pub mod validate;
