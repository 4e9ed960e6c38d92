//! Three services that consume the order events with consumer-kit, each in
//! its own PostgreSQL schema (its own tables and its own `processed_events`):
//!
//! - **inventory** reserves stock for each created order and releases it
//!   when the order is cancelled;
//! - **notifications** records one "email sent" row per order confirmation
//!   and per shipment. Its mail server rejects [`POISON_CUSTOMER`] until the
//!   fix is deployed ([`Fix`]), so that order's confirmation is dead-lettered,
//!   and replayed afterwards;
//! - **analytics** keeps order counts and revenue.
//!
//! None of their tables has a unique constraint that would hide a double
//! effect: exactly-once comes from consumer-kit alone.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use consumer_kit::{
    Consumer, ConsumerBuilder, ConsumerConfig, ConsumerStats, Envelope, Handler, HandlerError,
};
use sqlx::{postgres::PgConnectOptions, PgPool, PgTransaction};

use crate::orders::OrderEvent;

/// The customer whose confirmation e-mail the mail server rejects.
pub const POISON_CUSTOMER: &str = "bounce@example.invalid";

/// Whether the notifications fix is deployed.
#[derive(Debug, Clone, Default)]
pub struct Fix(Arc<AtomicBool>);

impl Fix {
    /// Deploys the fix.
    pub fn deploy(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn deployed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// End-to-end latencies (seconds from `ce_time` to the handler), shared by
/// the three consumers.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Arc<Mutex<Vec<f64>>>);

impl Latencies {
    fn record<T>(&self, event: &Envelope<T>) {
        if let Some(at) = event.occurred_at {
            let secs = (chrono::Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(secs);
        }
    }

    /// (p50, p99, max) in seconds, or `None` without samples.
    pub fn summary(&self) -> Option<(f64, f64, f64)> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99), v[v.len() - 1]))
    }
}

/// Where the order events travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// Kafka, at these bootstrap servers: a topic, read by three consumer
    /// groups.
    Kafka(String),
    /// RabbitMQ, at this URL: an exchange, with a queue per consumer
    /// (`<exchange>.<consumer>`, single active consumer so that each
    /// order's events apply in order).
    RabbitMq(String),
}

impl Broker {
    /// `kafka` or `rabbitmq`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::RabbitMq(_) => "rabbitmq",
        }
    }

    /// A consumer of `topic` for the demos: group `group` on `pool`,
    /// event types it does not handle skipped, quick retries and commits;
    /// on RabbitMQ its own queue under single active consumer (so each
    /// key's events apply in order).
    pub fn consumer(&self, group: &str, topic: &str, pool: &PgPool) -> ConsumerBuilder {
        self.consumer_with(group, topic, pool, |_| {})
    }

    /// [`Broker::consumer`], its configuration changed by `tune` (the soak
    /// shortens the session timeout, so that a killed member's partitions
    /// move on quickly).
    pub fn consumer_with(
        &self,
        group: &str,
        topic: &str,
        pool: &PgPool,
        tune: impl FnOnce(&mut ConsumerConfig),
    ) -> ConsumerBuilder {
        let mut cfg = ConsumerConfig {
            brokers: match self {
                Self::Kafka(b) => b.clone(),
                Self::RabbitMq(_) => String::new(),
            },
            unknown_event_type: consumer_kit::UnknownEventType::Skip,
            max_attempts: 3,
            min_backoff: Duration::from_millis(100),
            commit_interval: Duration::from_millis(500),
            // Answer fetches quickly when a partition is idle: lower latency
            // for a demo, at the cost of more fetch requests.
            kafka_properties: [("fetch.wait.max.ms".to_string(), "20".to_string())].into(),
            ..ConsumerConfig::new(group, [topic])
        };
        tune(&mut cfg);
        let b = Consumer::builder(cfg, pool.clone());
        match self {
            Self::Kafka(_) => b,
            Self::RabbitMq(url) => b.rabbitmq(consumer_kit::RabbitMqSource {
                queue: Some(Self::queue(topic, group)),
                single_active_consumer: true,
                ..consumer_kit::RabbitMqSource::new(url.clone())
            }),
        }
    }

    /// The relay for the demos, on `db`, publishing to this broker.
    pub fn relay(
        &self,
        db: PgConnectOptions,
        tune: impl FnOnce(&mut outbox_relay::RelayConfig),
    ) -> anyhow::Result<outbox_relay::RelayHandle> {
        let mut cfg = outbox_relay::RelayConfig {
            brokers: match self {
                Self::Kafka(b) => b.clone(),
                Self::RabbitMq(_) => String::new(),
            },
            rabbitmq: match self {
                Self::Kafka(_) => None,
                Self::RabbitMq(url) => Some(outbox_relay::RabbitMqSink::new(url)),
            },
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        };
        tune(&mut cfg);
        Ok(outbox_relay::Relay::new(cfg, db)?.start())
    }

    /// The queue of consumer `name` on RabbitMQ, for events of `topic`.
    pub fn queue(topic: &str, name: &str) -> String {
        format!("{topic}.{name}")
    }
}

/// A consumer's name: its schema and its consumer group.
pub const NAMES: [&str; 3] = ["inventory", "notifications", "analytics"];

const SCHEMAS: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, reserved bigint NOT NULL DEFAULT 0);
     CREATE TABLE IF NOT EXISTS reservations (order_id bigint NOT NULL, sku text NOT NULL, quantity integer NOT NULL, released boolean NOT NULL DEFAULT false)",
    "CREATE TABLE IF NOT EXISTS emails_sent (order_id bigint NOT NULL, kind text NOT NULL, recipient text NOT NULL, sent_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS counters (name text PRIMARY KEY, value bigint NOT NULL)",
];

/// Creates each consumer's schema with its tables and `processed_events`,
/// and returns a pool per consumer whose `search_path` is its schema.
pub async fn prepare(base: &PgConnectOptions) -> anyhow::Result<Vec<PgPool>> {
    services(base, &NAMES, &SCHEMAS, "").await
}

/// Creates a schema per service in `names`, with its tables (`ddl`, in the
/// same order) and consumer-kit's, and returns a pool per service whose
/// `search_path` is its schema, followed by `then` (a comma-separated
/// list, or empty).
pub(crate) async fn services(
    base: &PgConnectOptions,
    names: &[&str],
    ddl: &[&str],
    then: &str,
) -> anyhow::Result<Vec<PgPool>> {
    let admin = PgPool::connect_with(base.clone()).await?;
    let mut pools = Vec::new();
    for (name, ddl) in names.iter().zip(ddl) {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{name}\""))
            .execute(&admin)
            .await?;
        // No spaces: the startup option splits on them.
        let path = if then.is_empty() {
            name.to_string()
        } else {
            format!("{name},{then}")
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(6)
            .connect_with(base.clone().options([("search_path", path)]))
            .await?;
        consumer_kit::migrate(&pool).await?;
        sqlx::raw_sql(ddl).execute(&pool).await?;
        pools.push(pool);
    }
    admin.close().await;
    Ok(pools)
}

#[derive(Clone)]
struct Inventory(Latencies);

#[consumer_kit::async_trait]
impl Handler for Inventory {
    type Payload = OrderEvent;

    async fn handle(
        &self,
        event: &Envelope<OrderEvent>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let o = &event.payload;
        match event.event_type.as_str() {
            "order.created" => {
                sqlx::query(
                    "INSERT INTO reservations (order_id, sku, quantity) VALUES ($1, $2, $3)",
                )
                .bind(o.id)
                .bind(&o.sku)
                .bind(o.quantity)
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO stock (sku, reserved) VALUES ($1, $2) \
                     ON CONFLICT (sku) DO UPDATE SET reserved = stock.reserved + EXCLUDED.reserved",
                )
                .bind(&o.sku)
                .bind(i64::from(o.quantity))
                .execute(&mut **tx)
                .await?;
            }
            _ => {
                // order.cancelled: release what was reserved.
                let released = sqlx::query(
                    "UPDATE reservations SET released = true WHERE order_id = $1 AND NOT released",
                )
                .bind(o.id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if released > 0 {
                    sqlx::query("UPDATE stock SET reserved = reserved - $2 WHERE sku = $1")
                        .bind(&o.sku)
                        .bind(i64::from(o.quantity))
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
        self.0.record(event);
        Ok(())
    }
}

#[derive(Clone)]
struct Notifications(Latencies, Fix);

#[consumer_kit::async_trait]
impl Handler for Notifications {
    type Payload = OrderEvent;

    async fn handle(
        &self,
        event: &Envelope<OrderEvent>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let o = &event.payload;
        if o.customer == POISON_CUSTOMER && !self.1.deployed() {
            return Err(HandlerError::permanent(format!(
                "mail server rejected recipient {}: 550 no such domain",
                o.customer
            )));
        }
        let kind = if event.event_type == "order.shipped" {
            "shipped"
        } else {
            "confirmation"
        };
        sqlx::query("INSERT INTO emails_sent (order_id, kind, recipient) VALUES ($1, $2, $3)")
            .bind(o.id)
            .bind(kind)
            .bind(&o.customer)
            .execute(&mut **tx)
            .await?;
        self.0.record(event);
        Ok(())
    }
}

#[derive(Clone)]
struct Analytics(Latencies);

#[consumer_kit::async_trait]
impl Handler for Analytics {
    type Payload = OrderEvent;

    async fn handle(
        &self,
        event: &Envelope<OrderEvent>,
        tx: &mut PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        let o = &event.payload;
        let mut bump = vec![(format!("orders_{}", o.status), 1)];
        if event.event_type == "order.paid" {
            bump.push(("revenue_cents".into(), o.amount_cents));
        }
        for (name, by) in bump {
            sqlx::query(
                "INSERT INTO counters (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = counters.value + EXCLUDED.value",
            )
            .bind(name)
            .bind(by)
            .execute(&mut **tx)
            .await?;
        }
        self.0.record(event);
        Ok(())
    }
}

/// The three consumers, built and ready to run.
pub struct Consumers {
    /// (name, consumer), in [`NAMES`] order.
    pub consumers: Vec<(&'static str, Consumer)>,
}

impl Consumers {
    /// Builds the consumers of `topic` on `broker` over their `pools` (from
    /// [`prepare`]). Event types a consumer does not handle are skipped.
    pub fn build(
        broker: &Broker,
        topic: &str,
        pools: &[PgPool],
        latencies: &Latencies,
        fix: &Fix,
    ) -> anyhow::Result<Self> {
        let builder = |group: &'static str, pool: &PgPool| broker.consumer(group, topic, pool);
        let inventory = Inventory(latencies.clone());
        let notifications = Notifications(latencies.clone(), fix.clone());
        let analytics = Analytics(latencies.clone());
        let consumers = vec![
            (
                NAMES[0],
                builder(NAMES[0], &pools[0])
                    .handler("order.created", inventory.clone())
                    .handler("order.cancelled", inventory)
                    .build()?,
            ),
            (
                NAMES[1],
                builder(NAMES[1], &pools[1])
                    .handler("order.created", notifications.clone())
                    .handler("order.shipped", notifications)
                    .build()?,
            ),
            (
                NAMES[2],
                builder(NAMES[2], &pools[2])
                    .handler("order.created", analytics.clone())
                    .handler("order.paid", analytics.clone())
                    .handler("order.shipped", analytics.clone())
                    .handler("order.cancelled", analytics)
                    .build()?,
            ),
        ];
        Ok(Self { consumers })
    }

    /// Each consumer's health, in [`NAMES`] order.
    pub fn health(&self) -> Vec<(&'static str, Arc<consumer_kit::Health>)> {
        self.consumers
            .iter()
            .map(|(n, c)| (*n, c.health()))
            .collect()
    }

    /// Each consumer's running totals, in [`NAMES`] order.
    pub fn stats(&self) -> Vec<(&'static str, Arc<ConsumerStats>)> {
        self.consumers
            .iter()
            .map(|(n, c)| (*n, c.stats()))
            .collect()
    }
}
