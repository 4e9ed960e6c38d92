//! `producer`: what the outbox costs a producer's transaction, against the
//! same transaction without it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use outbox_core::{append, NewEvent};
use sqlx::Executor;

use crate::{median, Env};

pub(crate) async fn producer(env: &Env, runs: usize, seconds: u64) -> anyhow::Result<()> {
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    env.pool
        .execute("CREATE TABLE IF NOT EXISTS bench_accounts (id bigint PRIMARY KEY, balance numeric NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    env.pool
        .execute("INSERT INTO bench_accounts (id, balance) SELECT g, 0 FROM generate_series(1, 8) g ON CONFLICT DO NOTHING")
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.pool).await?;
    listener.listen("outbox").await?;
    let drain = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
    // The trigger notifies only while a live relay waits (migration V4).
    let stand_in = |waiting: bool| {
        let pool = env.pool.clone();
        async move {
            sqlx::query("DELETE FROM outbox_relays WHERE relay_id = 'bench-stand-in'")
                .execute(&pool)
                .await?;
            sqlx::query(
                "INSERT INTO outbox_relays (relay_id, lease_until, waiting_since) \
                 VALUES ('bench-stand-in', now() + interval '1 hour', CASE WHEN $1 THEN now() END)",
            )
            .bind(waiting)
            .execute(&pool)
            .await?;
            anyhow::Ok(())
        }
    };
    // A week of remembered published ids at ~1.6 events/s... or a day at
    // ~12/s: the index a producer's insert probes (migration V5) is not empty.
    env.pool
        .execute(
            "INSERT INTO outbox_published_ids (event_id, published_at) \
             SELECT gen_random_uuid(), now() - interval '1 hour' FROM generate_series(1, 1000000)",
        )
        .await?;
    env.pool
        .execute("VACUUM ANALYZE outbox_published_ids")
        .await?;
    for shape in [Shape::NewOrder, Shape::Credit] {
        println!(
            "== producer: {}, with and without an outbox row, {seconds}s each, a LISTEN session open, \
             no relay running (a stand-in row in outbox_relays plays a busy or a waiting relay)",
            shape.describe()
        );
        for clients in [1usize, 8] {
            let (mut empty, mut off, mut busy, mut waiting, mut message, mut unchecked) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for run in 1..=runs {
                let measure = |variant| tps(env, clients, seconds, shape, variant);
                let base = measure(Variant::Plain).await?;
                let select = measure(Variant::EmptyStatement).await?;
                let wal = measure(Variant::WalMessage).await?;
                env.pool
                    .execute("ALTER TABLE outbox DISABLE TRIGGER outbox_notify")
                    .await?;
                let quiet = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox ENABLE TRIGGER outbox_notify")
                    .await?;
                stand_in(false).await?;
                let gated = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox DISABLE TRIGGER outbox_refuse_published_ids")
                    .await?;
                let no_id_check = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("ALTER TABLE outbox ENABLE TRIGGER outbox_refuse_published_ids")
                    .await?;
                stand_in(true).await?;
                let notify = measure(Variant::WithOutbox).await?;
                env.pool
                    .execute("DELETE FROM outbox_relays WHERE relay_id = 'bench-stand-in'")
                    .await?;
                env.pool.execute("TRUNCATE outbox, bench_orders").await?;
                env.pool.execute("VACUUM bench_accounts").await?;
                println!(
                    "{clients} client(s) run {run}: plain {base:.0} tx/s  +SELECT 1 {select:.0}  \
                     +outbox: trigger off {quiet:.0}, relay busy {gated:.0}, relay waiting {notify:.0} tx/s  \
                     cost {:.2} / {:.2} / {:.2} (empty statement {:.2}, WAL message {:.2}); \
                     published-id check off {no_id_check:.0} tx/s, its cost {:.3}",
                    base / quiet,
                    base / gated,
                    base / notify,
                    base / select,
                    base / wal,
                    no_id_check / gated,
                );
                unchecked.push(no_id_check / gated);
                empty.push(base / select);
                off.push(base / quiet);
                busy.push(base / gated);
                waiting.push(base / notify);
                message.push(base / wal);
            }
            println!(
                "median, {}, {clients} client(s): cost with the outbox row: trigger off {:.2}, \
                 relay busy (no NOTIFY) {:.2}, relay waiting (every commit notifies) {:.2} (target <= 1.25); \
                 an empty extra statement alone {:.2}; the event as a WAL message instead of a row \
                 (reference, not a relay mode) {:.2}; the published-id check (V5, 1M ids \
                 remembered) costs {:.3}× the transaction",
                shape.name(),
                median(off),
                median(busy),
                median(waiting),
                median(empty),
                median(message),
                median(unchecked),
            );
        }
    }
    drain.abort();
    Ok(())
}

/// The producer transaction measured.
#[derive(Clone, Copy)]
enum Shape {
    /// `INSERT` one small order row: the smallest transaction, the worst case.
    NewOrder,
    /// Lock an account row (`SELECT … FOR UPDATE`) and `UPDATE` it, like
    /// `sample-app`'s order status change. Each client has its own row.
    Credit,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::NewOrder => "new order",
            Shape::Credit => "credit",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::NewOrder => "new order (BEGIN; INSERT one order row; COMMIT)",
            Shape::Credit => {
                "credit (BEGIN; SELECT the account FOR UPDATE; UPDATE it; COMMIT), one account per client"
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Variant {
    /// The transaction alone.
    Plain,
    /// The order row and an empty statement: what one more round trip costs.
    EmptyStatement,
    /// The transaction and the outbox row, through `outbox_core::append`.
    WithOutbox,
    /// The same event written as a transactional logical-decoding message
    /// (`pg_logical_emit_message`) instead of a row: WAL only, no heap or
    /// index insert. A reference for what a row-less design would cost the
    /// producer; the relay has no such mode.
    WalMessage,
}

/// Transactions per second for `clients` concurrent clients over `seconds`.
async fn tps(
    env: &Env,
    clients: usize,
    seconds: u64,
    shape: Shape,
    variant: Variant,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks = (0..clients).map(|c| {
        let pool = env.pool.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let mut tx = pool.begin().await?;
                let id: i64 = match shape {
                    Shape::NewOrder => {
                        sqlx::query_scalar(
                            "INSERT INTO bench_orders (customer, total) VALUES ($1, $2) RETURNING id",
                        )
                        .bind(format!("c{c}"))
                        .bind(i as f64 * 1.5)
                        .fetch_one(&mut *tx)
                        .await?
                    }
                    Shape::Credit => {
                        let account = c as i64 + 1;
                        let _balance: f64 = sqlx::query_scalar(
                            "SELECT balance::float8 FROM bench_accounts WHERE id = $1 FOR UPDATE",
                        )
                        .bind(account)
                        .fetch_one(&mut *tx)
                        .await?;
                        sqlx::query(
                            "UPDATE bench_accounts SET balance = balance + $2, updated_at = now() WHERE id = $1",
                        )
                        .bind(account)
                        .bind(1.5f64)
                        .execute(&mut *tx)
                        .await?;
                        account
                    }
                };
                if let Variant::EmptyStatement = variant {
                    sqlx::query("SELECT 1").execute(&mut *tx).await?;
                }
                if let Variant::WalMessage = variant {
                    let envelope = serde_json::json!({
                        "event_id": uuid::Uuid::now_v7(),
                        "aggregate_type": "order",
                        "aggregate_id": id.to_string(),
                        "event_type": "order.created",
                        "event_version": 1,
                        "topic": "bench-orders",
                        "payload": { "id": id, "customer": format!("c{c}") },
                        "headers": {},
                        "occurred_at": chrono::Utc::now(),
                    });
                    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1::bytea)")
                        .bind(serde_json::to_vec(&envelope)?)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Variant::WithOutbox = variant {
                    let e = NewEvent::new("order", id.to_string(), "order.created")
                        .topic("bench-orders")
                        .json_payload(
                            &serde_json::json!({ "id": id, "customer": format!("c{c}") }),
                        )?;
                    append(&mut *tx, &e).await?;
                }
                tx.commit().await?;
                i += 1;
            }
            done.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
            anyhow::Ok(())
        })
    });
    let started = Instant::now();
    for t in futures::future::join_all(tasks).await {
        t??;
    }
    Ok(done.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
