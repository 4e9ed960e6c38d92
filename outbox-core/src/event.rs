//! [`NewEvent`]: one outbox row as a producer writes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{headers, topic::validate_topic, AppendError};

/// Largest payload [`crate::append()`] accepts: 10 MiB.
///
/// Kafka's own default record limit is about 1 MiB (`message.max.bytes`);
/// the relay fails rows its producer cannot send, with the reason. This
/// limit only stops obviously broken writes early.
pub const MAX_PAYLOAD_BYTES: usize = 10 * 1024 * 1024;

/// The record value of an event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Payload {
    /// A JSON document, stored in the `payload` column (jsonb).
    Json(serde_json::Value),
    /// Opaque bytes (Avro, Protobuf, ...), stored in `payload_bytes`.
    Bytes(Vec<u8>),
    /// No value: the Kafka record carries a null value (a tombstone).
    Empty,
}

impl Payload {
    /// The `payload` (jsonb) and `payload_bytes` (bytea) values to bind.
    pub(crate) fn columns(&self) -> (Option<sqlx::types::Json<&serde_json::Value>>, Option<&[u8]>) {
        match self {
            Payload::Json(v) => (Some(sqlx::types::Json(v)), None),
            Payload::Bytes(b) => (None, Some(b.as_slice())),
            Payload::Empty => (None, None),
        }
    }
}

/// Binds the event's sixteen columns, in the table's order (`event_id` …
/// `occurred_at`), as `$1` … `$16`: the statements of [`crate::append()`]
/// and [`crate::emit()`] take them alike.
pub(crate) fn bind_columns<'q, O>(
    query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    event: &'q NewEvent,
) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let (json, bytes) = event.payload.columns();
    query
        .bind(event.event_id)
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(&event.event_type)
        .bind(event.event_version)
        .bind(&event.topic)
        .bind(json)
        .bind(bytes)
        .bind(&event.content_type)
        .bind(sqlx::types::Json(&event.headers))
        .bind(&event.correlation_id)
        .bind(&event.causation_id)
        .bind(&event.traceparent)
        .bind(&event.tracestate)
        .bind(&event.source)
        .bind(event.occurred_at)
}

/// An event to append to the outbox.
///
/// Build it with [`NewEvent::new`] and the chained setters; every field is
/// public for callers that prefer struct syntax. [`NewEvent::validate`] (run
/// by [`crate::append()`]) checks it against the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event id, the consumers' idempotency key. Defaults to a new
    /// UUIDv7 (time-ordered).
    pub event_id: Uuid,
    /// The aggregate type, such as `order`. With no explicit topic, the relay
    /// derives the topic from it.
    pub aggregate_type: String,
    /// The aggregate id: the Kafka record key, so all events of one aggregate
    /// land on one partition, in order.
    pub aggregate_id: String,
    /// The event type, a stable wire name such as `order.created`.
    pub event_type: String,
    /// The payload's schema version. Defaults to 1.
    pub event_version: i32,
    /// An explicit topic. Defaults to `None`: the relay's topic template
    /// applies (by default the aggregate type).
    pub topic: Option<String>,
    /// The record value. Defaults to [`Payload::Empty`].
    pub payload: Payload,
    /// The payload's media type. Defaults to `application/json`.
    pub content_type: String,
    /// Extra Kafka headers (string values). Names in [`headers::RESERVED`]
    /// are refused.
    pub headers: BTreeMap<String, String>,
    /// Correlation id: ties together everything done for one request.
    pub correlation_id: Option<String>,
    /// Causation id: the id of the message that caused this event.
    pub causation_id: Option<String>,
    /// W3C `traceparent` of the producing span, forwarded as a header.
    pub traceparent: Option<String>,
    /// W3C `tracestate`, forwarded as a header.
    pub tracestate: Option<String>,
    /// The producing service (CloudEvents `source`). Defaults to `None`: the
    /// relay's configured default source applies.
    pub source: Option<String>,
    /// When the event happened. Defaults to now.
    pub occurred_at: DateTime<Utc>,
    /// Publish no earlier than this (delayed delivery, migration V10).
    /// Defaults to `None`: publish as soon as the transaction commits. A
    /// time not after the transaction's start counts as `None`. See
    /// [`NewEvent::not_before`].
    pub not_before: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id, version 1, no payload, and
    /// `occurred_at` set to now.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version: 1,
            topic: None,
            payload: Payload::Empty,
            content_type: "application/json".into(),
            headers: BTreeMap::new(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            tracestate: None,
            source: None,
            occurred_at: Utc::now(),
            not_before: None,
        }
    }

    /// Sets the event id (for example to derive it from a request id).
    pub fn event_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the schema version (default 1).
    pub fn version(mut self, version: i32) -> Self {
        self.event_version = version;
        self
    }

    /// Sends the event to this topic instead of the derived one.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Serializes `value` as the JSON payload.
    pub fn json_payload<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, AppendError> {
        let value = serde_json::to_value(value).map_err(AppendError::Serialize)?;
        self.payload = Payload::Json(value);
        self.content_type = "application/json".into();
        Ok(self)
    }

    /// Sets a binary payload and its media type.
    pub fn bytes_payload(mut self, bytes: Vec<u8>, content_type: impl Into<String>) -> Self {
        self.payload = Payload::Bytes(bytes);
        self.content_type = content_type.into();
        self
    }

    /// Adds an extra Kafka header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the W3C `traceparent` (and optionally `tracestate`).
    pub fn trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }

    /// Sets the CloudEvents source of this event.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets when the event occurred (default: when [`NewEvent::new`] ran).
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = at;
        self
    }

    /// Delays the event: the relay publishes it no earlier than `at`.
    ///
    /// The event waits in `outbox_delayed`, apart from the outbox, so a far
    /// due time costs nothing until then. When it is due, a relay moves it
    /// into the outbox as a new pending row (same event id), so it takes
    /// its place in its key's order *at its due time*: events of the key
    /// committed before then are published before it, later ones after
    /// it, and it never holds back the key's other events. A time already
    /// past is no delay. `docs/schema.md` ("V10: delayed events") has the
    /// details.
    pub fn not_before(mut self, at: DateTime<Utc>) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Delays the event by `delay` from now: [`NewEvent::not_before`] with
    /// `now + delay`.
    pub fn delayed_by(self, delay: std::time::Duration) -> Self {
        let at = Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::MAX);
        self.not_before(at)
    }

    /// Checks the event against the contract; [`crate::append()`] calls this.
    pub fn validate(&self) -> Result<(), AppendError> {
        let invalid =
            |field: &'static str, reason: String| Err(AppendError::Invalid { field, reason });
        for (field, value) in [
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
            ("content_type", &self.content_type),
        ] {
            if value.trim().is_empty() {
                return invalid(field, "must not be empty".into());
            }
            if value.contains('\0') {
                return invalid(field, "must not contain NUL characters".into());
            }
        }
        if self.event_version <= 0 {
            return invalid(
                "event_version",
                format!("must be positive, got {}", self.event_version),
            );
        }
        if let Some(topic) = &self.topic {
            validate_topic(topic).or_else(|reason| invalid("topic", reason))?;
        }
        let size = match &self.payload {
            Payload::Json(v) => serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0),
            Payload::Bytes(b) => b.len(),
            Payload::Empty => 0,
        };
        if size > MAX_PAYLOAD_BYTES {
            return invalid(
                "payload",
                format!("is {size} bytes; the outbox accepts at most {MAX_PAYLOAD_BYTES}"),
            );
        }
        for name in self.headers.keys() {
            if name.is_empty() {
                return invalid("headers", "a header name is empty".into());
            }
            if headers::is_reserved(name) {
                return invalid(
                    "headers",
                    format!("{name:?} is set by the relay itself; use the matching NewEvent field"),
                );
            }
        }
        if let Some(tp) = &self.traceparent {
            if !is_valid_traceparent(tp) {
                return invalid(
                    "traceparent",
                    format!("{tp:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"),
                );
            }
        }
        Ok(())
    }
}

/// Whether `value` has the W3C `traceparent` shape `vv-<32 hex>-<16 hex>-ff`.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NewEvent {
        NewEvent::new("order", "42", "order.created")
    }

    #[test]
    fn a_minimal_event_is_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn empty_fields_are_rejected_with_their_name() {
        let err = NewEvent::new("", "42", "t").validate().unwrap_err();
        assert!(err.to_string().contains("aggregate_type"), "{err}");
        let err = NewEvent::new("o", " ", "t").validate().unwrap_err();
        assert!(err.to_string().contains("aggregate_id"), "{err}");
    }

    #[test]
    fn bad_topic_version_header_and_traceparent_are_rejected() {
        assert!(valid().topic("bad topic").validate().is_err());
        assert!(valid().version(0).validate().is_err());
        assert!(valid().header("ce_id", "x").validate().is_err());
        assert!(valid().trace_context("nope", None).validate().is_err());
        valid()
            .trace_context(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            )
            .validate()
            .unwrap();
    }

    #[test]
    fn oversized_payload_is_rejected() {
        let err = valid()
            .bytes_payload(vec![0; MAX_PAYLOAD_BYTES + 1], "application/octet-stream")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
    }
}
