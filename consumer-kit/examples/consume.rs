//! A complete consumer: prints every `order.created` event of topic
//! `orders` once per group, whatever Kafka redelivers.
//!
//! ```sh
//! ./dev up     # PostgreSQL and Kafka on this machine
//! cargo run -p consumer-kit --example consume
//! ```
//!
//! `DATABASE_URL` and `KAFKA_BROKERS` say where (defaults: the ones
//! `./dev up` starts); `TOPIC` and `GROUP` default to `orders` and
//! `example`. Publish events with `cargo run -p outbox-toolkit-core
//! --example produce` and `outbox-relay run`. Ctrl-C stops it cleanly.

use consumer_kit::{Consumer, ConsumerConfig, Envelope, Handler, HandlerError};
use tokio_util::sync::CancellationToken;

/// What the producer example writes.
#[derive(Debug, serde::Deserialize)]
struct OrderCreated {
    order_id: i64,
}

struct PrintOrder;

#[consumer_kit::async_trait]
impl Handler for PrintOrder {
    type Payload = OrderCreated;

    async fn handle(
        &self,
        event: &Envelope<OrderCreated>,
        _tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        // Real handlers write their effects through `_tx`: they commit
        // together with the dedupe record, or not at all.
        println!(
            "order {} created (event {})",
            event.payload.order_id, event.event_id
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let pool = sqlx::PgPool::connect(&env(
        "DATABASE_URL",
        "postgres://postgres:postgres@127.0.0.1:5432/postgres",
    ))
    .await?;
    consumer_kit::migrate(&pool).await?;
    let cfg = ConsumerConfig {
        brokers: env("KAFKA_BROKERS", "127.0.0.1:9092"),
        ..ConsumerConfig::new(env("GROUP", "example"), [env("TOPIC", "orders")])
    };
    let consumer = Consumer::builder(cfg, pool)
        .handler("order.created", PrintOrder)
        .build()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    consumer.run(shutdown).await?;
    Ok(())
}
