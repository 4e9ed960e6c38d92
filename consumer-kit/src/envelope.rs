//! [`Envelope`]: an outbox event as a handler receives it, decoded from the
//! Kafka record the relay wrote (key, value, and the `ce_*` headers of
//! [`outbox_core::headers`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::headers as h;
use rdkafka::message::OwnedMessage;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::message::Message;

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// An outbox event, decoded. `T` is the payload type, deserialized from the
/// record's JSON value with serde (use `serde_json::Value` to take any JSON,
/// and `Option<T>` to accept tombstones).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// `ce_id`: the event id, the dedupe key.
    pub event_id: Uuid,
    /// `ce_type`: the event type, such as `order.created`.
    pub event_type: String,
    /// `ce_eventversion`: the payload's schema version (1 when absent).
    pub event_version: i32,
    /// `ce_source`: the producing service.
    pub source: Option<String>,
    /// `ce_aggregatetype`.
    pub aggregate_type: Option<String>,
    /// The record key: the aggregate id.
    pub aggregate_id: Option<String>,
    /// `ce_time`: when the event occurred.
    pub occurred_at: Option<DateTime<Utc>>,
    /// `ce_correlationid`.
    pub correlation_id: Option<String>,
    /// `ce_causationid`.
    pub causation_id: Option<String>,
    /// W3C `traceparent` of the producer, to link the consumer's span.
    pub traceparent: Option<String>,
    /// W3C `tracestate`.
    pub tracestate: Option<String>,
    /// Every other header (the producer's own), as text.
    pub headers: BTreeMap<String, String>,
    /// Where the record was read.
    pub position: Position,
    /// The decoded payload.
    pub payload: T,
}

/// An envelope whose payload is still the record's raw value.
pub type RawEnvelope = Envelope<Option<Vec<u8>>>;

/// Why a record is not an outbox event. Such a record goes to the
/// dead-letter topic at once.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required header is absent.
    #[error("header {0} is missing; the record was not written by outbox-relay or a compatible producer")]
    MissingHeader(&'static str),
    /// A header is present but unusable.
    #[error("header {name} is invalid: {reason}")]
    InvalidHeader {
        /// The header.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An identity header ([`outbox_core::headers::IDENTITY`]) appears more
    /// than once, or under a name that differs from it only in case.
    #[error("header {name} is ambiguous: {reason}; the record cannot be identified safely")]
    AmbiguousHeader {
        /// The identity header.
        name: &'static str,
        /// What makes it ambiguous.
        reason: String,
    },
    /// The value does not deserialize into the handler's payload type.
    #[error("payload does not decode as {type_name}: {reason}")]
    Payload {
        /// The expected Rust type.
        type_name: &'static str,
        /// serde's message.
        reason: String,
    },
}

/// Refuses a header that makes the record's identity ambiguous: a second
/// identity header of one name (`seen` holds those decoded so far), or one
/// whose name differs from an identity header's only in case.
fn check_identity(
    key: &str,
    value: &str,
    seen: &BTreeMap<&'static str, String>,
) -> Result<(), DecodeError> {
    for name in h::IDENTITY {
        if key == *name {
            if let Some(first) = seen.get(name) {
                return Err(DecodeError::AmbiguousHeader {
                    name,
                    reason: format!("it appears more than once ({first:?} and {value:?})"),
                });
            }
        } else if key.eq_ignore_ascii_case(name) {
            return Err(DecodeError::AmbiguousHeader {
                name,
                reason: format!("the record has a header {key:?} ({value:?}), which differs from {name} only in case"),
            });
        }
    }
    Ok(())
}

impl RawEnvelope {
    /// Decodes the envelope of `msg`, leaving the payload raw. A record
    /// whose identity is ambiguous (see [`outbox_core::headers::IDENTITY`])
    /// is refused with [`DecodeError::AmbiguousHeader`].
    pub fn decode(msg: &OwnedMessage) -> Result<Self, DecodeError> {
        Self::decode_message(&Message::from_kafka(msg))
    }

    /// Decodes the envelope of a message of either broker.
    pub(crate) fn decode_message(msg: &Message) -> Result<Self, DecodeError> {
        let mut ce: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut extra = BTreeMap::new();
        for (key, value) in msg.headers() {
            let text = value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            check_identity(key, &text, &ce)?;
            match h::RESERVED.iter().find(|n| **n == key) {
                Some(name) => {
                    ce.insert(name, text);
                }
                None => {
                    extra.insert(key.to_string(), text);
                }
            }
        }
        let id = ce
            .remove(h::CE_ID)
            .ok_or(DecodeError::MissingHeader(h::CE_ID))?;
        let event_id = Uuid::parse_str(id.trim()).map_err(|e| DecodeError::InvalidHeader {
            name: h::CE_ID,
            reason: format!("{id:?} is not a UUID ({e})"),
        })?;
        let event_type = ce
            .remove(h::CE_TYPE)
            .ok_or(DecodeError::MissingHeader(h::CE_TYPE))?;
        if event_type.trim().is_empty() {
            return Err(DecodeError::InvalidHeader {
                name: h::CE_TYPE,
                reason: "empty".into(),
            });
        }
        let event_version = match ce.remove(h::CE_EVENT_VERSION) {
            None => 1,
            Some(v) => v
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| DecodeError::InvalidHeader {
                    name: h::CE_EVENT_VERSION,
                    reason: format!("{v:?} is not a positive integer"),
                })?,
        };
        let occurred_at = match ce.remove(h::CE_TIME) {
            None => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(t.trim())
                    .map_err(|e| DecodeError::InvalidHeader {
                        name: h::CE_TIME,
                        reason: format!("{t:?} is not RFC 3339 ({e})"),
                    })?
                    .with_timezone(&Utc),
            ),
        };
        Ok(Envelope {
            event_id,
            event_type,
            event_version,
            source: ce.remove(h::CE_SOURCE),
            aggregate_type: ce.remove(h::CE_AGGREGATE_TYPE),
            aggregate_id: msg
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .or_else(|| ce.remove(h::CE_SUBJECT)),
            occurred_at,
            correlation_id: ce.remove(h::CE_CORRELATION_ID),
            causation_id: ce.remove(h::CE_CAUSATION_ID),
            traceparent: ce.remove(h::TRACEPARENT),
            tracestate: ce.remove(h::TRACESTATE),
            headers: extra,
            position: msg.position.clone(),
            payload: msg.payload.clone(),
        })
    }

    /// Deserializes the payload as JSON into `T`; a missing value (a
    /// tombstone) is JSON `null`.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<Envelope<T>, DecodeError> {
        let bytes = self.payload.as_deref().unwrap_or(b"null");
        let payload = serde_json::from_slice(bytes).map_err(|e| DecodeError::Payload {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
        Ok(Envelope {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            source: self.source.clone(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            headers: self.headers.clone(),
            position: self.position.clone(),
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::{message::OwnedHeaders, Timestamp};

    use super::*;

    fn msg(headers: &[(&str, &str)], value: Option<&[u8]>) -> OwnedMessage {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            Some(b"order-1".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            2,
            7,
            Some(hs),
        )
    }

    const ID: &str = "0190a5b2-7c1e-7d3a-9a51-2b4c6d8e0f12";

    #[test]
    fn decodes_the_relay_envelope() {
        let m = msg(
            &[
                ("ce_id", ID),
                ("ce_type", "order.created"),
                ("ce_eventversion", "2"),
                ("ce_time", "2026-11-23T10:00:00.000001Z"),
                ("ce_correlationid", "req-1"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("tenant", "acme"),
            ],
            Some(br#"{"amount": 5}"#),
        );
        let raw = RawEnvelope::decode(&m).unwrap();
        assert_eq!(raw.event_id.to_string(), ID);
        assert_eq!(raw.event_version, 2);
        assert_eq!(raw.aggregate_id.as_deref(), Some("order-1"));
        assert_eq!(raw.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(raw.headers.get("tenant").map(String::as_str), Some("acme"));
        assert_eq!(raw.position.to_string(), "orders/2@7");
        let typed: Envelope<serde_json::Value> = raw.typed().unwrap();
        assert_eq!(typed.payload["amount"], 5);
    }

    #[test]
    fn missing_or_bad_headers_are_named() {
        let err = RawEnvelope::decode(&msg(&[("ce_type", "t")], None)).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader("ce_id"));
        let err =
            RawEnvelope::decode(&msg(&[("ce_id", "nope"), ("ce_type", "t")], None)).unwrap_err();
        assert!(err.to_string().contains("ce_id"), "{err}");
        let err = RawEnvelope::decode(&msg(&[("ce_id", ID)], None)).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader("ce_type"));
    }

    #[test]
    fn a_second_or_case_varied_identity_header_is_refused_by_name() {
        const OTHER: &str = "0190a5b2-7c1e-7d3a-9a51-2b4c6d8e0f99";
        for (headers, name, says) in [
            (
                vec![("ce_id", ID), ("ce_type", "t"), ("ce_id", OTHER)],
                "ce_id",
                "more than once",
            ),
            (
                vec![("ce_id", ID), ("ce_id", ID), ("ce_type", "t")],
                "ce_id",
                "more than once",
            ),
            (
                vec![("ce_id", ID), ("CE_ID", OTHER), ("ce_type", "t")],
                "ce_id",
                "\"CE_ID\"",
            ),
            (
                vec![("Ce_Id", ID), ("ce_type", "t")],
                "ce_id",
                "only in case",
            ),
            (
                vec![("ce_id", ID), ("ce_type", "a"), ("ce_type", "b")],
                "ce_type",
                "more than once",
            ),
            (
                vec![
                    ("ce_id", ID),
                    ("ce_type", "t"),
                    ("ce_eventversion", "1"),
                    ("CE_EVENTVERSION", "2"),
                ],
                "ce_eventversion",
                "only in case",
            ),
        ] {
            let err = RawEnvelope::decode(&msg(&headers, None)).unwrap_err();
            assert!(
                matches!(&err, DecodeError::AmbiguousHeader { name: n, .. } if *n == name),
                "{headers:?}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        // Informative headers may repeat; a custom header named like no
        // identity header is the producer's own.
        let ok = RawEnvelope::decode(&msg(
            &[
                ("ce_id", ID),
                ("ce_type", "t"),
                ("ce_time", "2026-11-23T10:00:00Z"),
                ("x-ce-id", "mine"),
            ],
            None,
        ))
        .unwrap();
        assert_eq!(ok.headers.get("x-ce-id").map(String::as_str), Some("mine"));
    }

    #[test]
    fn payload_type_mismatch_is_a_decode_error() {
        #[derive(Debug, serde::Deserialize)]
        struct Order {
            #[allow(dead_code)]
            amount: u32,
        }
        let raw = RawEnvelope::decode(&msg(&[("ce_id", ID), ("ce_type", "t")], Some(b"not json")))
            .unwrap();
        let err = raw.typed::<Order>().unwrap_err();
        assert!(err.to_string().contains("Order"), "{err}");
        let tomb = RawEnvelope::decode(&msg(&[("ce_id", ID), ("ce_type", "t")], None)).unwrap();
        assert_eq!(
            tomb.typed::<Option<serde_json::Value>>().unwrap().payload,
            None
        );
    }
}
