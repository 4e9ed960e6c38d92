//! [`ConsumerConfig`]: every setting of a consumer, with its default.
//!
//! The library never reads the environment: build the struct in code (or map
//! your own flags onto it). [`ConsumerConfig::new`] fills in the defaults
//! documented on each field.

use std::{collections::BTreeMap, time::Duration};

use outbox_core::topic::validate_topic;

/// What to do with a message whose `ce_type` has no registered handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownEventType {
    /// Send it to the dead-letter topic with the reason
    /// `no handler for event type …`. The default: nothing passes unnoticed.
    #[default]
    DeadLetter,
    /// Skip it: count it in `consumer_kit_skipped_total`, store its offset and
    /// move on. For topics that carry event types this consumer does not care
    /// about.
    Skip,
}

/// What happens to later events of a key once one of its events is
/// dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Ordering {
    /// Park them: later events of the key are kept in the consumer's
    /// database, in order, not applied, until the blocking event is resolved
    /// (replayed and applied, or discarded with [`crate::park::discard`]).
    /// Then they are applied in their original order, exactly once. Per-key
    /// order holds through failures, like the relay's `block-key`. The key
    /// is [`ConsumerConfig::ordering_key`]; records without one are never
    /// parked. The default.
    #[default]
    ParkKey,
    /// Let them through: the key's later events are applied while its
    /// dead-lettered one waits, and a replay applies it after them. Trades
    /// per-key order for availability.
    Skip,
}

/// What identifies a key's sequence for [`Ordering::ParkKey`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OrderingKey {
    /// The Kafka record key: the aggregate id, as the relay writes it. The
    /// default.
    #[default]
    RecordKey,
    /// The value of this header (for producers that key records otherwise,
    /// say by tenant, but order events by aggregate in a header such as
    /// `ce_subject`). Records without it are never parked.
    Header(String),
}

/// Settings of one consumer (one Kafka consumer group).
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The Kafka consumer group (`group.id`), also the dedupe scope in
    /// `processed_events`: each group applies each event once. Required.
    pub group_id: String,
    /// Topics to subscribe to. Required, at least one.
    pub topics: Vec<String>,
    /// Kafka bootstrap servers. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Extra librdkafka properties for the consumer *and* the dead-letter
    /// producer (TLS, SASL, tuning). Applied after consumer-kit's own
    /// settings, so they win, except `enable.auto.offset.store`, which
    /// consumer-kit keeps `false` (offsets are stored only after the
    /// database commit). Default empty.
    pub kafka_properties: BTreeMap<String, String>,
    /// Where a message starts when the group has no committed offset
    /// (`auto.offset.reset`). Default `earliest`: a new group reads the topic
    /// from the beginning, and dedupe makes that safe.
    pub auto_offset_reset: String,
    /// How often stored offsets are committed to Kafka
    /// (`auto.commit.interval.ms`). Offsets are also committed on partition
    /// revoke and on shutdown. Default 1 s.
    pub commit_interval: Duration,
    /// Tries per message for a handler that returns a retryable error,
    /// counting the first. After the last one the message is dead-lettered.
    /// Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry; it doubles per attempt (with jitter) up
    /// to [`ConsumerConfig::max_backoff`]. Also the first delay when the
    /// database or the dead-letter topic is unavailable. Default 200 ms.
    pub min_backoff: Duration,
    /// Longest delay between tries. Default 30 s.
    pub max_backoff: Duration,
    /// Kafka: a retry whose back-off is at least this long waits in the
    /// consumer's outbox as a delayed event instead of in memory, so the
    /// partition goes on meanwhile; under park-key the event's key waits
    /// behind it (see `defer.rs`). Needs the outbox schema
    /// (`outbox_core::migrate`) in the consumer's database and a relay
    /// publishing it to the same cluster. Default `None`: every retry
    /// waits in place.
    pub defer_retries_after: Option<Duration>,
    /// The dead-letter topic for a source topic: `{topic}` is replaced by the
    /// source topic's name. Default `{topic}.dlq`.
    pub dead_letter_topic: String,
    /// Whether to create missing dead-letter topics at start (with the source
    /// topic's partition count). Default true. When false, a missing
    /// dead-letter topic is logged at start, and dead-lettering retries with
    /// backoff, holding that partition, until the topic exists.
    pub create_dead_letter_topics: bool,
    /// How long one dead-letter publish waits for Kafka's acknowledgement
    /// before it is retried. Default 30 s.
    pub dead_letter_timeout: Duration,
    /// What to do with a message of an event type that has no handler.
    /// Default [`UnknownEventType::DeadLetter`].
    pub unknown_event_type: UnknownEventType,
    /// Most messages handled at once across all partitions (each in its own
    /// database transaction). Messages of one partition are always handled
    /// one at a time, in offset order. Default 8; keep it at or below the
    /// pool's connection count.
    pub max_concurrency: usize,
    /// How long a partition revoke (rebalance) or a shutdown waits for the
    /// messages being handled to finish. A message still being handled then
    /// is abandoned: its handler is aborted, its transaction rolls back and
    /// its offset is not stored, so it is redelivered and applied once.
    /// Default 10 s.
    pub drain_timeout: Duration,
    /// How long `processed_events` rows of this group are kept. Must cover
    /// how far back a replay or redelivery can reach (the topic's retention):
    /// consumer-kit warns at start when it does not. Default 7 days.
    pub processed_ttl: Duration,
    /// How often the TTL cleanup runs. `None` turns the cleanup off (for
    /// example when another member or a cron job does it). Default 5 minutes.
    pub cleanup_interval: Option<Duration>,
    /// Rows deleted per cleanup statement, so cleanup never holds long locks
    /// or builds one huge transaction. Default 1000.
    pub cleanup_batch_size: i64,
    /// How often the consumer-lag gauge is refreshed (librdkafka statistics).
    /// `None` turns it off. Default 5 s.
    pub lag_interval: Option<Duration>,
    /// What happens to later events of a key once one of its events is
    /// dead-lettered. Default [`Ordering::ParkKey`].
    pub ordering: Ordering,
    /// Read only records of committed Kafka transactions
    /// (`isolation.level=read_committed`): a transactional producer's
    /// aborted records, and those of transactions still open, are never
    /// handed to a handler. `false` reads them all (`read_uncommitted`).
    /// An `isolation.level` in `kafka_properties` wins. Default `true`.
    pub read_committed: bool,
    /// What identifies a key's sequence under [`Ordering::ParkKey`].
    /// Default [`OrderingKey::RecordKey`].
    pub ordering_key: OrderingKey,
    /// Most messages of one partition settled in one database transaction.
    /// A worker takes the messages already waiting in its partition's queue
    /// (it never waits for more), applies each (dedupe insert, handler) and
    /// commits once; any failure rolls that transaction back and each
    /// message is then settled on its own, so a failure affects only its
    /// own message. 1 settles every message in its own transaction.
    /// Default 64.
    pub max_batch: usize,
}

impl ConsumerConfig {
    /// A configuration for `group_id` reading `topics`, with every other
    /// field at its documented default.
    pub fn new<I, S>(group_id: impl Into<String>, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            brokers: "127.0.0.1:9092".into(),
            kafka_properties: BTreeMap::new(),
            auto_offset_reset: "earliest".into(),
            commit_interval: Duration::from_secs(1),
            max_attempts: 5,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            defer_retries_after: None,
            dead_letter_topic: "{topic}.dlq".into(),
            create_dead_letter_topics: true,
            dead_letter_timeout: Duration::from_secs(30),
            unknown_event_type: UnknownEventType::DeadLetter,
            max_concurrency: 8,
            drain_timeout: Duration::from_secs(10),
            processed_ttl: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Some(Duration::from_secs(300)),
            cleanup_batch_size: 1000,
            lag_interval: Some(Duration::from_secs(5)),
            ordering: Ordering::default(),
            ordering_key: OrderingKey::default(),
            read_committed: true,
            max_batch: 64,
        }
    }

    /// The dead-letter topic of `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic.replace("{topic}", topic)
    }

    /// Checks the settings; the error names the field and what to do.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_for(true)
    }

    /// [`ConsumerConfig::validate`], with the Kafka-only settings checked
    /// only when `kafka` (not for the RabbitMQ source).
    pub(crate) fn validate_for(&self, kafka: bool) -> Result<(), String> {
        if self.group_id.trim().is_empty() {
            return Err("group_id is empty: every consumer needs a consumer group".into());
        }
        if self.topics.is_empty() {
            return Err("topics is empty: subscribe to at least one topic".into());
        }
        for topic in &self.topics {
            validate_topic(topic).map_err(|r| format!("topics: {r}"))?;
            let dlq = self.dead_letter_topic_for(topic);
            validate_topic(&dlq).map_err(|r| {
                format!(
                    "dead_letter_topic {:?} gives {dlq:?} for topic {topic:?}: {r}",
                    self.dead_letter_topic
                )
            })?;
            if dlq == *topic {
                return Err(format!(
                    "dead_letter_topic {:?} maps topic {topic:?} onto itself; include {{topic}} and a suffix, such as \"{{topic}}.dlq\"",
                    self.dead_letter_topic
                ));
            }
        }
        if kafka && self.brokers.trim().is_empty() {
            return Err(
                "brokers is empty: give the Kafka bootstrap servers, such as 127.0.0.1:9092".into(),
            );
        }
        if self.max_attempts == 0 {
            return Err(
                "max_attempts is 0: it counts the first try, so it must be at least 1".into(),
            );
        }
        if self.min_backoff > self.max_backoff {
            return Err(format!(
                "min_backoff ({:?}) is longer than max_backoff ({:?})",
                self.min_backoff, self.max_backoff
            ));
        }
        if self.max_batch == 0 {
            return Err(
                "max_batch is 0: use 1 to settle every message in its own transaction".into(),
            );
        }
        if self.max_concurrency == 0 {
            return Err(
                "max_concurrency is 0: at least one message must be handled at a time".into(),
            );
        }
        if self.cleanup_batch_size <= 0 {
            return Err("cleanup_batch_size must be positive".into());
        }
        if self.processed_ttl.is_zero() {
            return Err("processed_ttl is 0: dedupe would forget every event at once".into());
        }
        if !matches!(
            self.auto_offset_reset.as_str(),
            "earliest" | "latest" | "error"
        ) {
            return Err(format!(
                "auto_offset_reset {:?} is not one of earliest, latest, error",
                self.auto_offset_reset
            ));
        }
        if let Some(v) = self.kafka_properties.get("enable.auto.offset.store") {
            if v != "false" {
                return Err("kafka_properties sets enable.auto.offset.store: consumer-kit stores offsets itself, after the database commit; remove it".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ConsumerConfig::new("g", ["orders"]).validate().unwrap();
        assert_eq!(
            ConsumerConfig::new("g", ["orders"]).dead_letter_topic_for("orders"),
            "orders.dlq"
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        let cases: Vec<(ConsumerConfig, &str)> = vec![
            (ConsumerConfig::new("", ["t"]), "group_id"),
            (ConsumerConfig::new("g", Vec::<String>::new()), "topics"),
            (ConsumerConfig::new("g", ["bad topic"]), "topics"),
            (
                ConsumerConfig {
                    dead_letter_topic: "{topic}".into(),
                    ..ConsumerConfig::new("g", ["t"])
                },
                "onto itself",
            ),
            (
                ConsumerConfig {
                    dead_letter_topic: "dead letters".into(),
                    ..ConsumerConfig::new("g", ["t"])
                },
                "dead_letter_topic",
            ),
            (
                ConsumerConfig {
                    max_attempts: 0,
                    ..ConsumerConfig::new("g", ["t"])
                },
                "max_attempts",
            ),
            (
                ConsumerConfig {
                    auto_offset_reset: "smallest-ish".into(),
                    ..ConsumerConfig::new("g", ["t"])
                },
                "auto_offset_reset",
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(err.contains(needle), "{err:?} should name {needle}");
        }
    }
}
