//! The checkout demo (`sample-app demo --checkout`, `./dev demo
//! --checkout`): a few hundred checkouts through the saga of
//! [`crate::checkout`], with out-of-stock products, declined payments and
//! a payment service that sometimes never answers, then a report by
//! outcome and the invariants.
//!
//! 1. A fresh database (`sample_checkout`) with the outbox and a schema per
//!    service; a checkout topic and a command topic (Kafka), or exchanges
//!    (RabbitMQ).
//! 2. The relay and the four consumers (the saga and three services) start.
//! 3. The checkouts start, each a cart and a `checkout.started` event in one
//!    transaction, as a cart service would write them.
//! 4. On Kafka, some records of both topics are published a second time.
//! 5. Wait until every checkout is finished and nothing is left to publish
//!    (the silent payments finish by their step timeout).
//! 6. The report and the invariants ([`crate::checkout::check`]).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use test_kit::wait::eventually;

use crate::{
    checkout::{self, Checkout, Faults, Topics, SERVICES},
    consumers::Broker,
    demo,
};

const DATABASE: &str = "sample_checkout";

/// Checkout demo settings.
#[derive(Debug, Clone)]
pub struct CheckoutOptions {
    /// PostgreSQL server (the demo creates its own database on it).
    pub database: PgConnectOptions,
    /// Kafka or RabbitMQ.
    pub broker: Broker,
    /// Checkouts to run. Default 300.
    pub checkouts: usize,
    /// How long a step may go unanswered. Default 3 s here (30 s is the
    /// saga's production default).
    pub step_timeout: Duration,
    /// The payment service's faults.
    pub faults: Faults,
    /// Records published a second time (Kafka only). Default 60.
    pub duplicates: usize,
}

/// What the checkout demo observed.
#[derive(Debug, Clone, Default)]
pub struct CheckoutReport {
    /// Checkouts by outcome (`completed`, or the failure reason).
    pub outcomes: BTreeMap<String, i64>,
    /// Compensating commands carried out, by kind.
    pub compensations: BTreeMap<String, i64>,
    /// Duplicate deliveries the consumers dropped.
    pub duplicates: u64,
    /// Failed invariants (empty when all hold).
    pub problems: Vec<String>,
}

/// Runs the checkout demo; see the module docs.
pub async fn run(opts: CheckoutOptions) -> anyhow::Result<CheckoutReport> {
    let started = std::time::Instant::now();
    let say = |msg: String| println!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());

    // 1. Database and topics.
    let db = test_kit::db::recreate(&opts.database, DATABASE).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(db.clone())
        .await?;
    outbox_core::migrate(&pool).await?;
    let pools = checkout::prepare(&db).await?;
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let topics = Topics {
        checkout: format!("sample.checkout.{run_id}"),
        commands: format!("sample.checkout-commands.{run_id}"),
    };
    if let Broker::Kafka(brokers) = &opts.broker {
        for t in [&topics.checkout, &topics.commands] {
            test_kit::topic::create(brokers, t, 3).await?;
        }
    }
    let n = opts.checkouts;
    checkout::stock_up(&pools[1], n).await?;
    say(format!(
        "database {DATABASE} ready (outbox; schemas {}); {} {} and {}",
        SERVICES.join(", "),
        if matches!(opts.broker, Broker::Kafka(_)) {
            "topics"
        } else {
            "exchanges"
        },
        topics.checkout,
        topics.commands
    ));

    // 2. Relay and consumers.
    let relay = opts.broker.relay(db.clone(), |cfg| {
        cfg.delayed_check_interval = Duration::from_millis(250);
    })?;
    let saga = Checkout {
        topics: topics.clone(),
        step_timeout: opts.step_timeout,
    };
    let built = checkout::consumers(&opts.broker, &topics, &pools, saga, opts.faults, |_| {})?;
    let stats: Vec<_> = built.iter().map(|(name, c)| (*name, c.stats())).collect();
    let health: Vec<_> = built.iter().map(|(_, c)| c.health()).collect();
    let handles: Vec<_> = built
        .into_iter()
        .map(|(name, c)| (name, c.start()))
        .collect();
    if matches!(opts.broker, Broker::RabbitMq(_)) {
        // Their queues must be bound before the first event is routed.
        eventually(Duration::from_secs(30), "the consumers' queues", || async {
            Ok(health.iter().all(|h| h.is_ready()))
        })
        .await
        .context("the consumers did not declare their queues within 30 s")?;
    }
    say(format!(
        "relay and consumers running: the checkout saga, and the services {}",
        SERVICES[1..].join(", ")
    ));

    // 3. The checkouts.
    for i in 0..n {
        checkout::start(&pools[0], &topics, i as u64).await?;
    }
    say(format!(
        "{n} checkouts started; the payment service declines every {}th charge and never answers every {}th",
        opts.faults.decline_every, opts.faults.silence_every
    ));

    // 4. Duplicates, as a relay crash would cause them.
    if let Broker::Kafka(brokers) = &opts.broker {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut copies = 0;
        for t in [&topics.checkout, &topics.commands] {
            copies += demo::republish(brokers, t, opts.duplicates / 2).await?;
        }
        say(format!(
            "{copies} records published a second time (duplicate deliveries)"
        ));
    }

    // 5. Until every checkout is finished and nothing is left to publish.
    let bound = Duration::from_secs(120) + 4 * opts.step_timeout;
    // Settled: nothing running, nothing to publish, and no consumer moved
    // since the last look (a late answer may still be on its way).
    let last = std::sync::Mutex::new((String::new(), u64::MAX));
    eventually(bound, "every checkout finished", || async {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM consumer_kit_sagas WHERE status = 'running'")
                .fetch_one(&pools[0])
                .await?;
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        let moved: u64 = stats
            .iter()
            .map(|(_, s)| {
                let s = s.snapshot();
                s.processed + s.duplicates + s.skipped + s.dead_lettered
            })
            .sum();
        let now = format!("{running} checkouts running");
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if now != last.0 && (running % 10 == 0 || running < 5) {
            say(now.clone());
        }
        let still = last.1 == moved;
        *last = (now, moved);
        Ok(running == 0 && waiting == 0 && still)
    })
    .await?;

    // 6. Report and invariants.
    let mut report = CheckoutReport {
        outcomes: sqlx::query_as::<_, (String, i64)>(
            "SELECT coalesce(reason, status), count(*) FROM consumer_kit_sagas GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&pools[0])
        .await?
        .into_iter()
        .collect(),
        compensations: BTreeMap::new(),
        duplicates: stats.iter().map(|(_, s)| s.snapshot().duplicates).sum(),
        problems: checkout::check(&pools).await?,
    };
    for (pool, sql) in [
        (
            &pools[1],
            "SELECT 'stock released', count(*) FROM reservations WHERE status = 'released'",
        ),
        (
            &pools[2],
            "SELECT 'payments refunded', count(*) FROM payments WHERE status = 'refunded'",
        ),
        (
            &pools[3],
            "SELECT 'orders cancelled', count(*) FROM orders WHERE status = 'cancelled'",
        ),
    ] {
        let (what, count): (String, i64) = sqlx::query_as(sql).fetch_one(pool).await?;
        report.compensations.insert(what, count);
    }
    println!();
    println!("checkouts by outcome:");
    for (outcome, count) in &report.outcomes {
        println!("  {outcome:<28} {count:>5}");
    }
    println!("compensations:");
    for (what, count) in &report.compensations {
        println!("  {what:<28} {count:>5}");
    }
    println!("duplicate deliveries dropped: {}", report.duplicates);
    if report.problems.is_empty() {
        println!("invariants: every checkout finished; every reservation confirmed or released; stock balanced; no charge without an order or a refund; nothing applied twice: OK");
    } else {
        for p in &report.problems {
            println!("PROBLEM: {p}");
        }
    }

    for (name, h) in handles {
        h.stop().await.with_context(|| format!("consumer {name}"))?;
    }
    relay.stop().await?;
    if let Broker::RabbitMq(url) = &opts.broker {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        demo::rabbit::remove_declared(
            &conn,
            &[
                (topics.checkout.as_str(), &SERVICES[..1]),
                (topics.commands.as_str(), &SERVICES[1..]),
            ],
            Vec::new(),
        )
        .await;
        let _ = conn.close(200, "checkout demo done".into()).await;
    }
    say("stopped cleanly".into());
    Ok(report)
}
