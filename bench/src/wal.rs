//! `wal`: the relay reading the WAL (`--source wal`) against the relay
//! polling the table, side by side in one run: the drain of a backlog, and
//! commit-to-ack at a fixed offered load with rows and with table-less
//! events (`outbox_emit`).
//!
//! Each WAL measurement creates its slot first (so the events written after
//! it are in it) and drops it after.

use outbox_relay::{slot, RelayConfig, WalSource};

use crate::{drain::relay_drain, latency::measure_with, median, samples, Env};

const SLOT: &str = "outbox_bench_wal";

/// A relay config reading the bench's slot.
pub(crate) fn wal_config(env: &Env, batch_size: usize) -> anyhow::Result<RelayConfig> {
    let mut wal = WalSource::new(slot::ReplicationTarget::from_url(&env.url)?);
    wal.slot = SLOT.into();
    wal.publication = SLOT.into();
    Ok(RelayConfig {
        batch_size,
        wal: Some(wal),
        ..RelayConfig::default()
    })
}

/// The drain of a backlog written after the slot by a relay reading it
/// with `cfg` ([`wal_config`] and more), rows/s.
pub(crate) async fn wal_drain(
    env: &Env,
    recorder: &samples::Samples,
    rows: i64,
    cfg: RelayConfig,
) -> anyhow::Result<f64> {
    env.fresh_slot(SLOT).await?;
    let rate = relay_drain(env, recorder, rows, cfg).await;
    env.drop_slot(SLOT).await;
    rate
}

/// Commit-to-ack through a relay reading a fresh slot with `cfg`.
pub(crate) async fn wal_latency(
    env: &Env,
    recorder: &samples::Samples,
    rate: u64,
    seconds: u64,
    cfg: RelayConfig,
    table_less: bool,
) -> anyhow::Result<crate::latency::Measured> {
    env.fresh_slot(SLOT).await?;
    let m = measure_with(env, recorder, rate, seconds, cfg, table_less).await;
    env.drop_slot(SLOT).await;
    m
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn wal(
    env: &Env,
    recorder: &samples::Samples,
    runs: usize,
    rows: i64,
    batch_size: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    println!(
        "== wal: drain of {rows} rows (batch {batch_size}), and commit-to-ack at {rate}/s for {seconds}s: \
         relay polling vs reading the WAL (rows, and table-less events)"
    );
    let poll = RelayConfig {
        batch_size,
        ..RelayConfig::default()
    };
    let (mut d_poll, mut d_wal, mut d_ratio) = (vec![], vec![], vec![]);
    let (mut p99_poll, mut p99_rows, mut p99_less) = (vec![], vec![], vec![]);
    let (mut p50_poll, mut p50_rows, mut p50_less) = (vec![], vec![], vec![]);
    for run in 1..=runs {
        let a = relay_drain(env, recorder, rows, poll.clone()).await?;
        let b = wal_drain(env, recorder, rows, wal_config(env, batch_size)?).await?;
        let lp = measure_with(env, recorder, rate, seconds, RelayConfig::default(), false).await?;
        let reading = wal_config(env, RelayConfig::default().batch_size)?;
        let lr = wal_latency(env, recorder, rate, seconds, reading.clone(), false).await?;
        let lt = wal_latency(env, recorder, rate, seconds, reading, true).await?;
        println!(
            "run {run}: drain poll {a:>8.0}/s  wal {b:>8.0}/s  (wal/poll {:.2})  |  at {:.0}/{:.0}/{:.0} events/s: \
             p50 {:.1} / {:.1} / {:.1} ms, p99 {:.1} / {:.1} / {:.1} ms, p99.9 {:.1} / {:.1} / {:.1} ms \
             (poll / wal rows / wal table-less)",
            b / a,
            lp.offered,
            lr.offered,
            lt.offered,
            lp.p50,
            lr.p50,
            lt.p50,
            lp.p99,
            lr.p99,
            lt.p99,
            lp.p999,
            lr.p999,
            lt.p999
        );
        d_poll.push(a);
        d_wal.push(b);
        d_ratio.push(b / a);
        if lp.offered.min(lr.offered).min(lt.offered) < rate as f64 * 0.9 {
            println!(
                "run {run}: latency left out of the medians (the producers fell short of {rate}/s)"
            );
            continue;
        }
        p99_poll.push(lp.p99);
        p99_rows.push(lr.p99);
        p99_less.push(lt.p99);
        p50_poll.push(lp.p50);
        p50_rows.push(lr.p50);
        p50_less.push(lt.p50);
    }
    println!(
        "median: drain poll {:.0}/s, wal {:.0}/s, wal/poll {:.2}; p50 {:.1} / {:.1} / {:.1} ms, \
         p99 {:.1} / {:.1} / {:.1} ms (poll / wal rows / wal table-less; wal target p99 <= 10 ms)",
        median(d_poll),
        median(d_wal),
        median(d_ratio),
        median(p50_poll),
        median(p50_rows),
        median(p50_less),
        median(p99_poll),
        median(p99_rows),
        median(p99_less)
    );
    Ok(())
}
