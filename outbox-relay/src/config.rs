//! [`RelayConfig`]: everything the relay needs, with documented defaults.
//!
//! The library never reads the environment; the binary maps flags and
//! environment variables onto this struct (see `outbox-relay run --help`).

use std::{collections::BTreeMap, time::Duration};

/// The relay's database connection settings, made in one place for the
/// relay and every CLI subcommand: `application_name` is `outbox-relay`
/// unless `connect` sets one (operators and the tests find the relay's
/// sessions by it), and through a transaction-mode pooler the
/// `extra_float_digits` startup parameter is left out (PgBouncer refuses
/// startup parameters it does not know).
pub fn connect_options(
    connect: sqlx::postgres::PgConnectOptions,
    transaction_pooler: bool,
) -> sqlx::postgres::PgConnectOptions {
    let connect = match connect.get_application_name() {
        Some(_) => connect,
        None => connect.application_name("outbox-relay"),
    };
    if transaction_pooler {
        connect.extra_float_digits(None)
    } else {
        connect
    }
}

/// A new relay id: `<name>-<pid>-<6 hex digits>`, new at every start (see
/// [`RelayConfig::relay_id`]).
pub fn new_relay_id(name: &str) -> String {
    format!(
        "{name}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// What happens to an outbox row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AfterPublish {
    /// Delete the row in the claiming statement (`DELETE … RETURNING`). The
    /// default: the table stays small and nothing needs cleaning.
    #[default]
    Delete,
    /// Keep the row with `status = 'published'` and `published_at`, and delete
    /// it after the given retention period.
    Mark {
        /// How long published rows are kept.
        retention: Duration,
    },
}

/// What a permanently failed row does to later rows of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoisonPolicy {
    /// Later rows of the key wait until the failed row is retried or
    /// discarded (`outbox-relay failed retry|discard`). Keeps per-key order.
    /// The default.
    #[default]
    BlockKey,
    /// Later rows of the key flow on; the failed row is parked. Gives up
    /// per-key order for that key in exchange for availability.
    SkipRow,
}

/// Relay settings. [`RelayConfig::default`] gives the documented defaults;
/// only the Kafka brokers have no useful default outside development.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Kafka bootstrap servers (`bootstrap.servers`). Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Extra librdkafka producer properties (TLS, SASL, tuning). Applied after
    /// the relay's own settings, so they win. Default empty.
    pub kafka_properties: BTreeMap<String, String>,
    /// Most rows claimed and published per batch. Default 1000.
    pub batch_size: usize,
    /// Polling fallback: how often the relay looks for rows when no
    /// notification arrives. Default 500 ms.
    pub poll_interval: Duration,
    /// Delayed events (rows with a `not_before` time): how often the relay
    /// looks for newly inserted ones that are due before the earliest it
    /// knows of. It also wakes at that earliest due time, so an event is
    /// published when due, at most this late if it was inserted due within
    /// this interval. Default 1 s.
    pub delayed_check_interval: Duration,
    /// Whether to LISTEN for the outbox trigger's notifications. Default true.
    pub listen: bool,
    /// The notification channel. Default `outbox`.
    pub channel: String,
    /// Topic for rows whose `topic` column is null: a template where
    /// `{aggregate_type}` is replaced by the row's aggregate type. Default
    /// `{aggregate_type}`.
    pub topic_template: String,
    /// CloudEvents `source` for rows that do not set one. Default `outbox-relay`.
    pub default_source: String,
    /// In [`AfterPublish::Delete`] mode, how long the id of a published
    /// (deleted) row is remembered in `outbox_published_ids`, so that an
    /// insert reusing it fails in the producer's transaction instead of
    /// being published again and dropped by every consumer as a duplicate.
    /// Zero: ids are not remembered; uniqueness then holds only among the
    /// rows in `outbox`. In mark mode the kept rows play this part, for the
    /// retention period. Default 7 days (consumer-kit's `processed_ttl`).
    pub remember_published: Duration,
    /// Delete or mark rows after publishing. Default [`AfterPublish::Delete`].
    pub after_publish: AfterPublish,
    /// Poison-row policy. Default [`PoisonPolicy::BlockKey`].
    pub poison_policy: PoisonPolicy,
    /// How long one batch may wait for its delivery reports before its
    /// unacknowledged rows count as failed transiently (librdkafka's
    /// `message.timeout.ms`). Default 30 s.
    pub publish_timeout: Duration,
    /// First retry delay after a transient failure (broker or database
    /// unavailable); doubles up to [`RelayConfig::max_backoff`]. Default 200 ms.
    pub min_backoff: Duration,
    /// Longest retry delay. Default 30 s.
    pub max_backoff: Duration,
    /// On shutdown, how long to wait for the batch in flight and the producer
    /// flush. Default 10 s.
    pub shutdown_timeout: Duration,
    /// Whether a claim's `COMMIT` waits for its WAL to be flushed. Default
    /// false (`synchronous_commit = off` for claim transactions only): the
    /// relay's cycle is shorter and it adds no fsync to the producers' load.
    /// The only risk is a PostgreSQL crash, which can undo the claims of the
    /// last moments (at most 3 × `wal_writer_delay`, 600 ms by default).
    /// Those rows are pending again and are published again: duplicates, never
    /// loss, since Kafka had acknowledged them before the commit.
    pub synchronous_commit: bool,
    /// How often the backlog gauges (pending rows, oldest pending age,
    /// failed rows, per partition) are refreshed. Default 5 s. On a large
    /// backlog the refresh waits longer, so that its queries take at most
    /// 5% of the time (20 s after a refresh that took 1 s).
    pub stats_interval: Duration,
    /// This relay's id in `outbox_relays` and as the owner of its
    /// partitions. Must be unique among running relays. Default `None`: a
    /// generated `relay-<pid>-<random>`.
    pub relay_id: Option<String>,
    /// How long a relay's lease lasts without a heartbeat. When a relay dies,
    /// its partitions are taken over after at most this plus one
    /// [`RelayConfig::heartbeat_interval`]. With a WAL source it is the
    /// lease on the slot: a reader that froze or vanished is replaced after
    /// at most this plus a second. Default 10 s.
    pub lease_ttl: Duration,
    /// How often the relay renews its lease and rebalances partitions (with
    /// a WAL source: renews its lease on the slot). At most half of
    /// [`RelayConfig::lease_ttl`]. Default 2 s.
    pub heartbeat_interval: Duration,
    /// The database URL goes through a connection pooler in transaction mode
    /// (PgBouncer `pool_mode = transaction`, and the like): claims use
    /// unnamed statements instead of cached prepared ones, LISTEN is not
    /// used (the relay polls every [`RelayConfig::poll_interval`]), and
    /// the `extra_float_digits` startup parameter is not sent. Default false.
    pub transaction_pooler: bool,
    /// Publish each batch inside a Kafka transaction that also records the
    /// relay's progress (a [`crate::checkpoint::Checkpoint`]), so that
    /// `read_committed` consumers see every event exactly once, whatever
    /// crashes and hand-overs happen (`docs/architecture.md`, "Exactly-once
    /// into Kafka"). Needs brokers that support transactions. Default false.
    pub exactly_once: bool,
    /// With [`RelayConfig::exactly_once`]: the compacted topic holding each
    /// relay's checkpoint, created at start if missing (one partition,
    /// the broker's default replication factor). Default
    /// `outbox-relay-checkpoints`.
    pub checkpoint_topic: String,
    /// With [`RelayConfig::exactly_once`]: the producer's `transactional.id`
    /// is this prefix followed by the relay id (poll source), or by `slot-`
    /// and the slot's name (WAL source: every reader of a slot shares it,
    /// so a new reader fences the last one). With ACLs, grant `WRITE` and
    /// `DESCRIBE` on the prefixed `TransactionalId` resource. Default
    /// `outbox-relay-`.
    pub transactional_id_prefix: String,
    /// With [`RelayConfig::exactly_once`]: how long the broker lets a
    /// transaction stay open before it aborts it (librdkafka's
    /// `transaction.timeout.ms`). It bounds how long a relay that died
    /// mid-batch holds back `read_committed` readers of its partitions when
    /// no other relay fences it sooner, and it must outlast a broker
    /// failover. At least [`RelayConfig::publish_timeout`]. Default 60 s.
    pub transaction_timeout: Duration,
    /// Fault injection for tests and the soak: crash right after a Kafka
    /// commit, before the database commit. Not for production.
    #[doc(hidden)]
    pub crash_after_kafka_commit: Option<CrashAfterCommit>,
    /// A mutation for the soak checker's self-test: take partitions over
    /// from dead relays without fencing them or finishing their
    /// checkpoints (poll source), or give each reader of a slot its own
    /// transactional id, so that no reader fences the last one (WAL
    /// source). Breaks exactly-once; never set it otherwise.
    #[doc(hidden)]
    pub mutation_skip_fencing: bool,
    /// Read committed events from a logical replication slot instead of
    /// polling the outbox table (`--source wal`): see [`WalSource`]. Default
    /// `None` (poll).
    pub wal: Option<WalSource>,
    /// Publish to RabbitMQ instead of Kafka (`--sink rabbitmq`): see
    /// [`RabbitMqSink`]. Needs the cargo feature `rabbitmq`. Default `None`
    /// (Kafka).
    pub rabbitmq: Option<RabbitMqSink>,
}

/// The RabbitMQ sink (`--sink rabbitmq`): each event becomes a persistent
/// message on the durable topic exchange named by its topic (the row's
/// `topic`, or [`RelayConfig::topic_template`]), confirmed by the broker
/// before its row is done. docs/rabbitmq.md has the message mapping.
#[derive(Clone)]
#[non_exhaustive]
pub struct RabbitMqSink {
    /// The broker, `amqp://user:password@host:port/vhost` (`amqps://` for
    /// TLS). Never logged: messages name the host, port and vhost only.
    pub url: String,
    /// The routing key of each message: `{event_type}`,
    /// `{aggregate_type}` and `{aggregate_id}` are replaced by the event's.
    /// Default `{event_type}`.
    pub routing_key: String,
    /// How long connecting may take before it counts as failed (and is
    /// tried again with back-off). Default 10 s.
    pub connect_timeout: Duration,
}

impl RabbitMqSink {
    /// The defaults, publishing to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            routing_key: "{event_type}".into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// `host:port/vhost`, for messages (no user or password).
    pub fn broker_for_logs(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(u) => format!(
                "{}:{}{}",
                u.host_str().unwrap_or("?"),
                u.port().unwrap_or(5672),
                if u.path().is_empty() { "/" } else { u.path() }
            ),
            Err(_) => "(an AMQP URL that does not parse)".into(),
        }
    }
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSink")
            .field("broker", &self.broker_for_logs())
            .field("routing_key", &self.routing_key)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// The WAL source (`--source wal`): the relay reads inserts into the outbox
/// table and table-less events (`outbox_emit`) from a logical replication
/// slot, in commit order, and confirms the slot's position only once Kafka
/// has acknowledged everything before it. Create the slot and publication
/// with `outbox-relay slot create`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WalSource {
    /// Where the replication connection goes, and as whom: a direct
    /// connection to PostgreSQL (no pooler), with a role that has
    /// REPLICATION.
    pub target: crate::slot::ReplicationTarget,
    /// The slot. Default `outbox_relay`.
    pub slot: String,
    /// The publication (on the outbox table). Default `outbox_relay`.
    pub publication: String,
    /// How often the confirmed position reaches PostgreSQL. After a crash,
    /// the events acknowledged by Kafka in this last interval (and the batch
    /// in flight) are sent again. Default 50 ms.
    pub status_interval: Duration,
    /// How often the relay writes a heartbeat into the WAL (a
    /// non-transactional logical decoding message, prefix
    /// `outbox-heartbeat`) and reads the slot's figures (retained WAL, lag:
    /// metrics and `status`). The heartbeat lets the slot advance while
    /// this database is idle and others on the same server write WAL.
    /// Default 10 s.
    pub heartbeat_interval: Duration,
    /// Retained WAL above which the relay logs a warning, well before the
    /// disk fills: a slot keeps WAL until its
    /// reader confirms it. Default 1 GiB.
    pub retained_warn_bytes: u64,
}

impl WalSource {
    /// The defaults, reading through `target`.
    pub fn new(target: crate::slot::ReplicationTarget) -> Self {
        Self {
            target,
            slot: crate::slot::DEFAULT_SLOT.into(),
            publication: crate::slot::DEFAULT_PUBLICATION.into(),
            status_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_secs(10),
            retained_warn_bytes: 1 << 30,
        }
    }
}

/// Fault injection (tests and the soak only): after a Kafka commit, with a
/// chance of one in `one_in`, the relay crashes before its database commit.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashAfterCommit {
    /// One commit in this many, at random (1: the first).
    pub one_in: u32,
    /// Abort the process (the soak); else the relay stops at once without
    /// any clean-up, as if killed, keeping its lease (in-process tests).
    pub abort_process: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            kafka_properties: BTreeMap::new(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            delayed_check_interval: Duration::from_secs(1),
            listen: true,
            channel: "outbox".into(),
            topic_template: "{aggregate_type}".into(),
            default_source: "outbox-relay".into(),
            after_publish: AfterPublish::Delete,
            remember_published: Duration::from_secs(7 * 24 * 3600),
            poison_policy: PoisonPolicy::BlockKey,
            publish_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(5),
            synchronous_commit: false,
            relay_id: None,
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            transaction_pooler: false,
            exactly_once: false,
            checkpoint_topic: crate::checkpoint::DEFAULT_TOPIC.into(),
            transactional_id_prefix: "outbox-relay-".into(),
            transaction_timeout: Duration::from_secs(60),
            crash_after_kafka_commit: None,
            mutation_skip_fencing: false,
            wal: None,
            rabbitmq: None,
        }
    }
}

/// A configuration value the relay cannot work with.
#[derive(Debug, thiserror::Error)]
#[error("invalid relay configuration: {0}")]
pub struct ConfigError(pub String);

impl RelayConfig {
    /// Whether published ids are remembered (delete mode, non-zero
    /// [`RelayConfig::remember_published`]).
    pub fn remembers_published(&self) -> bool {
        self.after_publish == AfterPublish::Delete && !self.remember_published.is_zero()
    }

    /// The exactly-once producer's `transactional.id` for the relay
    /// `relay_id` ([`RelayConfig::transactional_id_prefix`]): one per relay
    /// with the poll source, one per slot with the WAL source.
    pub(crate) fn transactional_id(&self, relay_id: &str) -> String {
        match &self.wal {
            Some(wal) if !self.mutation_skip_fencing => {
                format!("{}slot-{}", self.transactional_id_prefix, wal.slot)
            }
            _ => format!("{}{relay_id}", self.transactional_id_prefix),
        }
    }

    /// Checks the values against each other; [`crate::Relay::new`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        // RabbitMQ's sink needs no Kafka.
        if self.brokers.trim().is_empty() && self.rabbitmq.is_none() {
            return bad("no Kafka brokers given (KAFKA_BROKERS / --kafka-brokers)".into());
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return bad(format!(
                "batch size must be between 1 and 100000, got {}",
                self.batch_size
            ));
        }
        if self.poll_interval.is_zero() {
            return bad("poll interval must be greater than zero".into());
        }
        if self.delayed_check_interval.is_zero() {
            return bad("the delayed-event check interval must be greater than zero".into());
        }
        if let Some(wal) = &self.wal {
            crate::slot::check_name("slot", &wal.slot).map_err(|e| ConfigError(e.to_string()))?;
            crate::slot::check_name("publication", &wal.publication)
                .map_err(|e| ConfigError(e.to_string()))?;
            if self.after_publish != AfterPublish::Delete {
                return bad(
                    "--source wal deletes what it published; --after-publish mark \
                     is for --source poll"
                        .into(),
                );
            }
            if self.transaction_pooler {
                return bad("--source wal needs a direct connection to PostgreSQL; \
                     --transaction-pooler is for --source poll"
                    .into());
            }
            if wal.status_interval.is_zero() || wal.heartbeat_interval.is_zero() {
                return bad(
                    "the WAL status and heartbeat intervals must be greater than zero".into(),
                );
            }
        }
        if let Some(rabbit) = &self.rabbitmq {
            if !cfg!(feature = "rabbitmq") {
                return bad(
                    "this build has no RabbitMQ sink: build with the cargo feature \
                     `rabbitmq` (the outbox-relay binary has it)"
                        .into(),
                );
            }
            match url::Url::parse(&rabbit.url) {
                Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => {}
                Ok(u) => {
                    return bad(format!(
                        "the RabbitMQ URL must start with amqp:// or amqps://, not {}://",
                        u.scheme()
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "the RabbitMQ URL (AMQP_URL / --amqp-url) does not parse: {e}"
                    ))
                }
            }
            if self.exactly_once {
                return bad(
                    "--exactly-once uses Kafka transactions; it is not available with \
                     --sink rabbitmq"
                        .into(),
                );
            }
            if rabbit.routing_key.is_empty() {
                return bad("the routing key template must not be empty".into());
            }
        }
        if !self.topic_template.contains("{aggregate_type}") {
            // A fixed topic is allowed, but it must be a legal name.
            outbox_core::topic::validate_topic(&self.topic_template)
                .map_err(|r| ConfigError(format!("topic template: {r}")))?;
        }
        if self.publish_timeout < Duration::from_secs(1) {
            return bad("publish timeout must be at least 1s".into());
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            return bad("backoff: need 0 < min backoff <= max backoff".into());
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("lease TTL must be at least 1s".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.lease_ttl {
            return bad(format!(
                "heartbeat interval must be greater than zero and at most half the lease TTL \
                 ({:?}), got {:?}",
                self.lease_ttl, self.heartbeat_interval
            ));
        }
        if let Some(id) = &self.relay_id {
            if id.trim().is_empty() || id.len() > 200 {
                return bad("relay id must be 1 to 200 characters".into());
            }
        }
        if self.exactly_once {
            if self.transaction_timeout < self.publish_timeout {
                return bad(format!(
                    "transaction timeout ({:?}) must be at least the publish timeout ({:?})",
                    self.transaction_timeout, self.publish_timeout
                ));
            }
            outbox_core::topic::validate_topic(&self.checkpoint_topic)
                .map_err(|r| ConfigError(format!("checkpoint topic: {r}")))?;
        }
        if self.channel.is_empty() || self.channel.len() > 63 {
            return bad("notification channel must be 1 to 63 characters".into());
        }
        Ok(())
    }
}
