//! The relay through a real PgBouncer in transaction mode (`./dev up` starts
//! one at PGBOUNCER_URL), where session state (prepared statements, LISTEN,
//! session locks) does not survive from one transaction to the next.

use std::time::Duration;

use integration_tests::{
    brokers, check_delivery, consume, eventually, insert_sql_rows, outbox_with_topic, pending,
    RunningRelay,
};
use outbox_relay::RelayConfig;
use sqlx::{postgres::PgConnectOptions, PgPool};

const WAIT: Duration = Duration::from_secs(60);

/// The test database, reached through PgBouncer.
fn through_pgbouncer(pool: &PgPool) -> anyhow::Result<PgConnectOptions> {
    let url = std::env::var("PGBOUNCER_URL")
        .map_err(|_| anyhow::anyhow!("PGBOUNCER_URL is not set: run the tests with ./dev test"))?;
    let opts: PgConnectOptions = url.parse()?;
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_string();
    Ok(opts.database(&db))
}

/// Closes PgBouncer's server connections to the test database. PgBouncer
/// keeps idle ones for a while, and sqlx can only drop the database (at the
/// end of this test, or when the same test runs again) once they are gone.
async fn close_pooled_connections(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(pool)
    .await?;
    Ok(())
}

fn cfg(transaction_pooler: bool) -> RelayConfig {
    RelayConfig {
        brokers: brokers(),
        transaction_pooler,
        poll_interval: Duration::from_millis(50),
        batch_size: 100,
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(250),
        ..RelayConfig::default()
    }
}

#[sqlx::test(migrations = false)]
async fn two_relays_through_pgbouncer_in_transaction_mode_deliver_everything_in_order(
    pool: PgPool,
) -> anyhow::Result<()> {
    const N: i64 = 3000;
    // Migrations take a session lock: they run against PostgreSQL directly.
    let topic = outbox_with_topic(&pool, "pooler", 3).await?;
    let bouncer = through_pgbouncer(&pool)?;
    let first = RunningRelay::start_on(bouncer.clone(), cfg(true))?;
    let second = RunningRelay::start_on(bouncer, cfg(true))?;
    eventually(WAIT, "the two relays share the partitions", || async {
        Ok(integration_tests::owned_by_live_relays(&pool).await? == vec![16, 16])
    })
    .await?;
    insert_sql_rows(&pool, &topic, N, 100).await?;
    eventually(WAIT, "drained through the pooler", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    assert!(first.health.is_ready(), "{}", first.health.reason());
    assert!(second.health.is_ready(), "{}", second.health.reason());
    first.stop().await?;
    second.stop().await?;
    let got = consume(&topic, N as usize, WAIT, Duration::from_millis(1500)).await?;
    close_pooled_connections(&pool).await?;
    let duplicates = check_delivery(&got, N)?;
    assert_eq!(duplicates, 0, "no duplicates in normal operation");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_relay_not_told_about_the_pooler_says_what_to_do(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "pooler-unflagged", 1).await?;
    insert_sql_rows(&pool, &topic, 10, 2).await?;
    let relay = RunningRelay::start_on(through_pgbouncer(&pool)?, cfg(false))?;
    eventually(WAIT, "a degraded state naming the pooler", || async {
        Ok(relay.health.reason().contains("--transaction-pooler"))
    })
    .await?;
    assert!(!relay.health.is_ready());
    assert_eq!(pending(&pool).await?, 10, "nothing was claimed");
    relay.stop().await?;
    close_pooled_connections(&pool).await?;
    Ok(())
}

/// The operator commands through the pooler: with `--transaction-pooler`
/// they work; without it they say what to do.
#[sqlx::test(migrations = false)]
async fn operator_commands_work_through_the_pooler_when_told(pool: PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_string();
    let url = std::env::var("PGBOUNCER_URL")?;
    let url = format!(
        "{}/{db}",
        url.rsplit_once('/').map(|(base, _)| base).unwrap_or(&url)
    );
    let run = |args: &[&str]| integration_tests::relay_cli(&url, args);
    let (code, out) = run(&["--transaction-pooler", "status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("partitions: 32"), "{out}");
    let (code, out) = run(&["--transaction-pooler", "failed", "list"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&["status"]);
    close_pooled_connections(&pool).await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--transaction-pooler"), "{out}");
    Ok(())
}
