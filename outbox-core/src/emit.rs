//! [`emit()`]: a table-less event, for relays reading the WAL
//! (`--source wal`).
//!
//! The event is validated here and again by the SQL function
//! `outbox_emit(...)` (migration V7), which writes it as a transactional
//! logical decoding message: WAL only, no row, no index entry, nothing for
//! vacuum. A relay in poll mode never sees it; use [`crate::append()`]
//! there. `docs/schema.md` documents the function and the message format,
//! for producers in other languages.

use sqlx::{types::Json, PgExecutor};
use uuid::Uuid;

use crate::{AppendError, NewEvent};

/// Writes `event` to the WAL through `executor`, as a logical decoding
/// message that a relay reading the slot publishes once the transaction
/// commits.
///
/// Pass the transaction that makes the domain change (`&mut *tx`): the
/// message is decoded if and only if that transaction commits, and in
/// commit order with every other event. Returns the event id.
///
/// Fails with [`AppendError::WalLevelNotLogical`] when the database's
/// `wal_level` is not `logical` (no relay could ever read the event), and
/// with [`AppendError::Invalid`] for an event that breaks the contract.
pub async fn emit<'e, E: PgExecutor<'e>>(
    executor: E,
    event: &NewEvent,
) -> Result<Uuid, AppendError> {
    event.validate()?;
    let (json, bytes) = event.payload.columns();
    sqlx::query_scalar(
        "SELECT outbox_emit(aggregate_type => $1, aggregate_id => $2, event_type => $3, \
             payload => $4, topic => $5, headers => $6, event_id => $7, event_version => $8, \
             content_type => $9, correlation_id => $10, causation_id => $11, \
             traceparent => $12, tracestate => $13, source => $14, occurred_at => $15, \
             payload_bytes => $16)",
    )
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(&event.event_type)
    .bind(json)
    .bind(&event.topic)
    .bind(Json(&event.headers))
    .bind(event.event_id)
    .bind(event.event_version)
    .bind(&event.content_type)
    .bind(&event.correlation_id)
    .bind(&event.causation_id)
    .bind(&event.traceparent)
    .bind(&event.tracestate)
    .bind(&event.source)
    .bind(event.occurred_at)
    .bind(bytes)
    .fetch_one(executor)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("55000") => {
            AppendError::WalLevelNotLogical(db.message().to_string())
        }
        _ => AppendError::Database(e),
    })
}
