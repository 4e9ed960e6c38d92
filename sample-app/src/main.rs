//! `sample-app`: the demo, or the order service and the consumers on their own.
//!
//! Exit codes: 0 success, 1 failure, 2 bad flags.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sample_app::{
    checkout::Faults,
    checkout_demo::CheckoutOptions,
    consumers::{self, Broker, Consumers, Fix, Latencies},
    demo::{self, DemoOptions},
    orders::{self, Orders},
};
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

/// An order service with inventory, notifications and analytics consumers,
/// on the transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "sample-app", version)]
struct Cli {
    /// PostgreSQL URL. The demo creates its own database (sample_demo) on
    /// this server; serve and consumers use this database. Never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    kafka_brokers: String,
    /// The broker the events travel through: `kafka` (a topic and three
    /// consumer groups) or `rabbitmq` (an exchange and a queue per consumer).
    #[arg(long, value_enum, default_value_t = BrokerArg::Kafka, global = true)]
    broker: BrokerArg,
    /// The RabbitMQ broker, for `--broker rabbitmq`. Never printed whole.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BrokerArg {
    Kafka,
    Rabbitmq,
}

impl Cli {
    fn broker(&self) -> Broker {
        match self.broker {
            BrokerArg::Kafka => Broker::Kafka(self.kafka_brokers.clone()),
            BrokerArg::Rabbitmq => Broker::RabbitMq(self.amqp_url.clone()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process: relay, order service, consumers, a burst of
    /// orders with duplicates and a poison event, then a report. With
    /// --keep-running, Prometheus metrics are served on --metrics-addr.
    Demo {
        /// Where `/metrics` is served while the demo keeps running.
        #[arg(long, default_value = "127.0.0.1:9465")]
        metrics_addr: SocketAddr,
        /// Orders in the burst.
        #[arg(long, default_value_t = 200)]
        orders: usize,
        /// Records published a second time, to show dedupe.
        #[arg(long, default_value_t = 50)]
        duplicates: usize,
        /// Where the order service listens (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        http_addr: SocketAddr,
        /// After the report, keep everything running until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
        /// Run the checkout saga demo instead: checkouts across inventory,
        /// payment and ordering, with declines and silences, then the
        /// invariants.
        #[arg(long)]
        checkout: bool,
        /// Checkouts in the checkout demo.
        #[arg(long, default_value_t = 300)]
        checkouts: usize,
        /// How long a checkout step may go unanswered (checkout demo).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        step_timeout: Duration,
        /// The payment service declines every n-th charge (checkout demo).
        #[arg(long, default_value_t = 9)]
        decline_every: u64,
        /// The payment service charges but never answers every n-th charge
        /// (checkout demo).
        #[arg(long, default_value_t = 13)]
        silence_every: u64,
    },
    /// The order service alone (run outbox-relay beside it).
    Serve {
        /// Where `/metrics` (Prometheus) is served.
        #[arg(long, default_value = "127.0.0.1:9465")]
        metrics_addr: SocketAddr,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// Topic of the order events.
        #[arg(long, default_value = "orders")]
        topic: String,
    },
    /// The three consumers alone.
    Consumers {
        /// Where `/metrics` (Prometheus: consumer_kit_*) is served.
        #[arg(long, default_value = "127.0.0.1:9466")]
        metrics_addr: SocketAddr,
        /// Topic of the order events.
        #[arg(long, default_value = "orders")]
        topic: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,consumer_kit::process=off,lapin=off".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: log files and journals get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let latency = outbox_relay::telemetry::LATENCY_BUCKETS;
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(consumer_kit::telemetry::HANDLER_DURATION.into()),
            latency,
        )?
        .set_buckets_for_metric(
            Matcher::Full(outbox_relay::telemetry::COMMIT_TO_ACK.into()),
            latency,
        )?
        .install_recorder()
        .context("cannot install the Prometheus recorder")
}

/// The consumers whose health `/readyz` reports.
type Readiness = Vec<(&'static str, std::sync::Arc<consumer_kit::Health>)>;

/// Serves `/metrics` on `addr` until `stop` fires, and `/readyz` from the
/// consumers' health: 200 when every one is ready, else 503; the body has
/// one line per consumer.
async fn serve_metrics(
    addr: SocketAddr,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    ready: Readiness,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for /metrics (use --metrics-addr)"))?;
    let readyz = move || {
        let reports: Vec<(bool, String)> = ready
            .iter()
            .map(|(name, h)| {
                let r = h.now();
                (r.ready, format!("{name}: {}", r.reason))
            })
            .collect();
        let all = reports.iter().all(|(ok, _)| *ok);
        let body: Vec<String> = reports.into_iter().map(|(_, line)| line).collect();
        let status = if all {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        };
        async move { (status, body.join("\n") + "\n") }
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/readyz", axum::routing::get(readyz));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(())
}

fn ctrl_c() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let broker = cli.broker();
    let url = cli
        .database_url
        .as_deref()
        .context("no database given: set DATABASE_URL or pass --database-url postgres://...")?;
    let database: PgConnectOptions = url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    match cli.command {
        Command::Demo {
            metrics_addr,
            orders,
            duplicates,
            http_addr,
            keep_running,
            checkout,
            checkouts,
            step_timeout,
            decline_every,
            silence_every,
        } => {
            if checkout {
                let report = sample_app::checkout_demo::run(CheckoutOptions {
                    database,
                    broker: broker.clone(),
                    checkouts,
                    step_timeout,
                    faults: Faults {
                        decline_every,
                        silence_every,
                    },
                    duplicates: duplicates.min(checkouts),
                })
                .await?;
                anyhow::ensure!(report.problems.is_empty(), "checkout invariants failed");
                return Ok(());
            }
            let metrics = install_metrics()?;
            let stop_metrics = CancellationToken::new();
            if keep_running {
                serve_metrics(
                    metrics_addr,
                    metrics.clone(),
                    Vec::new(),
                    stop_metrics.clone(),
                )
                .await?;
            }
            let report = demo::run(DemoOptions {
                database,
                broker: broker.clone(),
                orders,
                duplicates,
                http_addr,
                keep_running: keep_running.then(ctrl_c),
            })
            .await?;
            stop_metrics.cancel();
            println!("metrics (Prometheus, as /metrics serves them):");
            for line in metrics.render().lines().filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("consumer_kit_duplicates_total")
                        || l.starts_with("consumer_kit_dead_lettered_total")
                        || l.starts_with("consumer_kit_lag")
                        || l.starts_with("outbox_relay_published_total"))
            }) {
                println!("  {line}");
            }
            anyhow::ensure!(report.problems.is_empty(), "consistency checks failed");
        }
        Command::Serve {
            metrics_addr,
            http_addr,
            topic,
        } => {
            let stop = ctrl_c();
            serve_metrics(metrics_addr, install_metrics()?, Vec::new(), stop.clone()).await?;
            let pool = sqlx::PgPool::connect_with(database).await?;
            outbox_core::migrate(&pool).await?;
            sqlx::query(orders::SCHEMA).execute(&pool).await?;
            let listener = tokio::net::TcpListener::bind(http_addr).await?;
            println!("order service on http://{http_addr}/orders, events to topic {topic}");
            let stop = ctrl_c();
            axum::serve(
                listener,
                orders::router(Orders {
                    pool,
                    topic: topic.into(),
                }),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await?;
        }
        Command::Consumers {
            metrics_addr,
            topic,
        } => {
            let stop = ctrl_c();
            let metrics = install_metrics()?;
            let pools = consumers::prepare(&database).await?;
            let fix = Fix::default();
            fix.deploy();
            let built = Consumers::build(&broker, &topic, &pools, &Latencies::default(), &fix)?;
            serve_metrics(metrics_addr, metrics, built.health(), stop.clone()).await?;
            let handles: Vec<_> = built
                .consumers
                .into_iter()
                .map(|(name, c)| (name, c.start()))
                .collect();
            println!(
                "consumers inventory, notifications, analytics on topic {topic}; readiness at http://{metrics_addr}/readyz; Ctrl-C stops them"
            );
            // Until Ctrl-C, or a consumer stops on its own (an error, said
            // below).
            while !stop.is_cancelled() && !handles.iter().any(|(_, h)| h.is_finished()) {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            for (name, handle) in handles {
                handle
                    .stop()
                    .await
                    .with_context(|| format!("consumer {name}"))?;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}
