//! consumer-kit's RabbitMQ source (feature `rabbitmq`) against the real
//! RabbitMQ `./dev up` runs (`AMQP_URL`), fed by the relay's RabbitMQ sink:
//! each event applied once (a redelivered copy deduped), retries waiting in
//! delay queues without holding the queue, dead letters with their reasons
//! and a replay that applies them once, crashes mid-stream that double
//! nothing, per-key order under Single Active Consumer, and an unreachable
//! broker that keeps the consumer unready, saying why.

use std::{collections::HashMap, sync::atomic::Ordering, time::Duration};

use consumer_kit::{
    rabbitmq::{self, RabbitMqSource},
    Consumer, ConsumerConfig, ConsumerError, ConsumerHandle, DeadLetterFilter,
};
use integration_tests::{
    consumer::{consumer_db, effect_counts, Effects},
    eventually, quick_relay_config, unique, RunningRelay,
};
use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Connection, ConnectionProperties,
};
use outbox_core::{append, NewEvent};
use outbox_relay::{RabbitMqSink, RelayConfig};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn relay_config(url: &str) -> RelayConfig {
    RelayConfig {
        rabbitmq: Some(RabbitMqSink::new(url)),
        ..quick_relay_config()
    }
}

/// Fast settings: short backoff, three tries, no cleanup.
fn cfg(group: &str, exchange: &str) -> ConsumerConfig {
    ConsumerConfig {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_attempts: 3,
        cleanup_interval: None,
        drain_timeout: Duration::from_secs(5),
        ..ConsumerConfig::new(group, [exchange])
    }
}

fn build(
    pool: &PgPool,
    cfg: ConsumerConfig,
    source: RabbitMqSource,
    handler: Effects,
) -> Result<Consumer, ConsumerError> {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    Consumer::builder(cfg, pool.clone())
        .rabbitmq(source)
        .handler("item.added", handler)
        .build()
}

/// Starts the consumer and waits until it consumes (its queue is declared
/// and bound, so the relay's messages are routed to it).
async fn start(
    pool: &PgPool,
    cfg: ConsumerConfig,
    source: RabbitMqSource,
    handler: Effects,
) -> anyhow::Result<ConsumerHandle> {
    let c = build(pool, cfg, source, handler)?.start();
    let health = c.health();
    eventually(WAIT, "the consumer consumes its queue", || async {
        Ok(health.is_ready())
    })
    .await?;
    Ok(c)
}

async fn append_items(
    pool: &PgPool,
    exchange: &str,
    items: &[serde_json::Value],
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let e = NewEvent::new("item", format!("k{}", i % 3), "item.added")
            .topic(exchange)
            .json_payload(item)?;
        append(pool, &e).await?;
        ids.push(e.event_id);
    }
    Ok(ids)
}

fn seqs(n: i64) -> Vec<serde_json::Value> {
    (0..n).map(|i| serde_json::json!({ "seq": i })).collect()
}

#[sqlx::test(migrations = false)]
async fn relayed_events_apply_once_and_a_redelivered_copy_is_deduped(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    let (exchange, group) = (unique("rmq-ck"), unique("g"));
    let c = start(
        &pool,
        cfg(&group, &exchange),
        RabbitMqSource::new(amqp_url()),
        Effects::default(),
    )
    .await?;
    let ids = append_items(&pool, &exchange, &seqs(100)).await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&amqp_url()))?;
    let stats = c.stats();
    eventually(WAIT, "100 applied", || async {
        Ok(stats.snapshot().processed == 100)
    })
    .await?;

    // The same event again, as a relay that died before its commit sends
    // it: the consumer finds it applied.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents:id", ids[7].to_string()),
        ("cloudEvents:type", "item.added".to_string()),
        ("cloudEvents:specversion", "1.0".to_string()),
    ] {
        headers.insert(
            name.into(),
            AMQPValue::LongString(LongString::from(value.into_bytes())),
        );
    }
    ch.basic_publish(
        exchange.clone().into(),
        "item.added".into(),
        BasicPublishOptions::default(),
        br#"{"seq": 7}"#,
        BasicProperties::default().with_headers(headers),
    )
    .await?
    .await?;
    eventually(WAIT, "the copy found a duplicate", || async {
        Ok(stats.snapshot().duplicates == 1)
    })
    .await?;
    c.stop().await?;
    relay.stop().await?;
    let s = stats.snapshot();
    assert_eq!((s.processed, s.retries, s.dead_lettered), (100, 0, 0));
    assert_eq!(effect_counts(&pool).await?, (100, 100), "each effect once");
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE consumer_group = $1")
            .bind(&group)
            .fetch_one(&pool)
            .await?;
    assert_eq!(recorded, 100);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn retries_wait_in_delay_queues_then_dead_letters_replay_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-dlq"), unique("g"));
    let handler = Effects::default();
    let fixed = handler.fixed.clone();
    let calls = handler.calls.clone();
    let c = start(
        &pool,
        ConsumerConfig {
            // Long enough that the others are all applied while the
            // retried one waits.
            min_backoff: Duration::from_millis(1500),
            max_backoff: Duration::from_secs(3),
            ..cfg(&group, &exchange)
        },
        RabbitMqSource::new(amqp_url()),
        handler,
    )
    .await?;
    let mut items = vec![
        serde_json::json!({ "seq": 0, "fail_times": 1 }), // retried once, then applied
        serde_json::json!({ "seq": 1, "poison": true }),  // dead-lettered at once
        serde_json::json!({ "seq": 2, "fail_times": 3 }), // three tries, dead-lettered
    ];
    items.extend((3..20).map(|i| serde_json::json!({ "seq": i })));
    let ids = append_items(&pool, &exchange, &items).await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&amqp_url()))?;
    let stats = c.stats();
    eventually(WAIT, "18 applied and 2 dead-lettered", || async {
        let s = stats.snapshot();
        Ok(s.processed == 18 && s.dead_lettered == 2)
    })
    .await?;
    let s = stats.snapshot();
    assert_eq!(s.retries, 3, "seq 0 once, seq 2 twice");
    assert_eq!(calls.lock().unwrap()[&ids[2]], 3, "three tries of seq 2");

    // The queue was not held: every plain event was applied before seq 0's
    // retry came back from its delay queue.
    let (last_plain, retried): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT (SELECT max(at) FROM effects e JOIN processed_events p USING (event_id) \
                     WHERE e.seq >= 3), \
                    (SELECT max(at) FROM effects e JOIN processed_events p USING (event_id) \
                     WHERE e.seq = 0)",
        )
        .fetch_one(&pool)
        .await?;
    assert!(
        last_plain < retried,
        "seq 0 waited in a delay queue ({retried}) while the rest flowed (last {last_plain})"
    );

    // The dead letters, read twice (reading takes nothing away).
    let dlq = format!("{group}.dlq");
    let all = DeadLetterFilter::default();
    let (letters, _) = rabbitmq::dead_letters(&amqp_url(), &dlq, &all, false)
        .await
        .map_err(anyhow::Error::msg)?;
    let (again, _) = rabbitmq::dead_letters(&amqp_url(), &dlq, &all, false)
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(letters, again);
    let by_id: HashMap<Uuid, _> = letters.iter().map(|l| (l.event_id.unwrap(), l)).collect();
    assert_eq!(by_id.len(), 2, "{letters:#?}");
    let poison = by_id[&ids[1]];
    assert_eq!(poison.kind.as_deref(), Some("permanent"));
    assert_eq!(poison.attempts, Some(1));
    assert!(poison
        .reason
        .as_deref()
        .unwrap()
        .contains("seq 1 is poisoned"));
    let exhausted = by_id[&ids[2]];
    assert_eq!(exhausted.kind.as_deref(), Some("retries_exhausted"));
    assert_eq!(exhausted.attempts, Some(3));
    for l in [poison, exhausted] {
        assert_eq!(l.original_topic.as_deref(), Some(exchange.as_str()));
        assert_eq!(l.original_routing_key.as_deref(), Some("item.added"));
        assert_eq!(l.consumer_group.as_deref(), Some(group.as_str()));
        assert_eq!(l.event_type.as_deref(), Some("item.added"));
        assert!(l.dead_lettered_at.is_some());
    }

    // The operator's command lists the same two.
    let (code, out, err) = dlq_cmd(&["list", &dlq, "--json"])?;
    assert_eq!(code, Some(0), "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(listed.len(), 2, "{out}");
    assert!(listed.iter().all(
        |l| l["original_routing_key"] == "item.added" && l["consumer_group"] == group.as_str()
    ));

    // Fixed, then replayed by event id, one through the library and one
    // through the command: each applied once.
    fixed.store(true, Ordering::SeqCst);
    let only = DeadLetterFilter {
        event_id: Some(ids[1]),
        ..DeadLetterFilter::default()
    };
    let (_, report) = rabbitmq::dead_letters(&amqp_url(), &dlq, &only, true)
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(report.replayed, 1);
    let (code, _, err) = dlq_cmd(&["replay", &dlq, "--event-id", &ids[2].to_string()])?;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("replayed 1"), "{err}");
    eventually(WAIT, "the replayed two applied", || async {
        Ok(stats.snapshot().processed == 20)
    })
    .await?;
    let (left, _) = rabbitmq::dead_letters(&amqp_url(), &dlq, &all, false)
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(
        left.is_empty(),
        "replayed letters leave the queue: {left:#?}"
    );
    c.stop().await?;
    relay.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (20, 20));
    Ok(())
}

/// Runs `outbox-dlq --broker rabbitmq` with `args` on `AMQP_URL`'s broker.
fn dlq_cmd(args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(integration_tests::dlq_bin())
        .args(["--broker", "rabbitmq"])
        .args(args)
        .env("AMQP_URL", amqp_url())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[sqlx::test(migrations = false)]
async fn consumers_killed_mid_stream_apply_each_event_once(pool: PgPool) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    // A private node: the test closes every connection on it.
    let node = test_kit::rabbitmq::Node::start()?;
    let (exchange, group) = (unique("rmq-ck-crash"), unique("g"));
    let n = 300;
    let source = || RabbitMqSource::new(node.url.clone());
    let handler = Effects {
        sleep: Duration::from_millis(5),
        ..Effects::default()
    };
    // Declares the queue, then goes.
    start(&pool, cfg(&group, &exchange), source(), handler.clone())
        .await?
        .stop()
        .await?;
    append_items(&pool, &exchange, &seqs(n)).await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&node.url))?;
    let applied = || async {
        let (_, distinct) = effect_counts(&pool).await?;
        anyhow::Ok(distinct)
    };
    for crash in 1..=3 {
        let consumer = build(&pool, cfg(&group, &exchange), source(), handler.clone())?;
        let task = tokio::spawn(consumer.run(tokio_util::sync::CancellationToken::new()));
        let target = crash * n / 4;
        eventually(WAIT, "progress before the crash", || async {
            Ok(applied().await? >= target)
        })
        .await?;
        // kill -9 as the broker sees it: the task is gone mid-handling
        // (transactions open, commits not yet acknowledged) and its
        // connection drops.
        task.abort();
        let _ = task.await;
        node.ctl(&["close_all_connections", "test crash"])?;
        println!("crash {crash} after {} applied", applied().await?);
    }
    let c = start(&pool, cfg(&group, &exchange), source(), handler).await?;
    eventually(WAIT, "every event applied", || async {
        Ok(applied().await? == n)
    })
    .await?;
    // Committed but never acknowledged before a crash: delivered again,
    // found applied.
    println!(
        "duplicates after the crashes: {}",
        c.stats().snapshot().duplicates
    );
    c.stop().await?;
    relay.stop().await?;
    assert_eq!(
        effect_counts(&pool).await?,
        (n, n),
        "no effect applied twice"
    );
    Ok(())
}

/// Cuts the consumer's connection (through `proxy`) while the handler of
/// `target` runs, once: its transaction still commits, but its ack can no
/// longer reach the broker, which gets the delivery back as unacknowledged
/// when the connection drops: exactly a consumer that died between its
/// database commit and its ack, as the broker sees it.
struct CutDuringHandler {
    inner: Effects,
    proxy: std::sync::Arc<integration_tests::AmqpProxy>,
    target: Uuid,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[consumer_kit::async_trait]
impl consumer_kit::Handler for CutDuringHandler {
    type Payload = integration_tests::consumer::Item;

    async fn handle(
        &self,
        event: &consumer_kit::Envelope<Self::Payload>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), consumer_kit::HandlerError> {
        if event.event_id == self.target && !self.done.swap(true, Ordering::SeqCst) {
            self.proxy.cut();
            let proxy = std::sync::Arc::clone(&self.proxy);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                proxy.heal();
            });
        }
        self.inner.handle(event, tx).await
    }
}

#[sqlx::test(migrations = false)]
async fn a_commit_whose_ack_never_reaches_the_broker_is_applied_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-noack"), unique("g"));
    let proxy = std::sync::Arc::new(integration_tests::AmqpProxy::to(&amqp_url()).await?);
    let ids = append_items(&pool, &exchange, &seqs(20)).await?;
    let handler = CutDuringHandler {
        inner: Effects::default(),
        proxy: std::sync::Arc::clone(&proxy),
        target: ids[5],
        done: Default::default(),
    };
    let c = Consumer::builder(cfg(&group, &exchange), pool.clone())
        .rabbitmq(RabbitMqSource {
            // One at a time, so that the cut finds only the target in hand.
            single_active_consumer: true,
            ..RabbitMqSource::new(proxy.url())
        })
        .handler("item.added", handler)
        .build()?
        .start();
    let health = c.health();
    eventually(WAIT, "consuming", || async { Ok(health.is_ready()) }).await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&amqp_url()))?;
    let stats = c.stats();
    // The target was committed in a batch with what was ready beside it
    // (single active consumer settles in batches): all of them come again.
    let done = || async {
        let s = stats.snapshot();
        Ok(s.processed == 20 && s.duplicates >= 1)
    };
    let waited = eventually(WAIT, "20 applied and the unacknowledged ones skipped", done).await;
    println!("stats: {:?}", stats.snapshot());
    waited?;
    c.stop().await?;
    relay.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (20, 20), "no effect twice");
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn single_active_consumer_keeps_each_keys_order_through_retries(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-sac"), unique("g"));
    let source = || RabbitMqSource {
        single_active_consumer: true,
        ..RabbitMqSource::new(amqp_url())
    };
    let member = |name: &str| Effects {
        member: name.into(),
        ..Effects::default()
    };
    let a = start(&pool, cfg(&group, &exchange), source(), member("a")).await?;
    let b = build(&pool, cfg(&group, &exchange), source(), member("b"))?.start();
    let mut items = seqs(90);
    items[10] = serde_json::json!({ "seq": 10, "fail_times": 2 });
    items[41] = serde_json::json!({ "seq": 41, "fail_times": 1 });
    append_items(&pool, &exchange, &items).await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&amqp_url()))?;
    eventually(WAIT, "90 applied", || async {
        Ok(effect_counts(&pool).await?.1 == 90)
    })
    .await?;
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT e.seq, e.member FROM effects e JOIN processed_events p USING (event_id) \
         ORDER BY e.at",
    )
    .fetch_all(&pool)
    .await?;
    let members: std::collections::BTreeSet<&str> = rows.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(members.len(), 1, "one active consumer: {members:?}");
    // The relay writes each key's events in order; applied in that order,
    // retries included.
    let mut last: HashMap<i64, i64> = HashMap::new();
    for (seq, _) in &rows {
        if let Some(prev) = last.insert(seq % 3, *seq) {
            assert!(prev < *seq, "key k{}: {seq} applied after {prev}", seq % 3);
        }
    }
    assert_eq!(
        a.stats().snapshot().retries + b.stats().snapshot().retries,
        3
    );
    a.stop().await?;
    b.stop().await?;
    relay.stop().await?;
    assert_eq!(effect_counts(&pool).await?, (90, 90));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn another_producers_message_applies_and_an_undecodable_one_is_dead_lettered_at_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-foreign"), unique("g"));
    let c = start(
        &pool,
        cfg(&group, &exchange),
        RabbitMqSource::new(amqp_url()),
        Effects::default(),
    )
    .await?;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let publish = |props: BasicProperties, body: &'static [u8]| {
        let (ch, exchange) = (ch.clone(), exchange.clone());
        async move {
            ch.basic_publish(
                exchange.into(),
                "item.added".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
            anyhow::Ok(())
        }
    };
    // Another producer: the event id and type only as AMQP properties.
    let id = Uuid::new_v4();
    publish(
        BasicProperties::default()
            .with_message_id(id.to_string().into())
            .with_type("item.added".into()),
        br#"{"seq": 1}"#,
    )
    .await?;
    // Not an event at all: no id anywhere.
    publish(BasicProperties::default(), br#"{"seq": 2}"#).await?;
    let stats = c.stats();
    eventually(WAIT, "one applied, one dead-lettered", || async {
        let s = stats.snapshot();
        Ok(s.processed == 1 && s.dead_lettered == 1)
    })
    .await?;
    c.stop().await?;
    let applied: Uuid = sqlx::query_scalar("SELECT event_id FROM effects")
        .fetch_one(&pool)
        .await?;
    assert_eq!(applied, id, "message_id is the event id");
    let (letters, _) = rabbitmq::dead_letters(
        &amqp_url(),
        &format!("{group}.dlq"),
        &DeadLetterFilter::default(),
        false,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].kind.as_deref(), Some("undecodable"));
    assert_eq!(letters[0].attempts, Some(0));
    assert!(
        letters[0].reason.as_deref().unwrap().contains("ce_id"),
        "the reason names the missing id: {:?}",
        letters[0].reason
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_queue_declared_otherwise_stops_the_consumer_with_a_clear_error(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-taken"), unique("g"));
    // The group's queue already exists as a classic queue; the consumer
    // asks for a quorum queue: the broker refuses (406), and no retry
    // would change that.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    test_kit::rabbitmq::bind_queue(
        &ch,
        &exchange,
        &group,
        test_kit::rabbitmq::QueueLife::Durable,
    )
    .await?;
    let consumer = build(
        &pool,
        cfg(&group, &exchange),
        RabbitMqSource::new(amqp_url()),
        Effects::default(),
    )?;
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the consumer kept trying instead of stopping"))?;
    let err = ended.unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains(&group)
            && err.contains("PRECONDITION")
            && err.contains("RabbitMqSource::queue"),
        "names the queue, the refusal and what to do: {err}"
    );
    let _ = ch
        .queue_delete(group.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn shutdown_in_queue_order_ends_within_the_drain_even_while_retrying(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    outbox_core::migrate(&pool).await?;
    let (exchange, group) = (unique("rmq-ck-stop"), unique("g"));
    let c = start(
        &pool,
        ConsumerConfig {
            max_attempts: 10,
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(1),
            ..cfg(&group, &exchange)
        },
        RabbitMqSource {
            single_active_consumer: true,
            ..RabbitMqSource::new(amqp_url())
        },
        Effects::default(),
    )
    .await?;
    append_items(
        &pool,
        &exchange,
        &[serde_json::json!({ "seq": 0, "fail_times": 100 })],
    )
    .await?;
    let relay = RunningRelay::start_exactly(&pool, relay_config(&amqp_url()))?;
    let stats = c.stats();
    eventually(WAIT, "a retry under way", || async {
        Ok(stats.snapshot().retries >= 1)
    })
    .await?;
    let asked = std::time::Instant::now();
    c.stop().await?;
    let took = asked.elapsed();
    println!("stopped after {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "the 1 s drain, not the 5 s backoff nor ten tries: {took:?}"
    );
    relay.stop().await?;
    // Not dead-lettered, not applied: it waits in the queue for the next run.
    assert_eq!(stats.snapshot().dead_lettered, 0);
    assert_eq!(effect_counts(&pool).await?, (0, 0));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn bad_settings_and_an_unreachable_broker_say_what_is_wrong(
    pool: PgPool,
) -> anyhow::Result<()> {
    consumer_db(&pool).await?;
    let err = build(
        &pool,
        cfg("g", "x"),
        RabbitMqSource::new("http://guest:pw@127.0.0.1:5672/"),
        Effects::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("amqp://") && !err.contains("pw"), "{err}");

    let url = format!(
        "amqp://guest:secret-pw@127.0.0.1:{}/%2f",
        integration_tests::free_port()
    );
    let c = build(
        &pool,
        cfg(&unique("g"), "x"),
        RabbitMqSource::new(url),
        Effects::default(),
    )?
    .start();
    let health = c.health();
    eventually(Duration::from_secs(20), "unready, saying why", || async {
        let r = health.now();
        Ok(!r.ready && r.reason.contains("RabbitMQ unreachable"))
    })
    .await?;
    let reason = health.now().reason;
    println!("{reason}");
    assert!(!reason.contains("secret-pw"), "{reason}");
    c.stop().await?;
    Ok(())
}
