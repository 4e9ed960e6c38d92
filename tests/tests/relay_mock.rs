//! The relay against a slow and erroring broker: librdkafka's mock cluster
//! injects what the real broker cannot (request errors, broker round-trip
//! time, a broker going down). Everything must arrive, in per-key order.

use std::time::Duration;

use integration_tests::{
    check_delivery, consume_from, eventually, insert_sql_rows, pending, RunningRelay,
};
use outbox_relay::RelayConfig;
use rdkafka::{
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr as E},
};
use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn a_slow_and_erroring_broker_loses_and_reorders_nothing(pool: PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let cluster = MockCluster::new(3)?;
    let topic = "mock-orders";
    cluster.create_topic(topic, 3, 3)?;
    let brokers = cluster.bootstrap_servers();

    let n = 3000;
    insert_sql_rows(&pool, topic, n / 2, 50).await?;
    // Produce requests fail with retriable errors, then one broker is slow.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    cluster.broker_round_trip_time(1, Duration::from_millis(300))?;
    let relay = RunningRelay::start_exactly(
        &pool,
        RelayConfig {
            brokers: brokers.clone(),
            batch_size: 200,
            poll_interval: Duration::from_millis(100),
            publish_timeout: Duration::from_secs(10),
            // The mock cluster checks idempotent sequence numbers only for
            // transactional producers. With several requests in flight, a
            // request lost with a dropped connection can be followed by a
            // later one the mock accepts, and librdkafka then acks the lost
            // records implicitly ("implicitly acked by subsequent batch
            // success", librdkafka #2501). Apache Kafka refuses that later
            // request as out of sequence, so the loss is the mock's alone.
            // One request in flight keeps the test about the relay.
            kafka_properties: [(
                "max.in.flight.requests.per.connection".to_string(),
                "1".to_string(),
            )]
            .into(),
            ..RelayConfig::default()
        },
    )?;
    eventually(
        Duration::from_secs(90),
        "the first half drained",
        || async { Ok(pending(&pool).await? == 0) },
    )
    .await?;
    // A broker goes down while the second half is written, then comes back.
    cluster.broker_round_trip_time(1, Duration::ZERO)?;
    cluster.broker_down(2)?;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'load', 'k' || (g % 50), 'load.row', $1, jsonb_build_object('seq', g) \
         FROM generate_series($2::bigint + 1, $2::bigint * 2) g ORDER BY g",
    )
    .bind(topic)
    .bind(n / 2)
    .execute(&pool)
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(2)?;
    eventually(
        Duration::from_secs(90),
        "the second half drained",
        || async { Ok(pending(&pool).await? == 0) },
    )
    .await?;
    relay.stop().await?;
    let failed: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, last_error FROM outbox WHERE status = 'failed'")
            .fetch_all(&pool)
            .await?;
    assert!(
        failed.is_empty(),
        "transient broker errors must not fail rows: {failed:?}"
    );

    let got = consume_from(
        &brokers,
        topic,
        n as usize,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await?;
    let duplicates = check_delivery(&got, n)?;
    assert!(
        duplicates <= 200 * 4,
        "duplicates beyond the bound: {duplicates}"
    );
    Ok(())
}

/// A broker that refuses the relay's transactional id (the ACLs): in
/// exactly-once mode the relay publishes nothing, and its readiness names
/// the problem and the fix.
#[sqlx::test(migrations = false)]
async fn a_refused_transactional_id_is_named_with_its_fix(pool: PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("mock-eo", 1, 1)?;
    cluster.create_topic("mock-checkpoints", 1, 1)?;
    cluster.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[E::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED; 20],
    );
    insert_sql_rows(&pool, "mock-eo", 10, 2).await?;
    let relay = RunningRelay::start_exactly(
        &pool,
        RelayConfig {
            brokers: cluster.bootstrap_servers(),
            exactly_once: true,
            checkpoint_topic: "mock-checkpoints".into(),
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    )?;
    let health = relay.health.clone();
    eventually(
        Duration::from_secs(30),
        "readiness names the ACL",
        || async {
            let reason = health.reason();
            Ok(reason.contains("TransactionalId") && reason.contains("outbox-relay-"))
        },
    )
    .await?;
    assert!(!relay.health.is_ready());
    assert_eq!(pending(&pool).await?, 10, "nothing was published");
    relay.stop().await
}
