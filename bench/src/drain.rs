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

use crate::{
    cpu::{self, CpuMark, CpuUse},
    enqueue, median, samples, Env, KEYS, PARTITIONS,
};

pub(crate) async fn drain(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    batch_size: usize,
) -> anyhow::Result<()> {
    println!("== drain: {rows} rows backlog, ~200-byte payloads, {KEYS} keys, {PARTITIONS} partitions, relay batch {batch_size}");
    println!(
        "   CPU: busy CPU-µs per row of the whole machine ({} cores; pg / java / bench split); \
         bound = cores ÷ (raw drain's + raw producer's µs per row)",
        cpu::cores()
    );
    let mut all = Vec::new();
    for run in 1..=runs {
        // Raw PostgreSQL drain: DELETE … LIMIT 1000 … RETURNING, one connection.
        let topic = env.topic("drain-db").await?;
        env.fill(&topic, rows).await?;
        let mark = CpuMark::now();
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
        let db = Phase::new(rows, mark.used());
        env.drop_topic(&topic).await;

        // Raw producer: the same records, pipelined, same producer settings.
        let topic = env.topic("drain-kafka").await?;
        let mark = CpuMark::now();
        raw_produce(env, &topic, rows as usize).await?;
        let kafka = Phase::new(rows, mark.used());
        env.drop_topic(&topic).await;

        // The relay draining the same backlog: as configured by default
        // (remembering published ids, migration V5), and without that.
        let cfg = RelayConfig {
            batch_size,
            ..RelayConfig::default()
        };
        let (_, used) = relay_drain_measured(env, recorder, rows, cfg.clone()).await?;
        let relay = Phase::new(rows, used);
        let without_ids = RelayConfig {
            remember_published: Duration::ZERO,
            ..cfg
        };
        let (_, used) = relay_drain_measured(env, recorder, rows, without_ids).await?;
        let forgetful = Phase::new(rows, used);
        let run_figures = DrainRun {
            db,
            kafka,
            relay,
            forgetful,
        };
        run_figures.print(&format!("run {run}"), rows);
        all.push(run_figures);
    }
    let med = |f: &dyn Fn(&DrainRun) -> f64| median(all.iter().map(f).collect());
    println!(
        "median: raw drain {:.0}/s  raw producer {:.0}/s  relay {:.0}/s  relay/drain {:.2}  relay/producer {:.2}  \
         relay/slower-baseline {:.2} (target >= 0.8); remembering published ids costs {:.3}",
        med(&|r| r.db.rate),
        med(&|r| r.kafka.rate),
        med(&|r| r.relay.rate),
        med(&|r| r.relay.rate / r.db.rate),
        med(&|r| r.relay.rate / r.kafka.rate),
        med(&|r| r.relay.rate / r.slower()),
        med(&|r| r.forgetful.rate / r.relay.rate),
    );
    println!(
        "median CPU: µs per row raw drain {:.1}, raw producer {:.1}, relay {:.1}, relay without ids {:.1}; \
         CPU bound {:.0}/s = {:.2} of the slower baseline; relay/bound {:.2}, without ids {:.2}; \
         relay's µs per row ÷ the baselines' sum {:.2}, without ids {:.2}",
        med(&|r| r.db.us),
        med(&|r| r.kafka.us),
        med(&|r| r.relay.us),
        med(&|r| r.forgetful.us),
        med(&|r| r.bound()),
        med(&|r| r.bound() / r.slower()),
        med(&|r| r.relay.rate / r.bound()),
        med(&|r| r.forgetful.rate / r.bound()),
        med(&|r| r.relay.us / (r.db.us + r.kafka.us)),
        med(&|r| r.forgetful.us / (r.db.us + r.kafka.us)),
    );
    Ok(())
}

/// One phase of a drain run: its rate and what it cost the machine.
#[derive(Debug, Clone, Copy)]
struct Phase {
    rate: f64,
    /// Busy CPU-µs per row, every process.
    us: f64,
    used: CpuUse,
}

impl Phase {
    fn new(rows: i64, used: CpuUse) -> Self {
        Phase {
            rate: rows as f64 / used.wall,
            us: used.per_row_us(rows),
            used,
        }
    }

    fn describe(&self, rows: i64) -> String {
        format!(
            "{:>7.0}/s  {:5.1} µs/row ({}; machine {:.0} % busy)",
            self.rate,
            self.us,
            self.used.split_us(rows),
            self.used.load() * 100.0
        )
    }
}

/// The four phases of one drain run.
#[derive(Debug)]
struct DrainRun {
    db: Phase,
    kafka: Phase,
    relay: Phase,
    forgetful: Phase,
}

impl DrainRun {
    fn slower(&self) -> f64 {
        self.db.rate.min(self.kafka.rate)
    }

    /// The CPU bound: the most rows per second a relay doing both baselines'
    /// work could reach on this machine's cores.
    fn bound(&self) -> f64 {
        cpu::cores() as f64 * 1e6 / (self.db.us + self.kafka.us)
    }

    fn print(&self, label: &str, rows: i64) {
        println!("{label}: raw drain     {}", self.db.describe(rows));
        println!("{label}: raw producer  {}", self.kafka.describe(rows));
        println!("{label}: relay         {}", self.relay.describe(rows));
        println!("{label}: relay w/o ids {}", self.forgetful.describe(rows));
        println!(
            "{label}: relay/drain {:.2}  relay/producer {:.2}  relay/slower-baseline {:.2}  \
             remembering costs {:.3}  CPU bound {:.0}/s ({:.2} of the slower baseline)  relay/bound {:.2}  \
             without ids {:.2}",
            self.relay.rate / self.db.rate,
            self.relay.rate / self.kafka.rate,
            self.relay.rate / self.slower(),
            self.forgetful.rate / self.relay.rate,
            self.bound(),
            self.bound() / self.slower(),
            self.relay.rate / self.bound(),
            self.forgetful.rate / self.bound(),
        );
    }
}

/// A relay configured by `cfg` draining a backlog of `rows` on a fresh
/// topic; rows per second.
pub(crate) async fn relay_drain(
    env: &Env,
    recorder: &samples::Samples,
    rows: i64,
    cfg: RelayConfig,
) -> anyhow::Result<f64> {
    Ok(relay_drain_measured(env, recorder, rows, cfg).await?.0)
}

/// [`relay_drain`], with the CPU the machine spent while the relay drained.
async fn relay_drain_measured(
    env: &Env,
    recorder: &samples::Samples,
    rows: i64,
    cfg: RelayConfig,
) -> anyhow::Result<(f64, CpuUse)> {
    let topic = env.topic("drain-relay").await?;
    env.fill(&topic, rows).await?;
    let shutdown = CancellationToken::new();
    let r = env.relay(cfg)?;
    let mark = CpuMark::now();
    recorder.clear();
    let task = tokio::spawn(r.run(shutdown.clone()));
    // One commit-to-ack sample per acknowledged row: watching the sample
    // count puts no load on the database while the relay drains.
    while (recorder.len() as i64) < rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let used = mark.used();
    shutdown.cancel();
    task.await?;
    env.drop_topic(&topic).await;
    Ok((rows as f64 / used.wall, used))
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
