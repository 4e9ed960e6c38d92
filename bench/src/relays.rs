//! Several relays: drain throughput with 1, 2 and 4 relays as ratios to one
//! relay, and the time from a relay's `kill -9` until its partitions flow
//! again. Method in `BENCHMARKS.md`.

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use outbox_core::{append, NewEvent};
use outbox_relay::RelayConfig;
use sqlx::Executor;
use test_kit::process::Child;
use tokio_util::sync::CancellationToken;

use crate::{median, samples, Env, KEYS};

/// Forgets every relay and owner, and empties the outbox.
async fn reset(env: &Env) -> anyhow::Result<()> {
    env.pool
        .execute(
            "TRUNCATE outbox; DELETE FROM outbox_relays; \
             UPDATE outbox_relay_partitions SET owner = NULL, acquired_at = NULL",
        )
        .await?;
    Ok(())
}

/// Waits until `n` relays are live and the partitions are shared out
/// (every relay owns at least `floor(32 / n)`).
async fn balanced(env: &Env, n: usize) -> anyhow::Result<Vec<outbox_relay::store::RelayInfo>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let relays: Vec<_> = outbox_relay::store::relays(&env.pool)
            .await?
            .into_iter()
            .filter(|r| r.live)
            .collect();
        let total: usize = relays.iter().map(|r| r.partitions.len()).sum();
        if relays.len() == n && total == 32 && relays.iter().all(|r| r.partitions.len() >= 32 / n) {
            return Ok(relays);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} relays did not share the partitions within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drain throughput of `counts` relays (in this process) as ratios to one.
pub async fn scaling(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    batch_size: usize,
    counts: &[usize],
) -> anyhow::Result<()> {
    println!(
        "== relays: drain {rows} rows with {counts:?} relays (batch {batch_size}), ratios to one relay"
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    for run in 1..=runs {
        let mut line = format!("run {run}:");
        for (slot, &n) in counts.iter().enumerate() {
            reset(env).await?;
            let topic = env.topic("relays").await?;
            let shutdown = CancellationToken::new();
            let mut tasks = Vec::new();
            for i in 0..n {
                let relay = env.relay(RelayConfig {
                    batch_size,
                    relay_id: Some(format!("scale-{n}-{i}")),
                    lease_ttl: Duration::from_secs(2),
                    heartbeat_interval: Duration::from_millis(250),
                    ..RelayConfig::default()
                })?;
                tasks.push(tokio::spawn(relay.run(shutdown.clone())));
            }
            balanced(env, n).await?;
            recorder.clear();
            // The backlog appears at once, at the commit of one statement.
            env.fill_committed(&topic, rows).await?;
            let started = Instant::now();
            while (recorder.len() as i64) < rows {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let rate = rows as f64 / started.elapsed().as_secs_f64();
            shutdown.cancel();
            for t in tasks {
                t.await?;
            }
            env.drop_topic(&topic).await;
            line.push_str(&format!("  {n} relay(s) {rate:>8.0}/s"));
            rates[slot].push(rate);
        }
        let one = rates[0][run - 1];
        for (slot, &n) in counts.iter().enumerate().skip(1) {
            line.push_str(&format!("  {n}/1 {:.2}", rates[slot][run - 1] / one));
        }
        println!("{line}");
    }
    let mut line = "median:".to_string();
    for (slot, &n) in counts.iter().enumerate() {
        line.push_str(&format!(
            "  {n} relay(s) {:.0}/s",
            median(rates[slot].clone())
        ));
    }
    for (slot, &n) in counts.iter().enumerate().skip(1) {
        let ratios: Vec<f64> = rates[slot]
            .iter()
            .zip(&rates[0])
            .map(|(r, one)| r / one)
            .collect();
        line.push_str(&format!("  {n}/1 {:.2}", median(ratios)));
    }
    println!("{line}");
    Ok(())
}

/// A relay in a child process of this binary, so it can be killed with -9.
fn start_child_relay(id: &str, lease_ttl: Duration) -> anyhow::Result<Child> {
    Child::spawn(
        Command::new(std::env::current_exe()?)
            .args(["relay-child", "--relay-id", id, "--lease-ttl-ms"])
            .arg(lease_ttl.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
}

/// The hidden `relay-child` command: one relay on the benchmark database
/// until SIGTERM.
pub async fn child(
    env_db: sqlx::postgres::PgConnectOptions,
    brokers: String,
    relay_id: String,
    lease_ttl: Duration,
) -> anyhow::Result<()> {
    let relay = outbox_relay::Relay::new(
        RelayConfig {
            brokers,
            relay_id: Some(relay_id),
            lease_ttl,
            heartbeat_interval: lease_ttl / 5,
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
        env_db,
    )?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
        s.cancel();
    });
    relay.run(stop).await;
    Ok(())
}

/// Pending rows in `partitions`.
async fn pending_in(env: &Env, partitions: &[i32]) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'pending' \
         AND outbox_partition(aggregate_id, 32) = ANY($1)",
    )
    .bind(partitions)
    .fetch_one(&env.pool)
    .await?)
}

/// Two relays share the partitions under a steady load; one is killed with
/// -9. Measures until the other owns the dead relay's partitions, and until
/// their backlog is back to what it was before the kill.
pub async fn failover(
    env: &Env,
    runs: usize,
    rate: u64,
    lease_ttl: Duration,
) -> anyhow::Result<()> {
    println!(
        "== failover: 2 relay processes, {rate} events/s over {KEYS} keys, lease TTL {lease_ttl:?} \
         (heartbeat TTL/5); one relay killed with -9"
    );
    let (mut takeovers, mut caught_ups) = (vec![], vec![]);
    for run in 1..=runs {
        reset(env).await?;
        let topic = env.topic("failover").await?;
        let mut a = start_child_relay(&format!("failover-a-{run}"), lease_ttl)?;
        let mut b = start_child_relay(&format!("failover-b-{run}"), lease_ttl)?;
        let relays = balanced(env, 2).await?;
        let a_parts = relays
            .iter()
            .find(|r| r.relay_id.starts_with("failover-a"))
            .map(|r| r.partitions.clone())
            .unwrap_or_default();
        anyhow::ensure!(!a_parts.is_empty(), "relay A owns no partitions");

        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let pool = env.pool.clone();
            let stop = stop.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                let mut i: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let e = NewEvent::new("bench", format!("k{}", i % KEYS), "bench.failover")
                        .topic(&topic)
                        .json_payload(&serde_json::json!({ "i": i }))?;
                    append(&pool, &e).await?;
                    i += 1;
                }
                anyhow::Ok(())
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = pending_in(env, &a_parts).await?;
        let killed = Instant::now();
        let _ = a.kill();
        let mut takeover = None;
        let deadline = killed + lease_ttl * 3 + Duration::from_secs(30);
        let caught_up = loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the dead relay's partitions did not flow again within {:?}",
                deadline - killed
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            if takeover.is_none() {
                let left: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM outbox_relay_partitions \
                     WHERE partition = ANY($1) AND owner LIKE 'failover-a%'",
                )
                .bind(&a_parts)
                .fetch_one(&env.pool)
                .await?;
                if left == 0 {
                    takeover = Some(killed.elapsed());
                }
                continue;
            }
            if pending_in(env, &a_parts).await? <= before + 20 {
                break killed.elapsed();
            }
        };
        let takeover = takeover.unwrap_or(caught_up);
        stop.store(true, Ordering::Relaxed);
        producer.await??;
        b.stop(Duration::from_secs(20));
        env.drop_topic(&topic).await;
        println!(
            "run {run}: {} partitions; taken over after {:.2} s; their backlog back to its level after {:.2} s",
            a_parts.len(),
            takeover.as_secs_f64(),
            caught_up.as_secs_f64()
        );
        takeovers.push(takeover.as_secs_f64());
        caught_ups.push(caught_up.as_secs_f64());
    }
    println!(
        "median: taken over after {:.2} s, flowing and caught up after {:.2} s (lease TTL {:?})",
        median(takeovers),
        median(caught_ups),
        lease_ttl
    );
    Ok(())
}
