//! [`Health`]: whether the consumer can make progress now, for readiness
//! probes and dashboards.
//!
//! | source | how it is known |
//! |---|---|
//! | phase | the consumer's life: starting, running, stopping, stopped |
//! | broker | librdkafka's statistics every second and its `AllBrokersDown` error ([`outbox_kafka::Reach`]) |
//! | database | every transaction's outcome, and a probe (`SELECT 1`) every [`DB_PROBE_EVERY`] while idle, every second while down |
//! | progress | when a message was last settled (applied, duplicate, skipped or dead-lettered) |
//! | partitions | assigned to this member; and those of its topics that no member of the group owns, from the group coordinator every [`GROUP_CHECK_EVERY`] |
//!
//! Ready means running, the broker connected and the database not known to
//! be down (`assess`). Partitions nobody owns do not make this member
//! unready (they are the group's problem, not its own) but are reported, in
//! [`HealthReport::unowned_partitions`] and the
//! `consumer_kit_unowned_partitions` gauge.

use std::{
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use outbox_kafka::{Connection, Reach};
use tokio_util::sync::CancellationToken;

use crate::telemetry::{self, ConsumerStats, StatField};

/// How often the database is probed while the consumer is idle and the
/// database up; while it is down, every second.
pub const DB_PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often the group's assignment is read to find unowned partitions.
pub const GROUP_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Where the consumer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Phase {
    /// Checking its schema and topics, joining the group.
    Starting = 0,
    /// Subscribed and consuming.
    Running = 1,
    /// Shutdown asked: draining, committing, leaving the group.
    Stopping = 2,
    /// Stopped (or failed).
    Stopped = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Stopping,
            _ => Phase::Stopped,
        }
    }

    /// The phase's name: `starting`, `running`, `stopping`, `stopped`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// The consumer's health at one moment, from [`Health::now`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Whether the consumer can make progress now.
    pub ready: bool,
    /// Why, in words: `ready: consuming 3 partitions` or
    /// `not ready: database unreachable for 4s (…)`.
    pub reason: String,
    /// Where the consumer is in its life.
    pub phase: Phase,
    /// The connection to the Kafka cluster.
    pub broker: Connection,
    /// The connection to the consumer's database.
    pub database: Connection,
    /// Time since a message was last settled; `None` before the first.
    pub since_progress: Option<Duration>,
    /// Partitions assigned to this member.
    pub assigned_partitions: usize,
    /// Partitions of its topics that no member of the group owns, as the
    /// group coordinator last said; `None` until known.
    pub unowned_partitions: Option<usize>,
}

/// The consumer's health, updated as it works; cheap to read.
#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    broker: Reach,
    database: Reach,
    last_progress: Mutex<Option<Instant>>,
    assigned: AtomicUsize,
    unowned: Mutex<Option<usize>>,
    stats: Arc<ConsumerStats>,
    group: String,
    /// "Kafka", or "RabbitMQ" for the RabbitMQ source.
    broker_name: std::sync::OnceLock<&'static str>,
}

impl Health {
    pub(crate) fn new(group: &str, stats: Arc<ConsumerStats>) -> Self {
        Self {
            phase: AtomicU8::new(Phase::Starting as u8),
            broker: Reach::default(),
            database: Reach::default(),
            last_progress: Mutex::new(None),
            assigned: AtomicUsize::new(0),
            unowned: Mutex::new(None),
            stats,
            group: group.to_string(),
            broker_name: std::sync::OnceLock::new(),
        }
    }

    /// The health now.
    pub fn now(&self) -> HealthReport {
        let phase = Phase::from_u8(self.phase.load(Ordering::SeqCst));
        let broker = self.broker.now();
        let database = self.database.now();
        let assigned = self.assigned.load(Ordering::SeqCst);
        let unowned = *lock(&self.unowned);
        let broker_name = self.broker_name.get().copied().unwrap_or("Kafka");
        let (ready, reason) = assess(phase, broker_name, &broker, &database, assigned, unowned);
        HealthReport {
            ready,
            reason,
            phase,
            broker,
            database,
            since_progress: lock(&self.last_progress).map(|t| t.elapsed()),
            assigned_partitions: assigned,
            unowned_partitions: unowned,
        }
    }

    /// Whether the consumer can make progress now.
    pub fn is_ready(&self) -> bool {
        self.now().ready
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
        self.publish();
    }

    /// A message settled: progress, and the database answered.
    pub(crate) fn progressed(&self) {
        *lock(&self.last_progress) = Some(Instant::now());
    }

    pub(crate) fn database_up(&self) {
        self.database.up();
    }

    pub(crate) fn database_down(&self, why: &str) {
        if !matches!(self.database.now(), Connection::Down { .. }) {
            self.stats.add(StatField::DatabaseOutage);
        }
        self.database.down(why.to_string());
    }

    /// Names the broker in the reasons ("Kafka" unless set).
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn set_broker_name(&self, name: &'static str) {
        let _ = self.broker_name.set(name);
    }

    /// The broker answered (RabbitMQ: connected and consuming).
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn broker_up(&self) {
        self.broker.up();
        self.publish();
    }

    /// The broker is unreachable, for this reason.
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn broker_down(&self, why: &str) {
        let was_down = matches!(self.broker.now(), Connection::Down { .. });
        self.broker.down(why.to_string());
        self.count_broker_outage(was_down);
        self.publish();
    }

    pub(crate) fn broker_saw(&self, statistics: &rdkafka::Statistics) {
        let was_down = matches!(self.broker.now(), Connection::Down { .. });
        self.broker.saw(statistics);
        self.count_broker_outage(was_down);
    }

    pub(crate) fn broker_error(&self, error: &rdkafka::error::KafkaError) {
        let was_down = matches!(self.broker.now(), Connection::Down { .. });
        self.broker.saw_error(error);
        self.count_broker_outage(was_down);
    }

    fn count_broker_outage(&self, was_down: bool) {
        if !was_down && matches!(self.broker.now(), Connection::Down { .. }) {
            self.stats.add(StatField::BrokerOutage);
        }
    }

    pub(crate) fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Ordering::SeqCst);
    }

    pub(crate) fn set_unowned(&self, n: usize) {
        *lock(&self.unowned) = Some(n);
    }

    /// Sets the health gauges from the state now.
    pub(crate) fn publish(&self) {
        let report = self.now();
        telemetry::health(
            &self.group,
            report.ready,
            report.broker == Connection::Up,
            !matches!(report.database, Connection::Down { .. }),
            report.assigned_partitions,
            report.unowned_partitions,
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a consumer in this state can make progress, and why.
pub(crate) fn assess(
    phase: Phase,
    broker_name: &str,
    broker: &Connection,
    database: &Connection,
    assigned: usize,
    unowned: Option<usize>,
) -> (bool, String) {
    let down = |what: &str, c: &Connection| match c {
        Connection::Down { down_for, why } => Some(format!(
            "{what} unreachable for {}s ({why})",
            down_for.as_secs()
        )),
        _ => None,
    };
    let not_ready = |why: String| (false, format!("not ready: {why}"));
    match phase {
        Phase::Starting => {
            return not_ready("starting: checking the schema and topics, joining the group".into())
        }
        Phase::Stopping => return not_ready("stopping".into()),
        Phase::Stopped => return not_ready("stopped".into()),
        Phase::Running => {}
    }
    if let Some(why) = down(broker_name, broker) {
        return not_ready(why);
    }
    if *broker == Connection::NotYet {
        return not_ready(format!("connecting to {broker_name}"));
    }
    if let Some(why) = down("the database", database) {
        return not_ready(why);
    }
    let mut reason = if broker_name == "Kafka" {
        format!("ready: consuming {assigned} partition{}", plural(assigned))
    } else {
        format!("ready: consuming its {broker_name} queue")
    };
    if let Some(n) = unowned.filter(|n| *n > 0) {
        reason.push_str(&format!(
            "; {n} partition{} of its topics ha{} no member",
            plural(n),
            if n == 1 { "s" } else { "ve" }
        ));
    }
    (true, reason)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Probes the database while the consumer runs: every [`DB_PROBE_EVERY`]
/// while it is up, every second while it is down, so an idle consumer's
/// health still tells a database outage. Refreshes the health gauges each
/// time.
pub(crate) async fn watch_database(
    pool: sqlx::PgPool,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    loop {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&pool),
        )
        .await;
        match probe {
            Ok(Ok(_)) => health.database_up(),
            Ok(Err(e)) => health.database_down(&e.to_string()),
            Err(_) => health.database_down("no answer to a probe within 2 s"),
        }
        health.publish();
        let every = match health.database.now() {
            Connection::Down { .. } => Duration::from_secs(1),
            _ => DB_PROBE_EVERY,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The partitions of each member's assignment in a classic consumer
/// group's `MemberAssignment` (version, then `[topic, [partition]]`, then
/// user data). `None` when the bytes do not parse.
pub(crate) fn assigned_in(bytes: &[u8]) -> Option<Vec<(String, i32)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(slice)
    };
    let _version = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let name = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
        let partitions = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..partitions.max(0) {
            let p = i32::from_be_bytes(take(4)?.try_into().ok()?);
            out.push((name.clone(), p));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_running_a_connected_broker_and_no_database_outage() {
        let down = Connection::Down {
            down_for: Duration::from_secs(3),
            why: "refused".into(),
        };
        let ok = |p, b: &Connection, d: &Connection| assess(p, "Kafka", b, d, 3, Some(0));
        assert_eq!(
            ok(Phase::Running, &Connection::Up, &Connection::Up),
            (true, "ready: consuming 3 partitions".into())
        );
        // The database not heard from yet is no reason to refuse work.
        assert!(ok(Phase::Running, &Connection::Up, &Connection::NotYet).0);
        let (ready, why) = ok(Phase::Running, &down, &Connection::Up);
        assert!(
            !ready && why.contains("Kafka unreachable for 3s (refused)"),
            "{why}"
        );
        let (ready, why) = ok(Phase::Running, &Connection::Up, &down);
        assert!(!ready && why.contains("the database unreachable"), "{why}");
        assert!(!ok(Phase::Running, &Connection::NotYet, &Connection::Up).0);
        for phase in [Phase::Starting, Phase::Stopping, Phase::Stopped] {
            let (ready, why) = ok(phase, &Connection::Up, &Connection::Up);
            assert!(!ready && why.contains(phase.name()), "{why}");
        }
        let (ready, why) = assess(
            Phase::Running,
            "Kafka",
            &Connection::Up,
            &Connection::Up,
            1,
            Some(2),
        );
        assert!(ready, "unowned partitions are the group's problem");
        assert_eq!(
            why,
            "ready: consuming 1 partition; 2 partitions of its topics have no member"
        );
    }

    #[test]
    fn member_assignments_parse_and_garbage_does_not() {
        // version 0; topics: "orders" [0, 2], "a" [5]; user data empty.
        let mut b = vec![0, 0, 0, 0, 0, 2];
        b.extend([0, 6]);
        b.extend(b"orders");
        b.extend([0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2]);
        b.extend([0, 1, b'a', 0, 0, 0, 1, 0, 0, 0, 5]);
        b.extend([0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            assigned_in(&b),
            Some(vec![
                ("orders".into(), 0),
                ("orders".into(), 2),
                ("a".into(), 5)
            ])
        );
        assert_eq!(assigned_in(&b[..9]), None, "cut short");
        assert_eq!(assigned_in(&[]), None);
    }

    #[test]
    fn outages_are_counted_once_each() {
        let stats = Arc::new(ConsumerStats::default());
        let h = Health::new("g", Arc::clone(&stats));
        h.database_down("refused");
        h.database_down("refused again");
        h.database_up();
        h.database_down("refused");
        assert_eq!(stats.snapshot().database_outages, 2);
    }
}
