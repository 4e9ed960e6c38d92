//! [`Relay`]: the publish loop.
//!
//! One relay at a time claims rows: the *leader* holds a PostgreSQL advisory
//! lock ([`LEADER_LOCK_KEY`]) on a dedicated connection. Claims run in
//! transactions on two other connections and are *fenced*: each first takes
//! [`CLAIM_LOCK_KEY`] in shared mode and checks that the leader connection
//! still holds the leader lock ([`crate::store::fence`]). A new leader waits
//! once for [`CLAIM_LOCK_KEY`] exclusively, so the previous leader's claims
//! have all ended before it claims. Other relays wait on standby.
//!
//! The loop, per batch (`Relay::relay_batch`):
//!
//! 1. `BEGIN`; fence; claim the oldest pending rows with one
//!    `DELETE … RETURNING` (or `UPDATE … RETURNING` in mark mode), see
//!    [`crate::store::claim`];
//! 2. build the records; rows that can never be sent (malformed, bad or
//!    missing topic) are set aside, and later rows of their key are held back;
//! 3. send all records pipelined; while their delivery reports come in,
//!    claim the next batch on the other connection (not sent yet);
//! 4. all acknowledged: `COMMIT`, and the next batch becomes current.
//!    Otherwise `ROLLBACK` both, and record per row: acknowledged rows are
//!    deleted, permanent failures move to `failed`, transient ones stay
//!    pending with their attempt count, and the relay backs off.
//!
//! The loop wakes on `NOTIFY` from the outbox trigger, on a poll timer as a
//! fallback, and at once after a full batch.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use sqlx::{
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
    Connection, PgConnection, PgPool, Postgres, Transaction,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    config::{AfterPublish, ConfigError, PoisonPolicy, RelayConfig},
    health::{Health, State},
    publisher::{Outcome, Publisher, PublisherError, TopicState},
    record::{self, Record, TopicRouter},
    store::{self, Resolution},
    telemetry,
};

/// The advisory lock that makes one relay the leader ("outbox" in ASCII).
pub const LEADER_LOCK_KEY: i64 = 0x6f75_7462_6f78;

/// Held in shared mode by every claim transaction; a new leader takes it
/// exclusively once, to wait until the previous leader's claims ended.
pub const CLAIM_LOCK_KEY: i64 = 0x6f75_7462_6f79;

/// After this many consecutive failed batches the producer is replaced.
const REBUILD_AFTER_FAILURES: u32 = 3;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Kafka producer could not be created (usually a bad
    /// `--kafka-property`).
    #[error(transparent)]
    Publisher(#[from] PublisherError),
}

/// Why one batch did not complete.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Broker(String),
    /// Leadership was lost or could not be taken over; compete again.
    #[error("leadership: {0}")]
    Leadership(String),
}

/// The relay. Build it with [`Relay::new`], run it with [`Relay::run`].
#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    connect: PgConnectOptions,
    pool: PgPool,
    claim_pool: PgPool,
    publisher: Arc<Publisher>,
    router: TopicRouter,
    claim_sql: String,
    health: Arc<Health>,
}

impl Relay {
    /// Validates `cfg` and creates the producer. Does not connect to the
    /// database yet: [`Relay::run`] does, and retries until it can.
    pub fn new(cfg: RelayConfig, connect: PgConnectOptions) -> Result<Self, RelayError> {
        cfg.validate()?;
        let publisher = Arc::new(Publisher::new(&cfg)?);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect.clone());
        // Two claim connections: one batch in flight, the next one claimed.
        let claim_pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect.clone());
        Ok(Self {
            claim_pool,
            router: TopicRouter::new(cfg.topic_template.clone()),
            claim_sql: store::claim_sql(cfg.after_publish, cfg.poison_policy),
            cfg,
            connect,
            pool,
            publisher,
            health: Arc::new(Health::default()),
        })
    }

    /// The health state, for `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` is cancelled. Then stops claiming, lets the
    /// batch in flight finish for up to [`RelayConfig::shutdown_timeout`]
    /// (else rolls it back: its rows stay pending), flushes the producer and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let background = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        if self.cfg.listen {
            tasks.spawn(listen(
                self.pool.clone(),
                self.cfg.channel.clone(),
                wake.clone(),
                background.clone(),
            ));
        }
        tasks.spawn(report_stats(
            self.pool.clone(),
            self.cfg.stats_interval,
            background.clone(),
        ));
        if let AfterPublish::Mark { retention } = self.cfg.after_publish {
            tasks.spawn(clean_published(
                self.pool.clone(),
                retention,
                background.clone(),
            ));
        }

        self.lead(&wake, &shutdown).await;

        self.health.set(State::Stopping, "shutting down");
        background.cancel();
        while tasks.join_next().await.is_some() {}
        let publisher = self.publisher.clone();
        let timeout = self.cfg.shutdown_timeout;
        match tokio::task::spawn_blocking(move || publisher.flush(timeout)).await {
            Ok(Ok(())) => info!("producer flushed"),
            Ok(Err(e)) => warn!(error = %e, "producer flush incomplete"),
            Err(e) => warn!(error = %e, "producer flush task failed"),
        }
        self.pool.close().await;
        self.claim_pool.close().await;
    }

    /// Connects, becomes leader, and runs batches until shutdown.
    /// Connects, becomes leader, and runs batches until shutdown.
    async fn lead(&self, wake: &Notify, shutdown: &CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.min_backoff, self.cfg.max_backoff);
        while !shutdown.is_cancelled() {
            let leader = match self.become_leader(shutdown).await {
                Ok(Some(l)) => l,
                Ok(None) => return, // shutdown while on standby
                Err(e) => {
                    self.degraded(e.to_string());
                    backoff.sleep(shutdown).await;
                    continue;
                }
            };
            info!("claim lock acquired; publishing");
            self.health.set(State::Active, "active");
            backoff.reset();
            let result = self
                .publish_while_leader(&leader, wake, shutdown, &mut backoff)
                .await;
            let _ = leader.conn.close().await; // releases the leader lock
            match result {
                Ok(()) => return, // shutdown
                Err(e) => {
                    self.degraded(e.to_string());
                    backoff.sleep(shutdown).await;
                }
            }
        }
    }

    /// Waits (on standby) for the leader lock, then for every claim of a
    /// previous leader to end. `None` if shutdown came first.
    async fn become_leader(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leader>, BatchError> {
        let mut conn = PgConnection::connect_with(&self.connect).await?;
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK_KEY)
                .fetch_one(&mut conn)
                .await?;
            if locked {
                break;
            }
            if self.health.state() != State::Standby {
                info!("another relay holds the claim lock; waiting on standby");
            }
            self.health
                .set(State::Standby, "standby: another relay is the leader");
            if sleep_or_cancel(self.cfg.poll_interval, shutdown).await {
                return Ok(None);
            }
        }
        // Fencing barrier: a previous leader's claims hold CLAIM_LOCK_KEY in
        // shared mode until they commit or roll back. Taking it exclusively
        // once waits for all of them; later ones fail their leader check.
        let barrier = sqlx::query("SELECT pg_advisory_lock($1), pg_advisory_unlock($1)")
            .bind(CLAIM_LOCK_KEY)
            .execute(&mut conn);
        // The previous leader's claims end within its publish timeout; give
        // up (and retry later, dropping this connection) if they do not.
        let bound = self.cfg.publish_timeout * 2 + Duration::from_secs(10);
        match tokio::time::timeout(bound, barrier).await {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                return Err(BatchError::Leadership(format!(
                    "claims of the previous leader did not end within {bound:?}"
                )))
            }
        }
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        Ok(Some(Leader { conn, pid }))
    }

    /// Claims and publishes batches until shutdown (`Ok`) or a database
    /// error, including losing the leader lock (`Err`).
    async fn publish_while_leader(
        &self,
        leader: &Leader,
        wake: &Notify,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), BatchError> {
        let mut broker_failures = 0u32;
        let mut prefetched: Option<Claim> = None;
        loop {
            if shutdown.is_cancelled() {
                if let Some(next) = prefetched.take() {
                    let _ = next.tx.rollback().await;
                }
                return Ok(());
            }
            let current = match prefetched.take() {
                Some(c) => c,
                None => self.claim(leader.pid).await?,
            };
            let claimed = current.rows.len();
            let batch = self.relay_batch(current, leader.pid);
            tokio::pin!(batch);
            let result = tokio::select! {
                r = &mut batch => r,
                _ = shutdown.cancelled() => match tokio::time::timeout(self.cfg.shutdown_timeout, &mut batch).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!("the batch in flight did not finish within the shutdown timeout; \
                               it was rolled back and its rows stay pending");
                        return Ok(()); // dropping the claim rolls it back
                    }
                },
            };
            match result {
                Ok(next) => {
                    broker_failures = 0;
                    if self.health.state() != State::Active {
                        info!("recovered; publishing again");
                        self.health.set(State::Active, "active");
                    }
                    backoff.reset();
                    prefetched = next;
                    if prefetched.is_none() && claimed < self.cfg.batch_size {
                        tokio::select! {
                            _ = wake.notified() => {}
                            _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                Err(e @ (BatchError::Database(_) | BatchError::Leadership(_))) => return Err(e),
                Err(BatchError::Broker(e)) => {
                    self.degraded(format!("kafka: {e}"));
                    broker_failures += 1;
                    self.maybe_rebuild_producer(broker_failures);
                    backoff.sleep(shutdown).await;
                }
            }
        }
    }

    /// A producer with a fatal error never recovers; one that failed batch
    /// after batch may hold idempotence state the broker lost (a broker
    /// restarted without it). Either way, start a fresh producer.
    fn maybe_rebuild_producer(&self, consecutive_failures: u32) {
        let fatal = self.publisher.fatal_error();
        if fatal.is_none() && consecutive_failures % REBUILD_AFTER_FAILURES != 0 {
            return;
        }
        match self.publisher.rebuild() {
            Ok(()) => warn!(fatal = ?fatal, consecutive_failures, "replaced the Kafka producer"),
            Err(e) => error!(error = %e, "could not replace the Kafka producer"),
        }
    }

    fn degraded(&self, reason: String) {
        warn!(reason = %reason, "relay degraded; retrying with backoff");
        self.health.set(State::Degraded, reason);
    }

    /// Opens a claim transaction, checks this relay still leads (fencing),
    /// and claims the oldest pending rows, see [`store::claim`].
    async fn claim(&self, leader_pid: i32) -> Result<Claim, BatchError> {
        let mut tx = self.claim_pool.begin().await?;
        // Roll back explicitly on every error: a dropped transaction only
        // queues its rollback, and would keep the shared claim lock that a
        // new leader's barrier waits for.
        let fenced = match store::fence(
            &mut tx,
            CLAIM_LOCK_KEY,
            LEADER_LOCK_KEY,
            leader_pid,
            self.cfg.synchronous_commit,
        )
        .await
        {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        };
        if !fenced {
            let _ = tx.rollback().await;
            return Err(BatchError::Leadership(
                "this relay lost the leader lock (its leader connection was closed)".into(),
            ));
        }
        match store::claim(&mut tx, &self.claim_sql, self.cfg.batch_size).await {
            Ok(rows) => Ok(Claim { tx, rows }),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e.into())
            }
        }
    }

    /// Publishes and settles one claimed batch. While its delivery reports
    /// are awaited, the next batch is claimed on another connection (only if
    /// this one was full); it is returned, unsent, when this batch committed,
    /// and rolled back otherwise, so no row ever overtakes an earlier row of
    /// its key.
    #[tracing::instrument(name = "relay_batch", skip_all, fields(batch.size = current.rows.len()))]
    async fn relay_batch(
        &self,
        current: Claim,
        leader_pid: i32,
    ) -> Result<Option<Claim>, BatchError> {
        let started = Instant::now();
        let Claim { tx, mut rows } = current;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }

        // Build records. `early` holds outcomes decided before sending.
        let mut records: Vec<Option<Record>> = Vec::with_capacity(rows.len());
        let mut early: Vec<Option<Outcome>> = Vec::with_capacity(rows.len());
        let mut topics: HashMap<String, TopicState> = HashMap::new();
        let mut row_topics: Vec<Option<String>> = Vec::with_capacity(rows.len());
        let mut held_keys: HashSet<(String, String)> = HashSet::new();
        for row in &mut rows {
            row_topics.push(None);
            let is_held = !held_keys.is_empty()
                && held_keys.contains(&(row.aggregate_type.clone(), row.aggregate_id.clone()));
            if is_held {
                records.push(None);
                early.push(None); // held: stays pending, untouched
                continue;
            }
            let outcome = match record::build(row, &self.router, &self.cfg.default_source) {
                Err(reason) => Some(Outcome::Permanent(format!("malformed row: {reason}"))),
                Ok(rec) => {
                    let state = match topics.get(&rec.topic) {
                        Some(s) => s.clone(),
                        None => {
                            let s = self.publisher.topic_state(&rec.topic).await;
                            topics.insert(rec.topic.clone(), s.clone());
                            s
                        }
                    };
                    match state {
                        TopicState::Exists => {
                            *row_topics.last_mut().expect("pushed above") = Some(rec.topic.clone());
                            records.push(Some(rec));
                            early.push(None);
                            continue;
                        }
                        TopicState::Missing => Some(Outcome::Permanent(format!(
                            "topic {:?} does not exist; create it (the relay never creates topics), \
                             then run `outbox-relay failed retry`",
                            rec.topic
                        ))),
                        TopicState::Unknown(e) => {
                            Some(Outcome::Transient(format!("cannot read topic metadata: {e}")))
                        }
                    }
                }
            };
            // Not sent: later rows of this key must not overtake it, unless
            // the policy skips permanently failed rows.
            let holds = match &outcome {
                Some(Outcome::Transient(_)) => true,
                Some(Outcome::Permanent(_)) => self.cfg.poison_policy == PoisonPolicy::BlockKey,
                _ => false,
            };
            if holds {
                held_keys.insert((row.aggregate_type.clone(), row.aggregate_id.clone()));
            }
            records.push(None);
            early.push(outcome);
        }

        let sent = records.iter().filter(|r| r.is_some()).count();
        let full = rows.len() == self.cfg.batch_size;
        let (mut outcomes, next) = match (sent > 0, full) {
            (true, true) => {
                let (outcomes, next) =
                    tokio::join!(self.publisher.publish(records), self.claim(leader_pid));
                // A failed prefetch is not this batch's problem; the next
                // claim will meet the error again.
                (outcomes, next.ok())
            }
            (true, false) => (self.publisher.publish(records).await, None),
            (false, _) => (vec![None; rows.len()], None),
        };
        if outcomes.len() != rows.len() {
            // The delivery safety net fired: treat everything as transient.
            outcomes =
                vec![Some(Outcome::Transient("no delivery report in time".into())); rows.len()];
        }
        for (slot, pre) in outcomes.iter_mut().zip(early) {
            if pre.is_some() {
                *slot = pre;
            }
        }

        let all_delivered = outcomes.iter().all(|o| o == &Some(Outcome::Delivered));
        let now = Utc::now();
        let mut per_topic: HashMap<String, u64> = HashMap::new();
        let mut note_delivered = |row: &store::OutboxRow, topic: &Option<String>| {
            telemetry::commit_to_ack((now - row.created_at).as_seconds_f64());
            let topic = topic.as_deref().unwrap_or_default();
            match per_topic.get_mut(topic) {
                Some(n) => *n += 1,
                None => {
                    per_topic.insert(topic.to_string(), 1);
                }
            }
            debug!(event.id = %row.event_id, correlation.id = row.correlation_id.as_deref().unwrap_or(""),
                   event.r#type = %row.event_type, "published");
        };

        if all_delivered {
            if let Err(e) = tx.commit().await {
                error!(error = %e, rows = rows.len(),
                       "commit after publishing failed; the batch will be published again (duplicates)");
                if let Some(next) = next {
                    let _ = next.tx.rollback().await;
                }
                return Err(e.into());
            }
            rows.iter()
                .zip(&row_topics)
                .for_each(|(row, topic)| note_delivered(row, topic));
            for (topic, n) in per_topic {
                telemetry::published(&topic, n);
            }
            telemetry::batch(rows.len(), started.elapsed());
            return Ok(next);
        }

        // Something was not acknowledged: the prefetched batch may hold later
        // rows of an affected key, so it goes back unsent.
        if let Some(next) = next {
            next.tx.rollback().await?;
        }
        tx.rollback().await?;
        let mut res = Resolution::default();
        for ((row, outcome), topic) in rows.iter().zip(&outcomes).zip(&row_topics) {
            match outcome {
                Some(Outcome::Delivered) => {
                    res.delivered.push(row.id);
                    note_delivered(row, topic);
                }
                Some(Outcome::Permanent(reason)) => {
                    warn!(event.id = %row.event_id, correlation.id = row.correlation_id.as_deref().unwrap_or(""),
                          row.id = row.id, reason = %reason, "outbox row failed permanently; moved to failed");
                    res.failed.push((row.id, reason.clone()));
                }
                Some(Outcome::Transient(reason)) => res.retry.push((row.id, reason.clone())),
                None => {} // held behind an earlier row of its key
            }
        }
        let mut conn = self.claim_pool.acquire().await?;
        store::resolve(&mut conn, self.cfg.after_publish, &res).await?;
        for (topic, n) in per_topic {
            telemetry::published(&topic, n);
        }
        telemetry::publish_errors("permanent", res.failed.len() as u64);
        telemetry::publish_errors("transient", res.retry.len() as u64);
        telemetry::batch(rows.len(), started.elapsed());
        if let Some((_, reason)) = res.retry.first() {
            for (topic, state) in &topics {
                if *state == TopicState::Exists {
                    self.publisher.forget_topic(topic);
                }
            }
            return Err(BatchError::Broker(format!(
                "{} rows not acknowledged: {reason}",
                res.retry.len()
            )));
        }
        Ok(None)
    }
}

/// The leader's connection: it holds [`LEADER_LOCK_KEY`] for as long as it lives.
struct Leader {
    conn: PgConnection,
    pid: i32,
}

/// An open claim transaction and the rows it claimed.
struct Claim {
    tx: Transaction<'static, Postgres>,
    rows: Vec<store::OutboxRow>,
}

/// Wakes the relay on every notification; wakes it too whenever the
/// listening connection was lost (notifications may have been missed).
async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot open the LISTEN connection; polling meanwhile");
                backoff.sleep(&shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            warn!(error = %e, "LISTEN failed; polling meanwhile");
            backoff.sleep(&shutdown).await;
            continue;
        }
        backoff.reset();
        wake.notify_one();
        loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => {
                        debug!("LISTEN connection lost; it reconnects on the next receive");
                        wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN connection failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

async fn report_stats(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        match store::stats(&pool).await {
            Ok(s) => telemetry::backlog(&s),
            Err(e) => debug!(error = %e, "backlog stats unavailable"),
        }
        if sleep_or_cancel(every, &shutdown).await {
            return;
        }
    }
}

async fn clean_published(pool: PgPool, retention: Duration, shutdown: CancellationToken) {
    const CHUNK: i64 = 5000;
    loop {
        loop {
            match store::delete_expired(&pool, retention, CHUNK).await {
                Ok(n) if n as i64 == CHUNK && !shutdown.is_cancelled() => continue,
                Ok(n) => {
                    if n > 0 {
                        debug!(rows = n, "deleted published rows past retention");
                    }
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "retention cleanup failed; will retry");
                    break;
                }
            }
        }
        if sleep_or_cancel(Duration::from_secs(60), &shutdown).await {
            return;
        }
    }
}

/// Sleeps for `d`; returns true if `shutdown` fired first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn delay(&mut self) -> Duration {
        let upper = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        upper.mul_f64(jitter)
    }

    async fn sleep(&mut self, shutdown: &CancellationToken) {
        let d = self.delay();
        sleep_or_cancel(d, shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100) && delays[0] >= Duration::from_millis(50));
        assert!(delays[3] <= Duration::from_millis(800) && delays[3] >= Duration::from_millis(400));
        assert!(delays[5] <= Duration::from_millis(800));
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }
}
