//! Every statement on `processed_events`: the dedupe insert that opens each
//! handler transaction, and the bounded TTL cleanup.
//!
//! The dedupe insert is `INSERT … ON CONFLICT DO NOTHING`: a duplicate costs
//! one index probe and leaves no dead tuple (a failing insert would).
//! Two members handling the same event at once (around a rebalance)
//! serialize on the primary key: the second insert waits for the first
//! transaction and then sees the conflict, so effects still apply once.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::envelope::Position;

/// Records `event_id` for `group` in the caller's transaction. Returns
/// `true` when the event is new (the handler must run), `false` when this
/// group already applied it (a duplicate: skip the handler).
pub async fn record(
    conn: &mut PgConnection,
    group: &str,
    event_id: Uuid,
    position: &Position,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO processed_events (consumer_group, event_id, topic, kafka_partition, kafka_offset) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(event_id)
    .bind(&position.topic)
    .bind(position.partition)
    .bind(position.offset)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether `group` already applied `event_id`.
pub async fn is_processed(pool: &PgPool, group: &str, event_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM processed_events WHERE consumer_group = $1 AND event_id = $2)",
    )
    .bind(group)
    .bind(event_id)
    .fetch_one(pool)
    .await
}

/// Deletes at most `batch` rows of `group` older than `ttl`, oldest first,
/// in one short statement. Returns how many it deleted.
pub async fn delete_expired_batch(
    pool: &PgPool,
    group: &str,
    ttl: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM processed_events WHERE ctid = ANY (ARRAY( \
             SELECT ctid FROM processed_events \
             WHERE consumer_group = $1 AND processed_at < now() - $2 * interval '1 second' \
             ORDER BY processed_at LIMIT $3))",
    )
    .bind(group)
    .bind(ttl.as_secs_f64())
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes every row of `group` older than `ttl`, in batches of `batch`
/// rows, each its own statement and transaction. Returns the total deleted.
pub async fn delete_expired(
    pool: &PgPool,
    group: &str,
    ttl: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = delete_expired_batch(pool, group, ttl, batch).await?;
        total += n;
        crate::telemetry::cleaned(group, n);
        if n < batch as u64 {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::task::yield_now().await;
    }
}
