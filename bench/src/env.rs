//! The benchmark's environment: its own database and the broker, the
//! fill and count helpers every benchmark uses, and the median of runs.

use anyhow::Context;
use outbox_relay::{Relay, RelayConfig};
use rdkafka::{
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    ClientConfig,
};
use sqlx::{postgres::PgPoolOptions, Executor, PgPool};

use crate::Args;

pub(crate) const KEYS: i64 = 1000;

pub(crate) const PARTITIONS: i32 = 6;
/// The benchmark's own database, dropped and created by each run.
pub(crate) const DATABASE: &str = "outbox_bench";

/// A private database with the outbox schema, and the broker.
pub(crate) struct Env {
    pub(crate) pool: PgPool,
    pub(crate) brokers: String,
    /// The URL of the benchmark's database (for replication connections).
    pub(crate) url: String,
}

impl Env {
    pub(crate) async fn new(args: &Args) -> anyhow::Result<Self> {
        let server: sqlx::postgres::PgConnectOptions =
            args.database_url.parse().context("DATABASE_URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(test_kit::db::recreate(&server, DATABASE).await?)
            .await?;
        outbox_core::migrate(&pool).await?;
        let mut url = url::Url::parse(&args.database_url).context("DATABASE_URL")?;
        url.set_path(DATABASE);
        Ok(Self {
            pool,
            brokers: args.kafka_brokers.clone(),
            url: url.to_string(),
        })
    }

    pub(crate) async fn topic(&self, name: &str) -> anyhow::Result<String> {
        let topic = format!("bench-{name}-{}", uuid::Uuid::new_v4().simple());
        test_kit::topic::create(&self.brokers, &topic, PARTITIONS).await?;
        Ok(topic)
    }

    pub(crate) async fn drop_topic(&self, topic: &str) {
        // Keeps the in-memory broker small between runs; failures are harmless.
        if let Ok(admin) = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create::<AdminClient<DefaultClientContext>>()
        {
            let _ = admin.delete_topics(&[topic], &AdminOptions::new()).await;
        }
    }

    /// A new slot and publication named `name`, in place of any left over.
    pub(crate) async fn fresh_slot(&self, name: &str) -> anyhow::Result<()> {
        self.drop_slot(name).await;
        outbox_relay::slot::create(&self.pool, name, name).await?;
        Ok(())
    }

    /// Drops the slot and publication named `name`, waiting up to 10 s
    /// for a reader that just stopped to let go.
    pub(crate) async fn drop_slot(&self, name: &str) {
        for _ in 0..100 {
            match outbox_relay::slot::drop(&self.pool, name, Some(name)).await {
                Err(outbox_relay::slot::SlotError::HeldByAnother { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                _ => return,
            }
        }
    }

    pub(crate) fn relay(&self, cfg: RelayConfig) -> anyhow::Result<Relay> {
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
    pub(crate) async fn fill(&self, topic: &str, rows: i64) -> anyhow::Result<()> {
        self.fill_committed(topic, rows).await?;
        self.pool.execute("VACUUM ANALYZE outbox").await?;
        Ok(())
    }

    /// The same rows in one committed statement, without the vacuum (relays
    /// may already be draining them).
    pub(crate) async fn fill_committed(&self, topic: &str, rows: i64) -> anyhow::Result<()> {
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

    pub(crate) async fn pending(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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
