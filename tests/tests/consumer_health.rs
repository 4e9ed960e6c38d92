//! consumer-kit's health: readiness that tells a broker outage, a database
//! outage (also while idle) and partitions no member owns, on a private
//! Apache Kafka broker that the test kills and restarts.

use std::time::Duration;

use integration_tests::{
    consumer::{
        consumer_cfg, consumer_db, effect_counts, events, produce_on, start_consumer, Effects,
    },
    create_topic_on, eventually, unique, PrivateBroker,
};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewPartitions},
    client::DefaultClientContext,
    ClientConfig,
};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

#[sqlx::test(migrations = false)]
async fn health_tells_broker_and_database_outages_and_unowned_partitions(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let mut broker = tokio::task::spawn_blocking(PrivateBroker::start).await??;
    let topic = unique("health");
    create_topic_on(&broker.address, &topic, 2).await?;
    let group = unique("g");
    let cfg = consumer_kit::ConsumerConfig {
        brokers: broker.address.clone(),
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let health = c.health();
    let ready = |what: &'static str, want: bool| {
        let health = health.clone();
        async move {
            eventually(WAIT, what, || async { Ok(health.now().ready == want) }).await?;
            Ok::<_, anyhow::Error>(health.now())
        }
    };
    let report = ready("ready at start", true).await?;
    assert!(
        report.reason.starts_with("ready: consuming"),
        "{}",
        report.reason
    );
    produce_on(&broker.address, &topic, &events(10, 5, "item.added").0).await?;
    eventually(WAIT, "applied", || async {
        Ok(effect_counts(&pool).await?.1 == 10)
    })
    .await?;
    let report = health.now();
    assert_eq!(report.assigned_partitions, 2);
    assert!(report.since_progress.is_some(), "progress seen");
    eventually(WAIT, "the group checked", || async {
        Ok(health.now().unowned_partitions == Some(0))
    })
    .await?;

    // The database goes away while the consumer is idle: the probe tells.
    let outage = integration_tests::DatabaseOutage::start(&pool).await?;
    let down = ready("unready without its database", false).await;
    outage.end().await?;
    let down = down?;
    assert!(
        down.reason.contains("the database unreachable"),
        "{}",
        down.reason
    );
    ready("ready again with its database", true).await?;
    assert!(c.stats().snapshot().database_outages >= 1);

    // Partitions added to the topic belong to nobody until the group
    // rebalances (librdkafka notices at its next metadata refresh).
    let admin_kafka: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    admin_kafka
        .create_partitions(&[NewPartitions::new(&topic, 4)], &AdminOptions::new())
        .await?;
    eventually(WAIT, "the added partitions reported unowned", || async {
        Ok(health.now().unowned_partitions.is_some_and(|n| n > 0))
    })
    .await?;
    let report = health.now();
    assert!(
        report.ready,
        "unowned partitions are the group's problem: {}",
        report.reason
    );
    assert!(
        report.reason.contains("of its topics ha"),
        "{}",
        report.reason
    );

    // The broker dies: unready at once, with the reason; back when it is.
    broker.kill();
    let down = ready("unready without a broker", false).await?;
    assert!(down.reason.contains("Kafka unreachable"), "{}", down.reason);
    assert!(c.stats().snapshot().broker_outages >= 1);
    let broker = tokio::task::spawn_blocking(move || broker.restart().map(|()| broker)).await??;
    ready("ready again with the broker", true).await?;
    c.stop().await?;
    assert!(!health.is_ready(), "a stopped consumer is not ready");
    assert_eq!(health.now().phase, consumer_kit::Phase::Stopped);
    drop(broker);
    Ok(())
}
