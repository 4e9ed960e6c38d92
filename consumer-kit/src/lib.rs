//! consumer-kit: consume outbox events from Kafka with exactly-once effects
//! per consumer group, by recording each event id in `processed_events` in the
//! same PostgreSQL transaction as the handler's side effects.
//!
//! This release ships the consumer schema and its migration call; the
//! consumer loop follows.
#![forbid(unsafe_code)]

pub use outbox_core::{MigrateError, MigrationReport};

/// Applies consumer-kit's migrations (the `processed_events` table) to the
/// consumer's database, recording them in `consumer_kit_schema_history`.
///
/// Re-running is a no-op. See `migrations/README.md` for the schema, to
/// apply the same SQL with your own tool instead.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<MigrationReport, MigrateError> {
    outbox_core::migrate::run(pool, outbox_core::MigrationSet::Consumer).await
}
