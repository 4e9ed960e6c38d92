//! Private Apache Kafka brokers on loopback, for the tests, the soak and the
//! benchmarks that must stop, kill or fail over a broker without disturbing
//! the shared one `./dev up` runs on 127.0.0.1:9092.
//!
//! Each broker is a plain `java -cp '<libs>/*' kafka.Kafka server.properties`
//! process in KRaft mode, from the jars `./dev` resolves once per machine
//! from Maven Central (`kafka/pom.xml`; the folder is `KAFKA_LIBS`, default
//! `$OUTBOX_CACHE_DIR/kafka-<version>/libs`). The settings all brokers share
//! are `kafka/broker.properties`; this crate adds each node's id, ports,
//! quorum and data folder.
//!
//! - [`Node::start`]: one combined broker and controller, storage on disk, so
//!   [`Node::kill`] (SIGKILL) and [`Node::restart`] keep topics, records and
//!   committed offsets, as in production.
//! - [`Cluster::start`]: three such nodes with a static controller quorum,
//!   replication factor 3 and `min.insync.replicas=2` by default, for leader
//!   failover.
//!
//! A broker is killed when dropped; its folder is removed unless
//! `KEEP_KAFKA` is set (its log is `<dir>/broker.log`).
//!
//! One piece because a node and a cluster share everything but the quorum:
//! the properties, the process, the wait for "started" and the folders.

use std::{
    fmt::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// Kafka's version, as `kafka/pom.xml` and `./dev` pin it.
pub const KAFKA_VERSION: &str = "4.1.2";

/// The settings every broker of the project shares.
const SHARED_PROPERTIES: &str = include_str!("../../kafka/broker.properties");
/// The broker's logging configuration.
const LOG4J2_YAML: &str = include_str!("../../kafka/log4j2.yaml");
/// What the broker prints once it serves clients.
const STARTED: &str = "Kafka Server started";
/// How long a (re)started broker may take to serve clients.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The folder of Kafka's jars: `KAFKA_LIBS`, or the cache `./dev` fills.
pub fn libs() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("KAFKA_LIBS") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("OUTBOX_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/outbox-toolkit")
            })
            .join(format!("kafka-{KAFKA_VERSION}/libs")),
    };
    anyhow::ensure!(
        dir.join(".complete").exists(),
        "Apache Kafka's jars are not at {}: run ./dev up once (it resolves them from Maven \
         Central), or set KAFKA_LIBS to a folder holding them",
        dir.display()
    );
    Ok(dir)
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "java".into())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free ports: every listener is held until all are chosen,
/// so that the system cannot hand out one port twice.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The last lines of a node's log, for an error message (the folder may be
/// gone by the time anyone looks).
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

fn unique_dir(what: &str) -> anyhow::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "outbox-kafka-{what}-{}-{n}-{}",
        std::process::id(),
        free_port()?
    ));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the broker's folder {}", dir.display()))?;
    Ok(dir)
}

/// A cluster id: 16 random bytes, URL-safe base64 without padding, not
/// starting with `-` (what Kafka's `Uuid` accepts).
fn cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        ^ (u128::from(std::process::id()) << 64);
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        // xorshift over the seed: uniqueness, not secrecy, is what counts.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = (seed >> 56) as u8;
    }
    bytes[0] &= 0x7f; // not '-' first: keep the top six bits below 62
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 6 {
            nbits -= 6;
            out.push(ALPHABET[((bits >> nbits) & 63) as usize] as char);
        }
    }
    out.push(ALPHABET[((bits << (6 - nbits)) & 63) as usize] as char);
    out
}

/// One Kafka process: a combined broker and controller.
pub struct Node {
    /// Its node id (1 for a single node; 1 to 3 in a cluster).
    pub id: u32,
    /// `127.0.0.1:<port>`, its client listener.
    pub address: String,
    dir: PathBuf,
    heap: &'static str,
    child: Option<Child>,
    keep: bool,
}

impl Node {
    /// Starts a single-node cluster on free ports with storage in a fresh
    /// temporary folder, and waits until it serves clients.
    pub fn start() -> anyhow::Result<Self> {
        let ports = free_ports(2)?;
        let (port, cport) = (ports[0], ports[1]);
        let quorum = format!("controller.quorum.voters=1@127.0.0.1:{cport}\n");
        let replication = "offsets.topic.replication.factor=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n";
        let mut node = Self::configure(1, port, cport, &quorum, replication, "-Xmx512m")?;
        node.format(&cluster_id())?;
        node.restart()?;
        Ok(node)
    }

    fn configure(
        id: u32,
        port: u16,
        cport: u16,
        quorum: &str,
        extra: &str,
        heap: &'static str,
    ) -> anyhow::Result<Self> {
        let dir = unique_dir(&format!("n{id}"))?;
        let mut props = String::from(SHARED_PROPERTIES);
        write!(
            props,
            "\nnode.id={id}\n{quorum}\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             log.dirs={}\n{extra}",
            dir.join("data").display()
        )?;
        std::fs::write(dir.join("server.properties"), props)?;
        std::fs::write(dir.join("log4j2.yaml"), LOG4J2_YAML)?;
        Ok(Self {
            id,
            address: format!("127.0.0.1:{port}"),
            dir,
            heap,
            child: None,
            keep: std::env::var_os("KEEP_KAFKA").is_some(),
        })
    }

    fn format(&self, cluster_id: &str) -> anyhow::Result<()> {
        let out = Command::new(java())
            .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.yaml").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs()?.display()))
            .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {} (Java 17+ is needed)", java().display()))?;
        anyhow::ensure!(
            out.status.success(),
            "formatting Kafka's storage in {} failed: {}{}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The broker's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// Its folder (config, data, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL: no clean shutdown; what the broker had not flushed is gone
    /// (replicas and the page cache keep what Kafka acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process (again) on the same ports and storage without
    /// waiting: for a cluster, whose nodes must start together.
    fn spawn(&mut self) -> anyhow::Result<usize> {
        self.kill();
        let before = std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .matches(STARTED)
            .count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let child = Command::new(java())
            .args(self.heap.split(' '))
            .args([
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.yaml").display()
            ))
            .arg(format!("-Dkafka.logs.dir={}", self.dir.display()))
            .arg("-cp")
            .arg(format!("{}/*", libs()?.display()))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} (Java 17+ is needed)", java().display()))?;
        self.child = Some(child);
        Ok(before)
    }

    /// Waits until the process has printed one more start line than
    /// `before` and its listener accepts connections.
    fn wait_started(&mut self, before: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                anyhow::bail!(
                    "Kafka node {} exited at start; see {}; its last lines:\n{}",
                    self.id,
                    self.log().display(),
                    log_tail(&self.log())
                );
            }
            let started = std::fs::read_to_string(self.log())
                .unwrap_or_default()
                .matches(STARTED)
                .count()
                > before;
            if started && TcpStream::connect(&self.address).is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "Kafka node {} did not serve clients on {} within {START_TIMEOUT:?}; see {}",
                self.id,
                self.address,
                self.log().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the broker again on the same ports and storage (after
    /// [`Node::kill`], or killing it first), and waits until it serves
    /// clients.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let before = self.spawn()?;
        self.wait_started(before)
    }

    /// Stops it and removes its folder, unless `KEEP_KAFKA` is set.
    pub fn remove(mut self) {
        self.kill();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Keeps its folder when dropped (for a failed run's evidence).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Three nodes on loopback, each a broker and a controller voter.
/// `default.replication.factor=3` and `min.insync.replicas=2`: a topic
/// created without a replication factor survives one node's loss without
/// losing an acknowledged record (`acks=all`).
pub struct Cluster {
    /// Nodes 1, 2 and 3 (index `id - 1`).
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts three nodes and waits until each serves clients. A node that
    /// exits at start (another process took one of its ports between their
    /// choice and the bind) makes it start over on new ports, up to three
    /// times.
    pub fn start() -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once() {
                Ok(cluster) => return Ok(cluster),
                Err(e) => {
                    eprintln!("a three-node Kafka cluster did not start ({e:#}); starting over");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("three tries"))
    }

    fn start_once() -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = free_ports(6)?.chunks(2).map(|p| (p[0], p[1])).collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        let quorum = format!("controller.quorum.voters={}\n", voters.join(","));
        // Fence a killed node sooner than the defaults (2 s / 9 s), but not so
        // soon that two busy cores fence live nodes.
        let replication = "default.replication.factor=3\n\
             min.insync.replicas=2\n\
             offsets.topic.replication.factor=3\n\
             transaction.state.log.replication.factor=3\n\
             transaction.state.log.min.isr=2\n\
             share.coordinator.state.topic.replication.factor=3\n\
             share.coordinator.state.topic.min.isr=2\n\
             unclean.leader.election.enable=false\n\
             broker.heartbeat.interval.ms=1000\n\
             broker.session.timeout.ms=6000\n";
        let id = cluster_id();
        let mut nodes = Vec::new();
        for (i, (port, cport)) in ports.into_iter().enumerate() {
            let node =
                Node::configure(i as u32 + 1, port, cport, &quorum, replication, "-Xmx512m")?;
            node.format(&id)?;
            nodes.push(node);
        }
        let mut cluster = Self { nodes };
        let before: Vec<usize> = cluster
            .nodes
            .iter_mut()
            .map(Node::spawn)
            .collect::<anyhow::Result<_>>()?;
        for (node, before) in cluster.nodes.iter_mut().zip(before) {
            node.wait_started(before)?;
        }
        Ok(cluster)
    }

    /// The bootstrap servers: every node.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id` (1 to 3).
    pub fn node(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// Keeps every node's folder when dropped.
    pub fn keep(&mut self) {
        self.nodes.iter_mut().for_each(Node::keep);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_22_url_safe_characters_not_starting_with_a_dash() {
        for _ in 0..1000 {
            let id = super::cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
