//! Interop with clients nobody on this project wrote: Apache kafka-clients
//! and the CloudEvents Java SDK's Kafka binding (`tests/interop/`, run with
//! Java's source launcher on the classpath `./dev test` resolves), and
//! Kafka's own console consumer.
//!
//! - The SDK parses every record the relay wrote as a CloudEvent whose
//!   attributes match the outbox row. A record it rejects is a defect in our
//!   headers, not in the test.
//! - consumer-kit applies events the SDK produced.
//! - The relay and the Java producer's default partitioner put a key on the
//!   same partition.

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use anyhow::Context;
use integration_tests::{
    brokers, consume,
    consumer::{consumer_cfg, consumer_db, effect_counts, start_consumer, Effects},
    eventually, java_interop, outbox_with_topic, publish_pending, unique,
};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

#[derive(sqlx::FromRow)]
struct Row {
    event_id: uuid::Uuid,
    event_type: String,
    aggregate_type: String,
    aggregate_id: String,
    event_version: i32,
    source: Option<String>,
    correlation_id: Option<String>,
    occurred_at: chrono::DateTime<chrono::Utc>,
    payload: serde_json::Value,
}

#[sqlx::test(migrations = false)]
async fn the_cloudevents_sdk_reads_every_relay_record_as_the_outbox_row_says(
    pool: PgPool,
) -> anyhow::Result<()> {
    const N: i64 = 60;
    let topic = outbox_with_topic(&pool, "interop-ce", 3).await?;
    // Plain SQL, as a service in any language writes it: some rows with a
    // source, a correlation id, a schema version, nested and unicode JSON.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version, \
                             topic, payload, source, correlation_id, occurred_at) \
         SELECT gen_random_uuid(), 'order', 'order-' || (g % 7), 'order.placed', 1 + g % 3, $1, \
                jsonb_build_object('seq', g, 'note', 'café ☕', 'lines', jsonb_build_array(g, g * 2)), \
                CASE WHEN g % 2 = 0 THEN 'urn:shop:orders' END, \
                CASE WHEN g % 3 = 0 THEN 'corr-' || g END, \
                now() - make_interval(secs => g) \
         FROM generate_series(1, $2) g ORDER BY g",
    )
    .bind(&topic)
    .bind(N)
    .execute(&pool)
    .await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, event_type, aggregate_type, aggregate_id, event_version, source, \
                correlation_id, occurred_at, payload FROM outbox",
    )
    .fetch_all(&pool)
    .await?;
    publish_pending(&pool).await?;

    let lines = java_interop(&["read", &brokers(), &topic, &N.to_string()])?;
    assert_eq!(lines.len(), N as usize, "{lines:?}");
    let by_id: HashMap<String, serde_json::Value> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("Interop prints JSON");
            (v["id"].as_str().unwrap_or_default().to_string(), v)
        })
        .collect();
    for row in &rows {
        let ev = by_id
            .get(&row.event_id.to_string())
            .with_context(|| format!("event {} not read by the SDK", row.event_id))?;
        assert_eq!(ev["specversion"], "1.0");
        assert_eq!(ev["type"], row.event_type.as_str());
        assert_eq!(
            ev["source"],
            row.source.as_deref().unwrap_or("outbox-relay"),
            "{ev}"
        );
        assert_eq!(ev["subject"], row.aggregate_id.as_str());
        assert_eq!(ev["key"], row.aggregate_id.as_str());
        assert_eq!(ev["datacontenttype"], "application/json");
        let time: chrono::DateTime<chrono::Utc> = ev["time"]
            .as_str()
            .context("time")?
            .parse()
            .with_context(|| format!("SDK time {}", ev["time"]))?;
        assert_eq!(time, row.occurred_at, "{ev}");
        let data: serde_json::Value = serde_json::from_str(ev["data"].as_str().context("data")?)?;
        assert_eq!(data, row.payload);
        let ext = &ev["extensions"];
        assert_eq!(ext["aggregatetype"], row.aggregate_type.as_str(), "{ev}");
        assert_eq!(ext["eventversion"], row.event_version.to_string(), "{ev}");
        match &row.correlation_id {
            Some(c) => assert_eq!(ext["correlationid"], c.as_str(), "{ev}"),
            None => assert!(ext.get("correlationid").is_none(), "{ev}"),
        }
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn consumer_kit_applies_events_the_java_sdk_produced(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("interop-java");
    integration_tests::create_topic(&topic, 3).await?;
    let ids = java_interop(&["write", &brokers(), &topic, "40", "item.added"])?;
    assert_eq!(ids.len(), 40);
    let group = unique("g");
    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "40 Java events applied", || async {
        Ok(stats.snapshot().processed == 40)
    })
    .await?;
    c.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (40, 40));
    let applied: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM effects")
        .fetch_all(&pool)
        .await?;
    let mut applied: Vec<String> = applied.iter().map(ToString::to_string).collect();
    let mut ids = ids;
    applied.sort();
    ids.sort();
    assert_eq!(applied, ids, "the ids the SDK wrote are the ones applied");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn the_relay_and_the_java_client_put_each_key_on_the_same_partition(
    pool: PgPool,
) -> anyhow::Result<()> {
    const KEYS: i64 = 200;
    let topic = outbox_with_topic(&pool, "interop-part", 6).await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'order', 'order-' || g, 'order.placed', $1, '{}' \
         FROM generate_series(1, $2) g",
    )
    .bind(&topic)
    .bind(KEYS)
    .execute(&pool)
    .await?;
    publish_pending(&pool).await?;
    let got = consume(&topic, KEYS as usize, WAIT, Duration::from_millis(500)).await?;
    let relay_side: HashMap<String, i32> = got
        .iter()
        .map(|r| (r.key.clone().unwrap_or_default(), r.partition))
        .collect();
    let keys: Vec<String> = (1..=KEYS).map(|g| format!("order-{g}")).collect();
    let bootstrap = brokers();
    let mut args = vec!["partitions", bootstrap.as_str(), topic.as_str()];
    args.extend(keys.iter().map(String::as_str));
    let java_side: HashMap<String, i32> = java_interop(&args)?
        .iter()
        .map(|l| {
            let (k, p) = l.split_once('\t').expect("key<TAB>partition");
            (k.to_string(), p.parse().expect("partition"))
        })
        .collect();
    let used: std::collections::BTreeSet<i32> = java_side.values().copied().collect();
    assert_eq!(used.len(), 6, "200 keys spread over all 6 partitions");
    for key in &keys {
        assert_eq!(relay_side.get(key), java_side.get(key), "key {key}");
    }
    Ok(())
}

/// Kafka's own console consumer (through `./dev kafka`) prints the relay's
/// records with their headers.
#[sqlx::test(migrations = false)]
async fn kafkas_console_consumer_prints_the_relay_records_with_their_headers(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "interop-console", 2).await?;
    let ids = integration_tests::append_events(&pool, &topic, 5, 2).await?;
    publish_pending(&pool).await?;
    let dev = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dev");
    let out = Command::new("bash")
        .arg(dev)
        .args([
            "kafka",
            "console-consumer",
            "--bootstrap-server",
            &brokers(),
        ])
        .args(["--topic", &topic, "--from-beginning", "--max-messages", "5"])
        .args(["--timeout-ms", "30000"])
        .args([
            "--property",
            "print.headers=true",
            "--property",
            "print.key=true",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 5, "{text}");
    for id in ids {
        assert!(
            text.contains(&format!("ce_id:{id}")),
            "no ce_id:{id} in\n{text}"
        );
    }
    assert!(text.contains("ce_specversion:1.0"), "{text}");
    assert!(text.contains("ce_type:thing.happened"), "{text}");
    assert!(text.contains("\"seq\""), "{text}");
    Ok(())
}
