//! outbox-relay: publishes committed PostgreSQL outbox events to Kafka or RabbitMQ.
//!
//! Most users run the `outbox-relay` binary as a sidecar. The library is
//! what the binary is built from, and what tests and benchmarks embed. The
//! binary's own dependencies (CLI parser, HTTP server, Prometheus exporter)
//! sit behind the `cli` feature, on by default; embed the library with
//! `default-features = false` to leave them out. The relay then reports its
//! metrics through the `metrics` facade to whatever recorder the service
//! installs, and its readiness through [`Relay::health`]. The RabbitMQ sink
//! ([`RabbitMqSink`], `lapin`) sits behind the `rabbitmq` feature, which
//! `cli` turns on.
//!
//! The public API is small: [`Relay`] (run it with [`Relay::run`], or on
//! its own task with [`Relay::start`] and a [`RelayHandle`]), its
//! [`RelayConfig`], [`health`] (readiness), [`store`] (the operator's
//! queries: backlog, failed rows, relays), [`telemetry`] (metric names) and
//! [`topics`]. The machinery (claim, batch, lease, publisher, record, wake)
//! is private; `docs/architecture.md` maps which file holds what.
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
//!
//! // Or on its own task:
//! # let connect: sqlx::postgres::PgConnectOptions = "postgres://localhost/app".parse()?;
//! let handle = Relay::new(RelayConfig::default(), connect)?.start();
//! println!("ready: {}", handle.health().is_ready());
//! handle.stop().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

// The public API: the relay itself (re-exported below), its config, its
// readiness, the operator's queries, the metric names and topic creation.
pub mod checkpoint;
pub mod config;
pub mod health;
pub mod slot;
pub mod store;
pub mod telemetry;
pub mod topics;

// The machinery: see docs/architecture.md's map for which file holds what.
mod batch;
mod claim;
mod delay;
mod exactly_once;
mod lease;
mod pgoutput;
mod publisher;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
mod record;
mod relay;
mod retry;
mod sink;
mod slot_lease;
mod upkeep;
mod wake;
mod wal;
mod wal_outcome;

#[cfg(test)]
mod fencing_tests;

pub use config::{AfterPublish, PoisonPolicy, RabbitMqSink, RelayConfig, WalSource};
pub use publisher::PublisherError;
pub use relay::{Relay, RelayError, RelayHandle};
