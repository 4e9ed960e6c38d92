//! A broker outage costs an operator a few log lines a second, not dozens:
//! librdkafka's repeated errors are said once, repeats are summarised
//! ("… repeated N times in the last 10 s"), and a failure is not printed
//! twice (as a log line and again as a global error). Checked on the relay
//! binary and on a consumer-kit process, side by side, through one outage.

use std::time::Duration;

use integration_tests::{
    consumer::{consumer_db, effect_counts},
    create_topic_on, database_url, eventually, free_port, insert_sql_rows, pending, spawn_relay,
    unique, PrivateBroker,
};
use sqlx::PgPool;

/// Long enough that a repeat lands past the 10 s window (whose summary the
/// test asserts) however librdkafka's reconnect backoff (at most 10 s, with
/// jitter) falls: with 15 s a run saw no repeat between 10 and 15 s.
const OUTAGE: Duration = Duration::from_secs(25);

fn lines_since(path: &std::path::Path, offset: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(offset..)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[sqlx::test(migrations = false)]
async fn a_broker_outage_logs_a_few_lines_a_second_in_the_relay_and_the_consumer(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    consumer_db(&pool).await?;
    let mut broker = tokio::task::spawn_blocking(PrivateBroker::start).await??;
    let topic = unique("floods");
    create_topic_on(&broker.address, &topic, 2).await?;

    let name = unique("floods-relay");
    let relay_log = std::env::temp_dir().join(format!("{name}.log"));
    let port = free_port().to_string();
    let relay = spawn_relay(
        &pool,
        &name,
        &[
            "--kafka-brokers",
            &broker.address,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    let consumer_log = std::env::temp_dir().join(format!("{}.log", unique("floods-consumer")));
    let log = std::fs::File::create(&consumer_log)?;
    let consumer = integration_tests::Child::from(
        std::process::Command::new(env!("CARGO_BIN_EXE_consumer-fixture"))
            .env("DATABASE_URL", database_url(&pool))
            .env("KAFKA_BROKERS", &broker.address)
            .env("TOPIC", &topic)
            .env("GROUP", unique("g"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    // Both at work before the outage: rows published and applied.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'item', 'k' || (g % 5), 'item.added', $1, jsonb_build_object('seq', g) \
         FROM generate_series(1, 50) g ORDER BY g",
    )
    .bind(&topic)
    .execute(&pool)
    .await?;
    eventually(Duration::from_secs(60), "50 events applied", || async {
        Ok(effect_counts(&pool).await?.1 == 50)
    })
    .await?;

    let at = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
    let (relay_from, consumer_from) = (at(&relay_log), at(&consumer_log));
    broker.kill();
    // Rows keep coming during the outage, so the relay keeps trying.
    insert_sql_rows(&pool, &topic, 200, 10).await?;
    tokio::time::sleep(OUTAGE).await;
    let relay_lines = lines_since(&relay_log, relay_from);
    let consumer_lines = lines_since(&consumer_log, consumer_from);
    let _broker = tokio::task::spawn_blocking(move || broker.restart().map(|()| broker)).await??;
    eventually(Duration::from_secs(60), "backlog published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.terminate();
    consumer.terminate();

    let secs = OUTAGE.as_secs_f64();
    for (who, lines) in [("relay", &relay_lines), ("consumer", &consumer_lines)] {
        println!(
            "{who}: {} lines in {secs} s of outage ({:.1}/s)",
            lines.len(),
            lines.len() as f64 / secs
        );
        assert!(
            lines.len() as f64 <= 3.0 * secs,
            "{who} logged {} lines in {secs} s:\n{}",
            lines.len(),
            lines.join("\n")
        );
        // rdkafka's default context repeated every failed connection as
        // "librdkafka: Global error: …" after librdkafka's own line.
        assert!(
            !lines.iter().any(|l| l.contains("librdkafka: Global error")),
            "{who} printed a failure twice:\n{}",
            lines.join("\n")
        );
    }
    // Past the 10 s window, repeats are summarised with their count.
    let summaries = relay_lines
        .iter()
        .chain(&consumer_lines)
        .filter(|l| l.contains("times in the last 10 s)"))
        .count();
    assert!(
        summaries > 0,
        "no summary of repeats:\n{}\n{}",
        relay_lines.join("\n"),
        consumer_lines.join("\n")
    );
    Ok(())
}
