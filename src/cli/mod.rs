//! The subcommands that do more than start the daemon: `check`, `ingest` and `validate`.

pub mod check;
pub mod ingest;
pub mod validate;
