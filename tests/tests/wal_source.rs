//! The relay's WAL source (`--source wal`) against the real PostgreSQL and
//! broker: commit order, table-less events, restarts, a standby relay, a
//! poison event.
//!
//! Slots are cluster-wide: each test names its own and drops it. Creating a
//! slot waits for the transactions running at that moment, so each test
//! creates its slot before it opens any of its own.

use std::time::{Duration, Instant};

use integration_tests::{
    consume, database_url, drop_test_slots, eventually, outbox_with_topic, quick_relay_config,
    test_slot_name, unique, Received, RunningRelay,
};
use outbox_core::{append, emit, headers as h, NewEvent};
use outbox_relay::{
    health::State,
    slot::{self, ReplicationTarget},
    RelayConfig, WalSource,
};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_millis(1500);

/// A slot and publication for this test, and a relay config reading them.
async fn wal_setup(pool: &PgPool) -> anyhow::Result<(String, RelayConfig)> {
    drop_test_slots(pool, &[]).await;
    let name = test_slot_name("wal");
    slot::create(pool, &name, &name).await?;
    let mut wal = WalSource::new(ReplicationTarget::from_url(&database_url(pool))?);
    wal.slot = name.clone();
    wal.publication = name.clone();
    let cfg = RelayConfig {
        wal: Some(wal),
        ..quick_relay_config()
    };
    Ok((name, cfg))
}

fn ids(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|r| r.header(h::CE_ID).unwrap_or_default().to_string())
        .collect()
}

async fn left_in_outbox(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?,
    )
}

#[sqlx::test(migrations = false)]
async fn events_arrive_once_in_commit_order_rows_and_table_less_alike(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-order", 1).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let relay = RunningRelay::start(&pool, cfg)?;

    // A long transaction writes first and commits last; a short one on the
    // same key commits in between. Commit order is the order on the topic.
    let ev = |n: &str| NewEvent::new("order", "k-1", n).topic(&topic);
    let long_first = ev("long.first");
    let mut long = pool.begin().await?;
    append(&mut *long, &long_first).await?;
    let short = ev("short");
    emit(&pool, &short).await?;
    // One transaction mixing a row, a table-less event and a row: in order.
    let (a, b, c) = (ev("mixed.a"), ev("mixed.b"), ev("mixed.c"));
    let mut mixed = pool.begin().await?;
    append(&mut *mixed, &a).await?;
    emit(&mut *mixed, &b).await?;
    append(&mut *mixed, &c).await?;
    mixed.commit().await?;
    let long_last = ev("long.last");
    emit(&mut *long, &long_last).await?;
    long.commit().await?;
    // Debezium's style: the producer deletes its row in the same
    // transaction. The row is never visible, yet published once; the
    // delete that records it misses it, waits for it a while, and goes on.
    let deleted = ev("deleted.by.producer");
    let mut tx = pool.begin().await?;
    append(&mut *tx, &deleted).await?;
    sqlx::query("DELETE FROM outbox WHERE event_id = $1")
        .bind(deleted.event_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Rolled back: never published, row or table-less.
    let mut ghost = pool.begin().await?;
    append(&mut *ghost, &ev("ghost.row")).await?;
    emit(&mut *ghost, &ev("ghost.emitted")).await?;
    ghost.rollback().await?;

    let got = consume(&topic, 7, WAIT, SETTLE).await?;
    let expected: Vec<String> = [&short, &a, &b, &c, &long_first, &long_last, &deleted]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert_eq!(ids(&got), expected, "commit order, each once, no ghost");
    let b_rec = &got[2];
    assert_eq!(b_rec.key.as_deref(), Some("k-1"));
    assert_eq!(b_rec.header(h::CE_TYPE), Some("mixed.b"));

    // Published rows are deleted; the slot's position follows.
    eventually(WAIT, "published rows deleted", || async {
        Ok(left_in_outbox(&pool).await? == 0)
    })
    .await?;
    // The rows' ids are remembered, the table-less events' are not
    // (docs/schema.md: nothing would consult them).
    let remembered_ids = || async {
        let ids: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT event_id FROM outbox_published_ids ORDER BY event_id")
                .fetch_all(&pool)
                .await?;
        anyhow::Ok(ids)
    };
    eventually(WAIT, "the last batch recorded", || async {
        Ok(remembered_ids().await?.len() >= 4)
    })
    .await?;
    let remembered = remembered_ids().await?;
    let mut rows = vec![
        a.event_id,
        c.event_id,
        long_first.event_id,
        deleted.event_id,
    ];
    rows.sort();
    assert_eq!(remembered, rows, "exactly the rows' ids are remembered");
    eventually(WAIT, "the slot confirmed everything", || async {
        let st = slot::status(&pool, &slot_name).await?.expect("slot");
        Ok(st.active && st.lag_bytes.unwrap_or(i64::MAX) < 16 * 1024)
    })
    .await?;
    relay.stop().await?;
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_restarted_relay_resumes_from_the_slot_and_a_standby_takes_over(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-restart", 3).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let event = |i: usize| {
        NewEvent::new("order", format!("o-{}", i % 7), "order.paid")
            .topic(&topic)
            .json_payload(&serde_json::json!({ "i": i }))
    };
    // Rows and table-less events, alternately.
    let write = |range: std::ops::Range<usize>| {
        let (pool, event) = (&pool, &event);
        async move {
            for i in range {
                if i % 2 == 0 {
                    append(pool, &event(i)?).await?;
                } else {
                    emit(pool, &event(i)?).await?;
                }
            }
            anyhow::Ok(())
        }
    };
    let first = RunningRelay::start(&pool, cfg.clone())?;
    eventually(WAIT, "the first relay reads the slot", || async {
        Ok(first.health.state() == State::Active)
    })
    .await?;
    let second = RunningRelay::start(&pool, cfg.clone())?;
    eventually(WAIT, "the second relay stands by", || async {
        Ok(second.health.state() == State::Standby)
    })
    .await?;
    assert!(
        second.health.reason().contains("holds the lease"),
        "{}",
        second.health.reason()
    );
    write(0..100).await?;
    eventually(WAIT, "the first hundred published", || async {
        Ok(left_in_outbox(&pool).await? == 0)
    })
    .await?;
    first.stop().await?;
    let stopped = Instant::now();
    eventually(WAIT, "the standby takes the slot over", || async {
        Ok(second.health.state() == State::Active)
    })
    .await?;
    let took_over = stopped.elapsed();
    println!("take-over after a graceful stop: {took_over:?}");
    // Written after the hand-over, and kept by the slot meanwhile.
    write(100..200).await?;
    let got = consume(&topic, 200, WAIT, SETTLE).await?;
    second.stop().await?;
    let mut seen: Vec<i64> = got
        .iter()
        .map(|r| r.json()["i"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 200, "every event, none lost");
    assert_eq!(got.len(), 200, "a graceful hand-over sends nothing twice");
    // Per key, in the order written.
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for r in &got {
        let i = r.json()["i"].as_i64().unwrap();
        let k = r.key.clone().unwrap();
        assert!(
            last.get(&k).is_none_or(|p| *p < i),
            "key {k}: {i} after {:?}",
            last.get(&k)
        );
        last.insert(k, i);
    }
    assert!(
        took_over < Duration::from_secs(10),
        "take-over took {took_over:?}"
    );
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

/// Also with `--exactly-once`, where the failures are recorded before the
/// batch's Kafka transaction commits.
#[sqlx::test(migrations = false)]
async fn a_poison_event_goes_to_failed_and_holds_its_key(pool: PgPool) -> anyhow::Result<()> {
    // Built now, not at the first `relay_cli` below: a build then would
    // block this test's one thread, and the in-process relay's lease with
    // it.
    integration_tests::relay_bin();
    for exactly_once in [false, true] {
        poison_event_goes_to_failed_and_holds_its_key(&pool, exactly_once).await?;
    }
    Ok(())
}

async fn poison_event_goes_to_failed_and_holds_its_key(
    pool: &PgPool,
    exactly_once: bool,
) -> anyhow::Result<()> {
    let pool = pool.clone();
    let topic = outbox_with_topic(&pool, "wal-poison", 1).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            exactly_once,
            checkpoint_topic: unique("wal-poison-checkpoints"),
            ..cfg
        },
    )?;
    // A table-less event for a topic that does not exist fails for good;
    // the later events of its key wait behind it (block-key), others flow.
    let missing = unique("wal-missing");
    let poison = NewEvent::new("order", "bad", "order.paid").topic(&missing);
    emit(&pool, &poison).await?;
    let behind_row = NewEvent::new("order", "bad", "order.shipped").topic(&topic);
    append(&pool, &behind_row).await?;
    let behind_msg = NewEvent::new("order", "bad", "order.closed").topic(&topic);
    emit(&pool, &behind_msg).await?;
    let fine = NewEvent::new("order", "good", "order.paid").topic(&topic);
    emit(&pool, &fine).await?;

    let got = consume(&topic, 1, WAIT, SETTLE).await?;
    assert_eq!(ids(&got), [fine.event_id.to_string()]);
    let failed: std::collections::HashMap<uuid::Uuid, String> =
        sqlx::query_as::<_, (uuid::Uuid, String)>(
            "SELECT event_id, last_error FROM outbox WHERE status = 'failed'",
        )
        .fetch_all(&pool)
        .await?
        .into_iter()
        .collect();
    assert_eq!(
        failed.len(),
        3,
        "the poison event and its key's later ones: {failed:?}"
    );
    let why = |e: &NewEvent| failed[&e.event_id].clone();
    assert!(why(&poison).contains("does not exist"), "{}", why(&poison));
    assert!(why(&behind_row).contains("held"), "{}", why(&behind_row));
    assert!(why(&behind_msg).contains("held"), "{}", why(&behind_msg));
    // The operator sees them like any failed row.
    let listed = outbox_relay::store::failed_list(&pool, 10).await?;
    assert_eq!(listed.len(), 3);

    // Fixed (the topic now exists) and retried as a user would: the rows
    // come back as new inserts, which the WAL relay reads, in their order.
    test_kit::topic::create(&integration_tests::brokers(), &missing, 1).await?;
    let (code, out) =
        integration_tests::relay_cli(&database_url(&pool), &["failed", "retry", "--all"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 failed rows inserted again"), "{out}");
    let retried = consume(&missing, 1, WAIT, SETTLE).await?;
    assert_eq!(ids(&retried), [poison.event_id.to_string()]);
    let got = consume(&topic, 3, WAIT, SETTLE).await?;
    assert_eq!(
        ids(&got),
        [
            fine.event_id.to_string(),
            behind_row.event_id.to_string(),
            behind_msg.event_id.to_string()
        ],
        "the held events after the retried one, in order, once"
    );
    eventually(WAIT, "nothing failed or pending is left", || async {
        Ok(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?
            == 0)
    })
    .await?;
    relay.stop().await?;
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

/// Writes `range` as events of 5 keys, rows and table-less alternately.
async fn write_events(
    pool: &PgPool,
    topic: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    for i in range {
        let e = NewEvent::new("order", format!("o-{}", i % 5), "order.paid")
            .topic(topic)
            .json_payload(&serde_json::json!({ "i": i }))?;
        if i % 2 == 0 {
            append(pool, &e).await?;
        } else {
            emit(pool, &e).await?;
        }
    }
    Ok(())
}

/// Every event of `0..n` at least once, in order per key; returns how many
/// arrived twice.
fn check_complete_in_order(got: &[Received], n: usize) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for r in got {
        let i = r.json()["i"].as_i64().unwrap();
        let k = r.key.clone().unwrap();
        // A resent run starts again from an earlier event; within the
        // first sending of each event the key's order must hold.
        if seen.insert(i) {
            assert!(
                last.get(&k).is_none_or(|p| *p < i),
                "key {k}: {i} after {:?}",
                last.get(&k)
            );
            last.insert(k, i);
        }
    }
    assert_eq!(seen.len(), n, "every event arrived");
    got.len() - n
}

/// `outbox-relay run` arguments reading `slot` (HTTP on a free port), then
/// `more`.
fn wal_args(slot: &str, more: &[&str]) -> Vec<String> {
    [
        "--source",
        "wal",
        "--slot",
        slot,
        "--publication",
        slot,
        "--http-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .chain(more)
    .map(|s| s.to_string())
    .collect()
}

#[sqlx::test(migrations = false)]
async fn a_killed_relay_loses_nothing_and_resends_only_its_window(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-kill", 3).await?;
    let (slot_name, _) = wal_setup(&pool).await?;
    let args = wal_args(&slot_name, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = integration_tests::spawn_relay(&pool, "wal-kill-1", &args)?;
    write_events(&pool, &topic, 0..300).await?;
    eventually(WAIT, "some events published", || async {
        Ok(left_in_outbox(&pool).await? < 150)
    })
    .await?;
    // kill -9 while events flow.
    let writer = {
        let (pool, topic) = (pool.clone(), topic.clone());
        tokio::spawn(async move { write_events(&pool, &topic, 300..600).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill()?;
    writer.await??;
    let mut relay = integration_tests::spawn_relay(&pool, "wal-kill-2", &args)?;
    let got = consume(&topic, 600, WAIT, SETTLE).await?;
    relay.stop(Duration::from_secs(10));
    let twice = check_complete_in_order(&got, 600);
    println!("kill -9: {twice} of 600 events sent twice");
    // The window: the batch in flight and the last status interval.
    assert!(twice <= 300, "{twice} duplicates");
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

/// Sends `signal` (`STOP`, `CONT`) to the process `pid`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

/// A reader that froze (SIGSTOP: its connection stays open, so PostgreSQL
/// would keep the slot for it until `wal_sender_timeout`, 60 s) is
/// replaced within its lease; when it wakes it confirms nothing and stands
/// by.
#[sqlx::test(migrations = false)]
async fn a_frozen_reader_is_replaced_within_its_lease_and_stands_by_when_it_wakes(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-frozen", 3).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let args = wal_args(
        &slot_name,
        &["--lease-ttl", "2s", "--heartbeat-interval", "500ms"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut frozen = integration_tests::spawn_relay(&pool, "wal-frozen-1", &args)?;
    write_events(&pool, &topic, 0..200).await?;
    eventually(WAIT, "the first relay publishes", || async {
        Ok(left_in_outbox(&pool).await? == 0)
    })
    .await?;
    let standby = RunningRelay::start(
        &pool,
        RelayConfig {
            lease_ttl: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            ..cfg
        },
    )?;
    eventually(WAIT, "the second relay stands by", || async {
        Ok(standby.health.state() == State::Standby)
    })
    .await?;

    signal(frozen.id(), "STOP")?;
    let frozen_at = Instant::now();
    eventually(WAIT, "the standby takes the slot over", || async {
        Ok(standby.health.state() == State::Active)
    })
    .await?;
    let took_over = frozen_at.elapsed();
    println!("take-over from a frozen reader (lease TTL 2 s): {took_over:?}");
    write_events(&pool, &topic, 200..400).await?;

    signal(frozen.id(), "CONT")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_events(&pool, &topic, 400..500).await?;
    let got = consume(&topic, 500, WAIT, SETTLE).await?;
    assert_eq!(
        standby.health.state(),
        State::Active,
        "the woken relay did not take the slot back"
    );
    frozen.stop(Duration::from_secs(10));
    standby.stop().await?;
    let log = std::fs::read_to_string(integration_tests::relay_log("wal-frozen-1"))?;
    assert!(
        log.contains("holds the lease"),
        "the woken relay stands by; its log:\n{log}"
    );
    let twice = check_complete_in_order(&got, 500);
    println!("frozen reader: {twice} of 500 events sent twice");
    assert!(
        took_over < Duration::from_secs(5),
        "take-over took {took_over:?} (lease TTL 2 s; without the lease it waits for wal_sender_timeout)"
    );
    assert!(twice <= 200, "{twice} duplicates");
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_terminated_replication_connection_is_reopened_without_loss(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-terminate", 3).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let relay = RunningRelay::start(&pool, cfg)?;
    eventually(WAIT, "the relay reads the slot", || async {
        Ok(relay.health.state() == State::Active)
    })
    .await?;
    write_events(&pool, &topic, 0..100).await?;
    // pg_terminate_backend on the walsender, twice, while events flow.
    for round in 0..2 {
        let killed: bool = sqlx::query_scalar(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot_name)
        .fetch_one(&pool)
        .await?;
        assert!(killed, "round {round}: the walsender was running");
        write_events(&pool, &topic, 100 + round * 100..200 + round * 100).await?;
        eventually(WAIT, "the relay reads the slot again", || async {
            Ok(relay.health.state() == State::Active
                && slot::status(&pool, &slot_name)
                    .await?
                    .is_some_and(|s| s.active))
        })
        .await?;
    }
    let got = consume(&topic, 300, WAIT, SETTLE).await?;
    relay.stop().await?;
    let twice = check_complete_in_order(&got, 300);
    println!("two terminated connections: {twice} of 300 events sent twice");
    assert!(
        twice <= 200,
        "at most what was written around the two cuts: {twice}"
    );
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn an_idle_database_still_advances_its_slot(pool: PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let (slot_name, mut cfg) = wal_setup(&pool).await?;
    if let Some(wal) = cfg.wal.as_mut() {
        wal.heartbeat_interval = Duration::from_millis(300);
    }
    let relay = RunningRelay::start(&pool, cfg)?;
    eventually(WAIT, "the relay reads the slot", || async {
        Ok(relay.health.state() == State::Active)
    })
    .await?;
    // Another database on the same server writes WAL; this one is idle.
    let other = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    let filler = format!("wal_filler_{}", std::process::id());
    sqlx::query(&format!(
        "CREATE TABLE {filler} AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g"
    ))
    .execute(&other)
    .await?;
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&other)
        .await?;
    sqlx::query(&format!("DROP TABLE {filler}"))
        .execute(&other)
        .await?;
    other.close().await;
    eventually(
        WAIT,
        "the slot's confirmed position passes the other database's writes",
        || async {
            let st = slot::status(&pool, &slot_name).await?.expect("slot");
            let passed: bool = sqlx::query_scalar("SELECT $1::pg_lsn >= $2::pg_lsn")
                .bind(st.confirmed_flush_lsn.unwrap_or_else(|| "0/0".into()))
                .bind(&written)
                .fetch_one(&pool)
                .await?;
            Ok(passed)
        },
    )
    .await?;
    relay.stop().await?;
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

/// The README's procedure, as a user runs it: poll relays publish while
/// the slot is created, they drain what was written before it, then a WAL
/// relay replaces them. Nothing lost, nothing twice, order kept per key.
#[sqlx::test(migrations = false)]
async fn switching_a_running_system_from_poll_to_wal_loses_and_repeats_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-switch", 3).await?;
    let rows_only = |range: std::ops::Range<usize>| {
        let (pool, topic) = (pool.clone(), topic.clone());
        async move {
            for i in range {
                let e = NewEvent::new("order", format!("o-{}", i % 5), "order.paid")
                    .topic(&topic)
                    .json_payload(&serde_json::json!({ "i": i }))?;
                append(&pool, &e).await?;
            }
            anyhow::Ok(())
        }
    };
    let poll = RunningRelay::start(&pool, quick_relay_config())?;
    rows_only(0..200).await?;
    // 1. Create the slot while the poll relay runs and producers write.
    let writing = tokio::spawn(rows_only(200..400));
    let (slot_name, wal_cfg) = wal_setup(&pool).await?;
    writing.await??;
    // 2. Drain: the poll relay publishes everything pending.
    eventually(WAIT, "the poll relay drained the table", || async {
        Ok(left_in_outbox(&pool).await? == 0)
    })
    .await?;
    // 3. Stop the poll relay, start the WAL relay; producers may now also
    //    use outbox_emit.
    poll.stop().await?;
    let wal = RunningRelay::start(&pool, wal_cfg)?;
    write_events(&pool, &topic, 400..600).await?;
    let got = consume(&topic, 600, WAIT, SETTLE).await?;
    wal.stop().await?;
    let twice = check_complete_in_order(&got, 600);
    assert_eq!(twice, 0, "rows the poll relay published are not sent again");
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_delayed_event_is_published_when_due_in_commit_order_at_that_time(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "wal-delayed", 1).await?;
    let (slot_name, cfg) = wal_setup(&pool).await?;
    let relay = RunningRelay::start(&pool, cfg)?;
    let ev = |n: &str| NewEvent::new("order", "k-1", n).topic(&topic);

    // A table-less event delayed by 3 s cannot wait in the WAL: it waits
    // as a delayed row, which the slot skips, and is published once due.
    let before = ev("before");
    let late = ev("late").delayed_by(Duration::from_secs(3));
    let mut tx = pool.begin().await?;
    emit(&mut *tx, &before).await?;
    emit(&mut *tx, &late).await?;
    tx.commit().await?;
    let due = late.not_before.expect("delayed");
    let first = consume(&topic, 1, WAIT, Duration::from_millis(300)).await?;
    assert_eq!(ids(&first), [before.event_id.to_string()]);
    assert!(
        chrono::Utc::now() < due,
        "the first read took past the due time"
    );

    let got = consume(&topic, 2, WAIT, Duration::from_millis(300)).await?;
    assert_eq!(
        ids(&got),
        [before.event_id.to_string(), late.event_id.to_string()]
    );
    assert!(
        got[1].timestamp_ms.expect("timestamp") >= due.timestamp_millis(),
        "published before its due time"
    );
    // An event committed after the due time comes after it.
    let after = ev("after");
    append(&pool, &after).await?;
    let got = consume(&topic, 3, WAIT, SETTLE).await?;
    assert_eq!(
        ids(&got),
        [
            before.event_id.to_string(),
            late.event_id.to_string(),
            after.event_id.to_string()
        ],
        "each once, the delayed one in the key's order at its due time"
    );
    eventually(WAIT, "the outbox emptied", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        Ok(rows == 0)
    })
    .await?;
    relay.stop().await?;
    drop_test_slots(&pool, &[&slot_name]).await;
    Ok(())
}

/// Exactly-once with the WAL source: the first relay stops (as if killed)
/// right after its first Kafka commit, before it records the batch, so that
/// batch is in Kafka while its rows are pending and the slot has not moved.
/// The relay that takes the slot over fences it, reads the slot's
/// checkpoint, deletes those rows without sending them again, and
/// publishes the rest: each event once for `read_committed` readers, the
/// Java consumer included. With the checkpoint out of the taker's sight
/// (another checkpoint topic), the same crash sends that batch twice,
/// which shows the test can fail.
#[sqlx::test(migrations = false)]
async fn exactly_once_a_crash_after_the_kafka_commit_sends_nothing_twice(
    pool: PgPool,
) -> anyhow::Result<()> {
    use integration_tests::{copies, java_ids};
    for checkpoint_seen in [true, false] {
        let topic = outbox_with_topic(&pool, "wal-eo", 3).await?;
        let (slot_name, cfg) = wal_setup(&pool).await?;
        let checkpoints = unique("wal-eo-checkpoints");
        let eo = |checkpoint_topic: &str| RelayConfig {
            exactly_once: true,
            checkpoint_topic: checkpoint_topic.to_string(),
            batch_size: 50,
            lease_ttl: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            ..cfg.clone()
        };
        // Written before the relay starts: full batches of 50.
        write_events(&pool, &topic, 0..300).await?;
        RunningRelay::crash_after_first_commit(&pool, eo(&checkpoints)).await?;
        // Up to 50 events: whatever had arrived when the stream paused.
        let first = consume(&topic, 1, WAIT, SETTLE).await?.len();
        assert!(first <= 50, "one batch was committed in Kafka: {first}");
        assert_eq!(
            left_in_outbox(&pool).await?,
            150,
            "every row is still pending, the first batch's too"
        );
        if checkpoint_seen {
            let (code, out) = integration_tests::relay_cli(
                &database_url(&pool),
                &[
                    "status",
                    "--exactly-once",
                    "--kafka-brokers",
                    &integration_tests::brokers(),
                    "--checkpoint-topic",
                    &checkpoints,
                ],
            );
            assert_eq!(code, 0, "{out}");
            assert!(
                out.contains(&format!("slot:{slot_name} (relay ")) && out.contains(" up to "),
                "status shows the slot's checkpoint: {out}"
            );
        }
        let taker_checkpoints = if checkpoint_seen {
            checkpoints.clone()
        } else {
            unique("wal-eo-elsewhere")
        };
        let taker = RunningRelay::start(&pool, eo(&taker_checkpoints))?;
        let expected = if checkpoint_seen { 300 } else { 300 + first };
        let got = consume(&topic, expected, WAIT, SETTLE).await?;
        eventually(WAIT, "every row deleted", || async {
            Ok(left_in_outbox(&pool).await? == 0)
        })
        .await?;
        taker.stop().await?;
        let twice = check_complete_in_order(&got, 300);
        println!(
            "checkpoint seen: {checkpoint_seen}; first batch {first}; {} records, {twice} twice",
            got.len()
        );
        if checkpoint_seen {
            assert_eq!(twice, 0, "each event exactly once");
            let per_event = copies(&got);
            assert!(per_event.values().all(|n| *n == 1), "{per_event:?}");
            let java = java_ids(&topic, 300, "read_committed")?;
            assert_eq!(java.len(), 300, "the Java consumer read each record once");
            assert_eq!(
                java.iter().collect::<std::collections::HashSet<_>>().len(),
                300
            );
        } else {
            assert_eq!(
                twice, first,
                "without the checkpoint the crashed batch comes twice"
            );
        }
        drop_test_slots(&pool, &[&slot_name]).await;
    }
    Ok(())
}
