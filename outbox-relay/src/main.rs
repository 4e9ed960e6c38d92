//! The `outbox-relay` binary: parse flags, set up logs and metrics, run.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags or configuration.

mod cli;
mod http;

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command, FailedCommand, LogFormat, TopicCommand};
use outbox_relay::{
    store::{self, Selection},
    telemetry, Relay,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Prints a line to stdout. When the reader has gone (`… | head`), the
/// command stops quietly with exit code 0 instead of panicking on the
/// closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// A configuration problem: reported with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on bad flags
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn,refinery_core=warn"));
    // Colours on a terminal only: log files and journals get plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn connect_options(cli: &Cli) -> anyhow::Result<PgConnectOptions> {
    let url = cli.database_url.as_deref().ok_or_else(|| {
        UsageError(
            "no database given: set DATABASE_URL or pass --database-url postgres://...".into(),
        )
    })?;
    // sqlx parses any scheme; say at once that only PostgreSQL will do.
    // (The scheme is no secret; the rest of the URL is never echoed.)
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(UsageError(format!(
            "DATABASE_URL must be a PostgreSQL URL (postgres://user:password@host:port/db), \
             not {}",
            if scheme.is_empty() {
                "one without a scheme".to_string()
            } else {
                format!("{scheme}://…")
            }
        ))
        .into());
    }
    // sqlx's parse error does not echo the URL, so no secret leaks here.
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e| UsageError(format!("DATABASE_URL is not a valid PostgreSQL URL: {e}")))?;
    Ok(outbox_relay::config::connect_options(
        opts,
        cli.transaction_pooler,
    ))
}

/// `text`, or its first `max` characters and how long it was.
fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => text.into(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &text[..end], text.len()).into(),
    }
}

/// `host:port/db`, for messages (no user, no password).
fn describe(opts: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default)")
    )
}

async fn pool(opts: &PgConnectOptions) -> anyhow::Result<sqlx::PgPool> {
    match PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(opts.clone())
        .await
    {
        Ok(pool) => Ok(pool),
        Err(e) => anyhow::bail!(
            "cannot connect to PostgreSQL at {}: {}",
            describe(opts),
            store::explain_connect(&e, opts.get_host(), opts.get_port()).await
        ),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if let Command::Topic(cmd) = cli.command {
        return topic(cmd).await;
    }
    let opts = connect_options(&cli)?;
    match cli.command {
        Command::Migrate => {
            let pool = pool(&opts).await?;
            let report = outbox_core::migrate(&pool).await?;
            if report.applied.is_empty() {
                out!(
                    "outbox schema is current (V{})",
                    report.current_version.unwrap_or(0)
                );
            } else {
                out!(
                    "applied {}; outbox schema now V{}",
                    report.applied.join(", "),
                    report.current_version.unwrap_or(0)
                );
            }
            Ok(())
        }
        Command::Status { json } => status(&opts, json).await,
        Command::Failed(cmd) => failed(&opts, cmd).await,
        Command::Run(args) => run(opts, *args, cli.transaction_pooler).await,
        Command::Topic(_) => unreachable!("handled above"),
    }
}

async fn topic(cmd: TopicCommand) -> anyhow::Result<()> {
    use outbox_relay::topics::{self, Created, TopicError};
    let TopicCommand::Create {
        name,
        partitions,
        replication,
        kafka_brokers,
        kafka_properties,
    } = cmd;
    let properties = kafka_properties.into_iter().collect();
    match topics::create(&kafka_brokers, &properties, &name, partitions, replication).await {
        Ok(Created::New) => out!("created topic {name} ({partitions} partitions)"),
        // Created::AlreadyExists (the enum is non_exhaustive).
        Ok(_) => out!("topic {name} already exists"),
        Err(e @ (TopicError::InvalidName(_) | TopicError::Client(_))) => {
            return Err(UsageError(e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn require_schema(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let (outbox, partitions, waiting): (bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('outbox') IS NOT NULL, to_regclass('outbox_relay_partitions') IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('outbox_relays') \
                        AND attname = 'waiting_since' AND NOT attisdropped)",
    )
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if !outbox {
        anyhow::bail!(
            "there is no outbox table in this database: run `outbox-relay migrate` first"
        );
    }
    if !partitions || !waiting {
        anyhow::bail!(
            "the outbox schema is older than this relay (it lacks {}): run `outbox-relay migrate`",
            if partitions {
                "outbox_relays.waiting_since, migration V4"
            } else {
                "the outbox_relay_partitions table, migration V2"
            }
        );
    }
    Ok(())
}

async fn status(opts: &PgConnectOptions, json: bool) -> anyhow::Result<()> {
    let pool = pool(opts).await?;
    require_schema(&pool).await?;
    // One transaction: a consistent picture, and it works through a
    // transaction-mode pooler.
    let mut tx = pool.begin().await?;
    let totals = store::stats(&mut *tx).await?;
    let relays = store::relays(&mut *tx).await?;
    let partitions = store::partition_stats(&mut *tx).await?;
    tx.commit().await?;
    if json {
        let doc = serde_json::json!({
            "pending": totals.pending,
            "oldest_pending_age_seconds": totals.oldest_pending_age_seconds,
            "failed": totals.failed,
            "published_kept": totals.published_kept,
            "relays": relays,
            "partitions": partitions,
        });
        out!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    out!("outbox at {}", describe(opts));
    out!("  pending:            {}", totals.pending);
    out!(
        "  oldest pending age: {:.1}s",
        totals.oldest_pending_age_seconds
    );
    out!("  failed:             {}", totals.failed);
    out!("  published (kept):   {}", totals.published_kept);
    let live = relays.iter().filter(|r| r.live).count();
    out!("relays: {live} live");
    for r in &relays {
        out!(
            "  {:<40} {:<8} pid {:<7} heartbeat {:>5.1}s ago  {:<7}  partitions {}",
            r.relay_id,
            if r.live { "live" } else { "expired" },
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.heartbeat_age_seconds,
            if r.waiting { "waiting" } else { "busy" },
            ranges(&r.partitions),
        );
    }
    out!("partitions: {}", partitions.len());
    out!(
        "  {:>9}  {:<40} {:>9}  {:>11}",
        "partition",
        "owner",
        "pending",
        "oldest age"
    );
    for p in &partitions {
        let owner = match (&p.owner, p.owner_live) {
            (None, _) => "(none)".to_string(),
            (Some(o), true) => o.clone(),
            (Some(o), false) => format!("{o} (expired)"),
        };
        out!(
            "  {:>9}  {:<40} {:>9}  {:>10.1}s",
            p.partition,
            owner,
            p.pending,
            p.oldest_pending_age_seconds
        );
    }
    Ok(())
}

/// `0-3,7,9-10` for a sorted list of partitions.
fn ranges(ps: &[i32]) -> String {
    if ps.is_empty() {
        return "none".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut start = ps[0];
    let mut prev = ps[0];
    for &p in &ps[1..] {
        if p != prev + 1 {
            out.push(if start == prev {
                start.to_string()
            } else {
                format!("{start}-{prev}")
            });
            start = p;
        }
        prev = p;
    }
    out.push(if start == prev {
        start.to_string()
    } else {
        format!("{start}-{prev}")
    });
    out.join(",")
}

async fn failed(opts: &PgConnectOptions, cmd: FailedCommand) -> anyhow::Result<()> {
    let pool = pool(opts).await?;
    require_schema(&pool).await?;
    let mut tx = pool.begin().await?;
    let selection = |s: cli::SelectArgs| {
        if s.all {
            Selection::All
        } else if !s.id.is_empty() {
            Selection::Ids(s.id)
        } else {
            Selection::EventIds(s.event_id)
        }
    };
    match cmd {
        FailedCommand::List { limit, json } => {
            let rows = store::failed_list(&mut *tx, limit).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                out!("no failed rows");
            } else {
                // One line per row: long keys and reasons are clipped here
                // (--json keeps them whole).
                for r in rows {
                    out!(
                        "id={} event_id={} key={}/{} type={} attempts={} failed_at={} reason: {}",
                        r.id,
                        r.event_id,
                        clip(&r.aggregate_type, 80),
                        clip(&r.aggregate_id, 120),
                        clip(&r.event_type, 80),
                        r.attempts,
                        r.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                        clip(r.last_error.as_deref().unwrap_or_default(), 400)
                    );
                }
            }
        }
        FailedCommand::Retry(s) => {
            let n = store::failed_retry(&mut *tx, &selection(s)).await?;
            out!("{n} failed rows put back to pending");
        }
        FailedCommand::Discard(s) => {
            let n = store::failed_discard(&mut *tx, &selection(s)).await?;
            out!("{n} failed rows discarded");
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn run(
    opts: PgConnectOptions,
    args: cli::RunArgs,
    transaction_pooler: bool,
) -> anyhow::Result<()> {
    let cfg = args.to_config(transaction_pooler);
    cfg.validate().map_err(|e| UsageError(e.to_string()))?;
    if args.migrate {
        let pool = pool(&opts).await?;
        let report = outbox_core::migrate(&pool).await?;
        info!(applied = ?report.applied, version = ?report.current_version, "outbox migrations checked");
        pool.close().await;
    }
    let metrics = install_metrics()?;
    let relay = Relay::new(cfg.clone(), opts.clone())
        .map_err(|e| UsageError(format!("{:#}", anyhow::Error::from(e))))?;
    let health = relay.health();
    let listener = http::bind(args.http_addr)
        .await
        .map_err(|e| UsageError(e.to_string()))?;

    let shutdown = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        metrics,
        Arc::clone(&health),
        shutdown.clone(),
    ));
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            info!("shutdown signal received; finishing the batch in flight");
            shutdown.cancel();
        }
    });
    info!(
        database = %describe(&opts),
        brokers = %cfg.brokers,
        batch_size = cfg.batch_size,
        poll_interval = ?cfg.poll_interval,
        listen = cfg.listen && !cfg.transaction_pooler,
        transaction_pooler = cfg.transaction_pooler,
        relay.id = %relay.relay_id(),
        lease_ttl = ?cfg.lease_ttl,
        http = %args.http_addr,
        "outbox-relay starting"
    );
    relay.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Ok(Err(e)) = http_task.await {
        error!(error = %e, "http server failed");
    }
    info!("outbox-relay stopped");
    Ok(())
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(telemetry::COMMIT_TO_ACK.into()),
            telemetry::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::BATCH_DURATION.into()),
            telemetry::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::BATCH_SIZE.into()),
            telemetry::BATCH_BUCKETS,
        )?
        .install_recorder()
        .context("cannot install the Prometheus recorder")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
