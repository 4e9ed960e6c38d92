//! A producer: changes a row and appends its event in one transaction.
//!
//! ```sh
//! ./dev up     # PostgreSQL on this machine
//! cargo run -p outbox-toolkit-core --example produce
//! ```
//!
//! `DATABASE_URL` says where (default: the one `./dev up` starts). It
//! creates the outbox schema and an `example_orders` table if missing, then
//! commits one order with its `order.created` event for topic `orders`.
//! `outbox-relay run` publishes it; `cargo run -p consumer-kit --example
//! consume` prints it.

use outbox_core::{append, NewEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&url).await?;
    outbox_core::migrate(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())")
        .execute(&pool)
        .await?;

    let mut tx = pool.begin().await?;
    let order_id: i64 =
        sqlx::query_scalar("INSERT INTO example_orders DEFAULT VALUES RETURNING id")
            .fetch_one(&mut *tx)
            .await?;
    let event = NewEvent::new("order", order_id.to_string(), "order.created")
        .topic("orders")
        .json_payload(&serde_json::json!({ "order_id": order_id }))?;
    let appended = append(&mut *tx, &event).await?;
    tx.commit().await?; // the event exists if and only if the order does
    println!(
        "order {order_id} committed with event {}",
        appended.event_id
    );
    Ok(())
}
