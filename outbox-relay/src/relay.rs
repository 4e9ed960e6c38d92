//! [`Relay`]: the publish loop.
//!
//! Several relays can run against one database. The outbox is split into key
//! partitions, each owned by at most one live relay at a time; the
//! [`crate::lease`] heartbeat shares them out and hands them over when a relay
//! joins, leaves or dies. A relay claims only rows of partitions it owns, and
//! every claim checks that ownership in the database (the *fence*, see
//! [`crate::claim::claim_sql`]), so per-key order holds across hand-overs.
//!
//! The loop, per batch (`Relay::relay_batch`):
//!
//! 1. `BEGIN`; claim the oldest pending rows of the owned partitions with one
//!    fenced `DELETE … RETURNING` (or `UPDATE … RETURNING` in mark mode), see
//!    [`crate::claim::claim`];
//! 2. build the records; rows that can never be sent (malformed, bad or
//!    missing topic) are set aside, and later rows of their key are held back
//!    (the decisions are in `batch.rs`);
//! 3. send all records pipelined; while their delivery reports come in,
//!    claim the next batch on the other connection (not sent yet), and in
//!    delete mode remember this batch's event ids in its own transaction
//!    ([`crate::claim::remember`]);
//! 4. all acknowledged: `COMMIT`, and the next batch becomes current.
//!    Otherwise `ROLLBACK` both, and record per row: acknowledged rows are
//!    deleted, permanent failures move to `failed`, transient ones stay
//!    pending with their attempt count, and the relay backs off.
//!
//! After a batch the loop claims again at once, until a claim comes back
//! empty. Then it sleeps until a `NOTIFY` from the outbox trigger, the poll
//! timer (the fallback), or a partition take-over. Producers notify only
//! while a relay sleeps: [`crate::wake`] explains the waiting flag.
//!
//! Why one file of ~600 lines: the loop, one batch's I/O (claim, publish,
//! commit or settle) and shutdown share the claim connections, the
//! prefetched claim and the shutdown deadline, and each step's failure
//! decides the loop's next one. The decisions that can be pure are in
//! `batch`, `health` and `wake`; splitting the I/O further would pass the
//! same state around.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use chrono::Utc;
use outbox_core::backoff::Backoff;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Postgres, Transaction,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    batch::{self, Batch, Fate},
    claim::{self, Claimant, InFlight, OutboxRow},
    config::{self, AfterPublish, ConfigError, RelayConfig},
    exactly_once::{Ended, ExactlyOnce},
    health::{self, Health, State},
    lease::{Leases, Ownership},
    publisher::{Outcome, Publisher, PublisherError, TopicState},
    record::{self, Record, TopicRouter},
    retry::back_off,
    sink::Sink,
    store, telemetry,
    upkeep::{self, Expired},
    wake::{self, WaitFlag, Wakeups},
};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Kafka producer could not be created (usually a bad
    /// `--kafka-property`); the source says why.
    #[error(transparent)]
    Publisher(#[from] PublisherError),
}

/// Why one batch did not complete.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {}", store::explain(.0))]
    Database(#[from] sqlx::Error),
    /// The broker's failure (the message carries no sink name: the
    /// relay prefixes [`Sink::name`]).
    #[error("{0}")]
    Broker(String),
    /// The crash hook fired (tests): stop at once, as if killed.
    #[error("halted by the crash hook")]
    Halted,
}

/// The relay. Build it with [`Relay::new`], run it with [`Relay::run`].
#[derive(Debug)]
pub struct Relay {
    pub(crate) cfg: RelayConfig,
    pub(crate) pool: PgPool,
    claim_pool: PgPool,
    pub(crate) sink: Arc<Sink>,
    router: TopicRouter,
    claim_sql: String,
    health: Arc<Health>,
    leases: Arc<Leases>,
    /// Exactly-once mode's state ([`RelayConfig::exactly_once`]).
    pub(crate) exactly_once: Option<ExactlyOnce>,
    /// When the lease failure now in force was last logged.
    idle_warned_at: std::sync::Mutex<Option<Instant>>,
}

/// Of the shutdown timeout, the batch in flight may use all but this much
/// (or a fifth of it, if less), which is left for handing the partitions
/// back and flushing the producer.
const SHUTDOWN_RESERVE: Duration = Duration::from_secs(1);

/// While the lease heartbeat keeps failing for the same reason (a schema
/// not yet migrated, say), the warning is repeated this often.
const IDLE_WARNING_EVERY: Duration = Duration::from_secs(30);

impl Relay {
    /// Validates `cfg` and creates the producer. Does not connect to the
    /// database yet: [`Relay::run`] does, and retries until it can.
    pub fn new(cfg: RelayConfig, connect: PgConnectOptions) -> Result<Self, RelayError> {
        cfg.validate()?;
        let relay_id = cfg
            .relay_id
            .clone()
            .unwrap_or_else(|| config::new_relay_id("relay"));
        let sink = Arc::new(Sink::new(&cfg, &relay_id)?);
        let connect = config::connect_options(connect, cfg.transaction_pooler);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect.clone());
        // Two claim connections: one batch in flight, the next one claimed.
        let claim_pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect);
        let exactly_once = cfg.exactly_once.then(|| ExactlyOnce::new(&cfg, &relay_id));
        let leases = Leases::new(
            pool.clone(),
            relay_id,
            cfg.lease_ttl,
            cfg.heartbeat_interval,
        );
        let leases = Arc::new(if cfg.exactly_once {
            leases.exactly_once()
        } else {
            leases
        });
        Ok(Self {
            claim_pool,
            router: TopicRouter::new(cfg.topic_template.clone()),
            claim_sql: claim::claim_sql(cfg.after_publish, cfg.poison_policy),
            cfg,
            pool,
            health: Arc::new(Health::naming(sink.reach(), sink.name())),
            sink,
            leases,
            exactly_once,
            idle_warned_at: std::sync::Mutex::new(None),
        })
    }

    /// The Kafka producer, in exactly-once mode (which
    /// [`RelayConfig::validate`] allows only with Kafka).
    pub(crate) fn kafka(&self) -> &Publisher {
        self.sink
            .kafka()
            .expect("exactly-once runs on Kafka only (RelayConfig::validate)")
    }

    /// The health state, for `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs the relay on a task of its own: [`RelayHandle::stop`] shuts it
    /// down (as [`Relay::run`] does on cancellation) and waits for it.
    pub fn start(self) -> RelayHandle {
        let health = self.health();
        let relay_id = self.relay_id().to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        RelayHandle {
            health,
            relay_id,
            shutdown,
            task,
        }
    }

    /// This relay's id (its row in `outbox_relays`, the owner of its
    /// partitions).
    pub fn relay_id(&self) -> &str {
        self.leases.relay_id()
    }

    /// Runs until `shutdown` is cancelled. Then, all within
    /// [`RelayConfig::shutdown_timeout`] of the cancellation: stops claiming,
    /// lets the batch in flight finish (else rolls it back: its rows stay
    /// pending), hands its partitions back, flushes the producer and
    /// returns. Whatever is left when the time is up is abandoned: other
    /// relays take the partitions over when the lease runs out.
    pub async fn run(self, shutdown: CancellationToken) {
        self.sink.start();
        if let Some(wal) = self.cfg.wal.clone() {
            return self.run_wal(&wal, shutdown).await;
        }
        let wake = Arc::new(Notify::new());
        let background = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        let listening = Arc::new(AtomicBool::new(false));
        if self.cfg.listen && !self.cfg.transaction_pooler {
            tasks.spawn(wake::listen(
                self.pool.clone(),
                self.cfg.channel.clone(),
                wake.clone(),
                listening.clone(),
                self.health.clone(),
                background.clone(),
            ));
        }
        tasks.spawn(self.leases.clone().run(wake.clone(), background.clone()));
        tasks.spawn(crate::delay::run(
            self.pool.clone(),
            self.cfg.delayed_check_interval,
            Some(wake.clone()),
            background.clone(),
        ));
        tasks.spawn(upkeep::report_stats(
            self.pool.clone(),
            self.leases.clone(),
            self.cfg.stats_interval,
            background.clone(),
        ));
        let expired = match self.cfg.after_publish {
            AfterPublish::Mark { retention } => Some(Expired::Rows(retention)),
            _ if self.cfg.remembers_published() => Some(Expired::Ids(self.cfg.remember_published)),
            _ => None,
        };
        if let Some(expired) = expired {
            tasks.spawn(upkeep::clean_up(
                self.pool.clone(),
                expired,
                background.clone(),
            ));
        }
        info!(relay.id = %self.relay_id(), "relay started; waiting for its share of the partitions");

        let (deadline, halted) = self.publish(wake, listening, &shutdown).await;
        if halted {
            // The crash hook (tests): stop as if killed, keeping the lease.
            background.cancel();
            self.health.set(State::Stopping, "halted by the crash hook");
            return;
        }

        self.health.set(State::Stopping, "shutting down");
        background.cancel();
        let owes = self.exactly_once.as_ref().is_some_and(ExactlyOnce::owes);
        let hand_back = async {
            while tasks.join_next().await.is_some() {}
            // Closing the claim connections ends any claim still open, so the
            // release below never waits on this relay's own locks.
            self.claim_pool.close().await;
            if owes {
                warn!(
                    "a Kafka transaction of this relay is not settled in the database; its \
                       partitions are not handed back: the relay that takes them over when the \
                       lease runs out fences this one and finishes its checkpoint"
                );
                return;
            }
            match self.leases.release_all().await {
                Ok(n) => info!(partitions = n, "partitions handed back"),
                Err(e) => warn!(error = %e, "could not hand the partitions back; \
                                            other relays take them over when this relay's lease runs out"),
            }
        };
        if tokio::time::timeout_at(deadline, hand_back).await.is_err() {
            warn!(
                "the shutdown timeout ran out before the partitions were handed back; \
                   other relays take them over when this relay's lease runs out"
            );
        }
        self.flush_and_close(deadline).await;
    }

    /// The end of a shutdown: flushes the producer and closes the pool, by
    /// `deadline`.
    async fn flush_and_close(&self, deadline: tokio::time::Instant) {
        let sink = self.sink.clone();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::task::spawn_blocking(move || sink.flush(left)).await {
            Ok(Ok(())) => info!("producer flushed"),
            Ok(Err(e)) => warn!(error = %e, "producer flush incomplete"),
            Err(e) => warn!(error = %e, "producer flush task failed"),
        }
        let _ = tokio::time::timeout_at(deadline, self.pool.close()).await;
    }

    /// [`Relay::run`] with a WAL source (`wal.rs`): no claims and no
    /// partitions; one relay reads the slot, the others stand by.
    async fn run_wal(self, wal: &crate::WalSource, shutdown: CancellationToken) {
        let background = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        if self.cfg.remembers_published() {
            tasks.spawn(upkeep::clean_up(
                self.pool.clone(),
                Expired::Ids(self.cfg.remember_published),
                background.clone(),
            ));
        }
        tasks.spawn(crate::delay::run(
            self.pool.clone(),
            self.cfg.delayed_check_interval,
            None,
            background.clone(),
        ));
        tasks.spawn(crate::wal::watch_slot(
            self.pool.clone(),
            wal.clone(),
            background.clone(),
        ));
        info!(relay.id = %self.relay_id(), slot = %wal.slot, "relay started (WAL source)");
        let reading = crate::wal::run(&self, wal, &shutdown);
        tokio::pin!(reading);
        let stopped = tokio::select! {
            () = &mut reading => true,
            () = shutdown.cancelled() => false,
        };
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown_timeout;
        self.health.set(State::Stopping, "shutting down");
        if !stopped && tokio::time::timeout_at(deadline, reading).await.is_err() {
            warn!(
                "the shutdown timeout ran out before the batch in flight was settled; \
                   its events are read from the slot again"
            );
        }
        background.cancel();
        while tasks.join_next().await.is_some() {}
        self.flush_and_close(deadline).await;
    }

    /// Claims and publishes batches of the owned partitions until shutdown.
    ///
    /// While `listening` (the LISTEN connection works), the relay claims
    /// again right after every batch until a claim comes back empty, and
    /// only then raises its waiting flag and sleeps (see [`crate::wake`]).
    /// Otherwise it sleeps for the poll interval after every batch that was
    /// not full.
    ///
    /// Returns when `shutdown` fires, with the moment the whole shutdown
    /// must be over by ([`RelayConfig::shutdown_timeout`] after it fired),
    /// and whether the crash hook halted it.
    async fn publish(
        &self,
        wake: Arc<Notify>,
        listening: Arc<AtomicBool>,
        shutdown: &CancellationToken,
    ) -> (tokio::time::Instant, bool) {
        let stop_by = || tokio::time::Instant::now() + self.cfg.shutdown_timeout;
        let mut backoff = Backoff::new(self.cfg.min_backoff, self.cfg.max_backoff);
        let mut broker_failures = 0u32;
        let mut prefetched: Option<Claim> = None;
        let mut wakeups = Wakeups::new(
            WaitFlag::new(self.pool.clone(), self.relay_id().to_string()),
            wake,
            listening,
            self.cfg.poll_interval,
        );
        loop {
            if shutdown.is_cancelled() {
                let deadline = stop_by();
                if let Some(next) = prefetched.take() {
                    let _ = tokio::time::timeout_at(deadline, next.tx.rollback()).await;
                }
                return (deadline, false);
            }
            if let Some(eo) = &self.exactly_once {
                // What a failed batch left half done, and partitions taken
                // from dead relays, come before any new claim.
                // Partitions taken from dead relays first: their fence must
                // not wait on this relay's own reading of the checkpoints,
                // which waits for every open transaction to end.
                let paid = match eo.recover_taken(&self.pool, &self.cfg, &self.leases).await {
                    Ok(()) => {
                        eo.pay(self.kafka(), &self.pool, &self.cfg, &self.leases)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = paid {
                    if let Some(next) = prefetched.take() {
                        let _ = next.tx.rollback().await;
                    }
                    self.degraded(e);
                    back_off(&mut backoff, shutdown).await;
                    continue;
                }
            }
            let current = match prefetched.take() {
                Some(c) => c,
                None => {
                    let own = self.leases.ownership();
                    if own.claimable() == 0 {
                        self.idle(&own);
                        wakeups.idle(shutdown).await;
                        continue;
                    }
                    match self.claim(InFlight::none()).await {
                        Ok(c) => {
                            // After a failure, only a batch that goes
                            // through makes the relay active again.
                            if self.health.phase() != State::Degraded {
                                self.active(&own);
                            }
                            c
                        }
                        Err(e) => {
                            self.degraded(self.explain(e).await);
                            back_off(&mut backoff, shutdown).await;
                            continue;
                        }
                    }
                }
            };
            let claimed = current.rows.len();
            let ticket = current.ticket;
            let batch = self.relay_batch(current);
            tokio::pin!(batch);
            let result = tokio::select! {
                r = &mut batch => r,
                _ = shutdown.cancelled() => {
                    let deadline = stop_by();
                    self.health.set(State::Stopping, "shutting down; finishing the batch in flight");
                    // The batch may take the time the rest of the shutdown
                    // (hand back, flush) does not need.
                    let batch_by = deadline - (self.cfg.shutdown_timeout / 5).min(SHUTDOWN_RESERVE);
                    match tokio::time::timeout_at(batch_by, &mut batch).await {
                        Ok(Ok(Some(next))) => {
                            let _ = tokio::time::timeout_at(deadline, next.tx.rollback()).await;
                            return (deadline, false);
                        }
                        Ok(Err(BatchError::Halted)) => return (deadline, true),
                        Ok(_) => return (deadline, false),
                        Err(_) => {
                            warn!("the batch in flight did not finish within the shutdown timeout; \
                                   it was rolled back and its rows stay pending");
                            return (deadline, false); // dropping the claim rolls it back
                        }
                    }
                }
            };
            if !self.exactly_once.as_ref().is_some_and(ExactlyOnce::owes) {
                self.leases.gate().settle(ticket);
            }
            match result {
                Ok(next) => {
                    broker_failures = 0;
                    self.active(&self.leases.ownership());
                    backoff.reset();
                    prefetched = next;
                    let more = prefetched.is_some() || claimed == self.cfg.batch_size;
                    wakeups.after_batch(claimed, more, shutdown).await;
                }
                Err(e @ BatchError::Database(_)) => {
                    self.degraded(self.explain(e).await);
                    back_off(&mut backoff, shutdown).await;
                }
                Err(BatchError::Broker(e)) => {
                    self.degraded(format!("{}: {e}", self.sink.name()));
                    broker_failures += 1;
                    self.replace_producer_if_fatal(broker_failures);
                    back_off(&mut backoff, shutdown).await;
                }
                Err(BatchError::Halted) => return (tokio::time::Instant::now(), true),
            }
        }
    }

    /// Owns nothing to claim from: starting (no lease yet), on standby
    /// (other relays own every partition), or degraded if the lease
    /// heartbeat itself fails.
    fn idle(&self, own: &Ownership) {
        if let Some(e) = &own.last_error {
            let mut warned = self
                .idle_warned_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let again = warned.is_some_and(|at| at.elapsed() >= IDLE_WARNING_EVERY);
            if self.health.phase_reason() != *e || again {
                warn!(reason = %e, "no partitions: the lease heartbeat fails");
                *warned = Some(Instant::now());
            }
            self.health.set(State::Degraded, e.clone());
            return;
        }
        let (state, reason) = health::idle_phase(own.partitions, own.owned.len(), own.live_relays);
        if self.health.phase() != state || self.health.phase_reason() != reason {
            if state == State::Standby {
                info!(live_relays = own.live_relays, "on standby: {reason}");
            }
            self.health.set(state, reason);
        }
    }

    /// Owns partitions and can claim from them.
    fn active(&self, own: &Ownership) {
        let reason = health::active_reason(own.owned.len(), own.partitions);
        if self.health.phase() != State::Active || self.health.phase_reason() != reason {
            if self.health.phase() != State::Active {
                info!(
                    owned = own.owned.len(),
                    partitions = own.partitions,
                    "publishing"
                );
            }
            self.health.set(State::Active, reason);
        }
    }

    /// Replaces the producer only when it has a fatal error: such a producer
    /// can never send again. Any other failed batch keeps it: every record
    /// of the batch has had its delivery report by then (the wait is
    /// `message.timeout.ms`), nothing stays queued, and librdkafka resumes an
    /// idempotent producer after timeouts by bumping its epoch, which Apache
    /// Kafka accepts (KIP-360).
    fn replace_producer_if_fatal(&self, consecutive_failures: u32) {
        let Some(publisher) = self.sink.kafka() else {
            return;
        };
        let Some(fatal) = publisher.fatal_error() else {
            return;
        };
        if let Some(eo) = &self.exactly_once {
            // A transactional producer is re-created and initialized before
            // the next claim, with its checkpoint read back.
            warn!(%fatal, consecutive_failures, "the transactional producer has a fatal error; re-creating it");
            eo.owe(&[], true, 0);
            return;
        }
        match publisher.rebuild() {
            Ok(()) => {
                warn!(%fatal, consecutive_failures, "replaced the Kafka producer after a fatal error")
            }
            Err(e) => {
                let cause = std::error::Error::source(&e).map(ToString::to_string);
                error!(error = %e, cause, %fatal, "could not replace the Kafka producer after a fatal error")
            }
        }
    }

    /// A batch's failure in words, and for a database connection that could
    /// not be opened, why (refused, or no answer).
    async fn explain(&self, e: BatchError) -> String {
        match e {
            BatchError::Database(e) => {
                let opts = self.pool.connect_options();
                let why = store::explain_connect(&e, opts.get_host(), opts.get_port()).await;
                format!("database: {why}")
            }
            BatchError::Broker(e) => format!("{}: {e}", self.sink.name()),
            BatchError::Halted => "halted by the crash hook".into(),
        }
    }

    pub(crate) fn degraded(&self, reason: String) {
        warn!(reason = %reason, "relay degraded; retrying with backoff");
        self.health.set(State::Degraded, reason);
    }

    /// Opens a claim transaction and claims the oldest pending rows of the
    /// partitions this relay owns, fenced in the database, see [`claim::claim`].
    /// The claim's release-gate ticket is taken before the ownership is read
    /// (see `lease::ReleaseGate`).
    async fn claim(&self, in_flight: InFlight) -> Result<Claim, BatchError> {
        let ticket = self.leases.gate().ticket();
        let own = self.leases.ownership();
        let mut tx = self.claim_pool.begin_with(claim::BEGIN).await?;
        let who = Claimant {
            relay_id: self.leases.relay_id(),
            partitions: own.partitions,
            exclude: own.excluded(),
            synchronous_commit: self.cfg.synchronous_commit,
            prepared: !self.cfg.transaction_pooler,
            in_flight,
        };
        // Roll back explicitly on error: a dropped transaction only queues
        // its rollback, and would keep the partition locks a take-over waits for.
        match claim::claim(&mut tx, &self.claim_sql, self.cfg.batch_size, &who).await {
            Ok(rows) => Ok(Claim { tx, rows, ticket }),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e.into())
            }
        }
    }

    /// Publishes and settles one claimed batch (the decisions are
    /// [`Batch`]'s). While its delivery reports are awaited, the next batch
    /// is claimed on another connection (only if this one was full); it is
    /// returned, unsent, when this batch committed, and rolled back
    /// otherwise, so no row ever overtakes an earlier row of its key.
    #[tracing::instrument(name = "relay_batch", skip_all, fields(batch.size = current.rows.len()))]
    async fn relay_batch(&self, current: Claim) -> Result<Option<Claim>, BatchError> {
        let started = Instant::now();
        let Claim {
            mut tx,
            mut rows,
            ticket,
        } = current;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        let (prepared, topics) = self.prepare(&mut rows).await;
        let (batch, mut records) = Batch::plan(rows, prepared, self.cfg.poison_policy);

        // Overlap the next claim only if this batch was full (else the
        // backlog is drained) and its ids are close enough to leave out.
        let in_flight = if batch.rows().len() == self.cfg.batch_size {
            InFlight::of(&batch.rows().iter().map(|r| r.id).collect::<Vec<_>>())
        } else {
            None
        };
        let sent = batch.sent();
        // Exactly-once: the sends go in a Kafka transaction, with the
        // checkpoint of the sent ids as one more record (exactly_once.rs).
        let txn = self.exactly_once.as_ref().filter(|_| sent > 0);
        let sent_ids = if txn.is_some() {
            batch.sent_ids()
        } else {
            Vec::new()
        };
        // From the transaction's begin to its end, the batch waits on the
        // broker: on its leaders for the sends and, in exactly-once mode, on
        // its transaction coordinator too. A stall anywhere there counts for
        // readiness.
        let mut awaiting = (sent > 0).then(|| self.health.awaiting(sent));
        if let Some(eo) = txn {
            if let Err(e) = eo.begin(self.kafka()).await {
                let _ = tx.rollback().await;
                eo.owe(&[], true, ticket);
                return Err(BatchError::Broker(format!(
                    "cannot begin a Kafka transaction: {e}"
                )));
            }
            records.push(Some(eo.checkpoint_record(&sent_ids)));
        }
        // In delete mode the batch's ids are remembered (V5) in its own
        // transaction while its records are in flight: off the claim's path.
        let remember = (sent > 0 && self.cfg.remembers_published())
            .then(|| batch.rows().iter().map(|r| r.event_id).collect::<Vec<_>>());
        let remembering = async {
            match &remember {
                Some(ids) => claim::remember(&mut tx, ids, !self.cfg.transaction_pooler).await,
                None => Ok(()),
            }
        };
        let (mut outcomes, next, remembered) = match (sent > 0, in_flight) {
            (true, Some(in_flight)) => {
                let (outcomes, next, remembered) = tokio::join!(
                    self.sink.publish(records),
                    self.claim(in_flight),
                    remembering
                );
                // A failed prefetch is not this batch's problem; the next
                // claim will meet the error again.
                (outcomes, next.ok(), remembered)
            }
            (true, None) => {
                let (outcomes, remembered) = tokio::join!(self.sink.publish(records), remembering);
                (outcomes, None, remembered)
            }
            (false, _) => (Vec::new(), None, remembering.await),
        };
        let checkpoint = if txn.is_some() {
            outcomes.pop().flatten()
        } else {
            None
        };
        let mut fates = batch.settle(&outcomes);
        let mut committed_in_kafka = false;
        let mut aborted: Option<String> = None;
        if let Some(eo) = txn {
            let commit = remembered.is_ok()
                && batch.all_sent_delivered(&fates)
                && checkpoint == Some(Outcome::Delivered);
            let why = match &remembered {
                Err(e) => format!("the batch's ids could not be remembered: {e}"),
                Ok(()) => crate::exactly_once::abort_reason(checkpoint.as_ref()),
            };
            let ended = eo.end(self.kafka(), commit, &why).await;
            drop(awaiting.take());
            match ended {
                Ended::Committed => {
                    committed_in_kafka = true;
                    if eo.crash_now() {
                        if let Some(next) = next {
                            let _ = next.tx.rollback().await;
                        }
                        let _ = tx.rollback().await;
                        return Err(BatchError::Halted);
                    }
                }
                Ended::Aborted { reason, reinit } => {
                    if reinit {
                        eo.owe(&[], true, ticket);
                    }
                    fates = batch::aborted(fates);
                    aborted = Some(reason);
                }
                Ended::Unknown(reason) => {
                    eo.owe(&[], true, ticket);
                    if let Some(next) = next {
                        let _ = next.tx.rollback().await;
                    }
                    let _ = tx.rollback().await;
                    return Err(BatchError::Broker(format!(
                        "the Kafka transaction's outcome is unknown ({reason}); it is settled \
                         from the checkpoint before the next claim"
                    )));
                }
            }
        }
        drop(awaiting);
        // Committed in Kafka, not yet in the database: owed until finished.
        let owe_sent = |what: &str| {
            if let (true, Some(eo)) = (committed_in_kafka, txn) {
                warn!(rows = sent_ids.len(), "{what} after the Kafka commit failed; \
                      the rows are finished from the checkpoint before the next claim (not sent again)");
                eo.owe(&sent_ids, false, ticket);
            }
        };

        if let Err(e) = remembered {
            // The claim cannot commit without its ids. (Ids are remembered
            // only for a batch with records sent; in exactly-once mode the
            // Kafka transaction was aborted above, and said so.)
            if aborted.is_none() {
                error!(error = %e, rows = fates.len(),
                       "remembering the batch's ids failed; the claim is rolled back and the batch \
                        will be published again (duplicates)");
            }
            if let Some(next) = next {
                let _ = next.tx.rollback().await;
            }
            let _ = tx.rollback().await;
            return Err(e.into());
        }
        if batch::all_delivered(&fates) {
            if let Err(e) = tx.commit().await {
                if committed_in_kafka {
                    owe_sent("the database commit");
                } else {
                    error!(error = %e, rows = fates.len(),
                           "commit after publishing failed; the batch will be published again (duplicates)");
                }
                if let Some(next) = next {
                    let _ = next.tx.rollback().await;
                }
                return Err(e.into());
            }
            note_delivered(batch.rows(), &fates, started);
            return Ok(next);
        }

        // Something was not acknowledged: the prefetched batch may hold later
        // rows of an affected key, so it goes back unsent.
        if let Some(next) = next {
            if let Err(e) = next.tx.rollback().await {
                owe_sent("rolling back the claim");
                return Err(e.into());
            }
        }
        if let Err(e) = tx.rollback().await {
            owe_sent("rolling back the claim");
            return Err(e.into());
        }
        for (row, fate) in batch.rows().iter().zip(&fates) {
            if let Fate::Failed(reason) = fate {
                warn!(event.id = %row.event_id, correlation.id = row.correlation_id.as_deref(),
                      row.id = row.id, reason = %reason, "outbox row failed permanently; moved to failed");
            }
        }
        let res = batch.resolution(&fates);
        let resolved = async {
            let mut conn = self.claim_pool.acquire().await?;
            claim::resolve(
                &mut conn,
                self.cfg.after_publish,
                self.cfg.remembers_published(),
                &res,
            )
            .await
        };
        if let Err(e) = resolved.await {
            owe_sent("recording the batch's outcome");
            return Err(e.into());
        }
        note_delivered(batch.rows(), &fates, started);
        telemetry::publish_errors("permanent", res.failed.len() as u64);
        telemetry::publish_errors("transient", res.retry.len() as u64);
        if let Some((_, reason)) = res.retry.first() {
            for (topic, state) in &topics {
                if *state == TopicState::Exists {
                    self.sink.forget_topic(topic);
                }
            }
            return Err(BatchError::Broker(format!(
                "{} rows not acknowledged: {reason}",
                res.retry.len()
            )));
        }
        if let Some(reason) = aborted {
            if res.failed.is_empty() {
                // Nothing moved: back off before sending the rows again.
                return Err(BatchError::Broker(format!(
                    "the Kafka transaction was aborted: {reason}"
                )));
            }
        }
        Ok(None)
    }

    /// Builds each row's record and looks up its topic (cached): the record
    /// to send, or the outcome that stops it. Also returns the topics' states.
    /// The payloads move into the records.
    pub(crate) async fn prepare(
        &self,
        rows: &mut [OutboxRow],
    ) -> (Vec<Result<Record, Outcome>>, HashMap<String, TopicState>) {
        let mut topics: HashMap<String, TopicState> = HashMap::new();
        let mut prepared = Vec::with_capacity(rows.len());
        for row in rows {
            let rec = match record::build(row, &self.router, &self.cfg.default_source) {
                Ok(rec) => rec,
                Err(reason) => {
                    prepared.push(Err(Outcome::Permanent(format!("malformed row: {reason}"))));
                    continue;
                }
            };
            let state = match topics.get(&rec.topic) {
                Some(s) => s.clone(),
                None => {
                    let s = self.sink.topic_state(&rec.topic).await;
                    topics.insert(rec.topic.clone(), s.clone());
                    s
                }
            };
            prepared.push(match state {
                TopicState::Exists => Ok(rec),
                TopicState::Missing => Err(Outcome::Permanent(format!(
                    "topic {:?} does not exist; create it (the relay never creates topics), \
                     then run `outbox-relay failed retry`",
                    rec.topic
                ))),
                TopicState::Unknown(e) => Err(Outcome::Transient(format!(
                    "cannot read topic metadata: {e}"
                ))),
            });
        }
        (prepared, topics)
    }
}

/// Counts and logs the delivered rows of a settled batch.
pub(crate) fn note_delivered(rows: &[OutboxRow], fates: &[Fate<'_>], started: Instant) {
    let now = Utc::now();
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for (row, fate) in rows.iter().zip(fates) {
        if let Fate::Delivered { topic } = fate {
            telemetry::commit_to_ack((now - row.created_at).as_seconds_f64());
            *per_topic.entry(topic).or_default() += 1;
            debug!(event.id = %row.event_id, correlation.id = row.correlation_id.as_deref(),
                   event.r#type = %row.event_type, "published");
        }
    }
    for (topic, n) in per_topic {
        telemetry::published(topic, n);
    }
    telemetry::batch(rows.len(), started.elapsed());
}

/// A relay running on its own task, from [`Relay::start`].
#[derive(Debug)]
pub struct RelayHandle {
    health: Arc<Health>,
    relay_id: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// The relay's health, as `/readyz` reports it.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// The relay's id.
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// Shuts the relay down and waits for it: the shutdown takes at most
    /// [`RelayConfig::shutdown_timeout`]. Errs only if the relay's task
    /// panicked.
    pub async fn stop(self) -> Result<(), tokio::task::JoinError> {
        self.shutdown.cancel();
        self.task.await
    }
}

/// An open claim transaction and the rows it claimed.
struct Claim {
    tx: Transaction<'static, Postgres>,
    rows: Vec<OutboxRow>,
    /// Its release-gate ticket (see `lease::ReleaseGate`).
    ticket: u64,
}
