//! A private RabbitMQ node on loopback, for tests that restart the broker
//! or raise its alarms without touching the shared one: Debian's
//! `rabbitmq-server` (which `./dev up` installs), started on free ports with
//! its data in a temporary folder, stopped (its whole process group) and
//! removed when dropped.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;

/// How long a queue of [`bind_queue`] lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLife {
    /// Durable: it outlives a broker restart (with persistent messages).
    Durable,
    /// Exclusive to the declaring connection, gone with it.
    Exclusive,
    /// A durable quorum queue (replicated by Raft; a confirm means a
    /// majority wrote it).
    Quorum,
}

/// Declares `exchange` as the relay does (a durable topic exchange) and
/// `queue`, bound to it for every routing key (`#`): what tests, the demo,
/// the soak and the benchmark read the relay's messages from.
pub async fn bind_queue(
    channel: &lapin::Channel,
    exchange: &str,
    queue: &str,
    life: QueueLife,
) -> anyhow::Result<()> {
    use lapin::{
        options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
        types::FieldTable,
        ExchangeKind,
    };
    channel
        .exchange_declare(
            exchange.to_string().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {exchange}"))?;
    let options = QueueDeclareOptions {
        durable: life != QueueLife::Exclusive,
        exclusive: life == QueueLife::Exclusive,
        ..QueueDeclareOptions::default()
    };
    let mut args = FieldTable::default();
    if life == QueueLife::Quorum {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(queue.to_string().into(), options, args)
        .await
        .with_context(|| format!("declaring queue {queue}"))?;
    channel
        .queue_bind(
            queue.to_string().into(),
            exchange.to_string().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding {queue} to {exchange}"))?;
    Ok(())
}

/// The server's own scripts (not Debian's wrappers, which run the system's
/// node as the rabbitmq user).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A running private node.
#[derive(Debug)]
pub struct Node {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub url: String,
    name: String,
    dir: PathBuf,
    port: u16,
    dist: u16,
    process: std::process::Child,
}

impl Node {
    /// Starts a node and waits (up to 60 s) until it takes connections.
    pub fn start() -> anyhow::Result<Self> {
        anyhow::ensure!(
            std::path::Path::new(SERVER).exists(),
            "{SERVER} not found: run ./dev up (it installs Debian's rabbitmq-server)"
        );
        let port = free_port()?;
        let dist = free_port()?;
        let name = format!("outbox-test-{port}@localhost");
        let dir = std::env::temp_dir().join(format!("outbox-rabbitmq-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\n\
                 disk_free_limit.absolute = 50MB\n"
            ),
        )?;
        let process = spawn(&dir, &name, port, dist)?;
        let mut node = Self {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            name,
            dir,
            port,
            dist,
            process,
        };
        node.wait_listening()?;
        Ok(node)
    }

    /// Kills the node's whole process group with SIGKILL, as a crash
    /// would; its data stays for [`Node::restart`].
    pub fn kill(&mut self) {
        let group = format!("-{}", self.process.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.process.wait();
    }

    /// Starts the node again on its ports and data (after [`Node::kill`])
    /// and waits until it takes connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if matches!(self.process.try_wait(), Ok(None)) {
            self.kill();
        }
        self.process = spawn(&self.dir, &self.name, self.port, self.dist)?;
        self.wait_listening()
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = self.process.try_wait() {
                anyhow::bail!("rabbitmq-server exited ({status}): {}", self.start_log());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "rabbitmq-server did not listen on {port} within 60 s: {}",
                self.start_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Runs `rabbitmqctl <args>` on this node; its output.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(CTL)
            .env("HOME", &self.dir)
            .args(["-n", &self.name])
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(out.status.success(), "rabbitmqctl {args:?}: {text}");
        Ok(text)
    }

    fn start_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("start.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let group = format!("-{}", self.process.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the server for the node `name` in `dir`, in its own process
/// group (the start script and the Erlang VM stop together).
fn spawn(
    dir: &std::path::Path,
    name: &str,
    port: u16,
    dist: u16,
) -> anyhow::Result<std::process::Child> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("start.log"))?;
    Command::new(SERVER)
        .env("HOME", dir)
        .env("RABBITMQ_NODENAME", name)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", dir.join("data"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start rabbitmq-server")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
