//! [`append()`]: the producer's one call, inside its own transaction.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::NewEvent;

/// Why an event could not be appended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// A field breaks the contract; nothing was written. Fix the event.
    #[error("invalid outbox event: {field} {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload could not be serialized to JSON.
    #[error("outbox event payload is not serializable to JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// An event with this id is already in the outbox.
    #[error("an outbox event with id {0} already exists")]
    DuplicateEventId(Uuid),
    /// An event with this id was published already: the relay remembers
    /// the ids it published (and deleted) for its `--remember-published`
    /// window. Consumers would drop it as a duplicate; give it a new id.
    #[error("an outbox event with id {0} was published already; every event needs a new id")]
    AlreadyPublished(Uuid),
    /// [`crate::emit()`]: the database's `wal_level` is not `logical`, so
    /// no relay could ever read the event. Set `wal_level = logical` and
    /// restart PostgreSQL, or use [`append()`] with a polling relay.
    #[error("{0}")]
    WalLevelNotLogical(String),
    /// The database's outbox schema is older than the feature asked for
    /// (for example a delayed event before migration V10). Run
    /// `outbox-relay migrate` (or `outbox_core::migrate`).
    #[error("{feature} needs outbox migration V{version}; run `outbox-relay migrate`")]
    NeedsMigration {
        /// What was asked for.
        feature: &'static str,
        /// The migration that brings it.
        version: u32,
    },
    /// The database refused the insert (for example the outbox table is
    /// missing: run `outbox-relay migrate`).
    #[error("could not insert the outbox row: {0}")]
    Database(#[source] sqlx::Error),
}

/// What [`append()`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The row's `id`: its position in the outbox sequence, or, for a
    /// delayed event, in `outbox_delayed` (it gets an outbox id when due).
    pub id: i64,
    /// The event id.
    pub event_id: Uuid,
}

/// Appends `event` to the `outbox` table through `executor`.
///
/// Pass the transaction that makes the domain change (`&mut *tx`), so the
/// event is committed if and only if the change is. The event is validated
/// first ([`NewEvent::validate`]); an invalid event writes nothing.
///
/// For per-aggregate order, append *after* the statement that locks or
/// updates the aggregate's row: see the ordering section of
/// `docs/architecture.md`.
pub async fn append<'e, E: PgExecutor<'e>>(
    executor: E,
    event: &NewEvent,
) -> Result<Appended, AppendError> {
    event.validate()?;
    // A delayed event (migration V10) waits in outbox_delayed until it is
    // due; a due time already past is no delay.
    let delayed = event.not_before.filter(|at| *at > chrono::Utc::now());
    let sql = if delayed.is_some() {
        "INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, \
             event_version, topic, payload, payload_bytes, content_type, headers, correlation_id, \
             causation_id, traceparent, tracestate, source, occurred_at, not_before) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         RETURNING id"
    } else {
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version, \
             topic, payload, payload_bytes, content_type, headers, correlation_id, causation_id, \
             traceparent, tracestate, source, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
         RETURNING id"
    };
    let mut query = crate::event::bind_columns(sqlx::query_scalar(sql), event);
    if let Some(at) = delayed {
        query = query.bind(at);
    }
    let id: i64 = query.fetch_one(executor).await.map_err(|e| match &e {
        sqlx::Error::Database(db)
            if matches!(
                db.constraint(),
                Some("outbox_event_id_key" | "outbox_delayed_event_id_key")
            ) =>
        {
            AppendError::DuplicateEventId(event.event_id)
        }
        sqlx::Error::Database(db) if db.constraint() == Some("outbox_published_ids") => {
            AppendError::AlreadyPublished(event.event_id)
        }
        // undefined_table: outbox_delayed came with V10.
        sqlx::Error::Database(db) if delayed.is_some() && db.code().as_deref() == Some("42P01") => {
            AppendError::NeedsMigration {
                feature: "a delayed event (not_before)",
                version: 10,
            }
        }
        _ => AppendError::Database(e),
    })?;
    Ok(Appended {
        id,
        event_id: event.event_id,
    })
}
