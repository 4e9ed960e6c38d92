//! The demo: the whole toolkit in one process, against the real PostgreSQL
//! and broker.
//!
//! 1. A fresh database (`sample_demo`) with the outbox, the `orders` table
//!    and one schema per consumer; a fresh topic.
//! 2. The relay, the order service (HTTP) and the three consumers start.
//! 3. A burst of orders goes through the HTTP API: create, pay, ship,
//!    cancel, one order whose confirmation e-mail bounces (the poison event),
//!    and a few invalid requests.
//! 4. Some records are published a second time (as a relay crash would), so
//!    every consumer sees duplicates.
//! 5. Progress prints until every consumer has settled every record.
//! 6. The dead letter is listed, the fix is deployed, the dead letter is
//!    replayed and applied once.
//! 7. A report: events published, consumed per consumer, duplicates
//!    suppressed, dead letters, end-to-end latency, and checks of each
//!    consumer's state against the orders table.
//!
//! One piece because it is one script: [`run`] reads as the seven steps
//! above, each step a function below it, and the consistency checks at the
//! end compare every consumer's tables with the orders table.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use consumer_kit::{replay, ConsumerStats, DeadLetter, DeadLetterFilter};
use rdkafka::{
    consumer::{BaseConsumer, Consumer as _},
    message::{Header, Headers, Message, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Offset, TopicPartitionList,
};
use sqlx::{postgres::PgConnectOptions, Executor, PgPool};
use test_kit::wait::eventually;
use tokio_util::sync::CancellationToken;

use crate::{
    consumers::{self, Broker, Consumers, Fix, Latencies, NAMES, POISON_CUSTOMER},
    orders::{self, NewOrder, Orders},
};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// PostgreSQL server (the demo creates its own database on it).
    pub database: PgConnectOptions,
    /// The broker: Kafka (the default) or RabbitMQ.
    pub broker: Broker,
    /// Orders in the burst. Default 200.
    pub orders: usize,
    /// Records published a second time. Default 50.
    pub duplicates: usize,
    /// Where the order service listens (port 0: any free port).
    pub http_addr: SocketAddr,
    /// Keep everything running after the report, until this token fires.
    pub keep_running: Option<CancellationToken>,
}

/// What the demo observed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Events the order service committed (and the relay published).
    pub events: u64,
    /// Records on the topic, duplicates included.
    pub records: u64,
    /// What each consumer did, in start order.
    pub consumers: Vec<ConsumerReport>,
    /// Dead letters found before the replay: (event type, reason).
    pub dead_letters: Vec<(String, String)>,
    /// Failed consistency checks (empty when all hold).
    pub problems: Vec<String>,
}

/// What one consumer of the demo did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// The consumer's name (its group).
    pub name: String,
    /// Events its handler applied.
    pub applied: u64,
    /// Redeliveries its dedupe suppressed.
    pub duplicates: u64,
    /// Records of event types it does not handle.
    pub skipped: u64,
    /// Events it dead-lettered.
    pub dead_lettered: u64,
    /// Events it parked behind a dead-lettered event of their key (applied
    /// after the replay, and counted in `applied` then).
    pub parked: u64,
}

const DATABASE: &str = "sample_demo";

/// Prints the demo's progress, each line stamped with the time since start.
#[derive(Clone, Copy)]
struct Narrator(Instant);

impl Narrator {
    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>5.1}s] {msg}", self.0.elapsed().as_secs_f64());
    }
}

/// Runs the demo and prints as it goes: a fresh database and topic, the
/// stack, a burst of orders through HTTP, duplicate deliveries, a dead
/// letter fixed and replayed, and the report with its consistency checks.
pub async fn run(opts: DemoOptions) -> anyhow::Result<Report> {
    let n = Narrator(Instant::now());
    let say = |msg: String| n.say(msg);

    // 1. A fresh database and topic.
    let db = test_kit::db::recreate(&opts.database, DATABASE).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect_with(db.clone())
        .await?;
    outbox_core::migrate(&pool).await?;
    pool.execute(orders::SCHEMA).await?;
    let consumer_pools = consumers::prepare(&db).await?;
    let topic = format!(
        "sample.orders.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // On RabbitMQ, a tap queue keeps a copy of every message, for step 4.
    let mut tap = None;
    match &opts.broker {
        Broker::Kafka(brokers) => {
            test_kit::topic::create(brokers, &topic, 3).await?;
            say(format!("database {DATABASE} ready (outbox, orders, schemas inventory/notifications/analytics); topic {topic} (3 partitions)"));
        }
        Broker::RabbitMq(url) => {
            tap = Some(rabbit::Tap::open(url, &topic).await?);
            say(format!("database {DATABASE} ready (outbox, orders, schemas inventory/notifications/analytics); exchange {topic} on RabbitMQ"));
        }
    }

    // 2. Relay, order service, consumers.
    let shutdown = opts.keep_running.clone().unwrap_or_default();
    let stop = CancellationToken::new();
    let relay = opts.broker.relay(db.clone(), |_| {})?;
    let listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", opts.http_addr))?;
    let addr = listener.local_addr()?;
    let http_task = tokio::spawn(orders::serve(
        listener,
        Orders {
            pool: pool.clone(),
            topic: topic.as_str().into(),
        },
        stop.clone(),
    ));
    let latencies = Latencies::default();
    let fix = Fix::default();
    let consumers = Consumers::build(&opts.broker, &topic, &consumer_pools, &latencies, &fix)?;
    let stats = consumers.stats();
    let health = consumers.health();
    let consumer_handles: Vec<_> = consumers
        .consumers
        .into_iter()
        .map(|(name, c)| (name, c.start()))
        .collect();
    if tap.is_some() {
        // Their queues must be bound before the first event is routed.
        eventually(Duration::from_secs(30), "the consumers' queues", || async {
            Ok(health.iter().all(|(_, h)| h.is_ready()))
        })
        .await
        .context("the consumers did not declare their queues within 30 s")?;
    }
    say(format!("relay, order service (http://{addr}/orders) and consumers inventory, notifications, analytics running"));

    // 3. The burst, through HTTP.
    let events = drive_orders(n, addr, opts.orders).await?;

    // 4. Duplicates, as a relay crash would cause them.
    eventually(Duration::from_secs(60), "the outbox to drain", || async {
        Ok(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?
            == 0)
    })
    .await
    .context("the relay did not publish every event within 60 s")?;
    let duplicated = match (&opts.broker, &tap) {
        (Broker::Kafka(brokers), _) => republish(brokers, &topic, opts.duplicates).await?,
        (Broker::RabbitMq(_), Some(tap)) => tap.republish(opts.duplicates, POISON_CUSTOMER).await?,
        (Broker::RabbitMq(_), None) => 0,
    };
    let records = events + duplicated as u64;
    say(format!("relay published all {events} events; {duplicated} of them published again (duplicate deliveries)"));

    // 5. Progress until every consumer settled every record.
    wait_settled(n, &stats, records).await?;

    // 6. The dead letter, the fix, the replay.
    let letters = replay_dead_letters(n, &opts.broker, &topic, &fix, &stats, records).await?;
    let dead_letters: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l.event_type.clone().unwrap_or_default(),
                l.reason.clone().unwrap_or_default(),
            )
        })
        .collect();

    // 7. Report and checks.
    let mut report = Report {
        events,
        records,
        dead_letters,
        ..Default::default()
    };
    for (name, s) in &stats {
        let s = s.snapshot();
        report.consumers.push(ConsumerReport {
            name: name.to_string(),
            applied: s.processed,
            duplicates: s.duplicates,
            skipped: s.skipped,
            dead_lettered: s.dead_lettered,
            parked: s.parked,
        });
    }
    report.problems = check(&pool, &consumer_pools).await?;
    print_report(&report, duplicated, letters.len(), &latencies);

    if let Some(token) = &opts.keep_running {
        println!();
        println!("still running: order service at http://{addr}/orders, relay and consumers on topic {topic}; Ctrl-C stops everything");
        token.cancelled().await;
    }
    stop.cancel();
    for (name, handle) in consumer_handles {
        handle
            .stop()
            .await
            .with_context(|| format!("consumer {name} failed"))?;
    }
    relay.stop().await?;
    http_task.await??;
    if let Some(tap) = tap {
        tap.remove_all().await;
    }
    drop(shutdown);
    say("stopped cleanly".into());
    Ok(report)
}

/// Prints what happened: events, each consumer's counts, the dead letters,
/// the end-to-end latency and the checks.
fn print_report(report: &Report, duplicated: usize, replayed: usize, latencies: &Latencies) {
    println!();
    println!("== what happened ==");
    println!("events committed and published:  {} (plus {duplicated} duplicate deliveries, {replayed} replayed)", report.events);
    println!("consumer        applied  duplicates-suppressed  skipped(other types)  dead-lettered  parked(then applied)");
    for c in &report.consumers {
        println!(
            "{:<15} {:>7}  {:>21}  {:>20}  {:>13}  {:>20}",
            c.name, c.applied, c.duplicates, c.skipped, c.dead_lettered, c.parked
        );
    }
    for (event_type, reason) in &report.dead_letters {
        println!("dead letter:    {event_type}: {reason} (replayed after the fix, applied once)");
    }
    if let Some((p50, p99, max)) = latencies.summary() {
        println!(
            "end-to-end latency (event committed -> consumer handler): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p50 * 1e3,
            p99 * 1e3,
            max * 1e3
        );
    }
    if report.problems.is_empty() {
        println!("checks:         every consumer's state matches the orders table exactly (no effect lost or doubled)");
    } else {
        for p in &report.problems {
            println!("CHECK FAILED:   {p}");
        }
    }
}

/// Drives `orders` orders through the order service's HTTP API (create,
/// then pay, ship or cancel), one with a customer whose confirmation
/// e-mail bounces, and a few invalid requests. Returns the events committed.
async fn drive_orders(n: Narrator, addr: SocketAddr, orders: usize) -> anyhow::Result<u64> {
    n.say(format!(
        "driving {} orders through the HTTP API (create, pay, ship, cancel)",
        orders
    ));
    let mut events = 0u64;
    let mut ids = Vec::new();
    // The poison order is one that is only cancelled later, so exactly one
    // of its events (its confirmation e-mail) bounces.
    let poison = orders / 2 / 6 * 6;
    for i in 0..orders {
        let customer = if i == poison {
            POISON_CUSTOMER.to_string()
        } else {
            format!("customer{i}@example.com")
        };
        let order = NewOrder {
            customer,
            sku: format!("sku-{}", i % 7),
            quantity: 1 + (i % 3) as i32,
            amount_cents: 1000 + 25 * i as i64,
        };
        let (status, body) = http(
            addr,
            "POST",
            "/orders",
            Some(&serde_json::to_string(&order)?),
        )
        .await?;
        if status != 201 {
            bail!("creating an order answered {status}: {body}");
        }
        let created: orders::Order = serde_json::from_str(&body)?;
        ids.push(created.id);
        events += 1;
    }
    for (i, id) in ids.iter().enumerate() {
        let steps: &[&str] = match i % 6 {
            0 => &["cancel"],
            1 | 2 => &["pay"],
            _ => &["pay", "ship"],
        };
        for step in steps {
            let (status, body) = http(addr, "POST", &format!("/orders/{id}/{step}"), None).await?;
            if status != 200 {
                bail!("{step} order {id} answered {status}: {body}");
            }
            events += 1;
        }
    }
    for (what, method, path, body) in [
        (
            "malformed JSON",
            "POST",
            "/orders".to_string(),
            Some("{not json"),
        ),
        (
            "negative quantity",
            "POST",
            "/orders".to_string(),
            Some(r#"{"customer":"a@b.c","sku":"x","quantity":0,"amount_cents":1}"#),
        ),
        (
            "ship a cancelled order",
            "POST",
            format!("/orders/{}/ship", ids[0]),
            None,
        ),
        ("unknown order", "GET", "/orders/999999".to_string(), None),
    ] {
        let (status, body) = http(addr, method, &path, body).await?;
        n.say(format!(
            "  invalid request ({what}): {status} {}",
            body.trim()
        ));
    }
    n.say(format!("{events} events committed with their orders"));
    Ok(events)
}

/// Reads the dead letters, deploys the fix to the notifications consumer,
/// replays them and waits until every consumer settled them. Returns them.
async fn replay_dead_letters(
    n: Narrator,
    broker: &Broker,
    topic: &str,
    fix: &Fix,
    stats: &[(&'static str, Arc<ConsumerStats>)],
    records: u64,
) -> anyhow::Result<Vec<DeadLetter>> {
    let all = DeadLetterFilter::default();
    let (letters, dlq_topic) = match broker {
        Broker::Kafka(brokers) => {
            let dlq_topic = format!("{topic}.dlq");
            (
                replay::read(brokers, &BTreeMap::new(), &dlq_topic, &all).await?,
                dlq_topic,
            )
        }
        Broker::RabbitMq(url) => {
            let mut letters = Vec::new();
            for name in NAMES {
                let dlq = format!("{}.dlq", Broker::queue(topic, name));
                let (found, _) = consumer_kit::rabbitmq::dead_letters(url, &dlq, &all, false)
                    .await
                    .map_err(anyhow::Error::msg)?;
                letters.extend(found);
            }
            (letters, "the consumers' dead-letter queues".to_string())
        }
    };
    for l in &letters {
        n.say(format!(
            "dead letter in {dlq_topic}: {} {} for group {} ({}): {}",
            l.event_type.as_deref().unwrap_or("?"),
            l.event_id.map(|i| i.to_string()).unwrap_or_default(),
            l.consumer_group.as_deref().unwrap_or("?"),
            l.kind.as_deref().unwrap_or("?"),
            l.reason.as_deref().unwrap_or("?"),
        ));
    }
    fix.deploy();
    let before = stats[1].1.snapshot().processed;
    let replayed = match broker {
        Broker::Kafka(brokers) => {
            replay::replay(brokers, &BTreeMap::new(), &letters)
                .await?
                .replayed
        }
        Broker::RabbitMq(url) => {
            let mut replayed = 0;
            for name in NAMES {
                let dlq = format!("{}.dlq", Broker::queue(topic, name));
                let (_, report) = consumer_kit::rabbitmq::dead_letters(url, &dlq, &all, true)
                    .await
                    .map_err(anyhow::Error::msg)?;
                replayed += report.replayed;
            }
            replayed
        }
    };
    n.say(format!(
        "fix deployed to notifications; replayed {replayed} dead letter(s) to {topic}"
    ));
    eventually(
        Duration::from_secs(60),
        "the replayed dead letters to be consumed",
        || async {
            Ok(stats
                .iter()
                .all(|(_, s)| finished(&s.snapshot()) >= records + letters.len() as u64))
        },
    )
    .await
    .context("the replayed dead letters were not consumed within 60 s")?;
    n.say(format!(
        "notifications applied {} event(s): the replayed one, then those of its key parked behind it, in order; the other consumers skipped the replay as a duplicate or unhandled type",
        stats[1].1.snapshot().processed - before
    ));
    Ok(letters)
}

/// A record a consumer is done with, whatever it did with it.
/// Records a consumer is done with for now: applied, duplicate, skipped,
/// dead-lettered, or parked behind a dead-lettered event of their key.
fn settled(s: &consumer_kit::StatsSnapshot) -> u64 {
    finished(s) + s.parked
}

/// Records a consumer is done with for good: a parked record counts once
/// it was applied (or found a duplicate) after its key's release.
fn finished(s: &consumer_kit::StatsSnapshot) -> u64 {
    s.processed + s.duplicates + s.skipped + s.dead_lettered
}

/// Prints progress until every consumer settled `records` records.
async fn wait_settled(
    n: Narrator,
    stats: &[(&'static str, Arc<ConsumerStats>)],
    records: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line: Vec<String> = stats
            .iter()
            .map(|(name, s)| {
                let s = s.snapshot();
                format!("{name} {}/{records}", settled(&s))
            })
            .collect();
        n.say(format!("  consumed: {}", line.join("  ")));
        if stats.iter().all(|(_, s)| settled(&s.snapshot()) >= records) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("consumers did not settle all {records} records within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Compares each consumer's state with the orders table.
async fn check(orders: &PgPool, pools: &[PgPool]) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let count = |pool: &PgPool, sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let created = count(orders, "SELECT count(*) FROM orders").await?;
    let shipped = count(
        orders,
        "SELECT count(*) FROM orders WHERE status = 'shipped'",
    )
    .await?;
    let cancelled = count(
        orders,
        "SELECT count(*) FROM orders WHERE status = 'cancelled'",
    )
    .await?;
    let revenue: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM orders WHERE status IN ('paid', 'shipped')",
    )
    .fetch_one(orders)
    .await?;
    let reservations = count(&pools[0], "SELECT count(*) FROM reservations").await?;
    let released = count(
        &pools[0],
        "SELECT count(*) FROM reservations WHERE released",
    )
    .await?;
    let emails = count(&pools[1], "SELECT count(*) FROM emails_sent").await?;
    let distinct_emails = count(
        &pools[1],
        "SELECT count(DISTINCT (order_id, kind)) FROM emails_sent",
    )
    .await?;
    let counter = |name: &'static str| {
        let pool = pools[2].clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce((SELECT value FROM counters WHERE name = $1), 0)",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
        }
    };
    let mut expect = |what: &str, got: i64, want: i64| {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    };
    expect(
        "inventory reservations (one per order)",
        reservations,
        created,
    );
    expect(
        "inventory releases (one per cancelled order)",
        released,
        cancelled,
    );
    expect(
        "notification e-mails (confirmation per order + one per shipment)",
        emails,
        created + shipped,
    );
    expect("distinct notification e-mails", distinct_emails, emails);
    expect(
        "analytics orders created",
        counter("orders_created").await?,
        created,
    );
    expect(
        "analytics orders cancelled",
        counter("orders_cancelled").await?,
        cancelled,
    );
    expect(
        "analytics orders shipped",
        counter("orders_shipped").await?,
        shipped,
    );
    expect(
        "analytics revenue (cents)",
        counter("revenue_cents").await?,
        revenue,
    );
    Ok(problems)
}

/// Publishes the first `n` records of `topic` again, unchanged: what
/// consumers see when a relay crashes after publishing and before its
/// commit. Returns how many were republished.
pub(crate) async fn republish(brokers: &str, topic: &str, n: usize) -> anyhow::Result<usize> {
    let brokers_owned = brokers.to_string();
    let topic_owned = topic.to_string();
    let copies = tokio::task::spawn_blocking(
        move || -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers_owned)
                .set("group.id", "sample-app-republisher")
                .set("enable.auto.commit", "false")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition_offset(&topic_owned, p, Offset::Beginning)?;
            }
            c.assign(&tpl)?;
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while out.len() < n && Instant::now() < deadline {
                if let Some(m) = c.poll(Duration::from_millis(200)) {
                    let m = m?.detach();
                    // The poison event is dead-lettered once; keep it single.
                    let poison = m
                        .payload()
                        .is_some_and(|p| String::from_utf8_lossy(p).contains(POISON_CUSTOMER));
                    if !poison {
                        out.push(m);
                    }
                }
            }
            Ok(out)
        },
    )
    .await??;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    for m in &copies {
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let mut record = FutureRecord::to(topic)
            .partition(m.partition())
            .headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("republishing: {e}"))?;
    }
    Ok(copies.len())
}

/// The demo's RabbitMQ side: a tap on the exchange for the duplicates, and
/// the clean-up of what the demo declared.
pub(crate) mod rabbit {
    use lapin::{
        options::{
            BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
            QueueDeleteOptions,
        },
        Channel, Connection, ConnectionProperties,
    };

    use crate::consumers::{Broker, NAMES};

    /// An exclusive queue bound to the exchange for every routing key: a
    /// copy of every message the relay published.
    pub(super) struct Tap {
        conn: Connection,
        channel: Channel,
        exchange: String,
        queue: String,
    }

    impl Tap {
        pub(super) async fn open(url: &str, exchange: &str) -> anyhow::Result<Self> {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            let queue = format!("{exchange}.tap");
            test_kit::rabbitmq::bind_queue(
                &channel,
                exchange,
                &queue,
                test_kit::rabbitmq::QueueLife::Exclusive,
            )
            .await?;
            Ok(Self {
                conn,
                channel,
                exchange: exchange.to_string(),
                queue,
            })
        }

        /// Publishes the first `n` tapped messages again, unchanged (the
        /// one for `poison` excepted): what consumers see when a relay
        /// crashes after the broker's confirm and before its commit.
        pub(super) async fn republish(&self, n: usize, poison: &str) -> anyhow::Result<usize> {
            let publish = self.conn.create_channel().await?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let mut done = 0;
            while done < n {
                let Some(got) = self
                    .channel
                    .basic_get(self.queue.clone().into(), BasicGetOptions { no_ack: true })
                    .await?
                else {
                    break;
                };
                let d = got.delivery;
                if String::from_utf8_lossy(&d.data).contains(poison) {
                    continue;
                }
                publish
                    .basic_publish(
                        self.exchange.clone().into(),
                        d.routing_key.clone(),
                        BasicPublishOptions::default(),
                        &d.data,
                        d.properties.clone(),
                    )
                    .await?
                    .await?;
                done += 1;
            }
            Ok(done)
        }

        /// Deletes what the demo and its consumers declared (best effort):
        /// the tap, each consumer's queue with its delay and dead-letter
        /// queues, and the exchanges.
        pub(super) async fn remove_all(self) {
            remove_declared(
                &self.conn,
                &[(&self.exchange, &NAMES)],
                vec![self.queue.clone()],
            )
            .await;
            let _ = self.conn.close(200, "demo done".into()).await;
        }
    }

    /// Deletes (best effort) `extra` queues and, for each (exchange,
    /// consumers), the exchange and each consumer's queue with its delay
    /// and dead-letter queues.
    pub(crate) async fn remove_declared(
        conn: &Connection,
        declared: &[(&str, &[&str])],
        extra: Vec<String>,
    ) {
        let mut queues = extra;
        let mut exchanges = Vec::new();
        for (exchange, consumers) in declared {
            exchanges.push(exchange.to_string());
            for name in *consumers {
                let q = Broker::queue(exchange, name);
                queues.extend((1..10).map(|n| format!("{q}.retry.{n}")));
                queues.push(format!("{q}.dlq"));
                exchanges.push(format!("{q}.dlx"));
                queues.push(q);
            }
        }
        // Each on its own channel: a refusal closes the channel it came
        // on, and the rest should still go.
        for q in queues {
            if let Ok(c) = conn.create_channel().await {
                let _ = c
                    .queue_delete(q.into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for e in exchanges {
            if let Ok(c) = conn.create_channel().await {
                let _ = c
                    .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
    }
}

/// The demo's HTTP client: (status, body).
pub use test_kit::http::request as http;
