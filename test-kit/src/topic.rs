//! Topics on a broker, made with the relay's own `topic create`.

/// Creates `topic` with `partitions` partitions (replication 1) on
/// `brokers`; an existing topic is fine.
pub async fn create(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    outbox_relay::topics::create(brokers, &Default::default(), topic, partitions, 1).await?;
    Ok(())
}
