//! The relay's RabbitMQ sink (`--sink rabbitmq`) against the real
//! RabbitMQ `./dev up` runs (`AMQP_URL`), read back with lapin: delivery,
//! once each (a rolled-back event never),
//! in key order with the envelope as AMQP properties and CloudEvents
//! headers, an unroutable event moved to failed, and an unreachable broker
//! that keeps rows pending and the relay unready.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use integration_tests::{
    eventually, free_port, pending, quick_relay_config, unique, AmqpProxy, RunningRelay,
};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::{append, NewEvent};
use outbox_relay::{RabbitMqSink, RelayConfig};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn rabbit_config(url: &str) -> RelayConfig {
    RelayConfig {
        rabbitmq: Some(RabbitMqSink::new(url)),
        ..quick_relay_config()
    }
}

async fn channel() -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// Declares `exchange` as the relay does (durable topic), and an exclusive
/// queue bound to it for every routing key; returns the queue's name.
async fn bound_queue(channel: &Channel, exchange: &str) -> anyhow::Result<String> {
    let queue = format!("{exchange}-q");
    test_kit::rabbitmq::bind_queue(
        channel,
        exchange,
        &queue,
        test_kit::rabbitmq::QueueLife::Exclusive,
    )
    .await?;
    Ok(queue)
}

/// Migrates, and binds a fresh queue to a fresh exchange named after
/// `prefix`: the exchange (the events' topic), the connection and channel
/// (keep them: the queue is exclusive), and a consumer of the queue.
async fn bound_setup(
    pool: &PgPool,
    prefix: &str,
) -> anyhow::Result<(String, Connection, Channel, lapin::Consumer)> {
    outbox_core::migrate(pool).await?;
    let exchange = unique(prefix);
    let (conn, ch) = channel().await?;
    let queue = bound_queue(&ch, &exchange).await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((exchange, conn, ch, consumer))
}

/// The next message (acknowledged), within [`WAIT`].
async fn next_message(
    consumer: &mut lapin::Consumer,
    got: usize,
) -> anyhow::Result<lapin::message::Delivery> {
    let next = tokio::time::timeout(WAIT, consumer.next())
        .await
        .map_err(|_| anyhow::anyhow!("only {got} messages within {WAIT:?}"))?;
    let delivery = next.ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(delivery)
}

fn header(table: &FieldTable, name: &str) -> Option<String> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[sqlx::test(migrations = false)]
async fn events_reach_a_bound_queue_in_key_order_with_the_envelope_as_amqp_properties(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (exchange, _conn, _ch, mut consumer) = bound_setup(&pool, "rmq-orders").await?;

    let n = 60;
    let mut sent = Vec::new();
    for i in 0..n {
        let mut e = NewEvent::new("order", format!("key-{}", i % 3), "order.placed")
            .topic(&exchange)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        if i == 7 {
            e = e.correlation_id("corr-7").header("tenant", "acme");
        }
        append(&pool, &e).await?;
        sent.push(e);
    }
    // Rolled back: never published.
    let mut ghost = pool.begin().await?;
    append(
        &mut *ghost,
        &NewEvent::new("order", "key-0", "order.ghost").topic(&exchange),
    )
    .await?;
    ghost.rollback().await?;
    let relay = RunningRelay::start_exactly(&pool, rabbit_config(&amqp_url()))?;

    let mut got = Vec::new();
    while got.len() < n {
        got.push(next_message(&mut consumer, got.len()).await?);
    }

    // Every event once, each key's events in the order they were written.
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for d in &got {
        let body: serde_json::Value = serde_json::from_slice(&d.data)?;
        let seq = body["seq"].as_i64().expect("seq");
        let p = &d.properties;
        let id = p.message_id().as_ref().expect("message_id").to_string();
        let e = &sent[seq as usize];
        assert_eq!(id, e.event_id.to_string(), "message_id is the event id");
        let key = d.routing_key.as_str().to_string();
        assert_eq!(key, "order.placed", "routing key: the event type");
        let agg = format!("key-{}", seq % 3);
        if let Some(prev) = last_seq.insert(agg.clone(), seq) {
            assert!(prev < seq, "{agg}: {seq} after {prev}");
        }
        assert_eq!(p.kind().as_ref().map(|k| k.as_str()), Some("order.placed"));
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert!(p.timestamp().is_some_and(|t| t > 1_700_000_000));
        let h = p.headers().as_ref().expect("headers");
        assert_eq!(header(h, "cloudEvents:id").as_deref(), Some(id.as_str()));
        assert_eq!(header(h, "cloudEvents:specversion").as_deref(), Some("1.0"));
        assert_eq!(
            header(h, "cloudEvents:type").as_deref(),
            Some("order.placed")
        );
        assert_eq!(
            header(h, "cloudEvents:subject").as_deref(),
            Some(agg.as_str())
        );
        assert!(header(h, "cloudEvents:source").is_some());
        assert!(header(h, "cloudEvents:time").is_some());
        if seq == 7 {
            assert_eq!(
                p.correlation_id().as_ref().map(|c| c.as_str()),
                Some("corr-7")
            );
            assert_eq!(header(h, "tenant").as_deref(), Some("acme"));
        }
    }
    assert_eq!(last_seq.len(), 3);
    // Nothing more: no second copy, no rolled-back event.
    let more = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await;
    assert!(more.is_err(), "an extra message: {more:?}");
    eventually(WAIT, "every row published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await
}

#[sqlx::test(migrations = false)]
async fn an_unroutable_event_is_moved_to_failed_with_the_reason(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    // An exchange no queue is bound to: the broker returns the message.
    let exchange = unique("rmq-nobody");
    let e = NewEvent::new("order", "k-1", "order.placed")
        .topic(&exchange)
        .json_payload(&serde_json::json!({ "seq": 0 }))?;
    append(&pool, &e).await?;
    let relay = RunningRelay::start_exactly(&pool, rabbit_config(&amqp_url()))?;
    eventually(WAIT, "the event failed", || async {
        let failed: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM outbox WHERE status = 'failed'")
                .fetch_optional(&pool)
                .await?;
        Ok(failed.is_some())
    })
    .await?;
    let reason: String = sqlx::query_scalar("SELECT last_error FROM outbox WHERE event_id = $1")
        .bind(e.event_id)
        .fetch_one(&pool)
        .await?;
    println!("failed: {reason}");
    assert!(
        reason.contains("unroutable") && reason.contains(&exchange),
        "the reason names the problem: {reason}"
    );
    relay.stop().await
}

#[sqlx::test(migrations = false)]
async fn an_unreachable_broker_keeps_rows_pending_and_the_relay_unready(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let url = format!("amqp://guest:secret-pw@127.0.0.1:{}/%2f", free_port());
    let e = NewEvent::new("order", "k-1", "order.placed").topic("rmq-unreachable");
    append(&pool, &e).await?;
    let relay = RunningRelay::start_exactly(&pool, rabbit_config(&url))?;
    eventually(Duration::from_secs(20), "not ready, saying why", || async {
        let (state, why) = relay.health.now();
        Ok(!relay.health.is_ready() && why.contains("RabbitMQ") && state.name() != "starting")
    })
    .await?;
    let (_, why) = relay.health.now();
    println!("not ready: {why}");
    assert!(
        !why.contains("secret-pw"),
        "the password never shows: {why}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pending(&pool).await?, 1, "the row waits for the broker");
    relay.stop().await
}

#[sqlx::test(migrations = false)]
async fn a_lost_connection_is_reported_reopened_and_loses_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (exchange, _conn, _ch, mut consumer) = bound_setup(&pool, "rmq-cut").await?;
    let proxy = AmqpProxy::to(&amqp_url()).await?;
    let relay = RunningRelay::start_exactly(&pool, rabbit_config(&proxy.url()))?;
    eventually(WAIT, "ready", || async { Ok(relay.health.is_ready()) }).await?;

    // Events keep coming while the connection is cut for 3 s.
    let n = 300;
    let writer = {
        let pool = pool.clone();
        let exchange = exchange.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let e = NewEvent::new("order", format!("key-{}", i % 5), "order.placed")
                    .topic(&exchange)
                    .json_payload(&serde_json::json!({ "seq": i }))?;
                append(&pool, &e).await?;
                ids.push(e.event_id.to_string());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(ids)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.cut();
    eventually(Duration::from_secs(10), "unready while cut off", || async {
        Ok(!relay.health.is_ready())
    })
    .await?;
    let (_, why) = relay.health.now();
    println!("while cut off: {why}");
    assert!(why.contains("rabbitmq"), "{why}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.heal();
    let ids = writer.await??;

    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    while seen.len() < n {
        let d = next_message(&mut consumer, seen.len()).await?;
        let id = d.properties.message_id().as_ref().expect("id").to_string();
        if !seen.insert(id) {
            duplicates += 1;
        }
    }
    println!("all {n} events after the cut; {duplicates} sent twice");
    assert!(ids.iter().all(|id| seen.contains(id)), "no event lost");
    eventually(WAIT, "ready again", || async {
        Ok(relay.health.is_ready())
    })
    .await?;
    eventually(WAIT, "every row published", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await
}

/// The binary, as an operator runs it, against a broker that refuses its
/// password: `/readyz` says so, the log says it once per change of state
/// and once per back-off step of the waiting batch (never with the
/// password), and nothing is published.
#[sqlx::test(migrations = false)]
async fn a_refused_login_is_said_once_and_in_readyz_without_the_password(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let mut url = url::Url::parse(&amqp_url())?;
    url.set_password(Some("not-the-password-42"))
        .map_err(|()| anyhow::anyhow!("cannot set a password in {url}"))?;
    let name = unique("rmq-refused");
    let port = free_port();
    let relay = integration_tests::spawn_relay(
        &pool,
        &name,
        &[
            "--sink",
            "rabbitmq",
            "--amqp-url",
            url.as_str(),
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )?;
    append(
        &pool,
        &NewEvent::new("order", "k-1", "order.placed").topic("rmq-refused"),
    )
    .await?;
    eventually(
        Duration::from_secs(20),
        "/readyz names the refusal",
        || async {
            Ok(test_kit::http::get_blocking(port, "/readyz")
                .is_ok_and(|(code, body)| code == 503 && body.contains("ACCESS_REFUSED")))
        },
    )
    .await?;
    let (_, readyz) = test_kit::http::get_blocking(port, "/readyz")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(relay);
    let log = std::fs::read_to_string(integration_tests::relay_log(&name))?;
    println!("/readyz: {readyz}");
    // The connection's state once; the batch that cannot go, at each try
    // of its back-off (0.1, 0.2, 0.4 … s, then at most every 30 s).
    let watcher = log.matches("RabbitMQ cannot be used").count();
    let said = log.matches("ACCESS_REFUSED").count();
    assert_eq!(watcher, 1, "the connection's state said once:\n{log}");
    assert!(
        said <= 10,
        "the refusal not said every second or more: {said} times in\n{log}"
    );
    assert!(
        !log.contains("not-the-password-42"),
        "the password is never logged:\n{log}"
    );
    assert!(!readyz.contains("not-the-password-42"));
    assert_eq!(pending(&pool).await?, 1);
    Ok(())
}

/// The WAL source into RabbitMQ: rows and table-less events, in commit
/// order, on the bound queue; the slot confirmed past them.
#[sqlx::test(migrations = false)]
async fn the_wal_source_publishes_rows_and_table_less_events_in_commit_order(
    pool: PgPool,
) -> anyhow::Result<()> {
    use outbox_relay::{slot, WalSource};
    let (exchange, _conn, _ch, mut consumer) = bound_setup(&pool, "rmq-wal").await?;
    integration_tests::drop_test_slots(&pool, &[]).await;
    let name = integration_tests::test_slot_name("rmq");
    slot::create(&pool, &name, &name).await?;
    let mut wal = WalSource::new(slot::ReplicationTarget::from_url(
        &integration_tests::database_url(&pool),
    )?);
    wal.slot = name.clone();
    wal.publication = name.clone();
    let cfg = RelayConfig {
        wal: Some(wal),
        ..rabbit_config(&amqp_url())
    };
    let relay = RunningRelay::start_exactly(&pool, cfg)?;

    // A long transaction around a short one on the same key: commit order.
    let ev = |n: &str| NewEvent::new("order", "k-1", n).topic(&exchange);
    let (first, short, last) = (ev("long.first"), ev("short"), ev("long.last"));
    let mut long = pool.begin().await?;
    append(&mut *long, &first).await?;
    outbox_core::emit(&pool, &short).await?;
    outbox_core::emit(&mut *long, &last).await?;
    long.commit().await?;

    let mut got = Vec::new();
    while got.len() < 3 {
        let d = next_message(&mut consumer, got.len()).await?;
        got.push(d.properties.message_id().as_ref().expect("id").to_string());
    }
    let expected: Vec<String> = [&short, &first, &last]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert_eq!(got, expected, "commit order, rows and table-less alike");
    eventually(WAIT, "the row deleted", || async {
        Ok(pending(&pool).await? == 0)
    })
    .await?;
    relay.stop().await?;
    integration_tests::drop_test_slots(&pool, &[&name]).await;
    Ok(())
}

/// Two relays share the partitions (leases, as on Kafka): each key's
/// events still reach the queue once each, in the order written.
#[sqlx::test(migrations = false)]
async fn two_relays_keep_each_keys_order_on_the_queue(pool: PgPool) -> anyhow::Result<()> {
    let (exchange, _conn, _ch, mut consumer) = bound_setup(&pool, "rmq-two").await?;
    let relays = [
        RunningRelay::start_exactly(&pool, rabbit_config(&amqp_url()))?,
        RunningRelay::start_exactly(&pool, rabbit_config(&amqp_url()))?,
    ];
    let n = 400;
    for i in 0..n {
        let e = NewEvent::new("order", format!("key-{}", i % 20), "order.placed")
            .topic(&exchange)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        append(&pool, &e).await?;
    }
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        let d = next_message(&mut consumer, seen.len()).await?;
        let seq = serde_json::from_slice::<serde_json::Value>(&d.data)?["seq"]
            .as_i64()
            .expect("seq");
        assert!(seen.insert(seq), "event {seq} twice without a fault");
        if let Some(prev) = last.insert(seq % 20, seq) {
            assert!(prev < seq, "key-{}: {seq} after {prev}", seq % 20);
        }
    }
    for relay in relays {
        relay.stop().await?;
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn an_exchange_of_another_type_fails_its_rows_while_others_flow(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (good, _conn, ch, mut consumer) = bound_setup(&pool, "rmq-good").await?;
    // Taken by someone else as a fanout exchange: the relay's durable topic
    // declaration is refused (406 PRECONDITION_FAILED).
    let taken = unique("rmq-fanout");
    ch.exchange_declare(
        taken.clone().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let bad = NewEvent::new("order", "k-1", "order.placed").topic(&taken);
    append(&pool, &bad).await?;
    for i in 0..5 {
        let e = NewEvent::new("order", "k-2", "order.placed")
            .topic(&good)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        append(&pool, &e).await?;
    }
    let relay = RunningRelay::start_exactly(&pool, rabbit_config(&amqp_url()))?;
    for got in 0..5 {
        next_message(&mut consumer, got).await?;
    }
    eventually(WAIT, "the row for the taken exchange failed", || async {
        let failed: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM outbox WHERE event_id = $1 AND status = 'failed'",
        )
        .bind(bad.event_id)
        .fetch_optional(&pool)
        .await?;
        Ok(failed.is_some())
    })
    .await?;
    let reason: String = sqlx::query_scalar("SELECT last_error FROM outbox WHERE event_id = $1")
        .bind(bad.event_id)
        .fetch_one(&pool)
        .await?;
    println!("failed: {reason}");
    assert!(
        reason.contains(&taken) && reason.contains("another type"),
        "the reason names the exchange and the likely cause: {reason}"
    );
    let _ = ch
        .exchange_delete(
            taken.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    relay.stop().await
}
