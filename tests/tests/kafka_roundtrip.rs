//! A produce and consume round trip through the real broker with rdkafka,
//! configured the way the relay is (idempotent, acks=all).

use std::time::Duration;

use integration_tests::{brokers, consume, create_topic, unique};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};

#[tokio::test]
async fn produce_and_consume_round_trip() -> anyhow::Result<()> {
    let topic = unique("roundtrip");
    create_topic(&topic, 3).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let sends = (0..20).map(|i| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: "n",
                value: Some(&i.to_string()),
            });
            let payload = format!("{{\"n\":{i}}}");
            let key = format!("k{}", i % 4);
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    let got = consume(
        &topic,
        20,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await?;
    assert_eq!(got.len(), 20, "exactly the 20 records, no duplicates");
    let mut ns: Vec<i64> = got
        .iter()
        .map(|r| r.json()["n"].as_i64().unwrap())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..20).collect::<Vec<_>>());
    for r in &got {
        let n = r.json()["n"].as_i64().unwrap();
        assert_eq!(r.header("n"), Some(n.to_string().as_str()));
        assert_eq!(r.key.as_deref(), Some(format!("k{}", n % 4).as_str()));
    }
    // One key, one partition.
    for k in 0..4 {
        let parts: std::collections::HashSet<i32> = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(&format!("k{k}")))
            .map(|r| r.partition)
            .collect();
        assert_eq!(parts.len(), 1, "key k{k} spread over partitions {parts:?}");
    }
    Ok(())
}
