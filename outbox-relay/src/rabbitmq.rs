//! The RabbitMQ sink ([`crate::RabbitMqSink`], `--sink rabbitmq`, cargo
//! feature `rabbitmq`): each event becomes a persistent message on a durable
//! topic exchange named by its topic, routed by a key from a template, and
//! counts as delivered only once the broker confirmed it.
//!
//! ```text
//!  batch of records ─► exchanges declared (durable, topic; once per name)
//!     │
//!     ▼
//!  basic.publish of every record, in order, on one channel in confirm
//!     │  mode (mandatory, persistent): never one await per message
//!     ▼
//!  every confirm awaited together ─► ack: delivered
//!                                     ack after basic.return (no queue
//!                                       bound for its key): failed
//!                                     nack: failed
//!                                     connection or channel lost, a
//!                                       blocked connection, no confirm
//!                                       in time: transient (sent again)
//! ```
//!
//! One channel carries every message of the relay, in batch order, so the
//! order of a key's events is the order the broker receives them; RabbitMQ
//! keeps it per queue (docs/rabbitmq.md says what consumers then keep).
//!
//! The message for a record (the mapping, beside Kafka's in
//! docs/rabbitmq.md): `message_id` is the event id, `type` the event type,
//! `correlation_id`, `timestamp` (the event's time, in seconds) and
//! `content_type` from the envelope; the CloudEvents attributes are headers
//! named `cloudEvents:<attribute>` (the CloudEvents AMQP binding), and the
//! row's own headers and `traceparent`/`tracestate` keep their names.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::headers as h;
use outbox_kafka::Reach;
use rdkafka::message::Headers;
use tracing::{info, warn};

use crate::{config::RabbitMqSink, publisher::Outcome, record::Record};

/// AMQP short strings (exchange names, routing keys, header names) hold
/// at most this many bytes.
const SHORT_MAX: usize = 255;

/// How often the connection is looked at for readiness while idle.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The open connection and its confirm-mode channel.
struct Link {
    conn: Connection,
    channel: Channel,
}

/// Publishes batches to RabbitMQ (see the module docs).
pub(crate) struct RabbitMqPublisher {
    cfg: RabbitMqSink,
    /// Where the broker is, for messages: never the URL (it may carry a
    /// password).
    broker: String,
    publish_timeout: Duration,
    link: tokio::sync::Mutex<Option<Link>>,
    declared: Mutex<HashSet<String>>,
    reach: Arc<Reach>,
    /// What the last look at the connection found wrong, said once.
    said: Mutex<Option<String>>,
}

impl RabbitMqPublisher {
    pub(crate) fn new(cfg: RabbitMqSink, publish_timeout: Duration) -> Self {
        let broker = cfg.broker_for_logs();
        Self {
            cfg,
            broker,
            publish_timeout,
            link: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
            reach: Arc::new(Reach::default()),
            said: Mutex::new(None),
        }
    }

    /// The connection as seen by readiness.
    pub(crate) fn reach(&self) -> Arc<Reach> {
        Arc::clone(&self.reach)
    }

    /// Looks at the connection every second while the publisher lives:
    /// opens it when there is none (so that readiness and the first batch
    /// do not wait for each other), and reports a lost or blocked one.
    pub(crate) fn watch(self: &Arc<Self>) {
        let me: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(publisher) = me.upgrade() {
                publisher.look().await;
                drop(publisher);
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
    }

    async fn look(&self) {
        // A batch being published holds the link: it reports for itself.
        let Ok(mut link) = self.link.try_lock() else {
            return;
        };
        let seen = self.usable(&mut link).await;
        // Said once per change: a broker down for an hour is one line.
        let mut said = self.said.lock().expect("said");
        match seen {
            Ok(_) => {
                self.reach.up();
                crate::telemetry::rabbitmq_connection(true);
                if said.take().is_some() {
                    info!(broker = %self.broker, "RabbitMQ is reachable again");
                }
            }
            Err(why) => {
                if said.as_deref() != Some(why.as_str()) {
                    warn!(reason = %why, "RabbitMQ cannot be used; trying again every second");
                    *said = Some(why.clone());
                }
                self.reach.down(why);
                crate::telemetry::rabbitmq_connection(false);
            }
        }
    }

    /// The open channel, connecting first if needed; the reason it cannot
    /// be used otherwise.
    async fn usable(&self, link: &mut Option<Link>) -> Result<Channel, String> {
        if let Some(l) = link.as_ref() {
            if !l.conn.status().connected() || !l.channel.status().connected() {
                *link = None;
            } else if l.conn.status().blocked() {
                return Err(format!(
                    "RabbitMQ at {} blocked the connection (a memory or disk alarm): \
                     publishing waits until the alarm clears",
                    self.broker
                ));
            }
        }
        if link.is_none() {
            *link = Some(self.connect().await?);
        }
        Ok(link.as_ref().expect("just set").channel.clone())
    }

    async fn connect(&self) -> Result<Link, String> {
        let cannot =
            |what: &str, e: lapin::Error| format!("cannot {what} RabbitMQ at {}: {e}", self.broker);
        let conn = tokio::time::timeout(
            self.cfg.connect_timeout,
            Connection::connect(&self.cfg.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| {
            format!(
                "cannot connect to RabbitMQ at {}: no answer within {:?}",
                self.broker, self.cfg.connect_timeout
            )
        })?
        .map_err(|e| cannot("connect to", e))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| cannot("open a channel on", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| cannot("turn publisher confirms on at", e))?;
        // A new channel has declared nothing yet (a broker restart may have
        // lost non-durable state; ours is durable, but declaring is cheap).
        self.declared.lock().expect("declared").clear();
        info!(broker = %self.broker, "connected to RabbitMQ");
        crate::telemetry::rabbitmq_connected();
        Ok(Link { conn, channel })
    }

    /// Publishes `records` pipelined and returns one outcome per record, in
    /// order; a `None` entry is not sent and its outcome is `None`.
    pub(crate) async fn publish(&self, records: Vec<Option<Record>>) -> Vec<Option<Outcome>> {
        // The link is held only to pick the channel: the watcher may look
        // at the connection (and see it blocked) while confirms are awaited.
        let (channel, status) = {
            let mut link = self.link.lock().await;
            match self.usable(&mut link).await {
                Ok(c) => (c, link.as_ref().expect("usable").conn.status().clone()),
                Err(why) => {
                    self.reach.down(why.clone());
                    return transient_all(&records, &why);
                }
            }
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
        // Declare the exchanges not yet declared on this channel.
        let mut refused: Vec<(String, String)> = Vec::new();
        let topics: Vec<String> = {
            let declared = self.declared.lock().expect("declared");
            let mut seen = HashSet::new();
            records
                .iter()
                .flatten()
                .filter(|r| !declared.contains(&r.topic) && seen.insert(r.topic.clone()))
                .map(|r| r.topic.clone())
                .collect()
        };
        for topic in topics {
            match self.declare(&channel, &topic).await {
                Ok(()) => {
                    self.declared.lock().expect("declared").insert(topic);
                }
                Err((why, permanent)) => {
                    // The broker closed the channel: `usable` opens a new
                    // one next time.
                    if !permanent {
                        self.reach.down(why.clone());
                        return transient_all(&records, &why);
                    }
                    refused.push((topic, why));
                    // Every other record goes again, on a new channel.
                    for (i, rec) in records.iter().enumerate() {
                        outcomes[i] = rec.as_ref().map(|r| {
                            match refused.iter().find(|(t, _)| *t == r.topic) {
                                Some((_, why)) => Outcome::Permanent(why.clone()),
                                None => Outcome::Transient(
                                    "sent again: the channel closed over another exchange".into(),
                                ),
                            }
                        });
                    }
                    return outcomes;
                }
            }
        }
        // Every message first, then every confirm.
        let mut pending = Vec::with_capacity(records.len());
        for (i, rec) in records.iter().enumerate() {
            let Some(rec) = rec else { continue };
            let (routing_key, body, props) = match message(rec, &self.cfg.routing_key) {
                Ok(m) => m,
                Err(why) => {
                    outcomes[i] = Some(Outcome::Permanent(why));
                    continue;
                }
            };
            let sent = channel
                .basic_publish(
                    ShortString::from(rec.topic.clone()),
                    ShortString::from(routing_key.clone()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await;
            match sent {
                Ok(confirm) => pending.push((i, routing_key, confirm)),
                Err(e) => {
                    let why = format!("cannot publish to RabbitMQ at {}: {e}", self.broker);
                    self.reach.down(why.clone());
                    for (j, r) in records.iter().enumerate().skip(i) {
                        if r.is_some() && outcomes[j].is_none() {
                            outcomes[j] = Some(Outcome::Transient(why.clone()));
                        }
                    }
                    break;
                }
            }
        }
        let waits = pending
            .into_iter()
            .map(|(i, key, confirm)| async move { (i, key, confirm.await) });
        let Ok(confirmed) =
            tokio::time::timeout(self.publish_timeout, futures::future::join_all(waits)).await
        else {
            let why = if status.blocked() {
                // Kept: the watcher reports it, and nothing is sent on it
                // until the broker unblocks it.
                format!(
                    "RabbitMQ at {} blocked the connection (a memory or disk alarm) before \
                     confirming; sent again once it is unblocked",
                    self.broker
                )
            } else {
                // Whatever became of it, start afresh.
                *self.link.lock().await = None;
                format!(
                    "RabbitMQ at {} confirmed nothing within {:?} (an overloaded broker?); \
                     sent again",
                    self.broker, self.publish_timeout
                )
            };
            self.reach.down(why.clone());
            for (i, r) in records.iter().enumerate() {
                if r.is_some() && outcomes[i].is_none() {
                    outcomes[i] = Some(Outcome::Transient(why.clone()));
                }
            }
            return outcomes;
        };
        let mut lost = false;
        for (i, key, confirmation) in confirmed {
            let exchange = records[i].as_ref().map_or("", |r| r.topic.as_str());
            outcomes[i] = Some(match confirmation {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Outcome::Delivered,
                Ok(Confirmation::Ack(Some(returned))) => Outcome::Permanent(format!(
                    "unroutable: exchange {exchange} has no queue bound for routing key {key} \
                     ({} {}); bind a queue (consumer-kit declares its own), then retry it",
                    returned.reply_code,
                    returned.reply_text.as_str()
                )),
                Ok(Confirmation::Nack(_)) => Outcome::Permanent(format!(
                    "RabbitMQ refused the message (nack) on exchange {exchange}"
                )),
                Err(e) => {
                    lost = true;
                    Outcome::Transient(format!("no confirm from RabbitMQ at {}: {e}", self.broker))
                }
            });
        }
        if lost {
            self.reach.down(format!(
                "the connection to RabbitMQ at {} was lost",
                self.broker
            ));
        } else {
            self.reach.up();
        }
        outcomes
    }

    /// Declares a durable topic exchange; the error says whether it is
    /// permanent (the exchange exists with another type, or access is
    /// refused) or not.
    async fn declare(&self, channel: &Channel, name: &str) -> Result<(), (String, bool)> {
        if name.len() > SHORT_MAX {
            return Err((
                format!("exchange name {name:?} is longer than {SHORT_MAX} bytes"),
                true,
            ));
        }
        channel
            .exchange_declare(
                ShortString::from(name.to_string()),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                let permanent = is_refusal(&e);
                let why = if permanent {
                    format!(
                        "cannot declare exchange {name} as a durable topic exchange: {e} \
                         (does it exist with another type? may this user configure it?)"
                    )
                } else {
                    format!("cannot declare exchange {name} at {}: {e}", self.broker)
                };
                if !permanent {
                    warn!(exchange = name, error = %e, "cannot declare an exchange");
                }
                (why, permanent)
            })
    }
}

/// A refusal by the broker, which sending again would meet the same way:
/// access refused (403), resource locked (405), precondition failed (406:
/// the exchange exists with another type), not allowed (530).
fn is_refusal(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 405 | 406 | 530)
    )
}

fn transient_all(records: &[Option<Record>], why: &str) -> Vec<Option<Outcome>> {
    records
        .iter()
        .map(|r| r.as_ref().map(|_| Outcome::Transient(why.to_string())))
        .collect()
}

/// The routing key, body and properties of `rec`'s message, or why it
/// cannot be one.
fn message(rec: &Record, template: &str) -> Result<(String, Vec<u8>, BasicProperties), String> {
    let mut headers = FieldTable::default();
    let mut props = BasicProperties::default().with_delivery_mode(2);
    let mut event_type = "";
    let mut aggregate_type = "";
    for header in rec.headers.iter() {
        let value = header.value.unwrap_or_default();
        let text = std::str::from_utf8(value).unwrap_or_default();
        match header.key {
            h::CE_ID => props = props.with_message_id(ShortString::from(text.to_string())),
            h::CE_TYPE => {
                event_type = text;
                props = props.with_type(ShortString::from(text.to_string()));
            }
            h::CE_CORRELATION_ID => {
                props = props.with_correlation_id(ShortString::from(short(text, "correlation id")?))
            }
            h::CE_TIME => {
                if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
                    props = props.with_timestamp(u64::try_from(t.timestamp()).unwrap_or(0));
                }
            }
            h::CE_AGGREGATE_TYPE => aggregate_type = text,
            h::CONTENT_TYPE => {
                props = props.with_content_type(ShortString::from(short(text, "content type")?));
                continue;
            }
            _ => {}
        }
        let name = h::amqp_name(header.key);
        headers.insert(
            ShortString::from(short(&name, "header name")?),
            AMQPValue::LongString(LongString::from(value.to_vec())),
        );
    }
    let routing_key = template
        .replace("{event_type}", event_type)
        .replace("{aggregate_type}", aggregate_type)
        .replace("{aggregate_id}", &rec.key);
    short(&routing_key, "routing key")?;
    Ok((
        routing_key,
        rec.value.clone().unwrap_or_default(),
        props.with_headers(headers),
    ))
}

/// `s`, if it fits an AMQP short string.
fn short(s: &str, what: &str) -> Result<String, String> {
    if s.len() > SHORT_MAX {
        return Err(format!(
            "the {what} is {} bytes; AMQP allows at most {SHORT_MAX}",
            s.len()
        ));
    }
    Ok(s.to_string())
}
