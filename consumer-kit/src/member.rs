//! The group member: the consumer's librdkafka client, the poll thread and
//! the partition workers. One piece because they are one protocol:
//! librdkafka calls the context (`KitContext`) on the poll thread when
//! partitions are assigned or revoked, the context starts and stops the
//! workers, and each worker settles its partition's records in offset order
//! (`process.rs`), storing each offset only after its database commit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use outbox_kafka::logs;
use rdkafka::{
    client::ClientContext,
    consumer::{
        base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer as _, ConsumerContext,
        Rebalance,
    },
    error::{KafkaError, KafkaResult, RDKafkaErrorCode},
    statistics::Statistics,
    Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    config::Ordering,
    error::ConsumerError,
    health::{assigned_in, Health, Phase, GROUP_CHECK_EVERY},
    kafka_config,
    message::Message,
    park::PARK_CHECK_EVERY,
    process::{drain_discarded, process_batch, Done, Shared},
    telemetry::{self, ConsumerStats, StatField},
};

/// A member of the consumer group, subscribed and ready to serve.
pub(crate) struct Member {
    consumer: Arc<KitConsumer>,
    workers: Arc<Mutex<Workers>>,
}

impl Member {
    /// Creates the group consumer and subscribes to the configured topics.
    pub(crate) fn join(shared: &Arc<Shared>) -> Result<Self, ConsumerError> {
        let cfg = &shared.cfg;
        let workers = Arc::new(Mutex::new(Workers::new(
            tokio::runtime::Handle::current(),
            Arc::clone(shared),
        )));
        let context = KitContext {
            workers: Arc::clone(&workers),
            group: cfg.group_id.clone(),
            drain_timeout: cfg.drain_timeout,
            consumer: std::sync::OnceLock::new(),
            stats: Arc::clone(&shared.stats),
            health: Arc::clone(&shared.health),
            lag_every: cfg.lag_interval,
            lag_said: Mutex::new(None),
            commits_failing_since: Mutex::new(None),
        };
        let consumer: BaseConsumer<KitContext> = kafka_config::consumer_config(cfg)
            .create_with_context(context)
            .map_err(outbox_kafka::secrets::scrub)?;

        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self { consumer, workers })
    }

    /// Reads the group's assignment every [`GROUP_CHECK_EVERY`] until `stop`,
    /// and tells the health how many partitions of its topics no member
    /// owns.
    pub(crate) fn watch_group(&self, stop: CancellationToken) {
        let consumer = Arc::downgrade(&self.consumer);
        let (group, topics) = {
            let ctx = self.consumer.context();
            (
                ctx.group.clone(),
                lock(&ctx.workers).shared.cfg.topics.clone(),
            )
        };
        let health = Arc::clone(&self.consumer.context().health);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(GROUP_CHECK_EVERY) => {}
                }
                let (consumer, group, topics) = (consumer.clone(), group.clone(), topics.clone());
                let unowned = tokio::task::spawn_blocking(move || {
                    let consumer = consumer.upgrade()?;
                    unowned_partitions(&consumer, &group, &topics)
                })
                .await
                .ok()
                .flatten();
                if let Some(n) = unowned {
                    health.set_unowned(n);
                    health.publish();
                }
            }
        });
    }

    /// Serves the group on a blocking thread until `shutdown`, then drains
    /// the workers, commits and leaves.
    pub(crate) async fn serve(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let Self { consumer, workers } = self;
        tokio::task::spawn_blocking(move || poll_loop(consumer, workers, shutdown))
            .await
            .map_err(|e| ConsumerError::Internal(e.to_string()))?
    }
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
                let msg = Message::from_kafka(&msg);
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
    consumer.context().health.set_phase(Phase::Stopping);
    let drain = consumer.context().drain_timeout;
    let unfinished = lock(&workers).stop_all(drain);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => debug!("offsets committed on shutdown"),
        Err(e) if is_nothing_to_commit(&e) => {}
        Err(e) => {
            warn!(error = %e, "could not commit offsets on shutdown; the next owner will see redeliveries, which dedupe")
        }
    }
    // Dropping the last handle closes the consumer and leaves the group. A
    // handler that could not be stopped still holds one.
    drop(consumer);
    if !unfinished.stuck.is_empty() && result.is_ok() {
        result = Err(ConsumerError::ShutdownIncomplete(format!(
            "the handler of {} blocks its thread past drain_timeout and could not be stopped; \
             the Kafka consumer leaves the group only once it returns (it is aborted then: its \
             transaction rolls back and its offset is not stored)",
            unfinished.stuck.join(", ")
        )));
    }
    result
}

/// How many partitions of `topics` no member of `group` owns, from the
/// group coordinator's view of each member's assignment and the topics'
/// metadata. `None` when either cannot be read (or the group is not a
/// classic consumer group with readable assignments).
fn unowned_partitions(consumer: &KitConsumer, group: &str, topics: &[String]) -> Option<usize> {
    let timeout = Duration::from_secs(5);
    let groups = consumer.fetch_group_list(Some(group), timeout).ok()?;
    let info = groups.groups().iter().find(|g| g.name() == group)?;
    let mut owned = std::collections::HashSet::new();
    for member in info.members() {
        // A member without an assignment (joining, or mid-rebalance) owns
        // nothing.
        match member.assignment() {
            None | Some([]) => {}
            Some(bytes) => owned.extend(assigned_in(bytes)?),
        }
    }
    let mut unowned = 0;
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let t = metadata.topics().iter().find(|t| t.name() == topic)?;
        unowned += t
            .partitions()
            .iter()
            .filter(|p| !owned.contains(&(topic.clone(), p.id())))
            .count();
    }
    Some(unowned)
}

fn is_nothing_to_commit(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
}

fn lock_plain<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock(workers: &Mutex<Workers>) -> std::sync::MutexGuard<'_, Workers> {
    // A poisoned lock only means a panic elsewhere; the map is still usable.
    workers.lock().unwrap_or_else(|p| p.into_inner())
}

type PartitionKey = (String, i32);
type KitConsumer = BaseConsumer<KitContext>;

/// The (topic, partition) of each element of `tpl`.
fn keys_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// The partition workers of this member: one per assigned partition.
struct Workers {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    map: HashMap<PartitionKey, Worker>,
}

struct Worker {
    /// Records that reached the main queue instead of the partition queue.
    side: mpsc::UnboundedSender<Message>,
    stop: CancellationToken,
    /// Disconnected when the worker task has ended.
    done: std::sync::mpsc::Receiver<()>,
    /// The worker task, aborted when its message outlives the drain.
    task: tokio::task::JoinHandle<()>,
    /// The offset of the message being handled, or -1.
    handling: Arc<std::sync::atomic::AtomicI64>,
}

/// How long an aborted worker gets to end (its transaction is dropped,
/// which rolls it back). A handler blocking its thread cannot be aborted.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// What a stop of workers could not finish.
#[derive(Debug, Default)]
struct Unfinished {
    /// Messages still being handled at the deadline, aborted: their
    /// transactions rolled back and their offsets not stored, so they are
    /// redelivered (as `topic/partition@offset`).
    abandoned: Vec<String>,
    /// Of those, the ones whose handler did not even end when aborted (it
    /// blocks its thread); they still hold the consumer.
    stuck: Vec<String>,
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
        let handling = Arc::new(std::sync::atomic::AtomicI64::new(-1));
        let link = Link {
            partition: key.clone(),
            stop: stop.clone(),
            _done: done_tx,
            handling: Arc::clone(&handling),
        };
        let task = self.runtime.spawn(run_worker(
            Arc::clone(&self.shared),
            Arc::clone(consumer),
            queue,
            notify,
            side_rx,
            link,
        ));
        self.map.insert(
            key,
            Worker {
                side,
                stop,
                done,
                task,
                handling,
            },
        );
    }

    /// Gives a record that arrived on the main queue to its worker.
    fn hand_over(&mut self, consumer: &Arc<KitConsumer>, msg: Message) {
        let key = (msg.topic().to_string(), msg.partition());
        self.start(consumer, key.clone());
        if let Some(worker) = self.map.get(&key) {
            let _ = worker.side.send(msg);
        }
    }

    /// Stops the workers of `keys` and waits, up to `timeout` in all, for the
    /// messages they are handling to settle (and their offsets to be stored).
    /// A message still being handled then is abandoned: its worker is
    /// aborted, which rolls its transaction back and never stores its
    /// offset, so it is redelivered (and applied once).
    fn stop(&mut self, keys: &[PartitionKey], timeout: Duration) -> Unfinished {
        let stopped: Vec<(PartitionKey, Worker)> = keys
            .iter()
            .filter_map(|k| self.map.remove(k).map(|w| (k.clone(), w)))
            .collect();
        for (_, w) in &stopped {
            w.stop.cancel();
        }
        let deadline = Instant::now() + timeout;
        let mut unfinished = Unfinished::default();
        for ((topic, partition), w) in stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if ended(&w.done, left) {
                continue;
            }
            let offset = w.handling.load(std::sync::atomic::Ordering::SeqCst);
            let at = format!("{topic}/{partition}@{offset}");
            w.task.abort();
            if ended(&w.done, ABORT_WAIT) {
                warn!(message = %at, "still being handled after drain_timeout: abandoned (its transaction rolled back, its offset not stored; it is redelivered and applied once)");
            } else {
                error!(message = %at, "still being handled after drain_timeout, and its handler blocks its thread so it could not be stopped; it holds the Kafka consumer until it returns, and is aborted then");
                unfinished.stuck.push(at.clone());
            }
            unfinished.abandoned.push(at);
        }
        unfinished
    }

    fn stop_all(&mut self, timeout: Duration) -> Unfinished {
        let keys: Vec<PartitionKey> = self.map.keys().cloned().collect();
        self.stop(&keys, timeout)
    }
}

/// What ties a worker task to its [`Worker`] entry.
struct Link {
    /// The worker's partition.
    partition: PartitionKey,
    /// Cancelled to stop the worker (revoke, shutdown).
    stop: CancellationToken,
    /// Dropped when the task ends (or is aborted): `Worker::done` then
    /// disconnects.
    _done: std::sync::mpsc::Sender<()>,
    /// The offset of the message being handled, or -1.
    handling: Arc<std::sync::atomic::AtomicI64>,
}

/// Whether the worker whose `done` channel this is has ended, waiting up to
/// `wait`.
fn ended(done: &std::sync::mpsc::Receiver<()>, wait: Duration) -> bool {
    matches!(
        done.recv_timeout(wait),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
    )
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
    mut side: mpsc::UnboundedReceiver<Message>,
    link: Link,
) {
    let Link {
        partition: (topic, partition),
        stop,
        handling,
        ..
    } = &link;
    let mut handled = Handled::default();
    // A late record met while a batch was being gathered: settled next.
    let mut carried: Option<Message> = None;
    // Under park-key, blocks an operator discarded are drained between
    // messages (and while the partition is idle).
    let parking = shared.cfg.ordering == Ordering::ParkKey;
    let mut park_check = tokio::time::interval(PARK_CHECK_EVERY);
    park_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = match carried.take() {
            Some(msg) => msg,
            None => tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(msg) = side.recv() => msg,
                msg = next_from_queue(queue.as_ref(), &notify) => msg,
                _ = park_check.tick(), if parking => {
                    let permit = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        permit = shared.permits.acquire() => permit,
                    };
                    let done = drain_discarded(&shared, topic, *partition, stop).await;
                    drop(permit);
                    if done == Done::Abandoned {
                        break;
                    }
                    continue;
                }
            },
        };
        match handled.arrival(msg.offset()) {
            Arrival::New => {}
            Arrival::Again => continue,
            Arrival::Late => {
                error!(topic = %topic, partition = *partition, offset = msg.offset(), handled_from = handled.first, "a record arrived after newer ones of its partition; settling it now (its key's order may be broken)");
            }
        }
        handled.take(msg.offset());
        // The messages already waiting behind it, up to `max_batch`: settled
        // together in one transaction when they can be (`process_batch`).
        let mut batch = vec![msg];
        while batch.len() < shared.cfg.max_batch {
            let next = match side.try_recv() {
                Ok(m) => Some(m),
                Err(_) => match queue.as_ref().map(|q| q.poll(Duration::ZERO)) {
                    Some(Some(Ok(m))) => Some(Message::from_kafka(&m)),
                    _ => None,
                },
            };
            let Some(m) = next else { break };
            match handled.arrival(m.offset()) {
                Arrival::New => {
                    handled.take(m.offset());
                    batch.push(m);
                }
                Arrival::Again => {}
                Arrival::Late => {
                    carried = Some(m);
                    break;
                }
            }
        }
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = shared.permits.acquire() => permit,
        };
        handling.store(batch[0].offset(), std::sync::atomic::Ordering::SeqCst);
        let settled = process_batch(&shared, &batch, stop).await;
        handling.store(-1, std::sync::atomic::Ordering::SeqCst);
        if let Some(last) = settled.checked_sub(1) {
            // Offsets are cumulative: the last settled one covers the rest.
            store_offset(&consumer, &batch[last]);
        }
        drop(permit);
        if settled < batch.len() {
            break;
        }
    }
}

/// The offsets a partition worker has handled: from `first` up to, not
/// including, `next`. A record reaches the worker by its partition's queue
/// or, rarely, by the main queue (`Workers::hand_over`); this says whether
/// it is new, seen already, or late: older than anything handled, so never
/// handled here and never to be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handled {
    first: i64,
    next: i64,
}

impl Default for Handled {
    fn default() -> Self {
        Self {
            first: i64::MAX,
            next: -1,
        }
    }
}

/// How a record arrives at its partition's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Past everything handled: the normal case.
    New,
    /// Among the offsets handled already (the same record by both routes):
    /// skipped.
    Again,
    /// Before the first offset handled: settled, out of order.
    Late,
}

impl Handled {
    fn arrival(&self, offset: i64) -> Arrival {
        if offset >= self.next {
            Arrival::New
        } else if offset >= self.first {
            Arrival::Again
        } else {
            Arrival::Late
        }
    }

    fn take(&mut self, offset: i64) {
        self.first = self.first.min(offset);
        self.next = offset + 1;
    }
}

/// The next record of the partition queue, waiting (without blocking a
/// thread) until one arrives. Never returns without a queue.
async fn next_from_queue(
    queue: Option<&PartitionQueue<KitContext>>,
    notify: &tokio::sync::Notify,
) -> Message {
    let Some(queue) = queue else {
        return std::future::pending().await;
    };
    loop {
        match queue.poll(Duration::ZERO) {
            Some(Ok(msg)) => return Message::from_kafka(&msg),
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

fn store_offset(consumer: &KitConsumer, msg: &Message) {
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
    health: Arc<Health>,
    /// How often the lag gauge is refreshed (`None`: never), and when it
    /// last was.
    lag_every: Option<Duration>,
    lag_said: Mutex<Option<Instant>>,
    /// Since when offset commits fail, and when that was last said.
    commits_failing_since: Mutex<Option<(Instant, Instant)>>,
}

impl KitContext {
    /// Gives each newly assigned partition its own queue and worker before
    /// librdkafka starts fetching it, so that every record of the partition
    /// arrives on that queue. Split after the assignment instead (as this
    /// once was), the records fetched in between went to the main queue and
    /// could reach the worker after newer ones from its own queue.
    fn before_assign(&self, tpl: &TopicPartitionList) {
        let keys = keys_of(tpl);
        info!(group = %self.group, partitions = ?keys, "partitions assigned");
        if let Some(consumer) = self.consumer.get().and_then(std::sync::Weak::upgrade) {
            let mut workers = lock(&self.workers);
            for key in keys {
                workers.start(&consumer, key);
            }
            self.health.set_assigned(workers.map.len());
        }
    }
}

/// While offset commits keep failing, the warning is repeated this often.
const COMMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

impl ClientContext for KitContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        logs::librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.health.broker_error(&error);
        logs::librdkafka_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.health.broker_saw(&statistics);
        self.health.publish();
        let Some(every) = self.lag_every else {
            return;
        };
        {
            let mut said = lock_plain(&self.lag_said);
            if said.is_some_and(|t| t.elapsed() < every) {
                return;
            }
            *said = Some(Instant::now());
        }
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
        let tpl = match rebalance {
            Rebalance::Assign(tpl) => return self.before_assign(tpl),
            Rebalance::Revoke(tpl) => tpl,
            Rebalance::Error(_) => return,
        };
        let keys = keys_of(tpl);
        info!(group = %self.group, partitions = ?keys, "partitions revoked; finishing their messages and committing offsets");
        // What could not finish is said by `stop` (abandoned messages are
        // redelivered to the next owner).
        let mut workers = lock(&self.workers);
        let _ = workers.stop(&keys, self.drain_timeout);
        self.health.set_assigned(workers.map.len());
        drop(workers);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(e) if is_nothing_to_commit(&e) => {}
            Err(e) => {
                warn!(error = %e, "could not commit offsets on revoke; the next owner will see redeliveries, which dedupe")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Arrival, Handled};

    #[test]
    fn a_record_older_than_all_handled_is_late_never_seen() {
        let mut h = Handled::default();
        assert_eq!(h.arrival(442), Arrival::New);
        for offset in 442..=540 {
            h.take(offset);
        }
        // The same record by both routes is skipped.
        assert_eq!(h.arrival(500), Arrival::Again);
        assert_eq!(h.arrival(540), Arrival::Again);
        assert_eq!(h.arrival(541), Arrival::New);
        // A record fetched before the partition had its own queue, arriving
        // after newer ones: never handled here, so it must be settled.
        assert_eq!(h.arrival(334), Arrival::Late);
        h.take(334);
        assert_eq!(h.arrival(335), Arrival::New);
        assert_eq!(h.arrival(333), Arrival::Late);
    }
}
