//! Readiness that tells the truth: the relay is ready only while it can
//! publish now. These tests kill brokers under an idle client, under a
//! batch in flight and at start, and check what `/readyz` says meanwhile.

use std::time::{Duration, Instant};

use integration_tests::{
    create_topic_on, eventually, free_port, http_get, insert_sql_rows, outbox_with_topic, pending,
    relay_log, spawn_relay, spawn_relay_on, unique, PrivateBroker,
};
use outbox_kafka::{Connection, WatchedContext};
use rdkafka::{producer::FutureProducer, ClientConfig};
use sqlx::PgPool;

/// An idle producer stays connected while the broker runs, sees it die
/// within seconds (no record has to time out), and sees it come back.
#[tokio::test]
async fn an_idle_client_sees_the_broker_go_and_come_back() -> anyhow::Result<()> {
    let mut broker = tokio::task::spawn_blocking(PrivateBroker::start).await??;
    let context = WatchedContext::default();
    let reach = context.reach();
    let _producer: FutureProducer<WatchedContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set(
            "statistics.interval.ms",
            outbox_kafka::reach::STATS_INTERVAL_MS,
        )
        .create_with_context(context)?;
    eventually(Duration::from_secs(15), "connected", || async {
        Ok(reach.now() == Connection::Up)
    })
    .await?;
    // Idle for a while: librdkafka keeps a connection, the client stays up.
    let idle_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < idle_until {
        assert_eq!(reach.now(), Connection::Up, "idle and connected");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let killed = Instant::now();
    broker.kill();
    eventually(Duration::from_secs(10), "down", || async {
        Ok(matches!(reach.now(), Connection::Down { .. }))
    })
    .await?;
    println!(
        "down seen {:.1?} after the kill: {:?}",
        killed.elapsed(),
        reach.now()
    );
    let restarted = Instant::now();
    let _broker = tokio::task::spawn_blocking(move || broker.restart().map(|()| broker)).await??;
    eventually(Duration::from_secs(30), "up again", || async {
        Ok(reach.now() == Connection::Up)
    })
    .await?;
    println!("up seen {:.1?} after the restart", restarted.elapsed());
    Ok(())
}

/// Polls `/readyz` on `port` every 100 ms for `how_long`; returns every
/// answer (status, body) in order, leaving out the moments before the
/// server listened.
async fn watch_readiness(port: u16, how_long: Duration) -> Vec<(u16, String)> {
    let until = Instant::now() + how_long;
    let mut seen = Vec::new();
    while Instant::now() < until {
        if let Ok(answer) = http_get(port, "/readyz") {
            seen.push(answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// With no broker at the address, a relay that owns every partition is
/// never ready, and never claims to be on standby: it says it is
/// connecting, then that no broker is connected.
#[sqlx::test(migrations = false)]
async fn with_no_broker_at_start_the_relay_is_never_ready(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "nobroker-start", 1).await?;
    insert_sql_rows(&pool, &topic, 5, 5).await?;
    let port = free_port();
    let dead = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{port}");
    let relay = spawn_relay_on(&pool, &dead, "nobroker-start", &["--http-addr", &http])?;
    let seen = watch_readiness(port, Duration::from_secs(6)).await;
    drop(relay);
    println!("{seen:#?}");
    assert!(seen.len() > 20, "the relay answered /readyz: {seen:?}");
    for (code, body) in &seen {
        assert_eq!(*code, 503, "ready without a broker: {body}");
        assert!(!body.contains("standby"), "{body}");
    }
    let (_, last) = seen.last().expect("answers");
    assert!(
        last.starts_with("degraded: kafka: no broker connected"),
        "{last}"
    );
    assert_eq!(pending(&pool).await?, 5, "nothing lost");
    Ok(())
}

/// A healthy single relay says what it does, in words that fit: active,
/// publishing its partitions; no talk of standby or other relays.
#[sqlx::test(migrations = false)]
async fn a_healthy_start_says_active_and_publishing(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "healthy-start", 1).await?;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let relay = spawn_relay(&pool, "healthy-start", &["--http-addr", &http])?;
    eventually(Duration::from_secs(20), "ready", || async {
        Ok(http_get(port, "/readyz").is_ok_and(|(code, _)| code == 200))
    })
    .await?;
    let (_, body) = http_get(port, "/readyz")?;
    let partitions: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_relay_partitions")
        .fetch_one(&pool)
        .await?;
    let expected =
        format!("active: publishing; owns {partitions} of {partitions} outbox partitions");
    assert!(body.starts_with(&expected), "{body}");
    insert_sql_rows(&pool, &topic, 5, 5).await?;
    eventually(Duration::from_secs(20), "published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.terminate();
    let log = std::fs::read_to_string(relay_log("healthy-start"))?;
    for wrong in ["standby", "other relays own"] {
        assert!(
            !log.contains(wrong),
            "a healthy start logs {wrong:?}:\n{log}"
        );
    }
    Ok(())
}

/// The broker dies while a batch waits for its acknowledgements, with the
/// default publish timeout of 30 s: readiness turns 503 within seconds,
/// not when the batch times out. Then SIGTERM: the relay exits within its
/// `--shutdown-timeout`, everything included, and the rows stay pending.
#[sqlx::test(migrations = false)]
async fn a_dead_broker_makes_the_relay_unready_at_once_and_shutdown_keeps_its_bound(
    pool: PgPool,
) -> anyhow::Result<()> {
    let mut broker = tokio::task::spawn_blocking(PrivateBroker::start).await??;
    outbox_core::migrate(&pool).await?;
    let topic = unique("dead-broker");
    create_topic_on(&broker.address, &topic, 1).await?;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut relay = spawn_relay_on(
        &pool,
        &broker.address,
        "dead-broker",
        &["--http-addr", &http, "--shutdown-timeout", "3s"],
    )?;
    eventually(Duration::from_secs(20), "ready", || async {
        Ok(http_get(port, "/readyz").is_ok_and(|(code, _)| code == 200))
    })
    .await?;

    broker.kill();
    let killed = Instant::now();
    insert_sql_rows(&pool, &topic, 50, 5).await?;
    eventually(Duration::from_secs(10), "not ready", || async {
        Ok(http_get(port, "/readyz").is_ok_and(|(code, _)| code == 503))
    })
    .await?;
    let unready_after = killed.elapsed();
    let (_, body) = http_get(port, "/readyz")?;
    println!("not ready {unready_after:.1?} after the kill: {body}");
    assert!(body.starts_with("degraded: kafka:"), "{body}");
    assert!(
        unready_after < Duration::from_secs(6),
        "readiness took {unready_after:?} to see the broker gone"
    );
    // Let the batch wait on the dead broker, then stop the relay.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pending(&pool).await? > 0, "rows wait for the broker");
    let stopping = Instant::now();
    relay.terminate();
    let code =
        tokio::task::spawn_blocking(move || relay.wait_exit(Duration::from_secs(20))).await??;
    let took = stopping.elapsed();
    println!("stopped {took:.2?} after SIGTERM (--shutdown-timeout 3s)");
    assert_eq!(code, Some(0));
    assert!(
        took <= Duration::from_millis(3300),
        "shutdown took {took:?}, past its 3 s bound"
    );
    assert_eq!(
        pending(&pool).await?,
        50,
        "the rolled-back batch stays pending"
    );
    Ok(())
}
