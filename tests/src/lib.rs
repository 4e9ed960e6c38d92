//! Shared helpers for the integration tests. They talk to the real
//! PostgreSQL (`DATABASE_URL`, one fresh database per test through
//! `#[sqlx::test]`) and the real broker (`KAFKA_BROKERS`, one fresh topic
//! per test). `./dev test` brings both up.
//!
//! One piece of small helpers the test files share (brokers and topics,
//! reading records back, relays in-process and as processes, the delivery
//! check); the generic ones come from `test-kit`, consumer helpers are in
//! [`consumer`].

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    message::{Headers, Message, OwnedMessage},
    ClientConfig,
};

/// The broker list from `KAFKA_BROKERS` (default `127.0.0.1:9092`).
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A unique name with a readable prefix, safe as a topic or group name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates `topic` with `partitions` partitions (replication 1).
pub async fn create_topic(topic: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_on(&brokers(), topic, partitions).await
}

/// [`create_topic`] on a given broker list; an existing topic is fine.
pub async fn create_topic_on(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    test_kit::topic::create(brokers, topic, partitions).await
}

/// A record as the tests look at it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key as text.
    pub key: Option<String>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
    /// Headers as text.
    pub headers: HashMap<String, String>,
    /// The record's timestamp (the relay's produce time), in ms since the
    /// epoch.
    pub timestamp_ms: Option<i64>,
}

impl Received {
    fn from(m: &OwnedMessage) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The value parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or(b"null")).expect("value is JSON")
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads `topic` from the beginning with a fresh group until `expected`
/// records arrived, then keeps reading for `settle` to catch extras
/// (duplicates). Fails if fewer than `expected` arrive within `timeout`.
pub async fn consume(
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Received>> {
    consume_from(&brokers(), topic, expected, timeout, settle).await
}

/// [`consume`] from a given broker list.
pub async fn consume_from(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Received>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .context("consumer")?;
    consumer.subscribe(&[topic]).context("subscribe")?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut settle_until: Option<tokio::time::Instant> = None;
    loop {
        let until = settle_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => {
                out.push(Received::from(&m.detach()));
                if out.len() >= expected && settle_until.is_none() {
                    settle_until = Some(tokio::time::Instant::now() + settle);
                }
            }
            // A bootstrap broker that is down (a killed cluster node) is
            // reported and ridden out; anything else fails the test.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                | rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
            ))) => continue,
            Ok(Err(e)) => bail!("consume error: {e}"),
            Err(_) if settle_until.is_some() => return Ok(out),
            Err(_) => {
                // Offsets seen per partition (count, first, last): shows
                // whether a record is missing from the log or was not fetched.
                let mut seen: std::collections::BTreeMap<i32, (usize, i64, i64)> =
                    Default::default();
                for r in &out {
                    let e = seen.entry(r.partition).or_insert((0, i64::MAX, -1));
                    *e = (e.0 + 1, e.1.min(r.offset), e.2.max(r.offset));
                }
                bail!(
                    "only {} of {expected} records arrived on {topic} within {timeout:?}; \
                     per partition (count, first offset, last offset): {seen:?}",
                    out.len()
                )
            }
        }
    }
}

pub use test_kit::{process::Child, wait::eventually};

/// A token cancelled on SIGTERM, for the fixture processes (a test stops
/// them cleanly with SIGTERM, or kills them with SIGKILL).
pub fn shutdown_on_sigterm() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
        token.cancel();
    });
    shutdown
}

/// How many partitions each live relay owns, as `outbox_relays` shows them
/// (live relays ordered by id).
pub async fn owned_by_live_relays(pool: &sqlx::PgPool) -> anyhow::Result<Vec<usize>> {
    let relays = outbox_relay::store::relays(pool).await?;
    Ok(relays
        .iter()
        .filter(|r| r.live)
        .map(|r| r.partitions.len())
        .collect())
}

/// Relay settings for tests: polls every 200 ms, batches of 100, defaults
/// otherwise (brokers are filled in by [`RunningRelay::start`]).
pub fn quick_relay_config() -> outbox_relay::RelayConfig {
    outbox_relay::RelayConfig {
        poll_interval: Duration::from_millis(200),
        batch_size: 100,
        ..outbox_relay::RelayConfig::default()
    }
}

/// A relay running in-process ([`outbox_relay::RelayHandle`]), stopped by
/// [`RunningRelay::stop`].
pub struct RunningRelay {
    /// The relay's health, as `/readyz` reports it.
    pub health: std::sync::Arc<outbox_relay::health::Health>,
    handle: outbox_relay::RelayHandle,
}

impl RunningRelay {
    /// Starts a relay on `pool`'s database with `cfg` (brokers filled in).
    pub fn start(pool: &sqlx::PgPool, mut cfg: outbox_relay::RelayConfig) -> anyhow::Result<Self> {
        cfg.brokers = brokers();
        Self::start_exactly(pool, cfg)
    }

    /// Starts a relay with `cfg` as given (its own broker list).
    pub fn start_exactly(
        pool: &sqlx::PgPool,
        cfg: outbox_relay::RelayConfig,
    ) -> anyhow::Result<Self> {
        Self::start_on((*pool.connect_options()).clone(), cfg)
    }

    /// Starts a relay connecting with `connect` (for example through a
    /// connection pooler), with `cfg` as given.
    pub fn start_on(
        connect: sqlx::postgres::PgConnectOptions,
        cfg: outbox_relay::RelayConfig,
    ) -> anyhow::Result<Self> {
        // TEST_LOG=debug shows the relay's logs in test output.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let handle = outbox_relay::Relay::new(cfg, connect)?.start();
        Ok(Self {
            health: handle.health(),
            handle,
        })
    }

    /// Signals shutdown and waits for the relay to return.
    pub async fn stop(self) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(30), self.handle.stop())
            .await
            .context("relay did not stop within 30s")??;
        Ok(())
    }

    /// Runs an exactly-once relay with `cfg` (brokers filled in) that
    /// stops, as if killed, right after its first Kafka commit and before
    /// it records that batch in the database; returns once it stopped.
    pub async fn crash_after_first_commit(
        pool: &sqlx::PgPool,
        cfg: outbox_relay::RelayConfig,
    ) -> anyhow::Result<()> {
        let crashing = Self::start(
            pool,
            outbox_relay::RelayConfig {
                crash_after_kafka_commit: Some(outbox_relay::config::CrashAfterCommit {
                    one_in: 1,
                    abort_process: false,
                }),
                ..cfg
            },
        )?;
        let health = crashing.health.clone();
        eventually(Duration::from_secs(90), "the crash hook fired", || async {
            Ok(health.state() == outbox_relay::health::State::Stopping)
        })
        .await?;
        crashing.stop().await
    }
}

/// Publishes every pending row with a quick in-process relay, then stops it.
pub async fn publish_pending(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let relay = RunningRelay::start(pool, quick_relay_config())?;
    eventually(Duration::from_secs(60), "every row published", || async {
        Ok(pending(pool).await? == 0)
    })
    .await?;
    relay.stop().await
}

/// Pending rows in the outbox.
pub async fn pending(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?,
    )
}

/// Applies the outbox migrations and creates a fresh topic with
/// `partitions` partitions; returns the topic.
pub async fn outbox_with_topic(
    pool: &sqlx::PgPool,
    prefix: &str,
    partitions: i32,
) -> anyhow::Result<String> {
    outbox_core::migrate(pool).await?;
    let topic = unique(prefix);
    create_topic(&topic, partitions).await?;
    Ok(topic)
}

/// Appends `n` events to `topic`, `keys` distinct aggregate ids round-robin,
/// each with `{"seq": i}` as payload, one transaction each. Returns their ids.
pub async fn append_events(
    pool: &sqlx::PgPool,
    topic: &str,
    n: usize,
    keys: usize,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let e = outbox_core::NewEvent::new("thing", format!("key-{}", i % keys), "thing.happened")
            .topic(topic)
            .json_payload(&serde_json::json!({ "seq": i }))?;
        outbox_core::append(pool, &e).await?;
        ids.push(e.event_id);
    }
    Ok(ids)
}

/// The `outbox-relay` binary, built (or confirmed fresh) by cargo on first use.
pub fn relay_bin() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            workspace_bin(
                &["-p", "outbox-toolkit-relay", "--bin", "outbox-relay"],
                "outbox-relay",
            )
        })
        .clone()
}

/// The `outbox-dlq` binary (consumer-kit's `cli` feature), built on first use.
pub fn dlq_bin() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            workspace_bin(
                &[
                    "-p",
                    "consumer-kit",
                    "--features",
                    "cli",
                    "--bin",
                    "outbox-dlq",
                ],
                "outbox-dlq",
            )
        })
        .clone()
}

/// The `outbox-soak` binary, built on first use.
pub fn soak_bin() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            workspace_bin(
                &["-p", "outbox-soak", "--bin", "outbox-soak"],
                "outbox-soak",
            )
        })
        .clone()
}

/// Runs `cargo build -q <args>` in the workspace and returns the path of
/// the binary `name` in the same target directory as the running test.
fn workspace_bin(args: &[&str], name: &str) -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = std::process::Command::new(cargo)
        .arg("build")
        .arg("-q")
        .args(args)
        .current_dir(root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building {name} failed");
    let exe = std::env::current_exe().expect("test exe path");
    // target/debug/deps/<test> -> target/debug/<name>
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join(name)
}

/// The database URL of `pool`'s (per-test) database.
pub fn database_url(pool: &sqlx::PgPool) -> String {
    let opts = pool.connect_options();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let mut url = url_without_db(&base);
    url.push('/');
    url.push_str(opts.get_database().expect("test database name"));
    url
}

fn url_without_db(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let rest = rest.split('?').next().unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Inserts `n` rows with plain SQL (as a non-Rust producer would), over
/// `keys` aggregate ids, payload `{"seq": g}` with g = 1..=n in id order.
pub async fn insert_sql_rows(
    pool: &sqlx::PgPool,
    topic: &str,
    n: i64,
    keys: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
         SELECT gen_random_uuid(), 'load', 'k' || (g % $3), 'load.row', $1, jsonb_build_object('seq', g) \
         FROM generate_series(1, $2) g ORDER BY g",
    )
    .bind(topic)
    .bind(n)
    .bind(keys)
    .execute(pool)
    .await?;
    Ok(())
}

/// Checks delivery of `n` SQL-inserted rows: every seq arrived, and per key
/// the first deliveries come in seq order. Returns the number of duplicates.
pub fn check_delivery(got: &[Received], n: i64) -> anyhow::Result<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in got {
        let seq = r.json()["seq"].as_i64().context("seq")?;
        if !seen.insert(seq) {
            continue; // a duplicate: allowed around crashes
        }
        let key = r.key.clone().unwrap_or_default();
        if let Some(prev) = last.insert(key.clone(), seq) {
            anyhow::ensure!(
                seq > prev,
                "key {key}: first delivery of seq {seq} came after {prev}"
            );
        }
    }
    let missing: Vec<i64> = (1..=n).filter(|s| !seen.contains(s)).take(10).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "lost rows, first missing seqs: {missing:?}"
    );
    Ok(got.len() - seen.len())
}

/// Starts `outbox-relay run` on `pool`'s database with extra `args`; its
/// output goes to a log file named after `name` in the temp dir.
pub fn spawn_relay(pool: &sqlx::PgPool, name: &str, args: &[&str]) -> anyhow::Result<Child> {
    spawn_relay_on(pool, &brokers(), name, args)
}

/// [`spawn_relay`] publishing to `brokers` (a private broker, or an address
/// nothing listens on).
pub fn spawn_relay_on(
    pool: &sqlx::PgPool,
    brokers: &str,
    name: &str,
    args: &[&str],
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(relay_log(name))?;
    let child = std::process::Command::new(relay_bin())
        .arg("run")
        .args(args)
        .env("DATABASE_URL", database_url(pool))
        .env("KAFKA_BROKERS", brokers)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Child::from(child))
}

/// The log file of a relay started by [`spawn_relay`] as `name`.
pub fn relay_log(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{name}.log"))
}

/// Runs the `outbox-relay` binary with `args` against `database_url`:
/// (exit code, -1 if killed by a signal; stdout and stderr together).
pub fn relay_cli(database_url: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(relay_bin())
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A GET against 127.0.0.1:`port`: (status code, body).
pub use test_kit::http::get_blocking as http_get;

/// A private Apache Kafka broker on its own ports (storage on disk), for
/// outage tests that must not disturb the shared broker: `kill` and
/// `restart` keep its topics, records and offsets.
pub use test_kit::kafka::{Cluster as PrivateCluster, Node as PrivateBroker};

/// A database outage as a consumer sees one: `pool`'s database refuses new
/// connections and its open ones are ended, until [`DatabaseOutage::end`].
pub struct DatabaseOutage {
    admin: sqlx::PgConnection,
    db: String,
}

impl DatabaseOutage {
    /// Starts the outage (through a connection to `DATABASE_URL`'s own
    /// database, which stays up).
    pub async fn start(pool: &sqlx::PgPool) -> anyhow::Result<Self> {
        use sqlx::Connection as _;
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(pool)
            .await?;
        let mut admin = sqlx::PgConnection::connect(&std::env::var("DATABASE_URL")?).await?;
        sqlx::query(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"))
            .execute(&mut admin)
            .await?;
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&db)
            .execute(&mut admin)
            .await?;
        Ok(Self { admin, db })
    }

    /// Ends the outage: the database accepts connections again.
    pub async fn end(mut self) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            self.db
        ))
        .execute(&mut self.admin)
        .await?;
        Ok(())
    }
}

/// Terminates every other connection to `pool`'s database (a consumer's,
/// a relay's); returns how many were terminated.
pub async fn kill_connections_except_mine(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    Ok(killed.len())
}

/// Terminates every database connection of the relays in `pool`'s
/// database (application name `outbox-relay`, the relay's default); returns
/// how many were terminated.
pub async fn kill_relay_connections(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'outbox-relay' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    Ok(killed.len())
}

pub mod booking;
pub mod consumer;

/// A TCP proxy to the broker that can cut every connection through it and
/// refuse new ones until healed: a lost connection, as a broker restart or
/// a network fault makes it.
pub struct AmqpProxy {
    broker: String,
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl AmqpProxy {
    /// A proxy to the broker of the AMQP URL `url`.
    pub async fn to(url: &str) -> anyhow::Result<Self> {
        let broker = url.to_string();
        let url = url::Url::parse(url)?;
        let target = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5672)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l) = (cut.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let link = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                l.lock().expect("links").push(link.abort_handle());
            }
        });
        Ok(Self {
            broker,
            port,
            cut,
            links,
        })
    }

    /// The broker's URL through the proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.broker).expect("AMQP URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        url.to_string()
    }

    /// Cuts every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

fn interop_libs() -> std::path::PathBuf {
    std::env::var_os("INTEROP_LIBS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("OUTBOX_CACHE_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| {
                    std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/outbox-toolkit")
                });
            cache.join("interop-libs")
        })
}

/// Runs `Interop.java <args>` (`tests/interop/`: Apache kafka-clients and the
/// CloudEvents Java SDK, on the classpath `./dev test` resolves) and returns
/// its stdout lines.
pub fn java_interop(args: &[&str]) -> anyhow::Result<Vec<String>> {
    let libs = interop_libs();
    anyhow::ensure!(
        libs.join(".complete").exists(),
        "the interop tests' Java clients are not at {}: run ./dev test (it resolves them)",
        libs.display()
    );
    let source = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/Interop.java");
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(source)
        .args(args)
        .output()
        .context("cannot run java (a JDK 17+ is needed)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "Interop.java {args:?} exited {}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout.lines().map(str::to_string).collect())
}

/// The event ids the Java consumer (`tests/interop/`) reads from `topic` at
/// `isolation` (`read_committed`, `read_uncommitted`): at least `count`,
/// and whatever more comes within 3 s.
pub fn java_ids(topic: &str, count: usize, isolation: &str) -> anyhow::Result<Vec<String>> {
    let lines = java_interop(&["read", &brokers(), topic, &count.to_string(), isolation])?;
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["id"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// How many times each event id (`ce_id`) arrived.
pub fn copies(got: &[Received]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in got {
        *n.entry(
            r.header(outbox_core::headers::CE_ID)
                .unwrap_or("?")
                .to_string(),
        )
        .or_default() += 1;
    }
    n
}

/// A replication slot name for a test: `test_p<pid>_<what>_<random>`.
/// Logical slots are cluster-wide, so the name is unique, and it carries
/// the test process's id for [`drop_test_slots`].
pub fn test_slot_name(what: &str) -> String {
    format!(
        "test_p{}_{what}_{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Drops the given slots, and the inactive slots that earlier test
/// processes left (a failed test leaves its slot, which would keep WAL
/// forever). Slots of this process's other tests are left alone: they may
/// be created and not yet read.
pub async fn drop_test_slots(pool: &sqlx::PgPool, also: &[&str]) {
    let mine = format!("test\\_p{}\\_%", std::process::id());
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE NOT active AND ((slot_name LIKE 'test\\_p%' AND slot_name NOT LIKE $2) \
                               OR slot_name = ANY($1))",
    )
    .bind(also)
    .bind(mine)
    .execute(pool)
    .await
    .expect("dropping test slots");
}
