//! Deferred retries ([`crate::ConsumerConfig::defer_retries_after`]): a
//! retry whose back-off is that long or longer waits in the consumer's
//! outbox as a delayed event (outbox migration V10), not in memory, so the
//! partition goes on.
//!
//! ```text
//! handler fails (retryable), next back-off ≥ defer_retries_after
//!   ▼
//! append a copy to the outbox: same event id, topic, key, value and
//!   │ headers, x-outbox-attempts = the tries spent, not_before = now + back-off
//!   ▼
//! park-key: the key is blocked behind the event (its later events park)
//!   ▼
//! the offset moves on ── when due, the relay publishes the copy ──▶ the
//! consumer tries it again (the tries spent carry on); applied: the key's
//! parked events follow, in order; the last try fails: dead-lettered
//! ```
//!
//! The copy keeps the event id, so dedupe holds: should the original be
//! delivered again (a crash before its offset was stored), whichever of the
//! two applies first wins and the other is a duplicate. Appending the same
//! copy twice finds it waiting already (`DuplicateEventId`), which counts as
//! deferred. Kafka only: RabbitMQ's delay queues do this there.
//!
//! It needs the outbox schema in the consumer's database and a relay that
//! publishes it to the same Kafka cluster. The relay remembers the ids it
//! published (`outbox_published_ids`), and would refuse a second copy of
//! the same event: the deferral forgets the id in the copy's transaction,
//! since a copy of the same event is exactly what consumers must be able to
//! drop as a duplicate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{append, AppendError, NewEvent, Payload};

use crate::{envelope::RawEnvelope, message::Message, process::Shared};

/// The header that carries the handler tries an earlier delivery spent
/// (RabbitMQ's delay queues use it too).
pub(crate) const ATTEMPTS_HEADER: &str = "x-outbox-attempts";

/// The copy of `msg` to publish again at `due`, after `attempts` tries.
fn copy(
    msg: &Message,
    raw: &RawEnvelope,
    attempts: u32,
    due: DateTime<Utc>,
) -> Result<NewEvent, String> {
    let key = match msg.key() {
        Some(k) => std::str::from_utf8(k)
            .map_err(|_| "its key is not UTF-8, which an outbox row cannot carry".to_string())?
            .to_string(),
        None => raw.event_id.to_string(),
    };
    let mut e = NewEvent::new(
        raw.aggregate_type
            .clone()
            .unwrap_or_else(|| "deferred".into()),
        key,
        raw.event_type.clone(),
    )
    .event_id(raw.event_id)
    .version(raw.event_version)
    .topic(msg.topic())
    .not_before(due);
    e.payload = match msg.payload() {
        Some(bytes) => Payload::Bytes(bytes.to_vec()),
        None => Payload::Empty,
    };
    if let Some(ct) = msg.header(outbox_core::headers::CONTENT_TYPE) {
        e.content_type = String::from_utf8_lossy(ct).into_owned();
    }
    e.headers = raw
        .headers
        .iter()
        .filter(|(k, _)| *k != ATTEMPTS_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    e.headers
        .insert(ATTEMPTS_HEADER.to_string(), attempts.to_string());
    e.correlation_id = raw.correlation_id.clone();
    e.causation_id = raw.causation_id.clone();
    e.traceparent = raw.traceparent.clone();
    e.tracestate = raw.tracestate.clone();
    e.source = raw.source.clone();
    e.occurred_at = raw.occurred_at.unwrap_or_else(Utc::now);
    Ok(e)
}

/// Appends the deferred copy of `msg`, due after `delay`. Returns when it
/// is due; an error says why it cannot be deferred (the caller retries in
/// place).
pub(crate) async fn defer(
    shared: &Shared,
    msg: &Message,
    raw: &RawEnvelope,
    attempts: u32,
    delay: Duration,
) -> Result<DateTime<Utc>, String> {
    let due = Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::MAX);
    let e = copy(msg, raw, attempts, due)?;
    let deferred = async {
        let mut tx = shared.pool.begin().await.map_err(AppendError::Database)?;
        // The id may be known as published: an earlier deferred copy of
        // this event, or the event itself when this database produced it.
        // A copy of the same event is what the memory exists to let
        // through (consumers must drop it if the event was applied), so it
        // is forgotten here, in the copy's transaction.
        for sql in [
            "DELETE FROM outbox_published_ids WHERE event_id = $1",
            "DELETE FROM outbox WHERE event_id = $1 AND status = 'published'",
        ] {
            sqlx::query(sql)
                .bind(e.event_id)
                .execute(&mut *tx)
                .await
                .map_err(AppendError::Database)?;
        }
        append(&mut *tx, &e).await?;
        tx.commit().await.map_err(AppendError::Database)
    };
    match deferred.await {
        Ok(()) => Ok(due),
        // A copy waits already (a redelivery of the original).
        Err(AppendError::DuplicateEventId(_)) => Ok(due),
        Err(e) => Err(format!(
            "{e}; is the outbox schema in the consumer's database?"
        )),
    }
}

/// The tries an earlier delivery spent, from [`ATTEMPTS_HEADER`] (0 when
/// absent or not a number).
pub(crate) fn prior_attempts(header: Option<&[u8]>) -> u32 {
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
