//! What the WAL source writes to the table once a batch is settled on
//! Kafka ([`Outcome`]), and how that write overlaps the next batches
//! ([`Recorder`]).
//!
//! ```text
//!  batch N:    publish ─► Outcome ─► write (spawned) ─────────────► confirm N+2
//!  batch N+1:                       read ─► publish ─► queued ─┐
//!  batch N+2:                                 read ─► publish ─► queued (merged)
//!                                         N's write done ─► confirm N, write N+1..N+2
//! ```
//!
//! A batch's position is confirmed to the slot only once its outcome is in
//! the table, and positions are confirmed in order. One write is in flight
//! at a time; the outcomes of the batches published meanwhile wait, merged
//! into one, and are written together when it is done (up to a batch size
//! of events: then the reader waits). Under a steady stream of small
//! batches this makes one transaction of several batches' deletes, which
//! spares the database (and the walsender, which decodes every write) a
//! transaction per batch. The write is retried (with back-off) until it
//! succeeds, the relay stops, or the lease is lost; a write that never
//! happened confirms nothing, and the slot sends those batches again to the
//! next reader (duplicates, never loss).
//!
//! A batch with a failed event is written after everything before it, and
//! before the next batch is looked at (never overlapped): under block-key
//! the next batch must see the failure in the table to hold that key's
//! later events.

use std::time::Duration;

use pgwire_replication::Lsn;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{
    claim::OutboxRow,
    health::{Health, State},
    retry::back_off,
};
use outbox_core::backoff::Backoff;

/// What one batch (or one try of it) settled, to be written in one
/// transaction.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Delivered rows (id, event id): deleted, and their event ids
    /// remembered (`outbox_published_ids`) when the relay remembers
    /// published ids. Table-less events' ids are not (docs/schema.md,
    /// "What unique means for `event_id`").
    pub(crate) delivered: Vec<(i64, Uuid)>,
    /// Failed rows (by id, `Some`) and failed table-less events (`None`:
    /// inserted as failed rows), with the reason.
    pub(crate) failed: Vec<(Option<i64>, OutboxRow, String)>,
}

impl Outcome {
    fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.failed.is_empty()
    }

    fn len(&self) -> usize {
        self.delivered.len() + self.failed.len()
    }

    fn merge(&mut self, later: Outcome) {
        self.delivered.extend(later.delivered);
        self.failed.extend(later.failed);
    }
}

/// Everything a write needs, owned, so that it can run as its own task.
#[derive(Clone)]
pub(crate) struct Writer {
    /// For reads (the visibility wait).
    pub(crate) pool: PgPool,
    /// For the outcome's transaction (the relay's `synchronous_commit`).
    pub(crate) writes: PgPool,
    /// Whether delivered rows' ids are remembered.
    pub(crate) remember: bool,
    pub(crate) health: std::sync::Arc<Health>,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) shutdown: CancellationToken,
}

impl Writer {
    /// Writes `outcome`, trying again after a back-off until it is written
    /// (`true`) or the relay stops (`false`).
    pub(crate) async fn write(&self, outcome: &Outcome) -> bool {
        if outcome.is_empty() {
            return true;
        }
        let mut backoff = Backoff::new(self.min_backoff, self.max_backoff);
        loop {
            match self.write_once(outcome).await {
                Ok(()) => break,
                Err(e) => {
                    self.health.set(State::Degraded, format!("database: {e}"));
                    warn!(error = %e, "cannot record a batch's outcome; trying again");
                }
            }
            back_off(&mut backoff, &self.shutdown).await;
            if self.shutdown.is_cancelled() {
                return false;
            }
        }
        for (_, row, reason) in &outcome.failed {
            warn!(event.id = %row.event_id, correlation.id = row.correlation_id.as_deref(),
                  reason = %reason, "event failed permanently; moved to failed");
        }
        true
    }

    /// Spawns [`Writer::write`]: `end` is confirmed once it is done.
    fn spawn(&self, outcome: Outcome, end: Lsn) -> Pending {
        let writer = self.clone();
        Pending {
            end,
            task: tokio::spawn(async move { writer.write(&outcome).await }),
        }
    }

    async fn write_once(&self, outcome: &Outcome) -> Result<(), sqlx::Error> {
        let mut tx = self.writes.begin().await?;
        if !outcome.delivered.is_empty() {
            let (ids, event_ids): (Vec<i64>, Vec<Uuid>) = outcome.delivered.iter().copied().unzip();
            let remember = self.remember.then_some(event_ids.as_slice());
            delete_delivered(&mut tx, &self.pool, &ids, remember).await?;
        }
        for (id, r, reason) in &outcome.failed {
            match id {
                Some(id) => {
                    sqlx::query(
                        "UPDATE outbox SET status = 'failed', attempts = attempts + 1, \
                             last_error = $2, failed_at = now() WHERE id = $1",
                    )
                    .bind(id)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    // A table-less event becomes a failed row, so that the
                    // operator's commands see it. Its id may already be in
                    // the table after a crash: then it is there already.
                    sqlx::query(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, \
                             event_version, topic, payload, payload_bytes, content_type, headers, \
                             correlation_id, causation_id, traceparent, tracestate, source, \
                             occurred_at, status, attempts, last_error, failed_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10::jsonb, $11, $12, \
                             $13, $14, $15, $16, 'failed', 1, $17, now()) \
                         ON CONFLICT (event_id) DO NOTHING",
                    )
                    .bind(r.event_id)
                    .bind(&r.aggregate_type)
                    .bind(&r.aggregate_id)
                    .bind(&r.event_type)
                    .bind(r.event_version)
                    .bind(&r.topic)
                    .bind(&r.payload)
                    .bind(&r.payload_bytes)
                    .bind(&r.content_type)
                    .bind(&r.headers)
                    .bind(&r.correlation_id)
                    .bind(&r.causation_id)
                    .bind(&r.traceparent)
                    .bind(&r.tracestate)
                    .bind(&r.source)
                    .bind(r.occurred_at)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await
    }
}

/// Failure-free outcomes being written, one write in flight at a time,
/// and the position each write lets the reader confirm.
pub(crate) struct Recorder {
    pub(crate) writer: Writer,
    in_flight: Option<Pending>,
    /// Outcomes of batches published while a write was in flight, merged,
    /// and the last one's end.
    queued: Option<(Outcome, Lsn)>,
}

/// What [`Recorder::settle`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing was in flight.
    Nothing,
    /// A write is done: its position may be confirmed.
    Written(Lsn),
    /// A write gave up (the relay stops): nothing more may be confirmed,
    /// and what was queued is dropped.
    GaveUp,
}

impl Recorder {
    pub(crate) fn new(writer: Writer) -> Self {
        Self {
            writer,
            in_flight: None,
            queued: None,
        }
    }

    /// Nothing is being written or waiting to be.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.is_none() && self.queued.is_none()
    }

    /// The write in flight is done: [`Recorder::settle`] returns at once.
    pub(crate) fn write_done(&self) -> bool {
        self.in_flight.as_ref().is_some_and(Pending::is_finished)
    }

    /// Events whose outcome waits behind the write in flight.
    pub(crate) fn queued(&self) -> usize {
        self.queued.as_ref().map_or(0, |(o, _)| o.len())
    }

    /// Adds a batch's outcome, whose last commit ends at `end`: written at
    /// once if no write is in flight, else merged into the queued one.
    pub(crate) fn add(&mut self, outcome: Outcome, end: Lsn) {
        match &mut self.queued {
            Some((queued, last)) => {
                queued.merge(outcome);
                *last = end;
            }
            None => self.queued = Some((outcome, end)),
        }
        if self.in_flight.is_none() {
            self.start_queued();
        }
    }

    fn start_queued(&mut self) {
        if let Some((outcome, end)) = self.queued.take() {
            self.in_flight = Some(self.writer.spawn(outcome, end));
        }
    }

    /// Waits for the write in flight, then starts the queued one (without
    /// waiting for it).
    pub(crate) async fn settle(&mut self) -> Settled {
        let Some(pending) = self.in_flight.take() else {
            self.start_queued();
            return Settled::Nothing;
        };
        match pending.written().await {
            Some(end) => {
                self.start_queued();
                Settled::Written(end)
            }
            None => {
                self.queued = None;
                Settled::GaveUp
            }
        }
    }
}

/// A batch's outcome being written by its own task, and the position to
/// confirm once it is written.
struct Pending {
    end: Lsn,
    task: JoinHandle<bool>,
}

impl Pending {
    /// Waits for the write: `Some(end)` once it is written, `None` if it
    /// gave up (the relay stops) and nothing may be confirmed.
    async fn written(self) -> Option<Lsn> {
        match self.task.await {
            Ok(true) => Some(self.end),
            Ok(false) => None,
            Err(e) => {
                warn!(error = %e, "the task recording a batch's outcome ended early");
                None
            }
        }
    }

    /// Whether the write is done (then [`Pending::written`] returns at
    /// once).
    fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Deletes the delivered rows `ids` in `tx`, remembering `event_ids` when
/// given, in one statement that also says which rows it missed.
///
/// The WAL can deliver a commit a moment before the transaction is visible
/// to other sessions (the commit record is flushed before the committing
/// backend leaves the proc array), so a delete may miss rows that were
/// already sent. Those are waited for ([`await_visible`]) and deleted then;
/// the usual batch misses none and costs the one statement.
async fn delete_delivered(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    pool: &PgPool,
    ids: &[i64],
    event_ids: Option<&[Uuid]>,
) -> Result<(), sqlx::Error> {
    // Each returns the ids of `ids` it did not delete.
    const DELETE: &str = "WITH gone AS (DELETE FROM outbox WHERE id = ANY($1) RETURNING id) \
         SELECT ARRAY(SELECT unnest($1::bigint[]) EXCEPT SELECT id FROM gone)";
    const DELETE_AND_REMEMBER: &str =
        "WITH gone AS (DELETE FROM outbox WHERE id = ANY($1) RETURNING id), \
              remembered AS (INSERT INTO outbox_published_ids (event_id) \
                             SELECT unnest($2::uuid[])) \
         SELECT ARRAY(SELECT unnest($1::bigint[]) EXCEPT SELECT id FROM gone)";
    let missed: Vec<i64> = match event_ids {
        Some(event_ids) => sqlx::query_scalar(DELETE_AND_REMEMBER)
            .bind(ids)
            .bind(event_ids),
        None => sqlx::query_scalar(DELETE).bind(ids),
    }
    .fetch_one(&mut **tx)
    .await?;
    if missed.is_empty() {
        return Ok(());
    }
    await_visible(pool, &missed).await?;
    let late = sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(&missed)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    debug!(
        missed = missed.len(),
        late, "rows not yet visible to the delete: deleted once they were"
    );
    Ok(())
}

/// Waits until each of `ids` is visible in the table, up to
/// [`VISIBLE_WITHIN`]: a row still missing then was deleted by someone else
/// (its producer, in Debezium's style; a `failed discard`; or a polling
/// relay with `--remember-published 0`).
async fn await_visible(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    let deadline = std::time::Instant::now() + VISIBLE_WITHIN;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .fetch_one(pool)
            .await?;
        if visible as usize >= ids.len() || std::time::Instant::now() > deadline {
            if tries > 1 {
                debug!(
                    rows = ids.len(),
                    tries, "waited for committed rows to become visible"
                );
            }
            return Ok(());
        }
        // The race lasts microseconds on an idle server: ask again at once
        // (the query's round trip is the wait), then every millisecond.
        if tries > 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// How long a committed row may take to become visible (see
/// `wal::RowsSeen`).
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
