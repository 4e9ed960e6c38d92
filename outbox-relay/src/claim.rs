//! The claim: in one statement, fenced by partition ownership, the relay
//! takes the oldest pending rows of the partitions it owns, in `id` order,
//! and deletes them (or marks them published), *inside a transaction that
//! stays open while the batch is published*. If Kafka acknowledges every
//! row the transaction commits; otherwise it rolls back and [`resolve`]
//! records what happened row by row. A crash at any point rolls the claim
//! back, so a committed row is never lost; at worst the batch in flight is
//! published again.
//!
//! The fence ([`claim_sql`]) is the database half of the partition leases
//! in [`crate::lease`]: a claim only takes rows of partitions this relay
//! owns under a live lease, and holds those partition rows `FOR SHARE`
//! until it ends, so a hand-over waits for it.
//!
//! Only the claim uses a prepared, cached statement (and not through a
//! transaction-mode pooler, see [`Claimant::prepared`]), planned afresh for
//! every execution in a transaction begun with [`BEGIN`].

use chrono::{DateTime, Utc};
use sqlx::{postgres::PgRow, PgConnection, Row};
use uuid::Uuid;

use crate::config::{AfterPublish, PoisonPolicy};
use crate::lease::FENCE;

/// The columns the relay reads, shared by the claim statements.
const COLUMNS: &str = "o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, \
    o.event_version, o.topic, o.payload::text AS payload, o.payload_bytes, o.content_type, \
    o.headers::text AS headers, o.correlation_id, o.causation_id, o.traceparent, o.tracestate, \
    o.source, o.occurred_at, o.created_at";

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

/// How a claim's transaction begins: planned for the outbox as it is.
///
/// An outbox swings between empty and a backlog faster than autovacuum
/// analyzes it: a relay that idles over an empty outbox and then meets a
/// burst (a bulk insert, a relay back from an outage) sees statistics that
/// say "empty". Measured with the release relay, 200,000 rows inserted in
/// one transaction after 10 s idle (`BENCHMARKS.md`, set Y):
///
/// - PostgreSQL switches a cached statement to a generic plan after five
///   executions. The idle relay's was made for the empty table and found
///   each claim's rows by reading the whole table (700–800 ms per claim of
///   1,000 rows; drains of up to 57 s, against 2.4–4.6 s now). So each
///   claim is planned afresh (`plan_cache_mode = force_custom_plan`, about
///   0.17 ms per claim).
/// - Even a fresh plan, believing few rows pending, read and sorted every
///   pending row to take the oldest (80–200 ms per claim, 16 s). The claim
///   wants the pending rows in id order, which the partial index gives
///   whatever their number: `enable_sort = off` keeps the planner on it
///   (2 ms per claim in `psql`).
///
/// Both are `SET LOCAL`, sent with the `BEGIN` in one round trip: they end
/// with the transaction, and hold through a transaction-mode pooler.
pub(crate) const BEGIN: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_sort = off";

/// The claim statement for a mode and policy (built once per relay).
///
/// Parameters: `$1` batch size, `$2` relay id, `$3` number of partitions,
/// `$4` synchronous commit, `$5` partitions to leave out (`int[]`), `$6`–`$8`
/// the batch in flight ([`InFlight`]). See [`claim`] and [`crate::lease`].
///
/// In delete mode the claimed ids are remembered by [`remember`], a second
/// statement in the claim's transaction that runs while the batch is
/// published, not in this one: the claim is the relay's critical path.
pub fn claim_sql(after: AfterPublish, policy: PoisonPolicy) -> String {
    let pending = pending_subquery(policy);
    match after {
        AfterPublish::Delete => {
            format!("{FENCE}DELETE FROM outbox o WHERE o.ctid = ANY (ARRAY({pending})) RETURNING {COLUMNS}")
        }
        AfterPublish::Mark { .. } => format!(
            "{FENCE}UPDATE outbox o SET status = 'published', published_at = now(), attempts = o.attempts + 1 \
             WHERE o.ctid = ANY (ARRAY({pending})) RETURNING {COLUMNS}"
        ),
    }
}

/// Remembers the event ids of a claimed batch in `outbox_published_ids`
/// (migration V5), inside the claim's open transaction: they are remembered
/// if and only if the claim commits, that is, once Kafka acknowledged every
/// row. The relay runs it while the batch's records are in flight, beside
/// the next claim on the other connection, so it adds to neither
/// (`BENCHMARKS.md`, set U).
pub async fn remember(
    conn: &mut PgConnection,
    event_ids: &[Uuid],
    prepared: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox_published_ids (event_id) SELECT unnest($1::uuid[])")
        .persistent(prepared)
        .bind(event_ids)
        .execute(conn)
        .await?;
    Ok(())
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
                 WHERE id = ANY($1) AND status = 'pending'"
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
