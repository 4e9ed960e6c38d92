//! [`emit()`]: a table-less event, for relays reading the WAL
//! (`--source wal`).
//!
//! The event is validated here, then written as a transactional logical
//! decoding message, in the format of the SQL function `outbox_emit(...)`
//! (migration V7) that producers in other languages call: WAL only, no row,
//! no index entry, nothing for vacuum. A relay in poll mode never sees it; use [`crate::append()`]
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
    // The message outbox_emit() writes (migration V7), built by one SQL
    // expression instead of a PL/pgSQL call: the event is validated above,
    // and this costs a producer about what one more tiny row does
    // (BENCHMARKS.md, producer cost). NULL when wal_level is not logical.
    let lsn: Option<String> = sqlx::query_scalar(
        "SELECT CASE WHEN current_setting('wal_level') = 'logical' THEN \
             pg_logical_emit_message(true, 'outbox', convert_to(json_build_object( \
                 'v', 1, 'event_id', $1::uuid, 'aggregate_type', $2::text, \
                 'aggregate_id', $3::text, 'event_type', $4::text, 'event_version', $5::int4, \
                 'topic', $6::text, 'payload', $7::jsonb::text, \
                 'payload_bytes', translate(encode($8::bytea, 'base64'), E'\\n', ''), \
                 'content_type', $9::text, 'headers', $10::jsonb, 'correlation_id', $11::text, \
                 'causation_id', $12::text, 'traceparent', $13::text, 'tracestate', $14::text, \
                 'source', $15::text, 'occurred_at', $16::timestamptz)::text, 'UTF8'))::text \
         END",
    )
    .bind(event.event_id)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(&event.event_type)
    .bind(event.event_version)
    .bind(&event.topic)
    .bind(json)
    .bind(bytes)
    .bind(&event.content_type)
    .bind(Json(&event.headers))
    .bind(&event.correlation_id)
    .bind(&event.causation_id)
    .bind(&event.traceparent)
    .bind(&event.tracestate)
    .bind(&event.source)
    .bind(event.occurred_at)
    .fetch_one(executor)
    .await
    .map_err(AppendError::Database)?;
    match lsn {
        Some(_) => Ok(event.event_id),
        None => Err(AppendError::WalLevelNotLogical(
            "outbox_core::emit: wal_level is not logical: no relay could read this event; set \
             wal_level = logical and restart PostgreSQL, or use append() with a polling relay"
                .into(),
        )),
    }
}
