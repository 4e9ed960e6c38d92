//! `exactly-once`: what `--exactly-once` costs, side by side in one run:
//! the drain of a backlog and commit-to-ack at a fixed offered load, each
//! with the relay's defaults and with Kafka transactions. With `--wal`, both
//! relays read the WAL (`--source wal`): the drain of a backlog of rows,
//! and commit-to-ack with table-less events (the WAL source's fast path).

use outbox_relay::RelayConfig;

use crate::{
    drain::relay_drain,
    latency::{measure_with, Measured},
    median, samples,
    wal::{wal_config, wal_drain, wal_latency},
    Env,
};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn exactly_once(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    batch_size: usize,
    rate: u64,
    seconds: u64,
    wal: bool,
) -> anyhow::Result<()> {
    let source = if wal { "WAL source" } else { "poll source" };
    println!(
        "== exactly-once ({source}): drain of {rows} rows (batch {batch_size}) and commit-to-ack at \
         {rate}/s for {seconds}s, relay defaults vs --exactly-once, alternating in each run"
    );
    let plain = if wal {
        wal_config(env, RelayConfig::default().batch_size)?
    } else {
        RelayConfig::default()
    };
    let eo = RelayConfig {
        exactly_once: true,
        checkpoint_topic: format!(
            "bench-checkpoints-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        ..plain.clone()
    };
    let drain_cfg = |c: &RelayConfig| RelayConfig {
        batch_size,
        ..c.clone()
    };
    let relay_drain = |env, recorder, rows, cfg| async move {
        if wal {
            wal_drain(env, recorder, rows, cfg).await
        } else {
            relay_drain(env, recorder, rows, cfg).await
        }
    };
    let measure = |env, recorder, rate, seconds, cfg| async move {
        let m: anyhow::Result<Measured> = if wal {
            wal_latency(env, recorder, rate, seconds, cfg, true).await
        } else {
            measure_with(env, recorder, rate, seconds, cfg, false).await
        };
        m
    };
    let (mut drain_ratio, mut p50_ratio, mut p99_ratio) = (vec![], vec![], vec![]);
    let (mut d_plain, mut d_eo, mut p99_plain, mut p99_eo) = (vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        // Alternate which goes first, so that neither always meets a warmer
        // database.
        let (a, b) = if run % 2 == 1 {
            let a = relay_drain(env, recorder, rows, drain_cfg(&plain)).await?;
            (a, relay_drain(env, recorder, rows, drain_cfg(&eo)).await?)
        } else {
            let b = relay_drain(env, recorder, rows, drain_cfg(&eo)).await?;
            (
                relay_drain(env, recorder, rows, drain_cfg(&plain)).await?,
                b,
            )
        };
        let (la, lb) = if run % 2 == 1 {
            let la = measure(env, recorder, rate, seconds, plain.clone()).await?;
            (la, measure(env, recorder, rate, seconds, eo.clone()).await?)
        } else {
            let lb = measure(env, recorder, rate, seconds, eo.clone()).await?;
            (
                measure(env, recorder, rate, seconds, plain.clone()).await?,
                lb,
            )
        };
        println!(
            "run {run}: drain {a:>8.0}/s vs exactly-once {b:>8.0}/s (cost {:.1}%)  |  at {:.0}/s: p50 {:.1} vs {:.1} ms, \
             p99 {:.1} vs {:.1} ms, p99.9 {:.1} vs {:.1} ms",
            (1.0 - b / a) * 100.0,
            la.offered,
            la.p50,
            lb.p50,
            la.p99,
            lb.p99,
            la.p999,
            lb.p999
        );
        drain_ratio.push(b / a);
        d_plain.push(a);
        d_eo.push(b);
        // Latency means something only at the offered load: a run whose
        // producers fell more than 10% short is shown, not counted.
        if la.offered.min(lb.offered) < rate as f64 * 0.9 {
            println!(
                "run {run}: latency left out of the medians (the producers fell short of {rate}/s)"
            );
            continue;
        }
        p50_ratio.push(lb.p50 / la.p50);
        p99_ratio.push(lb.p99 / la.p99);
        p99_plain.push(la.p99);
        p99_eo.push(lb.p99);
    }
    println!(
        "median: drain {:.0}/s vs {:.0}/s, exactly-once/plain {:.3} (cost {:.1}%, target <= 15%); \
         p99 {:.1} vs {:.1} ms, ratio {:.2} (target <= 2); p50 ratio {:.2}",
        median(d_plain),
        median(d_eo),
        median(drain_ratio.clone()),
        (1.0 - median(drain_ratio)) * 100.0,
        median(p99_plain),
        median(p99_eo),
        median(p99_ratio),
        median(p50_ratio)
    );
    Ok(())
}
