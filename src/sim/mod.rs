//! Simulated parts of a ConnieRTC deployment, for the demo and the tests: `traffic` generates transfer events.

pub mod traffic;
