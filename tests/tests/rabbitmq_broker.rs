//! The RabbitMQ sink through the broker's own faults, on a private node
//! (`test_kit::rabbitmq`, so the shared broker is never touched): a broker
//! restart (`stop_app`/`start_app`, which closes every connection) while
//! events keep coming, and a memory alarm (`set_vm_memory_high_watermark
//! 0`), which blocks publishing connections. One test, the faults one
//! after the other.

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
use integration_tests::{eventually, pending, quick_relay_config, unique, RunningRelay};
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
    Connection, ConnectionProperties,
};
use outbox_core::{append, NewEvent};
use outbox_relay::{RabbitMqSink, RelayConfig};
use sqlx::PgPool;
use test_kit::rabbitmq::Node;

const WAIT: Duration = Duration::from_secs(60);

/// Lifts the memory alarm when dropped, whatever the test's fate.
struct Alarm<'a>(&'a Node);

impl<'a> Alarm<'a> {
    fn raise(node: &'a Node) -> anyhow::Result<Self> {
        node.ctl(&["set_vm_memory_high_watermark", "0"])?;
        Ok(Self(node))
    }
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.ctl(&["set_vm_memory_high_watermark", "0.4"]) {
            eprintln!("could not lift the memory alarm: {e}");
        }
    }
}

/// Starts the broker's application again when dropped.
struct Stopped<'a>(&'a Node);

impl<'a> Stopped<'a> {
    fn stop(node: &'a Node) -> anyhow::Result<Self> {
        node.ctl(&["stop_app"])?;
        Ok(Self(node))
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.ctl(&["start_app"]) {
            eprintln!("could not start the broker again: {e}");
        }
    }
}

/// Reads `n` distinct event ids from `queue` on a new connection; returns
/// how many came twice.
async fn read_all(url: &str, queue: &str, ids: &[String]) -> anyhow::Result<usize> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.to_string().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = HashSet::new();
    let mut twice = 0;
    while !ids.iter().all(|id| seen.contains(id)) {
        let next = tokio::time::timeout(WAIT, consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("{} of {} events within {WAIT:?}", seen.len(), ids.len()))?
            .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
        next.acker.ack(BasicAckOptions::default()).await?;
        let id = next
            .properties
            .message_id()
            .as_ref()
            .expect("id")
            .to_string();
        if !seen.insert(id) {
            twice += 1;
        }
    }
    conn.close(200, "done".into()).await?;
    Ok(twice)
}

async fn append_n(
    pool: &PgPool,
    exchange: &str,
    from: usize,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let e = NewEvent::new("order", format!("key-{}", i % 5), "order.placed")
            .topic(exchange)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        append(pool, &e).await?;
        ids.push(e.event_id.to_string());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(ids)
}

/// Every row published, and the relay ready again.
async fn drained_and_ready(pool: &PgPool, relay: &RunningRelay) -> anyhow::Result<()> {
    eventually(WAIT, "every row published", || async {
        Ok(pending(pool).await? == 0)
    })
    .await?;
    eventually(WAIT, "ready again", || async {
        Ok(relay.health.is_ready())
    })
    .await
}

#[sqlx::test(migrations = false)]
async fn a_broker_restart_and_a_memory_alarm_lose_nothing_and_are_reported(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    let node = tokio::task::spawn_blocking(Node::start).await??;
    let url = node.url.clone();
    // A durable queue: it outlives the restart (an exclusive one would not).
    let exchange = unique("rmq-faults");
    let queue = format!("{exchange}-q");
    {
        let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        test_kit::rabbitmq::bind_queue(
            &ch,
            &exchange,
            &queue,
            test_kit::rabbitmq::QueueLife::Durable,
        )
        .await?;
        conn.close(200, "declared".into()).await?;
    }
    let cfg = RelayConfig {
        rabbitmq: Some(RabbitMqSink::new(&url)),
        publish_timeout: Duration::from_secs(3),
        ..quick_relay_config()
    };
    let relay = RunningRelay::start_exactly(&pool, cfg)?;
    eventually(WAIT, "ready", || async { Ok(relay.health.is_ready()) }).await?;

    // 1. A broker restart while events keep coming.
    let writer = tokio::spawn({
        let (pool, exchange) = (pool.clone(), exchange.clone());
        async move { append_n(&pool, &exchange, 0, 200).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Stopped::stop(&node)?;
    eventually(
        Duration::from_secs(10),
        "unready while the broker is down",
        || async { Ok(!relay.health.is_ready()) },
    )
    .await?;
    println!("broker down: {}", relay.health.reason());
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(stopped);
    let ids = writer.await??;
    let twice = read_all(&url, &queue, &ids).await?;
    println!("restart: all {} events, {twice} twice", ids.len());
    drained_and_ready(&pool, &relay).await?;

    // 2. A memory alarm: publishing connections are blocked; rows wait.
    let alarm = Alarm::raise(&node)?;
    let ids = append_n(&pool, &exchange, 200, 5).await?;
    eventually(Duration::from_secs(30), "unready while blocked", || async {
        Ok(!relay.health.is_ready())
    })
    .await?;
    let why = relay.health.reason();
    println!("alarm: {why}");
    assert!(why.contains("rabbitmq"), "{why}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'failed'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(failed, 0, "a blocked broker fails nothing");
    assert!(pending(&pool).await? > 0, "the rows wait for the broker");
    drop(alarm);
    let twice = read_all(&url, &queue, &ids).await?;
    println!("alarm: all {} events, {twice} twice", ids.len());
    drained_and_ready(&pool, &relay).await?;
    relay.stop().await?;
    Ok(())
}
