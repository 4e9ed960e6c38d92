//! `delayed`: what delayed events cost (outbox migration V10).
//!
//! 1. **Waiting costs nothing**: the relay drains a backlog with and
//!    without `waiting` far-future delayed rows in the table, side by side
//!    in each run (alternating which goes first); the ratio should be 1.
//! 2. **Released when due**: `due` rows all due at one moment, 3 s after
//!    they are written, with the relay already running and idle. Reported:
//!    when the first and the last of them were acknowledged after their due
//!    time, and none before it.

use std::time::{Duration, Instant};

use outbox_relay::RelayConfig;
use tokio_util::sync::CancellationToken;

use crate::{drain::relay_drain, median, samples, Env, KEYS};

pub(crate) async fn delayed(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    waiting: i64,
    due: i64,
) -> anyhow::Result<()> {
    println!(
        "== delayed: drain of {rows} rows with and without {waiting} delayed rows due in 30 days; \
         then {due} rows due at one moment"
    );
    let cfg = RelayConfig {
        batch_size: 5000,
        ..RelayConfig::default()
    };
    let (mut ratios, mut with, mut without) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let mut pair = [0.0; 2];
        let order = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for far in order {
            sqlx::query("DELETE FROM outbox").execute(&env.pool).await?;
            sqlx::query("DELETE FROM outbox_delayed")
                .execute(&env.pool)
                .await?;
            if far {
                insert_delayed(env, waiting, "30 days").await?;
            }
            // The million rows' WAL is flushed to the data files before the
            // drain, in both variants: the drain measures waiting rows, not
            // the checkpoint their insert would start.
            sqlx::query("CHECKPOINT").execute(&env.pool).await?;
            let rate = relay_drain(env, recorder, rows, cfg.clone()).await?;
            pair[usize::from(far)] = rate;
        }
        println!(
            "run {run}: without {:>8.0}/s  with {waiting} waiting {:>8.0}/s  ratio {:.3}",
            pair[0],
            pair[1],
            pair[1] / pair[0]
        );
        without.push(pair[0]);
        with.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    println!(
        "median: without {:.0}/s  with {waiting} waiting {:.0}/s  ratio {:.3} (1 = free)",
        median(without),
        median(with),
        median(ratios)
    );

    let (mut firsts, mut lasts) = (vec![], vec![]);
    for run in 1..=runs {
        sqlx::query("DELETE FROM outbox").execute(&env.pool).await?;
        let topic = env.topic("delayed").await?;
        let shutdown = CancellationToken::new();
        let relay = env.relay(cfg.clone())?;
        recorder.clear();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Written 3 s before they are due, by the database's clock; the
        // time left is read after the insert committed.
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "WITH at AS (SELECT clock_timestamp() + interval '3 seconds' AS t), \
                  ins AS (INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, topic, payload, not_before) \
                          SELECT gen_random_uuid(), 'bench', 'k' || (g % $3), 'bench.row', $1, \
                                 jsonb_build_object('seq', g), (SELECT t FROM at) \
                          FROM generate_series(1, $2) g) \
             SELECT t FROM at",
        )
        .bind(&topic)
        .bind(due)
        .bind(KEYS)
        .fetch_one(&env.pool)
        .await?;
        let wait: f64 =
            sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM $1 - clock_timestamp())::float8")
                .bind(at)
                .fetch_one(&env.pool)
                .await?;
        let due_at = Instant::now() + Duration::from_secs_f64(wait.max(0.0));
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while (recorder.len() as i64) < due && Instant::now() < deadline {
            if first.is_none() && recorder.len() > 0 {
                first = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let last = Instant::now();
        anyhow::ensure!(
            recorder.len() as i64 >= due,
            "the delayed rows were not all published within 60 s"
        );
        let signed = |t: Instant| {
            if t >= due_at {
                (t - due_at).as_secs_f64()
            } else {
                -(due_at - t).as_secs_f64()
            }
        };
        let first = signed(first.unwrap_or(last));
        let last = signed(last);
        println!(
            "run {run}: first acknowledged {:+.3} s after the due time, last {:+.3} s ({due} rows)",
            first, last
        );
        anyhow::ensure!(first >= -0.010, "published before its due time");
        firsts.push(first);
        lasts.push(last);
        shutdown.cancel();
        task.await?;
        env.drop_topic(&topic).await;
    }
    println!(
        "median: first acknowledged {:+.3} s after the due time, last {:+.3} s",
        median(firsts),
        median(lasts)
    );
    Ok(())
}

/// `n` delayed rows due after `after` (an SQL interval).
async fn insert_delayed(env: &Env, n: i64, after: &str) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO outbox_delayed (event_id, aggregate_type, aggregate_id, event_type, topic, payload, not_before) \
         SELECT gen_random_uuid(), 'bench', 'k' || (g % $2), 'bench.later', 'bench-later', \
                jsonb_build_object('seq', g, 'pad', repeat('x', 170)), now() + interval '{after}' \
         FROM generate_series(1, $1) g"
    ))
    .bind(n)
    .bind(KEYS)
    .execute(&env.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&env.pool)
        .await?;
    Ok(())
}
