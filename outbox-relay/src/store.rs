//! The operator's SQL: queries behind `status`, `failed …` and `relays`,
//! the backlog figures, expiry, and the hints that explain a database
//! error. The claim and its settlement are in `claim.rs`, the leases in
//! `lease.rs`, the waiting flag in `wake.rs`.
//!
//! Every statement here runs rarely and is sent unnamed, so it works
//! through any connection pooler when run inside a transaction.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

/// A database error as the relay reports it, with a hint where the cause is
/// a known setup problem (a transaction-mode pooler, a missing migration).
pub fn explain(e: &sqlx::Error) -> String {
    let db = e.as_database_error();
    let code = db.and_then(|d| d.code()).map(|c| c.to_string());
    let message = db.map(|d| d.message().to_string()).unwrap_or_default();
    let pooler = "DATABASE_URL seems to go through a connection pooler in transaction mode: \
                  run the relay with --transaction-pooler, or point it at PostgreSQL or a \
                  session-mode pool";
    match code.as_deref() {
        // invalid_sql_statement_name, duplicate_prepared_statement
        Some("26000") | Some("42P05") => format!(
            "{e} (prepared statements do not survive between transactions here; {pooler})"
        ),
        // PgBouncer refusing sqlx's extra_float_digits startup parameter
        _ if message.contains("unsupported startup parameter") => format!("{e} ({pooler})"),
        // undefined_table, undefined_function
        Some("42P01") | Some("42883") => format!(
            "{e} (the outbox schema is missing or older than this relay: run `outbox-relay migrate`)"
        ),
        _ => e.to_string(),
    }
}

/// [`explain`], and for a connection that could not be opened (sqlx says
/// only "pool timed out"), why: `host:port` refused it, or gave no answer.
/// Costs one TCP connection attempt of at most 3 s, made only on failure.
pub async fn explain_connect(e: &sqlx::Error, host: &str, port: u16) -> String {
    if !matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) {
        return explain(e);
    }
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await;
    let why = match probe {
        Ok(Err(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!(
            "{host}:{port} refused the connection: nothing listens there; check the host and \
             port in DATABASE_URL and that PostgreSQL runs"
        ),
        Ok(Err(io)) => format!("{host}:{port} cannot be reached: {io}"),
        Err(_) => format!(
            "{host}:{port} gave no answer within 3 s: a wrong host, a firewall, or a server \
             that is down"
        ),
        Ok(Ok(_)) => format!(
            "{host}:{port} accepts connections but no login completed in time: is it \
             PostgreSQL, and is it overloaded?"
        ),
    };
    format!("{e} ({why})")
}

/// Forgets up to `limit` published ids remembered longer than `window`
/// (delete mode). Returns how many were forgotten.
pub async fn forget_published_ids<'e>(
    db: impl PgExecutor<'e>,
    window: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox_published_ids WHERE ctid = ANY (ARRAY(SELECT ctid FROM outbox_published_ids \
           WHERE published_at < now() - make_interval(secs => $1) LIMIT $2))",
    )
    .persistent(false)
    .bind(window.as_secs_f64())
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes up to `limit` published rows older than `retention` (mark mode).
/// Returns how many were deleted.
pub async fn delete_expired<'e>(
    db: impl PgExecutor<'e>,
    retention: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status = 'published' \
           AND published_at < now() - make_interval(secs => $1) ORDER BY published_at LIMIT $2)",
    )
    .persistent(false)
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Backlog figures for `status`, the gauges and `/readyz`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Age of the oldest pending row, in seconds (0 when none).
    pub oldest_pending_age_seconds: f64,
    /// Rows in the failed state.
    pub failed: i64,
    /// Published rows kept for retention (mark mode).
    pub published_kept: i64,
    /// Delayed events waiting for their `not_before` time, in
    /// `outbox_delayed` (migration V10).
    pub delayed: i64,
}

/// Reads the backlog figures (index scans on the partial indexes). A
/// schema before migration V10 has no delayed events: 0, so that the
/// other figures still show while it waits for `outbox-relay migrate`.
pub async fn stats(conn: &mut sqlx::PgConnection) -> Result<Stats, sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending') AS pending, \
                (SELECT count(*) FROM outbox WHERE status = 'failed') AS failed, \
                (SELECT count(*) FROM outbox WHERE status = 'published') AS published_kept, \
                to_regclass('outbox_delayed') IS NOT NULL AS has_delayed, \
                COALESCE((SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 FROM outbox \
                          WHERE status = 'pending' ORDER BY id LIMIT 1), 0) AS oldest",
    )
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    let delayed = if row.try_get("has_delayed")? {
        sqlx::query_scalar("SELECT count(*) FROM outbox_delayed")
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?
    } else {
        0
    };
    Ok(Stats {
        pending: row.try_get("pending")?,
        failed: row.try_get("failed")?,
        published_kept: row.try_get("published_kept")?,
        delayed,
        oldest_pending_age_seconds: row.try_get::<f64, _>("oldest")?.max(0.0),
    })
}

/// Seconds until the earliest delayed row is due (negative: overdue), or
/// `None` when no row is delayed; by the database's clock, the one the
/// relay's release compares with. Needs migration V10.
pub async fn next_delayed_due<'e>(db: impl PgExecutor<'e>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(not_before) - clock_timestamp())::float8 \
         FROM outbox_delayed",
    )
    .persistent(false)
    .fetch_one(db)
    .await
}

/// One key partition, for `status` and the per-partition gauges.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStats {
    /// Partition number (`outbox_partition(aggregate_id, n)`).
    pub partition: i32,
    /// The relay that owns it, if any.
    pub owner: Option<String>,
    /// Whether the owner's lease is live (false: it is taken over soon).
    pub owner_live: bool,
    /// Pending rows in the partition.
    pub pending: i64,
    /// Age of its oldest pending row, in seconds (0 when none).
    pub oldest_pending_age_seconds: f64,
    /// Exactly-once mode: relays whose lease ran out while they owned the
    /// partition, not fenced yet; it is not claimed until they are.
    pub unfenced: Vec<String>,
}

/// Backlog per partition, with its owner. Scans the pending rows once.
pub async fn partition_stats<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<PartitionStats>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH n AS (SELECT count(*)::int AS n FROM outbox_relay_partitions), \
              backlog AS (SELECT outbox_partition(aggregate_id, (SELECT n FROM n)) AS partition, \
                                 count(*) AS pending, min(created_at) AS oldest \
                          FROM outbox WHERE status = 'pending' GROUP BY 1) \
         SELECT rp.partition, rp.owner, rp.unfenced, \
                COALESCE(r.lease_until > clock_timestamp(), false) AS owner_live, \
                COALESCE(b.pending, 0) AS pending, \
                COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - b.oldest)::float8, 0) AS oldest \
         FROM outbox_relay_partitions rp \
         LEFT JOIN outbox_relays r ON r.relay_id = rp.owner \
         LEFT JOIN backlog b ON b.partition = rp.partition \
         ORDER BY rp.partition",
    )
    .persistent(false)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(PartitionStats {
                partition: r.try_get("partition")?,
                owner: r.try_get("owner")?,
                owner_live: r.try_get("owner_live")?,
                pending: r.try_get("pending")?,
                oldest_pending_age_seconds: r.try_get::<f64, _>("oldest")?.max(0.0),
                unfenced: r.try_get("unfenced")?,
            })
        })
        .collect()
}

/// One registered relay, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayInfo {
    /// The relay's id.
    pub relay_id: String,
    /// Its process id, as it reported it.
    pub pid: Option<i32>,
    /// When it registered.
    pub started_at: DateTime<Utc>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_seconds: f64,
    /// Whether its lease is live.
    pub live: bool,
    /// Whether it waits for a notification (its waiting flag is up): it
    /// found nothing to publish, and producers notify it.
    pub waiting: bool,
    /// Partitions it owns.
    pub partitions: Vec<i32>,
}

/// The registered relays, live ones first.
pub async fn relays<'e>(db: impl PgExecutor<'e>) -> Result<Vec<RelayInfo>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT r.relay_id, r.pid, r.started_at, \
                EXTRACT(EPOCH FROM clock_timestamp() - r.heartbeat_at)::float8 AS heartbeat_age, \
                r.lease_until > clock_timestamp() AS live, \
                r.waiting_since IS NOT NULL AS waiting, \
                ARRAY(SELECT partition FROM outbox_relay_partitions p WHERE p.owner = r.relay_id ORDER BY 1) AS partitions \
         FROM outbox_relays r ORDER BY live DESC, r.relay_id",
    )
    .persistent(false)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RelayInfo {
                relay_id: r.try_get("relay_id")?,
                pid: r.try_get("pid")?,
                started_at: r.try_get("started_at")?,
                heartbeat_age_seconds: r.try_get::<f64, _>("heartbeat_age")?.max(0.0),
                live: r.try_get("live")?,
                waiting: r.try_get("waiting")?,
                partitions: r.try_get("partitions")?,
            })
        })
        .collect()
}

/// A failed row, for `outbox-relay failed list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedRow {
    /// Row id.
    pub id: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Explicit topic, if any.
    pub topic: Option<String>,
    /// Publish attempts so far.
    pub attempts: i32,
    /// Why it failed.
    pub last_error: Option<String>,
    /// When it failed.
    pub failed_at: Option<DateTime<Utc>>,
}

/// Which failed rows an operator command acts on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Selection {
    /// Every failed row.
    All,
    /// Rows with these ids.
    Ids(Vec<i64>),
    /// Rows with these event ids.
    EventIds(Vec<Uuid>),
}

impl Selection {
    fn filter(&self) -> &'static str {
        match self {
            Selection::All => "TRUE",
            Selection::Ids(_) => "id = ANY($1)",
            Selection::EventIds(_) => "event_id = ANY($1)",
        }
    }
}

/// Lists failed rows, oldest first.
pub async fn failed_list<'e>(
    db: impl PgExecutor<'e>,
    limit: i64,
) -> Result<Vec<FailedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, event_id, aggregate_type, aggregate_id, event_type, topic, attempts, last_error, failed_at \
         FROM outbox WHERE status = 'failed' ORDER BY id LIMIT $1",
    )
    .persistent(false)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(FailedRow {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                event_type: r.try_get("event_type")?,
                topic: r.try_get("topic")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                failed_at: r.try_get("failed_at")?,
            })
        })
        .collect()
}

async fn act_on_failed<'e>(
    db: impl PgExecutor<'e>,
    action: &str,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    let sql = format!("{action} WHERE status = 'failed' AND {}", sel.filter());
    execute_selected(db, &sql, sel).await
}

/// Runs `sql`, whose filter is [`Selection::filter`], with the selection's
/// parameter bound.
async fn execute_selected<'e>(
    db: impl PgExecutor<'e>,
    sql: &str,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    let q = sqlx::query(sql).persistent(false);
    let q = match sel {
        Selection::All => q,
        Selection::Ids(ids) => q.bind(ids.clone()),
        Selection::EventIds(ids) => q.bind(ids.clone()),
    };
    Ok(q.execute(db).await?.rows_affected())
}

/// Puts failed rows back to pending so the relay publishes them again (in
/// their original `id` order, ahead of later rows of their key). Returns the
/// number of rows moved.
pub async fn failed_retry<'e>(
    db: impl PgExecutor<'e>,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    act_on_failed(
        db,
        "UPDATE outbox SET status = 'pending', failed_at = NULL",
        sel,
    )
    .await
}

/// Failed rows deleted and inserted again as new pending rows, in their
/// `id` order, in one statement: for a relay reading the WAL, which sees
/// inserts only (a row put back to pending would never reach it). The rows
/// keep their event ids and content; `created_at` is now. Retry a key's
/// failed rows together (under block-key its later events are failed rows
/// too) so that they keep their order. Returns the number of rows.
pub async fn failed_retry_as_new_rows<'e>(
    db: impl PgExecutor<'e>,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    const COLUMNS: &str =
        "event_id, aggregate_type, aggregate_id, event_type, event_version, topic, \
        payload, payload_bytes, content_type, headers, correlation_id, causation_id, traceparent, \
        tracestate, source, occurred_at";
    let sql = format!(
        "WITH gone AS (DELETE FROM outbox WHERE status = 'failed' AND {} RETURNING id, {COLUMNS}) \
         INSERT INTO outbox ({COLUMNS}) SELECT {COLUMNS} FROM gone ORDER BY id",
        sel.filter()
    );
    execute_selected(db, &sql, sel).await
}

/// The relay reading the WAL under a live lease, and its slot, if one does
/// (migration V8; `None` before it).
pub async fn wal_reader(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('outbox_slot_readers') IS NOT NULL")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_as(
        "SELECT relay_id, slot FROM outbox_slot_readers \
         WHERE lease_until > clock_timestamp() ORDER BY lease_until DESC LIMIT 1",
    )
    .persistent(false)
    .fetch_optional(&mut *conn)
    .await
}

/// Deletes failed rows for good, unblocking their keys. Returns the number
/// of rows deleted.
pub async fn failed_discard<'e>(
    db: impl PgExecutor<'e>,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    act_on_failed(db, "DELETE FROM outbox", sel).await
}
