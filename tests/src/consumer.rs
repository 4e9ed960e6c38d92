//! Helpers for the consumer-kit tests: records shaped like the relay's, a
//! handler that records its effects in a table with no unique constraint
//! (so a double effect shows), and an in-process consumer.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use consumer_kit::{Consumer, ConsumerConfig, ConsumerHandle, Envelope, Handler, HandlerError};
use outbox_core::headers as h;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use uuid::Uuid;

use crate::brokers;

/// A record to produce.
#[derive(Debug, Clone)]
pub struct TestRecord {
    /// Key.
    pub key: Option<String>,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Partition; `None` lets the key choose.
    pub partition: Option<i32>,
}

/// A record as the relay writes it: `ce_*` headers, key, JSON value.
pub fn event(
    key: &str,
    event_id: Uuid,
    event_type: &str,
    payload: serde_json::Value,
) -> TestRecord {
    TestRecord {
        key: Some(key.into()),
        headers: vec![
            (h::CE_SPECVERSION.into(), h::SPEC_VERSION.into()),
            (h::CE_ID.into(), event_id.to_string()),
            (h::CE_TYPE.into(), event_type.into()),
            (h::CE_SOURCE.into(), "tests".into()),
            (h::CE_SUBJECT.into(), key.into()),
            (h::CE_EVENT_VERSION.into(), "1".into()),
            (h::CONTENT_TYPE.into(), "application/json".into()),
            (h::CE_CORRELATION_ID.into(), format!("corr-{event_id}")),
            ("tenant".into(), "acme".into()),
        ],
        value: Some(serde_json::to_vec(&payload).expect("json")),
        partition: None,
    }
}

/// Produces `records` in order (pipelined, idempotent, acks=all), many
/// records to a batch.
pub async fn produce(topic: &str, records: &[TestRecord]) -> anyhow::Result<()> {
    produce_with(&brokers(), topic, records).await
}

/// [`produce`] to the broker at `brokers` (a mock cluster, say).
pub async fn produce_on(brokers: &str, topic: &str, records: &[TestRecord]) -> anyhow::Result<()> {
    produce_with(brokers, topic, records).await
}

async fn produce_with(brokers: &str, topic: &str, records: &[TestRecord]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Everything enqueued within 50 ms shares a record batch (up to 1 MB
        // per partition): consumers that resume or rebalance mid-stream
        // start inside a multi-record batch, as they do in production.
        .set("linger.ms", "50")
        .set("message.timeout.ms", "30000")
        .create()
        .context("producer")?;
    let mut sends = Vec::with_capacity(records.len());
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_bytes());
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v.as_slice());
        }
        if let Some(p) = r.partition {
            rec = rec.partition(p);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    sends.push(f);
                    break;
                }
                Err((_, back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for s in futures::future::join_all(sends).await {
        s.context("delivery report dropped")?
            .map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
    }
    Ok(())
}

/// `n` events with payload `{"seq": i}` over `keys` keys; returns their ids.
pub fn events(n: usize, keys: usize, event_type: &str) -> (Vec<TestRecord>, Vec<Uuid>) {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let records = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            event(
                &format!("k{}", i % keys),
                *id,
                event_type,
                serde_json::json!({ "seq": i }),
            )
        })
        .collect();
    (records, ids)
}

/// Creates the consumer schema and the `effects` table (no unique
/// constraint: a double effect shows as two rows).
pub async fn consumer_db(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    consumer_kit::migrate(pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS effects (event_id uuid NOT NULL, seq bigint, member text, at timestamptz DEFAULT clock_timestamp())",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// `(rows, distinct event ids)` in `effects`.
pub async fn effect_counts(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects")
            .fetch_one(pool)
            .await?,
    )
}

/// The test payload.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Item {
    /// Sequence number.
    pub seq: i64,
    /// Refused with a permanent error (unless the handler is "fixed").
    #[serde(default)]
    pub poison: bool,
    /// Fails with a retryable error this many times before succeeding
    /// (`u32::MAX`: always).
    #[serde(default)]
    pub fail_times: u32,
    /// Sleeps this long inside the transaction.
    #[serde(default)]
    pub sleep_ms: u64,
}

/// A handler that inserts one `effects` row per event, through the
/// transaction, and fails as the payload asks.
#[derive(Clone, Default)]
pub struct Effects {
    /// Written into `effects.member`.
    pub member: String,
    /// Once true, poison events succeed.
    pub fixed: Arc<AtomicBool>,
    /// Calls per event id.
    pub calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    /// Sleep per event, for slow-consumer tests.
    pub sleep: Duration,
    /// Sleep before the handler's own statement, so that a connection
    /// killed meanwhile fails that statement (not the dedupe or commit).
    pub pause_before: Duration,
}

#[async_trait::async_trait]
impl Handler for Effects {
    type Payload = Item;

    async fn handle(
        &self,
        event: &Envelope<Item>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(event.event_id).or_default();
            *c += 1;
            *c
        };
        if !self.pause_before.is_zero() {
            tokio::time::sleep(self.pause_before).await;
        }
        // The effect first, so a failure after it proves the rollback.
        sqlx::query("INSERT INTO effects (event_id, seq, member) VALUES ($1, $2, $3)")
            .bind(event.event_id)
            .bind(event.payload.seq)
            .bind(&self.member)
            .execute(&mut **tx)
            .await?;
        let sleep = self.sleep + Duration::from_millis(event.payload.sleep_ms);
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        }
        if event.payload.poison && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent(format!(
                "seq {} is poisoned",
                event.payload.seq
            )));
        }
        if call <= event.payload.fail_times {
            return Err(HandlerError::retryable(format!("flaky, call {call}")));
        }
        Ok(())
    }
}

/// Fast settings for tests: short backoff, frequent commits, no cleanup.
pub fn consumer_cfg(group: &str, topic: &str) -> ConsumerConfig {
    ConsumerConfig {
        brokers: brokers(),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_attempts: 3,
        commit_interval: Duration::from_millis(200),
        cleanup_interval: None,
        drain_timeout: Duration::from_secs(5),
        dead_letter_timeout: Duration::from_secs(5),
        // A killed member leaves the group after 6 s instead of 45 s.
        kafka_properties: [
            ("session.timeout.ms".to_string(), "6000".to_string()),
            ("heartbeat.interval.ms".to_string(), "1000".to_string()),
        ]
        .into_iter()
        .chain(
            std::env::var("KAFKA_DEBUG")
                .ok()
                .map(|d| ("debug".to_string(), d)),
        )
        .collect(),
        ..ConsumerConfig::new(group, [topic])
    }
}

/// Starts a consumer in-process with `handler` for `event_type`
/// ([`Consumer::start`]); `TEST_LOG` (an env filter) turns its logs on.
pub fn start_consumer(
    pool: &sqlx::PgPool,
    cfg: ConsumerConfig,
    event_type: &str,
    handler: Effects,
) -> anyhow::Result<ConsumerHandle> {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    Ok(Consumer::builder(cfg, pool.clone())
        .handler(event_type, handler)
        .build()?
        .start())
}

/// How many members `group` has, as the broker's group coordinator says.
pub fn group_members(group: &str) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let list = client.fetch_group_list(Some(group), Duration::from_secs(10))?;
    Ok(list.groups().iter().map(|g| g.members().len()).sum())
}

/// Commits `offset` for every partition of `topic` in `group` (the group
/// must have no live member): what an operator does to replay a topic.
pub async fn reset_group_offsets(
    group: &str,
    topic: &str,
    partitions: i32,
    offset: i64,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Offset(offset))?;
        }
        c.commit(&tpl, CommitMode::Sync)?;
        Ok(())
    })
    .await??;
    Ok(())
}
