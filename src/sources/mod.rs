//! Where transfer events come in: `http` (POST /v1/events) and `file` (log files followed across rotation), `poll` (TaskRouter and the functions' configuration), `reports` (agents' reports), `probe` (test transfers).

pub mod file;
pub mod http;
pub mod poll;
pub mod probe;
pub mod push;
pub mod record;
pub mod reports;
pub mod twilio_record;
