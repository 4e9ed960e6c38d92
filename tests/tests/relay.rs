//! The relay in-process against the real PostgreSQL and broker.

use std::{collections::HashMap, time::Duration};

use integration_tests::{
    append_events, consume, create_topic, eventually, outbox_with_topic, owned_by_live_relays,
    pending, unique, RunningRelay,
};
use outbox_core::{append, headers as h, NewEvent};
use outbox_relay::{AfterPublish, PoisonPolicy, RelayConfig};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(1500);

use integration_tests::quick_relay_config as cfg;

#[sqlx::test(migrations = false)]
async fn every_committed_row_arrives_once_with_key_headers_and_payload(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-basic", 3).await?;
    let mut expected = HashMap::new();
    for i in 0..250 {
        let e = NewEvent::new("order", format!("o-{}", i % 10), "order.created")
            .topic(&topic)
            .version(3)
            .json_payload(&serde_json::json!({ "i": i }))?
            .correlation_id(format!("corr-{i}"))
            .causation_id("cmd-1")
            .trace_context(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("k=v".into()),
            )
            .source("orders-svc")
            .header("tenant", "acme");
        append(&pool, &e).await?;
        expected.insert(e.event_id.to_string(), (i, e));
    }
    let relay = RunningRelay::start(&pool, cfg())?;
    let got = consume(&topic, 250, WAIT, SETTLE).await?;
    relay.stop().await?;

    assert_eq!(got.len(), 250, "each row exactly once");
    for r in &got {
        let (i, e) = &expected[r.header(h::CE_ID).expect("ce_id")];
        assert_eq!(r.key.as_deref(), Some(e.aggregate_id.as_str()));
        assert_eq!(r.json(), serde_json::json!({ "i": i }));
        assert_eq!(r.header(h::CE_TYPE), Some("order.created"));
        assert_eq!(r.header(h::CE_SPECVERSION), Some("1.0"));
        assert_eq!(r.header(h::CE_EVENT_VERSION), Some("3"));
        assert_eq!(r.header(h::CE_SOURCE), Some("orders-svc"));
        assert_eq!(r.header(h::CE_SUBJECT), Some(e.aggregate_id.as_str()));
        assert_eq!(r.header(h::CE_AGGREGATE_TYPE), Some("order"));
        assert_eq!(
            r.header(h::CE_CORRELATION_ID),
            Some(format!("corr-{i}").as_str())
        );
        assert_eq!(r.header(h::CE_CAUSATION_ID), Some("cmd-1"));
        assert_eq!(r.header(h::TRACEPARENT), e.traceparent.as_deref());
        assert_eq!(r.header(h::TRACESTATE), Some("k=v"));
        assert_eq!(r.header(h::CONTENT_TYPE), Some("application/json"));
        assert_eq!(r.header("tenant"), Some("acme"));
        assert!(r.header(h::CE_TIME).is_some());
    }
    assert_eq!(pending(&pool).await?, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0, "delete mode removes published rows");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_rolled_back_transaction_publishes_nothing(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-rollback", 1).await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    let mut tx = pool.begin().await?;
    let ghost = NewEvent::new("order", "1", "order.ghost").topic(&topic);
    append(&mut *tx, &ghost).await?;
    tx.rollback().await?;
    let real = NewEvent::new("order", "1", "order.real").topic(&topic);
    append(&pool, &real).await?;
    let got = consume(&topic, 1, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].header(h::CE_TYPE), Some("order.real"));
    Ok(())
}

/// Producers that serialize on an aggregate row (the documented pattern:
/// lock or update the aggregate, then append) see their events in Kafka in
/// commit order, per key.
#[sqlx::test(migrations = false)]
async fn per_key_order_holds_with_concurrent_producers(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-order", 4).await?;
    sqlx::query("CREATE TABLE counters (key text PRIMARY KEY, seq int NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO counters SELECT 'k' || g, 0 FROM generate_series(0, 19) g")
        .execute(&pool)
        .await?;
    let producers = (0..8)
        .map(|p| {
            let pool = pool.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for i in 0..60 {
                    let key = format!("k{}", (p * 7 + i * 3) % 20);
                    let mut tx = pool.begin().await?;
                    let seq: i32 = sqlx::query_scalar(
                        "UPDATE counters SET seq = seq + 1 WHERE key = $1 RETURNING seq",
                    )
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await?;
                    let e = NewEvent::new("counter", &key, "counter.incremented")
                        .topic(&topic)
                        .json_payload(&serde_json::json!({ "seq": seq }))?;
                    append(&mut *tx, &e).await?;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect::<Vec<_>>();
    // Start mid-run with small batches, so claims see a backlog of many
    // rows per key and span several batches.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            batch_size: 16,
            ..cfg()
        },
    )?;
    for p in futures::future::join_all(producers).await {
        p??;
    }
    let got = consume(&topic, 480, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 480);
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &got {
        let key = r.key.clone().unwrap();
        let seq = r.json()["seq"].as_i64().unwrap();
        let prev = last.insert(key.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "key {key}: seq {seq} after {prev}");
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn notify_wakes_the_relay_long_before_the_poll_interval(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-notify", 1).await?;
    // The relay found nothing, so it flagged itself as waiting and sleeps:
    // producers notify it.
    let relay = waiting_relay(&pool, cfg()).await?;
    let started = std::time::Instant::now();
    append_events(&pool, &topic, 5, 5).await?;
    let got = consume(
        &topic,
        5,
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await?;
    let took = started.elapsed();
    assert_eq!(got.len(), 5);
    assert!(
        took < Duration::from_secs(30),
        "took {took:?}; the poll interval is 120s"
    );
    // Done with them, it sleeps again, flag up, and `status` says so.
    eventually(WAIT, "the relay waits again", || async {
        Ok(pending(&pool).await? == 0 && waiting_relays(&pool).await? == 1)
    })
    .await?;
    let (code, out) = integration_tests::relay_cli(
        &integration_tests::database_url(&pool),
        &["status", "--json"],
    );
    relay.stop().await?;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["relays"][0]["waiting"], true, "{out}");
    Ok(())
}

/// A relay with nothing to claim, once it has raised its waiting flag:
/// only a notification wakes it (its poll interval is 120 s).
async fn waiting_relay(pool: &PgPool, cfg: RelayConfig) -> anyhow::Result<RunningRelay> {
    let relay = RunningRelay::start(
        pool,
        RelayConfig {
            poll_interval: Duration::from_secs(120),
            ..cfg
        },
    )?;
    eventually(WAIT, "the relay waits for notifications", || async {
        Ok(waiting_relays(pool).await? == 1)
    })
    .await?;
    Ok(relay)
}

async fn waiting_relays(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox_relays WHERE waiting_since IS NOT NULL AND lease_until > now()",
    )
    .fetch_one(pool)
    .await?)
}

#[sqlx::test(migrations = false)]
async fn a_busy_relay_lowers_its_flag_and_producers_stop_notifying(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-busy", 2).await?;
    let relay = waiting_relay(
        &pool,
        RelayConfig {
            batch_size: 20,
            ..cfg()
        },
    )
    .await?;
    // A backlog of 2,000 rows in one transaction: one notification wakes the
    // relay, which then claims batch after batch with its flag down.
    let mut tx = pool.begin().await?;
    for i in 0..2000 {
        let e = NewEvent::new("t", format!("k{}", i % 20), "x")
            .topic(&topic)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        append(&mut *tx, &e).await?;
    }
    tx.commit().await?;
    let flag_seen_down = std::cell::Cell::new(false);
    let (seen, db) = (&flag_seen_down, &pool);
    eventually(WAIT, "the backlog drained", || async move {
        let (waiting, pending): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox_relays WHERE waiting_since IS NOT NULL), \
                    (SELECT count(*) FROM outbox WHERE status = 'pending')",
        )
        .fetch_one(db)
        .await?;
        if waiting == 0 && pending > 0 {
            seen.set(true);
        }
        Ok(pending == 0)
    })
    .await?;
    let got = consume(&topic, 2000, WAIT, SETTLE).await?;
    eventually(WAIT, "the relay waits again", || async {
        Ok(waiting_relays(&pool).await? == 1)
    })
    .await?;
    relay.stop().await?;
    assert_eq!(got.len(), 2000);
    assert!(
        flag_seen_down.get(),
        "the waiting flag stayed up while the relay drained 100 batches"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn under_a_steady_trickle_the_flag_stays_down(pool: PgPool) -> anyhow::Result<()> {
    // Every raise or lower of a waiting flag, counted by a trigger.
    let topic = outbox_with_topic(&pool, "relay-trickle", 2).await?;
    sqlx::raw_sql(
        "CREATE TABLE flag_flips (at timestamptz NOT NULL DEFAULT clock_timestamp()); \
         CREATE FUNCTION count_flag_flip() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO flag_flips DEFAULT VALUES; RETURN NULL; END $$; \
         CREATE TRIGGER count_flag_flip AFTER UPDATE ON outbox_relays FOR EACH ROW \
         WHEN (OLD.waiting_since IS DISTINCT FROM NEW.waiting_since) \
         EXECUTE FUNCTION count_flag_flip();",
    )
    .execute(&pool)
    .await?;
    let relay = waiting_relay(&pool, cfg()).await?;
    sqlx::query("TRUNCATE flag_flips").execute(&pool).await?;

    // One event every 5 ms for 2 s, each in its own transaction. Before
    // the relay lingered, its flag went up after every batch and down at
    // the next: a flip every few milliseconds, each a commit, and while it
    // was up every producer's commit queued on the notification lock.
    let events = 400;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..events {
        tick.tick().await;
        let e = NewEvent::new("t", format!("k{}", i % 10), "x")
            .topic(&topic)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        append(&pool, &e).await?;
    }
    let got = consume(&topic, events, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), events);
    let flips: i64 = sqlx::query_scalar("SELECT count(*) FROM flag_flips")
        .fetch_one(&pool)
        .await?;
    // Down at the first event, up once the trickle ends; a machine that
    // stalls for longer than the linger may add a few more.
    assert!(
        flips <= 40,
        "the waiting flag flipped {flips} times during a steady trickle of {events} events"
    );
    assert!(
        flips >= 1,
        "the flag never went down: the trigger counts nothing"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn polling_delivers_without_notify_and_after_the_listener_is_killed(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-poll", 1).await?;
    sqlx::query("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
        .execute(&pool)
        .await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    append_events(&pool, &topic, 3, 3).await?;
    eventually(WAIT, "polled rows published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;

    // Re-enable NOTIFY, then kill the relay's LISTEN connection.
    sqlx::query("ALTER TABLE outbox ENABLE TRIGGER outbox_notify")
        .execute(&pool)
        .await?;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await?;
    assert!(!killed.is_empty(), "the relay had a LISTEN connection");
    append_events(&pool, &topic, 3, 3).await?;
    let got = consume(&topic, 6, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 6);
    Ok(())
}

async fn failed_rows(pool: &PgPool) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT aggregate_id, last_error FROM outbox WHERE status = 'failed' ORDER BY id",
    )
    .fetch_all(pool)
    .await?)
}

#[sqlx::test(migrations = false)]
async fn poison_rows_fail_with_a_reason_while_other_keys_flow(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-poison", 2).await?;
    let missing = unique("never-created");
    // Key "bad-topic": its first row targets a topic that does not exist.
    append(&pool, &NewEvent::new("t", "bad-topic", "x").topic(&missing)).await?;
    append(
        &pool,
        &NewEvent::new("t", "bad-topic", "after-poison").topic(&topic),
    )
    .await?;
    // Key "bad-headers": a nested header value cannot become a Kafka header.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, headers) \
         VALUES (gen_random_uuid(), 't', 'bad-headers', 'x', $1, '{\"h\": {\"nested\": 1}}')",
    )
    .bind(&topic)
    .execute(&pool)
    .await?;
    // Key "bad-name": an explicit topic Kafka would refuse, written by a
    // non-Rust producer (the CHECK only forbids empty names).
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic) \
         VALUES (gen_random_uuid(), 't', 'bad-name', 'x', 'no spaces allowed')",
    )
    .execute(&pool)
    .await?;
    append_events(&pool, &topic, 30, 5).await?;

    let relay = RunningRelay::start(&pool, cfg())?;
    let got = consume(&topic, 30, WAIT, SETTLE).await?;
    eventually(WAIT, "three failed rows", || async {
        Ok(failed_rows(&pool).await?.len() == 3)
    })
    .await?;
    relay.stop().await?;

    assert_eq!(got.len(), 30, "the healthy keys flowed");
    assert!(
        got.iter()
            .all(|r| r.header(h::CE_TYPE) != Some("after-poison")),
        "block-key: later row waited"
    );
    let failed = failed_rows(&pool).await?;
    let reason = |k: &str| {
        failed
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    assert!(reason("bad-topic").contains("does not exist"), "{failed:?}");
    assert!(reason("bad-headers").contains("header"), "{failed:?}");
    assert!(reason("bad-name").contains("invalid topic"), "{failed:?}");
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'pending' AND aggregate_id = 'bad-topic'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(waiting, 1, "the row behind the poison stays pending");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn skip_row_policy_lets_later_rows_of_the_key_flow(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-skip", 1).await?;
    append(
        &pool,
        &NewEvent::new("t", "k", "poison").topic(unique("never-created")),
    )
    .await?;
    append(
        &pool,
        &NewEvent::new("t", "k", "after-poison").topic(&topic),
    )
    .await?;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            poison_policy: PoisonPolicy::SkipRow,
            ..cfg()
        },
    )?;
    let got = consume(&topic, 1, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header(h::CE_TYPE), Some("after-poison"));
    assert_eq!(failed_rows(&pool).await?.len(), 1);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_record_too_large_for_kafka_fails_without_blocking_others(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-large", 1).await?;
    let big = NewEvent::new("t", "big", "big")
        .topic(&topic)
        .bytes_payload(vec![7u8; 2_000_000], "application/octet-stream");
    append(&pool, &big).await?;
    append_events(&pool, &topic, 10, 10).await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    let got = consume(&topic, 10, WAIT, SETTLE).await?;
    eventually(WAIT, "large row failed", || async {
        Ok(failed_rows(&pool).await?.len() == 1)
    })
    .await?;
    relay.stop().await?;
    assert_eq!(got.len(), 10);
    let failed = failed_rows(&pool).await?;
    assert!(failed[0].1.contains("MessageSizeTooLarge"), "{failed:?}");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn mark_mode_keeps_published_rows_for_retention(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-mark", 1).await?;
    append_events(&pool, &topic, 20, 4).await?;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            after_publish: AfterPublish::Mark {
                retention: Duration::from_secs(3600),
            },
            ..cfg()
        },
    )?;
    let got = consume(&topic, 20, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 20);
    let (published, with_time): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'published'), count(published_at) FROM outbox",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((published, with_time), (20, 20));
    // Past retention, cleanup removes them in bounded batches.
    sqlx::query("UPDATE outbox SET published_at = now() - interval '2 hours'")
        .execute(&pool)
        .await?;
    let deleted = outbox_relay::store::delete_expired(&pool, Duration::from_secs(3600), 8).await?;
    assert_eq!(deleted, 8, "bounded by the limit");
    Ok(())
}

fn fast_leases() -> RelayConfig {
    RelayConfig {
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(250),
        ..cfg()
    }
}

#[sqlx::test(migrations = false)]
async fn a_second_relay_shares_the_partitions_and_takes_over_when_the_first_stops(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "relay-share", 2).await?;
    let first = RunningRelay::start(&pool, fast_leases())?;
    eventually(WAIT, "first relay owns every partition", || async {
        Ok(owned_by_live_relays(&pool).await? == vec![32])
    })
    .await?;
    let second = RunningRelay::start(&pool, fast_leases())?;
    eventually(WAIT, "partitions shared 16/16", || async {
        Ok(owned_by_live_relays(&pool).await? == vec![16, 16])
    })
    .await?;
    append_events(&pool, &topic, 200, 50).await?;
    eventually(WAIT, "published by both", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    first.stop().await?;
    // A clean stop hands the partitions back at once: the second relay has
    // them all within a heartbeat or two, well before a lease would expire.
    eventually(
        Duration::from_secs(2),
        "second relay owns everything",
        || async { Ok(owned_by_live_relays(&pool).await? == vec![32]) },
    )
    .await?;
    append_events(&pool, &topic, 100, 50).await?;
    let got = consume(&topic, 300, WAIT, SETTLE).await?;
    second.stop().await?;
    assert_eq!(
        got.len(),
        300,
        "no loss, no duplicates across a clean hand-over"
    );
    let relays = outbox_relay::store::relays(&pool).await?;
    assert!(relays.is_empty(), "stopped relays deregister: {relays:?}");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn missing_topic_then_failed_retry_republishes(pool: PgPool) -> anyhow::Result<()> {
    let topic_later = unique("created-later");
    outbox_core::migrate(&pool).await?;
    append(
        &pool,
        &NewEvent::new("t", "k", "waits-for-topic").topic(&topic_later),
    )
    .await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    eventually(WAIT, "row failed", || async {
        Ok(failed_rows(&pool).await?.len() == 1)
    })
    .await?;
    create_topic(&topic_later, 1).await?;
    let moved =
        outbox_relay::store::failed_retry(&pool, &outbox_relay::store::Selection::All).await?;
    assert_eq!(moved, 1);
    let got = consume(&topic_later, 1, WAIT, SETTLE).await?;
    relay.stop().await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header(h::CE_TYPE), Some("waits-for-topic"));
    Ok(())
}

/// Killing the relay's database connections mid-drain: it reconnects, keeps
/// its partitions and finishes without loss or reordering.
#[sqlx::test(migrations = false)]
async fn losing_its_database_connections_mid_drain_loses_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    const N: i64 = 5000;
    let topic = outbox_with_topic(&pool, "relay-fence", 3).await?;
    integration_tests::insert_sql_rows(&pool, &topic, N, 50).await?;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            batch_size: 200,
            ..cfg()
        },
    )?;
    eventually(WAIT, "draining started", || async {
        Ok(pending(&pool).await? < N)
    })
    .await?;
    let killed = integration_tests::kill_relay_connections(&pool).await?;
    assert!(killed >= 1, "the relay's connections were killed");
    eventually(WAIT, "drained", || async { Ok(pending(&pool).await? == 0) }).await?;
    relay.stop().await?;
    let got = consume(&topic, N as usize, WAIT, SETTLE).await?;
    let dups = integration_tests::check_delivery(&got, N)?;
    assert!(
        dups <= 400,
        "{dups} duplicates; at most the two batches in flight"
    );
    Ok(())
}
