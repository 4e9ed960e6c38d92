//! [`Publisher`]: sends a whole batch pipelined, then collects every
//! delivery report, and classifies failures as permanent or transient.
//!
//! Never one send awaited before the next: all records of a batch are handed
//! to librdkafka first, then the delivery futures are awaited together. The
//! producer is idempotent with `acks=all`, so librdkafka's own retries keep
//! per-partition order and add no duplicates.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    config::ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord, Producer},
    types::RDKafkaRespErr,
};

use outbox_kafka::{Reach, WatchedContext};

use crate::{config::RelayConfig, record::Record};

/// How long a topic seen in the broker's metadata is trusted without asking again.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(300);

/// The partitioner the relay sets unless `--kafka-property partitioner=…`
/// overrides it: `murmur2_random`, the Java client's choice for keyed records
/// (records without a key go to a random partition).
pub const PARTITIONER: &str = "murmur2_random";

/// The outcome of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Kafka acknowledged it (`acks=all`).
    Delivered,
    /// It can never be published as it is; the reason says why.
    Permanent(String),
    /// It may succeed later (broker unavailable, timeout).
    Transient(String),
}

/// Why the Kafka producer could not be created (usually a bad
/// `--kafka-property`). The source is librdkafka's error, with the values
/// of secret properties masked.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the Kafka producer")]
pub struct PublisherError(#[source] KafkaError);

/// A topic's state in the broker's metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicState {
    /// The topic exists.
    Exists,
    /// The broker answered that the topic does not exist.
    Missing,
    /// The broker could not be asked.
    Unknown(String),
}

/// The Kafka side of the relay.
pub struct Publisher {
    /// Whether the producer is connected to a broker now, for readiness.
    reach: Arc<Reach>,
    producer: std::sync::RwLock<FutureProducer<WatchedContext>>,
    client_config: ClientConfig,
    timeout: Duration,
    known_topics: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Creates the producer: idempotent, `acks=all`, delivery timeout from
    /// [`RelayConfig::publish_timeout`], transactional in exactly-once mode
    /// (with `RelayConfig::transactional_id`), then the configured
    /// librdkafka properties (which override these).
    pub fn new(cfg: &RelayConfig, relay_id: &str) -> Result<Self, PublisherError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("batch.num.messages", "10000")
            .set(
                "queue.buffering.max.messages",
                (cfg.batch_size * 4).max(100_000).to_string(),
            )
            .set(
                "message.timeout.ms",
                cfg.publish_timeout.as_millis().to_string(),
            )
            .set("client.id", "outbox-relay")
            // The Java client's partitioner for keyed records: murmur2 of
            // the key. A key lands on the partition Java producers, Kafka
            // Connect and Debezium pick (librdkafka's default is CRC32).
            .set("partitioner", PARTITIONER)
            // Broker connection states every second, for readiness.
            .set(
                "statistics.interval.ms",
                outbox_kafka::reach::STATS_INTERVAL_MS,
            );
        if cfg.exactly_once {
            cc.set("transactional.id", cfg.transactional_id(relay_id))
                .set(
                    "transaction.timeout.ms",
                    cfg.transaction_timeout.as_millis().to_string(),
                );
        }
        outbox_kafka::secrets::set_all(&mut cc, &cfg.kafka_properties);
        let reach = Arc::new(Reach::default());
        if cc
            .get("statistics.interval.ms")
            .is_some_and(|v| v.trim() == "0")
        {
            // Statistics turned off: connected until librdkafka says all
            // brokers are down, and again after the next delivery.
            reach.up();
        }
        let producer: FutureProducer<WatchedContext> = cc
            .create_with_context(WatchedContext::new(Arc::clone(&reach)))
            .map_err(|e| PublisherError(outbox_kafka::secrets::scrub(e)))?;
        Ok(Self {
            reach,
            producer: std::sync::RwLock::new(producer),
            client_config: cc,
            timeout: cfg.publish_timeout,
            known_topics: Mutex::new(HashMap::new()),
        })
    }

    fn producer(&self) -> FutureProducer<WatchedContext> {
        self.producer.read().expect("producer lock").clone()
    }

    /// The producer's fatal error, if it has one: it can then never send
    /// again and must be replaced ([`Publisher::rebuild`]).
    pub fn fatal_error(&self) -> Option<String> {
        self.producer()
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Replaces the producer with a new instance (new producer id). The
    /// relay does this when the producer has a fatal error, see
    /// `Relay::replace_producer_if_fatal`. Records still
    /// queued in the old instance are abandoned; their rows were rolled back
    /// and are claimed again.
    pub fn rebuild(&self) -> Result<(), PublisherError> {
        let fresh: FutureProducer<WatchedContext> = self
            .client_config
            .create_with_context(WatchedContext::new(Arc::clone(&self.reach)))
            .map_err(|e| PublisherError(outbox_kafka::secrets::scrub(e)))?;
        *self.producer.write().expect("producer lock") = fresh;
        self.known_topics.lock().expect("topic cache").clear();
        Ok(())
    }

    /// Exactly-once mode: registers the transactional id with its
    /// coordinator, which aborts a transaction an earlier producer with this
    /// id left open and fences that producer. Needed once per producer
    /// instance (also after [`Publisher::rebuild`]).
    pub async fn init_transactions(&self) -> Result<(), KafkaError> {
        let timeout = self.timeout.max(Duration::from_secs(30));
        self.blocking(move |p| p.init_transactions(timeout)).await
    }

    /// Exactly-once mode: begins a transaction.
    pub async fn begin(&self) -> Result<(), KafkaError> {
        self.blocking(|p| p.begin_transaction()).await
    }

    /// Exactly-once mode: commits the transaction in progress.
    ///
    /// Every delivery report of the batch has been received when this is
    /// called, but librdkafka counts a record as outstanding until the poll
    /// thread has finished with its report. rust-rdkafka's commit flushes
    /// first, and a flush that finds one still outstanding waits on the
    /// event queue for up to 100 ms (measured: 4% of commits at 2,000
    /// events/s took 100-200 ms). So the count is awaited here, for at most
    /// 50 ms, in 0.2 ms steps.
    pub async fn commit(&self) -> Result<(), KafkaError> {
        let timeout = self.timeout;
        self.blocking(move |p| {
            let settle_by = Instant::now() + Duration::from_millis(50);
            while p.in_flight_count() > 0 && Instant::now() < settle_by {
                std::thread::sleep(Duration::from_micros(200));
            }
            p.commit_transaction(timeout)
        })
        .await
    }

    /// Exactly-once mode: aborts the transaction in progress.
    pub async fn abort(&self) -> Result<(), KafkaError> {
        let timeout = self.timeout;
        self.blocking(move |p| p.abort_transaction(timeout)).await
    }

    /// Runs a blocking producer call off the async runtime.
    async fn blocking(
        &self,
        f: impl FnOnce(&FutureProducer<WatchedContext>) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), KafkaError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || f(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
            .map_err(outbox_kafka::secrets::scrub)
    }

    /// The producer's connection to the cluster, for readiness.
    pub fn reach(&self) -> Arc<Reach> {
        Arc::clone(&self.reach)
    }

    /// Asks the broker whether `topic` exists (cached for known topics).
    pub async fn topic_state(&self, topic: &str) -> TopicState {
        if let Some(seen) = self.known_topics.lock().expect("topic cache").get(topic) {
            if seen.elapsed() < TOPIC_CACHE_TTL {
                return TopicState::Exists;
            }
        }
        let producer = self.producer();
        let name = topic.to_string();
        let state = tokio::task::spawn_blocking(move || {
            match producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
            {
                Ok(md) => match md.topics().iter().find(|t| t.name() == name) {
                    Some(t) => match t.error() {
                        None if !t.partitions().is_empty() => TopicState::Exists,
                        None => TopicState::Missing,
                        Some(e) if is_missing_topic(e) => TopicState::Missing,
                        Some(e) => TopicState::Unknown(format!("metadata error {e:?}")),
                    },
                    None => TopicState::Missing,
                },
                Err(e) => TopicState::Unknown(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| TopicState::Unknown(e.to_string()));
        if state == TopicState::Exists {
            self.known_topics
                .lock()
                .expect("topic cache")
                .insert(topic.to_string(), Instant::now());
        }
        state
    }

    /// Forgets what is known about `topic` (after a delivery error on it).
    pub fn forget_topic(&self, topic: &str) {
        self.known_topics.lock().expect("topic cache").remove(topic);
    }

    /// Publishes `records` pipelined and returns one outcome per record, in
    /// order. A `None` entry is not sent, and its outcome is `None`; so is a
    /// sent record's if no delivery report came within the safety net
    /// (`publish_timeout` + 5 s; librdkafka reports every record by
    /// `message.timeout.ms`, so this should never happen).
    pub async fn publish(&self, records: Vec<Option<Record>>) -> Vec<Option<Outcome>> {
        let producer = self.producer();
        let limit = self
            .client_config
            .get("message.max.bytes")
            .unwrap_or("1000000")
            .to_string();
        let limit = limit.as_str();
        let mut pending = Vec::with_capacity(records.len());
        for record in records {
            let Some(rec) = record else {
                pending.push(Slot::Skipped);
                continue;
            };
            pending.push(enqueue(&producer, rec, limit).await);
        }
        // Every record is in librdkafka's queue now; collect the reports.
        let n = pending.len();
        let waits = pending.into_iter().map(|slot| async move {
            match slot {
                Slot::Skipped => None,
                Slot::Done(outcome) => Some(outcome),
                Slot::InFlight(fut, size) => Some(match fut.await {
                    Ok(Ok(_)) => Outcome::Delivered,
                    Ok(Err((err, _))) => classify_sized(&err, size, limit),
                    Err(_) => Outcome::Transient("producer dropped the delivery report".into()),
                }),
            }
        });
        let deadline = self.timeout + Duration::from_secs(5);
        match tokio::time::timeout(deadline, futures::future::join_all(waits)).await {
            Ok(outcomes) => {
                if outcomes.contains(&Some(Outcome::Delivered)) {
                    self.reach.up();
                }
                outcomes
            }
            // librdkafka reports every message by message.timeout.ms; this is
            // a safety net only.
            Err(_) => vec![None; n],
        }
    }

    /// Waits up to `timeout` for queued records to be delivered; what is
    /// still queued then is dropped (its rows were rolled back and stay
    /// pending), so that closing the producer does not wait on it.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        let producer = self.producer();
        producer.flush(timeout).map_err(|e| {
            producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            e.to_string()
        })
    }
}

async fn enqueue(producer: &FutureProducer<WatchedContext>, rec: Record, limit: &str) -> Slot {
    let Record {
        topic,
        key,
        value,
        headers,
    } = rec;
    let size = Size {
        key: key.len(),
        value: value.as_ref().map_or(0, Vec::len),
        headers: {
            use rdkafka::message::Headers;
            headers
                .iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        },
    };
    let mut fr = FutureRecord::to(&topic)
        .key(key.as_bytes())
        .headers(headers);
    if let Some(v) = value.as_deref() {
        fr = fr.payload(v);
    }
    loop {
        match producer.send_result(fr) {
            Ok(fut) => return Slot::InFlight(fut, size),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // Local queue full: wait for deliveries to drain it.
                fr = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((err, _)) => return Slot::Done(classify_sized(&err, size, limit)),
        }
    }
}

enum Slot {
    Skipped,
    Done(Outcome),
    InFlight(rdkafka::producer::DeliveryFuture, Size),
}

/// What a record carries, in bytes, for a too-large record's reason.
#[derive(Debug, Clone, Copy)]
struct Size {
    key: usize,
    value: usize,
    headers: usize,
}

/// [`classify`], and for a record too large, its size and the limits.
fn classify_sized(err: &KafkaError, size: Size, producer_limit: &str) -> Outcome {
    use RDKafkaErrorCode as C;
    match (classify(err), err.rdkafka_error_code()) {
        (Outcome::Permanent(reason), Some(C::MessageSizeTooLarge | C::InvalidMessageSize)) => {
            Outcome::Permanent(format!(
                "{reason}: the record is {} bytes (key {}, value {}, headers {}); the limits \
                 are the producer's message.max.bytes ({producer_limit}) and the topic's \
                 max.message.bytes",
                size.key + size.value + size.headers,
                size.key,
                size.value,
                size.headers
            ))
        }
        (outcome, _) => outcome,
    }
}

fn is_missing_topic(e: RDKafkaRespErr) -> bool {
    matches!(
        RDKafkaErrorCode::from(e),
        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
    )
}

/// Sorts a producer error into permanent (the record itself is the problem,
/// or the relay is not allowed to write it) or transient (anything else).
pub fn classify(err: &KafkaError) -> Outcome {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            code @ (C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::UnknownTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed),
        ) => Outcome::Permanent(format!("{code:?}: {err}")),
        _ => Outcome::Transient(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_problems_are_permanent_and_broker_problems_transient() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&too_big), Outcome::Permanent(_)));
        let auth = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(matches!(classify(&auth), Outcome::Permanent(_)));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(classify(&timeout), Outcome::Transient(_)));
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        assert!(matches!(classify(&down), Outcome::Transient(_)));
    }
}
