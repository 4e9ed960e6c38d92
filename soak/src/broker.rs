//! The brokers a soak run uses instead of `KAFKA_BROKERS` (or `AMQP_URL`):
//! its own Apache Kafka (`test_kit::kafka`) or RabbitMQ node
//! (`test_kit::rabbitmq`) for the broker-restart fault, or librdkafka's
//! mock cluster for the faults a real broker cannot show on demand.

use std::time::Duration;

use anyhow::Context;

/// librdkafka's mock cluster (3 brokers, in this process, on local ports),
/// for the faults a real broker cannot produce on demand: produce errors, a
/// slow broker, a broker down.
pub struct Mock {
    cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

/// The mock cluster's brokers (ids 1 to 3).
pub const MOCK_BROKERS: i32 = 3;

/// The most events a soak on the mock cluster may commit. librdkafka's mock
/// partition keeps at most 5 MiB (`rdkafka_mock.c`, `max_size`) and drops
/// its oldest records beyond that; a soak event is about 290 bytes, and the
/// soak's topic has 3 partitions: about 54,000 events fit, 40,000 leave room
/// for duplicates and uneven keys.
pub const MOCK_MAX_EVENTS: u64 = 40_000;

impl Mock {
    /// Starts the cluster.
    pub fn start() -> anyhow::Result<Self> {
        let cluster = rdkafka::mocking::MockCluster::new(MOCK_BROKERS)
            .context("cannot start librdkafka's mock cluster")?;
        Ok(Self { cluster })
    }

    /// Its bootstrap servers, for `KAFKA_BROKERS`.
    pub fn address(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions, replicated on every
    /// broker. (The mock has no CreateTopics request.)
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.cluster
            .create_topic(topic, partitions, MOCK_BROKERS)
            .with_context(|| format!("cannot create {topic} on the mock cluster"))
    }

    /// The next five produce requests, whichever broker gets them, fail with
    /// retriable errors: request timed out, not leader, not enough replicas,
    /// a dropped connection, request timed out.
    pub fn fail_next_produce_requests(&self) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr as E};
        self.cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[
                E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                E::RD_KAFKA_RESP_ERR__TRANSPORT,
                E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        );
    }

    /// Delays every answer of `broker` by `rtt` (zero: back to normal).
    pub fn round_trip_time(&self, broker: i32, rtt: Duration) -> anyhow::Result<()> {
        Ok(self.cluster.broker_round_trip_time(broker, rtt)?)
    }

    /// Takes `broker` down (connections refused and closed) or up again.
    pub fn set_down(&self, broker: i32, down: bool) -> anyhow::Result<()> {
        if down {
            self.cluster.broker_down(broker)?;
        } else {
            self.cluster.broker_up(broker)?;
        }
        Ok(())
    }
}

/// The broker a run uses instead of `KAFKA_BROKERS`, when a fault needs one
/// under the soak's control.
pub enum Own {
    /// Its own Apache Kafka broker, storage on disk (the broker-restart fault).
    Kafka(test_kit::kafka::Node),
    /// Its own three-broker Apache Kafka cluster (the leader-failover fault).
    Cluster(test_kit::kafka::Cluster),
    /// librdkafka's mock cluster (the produce-errors, broker-slow and
    /// broker-down faults).
    Mock(Mock),
    /// Its own RabbitMQ node (`--sink rabbitmq` with the broker-restart
    /// fault).
    Rabbit(test_kit::rabbitmq::Node),
}

impl Own {
    /// The bootstrap servers.
    pub fn address(&self) -> String {
        match self {
            Self::Kafka(b) => b.address.clone(),
            Self::Cluster(c) => c.bootstrap(),
            Self::Mock(m) => m.address(),
            Self::Rabbit(n) => n.url.clone(),
        }
    }

    /// What to call it in the run's first line.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "the soak's own Apache Kafka broker",
            Self::Cluster(_) => "the soak's own three-broker Apache Kafka cluster",
            Self::Mock(_) => "librdkafka's mock cluster, 3 brokers",
            Self::Rabbit(_) => "the soak's own RabbitMQ node",
        }
    }

    /// Its own Kafka broker, if that is what runs.
    pub fn kafka(&mut self) -> Option<&mut test_kit::kafka::Node> {
        match self {
            Self::Kafka(b) => Some(b),
            _ => None,
        }
    }

    /// Its own RabbitMQ node, if that is what runs.
    pub fn rabbit(&mut self) -> Option<&mut test_kit::rabbitmq::Node> {
        match self {
            Self::Rabbit(n) => Some(n),
            _ => None,
        }
    }

    /// Its own three-broker cluster, if that is what runs.
    pub fn cluster(&mut self) -> Option<&mut test_kit::kafka::Cluster> {
        match self {
            Self::Cluster(c) => Some(c),
            _ => None,
        }
    }

    /// The mock cluster, if that is what runs.
    pub fn mock(&self) -> Option<&Mock> {
        match self {
            Self::Mock(m) => Some(m),
            _ => None,
        }
    }
}
