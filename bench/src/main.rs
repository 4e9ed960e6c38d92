//! `outbox-bench`: the relay and the producer path measured side by side
//! with raw baselines in one run, printed as ratios. The method is written
//! down in `BENCHMARKS.md`.
//!
//! Run with `./dev bench` (release build, services up), or
//! `cargo run --release -p outbox-bench -- --help`.

mod consumer;
mod relays;
mod samples;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_core::{append, NewEvent};
use outbox_relay::{Relay, RelayConfig};
use rdkafka::{
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use sqlx::{postgres::PgPoolOptions, Executor, PgPool};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the outbox relay against raw baselines, as ratios from one run")]
struct Args {
    /// Server URL; the benchmark creates and drops its own database on it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which benchmark.
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Drain a backlog: relay vs raw DELETE…RETURNING drain vs raw producer.
    Drain {
        /// Backlog size.
        #[arg(long, default_value_t = 1_000_000)]
        rows: i64,
        /// Relay batch size.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
    },
    /// Commit-to-ack latency at a fixed offered load.
    Latency {
        /// Offered load, events per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Turn the NOTIFY trigger off and let the relay poll only.
        #[arg(long)]
        no_notify: bool,
        /// The relay's poll interval.
        #[arg(long, default_value = "500ms", value_parser = test_kit::parse_duration)]
        poll_interval: Duration,
    },
    /// Producer transaction with the outbox row vs without it.
    Producer {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// consumer-kit (dedupe, one insert per event) vs a raw rdkafka consumer
    /// doing the same insert without dedupe.
    Consumer {
        /// Distinct events per run.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Produce every event twice (50% duplicates).
        #[arg(long)]
        duplicates: bool,
    },
    /// Several relays: drain throughput with 1, 2 and 4 relays, as ratios
    /// to one relay.
    Relays {
        /// Backlog size per drain.
        #[arg(long, default_value_t = 300_000)]
        rows: i64,
        /// Relay batch size.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        /// Relay counts to compare (the first is the baseline).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        counts: Vec<usize>,
    },
    /// Fail-over: time from a relay's kill -9 until its partitions flow
    /// again, under a steady load.
    Failover {
        /// Offered load, events per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// The relays' lease TTL (default: the relay's default).
        #[arg(long, default_value = "10s", value_parser = test_kit::parse_duration)]
        lease_ttl: Duration,
    },
    /// Everything, with the defaults (the consumer with and without duplicates).
    All,
    /// (internal) One relay process for `failover`, until SIGTERM.
    #[command(hide = true)]
    RelayChild {
        #[arg(long)]
        relay_id: String,
        #[arg(long)]
        lease_ttl_ms: u64,
    },
}

const KEYS: i64 = 1000;

const PARTITIONS: i32 = 6;
/// The benchmark's own database, dropped and created by each run.
const DATABASE: &str = "outbox_bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Which::RelayChild {
        relay_id,
        lease_ttl_ms,
    } = &args.which
    {
        let opts: sqlx::postgres::PgConnectOptions = args.database_url.parse()?;
        return relays::child(
            opts.database(DATABASE),
            args.kafka_brokers.clone(),
            relay_id.clone(),
            Duration::from_millis(*lease_ttl_ms),
        )
        .await;
    }
    let recorder = samples::install();
    let env = Env::new(&args).await?;
    match args.which {
        Which::Drain { rows, batch_size } => {
            drain(&env, &recorder, args.runs, rows, batch_size).await?
        }
        Which::Latency {
            rate,
            seconds,
            no_notify,
            poll_interval,
        } => {
            latency(
                &env,
                &recorder,
                args.runs,
                rate,
                seconds,
                !no_notify,
                poll_interval,
            )
            .await?
        }
        Which::Producer { seconds } => producer(&env, args.runs, seconds).await?,
        Which::Consumer { events, duplicates } => {
            consumer::consumer(&env, args.runs, events, duplicates).await?
        }
        Which::Relays {
            rows,
            batch_size,
            counts,
        } => relays::scaling(&env, &recorder, args.runs, rows, batch_size, &counts).await?,
        Which::Failover { rate, lease_ttl } => {
            relays::failover(&env, args.runs, rate, lease_ttl).await?
        }
        Which::RelayChild { .. } => unreachable!("handled above"),
        Which::All => {
            drain(&env, &recorder, args.runs, 1_000_000, 5000).await?;
            latency(
                &env,
                &recorder,
                args.runs,
                2000,
                20,
                true,
                Duration::from_millis(500),
            )
            .await?;
            producer(&env, args.runs, 5).await?;
            consumer::consumer(&env, args.runs, 20_000, false).await?;
            consumer::consumer(&env, args.runs, 20_000, true).await?;
            relays::scaling(&env, &recorder, args.runs, 300_000, 5000, &[1, 2, 4]).await?;
            relays::failover(&env, args.runs, 500, Duration::from_secs(10)).await?;
        }
    }
    Ok(())
}

/// A private database with the outbox schema, and the broker.
struct Env {
    pool: PgPool,
    brokers: String,
}

impl Env {
    async fn new(args: &Args) -> anyhow::Result<Self> {
        let server: sqlx::postgres::PgConnectOptions =
            args.database_url.parse().context("DATABASE_URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(test_kit::db::recreate(&server, DATABASE).await?)
            .await?;
        outbox_core::migrate(&pool).await?;
        Ok(Self {
            pool,
            brokers: args.kafka_brokers.clone(),
        })
    }

    async fn topic(&self, name: &str) -> anyhow::Result<String> {
        let topic = format!("bench-{name}-{}", uuid::Uuid::new_v4().simple());
        test_kit::topic::create(&self.brokers, &topic, PARTITIONS).await?;
        Ok(topic)
    }

    async fn drop_topic(&self, topic: &str) {
        // Keeps the in-memory broker small between runs; failures are harmless.
        if let Ok(admin) = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create::<AdminClient<DefaultClientContext>>()
        {
            let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
        }
    }

    fn relay(&self, cfg: RelayConfig) -> anyhow::Result<Relay> {
        Ok(Relay::new(
            RelayConfig {
                brokers: self.brokers.clone(),
                ..cfg
            },
            (*self.pool.connect_options()).clone(),
        )?)
    }

    /// `rows` outbox rows with ~200-byte JSON payloads over [`KEYS`] keys,
    /// then `VACUUM ANALYZE`.
    async fn fill(&self, topic: &str, rows: i64) -> anyhow::Result<()> {
        self.fill_committed(topic, rows).await?;
        self.pool.execute("VACUUM ANALYZE outbox").await?;
        Ok(())
    }

    /// The same rows in one committed statement, without the vacuum (relays
    /// may already be draining them).
    async fn fill_committed(&self, topic: &str, rows: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload, correlation_id) \
             SELECT gen_random_uuid(), 'bench', 'k' || (g % $3), 'bench.row', $1, \
                    jsonb_build_object('seq', g, 'pad', repeat('x', 170)), 'corr-' || g \
             FROM generate_series(1, $2) g ORDER BY g",
        )
        .bind(topic)
        .bind(rows)
        .bind(KEYS)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn pending(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------- drain

async fn drain(
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
        let relay_rate = relay_drain(env, recorder, rows, batch_size, true).await?;
        let forgetful_rate = relay_drain(env, recorder, rows, batch_size, false).await?;
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

/// The relay draining a backlog of `rows` on a fresh topic; rows per second.
async fn relay_drain(
    env: &Env,
    recorder: &samples::Samples,
    rows: i64,
    batch_size: usize,
    remember: bool,
) -> anyhow::Result<f64> {
    let topic = env.topic("drain-relay").await?;
    env.fill(&topic, rows).await?;
    let shutdown = CancellationToken::new();
    let r = env.relay(RelayConfig {
        batch_size,
        remember_published: if remember {
            RelayConfig::default().remember_published
        } else {
            Duration::ZERO
        },
        ..RelayConfig::default()
    })?;
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

/// Hands `record` to librdkafka without waiting for its delivery, waiting
/// only while the local queue is full.
async fn enqueue(
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

async fn latency(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rate: u64,
    seconds: u64,
    notify: bool,
    poll_interval: Duration,
) -> anyhow::Result<()> {
    const PRODUCERS: u64 = 8;
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
        let topic = env.topic("latency").await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(env.relay(relay_cfg.clone())?.run(shutdown.clone()));
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
                    append(&pool, &e).await?;
                }
                anyhow::Ok(())
            })
        });
        for p in futures::future::join_all(producers).await {
            p??;
        }
        let offered = total as f64 / started.elapsed().as_secs_f64();
        while env.pending().await? > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        shutdown.cancel();
        task.await?;
        env.drop_topic(&topic).await;
        let mut v = recorder.take();
        anyhow::ensure!(
            v.len() as u64 >= total,
            "only {} latency samples for {total} events",
            v.len()
        );
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).min(v.len()) - 1] * 1000.0;
        let (p50, p99, p999) = (q(0.50), q(0.99), q(0.999));
        println!(
            "run {run}: achieved {offered:.0} events/s, {} samples: p50 {p50:.1} ms  p99 {p99:.1} ms  p99.9 {p999:.1} ms  max {:.1} ms",
            v.len(),
            v[v.len() - 1] * 1000.0
        );
        p50s.push(p50);
        p99s.push(p99);
        p999s.push(p999);
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

// ---------------------------------------------------------------- producer

async fn producer(env: &Env, runs: usize, seconds: u64) -> anyhow::Result<()> {
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_accounts (id bigint PRIMARY KEY, balance numeric NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    env.pool
        .execute("INSERT INTO bench_accounts (id, balance) SELECT g, 0 FROM generate_series(1, 8) g ON CONFLICT DO NOTHING")
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.pool).await?;
    listener.listen("outbox").await?;
    let drain = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
    // The trigger notifies only while a live relay waits (migration V4).
    let stand_in = |waiting: bool| {
        let pool = env.pool.clone();
        async move {
            sqlx::query("DELETE FROM outbox_relays WHERE relay_id = 'bench-stand-in'")
                .execute(&pool)
                .await?;
            sqlx::query(
                "INSERT INTO outbox_relays (relay_id, lease_until, waiting_since) \
                 VALUES ('bench-stand-in', now() + interval '1 hour', CASE WHEN $1 THEN now() END)",
            )
            .bind(waiting)
            .execute(&pool)
            .await?;
            anyhow::Ok(())
        }
    };
    // A week of remembered published ids at ~1.6 events/s... or a day at
    // ~12/s: the index a producer's insert probes (migration V5) is not empty.
    env.pool
        .execute(
            "INSERT INTO outbox_published_ids (event_id, published_at) \
             SELECT gen_random_uuid(), now() - interval '1 hour' FROM generate_series(1, 1000000)",
        )
        .await?;
    env.pool
        .execute("VACUUM ANALYZE outbox_published_ids")
        .await?;
    for shape in [Shape::NewOrder, Shape::Credit] {
        println!(
            "== producer: {}, with and without an outbox row, {seconds}s each, a LISTEN session open, \
             no relay running (a stand-in row in outbox_relays plays a busy or a waiting relay)",
            shape.describe()
        );
        for clients in [1usize, 8] {
            let (mut empty, mut off, mut busy, mut waiting, mut message, mut unchecked) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for run in 1..=runs {
                let measure = |variant| tps(env, clients, seconds, shape, variant);
                let base = measure(Variant::Plain).await?;
                let select = measure(Variant::EmptyStatement).await?;
                let wal = measure(Variant::WalMessage).await?;
                env.pool
                    .execute("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
                    .await?;
                let quiet = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox ENABLE TRIGGER outbox_notify")
                    .await?;
                stand_in(false).await?;
                let gated = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox DISABLE TRIGGER outbox_refuse_published_ids")
                    .await?;
                let no_id_check = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox ENABLE TRIGGER outbox_refuse_published_ids")
                    .await?;
                stand_in(true).await?;
                let notify = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("DELETE FROM outbox_relays WHERE relay_id = 'bench-stand-in'")
                    .await?;
                env.pool.execute("TRUNCATE outbox, bench_orders").await?;
                env.pool.execute("VACUUM bench_accounts").await?;
                println!(
                    "{clients} client(s) run {run}: plain {base:.0} tx/s  +SELECT 1 {select:.0}  \
                     +outbox: trigger off {quiet:.0}, relay busy {gated:.0}, relay waiting {notify:.0} tx/s  \
                     cost {:.2} / {:.2} / {:.2} (empty statement {:.2}, WAL message {:.2}); \
                     published-id check off {no_id_check:.0} tx/s, its cost {:.3}",
                    base / quiet,
                    base / gated,
                    base / notify,
                    base / select,
                    base / wal,
                    no_id_check / gated,
                );
                unchecked.push(no_id_check / gated);
                empty.push(base / select);
                off.push(base / quiet);
                busy.push(base / gated);
                waiting.push(base / notify);
                message.push(base / wal);
            }
            println!(
                "median, {}, {clients} client(s): cost with the outbox row: trigger off {:.2}, \
                 relay busy (no NOTIFY) {:.2}, relay waiting (every commit notifies) {:.2} (target <= 1.25); \
                 an empty extra statement alone {:.2}; the event as a WAL message instead of a row \
                 (reference, not a relay mode) {:.2}; the published-id check (V5, 1M ids \
                 remembered) costs {:.3}× the transaction",
                shape.name(),
                median(off),
                median(busy),
                median(waiting),
                median(empty),
                median(message),
                median(unchecked),
            );
        }
    }
    drain.abort();
    Ok(())
}

/// The producer transaction measured.
#[derive(Clone, Copy)]
enum Shape {
    /// `INSERT` one small order row: the smallest transaction, the worst case.
    NewOrder,
    /// Lock an account row (`SELECT … FOR UPDATE`) and `UPDATE` it, like
    /// `sample-app`'s order status change. Each client has its own row.
    Credit,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::NewOrder => "new order",
            Shape::Credit => "credit",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::NewOrder => "new order (BEGIN; INSERT one order row; COMMIT)",
            Shape::Credit => {
                "credit (BEGIN; SELECT the account FOR UPDATE; UPDATE it; COMMIT), one account per client"
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Variant {
    /// The transaction alone.
    Plain,
    /// The order row and an empty statement: what one more round trip costs.
    EmptyStatement,
    /// The transaction and the outbox row, through `outbox_core::append`.
    WithOutbox,
    /// The same event written as a transactional logical-decoding message
    /// (`pg_logical_emit_message`) instead of a row: WAL only, no heap or
    /// index insert. A reference for what a row-less design would cost the
    /// producer; the relay has no such mode.
    WalMessage,
}

/// Transactions per second for `clients` concurrent clients over `seconds`.
async fn tps(
    env: &Env,
    clients: usize,
    seconds: u64,
    shape: Shape,
    variant: Variant,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks = (0..clients).map(|c| {
        let pool = env.pool.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let mut tx = pool.begin().await?;
                let id: i64 = match shape {
                    Shape::NewOrder => {
                        sqlx::query_scalar(
                            "INSERT INTO bench_orders (customer, total) VALUES ($1, $2) RETURNING id",
                        )
                        .bind(format!("c{c}"))
                        .bind(i as f64 * 1.5)
                        .fetch_one(&mut *tx)
                        .await?
                    }
                    Shape::Credit => {
                        let account = c as i64 + 1;
                        let _balance: f64 = sqlx::query_scalar(
                            "SELECT balance::float8 FROM bench_accounts WHERE id = $1 FOR UPDATE",
                        )
                        .bind(account)
                        .fetch_one(&mut *tx)
                        .await?;
                        sqlx::query(
                            "UPDATE bench_accounts SET balance = balance + $2, updated_at = now() WHERE id = $1",
                        )
                        .bind(account)
                        .bind(1.5f64)
                        .execute(&mut *tx)
                        .await?;
                        account
                    }
                };
                if let Variant::EmptyStatement = variant {
                    sqlx::query("SELECT 1").execute(&mut *tx).await?;
                }
                if let Variant::WalMessage = variant {
                    let envelope = serde_json::json!({
                        "event_id": uuid::Uuid::now_v7(),
                        "aggregate_type": "order",
                        "aggregate_id": id.to_string(),
                        "event_type": "order.created",
                        "event_version": 1,
                        "topic": "bench-orders",
                        "payload": { "id": id, "customer": format!("c{c}") },
                        "headers": {},
                        "occurred_at": chrono::Utc::now(),
                    });
                    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1::bytea)")
                        .bind(serde_json::to_vec(&envelope)?)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Variant::WithOutbox = variant {
                    let e = NewEvent::new("order", id.to_string(), "order.created")
                        .topic("bench-orders")
                        .json_payload(
                            &serde_json::json!({ "id": id, "customer": format!("c{c}") }),
                        )?;
                    append(&mut *tx, &e).await?;
                }
                tx.commit().await?;
                i += 1;
            }
            done.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
            anyhow::Ok(())
        })
    });
    let started = Instant::now();
    for t in futures::future::join_all(tasks).await {
        t??;
    }
    Ok(done.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
