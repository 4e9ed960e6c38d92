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

use std::{
    collections::BTreeMap,
    process::{Command as Process, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use consumer_kit::{Consumer, ConsumerConfig, Envelope, Handler, HandlerError};
use outbox_core::{append, NewEvent};
use sqlx::{postgres::PgConnectOptions, Executor, PgPool};
use test_kit::process::Child;
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
    /// The soak's database.
    #[arg(long, default_value = "outbox_soak", global = true)]
    database: String,
    #[command(subcommand)]
    command: Command,
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
    /// free local ports, instead of using KAFKA_BROKERS.
    BrokerRestart,
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
    },
    /// (internal) The consumer, until SIGTERM.
    #[command(hide = true)]
    Consume {
        #[arg(long)]
        topic: String,
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
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
        } => {
            let mock_faults = faults.iter().any(|f| f.needs_mock());
            let own = if mock_faults {
                Some(broker::Own::Mock(broker::Mock::start()?))
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
                },
                *fault_every,
                faults,
                own,
            )
            .await
        }
        Command::Check { topic } => {
            let pool = PgPool::connect_with(db).await?;
            let v = check::check(&pool, &cli.kafka_brokers, topic).await?;
            println!("{v}");
            Ok(v.ok())
        }
        Command::Memory { rows } => memory(&cli, server, *rows).await,
        Command::Relay {
            batch_size,
            lease_ttl,
            publish_timeout,
            one_in_flight,
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
                    ..Default::default()
                },
                db.application_name("outbox-soak-relay"),
            )?;
            let stop = on_sigterm();
            relay.run(stop).await;
            Ok(true)
        }
        Command::Consume { topic } => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect_with(db)
                .await?;
            let cfg = ConsumerConfig {
                brokers: cli.kafka_brokers.clone(),
                kafka_properties: BTreeMap::from([
                    ("session.timeout.ms".to_string(), "6000".to_string()),
                    ("heartbeat.interval.ms".to_string(), "1000".to_string()),
                ]),
                ..ConsumerConfig::new("soak", [topic])
            };
            let consumer = Consumer::builder(cfg, pool)
                .handler("soak.event", Apply)
                .build()?;
            consumer.run(on_sigterm()).await?;
            Ok(true)
        }
    }
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
        sqlx::query("INSERT INTO soak_effects (event_id, key, seq) VALUES ($1, $2, $3)")
            .bind(event.event_id)
            .bind(&event.payload.key)
            .bind(event.payload.seq)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// The soak relays' batch size (one batch is what a relay fault may repeat).
const RELAY_BATCH: usize = 200;

struct Load {
    /// Where to write the result as JSON, if anywhere.
    json: Option<std::path::PathBuf>,
    seconds: u64,
    rate: u64,
    producers: u64,
    keys: i64,
    relays: usize,
    lease_ttl: Duration,
}

/// A child process of this binary (a relay or a consumer), killed when
/// dropped, restarted with the same arguments after a kill fault.
struct Role {
    args: Vec<String>,
    child: Child,
    /// The peak RSS of the processes this role ran before the current one.
    earlier_peak_rss_kib: u64,
}

impl Role {
    fn start(cli: &Cli, args: &[&str]) -> anyhow::Result<Self> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = spawn(cli, &args)?;
        Ok(Self {
            args,
            child,
            earlier_peak_rss_kib: 0,
        })
    }

    fn kill_and_restart(&mut self, cli: &Cli) -> anyhow::Result<()> {
        let _ = self.child.kill();
        self.earlier_peak_rss_kib = self.peak_rss_kib();
        self.child = spawn(cli, &self.args)?;
        Ok(())
    }

    fn sample_rss(&mut self) {
        self.child.sample_rss();
    }

    fn peak_rss_kib(&self) -> u64 {
        self.earlier_peak_rss_kib.max(self.child.peak_rss_kib())
    }

    fn terminate(&mut self) {
        self.child.stop(Duration::from_secs(20));
    }
}

fn spawn(cli: &Cli, args: &[String]) -> anyhow::Result<Child> {
    Child::spawn(
        Process::new(std::env::current_exe()?)
            .args(args)
            .env(
                "DATABASE_URL",
                cli.database_url.as_deref().unwrap_or_default(),
            )
            .env("KAFKA_BROKERS", &cli.kafka_brokers)
            .arg("--database")
            .arg(&cli.database)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
}

async fn soak(
    cli: &Cli,
    server: PgConnectOptions,
    load: Load,
    fault_every: Duration,
    faults: &[Fault],
    mut own: Option<broker::Own>,
) -> anyhow::Result<bool> {
    // With its own broker or the mock cluster, the soak's relays, consumer
    // and checker use it.
    let with_own_broker;
    let cli = match &own {
        Some(o) => {
            with_own_broker = Cli {
                kafka_brokers: o.address(),
                ..cli.clone()
            };
            &with_own_broker
        }
        None => cli,
    };
    let started = Instant::now();
    let say = |m: String| println!("[{:>6.1}s] {m}", started.elapsed().as_secs_f64());
    let name = &cli.database;
    let pool = fresh_database(cli, server, load.producers as u32 + 4).await?;
    sqlx::query("INSERT INTO soak_keys (key) SELECT 'k' || g FROM generate_series(1, $1) g")
        .bind(load.keys)
        .execute(&pool)
        .await?;
    let topic = format!("soak-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    match own.as_ref().and_then(broker::Own::mock) {
        Some(m) => {
            m.create_topic(&topic, 3)?;
            m.create_topic(&format!("{topic}.dlq"), 3)?;
        }
        None => test_kit::topic::create(&cli.kafka_brokers, &topic, 3).await?,
    }
    say(format!(
        "database {name}, topic {topic}: {} producers at {} events/s over {} keys for {} s; \
         {} relay(s), lease TTL {:?}; a fault every {:?} ({faults:?}); broker {}{}",
        load.producers,
        load.rate,
        load.keys,
        load.seconds,
        load.relays,
        load.lease_ttl,
        fault_every,
        cli.kafka_brokers,
        own.as_ref()
            .map(|o| format!(" ({})", o.describe()))
            .unwrap_or_default()
    ));

    let ttl = format!("{}s", load.lease_ttl.as_secs_f64());
    // A broker restart keeps the broker away for 0.5 to 3 s plus its start
    // (about 4 s), a mock broker down for 0.5 to 3 s. A publish timeout of
    // 1.5 s makes the longer outages time records out (the relay then claims
    // and sends the batch again), while the shorter ones are ridden out by
    // librdkafka's own retries.
    let publish_timeout = if own.is_some() { "1.5s" } else { "30s" };
    let mut relay_args = vec![
        "relay",
        "--lease-ttl",
        &ttl,
        "--publish-timeout",
        publish_timeout,
    ];
    if matches!(own, Some(broker::Own::Mock(_))) {
        relay_args.push("--one-in-flight");
    }
    let mut relays: Vec<Role> = (0..load.relays)
        .map(|_| Role::start(cli, &relay_args))
        .collect::<anyhow::Result<_>>()?;
    let mut consumer = Role::start(cli, &["consume", "--topic", &topic])?;

    // Producers: ledger row + outbox row in one transaction, serialized per
    // key by the key's row lock, so seq order is commit order per key.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..load.producers {
        let pool = pool.clone();
        let stop = Arc::clone(&stop);
        let produced = Arc::clone(&produced);
        let errors = Arc::clone(&errors);
        let topic = topic.clone();
        let every = Duration::from_secs_f64(load.producers as f64 / load.rate.max(1) as f64);
        let keys = load.keys;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut i: i64 = p as i64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let key = format!("k{}", 1 + (i * 7919) % keys);
                i += 1;
                match produce_one(&pool, &topic, &key).await {
                    Ok(()) => produced.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(load.seconds);
    let mut next = 0;
    let mut relay_kills = 0usize;
    // Broker faults hit every relay at once.
    let mut broker_faults = 0usize;
    // Faults come at jittered times (0.5 to 1.5 × --fault-every), and a
    // relay kill hits a relay picked at random.
    loop {
        let wait = fault_every.mul_f64(rand::random_range(0.5..1.5));
        if Instant::now() + wait > end {
            break;
        }
        tokio::time::sleep(wait).await;
        relays.iter_mut().for_each(Role::sample_rss);
        let Some(fault) = faults.get(next % faults.len().max(1)).copied() else {
            break;
        };
        next += 1;
        let name = match fault {
            Fault::RelayKill => {
                let victim = rand::random_range(0..relays.len());
                relays[victim].kill_and_restart(cli)?;
                relay_kills += 1;
                "relay kill -9"
            }
            Fault::PgTerminate => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'outbox-soak-relay' AND datname = current_database()",
                )
                .execute(&pool)
                .await?;
                "pg_terminate_backend (relay)"
            }
            Fault::ConsumerKill => {
                consumer.kill_and_restart(cli)?;
                "consumer kill -9"
            }
            Fault::BrokerRestart => {
                let broker = own
                    .as_mut()
                    .and_then(broker::Own::kafka)
                    .context("the broker-restart fault needs the soak's own broker")?;
                broker.kill();
                tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0))).await;
                tokio::task::block_in_place(|| broker.restart())?;
                broker_faults += 1;
                "broker kill -9 and restart"
            }
            Fault::ProduceErrors | Fault::BrokerSlow | Fault::BrokerDown => {
                let m = own
                    .as_ref()
                    .and_then(broker::Own::mock)
                    .context("this fault needs the mock cluster")?;
                let victim = || rand::random_range(1..=broker::MOCK_BROKERS);
                broker_faults += 1;
                match fault {
                    Fault::ProduceErrors => {
                        m.fail_next_produce_requests();
                        "5 produce requests failed (mock)"
                    }
                    Fault::BrokerSlow => {
                        let b = victim();
                        m.round_trip_time(b, Duration::from_millis(300))?;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        m.round_trip_time(b, Duration::ZERO)?;
                        "a broker 300 ms slow for 2 s (mock)"
                    }
                    _ => {
                        let b = victim();
                        m.set_down(b, true)?;
                        tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0)))
                            .await;
                        m.set_down(b, false)?;
                        "a broker down for 0.5-3 s (mock)"
                    }
                }
            }
        };
        *injected.entry(name).or_default() += 1;
        say(format!(
            "fault: {name}; {} events committed so far",
            produced.load(Ordering::Relaxed)
        ));
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let committed = produced.load(Ordering::Relaxed);
    say(format!(
        "producers stopped: {committed} events committed ({} producer transactions failed and were not committed)",
        errors.load(Ordering::Relaxed)
    ));

    // Let the relay and consumer finish, bounded.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        relays.iter_mut().for_each(Role::sample_rss);
        let (pending, applied): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), (SELECT count(DISTINCT event_id) FROM soak_effects)",
        )
        .fetch_one(&pool)
        .await?;
        if pending == 0 && applied as u64 >= committed {
            break;
        }
        if Instant::now() > deadline {
            say(format!("gave up waiting: {pending} rows still in the outbox, {applied} of {committed} applied"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    relays.iter_mut().for_each(Role::terminate);
    consumer.terminate();

    let v = check::check(&pool, &cli.kafka_brokers, &topic).await?;
    // A relay fault repeats at most the batch that relay had in flight; a
    // pg_terminate_backend or a broker fault hits every relay at once.
    let terminations = injected
        .get("pg_terminate_backend (relay)")
        .copied()
        .unwrap_or(0) as usize;
    let relay_faults = relay_kills + (terminations + broker_faults) * load.relays;
    let bound = relay_faults * RELAY_BATCH;
    let within = v.duplicated_in_kafka as usize <= bound;
    println!();
    println!("== soak result (topic {topic}) ==");
    for (name, n) in &injected {
        println!("faults injected: {n:>4} × {name}");
    }
    println!("{v}");
    println!(
        "duplicate bound:            {bound} ({relay_faults} relay faults × batch {RELAY_BATCH}){}",
        if within { "" } else { " EXCEEDED" }
    );
    println!(
        "peak RSS sampled: relay {} MiB, consumer {} MiB",
        relays.iter().map(|r| r.peak_rss_kib()).max().unwrap_or(0) / 1024,
        consumer.peak_rss_kib() / 1024
    );
    let ok = v.ok() && within;
    if let Some(path) = &load.json {
        let result = serde_json::json!({
            "topic": topic,
            "faults": injected,
            "verdict": v,
            "duplicate_bound": bound,
            "duplicates_within_bound": within,
            "peak_rss_mib": {
                "relay": relays.iter().map(|r| r.peak_rss_kib()).max().unwrap_or(0) / 1024,
                "consumer": consumer.peak_rss_kib() / 1024,
            },
            "guarantees_held": ok,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write the result to {}", path.display()))?;
    }
    println!(
        "verdict:                    {}",
        if ok {
            "guarantees held"
        } else {
            "GUARANTEE BROKEN"
        }
    );
    if let Some(broker::Own::Kafka(mut broker)) = own {
        if ok {
            broker.remove();
        } else {
            broker.keep();
            println!(
                "the soak's broker log and data are kept: {}",
                broker.log().display()
            );
        }
    }
    Ok(ok)
}

/// Drops and creates the run's database with every schema the soak uses.
async fn fresh_database(
    cli: &Cli,
    server: PgConnectOptions,
    connections: u32,
) -> anyhow::Result<PgPool> {
    let db = test_kit::db::recreate(&server, &cli.database).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(db)
        .await?;
    outbox_core::migrate(&pool).await?;
    consumer_kit::migrate(&pool).await?;
    sqlx::raw_sql(check::SCHEMA).execute(&pool).await?;
    Ok(pool)
}

/// Fills the outbox with `rows` rows, starts the relay, and samples its RSS
/// every 250 ms until the backlog is drained.
async fn memory(cli: &Cli, server: PgConnectOptions, rows: i64) -> anyhow::Result<bool> {
    let started = Instant::now();
    let say = |m: String| println!("[{:>6.1}s] {m}", started.elapsed().as_secs_f64());
    let pool = fresh_database(cli, server, 4).await?;
    let topic = format!(
        "soak-mem-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    test_kit::topic::create(&cli.kafka_brokers, &topic, 3).await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'soak', 'k' || (g % 1000), 'soak.row', $1, \
                jsonb_build_object('seq', g, 'pad', repeat('x', 170)) \
         FROM generate_series(1, $2) g ORDER BY g",
    )
    .bind(&topic)
    .bind(rows)
    .execute(&pool)
    .await?;
    pool.execute("VACUUM ANALYZE outbox").await?;
    say(format!("{rows} rows in the outbox; starting the relay"));
    let mut relay = Role::start(cli, &["relay", "--batch-size", "1000"])?;
    // (one relay: this measures one process's memory)
    let mut rss: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let drain_started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = test_kit::process::rss_kib(relay.child.id()).unwrap_or(0);
        if now > 0 {
            rss.push(now);
        }
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        if rss.len() % 20 == 0 {
            say(format!(
                "{pending} rows left; relay RSS {} MiB",
                rss.last().copied().unwrap_or(0) / 1024
            ));
        }
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not drain within 30 minutes"
        );
    }
    let drained_in = drain_started.elapsed();
    relay.terminate();
    anyhow::ensure!(!rss.is_empty(), "no RSS samples");
    let tenth = rss.len().div_ceil(10);
    let early = rss[..tenth].iter().copied().max().unwrap_or(0);
    let late = rss[rss.len() - tenth..].iter().copied().max().unwrap_or(0);
    let peak = rss.iter().copied().max().unwrap_or(0);
    let flat = late <= early + early / 2;
    println!();
    println!(
        "== relay memory while draining {rows} rows ({} samples, every 250 ms) ==",
        rss.len()
    );
    println!("RSS, first tenth of the drain: {} MiB", early / 1024);
    println!("RSS, last tenth of the drain:  {} MiB", late / 1024);
    println!("RSS, peak:                     {} MiB", peak / 1024);
    println!(
        "drain time:                    {:.1} s",
        drained_in.as_secs_f64()
    );
    println!(
        "verdict:                       {}",
        if flat {
            "flat (last tenth within 1.5x of the first)"
        } else {
            "GROWING"
        }
    );
    Ok(flat)
}

async fn produce_one(pool: &PgPool, topic: &str, key: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let seq: i64 =
        sqlx::query_scalar("UPDATE soak_keys SET seq = seq + 1 WHERE key = $1 RETURNING seq")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
    let event = NewEvent::new("soak", key, "soak.event")
        .topic(topic)
        .json_payload(&serde_json::json!({ "key": key, "seq": seq }))?;
    sqlx::query("INSERT INTO soak_ledger (event_id, key, seq) VALUES ($1, $2, $3)")
        .bind(event.event_id)
        .bind(key)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    append(&mut *tx, &event).await?;
    tx.commit().await?;
    Ok(())
}
