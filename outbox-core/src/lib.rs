//! The outbox contract, shared by producers, the relay and consumers.
//!
//! This crate has no Kafka dependency, so a producer service links only sqlx.
//! It holds:
//!
//! - [`NewEvent`]: what a producer writes, with [`append()`] to add it to the
//!   outbox **inside the caller's transaction**;
//! - [`headers`]: the Kafka header names the relay writes and consumers read
//!   (the CloudEvents Kafka binary binding plus W3C trace context);
//! - [`backoff`]: the retry delay the relay and consumer-kit share;
//! - [`migrate()`]: the outbox schema's SQL migrations, shipped in this
//!   crate and run with refinery over an sqlx pool ([`migrate::Schema`] is
//!   the runner consumer-kit uses for its own schema).
//!
//! # Quick start (producer)
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{append, NewEvent};
//!
//! // Once at start (or run `outbox-relay migrate`): creates the outbox table.
//! outbox_core::migrate(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET status = 'paid' WHERE id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = NewEvent::new("order", "42", "order.paid")
//!     .json_payload(&serde_json::json!({ "order_id": 42 }))?
//!     .correlation_id("req-7f3a");
//! append(&mut *tx, &event).await?;
//! tx.commit().await?; // the event exists if and only if the order change does
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod append;
pub mod backoff;
pub mod emit;
pub mod event;
pub mod headers;
pub mod migrate;
pub mod topic;

pub use append::{append, AppendError, Appended};
pub use emit::emit;
pub use event::{NewEvent, Payload};
pub use migrate::{MigrateError, MigrationReport};

/// Applies the outbox schema ([`migrate::OUTBOX`]) to the producer's
/// database, recording it in `outbox_schema_history`.
///
/// Re-running is a no-op, and concurrent runs apply each migration once.
/// `docs/schema.md` documents the tables, to apply the same SQL with your
/// own tool instead.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<MigrationReport, MigrateError> {
    migrate::OUTBOX.apply(pool).await
}
