//! [`Message`]: one message as consumer-kit settles it, whichever broker it
//! came from. `process.rs`, `park.rs` and the dead-letter publishers see
//! only this type; `member.rs` makes one from each Kafka record, and
//! `rabbitmq.rs` (feature `rabbitmq`) from each RabbitMQ delivery.

use crate::envelope::Position;

/// A message to settle: where it was read, its key, value and headers, and
/// the handler tries an earlier delivery of it already spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// Where it was read (for RabbitMQ: the exchange it was published to,
    /// partition 0, and the delivery's tag on its channel).
    pub(crate) position: Position,
    /// The record key (Kafka); RabbitMQ messages have none.
    pub(crate) key: Option<Vec<u8>>,
    /// The value (body).
    pub(crate) payload: Option<Vec<u8>>,
    /// The headers, in order, with the broker-neutral names (`ce_id`, …).
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    /// Handler tries already spent on this event by earlier deliveries
    /// (RabbitMQ retries through delay queues, deferred retries on Kafka:
    /// the `x-outbox-attempts` header); 0 on a first delivery.
    pub(crate) prior_attempts: u32,
}

impl Message {
    /// The message of a Kafka record.
    pub(crate) fn from_kafka(msg: &impl rdkafka::message::Message) -> Self {
        use rdkafka::message::Headers;
        let mut m = Self {
            position: Position {
                topic: msg.topic().to_string(),
                partition: msg.partition(),
                offset: msg.offset(),
            },
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers: msg
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
            prior_attempts: 0,
        };
        m.prior_attempts = crate::defer::prior_attempts(m.header(crate::defer::ATTEMPTS_HEADER));
        m
    }

    pub(crate) fn topic(&self) -> &str {
        &self.position.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.position.partition
    }

    pub(crate) fn offset(&self) -> i64 {
        self.position.offset
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The first header named `name`.
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every header, in order, as (name, value).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }
}
