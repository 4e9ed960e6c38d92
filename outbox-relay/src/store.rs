//! Every SQL statement the relay runs, in one place.
//!
//! The claim is the heart of the relay ([`claim`]): in one statement it
//! takes the oldest pending rows, in `id` order, and deletes them (or marks
//! them published), *inside a transaction that stays open while the batch
//! is published*. If Kafka acknowledges every row the transaction commits;
//! otherwise it rolls back and [`resolve`] records what happened row by row.
//! A crash at any point rolls the claim back, so a committed row is never
//! lost; at worst the batch in flight is published again.
//!
//! Only the claim uses a prepared, cached statement (and not through a
//! transaction-mode pooler, see [`Claimant::prepared`]). Every other
//! statement runs rarely and is sent unnamed, so it works through any
//! connection pooler when run inside a transaction.

use chrono::{DateTime, Utc};
use sqlx::{postgres::PgRow, PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::config::{AfterPublish, PoisonPolicy};

/// The columns the relay reads, shared by the claim statements.
const COLUMNS: &str = "o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, \
    o.event_version, o.topic, o.payload::text AS payload, o.payload_bytes, o.content_type, \
    o.headers::text AS headers, o.correlation_id, o.causation_id, o.traceparent, o.tracestate, \
    o.source, o.occurred_at, o.created_at, o.attempts";

/// One claimed outbox row, as stored.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the outbox sequence.
    pub id: i64,
    /// The event id (idempotency key).
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id, the record key.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Schema version.
    pub event_version: i32,
    /// Explicit topic, if any.
    pub topic: Option<String>,
    /// JSON payload as text (PostgreSQL's jsonb rendering).
    pub payload: Option<String>,
    /// Binary payload.
    pub payload_bytes: Option<Vec<u8>>,
    /// Payload media type.
    pub content_type: String,
    /// Extra headers as JSON text; validated when the record is built.
    pub headers: String,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causation id.
    pub causation_id: Option<String>,
    /// W3C traceparent.
    pub traceparent: Option<String>,
    /// W3C tracestate.
    pub tracestate: Option<String>,
    /// CloudEvents source.
    pub source: Option<String>,
    /// When the event occurred.
    pub occurred_at: DateTime<Utc>,
    /// When the row was inserted (the commit-to-ack clock starts here).
    pub created_at: DateTime<Utc>,
    /// Earlier publish attempts.
    pub attempts: i32,
}

impl OutboxRow {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            event_id: r.try_get("event_id")?,
            aggregate_type: r.try_get("aggregate_type")?,
            aggregate_id: r.try_get("aggregate_id")?,
            event_type: r.try_get("event_type")?,
            event_version: r.try_get("event_version")?,
            topic: r.try_get("topic")?,
            payload: r.try_get("payload")?,
            payload_bytes: r.try_get("payload_bytes")?,
            content_type: r.try_get("content_type")?,
            headers: r.try_get("headers")?,
            correlation_id: r.try_get("correlation_id")?,
            causation_id: r.try_get("causation_id")?,
            traceparent: r.try_get("traceparent")?,
            tracestate: r.try_get("tracestate")?,
            source: r.try_get("source")?,
            occurred_at: r.try_get("occurred_at")?,
            created_at: r.try_get("created_at")?,
            attempts: r.try_get("attempts")?,
        })
    }
}

/// The oldest pending rows of the owned partitions, by their `ctid`. The
/// partition test is a filter against an array computed once, so PostgreSQL
/// still walks the pending index in `id` order and stops at the limit (a join
/// against `owned` would make it sort the whole backlog on every claim).
///
/// No row locks: a relay's claims never overlap another relay's on a
/// partition (the fence), and its own two overlapping claims leave each other
/// out by id ([`InFlight`]). The `DELETE`/`UPDATE` then reaches the rows by
/// `ctid` (a TID scan), not through the primary key again. Together this
/// halves the claim's time in PostgreSQL and its WAL (`BENCHMARKS.md`).
fn pending_subquery(policy: PoisonPolicy) -> String {
    let blocked = match policy {
        PoisonPolicy::BlockKey => {
            " AND NOT EXISTS (SELECT 1 FROM outbox f WHERE f.status = 'failed' \
               AND hashtextextended(f.aggregate_id, 0) = hashtextextended(p.aggregate_id, 0) \
               AND f.aggregate_type = p.aggregate_type AND f.aggregate_id = p.aggregate_id)"
        }
        PoisonPolicy::SkipRow => "",
    };
    format!(
        "SELECT p.ctid FROM outbox p WHERE p.status = 'pending' \
           AND outbox_partition(p.aggregate_id, $3) = ANY (ARRAY(SELECT partition FROM owned)){blocked} \
           AND {IN_FLIGHT} \
         ORDER BY p.id LIMIT $1"
    )
}

/// Leaves out the rows of the batch in flight on the relay's other claim
/// connection (see [`InFlight`]). `$6` is a bitmap over the ids `$7 ..
/// $8` (exclusive); `CASE` keeps `get_bit` from ever seeing an id outside it.
const IN_FLIGHT: &str =
    "CASE WHEN p.id >= $7 AND p.id < $8 THEN get_bit($6, (p.id - $7)::int) = 0 ELSE true END";

/// The widest id span (in ids) of a batch that the next claim can leave out
/// by bitmap: 2^24 ids, a 2 MiB bitmap. A wider batch (a very old row
/// retried next to new ones, say) is not overlapped with the next claim.
pub const MAX_IN_FLIGHT_SPAN: i64 = 1 << 24;

/// The ids of a claimed batch whose transaction is still open, for the claim
/// that overlaps it.
///
/// The claim takes no row locks: overlapping claims of one relay skip each
/// other's rows by id instead, through a bitmap over the in-flight batch's id
/// span, which PostgreSQL tests in constant time per row, with or without a
/// cached generic plan. (Row locks, `FOR UPDATE SKIP LOCKED`, cost about a
/// fifth of the claim, and an id list makes a generic plan scan the list for
/// every row.) Claims of different relays never overlap on a partition: the
/// fence sees to that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    base: i64,
    end: i64,
    bits: Vec<u8>,
}

impl InFlight {
    /// Nothing in flight.
    pub fn none() -> Self {
        Self::default()
    }

    /// The batch with these ids, or `None` if their span is wider than
    /// [`MAX_IN_FLIGHT_SPAN`].
    pub fn of(ids: &[i64]) -> Option<Self> {
        let (Some(&lo), Some(&hi)) = (ids.iter().min(), ids.iter().max()) else {
            return Some(Self::none());
        };
        let span = hi.checked_sub(lo)?.checked_add(1)?;
        if span > MAX_IN_FLIGHT_SPAN {
            return None;
        }
        let mut bits = vec![0u8; ((span + 7) / 8) as usize];
        for &id in ids {
            let n = (id - lo) as usize;
            // PostgreSQL's get_bit numbers the bits of a byte from the lowest.
            bits[n / 8] |= 1 << (n % 8);
        }
        Some(Self {
            base: lo,
            end: lo + span,
            bits,
        })
    }
}

/// The fence at the head of every claim: the partitions this relay owns right
/// now, under a live lease, minus those it is releasing, each locked
/// `FOR SHARE` until the claim commits or rolls back. A take-over or release
/// updates a partition row, so it waits for (or skips) every open claim on
/// it, and a claim that starts after it sees the new owner (PostgreSQL
/// re-reads a row updated under a lock). It also sets the transaction's
/// `synchronous_commit` (see [`crate::RelayConfig::synchronous_commit`]).
const FENCE: &str = "WITH owned AS MATERIALIZED ( \
      SELECT rp.partition, \
             set_config('synchronous_commit', \
                        CASE WHEN $4 THEN current_setting('synchronous_commit') ELSE 'off' END, true) \
      FROM outbox_relay_partitions rp JOIN outbox_relays r ON r.relay_id = rp.owner \
      WHERE rp.owner = $2 AND r.lease_until > clock_timestamp() AND rp.partition <> ALL($5) \
      FOR SHARE OF rp) ";

/// The claim statement for a mode and policy (built once per relay).
///
/// Parameters: `$1` batch size, `$2` relay id, `$3` number of partitions,
/// `$4` synchronous commit, `$5` partitions to leave out (`int[]`), `$6`–`$8`
/// the batch in flight ([`InFlight`]). See [`claim`] and [`crate::lease`].
///
/// In delete mode with `remember` set, the claimed ids go into
/// `outbox_published_ids` in the same statement: they are remembered if and
/// only if the claim commits, that is, once Kafka acknowledged them.
pub fn claim_sql(after: AfterPublish, policy: PoisonPolicy, remember: bool) -> String {
    let pending = pending_subquery(policy);
    match after {
        AfterPublish::Delete if remember => format!(
            "{FENCE}, claimed AS (DELETE FROM outbox o WHERE o.ctid = ANY (ARRAY({pending})) RETURNING {COLUMNS}), \
             remembered AS (INSERT INTO outbox_published_ids (event_id) SELECT event_id FROM claimed) \
             SELECT * FROM claimed"
        ),
        AfterPublish::Delete => {
            format!("{FENCE}DELETE FROM outbox o WHERE o.ctid = ANY (ARRAY({pending})) RETURNING {COLUMNS}")
        }
        AfterPublish::Mark { .. } => format!(
            "{FENCE}UPDATE outbox o SET status = 'published', published_at = now(), attempts = o.attempts + 1 \
             WHERE o.ctid = ANY (ARRAY({pending})) RETURNING {COLUMNS}"
        ),
    }
}

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

/// Who claims, for [`claim`].
#[derive(Debug, Clone)]
pub struct Claimant<'a> {
    /// The relay's id (`outbox_relays.relay_id`).
    pub relay_id: &'a str,
    /// Number of partitions the outbox is split into.
    pub partitions: i32,
    /// Owned partitions to leave out (being released).
    pub exclude: Vec<i32>,
    /// Whether the claim's commit waits for its WAL flush.
    pub synchronous_commit: bool,
    /// Whether to use a prepared (cached) statement; false through a
    /// transaction-mode pooler.
    pub prepared: bool,
    /// The relay's batch still in flight on its other claim connection,
    /// whose rows this claim must leave alone.
    pub in_flight: InFlight,
}

/// Claims up to `limit` of the oldest pending rows of the partitions the
/// claimant owns, inside the caller's open transaction, in `id` order. The
/// rows are already deleted (or marked) in that transaction: commit only
/// once Kafka acknowledged all of them.
pub async fn claim(
    conn: &mut PgConnection,
    sql: &str,
    limit: usize,
    who: &Claimant<'_>,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let rows = sqlx::query(sql)
        .persistent(who.prepared)
        .bind(limit as i64)
        .bind(who.relay_id)
        .bind(who.partitions)
        .bind(who.synchronous_commit)
        .bind(&who.exclude)
        .bind(&who.in_flight.bits)
        .bind(who.in_flight.base)
        .bind(who.in_flight.end)
        .fetch_all(conn)
        .await?;
    let mut rows = rows
        .iter()
        .map(OutboxRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order guarantee.
    rows.sort_unstable_by_key(|r| r.id);
    Ok(rows)
}

/// What happened to the rows of a batch that was rolled back.
#[derive(Debug, Default)]
pub struct Resolution {
    /// Rows Kafka acknowledged: delete or mark them.
    pub delivered: Vec<i64>,
    /// Rows that can never be published as they are, with the reason.
    pub failed: Vec<(i64, String)>,
    /// Rows to try again later (transient errors), with the reason.
    pub retry: Vec<(i64, String)>,
}

/// Records the outcome of a rolled-back batch in one transaction.
pub async fn resolve(
    conn: &mut PgConnection,
    after: AfterPublish,
    remember: bool,
    res: &Resolution,
) -> Result<(), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    if !res.delivered.is_empty() {
        let sql = match after {
            AfterPublish::Delete if remember => {
                "WITH gone AS (DELETE FROM outbox WHERE id = ANY($1) RETURNING event_id) \
                 INSERT INTO outbox_published_ids (event_id) SELECT event_id FROM gone"
            }
            AfterPublish::Delete => "DELETE FROM outbox WHERE id = ANY($1)",
            AfterPublish::Mark { .. } => {
                "UPDATE outbox SET status = 'published', published_at = now(), attempts = attempts + 1 \
                 WHERE id = ANY($1)"
            }
        };
        sqlx::query(sql)
            .persistent(false)
            .bind(&res.delivered)
            .execute(&mut *tx)
            .await?;
    }
    for (list, status) in [(&res.failed, "failed"), (&res.retry, "pending")] {
        if list.is_empty() {
            continue;
        }
        let (ids, reasons): (Vec<i64>, Vec<String>) = list.iter().cloned().unzip();
        sqlx::query(
            "UPDATE outbox SET status = $3, attempts = attempts + 1, last_error = r.reason, \
                 failed_at = CASE WHEN $3 = 'failed' THEN now() END \
             FROM unnest($1::bigint[], $2::text[]) AS r(id, reason) WHERE outbox.id = r.id",
        )
        .persistent(false)
        .bind(&ids)
        .bind(&reasons)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
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

/// Raises (`waiting`) or lowers the waiting flag of `relay_id`, in its own
/// transaction: the outbox trigger notifies only while some live relay's
/// flag is up (see [`crate::wake`]). Returns whether the relay's row exists.
pub async fn set_waiting<'e>(
    db: impl PgExecutor<'e>,
    relay_id: &str,
    waiting: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_relays \
         SET waiting_since = CASE WHEN $2 THEN clock_timestamp() END \
         WHERE relay_id = $1",
    )
    .persistent(false)
    .bind(relay_id)
    .bind(waiting)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
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
}

/// Reads the backlog figures (index scans on the partial indexes).
pub async fn stats<'e>(db: impl PgExecutor<'e>) -> Result<Stats, sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending') AS pending, \
                (SELECT count(*) FROM outbox WHERE status = 'failed') AS failed, \
                (SELECT count(*) FROM outbox WHERE status = 'published') AS published_kept, \
                COALESCE((SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 FROM outbox \
                          WHERE status = 'pending' ORDER BY id LIMIT 1), 0) AS oldest",
    )
    .persistent(false)
    .fetch_one(db)
    .await?;
    Ok(Stats {
        pending: row.try_get("pending")?,
        failed: row.try_get("failed")?,
        published_kept: row.try_get("published_kept")?,
        oldest_pending_age_seconds: row.try_get::<f64, _>("oldest")?.max(0.0),
    })
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
         SELECT rp.partition, rp.owner, \
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
    let q = sqlx::query(&sql).persistent(false);
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

/// Deletes failed rows for good, unblocking their keys. Returns the number
/// of rows deleted.
pub async fn failed_discard<'e>(
    db: impl PgExecutor<'e>,
    sel: &Selection,
) -> Result<u64, sqlx::Error> {
    act_on_failed(db, "DELETE FROM outbox", sel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_bitmap_marks_exactly_the_batch() {
        let f = InFlight::of(&[100, 101, 103, 115]).expect("narrow");
        assert_eq!((f.base, f.end), (100, 116));
        // get_bit numbering: bit n is byte n / 8, value 1 << (n % 8).
        assert_eq!(f.bits, vec![0b0000_1011, 0b1000_0000]);
        assert_eq!(InFlight::of(&[]), Some(InFlight::none()));
        assert_eq!(
            InFlight::of(&[0, MAX_IN_FLIGHT_SPAN - 1]).map(|f| f.bits.len()),
            Some(1 << 21)
        );
        assert_eq!(InFlight::of(&[0, MAX_IN_FLIGHT_SPAN]), None);
        assert_eq!(InFlight::of(&[i64::MIN, i64::MAX]), None);
    }
}
