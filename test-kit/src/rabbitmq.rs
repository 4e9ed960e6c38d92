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
        let log = std::fs::File::create(dir.join("start.log"))?;
        let process = Command::new(SERVER)
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", &name)
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
            // Its own group: the start script and the Erlang VM stop together.
            .process_group(0)
            .spawn()
            .context("cannot start rabbitmq-server")?;
        let mut node = Self {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            name,
            dir,
            process,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = node.process.try_wait() {
                anyhow::bail!("rabbitmq-server exited ({status}): {}", node.start_log());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "rabbitmq-server did not listen on {port} within 60 s: {}",
                node.start_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(node)
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
