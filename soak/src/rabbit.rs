//! The soak on RabbitMQ (`--sink rabbitmq`): the relays publish to the
//! exchange named by the run's topic, the consumer reads its own queue
//! (`<topic>.soak`, quorum, single active consumer), and a **tap** queue
//! bound to the exchange for every routing key keeps a copy of everything
//! published, which the checker reads as it reads the Kafka topic.

use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::{
    options::{BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties,
};
use uuid::Uuid;

use crate::check::Seen;

/// The consumer's queue for the run's exchange `topic`.
pub(crate) fn queue(topic: &str) -> String {
    format!("{topic}.soak")
}

fn tap(topic: &str) -> String {
    format!("{topic}.tap")
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")
}

/// Declares the exchange `topic` (as the relay does: durable, topic) and
/// the tap queue (durable) bound to it for every routing key.
pub(crate) async fn declare_tap(url: &str, topic: &str) -> anyhow::Result<()> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    test_kit::rabbitmq::bind_queue(
        &ch,
        topic,
        &tap(topic),
        test_kit::rabbitmq::QueueLife::Durable,
    )
    .await?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

/// Waits until the consumer process has declared its queue, so that no
/// event is published before it is bound.
pub(crate) async fn wait_for_queue(url: &str, topic: &str) -> anyhow::Result<()> {
    wait_for_named_queue(url, &queue(topic)).await
}

/// Waits until a consumer process has declared `name`.
pub(crate) async fn wait_for_named_queue(url: &str, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let conn = connect(url).await?;
    loop {
        // A passive declare of a missing queue closes its channel: one each.
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            let _ = conn.close(200, "found".into()).await;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer did not declare queue {name} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every message the tap holds, in queue order (taken: the run is over).
pub(crate) async fn read_tap(url: &str, topic: &str) -> anyhow::Result<Vec<Seen>> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(got) = ch
        .basic_get(tap(topic).into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let d = got.delivery;
        let header = |name: &str| {
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(name)? {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
        };
        let event_id = header("cloudEvents:id")
            .and_then(|v| Uuid::parse_str(&v).ok())
            .context("a message without a valid cloudEvents:id")?;
        let payload: serde_json::Value = serde_json::from_slice(&d.data)?;
        out.push(Seen {
            event_id,
            key: header("cloudEvents:subject").unwrap_or_default(),
            seq: payload["seq"].as_i64().unwrap_or(-1),
            at: None,
        });
    }
    let _ = conn.close(200, "read".into()).await;
    Ok(out)
}

/// Replays every dead letter waiting in the consumer's dead-letter queue
/// (a replayed one leaves it), counting the replays per event id; returns
/// how many.
pub(crate) async fn replay_letters(
    url: &str,
    topic: &str,
    ids: &mut std::collections::HashMap<Uuid, u64>,
) -> anyhow::Result<usize> {
    let (letters, report) = consumer_kit::rabbitmq::dead_letters(
        url,
        &format!("{}.dlq", queue(topic)),
        &consumer_kit::DeadLetterFilter::default(),
        true,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    for id in letters.iter().filter_map(|l| l.event_id) {
        *ids.entry(id).or_default() += 1;
    }
    Ok(report.replayed)
}
