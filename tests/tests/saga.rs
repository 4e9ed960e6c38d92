//! consumer-kit's sagas (`consumer-kit/src/saga.rs`) against the real
//! PostgreSQL and Kafka, with an in-process relay publishing the saga's
//! commands and timeouts. The saga is the tests' booking
//! (`tests/src/booking.rs`); the other services are played by the test,
//! which appends their events to the outbox.

use std::{collections::HashMap, time::Duration};

use consumer_kit::{saga, saga::Unexpected, Consumer, ConsumerHandle};
use integration_tests::{
    booking::{self, Booking},
    consume,
    consumer::consumer_cfg,
    consumer::reset_group_offsets,
    create_topic, eventually, unique, RunningRelay,
};
use outbox_core::{append, NewEvent};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

/// The database, the topics and a relay.
struct World {
    pool: PgPool,
    /// booking.* events (3 partitions).
    events: String,
    /// The seat service's answers (3 partitions).
    replies: String,
    /// The saga's commands (1 partition).
    commands: String,
    /// The saga's timeouts (3 partitions).
    timeouts: String,
    group: String,
    relay: RunningRelay,
}

impl World {
    async fn new(pool: &PgPool) -> anyhow::Result<Self> {
        outbox_core::migrate(pool).await?;
        consumer_kit::migrate(pool).await?;
        sqlx::query(booking::SCHEMA).execute(pool).await?;
        let events = unique("saga-events");
        let replies = unique("saga-replies");
        let commands = unique("saga-commands");
        let timeouts = unique("saga-timeouts");
        for (t, n) in [(&events, 3), (&replies, 3), (&commands, 1), (&timeouts, 3)] {
            create_topic(t, n).await?;
        }
        Ok(Self {
            pool: pool.clone(),
            relay: RunningRelay::start(pool, integration_tests::quick_relay_config())?,
            events,
            replies,
            commands,
            timeouts,
            group: unique("saga-group"),
        })
    }

    fn saga(&self, answer_timeout: Duration) -> Booking {
        Booking {
            commands_topic: self.commands.clone(),
            timeout_topic: self.timeouts.clone(),
            answer_timeout,
            pause: Duration::ZERO,
            unexpected: Unexpected::Ignore,
        }
    }

    fn consumer(&self, saga: Booking) -> anyhow::Result<ConsumerHandle> {
        let mut cfg = consumer_cfg(&self.group, &self.events);
        cfg.topics = vec![
            self.events.clone(),
            self.replies.clone(),
            self.timeouts.clone(),
        ];
        Ok(Consumer::builder(cfg, self.pool.clone())
            .saga(saga)
            .build()?
            .start())
    }

    /// Another service's event about `booking`, on `topic`.
    async fn say(&self, topic: &str, event_type: &str, booking: &str) -> anyhow::Result<()> {
        let e = NewEvent::new("booking", booking, event_type)
            .topic(topic)
            .json_payload(&serde_json::json!({ "booking_id": booking, "seats": 2 }))?;
        append(&self.pool, &e).await?;
        Ok(())
    }

    /// Every instance: (state, status, version, data.touched, reason).
    async fn instances(&self) -> anyhow::Result<HashMap<String, Inst>> {
        let rows = saga::list(
            &self.pool,
            "booking",
            &saga::ListFilter {
                limit: 10_000,
                ..Default::default()
            },
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let touched = r.data["touched"].as_i64().unwrap_or(-1);
                (
                    r.instance_id,
                    Inst {
                        state: r.state,
                        status: r.status,
                        version: r.version,
                        touched,
                        reason: r.reason,
                    },
                )
            })
            .collect())
    }

    async fn wait_all(&self, n: usize, what: &str, done: fn(&Inst) -> bool) -> anyhow::Result<()> {
        eventually(WAIT, what, || async {
            let all = self.instances().await?;
            Ok(all.len() == n && all.values().all(done))
        })
        .await
    }

    /// The commands on the topic: (booking, command type) → count.
    async fn commands(&self, n: usize) -> anyhow::Result<HashMap<(String, String), usize>> {
        let got = consume(&self.commands, n, WAIT, Duration::from_millis(1500)).await?;
        let mut out = HashMap::new();
        for r in got {
            let key = (
                r.key.clone().unwrap_or_default(),
                r.header(outbox_core::headers::CE_TYPE)
                    .unwrap_or_default()
                    .to_string(),
            );
            *out.entry(key).or_insert(0) += 1;
        }
        Ok(out)
    }

    async fn log_rows(&self) -> anyhow::Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT count(*), count(DISTINCT (booking_id, event_id)) FROM booking_log",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn delayed_rows(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox_delayed")
            .fetch_one(&self.pool)
            .await?)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Inst {
    state: String,
    status: String,
    version: i64,
    touched: i64,
    reason: Option<String>,
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("b-{i}")).collect()
}

#[sqlx::test(migrations = false)]
async fn a_saga_completes_once_and_a_replayed_topic_changes_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let c = w.consumer(w.saga(Duration::from_secs(4)))?;
    let n = 20;
    for b in ids(n) {
        w.say(&w.events, "booking.requested", &b).await?;
    }
    // An answer for a booking that does not exist: unexpected, ignored.
    w.say(&w.replies, "seat.reserved", "nobody").await?;
    w.wait_all(n, "every booking reserving", |i| i.version == 1)
        .await?;
    assert_eq!(w.delayed_rows().await?, n as i64, "one answer timeout each");
    for b in ids(n) {
        w.say(&w.replies, "seat.reserved", &b).await?;
    }
    w.wait_all(n, "every booking confirmed", |i| i.status == "completed")
        .await?;
    // The answer timeouts were cancelled with their step.
    assert_eq!(w.delayed_rows().await?, 0);
    let before = w.instances().await?;
    for i in before.values() {
        assert_eq!(
            (i.state.as_str(), i.version, i.touched),
            ("Confirmed", 2, 2)
        );
    }
    assert!(
        !before.contains_key("nobody"),
        "no instance for a stray answer"
    );

    // Past the timeout, and after replaying every topic from the start,
    // nothing has changed: no timeout fired, no event applied twice.
    c.stop().await?;
    for t in [&w.events, &w.replies, &w.timeouts] {
        reset_group_offsets(&w.group, t, 3, 0).await?;
    }
    let c = w.consumer(w.saga(Duration::from_secs(4)))?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.stop().await?;
    assert_eq!(w.instances().await?, before, "the replay changed nothing");
    let (rows, distinct) = w.log_rows().await?;
    assert_eq!((rows, distinct), (2 * n as i64, 2 * n as i64));
    let commands = w.commands(n).await?;
    assert_eq!(commands.len(), n);
    assert!(
        commands
            .iter()
            .all(|((_, kind), count)| kind == "seat.reserve" && *count == 1),
        "one seat.reserve per booking: {commands:?}"
    );
    w.relay.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_silent_step_times_out_and_compensates_and_a_late_answer_is_undone(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let c = w.consumer(w.saga(Duration::from_secs(1)))?;
    let n = 5;
    for b in ids(n) {
        w.say(&w.events, "booking.requested", &b).await?;
    }
    w.wait_all(n, "every booking failed by its timeout", |i| {
        i.status == "failed"
    })
    .await?;
    for i in w.instances().await?.values() {
        assert_eq!(i.state, "Failed");
        assert_eq!(i.reason.as_deref(), Some("no answer in time"));
        assert_eq!(i.version, 2);
    }
    // A late answer: the saga undoes it.
    for b in ids(n) {
        w.say(&w.replies, "seat.reserved", &b).await?;
    }
    w.wait_all(n, "late answers applied", |i| i.version == 3)
        .await?;
    c.stop().await?;
    let commands = w.commands(3 * n).await?;
    for b in ids(n) {
        assert_eq!(commands.get(&(b.clone(), "seat.reserve".into())), Some(&1));
        assert_eq!(
            commands.get(&(b.clone(), "seat.release".into())),
            Some(&2),
            "released at the timeout and again after the late answer"
        );
    }
    w.relay.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_timeout_racing_the_answer_leaves_one_consistent_outcome(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let c = w.consumer(w.saga(Duration::from_millis(1500)))?;
    let n = 24;
    for b in ids(n) {
        w.say(&w.events, "booking.requested", &b).await?;
    }
    w.wait_all(n, "every booking reserving", |i| i.version == 1)
        .await?;
    // Answers spread around the due time (1.5 s after each request).
    let started = tokio::time::Instant::now();
    for (k, b) in ids(n).into_iter().enumerate() {
        let at = Duration::from_millis(900 + 50 * k as u64);
        tokio::time::sleep_until(started + at).await;
        w.say(&w.replies, "seat.reserved", &b).await?;
    }
    w.wait_all(n, "every booking finished", |i| i.status != "running")
        .await?;
    // Let late answers to failed bookings be applied.
    eventually(WAIT, "every answer applied", || async {
        let (rows, _) = w.log_rows().await?;
        Ok(rows == 2 * n as i64 + failed(&w).await? as i64)
    })
    .await?;
    c.stop().await?;
    let all = w.instances().await?;
    let releases = w.commands(n + 2 * failed(&w).await?).await?;
    let (mut completed, mut timed_out) = (0, 0);
    for (b, i) in &all {
        let released = releases
            .get(&(b.clone(), "seat.release".into()))
            .copied()
            .unwrap_or(0);
        match i.status.as_str() {
            // Answered in time: never released.
            "completed" => {
                completed += 1;
                assert_eq!(released, 0, "{b}: confirmed, yet released");
            }
            // Timed out: released, and the late answer released again.
            "failed" => {
                timed_out += 1;
                assert_eq!(released, 2, "{b}: failed, released {released} times");
            }
            other => panic!("{b}: {other}"),
        }
    }
    assert_eq!(completed + timed_out, n);
    println!("race: {completed} answered in time, {timed_out} timed out first");
    w.relay.stop().await?;
    Ok(())
}

async fn failed(w: &World) -> anyhow::Result<usize> {
    Ok(w.instances()
        .await?
        .values()
        .filter(|i| i.status == "failed")
        .count())
}

#[sqlx::test(migrations = false)]
async fn events_of_one_instance_from_two_topics_at_once_serialize(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let c = w.consumer(w.saga(Duration::from_secs(60)))?;
    let n = 6;
    let touches = 20;
    for b in ids(n) {
        w.say(&w.events, "booking.requested", &b).await?;
    }
    w.wait_all(n, "every booking reserving", |i| i.version == 1)
        .await?;
    // The same instance's events on two topics: two partition workers
    // apply them at the same moments; the instance's row lock orders them.
    for k in 0..touches {
        for b in ids(n) {
            let topic = if k % 2 == 0 { &w.events } else { &w.replies };
            w.say(topic, "booking.touch", &b).await?;
        }
    }
    let total = 1 + touches as i64;
    w.wait_all(n, "every touch applied", |i| i.version == 21)
        .await?;
    c.stop().await?;
    for (b, i) in w.instances().await? {
        assert_eq!((i.version, i.touched), (total, total), "{b}: a lost update");
    }
    w.relay.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn an_answer_before_its_request_waits_under_the_retry_rule(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let mut s = w.saga(Duration::from_secs(30));
    s.unexpected = Unexpected::Retry;
    let mut cfg = consumer_cfg(&w.group, &w.events);
    cfg.topics = vec![w.events.clone(), w.replies.clone(), w.timeouts.clone()];
    cfg.max_attempts = 50;
    let c = Consumer::builder(cfg, pool.clone())
        .saga(s)
        .build()?
        .start();
    // The answer first, the request a moment later.
    w.say(&w.replies, "seat.reserved", "early").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.say(&w.events, "booking.requested", "early").await?;
    w.wait_all(1, "the early answer applied once the request was", |i| {
        i.status == "completed"
    })
    .await?;
    c.stop().await?;
    w.relay.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_consumer_killed_in_the_middle_of_transitions_leaves_none_half_applied(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    let n = 12;
    for b in ids(n) {
        w.say(&w.events, "booking.requested", &b).await?;
    }
    // Each transition sleeps 300 ms after its writes: kill -9 lands in the
    // middle of one.
    let spawn = || -> anyhow::Result<integration_tests::Child> {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.log", w.group)))?;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_saga-fixture"))
            .env("DATABASE_URL", integration_tests::database_url(&pool))
            .env("KAFKA_BROKERS", integration_tests::brokers())
            .env("GROUP", &w.group)
            .env(
                "TOPICS",
                format!("{},{},{}", w.events, w.replies, w.timeouts),
            )
            .env("COMMANDS_TOPIC", &w.commands)
            .env("PAUSE_MS", "300")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(integration_tests::Child::from(child))
    };
    let mut fixture = spawn()?;
    eventually(WAIT, "some transitions applied", || async {
        Ok(w.log_rows().await?.0 >= 3)
    })
    .await?;
    fixture.kill()?;
    let mut fixture = spawn()?;
    // The seat service answers a reservation it was asked for.
    w.wait_all(n, "every booking reserving", |i| i.version == 1)
        .await?;
    for b in ids(n) {
        w.say(&w.replies, "seat.reserved", &b).await?;
    }
    eventually(WAIT, "some answers applied", || async {
        Ok(w.log_rows().await?.0 >= n as i64 + 3)
    })
    .await?;
    fixture.kill()?;
    let mut fixture = spawn()?;
    w.wait_all(n, "every booking confirmed", |i| i.status == "completed")
        .await?;
    fixture.stop(Duration::from_secs(10));
    let (rows, distinct) = w.log_rows().await?;
    assert_eq!(rows, distinct, "an event applied twice");
    assert_eq!(rows, 2 * n as i64);
    for i in w.instances().await?.values() {
        assert_eq!((i.version, i.touched), (2, 2));
    }
    let commands = w.commands(n).await?;
    assert!(
        commands.values().all(|&c| c == 1) && commands.len() == n,
        "each seat.reserve appended once: {commands:?}"
    );
    w.relay.stop().await?;
    Ok(())
}

/// `outbox-dlq saga …` against `w`'s database: (exit code, output).
fn dlq(w: &World, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(integration_tests::dlq_bin())
        .arg("saga")
        .args(args)
        .args(["--saga", "booking"])
        .env("DATABASE_URL", integration_tests::database_url(&w.pool))
        .output()
        .expect("run outbox-dlq");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[sqlx::test(migrations = false)]
async fn an_operator_lists_stuck_instances_retries_one_and_fails_another(
    pool: PgPool,
) -> anyhow::Result<()> {
    let w = World::new(&pool).await?;
    // Nobody answers, and the step waits for an hour: both get stuck.
    let c = w.consumer(w.saga(Duration::from_secs(3600)))?;
    for b in ["stuck-1", "stuck-2"] {
        w.say(&w.events, "booking.requested", b).await?;
    }
    w.wait_all(2, "both reserving", |i| i.version == 1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (code, out) = dlq(&w, &["list", "--stuck-for", "1s"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("stuck-1  running  Reserving  v1") && out.contains("stuck-2"),
        "{out}"
    );
    assert!(out.contains("timeouts [answer]"), "{out}");
    let (code, out) = dlq(&w, &["list", "--stuck-for", "1h"]);
    assert_eq!((code, out.contains("stuck-")), (0, false), "{out}");

    // Retry: the step's timeout fires now; the saga compensates.
    let (code, out) = dlq(&w, &["retry", "stuck-1"]);
    assert_eq!(code, 0, "{out}");
    eventually(WAIT, "stuck-1 failed by its timeout", || async {
        Ok(w.instances().await?["stuck-1"].status == "failed")
    })
    .await?;
    let (code, out) = dlq(&w, &["show", "stuck-1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"no answer in time\""), "{out}");
    let (code, out) = dlq(&w, &["retry", "stuck-1"]);
    assert_eq!(code, 1, "nothing left to retry: {out}");

    // Fail: refused without --yes, then done without compensation.
    let (code, out) = dlq(&w, &["fail", "stuck-2", "--reason", "settled by hand"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--yes"), "{out}");
    let (code, out) = dlq(
        &w,
        &["fail", "stuck-2", "--reason", "settled by hand", "--yes"],
    );
    assert_eq!(code, 0, "{out}");
    let stuck2 = &w.instances().await?["stuck-2"];
    assert_eq!(stuck2.status, "failed");
    assert_eq!(
        stuck2.reason.as_deref(),
        Some("abandoned by an operator: settled by hand")
    );
    assert_eq!(w.delayed_rows().await?, 0, "its timeout was dropped");
    c.stop().await?;
    let commands = w.commands(3).await?;
    assert_eq!(
        commands.get(&("stuck-1".into(), "seat.release".into())),
        Some(&1)
    );
    assert_eq!(
        commands.get(&("stuck-2".into(), "seat.release".into())),
        None
    );
    w.relay.stop().await?;
    Ok(())
}
