//! `outbox-soak`: producers, the relay and a consumer under scheduled
//! faults, then the correctness checker. See `RELIABILITY.md`.
//!
//! ```sh
//! outbox-soak run --seconds 60 --rate 300 --fault-every 5s
//! outbox-soak run --relays 3 --keys 1000 --seconds 60 --fault-every 3s
//! outbox-soak run --faults broker-restart,relay-kill,consumer-kill --fault-every 4s
//! outbox-soak check --database outbox_soak --topic soak-1a2b3c4d
//! ```
//!
//! The relay and the consumer run as child processes of this same binary
//! (`outbox-soak relay` / `outbox-soak consume`), so they can be killed with
//! SIGKILL. Exit codes: 0 guarantees held, 1 a guarantee broke or the run
//! failed, 2 bad flags.

mod broker;
mod check;
mod memory;
mod rabbit;
mod role;
mod run;
mod sagas;

use memory::memory;
use run::{soak, Load, RELAY_BATCH};

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use consumer_kit::{Consumer, ConsumerConfig, Envelope, Handler, HandlerError};
use sqlx::{postgres::PgConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(name = "outbox-soak", version)]
struct Cli {
    /// PostgreSQL server URL; the soak creates its own database on it. Never printed.
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
    /// Where the relays publish and the consumer reads: `kafka` (a topic)
    /// or `rabbitmq` (an exchange, the consumer's own queue, and a tap
    /// queue the checker reads; see RELIABILITY.md).
    #[arg(long, value_enum, default_value_t = Sink::Kafka, global = true)]
    sink: Sink,
    /// The RabbitMQ broker, for `--sink rabbitmq` (the broker-restart fault
    /// runs a node of its own instead). Never printed.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    /// The soak's database.
    #[arg(long, default_value = "outbox_soak", global = true)]
    database: String,
    #[command(subcommand)]
    command: Command,
}

/// `--sink` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Sink {
    Kafka,
    Rabbitmq,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Rabbitmq => "rabbitmq",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// SIGKILL a relay process picked at random, then start it again.
    RelayKill,
    /// pg_terminate_backend on every connection of every relay.
    PgTerminate,
    /// SIGKILL the consumer process (between its database commits and its
    /// offset commits), then start it again.
    ConsumerKill,
    /// SIGKILL the broker, then start it again 0.5 to 3 s later. With this
    /// fault the soak runs its own Apache Kafka broker (storage on disk) on
    /// free local ports, instead of using KAFKA_BROKERS (with `--sink
    /// rabbitmq`: its own RabbitMQ node, instead of AMQP_URL).
    BrokerRestart,
    /// SIGKILL one node of a three-broker Apache Kafka cluster picked at
    /// random (the leaders of its partitions, and of any transaction
    /// coordinator it hosted, move to the others), then start it again 0.5
    /// to 3 s later. With this fault the soak runs its own three-node
    /// cluster (topics replicated 3 times, min.insync.replicas 2).
    LeaderFailover,
    /// The next five produce requests fail with retriable errors (request
    /// timed out, not leader, not enough replicas, a dropped connection).
    /// This and the next two faults run the soak on librdkafka's mock cluster
    /// (3 brokers, in the soak's process) instead of KAFKA_BROKERS.
    ProduceErrors,
    /// A mock broker picked at random answers 300 ms late for 2 s.
    BrokerSlow,
    /// A mock broker picked at random goes down for 0.5 to 3 s.
    BrokerDown,
}

impl Fault {
    /// Needs librdkafka's mock cluster.
    fn needs_mock(self) -> bool {
        matches!(
            self,
            Self::ProduceErrors | Self::BrokerSlow | Self::BrokerDown
        )
    }
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Run producers, relay and consumer for a bounded time with faults,
    /// then check.
    Run {
        /// Seconds of producer load.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Events per second, over all producers.
        #[arg(long, default_value_t = 300)]
        rate: u64,
        /// Concurrent producers.
        #[arg(long, default_value_t = 4)]
        producers: u64,
        /// Distinct keys (aggregates).
        #[arg(long, default_value_t = 100)]
        keys: i64,
        /// Relay processes sharing the outbox's partitions.
        #[arg(long, default_value_t = 1)]
        relays: usize,
        /// The relays' lease TTL: a killed relay's partitions are taken
        /// over after this.
        #[arg(long, default_value = "3s", value_parser = test_kit::parse_duration)]
        lease_ttl: Duration,
        /// Time between faults.
        #[arg(long, default_value = "5s", value_parser = test_kit::parse_duration)]
        fault_every: Duration,
        /// Fault kinds, taken in turn.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "relay-kill,pg-terminate,consumer-kill"
        )]
        faults: Vec<Fault>,
        /// Also write the result as JSON to this file (faults injected, the
        /// checker's counts, the duplicate bound, the verdict).
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Make every Nth event of each producer a poison event, which the
        /// consumer refuses (dead-letters) until the load ends; the soak
        /// then fixes the handler and replays the dead letters. Under the
        /// consumer's park-key ordering the events of a poisoned key wait,
        /// and the checker verifies per-key order of effects. 0: none.
        #[arg(long, default_value_t = 0)]
        poison_every: u64,
        /// Also start this many checkouts a second through the sample
        /// app's checkout saga (inventory, payment with declines and
        /// silences, ordering), under the same faults; the checker then
        /// requires every checkout finished and the saga's invariants. 0:
        /// none.
        #[arg(long, default_value_t = 0)]
        sagas_per_second: u64,
        /// How the relays run.
        #[command(flatten)]
        mode: RelayMode,
    },
    /// Relay memory while it drains a backlog: RSS sampled every 250 ms.
    Memory {
        /// Backlog rows (~200-byte JSON payloads).
        #[arg(long, default_value_t = 1_000_000)]
        rows: i64,
    },
    /// Compare ledger, topic and effects of a finished run.
    Check {
        /// The run's topic.
        #[arg(long)]
        topic: String,
    },
    /// (internal) The relay, until SIGTERM.
    #[command(hide = true)]
    Relay {
        /// Rows per claimed batch (what one relay fault may repeat).
        #[arg(long, default_value_t = RELAY_BATCH)]
        batch_size: usize,
        /// Lease TTL.
        #[arg(long, default_value = "10s", value_parser = test_kit::parse_duration)]
        lease_ttl: Duration,
        /// How long a record may wait for its acknowledgement.
        #[arg(long, default_value = "30s", value_parser = test_kit::parse_duration)]
        publish_timeout: Duration,
        /// One produce request in flight per connection (for the mock
        /// cluster, which checks idempotent sequence numbers only for
        /// transactional producers; RELIABILITY.md).
        #[arg(long)]
        one_in_flight: bool,
        /// How the relay runs (`run` passes its own flags on).
        #[command(flatten)]
        mode: RelayMode,
    },
    /// (internal) The consumer, until SIGTERM.
    #[command(hide = true)]
    Consume {
        #[arg(long)]
        topic: String,
        /// Also run the checkout saga's consumers (`run --sagas-per-second`).
        #[arg(long)]
        sagas: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run {
        faults,
        seconds,
        rate,
        ..
    } = &cli.command
    {
        if faults.iter().any(|f| f.needs_mock()) && seconds * rate > broker::MOCK_MAX_EVENTS {
            eprintln!(
                "error: --seconds × --rate is {} events, but librdkafka's mock cluster keeps at \
                 most 5 MiB per partition (about {} soak events on its 3 partitions) and drops \
                 older records, which the checker would count as lost; run the mock faults for \
                 at most {} events, or the other faults on a real broker",
                seconds * rate,
                broker::MOCK_MAX_EVENTS,
                broker::MOCK_MAX_EVENTS
            );
            return ExitCode::from(2);
        }
        let own_kafka = faults.contains(&Fault::BrokerRestart) as u8
            + faults.contains(&Fault::LeaderFailover) as u8
            + faults.iter().any(|f| f.needs_mock()) as u8;
        if own_kafka > 1 && faults.contains(&Fault::LeaderFailover) {
            eprintln!(
                "error: --faults: leader-failover runs a three-broker cluster of its own; run \
                 broker-restart and the mock faults in separate soaks"
            );
            return ExitCode::from(2);
        }
        if cli.sink == Sink::Rabbitmq
            && faults
                .iter()
                .any(|f| f.needs_mock() || *f == Fault::LeaderFailover)
        {
            eprintln!(
                "error: --sink rabbitmq: the faults are relay-kill, pg-terminate, consumer-kill \
                 and broker-restart (the others are Kafka's)"
            );
            return ExitCode::from(2);
        }
        if let Command::Run { mode, .. } = &cli.command {
            if cli.sink == Sink::Rabbitmq && mode.exactly_once {
                eprintln!(
                    "error: --exactly-once is Kafka's (transactions); not with --sink rabbitmq"
                );
                return ExitCode::from(2);
            }
        }
        if faults.contains(&Fault::BrokerRestart) && faults.iter().any(|f| f.needs_mock()) {
            eprintln!(
                "error: --faults: broker-restart runs an Apache Kafka broker of its own, while produce-errors, \
                 broker-slow and broker-down run on librdkafka's mock cluster; run them in \
                 separate soaks"
            );
            return ExitCode::from(2);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // lapin logs each lost connection as an error of its own;
                // the relay and consumer say it once, with what they do.
                .unwrap_or_else(|_| {
                    "warn,pgwire_replication::client::tokio_client=off,lapin=off".into()
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let server: PgConnectOptions = cli
        .database_url
        .as_deref()
        .context("no database given: set DATABASE_URL or pass --database-url postgres://...")?
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    let db = server.clone().database(&cli.database);
    match &cli.command {
        Command::Run {
            seconds,
            rate,
            producers,
            keys,
            relays,
            lease_ttl,
            fault_every,
            faults,
            json,
            poison_every,
            sagas_per_second,
            mode,
        } => {
            let mock_faults = faults.iter().any(|f| f.needs_mock());
            let own = if mock_faults {
                Some(broker::Own::Mock(broker::Mock::start()?))
            } else if faults.contains(&Fault::LeaderFailover) {
                Some(broker::Own::Cluster(
                    test_kit::kafka::Cluster::start()
                        .context("the leader-failover fault's own three-broker cluster")?,
                ))
            } else if faults.contains(&Fault::BrokerRestart) && cli.sink == Sink::Rabbitmq {
                Some(broker::Own::Rabbit(
                    test_kit::rabbitmq::Node::start()
                        .context("the broker-restart fault's own RabbitMQ node")?,
                ))
            } else if faults.contains(&Fault::BrokerRestart) {
                Some(broker::Own::Kafka(
                    test_kit::kafka::Node::start()
                        .context("the broker-restart fault's own broker")?,
                ))
            } else {
                None
            };
            soak(
                &cli,
                server,
                Load {
                    seconds: *seconds,
                    rate: *rate,
                    producers: *producers,
                    keys: *keys,
                    relays: (*relays).max(1),
                    lease_ttl: *lease_ttl,
                    json: json.clone(),
                    poison_every: *poison_every,
                    sagas_per_second: *sagas_per_second,
                    mode: mode.clone(),
                },
                *fault_every,
                faults,
                own,
            )
            .await
        }
        Command::Check { topic } => {
            let pool = PgPool::connect_with(db).await?;
            let published = match cli.sink {
                Sink::Kafka => check::Published::Kafka(&cli.kafka_brokers),
                Sink::Rabbitmq => check::Published::RabbitMq(&cli.amqp_url),
            };
            let v = check::check(&pool, published, topic, &Default::default()).await?;
            println!("{v}");
            Ok(v.ok())
        }
        Command::Memory { rows } => memory(&cli, server, *rows).await,
        Command::Relay {
            batch_size,
            lease_ttl,
            publish_timeout,
            one_in_flight,
            mode,
        } => {
            let mut kafka_properties = BTreeMap::new();
            if *one_in_flight {
                kafka_properties.insert(
                    "max.in.flight.requests.per.connection".to_string(),
                    "1".to_string(),
                );
            }
            let relay = outbox_relay::Relay::new(
                outbox_relay::RelayConfig {
                    brokers: cli.kafka_brokers.clone(),
                    batch_size: *batch_size,
                    poll_interval: Duration::from_millis(100),
                    kafka_properties,
                    lease_ttl: *lease_ttl,
                    heartbeat_interval: *lease_ttl / 4,
                    publish_timeout: *publish_timeout,
                    exactly_once: mode.exactly_once,
                    crash_after_kafka_commit: (mode.crash_after_commit_one_in > 0).then_some(
                        outbox_relay::config::CrashAfterCommit {
                            one_in: mode.crash_after_commit_one_in,
                            abort_process: true,
                        },
                    ),
                    mutation_skip_fencing: mode.mutate_skip_fencing,
                    wal: mode.wal_source(&cli)?,
                    rabbitmq: (cli.sink == Sink::Rabbitmq)
                        .then(|| outbox_relay::RabbitMqSink::new(&cli.amqp_url)),
                    ..Default::default()
                },
                db.application_name("outbox-soak-relay"),
            )?;
            let stop = on_sigterm();
            relay.run(stop).await;
            Ok(true)
        }
        Command::Consume { topic, sagas } => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect_with(db.clone())
                .await?;
            let cfg = ConsumerConfig {
                brokers: cli.kafka_brokers.clone(),
                kafka_properties: BTreeMap::from([
                    ("session.timeout.ms".to_string(), "6000".to_string()),
                    ("heartbeat.interval.ms".to_string(), "1000".to_string()),
                ]),
                ..ConsumerConfig::new(check::GROUP, [topic])
            };
            let mut consumer = Consumer::builder(cfg, pool).handler("soak.event", Apply);
            if cli.sink == Sink::Rabbitmq {
                // One consumer at a time, in queue order: the checker wants
                // each key's effects in order.
                consumer = consumer.rabbitmq(consumer_kit::RabbitMqSource {
                    queue: Some(rabbit::queue(topic)),
                    single_active_consumer: true,
                    ..consumer_kit::RabbitMqSource::new(cli.amqp_url.clone())
                });
            }
            let stop = on_sigterm();
            let mut running = vec![consumer.build()?];
            if *sagas {
                let broker = match cli.sink {
                    Sink::Kafka => sample_app::consumers::Broker::Kafka(cli.kafka_brokers.clone()),
                    Sink::Rabbitmq => sample_app::consumers::Broker::RabbitMq(cli.amqp_url.clone()),
                };
                let topics = sagas::topics(topic);
                let pools = sample_app::checkout::prepare(&db).await?;
                running.extend(sagas::consumers(&broker, &topics, &pools)?);
            }
            run_together(running, stop).await?;
            Ok(true)
        }
    }
}

/// How the relays run: `run` takes these flags and passes them on to each
/// relay process (the hidden `relay` subcommand takes the same).
#[derive(Debug, Clone, clap::Args)]
struct RelayMode {
    /// Run the relays with --exactly-once: the checker then requires 0
    /// duplicates for its read_committed reading of the topic, and counts
    /// the records of aborted transactions apart.
    #[arg(long)]
    exactly_once: bool,
    /// With --exactly-once: each relay aborts its own process right after a
    /// Kafka commit and before its database commit, once in this many
    /// commits, at random (the soak restarts it). 0: never.
    #[arg(long, default_value_t = 0)]
    crash_after_commit_one_in: u32,
    /// The checker's self-test: relays take partitions over from dead
    /// relays without fencing them or finishing their checkpoints. The
    /// checker must then find duplicates.
    #[arg(long)]
    mutate_skip_fencing: bool,
    /// Where the relays read events: `poll` (the table), or `wal` (the slot
    /// `soak_<database>`, made for the run: one relay reads, the others
    /// stand by; producers then write every other event with
    /// outbox_core::emit, table-less, instead of a row).
    #[arg(long, value_enum, default_value_t = Source::Poll)]
    source: Source,
}

/// `--source` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// Claim rows from the outbox table.
    Poll,
    /// Read a logical replication slot.
    Wal,
}

impl RelayMode {
    /// The relays read the WAL.
    fn wal(&self) -> bool {
        self.source == Source::Wal
    }

    /// The flags that give a relay process this mode.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.exactly_once {
            args.push("--exactly-once".to_string());
            if self.crash_after_commit_one_in > 0 {
                args.push("--crash-after-commit-one-in".to_string());
                args.push(self.crash_after_commit_one_in.to_string());
            }
            if self.mutate_skip_fencing {
                args.push("--mutate-skip-fencing".to_string());
            }
        }
        if self.wal() {
            args.extend(["--source".to_string(), "wal".to_string()]);
        }
        args
    }

    /// The WAL source of a relay in this mode.
    fn wal_source(&self, cli: &Cli) -> anyhow::Result<Option<outbox_relay::WalSource>> {
        if !self.wal() {
            return Ok(None);
        }
        let mut url = url::Url::parse(cli.database_url.as_deref().unwrap_or_default())
            .context("DATABASE_URL is not a URL")?;
        url.set_path(&cli.database);
        let mut wal = outbox_relay::WalSource::new(
            outbox_relay::slot::ReplicationTarget::from_url(url.as_str())?,
        );
        wal.slot = slot_name(&cli.database);
        wal.publication = wal.slot.clone();
        Ok(Some(wal))
    }
}

/// The slot (and publication) of a soak with `--source wal`.
fn slot_name(database: &str) -> String {
    let name: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("soak_{name}")
}

/// Runs the consumer process's consumers (the soak's own, and the saga's
/// with `--sagas-per-second`) until `stop`. The first one to end with an
/// error stops the others and ends the process with that error, so that
/// the soak restarts the whole process, as a supervisor would. A consumer
/// refuses to start while the broker does not answer; waiting for the
/// others instead left a process running without that consumer for the
/// rest of the run (its commands never applied).
async fn run_together(consumers: Vec<Consumer>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut running = tokio::task::JoinSet::new();
    for c in consumers {
        running.spawn(c.run(stop.clone()));
    }
    let mut first_error = None;
    while let Some(ended) = running.join_next().await {
        let error = match ended {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => anyhow::Error::from(e),
            Err(e) => anyhow::anyhow!("a consumer task ended abnormally: {e}"),
        };
        stop.cancel();
        first_error.get_or_insert(error);
    }
    first_error.map_or(Ok(()), Err)
}

fn on_sigterm() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
        t.cancel();
    });
    token
}

#[derive(serde::Deserialize)]
struct SoakEvent {
    key: String,
    seq: i64,
    #[serde(default)]
    poison: bool,
}

struct Apply;

#[consumer_kit::async_trait]
impl Handler for Apply {
    type Payload = SoakEvent;

    async fn handle(
        &self,
        event: &Envelope<SoakEvent>,
        tx: &mut sqlx::PgTransaction<'static>,
    ) -> Result<(), HandlerError> {
        if event.payload.poison {
            let fixed: bool = sqlx::query_scalar("SELECT fixed FROM soak_control")
                .fetch_one(&mut **tx)
                .await?;
            if !fixed {
                return Err(HandlerError::permanent(format!(
                    "soak poison: key {} seq {}",
                    event.payload.key, event.payload.seq
                )));
            }
        }
        sqlx::query("INSERT INTO soak_effects (event_id, key, seq) VALUES ($1, $2, $3)")
            .bind(event.event_id)
            .bind(&event.payload.key)
            .bind(event.payload.seq)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
