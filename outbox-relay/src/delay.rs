//! Delayed events: rows that wait for their `not_before` time (migration
//! V10), and the task that lets them go when it comes.
//!
//! ```text
//!  producer: INSERT … status 'delayed', not_before T    (append() with
//!     │      NewEvent::not_before, or outbox_emit(…, not_before => T))
//!     │      in no claim index, skipped by the WAL source: costs nothing
//!     ▼
//!  release (every relay, at the earliest due time or every
//!     │  `delayed_check_interval`, whichever comes first):
//!     │  one statement deletes the due rows and inserts them again as new
//!     │  pending rows, same event_id, in due-time order
//!     ▼
//!  an ordinary pending row: claimed (poll) or read from the slot (WAL)
//! ```
//!
//! So a delayed event takes its place in its key's order at its due time:
//! events of the key committed before then are published before it, later
//! ones after it, and it never holds back the key's immediate events.
//!
//! Every relay runs the release, poll or WAL, leader or standby: the
//! statement locks the due rows `SKIP LOCKED`, so two relays never release
//! one row twice, and a released row is an ordinary pending row that the
//! fence and the slot already handle. Nothing here needs a lease.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{retry::sleep_or_cancel, telemetry};

/// Most rows released by one statement.
const CHUNK: i64 = 5000;

/// The columns a released row keeps (the row is inserted again; `id`,
/// `created_at` and `status` are new, `not_before` is cleared).
const KEPT: &str = "event_id, aggregate_type, aggregate_id, event_type, event_version, topic, \
    payload, payload_bytes, content_type, headers, correlation_id, causation_id, traceparent, \
    tracestate, source, occurred_at";

/// What one release did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Released {
    /// Rows made pending.
    pub(crate) rows: u64,
    /// How late the most overdue of them was released, in seconds.
    pub(crate) most_late_by: f64,
}

/// Makes the due delayed rows (at most [`CHUNK`]) pending again, in one
/// statement: deleted and inserted again as new rows, in due-time order.
pub(crate) async fn release(pool: &PgPool) -> Result<Released, sqlx::Error> {
    let sql = format!(
        "WITH due AS (SELECT ctid FROM outbox WHERE status = 'delayed' \
                        AND not_before <= clock_timestamp() \
                      ORDER BY not_before, id LIMIT $1 FOR UPDATE SKIP LOCKED), \
              gone AS (DELETE FROM outbox o WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM due)) \
                       RETURNING o.id, o.not_before, {KEPT}), \
              again AS (INSERT INTO outbox ({KEPT}) SELECT {KEPT} FROM gone \
                        ORDER BY not_before, id RETURNING 1) \
         SELECT (SELECT count(*) FROM again), \
                COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - (SELECT min(not_before) FROM gone))::float8, 0)"
    );
    let (rows, most_late_by): (i64, f64) = sqlx::query_as(&sql)
        .persistent(false)
        .bind(CHUNK)
        .fetch_one(pool)
        .await?;
    Ok(Released {
        rows: rows as u64,
        most_late_by,
    })
}

/// How long until the earliest due time of a delayed row, if any (zero
/// when overdue).
async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let seconds = crate::store::next_delayed_due(pool).await?;
    Ok(seconds.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)))
}

/// Until `shutdown`: releases what is due, then sleeps until the next due
/// time or `check_every`, whichever comes first (a row inserted meanwhile
/// with an earlier due time is seen within `check_every`). `wake` is
/// notified after a release, so a polling relay claims at once.
pub(crate) async fn run(
    pool: PgPool,
    check_every: Duration,
    wake: Option<Arc<Notify>>,
    shutdown: CancellationToken,
) {
    let mut schema_warned = false;
    loop {
        let pause = match release_and_look_ahead(&pool, wake.as_deref()).await {
            Ok(Some(due_in)) => due_in.min(check_every),
            Ok(None) => check_every,
            Err(e) => {
                let missing = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42703");
                if missing && !schema_warned {
                    warn!(
                        "the outbox table has no not_before column: delayed events need \
                         migration V10; run `outbox-relay migrate`"
                    );
                    schema_warned = true;
                } else if !missing {
                    debug!(error = %e, "cannot release delayed events; will retry");
                }
                check_every
            }
        };
        if sleep_or_cancel(pause, &shutdown).await {
            return;
        }
    }
}

/// Releases until nothing more is due, then returns the next due time.
async fn release_and_look_ahead(
    pool: &PgPool,
    wake: Option<&Notify>,
) -> Result<Option<Duration>, sqlx::Error> {
    loop {
        let done = release(pool).await?;
        if done.rows > 0 {
            telemetry::delayed_released(done.rows, done.most_late_by);
            if let Some(wake) = wake {
                wake.notify_one();
            }
            info!(
                rows = done.rows,
                late_by_s = done.most_late_by,
                "delayed events due: now pending"
            );
        }
        if done.rows < CHUNK as u64 {
            break;
        }
    }
    let next = next_due_in(pool).await?;
    telemetry::delayed_next_due(next);
    Ok(next)
}
