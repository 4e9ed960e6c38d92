//! [`emit()`]: a table-less event, for relays reading the WAL
//! (`--source wal`).
//!
//! The event is validated here, then written as a transactional logical
//! decoding message, in the format of the SQL function `outbox_emit(...)`
//! (migration V7) that producers in other languages call: WAL only, no row,
//! no index entry, nothing for vacuum. A relay in poll mode never sees it; use [`crate::append()`]
//! there. `docs/schema.md` documents the function and the message format,
//! for producers in other languages.

use sqlx::PgExecutor;
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
/// A delayed event ([`NewEvent::not_before`]) cannot wait in the WAL: it
/// is written to `outbox_delayed` instead ([`crate::append()`]), and moved
/// into the outbox when due, where either source publishes it.
///
/// Fails with [`AppendError::WalLevelNotLogical`] when the database's
/// `wal_level` is not `logical` (no relay could ever read the event), and
/// with [`AppendError::Invalid`] for an event that breaks the contract.
pub async fn emit<'e, E: PgExecutor<'e>>(
    executor: E,
    event: &NewEvent,
) -> Result<Uuid, AppendError> {
    if event.not_before.is_some() {
        return crate::append(executor, event).await.map(|a| a.event_id);
    }
    event.validate()?;
    // The message outbox_emit() writes (migration V7), built by one SQL
    // expression instead of a PL/pgSQL call: the event is validated above,
    // and this costs a producer about what one more tiny row does
    // (BENCHMARKS.md, producer cost). NULL when wal_level is not logical.
    let query = sqlx::query_scalar(
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
    );
    let lsn: Option<String> = crate::event::bind_columns(query, event)
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
