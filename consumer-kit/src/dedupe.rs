//! Every statement on `processed_events`: the dedupe insert that opens each
//! handler transaction, and the bounded TTL cleanup (`CLEANUP_BEGIN` says
//! how it is kept fast as the table grows).
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

/// How each cleanup batch's transaction begins: its statement is planned
/// for the table as it is, in one round trip with the `BEGIN`.
///
/// - A cached statement switches to a generic plan after five executions.
///   Made while the group had nothing expired (a consumer's first days),
///   that plan found each batch's rows by reading the whole table: 1.1 s
///   per batch of 1,000 among 200,000 rows, growing with the table, so a
///   backlog of expired rows took quadratic time to clear. Planned each
///   time (`plan_cache_mode = force_custom_plan`) the batch is a TID scan.
/// - Even a fresh plan, trusting statistics from before the rows arrived,
///   may read and sort every row of the group to take the oldest;
///   `enable_sort = off` keeps it on the `processed_at` index, which gives
///   the oldest first whatever their number.
///
/// Both are `SET LOCAL`: they end with the transaction and hold through a
/// transaction-mode pooler.
const CLEANUP_BEGIN: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_sort = off";

/// Deletes at most `batch` rows of `group` older than `ttl`, oldest first,
/// in one short transaction. Returns how many it deleted.
pub async fn delete_expired_batch(
    pool: &PgPool,
    group: &str,
    ttl: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin_with(CLEANUP_BEGIN).await?;
    let deleted = delete_oldest_expired(&mut tx, group, ttl, batch).await?;
    tx.commit().await?;
    Ok(deleted)
}

/// The cleanup statement, in a transaction begun with [`CLEANUP_BEGIN`].
async fn delete_oldest_expired(
    conn: &mut PgConnection,
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
    .execute(conn)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `seq_scan` and `idx_tup_fetch` of `processed_events` so far in this
    /// transaction.
    async fn reads(conn: &mut PgConnection) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT COALESCE(seq_scan, 0), COALESCE(idx_tup_fetch, 0) \
             FROM pg_stat_xact_user_tables WHERE relname = 'processed_events'",
        )
        .fetch_one(conn)
        .await
    }

    /// A consumer that cleaned up while nothing had expired, then meets a
    /// table of expired rows its statistics do not know about yet.
    #[sqlx::test(migrations = false)]
    async fn the_cleanup_is_planned_for_the_table_as_it_is(pool: PgPool) -> anyhow::Result<()> {
        crate::migrate(&pool).await?;
        // No analyze behind the test's back, as between two autovacuum runs.
        sqlx::query("ALTER TABLE processed_events SET (autovacuum_enabled = false)")
            .execute(&pool)
            .await?;
        sqlx::query("VACUUM ANALYZE processed_events")
            .execute(&pool)
            .await?;
        let ttl = Duration::from_secs(24 * 3600);
        let mut conn = pool.acquire().await?;
        // More empty batches than the five after which PostgreSQL may cache
        // a generic plan.
        for _ in 0..8 {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, CLEANUP_BEGIN).await?;
            assert_eq!(delete_oldest_expired(&mut tx, "g", ttl, 100).await?, 0);
            tx.commit().await?;
        }
        sqlx::query(
            "INSERT INTO processed_events (consumer_group, event_id, processed_at) \
             SELECT 'g', gen_random_uuid(), now() - interval '2 days' - g * interval '1 second' \
             FROM generate_series(1, 5000) g",
        )
        .execute(&pool)
        .await?;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, CLEANUP_BEGIN).await?;
        let (scans, fetched) = reads(&mut tx).await?;
        let deleted = delete_oldest_expired(&mut tx, "g", ttl, 100).await?;
        let (scans_after, fetched_after) = reads(&mut tx).await?;
        tx.rollback().await?;
        assert_eq!(deleted, 100);
        assert_eq!(
            scans_after - scans,
            0,
            "the cleanup read the whole processed_events table: a plan made for the empty table"
        );
        let read = fetched_after - fetched;
        assert!(
            read <= 300,
            "the cleanup read {read} of 5,000 expired rows to delete the oldest 100"
        );
        Ok(())
    }
}
