//! The sample app: its HTTP API, and the whole demo, against the real
//! PostgreSQL and broker.

use integration_tests::brokers;
use sample_app::{
    consumers::Broker,
    demo::{self, http, DemoOptions},
    orders::{self, Orders},
};
use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn the_api_writes_each_change_with_its_event_and_answers_bad_requests_with_json_errors(
    pool: PgPool,
) -> anyhow::Result<()> {
    outbox_core::migrate(&pool).await?;
    sqlx::query(orders::SCHEMA).execute(&pool).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(orders::serve(
        listener,
        Orders {
            pool: pool.clone(),
            topic: "orders".into(),
        },
        stop.clone(),
    ));

    let (status, body) = http(
        addr,
        "POST",
        "/orders",
        Some(r#"{"customer":"a@example.com","sku":"s1","quantity":2,"amount_cents":500}"#),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let order: serde_json::Value = serde_json::from_str(&body)?;
    let id = order["id"].as_i64().unwrap();
    assert_eq!(order["status"], "created");
    assert_eq!(
        http(addr, "POST", &format!("/orders/{id}/pay"), None)
            .await?
            .0,
        200
    );
    assert_eq!(
        http(addr, "POST", &format!("/orders/{id}/ship"), None)
            .await?
            .0,
        200
    );
    let (status, body) = http(addr, "GET", &format!("/orders/{id}"), None).await?;
    assert_eq!(
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body)?["status"].clone()
        ),
        (200, "shipped".into())
    );

    let events: Vec<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT event_type, aggregate_id, payload FROM outbox ORDER BY id")
            .fetch_all(&pool)
            .await?;
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, ["order.created", "order.paid", "order.shipped"]);
    assert!(
        events.iter().all(|e| e.1 == id.to_string()),
        "keyed by order id"
    );
    assert_eq!(
        events[2].2["status"], "shipped",
        "the payload is the order after the change"
    );

    for (method, path, body, want) in [
        ("POST", "/orders".to_string(), Some("{not json"), 400),
        (
            "POST",
            "/orders".to_string(),
            Some(r#"{"customer":"nobody","sku":"s","quantity":1,"amount_cents":1}"#),
            422,
        ),
        (
            "POST",
            "/orders".to_string(),
            Some(r#"{"customer":"a@b.c","sku":"s","quantity":0,"amount_cents":1}"#),
            422,
        ),
        ("POST", format!("/orders/{id}/cancel"), None, 409),
        ("POST", "/orders/424242/pay".to_string(), None, 404),
        ("GET", "/orders/424242".to_string(), None, 404),
    ] {
        let (status, text) = http(addr, method, &path, body).await?;
        assert_eq!(status, want, "{method} {path}: {text}");
        let err: serde_json::Value = serde_json::from_str(&text)?;
        assert!(
            err["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{text}"
        );
    }
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await?;
    assert_eq!(outbox, 3, "refused requests write no event");
    stop.cancel();
    server.await??;
    Ok(())
}

/// Runs the demo on `broker` and checks its report: every event applied
/// once per consumer, duplicates suppressed, the poison event dead-lettered
/// and replayed once, each consumer's state equal to the orders table.
async fn demo_on(broker: Broker) -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let report = demo::run(DemoOptions {
        database: url.parse()?,
        broker,
        orders: 60,
        duplicates: 20,
        http_addr: "127.0.0.1:0".parse()?,
        keep_running: None,
    })
    .await?;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.records, report.events + 20);
    assert_eq!(report.dead_letters.len(), 1, "{:?}", report.dead_letters);
    assert!(report.dead_letters[0].1.contains("bounce@example.invalid"));
    for c in &report.consumers {
        let name = &c.name;
        assert!(c.applied > 0, "{name} applied nothing");
        // Duplicates of event types a consumer does not handle are skipped
        // rather than deduped; analytics handles every type.
        assert!(c.duplicates > 0, "{name} suppressed no duplicates");
        // Every record (and the replayed one) settled exactly once per consumer.
        assert_eq!(
            c.applied + c.duplicates + c.skipped + c.dead_lettered,
            report.records + 1,
            "{name}"
        );
    }
    assert_eq!(
        report.consumers[1].dead_lettered, 1,
        "notifications dead-lettered the poison event"
    );
    Ok(())
}

// One at a time: both use the database sample_demo.
#[tokio::test]
async fn the_demo_applies_every_event_once_per_consumer_and_replays_the_poison_event(
) -> anyhow::Result<()> {
    let _one = DEMO.lock().await;
    demo_on(Broker::Kafka(brokers())).await
}

#[tokio::test]
async fn the_demo_on_rabbitmq_does_the_same_through_an_exchange_and_a_queue_per_consumer(
) -> anyhow::Result<()> {
    let _one = DEMO.lock().await;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    demo_on(Broker::RabbitMq(url)).await
}

/// The demo recreates its database: one run at a time.
static DEMO: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the checkout demo on `broker` and checks its report: every path
/// taken (completed, out of stock, declined, no answer), compensations
/// made, and every invariant holding.
async fn checkout_on(broker: Broker) -> anyhow::Result<()> {
    use sample_app::{checkout::Faults, checkout_demo};
    let url = std::env::var("DATABASE_URL")?;
    let kafka = matches!(broker, Broker::Kafka(_));
    let report = checkout_demo::run(checkout_demo::CheckoutOptions {
        database: url.parse()?,
        broker,
        checkouts: 120,
        // Long enough for a loaded CI machine: the silent payments time
        // out whatever the timeout.
        step_timeout: std::time::Duration::from_secs(5),
        faults: Faults {
            decline_every: 7,
            silence_every: 11,
        },
        duplicates: 30,
    })
    .await?;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let outcome = |k: &str| report.outcomes.get(k).copied().unwrap_or(0);
    assert_eq!(
        report.outcomes.values().sum::<i64>(),
        120,
        "{:?}",
        report.outcomes
    );
    for k in [
        "completed",
        "out of stock",
        "payment declined",
        "no answer while Charging",
    ] {
        assert!(
            outcome(k) > 0,
            "no checkout ended as {k:?}: {:?}",
            report.outcomes
        );
    }
    // A checkout that timed out after its charge was asked for is
    // refunded if the payment service charged it (the silent ones did);
    // every declined or timed-out checkout releases its stock if it was
    // reserved. On a loaded machine a slow step may time out too, after a
    // refusal or before a charge, with nothing to undo: hence the bounds.
    let timed_out = |states: &[&str]| -> i64 {
        states
            .iter()
            .map(|s| outcome(&format!("no answer while {s}")))
            .sum()
    };
    let refunded = report.compensations["payments refunded"];
    let released = report.compensations["stock released"];
    let why = format!("{:?} {:?}", report.outcomes, report.compensations);
    assert!(refunded > 0, "{why}");
    assert!(refunded <= timed_out(&["Charging", "Ordering"]), "{why}");
    assert!(
        released >= outcome("payment declined") + timed_out(&["Charging", "Ordering"]),
        "{why}"
    );
    assert!(
        released <= outcome("payment declined") + timed_out(&["Reserving", "Charging", "Ordering"]),
        "{why}"
    );
    if kafka {
        assert!(report.duplicates > 0, "the duplicates were not dropped");
    }
    Ok(())
}

#[tokio::test]
async fn the_checkout_saga_finishes_every_checkout_and_keeps_every_invariant() -> anyhow::Result<()>
{
    let _one = CHECKOUT.lock().await;
    checkout_on(Broker::Kafka(brokers())).await
}

#[tokio::test]
async fn the_checkout_saga_runs_on_rabbitmq_too() -> anyhow::Result<()> {
    let _one = CHECKOUT.lock().await;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    checkout_on(Broker::RabbitMq(url)).await
}

/// The checkout demo recreates its database: one run at a time.
static CHECKOUT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
