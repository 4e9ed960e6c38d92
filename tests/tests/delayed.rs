//! Delayed events (migration V10, `outbox-relay/src/delay.rs`) against the
//! real PostgreSQL and Kafka, with the polling source. The WAL source's
//! case is in `wal_source.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use integration_tests::{
    check_delivery, consume, database_url, eventually, outbox_with_topic, relay_cli, Received,
    RunningRelay,
};
use outbox_core::{append, emit, headers as h, NewEvent};
use sqlx::PgPool;

use integration_tests::quick_relay_config as cfg;

const WAIT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(1500);

fn id_of(r: &Received) -> String {
    r.header(h::CE_ID).unwrap_or_default().to_string()
}

/// Rows of the outbox with `status`, or with `"delayed"` the events
/// waiting in `outbox_delayed`.
async fn count(pool: &PgPool, status: &str) -> anyhow::Result<i64> {
    let sql = if status == "delayed" {
        "SELECT count(*) FROM outbox_delayed WHERE $1 <> ''"
    } else {
        "SELECT count(*) FROM outbox WHERE status = $1"
    };
    Ok(sqlx::query_scalar(sql).bind(status).fetch_one(pool).await?)
}

/// The record with event id `id`, and that it was produced at or after
/// `due` (the record's timestamp is the relay's produce time).
fn published_not_before<'a>(
    got: &'a [Received],
    id: &str,
    due: DateTime<Utc>,
) -> anyhow::Result<&'a Received> {
    let r = got
        .iter()
        .find(|r| id_of(r) == id)
        .ok_or_else(|| anyhow::anyhow!("event {id} was not published"))?;
    let at = r.timestamp_ms.expect("record timestamp");
    anyhow::ensure!(
        at >= due.timestamp_millis(),
        "event {id} was published at {at} ms, {} ms before its due time",
        due.timestamp_millis() - at
    );
    Ok(r)
}

#[sqlx::test(migrations = false)]
async fn delayed_events_wait_for_their_time_and_do_not_hold_back_their_key(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "delayed-poll", 1).await?;
    let delay = Duration::from_secs(5);
    // One transaction: an immediate event, a delayed one and another
    // immediate one of the same key.
    let mut tx = pool.begin().await?;
    let first = NewEvent::new("order", "k", "order.created").topic(&topic);
    let late = NewEvent::new("order", "k", "order.reminder")
        .topic(&topic)
        .delayed_by(delay);
    let second = NewEvent::new("order", "k", "order.paid").topic(&topic);
    for e in [&first, &late, &second] {
        append(&mut *tx, e).await?;
    }
    // The same from SQL, as a producer in another language writes it: a
    // raw insert, and outbox_emit with not_before (a delayed table-less
    // event becomes a delayed row).
    let (raw, raw_due): (uuid::Uuid, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, topic, not_before) \
         VALUES (gen_random_uuid(), 'order', 'k2', 'order.raw', $1, now() + interval '5 seconds') \
         RETURNING event_id, not_before",
    )
    .bind(&topic)
    .fetch_one(&mut *tx)
    .await?;
    let emitted: uuid::Uuid = sqlx::query_scalar(
        "SELECT outbox_emit('order', 'k3', 'order.emitted', topic => $1, \
                            not_before => now() + interval '5 seconds')",
    )
    .bind(&topic)
    .fetch_one(&mut *tx)
    .await?;
    let emitted_due: DateTime<Utc> =
        sqlx::query_scalar("SELECT not_before FROM outbox_delayed WHERE event_id = $1")
            .bind(emitted)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    assert_eq!(count(&pool, "delayed").await?, 3);
    assert_eq!(count(&pool, "pending").await?, 2);

    let relay = RunningRelay::start(&pool, cfg())?;
    // The key's immediate events do not wait for the delayed one.
    let early = consume(&topic, 2, WAIT, Duration::from_millis(300)).await?;
    let early_ids: Vec<String> = early.iter().map(id_of).collect();
    assert_eq!(
        early_ids,
        [first.event_id.to_string(), second.event_id.to_string()],
        "only the immediate events, in order, before the due time"
    );
    assert!(
        Utc::now() < late.not_before.expect("delayed"),
        "the test's first read took longer than the delay; it proves nothing"
    );

    let got = consume(&topic, 5, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 5, "each event exactly once: {got:?}");
    let reminder = published_not_before(
        &got,
        &late.event_id.to_string(),
        late.not_before.expect("delayed"),
    )?;
    assert_eq!(reminder.key.as_deref(), Some("k"));
    assert_eq!(reminder.header(h::CE_TYPE), Some("order.reminder"));
    published_not_before(&got, &raw.to_string(), raw_due)?;
    published_not_before(&got, &emitted.to_string(), emitted_due)?;
    // In its key's order at its due time: after the key's earlier events.
    let order: Vec<String> = got
        .iter()
        .filter(|r| r.key.as_deref() == Some("k"))
        .map(id_of)
        .collect();
    assert_eq!(
        order,
        [
            first.event_id.to_string(),
            second.event_id.to_string(),
            late.event_id.to_string()
        ]
    );
    assert_eq!(count(&pool, "delayed").await?, 0);
    assert_eq!(count(&pool, "pending").await?, 0);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn delayed_events_survive_a_relay_restart_and_two_relays_release_each_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "delayed-restart", 4).await?;
    let n = 300_i64;
    // 300 rows over 7 keys, all due at one moment 4 s from now.
    let due: DateTime<Utc> = sqlx::query_scalar(
        "WITH due AS (SELECT clock_timestamp() + interval '4 seconds' AS at) \
         INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, topic, payload, not_before) \
         SELECT gen_random_uuid(), 'load', 'k' || (g % 7), 'load.row', $1, jsonb_build_object('seq', g), \
                (SELECT at FROM due) \
         FROM generate_series(1, $2) g ORDER BY g RETURNING not_before",
    )
    .bind(&topic)
    .bind(n)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .next()
    .expect("rows");

    // A relay that runs and stops before the due time leaves them delayed.
    let relay = RunningRelay::start(&pool, cfg())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.stop().await?;
    assert!(Utc::now() < due, "the first relay ran past the due time");
    assert_eq!(count(&pool, "delayed").await?, n, "kept across the restart");

    // Two relays before the due time: both release, each row once.
    let a = RunningRelay::start(&pool, cfg())?;
    let b = RunningRelay::start(&pool, cfg())?;
    let got = consume(&topic, n as usize, WAIT, SETTLE).await?;
    a.stop().await?;
    b.stop().await?;
    assert_eq!(check_delivery(&got, n)?, 0, "no duplicates");
    assert_eq!(got.len(), n as usize);
    for r in &got {
        assert!(
            r.timestamp_ms.expect("timestamp") >= due.timestamp_millis(),
            "published before its due time"
        );
    }
    assert_eq!(count(&pool, "delayed").await?, 0);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn the_schema_and_append_keep_delayed_rows_consistent(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "delayed-schema", 1).await?;
    // A due time is required.
    let err = sqlx::query(
        "INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type) \
         VALUES (gen_random_uuid(), 'a', 'b', 'c')",
    )
    .execute(&pool)
    .await
    .expect_err("a delayed event without a due time");
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("23502"),
        "not null: {err}"
    );
    // The same id twice among the delayed is a duplicate, as in the outbox.
    let twice = NewEvent::new("a", "b", "c")
        .topic(&topic)
        .delayed_by(Duration::from_secs(3600));
    append(&pool, &twice).await?;
    assert!(matches!(
        append(&pool, &twice).await,
        Err(outbox_core::AppendError::DuplicateEventId(_))
    ));
    sqlx::query("DELETE FROM outbox_delayed")
        .execute(&pool)
        .await?;

    // A due time already past is no delay: an ordinary pending row.
    let past = NewEvent::new("a", "b", "c")
        .topic(&topic)
        .not_before(Utc::now() - chrono::TimeDelta::minutes(1));
    append(&pool, &past).await?;
    let past_emitted = NewEvent::new("a", "b", "c")
        .topic(&topic)
        .not_before(Utc::now() - chrono::TimeDelta::minutes(1));
    emit(&pool, &past_emitted).await?;
    assert_eq!(count(&pool, "pending").await?, 2);

    // A far due time: delayed, and shown by `status`.
    let far = NewEvent::new("a", "b", "c")
        .topic(&topic)
        .delayed_by(Duration::from_secs(30 * 24 * 3600));
    append(&pool, &far).await?;
    assert_eq!(count(&pool, "delayed").await?, 1);
    let (code, out) = relay_cli(&database_url(&pool), &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("delayed:            1 (next due in 259"),
        "status shows the delayed row and its due time: {out}"
    );

    // A relay leaves it alone: it is not due.
    let relay = RunningRelay::start(&pool, cfg())?;
    eventually(WAIT, "the two pending rows published", || async {
        Ok(count(&pool, "pending").await? == 0)
    })
    .await?;
    relay.stop().await?;
    assert_eq!(count(&pool, "delayed").await?, 1);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_due_event_whose_id_was_published_waits_without_blocking_the_others(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "delayed-stuck", 1).await?;
    let first = NewEvent::new("a", "k", "first").topic(&topic);
    append(&pool, &first).await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    consume(&topic, 1, WAIT, Duration::from_millis(200)).await?;
    // A delayed event reusing the published id, and a good one, both due
    // in a second.
    for id in [first.event_id, uuid::Uuid::new_v4()] {
        sqlx::query(
            "INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, topic, not_before) \
             VALUES ($1, 'a', 'k', 'later', $2, now() + interval '1 second')",
        )
        .bind(id)
        .bind(&topic)
        .execute(&pool)
        .await?;
    }
    let got = consume(&topic, 2, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 2, "the good one published, the reused id not");
    assert_eq!(count(&pool, "delayed").await?, 1, "the reused id waits");
    let (code, out) = relay_cli(&database_url(&pool), &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delayed:            1 (overdue by"), "{out}");
    Ok(())
}
