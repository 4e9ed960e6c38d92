//! What [`crate::Consumer::run`] checks before it joins the group: that
//! `processed_events` exists and that every topic exists (creating missing
//! dead-letter topics if so configured). Whether
//! [`ConsumerConfig::processed_ttl`] covers each topic's retention is
//! checked beside the running consumer: it only warns, and a broker slow to
//! describe its configs (up to 10 s) must not hold back the start.

use std::{sync::Arc, time::Duration};

use outbox_kafka::QuietContext;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    error::RDKafkaErrorCode,
};
use sqlx::PgPool;
use tracing::{debug, info, warn};

use crate::{cleanup, config::ConsumerConfig, error::ConsumerError, kafka_config};

/// Runs the checks that must pass before the consumer joins its group;
/// errs on the first that fails.
pub(crate) async fn check(pool: &PgPool, cfg: &ConsumerConfig) -> Result<(), ConsumerError> {
    check_schema(pool).await?;
    prepare_topics(cfg).await
}

/// Warns for each topic whose retention is longer than
/// [`ConsumerConfig::processed_ttl`]; says nothing (but at debug) when the
/// broker does not describe its topics' configs.
pub(crate) async fn warn_on_retention(cfg: &ConsumerConfig) {
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
}

/// Fails with a clear message when `processed_events` is missing.
pub(crate) async fn check_schema(pool: &PgPool) -> Result<(), ConsumerError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('processed_events') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(ConsumerError::Database)?;
    if exists {
        Ok(())
    } else {
        Err(ConsumerError::Config(
            "table processed_events does not exist in the consumer's database: run consumer_kit::migrate(&pool) at start, or apply the SQL in consumer-kit/migrations/ with your own tool".into(),
        ))
    }
}

/// Checks that the topics exist and creates missing dead-letter topics.
async fn prepare_topics(cfg: &ConsumerConfig) -> Result<(), ConsumerError> {
    let admin: AdminClient<QuietContext> =
        kafka_config::client_config(&cfg.brokers, &cfg.kafka_properties)
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
