//! `outbox-bench`: the relay and the producer path measured side by side
//! with raw baselines in one run, printed as ratios. The method is written
//! down in `BENCHMARKS.md`.
//!
//! Run with `./dev bench` (release build, services up), or
//! `cargo run --release -p outbox-bench -- --help`.

mod consumer;
mod cpu;
mod debezium;
mod delayed;
mod drain;
mod env;
mod exactly_once;
mod latency;
mod producer;
mod rabbitmq;
mod relays;
mod samples;
mod wal;

use std::time::Duration;

use clap::{Parser, Subcommand};

use drain::drain;
use env::{median, Env, DATABASE, KEYS, PARTITIONS};
use latency::{enqueue, latency};
use producer::producer;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the outbox relay against raw baselines, as ratios from one run")]
struct Args {
    /// Server URL; the benchmark creates and drops its own database on it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which benchmark.
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Drain a backlog: relay vs raw DELETE…RETURNING drain vs raw producer.
    Drain {
        /// Backlog size.
        #[arg(long, default_value_t = 1_000_000)]
        rows: i64,
        /// Relay batch size.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
    },
    /// Delayed events: drain with and without far-future delayed rows
    /// waiting, side by side; then how soon rows due at one moment are
    /// published after it.
    Delayed {
        /// Backlog size of each drain.
        #[arg(long, default_value_t = 300_000)]
        rows: i64,
        /// Delayed rows waiting (due in 30 days) in the "with" drains.
        #[arg(long, default_value_t = 1_000_000)]
        waiting: i64,
        /// Rows due at one moment.
        #[arg(long, default_value_t = 20_000)]
        due: i64,
    },
    /// Commit-to-ack latency at a fixed offered load.
    Latency {
        /// Offered load, events per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Turn the NOTIFY trigger off and let the relay poll only.
        #[arg(long)]
        no_notify: bool,
        /// The relay's poll interval.
        #[arg(long, default_value = "500ms", value_parser = test_kit::parse_duration)]
        poll_interval: Duration,
    },
    /// Producer transaction with the outbox row vs without it.
    Producer {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// consumer-kit (dedupe, one insert per event) vs a raw rdkafka consumer
    /// doing the same insert without dedupe.
    Consumer {
        /// Distinct events per run.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Produce every event twice (50% duplicates).
        #[arg(long)]
        duplicates: bool,
    },
    /// Several relays: drain throughput with 1, 2 and 4 relays, as ratios
    /// to one relay.
    Relays {
        /// Backlog size per drain.
        #[arg(long, default_value_t = 300_000)]
        rows: i64,
        /// Relay batch size.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        /// Relay counts to compare (the first is the baseline).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        counts: Vec<usize>,
    },
    /// Fail-over: time from a relay's kill -9 until its partitions flow
    /// again, under a steady load.
    Failover {
        /// Offered load, events per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// The relays' lease TTL (default: the relay's default).
        #[arg(long, default_value = "10s", value_parser = test_kit::parse_duration)]
        lease_ttl: Duration,
    },
    /// What `--exactly-once` costs: drain and commit-to-ack latency with
    /// and without it, side by side.
    ExactlyOnce(ExactlyOnceArgs),
    /// The relay draining into RabbitMQ (`--sink rabbitmq`) vs a raw lapin
    /// publisher, side by side.
    Rabbitmq(rabbitmq::RabbitArgs),
    /// consumer-kit's RabbitMQ source vs a raw lapin consumer doing the
    /// same insert without dedupe.
    RabbitmqConsumer(rabbitmq::RabbitConsumerArgs),
    /// The relay reading the WAL (`--source wal`) vs polling: drain, and
    /// commit-to-ack with rows and with table-less events, side by side.
    Wal(SideBySide),
    /// The relay (polling; reading the WAL with rows and with table-less
    /// events) and Debezium's outbox event router on Kafka Connect (its
    /// rows kept, and deleted by their producers), each as its own
    /// process, side by side: drain, commit-to-consume, peak RSS.
    Debezium {
        /// Backlog size per drain.
        #[arg(long, default_value_t = 1_000_000)]
        rows: i64,
        /// Offered loads for the latency runs, events per second.
        #[arg(long, value_delimiter = ',', default_value = "2000,10000")]
        rates: Vec<u64>,
        /// Seconds of load per latency run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Seconds of load before each latency run's counted seconds, the
        /// same for every system. Kafka Connect's JIT compiler is still
        /// busy for 10-15 s of load on a 2-core machine, and the backlog
        /// it leaves would be counted as Debezium's latency.
        #[arg(long, default_value_t = 15)]
        warm_up: u64,
        /// The `outbox-relay` binary (default: beside this one).
        #[arg(long, env = "OUTBOX_RELAY_BIN")]
        relay_bin: Option<std::path::PathBuf>,
        /// Apache Kafka's jars, the Connect worker's classpath (`./dev up` fetches them).
        #[arg(long, env = "KAFKA_LIBS")]
        kafka_libs: std::path::PathBuf,
        /// Debezium's plugin folder (`./dev bench debezium` fetches it).
        #[arg(long, env = "DEBEZIUM_PLUGINS")]
        debezium_plugins: std::path::PathBuf,
        /// The Java binary for Kafka Connect (17 or newer).
        #[arg(long, env = "JAVA_BIN", default_value = "java")]
        java: std::path::PathBuf,
        /// Which systems to measure, in this order (default: all five;
        /// ratios are printed to each of `debezium` and `debezium-delete`
        /// among them).
        #[arg(long, value_delimiter = ',', value_enum)]
        systems: Vec<debezium::System>,
        /// One more argument for every `outbox-relay run`, repeatable
        /// (`--relay-arg=--remember-published --relay-arg=0`).
        #[arg(long = "relay-arg", allow_hyphen_values = true)]
        relay_args: Vec<String>,
        /// Keep every process's log (and Kafka Connect's GC log) in this
        /// folder, and print when each run's slowest event was committed,
        /// to find it there (default: logs are removed at the end). The
        /// relay logs at `warn` unless `OUTBOX_BENCH_RELAY_LOG` gives its
        /// `RUST_LOG`: `warn,outbox_relay::wal::timing=debug` adds each WAL
        /// batch's size, age and publish time, and each commit received
        /// more than 20 ms after it was made.
        #[arg(long)]
        keep_logs: Option<std::path::PathBuf>,
    },
    /// Everything, with the defaults (the consumer with and without duplicates).
    All,
    /// (internal) One relay process for `failover`, until SIGTERM.
    #[command(hide = true)]
    RelayChild {
        #[arg(long)]
        relay_id: String,
        #[arg(long)]
        lease_ttl_ms: u64,
    },
}

/// The arguments of `exactly-once`.
#[derive(Debug, clap::Args)]
struct ExactlyOnceArgs {
    #[command(flatten)]
    side: SideBySide,
    /// Both relays read the WAL (`--source wal`); latency with table-less
    /// events.
    #[arg(long)]
    wal: bool,
}

/// The arguments of a side-by-side comparison (`exactly-once`, `wal`): a
/// drain of a backlog, then commit-to-ack at an offered load.
#[derive(Debug, clap::Args)]
struct SideBySide {
    /// Backlog size per drain.
    #[arg(long, default_value_t = 300_000)]
    rows: i64,
    /// Relay batch size for the drains.
    #[arg(long, default_value_t = 5000)]
    batch_size: usize,
    /// Offered load for the latency runs, events per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds of load per latency run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Which::RelayChild {
        relay_id,
        lease_ttl_ms,
    } = &args.which
    {
        let opts: sqlx::postgres::PgConnectOptions = args.database_url.parse()?;
        return relays::child(
            opts.database(DATABASE),
            args.kafka_brokers.clone(),
            relay_id.clone(),
            Duration::from_millis(*lease_ttl_ms),
        )
        .await;
    }
    let recorder = samples::install();
    let env = Env::new(&args).await?;
    match args.which {
        Which::Drain { rows, batch_size } => {
            drain(&env, &recorder, args.runs, rows, batch_size).await?
        }
        Which::Delayed { rows, waiting, due } => {
            delayed::delayed(&env, &recorder, args.runs, rows, waiting, due).await?
        }
        Which::Latency {
            rate,
            seconds,
            no_notify,
            poll_interval,
        } => {
            latency(
                &env,
                &recorder,
                args.runs,
                rate,
                seconds,
                !no_notify,
                poll_interval,
            )
            .await?
        }
        Which::Producer { seconds } => producer(&env, args.runs, seconds).await?,
        Which::Consumer { events, duplicates } => {
            consumer::consumer(&env, args.runs, events, duplicates).await?
        }
        Which::Relays {
            rows,
            batch_size,
            counts,
        } => relays::scaling(&env, &recorder, args.runs, rows, batch_size, &counts).await?,
        Which::Rabbitmq(a) => rabbitmq::rabbitmq(&env, &recorder, args.runs, &a).await?,
        Which::RabbitmqConsumer(a) => rabbitmq::consumer(&env, args.runs, &a).await?,
        Which::Failover { rate, lease_ttl } => {
            relays::failover(&env, args.runs, rate, lease_ttl).await?
        }
        Which::Wal(SideBySide {
            rows,
            batch_size,
            rate,
            seconds,
        }) => wal::wal(&env, &recorder, args.runs, rows, batch_size, rate, seconds).await?,
        Which::ExactlyOnce(ExactlyOnceArgs {
            side:
                SideBySide {
                    rows,
                    batch_size,
                    rate,
                    seconds,
                },
            wal,
        }) => {
            exactly_once::exactly_once(
                &env, &recorder, args.runs, rows, batch_size, rate, seconds, wal,
            )
            .await?
        }
        Which::Debezium {
            rows,
            rates,
            seconds,
            warm_up,
            relay_bin,
            kafka_libs,
            debezium_plugins,
            java,
            systems,
            relay_args,
            keep_logs,
        } => {
            let relay_bin = match relay_bin {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("outbox-relay"),
            };
            let installed = debezium::Installed {
                relay_bin,
                kafka_libs,
                debezium_plugins,
                java,
                relay_args,
                keep_logs,
            };
            let systems = if systems.is_empty() {
                debezium::System::ALL.to_vec()
            } else {
                systems
            };
            let load = debezium::Load {
                rates,
                seconds,
                warm_up,
            };
            debezium::debezium(&env, &installed, args.runs, rows, &load, &systems).await?
        }
        Which::RelayChild { .. } => unreachable!("handled above"),
        Which::All => {
            drain(&env, &recorder, args.runs, 1_000_000, 5000).await?;
            latency(
                &env,
                &recorder,
                args.runs,
                2000,
                20,
                true,
                Duration::from_millis(500),
            )
            .await?;
            producer(&env, args.runs, 5).await?;
            consumer::consumer(&env, args.runs, 20_000, false).await?;
            consumer::consumer(&env, args.runs, 20_000, true).await?;
            relays::scaling(&env, &recorder, args.runs, 300_000, 5000, &[1, 2, 4]).await?;
            relays::failover(&env, args.runs, 500, Duration::from_secs(10)).await?;
            exactly_once::exactly_once(&env, &recorder, args.runs, 300_000, 5000, 2000, 20, false)
                .await?;
        }
    }
    Ok(())
}
