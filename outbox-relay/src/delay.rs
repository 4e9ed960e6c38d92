//! Delayed events: rows that wait for their `not_before` time (migration
//! V10), and the task that lets them go when it comes.
//!
//! ```text
//!  producer: INSERT INTO outbox_delayed … not_before T   (append() with
//!     │      NewEvent::not_before, or outbox_emit(…, not_before => T))
//!     │      apart from the outbox: no claim and no slot sees it
//!     ▼
//!  release (every relay, at the earliest due time or every
//!     │  `delayed_check_interval`, whichever comes first):
//!     │  one statement moves the due rows into the outbox as new pending
//!     │  rows, same event_id, in due-time order
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

/// Moves the due delayed rows (at most [`CHUNK`]) into the outbox as new
/// pending rows, in one statement, in due-time order.
///
/// "Due" compares with `statement_timestamp()`, which is stable within the
/// statement, so the index on `(not_before, id)` reads only the due rows
/// (`clock_timestamp()` is volatile: with it PostgreSQL would filter every
/// waiting row on each check).
///
/// A due row whose event id is already in the outbox, or was published
/// (the relay remembers published ids), is left where it is: moving it
/// would fail the statement for every row. [`stuck`] counts them.
pub(crate) async fn release(pool: &PgPool) -> Result<Released, sqlx::Error> {
    let sql = format!(
        "WITH due AS (SELECT d.ctid FROM outbox_delayed d \
                      WHERE d.not_before <= statement_timestamp() \
                        AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = d.event_id) \
                        AND NOT EXISTS (SELECT 1 FROM outbox_published_ids p WHERE p.event_id = d.event_id) \
                      ORDER BY d.not_before, d.id LIMIT $1 FOR UPDATE SKIP LOCKED), \
              gone AS (DELETE FROM outbox_delayed d WHERE d.ctid = ANY (ARRAY(SELECT ctid FROM due)) \
                       RETURNING d.id, d.not_before, {KEPT}), \
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

/// Due rows that cannot move: their event id is in the outbox already, or
/// was published. They wait for an operator.
pub(crate) async fn stuck(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox_delayed d WHERE d.not_before <= statement_timestamp() \
           AND (EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = d.event_id) \
             OR EXISTS (SELECT 1 FROM outbox_published_ids p WHERE p.event_id = d.event_id))",
    )
    .persistent(false)
    .fetch_one(pool)
    .await
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
    let mut stuck_warned = 0;
    loop {
        let pause = match release_and_look_ahead(&pool, wake.as_deref(), &mut stuck_warned).await {
            Ok(Some(due_in)) => due_in.min(check_every),
            Ok(None) => check_every,
            Err(e) => {
                let missing = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42P01");
                if missing && !schema_warned {
                    warn!(
                        "there is no outbox_delayed table: delayed events need migration V10; \
                         run `outbox-relay migrate`"
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
    stuck_warned: &mut i64,
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
    let mut next = next_due_in(pool).await?;
    if next == Some(Duration::ZERO) {
        // Due, yet not released: stuck rows (or ones a concurrent release
        // holds). Say so once per number, and do not spin on them.
        let n = stuck(pool).await?;
        if n > 0 && n != *stuck_warned {
            warn!(
                rows = n,
                "delayed events are due but their event id is already in the outbox or was \
                 published, so they cannot move; `SELECT * FROM outbox_delayed WHERE not_before \
                 <= now()` lists them: delete them, or give them new ids"
            );
        }
        *stuck_warned = n;
        if n > 0 {
            next = None;
        }
    }
    telemetry::delayed_next_due(next);
    Ok(next)
}
