//! [`ConsumerError`]: why a consumer could not start or had to stop. Its own
//! module so that the preflight checks and the group member can return it
//! without depending on the `Consumer` that runs them.

use rdkafka::error::KafkaError;

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
    /// Shutdown ended without closing the Kafka consumer: a handler blocks
    /// its thread past [`crate::ConsumerConfig::drain_timeout`]. The message
    /// names it.
    #[error("shutdown incomplete: {0}")]
    ShutdownIncomplete(String),
    /// An internal task failed.
    #[error("consumer task failed: {0}")]
    Internal(String),
}
