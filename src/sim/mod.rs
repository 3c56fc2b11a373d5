//! Simulated parts of a ConnieRTC deployment, for the demo and the tests: `traffic` generates transfer events, `twilio` answers as Twilio does.

pub mod traffic;
pub mod twilio;
