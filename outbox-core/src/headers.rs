//! Kafka header names: the wire contract between the relay and consumers.
//!
//! The relay maps each outbox row to the [CloudEvents Kafka protocol binding]
//! in *binary* mode: the record value is the payload, the key is the
//! aggregate id, and the event's attributes travel as `ce_*` headers. Trace
//! context travels as W3C `traceparent` / `tracestate` headers. Extra
//! headers from the row's `headers` column are copied as they are.
//!
//! These names are versioned with [`SPEC_VERSION`] and never change within a
//! major version of this crate.
//!
//! [CloudEvents Kafka protocol binding]: https://github.com/cloudevents/spec/blob/main/cloudevents/bindings/kafka-protocol-binding.md

/// CloudEvents spec version, sent in [`CE_SPECVERSION`].
pub const SPEC_VERSION: &str = "1.0";

/// `ce_specversion`: always [`SPEC_VERSION`].
pub const CE_SPECVERSION: &str = "ce_specversion";
/// `ce_id`: the event id (UUID), the consumers' idempotency key.
pub const CE_ID: &str = "ce_id";
/// `ce_type`: the event type, a stable wire name such as `order.created`.
pub const CE_TYPE: &str = "ce_type";
/// `ce_source`: the producing service (the row's `source`, or the relay's
/// configured default source).
pub const CE_SOURCE: &str = "ce_source";
/// `ce_time`: when the event occurred (RFC 3339).
pub const CE_TIME: &str = "ce_time";
/// `ce_subject`: the aggregate id (also the record key), when it is at most
/// [`SUBJECT_MAX_BYTES`] long.
pub const CE_SUBJECT: &str = "ce_subject";

/// The longest aggregate id repeated in `ce_subject`, in bytes. A longer id
/// travels in the record key only, and the record has no `ce_subject`: it
/// is never truncated, since a shortened subject could name another
/// aggregate. Without this, a key of 600 KiB went out twice and made a
/// record over Kafka's 1 MB default limit.
pub const SUBJECT_MAX_BYTES: usize = 1024;
/// `ce_aggregatetype`: the aggregate type (extension attribute).
pub const CE_AGGREGATE_TYPE: &str = "ce_aggregatetype";
/// `ce_eventversion`: the event's schema version, a positive integer
/// (extension attribute).
pub const CE_EVENT_VERSION: &str = "ce_eventversion";
/// `ce_correlationid`: the correlation id, if any (extension attribute).
pub const CE_CORRELATION_ID: &str = "ce_correlationid";
/// `ce_causationid`: the causation id, if any (extension attribute).
pub const CE_CAUSATION_ID: &str = "ce_causationid";
/// `content-type`: the payload's media type (CloudEvents `datacontenttype`).
pub const CONTENT_TYPE: &str = "content-type";
/// `traceparent`: W3C trace context captured when the row was written.
pub const TRACEPARENT: &str = "traceparent";
/// `tracestate`: W3C trace state, if any.
pub const TRACESTATE: &str = "tracestate";

/// Every header name the relay sets itself. A row's extra `headers` may not
/// use these names; [`crate::NewEvent`] rejects them and the relay fails such
/// a row with a clear reason.
pub const RESERVED: &[&str] = &[
    CE_SPECVERSION,
    CE_ID,
    CE_TYPE,
    CE_SOURCE,
    CE_TIME,
    CE_SUBJECT,
    CE_AGGREGATE_TYPE,
    CE_EVENT_VERSION,
    CE_CORRELATION_ID,
    CE_CAUSATION_ID,
    CONTENT_TYPE,
    TRACEPARENT,
    TRACESTATE,
];

/// The headers that say which event a record is and how to read it: its id
/// (the consumers' idempotency key), its type (which handler runs), its
/// source and its schema version. A consumer refuses a record that has
/// any of them twice, or under a name that differs only in case: which one
/// counts would be a guess, and a wrong guess skips a different event as a
/// duplicate.
pub const IDENTITY: &[&str] = &[CE_ID, CE_TYPE, CE_SOURCE, CE_EVENT_VERSION];

/// Whether `name` is one of the [`RESERVED`] header names (case-insensitive).
pub fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// The prefix of a CloudEvents attribute's header on AMQP (the CloudEvents
/// AMQP binding's application properties, carried in RabbitMQ's headers
/// table): `ce_id` travels as `cloudEvents:id`.
pub const AMQP_PREFIX: &str = "cloudEvents:";

/// The AMQP header name of the Kafka header `name`: `ce_X` becomes
/// `cloudEvents:X`; any other name is kept.
pub fn amqp_name(name: &str) -> std::borrow::Cow<'_, str> {
    match name.strip_prefix("ce_") {
        Some(attribute) => format!("{AMQP_PREFIX}{attribute}").into(),
        None => name.into(),
    }
}

/// The Kafka header name of the AMQP header `name`: the inverse of
/// [`amqp_name`].
pub fn kafka_name(name: &str) -> std::borrow::Cow<'_, str> {
    match name.strip_prefix(AMQP_PREFIX) {
        Some(attribute) => format!("ce_{attribute}").into(),
        None => name.into(),
    }
}

#[cfg(test)]
mod amqp_tests {
    use super::*;

    #[test]
    fn amqp_names_map_both_ways() {
        assert_eq!(amqp_name(CE_ID), "cloudEvents:id");
        assert_eq!(amqp_name(TRACEPARENT), TRACEPARENT);
        for name in RESERVED.iter().chain(&["x-tenant"]) {
            assert_eq!(kafka_name(&amqp_name(name)), *name);
        }
    }
}
