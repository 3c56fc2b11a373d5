//! Where transfer events come in: `http` (POST /v1/events) and `file` (log files followed across rotation).

pub mod file;
pub mod http;
