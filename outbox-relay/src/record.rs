//! Turns an [`OutboxRow`] into a Kafka record: topic routing, key, value and
//! the envelope headers of [`outbox_core::headers`].
//!
//! A row that cannot become a valid record (bad topic, headers that are not a
//! JSON object of strings, a reserved header name) is a *permanent* failure:
//! it is never sent, and the relay moves it to the failed state with the
//! reason returned here.

use outbox_core::{headers as h, topic::validate_topic};
use rdkafka::message::{Header, OwnedHeaders};

use crate::claim::OutboxRow;

/// A row ready to send.
#[derive(Debug, Clone)]
pub struct Record {
    /// Destination topic.
    pub topic: String,
    /// Record key: the aggregate id.
    pub key: String,
    /// Record value: the payload, or `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Envelope and extra headers.
    pub headers: OwnedHeaders,
}

/// Routes rows to topics: the row's explicit topic, else the template.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    template: String,
}

impl TopicRouter {
    /// A router for `template`, where `{aggregate_type}` is replaced by the
    /// row's aggregate type.
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
        }
    }

    /// The topic for `row`, or why it has none.
    pub fn topic_for(&self, row: &OutboxRow) -> Result<String, String> {
        let topic = match &row.topic {
            Some(t) => t.clone(),
            None => self
                .template
                .replace("{aggregate_type}", &row.aggregate_type),
        };
        validate_topic(&topic).map_err(|r| {
            if row.topic.is_some() {
                format!("invalid topic column: {r}")
            } else {
                format!(
                    "topic derived from aggregate type {:?}: {r}",
                    row.aggregate_type
                )
            }
        })?;
        Ok(topic)
    }
}

/// Builds the record for `row`, or the reason it is malformed.
pub fn build(
    row: &mut OutboxRow,
    router: &TopicRouter,
    default_source: &str,
) -> Result<Record, String> {
    let topic = router.topic_for(row)?;
    // The payload moves into the record; the row keeps none.
    let value = match (row.payload.take(), row.payload_bytes.take()) {
        (Some(json), None) => Some(json.into_bytes()),
        (None, Some(bytes)) => Some(bytes),
        (None, None) => None,
        (Some(_), Some(_)) => return Err("both payload and payload_bytes are set".into()),
    };
    // Raw values: a number's header is its JSON text as PostgreSQL stores
    // it, never a float's rendering of it (`12345678901234567890123`, `1.50`).
    let extra: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
        match serde_json::from_str(&row.headers) {
            Ok(map) => map,
            Err(e) if row.headers.trim_start().starts_with('{') => {
                return Err(format!("headers are not valid JSON: {e}"))
            }
            Err(_) => {
                return Err(format!(
                    "headers must be a JSON object, got {}",
                    row.headers.trim()
                ))
            }
        };
    let id = row.event_id.to_string();
    let version = row.event_version.to_string();
    let time = row
        .occurred_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let source = row.source.as_deref().unwrap_or(default_source);
    let mut headers = OwnedHeaders::new_with_capacity(12 + extra.len());
    let mut add = |key: &str, value: &str| {
        headers = std::mem::take(&mut headers).insert(Header {
            key,
            value: Some(value),
        });
    };
    add(h::CE_SPECVERSION, h::SPEC_VERSION);
    add(h::CE_ID, &id);
    add(h::CE_TYPE, &row.event_type);
    add(h::CE_SOURCE, source);
    add(h::CE_TIME, &time);
    if row.aggregate_id.len() <= h::SUBJECT_MAX_BYTES {
        add(h::CE_SUBJECT, &row.aggregate_id);
    }
    add(h::CE_AGGREGATE_TYPE, &row.aggregate_type);
    add(h::CE_EVENT_VERSION, &version);
    // A tombstone has no data, so no data content type.
    if value.is_some() {
        add(h::CONTENT_TYPE, &row.content_type);
    }
    for (name, value) in [
        (h::CE_CORRELATION_ID, &row.correlation_id),
        (h::CE_CAUSATION_ID, &row.causation_id),
        (h::TRACEPARENT, &row.traceparent),
        (h::TRACESTATE, &row.tracestate),
    ] {
        if let Some(v) = value {
            add(name, v);
        }
    }
    for (name, value) in &extra {
        if name.is_empty() {
            return Err("a header name is empty".into());
        }
        if h::is_reserved(name) {
            return Err(format!("header {name:?} is reserved for the envelope"));
        }
        let raw = value.get();
        let text = match raw.as_bytes().first() {
            Some(b'"') => {
                serde_json::from_str::<String>(raw).map_err(|e| format!("header {name:?}: {e}"))?
            }
            Some(b'-' | b'0'..=b'9') | None => raw.to_string(),
            _ if raw == "true" || raw == "false" => raw.to_string(),
            _ => {
                return Err(format!(
                    "header {name:?} must be a string, number or boolean, got {raw}"
                ))
            }
        };
        add(name, &text);
    }
    Ok(Record {
        topic,
        key: row.aggregate_id.clone(),
        value,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rdkafka::message::Headers;
    use uuid::Uuid;

    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 1,
            event_id: Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "order.created".into(),
            event_version: 2,
            topic: None,
            payload: Some(r#"{"a": 1}"#.into()),
            payload_bytes: None,
            content_type: "application/json".into(),
            headers: r#"{"tenant": "acme", "n": 3}"#.into(),
            correlation_id: Some("corr".into()),
            causation_id: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
            source: None,
            occurred_at: Utc::now(),
            created_at: Utc::now(),
        }
    }

    fn header(rec: &Record, name: &str) -> Option<String> {
        rec.headers
            .iter()
            .find(|hd| hd.key == name)
            .and_then(|hd| hd.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    }

    #[test]
    fn maps_row_to_cloudevents_record() {
        let mut r = row();
        let rec = build(&mut r, &TopicRouter::new("events.{aggregate_type}"), "svc").unwrap();
        assert_eq!(rec.topic, "events.order");
        assert_eq!(rec.key, "42");
        assert_eq!(rec.value.as_deref(), Some(br#"{"a": 1}"#.as_slice()));
        assert_eq!(header(&rec, h::CE_ID), Some(r.event_id.to_string()));
        assert_eq!(header(&rec, h::CE_TYPE).as_deref(), Some("order.created"));
        assert_eq!(header(&rec, h::CE_EVENT_VERSION).as_deref(), Some("2"));
        assert_eq!(header(&rec, h::CE_SOURCE).as_deref(), Some("svc"));
        assert_eq!(header(&rec, h::CE_CORRELATION_ID).as_deref(), Some("corr"));
        assert_eq!(header(&rec, h::TRACEPARENT), r.traceparent);
        assert_eq!(header(&rec, "tenant").as_deref(), Some("acme"));
        assert_eq!(header(&rec, "n").as_deref(), Some("3"));
        assert_eq!(header(&rec, h::CE_CAUSATION_ID), None);
    }

    #[test]
    fn explicit_topic_wins_and_is_validated() {
        let mut r = row();
        r.topic = Some("custom".into());
        assert_eq!(
            build(&mut r, &TopicRouter::new("x"), "s").unwrap().topic,
            "custom"
        );
        r.topic = Some("bad topic".into());
        let err = build(&mut r, &TopicRouter::new("x"), "s").unwrap_err();
        assert!(err.contains("invalid topic column"), "{err}");
    }

    #[test]
    fn header_numbers_are_the_json_text_as_written() {
        let mut r = row();
        r.headers = r#"{"big": 12345678901234567890123, "price": 1.50, "tiny": -0.000000000000000000012345678901234567, "exp": 1e400, "ok": true, "s": "a\"b"}"#.into();
        let rec = build(&mut r, &TopicRouter::new("t"), "s").unwrap();
        assert_eq!(
            header(&rec, "big").as_deref(),
            Some("12345678901234567890123")
        );
        assert_eq!(header(&rec, "price").as_deref(), Some("1.50"));
        assert_eq!(
            header(&rec, "tiny").as_deref(),
            Some("-0.000000000000000000012345678901234567")
        );
        assert_eq!(header(&rec, "exp").as_deref(), Some("1e400"));
        assert_eq!(header(&rec, "ok").as_deref(), Some("true"));
        assert_eq!(header(&rec, "s").as_deref(), Some("a\"b"));
    }

    #[test]
    fn a_tombstone_has_no_content_type() {
        let mut r = row();
        r.payload = None;
        let rec = build(&mut r, &TopicRouter::new("t"), "s").unwrap();
        assert_eq!(rec.value, None);
        assert_eq!(header(&rec, h::CONTENT_TYPE), None);
        assert_eq!(header(&rec, h::CE_ID), Some(r.event_id.to_string()));
    }

    #[test]
    fn an_empty_header_name_is_refused() {
        let mut r = row();
        r.headers = r#"{"": "x"}"#.into();
        let err = build(&mut r, &TopicRouter::new("t"), "s").unwrap_err();
        assert!(err.contains("header name is empty"), "{err}");
    }

    #[test]
    fn malformed_headers_are_reasons_not_panics() {
        let mut r = row();
        r.headers = "[1]".into();
        assert!(build(&mut r, &TopicRouter::new("t"), "s")
            .unwrap_err()
            .contains("JSON object"));
        r.headers = r#"{"ce_id": "x"}"#.into();
        assert!(build(&mut r, &TopicRouter::new("t"), "s")
            .unwrap_err()
            .contains("reserved"));
        r.headers = r#"{"nested": {"a": 1}}"#.into();
        assert!(build(&mut r, &TopicRouter::new("t"), "s")
            .unwrap_err()
            .contains("nested"));
        r.headers = r#"{"nothing": null}"#.into();
        assert!(build(&mut r, &TopicRouter::new("t"), "s")
            .unwrap_err()
            .contains("got null"));
        r.headers = r#"{"broken": "#.into();
        assert!(build(&mut r, &TopicRouter::new("t"), "s")
            .unwrap_err()
            .contains("not valid JSON"));
    }

    #[test]
    fn derived_topic_from_bad_aggregate_type_is_a_reason() {
        let mut r = row();
        r.aggregate_type = "has space".into();
        let err = build(&mut r, &TopicRouter::new("{aggregate_type}"), "s").unwrap_err();
        assert!(err.contains("aggregate type"), "{err}");
    }
}
