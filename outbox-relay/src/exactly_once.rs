//! Exactly-once into Kafka ([`crate::RelayConfig::exactly_once`]): each
//! batch is one Kafka transaction that also carries the relay's
//! [`Checkpoint`]; what a crash leaves half done is finished from that
//! checkpoint, never sent again.
//!
//! ```text
//!  claim (DB tx open, rows deleted in it)          lease.rs fence: FOR SHARE
//!     │
//!  begin Kafka tx ─► send records + checkpoint(ids) ─► await every ack
//!     │                                    any failure: abort Kafka tx,
//!     │                                    roll back the claim; rows stay
//!     ▼                                    pending (nothing visible)
//!  commit Kafka tx ───────── crash here: records and checkpoint visible,
//!     │                      claim rolled back, rows pending → the next
//!     │                      owner reads the checkpoint and deletes them
//!     ▼
//!  commit DB tx ──────────── fails: owed; finished (rows deleted by id)
//!                            before this relay claims again
//! ```
//!
//! The order is Kafka first, then the database, and every crash point is
//! covered (`docs/architecture.md` walks through each):
//!
//! - before the Kafka commit: the transaction is aborted (by this relay, by
//!   the fence of the next owner, or by the broker after
//!   `transaction.timeout.ms`), the claim rolls back, nothing is visible;
//! - between the two commits: the checkpoint is visible with the records.
//!   The rows are pending again, but no claim takes them before their
//!   checkpoint is finished: this relay finishes it before its next claim
//!   ([`Owed`]); a relay taking its partitions over after its lease ran out
//!   fences it first, then finishes it ([`ExactlyOnce::recover_taken`]);
//! - after the database commit: done.
//!
//! A commit whose outcome is unknown (a timeout) is settled the same way as
//! a crash: the relay re-creates its producer, whose `init_transactions`
//! aborts the transaction if it was not committed, reads its own checkpoint
//! and finishes it.
//!
//! Fencing is in `lease.rs` (the database half) and here (the Kafka half,
//! [`ExactlyOnce::recover_taken`]): one producer per relay, with the
//! transactional id `<prefix><relay id>`, so many partitions never mean many
//! producers.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    config::ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::OwnedHeaders,
    producer::{BaseProducer, Producer},
};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::{
    checkpoint::{self, Checkpoint},
    claim::{self, Resolution},
    config::{CrashAfterCommit, RelayConfig},
    lease::Leases,
    publisher::Publisher,
    record::Record,
    telemetry,
};

/// Work a failed batch left behind, to finish before the next claim.
#[derive(Debug, Default)]
pub(crate) struct Owed {
    /// Ids committed in Kafka whose database side is not done.
    finish: Vec<i64>,
    /// The producer must be re-created and initialized, and this relay's
    /// own checkpoint read and finished (an unknown commit outcome, a fatal
    /// producer error, or the start).
    reinit: bool,
    /// The gate ticket of the batch, settled once this is paid.
    ticket: u64,
}

/// How a batch's Kafka transaction ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Committed: its records and its checkpoint are visible.
    Committed,
    /// Aborted: nothing of it is visible. `reinit` when the abort itself
    /// failed (the next `init_transactions` aborts it for sure).
    Aborted { reason: String, reinit: bool },
    /// Unknown: settle it as after a crash (re-create, read, finish).
    Unknown(String),
}

/// The exactly-once state of one relay.
#[derive(Debug)]
pub(crate) struct ExactlyOnce {
    relay_id: String,
    connect: ClientConfig,
    topic: String,
    prefix: String,
    transaction_timeout: Duration,
    transactions: AtomicU64,
    /// A transaction is open (begun, not yet ended).
    open: AtomicBool,
    owed: Mutex<Option<Owed>>,
    crash: Option<CrashAfterCommit>,
    skip_fencing: bool,
}

impl ExactlyOnce {
    /// The state of a relay that just started: it owes an initialization.
    pub(crate) fn new(cfg: &RelayConfig, relay_id: &str) -> Self {
        Self {
            relay_id: relay_id.to_string(),
            connect: checkpoint::connection_config(&cfg.brokers, &cfg.kafka_properties),
            topic: cfg.checkpoint_topic.clone(),
            prefix: cfg.transactional_id_prefix.clone(),
            transaction_timeout: cfg.transaction_timeout,
            transactions: AtomicU64::new(0),
            open: AtomicBool::new(false),
            owed: Mutex::new(Some(Owed {
                reinit: true,
                ..Owed::default()
            })),
            crash: cfg.crash_after_kafka_commit,
            skip_fencing: cfg.mutation_skip_fencing,
        }
    }

    /// Begins a batch's transaction.
    pub(crate) async fn begin(&self, publisher: &Publisher) -> Result<(), KafkaError> {
        publisher.begin().await.inspect_err(note_fenced)?;
        self.open.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The checkpoint record of a transaction publishing `ids`.
    pub(crate) fn checkpoint_record(&self, ids: &[i64]) -> Record {
        let n = self.transactions.fetch_add(1, Ordering::Relaxed) + 1;
        Record {
            topic: self.topic.clone(),
            key: self.relay_id.clone(),
            value: Some(Checkpoint::new(&self.relay_id, n, ids).encode()),
            headers: OwnedHeaders::new(),
        }
    }

    /// WAL source: the checkpoint record of a transaction publishing a
    /// batch of the slot `slot` that ends at `lsn` (its rows' `ids`).
    pub(crate) fn slot_checkpoint_record(&self, slot: &str, ids: &[i64], lsn: String) -> Record {
        let n = self.transactions.fetch_add(1, Ordering::Relaxed) + 1;
        let mut ck = Checkpoint::new(&self.relay_id, n, ids);
        ck.lsn = Some(lsn);
        Record {
            topic: self.topic.clone(),
            key: checkpoint::slot_key(slot),
            value: Some(ck.encode()),
            headers: OwnedHeaders::new(),
        }
    }

    /// WAL source: makes this relay the writer of the slot `slot`'s events,
    /// once it reads the slot and before it sends anything. It re-creates
    /// the producer and initializes its transactions under the slot's
    /// transactional id, which fences the slot's last reader (its open
    /// transaction is aborted; it can commit nothing more), then reads the
    /// slot's checkpoint. Returns the checkpoint's position: the slot's
    /// transactions that ended at or before it are in Kafka already, and
    /// only their database side may be left to do (`wal.rs`).
    pub(crate) async fn start_reading(
        &self,
        publisher: &Publisher,
        slot: &str,
    ) -> Result<Option<String>, String> {
        self.ensure_topic().await?;
        self.fresh_producer(publisher).await?;
        let key = checkpoint::slot_key(slot);
        let mut read = self.read(vec![key.clone()]).await?;
        // The WAL source owes nothing across sessions: what a session left
        // half done is settled by the next one from this checkpoint.
        self.owed.lock().expect("owed").take();
        Ok(read.remove(&key).and_then(|ck| ck.lsn))
    }

    /// Re-creates the producer and registers its transactional id, which
    /// fences any earlier producer with that id (its open transaction is
    /// aborted).
    async fn fresh_producer(&self, publisher: &Publisher) -> Result<(), String> {
        publisher
            .rebuild()
            .map_err(|e| format!("kafka: cannot re-create the producer: {e}"))?;
        publisher
            .init_transactions()
            .await
            .map_err(|e| explain_init(&e, &self.prefix))
    }

    /// Records work left behind by the batch of `ticket`.
    pub(crate) fn owe(&self, finish: &[i64], reinit: bool, ticket: u64) {
        let mut owed = self.owed.lock().expect("owed");
        let o = owed.get_or_insert_with(Owed::default);
        o.finish.extend_from_slice(finish);
        o.reinit |= reinit;
        o.ticket = o.ticket.max(ticket);
    }

    /// Whether a failed batch left work behind (then the relay does not
    /// hand its partitions back on shutdown: whoever takes them over after
    /// its lease ran out fences it and finishes that work).
    pub(crate) fn owes(&self) -> bool {
        self.open.load(Ordering::SeqCst) || self.owed.lock().expect("owed").is_some()
    }

    /// Pays what is owed, if anything: re-creates and initializes the
    /// producer and finishes this relay's own checkpoint when asked to, then
    /// finishes the known ids. On error it stays owed, to try again.
    pub(crate) async fn pay(
        &self,
        publisher: &Publisher,
        pool: &PgPool,
        cfg: &RelayConfig,
        leases: &Leases,
    ) -> Result<(), String> {
        let Some((mut finish, reinit, ticket)) = self
            .owed
            .lock()
            .expect("owed")
            .as_ref()
            .map(|o| (o.finish.clone(), o.reinit, o.ticket))
        else {
            return Ok(());
        };
        if reinit {
            let t0 = Instant::now();
            self.ensure_topic().await?;
            let t1 = Instant::now();
            self.fresh_producer(publisher).await?;
            let t2 = Instant::now();
            let own = self.read(vec![self.relay_id.clone()]).await?;
            if let Some(ck) = own.get(&self.relay_id) {
                finish.extend(ck.id_list());
            }
            tracing::debug!(
                checkpoint_topic_ms = (t1 - t0).as_millis() as u64,
                init_transactions_ms = (t2 - t1).as_millis() as u64,
                read_own_checkpoint_ms = t2.elapsed().as_millis() as u64,
                "transactional producer initialized"
            );
        }
        let n = self.finish(pool, cfg, &finish).await?;
        if n > 0 {
            info!(
                rows = n,
                "finished rows already committed in Kafka (from this relay's checkpoint)"
            );
        }
        if let Some(o) = self.owed.lock().expect("owed").take() {
            // Anything owed meanwhile was added under the same lock.
            leases.gate().settle(o.ticket.max(ticket));
        }
        Ok(())
    }

    /// Recovers the partitions taken over from relays whose lease ran out:
    /// fences each such relay's transactional id (aborting its open
    /// transaction; its later commits fail), reads its last checkpoint and
    /// finishes it, then lets claims take the partitions.
    pub(crate) async fn recover_taken(
        &self,
        pool: &PgPool,
        cfg: &RelayConfig,
        leases: &Leases,
    ) -> Result<(), String> {
        let own = leases.ownership();
        if own.recovering.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = own.recovering.keys().copied().collect();
        // This relay's own id may be listed (it took a partition back after
        // its own lease ran out): what it owes is in `owed`, paid already.
        let previous: BTreeSet<String> = own
            .recovering
            .values()
            .flatten()
            .filter(|r| **r != self.relay_id)
            .cloned()
            .collect();
        if self.skip_fencing {
            warn!(
                ?partitions,
                "mutation: claiming without fencing the previous owners"
            );
            return leases
                .recovered(&partitions)
                .await
                .map_err(|e| format!("database: {}", crate::store::explain(&e)));
        }
        let started = Instant::now();
        for relay in &previous {
            self.fence(relay).await?;
            telemetry::fenced("another relay");
        }
        let checkpoints = self.read(previous.iter().cloned().collect()).await?;
        let ids: Vec<i64> = checkpoints.values().flat_map(Checkpoint::id_list).collect();
        let n = self.finish(pool, cfg, &ids).await?;
        leases
            .recovered(&partitions)
            .await
            .map_err(|e| format!("database: {}", crate::store::explain(&e)))?;
        info!(
            ?partitions,
            previous_owners = ?previous,
            finished = n,
            took_ms = started.elapsed().as_millis() as u64,
            "fenced the previous owners in Kafka and finished their last checkpoints; claiming"
        );
        Ok(())
    }

    /// Ends the transaction of a batch: commits it if `commit`, else aborts.
    pub(crate) async fn end(&self, publisher: &Publisher, commit: bool, why: &str) -> Ended {
        let ended = self.end_transaction(publisher, commit, why).await;
        self.open.store(false, Ordering::SeqCst);
        ended
    }

    async fn end_transaction(&self, publisher: &Publisher, commit: bool, why: &str) -> Ended {
        if !commit {
            return match publisher.abort().await {
                Ok(()) => {
                    telemetry::transaction("aborted");
                    Ended::Aborted {
                        reason: why.to_string(),
                        reinit: false,
                    }
                }
                Err(e) => {
                    telemetry::transaction("aborted");
                    note_fenced(&e);
                    Ended::Aborted {
                        reason: format!("{why}; the abort failed too: {e}"),
                        reinit: true,
                    }
                }
            };
        }
        let started = Instant::now();
        let mut last = String::new();
        for _ in 0..3 {
            match publisher.commit().await {
                Ok(()) => {
                    telemetry::transaction("committed");
                    telemetry::commit_latency(started.elapsed());
                    return Ended::Committed;
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() => last = e.to_string(),
                Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                    let reason = format!("the commit failed: {e}");
                    return Box::pin(self.end_transaction(publisher, false, &reason)).await;
                }
                Err(e) => {
                    note_fenced(&e);
                    telemetry::transaction("unknown");
                    return Ended::Unknown(format!("the commit failed: {e}"));
                }
            }
        }
        telemetry::transaction("unknown");
        Ended::Unknown(format!("the commit kept failing: {last}"))
    }

    /// The crash hook (tests and the soak): after a Kafka commit, whether
    /// to stop now, before the database commit.
    pub(crate) fn crash_now(&self) -> bool {
        let Some(c) = self.crash else {
            return false;
        };
        if c.one_in > 1 && rand::random::<u32>() % c.one_in != 0 {
            return false;
        }
        warn!("crash hook: stopping between the Kafka commit and the database commit");
        if c.abort_process {
            std::process::abort();
        }
        true
    }

    /// Registers `relay`'s transactional id with a producer of our own,
    /// which bumps its epoch: its open transaction is aborted and it can
    /// commit nothing more.
    async fn fence(&self, relay: &str) -> Result<(), String> {
        let mut cc = self.connect.clone();
        cc.set("transactional.id", format!("{}{relay}", self.prefix))
            .set(
                "transaction.timeout.ms",
                self.transaction_timeout.as_millis().to_string(),
            )
            .set("client.id", "outbox-relay-fence");
        let prefix = self.prefix.clone();
        tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = cc
                .create()
                .map_err(|e| format!("kafka: cannot create the fencing producer: {e}"))?;
            producer
                .init_transactions(Duration::from_secs(60))
                .map_err(|e| explain_init(&outbox_kafka::secrets::scrub(e), &prefix))
        })
        .await
        .map_err(|e| format!("fencing task: {e}"))?
    }

    async fn ensure_topic(&self) -> Result<(), String> {
        let (cc, topic) = (self.connect.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || checkpoint::ensure_topic(&cc, &topic))
            .await
            .map_err(|e| format!("checkpoint task: {e}"))?
            .map_err(|e| format!("kafka: {}", chain(&e)))
    }

    async fn read(
        &self,
        relays: Vec<String>,
    ) -> Result<std::collections::BTreeMap<String, Checkpoint>, String> {
        if relays.is_empty() {
            return Ok(Default::default());
        }
        let (cc, topic) = (self.connect.clone(), self.topic.clone());
        let wait = self.transaction_timeout;
        tokio::task::spawn_blocking(move || checkpoint::read(&cc, &topic, Some(&relays), wait))
            .await
            .map_err(|e| format!("checkpoint task: {e}"))?
            .map_err(|e| format!("kafka: {}", chain(&e)))
    }

    /// Deletes (or marks) the rows of `ids` that are still pending, in one
    /// transaction. Returns how many were still pending.
    async fn finish(&self, pool: &PgPool, cfg: &RelayConfig, ids: &[i64]) -> Result<usize, String> {
        if ids.is_empty() {
            return Ok(0);
        }
        let db = |e: sqlx::Error| format!("database: {}", crate::store::explain(&e));
        let mut conn = pool.acquire().await.map_err(db)?;
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND status = 'pending'",
        )
        .persistent(false)
        .bind(ids)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        if pending == 0 {
            return Ok(0);
        }
        let res = Resolution {
            delivered: ids.to_vec(),
            ..Resolution::default()
        };
        claim::resolve(
            &mut conn,
            cfg.after_publish,
            cfg.remembers_published(),
            &res,
        )
        .await
        .map_err(db)?;
        telemetry::checkpoint_finished(pending as usize);
        Ok(pending as usize)
    }
}

/// Why a batch's transaction is not committed, given its checkpoint
/// record's delivery outcome: the checkpoint's own failure, or else a
/// record's.
pub(crate) fn abort_reason(checkpoint: Option<&crate::publisher::Outcome>) -> String {
    use crate::publisher::Outcome;
    match checkpoint {
        Some(Outcome::Delivered) => "a record was not acknowledged".to_string(),
        Some(Outcome::Permanent(r) | Outcome::Transient(r)) => {
            format!("the checkpoint was not acknowledged: {r}")
        }
        None => "the checkpoint's delivery report did not come".to_string(),
    }
}

/// Counts this relay's producer being fenced by another one.
fn note_fenced(e: &KafkaError) {
    if matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    ) {
        telemetry::fenced("this relay");
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `init_transactions` failed: say what the broker lacks and how to fix it.
pub(crate) fn explain_init(e: &KafkaError, prefix: &str) -> String {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    let hint = match code {
        Some(C::TransactionalIdAuthorizationFailed) => format!(
            "the relay is not authorized for its transactional id: grant WRITE and DESCRIBE \
             on the prefixed TransactionalId resource {prefix:?}"
        ),
        Some(C::ClusterAuthorizationFailed) => {
            "the broker refused the idempotent producer (cluster authorization): grant \
             IDEMPOTENT_WRITE on the cluster, or WRITE on the TransactionalId"
                .to_string()
        }
        Some(C::UnsupportedVersion | C::UnsupportedForMessageFormat) => {
            "the broker does not support transactions (Apache Kafka 0.11 or newer is needed)"
                .to_string()
        }
        Some(C::CoordinatorNotAvailable | C::NotCoordinator) | None | Some(_) => {
            "no transaction coordinator answered: check that the brokers are up and that \
             transaction.state.log.replication.factor and transaction.state.log.min.isr are \
             at most the number of brokers (a single broker needs both at 1)"
                .to_string()
        }
    };
    format!("kafka: cannot start transactions ({e}): {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_failures_say_what_to_fix() {
        let auth = KafkaError::AdminOp(RDKafkaErrorCode::TransactionalIdAuthorizationFailed);
        let text = explain_init(&auth, "outbox-relay-");
        assert!(text.contains("TransactionalId"), "{text}");
        assert!(text.contains("\"outbox-relay-\""), "{text}");
        let timeout = KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut);
        let text = explain_init(&timeout, "p-");
        assert!(
            text.contains("transaction.state.log.replication.factor"),
            "{text}"
        );
    }
}
