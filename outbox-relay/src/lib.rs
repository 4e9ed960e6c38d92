//! outbox-relay: publishes committed PostgreSQL outbox rows to Kafka.
//!
//! Most users run the `outbox-relay` binary as a sidecar. The library is
//! what the binary is built from, and what tests and benchmarks embed. The
//! binary's own dependencies (CLI parser, HTTP server, Prometheus exporter)
//! sit behind the `cli` feature, on by default; embed the library with
//! `default-features = false` to leave them out. The relay then reports its
//! metrics through the `metrics` facade to whatever recorder the service
//! installs, and its readiness through [`Relay::health`].
//!
//! Where to look:
//!
//! - [`claim`]: the claim query, its fence, and settling a batch row by row;
//! - [`store`]: operator queries, backlog figures, expiry, error hints;
//! - [`relay`]: the publish loop, wake-ups and shutdown;
//! - `batch`: one batch's decisions: which rows are sent, held or failed, and
//!   what becomes of each (per-key order lives here);
//! - [`lease`]: key partitions, leases and hand-over between relays;
//! - [`publisher`]: pipelined sends and error classification;
//! - [`record`]: the row-to-record mapping (topic routing, headers);
//! - [`config`]: settings and their defaults;
//! - [`telemetry`]: metric names;
//! - [`topics`]: creating topics;
//! - [`wake`]: LISTEN, and the waiting flag that tells producers when to notify.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::{Relay, RelayConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! let connect: sqlx::postgres::PgConnectOptions = "postgres://localhost/app".parse()?;
//! let relay = Relay::new(RelayConfig { brokers: "localhost:9092".into(), ..Default::default() }, connect)?;
//! let shutdown = CancellationToken::new();
//! relay.run(shutdown.clone()).await; // returns after shutdown.cancel()
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

// The public API: the relay itself (re-exported below), its config, its
// readiness, the operator's queries, the metric names and topic creation.
pub mod config;
pub mod health;
pub mod store;
pub mod telemetry;
pub mod topics;

// The machinery: see docs/architecture.md's map for which file holds what.
mod batch;
mod claim;
mod lease;
mod publisher;
mod record;
mod relay;
mod retry;
mod upkeep;
mod wake;

#[cfg(test)]
mod fencing_tests;

pub use config::{AfterPublish, PoisonPolicy, RelayConfig};
pub use relay::{Relay, RelayError, RelayHandle};
