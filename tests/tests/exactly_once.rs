//! Exactly-once into Kafka (`RelayConfig::exactly_once`) against the real
//! PostgreSQL and broker: a crash between the Kafka commit and the database
//! commit, and an aborted transaction, publish nothing twice for a
//! `read_committed` reader.

use std::{collections::HashSet, time::Duration};

use integration_tests::{
    append_events, brokers, consume, copies, eventually, java_ids, outbox_with_topic, pending,
    unique, RunningRelay,
};
use outbox_core::{append, NewEvent};
use outbox_relay::{PoisonPolicy, RelayConfig};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    ClientConfig, Message,
};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_millis(2000);

/// A relay in exactly-once mode with a short lease (take-overs in ~2 s)
/// and its own checkpoint topic.
fn eo_cfg(checkpoint_topic: &str) -> RelayConfig {
    RelayConfig {
        exactly_once: true,
        checkpoint_topic: checkpoint_topic.to_string(),
        batch_size: 50,
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        ..integration_tests::quick_relay_config()
    }
}

/// Every record of `topic` as a `read_uncommitted` reader sees it, aborted
/// transactions included.
async fn read_uncommitted(topic: &str, at_least: usize) -> anyhow::Result<usize> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("uncommitted"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut n = 0;
    loop {
        let until = if n >= at_least { SETTLE } else { WAIT };
        match tokio::time::timeout(until, consumer.recv()).await {
            Ok(m) => {
                let m = m?;
                if m.payload().is_some() {
                    n += 1;
                }
            }
            Err(_) if n >= at_least => return Ok(n),
            Err(_) => anyhow::bail!("only {n} of {at_least} records arrived on {topic}"),
        }
    }
}

/// The first relay crashes right after its first Kafka commit, before its
/// database commit: its batch is visible in Kafka while its rows are
/// pending again. The relay that takes over (after the lease ran out)
/// fences it, finishes its checkpoint, and publishes the rest: each event
/// exactly once. With the checkpoint out of the taker's sight (another
/// checkpoint topic), the same crash duplicates that batch, which shows the
/// test can fail.
#[sqlx::test(migrations = false)]
async fn a_crash_between_the_kafka_and_database_commits_publishes_nothing_twice(
    pool: PgPool,
) -> anyhow::Result<()> {
    for checkpoint_seen in [true, false] {
        sqlx::query("DELETE FROM outbox_relays")
            .execute(&pool)
            .await
            .ok();
        let topic = outbox_with_topic(&pool, "eo-crash", 3).await?;
        let checkpoints = unique("eo-checkpoints");
        append_events(&pool, &topic, 300, 20).await?;

        RunningRelay::crash_after_first_commit(&pool, eo_cfg(&checkpoints)).await?;
        // Its batch is in Kafka, its claim rolled back.
        assert_eq!(pending(&pool).await?, 300, "the claim rolled back");
        let visible = consume(&topic, 50, WAIT, SETTLE).await?;
        assert_eq!(visible.len(), 50, "the first batch was committed in Kafka");
        if checkpoint_seen {
            // The operator's view: the crashed relay's checkpoint names
            // the batch that is in Kafka but pending in the database.
            let (code, out) = integration_tests::relay_cli(
                &integration_tests::database_url(&pool),
                &[
                    "status",
                    "--json",
                    "--exactly-once",
                    "--kafka-brokers",
                    &brokers(),
                    "--checkpoint-topic",
                    &checkpoints,
                ],
            );
            assert_eq!(code, 0, "{out}");
            let status: serde_json::Value = serde_json::from_str(&out)?;
            let cks = status["checkpoints"].as_object().expect("checkpoints");
            assert_eq!(cks.len(), 1, "{out}");
            let ids: i64 = cks
                .values()
                .flat_map(|ck| ck["ids"].as_array().cloned().unwrap_or_default())
                .map(|r| r[1].as_i64().unwrap_or(0) - r[0].as_i64().unwrap_or(0) + 1)
                .sum();
            assert_eq!(ids, 50, "the checkpoint names the committed batch: {out}");
        }

        let taker_checkpoints = if checkpoint_seen {
            checkpoints.clone()
        } else {
            unique("eo-elsewhere")
        };
        let taker = RunningRelay::start(&pool, eo_cfg(&taker_checkpoints))?;
        eventually(WAIT, "every row published", || async {
            Ok(pending(&pool).await? == 0)
        })
        .await?;
        taker.stop().await?;

        let expected = if checkpoint_seen { 300 } else { 350 };
        let got = consume(&topic, expected, WAIT, SETTLE).await?;
        let per_event = copies(&got);
        assert_eq!(per_event.len(), 300, "every event arrived");
        let twice = per_event.values().filter(|n| **n > 1).count();
        if checkpoint_seen {
            assert_eq!(got.len(), 300, "each event exactly once");
            assert_eq!(twice, 0);
            // A client nobody here wrote agrees: the Java consumer, as
            // read_committed, sees each event once.
            let java = java_ids(&topic, 300, "read_committed")?;
            assert_eq!(java.len(), 300, "the Java consumer read each record once");
            assert_eq!(java.iter().collect::<HashSet<_>>().len(), 300);
        } else {
            assert_eq!(
                twice, 50,
                "without the checkpoint the crashed batch comes twice"
            );
        }
    }
    Ok(())
}

/// A batch holding a record the producer refuses (too large) is aborted as a
/// whole: a `read_uncommitted` reader sees its other records, a
/// `read_committed` reader does not. The refused row moves to failed, and
/// the others are sent again in the next transaction: exactly once each for
/// `read_committed`.
#[sqlx::test(migrations = false)]
async fn an_aborted_transaction_is_invisible_to_read_committed_readers(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "eo-abort", 1).await?;
    for i in 0..40 {
        let size = if i == 30 { 60_000 } else { 10 };
        let e = NewEvent::new("thing", format!("k{i}"), "thing.happened")
            .topic(&topic)
            .json_payload(&serde_json::json!({ "i": i, "pad": "x".repeat(size) }))?;
        append(&pool, &e).await?;
    }
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            poison_policy: PoisonPolicy::SkipRow,
            // The large record fails in the producer, after the others of
            // its transaction were sent.
            kafka_properties: [("message.max.bytes".to_string(), "50000".to_string())].into(),
            ..eo_cfg(&unique("eo-checkpoints"))
        },
    )?;
    eventually(WAIT, "every row settled", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'failed'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(failed, 1, "the refused row moved to failed");

    let got = consume(&topic, 39, WAIT, SETTLE).await?;
    assert_eq!(got.len(), 39, "read_committed: each event once");
    assert_eq!(copies(&got).len(), 39);
    let all = read_uncommitted(&topic, 39 + 39).await?;
    assert_eq!(
        all, 78,
        "read_uncommitted also sees the aborted first attempt"
    );
    // The Java client agrees on both.
    assert_eq!(java_ids(&topic, 39, "read_committed")?.len(), 39);
    assert_eq!(java_ids(&topic, 78, "read_uncommitted")?.len(), 78);
    Ok(())
}

/// The relay refuses nonsense before it starts: a transaction timeout
/// shorter than the publish timeout.
#[test]
fn a_transaction_timeout_below_the_publish_timeout_is_refused() {
    let cfg = RelayConfig {
        exactly_once: true,
        transaction_timeout: Duration::from_secs(5),
        ..RelayConfig::default()
    };
    let err = cfg.validate().expect_err("refused").to_string();
    assert!(err.contains("transaction timeout"), "{err}");
}
