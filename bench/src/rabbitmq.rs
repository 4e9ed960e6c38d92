//! `rabbitmq`: the relay draining a backlog into RabbitMQ (`--sink
//! rabbitmq`), against a raw lapin publisher with the same messages and the
//! same way of confirming, side by side in each run.
//!
//! Both publish to a durable topic exchange with one durable queue bound to
//! it (`#`; classic, or quorum with `--queue-type quorum`), so every message
//! is routed and written as persistent:
//! - **raw**: `rows` messages shaped like the relay's (~200-byte JSON body,
//!   the envelope's headers, persistent, mandatory), on one confirm-mode
//!   channel, in windows of the relay's batch size: every message of a
//!   window published, then every confirm awaited;
//! - **relay**: the same backlog in the outbox table, drained by an
//!   in-process relay with the RabbitMQ sink (the clock stops when every
//!   row is confirmed, counted through the relay's commit-to-ack samples).
//!
//! - **commit-to-ack** at `rate` events/s for `seconds` (8 producers, one
//!   event per transaction, the relay's defaults), as `outbox-bench
//!   latency` measures it for Kafka.
//!
//! The queue is purged between the parts, and deleted at the end.

use std::time::{Duration, Instant};

use anyhow::Context;
use consumer_kit::{Consumer, ConsumerConfig};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Connection, ConnectionProperties,
};
use outbox_relay::{RabbitMqSink, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::{median, samples, Env, KEYS};

/// `outbox-bench rabbitmq` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct RabbitArgs {
    /// Backlog size per drain.
    #[arg(long, default_value_t = 200_000)]
    rows: i64,
    /// Relay batch size, and the raw publisher's confirm window.
    #[arg(long, default_value_t = 5000)]
    batch_size: usize,
    /// The broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Offered load for the latency part, events per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds of load for the latency part.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The bound queue's type: `classic` (durable) or `quorum`.
    #[arg(long, default_value = "classic", value_parser = ["classic", "quorum"])]
    queue_type: String,
}

pub(crate) async fn rabbitmq(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    args: &RabbitArgs,
) -> anyhow::Result<()> {
    let RabbitArgs {
        rows,
        batch_size,
        rate,
        seconds,
        ..
    } = *args;
    let url = args.amqp_url.as_str();
    println!(
        "== rabbitmq: {rows} events backlog, ~200-byte payloads, {KEYS} keys, one durable {} queue \
         bound; relay batch {batch_size}; raw: lapin, confirms awaited per window of {batch_size}",
        args.queue_type
    );
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let exchange = format!("bench-rmq-{}", uuid::Uuid::new_v4().simple());
    let queue = format!("{exchange}-q");
    let life = if args.queue_type == "quorum" {
        test_kit::rabbitmq::QueueLife::Quorum
    } else {
        test_kit::rabbitmq::QueueLife::Durable
    };
    test_kit::rabbitmq::bind_queue(&ch, &exchange, &queue, life).await?;
    let (mut raw, mut relay, mut p99) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let raw_rate = raw_publish(&conn, &exchange, rows as usize, batch_size).await?;
        ch.queue_purge(queue.clone().into(), QueuePurgeOptions::default())
            .await?;
        let relay_rate = relay_drain(env, recorder, url, &exchange, rows, batch_size).await?;
        ch.queue_purge(queue.clone().into(), QueuePurgeOptions::default())
            .await?;
        // Commit-to-ack at `rate`: the relay's defaults (batch 1000).
        let cfg = RelayConfig {
            rabbitmq: Some(RabbitMqSink::new(url)),
            ..RelayConfig::default()
        };
        let m =
            crate::latency::measure_on(env, recorder, rate, seconds, cfg, false, &exchange).await?;
        ch.queue_purge(queue.clone().into(), QueuePurgeOptions::default())
            .await?;
        println!(
            "run {run}: raw publisher {raw_rate:>9.0}/s  relay {relay_rate:>9.0}/s  relay/raw {:.2}  \
             |  at {rate}/s (achieved {:.0}): p50 {:.1} p99 {:.1} p99.9 {:.1} ms",
            relay_rate / raw_rate,
            m.offered,
            m.p50,
            m.p99,
            m.p999
        );
        raw.push(raw_rate);
        relay.push(relay_rate);
        p99.push(m.p99);
    }
    let ratios: Vec<f64> = relay.iter().zip(&raw).map(|(r, w)| r / w).collect();
    println!(
        "median: raw publisher {:.0}/s  relay {:.0}/s  relay/raw {:.2}  |  p99 at {rate}/s {:.1} ms",
        median(raw),
        median(relay),
        median(ratios),
        median(p99)
    );
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    ch.exchange_delete(exchange.into(), Default::default())
        .await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Messages like the relay's, in windows of `window`: published, then
/// confirmed. Messages per second.
async fn raw_publish(
    conn: &Connection,
    exchange: &str,
    n: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = serde_json::json!({ "seq": 0, "pad": "x".repeat(170) }).to_string();
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut confirms = Vec::with_capacity(window);
        for i in sent..(sent + window).min(n) {
            let mut headers = FieldTable::default();
            for (name, value) in [
                ("cloudEvents:specversion", "1.0".to_string()),
                ("cloudEvents:id", uuid::Uuid::new_v4().to_string()),
                ("cloudEvents:type", "bench.row".into()),
                ("cloudEvents:source", "outbox-relay".into()),
                ("cloudEvents:time", chrono::Utc::now().to_rfc3339()),
                ("cloudEvents:subject", format!("k{}", i % KEYS as usize)),
                ("cloudEvents:aggregatetype", "bench".into()),
                ("cloudEvents:eventversion", "1".into()),
                ("cloudEvents:correlationid", format!("corr-{i}")),
            ] {
                headers.insert(
                    ShortString::from(name),
                    AMQPValue::LongString(LongString::from(value.into_bytes())),
                );
            }
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()))
                .with_type(ShortString::from("bench.row"))
                .with_content_type(ShortString::from("application/json"))
                .with_headers(headers);
            confirms.push(
                ch.basic_publish(
                    exchange.to_string().into(),
                    "bench.row".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await?,
            );
        }
        sent += confirms.len();
        for c in futures::future::join_all(confirms).await {
            anyhow::ensure!(c?.is_ack(), "the broker refused a message");
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    ch.close(200, "done".into()).await?;
    Ok(rate)
}

/// The relay with the RabbitMQ sink draining `rows`; rows per second.
async fn relay_drain(
    env: &Env,
    recorder: &samples::Samples,
    url: &str,
    exchange: &str,
    rows: i64,
    batch_size: usize,
) -> anyhow::Result<f64> {
    env.fill(exchange, rows).await?;
    let cfg = RelayConfig {
        batch_size,
        rabbitmq: Some(RabbitMqSink::new(url)),
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay = env.relay(cfg)?;
    let started = Instant::now();
    recorder.clear();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    while (recorder.len() as i64) < rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await?;
    Ok(rate)
}

/// `outbox-bench rabbitmq-consumer` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct RabbitConsumerArgs {
    /// Messages per reader.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// The broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

/// consumer-kit's RabbitMQ source against a raw lapin consumer doing the
/// same insert without dedupe: `events` relay-shaped messages are published
/// once to an exchange with three quorum queues bound, one per reader, and
/// each reader is timed from its first message to its last one settled:
///
/// - raw: one lapin consumer (prefetch 64), per message one `INSERT`
///   (autocommit) and then its ack, one at a time;
/// - kit×1: consumer-kit with `max_concurrency = 1` (the dedupe insert and
///   the handler's in one transaction per batch of what is ready);
/// - kit: consumer-kit with its default concurrency (8).
pub(crate) async fn consumer(
    env: &Env,
    runs: usize,
    args: &RabbitConsumerArgs,
) -> anyhow::Result<()> {
    use sqlx::Executor;
    let (n, url) = (args.events, args.amqp_url.as_str());
    consumer_kit::migrate(&env.pool).await?;
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_effects (event_id uuid NOT NULL, seq bigint)")
        .await?;
    println!(
        "== rabbitmq-consumer: {n} messages per reader, ~200-byte payloads, quorum queues, one insert per event"
    );
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let (mut raw, mut kit1, mut kit) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let exchange = format!("bench-rmqc-{}", uuid::Uuid::new_v4().simple());
        let raw_queue = format!("{exchange}.raw");
        test_kit::rabbitmq::bind_queue(
            &ch,
            &exchange,
            &raw_queue,
            test_kit::rabbitmq::QueueLife::Quorum,
        )
        .await?;
        // consumer-kit declares its own queues: started once, then stopped.
        let kit_of = |concurrency: usize| {
            let queue = format!("{exchange}.kit{concurrency}");
            Consumer::builder(
                ConsumerConfig {
                    max_concurrency: concurrency,
                    cleanup_interval: None,
                    ..ConsumerConfig::new(format!("bench-kit{concurrency}"), [exchange.as_str()])
                },
                env.pool.clone(),
            )
            .rabbitmq(consumer_kit::RabbitMqSource {
                queue: Some(queue),
                ..consumer_kit::RabbitMqSource::new(url)
            })
            .handler("bench.row", crate::consumer::Insert)
            .build()
        };
        for c in [1, 8] {
            let handle = kit_of(c)?.start();
            let health = handle.health();
            test_kit::wait::eventually(Duration::from_secs(30), "its queue declared", || async {
                Ok(health.is_ready())
            })
            .await?;
            handle.stop().await?;
        }
        raw_publish(&conn, &exchange, n, 5000).await?;

        crate::consumer::reset(env).await?;
        let raw_rate = raw_consume(env, &conn, &raw_queue, n).await?;
        crate::consumer::reset(env).await?;
        let kit1_rate = kit_consume(kit_of(1)?, n).await?;
        crate::consumer::reset(env).await?;
        let kit_rate = kit_consume(kit_of(8)?, n).await?;
        for q in [
            raw_queue,
            format!("{exchange}.kit1"),
            format!("{exchange}.kit8"),
        ] {
            for name in std::iter::once(q.clone())
                .chain([format!("{q}.dlq")])
                .chain((1..5).map(|i| format!("{q}.retry.{i}")))
            {
                let _ = ch
                    .queue_delete(name.into(), QueueDeleteOptions::default())
                    .await;
            }
        }
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
        "median: raw {:.0}/s  kit×1 {:.0}/s  kit {:.0}/s  kit×1/raw {:.2}  kit/raw {:.2}",
        median(raw),
        median(kit1),
        median(kit),
        median(r1),
        median(r8)
    );
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// The raw reader: messages per second, first delivery to last ack.
async fn raw_consume(env: &Env, conn: &Connection, queue: &str, n: usize) -> anyhow::Result<f64> {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let ch = conn.create_channel().await?;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.to_string().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await?
            .context("the raw consumer ended")??;
        started.get_or_insert_with(Instant::now);
        let body: serde_json::Value = serde_json::from_slice(&d.data)?;
        let id = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("cloudEvents:id"))
        {
            Some(AMQPValue::LongString(s)) => {
                uuid::Uuid::parse_str(&String::from_utf8_lossy(s.as_bytes()))?
            }
            _ => anyhow::bail!("a message without cloudEvents:id"),
        };
        sqlx::query("INSERT INTO bench_effects (event_id, seq) VALUES ($1, $2)")
            .bind(id)
            .bind(body["seq"].as_i64())
            .execute(&env.pool)
            .await?;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    let rate = n as f64 / started.map_or(1.0, |s| s.elapsed().as_secs_f64());
    ch.close(200, "done".into()).await?;
    Ok(rate)
}

/// A consumer-kit reader: messages per second, first settled to last.
async fn kit_consume(consumer: consumer_kit::Consumer, n: usize) -> anyhow::Result<f64> {
    let stats = consumer.stats();
    let handle = consumer.start();
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = stats.snapshot();
        let done = s.processed + s.duplicates;
        if done > 0 {
            started.get_or_insert_with(Instant::now);
        }
        if done as usize >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "consumer-kit settled only {done} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.map_or(1.0, |s: Instant| s.elapsed().as_secs_f64());
    handle.stop().await?;
    Ok(rate)
}
