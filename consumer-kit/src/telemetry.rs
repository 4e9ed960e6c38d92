//! Metric names and their recording helpers: every metric consumer-kit
//! emits is defined here, once, through the `metrics` facade. Install any
//! recorder (for example `metrics-exporter-prometheus`) to export them.
//!
//! Every metric carries a `group` label (the consumer group), except the
//! saga metrics, which carry the saga's name.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Events applied (handler committed), by `group`, `topic`, `event_type`.
pub const PROCESSED: &str = "consumer_kit_processed_total";
/// Redelivered events skipped by dedupe, by `group`, `topic`.
pub const DUPLICATES: &str = "consumer_kit_duplicates_total";
/// Handler retries after a retryable error, by `group`, `topic`.
pub const RETRIES: &str = "consumer_kit_retries_total";
/// Messages sent to the dead-letter topic, by `group`, `topic`, `kind`
/// (`undecodable`, `unknown_event_type`, `permanent`, `retries_exhausted`).
pub const DEAD_LETTERED: &str = "consumer_kit_dead_lettered_total";
/// Messages skipped because no handler takes their event type (with
/// [`crate::UnknownEventType::Skip`]), by `group`, `topic`.
pub const SKIPPED: &str = "consumer_kit_skipped_total";
/// Failures of the database or of the dead-letter publish, retried with
/// backoff, by `group`, `kind` (`database`, `dead_letter`).
pub const INFRA_ERRORS: &str = "consumer_kit_infrastructure_errors_total";
/// Time in the handler's transaction (dedupe insert, handler, commit), by
/// `group`, `event_type`.
pub const HANDLER_DURATION: &str = "consumer_kit_handler_duration_seconds";
/// Messages not yet consumed, per `group`, `topic`, `partition` (high
/// watermark minus the consumer's position, from librdkafka statistics).
pub const LAG: &str = "consumer_kit_lag";
/// `processed_events` rows deleted by the TTL cleanup, by `group`.
pub const CLEANED: &str = "consumer_kit_cleanup_deleted_total";
/// Offset commits the broker refused or that failed, by `group`. While they
/// fail, processing goes on, but a restart redelivers everything since the
/// last commit that succeeded (dedupe skips it).
pub const OFFSET_COMMIT_FAILURES: &str = "consumer_kit_offset_commit_failures_total";

/// Retries deferred to the outbox (`defer_retries_after`), by `group` and
/// `topic`.
pub const DEFERRED: &str = "consumer_kit_deferred_retries_total";

pub(crate) fn deferred(group: &str, topic: &str) {
    counter!(DEFERRED, "group" => group.to_string(), "topic" => topic.to_string()).increment(1);
}

/// Saga transitions applied, by `saga`, `from` and `to` state.
pub const SAGA_TRANSITIONS: &str = "consumer_kit_saga_transitions_total";
/// Saga timeout events, by `saga` and `result`: `fired` (the step was
/// still waiting) or `stale` (cancelled, replaced or outlived: a no-op).
pub const SAGA_TIMEOUTS: &str = "consumer_kit_saga_timeouts_total";
/// Saga instances finished, by `saga` and `status` (`completed`, or
/// `failed`: compensated, or abandoned by an operator).
pub const SAGA_FINISHED: &str = "consumer_kit_saga_finished_total";
/// Commands sent to compensate, by `saga`: those of transitions that fail
/// an instance or act on a failed one.
pub const SAGA_COMPENSATIONS: &str = "consumer_kit_saga_compensations_total";
/// Events that did not fit their saga instance's state, by `saga`.
pub const SAGA_UNEXPECTED: &str = "consumer_kit_saga_unexpected_total";
/// Saga instances by `saga`, `status` and `state` (refreshed every 15 s).
pub const SAGA_INSTANCES: &str = "consumer_kit_saga_instances";

pub(crate) fn saga_transition(saga: &'static str, from: &str, to: &str) {
    counter!(SAGA_TRANSITIONS, "saga" => saga, "from" => from.to_string(), "to" => to.to_string())
        .increment(1);
}

pub(crate) fn saga_timeout(saga: &'static str, result: &'static str) {
    counter!(SAGA_TIMEOUTS, "saga" => saga, "result" => result).increment(1);
}

pub(crate) fn saga_finished(saga: &str, status: &'static str) {
    counter!(SAGA_FINISHED, "saga" => saga.to_string(), "status" => status).increment(1);
}

pub(crate) fn saga_compensations(saga: &'static str, n: usize) {
    if n > 0 {
        counter!(SAGA_COMPENSATIONS, "saga" => saga).increment(n as u64);
    }
}

pub(crate) fn saga_unexpected(saga: &'static str) {
    counter!(SAGA_UNEXPECTED, "saga" => saga).increment(1);
}

pub(crate) fn saga_instances(saga: &str, status: &str, state: &str, n: i64) {
    gauge!(SAGA_INSTANCES, "saga" => saga.to_string(), "status" => status.to_string(), "state" => state.to_string())
        .set(n as f64);
}

/// Events parked behind a dead-lettered event of their key
/// ([`crate::Ordering::ParkKey`]), by `group`, `topic`.
pub const PARKED: &str = "consumer_kit_parked_total";

/// Keys blocked behind a dead-lettered event, by `group` (park-key only).
pub const PARKED_KEYS: &str = "consumer_kit_parked_keys";
/// Events parked behind blocked keys, by `group` (park-key only).
pub const PARKED_EVENTS: &str = "consumer_kit_parked_events";
/// Age of the oldest block, in seconds (0 when none), by `group` (park-key
/// only).
pub const OLDEST_PARKED_AGE: &str = "consumer_kit_oldest_parked_age_seconds";

pub(crate) fn parked_figures(group: &str, keys: i64, events: i64, oldest: f64) {
    gauge!(PARKED_KEYS, "group" => group.to_string()).set(keys as f64);
    gauge!(PARKED_EVENTS, "group" => group.to_string()).set(events as f64);
    gauge!(OLDEST_PARKED_AGE, "group" => group.to_string()).set(oldest);
}

pub(crate) fn parked(group: &str, topic: &str) {
    counter!(PARKED, "group" => group.to_string(), "topic" => topic.to_string()).increment(1);
}

/// 1 while the consumer can make progress ([`crate::Health`]), else 0, by
/// `group`.
pub const READY: &str = "consumer_kit_ready";
/// 1 while connected to a Kafka broker, else 0, by `group`.
pub const BROKER_CONNECTED: &str = "consumer_kit_broker_connected";
/// 0 while the consumer's database is known to be unreachable, else 1, by
/// `group`.
pub const DATABASE_CONNECTED: &str = "consumer_kit_database_connected";
/// Partitions assigned to this member, by `group`.
pub const ASSIGNED_PARTITIONS: &str = "consumer_kit_assigned_partitions";
/// Partitions of the group's topics that no member owns, as the group
/// coordinator says, by `group` (absent until known).
pub const UNOWNED_PARTITIONS: &str = "consumer_kit_unowned_partitions";

pub(crate) fn health(
    group: &str,
    ready: bool,
    broker: bool,
    database: bool,
    assigned: usize,
    unowned: Option<usize>,
) {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge!(READY, "group" => group.to_string()).set(flag(ready));
    gauge!(BROKER_CONNECTED, "group" => group.to_string()).set(flag(broker));
    gauge!(DATABASE_CONNECTED, "group" => group.to_string()).set(flag(database));
    gauge!(ASSIGNED_PARTITIONS, "group" => group.to_string()).set(assigned as f64);
    if let Some(n) = unowned {
        gauge!(UNOWNED_PARTITIONS, "group" => group.to_string()).set(n as f64);
    }
}

pub(crate) fn processed(group: &str, topic: &str, event_type: &str, took: Duration) {
    counter!(PROCESSED, "group" => group.to_string(), "topic" => topic.to_string(), "event_type" => event_type.to_string())
        .increment(1);
    histogram!(HANDLER_DURATION, "group" => group.to_string(), "event_type" => event_type.to_string())
        .record(took.as_secs_f64());
}

pub(crate) fn duplicate(group: &str, topic: &str) {
    counter!(DUPLICATES, "group" => group.to_string(), "topic" => topic.to_string()).increment(1);
}

pub(crate) fn retry(group: &str, topic: &str) {
    counter!(RETRIES, "group" => group.to_string(), "topic" => topic.to_string()).increment(1);
}

pub(crate) fn dead_lettered(group: &str, topic: &str, kind: &'static str) {
    counter!(DEAD_LETTERED, "group" => group.to_string(), "topic" => topic.to_string(), "kind" => kind)
        .increment(1);
}

pub(crate) fn skipped(group: &str, topic: &str) {
    counter!(SKIPPED, "group" => group.to_string(), "topic" => topic.to_string()).increment(1);
}

pub(crate) fn infra_error(group: &str, kind: &'static str) {
    counter!(INFRA_ERRORS, "group" => group.to_string(), "kind" => kind).increment(1);
}

pub(crate) fn lag(group: &str, topic: &str, partition: i32, lag: i64) {
    gauge!(LAG, "group" => group.to_string(), "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag as f64);
}

pub(crate) fn offset_commit_failed(group: &str) {
    counter!(OFFSET_COMMIT_FAILURES, "group" => group.to_string()).increment(1);
}

pub(crate) fn cleaned(group: &str, n: u64) {
    if n > 0 {
        counter!(CLEANED, "group" => group.to_string()).increment(n);
    }
}

/// Running totals of one consumer, readable in-process (for tests, demos and
/// dashboards) through [`crate::Consumer::stats`]; readiness is
/// [`crate::Consumer::health`]. The same events
/// are counted in the metrics above.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    processed: std::sync::atomic::AtomicU64,
    duplicates: std::sync::atomic::AtomicU64,
    retries: std::sync::atomic::AtomicU64,
    dead_lettered: std::sync::atomic::AtomicU64,
    skipped: std::sync::atomic::AtomicU64,
    offset_commit_failures: std::sync::atomic::AtomicU64,
    broker_outages: std::sync::atomic::AtomicU64,
    database_outages: std::sync::atomic::AtomicU64,
    parked: std::sync::atomic::AtomicU64,
}

/// A copy of [`ConsumerStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Events applied.
    pub processed: u64,
    /// Redelivered events skipped by dedupe.
    pub duplicates: u64,
    /// Handler retries.
    pub retries: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages skipped for want of a handler.
    pub skipped: u64,
    /// Offset commits that failed.
    pub offset_commit_failures: u64,
    /// Times the consumer lost every broker connection.
    pub broker_outages: u64,
    /// Times the consumer's database became unreachable.
    pub database_outages: u64,
    /// Events parked behind a dead-lettered event of their key (applied
    /// later, when the key is released, and then counted as processed).
    pub parked: u64,
}

impl ConsumerStats {
    /// The totals now.
    pub fn snapshot(&self) -> StatsSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        StatsSnapshot {
            processed: self.processed.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            retries: self.retries.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            offset_commit_failures: self.offset_commit_failures.load(Relaxed),
            broker_outages: self.broker_outages.load(Relaxed),
            database_outages: self.database_outages.load(Relaxed),
            parked: self.parked.load(Relaxed),
        }
    }

    pub(crate) fn add(&self, field: StatField) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match field {
            StatField::Processed => &self.processed,
            StatField::Duplicate => &self.duplicates,
            StatField::Retry => &self.retries,
            StatField::DeadLettered => &self.dead_lettered,
            StatField::Skipped => &self.skipped,
            StatField::OffsetCommitFailure => &self.offset_commit_failures,
            StatField::BrokerOutage => &self.broker_outages,
            StatField::DatabaseOutage => &self.database_outages,
            StatField::Parked => &self.parked,
        };
        counter.fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum StatField {
    Processed,
    Duplicate,
    Retry,
    DeadLettered,
    Skipped,
    OffsetCommitFailure,
    BrokerOutage,
    DatabaseOutage,
    Parked,
}
