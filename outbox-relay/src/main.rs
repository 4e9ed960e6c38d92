//! The `outbox-relay` binary: parse flags, set up logs, connect, dispatch.
//!
//! `cli.rs` declares the flags, `operate.rs` runs the operator's commands
//! (`topic create`, `status`, `failed …`), `serve.rs` runs the relay with
//! `http.rs`'s endpoints.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags or configuration.

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};
use outbox_relay::store;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

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

mod cli;
mod http;
mod operate;
mod serve;

use operate::{failed, status, topic};
use serve::run;

/// The binary's allocator: mimalloc rather than glibc's malloc. The relay
/// allocates and frees thousands of rows, records and headers per batch
/// across tokio's worker threads; with glibc, `malloc`/`free` took about a
/// third of its CPU in a drain. With mimalloc the poll relay spends a third
/// less CPU per event and drains 1.32x as fast (median of 4 alternating
/// pairs), for about 50 MiB more resident memory (BENCHMARKS set Z). A
/// service embedding the library keeps its own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(
            // The replication client logs each ended session as an error;
            // the WAL source reports it itself, with what to do. lapin logs
            // each message RabbitMQ returns, payload and all, and each
            // failed connection attempt several times as errors; the relay
            // reports both itself (the event moved to failed, with the
            // reason; the connection once per change, and in /readyz).
            "info,sqlx::postgres::notice=warn,refinery_core=warn,pgwire_replication::client::tokio_client=off",
        ));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin")) {
        // Unless asked for by name (RUST_LOG=…,lapin=debug).
        if let Ok(off) = "lapin=off".parse() {
            filter = filter.add_directive(off);
        }
    }
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
        Command::Status {
            json,
            exactly_once,
            kafka_brokers,
            checkpoint_topic,
            kafka_properties,
        } => {
            let checkpoints = exactly_once.then(|| operate::CheckpointSource {
                brokers: kafka_brokers,
                topic: checkpoint_topic,
                properties: kafka_properties.into_iter().collect(),
            });
            status(&opts, json, checkpoints).await
        }
        Command::Failed(cmd) => failed(&opts, cmd).await,
        Command::Slot(cmd) => {
            let url = cli.database_url.as_deref().unwrap_or_default();
            operate::slot(&pool(&opts).await?, url, cli.transaction_pooler, cmd).await
        }
        Command::Run(args) => {
            run(
                opts,
                *args,
                cli.transaction_pooler,
                cli.database_url.as_deref(),
            )
            .await
        }
        Command::Topic(_) => unreachable!("handled above"),
    }
}
