//! The bad-input campaign (RELIABILITY.md lists every case and where it is
//! tested): what a producer, a Kafka topic or an operator can get wrong, and
//! what the toolkit does with it. Each case ends in a clear error, a failed
//! row or a dead letter: never a crash, a hang or a silent drop.

use std::time::Duration;

use integration_tests::{
    append_events, consume, consumer::*, eventually, free_port, http_get, outbox_with_topic,
    pending, relay_bin, unique, RunningRelay,
};
use outbox_core::{append, headers as h, AppendError, NewEvent};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

use integration_tests::quick_relay_config as cfg;

/// Rows a non-Rust producer writes with plain SQL that break the contract:
/// the schema refuses them at insert, naming the rule, and nothing enters
/// the outbox.
#[sqlx::test(migrations = false)]
async fn malformed_rows_are_refused_at_insert_with_the_rule_named(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let cases: &[(&str, &str, &str)] = &[
        (
            "null aggregate id",
            "'t', NULL, 'e', 1, NULL, '{}'",
            "aggregate_id",
        ),
        (
            "empty aggregate type",
            "'', 'k', 'e', 1, NULL, '{}'",
            "outbox_aggregate_type_not_empty",
        ),
        (
            "empty aggregate id",
            "'t', '', 'e', 1, NULL, '{}'",
            "outbox_aggregate_id_not_empty",
        ),
        (
            "empty event type",
            "'t', 'k', '', 1, NULL, '{}'",
            "outbox_event_type_not_empty",
        ),
        (
            "version 0",
            "'t', 'k', 'e', 0, NULL, '{}'",
            "outbox_event_version_positive",
        ),
        (
            "empty topic",
            "'t', 'k', 'e', 1, '', '{}'",
            "outbox_topic_not_empty",
        ),
        (
            "headers not an object",
            "'t', 'k', 'e', 1, NULL, '[1, 2]'",
            "outbox_headers_object",
        ),
        (
            "headers not JSON",
            "'t', 'k', 'e', 1, NULL, '{nope'",
            "json",
        ),
    ];
    for (what, values, rule) in cases {
        let sql = format!(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version, topic, headers) \
             VALUES (gen_random_uuid(), {values})"
        );
        let err = sqlx::query(&sql)
            .execute(&pool)
            .await
            .expect_err(what)
            .to_string();
        assert!(err.contains(rule), "{what}: {err}");
    }
    let both = sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, payload_bytes) \
         VALUES (gen_random_uuid(), 't', 'k', 'e', '{}', '\\x00')",
    )
    .execute(&pool)
    .await
    .expect_err("both payloads")
    .to_string();
    assert!(both.contains("outbox_one_payload"), "{both}");
    let dup = Uuid::new_v4();
    let insert = "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type) VALUES ($1, 't', 'k', 'e')";
    sqlx::query(insert).bind(dup).execute(&pool).await?;
    let again = sqlx::query(insert)
        .bind(dup)
        .execute(&pool)
        .await
        .expect_err("duplicate event id")
        .to_string();
    assert!(again.contains("outbox_event_id_key"), "{again}");

    // From Rust, append() refuses the same mistakes before writing anything.
    let refused: Vec<(&str, NewEvent)> = vec![
        ("aggregate_id", NewEvent::new("t", " ", "e")),
        ("event_version", NewEvent::new("t", "k", "e").version(0)),
        ("topic", NewEvent::new("t", "k", "e").topic("no spaces")),
        ("topic", NewEvent::new("t", "k", "e").topic("x".repeat(250))),
        (
            "headers",
            NewEvent::new("t", "k", "e").header(h::CE_ID, "forged"),
        ),
        (
            "payload",
            NewEvent::new("t", "k", "e")
                .bytes_payload(vec![0; 20 << 20], "application/octet-stream"),
        ),
        (
            "traceparent",
            NewEvent::new("t", "k", "e").trace_context("garbage", None),
        ),
        ("aggregate_type", NewEvent::new("t\0", "k", "e")),
    ];
    for (field, event) in refused {
        match append(&pool, &event).await {
            Err(AppendError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 1, "only the first, valid row was written");
    Ok(())
}

/// Rows the schema accepts but Kafka cannot take as they are: each moves to
/// `failed` with a reason naming the problem, the relay stays ready, and
/// every healthy row (binary payloads and tombstones included) flows.
#[sqlx::test(migrations = false)]
async fn unpublishable_rows_fail_with_a_reason_and_the_rest_flows(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "bad-rows", 2).await?;
    let row = |key: &str, topic: Option<&str>, aggregate_type: &str, headers: &str| {
        let pool = pool.clone();
        let (key, topic, aggregate_type, headers) = (
            key.to_string(),
            topic.map(str::to_string),
            aggregate_type.to_string(),
            headers.to_string(),
        );
        async move {
            sqlx::query(
                "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, headers) \
                 VALUES (gen_random_uuid(), $1, $2, 'bad.row', $3, $4::jsonb)",
            )
            .bind(aggregate_type)
            .bind(key)
            .bind(topic)
            .bind(headers)
            .execute(&pool)
            .await
        }
    };
    let long_topic = "t".repeat(300);
    row(
        "reserved-header",
        Some(&topic),
        "t",
        r#"{"ce_type": "forged"}"#,
    )
    .await?;
    row("null-header", Some(&topic), "t", r#"{"x": null}"#).await?;
    row("array-header", Some(&topic), "t", r#"{"x": [1]}"#).await?;
    row("empty-header-name", Some(&topic), "t", r#"{"": "x"}"#).await?;
    // Healthy: numbers that a float would round travel as written.
    row(
        "numbers",
        Some(&topic),
        "t",
        r#"{"big": 12345678901234567890123, "price": 1.50, "tiny": 0.1000000000000000055511151231257827}"#,
    )
    .await?;
    row("long-topic", Some(&long_topic), "t", "{}").await?;
    row("unicode-topic", Some("bestellungen-ä"), "t", "{}").await?;
    row("template-topic", None, "has space", "{}").await?;
    // A key far larger than the broker's message limit.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic) \
         VALUES (gen_random_uuid(), 't', repeat('k', 2000000), 'bad.row', $1)",
    )
    .bind(&topic)
    .execute(&pool)
    .await?;
    // A key of 600 KiB fits once (the record key), and is not repeated in
    // ce_subject; a key of exactly 1 KiB still is.
    for len in [600 * 1024, 1024] {
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
             VALUES (gen_random_uuid(), 't', repeat('b', $2), 'big.key', $1, '{}')",
        )
        .bind(&topic)
        .bind(len)
        .execute(&pool)
        .await?;
    }
    // Healthy rows: JSON, binary, and a tombstone (no payload).
    append_events(&pool, &topic, 20, 4).await?;
    append(
        &pool,
        &NewEvent::new("t", "bin", "bin.row")
            .topic(&topic)
            .bytes_payload(vec![0xff, 0x00, 0xfe], "application/octet-stream"),
    )
    .await?;
    append(&pool, &NewEvent::new("t", "gone", "deleted").topic(&topic)).await?;

    let relay = RunningRelay::start(&pool, cfg())?;
    let got = consume(&topic, 25, WAIT, Duration::from_millis(1500)).await?;
    eventually(WAIT, "eight failed rows", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'failed'")
            .fetch_one(&pool)
            .await?;
        Ok(n == 8)
    })
    .await?;
    assert!(relay.health.is_ready(), "{}", relay.health.reason());
    relay.stop().await?;
    assert_eq!(got.len(), 25, "every healthy row arrived, once");
    let numbers = got
        .iter()
        .find(|r| r.key.as_deref() == Some("numbers"))
        .unwrap();
    assert_eq!(numbers.header("big"), Some("12345678901234567890123"));
    assert_eq!(numbers.header("price"), Some("1.50"));
    assert_eq!(
        numbers.header("tiny"),
        Some("0.1000000000000000055511151231257827")
    );
    let bin = got
        .iter()
        .find(|r| r.key.as_deref() == Some("bin"))
        .unwrap();
    assert_eq!(bin.value, Some(vec![0xff, 0x00, 0xfe]));
    for len in [600 * 1024, 1024] {
        let key = "b".repeat(len);
        let big = got
            .iter()
            .find(|r| r.key.as_deref() == Some(key.as_str()))
            .unwrap_or_else(|| panic!("the {len}-byte key arrived whole"));
        let subject = big.header("ce_subject");
        if len > outbox_core::headers::SUBJECT_MAX_BYTES {
            assert_eq!(subject, None, "a {len}-byte key is not repeated");
        } else {
            assert_eq!(subject, Some(key.as_str()));
        }
    }
    let gone = got
        .iter()
        .find(|r| r.key.as_deref() == Some("gone"))
        .unwrap();
    assert_eq!(gone.value, None, "a row without payload is a tombstone");
    assert_eq!(
        gone.header("content-type"),
        None,
        "a tombstone has no content type"
    );

    let failed: Vec<(String, String)> = sqlx::query_as(
        "SELECT left(aggregate_id, 20), last_error FROM outbox WHERE status = 'failed'",
    )
    .fetch_all(&pool)
    .await?;
    let reason = |k: &str| {
        failed
            .iter()
            .find(|(key, _)| key.starts_with(k))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no failed row for {k}: {failed:?}"))
    };
    assert!(reason("reserved-header").contains("reserved"), "{failed:?}");
    assert!(
        reason("null-header").contains("string, number or boolean"),
        "{failed:?}"
    );
    assert!(
        reason("array-header").contains("string, number or boolean"),
        "{failed:?}"
    );
    assert!(
        reason("empty-header-name").contains("header name is empty"),
        "{failed:?}"
    );
    assert!(reason("long-topic").contains("topic"), "{failed:?}");
    assert!(reason("unicode-topic").contains("topic"), "{failed:?}");
    assert!(reason("template-topic").contains("topic"), "{failed:?}");
    assert!(
        reason("kkkk").to_lowercase().contains("too large"),
        "{failed:?}"
    );
    // The reason gives the record's size and the limit.
    assert!(reason("kkkk").contains("key 2000000"), "{failed:?}");
    assert!(
        reason("kkkk").contains("message.max.bytes (1000000)"),
        "{failed:?}"
    );
    assert_eq!(pending(&pool).await?, 0);

    // `failed list` keeps to one readable line per row: the 2 MB key is
    // clipped with its size; --json keeps it whole.
    let url = integration_tests::database_url(&pool);
    let (code, out) = integration_tests::relay_cli(&url, &["failed", "list"]);
    assert_eq!(code, 0, "{}", &out[..out.len().min(2000)]);
    assert_eq!(out.lines().count(), 8, "one line per failed row");
    assert!(
        out.lines().all(|l| l.len() < 1000),
        "a line of {} bytes",
        out.lines().map(str::len).max().unwrap_or(0)
    );
    assert!(
        out.contains("… (2000000 bytes in all)"),
        "{}",
        &out[..out.len().min(2000)]
    );
    let (code, json) = integration_tests::relay_cli(&url, &["failed", "list", "--json"]);
    assert_eq!(code, 0);
    assert!(
        json.contains(&"k".repeat(2_000_000)),
        "--json keeps the whole key"
    );
    Ok(())
}

/// Kafka records that are not outbox events as consumer-kit expects them:
/// each is dead-lettered as undecodable with its reason, and the good events
/// around them are applied once, in order.
#[sqlx::test(migrations = false)]
async fn records_that_are_not_outbox_events_are_dead_lettered(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let topic = unique("ck-bad");
    integration_tests::create_topic(&topic, 1).await?;
    let group = unique("g");
    let good: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut bad_id = event(
        "k",
        Uuid::new_v4(),
        "item.added",
        serde_json::json!({ "seq": 9 }),
    );
    for (k, v) in bad_id.headers.iter_mut() {
        if k == h::CE_ID {
            *v = "not-a-uuid".into();
        }
    }
    let mut no_type = event(
        "k",
        Uuid::new_v4(),
        "item.added",
        serde_json::json!({ "seq": 9 }),
    );
    no_type.headers.retain(|(k, _)| k != h::CE_TYPE);
    let no_headers = TestRecord {
        key: Some("k".into()),
        headers: vec![],
        value: Some(br#"{"seq": 9}"#.to_vec()),
        partition: None,
    };
    let mut tombstone = event("k", Uuid::new_v4(), "item.added", serde_json::json!({}));
    tombstone.value = None;
    let wrong_shape = event(
        "k",
        Uuid::new_v4(),
        "item.added",
        serde_json::json!({ "seq": "not a number" }),
    );
    let mut binary = event("k", Uuid::new_v4(), "item.added", serde_json::json!({}));
    binary.value = Some(vec![0xff, 0xfe, 0x00, 0x01]);
    let records = vec![
        event("k", good[0], "item.added", serde_json::json!({ "seq": 0 })),
        bad_id,
        no_type,
        no_headers,
        tombstone,
        wrong_shape,
        binary,
        event("k", good[1], "item.added", serde_json::json!({ "seq": 1 })),
        event("k", good[2], "item.added", serde_json::json!({ "seq": 2 })),
    ];
    produce(&topic, &records).await?;
    // Skip: one key throughout, and this test is about what is
    // dead-lettered; park-key would hold the key's good events behind the
    // first bad one (tests/tests/consumer_order.rs).
    let cfg = consumer_kit::ConsumerConfig {
        ordering: consumer_kit::Ordering::Skip,
        ..consumer_cfg(&group, &topic)
    };
    let c = start_consumer(&pool, cfg, "item.added", Effects::default())?;
    let stats = c.stats();
    eventually(WAIT, "all settled", || async {
        let s = stats.snapshot();
        Ok(s.processed + s.dead_lettered == 9)
    })
    .await?;
    assert!(!c.is_finished(), "the consumer is still running");
    c.stop().await?;
    let s = stats.snapshot();
    assert_eq!((s.processed, s.dead_lettered), (3, 6));
    let applied: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM effects ORDER BY seq")
        .fetch_all(&pool)
        .await?;
    assert_eq!(applied, good, "good events applied once, in order");
    let dlq = consume(&format!("{topic}.dlq"), 6, WAIT, Duration::from_secs(1)).await?;
    assert_eq!(dlq.len(), 6);
    for r in &dlq {
        assert_eq!(
            r.header("dlq_kind"),
            Some("undecodable"),
            "{:?}",
            r.header("dlq_reason")
        );
        assert!(r.header("dlq_reason").is_some_and(|m| !m.is_empty()));
    }
    let reasons: Vec<&str> = dlq.iter().filter_map(|r| r.header("dlq_reason")).collect();
    assert!(reasons[0].contains(h::CE_ID), "{reasons:?}");
    assert!(reasons[1].contains(h::CE_TYPE), "{reasons:?}");
    Ok(())
}

/// Operator mistakes: bad flags and configuration exit with code 2 and name
/// the problem; unreachable services give a clear error or a not-ready
/// state, never a hang, a panic or a leaked password.
#[sqlx::test(migrations = false)]
async fn bad_flags_and_unreachable_services_get_clear_errors(pool: PgPool) -> anyhow::Result<()> {
    let url = integration_tests::database_url(&pool);
    let run = |args: &[&str], db: &str| integration_tests::relay_cli(db, args);
    let bad_flags: &[(&[&str], &str)] = &[
        (&["run", "--batch-size", "0"], "batch size"),
        (&["run", "--batch-size", "lots"], "--batch-size"),
        (&["run", "--lease-ttl", "0s"], "lease TTL"),
        (
            &["run", "--lease-ttl", "4s", "--heartbeat-interval", "3s"],
            "heartbeat interval",
        ),
        (&["run", "--kafka-property", "no-equals-sign"], "key=value"),
        (&["run", "--poison-policy", "maybe"], "--poison-policy"),
        (&["run", "--kafka-brokers", " "], "Kafka brokers"),
        (&["run", "--http-addr", "not-an-address"], "--http-addr"),
        (&["failed", "retry"], "required"),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, says) in bad_flags {
        let (code, out) = run(args, &url);
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains(says), "{args:?} should say {says:?}: {out}");
    }
    // Another database's URL: refused before any connection, naming the
    // scheme only.
    let (code, out) = run(&["status"], "mysql://u:hunter2@127.0.0.1:5432/db");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("must be a PostgreSQL URL"), "{out}");
    assert!(out.contains("mysql://"), "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");
    let (code, out) = run(&["status"], "postgres://u:hunter2@:bad");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("DATABASE_URL"), "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");

    // A reader that goes away early (`outbox-relay status | head -1`): the
    // command stops quietly instead of panicking on the closed pipe.
    outbox_core::migrate(&pool).await?;
    let mut status = std::process::Command::new(relay_bin())
        .arg("status")
        .env("DATABASE_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(status.stdout.take()); // the pipe's reader is gone
    let done = status.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(done.status.code(), Some(0), "{stderr}");

    // PostgreSQL unreachable: the operator command fails at once, naming
    // host and port but not the password.
    let (code, out) = run(&["status"], "postgres://u:hunter2@127.0.0.1:1/db");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("127.0.0.1:1/db"), "{out}");
    assert!(out.contains("127.0.0.1:1 refused the connection"), "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");

    // PostgreSQL unreachable at start: the relay runs, is not ready, says
    // why, and stops cleanly on SIGTERM.
    let port = free_port();
    let mut relay = integration_tests::Child::from(
        std::process::Command::new(relay_bin())
            .args(["run", "--http-addr", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1:1/db")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    );
    eventually(WAIT, "readiness answers 503 with the reason", || async {
        Ok(http_get(port, "/readyz")
            .map(|(c, body)| c == 503 && body.contains("127.0.0.1:1 refused the connection"))
            .unwrap_or(false))
    })
    .await?;
    relay.terminate();
    assert_eq!(relay.wait_exit(Duration::from_secs(20))?, Some(0));
    let mut stderr = String::new();
    if let Some(mut e) = relay.process.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// A misspelled librdkafka property, whose value librdkafka echoes in its
/// error, is refused without the value appearing anywhere: the relay's
/// `run` and `topic create`, `outbox-dlq`, and consumer-kit's builder.
#[sqlx::test(migrations = false)]
async fn a_misspelled_kafka_property_never_shows_its_value(pool: PgPool) -> anyhow::Result<()> {
    const SECRET: &str = "hunter2-kafka-secret";
    let url = integration_tests::database_url(&pool);
    outbox_core::migrate(&pool).await?;
    let property = format!("sasl.pasword={SECRET}");
    for args in [
        vec!["run", "--kafka-property", &property],
        vec!["topic", "create", "x", "--kafka-property", &property],
    ] {
        let (code, out) = integration_tests::relay_cli(&url, &args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            out.contains("sasl.pasword"),
            "{args:?} names the property: {out}"
        );
        assert!(!out.contains(SECRET), "{args:?} leaked the value: {out}");
    }
    let out = std::process::Command::new(integration_tests::dlq_bin())
        .args(["list", "x.dlq", "--kafka-property", &property])
        .env("KAFKA_BROKERS", integration_tests::brokers())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sasl.pasword"), "{text}");
    assert!(
        !text.contains(SECRET),
        "outbox-dlq leaked the value: {text}"
    );

    consumer_db(&pool).await?;
    let topic = unique("secret");
    integration_tests::create_topic(&topic, 1).await?;
    let mut cfg = integration_tests::consumer::consumer_cfg(&unique("g"), &topic);
    cfg.kafka_properties
        .insert("sasl.pasword".into(), SECRET.into());
    let built = consumer_kit::Consumer::builder(cfg, pool.clone())
        .handler(
            "item.added",
            integration_tests::consumer::Effects::default(),
        )
        .build();
    let err = match built {
        Ok(c) => c
            .run(tokio_util::sync::CancellationToken::new())
            .await
            .err()
            .map(|e| format!("{e} / {e:?}"))
            .unwrap_or_default(),
        Err(e) => format!("{e} / {e:?}"),
    };
    assert!(err.contains("sasl.pasword"), "{err}");
    assert!(
        !err.contains(SECRET),
        "consumer-kit leaked the value: {err}"
    );
    Ok(())
}

/// An event id inserted again after its row was published and deleted:
/// the insert fails in the producer's transaction, naming the id, through
/// plain SQL and through `append`. Ids of rows settled one by one (a batch
/// with a failed row) are remembered too. With `remember_published` zero,
/// the documented trade-off: the id is accepted again.
#[sqlx::test(migrations = false)]
async fn a_published_event_id_cannot_be_inserted_again(pool: PgPool) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "dup-id", 1).await?;
    let ids = append_events(&pool, &topic, 3, 3).await?;
    // A row for a topic that does not exist fails permanently, so this
    // batch is settled row by row (`claim::resolve`).
    let lost = NewEvent::new("thing", "other-key", "thing.happened").topic(unique("no-such-topic"));
    append(&pool, &lost).await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    eventually(WAIT, "published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;

    for id in &ids {
        let err = sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
             VALUES ($1, 'thing', 'key-0', 'thing.happened', $2, '{\"other\": true}')",
        )
        .bind(id)
        .bind(&topic)
        .execute(&pool)
        .await
        .expect_err("a published id is refused");
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23505"), "{err}");
        assert!(db.message().contains(&id.to_string()), "{err}");
        assert!(db.message().contains("already published"), "{err}");
    }
    let again = NewEvent::new("thing", "key-0", "thing.happened")
        .topic(&topic)
        .event_id(ids[0]);
    match append(&pool, &again).await {
        Err(AppendError::AlreadyPublished(id)) => assert_eq!(id, ids[0]),
        other => panic!("expected AlreadyPublished, got {other:?}"),
    }
    // The failed row is still in the outbox: its id is refused by the
    // table's own unique constraint.
    assert!(matches!(
        append(&pool, &lost).await,
        Err(AppendError::DuplicateEventId(_))
    ));

    // Forgotten after the window (the relay's cleanup), or never remembered
    // with the window at zero: the id is accepted again.
    let forgotten = outbox_relay::store::forget_published_ids(&pool, Duration::ZERO, 100).await?;
    assert_eq!(forgotten, 3);
    append(&pool, &again).await?;
    let relay = RunningRelay::start(
        &pool,
        outbox_relay::RelayConfig {
            remember_published: Duration::ZERO,
            ..cfg()
        },
    )?;
    eventually(WAIT, "published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;
    let remembered: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_published_ids")
        .fetch_one(&pool)
        .await?;
    assert_eq!(remembered, 0, "nothing remembered with the window at zero");
    append(&pool, &again).await?;
    Ok(())
}

/// The batch's ids are remembered in its own transaction while its records
/// are in flight (`claim::remember`). When that write fails, the claim is
/// not committed: the rows stay pending (published again later, the
/// documented duplicates), the relay says why, and once the write works
/// again every id is remembered exactly once.
#[sqlx::test(migrations = false)]
async fn a_batch_whose_ids_cannot_be_remembered_is_not_committed(
    pool: PgPool,
) -> anyhow::Result<()> {
    let topic = outbox_with_topic(&pool, "remember-fails", 1).await?;
    let ids = append_events(&pool, &topic, 5, 2).await?;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_remembering() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'remembering refused by the test'; END $$; \
         CREATE TRIGGER refuse_remembering BEFORE INSERT ON outbox_published_ids \
         FOR EACH STATEMENT EXECUTE FUNCTION refuse_remembering();",
    )
    .execute(&pool)
    .await?;
    let relay = RunningRelay::start(&pool, cfg())?;
    eventually(WAIT, "the relay reports the failed write", || async {
        Ok(relay.health.reason().contains("remembering refused"))
    })
    .await?;
    // Its records went out, but the claim did not commit.
    consume(&topic, 5, WAIT, Duration::ZERO).await?;
    assert_eq!(pending(&pool).await?, 5, "no row is deleted without its id");
    sqlx::raw_sql("DROP TRIGGER refuse_remembering ON outbox_published_ids")
        .execute(&pool)
        .await?;
    eventually(WAIT, "published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;
    let mut remembered: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM outbox_published_ids ORDER BY event_id")
            .fetch_all(&pool)
            .await?;
    let mut expected = ids.clone();
    expected.sort();
    remembered.sort();
    assert_eq!(remembered, expected, "each published id, once");
    Ok(())
}
