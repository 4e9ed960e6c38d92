//! Shared helpers for the integration tests. They talk to the real
//! PostgreSQL (`DATABASE_URL`, one fresh database per test through
//! `#[sqlx::test]`) and the real broker (`KAFKA_BROKERS`, one fresh topic
//! per test). `./dev test` brings both up.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
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
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .context("admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .context("create_topics")?;
    for r in results {
        if let Err((name, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("creating topic {name} failed: {code:?}");
            }
        }
    }
    Ok(())
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
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
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
            Ok(Err(e)) => bail!("consume error: {e}"),
            Err(_) if settle_until.is_some() => return Ok(out),
            Err(_) => bail!(
                "only {} of {expected} records arrived on {topic} within {timeout:?}",
                out.len()
            ),
        }
    }
}

/// Waits until `cond` holds, polling every 50 ms, for at most `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay running in-process, stopped by [`RunningRelay::stop`].
pub struct RunningRelay {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningRelay {
    /// Starts a relay on `pool`'s database with `cfg` (brokers filled in).
    pub fn start(pool: &sqlx::PgPool, mut cfg: outbox_relay::RelayConfig) -> anyhow::Result<Self> {
        cfg.brokers = brokers();
        let relay = outbox_relay::Relay::new(cfg, (*pool.connect_options()).clone())?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Ok(Self { shutdown, task })
    }

    /// Signals shutdown and waits for the relay to return.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("relay did not stop within 30s")??;
        Ok(())
    }
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
    outbox_core::migrate::run(pool, outbox_core::MigrationSet::Outbox).await?;
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
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
            let status = std::process::Command::new(cargo)
                .args(["build", "-q", "-p", "outbox-relay", "--bin", "outbox-relay"])
                .current_dir(root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building outbox-relay failed");
            let exe = std::env::current_exe().expect("test exe path");
            // target/debug/deps/<test> -> target/debug/outbox-relay
            exe.parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .join("outbox-relay")
        })
        .clone()
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
