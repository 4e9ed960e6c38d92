//! consumer-kit: consume outbox events from Kafka (or RabbitMQ, with the
//! cargo feature `rabbitmq`) with exactly-once effects per consumer group.
//!
//! For each record: `BEGIN`; insert (group, event id) into
//! `processed_events`, where a conflict means the group already applied the
//! event, so the handler is skipped; run the handler with the open
//! transaction; `COMMIT`; then store the Kafka offset. Redeliveries,
//! rebalances, crashes between the commit and the offset commit, and
//! deliberate replays therefore change nothing twice.
//!
//! Where to look:
//!
//! - [`handler`]: the [`Handler`] trait and [`HandlerError`] (retryable or
//!   permanent);
//! - [`consumer`]: building a [`Consumer`] and its life, [`ConsumerHandle`];
//! - `process.rs`: one message's life (dedupe transaction, retries, dead
//!   letter), with outages kept apart from handler failures;
//! - [`dedupe`]: every SQL statement on `processed_events`;
//! - [`park`]: per-key order through dead letters (the park-key ordering
//!   policy), its tables and the operator's calls;
//! - `defer.rs`: long retries that wait in the consumer's outbox as delayed
//!   copies instead of in memory (`defer_retries_after`);
//! - `member.rs`: the group member (poll thread, rebalances, offsets,
//!   partition workers); `preflight.rs`: the checks before it joins;
//! - [`dead_letter`]: what a dead letter carries, and publishing one;
//!   [`replay`]: reading and replaying them;
//! - [`health`]: readiness (phase, broker, database, progress, partitions);
//! - `rabbitmq` (feature `rabbitmq`): the RabbitMQ source, a queue per
//!   group instead of Kafka topics, with its delay and dead-letter queues;
//! - `message.rs`: the one message type both sources hand to `process.rs`;
//! - [`saga`]: orchestrated sagas, a state machine per instance whose
//!   transitions commit with the dedupe row, their commands and their
//!   timeouts (delayed outbox events);
//! - [`cleanup`]: the TTL cleanup and the retention check;
//! - [`config`]: every setting with its default;
//! - [`telemetry`]: metric names.
//!
//! The schema ships in this crate (`migrations/`); [`migrate()`] applies it.
//! `examples/consume.rs` is a complete consumer to run against a broker:
//! `cargo run -p consumer-kit --example consume`.
//!
//! # Example
//!
//! ```no_run
//! use consumer_kit::{Consumer, ConsumerConfig, Envelope, Handler, HandlerError};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { order_id: i64 }
//!
//! struct ReserveStock;
//!
//! #[consumer_kit::async_trait]
//! impl Handler for ReserveStock {
//!     type Payload = OrderCreated;
//!     async fn handle(
//!         &self,
//!         event: &Envelope<OrderCreated>,
//!         tx: &mut sqlx::PgTransaction<'static>,
//!     ) -> Result<(), HandlerError> {
//!         sqlx::query("INSERT INTO reservations (order_id) VALUES ($1)")
//!             .bind(event.payload.order_id)
//!             .execute(&mut **tx)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! consumer_kit::migrate(&pool).await?;
//! let consumer = Consumer::builder(ConsumerConfig::new("inventory", ["order"]), pool)
//!     .handler("order.created", ReserveStock)
//!     .build()?;
//! let shutdown = CancellationToken::new();
//! consumer.run(shutdown.clone()).await?; // returns after shutdown.cancel()
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod dedupe;
mod defer;
pub mod envelope;
mod error;
pub mod handler;
pub mod health;
mod kafka_config;
mod member;
mod message;
pub mod park;
mod preflight;
pub(crate) mod process;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
pub mod replay;
pub mod saga;
pub mod telemetry;

/// Re-exported so handlers can be written without depending on async-trait:
/// `#[consumer_kit::async_trait]`.
pub use async_trait::async_trait;
pub use config::{ConsumerConfig, Ordering, OrderingKey, UnknownEventType};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle};
pub use dead_letter::{DeadLetter, DeadLetterFilter, DeadLetterKind};
pub use envelope::{DecodeError, Envelope, Position, RawEnvelope};
pub use error::ConsumerError;
pub use handler::{BoxError, Handler, HandlerError};
pub use health::{Health, HealthReport, Phase};
pub use outbox_core::{MigrateError, MigrationReport};
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::{QueueType, RabbitMqSource};
pub use replay::{DeadLetterError, ReplayReport};
pub use saga::{Saga, SagaEvent, Transition};
pub use telemetry::{ConsumerStats, StatsSnapshot};

mod schema_files {
    refinery::embed_migrations!("migrations");
}

/// consumer-kit's schema: the `processed_events` table, shipped in this
/// crate (`consumer-kit/migrations/`). It lives in each consumer's database.
pub const SCHEMA: outbox_core::migrate::Schema = outbox_core::migrate::Schema::new(
    "consumer_kit_schema_history",
    0x6f75_7462_6f78_0002,
    schema_files::migrations::runner,
);

/// Applies consumer-kit's migrations (the `processed_events` table) to the
/// consumer's database, recording them in `consumer_kit_schema_history`.
///
/// Re-running is a no-op. See `docs/schema.md` for the schema, to apply the
/// same SQL with your own tool instead.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<MigrationReport, MigrateError> {
    SCHEMA.apply(pool).await
}
