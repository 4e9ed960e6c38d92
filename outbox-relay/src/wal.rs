//! The WAL source ([`crate::WalSource`], `--source wal`): committed events
//! read from a logical replication slot instead of claimed from the table.
//!
//! ```text
//!  slot (pgoutput, publication on outbox, messages on)
//!     │  Begin ─ Insert into outbox ─ Message 'outbox' ─ … ─ Commit(end)
//!     ▼
//!  read: a transaction's events become ready at its Commit, in commit
//!     │  order; ready transactions gather into a batch (up to the batch
//!     │  size, or whatever has arrived when the stream pauses)
//!     ▼
//!  publish (Batch::plan/settle, as in poll mode) ─► each event: delivered,
//!     │  failed (permanent, or held behind a failed event of its key under
//!     │  block-key), or again (transient: sent again, in order, after a
//!     │  back-off; the slot waits)
//!     ▼
//!  record (one DB transaction, `wal_outcome.rs`): delete the delivered
//!     │  rows (remembering their ids; table-less events' ids are not, see
//!     │  docs/schema.md), fail the failed rows, insert failed table-less
//!     │  events as failed rows (so `failed list|retry|discard` see them);
//!     │  a failure-free batch is recorded while the next ones are
//!     │  published, theirs merged into the following record
//!     ▼
//!  confirm the batch's last commit position to the slot, in order, once
//!  its outcome is recorded
//! ```
//!
//! Only one connection can read a slot: PostgreSQL refuses a second one
//! ("replication slot … is active"), so a second relay stands by and tries
//! again every second, and takes over once the first lets go. A reader
//! that lost its connection cannot confirm anything any more.
//!
//! After a crash the slot resends everything after its confirmed position:
//! the batch in flight, the outcomes being recorded (one write, and up to a
//! batch size of events queued behind it), and the events acknowledged in
//! the last [`crate::WalSource::status_interval`]. Those are the only
//! duplicates.
//!
//! One file because it is one loop and its bookkeeping: the session reads,
//! the batch decides, and the outcome is recorded before the position is
//! confirmed; the row and message decoding below it exist only to feed
//! that loop. The wire format is apart (`pgoutput.rs`), as is the slot's
//! lifecycle (`slot.rs`).

use std::{collections::HashSet, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use futures::FutureExt;
use outbox_core::backoff::Backoff;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::{
    batch::{Batch, Fate},
    claim::OutboxRow,
    config::{PoisonPolicy, WalSource},
    exactly_once::Ended,
    health::State,
    pgoutput::{self, Change, Relations, Value},
    relay::{note_delivered, Relay},
    retry::{back_off, sleep_or_cancel},
    slot::{self, SlotError},
    slot_lease::{Acquired, SlotLease},
    wal_outcome::{Outcome, Recorder, Settled, Writer},
};

/// Where an event came from: what recording its fate means.
#[derive(Debug, Clone)]
enum Origin {
    /// A row of the outbox table, by id: deleted once published.
    Row(i64),
    /// A table-less event (`outbox_emit`): nothing to delete.
    Message,
}

#[derive(Debug, Clone)]
struct Event {
    row: OutboxRow,
    origin: Origin,
    /// Set when the event cannot be built (a malformed message): it goes
    /// to the failed store as is.
    malformed: Option<String>,
    /// Exactly-once: its transaction ended at or before the slot's
    /// checkpoint, so an earlier reader committed it in Kafka; it is not
    /// sent again (`Session::in_kafka_until`).
    in_kafka: bool,
}

/// The heartbeat's prefix: a message the reader confirms past at once.
pub(crate) const HEARTBEAT_PREFIX: &str = "outbox-heartbeat";

/// Every [`WalSource::heartbeat_interval`] until `shutdown`: writes a
/// heartbeat into the WAL (so that an idle database's slot still advances),
/// reads the slot's figures into the metrics, and warns when the slot keeps
/// more WAL than [`WalSource::retained_warn_bytes`].
pub(crate) async fn watch_slot(pool: sqlx::PgPool, wal: WalSource, shutdown: CancellationToken) {
    let mut warned = false;
    loop {
        let beat = sqlx::query("SELECT pg_logical_emit_message(false, $1, '')")
            .bind(HEARTBEAT_PREFIX)
            .execute(&pool)
            .await;
        if let Err(e) = beat {
            warn!(error = %e, "cannot write the WAL heartbeat");
        }
        match slot::status(&pool, &wal.slot).await {
            Ok(Some(st)) => {
                let retained = st.retained_wal_bytes.unwrap_or(0);
                let confirmed = st
                    .confirmed_flush_lsn
                    .as_deref()
                    .and_then(|l| Lsn::parse(l).ok())
                    .map_or(0, Lsn::as_u64);
                crate::telemetry::wal_slot(retained, st.lag_bytes.unwrap_or(0), confirmed);
                let over = u64::try_from(retained).unwrap_or(0) > wal.retained_warn_bytes;
                if over && !warned {
                    warn!(slot = %wal.slot, retained_bytes = retained, wal_status = st.wal_status.as_deref(),
                          "the slot keeps more WAL than --wal-retained-warn: is its reader stuck or \
                           stopped? `outbox-relay slot status` shows it; `outbox-relay slot drop` \
                           frees it when the WAL source is decommissioned");
                }
                warned = over;
            }
            Ok(None) => {
                warn!(slot = %wal.slot, "the slot does not exist: create it with `outbox-relay slot create`")
            }
            Err(e) => warn!(error = %e, "cannot read the slot's figures"),
        }
        if sleep_or_cancel(wal.heartbeat_interval, &shutdown).await {
            return;
        }
    }
}

/// Reads the slot until `shutdown`; returns when it has let go of it.
pub(crate) async fn run(relay: &Relay, wal: &WalSource, shutdown: &CancellationToken) {
    let health = relay.health();
    let fresh = || Backoff::new(relay.cfg.min_backoff, relay.cfg.max_backoff);
    let mut backoff = fresh();
    let said_standby = std::sync::atomic::AtomicBool::new(false);
    let sync = if relay.cfg.synchronous_commit {
        "on"
    } else {
        "off"
    };
    // The connections that record outcomes, with the relay's
    // `synchronous_commit` (off by default, as for poll mode's claims: a
    // PostgreSQL crash may lose the last few hundred milliseconds of these
    // writes, and the slot's position with them, so those events come
    // again: duplicates, never loss).
    //
    // They also ask, for every batch, which keys have a failed event
    // (block-key). These statements meet the outbox table both nearly empty
    // and, in a burst before autovacuum, full of dead rows: a plan cached
    // for the first reads every dead row for each batch, so each is
    // planned for the table as it is (`plan_cache_mode`).
    let writes = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*relay.pool.connect_options()).clone().options([
            ("synchronous_commit", sync),
            ("plan_cache_mode", "force_custom_plan"),
        ]));
    let lease = SlotLease::new(
        relay.pool.clone(),
        &wal.slot,
        relay.relay_id(),
        relay.cfg.lease_ttl,
        relay.cfg.heartbeat_interval,
    );
    match slot::extra_actions(&relay.pool, &wal.publication).await {
        Ok(extra) if !extra.is_empty() => warn!(
            publication = %wal.publication,
            "{}",
            slot::extra_actions_advice(&wal.publication, &extra)
        ),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "cannot read the publication's actions"),
    }
    let stand_by = |why: String| {
        health.set(State::Standby, why.clone());
        if !said_standby.swap(true, std::sync::atomic::Ordering::Relaxed) {
            info!(slot = %wal.slot, "{why}");
        }
    };
    while !shutdown.is_cancelled() {
        // The lease first: only its holder opens the slot.
        match lease.acquire().await {
            Ok(Acquired::Ours) => {}
            Ok(Acquired::HeldBy(holder)) => {
                stand_by(format!(
                    "standing by: relay {holder} holds the lease of slot {}",
                    wal.slot
                ));
                sleep_or_cancel(Duration::from_secs(1), shutdown).await;
                continue;
            }
            Err(e) => {
                health.set(State::Degraded, format!("database: {e}"));
                warn!(error = %e, "cannot take the slot's lease; retrying");
                back_off(&mut backoff, shutdown).await;
                continue;
            }
        }
        let cfg = slot::replication_config(&wal.target, &wal.slot, &wal.publication)
            .with_start_lsn(Lsn::ZERO)
            .with_status_interval(wal.status_interval)
            // Values as the decoder expects them, whatever the server's
            // defaults: ISO timestamps in UTC.
            .with_options("-c DateStyle=ISO -c TimeZone=UTC");
        let mut client = match ReplicationClient::connect(cfg).await {
            Ok(c) => c,
            Err(e) => {
                let e = slot::explain(e, &wal.target, &wal.slot);
                health.set(State::Degraded, e.to_string());
                warn!(error = %e, "cannot open the replication connection; retrying");
                back_off(&mut backoff, shutdown).await;
                continue;
            }
        };
        let started = tokio::select! {
            r = client.wait_started() => r,
            _ = shutdown.cancelled() => { client.abort(); break; }
        };
        if let Err(e) = started {
            let e = slot::explain(e, &wal.target, &wal.slot);
            client.abort();
            if let SlotError::HeldByAnother { pid, .. } = &e {
                // We hold the lease, so a relay still reading has lost
                // its own: end its connection. Anything else we leave.
                match lease.end_stale_reader(*pid).await {
                    Ok(true) => {
                        sleep_or_cancel(Duration::from_millis(100), shutdown).await;
                    }
                    Ok(false) => {
                        stand_by(format!(
                            "standing by: slot {} is read by pid {pid}, which is not a relay",
                            wal.slot
                        ));
                        sleep_or_cancel(Duration::from_secs(1), shutdown).await;
                    }
                    Err(err) => {
                        health.set(State::Degraded, format!("database: {err}"));
                        back_off(&mut backoff, shutdown).await;
                    }
                }
            } else {
                health.set(State::Degraded, e.to_string());
                warn!(error = %e, "cannot read the slot; retrying");
                back_off(&mut backoff, shutdown).await;
            }
            continue;
        }
        // Exactly-once: fence the slot's last reader in Kafka and learn
        // how far its events are in Kafka already, before reading.
        let in_kafka_until = match start_exactly_once(relay, wal).await {
            Ok(lsn) => lsn,
            Err(e) => {
                client.abort();
                health.set(State::Degraded, e.clone());
                warn!(error = %e, "cannot start the slot's Kafka transactions; retrying");
                back_off(&mut backoff, shutdown).await;
                continue;
            }
        };
        said_standby.store(false, std::sync::atomic::Ordering::Relaxed);
        backoff = fresh();
        health.set(State::Active, format!("reading slot {}", wal.slot));
        info!(slot = %wal.slot, publication = %wal.publication, "reading the slot");
        let keeping = CancellationToken::new();
        let frontier = wal_insert_position(&relay.pool).await;
        let mut session = Session::new(relay, wal, &writes, &lease, frontier, shutdown);
        session.in_kafka_until = in_kafka_until;
        let ended = tokio::select! {
            r = session.read(&mut client, shutdown) => r,
            () = lease.keep(&keeping) => Err("the slot's lease ran out or was taken over".to_string()),
        };
        keeping.cancel();
        if session.halted {
            // Keeping the lease, like a killed relay.
            client.abort();
            return;
        }
        if let Err(why) = &ended {
            health.set(State::Degraded, why.clone());
            warn!(error = %why, "the replication stream ended; reconnecting");
        }
        if shutdown.is_cancelled() {
            // Let the last confirmed position reach the server, then go.
            tokio::time::sleep(wal.status_interval + Duration::from_millis(50)).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
            break;
        }
        client.abort();
        if ended.is_err() {
            back_off(&mut backoff, shutdown).await;
        }
    }
    lease.release().await;
}

/// Exactly-once ([`crate::RelayConfig::exactly_once`]): takes the slot's
/// transactional id (fencing its last reader) and reads the slot's
/// checkpoint, whose position is returned. `None` without exactly-once or
/// without a checkpoint yet.
async fn start_exactly_once(relay: &Relay, wal: &WalSource) -> Result<Option<Lsn>, String> {
    let Some(eo) = &relay.exactly_once else {
        return Ok(None);
    };
    let Some(text) = eo.start_reading(relay.kafka(), &wal.slot).await? else {
        return Ok(None);
    };
    let lsn = Lsn::parse(&text).map_err(|e| {
        format!(
            "the checkpoint of slot {} holds a bad position {text:?}: {e}",
            wal.slot
        )
    })?;
    info!(slot = %wal.slot, checkpoint = %lsn,
          "exactly-once: transactions up to the checkpoint are in Kafka already; \
           they are not sent again");
    Ok(Some(lsn))
}

/// The server's WAL insert position, read once the slot is ours (see
/// `Session::frontier`); if it cannot be read, the end of time, so that
/// every row is looked up.
async fn wal_insert_position(pool: &sqlx::PgPool) -> Lsn {
    let read: Result<String, sqlx::Error> =
        sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(pool)
            .await;
    read.map_err(|e| e.to_string())
        .and_then(|l| Lsn::parse(&l).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the WAL insert position; every row is looked up");
            Lsn::from_u64(u64::MAX)
        })
}

/// One replication connection's reading.
struct Session<'a> {
    relay: &'a Relay,
    wal: &'a WalSource,
    /// The slot's lease: nothing is confirmed once it ran out.
    lease: &'a SlotLease,
    relations: Relations,
    /// The transaction being received: its commit time and events.
    open: Option<(DateTime<Utc>, Vec<Event>)>,
    /// Committed events not yet published, and the last commit's end.
    ready: Vec<Event>,
    ready_end: Option<Lsn>,
    /// The first ready transaction's commit end.
    ready_from: Option<Lsn>,
    /// When the first ready transaction was committed (for the timing lines).
    ready_since: Option<DateTime<Utc>>,
    /// The server's WAL insert position when this session began: no
    /// earlier reader of the slot, and no polling relay stopped before a
    /// switch to WAL, can have published an event committed after it, so
    /// only batches that begin at or before it are looked up
    /// ([`look_up_gone`]).
    frontier: Lsn,
    /// Exactly-once: the slot's checkpoint when this session began. The
    /// transactions that ended at or before it were committed in Kafka by
    /// an earlier reader: their events are not sent again, only their
    /// rows deleted ([`Event::in_kafka`]).
    in_kafka_until: Option<Lsn>,
    /// Writes batches' outcomes, and says when their positions may be
    /// confirmed.
    recorder: Recorder,
    /// The crash hook fired: the relay stops as if killed.
    halted: bool,
}

impl<'a> Session<'a> {
    fn new(
        relay: &'a Relay,
        wal: &'a WalSource,
        writes: &sqlx::PgPool,
        lease: &'a SlotLease,
        frontier: Lsn,
        shutdown: &CancellationToken,
    ) -> Self {
        let writer = Writer {
            pool: relay.pool.clone(),
            writes: writes.clone(),
            remember: relay.cfg.remembers_published(),
            health: relay.health(),
            min_backoff: relay.cfg.min_backoff,
            max_backoff: relay.cfg.max_backoff,
            shutdown: shutdown.clone(),
        };
        Self {
            relay,
            wal,
            lease,
            relations: Relations::default(),
            open: None,
            ready: Vec::new(),
            ready_end: None,
            ready_from: None,
            ready_since: None,
            frontier,
            in_kafka_until: None,
            recorder: Recorder::new(writer),
            halted: false,
        }
    }

    /// Reads until `shutdown` or an error; the last batch's outcome is
    /// written (and confirmed) before it returns.
    async fn read(
        &mut self,
        client: &mut ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let read = self.read_until_done(client, shutdown).await;
        let finished = self.finish_all(client).await.map(|_| ());
        read.and(finished)
    }

    async fn read_until_done(
        &mut self,
        client: &mut ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let batch_size = self.relay.cfg.batch_size;
        loop {
            if self.recorder.write_done() {
                self.finish_pending(client).await?;
            }
            let next = if self.ready.len() >= batch_size {
                None
            } else if !self.ready.is_empty() {
                // Take what has arrived already; publish when the stream
                // pauses. Unconstrained: tokio's cooperative budget would
                // otherwise report an exhausted budget as a pause, and cut
                // batches at one transaction.
                tokio::task::unconstrained(client.recv()).now_or_never()
            } else if !self.recorder.is_idle() {
                // Idle while the last outcome is written: confirm it as
                // soon as it is (a short sleep, not a busy loop).
                tokio::select! {
                    r = client.recv() => Some(r),
                    () = tokio::time::sleep(Duration::from_millis(1)) => continue,
                    _ = shutdown.cancelled() => return Ok(()),
                }
            } else {
                tokio::select! {
                    r = client.recv() => Some(r),
                    _ = shutdown.cancelled() => return Ok(()),
                }
            };
            let Some(next) = next else {
                self.publish_ready(client, shutdown).await?;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            };
            let event = match next {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err("the server ended the replication stream".into()),
                Err(e) => {
                    return Err(slot::explain(e, &self.wal.target, &self.wal.slot).to_string())
                }
            };
            self.receive(event, client)?;
        }
    }

    fn receive(&mut self, ev: ReplicationEvent, client: &ReplicationClient) -> Result<(), String> {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => self.open = Some((pg_time(commit_time_micros), Vec::new())),
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data)
                .map_err(|e| format!("cannot decode a pgoutput message: {e}"))?
            {
                Change::Relation(id, rel) => self.relations.learn(id, rel),
                Change::Insert { relation, values } => {
                    let Some(rel) = self.relations.get(relation) else {
                        return Err(format!("an insert into unknown relation {relation}"));
                    };
                    if rel.name != "outbox" {
                        return Ok(());
                    }
                    if let Some(event) = from_row(&rel.columns, values) {
                        self.push(event);
                    }
                }
                Change::Other(_) => {}
            },
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                lsn,
            } => {
                if prefix == "outbox" && transactional {
                    let at = self.open.as_ref().map_or_else(Utc::now, |(t, _)| *t);
                    self.push(from_message(&content, lsn, at));
                } else if prefix == HEARTBEAT_PREFIX {
                    if self.idle() {
                        client.update_applied_lsn(lsn);
                    }
                } else if prefix == "outbox" {
                    warn!(%lsn, "a non-transactional 'outbox' message was skipped: events are \
                                 written with outbox_emit(), inside the producer's transaction");
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let commit_time = pg_time(commit_time_micros);
                let lag_ms = ms_since(commit_time);
                if lag_ms > LATE_COMMIT_MS {
                    debug!(target: TIMING, lag_ms, ready = self.ready.len(),
                           pending = !self.recorder.is_idle(), "late commit");
                }
                if let Some((_, mut events)) = self.open.take() {
                    if self.in_kafka_until.is_some_and(|until| end_lsn <= until) {
                        for e in &mut events {
                            e.in_kafka = true;
                        }
                    }
                    if self.ready.is_empty() && !events.is_empty() {
                        self.ready_from = Some(end_lsn);
                        self.ready_since = Some(commit_time);
                    }
                    self.ready.extend(events);
                }
                if self.ready.is_empty() && self.recorder.is_idle() {
                    // Nothing of ours before it: confirm at once.
                    client.update_applied_lsn(end_lsn);
                } else {
                    self.ready_end = Some(end_lsn);
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.idle() {
                    client.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Nothing received or published is waiting for its outcome: a
    /// position past everything seen can be confirmed.
    fn idle(&self) -> bool {
        self.open.is_none() && self.ready.is_empty() && self.recorder.is_idle()
    }

    fn push(&mut self, mut event: Event) {
        match &mut self.open {
            Some((at, events)) => {
                // Commit-to-ack starts at the row's insert, as in poll
                // mode; a table-less event has no insert time, so at the
                // commit.
                if matches!(event.origin, Origin::Message) {
                    event.row.created_at = *at;
                }
                events.push(event);
            }
            None => warn!("a change outside a transaction was skipped"),
        }
    }

    /// Publishes the ready events until each is delivered or failed, then
    /// has their outcome written and their last commit confirmed after it
    /// (`wal_outcome`): a failure-free outcome is written while the next
    /// batch is read and published, any other at once. Returns early
    /// (confirming nothing) on shutdown, and errs (confirming nothing) if
    /// the lease ran out meanwhile.
    async fn publish_ready(
        &mut self,
        client: &ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let Some(end) = self.ready_end.take() else {
            return Ok(());
        };
        let mut events = std::mem::take(&mut self.ready);
        let t0 = std::time::Instant::now();
        let oldest = self.ready_since.take();
        // Rows are looked up only if the batch begins with a transaction
        // committed before this session (see `Session::frontier`).
        let look_up = self
            .ready_from
            .take()
            .is_some_and(|from| from <= self.frontier);
        let mut backoff = Backoff::new(self.relay.cfg.min_backoff, self.relay.cfg.max_backoff);
        let outcome = loop {
            match self.publish_once(&events, look_up, end).await {
                Ok((again, outcome)) if again.is_empty() => break outcome,
                Ok((again, outcome)) => {
                    // What settled is written before the next try, which
                    // must see its failures (block-key).
                    if !self.recorder.writer.write(&outcome).await {
                        return Ok(());
                    }
                    warn!(
                        events = again.len(),
                        "events not acknowledged; sending them again"
                    );
                    events = again;
                }
                Err(TryError::Database(e)) => {
                    self.relay.degraded(format!("database: {e}"));
                    warn!(error = %e, "cannot look a batch's rows up; trying again");
                }
                Err(TryError::Kafka(why)) => return Err(why),
                Err(TryError::Halted) => {
                    self.halted = true;
                    return Err("halted by the crash hook after a Kafka commit".into());
                }
            }
            back_off(&mut backoff, shutdown).await;
            if shutdown.is_cancelled() {
                return Ok(());
            }
        };
        let t1 = std::time::Instant::now();
        if outcome.failed.is_empty() {
            // Written once the write in flight is done, with the outcomes
            // of the batches published meanwhile (`wal_outcome::Recorder`).
            self.recorder.add(outcome, end);
            if self.recorder.queued() >= self.relay.cfg.batch_size {
                self.finish_pending(client).await?;
            }
            debug!(target: TIMING, events = events.len(), age_ms = oldest.map(ms_since),
                   publish_ms = (t1 - t0).as_secs_f64() * 1000.0,
                   wait_ms = t1.elapsed().as_secs_f64() * 1000.0, "batch");
            return Ok(());
        }
        // Positions are confirmed in order: everything before it first.
        if !self.finish_all(client).await? {
            return Ok(());
        }
        if self.recorder.writer.write(&outcome).await {
            self.confirm(client, end)?;
        }
        Ok(())
    }

    /// Waits for the write in flight, confirms its position, and starts
    /// the write of the outcomes queued behind it.
    async fn finish_pending(&mut self, client: &ReplicationClient) -> Result<Settled, String> {
        let settled = self.recorder.settle().await;
        if let Settled::Written(end) = settled {
            self.confirm(client, end)?;
        }
        if settled != Settled::GaveUp && self.recorder.is_idle() && self.ready.is_empty() {
            // Commits with nothing of ours that came meanwhile.
            if let Some(later) = self.ready_end.take() {
                self.confirm(client, later)?;
            }
        }
        Ok(settled)
    }

    /// Waits until every outcome is written, confirming as it goes:
    /// `false` if a write gave up (the relay stops; nothing more may be
    /// confirmed).
    async fn finish_all(&mut self, client: &ReplicationClient) -> Result<bool, String> {
        while !self.recorder.is_idle() {
            if self.finish_pending(client).await? == Settled::GaveUp {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Confirms `end` to the slot, if the lease still holds.
    fn confirm(&self, client: &ReplicationClient, end: Lsn) -> Result<(), String> {
        if !self.lease.live() {
            // A standby may be reading already: its position is the truth.
            return Err("the slot's lease ran out before the batch was confirmed; \
                        its events are read again by the next reader"
                .into());
        }
        client.update_applied_lsn(end);
        self.relay
            .health()
            .set(State::Active, format!("reading slot {}", self.wal.slot));
        Ok(())
    }

    /// One try: returns the events to send again (transient failures and
    /// the events of their keys after them), and what the others' fates
    /// are, to be written. `end` is the batch's last commit position.
    ///
    /// Exactly-once: the sends are one Kafka transaction with the slot's
    /// checkpoint (`end`) as one more record. It commits only if every
    /// record was acknowledged; the try's failures are recorded in the
    /// table before the commit, so that a row still pending at or before a
    /// checkpoint is always one that Kafka has. Otherwise it is aborted,
    /// and every event that did not fail is sent again.
    async fn publish_once(
        &self,
        events: &[Event],
        look_up: bool,
        end: Lsn,
    ) -> Result<(Vec<Event>, Outcome), TryError> {
        let started = std::time::Instant::now();
        let relay = self.relay;
        let look_up = async {
            if look_up {
                look_up_gone(relay, events).await
            } else {
                Ok(HashSet::new())
            }
        };
        let blocked = blocked_keys(
            &self.recorder.writer.writes,
            relay.cfg.poison_policy,
            events,
        );
        let (gone, blocked) = tokio::try_join!(look_up, blocked)?;
        if !gone.is_empty() {
            let kept: Vec<Event> = events
                .iter()
                .filter(|e| !matches!(e.origin, Origin::Row(id) if gone.contains(&id)))
                .cloned()
                .collect();
            debug!(
                skipped = events.len() - kept.len(),
                "rows already published or failed"
            );
            if kept.is_empty() {
                return Ok((Vec::new(), Outcome::default()));
            }
            return Box::pin(self.publish_once(&kept, false, end)).await;
        }
        // Exactly-once: what an earlier reader committed in Kafka is not
        // sent again; its rows that are still pending are deleted.
        let mut outcome = Outcome::default();
        let (done, events): (Vec<&Event>, Vec<&Event>) = events
            .iter()
            .partition(|e| e.in_kafka && e.malformed.is_none());
        for e in &done {
            if let Origin::Row(id) = e.origin {
                outcome.delivered.push((id, e.row.event_id));
            }
        }
        let recovered = outcome.delivered.len();
        if recovered > 0 {
            crate::telemetry::checkpoint_finished(recovered);
            info!(
                rows = recovered,
                "rows already in Kafka (the slot's checkpoint) are deleted, not sent again"
            );
        }
        if events.is_empty() {
            return Ok((Vec::new(), outcome));
        }
        let mut rows: Vec<OutboxRow> = events.iter().map(|e| e.row.clone()).collect();
        let (mut prepared, _) = relay.prepare(&mut rows).await;
        for (i, e) in events.iter().enumerate() {
            let key = (e.row.aggregate_type.clone(), e.row.aggregate_id.clone());
            if let Some(why) = &e.malformed {
                prepared[i] = Err(crate::publisher::Outcome::Permanent(why.clone()));
            } else if blocked.contains(&key) {
                prepared[i] = Err(crate::publisher::Outcome::Permanent(format!(
                    "held: an earlier event of key {}/{} failed (block-key); retry or discard \
                     that one first",
                    key.0, key.1
                )));
            }
        }
        let policy = relay.cfg.poison_policy;
        let (batch, mut records) = Batch::plan(rows, prepared, policy);
        let health = relay.health();
        let sends = records.iter().filter(|r| r.is_some()).count();
        let txn = relay.exactly_once.as_ref().filter(|_| sends > 0);
        // The broker owes the sends (and the transaction's begin).
        let awaiting = (sends > 0).then(|| health.awaiting(sends));
        if let Some(eo) = txn {
            eo.begin(relay.kafka())
                .await
                .map_err(|e| TryError::Kafka(format!("cannot begin a Kafka transaction: {e}")))?;
            let ids: Vec<i64> = batch.sent_ids();
            records.push(Some(eo.slot_checkpoint_record(
                &self.wal.slot,
                &ids,
                end.to_string(),
            )));
        }
        let mut outcomes = if sends > 0 {
            relay.sink.publish(records).await
        } else {
            vec![None; events.len()]
        };
        drop(awaiting);
        let checkpoint = txn.and_then(|_| outcomes.pop().flatten());
        let mut fates = batch.settle(&outcomes);
        // A held event follows its key: failed if an earlier event of the
        // key failed for good (block-key), else sent again.
        let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
        let mut failed_at: HashSet<usize> = HashSet::new();
        let mut again = Vec::new();
        for (i, (e, fate)) in events.iter().zip(&fates).enumerate() {
            let key = (e.row.aggregate_type.as_str(), e.row.aggregate_id.as_str());
            let row_id = match e.origin {
                Origin::Row(id) => Some(id),
                Origin::Message => None,
            };
            match fate {
                Fate::Delivered { .. } => {
                    // Only a row's id is remembered: nothing consults the
                    // memory for a table-less event (`outbox_emit` cannot
                    // see the ids still on their way), so writing it would
                    // only cost (a third of the drain rate).
                    if let Some(id) = row_id {
                        outcome.delivered.push((id, e.row.event_id));
                    }
                }
                Fate::Failed(reason) => {
                    failed_keys.insert(key);
                    failed_at.insert(i);
                    outcome.failed.push((row_id, e.row.clone(), reason.clone()));
                }
                Fate::Held if policy == PoisonPolicy::BlockKey && failed_keys.contains(&key) => {
                    let reason = format!(
                        "held: an earlier event of key {}/{} failed (block-key); retry or \
                         discard that one first",
                        key.0, key.1
                    );
                    failed_at.insert(i);
                    outcome.failed.push((row_id, e.row.clone(), reason));
                }
                Fate::Retry(_) | Fate::Held => again.push((*e).clone()),
            }
        }
        if let Some(eo) = txn {
            let acknowledged = again.is_empty()
                && batch.all_sent_delivered(&fates)
                && checkpoint == Some(crate::publisher::Outcome::Delivered);
            let why = crate::exactly_once::abort_reason(checkpoint.as_ref());
            if !self
                .end_transaction(eo, acknowledged, &why, &mut outcome, sends)
                .await?
            {
                // Nothing of it is visible: all but the failed go again.
                outcome.delivered.truncate(recovered);
                again = events
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !failed_at.contains(i))
                    .map(|(_, e)| (*e).clone())
                    .collect();
                fates = crate::batch::aborted(fates);
            }
        }
        note_delivered(batch.rows(), &fates, started);
        Ok((again, outcome))
    }

    /// Exactly-once: ends a try's Kafka transaction, committing it if every
    /// record of it was `acknowledged`, after writing the try's failures
    /// (taken from `outcome`) to the table. Returns whether it committed;
    /// `false` when it was aborted, so that its events go again. Errs when
    /// the session must end: the crash hook, an abort that failed, or a
    /// commit whose outcome is unknown (the next session settles those from
    /// the slot's checkpoint).
    async fn end_transaction(
        &self,
        eo: &crate::exactly_once::ExactlyOnce,
        acknowledged: bool,
        why: &str,
        outcome: &mut Outcome,
        sends: usize,
    ) -> Result<bool, TryError> {
        let mut commit = acknowledged;
        if commit && !outcome.failed.is_empty() {
            let failures = Outcome {
                failed: std::mem::take(&mut outcome.failed),
                ..Outcome::default()
            };
            // Only false when the relay stops: then abort.
            commit = self.recorder.writer.write(&failures).await;
        }
        let relay = self.relay;
        let ended = {
            let health = relay.health();
            let _awaiting = health.awaiting(sends);
            eo.end(relay.kafka(), commit, why).await
        };
        match ended {
            Ended::Committed if eo.crash_now() => Err(TryError::Halted),
            Ended::Committed => Ok(true),
            Ended::Aborted {
                reason,
                reinit: false,
            } => {
                debug!(reason = %reason, "Kafka transaction aborted; sending its events again");
                Ok(false)
            }
            Ended::Aborted { reason, .. } => Err(TryError::Kafka(format!(
                "the Kafka transaction was aborted, and its producer must be re-created: {reason}"
            ))),
            Ended::Unknown(reason) => Err(TryError::Kafka(format!(
                "the Kafka transaction's outcome is unknown ({reason}); the next reading \
                 settles it from the slot's checkpoint"
            ))),
        }
    }
}

/// Why one try of a batch could not settle it.
#[derive(Debug)]
enum TryError {
    /// The rows could not be looked up: the try is repeated.
    Database(sqlx::Error),
    /// Exactly-once: the Kafka transaction could not be run or its end is
    /// unknown. The reading session ends; the next one fences this
    /// producer and settles the batch from the slot's checkpoint.
    Kafka(String),
    /// The crash hook (tests): stop right after the Kafka commit, as if
    /// killed.
    Halted,
}

impl From<sqlx::Error> for TryError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// Looks `events`' rows up: the ids of those no longer pending, which are
/// not sent again. They were published (by an earlier reader of the slot
/// before a crash, or by a polling relay before a switch from poll to WAL:
/// their ids are remembered, `outbox_published_ids`) or moved to failed.
///
/// Only events committed before the session began can be such rows
/// ([`Session::frontier`]); later ones skip this query. A row neither
/// visible nor remembered is sent: the WAL can deliver a commit a moment
/// before it is visible, and recording the outcome waits for it
/// (`wal_outcome::delete_delivered`).
async fn look_up_gone(relay: &Relay, events: &[Event]) -> Result<HashSet<i64>, sqlx::Error> {
    let (ids, event_ids): (Vec<i64>, Vec<Uuid>) = events
        .iter()
        .filter_map(|e| match e.origin {
            Origin::Row(id) if e.malformed.is_none() => Some((id, e.row.event_id)),
            _ => None,
        })
        .unzip();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    sqlx::query_scalar(
        "SELECT e.id \
         FROM unnest($1::bigint[], $2::uuid[]) AS e(id, event_id) \
         LEFT JOIN outbox o ON o.id = e.id \
         WHERE o.status <> 'pending' OR (o.id IS NULL AND EXISTS \
               (SELECT 1 FROM outbox_published_ids p WHERE p.event_id = e.event_id))",
    )
    .bind(&ids)
    .bind(&event_ids)
    .fetch_all(&relay.pool)
    .await
    .map(|ids| ids.into_iter().collect())
}

/// The keys among `events` that have a failed event in the store, under
/// block-key (their later events wait behind it).
async fn blocked_keys(
    pool: &sqlx::PgPool,
    policy: PoisonPolicy,
    events: &[Event],
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    if policy != PoisonPolicy::BlockKey {
        return Ok(HashSet::new());
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = events
        .iter()
        .map(|e| (e.row.aggregate_type.as_str(), e.row.aggregate_id.as_str()))
        .unzip();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT o.aggregate_type, o.aggregate_id \
         FROM unnest($1::text[], $2::text[]) AS k(t, i) \
         JOIN outbox o ON o.status = 'failed' AND o.aggregate_type = k.t AND o.aggregate_id = k.i \
         WHERE EXISTS (SELECT 1 FROM outbox f WHERE f.status = 'failed')",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The `tracing` target of the per-batch timing lines, at debug: each
/// batch's size, the age of its first commit, its publish time and the wait
/// for its outcome's write; and each commit received late.
const TIMING: &str = "outbox_relay::wal::timing";

/// A commit received this long after it was made is logged at [`TIMING`].
const LATE_COMMIT_MS: f64 = 20.0;

/// Milliseconds from `t` until now.
fn ms_since(t: DateTime<Utc>) -> f64 {
    (Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1000.0
}

/// PostgreSQL's timestamps count microseconds from 2000-01-01.
fn pg_time(micros: i64) -> DateTime<Utc> {
    const PG_EPOCH: i64 = 946_684_800;
    Utc.timestamp_micros(PG_EPOCH * 1_000_000 + micros)
        .single()
        .unwrap_or_else(Utc::now)
}

fn empty_row() -> OutboxRow {
    OutboxRow {
        id: 0,
        event_id: Uuid::nil(),
        aggregate_type: "(malformed)".into(),
        aggregate_id: "(malformed)".into(),
        event_type: "(malformed)".into(),
        event_version: 1,
        topic: None,
        payload: None,
        payload_bytes: None,
        content_type: "application/octet-stream".into(),
        headers: "{}".into(),
        correlation_id: None,
        causation_id: None,
        traceparent: None,
        tracestate: None,
        source: None,
        occurred_at: Utc::now(),
        created_at: Utc::now(),
    }
}

/// An outbox row from an insert's values, by column name.
/// `None` for a row that is not a new event (its status is not pending).
fn from_row(columns: &[String], values: Vec<Value>) -> Option<Event> {
    let mut row = empty_row();
    let mut id = None;
    let mut skip = false;
    let mut problems = Vec::new();
    for (name, value) in columns.iter().zip(values) {
        let Value::Text(text) = value else { continue };
        let mut bad = |what: &str| problems.push(format!("{name}: {what}"));
        match name.as_str() {
            "id" => id = text.parse().map_err(|_| bad("not a number")).ok(),
            "event_id" => match text.parse() {
                Ok(v) => row.event_id = v,
                Err(_) => bad("not a uuid"),
            },
            "aggregate_type" => row.aggregate_type = text,
            "aggregate_id" => row.aggregate_id = text,
            "event_type" => row.event_type = text,
            "event_version" => match text.parse() {
                Ok(v) => row.event_version = v,
                Err(_) => bad("not a number"),
            },
            "topic" => row.topic = Some(text),
            "payload" => row.payload = Some(text),
            "payload_bytes" => match decode_hex(&text) {
                Some(b) => row.payload_bytes = Some(b),
                None => bad("not hex bytea"),
            },
            "content_type" => row.content_type = text,
            "headers" => row.headers = text,
            // Only producers' new rows are events: a row the relay itself
            // inserted as failed (a table-less event it could not publish)
            // comes back through the publication too.
            "status" if text != "pending" => {
                skip = true;
            }
            "correlation_id" => row.correlation_id = Some(text),
            "causation_id" => row.causation_id = Some(text),
            "traceparent" => row.traceparent = Some(text),
            "tracestate" => row.tracestate = Some(text),
            "source" => row.source = Some(text),
            "occurred_at" => match parse_pg_time(&text) {
                Some(t) => row.occurred_at = t,
                None => bad("not a timestamp"),
            },
            "created_at" => match parse_pg_time(&text) {
                Some(t) => row.created_at = t,
                None => bad("not a timestamp"),
            },
            _ => {}
        }
    }
    let malformed = match id {
        None => Some("the insert carries no id".to_string()),
        Some(_) if !problems.is_empty() => Some(format!("malformed row: {}", problems.join(", "))),
        Some(_) => None,
    };
    if skip {
        return None;
    }
    row.id = id.unwrap_or_default();
    Some(Event {
        origin: Origin::Row(row.id),
        row,
        malformed,
        in_kafka: false,
    })
}

/// `\x0a0b…` (bytea's hex output).
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `2026-11-30 10:40:56.918772+00` (ISO, as the session asks).
fn parse_pg_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The content of an `outbox_emit` message (docs/schema.md, V7).
#[derive(Deserialize)]
struct Emitted<'a> {
    v: u32,
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    event_version: i32,
    topic: Option<String>,
    payload: Option<String>,
    payload_bytes: Option<String>,
    content_type: String,
    #[serde(borrow)]
    headers: &'a serde_json::value::RawValue,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    source: Option<String>,
    occurred_at: DateTime<Utc>,
}

/// An event from an `outbox_emit` message; a malformed one keeps its
/// content as bytes, to be stored as failed.
fn from_message(content: &[u8], lsn: Lsn, at: DateTime<Utc>) -> Event {
    use base64::Engine as _;
    let parsed = serde_json::from_slice::<Emitted<'_>>(content)
        .map_err(|e| format!("not the outbox_emit format: {e}"))
        .and_then(|m| {
            if m.v != 1 {
                return Err(format!("format version {} is not known (1 is)", m.v));
            }
            let bytes = m
                .payload_bytes
                .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
                .transpose()
                .map_err(|e| format!("payload_bytes is not base64: {e}"))?;
            Ok(OutboxRow {
                id: 0,
                event_id: m.event_id,
                aggregate_type: m.aggregate_type,
                aggregate_id: m.aggregate_id,
                event_type: m.event_type,
                event_version: m.event_version,
                topic: m.topic,
                payload: m.payload,
                payload_bytes: bytes,
                content_type: m.content_type,
                headers: m.headers.get().to_string(),
                correlation_id: m.correlation_id,
                causation_id: m.causation_id,
                traceparent: m.traceparent,
                tracestate: m.tracestate,
                source: m.source,
                occurred_at: m.occurred_at,
                created_at: at,
            })
        });
    match parsed {
        Ok(row) => Event {
            row,
            origin: Origin::Message,
            malformed: None,
            in_kafka: false,
        },
        Err(why) => {
            let mut row = empty_row();
            row.event_id = Uuid::new_v4();
            row.aggregate_id = lsn.to_string();
            row.payload_bytes = Some(content.to_vec());
            Event {
                row,
                origin: Origin::Message,
                malformed: Some(format!("malformed outbox message at {lsn}: {why}")),
                in_kafka: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_in_the_session_format_parse() {
        assert_eq!(decode_hex("\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("\\x0"), None);
        assert_eq!(decode_hex("00"), None);
        let t = parse_pg_time("2026-11-30 10:40:56.918772+00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-30T10:40:56.918772+00:00");
        assert!(parse_pg_time("2026-11-30 10:40:56+05:30").is_some());
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
    }

    #[test]
    fn a_row_without_id_or_with_bad_values_is_malformed_not_a_panic() {
        let cols: Vec<String> = ["id", "event_id", "occurred_at"].map(String::from).to_vec();
        let e = from_row(
            &cols,
            vec![Value::Null, Value::Text("x".into()), Value::Null],
        )
        .unwrap();
        assert!(e.malformed.unwrap().contains("no id"));
        let e = from_row(
            &cols,
            vec![
                Value::Text("7".into()),
                Value::Text("not-a-uuid".into()),
                Value::Text("yesterday".into()),
            ],
        )
        .unwrap();
        let why = e.malformed.unwrap();
        assert!(
            why.contains("event_id") && why.contains("occurred_at"),
            "{why}"
        );
        assert!(matches!(e.origin, Origin::Row(7)));
        let cols: Vec<String> = ["id", "status"].map(String::from).to_vec();
        let failed = vec![Value::Text("8".into()), Value::Text("failed".into())];
        assert!(
            from_row(&cols, failed).is_none(),
            "the relay's own failed rows"
        );
    }

    #[test]
    fn a_malformed_message_keeps_its_bytes_for_the_failed_store() {
        let e = from_message(b"{not json", Lsn::from(42u64), Utc::now());
        assert!(e.malformed.unwrap().contains("not the outbox_emit format"));
        assert_eq!(e.row.payload_bytes.as_deref(), Some(&b"{not json"[..]));
        let e = from_message(br#"{"v": 2}"#, Lsn::from(42u64), Utc::now());
        assert!(e.malformed.is_some());
    }
}
