//! consumer-kit against a raw rdkafka consumer doing the same insert without
//! dedupe, on one topic, one database and one broker, in one run.
//!
//! Each run produces `events` records shaped like the relay's (~200-byte
//! JSON, `ce_*` headers) to a fresh topic of [`super::PARTITIONS`]
//! partitions, then times three readers of that topic, each with a fresh
//! consumer group, from the first record to the last one settled:
//!
//! - raw: a `StreamConsumer` loop, one `INSERT` per message (autocommit, so one
//!   commit per message, as consumer-kit), offsets auto-stored and
//!   auto-committed, one connection, one message at a time;
//! - kit×1: consumer-kit with `max_concurrency = 1`, the same one-at-a-time
//!   shape as raw, plus the dedupe insert and its transaction;
//! - kit: consumer-kit with its default concurrency (8).
//!
//! With `--duplicates`, every event is produced twice (half the records are
//! duplicates): raw inserts them all; consumer-kit skips the second copies.

use std::time::{Duration, Instant};

use anyhow::Context;
use consumer_kit::{Consumer, ConsumerConfig, Envelope, Handler, HandlerError};
use rdkafka::{
    consumer::{Consumer as _, StreamConsumer},
    message::{Headers, Message},
    ClientConfig,
};
use sqlx::Executor;
use tokio_util::sync::CancellationToken;

use crate::{median, Env, KEYS};

pub(crate) struct Insert;

#[async_trait::async_trait]
impl Handler for Insert {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        event: &Envelope<serde_json::Value>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO bench_effects (event_id, seq) VALUES ($1, $2)")
            .bind(event.event_id)
            .bind(event.payload["seq"].as_i64())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Runs the comparison `runs` times and prints per-run and median ratios.
pub async fn consumer(
    env: &Env,
    runs: usize,
    events: usize,
    duplicates: bool,
) -> anyhow::Result<()> {
    consumer_kit::migrate(&env.pool).await?;
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_effects (event_id uuid NOT NULL, seq bigint)")
        .await?;
    let records = if duplicates { events * 2 } else { events };
    println!(
        "== consumer: {records} records ({}), ~200-byte payloads, {} partitions, one insert per event",
        if duplicates { "every event twice: 50% duplicates" } else { "no duplicates" },
        crate::PARTITIONS
    );
    let (mut raw, mut kit1, mut kit) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let topic = env.topic("consumer").await?;
        produce(env, &topic, events, duplicates).await?;

        reset(env).await?;
        let raw_rate = raw_consumer(env, &topic, records).await?;
        reset(env).await?;
        let kit1_rate = kit_consumer(env, &topic, records, 1).await?;
        reset(env).await?;
        let kit_rate = kit_consumer(env, &topic, records, 8).await?;
        env.drop_topic(&topic).await;
        println!(
            "run {run}: raw {raw_rate:>7.0}/s  kit×1 {kit1_rate:>7.0}/s  kit {kit_rate:>7.0}/s  \
             kit×1/raw {:.2}  kit/raw {:.2}",
            kit1_rate / raw_rate,
            kit_rate / raw_rate
        );
        raw.push(raw_rate);
        kit1.push(kit1_rate);
        kit.push(kit_rate);
    }
    let r1: Vec<f64> = kit1.iter().zip(&raw).map(|(k, r)| k / r).collect();
    let r8: Vec<f64> = kit.iter().zip(&raw).map(|(k, r)| k / r).collect();
    println!(
        "median: raw {:.0}/s  kit×1 {:.0}/s  kit {:.0}/s  kit×1/raw {:.2} (goal >= 0.8)  kit/raw {:.2} (goal >= 1.2)",
        median(raw),
        median(kit1),
        median(kit),
        median(r1),
        median(r8)
    );
    Ok(())
}

pub(crate) async fn reset(env: &Env) -> anyhow::Result<()> {
    env.pool
        .execute("TRUNCATE bench_effects, processed_events")
        .await?;
    env.pool.execute("VACUUM ANALYZE bench_effects").await?;
    env.pool.execute("VACUUM ANALYZE processed_events").await?;
    Ok(())
}

async fn produce(env: &Env, topic: &str, events: usize, duplicates: bool) -> anyhow::Result<()> {
    use rdkafka::{
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord},
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let ids: Vec<String> = (0..events)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let copies = if duplicates { 2 } else { 1 };
    let pad = "x".repeat(170);
    let mut futs = Vec::with_capacity(events * copies);
    for _ in 0..copies {
        for (i, id) in ids.iter().enumerate() {
            let key = format!("k{}", i as i64 % KEYS);
            let payload = format!("{{\"seq\": {i}, \"pad\": \"{pad}\"}}");
            let mut headers = OwnedHeaders::new_with_capacity(6);
            for (k, v) in [
                ("ce_specversion", "1.0"),
                ("ce_id", id.as_str()),
                ("ce_type", "bench.row"),
                ("ce_subject", key.as_str()),
                ("content-type", "application/json"),
                ("ce_correlationid", "corr-1"),
            ] {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload.as_bytes())
                .headers(headers);
            futs.push(crate::enqueue(&producer, record).await);
        }
    }
    for r in futures::future::join_all(futs).await {
        r?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The baseline: receive, insert, repeat; no dedupe, no transaction block.
async fn raw_consumer(env: &Env, topic: &str, records: usize) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set(
            "group.id",
            format!("bench-raw-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut conn = env.pool.acquire().await?;
    let mut started = None;
    for _ in 0..records {
        let msg = consumer.recv().await.context("raw consumer")?;
        started.get_or_insert_with(Instant::now);
        let id = msg
            .headers()
            .and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == "ce_id")
                    .and_then(|h| h.value)
                    .and_then(|v| uuid::Uuid::parse_str(std::str::from_utf8(v).ok()?).ok())
            })
            .context("ce_id")?;
        let payload: serde_json::Value = serde_json::from_slice(msg.payload().unwrap_or(b"null"))?;
        sqlx::query("INSERT INTO bench_effects (event_id, seq) VALUES ($1, $2)")
            .bind(id)
            .bind(payload["seq"].as_i64())
            .execute(&mut *conn)
            .await?;
    }
    let took = started.map(|s| s.elapsed()).unwrap_or_default();
    Ok(records as f64 / took.as_secs_f64())
}

async fn kit_consumer(
    env: &Env,
    topic: &str,
    records: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let cfg = ConsumerConfig {
        brokers: env.brokers.clone(),
        max_concurrency: concurrency,
        cleanup_interval: None,
        ..ConsumerConfig::new(
            format!("bench-kit-{}", uuid::Uuid::new_v4().simple()),
            [topic],
        )
    };
    let consumer = Consumer::builder(cfg, env.pool.clone())
        .handler("bench.row", Insert)
        .build()?;
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let mut started = None;
    loop {
        let s = stats.snapshot();
        let settled = (s.processed + s.duplicates) as usize;
        if settled > 0 {
            started.get_or_insert_with(Instant::now);
        }
        if settled >= records {
            break;
        }
        anyhow::ensure!(!task.is_finished(), "consumer-kit stopped early");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.map(|s| s.elapsed()).unwrap_or_default();
    shutdown.cancel();
    task.await??;
    Ok(records as f64 / took.as_secs_f64())
}
