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
/// 1 while this relay holds the claim lock, else 0.
pub const LEADER: &str = "outbox_relay_leader";

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
}

pub(crate) fn leader(is_leader: bool) {
    gauge!(LEADER).set(if is_leader { 1.0 } else { 0.0 });
}
