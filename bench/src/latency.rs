//! `latency`: commit-to-ack at a fixed offered load.

use std::time::{Duration, Instant};

use outbox_core::{append, emit, NewEvent};
use outbox_relay::RelayConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Executor;
use tokio_util::sync::CancellationToken;

use crate::{median, samples, Env, KEYS};

/// Hands `record` to librdkafka without waiting for its delivery, waiting
/// only while the local queue is full.
pub(crate) async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> rdkafka::producer::DeliveryFuture {
    loop {
        match producer.send_result(record) {
            Ok(f) => return f,
            Err((_, back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

// ---------------------------------------------------------------- latency

/// Producers offering the load, one event per transaction.
const PRODUCERS: u64 = 8;

pub(crate) async fn latency(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rate: u64,
    seconds: u64,
    notify: bool,
    poll_interval: Duration,
) -> anyhow::Result<()> {
    println!(
        "== latency: {rate} events/s offered for {seconds}s by {PRODUCERS} producers (one event per transaction), \
         relay defaults but {} and poll interval {poll_interval:?}",
        if notify { "LISTEN/NOTIFY on" } else { "NOTIFY trigger off (polling only)" }
    );
    let trigger = if notify { "ENABLE" } else { "DISABLE" };
    env.pool
        .execute(format!("ALTER TABLE outbox {trigger} TRIGGER outbox_notify").as_str())
        .await?;
    let relay_cfg = RelayConfig {
        listen: notify,
        poll_interval,
        ..RelayConfig::default()
    };
    let (mut p50s, mut p99s, mut p999s) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let m = measure(env, recorder, rate, seconds, relay_cfg.clone()).await?;
        println!(
            "run {run}: achieved {:.0} events/s, {} samples: p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms",
            m.offered, m.samples, m.p50, m.p99, m.p999, m.max
        );
        p50s.push(m.p50);
        p99s.push(m.p99);
        p999s.push(m.p999);
    }
    println!(
        "median: p50 {:.1} ms  p99 {:.1} ms (target <= 20)  p99.9 {:.1} ms",
        median(p50s),
        median(p99s),
        median(p999s)
    );
    env.pool
        .execute("ALTER TABLE outbox ENABLE TRIGGER outbox_notify")
        .await?;
    Ok(())
}

/// One latency measurement's figures (milliseconds).
pub(crate) struct Measured {
    pub(crate) offered: f64,
    pub(crate) samples: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

/// `rate` events/s offered for `seconds` by 8 producers to a relay
/// configured by `relay_cfg` on a fresh topic; commit-to-ack quantiles.
pub(crate) async fn measure(
    env: &Env,
    recorder: &samples::Samples,
    rate: u64,
    seconds: u64,
    relay_cfg: RelayConfig,
) -> anyhow::Result<Measured> {
    measure_with(env, recorder, rate, seconds, relay_cfg, false).await
}

/// [`measure`], the producers writing table-less events (`emit`) instead
/// of rows when `table_less` (for a relay reading the WAL).
pub(crate) async fn measure_with(
    env: &Env,
    recorder: &samples::Samples,
    rate: u64,
    seconds: u64,
    relay_cfg: RelayConfig,
    table_less: bool,
) -> anyhow::Result<Measured> {
    let topic = env.topic("latency").await?;
    let m = measure_on(env, recorder, rate, seconds, relay_cfg, table_less, &topic).await;
    env.drop_topic(&topic).await;
    m
}

/// [`measure_with`] on a destination that exists already: `topic` (a
/// Kafka topic, or a RabbitMQ exchange with a queue bound).
pub(crate) async fn measure_on(
    env: &Env,
    recorder: &samples::Samples,
    rate: u64,
    seconds: u64,
    relay_cfg: RelayConfig,
    table_less: bool,
    topic: &str,
) -> anyhow::Result<Measured> {
    {
        // A drain just before leaves a million dead rows (and a million new
        // remembered ids); without this, autovacuum runs under the
        // producers and they fall short of the offered rate.
        for table in ["outbox", "outbox_published_ids"] {
            env.pool.execute(format!("VACUUM {table}").as_str()).await?;
        }
        let topic = topic.to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(env.relay(relay_cfg)?.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        recorder.clear();
        let per_producer = Duration::from_secs_f64(PRODUCERS as f64 / rate as f64);
        let total = rate * seconds;
        let started = Instant::now();
        let producers = (0..PRODUCERS).map(|p| {
            let pool = env.pool.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(per_producer);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for i in 0..total / PRODUCERS {
                    tick.tick().await;
                    let e = NewEvent::new(
                        "bench",
                        format!("k{}", (i * PRODUCERS + p) % KEYS as u64),
                        "bench.latency",
                    )
                    .topic(&topic)
                    .json_payload(&serde_json::json!({ "i": i }))?;
                    if table_less {
                        emit(&pool, &e).await?;
                    } else {
                        append(&pool, &e).await?;
                    }
                }
                anyhow::Ok(())
            })
        });
        for p in futures::future::join_all(producers).await {
            p??;
        }
        let offered = total as f64 / started.elapsed().as_secs_f64();
        // Every event acknowledged (one sample each) and no row left.
        let waiting = Instant::now();
        while ((recorder.len() as u64) < total || env.pending().await? > 0)
            && waiting.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        shutdown.cancel();
        task.await?;
        let mut v = recorder.take();
        anyhow::ensure!(
            v.len() as u64 >= total,
            "only {} latency samples for {total} events",
            v.len()
        );
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).min(v.len()) - 1] * 1000.0;
        Ok(Measured {
            offered,
            samples: v.len(),
            p50: q(0.50),
            p99: q(0.99),
            p999: q(0.999),
            max: v[v.len() - 1] * 1000.0,
        })
    }
}
