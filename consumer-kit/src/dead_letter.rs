//! The dead-letter topic: what a dead letter carries, and how the consumer
//! publishes one. `replay.rs` reads and replays them for operators.
//!
//! A dead letter is the original record (same key, value and headers) sent
//! to the dead-letter topic (default `<topic>.dlq`) with these headers added:
//!
//! | header | value |
//! |---|---|
//! | `dlq_reason` | why it was dead-lettered, in words |
//! | `dlq_kind` | `undecodable`, `unknown_event_type`, `permanent` or `retries_exhausted` |
//! | `dlq_attempts` | handler tries made (0 when the handler never ran) |
//! | `dlq_original_topic` | the topic it was read from |
//! | `dlq_original_partition` | the partition it was read from |
//! | `dlq_original_offset` | the offset it was read at |
//! | `dlq_consumer_group` | the consumer group that gave up on it |
//! | `dlq_time` | when it was dead-lettered (RFC 3339, UTC) |
//!
//! [`crate::replay::replay`] sends dead letters back to their original topic with the
//! original key, value and headers (the `dlq_*` ones removed), so the event
//! keeps its `ce_id` and dedupes as usual: a replayed event that some group
//! already applied is skipped there.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use outbox_core::headers as h;
use outbox_kafka::QuietContext;
use rdkafka::{
    error::KafkaError,
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord, Producer},
    ClientConfig,
};
use uuid::Uuid;

use crate::{kafka_config::producer_config, message::Message};

/// `dlq_reason`: why the message was dead-lettered.
pub const REASON: &str = "dlq_reason";
/// `dlq_kind`: the [`DeadLetterKind`].
pub const KIND: &str = "dlq_kind";
/// `dlq_attempts`: handler tries made.
pub const ATTEMPTS: &str = "dlq_attempts";
/// `dlq_original_topic`.
pub const ORIGINAL_TOPIC: &str = "dlq_original_topic";
/// `dlq_original_partition`.
pub const ORIGINAL_PARTITION: &str = "dlq_original_partition";
/// `dlq_original_offset`.
pub const ORIGINAL_OFFSET: &str = "dlq_original_offset";
/// `dlq_consumer_group`.
pub const CONSUMER_GROUP: &str = "dlq_consumer_group";
/// `dlq_time`: when it was dead-lettered (RFC 3339).
pub const TIME: &str = "dlq_time";

/// `dlq_original_routing_key`: the routing key it was published with
/// (RabbitMQ only).
pub const ORIGINAL_ROUTING_KEY: &str = "dlq_original_routing_key";

/// Every header a dead letter adds; [`replay`](crate::replay::replay) removes them.
pub const DLQ_HEADERS: &[&str] = &[
    REASON,
    KIND,
    ATTEMPTS,
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    CONSUMER_GROUP,
    TIME,
    ORIGINAL_ROUTING_KEY,
];

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// Not an outbox event: a required header is missing or invalid, or the
    /// payload does not decode into the handler's type.
    Undecodable,
    /// No handler is registered for its event type.
    UnknownEventType,
    /// The handler returned a permanent error (or panicked).
    Permanent,
    /// The handler kept returning retryable errors until the last try.
    RetriesExhausted,
}

impl DeadLetterKind {
    /// The `dlq_kind` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::UnknownEventType => "unknown_event_type",
            Self::Permanent => "permanent",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// Where this consumer's dead letters go: the source's own broker.
pub(crate) enum DeadLetterSink {
    /// The dead-letter topic of the record's topic.
    Kafka(DeadLetterProducer),
    /// The group queue's dead-letter exchange.
    #[cfg(feature = "rabbitmq")]
    RabbitMq(std::sync::Arc<crate::rabbitmq::Link>),
}

impl DeadLetterSink {
    /// Where `msg`'s dead letter goes, for the logs.
    pub(crate) fn destination(&self, cfg: &crate::ConsumerConfig, msg: &Message) -> String {
        match self {
            Self::Kafka(_) => cfg.dead_letter_topic_for(msg.topic()),
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(link) => link.dead_letter_exchange().to_string(),
        }
    }

    /// Publishes `msg`'s dead letter and waits for the broker's
    /// acknowledgement.
    pub(crate) async fn send(
        &self,
        cfg: &crate::ConsumerConfig,
        msg: &Message,
        kind: DeadLetterKind,
        reason: &str,
        attempts: u32,
    ) -> Result<(), String> {
        match self {
            Self::Kafka(producer) => {
                let topic = cfg.dead_letter_topic_for(msg.topic());
                producer.send(msg, &topic, kind, reason, attempts).await
            }
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(link) => {
                link.dead_letter(msg, kind, reason, attempts, &cfg.group_id)
                    .await
            }
        }
    }
}

/// The consumer's dead-letter producer, replaced when librdkafka declares it
/// fatally failed.
pub(crate) struct DeadLetterProducer {
    config: ClientConfig,
    group: String,
    timeout: Duration,
    producer: std::sync::RwLock<FutureProducer<QuietContext>>,
}

impl DeadLetterProducer {
    /// A producer for `group`'s dead letters, each awaited up to `timeout`.
    pub(crate) fn new(
        brokers: &str,
        properties: &BTreeMap<String, String>,
        timeout: Duration,
        group: &str,
    ) -> Result<Self, KafkaError> {
        let config = producer_config(brokers, properties, timeout, false);
        let producer = config
            .create_with_context(QuietContext)
            .map_err(outbox_kafka::secrets::scrub)?;
        Ok(Self {
            config,
            group: group.to_owned(),
            timeout,
            producer: std::sync::RwLock::new(producer),
        })
    }

    fn get(&self) -> FutureProducer<QuietContext> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the producer if it has a fatal error.
    fn recover(&self) {
        let producer = self.get();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(?code, %reason, "dead-letter producer failed fatally; creating a new one");
            match self.config.create_with_context(QuietContext) {
                Ok(fresh) => {
                    *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                }
                Err(e) => tracing::error!(
                    error = %outbox_kafka::secrets::scrub(e),
                    "cannot create a new dead-letter producer"
                ),
            }
        }
    }

    /// Sends `msg` to `dlq_topic` with the dead-letter headers (`attempts`
    /// handler tries made) and waits for Kafka's acknowledgement.
    pub(crate) async fn send(
        &self,
        msg: &Message,
        dlq_topic: &str,
        kind: DeadLetterKind,
        reason: &str,
        attempts: u32,
    ) -> Result<(), String> {
        let mut headers = OwnedHeaders::new_with_capacity(DLQ_HEADERS.len() + 16);
        for (key, value) in letter_headers(msg, kind, reason, attempts, &self.group) {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut record = FutureRecord::to(dlq_topic).headers(headers);
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        if let Some(value) = msg.payload() {
            record = record.payload(value);
        }
        let result = self.get().send(record, self.timeout).await;
        result.map(|_| ()).map_err(|(e, _)| {
            self.recover();
            format!("dead-letter publish to {dlq_topic} failed: {e}")
        })
    }
}

/// The headers of `msg`'s dead letter: its own (without any earlier
/// `dlq_*` ones), then the `dlq_*` headers saying why, from where and by
/// which `group`. Shared by the Kafka and RabbitMQ publishers.
pub(crate) fn letter_headers<'a>(
    msg: &'a Message,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
    group: &str,
) -> Vec<(&'a str, Option<std::borrow::Cow<'a, [u8]>>)> {
    use std::borrow::Cow;
    let mut headers: Vec<(&str, Option<Cow<'_, [u8]>>)> = msg
        .headers()
        .filter(|(key, _)| !DLQ_HEADERS.contains(key))
        .map(|(key, value)| (key, value.map(Cow::Borrowed)))
        .collect();
    let time = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (key, value) in [
        (REASON, reason.to_string()),
        (KIND, kind.as_str().to_string()),
        (ATTEMPTS, attempts.to_string()),
        (ORIGINAL_TOPIC, msg.topic().to_string()),
        (ORIGINAL_PARTITION, msg.partition().to_string()),
        (ORIGINAL_OFFSET, msg.offset().to_string()),
        (CONSUMER_GROUP, group.to_string()),
        (TIME, time),
    ] {
        headers.push((key, Some(Cow::Owned(value.into_bytes()))));
    }
    headers
}

/// One record of a dead-letter topic, decoded for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The dead-letter topic it sits in.
    pub dlq_topic: String,
    /// Its partition in the dead-letter topic.
    pub dlq_partition: i32,
    /// Its offset in the dead-letter topic.
    pub dlq_offset: i64,
    /// `ce_id` of the original, when it had a valid one.
    pub event_id: Option<Uuid>,
    /// `ce_type` of the original, when it had one.
    pub event_type: Option<String>,
    /// `dlq_kind`.
    pub kind: Option<String>,
    /// `dlq_reason`.
    pub reason: Option<String>,
    /// `dlq_attempts`.
    pub attempts: Option<u32>,
    /// `dlq_original_topic`: where [`replay`](crate::replay::replay) sends it.
    pub original_topic: Option<String>,
    /// `dlq_original_partition`.
    pub original_partition: Option<i32>,
    /// `dlq_original_offset`.
    pub original_offset: Option<i64>,
    /// `dlq_original_routing_key` (RabbitMQ).
    pub original_routing_key: Option<String>,
    /// `dlq_consumer_group`.
    pub consumer_group: Option<String>,
    /// `dlq_time`.
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original value.
    pub payload: Option<Vec<u8>>,
    /// The original headers, without the `dlq_*` ones, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetter {
    /// Decodes a record read from a dead-letter topic.
    pub fn from_message(msg: &OwnedMessage) -> Self {
        let m = Message::from_kafka(msg);
        Self::from_parts(m.position, m.key, m.payload, m.headers)
    }

    /// Decodes a dead letter read at `at` (for RabbitMQ: the dead-letter
    /// queue, partition 0, its place in the queue).
    pub(crate) fn from_parts(
        at: crate::envelope::Position,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        all_headers: Vec<(String, Option<Vec<u8>>)>,
    ) -> Self {
        let mut dlq = BTreeMap::new();
        let mut headers = Vec::new();
        let mut ce_id = None;
        let mut ce_type = None;
        for (name, value) in all_headers {
            let text = || {
                value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            if DLQ_HEADERS.contains(&name.as_str()) {
                dlq.insert(name, text());
                continue;
            }
            if name == h::CE_ID {
                ce_id = Uuid::parse_str(text().trim()).ok();
            } else if name == h::CE_TYPE {
                ce_type = Some(text());
            }
            headers.push((name, value));
        }
        let mut take = |name: &str| dlq.remove(name);
        Self {
            dlq_topic: at.topic,
            dlq_partition: at.partition,
            dlq_offset: at.offset,
            event_id: ce_id,
            event_type: ce_type,
            kind: take(KIND),
            reason: take(REASON),
            attempts: take(ATTEMPTS).and_then(|v| v.parse().ok()),
            original_topic: take(ORIGINAL_TOPIC),
            original_partition: take(ORIGINAL_PARTITION).and_then(|v| v.parse().ok()),
            original_offset: take(ORIGINAL_OFFSET).and_then(|v| v.parse().ok()),
            original_routing_key: take(ORIGINAL_ROUTING_KEY),
            consumer_group: take(CONSUMER_GROUP),
            dead_lettered_at: take(TIME)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            key,
            payload,
            headers,
        }
    }
}

/// Which dead letters to list or replay. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// Only this event type (`ce_type`).
    pub event_type: Option<String>,
    /// Only this event id (`ce_id`).
    pub event_id: Option<Uuid>,
    /// Only dead-lettered at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only dead-lettered before this time.
    pub until: Option<DateTime<Utc>>,
}

impl DeadLetterFilter {
    /// Whether `letter` passes the filter.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        if let Some(t) = &self.event_type {
            if letter.event_type.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(id) = self.event_id {
            if letter.event_id != Some(id) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = letter.dead_lettered_at else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(event_type: &str, at: &str) -> DeadLetter {
        DeadLetter {
            dlq_topic: "t.dlq".into(),
            dlq_partition: 0,
            dlq_offset: 0,
            event_id: Some(Uuid::nil()),
            event_type: Some(event_type.into()),
            kind: None,
            reason: None,
            attempts: None,
            original_topic: Some("t".into()),
            original_partition: None,
            original_offset: None,
            original_routing_key: None,
            consumer_group: None,
            dead_lettered_at: Some(at.parse().unwrap()),
            key: None,
            payload: None,
            headers: vec![],
        }
    }

    #[test]
    fn filter_by_type_id_and_time() {
        let l = letter("order.paid", "2026-11-23T10:00:00Z");
        assert!(DeadLetterFilter::default().matches(&l));
        let by_type = DeadLetterFilter {
            event_type: Some("order.paid".into()),
            ..Default::default()
        };
        assert!(by_type.matches(&l));
        let other_type = DeadLetterFilter {
            event_type: Some("order.created".into()),
            ..Default::default()
        };
        assert!(!other_type.matches(&l));
        let other_id = DeadLetterFilter {
            event_id: Some(Uuid::max()),
            ..Default::default()
        };
        assert!(!other_id.matches(&l));
        let window = DeadLetterFilter {
            since: Some("2026-11-23T09:00:00Z".parse().unwrap()),
            until: Some("2026-11-23T10:00:00Z".parse().unwrap()),
            ..Default::default()
        };
        assert!(!window.matches(&l), "until is exclusive");
        let window = DeadLetterFilter {
            since: Some("2026-11-23T10:00:00Z".parse().unwrap()),
            ..Default::default()
        };
        assert!(window.matches(&l), "since is inclusive");
    }
}
