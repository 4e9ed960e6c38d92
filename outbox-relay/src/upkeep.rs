//! The relay's background work besides publishing: the backlog gauges, and
//! deleting what has expired (published rows kept in mark mode, remembered
//! published ids in delete mode).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{lease::Leases, retry::sleep_or_cancel, store, telemetry};

/// The backlog queries may take at most 1/`STATS_TIME_SHARE` of the time:
/// after a refresh that took `t`, the next waits at least `t ×` this.
/// Counting a large backlog per partition reads every pending row (about
/// 0.85 s for a million rows on 2 cores), work that would otherwise slow the
/// very drain it reports on, once per relay per interval.
const STATS_TIME_SHARE: u32 = 20;

/// Refreshes the backlog gauges every `every`, or less often when the
/// queries are slow (see [`STATS_TIME_SHARE`]).
pub(crate) async fn report_stats(
    pool: PgPool,
    leases: Arc<Leases>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut reported: HashSet<i32> = HashSet::new();
    loop {
        let started = Instant::now();
        // In a transaction, so that it works through a transaction-mode pooler.
        let figures = async {
            let mut tx = pool.begin().await?;
            let totals = store::stats(&mut tx).await?;
            let partitions = store::partition_stats(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>((totals, partitions))
        };
        match figures.await {
            Ok((totals, partitions)) => {
                telemetry::backlog(&totals);
                // Per partition, for the partitions this relay owns; those it
                // gave up drop to zero here (their new owner reports them).
                let own = leases.ownership();
                for p in &partitions {
                    if own.owned.contains(&p.partition) {
                        telemetry::partition_backlog(
                            p.partition,
                            p.pending,
                            p.oldest_pending_age_seconds,
                        );
                        reported.insert(p.partition);
                    } else if reported.remove(&p.partition) {
                        telemetry::partition_backlog(p.partition, 0, 0.0);
                    }
                }
            }
            Err(e) => debug!(error = %e, "backlog stats unavailable"),
        }
        let pause = every.max(started.elapsed() * STATS_TIME_SHARE);
        if sleep_or_cancel(pause, &shutdown).await {
            return;
        }
    }
}

/// What the relay deletes once it is old enough.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expired {
    /// Published rows kept in mark mode, after their retention.
    Rows(Duration),
    /// Remembered published ids in delete mode, after their window.
    Ids(Duration),
}

/// Deletes what has `expired`, in chunks, once a minute.
pub(crate) async fn clean_up(pool: PgPool, expired: Expired, shutdown: CancellationToken) {
    const CHUNK: i64 = 5000;
    loop {
        loop {
            let deleted = async {
                let mut tx = pool.begin().await?;
                let n = match expired {
                    Expired::Rows(retention) => {
                        store::delete_expired(&mut *tx, retention, CHUNK).await?
                    }
                    Expired::Ids(window) => {
                        store::forget_published_ids(&mut *tx, window, CHUNK).await?
                    }
                };
                tx.commit().await?;
                Ok::<_, sqlx::Error>(n)
            };
            match deleted.await {
                Ok(n) if n as i64 == CHUNK && !shutdown.is_cancelled() => continue,
                Ok(n) => {
                    if n > 0 {
                        debug!(rows = n, ?expired, "deleted what expired");
                    }
                    break;
                }
                Err(e) => {
                    debug!(error = %e, ?expired, "cleanup failed; will retry");
                    break;
                }
            }
        }
        if sleep_or_cancel(Duration::from_secs(60), &shutdown).await {
            return;
        }
    }
}
