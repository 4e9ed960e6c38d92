//! `drain`: the relay draining a backlog, against a raw drain (delete and
//! read, no Kafka) and a raw producer (Kafka, no database).

use std::time::{Duration, Instant};

use outbox_relay::RelayConfig;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use tokio_util::sync::CancellationToken;

use crate::{enqueue, median, samples, Env, KEYS, PARTITIONS};

pub(crate) async fn drain(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    batch_size: usize,
) -> anyhow::Result<()> {
    println!("== drain: {rows} rows backlog, ~200-byte payloads, {KEYS} keys, {PARTITIONS} partitions, relay batch {batch_size}");
    let (mut raw_db, mut raw_kafka, mut relay, mut forgetful) = (vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        // Raw PostgreSQL drain: DELETE … LIMIT 1000 … RETURNING, one connection.
        let topic = env.topic("drain-db").await?;
        env.fill(&topic, rows).await?;
        let started = Instant::now();
        let mut conn = env.pool.acquire().await?;
        loop {
            let n = sqlx::query(
                "DELETE FROM outbox o WHERE o.id IN (SELECT id FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1000) \
                 RETURNING o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, o.event_version, o.topic, \
                 o.payload::text, o.payload_bytes, o.content_type, o.headers::text, o.correlation_id, o.causation_id, \
                 o.traceparent, o.tracestate, o.source, o.occurred_at, o.created_at",
            )
            .fetch_all(&mut *conn)
            .await?
            .len();
            if n == 0 {
                break;
            }
        }
        drop(conn);
        let db_rate = rows as f64 / started.elapsed().as_secs_f64();
        env.drop_topic(&topic).await;

        // Raw producer: the same records, pipelined, same producer settings.
        let topic = env.topic("drain-kafka").await?;
        let kafka_rate = raw_produce(env, &topic, rows as usize).await?;
        env.drop_topic(&topic).await;

        // The relay draining the same backlog: as configured by default
        // (remembering published ids, migration V5), and without that.
        let cfg = RelayConfig {
            batch_size,
            ..RelayConfig::default()
        };
        let relay_rate = relay_drain(env, recorder, rows, cfg.clone()).await?;
        let without_ids = RelayConfig {
            remember_published: Duration::ZERO,
            ..cfg
        };
        let forgetful_rate = relay_drain(env, recorder, rows, without_ids).await?;
        forgetful.push(forgetful_rate);

        println!(
            "run {run}: raw drain {db_rate:>9.0}/s  raw producer {kafka_rate:>9.0}/s  relay {relay_rate:>9.0}/s  \
             relay/drain {:.2}  relay/producer {:.2}  relay without remembering ids {forgetful_rate:>9.0}/s \
             (remembering costs {:.3})",
            relay_rate / db_rate,
            relay_rate / kafka_rate,
            forgetful_rate / relay_rate,
        );
        raw_db.push(db_rate);
        raw_kafka.push(kafka_rate);
        relay.push(relay_rate);
    }
    let ratios_db: Vec<f64> = relay.iter().zip(&raw_db).map(|(r, d)| r / d).collect();
    let ratios_k: Vec<f64> = relay.iter().zip(&raw_kafka).map(|(r, k)| r / k).collect();
    let ratios_slow: Vec<f64> = relay
        .iter()
        .zip(raw_db.iter().zip(&raw_kafka))
        .map(|(r, (d, k))| r / d.min(*k))
        .collect();
    println!(
        "median: raw drain {:.0}/s  raw producer {:.0}/s  relay {:.0}/s  relay/drain {:.2}  relay/producer {:.2}  \
         relay/slower-baseline {:.2} (target >= 0.5); remembering published ids costs {:.3}",
        median(raw_db),
        median(raw_kafka),
        median(relay.clone()),
        median(ratios_db),
        median(ratios_k),
        median(ratios_slow),
        median(forgetful.iter().zip(&relay).map(|(f, r)| f / r).collect()),
    );
    Ok(())
}

/// A relay configured by `cfg` draining a backlog of `rows` on a fresh
/// topic; rows per second.
pub(crate) async fn relay_drain(
    env: &Env,
    recorder: &samples::Samples,
    rows: i64,
    cfg: RelayConfig,
) -> anyhow::Result<f64> {
    let topic = env.topic("drain-relay").await?;
    env.fill(&topic, rows).await?;
    let shutdown = CancellationToken::new();
    let r = env.relay(cfg)?;
    let started = Instant::now();
    recorder.clear();
    let task = tokio::spawn(r.run(shutdown.clone()));
    // One commit-to-ack sample per acknowledged row: watching the sample
    // count puts no load on the database while the relay drains.
    while (recorder.len() as i64) < rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await?;
    env.drop_topic(&topic).await;
    Ok(rate)
}

/// Produces `n` records shaped like the relay's (key, ~200-byte JSON value,
/// the envelope's headers) with the relay's producer settings, pipelined in
/// windows of 10,000. Returns records per second.
async fn raw_produce(env: &Env, topic: &str, n: usize) -> anyhow::Result<f64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "100000")
        .create()?;
    let payload = format!("{{\"seq\": 1, \"pad\": \"{}\"}}", "x".repeat(170));
    let id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let window = (n - sent).min(10_000);
        let mut futs = Vec::with_capacity(window);
        for i in sent..sent + window {
            let key = format!("k{}", i as i64 % KEYS);
            let mut headers = OwnedHeaders::new_with_capacity(10);
            for (k, v) in [
                ("ce_specversion", "1.0"),
                ("ce_id", id.as_str()),
                ("ce_type", "bench.row"),
                ("ce_source", "outbox-relay"),
                ("ce_time", "2026-11-23T00:00:00.000000Z"),
                ("ce_subject", key.as_str()),
                ("ce_aggregatetype", "bench"),
                ("ce_eventversion", "1"),
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
            futs.push(enqueue(&producer, record).await);
        }
        for r in futures::future::join_all(futs).await {
            r?.map_err(|(e, _)| e)?;
        }
        sent += window;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
