//! The RabbitMQ source (cargo feature `rabbitmq`): the group consumes its
//! own queue instead of Kafka topics, through the same dedupe transaction,
//! handlers, retries and dead letters (`process.rs`). One piece because the
//! topology it declares, the connection it keeps and the deliveries it
//! acknowledges are one protocol.
//!
//! ```text
//! connect ─► declare  exchange per topic (durable topic; the relay declares the same)
//!                     <queue> (quorum), bound to each exchange with the binding keys,
//!                       dead-lettering to <queue>.dlx (fanout) ─► <queue>.dlq
//!                     <queue>.retry.N, one per retry, dead-lettering back to <queue>
//!   ─► basic.qos(prefetch) ─► basic.consume
//!   ─► a delivery ─► Message (cloudEvents:* headers read back as ce_*)
//!        ─► process.rs: dedupe insert, handler, COMMIT (or a dead letter, confirmed)
//!        ─► basic.ack, only then
//!   a retryable failure, unordered ─► a copy to <queue>.retry.N expiring after the
//!        backoff, confirmed, then ack: the queue is not held while it waits
//!   a retryable failure, ordered (single active consumer) ─► retried in place
//! connection or channel lost ─► unacked deliveries go back to the queue (dedupe
//!   makes their second delivery harmless); reconnect with backoff
//! ```

use std::{str::FromStr, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::headers as h;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    dead_letter::{self, DeadLetterKind},
    envelope::Position,
    error::ConsumerError,
    health::Phase,
    message::Message,
    process::{process_batch, Shared},
};

/// The exchange an event was first published to (kept on a retried copy,
/// which comes back through the default exchange).
pub const EXCHANGE_HEADER: &str = "x-outbox-exchange";
/// The routing key it was first published with.
pub const ROUTING_KEY_HEADER: &str = "x-outbox-routing-key";
/// Handler tries spent on it by earlier deliveries (on a retried copy).
pub const ATTEMPTS_HEADER: &str = crate::defer::ATTEMPTS_HEADER;

/// The longest AMQP short string (queue, exchange and header names,
/// routing keys).
const SHORT_MAX: usize = 255;

/// The queue type of the group's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// A quorum queue: replicated, durable, with poison-message handling.
    /// The default.
    #[default]
    Quorum,
    /// A classic durable queue.
    Classic,
}

/// Where a consumer reads when it consumes RabbitMQ
/// ([`crate::ConsumerBuilder::rabbitmq`]). [`crate::ConsumerConfig::topics`]
/// name the exchanges (the relay's topics); the Kafka settings are not used.
#[derive(Clone)]
pub struct RabbitMqSource {
    /// The broker: `amqp://user:password@host:5672/vhost` or `amqps://…`.
    /// Required. Only its host, port and vhost are ever logged.
    pub url: String,
    /// The group's queue. Default: the consumer group id. Its dead letters
    /// go to `<queue>.dlx` and wait in `<queue>.dlq`; retries wait in
    /// `<queue>.retry.1`, `.2`, ….
    pub queue: Option<String>,
    /// The binding keys of the queue on each exchange. Default `["#"]`
    /// (every event of the exchange); with the relay's default routing key
    /// (the event type) `["order.created"]` takes only those.
    pub binding_keys: Vec<String>,
    /// The queue's type. Default [`QueueType::Quorum`].
    pub queue_type: QueueType,
    /// Single Active Consumer: one member of the group consumes at a time,
    /// the others stand by, and messages are settled one after another in
    /// queue order, retries in place (holding the queue, as a Kafka
    /// partition is held), so per-key order holds. When `false` (the
    /// default) members compete, up to
    /// [`crate::ConsumerConfig::max_concurrency`] messages are handled at
    /// once, and a retry waits in a delay queue without holding the others:
    /// throughput over order. Park-key ([`crate::Ordering::ParkKey`])
    /// applies only with a single active consumer; without one, later
    /// events of a dead-lettered key are applied ([`crate::Ordering::Skip`]).
    pub single_active_consumer: bool,
    /// Most unacknowledged deliveries at once (`basic.qos`). Default 64.
    pub prefetch: u16,
    /// How long connecting may take. Default 10 s.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for RabbitMqSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSource")
            .field("broker", &broker_for_logs(&self.url))
            .field("queue", &self.queue)
            .field("binding_keys", &self.binding_keys)
            .field("queue_type", &self.queue_type)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("prefetch", &self.prefetch)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl RabbitMqSource {
    /// A source reading from the broker at `url`, every other field at its
    /// documented default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queue: None,
            binding_keys: vec!["#".into()],
            queue_type: QueueType::Quorum,
            single_active_consumer: false,
            prefetch: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Checks the settings for `group`, whose handlers get `max_attempts`
    /// tries.
    pub(crate) fn validate(&self, group: &str, exchanges: &[String]) -> Result<(), String> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(format!(
                "the RabbitMQ URL {} must start with amqp:// or amqps://",
                broker_for_logs(&self.url)
            ));
        }
        lapin::uri::AMQPUri::from_str(&self.url).map_err(|e| {
            format!(
                "the RabbitMQ URL {} does not parse: {e}",
                broker_for_logs(&self.url)
            )
        })?;
        let queue = self.queue_name(group);
        if queue.is_empty() || queue.len() + ".retry.100".len() > SHORT_MAX {
            return Err(format!(
                "the queue name {queue:?} must be 1 to {} bytes (its retry queues add \
                 \".retry.N\")",
                SHORT_MAX - ".retry.100".len()
            ));
        }
        if self.binding_keys.is_empty() {
            return Err(
                "binding_keys is empty: give at least one (\"#\" takes every event)".into(),
            );
        }
        for name in exchanges.iter().chain(&self.binding_keys) {
            if name.len() > SHORT_MAX {
                return Err(format!(
                    "{name:?} is longer than {SHORT_MAX} bytes (AMQP's limit for exchange \
                     names and binding keys)"
                ));
            }
        }
        if self.prefetch == 0 {
            return Err("prefetch must be at least 1".into());
        }
        Ok(())
    }

    fn queue_name(&self, group: &str) -> String {
        self.queue.clone().unwrap_or_else(|| group.to_string())
    }
}

/// `host:port/vhost` of an AMQP URL, without the user or password.
pub fn broker_for_logs(url: &str) -> String {
    match lapin::uri::AMQPUri::from_str(url) {
        Ok(uri) if uri.vhost == "/" => format!("{}:{}", uri.authority.host, uri.authority.port),
        Ok(uri) => format!(
            "{}:{} (vhost {})",
            uri.authority.host, uri.authority.port, uri.vhost
        ),
        Err(_) => "(an unparsable URL)".into(),
    }
}

/// The consumer's link to RabbitMQ: the connection, the channel that
/// publishes dead letters and retries (confirm mode), and the topology.
pub(crate) struct Link {
    source: RabbitMqSource,
    queue: String,
    dead_letter_exchange: String,
    exchanges: Vec<String>,
    /// Delay queues: one per retry, `max_attempts - 1` of them.
    retries: u32,
    broker: String,
    live: tokio::sync::Mutex<Option<Live>>,
}

struct Live {
    conn: Connection,
    publish: Channel,
}

/// Why the link could not be made: the broker unreachable (tried again),
/// or the topology refused (a queue or exchange that exists with other
/// settings, a user who may not configure it), which trying again cannot
/// mend.
#[derive(Debug, Clone)]
struct LinkError {
    why: String,
    refused: bool,
}

impl LinkError {
    fn unreachable(why: String) -> Self {
        Self {
            why,
            refused: false,
        }
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// A refusal by the broker: access refused (403), resource locked (405),
/// precondition failed (406: declared with other settings), not allowed
/// (530).
fn is_refusal(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 405 | 406 | 530)
    )
}

impl Link {
    pub(crate) fn new(
        source: RabbitMqSource,
        group: &str,
        exchanges: &[String],
        max_attempts: u32,
    ) -> Self {
        let queue = source.queue_name(group);
        Self {
            dead_letter_exchange: format!("{queue}.dlx"),
            broker: broker_for_logs(&source.url),
            queue,
            exchanges: exchanges.to_vec(),
            retries: max_attempts.saturating_sub(1),
            source,
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// The group's queue.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// Where this group's dead letters are published.
    pub(crate) fn dead_letter_exchange(&self) -> &str {
        &self.dead_letter_exchange
    }

    /// The dead-letter queue.
    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    fn retry_queue(&self, n: u32) -> String {
        format!("{}.retry.{n}", self.queue)
    }

    /// The publishing channel, connecting (and declaring the topology)
    /// first if the link is down.
    async fn publishing(&self) -> Result<Channel, LinkError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref() {
            if l.conn.status().connected() && l.publish.status().connected() {
                return Ok(l.publish.clone());
            }
            *live = None;
        }
        let fresh = self.connect().await?;
        let channel = fresh.publish.clone();
        *live = Some(fresh);
        Ok(channel)
    }

    /// A new channel to consume on, on the live connection.
    async fn consuming(&self) -> Result<Channel, LinkError> {
        self.publishing().await?;
        let live = self.live.lock().await;
        let l = live
            .as_ref()
            .ok_or_else(|| LinkError::unreachable("the connection closed at once".into()))?;
        l.conn.create_channel().await.map_err(|e| {
            LinkError::unreachable(format!(
                "cannot open a channel on RabbitMQ at {}: {e}",
                self.broker
            ))
        })
    }

    async fn forget(&self) {
        *self.live.lock().await = None;
    }

    async fn connect(&self) -> Result<Live, LinkError> {
        let cannot = |what: &str, e: lapin::Error| {
            LinkError::unreachable(format!("cannot {what} RabbitMQ at {}: {e}", self.broker))
        };
        let conn = tokio::time::timeout(
            self.source.connect_timeout,
            Connection::connect(&self.source.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| {
            LinkError::unreachable(format!(
                "cannot connect to RabbitMQ at {}: no answer within {:?}",
                self.broker, self.source.connect_timeout
            ))
        })?
        .map_err(|e| cannot("connect to", e))?;
        let publish = conn
            .create_channel()
            .await
            .map_err(|e| cannot("open a channel on", e))?;
        self.declare(&publish).await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| cannot("turn publisher confirms on at", e))?;
        info!(broker = %self.broker, queue = %self.queue, "connected to RabbitMQ; topology declared");
        Ok(Live { conn, publish })
    }

    /// Declares the exchanges, the group's queue and bindings, the
    /// dead-letter exchange and queue, and the retry queues. Idempotent;
    /// a queue that exists with other arguments is refused by the broker,
    /// which the error says.
    async fn declare(&self, ch: &Channel) -> Result<(), LinkError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let refused = |what: String, e: lapin::Error| LinkError {
            refused: is_refusal(&e),
            why: format!(
                "cannot declare {what} on RabbitMQ at {}: {e} (does it exist with other \
                 settings? may this user configure it?)",
                self.broker
            ),
        };
        for exchange in &self.exchanges {
            ch.exchange_declare(
                short(exchange),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(format!("exchange {exchange} (durable, topic)"), e))?;
        }
        ch.exchange_declare(
            short(&self.dead_letter_exchange),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(format!("exchange {}", self.dead_letter_exchange), e))?;
        let dlq = self.dead_letter_queue();
        ch.queue_declare(short(&dlq), durable_queue, FieldTable::default())
            .await
            .map_err(|e| refused(format!("queue {dlq}"), e))?;
        ch.queue_bind(
            short(&dlq),
            short(&self.dead_letter_exchange),
            short(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(format!("the binding of {dlq}"), e))?;

        let mut args = FieldTable::default();
        if self.source.queue_type == QueueType::Quorum {
            args.insert(short("x-queue-type"), long("quorum"));
        }
        args.insert(
            short("x-dead-letter-exchange"),
            long(&self.dead_letter_exchange),
        );
        if self.source.single_active_consumer {
            args.insert(short("x-single-active-consumer"), AMQPValue::Boolean(true));
        }
        ch.queue_declare(short(&self.queue), durable_queue, args)
            .await
            .map_err(|e| {
                refused(
                    format!("queue {} ({:?})", self.queue, self.source.queue_type),
                    e,
                )
            })?;
        for exchange in &self.exchanges {
            for key in &self.source.binding_keys {
                ch.queue_bind(
                    short(&self.queue),
                    short(exchange),
                    short(key),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    refused(
                        format!("the binding {exchange} → {} ({key})", self.queue),
                        e,
                    )
                })?;
            }
        }
        for n in 1..=self.retries {
            // Expired copies go back to the group's queue through the
            // default exchange. The delay is each copy's own expiration.
            let mut args = FieldTable::default();
            args.insert(short("x-dead-letter-exchange"), long(""));
            args.insert(short("x-dead-letter-routing-key"), long(&self.queue));
            let name = self.retry_queue(n);
            ch.queue_declare(short(&name), durable_queue, args)
                .await
                .map_err(|e| refused(format!("retry queue {name}"), e))?;
        }
        Ok(())
    }

    /// Publishes `body` with `props` and waits for the broker's confirm; a
    /// returned (unroutable) message is an error.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), String> {
        let channel = self.publishing().await.map_err(|e| e.why)?;
        let sent = channel
            .basic_publish(
                short(exchange),
                short(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await;
        let confirm = match sent {
            Ok(confirm) => confirm,
            Err(e) => {
                self.forget().await;
                return Err(format!(
                    "cannot publish to RabbitMQ at {}: {e}",
                    self.broker
                ));
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(format!(
                "unroutable: nothing is bound to {exchange:?} for {routing_key:?} ({} {})",
                returned.reply_code,
                returned.reply_text.as_str()
            )),
            Ok(Ok(Confirmation::Nack(_))) => {
                Err(format!("RabbitMQ refused it (nack) on {exchange:?}"))
            }
            Ok(Err(e)) => {
                self.forget().await;
                Err(format!("no confirm from RabbitMQ at {}: {e}", self.broker))
            }
            Err(_) => {
                self.forget().await;
                Err(format!(
                    "no confirm from RabbitMQ at {} within 30 s",
                    self.broker
                ))
            }
        }
    }

    /// Publishes `msg`'s dead letter to the group's dead-letter exchange,
    /// with the same `dlq_*` headers as on Kafka, and waits for its confirm.
    pub(crate) async fn dead_letter(
        &self,
        msg: &Message,
        kind: DeadLetterKind,
        reason: &str,
        attempts: u32,
        group: &str,
    ) -> Result<(), String> {
        let mut headers = dead_letter::letter_headers(msg, kind, reason, attempts, group);
        let routing_key = text_of(msg.header(ROUTING_KEY_HEADER)).unwrap_or_default();
        headers.push((
            dead_letter::ORIGINAL_ROUTING_KEY,
            Some(routing_key.as_bytes().to_vec().into()),
        ));
        let props = properties(
            headers
                .iter()
                .filter(|(k, _)| *k != ATTEMPTS_HEADER)
                .map(|(k, v)| (*k, v.as_deref())),
        );
        self.publish_confirmed(
            &self.dead_letter_exchange,
            &routing_key,
            msg.payload().unwrap_or_default(),
            props,
        )
        .await
        .map_err(|e| format!("dead letter to {}: {e}", self.dead_letter_exchange))
    }

    /// Sends a copy of `msg`, `tries` handler tries spent, to the delay
    /// queue of that try; it returns to the group's queue after `delay`.
    pub(crate) async fn retry_later(
        &self,
        msg: &Message,
        tries: u32,
        delay: Duration,
    ) -> Result<(), String> {
        if tries == 0 || tries > self.retries {
            return Err(format!("no delay queue for try {tries}"));
        }
        let tries_text = tries.to_string();
        let headers = msg
            .headers()
            .filter(|(k, _)| *k != ATTEMPTS_HEADER)
            .chain([(ATTEMPTS_HEADER, Some(tries_text.as_bytes()))]);
        let props = properties(headers)
            .with_expiration(ShortString::from(delay.as_millis().max(1).to_string()));
        self.publish_confirmed(
            "",
            &self.retry_queue(tries),
            msg.payload().unwrap_or_default(),
            props,
        )
        .await
    }
}

/// The AMQP properties and headers of a message with these (Kafka-named)
/// headers: the relay's mapping (`docs/rabbitmq.md`). Persistent.
fn properties<'a>(headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> BasicProperties {
    let mut table = FieldTable::default();
    let mut props = BasicProperties::default().with_delivery_mode(2);
    for (name, value) in headers {
        let value = value.unwrap_or_default();
        let text = std::str::from_utf8(value).unwrap_or_default();
        let fits = text.len() <= SHORT_MAX;
        match name {
            h::CE_ID if fits => props = props.with_message_id(short(text)),
            h::CE_TYPE if fits => props = props.with_type(short(text)),
            h::CE_CORRELATION_ID if fits => props = props.with_correlation_id(short(text)),
            h::CE_TIME => {
                if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
                    props = props.with_timestamp(u64::try_from(t.timestamp()).unwrap_or(0));
                }
            }
            h::CONTENT_TYPE if fits => {
                props = props.with_content_type(short(text));
                continue;
            }
            _ => {}
        }
        let name = h::amqp_name(name);
        if name.len() <= SHORT_MAX {
            table.insert(
                short(&name),
                AMQPValue::LongString(LongString::from(value.to_vec())),
            );
        }
    }
    props.with_headers(table)
}

/// The message of a delivery: headers named as on Kafka, the aggregate id
/// (`cloudEvents:subject`) as its key, and the exchange and routing key it
/// was first published with (kept on retried copies).
fn message_of(
    tag: u64,
    exchange: &str,
    routing_key: &str,
    props: &BasicProperties,
    body: Vec<u8>,
) -> Message {
    let mut headers: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            // The broker's own bookkeeping (x-death, x-first-death-…), not
            // the event's.
            if name.starts_with("x-") && !name.starts_with("x-outbox-") {
                continue;
            }
            if let Some(bytes) = value_bytes(value) {
                headers.push((h::kafka_name(name).into_owned(), Some(bytes)));
            }
        }
    }
    let has =
        |headers: &[(String, Option<Vec<u8>>)], name: &str| headers.iter().any(|(k, _)| k == name);
    // A message from another producer may say what it is only in its
    // properties.
    for (name, value) in [
        (h::CE_ID, props.message_id()),
        (h::CE_TYPE, props.kind()),
        (h::CE_CORRELATION_ID, props.correlation_id()),
        (h::CONTENT_TYPE, props.content_type()),
    ] {
        if let Some(v) = value {
            if !has(&headers, name) {
                headers.push((name.to_string(), Some(v.as_str().as_bytes().to_vec())));
            }
        }
    }
    for (name, value) in [
        (EXCHANGE_HEADER, exchange),
        (ROUTING_KEY_HEADER, routing_key),
    ] {
        if !has(&headers, name) {
            headers.push((name.to_string(), Some(value.as_bytes().to_vec())));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone())
    };
    let prior_attempts = text_of(find(ATTEMPTS_HEADER).as_deref())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    Message {
        position: Position {
            topic: text_of(find(EXCHANGE_HEADER).as_deref()).unwrap_or_default(),
            partition: 0,
            offset: i64::try_from(tag).unwrap_or(i64::MAX),
        },
        key: find(h::CE_SUBJECT),
        payload: Some(body),
        headers,
        prior_attempts,
    }
}

fn value_bytes(value: &AMQPValue) -> Option<Vec<u8>> {
    Some(match value {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(v) => v.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(v) => v.to_string().into_bytes(),
        AMQPValue::ShortInt(v) => v.to_string().into_bytes(),
        AMQPValue::ShortUInt(v) => v.to_string().into_bytes(),
        AMQPValue::LongInt(v) => v.to_string().into_bytes(),
        AMQPValue::LongUInt(v) => v.to_string().into_bytes(),
        AMQPValue::LongLongInt(v) => v.to_string().into_bytes(),
        AMQPValue::Timestamp(v) => v.to_string().into_bytes(),
        _ => return None,
    })
}

fn text_of(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|b| String::from_utf8_lossy(b).into_owned())
}

fn short(s: &str) -> ShortString {
    ShortString::from(s.to_string())
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Consumes the group's queue until `shutdown`, reconnecting after any
/// loss, then stops taking deliveries and waits for those being handled
/// (up to [`crate::ConsumerConfig::drain_timeout`]).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    link: Arc<Link>,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let cfg = &shared.cfg;
    let ordered = link.source.single_active_consumer;
    let mut failures = 0u32;
    // Cancelled at the end of the drain: cuts the sleeps of what is still
    // being handled.
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Messages handled at once (unordered); ordered, one batch at a time.
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrency));
    // The consuming channel: closed after the drain, whose acks it carries.
    let mut consuming: Option<Channel> = None;
    while !shutdown.is_cancelled() {
        let channel = match link.consuming().await {
            Ok(ch) => ch,
            Err(e) if e.refused => {
                // Settings to change, not an outage to wait out.
                shared.health.broker_down(&e.why);
                return Err(ConsumerError::Config(format!(
                    "{}; change the queue's settings or its name (RabbitMqSource::queue), \
                     or delete the old queue",
                    e.why
                )));
            }
            Err(e) => {
                let why = e.why;
                failures += 1;
                // Said once per outage; each further try at debug level.
                if failures == 1 {
                    warn!(error = %why, "RabbitMQ unreachable; trying again with backoff (said once until it answers)");
                } else {
                    debug!(error = %why, failures, "RabbitMQ still unreachable");
                }
                shared.health.broker_down(&why);
                let wait = crate::process::backoff(failures, cfg).min(Duration::from_secs(5));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        consuming = Some(channel.clone());
        let tag = format!("consumer-kit-{}", uuid::Uuid::new_v4());
        let consumer = async {
            channel
                .basic_qos(link.source.prefetch, BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    short(link.queue()),
                    short(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                let why = format!("cannot consume queue {}: {e}", link.queue());
                if failures == 1 {
                    warn!(error = %why, "trying again with backoff (said once until it works)");
                } else {
                    debug!(error = %why, failures, "still cannot consume");
                }
                shared.health.broker_down(&why);
                link.forget().await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(crate::process::backoff(failures, cfg)) => continue,
                }
            }
        };
        if failures > 0 {
            info!(tries = failures + 1, "RabbitMQ answers again");
        }
        failures = 0;
        shared.health.broker_up();
        shared.health.set_assigned(1);
        shared.health.publish();
        info!(queue = link.queue(), ordered, "consuming");
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(short(&tag), BasicCancelOptions::default()).await;
                    break;
                }
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    let why = format!("the RabbitMQ channel closed: {e}");
                    warn!(error = %why, "reconnecting; unacknowledged deliveries return to the queue");
                    shared.health.broker_down(&why);
                    link.forget().await;
                    break;
                }
                None => {
                    shared
                        .health
                        .broker_down("the broker cancelled the consumer");
                    link.forget().await;
                    break;
                }
            };
            if ordered {
                // Settle what is ready, in order, in one batch.
                let mut batch = vec![delivery];
                while batch.len() < cfg.max_batch {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                let settling = settle_in_order(&shared, &channel, batch, &stop);
                tokio::pin!(settling);
                tokio::select! {
                    _ = &mut settling => {}
                    _ = shutdown.cancelled() => {
                        // The batch gets the drain; then its sleeps are cut
                        // (a transaction in progress still ends), and what
                        // did not settle goes back to the queue.
                        if tokio::time::timeout(cfg.drain_timeout, &mut settling).await.is_err() {
                            warn!("a batch still being settled at the end of the drain; what is left of it returns to the queue");
                            stop.cancel();
                            settling.await;
                        }
                        let _ = channel.basic_cancel(short(&tag), BasicCancelOptions::default()).await;
                        break;
                    }
                }
            } else {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = Arc::clone(&permits).acquire_owned() => p,
                };
                let Ok(permit) = permit else { break };
                // What else is ready goes with it, settled in one
                // transaction when all goes well (process.rs's batch path).
                let mut batch = vec![delivery];
                while batch.len() < cfg.max_batch {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                let (shared, stop) = (Arc::clone(&shared), stop.clone());
                while tasks.try_join_next().is_some() {}
                tasks.spawn(async move {
                    let _permit = permit;
                    settle_concurrently(&shared, batch, &stop).await;
                });
            }
        }
    }
    shared.health.set_phase(Phase::Stopping);
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.drain_timeout, drained)
        .await
        .is_err()
    {
        warn!("messages still being handled at the end of the drain; they return to the queue");
        stop.cancel();
        tasks.abort_all();
    }
    if let Some(channel) = consuming.filter(|c| c.status().connected()) {
        let _ = channel.close(200, short("consumer stopped")).await;
    }
    if let Some(live) = link.live.lock().await.take() {
        let _ = live.publish.close(200, short("consumer stopped")).await;
        let _ = live.conn.close(200, short("consumer stopped")).await;
    }
    Ok(())
}

/// A delivery's message, and what acknowledges it.
fn unpack(d: lapin::message::Delivery) -> (Message, lapin::Acker) {
    let msg = message_of(
        d.delivery_tag,
        d.exchange.as_str(),
        d.routing_key.as_str(),
        &d.properties,
        d.data,
    );
    (msg, d.acker)
}

/// Settles `batch` (deliveries ready together, unordered consumption) and
/// acknowledges each that settled; one not settled (shutdown) and the rest
/// go back to the queue. Other batches are settled beside it, so each ack
/// names its own delivery.
async fn settle_concurrently(
    shared: &Shared,
    batch: Vec<lapin::message::Delivery>,
    stop: &CancellationToken,
) {
    let (msgs, ackers): (Vec<Message>, Vec<lapin::Acker>) = batch.into_iter().map(unpack).unzip();
    let settled = process_batch(shared, &msgs, stop).await;
    for (i, acker) in ackers.iter().enumerate() {
        let done = if i < settled {
            acker.ack(BasicAckOptions::default()).await
        } else {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        };
        if let Err(e) = done {
            debug!(error = %e, "ack lost; the message comes again and dedupes");
        }
    }
}

/// Settles `batch`, deliveries of the queue in order (single active
/// consumer), then acknowledges all that settled with one `basic.ack`
/// (`multiple`); one not settled (shutdown) and the rest return to the
/// queue.
async fn settle_in_order(
    shared: &Shared,
    channel: &Channel,
    batch: Vec<lapin::message::Delivery>,
    stop: &CancellationToken,
) {
    let tags: Vec<u64> = batch.iter().map(|d| d.delivery_tag).collect();
    let msgs: Vec<Message> = batch.into_iter().map(|d| unpack(d).0).collect();
    let settled = process_batch(shared, &msgs, stop).await;
    if settled > 0 {
        let ack = channel
            .basic_ack(tags[settled - 1], BasicAckOptions { multiple: true })
            .await;
        if let Err(e) = ack {
            debug!(error = %e, "ack lost; the messages come again and dedupe");
        }
    }
    if settled < tags.len() {
        let _ = channel
            .basic_nack(
                tags[tags.len() - 1],
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
    }
}

/// Reads the dead letters waiting in `dlq` (the group's `<queue>.dlq`) on
/// the broker at `url`, and returns those `filter` matches, in queue order.
/// With `replay`, each of those is also sent back to the exchange and
/// routing key it was first published with (its original headers, the
/// `dlq_*` ones and the retry count removed, so it keeps its `ce_id` and
/// dedupes as usual), and removed from `dlq` once the broker confirmed it.
/// Every other dead letter stays where it was: the read holds them
/// unacknowledged and the broker returns them when the channel closes.
pub async fn dead_letters(
    url: &str,
    dlq: &str,
    filter: &dead_letter::DeadLetterFilter,
    replay: bool,
) -> Result<(Vec<dead_letter::DeadLetter>, crate::ReplayReport), String> {
    let broker = broker_for_logs(url);
    let cannot = |what: &str, e: lapin::Error| format!("cannot {what} RabbitMQ at {broker}: {e}");
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| format!("cannot connect to RabbitMQ at {broker}: no answer within 10 s"))?
    .map_err(|e| cannot("connect to", e))?;
    let read = conn
        .create_channel()
        .await
        .map_err(|e| cannot("open a channel on", e))?;
    let publish = conn
        .create_channel()
        .await
        .map_err(|e| cannot("open a channel on", e))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| cannot("turn publisher confirms on at", e))?;
    read.queue_declare(
        short(dlq),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("queue {dlq} does not exist on RabbitMQ at {broker} ({e}); the dead-letter queue is <queue>.dlq"))?;
    let mut found = Vec::new();
    let mut report = crate::ReplayReport::default();
    let mut place = 0i64;
    loop {
        let got = read
            .basic_get(
                short(dlq),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| cannot("read from", e))?;
        let Some(got) = got else { break };
        let d = got.delivery;
        let msg = message_of(0, "", "", &d.properties, d.data.clone());
        let letter = dead_letter::DeadLetter::from_parts(
            Position {
                topic: dlq.to_string(),
                partition: 0,
                offset: place,
            },
            None,
            Some(d.data),
            msg.headers
                .into_iter()
                .filter(|(k, _)| {
                    k != EXCHANGE_HEADER && k != ROUTING_KEY_HEADER && k != ATTEMPTS_HEADER
                })
                .collect(),
        );
        place += 1;
        if !filter.matches(&letter) {
            continue;
        }
        if replay {
            let exchange = letter.original_topic.clone().ok_or_else(|| {
                format!(
                    "dead letter {place} of {dlq} has no {} header; it was not written by \
                     consumer-kit",
                    dead_letter::ORIGINAL_TOPIC
                )
            })?;
            let routing_key = letter.original_routing_key.clone().unwrap_or_default();
            let props = properties(
                letter
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_deref())),
            );
            let confirm = publish
                .basic_publish(
                    short(&exchange),
                    short(&routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    letter.payload.as_deref().unwrap_or_default(),
                    props,
                )
                .await
                .map_err(|e| cannot("publish to", e))?
                .await
                .map_err(|e| cannot("get a confirm from", e))?;
            match confirm {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(format!(
                        "replay of {:?}: nothing is bound to exchange {exchange} for routing key \
                         {routing_key:?}; it stays in {dlq}",
                        letter.event_id
                    ))
                }
                Confirmation::Nack(_) => {
                    return Err(format!("replay to {exchange}: RabbitMQ refused it (nack)"))
                }
            }
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| cannot("remove the replayed dead letter from", e))?;
            report.replayed += 1;
        }
        found.push(letter);
    }
    // Whatever was read and not replayed goes back to the queue.
    let _ = read.close(200, short("read")).await;
    let _ = conn.close(200, short("done")).await;
    Ok((found, report))
}
