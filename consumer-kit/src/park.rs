//! Parked keys: every SQL statement of the park-key ordering policy
//! ([`crate::Ordering::ParkKey`]), on `consumer_kit_parked_keys` and
//! `consumer_kit_parked_events` (consumer-kit's migration V2).
//!
//! ```text
//! event of key K dead-lettered ──▶ block(K, its event id)
//! later event of K, K blocked ───▶ park(event)            (offset stored: it is kept here)
//! the blocking event replayed ───▶ applied, then drain(K): each parked event in order,
//!                                   through the usual dedupe transaction, then removed;
//!                                   unblock(K) once none is left
//! an operator discards the block ▶ discard(K): the key's partition worker drains it
//!                                   within PARK_CHECK_EVERY
//! a parked event dead-lettered ──▶ it blocks K in turn; the rest stay parked
//! ```
//!
//! A key is drained by the worker of the partition its records arrive on,
//! one message at a time, so a new event of the key waits behind the parked
//! ones. Exactly once holds because each parked event goes through the
//! dedupe transaction: one applied again after a crash, before its removal,
//! is found a duplicate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{config::OrderingKey, envelope::Position, message::Message};

/// How often each partition worker looks for blocks an operator discarded.
pub const PARK_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The ordering key of a record ([`OrderingKey`]), as text. `None` for a
/// record without one (never parked).
pub(crate) fn key_of(msg: &Message, by: &OrderingKey) -> Option<String> {
    let bytes = match by {
        OrderingKey::RecordKey => msg.key(),
        OrderingKey::Header(name) => msg.header(name),
    };
    bytes
        .filter(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
}

/// A blocked key of this consumer's group.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    /// The dead-lettered event that blocks it; `None` once discarded.
    pub(crate) blocking_event_id: Option<Uuid>,
}

/// The block on `key`, if any.
pub(crate) async fn block_of(
    pool: &PgPool,
    group: &str,
    topic: &str,
    key: &str,
) -> Result<Option<Block>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT blocking_event_id FROM consumer_kit_parked_keys \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Block {
        blocking_event_id: r.get(0),
    }))
}

/// Whether any of `keys` is blocked in `topic` for `group` (one query for
/// a whole batch).
pub(crate) async fn any_blocked(
    pool: &PgPool,
    group: &str,
    topic: &str,
    keys: &[String],
) -> Result<bool, sqlx::Error> {
    if keys.is_empty() {
        return Ok(false);
    }
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM consumer_kit_parked_keys \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = ANY($3))",
    )
    .bind(group)
    .bind(topic)
    .bind(keys)
    .fetch_one(pool)
    .await
}

/// Blocks `key` behind the dead-lettered event `event_id` (read at
/// `position`); a key already blocked now waits for this event instead.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn block(
    pool: &PgPool,
    group: &str,
    topic: &str,
    key: &str,
    partition: i32,
    event_id: Option<Uuid>,
    position: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_kit_parked_keys \
           (consumer_group, topic, parking_key, kafka_partition, blocking_event_id, blocking_position, blocking_reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (consumer_group, topic, parking_key) DO UPDATE SET \
           blocking_event_id = EXCLUDED.blocking_event_id, blocking_position = EXCLUDED.blocking_position, \
           blocking_reason = EXCLUDED.blocking_reason, blocked_at = now()",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .bind(partition)
    .bind(event_id)
    .bind(position)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Locks `key`'s row for the rest of `tx`; `false` when the key is not
/// blocked. Parking and unblocking both take it, so they never interleave.
async fn lock_key(
    tx: &mut sqlx::PgConnection,
    group: &str,
    topic: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "SELECT 1 FROM consumer_kit_parked_keys \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3 FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .fetch_optional(tx)
    .await?
    .is_some())
}

/// Parks `msg` behind `key` if the key is still blocked, in one
/// transaction holding the key's row. `false`: the key is no longer
/// blocked, and the message is the caller's to handle.
pub(crate) async fn park(
    pool: &PgPool,
    group: &str,
    key: &str,
    msg: &Message,
    event_id: Option<Uuid>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !lock_key(&mut tx, group, msg.topic(), key).await? {
        tx.rollback().await?;
        return Ok(false);
    }
    let (names, values): (Vec<String>, Vec<Option<Vec<u8>>>) = msg.headers.iter().cloned().unzip();
    sqlx::query(
        "INSERT INTO consumer_kit_parked_events \
           (consumer_group, topic, parking_key, event_id, kafka_partition, kafka_offset, \
            record_key, record_value, header_names, header_values) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(group)
    .bind(msg.topic())
    .bind(key)
    .bind(event_id)
    .bind(msg.partition())
    .bind(msg.offset())
    .bind(msg.key())
    .bind(msg.payload())
    .bind(&names)
    .bind(&values)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The oldest event parked behind `key`: its `seq` and the record as it
/// arrived.
pub(crate) async fn next_parked(
    pool: &PgPool,
    group: &str,
    topic: &str,
    key: &str,
) -> Result<Option<(i64, Message)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT seq, kafka_partition, kafka_offset, record_key, record_value, header_names, header_values \
         FROM consumer_kit_parked_events \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3 ORDER BY seq LIMIT 1",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let names: Vec<String> = row.try_get("header_names")?;
    let values: Vec<Option<Vec<u8>>> = row.try_get("header_values")?;
    let msg = Message {
        position: Position {
            topic: topic.to_string(),
            partition: row.try_get("kafka_partition")?,
            offset: row.try_get("kafka_offset")?,
        },
        key: row.try_get("record_key")?,
        payload: row.try_get("record_value")?,
        headers: names.into_iter().zip(values).collect(),
        prior_attempts: 0,
    };
    Ok(Some((row.try_get("seq")?, msg)))
}

/// Removes the parked event `seq` (applied, found a duplicate, skipped or
/// dead-lettered).
pub(crate) async fn remove(pool: &PgPool, seq: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM consumer_kit_parked_events WHERE seq = $1")
        .bind(seq)
        .execute(pool)
        .await?;
    Ok(())
}

/// Unblocks `key` when nothing is parked behind it any more; `false` when
/// an event was parked meanwhile (drain again). The key's row is locked
/// before the count, so a concurrent [`park`] is either counted or finds the
/// key unblocked.
pub(crate) async fn unblock_if_empty(
    pool: &PgPool,
    group: &str,
    topic: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_key(&mut tx, group, topic, key).await?;
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_kit_parked_events \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    if left > 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "DELETE FROM consumer_kit_parked_keys \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The keys of `topic`'s `partition` whose block an operator discarded:
/// their worker drains them.
pub(crate) async fn discarded(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT parking_key FROM consumer_kit_parked_keys \
         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3 \
           AND blocking_event_id IS NULL ORDER BY blocked_at",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await
}

/// The parked figures of `group`: blocked keys, parked events, and the age
/// of the oldest block.
pub(crate) async fn figures(pool: &PgPool, group: &str) -> Result<(i64, i64, f64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM consumer_kit_parked_keys WHERE consumer_group = $1),                 (SELECT count(*) FROM consumer_kit_parked_events WHERE consumer_group = $1),                 COALESCE((SELECT extract(epoch FROM now() - min(blocked_at))::float8                           FROM consumer_kit_parked_keys WHERE consumer_group = $1), 0)",
    )
    .bind(group)
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// Refreshes the parked gauges every [`PARK_CHECK_EVERY`] until `stop`.
pub(crate) async fn report(pool: PgPool, group: String, stop: tokio_util::sync::CancellationToken) {
    loop {
        if let Ok((keys, events, oldest)) = figures(&pool, &group).await {
            crate::telemetry::parked_figures(&group, keys, events, oldest);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PARK_CHECK_EVERY) => {}
        }
    }
}

/// A key of a group blocked behind a dead-lettered event, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedKey {
    /// The topic.
    pub topic: String,
    /// The ordering key (the record key).
    pub key: String,
    /// The partition its records arrive on.
    pub partition: i32,
    /// The dead-lettered event blocking it; `None` once discarded (its
    /// parked events are being applied).
    pub blocking_event_id: Option<Uuid>,
    /// Where the blocking event was read (`topic/partition@offset`).
    pub blocking_position: String,
    /// Why it was dead-lettered.
    pub blocking_reason: String,
    /// Since when the key is blocked.
    pub blocked_at: DateTime<Utc>,
    /// Events parked behind it.
    pub parked_events: i64,
}

/// Every blocked key of `group`, oldest first.
pub async fn list(pool: &PgPool, group: &str) -> Result<Vec<ParkedKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT k.topic, k.parking_key, k.kafka_partition, k.blocking_event_id, k.blocking_position, \
                k.blocking_reason, k.blocked_at, \
                (SELECT count(*) FROM consumer_kit_parked_events e \
                  WHERE e.consumer_group = k.consumer_group AND e.topic = k.topic \
                    AND e.parking_key = k.parking_key) AS parked \
         FROM consumer_kit_parked_keys k WHERE k.consumer_group = $1 ORDER BY k.blocked_at",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedKey {
                topic: r.try_get(0)?,
                key: r.try_get(1)?,
                partition: r.try_get(2)?,
                blocking_event_id: r.try_get(3)?,
                blocking_position: r.try_get(4)?,
                blocking_reason: r.try_get(5)?,
                blocked_at: r.try_get(6)?,
                parked_events: r.try_get(7)?,
            })
        })
        .collect()
}

/// Gives up on the blocking event of `key` in `topic` for `group`: the
/// consumer applies the events parked behind it, in order, within
/// [`PARK_CHECK_EVERY`] (its partition's worker does). The blocking event
/// stays in the dead-letter topic. `false` when the key is not blocked.
pub async fn discard(
    pool: &PgPool,
    group: &str,
    topic: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE consumer_kit_parked_keys SET blocking_event_id = NULL \
         WHERE consumer_group = $1 AND topic = $2 AND parking_key = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(key)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: Option<&[u8]>, headers: &[(&str, &str)]) -> Message {
        Message {
            position: Position {
                topic: "t".into(),
                partition: 0,
                offset: 0,
            },
            key: key.map(<[u8]>::to_vec),
            payload: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
            prior_attempts: 0,
        }
    }

    #[test]
    fn the_ordering_key_is_the_record_key_or_a_header() {
        let m = msg(Some(b"tenant-1"), &[("x-order", "o-7")]);
        assert_eq!(
            key_of(&m, &OrderingKey::RecordKey).as_deref(),
            Some("tenant-1")
        );
        let by_order = OrderingKey::Header("x-order".into());
        assert_eq!(key_of(&m, &by_order).as_deref(), Some("o-7"));
        // No key, an empty key, or no such header: never parked.
        assert_eq!(key_of(&msg(None, &[]), &OrderingKey::RecordKey), None);
        assert_eq!(key_of(&msg(Some(b""), &[]), &OrderingKey::RecordKey), None);
        assert_eq!(key_of(&msg(Some(b"k"), &[]), &by_order), None);
    }
}
