//! Creating topics: the relay does not route to missing topics, and some
//! brokers (Kafka with `auto.create.topics.enable=false`, the default here) never create
//! them on demand. Used by `outbox-relay topic create`, the demo, the soak,
//! the benchmarks and the tests.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    error::KafkaError,
    types::RDKafkaErrorCode,
    ClientConfig,
};

/// What [`create`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Created {
    /// The topic was created.
    New,
    /// It existed already (nothing changed).
    AlreadyExists,
}

/// Why a topic could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The name breaks Kafka's rules.
    #[error("invalid topic name: {0}")]
    InvalidName(String),
    /// The admin client could not be created (a bad librdkafka property).
    #[error("cannot create the Kafka admin client: {0}")]
    Client(KafkaError),
    /// The brokers did not answer.
    #[error("cannot reach the Kafka brokers at {brokers}: {error}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// librdkafka's error.
        error: KafkaError,
    },
    /// The broker refused.
    #[error("creating topic {topic} failed: {code:?}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// Creates `name` with `partitions` partitions and `replication` replicas
/// (`-1`: the broker's default) on `brokers`, with extra librdkafka
/// `properties` (TLS, SASL). An existing topic is not an error.
pub async fn create(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    name: &str,
    partitions: i32,
    replication: i32,
) -> Result<Created, TopicError> {
    outbox_core::topic::validate_topic(name).map_err(TopicError::InvalidName)?;
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    outbox_kafka::secrets::set_all(&mut cc, properties);
    let admin: AdminClient<outbox_kafka::QuietContext> = cc
        .create_with_context(outbox_kafka::QuietContext)
        .map_err(|e| TopicError::Client(outbox_kafka::secrets::scrub(e)))?;
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(15)))
        .operation_timeout(Some(Duration::from_secs(10)));
    let new = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    let results =
        admin
            .create_topics([&new], &opts)
            .await
            .map_err(|error| TopicError::Unreachable {
                brokers: brokers.to_string(),
                error: outbox_kafka::secrets::scrub(error),
            })?;
    let mut created = Created::New;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => created = Created::AlreadyExists,
            Err((topic, code)) => return Err(TopicError::Refused { topic, code }),
        }
    }
    Ok(created)
}
