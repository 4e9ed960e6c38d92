//! `outbox-dlq`: list, inspect and replay the dead letters consumer-kit
//! wrote, and the keys parked behind them (`parked …`, which reads the
//! consumer's database). Build it with `cargo build -p consumer-kit
//! --features cli`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use consumer_kit::{
    dead_letter::{DeadLetter, DeadLetterFilter},
    replay,
};
use uuid::Uuid;

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

// After the macro: the module prints with `out!` too.
#[path = "outbox-dlq/saga.rs"]
mod saga;

/// List, inspect and replay dead letters written by consumer-kit.
///
/// Reading never commits anything and uses no consumer group, so it can be
/// run at any time. Replayed events keep their event id: a consumer group
/// that already applied one skips it.
#[derive(Debug, Parser)]
#[command(name = "outbox-dlq", version)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    kafka_brokers: String,
    /// A librdkafka property, `key=value` (TLS, SASL, ...); repeatable.
    /// Values are never printed.
    #[arg(long = "kafka-property", env = "DLQ_KAFKA_PROPERTIES", value_delimiter = ',', global = true, value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
    /// Where the dead letters are: `kafka` (a dead-letter topic) or
    /// `rabbitmq` (a group's dead-letter queue, `<queue>.dlq`, given where
    /// the commands below say topic).
    #[arg(long, value_enum, default_value_t = Broker::Kafka, global = true)]
    broker: Broker,
    /// The RabbitMQ broker, for `--broker rabbitmq`. Only its host and port
    /// are ever printed.
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
enum Broker {
    Kafka,
    Rabbitmq,
}

/// Where to read dead letters from.
enum Source {
    Kafka {
        brokers: String,
        props: BTreeMap<String, String>,
    },
    RabbitMq {
        url: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One line per dead letter: position, event, kind, reason.
    List {
        /// The dead-letter topic, such as `orders.dlq`.
        topic: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about the matching dead letters: headers and payload.
    Show {
        /// The dead-letter topic.
        topic: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Send the matching dead letters back to their original topic.
    Replay {
        /// The dead-letter topic.
        topic: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Replay every dead letter of the topic (required when no filter is given).
        #[arg(long)]
        all: bool,
        /// Only print what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keys parked behind a dead-lettered event (park-key ordering): list
    /// them, release one (replay its blocking event), or discard its
    /// blocking event. Reads and writes the consumer's database.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Saga instances (consumer-kit's sagas): list them, show one, retry a
    /// stuck one (its timeouts fire now) or fail one. Reads and writes the
    /// saga's database.
    #[command(subcommand)]
    Saga(saga::SagaCommand),
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// One line per blocked key: topic, key, blocking event, parked events, since, reason.
    List {
        #[command(flatten)]
        db: GroupArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replays the key's blocking event from the dead-letter topic: once the
    /// consumer applies it, it applies the parked events after it, in order.
    Release {
        #[command(flatten)]
        key: KeyArgs,
        /// The dead-letter topic holding the blocking event (default `<topic>.dlq`).
        #[arg(long)]
        dlq_topic: Option<String>,
    },
    /// Gives up on the key's blocking event (it stays in the dead-letter
    /// topic): the consumer applies the parked events without it, in order,
    /// within 5 s.
    Discard {
        #[command(flatten)]
        key: KeyArgs,
    },
}

#[derive(Debug, Args)]
struct GroupArgs {
    /// The consumer's database (where `consumer_kit_parked_keys` is).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
}

#[derive(Debug, Args)]
struct KeyArgs {
    #[command(flatten)]
    db: GroupArgs,
    /// The topic the key's events come from.
    #[arg(long)]
    topic: String,
    /// The blocked key (the record key).
    #[arg(long)]
    key: String,
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// Only this event type (`ce_type`).
    #[arg(long)]
    event_type: Option<String>,
    /// Only this event id (`ce_id`).
    #[arg(long)]
    event_id: Option<Uuid>,
    /// Only dead-lettered at or after this time: RFC 3339 (`2026-11-23T10:00:00Z`) or an age (`2h`, `3d`).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only dead-lettered before this time: RFC 3339 or an age.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            event_type: self.event_type.clone(),
            event_id: self.event_id,
            since: self.since,
            until: self.until,
        }
    }

    fn is_empty(&self) -> bool {
        self.filter() == DeadLetterFilter::default()
    }
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "expected key=value, got {:?}",
            s.split('=').next().unwrap_or("")
        )),
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor an age (90m, 2h, 3d)")
    })?;
    let age = chrono::Duration::from_std(age).map_err(|e| e.to_string())?;
    Ok(Utc::now() - age)
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on bad flags
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: log files and journals get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Command::Replay { filter, all, .. } = &cli.command {
        if filter.is_empty() && !all {
            eprintln!("error: replay needs a filter (--event-type, --event-id, --since, --until) or --all");
            return ExitCode::from(2);
        }
    }
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let props: BTreeMap<String, String> = cli.kafka_properties.into_iter().collect();
    let brokers = cli.kafka_brokers;
    let source = match cli.broker {
        Broker::Kafka => Source::Kafka {
            brokers: brokers.clone(),
            props: props.clone(),
        },
        Broker::Rabbitmq => Source::RabbitMq { url: cli.amqp_url },
    };
    match cli.command {
        Command::Saga(cmd) => return saga::run(cmd).await,
        Command::Parked(cmd) => {
            if cli.broker == Broker::Rabbitmq {
                anyhow::bail!(
                    "parked keys on RabbitMQ: not yet (order through dead letters needs Single \
                     Active Consumer and park-key there); list the dead letters with \
                     `outbox-dlq --broker rabbitmq list <queue>.dlq`"
                );
            }
            return parked(cmd, &brokers, &props).await;
        }
        Command::List {
            topic,
            filter,
            json,
        } => {
            let letters = read(&source, &topic, &filter).await?;
            for l in &letters {
                if json {
                    out!("{}", serde_json::to_string(&summary(l))?);
                } else {
                    out!(
                        "{}/{}@{}  {}  {}  {}  {}  {}",
                        l.dlq_topic,
                        l.dlq_partition,
                        l.dlq_offset,
                        l.dead_lettered_at
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_else(|| "-".into()),
                        l.event_id
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| "-".into()),
                        l.event_type.as_deref().unwrap_or("-"),
                        l.kind.as_deref().unwrap_or("-"),
                        l.reason.as_deref().unwrap_or("-"),
                    );
                }
            }
            if !json {
                eprintln!("{} dead letter(s) in {topic}", letters.len());
            }
        }
        Command::Show { topic, filter } => {
            let letters = read(&source, &topic, &filter).await?;
            for l in &letters {
                let mut v = summary(l);
                let headers: BTreeMap<&str, String> = l
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_deref().map(text).unwrap_or_default()))
                    .collect();
                v["headers"] = serde_json::to_value(headers)?;
                v["key"] = l.key.as_deref().map(text).into();
                v["payload"] = match l.payload.as_deref() {
                    None => serde_json::Value::Null,
                    Some(p) => serde_json::from_slice(p).unwrap_or_else(|_| text(p).into()),
                };
                out!("{}", serde_json::to_string_pretty(&v)?);
            }
            eprintln!("{} dead letter(s) matched in {topic}", letters.len());
        }
        Command::Replay {
            topic,
            filter,
            dry_run,
            ..
        } => {
            let letters = read(&source, &topic, &filter).await?;
            for l in &letters {
                out!(
                    "{} {}/{}@{} -> {} ({})",
                    if dry_run { "would replay" } else { "replaying" },
                    l.dlq_topic,
                    l.dlq_partition,
                    l.dlq_offset,
                    l.original_topic.as_deref().unwrap_or("?"),
                    l.event_id
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "no event id".into()),
                );
            }
            if dry_run {
                eprintln!(
                    "dry run: {} dead letter(s) would be replayed",
                    letters.len()
                );
            } else {
                let report = match &source {
                    Source::Kafka { brokers, props } => {
                        replay::replay(brokers, props, &letters).await.context(
                            "replay failed; nothing is lost: the dead letters stay in their topic",
                        )?
                    }
                    // Each is removed from the queue once its copy is confirmed.
                    Source::RabbitMq { url } => {
                        consumer_kit::rabbitmq::dead_letters(url, &topic, &filter.filter(), true)
                            .await
                            .map_err(anyhow::Error::msg)
                            .context(
                                "replay stopped; a dead letter not replayed stays in its queue",
                            )?
                            .1
                    }
                };
                eprintln!(
                    "replayed {} dead letter(s) to their original topics",
                    report.replayed
                );
            }
        }
    }
    Ok(())
}

async fn connect(db: &GroupArgs) -> anyhow::Result<sqlx::PgPool> {
    connect_to(&db.database_url, "the consumer's database").await
}

/// One connection to `what` (named in errors), from `DATABASE_URL`.
async fn connect_to(url: &str, what: &str) -> anyhow::Result<sqlx::PgPool> {
    let opts: sqlx::postgres::PgConnectOptions = url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .with_context(|| format!("cannot connect to {what} (DATABASE_URL)"))
}

async fn parked(
    cmd: ParkedCommand,
    brokers: &str,
    props: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    use consumer_kit::park;
    match cmd {
        ParkedCommand::List { db, json } => {
            let pool = connect(&db).await?;
            let keys = park::list(&pool, &db.group).await?;
            for k in &keys {
                let blocking = k
                    .blocking_event_id
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "discarded (applying the parked events)".into());
                if json {
                    out!(
                        "{}",
                        serde_json::json!({
                            "topic": k.topic, "key": k.key, "partition": k.partition,
                            "blocking_event_id": k.blocking_event_id,
                            "blocking_position": k.blocking_position,
                            "blocking_reason": k.blocking_reason,
                            "blocked_at": k.blocked_at, "parked_events": k.parked_events,
                        })
                    );
                } else {
                    out!(
                        "{}  {}  blocked by {} ({})  {} parked  since {}  {}",
                        k.topic,
                        k.key,
                        blocking,
                        k.blocking_position,
                        k.parked_events,
                        k.blocked_at.to_rfc3339(),
                        k.blocking_reason
                    );
                }
            }
            if !json {
                eprintln!("{} parked key(s) in group {}", keys.len(), db.group);
            }
        }
        ParkedCommand::Release { key, dlq_topic } => {
            let pool = connect(&key.db).await?;
            let found = park::list(&pool, &key.db.group)
                .await?
                .into_iter()
                .find(|k| k.topic == key.topic && k.key == key.key)
                .with_context(|| {
                    format!(
                        "key {:?} of {} is not parked in group {}",
                        key.key, key.topic, key.db.group
                    )
                })?;
            let Some(event_id) = found.blocking_event_id else {
                anyhow::bail!(
                    "the blocking event of key {:?} was discarded; the consumer is applying its parked events",
                    key.key
                );
            };
            let dlq = dlq_topic.unwrap_or_else(|| format!("{}.dlq", key.topic));
            let filter = DeadLetterFilter {
                event_id: Some(event_id),
                ..Default::default()
            };
            let letters = replay::read(brokers, props, &dlq, &filter)
                .await
                .with_context(|| format!("cannot read dead letters from {dlq} at {brokers}"))?;
            let letter = letters.last().with_context(|| {
                format!("event {event_id} is not in {dlq} (expired, or another dead-letter topic: --dlq-topic)")
            })?;
            replay::replay(brokers, props, std::slice::from_ref(letter))
                .await
                .context("replay failed; nothing changed")?;
            out!(
                "replayed {event_id} to {}; the consumer applies it, then the {} event(s) parked behind key {:?}",
                key.topic,
                found.parked_events,
                key.key
            );
        }
        ParkedCommand::Discard { key } => {
            let pool = connect(&key.db).await?;
            if !park::discard(&pool, &key.db.group, &key.topic, &key.key).await? {
                anyhow::bail!(
                    "key {:?} of {} is not parked in group {}",
                    key.key,
                    key.topic,
                    key.db.group
                );
            }
            out!(
                "discarded the blocking event of key {:?}; the consumer applies the events parked behind it within 5 s",
                key.key
            );
        }
    }
    Ok(())
}

async fn read(
    source: &Source,
    topic: &str,
    filter: &FilterArgs,
) -> anyhow::Result<Vec<DeadLetter>> {
    match source {
        Source::Kafka { brokers, props } => replay::read(brokers, props, topic, &filter.filter())
            .await
            .with_context(|| format!("cannot read dead letters from {topic} at {brokers}")),
        Source::RabbitMq { url } => {
            consumer_kit::rabbitmq::dead_letters(url, topic, &filter.filter(), false)
                .await
                .map(|(letters, _)| letters)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("cannot read dead letters from queue {topic}"))
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn summary(l: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "dlq_topic": l.dlq_topic,
        "dlq_partition": l.dlq_partition,
        "dlq_offset": l.dlq_offset,
        "event_id": l.event_id,
        "event_type": l.event_type,
        "kind": l.kind,
        "reason": l.reason,
        "attempts": l.attempts,
        "original_topic": l.original_topic,
        "original_partition": l.original_partition,
        "original_offset": l.original_offset,
        "original_routing_key": l.original_routing_key,
        "consumer_group": l.consumer_group,
        "dead_lettered_at": l.dead_lettered_at,
    })
}
