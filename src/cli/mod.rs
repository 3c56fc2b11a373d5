//! The subcommands that do more than start the daemon: `check` and `ingest`.

pub mod check;
pub mod ingest;
