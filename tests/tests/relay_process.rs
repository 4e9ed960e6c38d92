//! The `outbox-relay` binary as operators run it: crashes, signals, broker
//! outages, the operator commands and the HTTP surface.

use std::time::Duration;

use integration_tests::{
    check_delivery, consume, consume_from, create_topic_on, database_url, eventually, free_port,
    http_get, insert_sql_rows, outbox_with_topic, pending, relay_bin, spawn_relay, unique,
    PrivateBroker, RunningRelay,
};
use outbox_relay::{health::State, RelayConfig};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(120);

#[sqlx::test(migrations = false)]
async fn kill_9_mid_batch_then_restart_loses_nothing(pool: PgPool) -> anyhow::Result<()> {
    const N: i64 = 20_000;
    const BATCH: &str = "500";
    let topic = outbox_with_topic(&pool, "kill9", 3).await?;
    insert_sql_rows(&pool, &topic, N, 200).await?;

    let port = free_port().to_string();
    let mut relay = spawn_relay(
        &pool,
        "kill9-a",
        &[
            "--batch-size",
            BATCH,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    eventually(WAIT, "draining started", || async {
        Ok(pending(&pool).await? < N - 1000)
    })
    .await?;
    relay.kill()?; // SIGKILL, mid-drain
    relay.wait_exit(Duration::from_secs(5))?;
    let left = pending(&pool).await?;
    assert!(
        left > 0,
        "the kill came after the drain ended; make N larger"
    );

    let port = free_port().to_string();
    let mut relay = spawn_relay(
        &pool,
        "kill9-b",
        &[
            "--batch-size",
            BATCH,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    eventually(WAIT, "backlog drained after restart", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.terminate();
    assert_eq!(relay.wait_exit(Duration::from_secs(20))?, Some(0));

    let got = consume(&topic, N as usize, WAIT, Duration::from_secs(2)).await?;
    let duplicates = check_delivery(&got, N)?;
    assert!(
        duplicates <= 500,
        "{duplicates} duplicates; at most the batch in flight (500) may repeat"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn sigterm_finishes_the_batch_flushes_and_exits_0(pool: PgPool) -> anyhow::Result<()> {
    const N: i64 = 20_000;
    let topic = outbox_with_topic(&pool, "sigterm", 2).await?;
    insert_sql_rows(&pool, &topic, N, 50).await?;
    let port = free_port().to_string();
    let mut relay = spawn_relay(
        &pool,
        "sigterm",
        &[
            "--batch-size",
            "1000",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    eventually(WAIT, "draining started", || async {
        Ok(pending(&pool).await? < N - 2000)
    })
    .await?;
    relay.terminate();
    let started = std::time::Instant::now();
    assert_eq!(
        relay.wait_exit(Duration::from_secs(20))?,
        Some(0),
        "exit code after SIGTERM"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped within the shutdown bound"
    );

    // Every row the relay removed is in Kafka: nothing was deleted unflushed.
    let published = N - pending(&pool).await?;
    let got = consume(&topic, published as usize, WAIT, Duration::from_secs(2)).await?;
    let seqs: std::collections::HashSet<i64> = got
        .iter()
        .map(|r| r.json()["seq"].as_i64().unwrap())
        .collect();
    let still: Vec<i64> = sqlx::query_scalar("SELECT (payload->>'seq')::bigint FROM outbox")
        .fetch_all(&pool)
        .await?;
    for seq in 1..=N {
        assert!(
            seqs.contains(&seq) || still.contains(&seq),
            "seq {seq} neither published nor pending"
        );
    }
    assert!(
        got.len() as i64 == published,
        "published {published} rows but {} records arrived",
        got.len()
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_broker_outage_loses_nothing_and_reports_not_ready(pool: PgPool) -> anyhow::Result<()> {
    // A broker of its own: it is killed -9 and restarted with its storage.
    let mut broker = PrivateBroker::start()?;
    outbox_core::migrate(&pool).await?;
    let topic = unique("outage");
    create_topic_on(&broker.address, &topic, 2).await?;
    let relay = RunningRelay::start_exactly(
        &pool,
        RelayConfig {
            brokers: broker.address.clone(),
            poll_interval: Duration::from_millis(200),
            publish_timeout: Duration::from_secs(3),
            max_backoff: Duration::from_secs(1),
            ..RelayConfig::default()
        },
    )?;
    insert_sql_rows(&pool, &topic, 100, 10).await?;
    eventually(WAIT, "first rows published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;

    broker.kill();
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'load', 'k' || (g % 10), 'load.row', $1, jsonb_build_object('seq', g) \
         FROM generate_series(101, 300) g ORDER BY g",
    )
    .bind(&topic)
    .execute(&pool)
    .await?;
    eventually(WAIT, "relay reports degraded", || async {
        Ok(relay.health.state() == State::Degraded)
    })
    .await?;
    assert!(!relay.health.is_ready());
    assert!(
        relay.health.reason().contains("kafka"),
        "{}",
        relay.health.reason()
    );
    assert_eq!(
        pending(&pool).await?,
        200,
        "rows wait while the broker is down"
    );
    // Lose every database connection too, mid-outage: the relay must
    // reconnect, keep its partitions and publish once it can.
    let killed = integration_tests::kill_relay_connections(&pool).await?;
    assert!(killed >= 1, "the relay's connections were killed");

    // The relay's producer timed out batch after batch meanwhile, and
    // librdkafka bumped its idempotent epoch each time; the relay keeps that
    // producer, and the restarted broker accepts the bumped epoch.
    broker.restart()?;
    eventually(WAIT, "backlog drained after the outage", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    eventually(WAIT, "ready again", || async {
        Ok(relay.health.is_ready())
    })
    .await?;
    relay.stop().await?;
    let got = consume_from(&broker.address, &topic, 300, WAIT, Duration::from_secs(2)).await?;
    // The rows from before the outage survived the restart, every row
    // written during it arrived, and per key in order.
    let duplicates = check_delivery(&got, 300)?;
    assert!(duplicates <= 200, "{duplicates} duplicates");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn relay_reconnects_after_its_database_connections_are_killed(
    pool: PgPool,
) -> anyhow::Result<()> {
    const N: i64 = 5_000;
    let topic = outbox_with_topic(&pool, "pgkill", 2).await?;
    insert_sql_rows(&pool, &topic, N, 20).await?;
    let relay = RunningRelay::start(
        &pool,
        RelayConfig {
            batch_size: 200,
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )?;
    eventually(WAIT, "draining started", || async {
        Ok(pending(&pool).await? < N)
    })
    .await?;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&pool)
    .await?;
    assert!(killed >= 1);
    eventually(WAIT, "drained after reconnect", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;
    let got = consume(&topic, N as usize, WAIT, Duration::from_secs(2)).await?;
    let dups = check_delivery(&got, N)?;
    assert!(dups <= 200, "{dups} duplicates; at most one batch");
    Ok(())
}

fn cli(pool: &PgPool, args: &[&str]) -> (i32, String) {
    integration_tests::relay_cli(&database_url(pool), args)
}

#[sqlx::test(migrations = false)]
async fn operator_commands_status_and_failed_rows(pool: PgPool) -> anyhow::Result<()> {
    let (code, out) = cli(&pool, &["status"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("outbox-relay migrate"),
        "tells what to do: {out}"
    );

    let (code, out) = cli(&pool, &["migrate"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("applied V1__create_outbox, V2__relay_partitions"),
        "{out}"
    );
    let (_, out) = cli(&pool, &["migrate"]);
    assert!(out.contains("current"), "{out}");

    let topic = unique("ops");
    insert_sql_rows(&pool, &topic, 3, 3).await?;
    sqlx::query("UPDATE outbox SET status = 'failed', last_error = 'boom', failed_at = now() WHERE (payload->>'seq')::int <= 2")
        .execute(&pool)
        .await?;
    let (code, out) = cli(&pool, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("pending:            1") && out.contains("failed:             2"),
        "{out}"
    );
    assert!(
        out.contains("relays: 0 live") && out.contains("partitions: 32"),
        "{out}"
    );
    let (_, out) = cli(&pool, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["failed"], 2);
    let parts = json["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 32);
    let backlog: i64 = parts.iter().map(|p| p["pending"].as_i64().unwrap()).sum();
    assert_eq!(backlog, 1, "the pending row is counted in its partition");

    let (_, out) = cli(&pool, &["failed", "list"]);
    assert_eq!(out.matches("reason: boom").count(), 2, "{out}");
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE status = 'failed' ORDER BY id")
            .fetch_all(&pool)
            .await?;
    let (code, out) = cli(&pool, &["failed", "retry", "--id", &ids[0].to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 failed rows put back"), "{out}");
    let event: uuid::Uuid = sqlx::query_scalar("SELECT event_id FROM outbox WHERE id = $1")
        .bind(ids[1])
        .fetch_one(&pool)
        .await?;
    let (_, out) = cli(
        &pool,
        &["failed", "discard", "--event-id", &event.to_string()],
    );
    assert!(out.contains("1 failed rows discarded"), "{out}");
    assert_eq!(pending(&pool).await?, 2);

    // Bad usage: exit 2 with a message.
    let (code, out) = cli(&pool, &["failed", "retry"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = cli(&pool, &["run", "--poll-interval", "soon"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = cli(&pool, &["run", "--topic-template", "bad topic"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("topic template"), "{out}");
    let out = std::process::Command::new(relay_bin())
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn http_surface_reports_metrics_health_and_readiness(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "http", 1).await?;
    insert_sql_rows(&pool, &topic, 50, 5).await?;
    let port = free_port();
    let mut relay = spawn_relay(
        &pool,
        "http",
        &["--http-addr", &format!("127.0.0.1:{port}")],
    )?;
    eventually(WAIT, "published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    eventually(WAIT, "ready", || async {
        Ok(http_get(port, "/readyz")
            .map(|(c, _)| c == 200)
            .unwrap_or(false))
    })
    .await?;
    assert_eq!(http_get(port, "/healthz")?.0, 200);
    // The per-partition gauges come with the first stats pass after the
    // relay took its partitions (every 5 s).
    eventually(WAIT, "per-partition gauges", || async {
        Ok(http_get(port, "/metrics")
            .map(|(_, m)| m.contains("outbox_relay_partition_pending_rows{partition="))
            .unwrap_or(false))
    })
    .await?;
    // Idle after the 50 rows, it sleeps until the poll timer. The first nap
    // may end early on the wake-up the listener gives when it connects, so
    // the timer's count shows up one poll interval (500 ms) later.
    eventually(WAIT, "a wake-up by the poll timer", || async {
        Ok(http_get(port, "/metrics")
            .map(|(_, m)| m.contains("outbox_relay_wakeups_total{by=\"timer\"}"))
            .unwrap_or(false))
    })
    .await?;
    let (code, metrics) = http_get(port, "/metrics")?;
    assert_eq!(code, 200);
    for name in [
        "outbox_relay_published_total",
        "outbox_relay_batch_size",
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_pending_rows",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_failed_rows",
        "outbox_relay_partitions_owned 32",
        "outbox_relay_live_relays 1",
        "outbox_relay_partition_pending_rows{partition=",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "outbox_relay_published_total{{topic=\"{topic}\"}} 50"
        )),
        "{metrics}"
    );
    relay.terminate();
    assert_eq!(relay.wait_exit(Duration::from_secs(20))?, Some(0));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn unreachable_broker_is_not_ready_with_the_reason(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "nobroker", 1).await?;
    insert_sql_rows(&pool, &topic, 5, 5).await?;
    let port = free_port();
    let dead = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{port}");
    let mut relay = integration_tests::spawn_relay_on(
        &pool,
        &dead,
        "nobroker",
        &["--http-addr", &http, "--publish-timeout", "2s"],
    )?;
    eventually(WAIT, "not ready with a kafka reason", || async {
        Ok(match http_get(port, "/readyz") {
            Ok((503, body)) => body.contains("kafka"),
            _ => false,
        })
    })
    .await?;
    assert_eq!(http_get(port, "/healthz")?.0, 200);
    assert_eq!(pending(&pool).await?, 5, "nothing lost or dropped");
    relay.terminate();
    assert_eq!(relay.wait_exit(Duration::from_secs(20))?, Some(0));
    Ok(())
}

/// Three relay processes share the partitions. One killed with -9 keeps its
/// partitions until its lease runs out, then the other two take them over;
/// the backlog drains with nothing lost, per-key order kept, and at most the
/// killed relay's batch in flight repeated.
#[sqlx::test(migrations = false)]
async fn a_killed_relays_partitions_are_taken_over_when_its_lease_runs_out(
    pool: PgPool,
) -> anyhow::Result<()> {
    const N: i64 = 20_000;
    const BATCH: i64 = 200;
    let topic = outbox_with_topic(&pool, "takeover", 3).await?;
    let mut relays = Vec::new();
    for i in 0..3 {
        let port = free_port().to_string();
        relays.push(spawn_relay(
            &pool,
            &format!("takeover-{i}"),
            &[
                "--lease-ttl",
                "2s",
                "--heartbeat-interval",
                "400ms",
                "--batch-size",
                &BATCH.to_string(),
                "--relay-name",
                &format!("takeover{i}"),
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ],
        )?);
    }
    eventually(WAIT, "three relays share the partitions", || async {
        let live = integration_tests::owned_by_live_relays(&pool).await?;
        Ok(live.len() == 3 && live.iter().all(|&n| n >= 10))
    })
    .await?;
    insert_sql_rows(&pool, &topic, N, 1000).await?;
    eventually(WAIT, "draining started", || async {
        Ok(pending(&pool).await? < N - 2000)
    })
    .await?;

    let victim = relays.remove(0);
    let victim_id = outbox_relay::store::relays(&pool)
        .await?
        .into_iter()
        .find(|r| r.relay_id.starts_with("takeover0-"))
        .map(|r| r.relay_id)
        .expect("the first relay is registered");
    let mut victim = victim;
    victim.kill()?; // SIGKILL
    let killed = std::time::Instant::now();
    victim.wait_exit(Duration::from_secs(5))?;
    eventually(
        Duration::from_secs(15),
        "its partitions taken over",
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox_relay_partitions WHERE owner = $1")
                    .bind(&victim_id)
                    .fetch_one(&pool)
                    .await?;
            Ok(left == 0)
        },
    )
    .await?;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "taken over after {took:?}: before the lease (2 s, renewed every 0.4 s) ran out"
    );
    assert!(
        took <= Duration::from_secs(6),
        "taken over after {took:?}; the bound is the TTL plus a heartbeat"
    );
    let owners: Vec<Option<String>> =
        sqlx::query_scalar("SELECT owner FROM outbox_relay_partitions")
            .fetch_all(&pool)
            .await?;
    assert!(owners.iter().all(|o| o.is_some()), "every partition owned");

    eventually(WAIT, "drained by the other two", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    for r in &relays {
        r.terminate();
    }
    for r in &mut relays {
        assert_eq!(r.wait_exit(Duration::from_secs(20))?, Some(0));
    }
    let got = consume(&topic, N as usize, WAIT, Duration::from_secs(2)).await?;
    let dups = check_delivery(&got, N)?;
    assert!(
        dups as i64 <= BATCH,
        "{dups} duplicates; at most the killed relay's batch in flight"
    );
    Ok(())
}

/// Resource bound: the relay's memory stays flat through a 30 s broker outage
/// while producers keep writing (the backlog grows in PostgreSQL, not in the
/// relay), and the backlog drains once the broker is back. Prints its figures
/// (RELIABILITY.md quotes them).
#[sqlx::test(migrations = false)]
async fn relay_memory_stays_flat_through_a_broker_outage_while_producers_write(
    pool: PgPool,
) -> anyhow::Result<()> {
    const RATE_PER_TICK: i64 = 50; // every 100 ms: 500 events/s
    let mut broker = PrivateBroker::start()?;
    let topic = unique("outage-mem");
    outbox_core::migrate(&pool).await?;
    create_topic_on(&broker.address, &topic, 3).await?;
    let port = free_port().to_string();
    let relay = spawn_relay(
        &pool,
        "outage-mem",
        &[
            "--kafka-brokers",
            &broker.address,
            "--publish-timeout",
            "5s",
            "--batch-size",
            "500",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    let pid = relay.id();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (pool, stop, topic) = (pool.clone(), stop.clone(), topic.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut written = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                sqlx::query(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
                     SELECT gen_random_uuid(), 'load', 'k' || (g % 100), 'load.row', $1, \
                            jsonb_build_object('seq', g, 'pad', repeat('x', 170)) \
                     FROM generate_series($2, $3) g ORDER BY g",
                )
                .bind(&topic)
                .bind(written + 1)
                .bind(written + RATE_PER_TICK)
                .execute(&pool)
                .await?;
                written += RATE_PER_TICK;
            }
            anyhow::Ok(written)
        })
    };
    let sample = |secs: u64| async move {
        let mut peak = 0;
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            peak = peak.max(test_kit::process::rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        peak
    };

    let before = sample(10).await;
    broker.kill();
    let during = sample(30).await;
    let backlog = pending(&pool).await?;
    broker.restart()?;
    // The in-memory broker comes back empty: the topic is created again.
    create_topic_on(&broker.address, &topic, 3).await?;
    let written = {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        producer.await??
    };
    let drain_started = std::time::Instant::now();
    let mut after = 0;
    // Rows the relay tried before the topic was back failed as "topic does
    // not exist": an operator's `failed retry` puts them back, in order.
    eventually(WAIT, "backlog drained after the outage", || {
        after = after.max(test_kit::process::rss_kib(pid).unwrap_or(0));
        async {
            outbox_relay::store::failed_retry(&pool, &outbox_relay::store::Selection::All).await?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&pool)
                .await?;
            Ok(left == 0)
        }
    })
    .await?;
    let drained_in = drain_started.elapsed();
    relay.terminate();
    eprintln!(
        "relay RSS: {} MiB before the outage (peak), {} MiB during 30 s of outage (peak), \
         {} MiB while draining; {written} events written, backlog {backlog} at the end of the outage, \
         drained in {:.1} s",
        before / 1024,
        during / 1024,
        after / 1024,
        drained_in.as_secs_f64()
    );
    assert!(before > 0 && during > 0, "RSS was sampled");
    assert!(
        backlog > 10_000,
        "the backlog grew during the outage: {backlog}"
    );
    assert!(
        during <= before + before / 2 + 8 * 1024,
        "memory grew during the outage: {before} KiB -> {during} KiB"
    );
    assert!(
        after <= before + before / 2 + 8 * 1024,
        "memory grew while draining: {before} KiB -> {after} KiB"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn status_on_an_older_schema_names_the_missing_migration(pool: PgPool) -> anyhow::Result<()> {
    // The outbox schema as it was before V4, applied with another tool.
    for sql in [
        include_str!("../../outbox-core/migrations/V1__create_outbox.sql"),
        include_str!("../../outbox-core/migrations/V2__relay_partitions.sql"),
        include_str!("../../outbox-core/migrations/V3__failed_key_hash_index.sql"),
    ] {
        sqlx::raw_sql(sql).execute(&pool).await?;
    }
    let (code, out) = cli(&pool, &["status"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("migration V4") && out.contains("outbox-relay migrate"),
        "{out}"
    );
    Ok(())
}

/// A failed row's log line names its event id, and its correlation id only
/// when it has one: never `correlation.id=""`.
#[sqlx::test(migrations = false)]
async fn a_failed_rows_log_line_has_no_empty_correlation_id(pool: PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let missing = unique("no-such-topic");
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, correlation_id) \
         VALUES (gen_random_uuid(), 't', 'a', 'x', $1, NULL), (gen_random_uuid(), 't', 'b', 'x', $1, 'req-7f3a')",
    )
    .bind(&missing)
    .execute(&pool)
    .await?;
    let name = unique("corr-log");
    let port = free_port().to_string();
    let relay = spawn_relay(&pool, &name, &["--http-addr", &format!("127.0.0.1:{port}")])?;
    eventually(WAIT, "both rows failed", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'failed'")
            .fetch_one(&pool)
            .await?;
        Ok(n == 2)
    })
    .await?;
    relay.terminate();
    drop(relay);
    let log = std::fs::read_to_string(std::env::temp_dir().join(format!("{name}.log")))?;
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("moved to failed"))
        .collect();
    assert_eq!(failed.len(), 2, "{log}");
    assert!(!log.contains("correlation.id=\"\""), "{log}");
    assert_eq!(
        failed
            .iter()
            .filter(|l| l.contains("correlation.id=\"req-7f3a\""))
            .count(),
        1,
        "{log}"
    );
    Ok(())
}

/// A relay started before the schema exists says so, with the command to
/// run, again every 30 s while it lasts (not once and then nothing), and
/// starts publishing once the schema appears.
#[sqlx::test(migrations = false)]
async fn a_relay_without_the_schema_keeps_saying_so_until_it_appears(
    pool: PgPool,
) -> anyhow::Result<()> {
    let name = unique("no-schema");
    let port = free_port();
    let relay = spawn_relay(&pool, &name, &["--http-addr", &format!("127.0.0.1:{port}")])?;
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let warnings = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("the lease heartbeat fails"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(75), "the warning repeated", || async {
        Ok(warnings().len() >= 2)
    })
    .await?;
    for line in warnings() {
        assert!(line.contains("outbox-relay migrate"), "{line}");
    }
    outbox_core::migrate(&pool).await?;
    eventually(WAIT, "ready once migrated", || async {
        Ok(http_get(port, "/readyz")
            .map(|(c, _)| c == 200)
            .unwrap_or(false))
    })
    .await?;
    relay.terminate();
    Ok(())
}
