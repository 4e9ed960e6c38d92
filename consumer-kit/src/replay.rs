//! The operator's side of the dead-letter topic: [`read`] lists dead letters
//! (no consumer group, nothing committed), and [`replay`] sends chosen ones
//! back to their original topics and partitions with their original key,
//! value and headers, so each keeps its `ce_id` and dedupes as usual, and
//! joins its key's sequence. The
//! `outbox-dlq` command is a thin shell over these two.

use std::{collections::BTreeMap, time::Duration};

use outbox_kafka::QuietContext;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::{Header, Message, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};

use crate::dead_letter::{DeadLetter, DeadLetterFilter, ORIGINAL_TOPIC};
use crate::kafka_config::{client_config, producer_config};

/// Why dead letters could not be read or replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The Kafka client could not be created or the broker did not answer.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The dead-letter topic does not exist.
    #[error("topic {0} does not exist on the broker; check the name (the default is <topic>.dlq)")]
    MissingTopic(String),
    /// Reading stopped before the end of the topic.
    #[error("reading dead letters stopped: {0}")]
    Interrupted(String),
    /// A dead letter lacks `dlq_original_topic`, so it cannot be replayed.
    #[error("dead letter {topic}/{partition}@{offset} has no {ORIGINAL_TOPIC} header; it was not written by consumer-kit")]
    NoOriginalTopic {
        /// Its dead-letter topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
}

/// Reads every record of `dlq_topic` present when the call starts (up to
/// the high watermarks, so it ends) and returns those `filter` matches, in
/// partition then offset order. It uses no consumer group and commits
/// nothing, so it can run any number of times.
pub async fn read(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    dlq_topic: &str,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let brokers = brokers.to_string();
    let properties = properties.clone();
    let topic = dlq_topic.to_string();
    let filter = filter.clone();
    tokio::task::spawn_blocking(move || read_blocking(&brokers, &properties, &topic, &filter))
        .await
        .map_err(|e| DeadLetterError::Interrupted(format!("the reader task failed: {e}")))?
}

fn read_blocking(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let mut cc = client_config(brokers, properties);
    cc.set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("group.id", "consumer-kit-dlq-reader");
    let consumer: BaseConsumer<QuietContext> = cc
        .create_with_context(QuietContext)
        .map_err(outbox_kafka::secrets::scrub)?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(DeadLetterError::MissingTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut remaining = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            remaining.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(DeadLetterError::Interrupted(format!(
                "reading {topic} did not reach its end within 60 s; is the broker answering?"
            )));
        }
        let Some(result) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = result?.detach();
        let p = msg.partition();
        if let Some(high) = remaining.get(&p).copied() {
            if msg.offset() + 1 >= high {
                remaining.remove(&p);
            }
            if msg.offset() < high {
                let letter = DeadLetter::from_message(&msg);
                if filter.matches(&letter) {
                    out.push(letter);
                }
            }
        }
    }
    out.sort_by_key(|l| (l.dlq_partition, l.dlq_offset));
    Ok(out)
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters sent back to their original topic.
    pub replayed: usize,
}

/// Sends each dead letter back to its original topic, with its original
/// key, value and headers, and waits for every acknowledgement. Letters are
/// sent in the order given (per original partition, that is the order they
/// were dead-lettered in when they come from [`read`]).
pub async fn replay(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    letters: &[DeadLetter],
) -> Result<ReplayReport, DeadLetterError> {
    for l in letters {
        if l.original_topic.is_none() {
            return Err(DeadLetterError::NoOriginalTopic {
                topic: l.dlq_topic.clone(),
                partition: l.dlq_partition,
                offset: l.dlq_offset,
            });
        }
    }
    let producer: FutureProducer<QuietContext> =
        producer_config(brokers, properties, Duration::from_secs(30), true)
            .create_with_context(QuietContext)
            .map_err(outbox_kafka::secrets::scrub)?;
    let mut sends = Vec::with_capacity(letters.len());
    for l in letters {
        let mut headers = OwnedHeaders::new_with_capacity(l.headers.len());
        for (key, value) in &l.headers {
            headers = headers.insert(Header {
                key: key.as_str(),
                value: value.as_deref(),
            });
        }
        let topic = l.original_topic.as_deref().unwrap_or_default();
        let mut record = FutureRecord::to(topic).headers(headers);
        // Back to the partition it was read from: the key's other events are
        // there (whatever partitioner the producer used), so the replay
        // joins their sequence.
        if let Some(partition) = l.original_partition {
            record = record.partition(partition);
        }
        if let Some(key) = &l.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &l.payload {
            record = record.payload(value.as_slice());
        }
        // Enqueue all, then await all: one round of acknowledgements.
        sends.push(producer.send(record, Duration::from_secs(30)));
    }
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| DeadLetterError::Kafka(e))?;
    }
    Ok(ReplayReport {
        replayed: letters.len(),
    })
}
