//! Metric names and their recording helpers: every metric the relay emits
//! is defined here, once. Exported in Prometheus format on `/metrics`.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Rows published and acknowledged, by topic.
pub const PUBLISHED: &str = "outbox_relay_published_total";
/// Rows that failed to publish, by `kind` (`permanent` or `transient`).
pub const PUBLISH_ERRORS: &str = "outbox_relay_publish_errors_total";
/// Rows per claimed batch.
pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
/// Claim, publish and commit of one batch.
pub const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
/// From the row's insert (`created_at`) to Kafka's acknowledgement.
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
/// Rows waiting to be published.
pub const PENDING: &str = "outbox_relay_pending_rows";
/// Age of the oldest pending row.
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
/// Rows in the failed state.
pub const FAILED: &str = "outbox_relay_failed_rows";
/// Delayed rows waiting for their `not_before` time.
pub const DELAYED: &str = "outbox_relay_delayed_rows";
/// Delayed rows made pending once due (released), by this relay.
pub const DELAYED_RELEASED: &str = "outbox_relay_delayed_released_total";
/// How late the most overdue row of each release was, after its
/// `not_before` time (the check interval bounds it while the database keeps
/// up).
pub const DELAYED_RELEASE_LATENESS: &str = "outbox_relay_delayed_release_lateness_seconds";
/// Seconds until the earliest delayed row is due; 0 when none waits.
pub const DELAYED_NEXT_DUE: &str = "outbox_relay_delayed_next_due_seconds";
/// Key partitions this relay owns.
pub const PARTITIONS_OWNED: &str = "outbox_relay_partitions_owned";
/// Relays with a live lease, as this relay last saw them.
pub const LIVE_RELAYS: &str = "outbox_relay_live_relays";
/// Partitions this relay took over (from a free pool or a relay that died).
pub const PARTITIONS_ACQUIRED: &str = "outbox_relay_partitions_acquired_total";
/// Partitions this relay handed to other relays (rebalancing).
pub const PARTITIONS_RELEASED: &str = "outbox_relay_partitions_released_total";
/// Pending rows per owned partition, by `partition`.
pub const PARTITION_PENDING: &str = "outbox_relay_partition_pending_rows";
/// Age of the oldest pending row per owned partition, by `partition`.
pub const PARTITION_OLDEST_PENDING_AGE: &str = "outbox_relay_partition_oldest_pending_age_seconds";

/// Times the relay woke from waiting for rows, by `by`: `notify` (a
/// producer's notification, or a partition take-over or a lost LISTEN
/// connection, which wake the relay the same way) or `timer` (the poll
/// interval, or the short re-check after raising the waiting flag), or
/// `linger` (the short naps between claims, flag down, for a moment after
/// a claim found rows: steady under a steady load). A steady stream of
/// `timer` wake-ups while rows keep coming means notifications do not
/// arrive.
pub const WAKEUPS: &str = "outbox_relay_wakeups_total";

/// Exactly-once mode: Kafka transactions ended, by `result`: `committed`,
/// `aborted` (nothing of it visible; its rows are sent again) or `unknown`
/// (settled from the checkpoint, as after a crash).
pub const TRANSACTIONS: &str = "outbox_relay_transactions_total";
/// Exactly-once mode: how long a Kafka transaction's commit took.
pub const TRANSACTION_COMMIT: &str = "outbox_relay_transaction_commit_seconds";
/// Exactly-once mode: fencing events, by `fenced`: `another relay` (this
/// relay fenced a relay whose lease ran out before taking its partitions)
/// or `this relay` (another relay fenced this one).
pub const FENCED: &str = "outbox_relay_fenced_total";
/// Exactly-once mode: rows already committed in Kafka whose database side
/// was finished from a checkpoint, without sending them again.
pub const CHECKPOINT_FINISHED: &str = "outbox_relay_checkpoint_finished_rows_total";

/// WAL source: WAL that PostgreSQL keeps on disk for the slot (current
/// position − the slot's restart position), in bytes.
pub const WAL_RETAINED: &str = "outbox_relay_wal_retained_bytes";
/// WAL source: WAL written since the slot's confirmed position, in bytes
/// (what a restart would read again, and more).
pub const WAL_LAG: &str = "outbox_relay_wal_lag_bytes";
/// WAL source: the slot's confirmed position, as a number (the LSN's 64
/// bits): everything before it is published.
pub const WAL_CONFIRMED: &str = "outbox_relay_wal_confirmed_lsn";

/// RabbitMQ sink: 1 while the connection is open and not blocked, 0
/// otherwise (closed, refused, or blocked by a memory or disk alarm).
pub const RABBITMQ_CONNECTION: &str = "outbox_relay_rabbitmq_connection_up";
/// RabbitMQ sink: connections opened (the first, and one after each loss).
pub const RABBITMQ_CONNECTS: &str = "outbox_relay_rabbitmq_connects_total";

/// Histogram buckets (seconds) for the latency metrics.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
/// Histogram buckets for [`BATCH_SIZE`].
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

pub(crate) fn published(topic: &str, n: u64) {
    counter!(PUBLISHED, "topic" => topic.to_string()).increment(n);
}

pub(crate) fn publish_errors(kind: &'static str, n: u64) {
    if n > 0 {
        counter!(PUBLISH_ERRORS, "kind" => kind).increment(n);
    }
}

pub(crate) fn batch(size: usize, took: Duration) {
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(BATCH_DURATION).record(took.as_secs_f64());
}

pub(crate) fn commit_to_ack(seconds: f64) {
    histogram!(COMMIT_TO_ACK).record(seconds.max(0.0));
}

pub(crate) fn backlog(stats: &crate::store::Stats) {
    gauge!(PENDING).set(stats.pending as f64);
    gauge!(OLDEST_PENDING_AGE).set(stats.oldest_pending_age_seconds);
    gauge!(FAILED).set(stats.failed as f64);
    gauge!(DELAYED).set(stats.delayed as f64);
}

pub(crate) fn delayed_released(rows: u64, most_late_by: f64) {
    counter!(DELAYED_RELEASED).increment(rows);
    histogram!(DELAYED_RELEASE_LATENESS).record(most_late_by.max(0.0));
}

pub(crate) fn delayed_next_due(due_in: Option<Duration>) {
    gauge!(DELAYED_NEXT_DUE).set(due_in.map_or(0.0, |d| d.as_secs_f64()));
}

pub(crate) fn ownership(owned: usize, live_relays: i32) {
    gauge!(PARTITIONS_OWNED).set(owned as f64);
    gauge!(LIVE_RELAYS).set(live_relays as f64);
}

pub(crate) fn partitions_acquired(n: usize) {
    counter!(PARTITIONS_ACQUIRED).increment(n as u64);
}

pub(crate) fn partitions_released(n: usize) {
    counter!(PARTITIONS_RELEASED).increment(n as u64);
}

pub(crate) fn partition_backlog(partition: i32, pending: i64, oldest_age_seconds: f64) {
    let p = partition.to_string();
    gauge!(PARTITION_PENDING, "partition" => p.clone()).set(pending as f64);
    gauge!(PARTITION_OLDEST_PENDING_AGE, "partition" => p).set(oldest_age_seconds);
}

pub(crate) fn wakeup(by: &'static str) {
    counter!(WAKEUPS, "by" => by).increment(1);
}

pub(crate) fn transaction(result: &'static str) {
    counter!(TRANSACTIONS, "result" => result).increment(1);
}

pub(crate) fn commit_latency(took: Duration) {
    histogram!(TRANSACTION_COMMIT).record(took.as_secs_f64());
}

pub(crate) fn fenced(who: &'static str) {
    counter!(FENCED, "fenced" => who).increment(1);
}

pub(crate) fn checkpoint_finished(rows: usize) {
    counter!(CHECKPOINT_FINISHED).increment(rows as u64);
}

/// Records the slot's figures (WAL source).
pub fn wal_slot(retained: i64, lag: i64, confirmed: u64) {
    gauge!(WAL_RETAINED).set(retained as f64);
    gauge!(WAL_LAG).set(lag as f64);
    gauge!(WAL_CONFIRMED).set(confirmed as f64);
}

/// The RabbitMQ connection as last seen (`up`: open and not blocked).
pub(crate) fn rabbitmq_connection(up: bool) {
    gauge!(RABBITMQ_CONNECTION).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn rabbitmq_connected() {
    counter!(RABBITMQ_CONNECTS).increment(1);
}
