//! CPU time spent by the whole machine while a benchmark phase runs, read
//! from `/proc`, so a drain's rate can be set against what the machine's
//! cores allow.
//!
//! The relay does the raw drain's database work *and* the raw producer's
//! Kafka work on the same cores. If each row costs `d` CPU-seconds in the
//! raw drain and `p` in the raw producer (every process counted: PostgreSQL,
//! the broker, the client), no relay on `n` cores can pass `n / (d + p)`
//! rows per second, however it overlaps the two: the **CPU bound**.
//!
//! Busy time is `user + nice + system + irq + softirq` from the `cpu` line
//! of `/proc/stat` (idle, iowait and steal are not work done here). The
//! split by process kind (PostgreSQL, Java, this process) sums
//! `utime + stime` of `/proc/<pid>/stat`; processes that exit during a phase
//! drop out of the split, never out of the total.

use std::time::Instant;

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    at: Instant,
    busy: u64,
    postgres: u64,
    java: u64,
    this: u64,
}

/// What one phase used, in CPU-seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUse {
    pub(crate) wall: f64,
    pub(crate) busy: f64,
    pub(crate) postgres: f64,
    pub(crate) java: f64,
    pub(crate) this: f64,
}

/// Clock ticks per second of `/proc` (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

impl CpuMark {
    /// Reads the counters now. Off Linux (no `/proc`) every counter is 0.
    pub(crate) fn now() -> Self {
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal …
                Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
            })
            .unwrap_or(0);
        let (mut postgres, mut java) = (0, 0);
        let me = std::process::id();
        let mut this = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Some((comm, ticks)) = process_ticks(pid) else {
                    continue;
                };
                if pid == me {
                    this = ticks;
                } else if comm == "postgres" || comm == "pgbouncer" {
                    postgres += ticks;
                } else if comm == "java" {
                    java += ticks;
                }
            }
        }
        CpuMark {
            at: Instant::now(),
            busy,
            postgres,
            java,
            this,
        }
    }

    /// What was used from this mark until now.
    pub(crate) fn used(&self) -> CpuUse {
        let now = CpuMark::now();
        let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS;
        CpuUse {
            wall: now.at.duration_since(self.at).as_secs_f64(),
            busy: secs(now.busy, self.busy),
            postgres: secs(now.postgres, self.postgres),
            java: secs(now.java, self.java),
            this: secs(now.this, self.this),
        }
    }
}

/// A process's command name and its `utime + stime` in ticks.
fn process_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold spaces; the fields follow the
    // last `)`.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

impl CpuUse {
    /// Busy CPU-microseconds per row over `rows`.
    pub(crate) fn per_row_us(&self, rows: i64) -> f64 {
        self.busy * 1e6 / rows as f64
    }

    /// The machine's share in use: busy ÷ (wall × cores).
    pub(crate) fn load(&self) -> f64 {
        self.busy / (self.wall * cores() as f64)
    }

    /// `PostgreSQL / Java / this process` CPU-µs per row, for the printout.
    pub(crate) fn split_us(&self, rows: i64) -> String {
        let us = |s: f64| s * 1e6 / rows as f64;
        format!(
            "pg {:.1} / java {:.1} / bench {:.1}",
            us(self.postgres),
            us(self.java),
            us(self.this)
        )
    }
}

/// The machine's cores.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
