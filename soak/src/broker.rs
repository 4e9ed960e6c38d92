//! The soak's own broker, for the `broker-restart` fault: a tansu process on
//! a free local port with durable (SQLite) storage in a temporary folder, so
//! a kill -9 and restart keeps its topics, records and committed offsets, as
//! a real Kafka broker does.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// How long a (re)started broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A private tansu broker, killed when dropped.
pub struct Broker {
    /// `127.0.0.1:<port>`, for `KAFKA_BROKERS`.
    pub address: String,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts tansu (`bin`) with SQLite storage in a fresh temporary folder
    /// and waits until it accepts connections.
    pub fn start(bin: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            bin.exists(),
            "the broker-restart fault runs its own tansu broker, but no tansu binary is at {}: \
             run ./dev up (it builds tansu once per machine) or pass --tansu-bin",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("outbox-soak-tansu-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the broker's folder {}", dir.display()))?;
        let mut broker = Self {
            address: format!("127.0.0.1:{port}"),
            bin: bin.to_path_buf(),
            dir,
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// The broker's log (kept, with its data, when the verdict fails).
    pub fn log(&self) -> PathBuf {
        self.dir.join("tansu.log")
    }

    /// SIGKILL: no clean shutdown, whatever the broker had not written is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage, and waits until
    /// it accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let url = format!("tcp://{}", self.address);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            // The soak's own RUST_LOG is not meant for the broker: at debug
            // level tansu writes gigabytes.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(&self.address).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                anyhow::bail!(
                    "the soak's tansu broker exited ({status}) at start; see {}",
                    self.log().display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the soak's tansu broker did not accept connections on {} within {START_TIMEOUT:?}; see {}",
                self.address,
                self.log().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the broker and removes its folder.
    pub fn remove(mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tansu binary `./dev up` caches: `$OUTBOX_CACHE_DIR` (default
/// `~/.cache/outbox-toolkit`) `/tansu-0.6.0/bin/tansu`.
pub fn default_tansu_bin() -> PathBuf {
    let cache = std::env::var_os("OUTBOX_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outbox-toolkit")
        });
    cache.join("tansu-0.6.0/bin/tansu")
}

/// librdkafka's mock cluster (3 brokers, in this process, on local ports),
/// for the faults a real broker cannot produce on demand: produce errors, a
/// slow broker, a broker down.
pub struct Mock {
    cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

/// The mock cluster's brokers (ids 1 to 3).
pub const MOCK_BROKERS: i32 = 3;

impl Mock {
    /// Starts the cluster.
    pub fn start() -> anyhow::Result<Self> {
        let cluster = rdkafka::mocking::MockCluster::new(MOCK_BROKERS)
            .context("cannot start librdkafka's mock cluster")?;
        Ok(Self { cluster })
    }

    /// Its bootstrap servers, for `KAFKA_BROKERS`.
    pub fn address(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions, replicated on every
    /// broker. (The mock has no CreateTopics request.)
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.cluster
            .create_topic(topic, partitions, MOCK_BROKERS)
            .with_context(|| format!("cannot create {topic} on the mock cluster"))
    }

    /// The next five produce requests, whichever broker gets them, fail with
    /// retriable errors: request timed out, not leader, not enough replicas,
    /// a dropped connection, request timed out.
    pub fn fail_next_produce_requests(&self) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr as E};
        self.cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[
                E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                E::RD_KAFKA_RESP_ERR__TRANSPORT,
                E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        );
    }

    /// Delays every answer of `broker` by `rtt` (zero: back to normal).
    pub fn round_trip_time(&self, broker: i32, rtt: Duration) -> anyhow::Result<()> {
        Ok(self.cluster.broker_round_trip_time(broker, rtt)?)
    }

    /// Takes `broker` down (connections refused and closed) or up again.
    pub fn set_down(&self, broker: i32, down: bool) -> anyhow::Result<()> {
        if down {
            self.cluster.broker_down(broker)?;
        } else {
            self.cluster.broker_up(broker)?;
        }
        Ok(())
    }
}

/// The broker a run uses instead of `KAFKA_BROKERS`, when a fault needs one
/// under the soak's control.
pub enum Own {
    /// Its own tansu with durable storage (the broker-restart fault).
    Tansu(Broker),
    /// librdkafka's mock cluster (the produce-errors, broker-slow and
    /// broker-down faults).
    Mock(Mock),
}

impl Own {
    /// The bootstrap servers.
    pub fn address(&self) -> String {
        match self {
            Self::Tansu(b) => b.address.clone(),
            Self::Mock(m) => m.address(),
        }
    }

    /// What to call it in the run's first line.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Tansu(_) => "the soak's own tansu, durable storage",
            Self::Mock(_) => "librdkafka's mock cluster, 3 brokers",
        }
    }

    /// The tansu broker, if that is what runs.
    pub fn tansu(&mut self) -> Option<&mut Broker> {
        match self {
            Self::Tansu(b) => Some(b),
            Self::Mock(_) => None,
        }
    }

    /// The mock cluster, if that is what runs.
    pub fn mock(&self) -> Option<&Mock> {
        match self {
            Self::Tansu(_) => None,
            Self::Mock(m) => Some(m),
        }
    }
}
