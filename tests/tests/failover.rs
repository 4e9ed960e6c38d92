//! Leader failover on a three-node Apache Kafka cluster (`test_kit::kafka`):
//! replication factor 3, `min.insync.replicas=2`, `acks=all`. While
//! producers write and the relay publishes, the node that leads every
//! partition of the topic is killed -9. Expected: nothing lost, per-key
//! order kept, publishing resumes on the new leaders; the test prints the
//! relay's readiness timeline (unready while a batch waits on the dead
//! leader for 5 s or more) and how long publishing paused
//! (RELIABILITY.md quotes the figures).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{check_delivery, consume_from, unique, PrivateCluster, RunningRelay};
use outbox_relay::health::State;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    ClientConfig,
};
use sqlx::PgPool;

const PARTITIONS: i32 = 3;
const PER_TICK: i64 = 20; // every 100 ms: 200 events/s

/// The leader of each partition of `topic`, from the cluster's metadata.
fn leaders(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<i32>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.leader())
        .collect())
}

#[sqlx::test(migrations = false)]
async fn killing_the_partition_leader_loses_and_reorders_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let duplicates = leader_failover(pool, false).await?;
    println!("{duplicates} duplicates (bounded by the batches in flight)");
    Ok(())
}

/// The same failover under `--exactly-once`: the transactions in flight
/// when the leader dies go on with the new leaders, or are aborted and sent
/// again, and a `read_committed` reader sees no duplicate. The transaction
/// timeout (60 s) outlasts the failover.
#[sqlx::test(migrations = false)]
async fn killing_the_partition_leader_under_exactly_once_duplicates_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let duplicates = leader_failover(pool, true).await?;
    assert_eq!(
        duplicates, 0,
        "exactly-once: no duplicate for read_committed"
    );
    Ok(())
}

/// Kills the leader of every partition under load; returns the duplicates
/// a `read_committed` reader saw (loss and reordering fail the test).
async fn leader_failover(pool: PgPool, exactly_once: bool) -> anyhow::Result<usize> {
    let started = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(PrivateCluster::start).await??;
    let bootstrap = cluster.bootstrap();
    println!("three-node cluster started in {:.1?}", started.elapsed());
    outbox_core::migrate(&pool).await?;

    // Every partition led by node 1 (first in each replica list), replicated
    // on all three nodes.
    let topic = unique("failover");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let assignment: Vec<&[i32]> = (0..PARTITIONS).map(|_| &[1, 2, 3][..]).collect();
    let new = NewTopic::new(&topic, PARTITIONS, TopicReplication::Variable(&assignment));
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
    }
    integration_tests::eventually(Duration::from_secs(30), "node 1 leads", || {
        let (b, t) = (bootstrap.clone(), topic.clone());
        async move { Ok(leaders(&b, &t)? == vec![1; PARTITIONS as usize]) }
    })
    .await?;

    let relay = RunningRelay::start_exactly(
        &pool,
        outbox_relay::RelayConfig {
            brokers: bootstrap.clone(),
            poll_interval: Duration::from_millis(100),
            batch_size: 200,
            exactly_once,
            checkpoint_topic: unique("failover-checkpoints"),
            ..outbox_relay::RelayConfig::default()
        },
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (pool, stop, topic) = (pool.clone(), stop.clone(), topic.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut written = 0i64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sqlx::query(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, topic, payload) \
                     SELECT gen_random_uuid(), 'load', 'k' || (g % 50), 'load.row', $1, jsonb_build_object('seq', g) \
                     FROM generate_series($2, $3) g ORDER BY g",
                )
                .bind(&topic)
                .bind(written + 1)
                .bind(written + PER_TICK)
                .execute(&pool)
                .await?;
                written += PER_TICK;
            }
            anyhow::Ok(written)
        })
    };
    // Rows not yet published (the relay deletes what Kafka acknowledged).
    let backlog = |pool: PgPool| async move {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(n)
    };
    let mut samples: Vec<(Duration, i64, State)> = Vec::new();
    let t0 = Instant::now();
    let mut killed_at = None;
    let mut last_backlog = 0;
    while t0.elapsed() < Duration::from_secs(40) {
        if killed_at.is_none() && t0.elapsed() >= Duration::from_secs(8) {
            cluster.node(1).kill();
            killed_at = Some(t0.elapsed());
        }
        let pending = backlog(pool.clone()).await?;
        samples.push((t0.elapsed(), pending, relay.health.state()));
        last_backlog = pending;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let written = producer.await??;
    integration_tests::eventually(Duration::from_secs(60), "backlog drained", || {
        let pool = pool.clone();
        async move { Ok(backlog(pool).await? == 0) }
    })
    .await?;
    let ready_at_end = relay.health.is_ready();
    relay.stop().await?;

    // Readiness timeline: each change of state.
    let killed_at = killed_at.expect("node 1 was killed");
    println!(
        "node 1 (leader of every partition) killed -9 at {killed_at:.1?}; {written} events written"
    );
    let mut last_state = None;
    for (at, pending, state) in &samples {
        if last_state != Some(*state) {
            println!("  {at:>8.1?}  state {state:?}, {pending} pending");
            last_state = Some(*state);
        }
    }
    // The pause: the longest stretch after the kill in which the backlog
    // never shrank (it shrinks whenever a batch is acknowledged).
    let mut longest = Duration::ZERO;
    let (mut since, mut prev) = (killed_at, None);
    for (at, backlog, _) in samples.iter().filter(|s| s.0 >= killed_at) {
        if prev.is_some_and(|p| *backlog < p) {
            longest = longest.max(*at - since);
            since = *at;
        }
        prev = Some(*backlog);
    }
    println!(
        "publishing paused at most {longest:.1?} after the kill; {last_backlog} pending when the load stopped"
    );
    let new_leaders = leaders(&bootstrap, &topic)?;
    println!("leaders after the failover: {new_leaders:?}");
    assert!(
        new_leaders.iter().all(|l| *l == 2 || *l == 3),
        "{new_leaders:?}"
    );
    assert!(ready_at_end, "the relay is ready again after the failover");
    // Readiness does not lie through the pause: a batch left unacknowledged
    // for STALLED_AFTER makes the relay unready.
    if longest > outbox_relay::health::STALLED_AFTER + Duration::from_secs(1) {
        assert!(
            samples
                .iter()
                .any(|(at, _, state)| *at > killed_at && *state == State::Degraded),
            "publishing paused {longest:?}, and readiness never said so"
        );
    }

    let got = consume_from(
        &bootstrap,
        &topic,
        written as usize,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await?;
    let duplicates = check_delivery(&got, written)?;
    println!("{} records read, {duplicates} duplicates", got.len());
    Ok(duplicates)
}
