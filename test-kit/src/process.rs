//! A child process that cannot outlive its test: killed when dropped, with
//! SIGTERM, a bounded wait for its exit, and its peak memory (RSS) sampled
//! on demand.

use std::{
    process::Command,
    time::{Duration, Instant},
};

/// A child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Child {
    /// The process itself (its pid, pipes).
    pub process: std::process::Child,
    peak_rss_kib: u64,
}

impl Child {
    /// Spawns `command`.
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        Ok(Self::from(command.spawn()?))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.process.id()
    }

    /// Sends SIGTERM (a clean stop).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.id().to_string())
            .status();
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.sample_rss();
        self.process.kill()?;
        self.process.wait()?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit: its exit code, `None`
    /// if a signal ended it.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait()? {
                return Ok(status.code());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "process {} did not exit within {timeout:?}",
                self.id()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        self.sample_rss();
        self.terminate();
        if self.wait_exit(grace).is_err() {
            let _ = self.kill();
        }
    }

    /// Reads the process's resident memory now and keeps the peak.
    pub fn sample_rss(&mut self) {
        if let Some(kib) = rss_kib(self.id()) {
            self.peak_rss_kib = self.peak_rss_kib.max(kib);
        }
    }

    /// The highest resident memory [`Child::sample_rss`] saw, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_rss_kib
    }
}

impl From<std::process::Child> for Child {
    fn from(process: std::process::Child) -> Self {
        Self {
            process,
            peak_rss_kib: 0,
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS`), if it runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
