//! Command-line interface: flags and environment variables, mapped onto the
//! library's typed configuration.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox_relay::{AfterPublish, PoisonPolicy, RelayConfig};
use uuid::Uuid;

/// Publishes committed PostgreSQL outbox events to Kafka or RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    /// PostgreSQL connection URL of the database holding the outbox table.
    /// TLS options (sslmode, sslrootcert, ...) go in the URL. Never logged.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// DATABASE_URL goes through a connection pooler in transaction mode
    /// (PgBouncer pool_mode=transaction, and the like): no cached prepared
    /// statements, no LISTEN (poll instead), no extra_float_digits startup
    /// parameter. Run `migrate` against PostgreSQL directly.
    #[arg(long, env = "RELAY_TRANSACTION_POOLER", global = true)]
    pub transaction_pooler: bool,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Apply the outbox migrations (idempotent).
    Migrate,
    /// Print the backlog (pending rows, oldest pending age, failed rows), the
    /// running relays, and each partition's owner and backlog.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also print each relay's last checkpoint (exactly-once mode),
        /// read from Kafka.
        #[arg(long)]
        exactly_once: bool,
        /// With --exactly-once: Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        kafka_brokers: String,
        /// With --exactly-once: the checkpoint topic.
        #[arg(long, env = "RELAY_CHECKPOINT_TOPIC", default_value = outbox_relay::checkpoint::DEFAULT_TOPIC)]
        checkpoint_topic: String,
        /// With --exactly-once: librdkafka property `key=value` (TLS, SASL).
        #[arg(long = "kafka-property", env = "RELAY_KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property, hide_env_values = true)]
        kafka_properties: Vec<(String, String)>,
    },
    /// Inspect and act on rows that failed permanently.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// Kafka topic helpers (the relay never creates topics by itself).
    #[command(subcommand)]
    Topic(TopicCommand),
    /// The logical replication slot that a WAL source reads: create,
    /// inspect, drop. Needs a direct connection to PostgreSQL (no pooler).
    #[command(subcommand)]
    Slot(SlotCommand),
}

/// `slot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// Check wal_level, the role's REPLICATION attribute and a replication
    /// connection, then create the publication on the outbox table and the
    /// slot (pgoutput), each only if missing. Idempotent.
    Create {
        #[command(flatten)]
        names: SlotNames,
    },
    /// Print the slot: who reads it, the confirmed position, the WAL it
    /// keeps on disk and the lag.
    Status {
        #[command(flatten)]
        names: SlotNames,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot, freeing the WAL it keeps (decommissioning). Refused
    /// while a relay reads it: stop the relays first. Events written since
    /// the slot's confirmed position are not published.
    Drop {
        #[command(flatten)]
        names: SlotNames,
        /// Drop the publication too.
        #[arg(long)]
        with_publication: bool,
    },
}

/// The slot's and the publication's names.
#[derive(Debug, Args)]
pub struct SlotNames {
    /// Replication slot name (lower-case letters, digits, underscores).
    #[arg(long, env = "RELAY_SLOT", default_value = outbox_relay::slot::DEFAULT_SLOT)]
    pub slot: String,
    /// Publication name (on the outbox table).
    #[arg(long, env = "RELAY_PUBLICATION", default_value = outbox_relay::slot::DEFAULT_PUBLICATION)]
    pub publication: String,
}

/// `topic` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic (succeeds if it already exists).
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Replication factor.
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// Kafka bootstrap servers, comma-separated.
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        kafka_brokers: String,
        /// Extra librdkafka property, `key=value` (repeatable).
        #[arg(long = "kafka-property", env = "RELAY_KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property, hide_env_values = true)]
        kafka_properties: Vec<(String, String)>,
    },
}

/// `failed` subcommands.
#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// List failed rows, oldest first.
    List {
        /// Most rows to show.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put failed rows back to pending, to be published again in order.
    Retry(#[command(flatten)] SelectArgs),
    /// Delete failed rows for good (unblocks their keys).
    Discard(#[command(flatten)] SelectArgs),
}

/// Which failed rows to act on.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SelectArgs {
    /// Row ids (the `id` column), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub id: Vec<i64>,
    /// Event ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub event_id: Vec<Uuid>,
    /// Every failed row.
    #[arg(long)]
    pub all: bool,
}

/// `run` flags. Defaults match [`RelayConfig::default`].
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// Where events go: `kafka` (the brokers of --kafka-brokers), or
    /// `rabbitmq` (durable topic exchanges named like the topics, at
    /// --amqp-url).
    #[arg(long, env = "RELAY_SINK", value_enum, default_value_t = SinkArg::Kafka)]
    pub sink: SinkArg,

    /// With --sink rabbitmq: the broker, amqp://user:password@host:port/vhost
    /// (amqps:// for TLS). Never logged.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub amqp_url: String,

    /// With --sink rabbitmq: each message's routing key; `{event_type}`,
    /// `{aggregate_type}` and `{aggregate_id}` are replaced.
    #[arg(long, env = "RELAY_AMQP_ROUTING_KEY", default_value = "{event_type}")]
    pub amqp_routing_key: String,

    /// Extra librdkafka producer property, `key=value` (repeatable; TLS and
    /// SASL settings go here, e.g. security.protocol=SASL_SSL). The env var
    /// takes a comma-separated list. Values are never logged.
    #[arg(long = "kafka-property", env = "RELAY_KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property, hide_env_values = true)]
    pub kafka_properties: Vec<(String, String)>,

    /// Most rows claimed and published per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,

    /// Polling fallback interval (e.g. 500ms, 2s).
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Delayed events: how often to look for newly inserted ones due
    /// before the earliest known (the relay also wakes at that due time).
    #[arg(long, env = "RELAY_DELAYED_CHECK_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub delayed_check_interval: Duration,

    /// Do not LISTEN for the outbox trigger's notifications; poll only.
    #[arg(long, env = "RELAY_NO_LISTEN")]
    pub no_listen: bool,

    /// Topic for rows without an explicit topic; `{aggregate_type}` is replaced.
    #[arg(long, env = "RELAY_TOPIC_TEMPLATE", default_value = "{aggregate_type}")]
    pub topic_template: String,

    /// CloudEvents source (`ce_source`) for events that do not set one.
    /// (Called --source before the WAL source took that name.)
    #[arg(long, env = "RELAY_CE_SOURCE", default_value = "outbox-relay")]
    pub ce_source: String,

    /// Where events come from: `poll` claims rows from the outbox table;
    /// `wal` reads the outbox table's inserts and table-less events
    /// (outbox_emit) from a logical replication slot, in commit order
    /// (create it first: `outbox-relay slot create`). The CloudEvents
    /// source is --ce-source.
    #[arg(long, env = "RELAY_SOURCE", value_enum, default_value_t = SourceArg::Poll)]
    pub source: SourceArg,

    /// With --source wal: the slot and the publication.
    #[command(flatten)]
    pub slot: SlotNames,

    /// With --source wal: how often to write a heartbeat into the WAL (so
    /// the slot advances while this database is idle) and read the slot's
    /// figures into the metrics.
    #[arg(long, env = "RELAY_WAL_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub wal_heartbeat: Duration,

    /// With --source wal: warn when the slot keeps more WAL than this many
    /// MiB (a stopped or stuck reader makes PostgreSQL keep WAL until the
    /// disk fills).
    #[arg(long, env = "RELAY_WAL_RETAINED_WARN_MIB", default_value_t = 1024)]
    pub wal_retained_warn_mib: u64,

    /// What to do with a row once Kafka acknowledged it.
    #[arg(long, env = "RELAY_AFTER_PUBLISH", value_enum, default_value_t = AfterPublishArg::Delete)]
    pub after_publish: AfterPublishArg,

    /// With `--after-publish mark`: how long published rows are kept.
    #[arg(long, env = "RELAY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// With `--after-publish delete`: how long published event ids are
    /// remembered, so that an insert reusing one fails; 0 turns it off.
    #[arg(long, env = "RELAY_REMEMBER_PUBLISHED", default_value = "7d", value_parser = humantime::parse_duration)]
    pub remember_published: Duration,

    /// What a permanently failed row does to later rows of its key.
    #[arg(long, env = "RELAY_POISON_POLICY", value_enum, default_value_t = PoisonArg::BlockKey)]
    pub poison_policy: PoisonArg,

    /// How long a batch waits for delivery reports (message.timeout.ms).
    #[arg(long, env = "RELAY_PUBLISH_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to let the batch in flight finish and flush.
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "RELAY_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub http_addr: SocketAddr,

    /// Make each claim's commit wait for its WAL flush. By default it does
    /// not: a PostgreSQL crash may then republish the last ~600 ms of
    /// batches (duplicates, never loss).
    #[arg(long, env = "RELAY_SYNC_COMMIT")]
    pub sync_commit: bool,

    /// A name for this relay in `status` and logs (default: the host name).
    /// The relay's id is `<name>-<pid>-<random>`, new at every start.
    #[arg(long, env = "RELAY_NAME")]
    pub relay_name: Option<String>,

    /// How long this relay's lease on its partitions lasts without a
    /// heartbeat: if it dies, others take its partitions over after this.
    #[arg(long, env = "RELAY_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// How often the relay renews its lease and rebalances partitions (at
    /// most half the lease TTL).
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Apply the outbox migrations before starting.
    #[arg(long, env = "RELAY_MIGRATE")]
    pub migrate: bool,

    /// Publish each batch in a Kafka transaction together with this relay's
    /// checkpoint: `read_committed` consumers then see every event exactly
    /// once, whatever crashes or hand-overs happen. Needs brokers with
    /// transactions (docs/architecture.md, "Exactly-once into Kafka").
    #[arg(long, env = "RELAY_EXACTLY_ONCE")]
    pub exactly_once: bool,

    /// With --exactly-once: the compacted topic of the relays' checkpoints
    /// (created if missing).
    #[arg(long, env = "RELAY_CHECKPOINT_TOPIC", default_value = outbox_relay::checkpoint::DEFAULT_TOPIC)]
    pub checkpoint_topic: String,

    /// With --exactly-once: the transactional.id prefix (the relay id
    /// follows it; with --source wal, `slot-` and the slot's name); with
    /// ACLs, grant WRITE and DESCRIBE on this prefix.
    #[arg(
        long,
        env = "RELAY_TRANSACTIONAL_ID_PREFIX",
        default_value = "outbox-relay-"
    )]
    pub transactional_id_prefix: String,

    /// With --exactly-once: how long the broker lets a transaction stay
    /// open before aborting it (transaction.timeout.ms); at least the
    /// publish timeout.
    #[arg(long, env = "RELAY_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub transaction_timeout: Duration,

    /// Fault injection for the soak: abort the process right after a Kafka
    /// commit, before the database commit, once in this many commits.
    #[arg(long, hide = true)]
    pub test_crash_after_kafka_commit: Option<u32>,
}

/// `--source` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceArg {
    /// Claim rows from the outbox table (default).
    Poll,
    /// Read a logical replication slot.
    Wal,
}

/// `--sink` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkArg {
    /// Apache Kafka (default).
    Kafka,
    /// RabbitMQ.
    Rabbitmq,
}

/// `--after-publish` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AfterPublishArg {
    /// Delete the row (default).
    Delete,
    /// Keep it as published for `--retention`.
    Mark,
}

/// `--poison-policy` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PoisonArg {
    /// Later rows of the key wait behind the failed row (keeps order).
    BlockKey,
    /// Later rows of the key flow on (gives up order for that key).
    SkipRow,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl RunArgs {
    /// The library configuration these flags describe. `transaction_pooler`
    /// is the global flag.
    pub fn to_config(&self, transaction_pooler: bool) -> RelayConfig {
        let name = self
            .relay_name
            .clone()
            .or_else(host_name)
            .unwrap_or_else(|| "relay".into());
        RelayConfig {
            brokers: self.kafka_brokers.clone(),
            kafka_properties: self.kafka_properties.iter().cloned().collect(),
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            delayed_check_interval: self.delayed_check_interval,
            listen: !self.no_listen,
            topic_template: self.topic_template.clone(),
            default_source: self.ce_source.clone(),
            after_publish: match self.after_publish {
                AfterPublishArg::Delete => AfterPublish::Delete,
                AfterPublishArg::Mark => AfterPublish::Mark {
                    retention: self.retention,
                },
            },
            remember_published: self.remember_published,
            poison_policy: match self.poison_policy {
                PoisonArg::BlockKey => PoisonPolicy::BlockKey,
                PoisonArg::SkipRow => PoisonPolicy::SkipRow,
            },
            publish_timeout: self.publish_timeout,
            shutdown_timeout: self.shutdown_timeout,
            synchronous_commit: self.sync_commit,
            relay_id: Some(outbox_relay::config::new_relay_id(&name)),
            lease_ttl: self.lease_ttl,
            heartbeat_interval: self.heartbeat_interval,
            transaction_pooler,
            exactly_once: self.exactly_once,
            checkpoint_topic: self.checkpoint_topic.clone(),
            transactional_id_prefix: self.transactional_id_prefix.clone(),
            transaction_timeout: self.transaction_timeout,
            crash_after_kafka_commit: self.test_crash_after_kafka_commit.map(|n| {
                outbox_relay::config::CrashAfterCommit {
                    one_in: n.max(1),
                    abort_process: true,
                }
            }),
            rabbitmq: (self.sink == SinkArg::Rabbitmq).then(|| {
                let mut sink = outbox_relay::RabbitMqSink::new(self.amqp_url.clone());
                sink.routing_key = self.amqp_routing_key.clone();
                sink
            }),
            ..RelayConfig::default()
        }
    }
}

/// The machine's host name, from `HOSTNAME` or `/etc/hostname`.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
