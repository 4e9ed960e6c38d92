//! `debezium`: the relay and Debezium side by side, each as its own
//! process, measured from outside in the same way.
//!
//! The systems, one after another on the same database, table, broker and
//! topic shape:
//! - `poll`: `outbox-relay run` (the release binary), polling the table;
//! - `wal rows`: `outbox-relay run --source wal`, outbox rows;
//! - `wal table-less`: the same relay, events written with `outbox_emit`;
//! - `debezium`: Kafka Connect standalone (Apache Kafka's own jars) with
//!   Debezium's PostgreSQL connector and its outbox event router, the
//!   producer aligned with the relay's (idempotent, `acks=all`,
//!   `linger.ms=0`); nothing deletes its rows;
//! - `debezium-delete`: the same, with each producer transaction deleting
//!   the row it inserted, as Debezium recommends to keep the table from
//!   growing (its Quarkus outbox extension does so by default,
//!   `remove-after-insert`): the log still holds the insert, the connector
//!   skips the delete.
//!
//! The figures, for each system:
//! - **drain**: a backlog of `rows` events, written in transactions of
//!   1,000 after the slot exists, published once the system starts; the
//!   clock starts when the process starts, or at the last look (every
//!   50 ms) that found the topic empty if later, so a JVM's start-up is not
//!   held against it;
//! - **commit-to-consume** at each offered rate: producers commit one event
//!   per transaction and note the time the commit returned; a consumer reads
//!   the topic and notes when each event arrives (the same consumer for
//!   every system, so its own delay is in every figure alike); the first
//!   seconds of load (`--warm-up`, 15 by default) warm the system up and
//!   are not counted;
//! - **peak RSS** of the system's process (`VmHWM`), over its drain and
//!   its latency runs (`--rows 0` skips the drain).
//!
//! The relay deletes what it publishes itself (polling, in the claiming
//! statement; in WAL row mode, in batches after Kafka acknowledged them);
//! with `debezium` nothing does, and the table is truncated between
//! systems. Ratios are printed to each Debezium system measured.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use outbox_core::{append, emit, NewEvent};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};
use sqlx::{postgres::PgPoolOptions, Executor, PgPool};
use tokio::process::{Child, Command};

use crate::{median, Env, KEYS, PARTITIONS};

/// The slot (and publication) each system reads: one name, created fresh
/// for every WAL measurement and dropped after it.
const SLOT: &str = "outbox_bench_side";
/// Producers offering the load, one event per transaction each.
const PRODUCERS: u64 = 16;
/// The relay's HTTP port while it runs under the benchmark.
const RELAY_HTTP: &str = "127.0.0.1:19464";
/// Kafka Connect's REST port.
const CONNECT_REST: &str = "http://127.0.0.1:18083";

/// Where the other processes come from.
#[derive(Debug, Clone)]
pub(crate) struct Installed {
    /// The `outbox-relay` release binary.
    pub(crate) relay_bin: PathBuf,
    /// Apache Kafka's jars (the Connect worker's classpath).
    pub(crate) kafka_libs: PathBuf,
    /// Debezium's plugin folder (`plugin.path`).
    pub(crate) debezium_plugins: PathBuf,
    /// The Java binary.
    pub(crate) java: PathBuf,
    /// More arguments for `outbox-relay run` (`--relay-arg`), to measure a
    /// setting.
    pub(crate) relay_args: Vec<String>,
    /// Where to keep every process's log (`--keep-logs`); by default they
    /// go to a temporary folder removed at the end.
    pub(crate) keep_logs: Option<PathBuf>,
}

/// A system under measurement (`--systems`, all five by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum System {
    Poll,
    WalRows,
    WalTableLess,
    Debezium,
    /// Debezium, its producers deleting each row in the transaction that
    /// inserted it.
    DebeziumDelete,
}

impl System {
    pub(crate) const ALL: [System; 5] = [
        System::Poll,
        System::WalRows,
        System::WalTableLess,
        System::Debezium,
        System::DebeziumDelete,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Poll => "relay poll",
            System::WalRows => "relay wal rows",
            System::WalTableLess => "relay wal table-less",
            System::Debezium => "debezium",
            System::DebeziumDelete => "debezium, rows deleted",
        }
    }

    fn debezium(self) -> bool {
        matches!(self, System::Debezium | System::DebeziumDelete)
    }

    /// Whether the producers delete each row in its own transaction.
    fn producers_delete(self) -> bool {
        self == System::DebeziumDelete
    }

    fn reads_slot(self) -> bool {
        self != System::Poll
    }

    fn table_less(self) -> bool {
        self == System::WalTableLess
    }
}

/// The offered loads of the latency runs.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    /// Events per second, one latency run each.
    pub(crate) rates: Vec<u64>,
    /// Counted seconds of load per run.
    pub(crate) seconds: u64,
    /// Seconds of load before them, not counted.
    pub(crate) warm_up: u64,
}

/// One system's figures in one run.
#[derive(Debug, Default, Clone)]
struct Figures {
    drain: f64,
    rss_mib: f64,
    /// Per offered rate: achieved rate, p50, p99, p99.9 (ms).
    latency: Vec<(f64, f64, f64, f64)>,
}

pub(crate) async fn debezium(
    env: &Env,
    installed: &Installed,
    runs: usize,
    rows: i64,
    load: &Load,
    systems: &[System],
) -> anyhow::Result<()> {
    let Load {
        rates,
        seconds,
        warm_up,
    } = load;
    installed.check(systems.iter().any(|s| s.debezium()))?;
    println!(
        "== debezium: drain of {rows} events, commit-to-consume at {rates:?} events/s for {seconds}s \
         after {warm_up}s not counted ({PRODUCERS} producers, one event per transaction), peak RSS; each system its own process, \
         one after another"
    );
    let producers = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32)
        .connect(&env.url)
        .await?;
    let mut all: Vec<Vec<Figures>> = vec![vec![]; systems.len()];
    for run in 1..=runs {
        for (i, &system) in systems.iter().enumerate() {
            let f = measure_system(env, installed, &producers, system, rows, load)
                .await
                .with_context(|| format!("{} (run {run})", system.name()))?;
            print!(
                "run {run}: {:<21} drain {:>8.0}/s  peak RSS {:>6.0} MiB",
                system.name(),
                f.drain,
                f.rss_mib
            );
            for (rate, (achieved, p50, p99, p999)) in rates.iter().zip(&f.latency) {
                print!(
                    "  |  at {rate}/s (achieved {achieved:.0}): p50 {p50:.1} p99 {p99:.1} p99.9 {p999:.1} ms"
                );
            }
            println!();
            all[i].push(f);
        }
    }
    report(systems, &all, rates);
    match &installed.keep_logs {
        Some(dir) => println!("logs kept in {}", dir.display()),
        None => {
            let _ = std::fs::remove_dir_all(work_dir(installed));
        }
    }
    Ok(())
}

fn report(systems: &[System], all: &[Vec<Figures>], rates: &[u64]) {
    let med = |i: usize, f: &dyn Fn(&Figures) -> f64| median(all[i].iter().map(f).collect());
    println!("median of runs:");
    for (i, system) in systems.iter().enumerate() {
        print!(
            "  {:<21} drain {:>8.0}/s  peak RSS {:>6.0} MiB",
            system.name(),
            med(i, &|f| f.drain),
            med(i, &|f| f.rss_mib)
        );
        for (r, rate) in rates.iter().enumerate() {
            print!(
                "  |  at {rate}/s: p50 {:.1} p99 {:.1} p99.9 {:.1} ms",
                med(i, &|f| f.latency[r].1),
                med(i, &|f| f.latency[r].2),
                med(i, &|f| f.latency[r].3)
            );
        }
        println!();
    }
    for (dbz, debezium) in systems.iter().enumerate().filter(|(_, s)| s.debezium()) {
        println!(
            "ratios to {} (medians of each run's ratio; goals: drain >= 3, debezium's p99 / relay's >= 5):",
            debezium.name()
        );
        for (i, system) in systems.iter().enumerate().filter(|(_, s)| !s.debezium()) {
            let ratio = |f: &dyn Fn(&Figures, &Figures) -> f64| {
                median(all[i].iter().zip(&all[dbz]).map(|(a, b)| f(a, b)).collect())
            };
            // No drain with --rows 0: no drain ratio either.
            let drain = if all[dbz].iter().all(|f| f.drain > 0.0) {
                format!("x{:.2}", ratio(&|a, b| a.drain / b.drain))
            } else {
                "-".to_owned()
            };
            print!(
                "  {:<21} drain {drain:<6} RSS x{:.2}",
                system.name(),
                ratio(&|a, b| a.rss_mib / b.rss_mib)
            );
            for (r, rate) in rates.iter().enumerate() {
                print!(
                    "  |  at {rate}/s: p99 1/{:.1}, p99.9 1/{:.1}",
                    ratio(&|a, b| b.latency[r].2 / a.latency[r].2),
                    ratio(&|a, b| b.latency[r].3 / a.latency[r].3)
                );
            }
            println!();
        }
    }
}

impl Installed {
    fn check(&self, debezium: bool) -> anyhow::Result<()> {
        for (what, path, fix) in [
            (
                "the outbox-relay binary",
                &self.relay_bin,
                "build it: cargo build --release -p outbox-toolkit-relay --features cli (./dev bench does)",
            ),
            ("Kafka's jars", &self.kafka_libs, "run ./dev up"),
            (
                "Debezium's connector",
                &self.debezium_plugins,
                "run ./dev bench debezium (it installs the connector first)",
            ),
        ] {
            if !debezium && what != "the outbox-relay binary" {
                continue;
            }
            if !path.exists() {
                bail!("{what} not found at {}: {fix}", path.display());
            }
        }
        Ok(())
    }
}

/// Everything measured of one system in one run.
async fn measure_system(
    env: &Env,
    installed: &Installed,
    producers: &PgPool,
    system: System,
    rows: i64,
    load: &Load,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();

    // Drain (none with --rows 0).
    if rows > 0 {
        clean(env).await?;
        let topic = env.topic("side-drain").await?;
        if system.reads_slot() {
            env.fresh_slot(SLOT).await?;
        }
        fill(env, &topic, rows, system).await?;
        let running = spawn_system(env, installed, system, 5000)?;
        let counted = wait_for_records(env, &topic, rows as u64, &running).await;
        figures.rss_mib = running.peak_rss_mib();
        running.stop().await;
        figures.drain = counted?;
        env.drop_topic(&topic).await;
        env.drop_slot(SLOT).await;
    }

    // Commit-to-consume at each rate.
    for &rate in &load.rates {
        clean(env).await?;
        if system.reads_slot() {
            env.fresh_slot(SLOT).await?;
        }
        let topic = env.topic("side-latency").await?;
        let running = start(env, installed, system, 1000).await?;
        let m = latency(env, producers, &topic, system, rate, load, &running).await;
        if let (Ok(m), Some(_)) = (&m, &installed.keep_logs) {
            println!(
                "  {} at {rate}/s: the slowest event was committed at {} and consumed {:.0} ms later (log: {})",
                system.name(),
                m.worst_at.format("%H:%M:%S%.3f"),
                m.worst_ms,
                running.log.display()
            );
        }
        let m = m.map(|m| m.quantiles);
        figures.rss_mib = figures.rss_mib.max(running.peak_rss_mib());
        running.stop().await;
        env.drop_topic(&topic).await;
        env.drop_slot(SLOT).await;
        figures.latency.push(m?);
    }
    clean(env).await?;
    Ok(figures)
}

/// An empty outbox (Debezium leaves its rows; the relay leaves remembered
/// ids), vacuumed, and a checkpoint: a drain's backlog of 1,000,000
/// events writes more WAL than `max_wal_size` (1 GB by default), and the
/// checkpoints it starts otherwise run through the next measurement (set
/// W in BENCHMARKS.md). Needs superuser or `pg_checkpoint`; without, a note.
async fn clean(env: &Env) -> anyhow::Result<()> {
    env.pool
        .execute("TRUNCATE outbox, outbox_published_ids")
        .await?;
    env.pool
        .execute("VACUUM ANALYZE outbox, outbox_published_ids")
        .await?;
    if let Err(e) = env.pool.execute("CHECKPOINT").await {
        eprintln!(
            "note: CHECKPOINT refused ({e}): a checkpoint may run through the next measurement"
        );
    }
    Ok(())
}

/// `rows` events in transactions of 1,000: outbox rows, or table-less
/// events through `outbox_emit`; for `debezium-delete`, each transaction
/// deletes its rows after inserting them.
async fn fill(env: &Env, topic: &str, rows: i64, system: System) -> anyhow::Result<()> {
    let sql = if system.table_less() {
        "SELECT count(outbox_emit('bench', 'k' || (g % $4), 'bench.row', \
                jsonb_build_object('seq', g, 'pad', repeat('x', 170)), $1, \
                correlation_id => 'corr-' || g)) \
         FROM generate_series($2, $3) g"
    } else {
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload, correlation_id) \
         SELECT gen_random_uuid(), 'bench', 'k' || (g % $4), 'bench.row', $1, \
                jsonb_build_object('seq', g, 'pad', repeat('x', 170)), 'corr-' || g \
         FROM generate_series($2, $3) g"
    };
    let mut from = 1;
    while from <= rows {
        let to = (from + 999).min(rows);
        let mut tx = env.pool.begin().await?;
        sqlx::query(sql)
            .bind(topic)
            .bind(from)
            .bind(to)
            .bind(KEYS)
            .execute(&mut *tx)
            .await?;
        if system.producers_delete() {
            // The table held nothing else (`clean`).
            sqlx::query("DELETE FROM outbox").execute(&mut *tx).await?;
        }
        tx.commit().await?;
        from = to + 1;
    }
    Ok(())
}

// ------------------------------------------------------------ the systems

/// A system's process while it runs.
struct Running {
    child: Child,
    pid: u32,
    log: PathBuf,
    spawned: Instant,
}

impl Running {
    /// The process's peak resident set so far, MiB.
    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after 15 s.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn work_dir(installed: &Installed) -> PathBuf {
    match &installed.keep_logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("outbox-bench-side-{}", std::process::id())),
    }
}

/// A log file name of its own for each process started (`relay-3.log`),
/// so that kept logs are not overwritten by the next phase.
fn log_name(what: &str) -> String {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    format!("{what}-{}", STARTED.fetch_add(1, Ordering::Relaxed) + 1)
}

/// Starts `system` against the bench database.
fn spawn_system(
    env: &Env,
    installed: &Installed,
    system: System,
    batch_size: usize,
) -> anyhow::Result<Running> {
    let dir = work_dir(installed);
    std::fs::create_dir_all(&dir)?;
    match system {
        System::Debezium | System::DebeziumDelete => start_connect(env, installed, &dir),
        System::Poll | System::WalRows | System::WalTableLess => {
            start_relay(env, installed, system, batch_size, &dir)
        }
    }
}

/// Starts `system`, returning once it reads (for the systems reading a
/// slot: once the slot is active).
async fn start(
    env: &Env,
    installed: &Installed,
    system: System,
    batch_size: usize,
) -> anyhow::Result<Running> {
    let mut running = spawn_system(env, installed, system, batch_size)?;
    let started = running.spawned;
    loop {
        if let Some(status) = running.exited() {
            bail!(
                "{} exited at start ({status}); its log ({}):\n{}",
                system.name(),
                running.log.display(),
                running.log_tail()
            );
        }
        let ready = if system.reads_slot() {
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(SLOT)
            .fetch_one(&env.pool)
            .await?
        } else {
            started.elapsed() > Duration::from_millis(500)
        };
        if ready {
            return Ok(running);
        }
        if started.elapsed() > Duration::from_secs(120) {
            let tail = running.log_tail();
            running.stop().await;
            bail!(
                "{} did not start reading within 120 s; its log:\n{tail}",
                system.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_relay(
    env: &Env,
    installed: &Installed,
    system: System,
    batch_size: usize,
    dir: &Path,
) -> anyhow::Result<Running> {
    let log = dir.join(format!("{}.log", log_name("relay")));
    let mut cmd = Command::new(&installed.relay_bin);
    cmd.arg("run")
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--http-addr", RELAY_HTTP])
        .env("DATABASE_URL", &env.url)
        .env("KAFKA_BROKERS", &env.brokers)
        .env(
            "RUST_LOG",
            std::env::var("OUTBOX_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
        );
    if system.reads_slot() {
        cmd.args(["--source", "wal", "--slot", SLOT, "--publication", SLOT]);
    }
    cmd.args(&installed.relay_args);
    spawn(cmd, log)
}

fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Running> {
    let out = std::fs::File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id().context("the process has no pid")?;
    Ok(Running {
        child,
        pid,
        log,
        spawned: Instant::now(),
    })
}

/// Kafka Connect standalone with Debezium's PostgreSQL connector and its
/// outbox event router, mapped to the relay's table and headers.
fn start_connect(env: &Env, installed: &Installed, dir: &Path) -> anyhow::Result<Running> {
    let url = url::Url::parse(&env.url)?;
    let offsets = dir.join("connect.offsets");
    let _ = std::fs::remove_file(&offsets);
    let worker = include_str!("../debezium/worker.properties")
        .replace("@BROKERS@", &env.brokers)
        .replace(
            "@PLUGINS@",
            &installed.debezium_plugins.display().to_string(),
        )
        .replace("@OFFSETS@", &offsets.display().to_string())
        .replace("@REST@", CONNECT_REST);
    let connector = include_str!("../debezium/connector.properties")
        .replace("@HOST@", url.host_str().unwrap_or("127.0.0.1"))
        .replace("@PORT@", &url.port().unwrap_or(5432).to_string())
        .replace("@USER@", url.username())
        .replace("@PASSWORD@", url.password().unwrap_or(""))
        .replace("@DATABASE@", url.path().trim_start_matches('/'))
        .replace("@SLOT@", SLOT);
    std::fs::write(dir.join("worker.properties"), worker)?;
    std::fs::write(dir.join("connector.properties"), connector)?;
    // Kept logs say what Connect and Debezium were doing (INFO).
    let log_config = include_str!("../debezium/log4j2.yaml");
    let log_config = if installed.keep_logs.is_some() {
        log_config.replace("level: WARN", "level: INFO")
    } else {
        log_config.to_string()
    };
    std::fs::write(dir.join("log4j2.yaml"), log_config)?;
    let name = log_name("connect");
    let mut cmd = Command::new(&installed.java);
    cmd.args(["-Xms256m", "-Xmx1g"])
        .arg(format!(
            "-Xlog:gc*:file={}:time,uptime",
            dir.join(format!("{name}.gc.log")).display()
        ))
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.yaml").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", installed.kafka_libs.display()))
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(dir.join("worker.properties"))
        .arg(dir.join("connector.properties"));
    spawn(cmd, dir.join(format!("{name}.log")))
}

// ----------------------------------------------------------- measurements

fn watermark_consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-bench-side")
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Records on `topic`, counted from the partitions' high watermarks.
fn records_on(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<u64> {
    let mut n = 0;
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        n += (high - low) as u64;
    }
    Ok(n)
}

/// Waits until `rows` records are on `topic`; the rate from the first record
/// to the last.
async fn wait_for_records(
    env: &Env,
    topic: &str,
    rows: u64,
    running: &Running,
) -> anyhow::Result<f64> {
    let brokers = env.brokers.clone();
    let topic = topic.to_string();
    let pid = running.pid;
    let spawned = running.spawned;
    tokio::task::spawn_blocking(move || {
        let consumer = watermark_consumer(&brokers)?;
        let deadline = Instant::now() + Duration::from_secs(60 + rows / 500);
        // The last look that found nothing: the first record came after it.
        let mut before_first = spawned;
        loop {
            let n = records_on(&consumer, &topic)?;
            let now = Instant::now();
            if n == 0 {
                before_first = now;
            }
            if n >= rows {
                return Ok(n as f64 / now.duration_since(before_first).as_secs_f64());
            }
            if now > deadline || !Path::new(&format!("/proc/{pid}")).exists() {
                bail!("{n} of {rows} records on the topic when the wait ended");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await?
}

/// `rate` events/s for `seconds`, one per transaction; commit-to-consume
/// quantiles (achieved rate, p50, p99, p99.9 in ms).
async fn latency(
    env: &Env,
    producers: &PgPool,
    topic: &str,
    system: System,
    rate: u64,
    load: &Load,
    running: &Running,
) -> anyhow::Result<Latency> {
    // The warm-up seconds of load first, left out of the figures (a JVM
    // compiles its hot paths then).
    let warm_up = rate * load.warm_up;
    let total = rate * (load.seconds + load.warm_up);
    let base = Instant::now();
    let base_wall = chrono::Utc::now();
    let nanos = move || base.elapsed().as_nanos() as u64;
    let committed: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let consumed: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let seen = Arc::new(AtomicU64::new(0));
    let warm = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    // The consumer: every partition from the start of the fresh topic.
    let reader = {
        let (brokers, topic) = (env.brokers.clone(), topic.to_string());
        let (consumed, seen, warm, stop) =
            (consumed.clone(), seen.clone(), warm.clone(), stop.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "outbox-bench-side")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "100")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            while !stop.load(Ordering::Relaxed) {
                let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let m = m?;
                let at = nanos();
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or(b"{}"))
                    .context("a record whose value is not JSON")?;
                if v.get("warmup").is_some() {
                    warm.store(true, Ordering::Relaxed);
                } else if let Some(i) = v.get("i").and_then(|i| i.as_u64()) {
                    if let Some(slot) = consumed.get(i as usize) {
                        if slot.swap(at, Ordering::Relaxed) == 0 {
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(())
        })
    };

    let write = |pool: PgPool, topic: String, payload: serde_json::Value, key: String| async move {
        let e = NewEvent::new("bench", key, "bench.latency")
            .topic(&topic)
            .json_payload(&payload)?;
        if system.table_less() {
            emit(&pool, &e).await?;
        } else if system.producers_delete() {
            let mut tx = pool.begin().await?;
            let appended = append(&mut *tx, &e).await?;
            sqlx::query("DELETE FROM outbox WHERE id = $1")
                .bind(appended.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        } else {
            append(&pool, &e).await?;
        }
        anyhow::Ok(())
    };

    // Warm-up: one event through the whole path before the clock starts.
    let result = async {
        let started = Instant::now();
        write(
            producers.clone(),
            topic.to_string(),
            serde_json::json!({"warmup": true}),
            "k0".into(),
        )
        .await?;
        while !warm.load(Ordering::Relaxed) {
            if started.elapsed() > Duration::from_secs(90) {
                bail!(
                    "the warm-up event did not arrive within 90 s; the system's log:\n{}",
                    running.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let per_producer = Duration::from_secs_f64(PRODUCERS as f64 / rate as f64);
        let started = Instant::now();
        let tasks = (0..PRODUCERS).map(|p| {
            let (pool, topic, committed) =
                (producers.clone(), topic.to_string(), committed.clone());
            let write = &write;
            async move {
                let mut tick = tokio::time::interval(per_producer);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut i = p;
                while i < total {
                    tick.tick().await;
                    write(
                        pool.clone(),
                        topic.clone(),
                        serde_json::json!({ "i": i }),
                        format!("k{}", i % KEYS as u64),
                    )
                    .await?;
                    committed[i as usize].store(nanos(), Ordering::Relaxed);
                    i += PRODUCERS;
                }
                anyhow::Ok(())
            }
        });
        for r in futures::future::join_all(tasks).await {
            r?;
        }
        let achieved = total as f64 / started.elapsed().as_secs_f64();
        let waiting = Instant::now();
        while seen.load(Ordering::Relaxed) < total {
            if waiting.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{} of {total} events arrived within 120 s of the last commit",
                    seen.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(achieved)
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    reader.await??;
    let achieved = result?;

    // (commit time, ms until consumed) of every counted event.
    let mut waits: Vec<(u64, f64)> = committed
        .iter()
        .zip(consumed.iter())
        .skip(warm_up as usize)
        .map(|(c, r)| {
            let c = c.load(Ordering::Relaxed);
            // An event can arrive before its producer saw the commit return.
            (c, r.load(Ordering::Relaxed).saturating_sub(c) as f64 / 1e6)
        })
        .collect();
    waits.sort_by(|a, b| a.1.total_cmp(&b.1));
    let q = |p: f64| waits[((waits.len() as f64 * p).ceil() as usize).clamp(1, waits.len()) - 1].1;
    let (worst_commit, worst_ms) = waits.last().copied().unwrap_or_default();
    Ok(Latency {
        quantiles: (achieved, q(0.50), q(0.99), q(0.999)),
        worst_at: base_wall + chrono::Duration::nanoseconds(worst_commit as i64),
        worst_ms,
    })
}

/// One latency run's figures.
struct Latency {
    /// Achieved rate, p50, p99, p99.9 (ms).
    quantiles: (f64, f64, f64, f64),
    /// When the slowest event was committed (to find it in the logs).
    worst_at: chrono::DateTime<chrono::Utc>,
    /// How long it took to be consumed, ms.
    worst_ms: f64,
}
