//! Per-key order through dead letters: consumer-kit's park-key policy.
//! Once an event of a key is dead-lettered, later events of that key are
//! parked, in order, until the blocking event is replayed and applied, or an
//! operator discards it; then they are applied in their original order,
//! exactly once, across restarts.

use std::{collections::BTreeMap, sync::atomic::Ordering as AtomicOrdering, time::Duration};

use consumer_kit::{replay, DeadLetterFilter, Ordering};
use integration_tests::{
    consumer::{consumer_cfg, consumer_db, event, produce, start_consumer, Effects, TestRecord},
    create_topic, eventually, unique,
};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const KEY: &str = "order-1";

fn item(key: &str, seq: i64, poison: bool) -> (Uuid, TestRecord) {
    let id = Uuid::new_v4();
    let payload = serde_json::json!({ "seq": seq, "poison": poison });
    (id, event(key, id, "item.added", payload))
}

/// The seqs applied, in the order they were applied.
async fn applied(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT seq FROM effects ORDER BY at, seq")
            .fetch_all(pool)
            .await?,
    )
}

fn of_key(seqs: &[i64], key_seqs: std::ops::RangeInclusive<i64>) -> Vec<i64> {
    seqs.iter()
        .copied()
        .filter(|s| key_seqs.contains(s))
        .collect()
}

fn cfg(group: &str, topic: &str) -> consumer_kit::ConsumerConfig {
    consumer_kit::ConsumerConfig {
        ordering: Ordering::ParkKey,
        ..consumer_cfg(group, topic)
    }
}

async fn parked_rows(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok((
        sqlx::query_scalar("SELECT count(*) FROM consumer_kit_parked_keys")
            .fetch_one(pool)
            .await?,
        sqlx::query_scalar("SELECT count(*) FROM consumer_kit_parked_events")
            .fetch_one(pool)
            .await?,
    ))
}

/// K1 fails permanently, K2–K4 of the same key wait (parked, not applied)
/// while another key flows; the consumer restarts meanwhile; after the fix,
/// replaying K1 applies 1, 2, 3, 4 in that order, once each; and events of
/// the key that keep arriving during the replay stay behind the parked
/// ones.
#[sqlx::test(migrations = false)]
async fn a_dead_letter_holds_its_key_until_replayed_then_all_apply_in_order(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-park");
    create_topic(&topic, 3).await?;
    create_topic(&format!("{topic}.dlq"), 3).await?;
    let group = unique("g");
    let mut records = vec![item(KEY, 1, true).1];
    records.extend((2..=4).map(|s| item(KEY, s, false).1));
    records.extend((101..=103).map(|s| item("other", s, false).1));
    produce(&topic, &records).await?;

    let handler = Effects::default();
    let fixed = handler.fixed.clone();
    let c = start_consumer(&pool, cfg(&group, &topic), "item.added", handler)?;
    eventually(WAIT, "the other key applied and K2-K4 parked", || async {
        Ok(c.stats().snapshot().parked == 3 && applied(&pool).await?.len() == 3)
    })
    .await?;
    assert_eq!(of_key(&applied(&pool).await?, 1..=4), Vec::<i64>::new());
    assert_eq!(c.stats().snapshot().dead_lettered, 1);
    assert_eq!(parked_rows(&pool).await?, (1, 3));
    let blocked = consumer_kit::park::list(&pool, &group).await?;
    assert_eq!(blocked.len(), 1);
    assert_eq!(
        (blocked[0].key.as_str(), blocked[0].parked_events),
        (KEY, 3)
    );
    assert!(
        blocked[0].blocking_reason.contains("poison"),
        "{:?}",
        blocked[0]
    );

    // A restart keeps the block: a new event of the key is parked too.
    c.stop().await?;
    produce(&topic, &[item(KEY, 5, false).1]).await?;
    let handler = Effects::default();
    let fixed_again = handler.fixed.clone();
    let c = start_consumer(&pool, cfg(&group, &topic), "item.added", handler)?;
    eventually(WAIT, "K5 parked after the restart", || async {
        Ok(parked_rows(&pool).await? == (1, 4))
    })
    .await?;
    assert_eq!(of_key(&applied(&pool).await?, 1..=9), Vec::<i64>::new());

    // The fix, then the replay of K1, while K6..K9 keep arriving.
    fixed.store(true, AtomicOrdering::SeqCst);
    fixed_again.store(true, AtomicOrdering::SeqCst);
    let dlq = format!("{topic}.dlq");
    let brokers = integration_tests::brokers();
    let letters = replay::read(
        &brokers,
        &BTreeMap::new(),
        &dlq,
        &DeadLetterFilter::default(),
    )
    .await?;
    assert_eq!(letters.len(), 1);
    let more = {
        let topic = topic.clone();
        tokio::spawn(async move {
            for s in 6..=9 {
                produce(&topic, &[item(KEY, s, false).1]).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        })
    };
    replay::replay(&brokers, &BTreeMap::new(), &letters).await?;
    more.await??;
    eventually(WAIT, "the key's nine events applied", || async {
        Ok(of_key(&applied(&pool).await?, 1..=9).len() == 9)
    })
    .await?;
    c.stop().await?;
    assert_eq!(
        of_key(&applied(&pool).await?, 1..=9),
        (1..=9).collect::<Vec<_>>(),
        "the key's events applied out of order"
    );
    assert_eq!(applied(&pool).await?.len(), 12, "each event once");
    assert_eq!(parked_rows(&pool).await?, (0, 0), "the key unblocked");
    Ok(())
}

/// An operator discards the blocking event: the events parked behind it are
/// applied in order (the blocking one never), and the key flows again.
#[sqlx::test(migrations = false)]
async fn discarding_the_blocking_event_applies_the_parked_ones_in_order(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-discard");
    create_topic(&topic, 2).await?;
    create_topic(&format!("{topic}.dlq"), 2).await?;
    let group = unique("g");
    let mut records = vec![item(KEY, 1, true).1];
    records.extend((2..=4).map(|s| item(KEY, s, false).1));
    produce(&topic, &records).await?;
    let c = start_consumer(&pool, cfg(&group, &topic), "item.added", Effects::default())?;
    eventually(WAIT, "K2-K4 parked", || async {
        Ok(parked_rows(&pool).await? == (1, 3))
    })
    .await?;
    assert!(consumer_kit::park::discard(&pool, &group, &topic, KEY).await?);
    assert!(!consumer_kit::park::discard(&pool, &group, &topic, "no-such-key").await?);
    eventually(WAIT, "the parked events applied", || async {
        Ok(applied(&pool).await?.len() == 3)
    })
    .await?;
    produce(&topic, &[item(KEY, 5, false).1]).await?;
    eventually(WAIT, "the key flows again", || async {
        Ok(applied(&pool).await?.len() == 4)
    })
    .await?;
    c.stop().await?;
    assert_eq!(applied(&pool).await?, vec![2, 3, 4, 5]);
    assert_eq!(parked_rows(&pool).await?, (0, 0));
    Ok(())
}

/// `Ordering::Skip` is the old trade: the key's later events are applied
/// while its dead-lettered one waits.
#[sqlx::test(migrations = false)]
async fn skip_lets_later_events_of_the_key_through(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-skip");
    create_topic(&topic, 1).await?;
    create_topic(&format!("{topic}.dlq"), 1).await?;
    let group = unique("g");
    let mut records = vec![item(KEY, 1, true).1];
    records.extend((2..=3).map(|s| item(KEY, s, false).1));
    produce(&topic, &records).await?;
    let cfg = consumer_kit::ConsumerConfig {
        ordering: Ordering::Skip,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    eventually(WAIT, "K2, K3 applied", || async {
        Ok(applied(&pool).await?.len() == 2)
    })
    .await?;
    c.stop().await?;
    assert_eq!(applied(&pool).await?, vec![2, 3]);
    assert_eq!(parked_rows(&pool).await?, (0, 0));
    Ok(())
}

/// Runs `outbox-dlq` with `args` against `pool`'s database: (exit code,
/// stdout, stderr).
fn dlq(pool: &PgPool, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(integration_tests::dlq_bin())
        .args(args)
        .env("KAFKA_BROKERS", integration_tests::brokers())
        .env("DATABASE_URL", integration_tests::database_url(pool))
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The operator's side: `outbox-dlq parked list` shows each blocked key
/// with its blocking event and count, `parked release` replays the
/// blocking event (after the fix) so the key's events apply in order, and
/// `parked discard` gives up on it so the rest apply without it.
#[sqlx::test(migrations = false)]
async fn outbox_dlq_lists_releases_and_discards_parked_keys(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-parkcli");
    create_topic(&topic, 2).await?;
    create_topic(&format!("{topic}.dlq"), 2).await?;
    let group = unique("g");
    let (blocker, first) = item("k-release", 1, true);
    let mut records = vec![first];
    records.extend((2..=3).map(|s| item("k-release", s, false).1));
    records.push(item("k-discard", 11, true).1);
    records.extend((12..=13).map(|s| item("k-discard", s, false).1));
    produce(&topic, &records).await?;
    let handler = Effects::default();
    let fixed = handler.fixed.clone();
    let c = start_consumer(&pool, cfg(&group, &topic), "item.added", handler)?;
    eventually(
        WAIT,
        "both keys blocked, two events parked behind each",
        || async { Ok(parked_rows(&pool).await? == (2, 4)) },
    )
    .await?;

    let (code, out, err) = dlq(&pool, &["parked", "list", "--group", &group])?;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("2 parked key(s)"), "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("k-release"))
        .unwrap_or_default();
    assert!(
        line.contains(&blocker.to_string()) && line.contains("2 parked"),
        "{out}"
    );

    // Release after the fix: the blocking event is replayed and applied
    // first, then the parked ones.
    fixed.store(true, AtomicOrdering::SeqCst);
    let release = [
        "parked",
        "release",
        "--group",
        &group,
        "--topic",
        &topic,
        "--key",
        "k-release",
    ];
    let (code, out, err) = dlq(&pool, &release)?;
    assert_eq!(code, Some(0), "{out}{err}");
    eventually(WAIT, "k-release applied", || async {
        Ok(of_key(&applied(&pool).await?, 1..=3).len() == 3)
    })
    .await?;
    assert_eq!(of_key(&applied(&pool).await?, 1..=3), vec![1, 2, 3]);

    // Discard: the blocking event is never applied, the rest are, in order.
    let discard = [
        "parked",
        "discard",
        "--group",
        &group,
        "--topic",
        &topic,
        "--key",
        "k-discard",
    ];
    let (code, out, err) = dlq(&pool, &discard)?;
    assert_eq!(code, Some(0), "{out}{err}");
    eventually(WAIT, "k-discard's parked events applied", || async {
        Ok(of_key(&applied(&pool).await?, 11..=13).len() == 2)
    })
    .await?;
    c.stop().await?;
    assert_eq!(of_key(&applied(&pool).await?, 11..=13), vec![12, 13]);
    let (code, _, err) = dlq(&pool, &["parked", "list", "--group", &group])?;
    assert_eq!(code, Some(0));
    assert!(err.contains("0 parked key(s)"), "{err}");
    // A key that is not parked is a clear error.
    let (code, _, err) = dlq(&pool, &discard)?;
    assert_eq!(code, Some(1));
    assert!(err.contains("is not parked"), "{err}");
    Ok(())
}

/// A block survives a rebalance: the key's partition moves to another
/// member, which parks the key's new events behind the same block and,
/// after the replay, applies them all in order.
#[sqlx::test(migrations = false)]
async fn a_block_holds_across_a_rebalance(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-parkrebal");
    create_topic(&topic, 4).await?;
    create_topic(&format!("{topic}.dlq"), 4).await?;
    let group = unique("g");
    let mut records = vec![item(KEY, 1, true).1];
    records.extend((2..=3).map(|s| item(KEY, s, false).1));
    produce(&topic, &records).await?;
    let first = Effects::default();
    let fixed_first = first.fixed.clone();
    let a = start_consumer(&pool, cfg(&group, &topic), "item.added", first)?;
    eventually(WAIT, "K2, K3 parked by member A", || async {
        Ok(parked_rows(&pool).await? == (1, 2))
    })
    .await?;
    // Member B joins, then A leaves: B owns every partition, the key's too.
    let second = Effects::default();
    let fixed_second = second.fixed.clone();
    let b = start_consumer(&pool, cfg(&group, &topic), "item.added", second)?;
    eventually(WAIT, "B has partitions", || async {
        Ok(b.health().now().assigned_partitions > 0)
    })
    .await?;
    a.stop().await?;
    eventually(WAIT, "B owns all four", || async {
        Ok(b.health().now().assigned_partitions == 4)
    })
    .await?;
    produce(&topic, &[item(KEY, 4, false).1]).await?;
    eventually(WAIT, "K4 parked by member B", || async {
        Ok(parked_rows(&pool).await? == (1, 3))
    })
    .await?;
    assert_eq!(of_key(&applied(&pool).await?, 1..=4), Vec::<i64>::new());
    fixed_first.store(true, AtomicOrdering::SeqCst);
    fixed_second.store(true, AtomicOrdering::SeqCst);
    let brokers = integration_tests::brokers();
    let dlq = format!("{topic}.dlq");
    let letters = replay::read(
        &brokers,
        &BTreeMap::new(),
        &dlq,
        &DeadLetterFilter::default(),
    )
    .await?;
    replay::replay(&brokers, &BTreeMap::new(), &letters).await?;
    eventually(WAIT, "the key's four events applied", || async {
        Ok(of_key(&applied(&pool).await?, 1..=4).len() == 4)
    })
    .await?;
    b.stop().await?;
    assert_eq!(of_key(&applied(&pool).await?, 1..=4), vec![1, 2, 3, 4]);
    assert_eq!(parked_rows(&pool).await?, (0, 0));
    Ok(())
}

/// Deferred retries (`defer_retries_after`): an event whose retry would
/// wait long goes back through the consumer's outbox as a delayed copy, so
/// its partition goes on; its key's later events wait behind it (park-key)
/// and follow it in order, each applied once.
#[sqlx::test(migrations = false)]
async fn a_long_retry_waits_in_the_outbox_while_its_partition_goes_on(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    consumer_db(&pool).await?;
    let topic = unique("ck-defer");
    create_topic(&topic, 1).await?;
    let relay =
        integration_tests::RunningRelay::start(&pool, integration_tests::quick_relay_config())?;
    // Key A: seq 1 fails twice (each retry deferred), 2 and 3 wait behind
    // it. Key B: 11 to 13, on the same partition, must not wait.
    let flaky = Uuid::new_v4();
    let mut records = vec![event(
        "A",
        flaky,
        "item.added",
        serde_json::json!({ "seq": 1, "fail_times": 2 }),
    )];
    records.push(item("A", 2, false).1);
    records.push(item("B", 11, false).1);
    records.push(item("A", 3, false).1);
    records.push(item("B", 12, false).1);
    records.push(item("B", 13, false).1);
    produce(&topic, &records).await?;

    let group = unique("g");
    let mut cfg = consumer_cfg(&group, &topic);
    cfg.min_backoff = Duration::from_millis(400);
    cfg.max_backoff = Duration::from_secs(2);
    cfg.max_attempts = 5;
    cfg.defer_retries_after = Some(Duration::from_millis(300));
    let handler = Effects::default();
    let c = start_consumer(&pool, cfg, "item.added", handler.clone())?;
    eventually(WAIT, "all six applied", || async {
        Ok(integration_tests::consumer::effect_counts(&pool).await?.1 == 6)
    })
    .await?;
    c.stop().await?;
    relay.stop().await?;

    let seqs = applied(&pool).await?;
    assert_eq!(of_key(&seqs, 1..=3), [1, 2, 3], "key A in order: {seqs:?}");
    assert_eq!(of_key(&seqs, 11..=13), [11, 12, 13]);
    // Key B went on while A's retries waited in the outbox.
    let pos = |s: i64| seqs.iter().position(|&x| x == s).expect("applied");
    assert!(
        pos(13) < pos(1),
        "the partition waited for the retry: {seqs:?}"
    );
    assert_eq!(
        integration_tests::consumer::effect_counts(&pool).await?.0,
        6
    );
    assert_eq!(handler.calls.lock().unwrap()[&flaky], 3, "three tries");
    // The copies went through the outbox: published and deleted, their id
    // remembered once (each deferral forgets it, each publish remembers it).
    let (remembered, left): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_published_ids WHERE event_id = $1), \
                (SELECT count(*) FROM outbox)",
    )
    .bind(flaky)
    .fetch_one(&pool)
    .await?;
    assert_eq!((remembered, left), (1, 0));
    Ok(())
}
