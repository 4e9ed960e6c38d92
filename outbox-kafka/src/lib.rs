//! Kafka client plumbing that the relay (`outbox-relay`) and the consumer
//! (`consumer-kit`) share, so both behave the same towards operators.
//!
//! - [`logs`]: librdkafka's log lines and global errors, each said once, and
//!   repeats summarised ("… repeated 412 times in the last 10 s") instead of
//!   flooding a log at dozens of lines a second during an outage.
//! - [`secrets`]: property values are secrets until shown harmless; they are
//!   masked in every error and log line that could echo them.
//! - [`reach`]: whether a client is connected to a broker now, from
//!   librdkafka's statistics, for readiness that does not wait for a
//!   delivery timeout to notice an outage.
//! - [`QuietContext`]: the client context to create producers and admin
//!   clients with, instead of rdkafka's `DefaultClientContext`.

pub mod logs;
pub mod reach;
pub mod secrets;

pub use logs::QuietContext;
pub use reach::{Connection, Reach, WatchedContext};
