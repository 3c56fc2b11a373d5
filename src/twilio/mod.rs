//! The Twilio APIs transfer-guard calls: `client` (auth, retries, errors) and one module per API.

pub mod client;
pub mod expression;
pub mod flex;
pub mod serverless;
pub mod signature;
pub mod taskrouter;

pub use client::{ApiErrorBody, PollResult, Retry, TwilioClient, TwilioError};
