//! The tests' booking saga in its own process, for tests that kill it with
//! SIGKILL in the middle of a transition.
//!
//! Environment: DATABASE_URL, KAFKA_BROKERS, GROUP, TOPICS (comma-separated:
//! the events, the replies and the timeouts topic, in that order),
//! COMMANDS_TOPIC, PAUSE_MS (each transition sleeps this long after its
//! writes, default 0). SIGTERM stops it cleanly.

use std::time::Duration;

use consumer_kit::saga::Unexpected;
use integration_tests::{booking::Booking, consumer::consumer_cfg};

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let pool = sqlx::PgPool::connect(&env("DATABASE_URL")?).await?;
    let topics: Vec<String> = env("TOPICS")?.split(',').map(String::from).collect();
    let [_, _, timeouts] = topics.as_slice() else {
        anyhow::bail!("TOPICS must name the events, replies and timeouts topics");
    };
    let mut cfg = consumer_cfg(&env("GROUP")?, &topics[0]);
    cfg.topics = topics.clone();
    let saga = Booking {
        commands_topic: env("COMMANDS_TOPIC")?,
        timeout_topic: timeouts.clone(),
        answer_timeout: Duration::from_secs(60),
        pause: Duration::from_millis(
            env("PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        unexpected: Unexpected::Ignore,
    };
    let consumer = consumer_kit::Consumer::builder(cfg, pool)
        .saga(saga)
        .build()?;
    consumer
        .run(integration_tests::shutdown_on_sigterm())
        .await?;
    Ok(())
}
