//! [`Consumer`]: the Kafka loop.
//!
//! Each assigned partition gets its own librdkafka queue and a worker task
//! that reads it and settles records in offset order (`process.rs`),
//! storing each offset only after its database commit. Offsets are committed
//! every [`ConsumerConfig::commit_interval`], when partitions are revoked,
//! and on shutdown. One thread polls the consumer's main queue for
//! rebalances, statistics and errors, so the member stays in the group
//! (`max.poll.interval.ms`) however long a handler or a retry takes.
//!
//! Partitions run concurrently, up to [`ConsumerConfig::max_concurrency`]
//! messages at once. A partition whose worker falls behind (slow handler,
//! retries, an unreachable dead-letter topic) holds back only itself:
//! librdkafka stops prefetching it once its queue is full
//! (`queued.max.messages.kbytes`), and the other partitions flow on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use outbox_kafka::{logs, QuietContext};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::ClientContext,
    consumer::{
        base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer as _, ConsumerContext,
        Rebalance,
    },
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    message::{Message, OwnedMessage},
    statistics::Statistics,
    Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    cleanup,
    config::ConsumerConfig,
    dead_letter, dedupe,
    handler::{Handler, Route, TypedRoute},
    process::{process, Done, Shared},
    telemetry::{self, ConsumerStats, StatField},
};

/// Why a consumer could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The configuration is wrong; the message names the setting.
    #[error("consumer configuration: {0}")]
    Config(String),
    /// A subscribed topic does not exist.
    #[error("topic {0} does not exist on the broker: create it (for example `outbox-relay topic create {0} --partitions 6`) or fix the consumer's topics")]
    MissingTopic(String),
    /// The Kafka brokers did not answer at start.
    #[error("cannot reach Kafka at {brokers}: {reason}; check the consumer's brokers (KAFKA_BROKERS) and that the broker runs")]
    BrokerUnreachable {
        /// The configured bootstrap servers.
        brokers: String,
        /// librdkafka's error.
        reason: String,
    },
    /// The consumer's database failed at start.
    #[error("consumer database: {0}")]
    Database(#[source] sqlx::Error),
    /// The Kafka client failed at start, or hit a fatal error.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// An internal task failed.
    #[error("consumer task failed: {0}")]
    Internal(String),
}

/// Builds a [`Consumer`]: its configuration, pool and handlers.
pub struct ConsumerBuilder {
    cfg: ConsumerConfig,
    pool: sqlx::PgPool,
    routes: HashMap<String, Arc<dyn Route>>,
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

    /// Checks the configuration and creates the dead-letter producer.
    pub fn build(self) -> Result<Consumer, ConsumerError> {
        self.cfg.validate().map_err(ConsumerError::Config)?;
        if self.routes.is_empty() {
            return Err(ConsumerError::Config(
                "no handlers: register at least one with .handler(\"event.type\", handler)".into(),
            ));
        }
        let producer = dead_letter::DeadLetterProducer::new(
            &self.cfg.brokers,
            &self.cfg.kafka_properties,
            self.cfg.dead_letter_timeout,
        )?;
        let permits = tokio::sync::Semaphore::new(self.cfg.max_concurrency);
        Ok(Consumer {
            shared: Arc::new(Shared {
                cfg: self.cfg,
                pool: self.pool,
                routes: self.routes,
                producer,
                stats: Arc::default(),
                permits,
            }),
        })
    }
}

/// An idempotent consumer: see the crate documentation.
pub struct Consumer {
    shared: Arc<Shared>,
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
        }
    }

    /// Running totals (processed, duplicates, retries, dead-lettered).
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Consumes until `shutdown` is cancelled, then finishes the messages
    /// being handled (up to [`ConsumerConfig::drain_timeout`]), commits the
    /// offsets, leaves the group and returns `Ok(())`.
    ///
    /// At start it checks that `processed_events` exists and that every
    /// topic exists, creates missing dead-letter topics (if so configured),
    /// and warns when [`ConsumerConfig::processed_ttl`] is shorter than a
    /// topic's retention. Runs the TTL cleanup in the background.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let shared = self.shared;
        let cfg = &shared.cfg;
        dedupe::check_schema(&shared.pool).await?;
        prepare_topics(cfg).await?;
        match cleanup::retention_check(
            &cfg.brokers,
            &cfg.kafka_properties,
            &cfg.topics,
            cfg.processed_ttl,
        )
        .await
        {
            Ok(checks) => {
                for c in checks.iter().filter(|c| !c.covered) {
                    warn!(topic = %c.topic, "{}", c.warning(cfg.processed_ttl));
                }
            }
            Err(e) => {
                debug!(error = %e, "could not read topic retention to compare with processed_ttl")
            }
        }

        let workers = Arc::new(Mutex::new(Workers::new(
            tokio::runtime::Handle::current(),
            Arc::clone(&shared),
        )));
        let context = KitContext {
            workers: Arc::clone(&workers),
            group: cfg.group_id.clone(),
            drain_timeout: cfg.drain_timeout,
            consumer: std::sync::OnceLock::new(),
            stats: Arc::clone(&shared.stats),
            commits_failing_since: Mutex::new(None),
        };
        let consumer: BaseConsumer<KitContext> = consumer_config(cfg)
            .create_with_context(context)
            .map_err(outbox_kafka::secrets::scrub)?;

        let cleaner = cfg
            .cleanup_interval
            .map(|every| tokio::spawn(cleanup::run(Arc::clone(&shared), every, shutdown.clone())));
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        info!(group = %cfg.group_id, topics = ?cfg.topics, "consumer started");
        let stop = shutdown.clone();
        let result = tokio::task::spawn_blocking(move || poll_loop(consumer, workers, stop))
            .await
            .map_err(|e| ConsumerError::Internal(e.to_string()))?;
        if let Some(task) = cleaner {
            task.abort();
        }
        info!(group = %shared.cfg.group_id, "consumer stopped");
        result
    }
}

fn consumer_config(cfg: &ConsumerConfig) -> rdkafka::ClientConfig {
    let mut cc = dead_letter::client_config(&cfg.brokers, &Default::default());
    cc.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().max(1).to_string(),
        )
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("client.id", "consumer-kit");
    if let Some(every) = cfg.lag_interval {
        cc.set(
            "statistics.interval.ms",
            every.as_millis().max(1).to_string(),
        );
    }
    outbox_kafka::secrets::set_all(&mut cc, &cfg.kafka_properties);
    // Stored only after the database commit; never automatically.
    cc.set("enable.auto.offset.store", "false");
    cc
}

/// Checks that the topics exist and creates missing dead-letter topics.
async fn prepare_topics(cfg: &ConsumerConfig) -> Result<(), ConsumerError> {
    let admin: AdminClient<QuietContext> =
        dead_letter::client_config(&cfg.brokers, &cfg.kafka_properties)
            .create_with_context(QuietContext)
            .map_err(outbox_kafka::secrets::scrub)?;
    let admin = Arc::new(admin);
    let mut to_create = Vec::new();
    for topic in &cfg.topics {
        let partitions = partition_count(&admin, topic).await.map_err(|e| match e {
            ConsumerError::Kafka(k) => ConsumerError::BrokerUnreachable {
                brokers: cfg.brokers.clone(),
                reason: k.to_string(),
            },
            other => other,
        })?;
        let Some(partitions) = partitions else {
            return Err(ConsumerError::MissingTopic(topic.clone()));
        };
        let dlq = cfg.dead_letter_topic_for(topic);
        if partition_count(&admin, &dlq).await?.is_none() {
            if cfg.create_dead_letter_topics {
                to_create.push((dlq, partitions));
            } else {
                warn!(dead_letter_topic = %dlq, "dead-letter topic does not exist and create_dead_letter_topics is off: dead-lettering will hold its partition and retry until the topic is created");
            }
        }
    }
    if to_create.is_empty() {
        return Ok(());
    }
    let new: Vec<NewTopic<'_>> = to_create
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(name) => info!(dead_letter_topic = %name, "created dead-letter topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(ConsumerError::Config(format!(
                    "cannot create dead-letter topic {name}: {code:?}; create it yourself or grant the consumer CreateTopics"
                )))
            }
        }
    }
    Ok(())
}

/// The partition count of `topic`, or `None` when it does not exist.
async fn partition_count(
    admin: &Arc<AdminClient<QuietContext>>,
    topic: &str,
) -> Result<Option<i32>, ConsumerError> {
    let admin = Arc::clone(admin);
    let name = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    })
    .await
    .map_err(|e| ConsumerError::Internal(e.to_string()))?
}

/// The poll thread: serves rebalances, statistics and errors until
/// shutdown, then drains the workers and commits.
fn poll_loop(
    consumer: Arc<BaseConsumer<KitContext>>,
    workers: Arc<Mutex<Workers>>,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let mut result = Ok(());
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                // Records normally arrive on their partition's own queue; one
                // fetched just before its queue was split lands here.
                let msg = msg.detach();
                lock(&workers).hand_over(&consumer, msg);
            }
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    result = Err(ConsumerError::Internal(format!(
                        "fatal Kafka consumer error {code:?}: {reason}"
                    )));
                    break;
                }
                logs::limited(
                    &logs::kind_of(&e.to_string()),
                    |more| warn!(error = %e, "Kafka consumer error; librdkafka retries by itself{more}"),
                );
            }
        }
    }
    let drain = consumer.context().drain_timeout;
    lock(&workers).stop_all(drain);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => debug!("offsets committed on shutdown"),
        Err(e) if is_nothing_to_commit(&e) => {}
        Err(e) => {
            warn!(error = %e, "could not commit offsets on shutdown; the next owner will see redeliveries, which dedupe")
        }
    }
    // Dropping the last handle closes the consumer and leaves the group.
    drop(consumer);
    result
}

fn is_nothing_to_commit(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
}

fn lock(workers: &Mutex<Workers>) -> std::sync::MutexGuard<'_, Workers> {
    // A poisoned lock only means a panic elsewhere; the map is still usable.
    workers.lock().unwrap_or_else(|p| p.into_inner())
}

type PartitionKey = (String, i32);
type KitConsumer = BaseConsumer<KitContext>;

/// The partition workers of this member: one per assigned partition.
struct Workers {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    map: HashMap<PartitionKey, Worker>,
}

struct Worker {
    /// Records that reached the main queue instead of the partition queue.
    side: mpsc::UnboundedSender<OwnedMessage>,
    stop: CancellationToken,
    /// Disconnected when the worker task has ended.
    done: std::sync::mpsc::Receiver<()>,
}

impl Workers {
    fn new(runtime: tokio::runtime::Handle, shared: Arc<Shared>) -> Self {
        Self {
            runtime,
            shared,
            map: HashMap::new(),
        }
    }

    /// Starts the worker of a newly assigned partition, reading the
    /// partition's own queue.
    fn start(&mut self, consumer: &Arc<KitConsumer>, key: PartitionKey) {
        if self.map.contains_key(&key) {
            return;
        }
        let (side, side_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let notify = Arc::new(tokio::sync::Notify::new());
        let queue = consumer.split_partition_queue(&key.0, key.1).map(|mut q| {
            let wake = Arc::clone(&notify);
            q.set_nonempty_callback(move || wake.notify_one());
            q
        });
        if queue.is_none() {
            warn!(topic = %key.0, partition = key.1, "could not give the partition its own queue; its records arrive through the main queue");
        }
        self.runtime.spawn(run_worker(
            Arc::clone(&self.shared),
            Arc::clone(consumer),
            queue,
            notify,
            side_rx,
            stop.clone(),
            done_tx,
        ));
        self.map.insert(key, Worker { side, stop, done });
    }

    /// Gives a record that arrived on the main queue to its worker.
    fn hand_over(&mut self, consumer: &Arc<KitConsumer>, msg: OwnedMessage) {
        let key = (msg.topic().to_string(), msg.partition());
        self.start(consumer, key.clone());
        if let Some(worker) = self.map.get(&key) {
            let _ = worker.side.send(msg);
        }
    }

    /// Stops the workers of `keys` and waits, up to `timeout` in all, for the
    /// messages they are handling to settle (and their offsets to be stored).
    fn stop(&mut self, keys: &[PartitionKey], timeout: Duration) {
        let stopped: Vec<(PartitionKey, Worker)> = keys
            .iter()
            .filter_map(|k| self.map.remove(k).map(|w| (k.clone(), w)))
            .collect();
        for (_, w) in &stopped {
            w.stop.cancel();
        }
        let deadline = Instant::now() + timeout;
        for ((topic, partition), w) in stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            let finished = matches!(
                w.done.recv_timeout(left),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            );
            if !finished {
                warn!(%topic, partition, "a message of this partition was still being handled after drain_timeout; going on without it (it is redelivered later and dedupes)");
            }
        }
    }

    fn stop_all(&mut self, timeout: Duration) {
        let keys: Vec<PartitionKey> = self.map.keys().cloned().collect();
        self.stop(&keys, timeout);
    }
}

/// One partition's worker: settles records in offset order, storing each
/// offset after its record settled. It reads at its own pace, so a slow
/// partition holds back only itself; librdkafka stops prefetching a
/// partition whose queue is full (`queued.max.messages.kbytes`).
async fn run_worker(
    shared: Arc<Shared>,
    consumer: Arc<KitConsumer>,
    queue: Option<PartitionQueue<KitContext>>,
    notify: Arc<tokio::sync::Notify>,
    mut side: mpsc::UnboundedReceiver<OwnedMessage>,
    stop: CancellationToken,
    _done: std::sync::mpsc::Sender<()>,
) {
    let mut next_offset = -1;
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(msg) = side.recv() => msg,
            msg = next_from_queue(queue.as_ref(), &notify) => msg,
        };
        if msg.offset() < next_offset {
            // Seen already (the same record by both routes).
            continue;
        }
        next_offset = msg.offset() + 1;
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = shared.permits.acquire() => permit,
        };
        match process(&shared, &msg, &stop).await {
            Done::Completed => store_offset(&consumer, &msg),
            Done::Abandoned => break,
        }
        drop(permit);
    }
}

/// The next record of the partition queue, waiting (without blocking a
/// thread) until one arrives. Never returns without a queue.
async fn next_from_queue(
    queue: Option<&PartitionQueue<KitContext>>,
    notify: &tokio::sync::Notify,
) -> OwnedMessage {
    let Some(queue) = queue else {
        return std::future::pending().await;
    };
    loop {
        match queue.poll(Duration::ZERO) {
            Some(Ok(msg)) => return msg.detach(),
            Some(Err(e)) => logs::limited(
                &logs::kind_of(&e.to_string()),
                |more| warn!(error = %e, "Kafka error on a partition queue; librdkafka retries by itself{more}"),
            ),
            None => {
                // Woken by the queue's non-empty callback; the timeout is a
                // safety net only.
                let _ = tokio::time::timeout(Duration::from_millis(200), notify.notified()).await;
            }
        }
    }
}

fn store_offset(consumer: &KitConsumer, msg: &OwnedMessage) {
    let mut tpl = TopicPartitionList::new();
    let stored = tpl
        .add_partition_offset(
            msg.topic(),
            msg.partition(),
            Offset::Offset(msg.offset() + 1),
        )
        .and_then(|()| consumer.store_offsets(&tpl));
    if let Err(e) = stored {
        // The partition was revoked meanwhile: the new owner redelivers the
        // record, and dedupe skips it.
        debug!(topic = msg.topic(), partition = msg.partition(), error = %e, "offset not stored");
    }
}

/// Receives rebalance and statistics callbacks on the poll thread.
struct KitContext {
    workers: Arc<Mutex<Workers>>,
    group: String,
    drain_timeout: Duration,
    /// The consumer itself, to split partition queues on assignment.
    consumer: std::sync::OnceLock<std::sync::Weak<KitConsumer>>,
    stats: Arc<ConsumerStats>,
    /// Since when offset commits fail, and when that was last said.
    commits_failing_since: Mutex<Option<(Instant, Instant)>>,
}

/// While offset commits keep failing, the warning is repeated this often.
const COMMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

impl ClientContext for KitContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        logs::librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        logs::librdkafka_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    telemetry::lag(&self.group, topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for KitContext {
    /// Every offset commit's outcome (the periodic ones and those on revoke
    /// and shutdown). A failure is counted, and said once, then once a
    /// minute while commits keep failing, and again when they work.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        let mut failing = self
            .commits_failing_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                if let Some((since, _)) = failing.take() {
                    info!(group = %self.group, failing_for = ?since.elapsed(), "offset commits work again");
                }
            }
            Err(e) if is_nothing_to_commit(&e) => {}
            Err(e) => {
                self.stats.add(StatField::OffsetCommitFailure);
                telemetry::offset_commit_failed(&self.group);
                let now = Instant::now();
                match failing.as_mut() {
                    None => {
                        warn!(group = %self.group, error = %e, "offset commit failed; processing goes on, and a restart redelivers what was applied since the last commit (dedupe skips it)");
                        *failing = Some((now, now));
                    }
                    Some((since, said)) if said.elapsed() >= COMMIT_WARNING_EVERY => {
                        warn!(group = %self.group, error = %e, failing_for = ?since.elapsed(), "offset commits still fail");
                        *said = now;
                    }
                    Some(_) => debug!(group = %self.group, error = %e, "offset commit failed"),
                }
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        info!(group = %self.group, partitions = ?keys, "partitions revoked; finishing their messages and committing offsets");
        lock(&self.workers).stop(&keys, self.drain_timeout);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(e) if is_nothing_to_commit(&e) => {}
            Err(e) => {
                warn!(error = %e, "could not commit offsets on revoke; the next owner will see redeliveries, which dedupe")
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let keys: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            info!(group = %self.group, partitions = ?keys, "partitions assigned");
            // Give each partition its own queue and worker before any of its
            // records is fetched.
            if let Some(consumer) = self.consumer.get().and_then(std::sync::Weak::upgrade) {
                let mut workers = lock(&self.workers);
                for key in keys {
                    workers.start(&consumer, key);
                }
            }
        }
    }
}
