//! The SQL migrations against the real PostgreSQL.

use std::time::Duration;

use outbox_core::{migrate, MigrateError};
use sqlx::PgPool;

async fn columns(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn indexes(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = $1 ORDER BY 1")
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn outbox_set_applies_the_documented_schema_and_reapplies_as_a_noop(pool: PgPool) {
    let first = migrate::OUTBOX.apply(&pool).await.unwrap();
    assert_eq!(
        first.applied,
        vec![
            "V1__create_outbox",
            "V2__relay_partitions",
            "V3__failed_key_hash_index",
            "V4__notify_only_waiting_relays",
            "V5__remember_published_ids",
            "V6__partition_checkpoints_to_finish",
            "V7__emit_table_less_events",
            "V8__slot_reader_lease",
            "V9__published_id_check_per_row",
            "V10__delayed_events",
            "V11__published_id_check_plans_each_time"
        ]
    );
    assert_eq!(first.current_version, Some(11));
    assert_eq!(
        columns(&pool, "outbox_relays").await,
        [
            "relay_id",
            "pid",
            "started_at",
            "heartbeat_at",
            "lease_until",
            "waiting_since"
        ]
    );
    assert_eq!(
        columns(&pool, "outbox_relay_partitions").await,
        ["partition", "owner", "epoch", "acquired_at", "unfenced"]
    );
    let (partitions, spread): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_relay_partitions), \
                (SELECT count(DISTINCT outbox_partition('key-' || g, 32)) FROM generate_series(1, 1000) g \
                 WHERE outbox_partition('key-' || g, 32) BETWEEN 0 AND 31)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(partitions, 32, "32 partitions by default");
    assert_eq!(spread, 32, "keys spread over every partition, all in range");

    assert_eq!(
        columns(&pool, "outbox").await,
        [
            "id",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "event_version",
            "topic",
            "payload",
            "payload_bytes",
            "content_type",
            "headers",
            "correlation_id",
            "causation_id",
            "traceparent",
            "tracestate",
            "source",
            "occurred_at",
            "created_at",
            "status",
            "attempts",
            "last_error",
            "published_at",
            "failed_at"
        ]
    );
    assert_eq!(
        indexes(&pool, "outbox_delayed").await,
        [
            "outbox_delayed_due_idx",
            "outbox_delayed_event_id_key",
            "outbox_delayed_pkey"
        ]
    );
    assert_eq!(
        indexes(&pool, "outbox").await,
        [
            "outbox_event_id_key",
            "outbox_failed_key_idx",
            "outbox_pending_idx",
            "outbox_pkey",
            "outbox_published_at_idx"
        ]
    );
    let trigger: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify' AND NOT tgisinternal",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(trigger, 1);
    assert_eq!(
        columns(&pool, "outbox_published_ids").await,
        ["event_id", "published_at"]
    );
    assert_eq!(
        indexes(&pool, "outbox_published_ids").await,
        [
            "outbox_published_ids_event_id",
            "outbox_published_ids_published_at"
        ]
    );
    let refuse: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_refuse_published_ids' AND NOT tgisinternal",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(refuse, 1);

    let again = migrate::OUTBOX.apply(&pool).await.unwrap();
    assert!(
        again.applied.is_empty(),
        "re-run applied {:?}",
        again.applied
    );
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_schema_history")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(history, 11);
    // The consumer set is separate: nothing of it exists yet.
    assert!(columns(&pool, "processed_events").await.is_empty());
}

/// Notifications received on `listener` within `wait`.
async fn notifications(listener: &mut sqlx::postgres::PgListener, wait: Duration) -> usize {
    let mut n = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(wait, listener.recv()).await {
        n += 1;
    }
    n
}

#[sqlx::test(migrations = false)]
async fn producers_notify_only_while_a_live_relay_waits(pool: PgPool) {
    migrate::OUTBOX.apply(&pool).await.unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("outbox").await.unwrap();
    let insert = |key: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type) \
                 SELECT gen_random_uuid(), 't', $1 || g, 'e' FROM generate_series(1, 3) g",
            )
            .bind(key)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let quiet = Duration::from_millis(300);

    // No relay registered: no notification.
    insert("a").await;
    assert_eq!(notifications(&mut listener, quiet).await, 0, "nobody waits");

    // A live relay that is busy (flag down): still none.
    sqlx::query(
        "INSERT INTO outbox_relays (relay_id, lease_until) VALUES ('r1', now() + interval '1 minute')",
    )
    .execute(&pool)
    .await
    .unwrap();
    insert("b").await;
    assert_eq!(notifications(&mut listener, quiet).await, 0, "relay busy");

    // The relay waits: one notification per transaction, whatever it inserts.
    sqlx::query("UPDATE outbox_relays SET waiting_since = now()")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    for key in ["c", "d"] {
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type) \
             VALUES (gen_random_uuid(), 't', $1, 'e')",
        )
        .bind(key)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(notifications(&mut listener, quiet).await, 1, "relay waits");
    insert("e").await;
    assert_eq!(
        notifications(&mut listener, quiet).await,
        1,
        "relay still waits"
    );

    // A rolled-back insert notifies nobody.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type) \
         VALUES (gen_random_uuid(), 't', 'f', 'e')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(notifications(&mut listener, quiet).await, 0, "rolled back");

    // The waiting relay died: once its lease ran out, producers stop.
    sqlx::query("UPDATE outbox_relays SET lease_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    insert("g").await;
    assert_eq!(
        notifications(&mut listener, quiet).await,
        0,
        "lease expired"
    );

    // Turned off by the operator: none, even with a waiting relay.
    sqlx::query("UPDATE outbox_relays SET lease_until = now() + interval '1 minute'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
        .execute(&pool)
        .await
        .unwrap();
    insert("h").await;
    assert_eq!(notifications(&mut listener, quiet).await, 0, "trigger off");
}

#[sqlx::test(migrations = false)]
async fn consumer_set_has_its_own_history(pool: PgPool) {
    let report = consumer_kit::migrate(&pool).await.unwrap();
    assert_eq!(
        report.applied,
        vec!["V1__create_processed_events", "V2__park_keys", "V3__sagas"]
    );
    assert_eq!(
        columns(&pool, "consumer_kit_sagas").await,
        [
            "saga",
            "instance_id",
            "state",
            "data",
            "status",
            "version",
            "timeouts",
            "started_at",
            "updated_at",
            "finished_at",
            "reason"
        ]
    );
    assert_eq!(
        columns(&pool, "processed_events").await,
        [
            "consumer_group",
            "event_id",
            "processed_at",
            "topic",
            "kafka_partition",
            "kafka_offset"
        ]
    );
    assert_eq!(
        indexes(&pool, "processed_events").await,
        ["processed_events_pkey", "processed_events_processed_at_idx"]
    );
    assert!(consumer_kit::migrate(&pool)
        .await
        .unwrap()
        .applied
        .is_empty());
    let outbox_history: bool =
        sqlx::query_scalar("SELECT to_regclass('outbox_schema_history') IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        outbox_history,
        "the consumer set must not touch the outbox history"
    );
    // Both sets can live in one database.
    migrate::OUTBOX.apply(&pool).await.unwrap();
    assert_eq!(
        consumer_kit::SCHEMA.current_version(&pool).await.unwrap(),
        Some(3)
    );
    assert_eq!(
        indexes(&pool, "consumer_kit_parked_keys").await,
        [
            "consumer_kit_parked_keys_partition_idx",
            "consumer_kit_parked_keys_pkey"
        ]
    );
    assert_eq!(
        indexes(&pool, "consumer_kit_parked_events").await,
        [
            "consumer_kit_parked_events_key_idx",
            "consumer_kit_parked_events_pkey"
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn a_changed_applied_migration_is_a_clear_error(pool: PgPool) {
    migrate::OUTBOX.apply(&pool).await.unwrap();
    // Simulate an edited file: the recorded checksum no longer matches.
    sqlx::query("UPDATE outbox_schema_history SET checksum = '1' WHERE version = 1")
        .execute(&pool)
        .await
        .unwrap();
    let err = migrate::OUTBOX.apply(&pool).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Changed { version: 1, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("V1__create_outbox") && msg.contains("forward-only"),
        "{msg}"
    );
}

#[sqlx::test(migrations = false)]
async fn an_unknown_applied_migration_is_a_clear_error(pool: PgPool) {
    migrate::OUTBOX.apply(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_schema_history (version, name, applied_on, checksum) \
         VALUES (99, 'from_the_future', '2026-01-01T00:00:00Z', '42')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = migrate::OUTBOX.apply(&pool).await.unwrap_err();
    assert!(err.to_string().contains("newer release"), "{err}");
}

#[sqlx::test(migrations = false)]
async fn concurrent_runs_apply_each_migration_once(pool: PgPool) {
    let runs = (0..4).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { migrate::OUTBOX.apply(&pool).await })
    });
    let mut applied = 0;
    for r in futures::future::join_all(runs).await {
        applied += r.unwrap().unwrap().applied.len();
    }
    assert_eq!(applied, 11, "V1 to V11, once each");
}

/// V11: a producer connection that first inserted while the remembered ids'
/// table was empty and vacuumed keeps looking ids up through the index once
/// the table is full (V9's lookup kept a generic plan that read the whole
/// table for every insert, until the next analyze).
#[sqlx::test(migrations = false)]
async fn the_published_id_check_uses_the_index_after_the_table_was_empty(pool: PgPool) {
    migrate::OUTBOX.apply(&pool).await.unwrap();
    sqlx::query("VACUUM ANALYZE outbox_published_ids")
        .execute(&pool)
        .await
        .unwrap();
    let insert = "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type) \
                  VALUES (gen_random_uuid(), 'order', 'o-1', 'order.placed')";
    let mut producer = pool.acquire().await.unwrap();
    // PL/pgSQL settles on a generic plan after five executions.
    for _ in 0..8 {
        sqlx::query(insert).execute(&mut *producer).await.unwrap();
    }
    sqlx::query("INSERT INTO outbox_published_ids (event_id) SELECT gen_random_uuid() FROM generate_series(1, 50000)")
        .execute(&pool)
        .await
        .unwrap();
    // This connection's count of sequential reads, not yet sent to the
    // statistics collector: compared before and after, in one transaction.
    let count =
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'outbox_published_ids'";
    let mut tx = sqlx::Connection::begin(&mut *producer).await.unwrap();
    let before: i64 = sqlx::query_scalar(count).fetch_one(&mut *tx).await.unwrap();
    for _ in 0..3 {
        sqlx::query(insert).execute(&mut *tx).await.unwrap();
    }
    let after: i64 = sqlx::query_scalar(count).fetch_one(&mut *tx).await.unwrap();
    let seq_scans = after - before;
    assert_eq!(
        seq_scans, 0,
        "each insert's published-id check read the whole table instead of its index"
    );
}
