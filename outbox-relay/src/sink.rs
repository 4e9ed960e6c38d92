//! [`Sink`]: where the relay's batches go, Kafka ([`Publisher`]) or
//! RabbitMQ (`rabbitmq.rs`, with the cargo feature `rabbitmq`). Both take a
//! batch of records and return one [`Outcome`] per record, so the sources
//! (poll, WAL) and the batch decisions (`batch.rs`) are the same for both.
//!
//! What only Kafka has (transactions for `--exactly-once`, a producer that
//! can turn fatal, topic metadata) is reached through [`Sink::kafka`].

use std::{sync::Arc, time::Duration};

use outbox_kafka::Reach;

use crate::{
    config::RelayConfig,
    publisher::{Outcome, Publisher, PublisherError, TopicState},
    record::Record,
};

/// The relay's destination.
pub(crate) enum Sink {
    Kafka(Publisher),
    #[cfg(feature = "rabbitmq")]
    RabbitMq(Arc<crate::rabbitmq::RabbitMqPublisher>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sink({})", self.name())
    }
}

impl Sink {
    /// The sink `cfg` names (validated already).
    pub(crate) fn new(cfg: &RelayConfig, relay_id: &str) -> Result<Self, PublisherError> {
        #[cfg(feature = "rabbitmq")]
        if let Some(rabbit) = &cfg.rabbitmq {
            return Ok(Self::RabbitMq(Arc::new(
                crate::rabbitmq::RabbitMqPublisher::new(rabbit.clone(), cfg.publish_timeout),
            )));
        }
        Ok(Self::Kafka(Publisher::new(cfg, relay_id)?))
    }

    /// Starts what watches the connection in the background (RabbitMQ;
    /// librdkafka watches its own). Needs the runtime.
    pub(crate) fn start(&self) {
        #[cfg(feature = "rabbitmq")]
        if let Self::RabbitMq(p) = self {
            p.watch();
        }
    }

    /// The Kafka producer, for what only Kafka has.
    pub(crate) fn kafka(&self) -> Option<&Publisher> {
        match self {
            Self::Kafka(p) => Some(p),
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(_) => None,
        }
    }

    /// The broker's name in health reasons and logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(_) => "rabbitmq",
        }
    }

    /// The connection to the broker, for readiness.
    pub(crate) fn reach(&self) -> Arc<Reach> {
        match self {
            Self::Kafka(p) => p.reach(),
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(p) => p.reach(),
        }
    }

    /// Publishes `records` pipelined: one outcome per record, in order; a
    /// `None` entry is not sent and its outcome is `None`.
    pub(crate) async fn publish(&self, records: Vec<Option<Record>>) -> Vec<Option<Outcome>> {
        match self {
            Self::Kafka(p) => p.publish(records).await,
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(p) => p.publish(records).await,
        }
    }

    /// Whether `topic` can take records. RabbitMQ declares its exchanges
    /// while publishing, so for it every topic can.
    pub(crate) async fn topic_state(&self, topic: &str) -> TopicState {
        match self {
            Self::Kafka(p) => p.topic_state(topic).await,
            #[cfg(feature = "rabbitmq")]
            Self::RabbitMq(_) => TopicState::Exists,
        }
    }

    /// Forgets what is known about `topic` (after a delivery error on it).
    pub(crate) fn forget_topic(&self, topic: &str) {
        if let Some(p) = self.kafka() {
            p.forget_topic(topic);
        }
    }

    /// Waits up to `timeout` for what is still queued (Kafka; RabbitMQ's
    /// batches end with their confirms, so nothing is).
    pub(crate) fn flush(&self, timeout: Duration) -> Result<(), String> {
        match self.kafka() {
            Some(p) => p.flush(timeout),
            None => Ok(()),
        }
    }
}
