//! The soak's child processes: each relay and the consumer run as this
//! binary's hidden subcommands, so a fault can kill -9 one and restart it.

use std::{
    process::{Command as Process, Stdio},
    time::Duration,
};

use test_kit::process::Child;

use crate::Cli;

/// A child process of this binary (a relay or a consumer), killed when
/// dropped, restarted with the same arguments after a kill fault.
pub(crate) struct Role {
    pub(crate) args: Vec<String>,
    pub(crate) child: Child,
    /// The peak RSS of the processes this role ran before the current one.
    pub(crate) earlier_peak_rss_kib: u64,
}

impl Role {
    pub(crate) fn start(cli: &Cli, args: &[&str]) -> anyhow::Result<Self> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = spawn(cli, &args)?;
        Ok(Self {
            args,
            child,
            earlier_peak_rss_kib: 0,
        })
    }

    pub(crate) fn kill_and_restart(&mut self, cli: &Cli) -> anyhow::Result<()> {
        let _ = self.child.kill();
        self.earlier_peak_rss_kib = self.peak_rss_kib();
        self.child = spawn(cli, &self.args)?;
        Ok(())
    }

    pub(crate) fn sample_rss(&mut self) {
        self.child.sample_rss();
    }

    pub(crate) fn peak_rss_kib(&self) -> u64 {
        self.earlier_peak_rss_kib.max(self.child.peak_rss_kib())
    }

    pub(crate) fn terminate(&mut self) {
        self.child.stop(Duration::from_secs(20));
    }
}

pub(crate) fn spawn(cli: &Cli, args: &[String]) -> anyhow::Result<Child> {
    Child::spawn(
        Process::new(std::env::current_exe()?)
            .args(args)
            .env(
                "DATABASE_URL",
                cli.database_url.as_deref().unwrap_or_default(),
            )
            .env("KAFKA_BROKERS", &cli.kafka_brokers)
            .env("AMQP_URL", &cli.amqp_url)
            .args(["--sink", cli.sink.name()])
            .arg("--database")
            .arg(&cli.database)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
}
