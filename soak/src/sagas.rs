//! Sagas in the soak (`outbox-soak run --sagas-per-second R`): the sample
//! app's checkout saga (`sample-app/src/checkout.rs`) runs beside the soak's
//! own events, through the same relays and the same faults.
//!
//! - its schemas live in the soak's database, its events go through the
//!   soak's outbox, its consumers (the saga and its three services) run in
//!   the consumer process, so `consumer-kill` kills them too;
//! - checkouts start at a fixed rate while the producers run, each with its
//!   cart in one transaction;
//! - at the end the soak waits until every checkout is finished, then
//!   checks the checkout's invariants (`checkout::check`) and that no
//!   checkout stayed running past its step timeouts.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use sample_app::checkout::{self, Checkout, Faults, Topics, SERVICES};
use sqlx::{postgres::PgConnectOptions, PgPool};

/// How long a checkout step may go unanswered in the soak: longer than a
/// broker restart, so that most faults are ridden out and some are not.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The payment service's faults in the soak.
pub(crate) const FAULTS: Faults = Faults {
    decline_every: 9,
    silence_every: 13,
};

/// The topics (or exchanges) of the run whose own topic is `topic`.
pub(crate) fn topics(topic: &str) -> Topics {
    Topics {
        checkout: format!("{topic}.checkout"),
        commands: format!("{topic}.checkout-commands"),
    }
}

/// The RabbitMQ queues the consumers declare, to wait for.
pub(crate) fn queues(topics: &Topics) -> Vec<String> {
    let mut out = vec![sample_app::consumers::Broker::queue(
        &topics.checkout,
        SERVICES[0],
    )];
    out.extend(
        SERVICES[1..]
            .iter()
            .map(|s| sample_app::consumers::Broker::queue(&topics.commands, s)),
    );
    out
}

/// Makes the services' schemas and stocks the inventory for `expected`
/// checkouts; returns the services' pools.
pub(crate) async fn prepare(db: &PgConnectOptions, expected: usize) -> anyhow::Result<Vec<PgPool>> {
    let pools = checkout::prepare(db).await?;
    checkout::stock_up(&pools[1], expected).await?;
    Ok(pools)
}

/// The consumer process's part: the saga's and the services' consumers.
pub(crate) fn consumers(
    broker: &sample_app::consumers::Broker,
    topics: &Topics,
    pools: &[PgPool],
) -> anyhow::Result<Vec<consumer_kit::Consumer>> {
    let saga = Checkout {
        topics: topics.clone(),
        step_timeout: STEP_TIMEOUT,
    };
    // As the soak's own consumer: a killed member's partitions move on
    // after 6 s, not 45.
    let tune = |cfg: &mut consumer_kit::ConsumerConfig| {
        cfg.kafka_properties
            .insert("session.timeout.ms".into(), "6000".into());
        cfg.kafka_properties
            .insert("heartbeat.interval.ms".into(), "1000".into());
    };
    Ok(
        checkout::consumers(broker, topics, pools, saga, FAULTS, tune)?
            .into_iter()
            .map(|(_, c)| c)
            .collect(),
    )
}

/// Starts checkouts at `rate` per second until `stop`; counts them in
/// `started` (a failed start is not counted: its transaction rolled back).
pub(crate) fn drive(
    pool: PgPool,
    topics: Topics,
    rate: u64,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            if checkout::start(&pool, &topics, n).await.is_ok() {
                started.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
    })
}

/// Running checkouts, and those of them unchanged for longer than their
/// step timeout (plus `grace`).
pub(crate) async fn running(pool: &PgPool, grace: Duration) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE updated_at < now() - make_interval(secs => $1)) \
         FROM consumer_kit_sagas WHERE status = 'running'",
    )
    .bind((STEP_TIMEOUT + grace).as_secs_f64())
    .fetch_one(pool)
    .await?)
}

/// Waits until the services have applied everything the finished
/// checkouts asked of them: the invariants hold, or nothing has been
/// applied for `quiet` (then the checker reports what is left).
pub(crate) async fn settle(pools: &[PgPool], quiet: Duration) -> anyhow::Result<()> {
    let mut last = -1;
    let mut since = std::time::Instant::now();
    loop {
        if checkout::check(pools).await?.is_empty() {
            return Ok(());
        }
        let mut applied = 0i64;
        for pool in pools {
            applied += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_events")
                .fetch_one(pool)
                .await?;
        }
        if applied != last {
            last = applied;
            since = std::time::Instant::now();
        } else if since.elapsed() > quiet {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the sagas did, for the soak's result.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Verdict {
    /// Checkouts started.
    pub(crate) started: u64,
    /// Checkouts by outcome (`completed`, or the failure reason).
    pub(crate) outcomes: std::collections::BTreeMap<String, i64>,
    /// Checkouts still running at the end.
    pub(crate) non_terminal: i64,
    /// Failed invariants.
    pub(crate) violations: Vec<String>,
}

impl Verdict {
    pub(crate) fn ok(&self) -> bool {
        self.non_terminal == 0 && self.violations.is_empty()
    }
}

/// The checker's part: outcomes and invariants.
pub(crate) async fn check(pools: &[PgPool], started: u64) -> anyhow::Result<Verdict> {
    let outcomes = sqlx::query_as::<_, (String, i64)>(
        "SELECT coalesce(reason, status), count(*) FROM consumer_kit_sagas GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pools[0])
    .await?
    .into_iter()
    .collect();
    let (non_terminal, _) = running(&pools[0], Duration::ZERO).await?;
    let mut violations = checkout::check(pools).await?;
    let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_kit_sagas")
        .fetch_one(&pools[0])
        .await?;
    if instances as u64 != started {
        violations.push(format!(
            "{started} checkouts started, {instances} saga instances exist"
        ));
    }
    Ok(Verdict {
        started,
        outcomes,
        non_terminal,
        violations,
    })
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "checkouts started:          {}", self.started)?;
        for (outcome, n) in &self.outcomes {
            writeln!(f, "  {outcome:<26}{n:>6}")?;
        }
        writeln!(f, "checkouts not terminal:     {}", self.non_terminal)?;
        write!(
            f,
            "saga invariant violations:  {}{}",
            self.violations.len(),
            self.violations
                .iter()
                .map(|v| format!("\n  {v}"))
                .collect::<String>()
        )
    }
}
