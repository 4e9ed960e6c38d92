//! A consumer in its own process, for tests that kill it with SIGKILL.
//!
//! Environment: DATABASE_URL, KAFKA_BROKERS, TOPIC, GROUP,
//! COMMIT_INTERVAL_MS (default 1000), SLEEP_MS (per event, default 0).
//! The handler is the tests' `Effects`. SIGTERM stops it cleanly.

use std::time::Duration;

use integration_tests::consumer::{consumer_cfg, Effects};

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let pool = sqlx::PgPool::connect(&env("DATABASE_URL")?).await?;
    let ms = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let cfg = consumer_kit::ConsumerConfig {
        commit_interval: Duration::from_millis(ms("COMMIT_INTERVAL_MS", 1000)),
        ..consumer_cfg(&env("GROUP")?, &env("TOPIC")?)
    };
    let handler = Effects {
        member: format!("pid-{}", std::process::id()),
        sleep: Duration::from_millis(ms("SLEEP_MS", 0)),
        ..Effects::default()
    };
    let consumer = consumer_kit::Consumer::builder(cfg, pool)
        .handler("item.added", handler)
        .build()?;
    consumer
        .run(integration_tests::shutdown_on_sigterm())
        .await?;
    Ok(())
}
