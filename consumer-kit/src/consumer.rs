//! [`Consumer`]: building one, and its life from start to shutdown.
//!
//! ```text
//! Consumer::builder(cfg, pool).handler(..).build()   config checked, DLQ producer made
//!   └─ run(shutdown) / start()
//!        ├─ preflight.rs   processed_events exists, topics exist; TTL vs retention (beside)
//!        ├─ member.rs      join the group; one worker per assigned partition,
//!        │                 settling records in offset order (process.rs)
//!        ├─ cleanup.rs     expired processed_events rows, in the background
//!        └─ on shutdown    drain the workers, commit, leave the group
//! ```
//!
//! Offsets are committed every [`ConsumerConfig::commit_interval`], when
//! partitions are revoked, and on shutdown. One thread polls the consumer's
//! main queue for rebalances, statistics and errors, so the member stays in
//! the group (`max.poll.interval.ms`) however long a handler or a retry
//! takes. Partitions run concurrently, up to
//! [`ConsumerConfig::max_concurrency`] messages at once; a partition whose
//! worker falls behind holds back only itself.

use std::{collections::HashMap, sync::Arc};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    cleanup,
    config::ConsumerConfig,
    dead_letter,
    error::ConsumerError,
    handler::{Handler, Route, TypedRoute},
    health::{self, Health, Phase},
    member, preflight,
    process::Shared,
    telemetry::ConsumerStats,
};

/// Builds a [`Consumer`]: its configuration, pool and handlers.
pub struct ConsumerBuilder {
    cfg: ConsumerConfig,
    pool: sqlx::PgPool,
    routes: HashMap<String, Arc<dyn Route>>,
    sagas: Vec<&'static str>,
    #[cfg(feature = "rabbitmq")]
    rabbitmq: Option<crate::rabbitmq::RabbitMqSource>,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("cfg", &self.cfg)
            .field("event_types", &self.routes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    /// Routes events of `event_type` (`ce_type`) to `handler`. A later call
    /// for the same event type replaces the earlier one.
    pub fn handler<H: Handler>(mut self, event_type: impl Into<String>, handler: H) -> Self {
        self.routes
            .insert(event_type.into(), Arc::new(TypedRoute(Arc::new(handler))));
        self
    }

    /// Consumes RabbitMQ instead of Kafka (cargo feature `rabbitmq`): the
    /// group's own queue, bound to the exchanges named by
    /// [`ConsumerConfig::topics`]; see [`crate::rabbitmq`]. The Kafka
    /// settings of the configuration are then not used.
    #[cfg(feature = "rabbitmq")]
    pub fn rabbitmq(mut self, source: crate::rabbitmq::RabbitMqSource) -> Self {
        self.rabbitmq = Some(source);
        self
    }

    /// Runs the saga `saga` ([`crate::saga`]): its events
    /// ([`crate::saga::Saga::events`]) and its timeouts
    /// (`<NAME>.timeout`) are routed to it. The consumer must read the
    /// topics of both, and the database needs the outbox schema (the saga
    /// sends commands and schedules timeouts through it) and a relay.
    pub fn saga<S: crate::saga::Saga>(mut self, saga: S) -> Self {
        let handler = Arc::new(crate::saga::SagaHandler(Arc::new(saga)));
        let mut types = handler.0.events();
        types.push(crate::saga::timeout_type::<S>());
        for t in types {
            self.routes
                .insert(t, Arc::new(TypedRoute(Arc::clone(&handler))));
        }
        if !self.sagas.contains(&S::NAME) {
            self.sagas.push(S::NAME);
        }
        self
    }

    /// Checks the configuration and creates the dead-letter producer (or
    /// the RabbitMQ link).
    pub fn build(self) -> Result<Consumer, ConsumerError> {
        #[cfg(feature = "rabbitmq")]
        let kafka = self.rabbitmq.is_none();
        #[cfg(not(feature = "rabbitmq"))]
        let kafka = true;
        self.cfg
            .validate_for(kafka)
            .map_err(ConsumerError::Config)?;
        if self.routes.is_empty() {
            return Err(ConsumerError::Config(
                "no handlers: register at least one with .handler(\"event.type\", handler)".into(),
            ));
        }
        #[allow(unused_mut)]
        let mut cfg = self.cfg;
        #[cfg(feature = "rabbitmq")]
        let (dead_letters, delay_queues, link) = match self.rabbitmq {
            Some(source) => {
                let in_place = source.single_active_consumer;
                let link = rabbitmq_link(source, &mut cfg)?;
                let delay_queues = (!in_place).then(|| Arc::clone(&link));
                (
                    dead_letter::DeadLetterSink::RabbitMq(Arc::clone(&link)),
                    delay_queues,
                    Some(link),
                )
            }
            None => (kafka_dead_letters(&cfg)?, None, None),
        };
        #[cfg(not(feature = "rabbitmq"))]
        let dead_letters = kafka_dead_letters(&cfg)?;
        let stats = Arc::<ConsumerStats>::default();
        let health = Arc::new(Health::new(&cfg.group_id, Arc::clone(&stats)));
        #[cfg(feature = "rabbitmq")]
        if link.is_some() {
            health.set_broker_name("RabbitMQ");
        }
        Ok(Consumer {
            shared: Arc::new(Shared {
                permits: tokio::sync::Semaphore::new(cfg.max_concurrency),
                cfg,
                pool: self.pool,
                routes: self.routes,
                sagas: self.sagas,
                dead_letters,
                stats,
                health,
                #[cfg(feature = "rabbitmq")]
                delay_queues,
            }),
            #[cfg(feature = "rabbitmq")]
            rabbitmq: link,
        })
    }
}

/// Kafka's dead-letter producer for `cfg`.
fn kafka_dead_letters(cfg: &ConsumerConfig) -> Result<dead_letter::DeadLetterSink, ConsumerError> {
    Ok(dead_letter::DeadLetterSink::Kafka(
        dead_letter::DeadLetterProducer::new(
            &cfg.brokers,
            &cfg.kafka_properties,
            cfg.dead_letter_timeout,
            &cfg.group_id,
        )?,
    ))
}

/// The RabbitMQ link for `source`, after the checks that only RabbitMQ
/// needs; adjusts `cfg` where RabbitMQ's semantics differ.
#[cfg(feature = "rabbitmq")]
fn rabbitmq_link(
    source: crate::rabbitmq::RabbitMqSource,
    cfg: &mut ConsumerConfig,
) -> Result<Arc<crate::rabbitmq::Link>, ConsumerError> {
    source
        .validate(&cfg.group_id, &cfg.topics)
        .map_err(ConsumerError::Config)?;
    if cfg.max_attempts > 100 {
        return Err(ConsumerError::Config(format!(
            "max_attempts is {}: on RabbitMQ each retry has its own delay queue; \
             keep it at 100 or below",
            cfg.max_attempts
        )));
    }
    if !source.single_active_consumer && cfg.ordering == crate::Ordering::ParkKey {
        // Competing, concurrent consumption has no key order to
        // keep: parking later events would only hold them back.
        info!("RabbitMQ without single active consumer: the key order is not kept, so later events of a dead-lettered key are not parked");
        cfg.ordering = crate::Ordering::Skip;
    }
    Ok(Arc::new(crate::rabbitmq::Link::new(
        source,
        &cfg.group_id,
        &cfg.topics,
        cfg.max_attempts,
    )))
}

/// An idempotent consumer: see the crate documentation.
pub struct Consumer {
    shared: Arc<Shared>,
    #[cfg(feature = "rabbitmq")]
    rabbitmq: Option<Arc<crate::rabbitmq::Link>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group_id", &self.shared.cfg.group_id)
            .field("topics", &self.shared.cfg.topics)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Starts building a consumer for `cfg` whose handlers write through
    /// `pool` (the consumer's database, with `processed_events`).
    pub fn builder(cfg: ConsumerConfig, pool: sqlx::PgPool) -> ConsumerBuilder {
        ConsumerBuilder {
            cfg,
            pool,
            routes: HashMap::new(),
            sagas: Vec::new(),
            #[cfg(feature = "rabbitmq")]
            rabbitmq: None,
        }
    }

    /// Running totals (processed, duplicates, retries, dead-lettered).
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Whether the consumer can make progress now, and why: see
    /// [`crate::health`]. Serve it as a readiness probe.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.shared.health)
    }

    /// Consumes until `shutdown` is cancelled, then finishes the messages
    /// being handled (up to [`ConsumerConfig::drain_timeout`]; one still
    /// being handled then is abandoned, rolled back and redelivered later),
    /// commits the offsets, and returns `Ok(())` once the Kafka consumer is
    /// closed and has left the group. A handler that blocks its thread past
    /// the drain cannot be stopped: then the result is
    /// [`ConsumerError::ShutdownIncomplete`], naming its message.
    ///
    /// At start it checks that `processed_events` exists and that every
    /// topic exists, and creates missing dead-letter topics (if so
    /// configured). Once running, it warns when
    /// [`ConsumerConfig::processed_ttl`] is shorter than a topic's retention.
    /// Runs the TTL cleanup in the background.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        #[cfg(feature = "rabbitmq")]
        if let Some(link) = self.rabbitmq {
            return run_rabbitmq(self.shared, link, shutdown).await;
        }
        let shared = self.shared;
        let cfg = &shared.cfg;
        let health = Arc::clone(&shared.health);
        let started = async {
            preflight::check(&shared.pool, cfg).await?;
            health.database_up();
            member::Member::join(&shared)
        };
        let member = match started.await {
            Ok(member) => member,
            Err(e) => {
                health.set_phase(Phase::Stopped);
                return Err(e);
            }
        };
        let beside = Beside::start(&shared, &shutdown);
        member.watch_group(beside.watchers.clone());
        let (retention, stopped) = (Arc::clone(&shared), beside.watchers.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stopped.cancelled() => {}
                _ = preflight::warn_on_retention(&retention.cfg) => {}
            }
        });
        health.set_phase(Phase::Running);
        info!(group = %cfg.group_id, topics = ?cfg.topics, "consumer started");
        let result = member.serve(shutdown.clone()).await;
        beside.stop(&shared);
        result
    }
}

/// [`Consumer::run`] on RabbitMQ: the schema check, then the queue
/// (`rabbitmq.rs`), with the database watch and the TTL cleanup beside it.
#[cfg(feature = "rabbitmq")]
async fn run_rabbitmq(
    shared: Arc<Shared>,
    link: Arc<crate::rabbitmq::Link>,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let cfg = &shared.cfg;
    let health = Arc::clone(&shared.health);
    if let Err(e) = preflight::check_schema(&shared.pool).await {
        health.set_phase(Phase::Stopped);
        return Err(e);
    }
    health.database_up();
    let beside = Beside::start(&shared, &shutdown);
    health.set_phase(Phase::Running);
    info!(group = %cfg.group_id, queue = link.queue(), "consumer started on RabbitMQ");
    let result = crate::rabbitmq::serve(Arc::clone(&shared), link, shutdown).await;
    beside.stop(&shared);
    result
}

/// What runs beside either source: the TTL cleanup, the database watch and
/// the parked-keys report.
struct Beside {
    watchers: CancellationToken,
    cleaner: Option<tokio::task::JoinHandle<()>>,
}

impl Beside {
    fn start(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Self {
        let cfg = &shared.cfg;
        let watchers = CancellationToken::new();
        let cleaner = cfg
            .cleanup_interval
            .map(|every| tokio::spawn(cleanup::run(Arc::clone(shared), every, shutdown.clone())));
        tokio::spawn(health::watch_database(
            shared.pool.clone(),
            Arc::clone(&shared.health),
            watchers.clone(),
        ));
        if !shared.sagas.is_empty() {
            tokio::spawn(crate::saga::report(
                shared.pool.clone(),
                shared.sagas.clone(),
                watchers.clone(),
            ));
        }
        if cfg.ordering == crate::config::Ordering::ParkKey {
            tokio::spawn(crate::park::report(
                shared.pool.clone(),
                cfg.group_id.clone(),
                watchers.clone(),
            ));
        }
        Self { watchers, cleaner }
    }

    /// Stops them and marks the consumer stopped.
    fn stop(self, shared: &Shared) {
        self.watchers.cancel();
        shared.health.set_phase(Phase::Stopped);
        if let Some(task) = self.cleaner {
            task.abort();
        }
        info!(group = %shared.cfg.group_id, "consumer stopped");
    }
}

impl Consumer {
    /// Runs the consumer on its own task until [`ConsumerHandle::stop`].
    /// Must be called within a Tokio runtime.
    pub fn start(self) -> ConsumerHandle {
        let stats = self.stats();
        let health = self.health();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        ConsumerHandle {
            stats,
            health,
            shutdown,
            task,
        }
    }
}

/// A consumer running on its own task, from [`Consumer::start`]. Dropping
/// the handle shuts the consumer down without waiting for it.
#[derive(Debug)]
pub struct ConsumerHandle {
    stats: Arc<ConsumerStats>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ConsumerError>>,
}

impl ConsumerHandle {
    /// Running totals (processed, duplicates, retries, dead-lettered).
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Whether the consumer can make progress now, and why.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Whether the consumer has stopped on its own: it returns early only
    /// on an error, which [`ConsumerHandle::stop`] then reports.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Shuts the consumer down and waits for it, as [`Consumer::run`]
    /// describes: it finishes or abandons the messages being handled (up to
    /// [`ConsumerConfig::drain_timeout`]), commits and leaves the group.
    /// Returns the consumer's error if it stopped on one.
    pub async fn stop(mut self) -> Result<(), ConsumerError> {
        self.shutdown.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        task.await
            .map_err(|e| ConsumerError::Internal(format!("the consumer task failed: {e}")))?
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
