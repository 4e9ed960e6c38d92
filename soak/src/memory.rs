//! `outbox-soak memory`: the relay's memory while it drains a large backlog.

use std::time::{Duration, Instant};

use sqlx::{postgres::PgConnectOptions, Executor};

use crate::{role::Role, run::fresh_database, Cli};

/// Fills the outbox with `rows` rows, starts the relay, and samples its RSS
/// every 250 ms until the backlog is drained.
pub(crate) async fn memory(cli: &Cli, server: PgConnectOptions, rows: i64) -> anyhow::Result<bool> {
    let started = Instant::now();
    let say = |m: String| println!("[{:>6.1}s] {m}", started.elapsed().as_secs_f64());
    let pool = fresh_database(cli, server, 4).await?;
    let topic = format!(
        "soak-mem-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    test_kit::topic::create(&cli.kafka_brokers, &topic, 3).await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'soak', 'k' || (g % 1000), 'soak.row', $1, \
                jsonb_build_object('seq', g, 'pad', repeat('x', 170)) \
         FROM generate_series(1, $2) g ORDER BY g",
    )
    .bind(&topic)
    .bind(rows)
    .execute(&pool)
    .await?;
    pool.execute("VACUUM ANALYZE outbox").await?;
    say(format!("{rows} rows in the outbox; starting the relay"));
    let mut relay = Role::start(cli, &["relay", "--batch-size", "1000"])?;
    // (one relay: this measures one process's memory)
    let mut rss: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let drain_started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = test_kit::process::rss_kib(relay.child.id()).unwrap_or(0);
        if now > 0 {
            rss.push(now);
        }
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        if rss.len() % 20 == 0 {
            say(format!(
                "{pending} rows left; relay RSS {} MiB",
                rss.last().copied().unwrap_or(0) / 1024
            ));
        }
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not drain within 30 minutes"
        );
    }
    let drained_in = drain_started.elapsed();
    relay.terminate();
    anyhow::ensure!(!rss.is_empty(), "no RSS samples");
    let tenth = rss.len().div_ceil(10);
    let early = rss[..tenth].iter().copied().max().unwrap_or(0);
    let late = rss[rss.len() - tenth..].iter().copied().max().unwrap_or(0);
    let peak = rss.iter().copied().max().unwrap_or(0);
    let flat = late <= early + early / 2;
    println!();
    println!(
        "== relay memory while draining {rows} rows ({} samples, every 250 ms) ==",
        rss.len()
    );
    println!("RSS, first tenth of the drain: {} MiB", early / 1024);
    println!("RSS, last tenth of the drain:  {} MiB", late / 1024);
    println!("RSS, peak:                     {} MiB", peak / 1024);
    println!(
        "drain time:                    {:.1} s",
        drained_in.as_secs_f64()
    );
    println!(
        "verdict:                       {}",
        if flat {
            "flat (last tenth within 1.5x of the first)"
        } else {
            "GROWING"
        }
    );
    Ok(flat)
}
