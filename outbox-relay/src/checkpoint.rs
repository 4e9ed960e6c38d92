//! [`Checkpoint`]: the progress an exactly-once relay records in Kafka, in
//! the same transaction as the records of a batch (see
//! [`crate::RelayConfig::exactly_once`] and `docs/architecture.md`).
//!
//! One compacted topic (default `outbox-relay-checkpoints`, one partition)
//! holds one record per relay: the key is the relay's id, the value the
//! outbox ids of the last batch the relay committed in a Kafka transaction.
//! Because the value is written in that transaction, a `read_committed`
//! reader sees it if and only if the batch's records are visible too. After
//! a crash between the Kafka commit and the database commit, whoever takes
//! over (the relay itself, or another relay after fencing it) reads the
//! checkpoint and finishes the database side for those ids without sending
//! them again.
//!
//! Reading is exact, not best effort: [`read`] first waits until no
//! transaction that started before the read is still open on the topic
//! (its last stable offset reaches the high watermark seen at the start),
//! then reads to the end. A fenced relay's transaction is decided before
//! that (fencing aborts it), so its last committed checkpoint is always seen.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::Message,
    Offset, TopicPartitionList,
};
use serde::{Deserialize, Serialize};

/// The checkpoint topic's name unless configured otherwise.
pub const DEFAULT_TOPIC: &str = "outbox-relay-checkpoints";

/// The last batch one relay (poll source) or one slot's reader (WAL source)
/// committed in a Kafka transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The relay that wrote it. With the poll source it is also the
    /// record's key; with the WAL source the key is [`slot_key`].
    pub relay: String,
    /// The outbox ids published by that transaction, as inclusive ranges
    /// (with the WAL source: its rows; table-less events have no id).
    pub ids: Vec<(i64, i64)>,
    /// The relay's transaction counter since it started.
    pub transaction: u64,
    /// When it was written (the relay's clock).
    pub at: DateTime<Utc>,
    /// WAL source: the commit position (`X/Y`) of the batch's last
    /// transaction. Every transaction of the slot that ended at or before
    /// it is in Kafka; the next reader does not send those again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
}

/// The checkpoint record's key for the readers of the slot `slot` (WAL
/// source): one per slot, whichever relay reads it.
pub fn slot_key(slot: &str) -> String {
    format!("slot:{slot}")
}

impl Checkpoint {
    /// The checkpoint of a batch: `ids` in any order.
    pub fn new(relay: &str, transaction: u64, ids: &[i64]) -> Self {
        Self {
            relay: relay.to_string(),
            ids: ranges(ids),
            transaction,
            at: Utc::now(),
            lsn: None,
        }
    }

    /// Every id the checkpoint names.
    pub fn id_list(&self) -> Vec<i64> {
        self.ids.iter().flat_map(|&(lo, hi)| lo..=hi).collect()
    }

    /// How many ids it names.
    pub fn len(&self) -> usize {
        self.ids
            .iter()
            .map(|&(lo, hi)| (hi - lo + 1) as usize)
            .sum()
    }

    /// Whether it names no id.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The record value (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint serializes")
    }

    /// Parses a record value.
    pub fn decode(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

/// Sorted ids as inclusive ranges of consecutive ids.
fn ranges(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == id => *hi = id,
            _ => out.push((id, id)),
        }
    }
    out
}

/// Why the checkpoints could not be read or the topic not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The Kafka client failed; the source says how.
    #[error("checkpoint topic {topic:?}: {what}")]
    Kafka {
        /// The checkpoint topic.
        topic: String,
        /// What was being done.
        what: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// A transaction on the topic stayed open longer than the wait.
    #[error(
        "checkpoint topic {topic:?}: a transaction stayed open for more than {waited:?}; \
         the relay tries again (a relay stuck in a transaction is fenced or times out after \
         transaction.timeout.ms)"
    )]
    OpenTransaction {
        /// The checkpoint topic.
        topic: String,
        /// How long the read waited.
        waited: Duration,
    },
    /// A record on the topic is not a checkpoint.
    #[error("checkpoint topic {topic:?}: the record at offset {offset} is not a checkpoint: {reason}; is another application writing to this topic?")]
    Malformed {
        /// The checkpoint topic.
        topic: String,
        /// Where.
        offset: i64,
        /// Why.
        reason: String,
    },
}

fn kafka(topic: &str, what: &str) -> impl FnOnce(KafkaError) -> CheckpointError {
    let (topic, what) = (topic.to_string(), what.to_string());
    move |e| CheckpointError::Kafka {
        topic,
        what,
        source: Box::new(outbox_kafka::secrets::scrub(e)),
    }
}

/// Creates the checkpoint topic unless it exists: one partition, compacted,
/// with short segments so that compaction keeps it small, and the broker's
/// default replication factor. A topic the operator created is used as it
/// is (then the relay needs no permission to create topics). Blocking.
pub fn ensure_topic(connect: &ClientConfig, topic: &str) -> Result<(), CheckpointError> {
    let admin: AdminClient<DefaultClientContext> =
        connect.create().map_err(kafka(topic, "admin client"))?;
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka(topic, "metadata"))?;
    if md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(());
    }
    let spec = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "60000")
        .set("min.cleanable.dirty.ratio", "0.1")
        .set("delete.retention.ms", "60000");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics([&spec], &opts))
        .map_err(kafka(topic, "create"))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(CheckpointError::Kafka {
                    topic: topic.to_string(),
                    what: "create".into(),
                    source: Box::new(KafkaError::AdminOp(code)),
                })
            }
        }
    }
    Ok(())
}

/// Reads the latest checkpoint of every relay (or of `only` those) from
/// `topic`, as a `read_committed` reader, exactly (see the module doc).
/// A missing topic has no checkpoints. Blocking: at most `wait` for open
/// transactions, plus the read.
pub fn read(
    connect: &ClientConfig,
    topic: &str,
    only: Option<&[String]>,
    wait: Duration,
) -> Result<BTreeMap<String, Checkpoint>, CheckpointError> {
    let reader = |isolation: &str| -> Result<BaseConsumer<QuietEof>, CheckpointError> {
        let mut cc = connect.clone();
        cc.set("group.id", "outbox-relay-checkpoint-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            // At the end the broker would hold the fetch for 500 ms waiting
            // for data that is not coming; the read is over at the end.
            .set("fetch.wait.max.ms", "10")
            .set("isolation.level", isolation);
        cc.create_with_context(QuietEof)
            .map_err(kafka(topic, "reader"))
    };
    let uncommitted = reader("read_uncommitted")?;
    let committed = reader("read_committed")?;
    let md = uncommitted
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka(topic, "metadata"))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(BTreeMap::new());
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(BTreeMap::new()); // no such topic yet: no checkpoints
    }
    let started = Instant::now();
    let mut assign = TopicPartitionList::new();
    for p in t.partitions() {
        let id = p.id();
        let (low, high) = uncommitted
            .fetch_watermarks(topic, id, Duration::from_secs(10))
            .map_err(kafka(topic, "high watermark"))?;
        if high <= low {
            continue;
        }
        // Wait until every transaction that started before `high` is decided.
        loop {
            let (_, stable) = committed
                .fetch_watermarks(topic, id, Duration::from_secs(10))
                .map_err(kafka(topic, "last stable offset"))?;
            if stable >= high {
                break;
            }
            if started.elapsed() > wait {
                return Err(CheckpointError::OpenTransaction {
                    topic: topic.to_string(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assign
            .add_partition_offset(topic, id, Offset::Beginning)
            .map_err(kafka(topic, "assign"))?;
    }
    let mut latest = BTreeMap::new();
    let mut open = assign.count();
    if open == 0 {
        return Ok(latest);
    }
    committed.assign(&assign).map_err(kafka(topic, "assign"))?;
    let deadline = Instant::now() + wait.max(Duration::from_secs(30));
    while open > 0 {
        if Instant::now() > deadline {
            return Err(CheckpointError::OpenTransaction {
                topic: topic.to_string(),
                waited: wait,
            });
        }
        match committed.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => return Err(kafka(topic, "read")(e)),
            Some(Ok(m)) => {
                let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                    continue;
                };
                if only.is_some_and(|o| !o.contains(&key)) {
                    continue;
                }
                match m.payload() {
                    None => {
                        latest.remove(&key); // a tombstone
                    }
                    Some(v) => {
                        let ck = Checkpoint::decode(v).map_err(|e| CheckpointError::Malformed {
                            topic: topic.to_string(),
                            offset: m.offset(),
                            reason: e.to_string(),
                        })?;
                        latest.insert(key, ck);
                    }
                }
            }
        }
    }
    Ok(latest)
}

/// The readers' client context: the end of a partition is how a read
/// finishes, not an error to log; other errors are logged as warnings.
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, reason, "checkpoint reader");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// The connection settings of `properties` (security, SASL, TLS, socket and
/// broker address settings), for the checkpoint's readers and the fencing
/// producers, which must reach the same cluster as the relay's producer.
pub fn connection_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    let connection: BTreeMap<String, String> = properties
        .iter()
        .filter(|(k, _)| {
            [
                "security.",
                "sasl.",
                "ssl.",
                "ssl_",
                "socket.",
                "broker.",
                "client.",
                "api.",
                "metadata.",
                "reconnect.",
                "enable.ssl",
                "connections.",
                "topic.metadata",
            ]
            .iter()
            .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    outbox_kafka::secrets::set_all(&mut cc, &connection);
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_ranges_and_come_back_whole() {
        let ck = Checkpoint::new("r1", 7, &[5, 3, 4, 10, 12, 11, 20, 4]);
        assert_eq!(ck.ids, vec![(3, 5), (10, 12), (20, 20)]);
        assert_eq!(ck.id_list(), vec![3, 4, 5, 10, 11, 12, 20]);
        assert_eq!(ck.len(), 7);
        let back = Checkpoint::decode(&ck.encode()).expect("round trip");
        assert_eq!(back, ck);
        assert!(Checkpoint::new("r", 0, &[]).is_empty());
    }

    #[test]
    fn only_connection_settings_reach_the_readers() {
        let props: BTreeMap<String, String> = [
            ("sasl.password", "s3cret"),
            ("security.protocol", "SASL_SSL"),
            ("linger.ms", "5"),
            ("acks", "all"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cc = connection_config("b:9092", &props);
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("sasl.password"), Some("s3cret"));
        assert_eq!(cc.get("linger.ms"), None);
        assert_eq!(cc.get("acks"), None);
    }
}
