//! consumer-kit against the real PostgreSQL and broker.

use std::{sync::atomic::Ordering, time::Duration};

use consumer_kit::{dedupe, replay, ConsumerError, DeadLetterFilter, UnknownEventType};
use integration_tests::{
    consume,
    consumer::{
        consumer_cfg, consumer_db, effect_counts, event, events, produce, reset_group_offsets,
        start_consumer, Effects, TestRecord,
    },
    create_topic, eventually, unique,
};
use outbox_core::headers as h;
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn topic(prefix: &str, partitions: i32) -> anyhow::Result<String> {
    let t = unique(prefix);
    create_topic(&t, partitions).await?;
    Ok(t)
}

async fn processed_rows(pool: &PgPool, group: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE consumer_group = $1")
            .bind(group)
            .fetch_one(pool)
            .await?,
    )
}

#[sqlx::test(migrations = false)]
async fn a_duplicate_delivery_and_a_whole_replay_change_state_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-dup", 3).await?;
    let group = unique("g");
    let (mut records, _) = events(200, 20, "item.added");
    // The same event delivered twice (as a relay crash would).
    records.push(records[7].clone());
    produce(&topic, &records).await?;

    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "201 records settled", || async {
        let s = stats.snapshot();
        Ok(s.processed + s.duplicates == 201)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!((s.processed, s.duplicates), (200, 1));
    assert_eq!(effect_counts(&pool).await?, (200, 200));

    // Replay the whole topic from offset 0 for the same group.
    reset_group_offsets(&group, &topic, 3, 0).await?;
    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "the replay settled", || async {
        Ok(stats.snapshot().duplicates == 201)
    })
    .await?;
    c.stop().await?;
    assert_eq!(stats.snapshot().processed, 0, "a replay applies nothing");
    assert_eq!(effect_counts(&pool).await?, (200, 200));
    assert_eq!(processed_rows(&pool, &group).await?, 200);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn offsets_are_committed_on_shutdown(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-commit", 2).await?;
    let group = unique("g");
    produce(&topic, &events(50, 5, "item.added").0).await?;
    // No periodic commit within the test: only the shutdown commit counts.
    let cfg = || consumer_kit::ConsumerConfig {
        commit_interval: Duration::from_secs(3600),
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg(), "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "50 processed", || async {
        Ok(stats.snapshot().processed == 50)
    })
    .await?;
    c.stop().await?;

    let c = start_consumer(&pool, cfg(), "item.added", Effects::default())?;
    let stats = c.stats();
    produce(&topic, &events(10, 5, "item.added").0).await?;
    eventually(WAIT, "10 new processed", || async {
        Ok(stats.snapshot().processed == 10)
    })
    .await?;
    c.stop().await?;
    assert_eq!(
        stats.snapshot().duplicates,
        0,
        "nothing before the shutdown was redelivered"
    );
    assert_eq!(effect_counts(&pool).await?, (60, 60));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_retryable_error_then_success_applies_once(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-retry", 1).await?;
    let group = unique("g");
    let id = Uuid::new_v4();
    produce(
        &topic,
        &[event(
            "k",
            id,
            "item.added",
            serde_json::json!({ "seq": 1, "fail_times": 2 }),
        )],
    )
    .await?;
    let handler = Effects::default();
    let calls = handler.calls.clone();
    let c = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", handler)?;
    let stats = c.stats();
    eventually(WAIT, "processed", || async {
        Ok(stats.snapshot().processed == 1)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!(calls.lock().unwrap()[&id], 3, "two failures, then success");
    assert_eq!((s.retries, s.dead_lettered), (2, 0));
    assert_eq!(
        effect_counts(&pool).await?,
        (1, 1),
        "failed tries were rolled back"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn poison_and_exhausted_messages_land_in_the_dead_letter_topic_while_later_ones_flow(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-dlq", 1).await?;
    let group = unique("g");
    let good: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let poison = Uuid::new_v4();
    let flaky = Uuid::new_v4();
    let not_json = Uuid::new_v4();
    let unknown = Uuid::new_v4();
    let mut no_id = event(
        "k",
        Uuid::new_v4(),
        "item.added",
        serde_json::json!({ "seq": 0 }),
    );
    no_id.headers.retain(|(k, _)| k != h::CE_ID);
    let mut bad_value = event("k", not_json, "item.added", serde_json::json!({}));
    bad_value.value = Some(b"{not json".to_vec());
    let records: Vec<TestRecord> = vec![
        event("k", good[0], "item.added", serde_json::json!({ "seq": 0 })),
        event(
            "k",
            poison,
            "item.added",
            serde_json::json!({ "seq": 1, "poison": true }),
        ),
        event(
            "k",
            flaky,
            "item.added",
            serde_json::json!({ "seq": 2, "fail_times": u32::MAX }),
        ),
        bad_value,
        no_id,
        event(
            "k",
            unknown,
            "item.unknown",
            serde_json::json!({ "seq": 5 }),
        ),
        event("k", good[1], "item.added", serde_json::json!({ "seq": 6 })),
        event("k", good[2], "item.added", serde_json::json!({ "seq": 7 })),
        event("k", good[3], "item.added", serde_json::json!({ "seq": 8 })),
        event("k", good[4], "item.added", serde_json::json!({ "seq": 9 })),
    ];
    produce(&topic, &records).await?;
    // Skip: this test is about what lands in the dead-letter topic, one key
    // throughout; park-key would hold the key's later events
    // (tests/tests/consumer_order.rs).
    let cfg = consumer_kit::ConsumerConfig {
        ordering: consumer_kit::Ordering::Skip,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "all settled", || async {
        let s = stats.snapshot();
        Ok(s.processed + s.dead_lettered == 10)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!((s.processed, s.dead_lettered, s.retries), (5, 5, 2));
    let applied: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM effects ORDER BY seq")
        .fetch_all(&pool)
        .await?;
    assert_eq!(
        applied, good,
        "good events applied once, in order, past the bad ones"
    );

    let dlq = consume(&format!("{topic}.dlq"), 5, WAIT, Duration::from_secs(1)).await?;
    assert_eq!(dlq.len(), 5);
    let kinds: Vec<(&str, &str, &str)> = dlq
        .iter()
        .map(|r| {
            (
                r.header("dlq_kind").unwrap(),
                r.header("dlq_attempts").unwrap(),
                r.header("dlq_original_offset").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("permanent", "1", "1"),
            ("retries_exhausted", "3", "2"),
            ("undecodable", "0", "3"),
            ("undecodable", "0", "4"),
            ("unknown_event_type", "0", "5"),
        ]
    );
    for (r, original) in dlq.iter().zip(&records[1..6]) {
        assert_eq!(r.key.as_deref(), Some("k"), "original key kept");
        assert_eq!(r.value, original.value, "original value kept");
        assert_eq!(r.header("tenant"), Some("acme"), "original headers kept");
        assert_eq!(r.header("dlq_original_topic"), Some(topic.as_str()));
        assert_eq!(r.header("dlq_original_partition"), Some("0"));
        assert_eq!(r.header("dlq_consumer_group"), Some(group.as_str()));
        assert!(r.header("dlq_time").is_some_and(|t| t.ends_with('Z')));
        assert!(!r.header("dlq_reason").unwrap_or_default().is_empty());
    }
    assert!(dlq[0]
        .header("dlq_reason")
        .unwrap()
        .contains("seq 1 is poisoned"));
    assert!(dlq[3]
        .header("dlq_reason")
        .unwrap()
        .contains("ce_id is missing"));
    assert!(dlq[4]
        .header("dlq_reason")
        .unwrap()
        .contains("item.unknown"));
    assert_eq!(dlq[0].header(h::CE_ID), Some(poison.to_string().as_str()));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn unknown_event_types_can_be_skipped(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-skip", 1).await?;
    let group = unique("g");
    produce(
        &topic,
        &[
            event(
                "k",
                Uuid::new_v4(),
                "other.thing",
                serde_json::json!({ "seq": 0 }),
            ),
            event(
                "k",
                Uuid::new_v4(),
                "item.added",
                serde_json::json!({ "seq": 1 }),
            ),
        ],
    )
    .await?;
    let cfg = consumer_kit::ConsumerConfig {
        unknown_event_type: UnknownEventType::Skip,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "settled", || async {
        let s = stats.snapshot();
        Ok(s.processed + s.skipped == 2)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!((s.processed, s.skipped, s.dead_lettered), (1, 1, 0));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_failing_dead_letter_publish_holds_the_message_until_it_succeeds(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-dlqdown", 2).await?;
    let group = unique("g");
    let poison = Uuid::new_v4();
    let on_partition = |mut r: TestRecord, p| {
        r.partition = Some(p);
        r
    };
    produce(
        &topic,
        &[
            on_partition(
                event(
                    "k",
                    poison,
                    "item.added",
                    serde_json::json!({ "seq": 0, "poison": true }),
                ),
                0,
            ),
            on_partition(
                event(
                    "k",
                    Uuid::new_v4(),
                    "item.added",
                    serde_json::json!({ "seq": 1 }),
                ),
                0,
            ),
            on_partition(
                event(
                    "j",
                    Uuid::new_v4(),
                    "item.added",
                    serde_json::json!({ "seq": 2 }),
                ),
                1,
            ),
        ],
    )
    .await?;
    // The dead-letter topic does not exist and is not created. (Skip: the
    // poison's key-mate must flow once it is dead-lettered; park-key would
    // park it.)
    let cfg = consumer_kit::ConsumerConfig {
        create_dead_letter_topics: false,
        dead_letter_timeout: Duration::from_secs(1),
        ordering: consumer_kit::Ordering::Skip,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "the other partition flows", || async {
        Ok(stats.snapshot().processed == 1)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = stats.snapshot();
    assert_eq!(
        (s.processed, s.dead_lettered),
        (1, 0),
        "the poison message is held, and the next one of its partition waits behind it"
    );
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM effects")
        .fetch_all(&pool)
        .await?;
    assert_eq!(
        seqs,
        vec![2],
        "only the other partition's event was applied"
    );
    create_topic(&format!("{topic}.dlq"), 2).await?;
    eventually(WAIT, "dead-lettered, then the next one applied", || async {
        let s = stats.snapshot();
        Ok(s.dead_lettered == 1 && s.processed == 2)
    })
    .await?;
    c.stop().await?;
    let dlq = consume(&format!("{topic}.dlq"), 1, WAIT, Duration::from_millis(500)).await?;
    assert_eq!(dlq[0].header(h::CE_ID), Some(poison.to_string().as_str()));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_fixed_event_replayed_from_the_dead_letter_topic_applies_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-replay", 2).await?;
    let group = unique("g");
    let poison = Uuid::new_v4();
    let other_poison = Uuid::new_v4();
    produce(
        &topic,
        &[
            event(
                "a",
                poison,
                "item.added",
                serde_json::json!({ "seq": 1, "poison": true }),
            ),
            event(
                "b",
                other_poison,
                "item.other",
                serde_json::json!({ "seq": 2 }),
            ),
        ],
    )
    .await?;
    let handler = Effects::default();
    let fixed = handler.fixed.clone();
    let c = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", handler)?;
    let stats = c.stats();
    eventually(WAIT, "both dead-lettered", || async {
        Ok(stats.snapshot().dead_lettered == 2)
    })
    .await?;
    assert_eq!(effect_counts(&pool).await?, (0, 0));

    // The operator lists the dead letters, fixes the handler, and replays
    // only the event type that is fixed.
    let dlq_topic = format!("{topic}.dlq");
    let brokers = integration_tests::brokers();
    let all = replay::read(
        &brokers,
        &Default::default(),
        &dlq_topic,
        &DeadLetterFilter::default(),
    )
    .await?;
    assert_eq!(all.len(), 2);
    let filter = DeadLetterFilter {
        event_type: Some("item.added".into()),
        ..Default::default()
    };
    let chosen = replay::read(&brokers, &Default::default(), &dlq_topic, &filter).await?;
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].event_id, Some(poison));
    assert_eq!(chosen[0].kind.as_deref(), Some("permanent"));
    assert_eq!(chosen[0].original_topic.as_deref(), Some(topic.as_str()));
    assert!(chosen[0]
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("dlq_")));
    fixed.store(true, Ordering::SeqCst);
    let report = replay::replay(&brokers, &Default::default(), &chosen).await?;
    assert_eq!(report.replayed, 1);
    eventually(WAIT, "the replayed event applied", || async {
        Ok(stats.snapshot().processed == 1)
    })
    .await?;
    // Replaying it again is harmless: it dedupes.
    replay::replay(&brokers, &Default::default(), &chosen).await?;
    eventually(WAIT, "the second replay deduped", || async {
        Ok(stats.snapshot().duplicates == 1)
    })
    .await?;
    c.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (1, 1));
    assert!(dedupe::is_processed(&pool, &group, poison).await?);
    assert!(!dedupe::is_processed(&pool, &group, other_poison).await?);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn two_members_split_the_partitions_and_rebalances_cause_no_double_effect(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-rebalance", 4).await?;
    let group = unique("g");
    let n = 3000;
    // Many records per batch: members resume partitions mid-batch.
    produce(&topic, &events(n, 200, "item.added").0).await?;
    let slow = |member: &str| Effects {
        member: member.into(),
        sleep: Duration::from_millis(2),
        ..Effects::default()
    };
    let a = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", slow("a"))?;
    let a_stats = a.stats();
    eventually(WAIT, "a is under way", || async {
        Ok(a_stats.snapshot().processed >= 300)
    })
    .await?;
    // B joins mid-stream: a rebalance.
    let b = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", slow("b"))?;
    let b_stats = b.stats();
    eventually(WAIT, "b takes partitions", || async {
        Ok(b_stats.snapshot().processed >= 200)
    })
    .await?;
    // A leaves mid-stream: another rebalance.
    a.stop().await?;
    eventually(Duration::from_secs(120), "everything applied", || async {
        Ok(effect_counts(&pool).await?.1 == n as i64)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.stop().await?;
    let (a_s, b_s) = (a_stats.snapshot(), b_stats.snapshot());
    assert!(
        a_s.processed > 0 && b_s.processed > 0,
        "both members worked: {a_s:?} {b_s:?}"
    );
    assert_eq!(
        a_s.processed + b_s.processed,
        n as u64,
        "each event applied by exactly one member"
    );
    assert_eq!(
        effect_counts(&pool).await?,
        (n as i64, n as i64),
        "no double effect"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_crash_after_the_database_commit_and_before_the_offset_commit_causes_no_double_effect(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-crash", 2).await?;
    let group = unique("g");
    let n = 1000;
    produce(&topic, &events(n, 50, "item.added").0).await?;
    // A consumer process that commits offsets only every hour, killed -9
    // mid-stream: everything it applied is committed in PostgreSQL and
    // not in Kafka.
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{group}.log")))?;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_consumer-fixture"))
        .env("DATABASE_URL", integration_tests::database_url(&pool))
        .env("KAFKA_BROKERS", integration_tests::brokers())
        .env("TOPIC", &topic)
        .env("GROUP", &group)
        .env("COMMIT_INTERVAL_MS", "3600000")
        .env("SLEEP_MS", "2")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut child = integration_tests::Child::from(child);
    eventually(WAIT, "the process applied 300", || async {
        Ok(effect_counts(&pool).await?.0 >= 300)
    })
    .await?;
    child.kill()?; // SIGKILL
    let applied_before = effect_counts(&pool).await?.0;
    assert!(applied_before < n as i64, "killed mid-stream");

    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "everything applied", || async {
        Ok(effect_counts(&pool).await?.1 == n as i64)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert!(
        s.duplicates >= applied_before as u64,
        "what the killed process applied was redelivered ({} duplicates, {applied_before} applied before)",
        s.duplicates
    );
    assert_eq!(
        effect_counts(&pool).await?,
        (n as i64, n as i64),
        "no double effect"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn cleanup_removes_only_expired_rows_of_its_group(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let group = unique("g");
    // 35 expired and 5 fresh rows of this group, 7 expired rows of another.
    sqlx::query(
        "INSERT INTO processed_events (consumer_group, event_id, processed_at) \
         SELECT $1, gen_random_uuid(), now() - interval '2 days' - g * interval '1 minute' FROM generate_series(1, 35) g \
         UNION ALL SELECT $1, gen_random_uuid(), now() - interval '1 hour' FROM generate_series(1, 5) \
         UNION ALL SELECT 'other', gen_random_uuid(), now() - interval '9 days' FROM generate_series(1, 7)",
    )
    .bind(&group)
    .execute(&pool)
    .await?;
    let ttl = Duration::from_secs(24 * 3600);
    assert_eq!(
        dedupe::delete_expired_batch(&pool, &group, ttl, 10).await?,
        10,
        "one bounded batch"
    );
    assert_eq!(
        dedupe::delete_expired(&pool, &group, ttl, 10).await?,
        25,
        "the rest, in batches"
    );
    assert_eq!(processed_rows(&pool, &group).await?, 5, "fresh rows stay");
    assert_eq!(
        processed_rows(&pool, "other").await?,
        7,
        "other groups are not touched"
    );

    // The consumer's background task does the same.
    sqlx::query(
        "INSERT INTO processed_events (consumer_group, event_id, processed_at) \
         SELECT $1, gen_random_uuid(), now() - interval '3 days' FROM generate_series(1, 12)",
    )
    .bind(&group)
    .execute(&pool)
    .await?;
    let topic = topic("ck-cleanup", 1).await?;
    let cfg = consumer_kit::ConsumerConfig {
        processed_ttl: ttl,
        cleanup_interval: Some(Duration::from_millis(200)),
        cleanup_batch_size: 5,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    eventually(WAIT, "background cleanup", || async {
        Ok(processed_rows(&pool, &group).await? == 5)
    })
    .await?;
    c.stop().await?;
    assert_eq!(processed_rows(&pool, "other").await?, 7);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn start_up_problems_are_clear_errors(pool: PgPool) -> anyhow::Result<()> {
    let topic = topic("ck-startup", 1).await?;
    // No processed_events table yet.
    let c = start_consumer(
        &pool,
        consumer_cfg("g", &topic),
        "item.added",
        Effects::default(),
    )?;
    let err = c.stop().await.unwrap_err().to_string();
    assert!(
        err.contains("processed_events") && err.contains("migrate"),
        "{err}"
    );

    consumer_db(&pool).await?;
    let missing = unique("ck-missing");
    let c = start_consumer(
        &pool,
        consumer_cfg("g", &missing),
        "item.added",
        Effects::default(),
    )?;
    let err = c.stop().await.unwrap_err().to_string();
    assert!(
        err.contains(&missing) && err.contains("does not exist"),
        "{err}"
    );

    let no_handlers =
        consumer_kit::Consumer::builder(consumer_cfg("g", &topic), pool.clone()).build();
    assert!(matches!(no_handlers, Err(ConsumerError::Config(m)) if m.contains("no handlers")));
    let bad = consumer_kit::ConsumerConfig {
        dead_letter_topic: "{topic}".into(),
        ..consumer_cfg("g", &topic)
    };
    let err = consumer_kit::Consumer::builder(bad, pool.clone())
        .handler("x", Effects::default())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("dead_letter_topic"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_retention_check_flags_a_ttl_shorter_than_retention() -> anyhow::Result<()> {
    let topic = topic("ck-retention", 1).await?;
    let brokers = integration_tests::brokers();
    let topics = vec![topic.clone()];
    let short = consumer_kit::cleanup::retention_check(
        &brokers,
        &Default::default(),
        &topics,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(short.len(), 1);
    assert!(!short[0].covered, "{short:?}");
    assert!(short[0].warning(Duration::from_secs(60)).contains(&topic));
    let long = consumer_kit::cleanup::retention_check(
        &brokers,
        &Default::default(),
        &topics,
        Duration::from_secs(3650 * 24 * 3600),
    )
    .await?;
    assert_eq!(long[0].covered, long[0].retention.is_some(), "{long:?}");
    Ok(())
}

fn dlq(args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(integration_tests::dlq_bin())
        .args(args)
        .env("KAFKA_BROKERS", integration_tests::brokers())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[sqlx::test(migrations = false)]
async fn the_outbox_dlq_command_lists_shows_and_replays(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-dlqcli", 1).await?;
    let group = unique("g");
    let poison = Uuid::new_v4();
    let unknown = Uuid::new_v4();
    produce(
        &topic,
        &[
            event(
                "a",
                poison,
                "item.added",
                serde_json::json!({ "seq": 1, "poison": true }),
            ),
            event("b", unknown, "item.other", serde_json::json!({ "seq": 2 })),
        ],
    )
    .await?;
    let handler = Effects::default();
    let fixed = handler.fixed.clone();
    let c = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", handler)?;
    let stats = c.stats();
    eventually(WAIT, "both dead-lettered", || async {
        Ok(stats.snapshot().dead_lettered == 2)
    })
    .await?;
    let dlq_topic = format!("{topic}.dlq");

    let (code, out, _) = dlq(&["list", &dlq_topic, "--json"])?;
    assert_eq!(code, Some(0));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["event_id"], poison.to_string());
    assert_eq!(lines[0]["kind"], "permanent");
    assert_eq!(lines[1]["kind"], "unknown_event_type");

    let (code, out, _) = dlq(&["show", &dlq_topic, "--event-id", &poison.to_string()])?;
    assert_eq!(code, Some(0));
    let shown: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(shown["payload"]["poison"], true);
    assert_eq!(shown["key"], "a");
    assert_eq!(shown["headers"]["tenant"], "acme");

    let (code, _, err) = dlq(&["replay", &dlq_topic])?;
    assert_eq!(code, Some(2), "replay without a filter needs --all");
    assert!(err.contains("--all"), "{err}");
    let (code, out, _) = dlq(&[
        "replay",
        &dlq_topic,
        "--event-type",
        "item.added",
        "--dry-run",
    ])?;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("would replay") && out.contains(&poison.to_string()),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.snapshot().processed, 0, "a dry run sends nothing");

    fixed.store(true, Ordering::SeqCst);
    let (code, _, err) = dlq(&[
        "replay",
        &dlq_topic,
        "--event-type",
        "item.added",
        "--since",
        "1h",
    ])?;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("replayed 1"), "{err}");
    eventually(WAIT, "the replayed event applied", || async {
        Ok(stats.snapshot().processed == 1)
    })
    .await?;
    c.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (1, 1));

    let (code, _, err) = dlq(&["list", &unique("no-such-topic")])?;
    assert_eq!(code, Some(1));
    assert!(err.contains("does not exist"), "{err}");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_handler_slower_than_max_poll_interval_keeps_the_member_in_its_group(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-slow", 2).await?;
    let group = unique("g");
    let on_partition = |mut r: TestRecord, p| {
        r.partition = Some(p);
        r
    };
    let mut records = vec![on_partition(
        event(
            "slow",
            Uuid::new_v4(),
            "item.added",
            serde_json::json!({ "seq": 0, "sleep_ms": 9000 }),
        ),
        0,
    )];
    for i in 1..=20 {
        records.push(on_partition(
            event(
                "fast",
                Uuid::new_v4(),
                "item.added",
                serde_json::json!({ "seq": i }),
            ),
            1,
        ));
    }
    produce(&topic, &records).await?;
    // librdkafka evicts a member that does not poll for max.poll.interval.ms
    // (its minimum is the session timeout, 6 s here); the handler takes 9 s.
    let mut cfg = consumer_cfg(&group, &topic);
    cfg.kafka_properties
        .insert("max.poll.interval.ms".into(), "6000".into());
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "the other partition flows meanwhile", || async {
        Ok(stats.snapshot().processed == 20)
    })
    .await?;
    eventually(WAIT, "the slow event applied", || async {
        Ok(stats.snapshot().processed == 21)
    })
    .await?;
    // An evicted member would lose its partitions, and the slow record would
    // come back: give that a chance to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!(
        (s.processed, s.duplicates),
        (21, 0),
        "no redelivery: the member never left"
    );
    assert_eq!(effect_counts(&pool).await?, (21, 21));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn database_connections_killed_mid_stream_lose_and_double_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-pgkill", 3).await?;
    let group = unique("g");
    let n = 1500;
    produce(&topic, &events(n, 100, "item.added").0).await?;
    let handler = Effects {
        sleep: Duration::from_millis(1),
        ..Effects::default()
    };
    let c = start_consumer(&pool, consumer_cfg(&group, &topic), "item.added", handler)?;
    let stats = c.stats();
    // Terminate every other backend of this database, five times, while the
    // consumer works: transactions die at any statement, commits included.
    for round in 1..=5_i64 {
        eventually(WAIT, "progress between kills", || async {
            Ok(effect_counts(&pool).await?.0 >= round * 150)
        })
        .await?;
        let n: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&pool)
        .await?;
        assert!(!n.is_empty(), "the consumer had connections to kill");
    }
    eventually(Duration::from_secs(120), "everything applied", || async {
        Ok(effect_counts(&pool).await?.1 == n as i64)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.stop().await?;
    assert_eq!(
        effect_counts(&pool).await?,
        (n as i64, n as i64),
        "no loss, no double effect"
    );
    assert_eq!(
        stats.snapshot().processed + stats.snapshot().duplicates,
        n as u64
    );
    Ok(())
}

/// A flapping database under a healthy, slow handler: connections are
/// killed again and again while handlers wait before their own statement,
/// so those statements fail on a dead connection. Outages are not handler
/// failures: nothing is dead-lettered, no handler try is spent on them, and
/// every event is applied once.
#[sqlx::test(migrations = false)]
async fn a_flapping_database_never_spends_a_healthy_handlers_tries(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-flap", 3).await?;
    let group = unique("g");
    let n = 40;
    produce(&topic, &events(n, 10, "item.added").0).await?;
    let handler = Effects {
        pause_before: Duration::from_millis(150),
        ..Effects::default()
    };
    let cfg = consumer_kit::ConsumerConfig {
        max_attempts: 2,
        ..consumer_cfg(&group, &topic)
    };
    let calls = handler.calls.clone();
    let c = start_consumer(&pool, cfg, "item.added", handler)?;
    let stats = c.stats();
    eventually(WAIT, "handlers at work", || async {
        Ok(!calls.lock().unwrap().is_empty())
    })
    .await?;
    // Kill the consumer's connections every 100 ms for 4 s.
    let mut killed = 0;
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        killed += integration_tests::kill_connections_except_mine(&pool).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed >= 5,
        "the consumer's connections were killed ({killed})"
    );
    eventually(Duration::from_secs(60), "everything applied", || async {
        Ok(effect_counts(&pool).await?.1 == n as i64)
    })
    .await?;
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!(
        s.dead_lettered, 0,
        "an outage dead-lettered a healthy event"
    );
    assert_eq!(s.retries, 0, "an outage spent a handler try");
    assert_eq!(effect_counts(&pool).await?, (n as i64, n as i64));
    Ok(())
}

/// Recovery does not wait on backoff: after a database outage long enough
/// to grow the backoff well past a second, work resumes within about a
/// second of the database's return (each try during an outage is a probe,
/// at least once a second).
#[sqlx::test(migrations = false)]
async fn work_resumes_within_about_a_second_of_the_databases_return(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-resume", 1).await?;
    let group = unique("g");
    let (records, _) = events(10, 5, "item.added");
    produce(&topic, &records[..5]).await?;
    // Backoff from 4 s: without probing, the wait after a 12 s outage is
    // several seconds.
    let cfg = consumer_kit::ConsumerConfig {
        min_backoff: Duration::from_secs(4),
        max_backoff: Duration::from_secs(30),
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    eventually(WAIT, "the first five applied", || async {
        Ok(effect_counts(&pool).await?.1 == 5)
    })
    .await?;

    // The outage: this database refuses connections, and the open ones end.
    let outage = integration_tests::DatabaseOutage::start(&pool).await?;
    produce(&topic, &records[5..]).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    outage.end().await?;
    let back = std::time::Instant::now();
    eventually(Duration::from_secs(60), "the rest applied", || async {
        Ok(effect_counts(&pool).await?.1 == 10)
    })
    .await?;
    let took = back.elapsed();
    c.stop().await?;
    println!("resumed {took:?} after the database returned");
    assert!(
        took < Duration::from_millis(2500),
        "work resumed only {took:?} after the database returned"
    );
    assert_eq!(effect_counts(&pool).await?, (10, 10));
    Ok(())
}

/// Shutdown keeps its word: a handler still running at `drain_timeout` is
/// abandoned, `stop()` returns with the consumer out of its group, the
/// abandoned message's effect and offset are never committed (not even when
/// its handler would have finished), and a restart applies it once.
#[sqlx::test(migrations = false)]
async fn shutdown_abandons_a_handler_past_the_drain_and_leaves_the_group(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-drain", 1).await?;
    let group = unique("g");
    let id = uuid::Uuid::new_v4();
    produce(
        &topic,
        &[integration_tests::consumer::event(
            "k",
            id,
            "item.added",
            serde_json::json!({ "seq": 1, "sleep_ms": 6000 }),
        )],
    )
    .await?;
    let cfg = || consumer_kit::ConsumerConfig {
        drain_timeout: Duration::from_secs(1),
        ..consumer_cfg(&group, &topic)
    };
    let handler = Effects::default();
    let calls = handler.calls.clone();
    let c = start_consumer(&pool, cfg(), "item.added", handler)?;
    eventually(WAIT, "the handler started", || async {
        Ok(!calls.lock().unwrap().is_empty())
    })
    .await?;
    let asked = std::time::Instant::now();
    c.stop().await?;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
    assert_eq!(
        integration_tests::consumer::group_members(&group)?,
        0,
        "stop() returned with the consumer still in its group"
    );
    // Past the time the handler would have finished: nothing committed.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        effect_counts(&pool).await?,
        (0, 0),
        "the abandoned effect committed"
    );
    // A restart applies it, once.
    let c = start_consumer(&pool, cfg(), "item.added", Effects::default())?;
    eventually(
        Duration::from_secs(60),
        "applied after the restart",
        || async { Ok(effect_counts(&pool).await?.1 == 1) },
    )
    .await?;
    c.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (1, 1));
    Ok(())
}

/// Ready messages of a partition are settled in one transaction each batch
/// (far fewer commits than events), and a handler failure inside a batch
/// stays with its own message: the flaky one is retried once, the poison one
/// dead-lettered, every other applied once.
#[sqlx::test(migrations = false)]
async fn ready_messages_commit_together_and_a_failure_stays_with_its_message(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-batch", 1).await?;
    let group = unique("g");
    // Two batches of 64 fall back to one transaction per message (and a
    // parked-key check each): about 260 transactions; the rest are batched.
    let n = 1000;
    let mut records: Vec<TestRecord> = (0..n)
        .map(|i| {
            let payload = match i {
                150 => serde_json::json!({ "seq": i, "fail_times": 1 }),
                200 => serde_json::json!({ "seq": i, "poison": true }),
                _ => serde_json::json!({ "seq": i }),
            };
            event(&format!("k{i}"), Uuid::new_v4(), "item.added", payload)
        })
        .collect();
    // All waiting before the consumer starts, so batches form.
    produce(&topic, &records).await?;
    records.clear();
    let commits = || async {
        anyhow::Ok(
            sqlx::query_scalar::<_, i64>(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            )
            .fetch_one(&pool)
            .await?,
        )
    };
    let before = commits().await?;
    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "all settled", || async {
        let s = stats.snapshot();
        Ok(s.processed + s.dead_lettered == n as u64)
    })
    .await?;
    c.stop().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // statistics flush
    let during = commits().await? - before;
    let s = stats.snapshot();
    assert_eq!(
        (s.processed, s.dead_lettered, s.retries),
        (n as u64 - 1, 1, 1)
    );
    assert_eq!(effect_counts(&pool).await?, (n as i64 - 1, n as i64 - 1));
    assert!(
        during < n as i64 / 2,
        "{during} commits for {n} events: messages were not batched"
    );
    Ok(())
}

/// Records of an aborted Kafka transaction never reach a handler
/// (`read_committed`, the default); those of committed transactions and
/// plain records do, once each.
#[sqlx::test(migrations = false)]
async fn aborted_transactions_are_never_applied(pool: PgPool) -> anyhow::Result<()> {
    use rdkafka::{
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord, Producer},
        ClientConfig,
    };
    consumer_db(&pool).await?;
    let topic = topic("ck-txn", 1).await?;
    let group = unique("g");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", integration_tests::brokers())
        .set("transactional.id", unique("txn"))
        .create()?;
    let timeout = Duration::from_secs(30);
    // The transaction calls block: off the test's (current-thread) runtime.
    let blocking = |f: fn(&FutureProducer, Duration) -> rdkafka::error::KafkaResult<()>| {
        let producer = producer.clone();
        tokio::task::spawn_blocking(move || f(&producer, timeout))
    };
    blocking(|p, t| p.init_transactions(t)).await??;
    let send = |seq: i64| {
        let record = event(
            &format!("k{seq}"),
            Uuid::new_v4(),
            "item.added",
            serde_json::json!({ "seq": seq }),
        );
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let value = record.value.clone().unwrap_or_default();
            let key = record.key.clone().unwrap_or_default();
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            anyhow::Ok(())
        }
    };
    for (seqs, commit) in [(1..=3, true), (4..=6, false), (7..=9, true)] {
        blocking(|p, _| p.begin_transaction()).await??;
        for seq in seqs {
            send(seq).await?;
        }
        if commit {
            blocking(|p, t| p.commit_transaction(t)).await??;
        } else {
            blocking(|p, t| p.abort_transaction(t)).await??;
        }
    }
    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    eventually(WAIT, "the committed six applied", || async {
        Ok(effect_counts(&pool).await?.0 == 6)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.stop().await?;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM effects ORDER BY seq")
        .fetch_all(&pool)
        .await?;
    assert_eq!(
        seqs,
        vec![1, 2, 3, 7, 8, 9],
        "an aborted record was applied"
    );
    Ok(())
}

/// Offset commits the broker refuses (librdkafka's mock cluster answers the
/// next OffsetCommit requests with an error) are counted in the stats and the
/// metric, processing goes on, and a restart redelivers what the failed
/// commits did not cover: dedupe skips it, nothing is applied twice.
#[sqlx::test(migrations = false)]
async fn refused_offset_commits_are_counted_and_dedupe_covers_the_redelivery(
    pool: PgPool,
) -> anyhow::Result<()> {
    use rdkafka::{
        mocking::MockCluster,
        types::{RDKafkaApiKey, RDKafkaRespErr as E},
    };
    consumer_db(&pool).await?;
    let cluster = MockCluster::new(1)?;
    let topic = "mock-commits";
    cluster.create_topic(topic, 1, 1)?;
    cluster.create_topic(&format!("{topic}.dlq"), 1, 1)?;
    let brokers = cluster.bootstrap_servers();
    let group = unique("g");
    let cfg = || consumer_kit::ConsumerConfig {
        brokers: brokers.clone(),
        ..consumer_cfg(&group, topic)
    };
    integration_tests::consumer::produce_on(&brokers, topic, &events(20, 4, "item.added").0)
        .await?;

    // Every offset commit of the first consumer is refused.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[E::RD_KAFKA_RESP_ERR_INVALID_COMMIT_OFFSET_SIZE; 200],
    );
    let c = start_consumer(&pool, cfg(), "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "20 processed and a commit refused", || async {
        let s = stats.snapshot();
        Ok(s.processed == 20 && s.offset_commit_failures > 0)
    })
    .await?;
    c.stop().await?;

    // Commits work again: the next consumer gets the 20 again, skips them,
    // and applies the 5 new ones.
    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    integration_tests::consumer::produce_on(&brokers, topic, &events(5, 4, "item.added").0).await?;
    let c = start_consumer(&pool, cfg(), "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "5 new processed, 20 skipped", || async {
        let s = stats.snapshot();
        Ok(s.processed == 5 && s.duplicates == 20)
    })
    .await?;
    c.stop().await?;
    assert_eq!(stats.snapshot().offset_commit_failures, 0);
    assert_eq!(effect_counts(&pool).await?, (25, 25));
    Ok(())
}

/// A consumer resumes from a committed offset inside a record batch: 500
/// events produced within one linger window on one partition share a batch;
/// the group's offset is set to 137; the consumer applies exactly events
/// 137..500, the first of them first. (A broker that returned nothing for a
/// fetch starting inside a batch would leave it waiting forever.)
#[sqlx::test(migrations = false)]
async fn a_consumer_resumes_from_a_committed_offset_inside_a_record_batch(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = topic("ck-midbatch", 1).await?;
    let group = unique("g");
    let (records, ids) = events(500, 1, "item.added");
    produce(&topic, &records).await?;
    reset_group_offsets(&group, &topic, 1, 137).await?;
    let c = start_consumer(
        &pool,
        consumer_cfg(&group, &topic),
        "item.added",
        Effects::default(),
    )?;
    let stats = c.stats();
    eventually(WAIT, "363 events applied", || async {
        Ok(stats.snapshot().processed == 363)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stop().await?;
    assert_eq!(
        stats.snapshot().processed,
        363,
        "nothing before 137 applied"
    );
    let first: (i64, i64, i64) = sqlx::query_as("SELECT min(seq), max(seq), count(*) FROM effects")
        .fetch_one(&pool)
        .await?;
    assert_eq!(first, (137, 499, 363));
    let first_applied: i64 = sqlx::query_scalar("SELECT seq FROM effects ORDER BY at LIMIT 1")
        .fetch_one(&pool)
        .await?;
    assert_eq!(first_applied, 137);
    assert!(!dedupe::is_processed(&pool, &group, ids[136]).await?);
    assert!(dedupe::is_processed(&pool, &group, ids[137]).await?);
    Ok(())
}
