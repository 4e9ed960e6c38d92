//! `outbox-soak run`: producers at a fixed rate, relays and a consumer as
//! child processes, faults injected on a timer, then the checker's verdict.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use outbox_core::{append, NewEvent};
use sqlx::{postgres::PgConnectOptions, PgPool};

use crate::{broker, check, role::Role, Cli, Fault};

/// The soak relays' batch size (one batch is what a relay fault may repeat).
pub(crate) const RELAY_BATCH: usize = 200;

pub(crate) struct Load {
    /// Where to write the result as JSON, if anywhere.
    pub(crate) json: Option<std::path::PathBuf>,
    pub(crate) seconds: u64,
    pub(crate) rate: u64,
    pub(crate) producers: u64,
    pub(crate) keys: i64,
    pub(crate) relays: usize,
    pub(crate) lease_ttl: Duration,
    pub(crate) poison_every: u64,
    /// Checkouts started per second beside the events (the sample app's
    /// saga, `sagas.rs`); 0: none.
    pub(crate) sagas_per_second: u64,
    /// How the relays run (exactly-once, the crash hook, the mutation, the
    /// WAL source).
    pub(crate) mode: crate::RelayMode,
}

pub(crate) async fn soak(
    cli: &Cli,
    server: PgConnectOptions,
    load: Load,
    fault_every: Duration,
    faults: &[Fault],
    mut own: Option<broker::Own>,
) -> anyhow::Result<bool> {
    // With its own broker or the mock cluster, the soak's relays, consumer
    // and checker use it.
    let with_own_broker;
    let cli = match &own {
        Some(broker::Own::Rabbit(node)) => {
            with_own_broker = Cli {
                amqp_url: node.url.clone(),
                ..cli.clone()
            };
            &with_own_broker
        }
        Some(o) => {
            with_own_broker = Cli {
                kafka_brokers: o.address(),
                ..cli.clone()
            };
            &with_own_broker
        }
        None => cli,
    };
    let rabbit = cli.sink == crate::Sink::Rabbitmq;
    let started = Instant::now();
    let say = |m: String| println!("[{:>6.1}s] {m}", started.elapsed().as_secs_f64());
    let name = &cli.database;
    let slot = load.mode.wal().then(|| crate::slot_name(name));
    if let Some(slot) = &slot {
        // The slot of an earlier run would keep its database from being
        // dropped.
        let admin = PgPool::connect_with(server.clone()).await?;
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
        )
        .bind(slot)
        .execute(&admin)
        .await?;
        admin.close().await;
    }
    let pool = fresh_database(cli, server, load.producers as u32 + 4).await?;
    if let Some(slot) = &slot {
        outbox_relay::slot::create(&pool, slot, slot)
            .await
            .context("--source wal: creating the soak's slot")?;
    }
    sqlx::query("INSERT INTO soak_keys (key) SELECT 'k' || g FROM generate_series(1, $1) g")
        .bind(load.keys)
        .execute(&pool)
        .await?;
    let topic = format!("soak-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    if rabbit {
        // The exchange, and the tap the checker reads.
        crate::rabbit::declare_tap(&cli.amqp_url, &topic).await?;
    } else {
        create_topic(cli, own.as_ref(), &topic, true).await?;
    }
    let sagas = if load.sagas_per_second > 0 {
        let topics = crate::sagas::topics(&topic);
        if !rabbit {
            for t in [&topics.checkout, &topics.commands] {
                create_topic(cli, own.as_ref(), t, false).await?;
            }
        }
        let expected = (load.sagas_per_second * load.seconds) as usize;
        let db = pool.connect_options().as_ref().clone();
        Some((topics, crate::sagas::prepare(&db, expected.max(8)).await?))
    } else {
        None
    };
    say(format!(
        "database {name}, topic {topic}: {} producers at {} events/s over {} keys for {} s; \
         {} relay(s), lease TTL {:?}; a fault every {:?} ({faults:?}); broker {}{}",
        load.producers,
        load.rate,
        load.keys,
        load.seconds,
        load.relays,
        load.lease_ttl,
        fault_every,
        if rabbit {
            format!(
                "RabbitMQ {}",
                consumer_kit::rabbitmq::broker_for_logs(&cli.amqp_url)
            )
        } else {
            cli.kafka_brokers.clone()
        },
        own.as_ref()
            .map(|o| format!(" ({})", o.describe()))
            .unwrap_or_default()
    ));

    let ttl = format!("{}s", load.lease_ttl.as_secs_f64());
    // A broker restart keeps the broker away for 0.5 to 3 s plus its start
    // (about 4 s), a mock broker down for 0.5 to 3 s. A publish timeout of
    // 1.5 s makes the longer outages time records out (the relay then claims
    // and sends the batch again), while the shorter ones are ridden out by
    // librdkafka's own retries.
    let publish_timeout = if own.is_some() { "1.5s" } else { "30s" };
    let mut relay_args = vec![
        "relay",
        "--lease-ttl",
        &ttl,
        "--publish-timeout",
        publish_timeout,
    ];
    if matches!(own, Some(broker::Own::Mock(_))) {
        relay_args.push("--one-in-flight");
    }
    let mode_args = load.mode.args();
    relay_args.extend(mode_args.iter().map(String::as_str));
    let mut relays: Vec<Role> = (0..load.relays)
        .map(|_| Role::start(cli, &relay_args))
        .collect::<anyhow::Result<_>>()?;
    let mut consume_args = vec!["consume", "--topic", topic.as_str()];
    if sagas.is_some() {
        consume_args.push("--sagas");
    }
    let mut consumer = Role::start(cli, &consume_args)?;
    if rabbit {
        crate::rabbit::wait_for_queue(&cli.amqp_url, &topic).await?;
        for q in sagas.iter().flat_map(|(t, _)| crate::sagas::queues(t)) {
            crate::rabbit::wait_for_named_queue(&cli.amqp_url, &q).await?;
        }
    }

    // Producers: ledger row + outbox row in one transaction, serialized per
    // key by the key's row lock, so seq order is commit order per key.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..load.producers {
        let pool = pool.clone();
        let stop = Arc::clone(&stop);
        let produced = Arc::clone(&produced);
        let errors = Arc::clone(&errors);
        let topic = topic.clone();
        let every = Duration::from_secs_f64(load.producers as f64 / load.rate.max(1) as f64);
        let keys = load.keys;
        let poison_every = load.poison_every;
        let table_less = load.mode.wal();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut i: i64 = p as i64;
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let key = format!("k{}", 1 + (i * 7919) % keys);
                i += 1;
                n += 1;
                let poison = poison_every > 0 && n % poison_every == 0;
                match produce_one(&pool, &topic, &key, poison, table_less).await {
                    Ok(()) => produced.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let checkouts = Arc::new(AtomicU64::new(0));
    if let Some((topics, pools)) = &sagas {
        tasks.push(crate::sagas::drive(
            pools[0].clone(),
            topics.clone(),
            load.sagas_per_second,
            Arc::clone(&stop),
            Arc::clone(&checkouts),
        ));
        say(format!(
            "checkouts: {}/s through the checkout saga (topics {} and {}; step timeout {:?})",
            load.sagas_per_second,
            topics.checkout,
            topics.commands,
            crate::sagas::STEP_TIMEOUT
        ));
    }

    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(load.seconds);
    let mut next = 0;
    let mut relay_kills = 0usize;
    // Broker faults hit every relay at once.
    let mut broker_faults = 0usize;
    // Relays that aborted themselves (the crash hook), restarted.
    let mut self_crashes = 0usize;
    // Faults come at jittered times (0.5 to 1.5 × --fault-every), and a
    // relay kill hits a relay picked at random.
    loop {
        let wait = fault_every.mul_f64(rand::random_range(0.5..1.5));
        if Instant::now() + wait > end {
            break;
        }
        tokio::time::sleep(wait).await;
        relays.iter_mut().for_each(Role::sample_rss);
        self_crashes += restart_crashed(cli, &mut relays, &say)?;
        restart_exited_consumer(cli, &mut consumer, &say)?;
        let Some(fault) = faults.get(next % faults.len().max(1)).copied() else {
            break;
        };
        next += 1;
        let name = match fault {
            Fault::RelayKill => {
                let victim = rand::random_range(0..relays.len());
                relays[victim].kill_and_restart(cli)?;
                relay_kills += 1;
                "relay kill -9"
            }
            Fault::PgTerminate => {
                // The relays' connections, and the WAL source's walsender.
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() \
                       AND (application_name = 'outbox-soak-relay' OR backend_type = 'walsender')",
                )
                .execute(&pool)
                .await?;
                "pg_terminate_backend (relay)"
            }
            Fault::ConsumerKill => {
                consumer.kill_and_restart(cli)?;
                "consumer kill -9"
            }
            Fault::BrokerRestart if rabbit => {
                let node = own
                    .as_mut()
                    .and_then(broker::Own::rabbit)
                    .context("the broker-restart fault needs the soak's own RabbitMQ node")?;
                node.kill();
                tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0))).await;
                tokio::task::block_in_place(|| node.restart())?;
                broker_faults += 1;
                "RabbitMQ kill -9 and restart"
            }
            Fault::BrokerRestart => {
                let broker = own
                    .as_mut()
                    .and_then(broker::Own::kafka)
                    .context("the broker-restart fault needs the soak's own broker")?;
                broker.kill();
                tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0))).await;
                tokio::task::block_in_place(|| broker.restart())?;
                broker_faults += 1;
                "broker kill -9 and restart"
            }
            Fault::LeaderFailover => {
                let cluster = own
                    .as_mut()
                    .and_then(broker::Own::cluster)
                    .context("the leader-failover fault needs the soak's own cluster")?;
                let victim = rand::random_range(1..=3u32);
                cluster.node(victim).kill();
                tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0))).await;
                tokio::task::block_in_place(|| cluster.node(victim).restart())?;
                broker_faults += 1;
                "cluster node kill -9 and restart (leader failover)"
            }
            Fault::ProduceErrors | Fault::BrokerSlow | Fault::BrokerDown => {
                let m = own
                    .as_ref()
                    .and_then(broker::Own::mock)
                    .context("this fault needs the mock cluster")?;
                let victim = || rand::random_range(1..=broker::MOCK_BROKERS);
                broker_faults += 1;
                match fault {
                    Fault::ProduceErrors => {
                        m.fail_next_produce_requests();
                        "5 produce requests failed (mock)"
                    }
                    Fault::BrokerSlow => {
                        let b = victim();
                        m.round_trip_time(b, Duration::from_millis(300))?;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        m.round_trip_time(b, Duration::ZERO)?;
                        "a broker 300 ms slow for 2 s (mock)"
                    }
                    _ => {
                        let b = victim();
                        m.set_down(b, true)?;
                        tokio::time::sleep(Duration::from_secs_f64(rand::random_range(0.5..3.0)))
                            .await;
                        m.set_down(b, false)?;
                        "a broker down for 0.5-3 s (mock)"
                    }
                }
            }
        };
        *injected.entry(name).or_default() += 1;
        say(format!(
            "fault: {name}; {} events committed so far",
            produced.load(Ordering::Relaxed)
        ));
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let committed = produced.load(Ordering::Relaxed);
    say(format!(
        "producers stopped: {committed} events committed ({} producer transactions failed and were not committed)",
        errors.load(Ordering::Relaxed)
    ));

    // Poison events: the fix is deployed, and every dead letter replayed
    // (again and again, as more arrive) until everything is applied.
    if load.poison_every > 0 {
        sqlx::query("UPDATE soak_control SET fixed = true")
            .execute(&pool)
            .await?;
        say("poison fixed in the consumer; replaying the dead letters as they come".into());
    }
    let mut replayed: std::collections::HashSet<(i32, i64)> = std::collections::HashSet::new();
    let mut replayed_ids: std::collections::HashMap<uuid::Uuid, u64> = Default::default();
    let mut last_replay = Instant::now() - Duration::from_secs(10);

    // Let the relay and consumer finish, bounded.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        relays.iter_mut().for_each(Role::sample_rss);
        self_crashes += restart_crashed(cli, &mut relays, &say)?;
        restart_exited_consumer(cli, &mut consumer, &say)?;
        if load.poison_every > 0 && last_replay.elapsed() >= Duration::from_secs(2) {
            last_replay = Instant::now();
            // Right after a broker restart the metadata can be stale for a
            // moment: try again at the next round.
            let replay = if rabbit {
                crate::rabbit::replay_letters(&cli.amqp_url, &topic, &mut replayed_ids).await
            } else {
                replay_new_letters(&cli.kafka_brokers, &topic, &mut replayed, &mut replayed_ids)
                    .await
            };
            match replay {
                Ok(0) => {}
                Ok(n) => say(format!("replayed {n} dead letter(s)")),
                Err(e) => say(format!(
                    "replaying dead letters failed ({e:#}); trying again"
                )),
            }
        }
        let (pending, applied): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), (SELECT count(DISTINCT event_id) FROM soak_effects)",
        )
        .fetch_one(&pool)
        .await?;
        let running = match &sagas {
            Some((_, pools)) => crate::sagas::running(&pools[0], Duration::ZERO).await?.0,
            None => 0,
        };
        if pending == 0 && applied as u64 >= committed && running == 0 {
            break;
        }
        if Instant::now() > deadline {
            say(format!("gave up waiting: {pending} rows still in the outbox, {applied} of {committed} applied, {running} checkouts running"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some((_, pools)) = &sagas {
        // The services may still be applying what finished checkouts asked.
        crate::sagas::settle(pools, Duration::from_secs(20)).await?;
    }
    relays.iter_mut().for_each(Role::terminate);
    consumer.terminate();
    if let Some(slot) = &slot {
        for _ in 0..50 {
            match outbox_relay::slot::drop(&pool, slot, Some(slot)).await {
                Err(outbox_relay::slot::SlotError::HeldByAnother { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Ok(_) | Err(_) => break,
            }
        }
    }

    let published = if rabbit {
        check::Published::RabbitMq(&cli.amqp_url)
    } else {
        check::Published::Kafka(&cli.kafka_brokers)
    };
    let v = check::check(&pool, published, &topic, &replayed_ids).await?;
    let saga_verdict = match &sagas {
        Some((_, pools)) => {
            Some(crate::sagas::check(pools, checkouts.load(Ordering::Relaxed)).await?)
        }
        None => None,
    };
    // A relay fault repeats at most the batch that relay had in flight; a
    // pg_terminate_backend or a broker fault hits every relay at once.
    let terminations = injected
        .get("pg_terminate_backend (relay)")
        .copied()
        .unwrap_or(0) as usize;
    let relay_faults = relay_kills + self_crashes + (terminations + broker_faults) * load.relays;
    // Exactly-once: no duplicate at all for the checker's read_committed reading.
    let bound = if load.mode.exactly_once {
        0
    } else {
        relay_faults * RELAY_BATCH
    };
    let within = v.duplicated_in_kafka as usize <= bound;
    println!();
    println!("== soak result (topic {topic}) ==");
    if self_crashes > 0 {
        injected.insert(
            "relay abort between Kafka and database commits",
            self_crashes as u64,
        );
    }
    for (name, n) in &injected {
        println!("faults injected: {n:>4} × {name}");
    }
    if load.mode.exactly_once {
        println!("relays:                     --exactly-once (the topic read as read_committed)");
    }
    println!("{v}");
    if let Some(sv) = &saga_verdict {
        println!("{sv}");
    }
    if load.mode.exactly_once {
        println!(
            "duplicate bound:            0 (exactly-once; {relay_faults} relay faults){}",
            if within { "" } else { " EXCEEDED" }
        );
    } else {
        println!(
            "duplicate bound:            {bound} ({relay_faults} relay faults × batch {RELAY_BATCH}){}",
            if within { "" } else { " EXCEEDED" }
        );
    }
    println!(
        "peak RSS sampled: relay {} MiB, consumer {} MiB",
        relays.iter().map(|r| r.peak_rss_kib()).max().unwrap_or(0) / 1024,
        consumer.peak_rss_kib() / 1024
    );
    let ok = v.ok() && within && saga_verdict.as_ref().is_none_or(crate::sagas::Verdict::ok);
    if let Some(path) = &load.json {
        let result = serde_json::json!({
            "topic": topic,
            "exactly_once": load.mode.exactly_once,
            "source": if load.mode.wal() { "wal" } else { "poll" },
            "sink": cli.sink.name(),
            "mutate_skip_fencing": load.mode.mutate_skip_fencing,
            "faults": injected,
            "verdict": v,
            "sagas": saga_verdict,
            "duplicate_bound": bound,
            "duplicates_within_bound": within,
            "peak_rss_mib": {
                "relay": relays.iter().map(|r| r.peak_rss_kib()).max().unwrap_or(0) / 1024,
                "consumer": consumer.peak_rss_kib() / 1024,
            },
            "guarantees_held": ok,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write the result to {}", path.display()))?;
    }
    println!(
        "verdict:                    {}",
        if ok {
            "guarantees held"
        } else {
            "GUARANTEE BROKEN"
        }
    );
    if let Some(broker::Own::Kafka(mut broker)) = own {
        if ok {
            broker.remove();
        } else {
            broker.keep();
            println!(
                "the soak's broker log and data are kept: {}",
                broker.log().display()
            );
        }
    }
    Ok(ok)
}

/// Creates `topic` (3 partitions) on the run's broker: the mock cluster,
/// the three-broker cluster (replicated 3 times) or a single broker. With
/// `dlq`, on the mock cluster, its dead-letter topic too (the others create
/// it on demand).
async fn create_topic(
    cli: &Cli,
    own: Option<&broker::Own>,
    topic: &str,
    dlq: bool,
) -> anyhow::Result<()> {
    if let Some(m) = own.and_then(broker::Own::mock) {
        m.create_topic(topic, 3)?;
        if dlq {
            m.create_topic(&format!("{topic}.dlq"), 3)?;
        }
        return Ok(());
    }
    let replication = if matches!(own, Some(broker::Own::Cluster(_))) {
        3
    } else {
        1
    };
    outbox_relay::topics::create(&cli.kafka_brokers, &BTreeMap::new(), topic, 3, replication)
        .await?;
    Ok(())
}

/// Restarts the relays that exited by themselves (the crash hook aborts
/// one between its Kafka and database commits); returns how many.
fn restart_crashed(cli: &Cli, relays: &mut [Role], say: &impl Fn(String)) -> anyhow::Result<usize> {
    let mut n = 0;
    for relay in relays.iter_mut() {
        if relay.child.process.try_wait()?.is_some() {
            relay.kill_and_restart(cli)?;
            say("a relay aborted itself between its Kafka and database commits; restarted".into());
            n += 1;
        }
    }
    Ok(n)
}

/// Restarts the consumer if it ended by itself, as its supervisor would: it
/// refuses to start while the broker does not answer (a clear error, exit
/// 1), which a consumer restarted during a broker restart meets.
fn restart_exited_consumer(
    cli: &Cli,
    consumer: &mut Role,
    say: &impl Fn(String),
) -> anyhow::Result<()> {
    if let Some(status) = consumer.child.process.try_wait()? {
        consumer.kill_and_restart(cli)?;
        say(format!(
            "the consumer ended by itself ({status}); restarted"
        ));
    }
    Ok(())
}

/// Replays the dead letters of `topic` not replayed yet (`done` holds their
/// positions in the dead-letter topic, `ids` counts the replays per event
/// id); returns how many.
async fn replay_new_letters(
    brokers: &str,
    topic: &str,
    done: &mut std::collections::HashSet<(i32, i64)>,
    ids: &mut std::collections::HashMap<uuid::Uuid, u64>,
) -> anyhow::Result<usize> {
    let dlq = format!("{topic}.dlq");
    let letters = consumer_kit::replay::read(
        brokers,
        &BTreeMap::new(),
        &dlq,
        &consumer_kit::DeadLetterFilter::default(),
    )
    .await?;
    let new: Vec<_> = letters
        .into_iter()
        .filter(|l| !done.contains(&(l.dlq_partition, l.dlq_offset)))
        .collect();
    if !new.is_empty() {
        consumer_kit::replay::replay(brokers, &BTreeMap::new(), &new).await?;
        done.extend(new.iter().map(|l| (l.dlq_partition, l.dlq_offset)));
        for id in new.iter().filter_map(|l| l.event_id) {
            *ids.entry(id).or_default() += 1;
        }
    }
    Ok(new.len())
}

/// Drops and creates the run's database with every schema the soak uses.
pub(crate) async fn fresh_database(
    cli: &Cli,
    server: PgConnectOptions,
    connections: u32,
) -> anyhow::Result<PgPool> {
    let db = test_kit::db::recreate(&server, &cli.database).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(db)
        .await?;
    outbox_core::migrate(&pool).await?;
    consumer_kit::migrate(&pool).await?;
    sqlx::raw_sql(check::SCHEMA).execute(&pool).await?;
    Ok(pool)
}

/// One event of `key` with its ledger row, in one transaction. With
/// `table_less`, every other event of a key is written with `outbox_emit`
/// instead of a row (the WAL source reads both).
pub(crate) async fn produce_one(
    pool: &PgPool,
    topic: &str,
    key: &str,
    poison: bool,
    table_less: bool,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let seq: i64 =
        sqlx::query_scalar("UPDATE soak_keys SET seq = seq + 1 WHERE key = $1 RETURNING seq")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
    let event = NewEvent::new("soak", key, "soak.event")
        .topic(topic)
        .json_payload(&serde_json::json!({ "key": key, "seq": seq, "poison": poison }))?;
    sqlx::query("INSERT INTO soak_ledger (event_id, key, seq, poison) VALUES ($1, $2, $3, $4)")
        .bind(event.event_id)
        .bind(key)
        .bind(seq)
        .bind(poison)
        .execute(&mut *tx)
        .await?;
    if table_less && seq % 2 == 1 {
        outbox_core::emit(&mut *tx, &event).await?;
    } else {
        append(&mut *tx, &event).await?;
    }
    tx.commit().await?;
    Ok(())
}
