//! Keeping `processed_events` small: the background TTL cleanup, and the
//! start-up check that the TTL covers how far back a replay can reach.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, ResourceSpecifier},
    error::KafkaError,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{dedupe, kafka_config::client_config, process::Shared};

/// Runs [`dedupe::delete_expired`] for the consumer's group every `every`,
/// until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    let cfg = &shared.cfg;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let work = dedupe::delete_expired(
            &shared.pool,
            &cfg.group_id,
            cfg.processed_ttl,
            cfg.cleanup_batch_size,
        );
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = work => r,
        };
        match result {
            Ok(0) => {}
            Ok(n) => {
                info!(group = %cfg.group_id, deleted = n, "removed expired processed_events rows")
            }
            Err(e) => {
                warn!(group = %cfg.group_id, error = %e, "processed_events cleanup failed; trying again next interval")
            }
        }
    }
}

/// A topic's retention compared with the dedupe TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionCheck {
    /// The topic.
    pub topic: String,
    /// Its `retention.ms`; `None` when retention is unlimited.
    pub retention: Option<Duration>,
    /// Whether the TTL is at least the retention: a replay from the oldest
    /// retained record then still finds every event it applied.
    pub covered: bool,
}

impl RetentionCheck {
    /// The warning for a check that is not covered.
    pub fn warning(&self, ttl: Duration) -> String {
        let retention = match self.retention {
            Some(r) => format!("{}s", r.as_secs()),
            None => "unlimited".into(),
        };
        format!(
            "processed_ttl ({}s) is shorter than the retention of topic {} ({retention}): replaying the topic from its start, or a redelivery older than the TTL, would apply those events again. Raise processed_ttl or lower the topic's retention.ms",
            ttl.as_secs(),
            self.topic
        )
    }
}

/// Reads each topic's `retention.ms` from the broker and compares it with
/// `ttl`.
pub async fn retention_check(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[String],
    ttl: Duration,
) -> Result<Vec<RetentionCheck>, KafkaError> {
    let admin: AdminClient<outbox_kafka::QuietContext> = client_config(brokers, properties)
        .create_with_context(outbox_kafka::QuietContext)
        .map_err(outbox_kafka::secrets::scrub)?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin.describe_configs(&specs, &opts).await?;
    let mut out = Vec::new();
    for (topic, result) in topics.iter().zip(results) {
        let resource = result.map_err(KafkaError::AdminOp)?;
        let ms: i64 = resource
            .get("retention.ms")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(7 * 24 * 3600 * 1000); // Kafka's default
        let retention = (ms >= 0).then(|| Duration::from_millis(ms as u64));
        out.push(RetentionCheck {
            topic: topic.clone(),
            retention,
            covered: retention.is_some_and(|r| ttl >= r),
        });
    }
    Ok(out)
}
