//! The librdkafka settings consumer-kit's clients use: the group consumer,
//! the admin and metadata clients, and the dead-letter (and replay)
//! producer. The user's `kafka_properties` pass through to each, secrets
//! remembered so they never reach a log.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::ClientConfig;

use crate::config::ConsumerConfig;

/// Builds librdkafka client settings: bootstrap servers, then `properties`.
pub(crate) fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    outbox_kafka::secrets::set_all(&mut cc, properties);
    cc
}

/// An `acks=all` producer for dead letters (`idempotent = false`) and
/// replays (`idempotent = true`, so a pipelined replay keeps its order).
///
/// Dead letters are sent one at a time per partition and awaited, so order
/// needs no idempotence there; and an idempotent producer turns fatal after a
/// send times out (a missing topic, a long outage), which would stop
/// dead-lettering for good.
pub(crate) fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    timeout: Duration,
    idempotent: bool,
) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("enable.idempotence", idempotent.to_string())
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .set("client.id", "consumer-kit");
    outbox_kafka::secrets::remember(properties);
    for (k, v) in properties {
        // Consumer-only settings would make the producer refuse to start.
        if !is_consumer_only(k) {
            cc.set(k, v);
        }
    }
    cc
}

/// The group consumer's settings: offsets stored only after the database
/// commit and auto-committed every [`ConsumerConfig::commit_interval`].
pub(crate) fn consumer_config(cfg: &ConsumerConfig) -> ClientConfig {
    let mut cc = client_config(&cfg.brokers, &Default::default());
    cc.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().max(1).to_string(),
        )
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set(
            "isolation.level",
            if cfg.read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .set("client.id", "consumer-kit");
    // Every second: the broker connection for health (the lag gauge is
    // refreshed every `lag_interval` from these).
    cc.set(
        "statistics.interval.ms",
        outbox_kafka::reach::STATS_INTERVAL_MS,
    );
    outbox_kafka::secrets::set_all(&mut cc, &cfg.kafka_properties);
    // Stored only after the database commit; never automatically.
    cc.set("enable.auto.offset.store", "false");
    cc
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("enable.auto.")
        || key.starts_with("auto.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("max.poll.")
        || key.starts_with("fetch.")
        || key.starts_with("group.")
        || key.starts_with("partition.assignment")
        || key == "isolation.level"
        || key.starts_with("queued.")
}
