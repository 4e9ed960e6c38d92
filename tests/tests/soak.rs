//! The short version of the reliability soak (RELIABILITY.md has the long
//! one): producers, the relay and a consumer under relay kill -9,
//! pg_terminate_backend and consumer kill -9, then the checker; with several
//! relays; with broker restarts and consumer kills together; and on librdkafka's mock
//! cluster with produce errors, a slow broker and a broker down.

use std::process::Command;

/// Runs `outbox-soak run <args> --json <file>` and checks its verdict from
/// the JSON: it exited 0, every fault in `faults` was injected, and nothing
/// was lost, invented, reordered or applied twice, with duplicates within
/// the bound. Returns stdout and the JSON result.
fn soak(args: &[&str], faults: &[&str]) -> anyhow::Result<(String, serde_json::Value)> {
    let json = std::env::temp_dir().join(format!("{}.json", integration_tests::unique("soak")));
    let out = Command::new(integration_tests::soak_bin())
        .arg("run")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("KAFKA_BROKERS", integration_tests::brokers())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let _ = std::fs::remove_file(&json);
    for fault in faults {
        assert!(
            result["faults"][*fault].as_u64().unwrap_or(0) > 0,
            "no {fault} injected: {result:#}"
        );
    }
    let verdict = &result["verdict"];
    for count in [
        "lost",
        "phantom",
        "out_of_order",
        "not_applied",
        "applied_more_than_once",
        "applied_out_of_order",
    ] {
        assert_eq!(verdict[count].as_u64(), Some(0), "{count}: {result:#}");
    }
    assert!(verdict["committed"].as_u64().unwrap_or(0) > 0, "{result:#}");
    assert_eq!(result["duplicates_within_bound"], true, "{result:#}");
    assert_eq!(result["guarantees_held"], true, "{result:#}");
    // With --sagas-per-second: every checkout finished, every invariant held.
    if let Some(sagas) = result["sagas"].as_object() {
        assert!(sagas["started"].as_u64().unwrap_or(0) > 0, "{result:#}");
        assert_eq!(sagas["non_terminal"].as_i64(), Some(0), "{result:#}");
        assert_eq!(
            sagas["violations"].as_array().map(Vec::len),
            Some(0),
            "{result:#}"
        );
    }
    Ok((stdout, result))
}

#[test]
fn a_short_soak_with_faults_loses_reorders_and_doubles_nothing() -> anyhow::Result<()> {
    // Every 25th event of each producer is poison: dead-lettered until the
    // load ends, its key's later events parked (park-key), then replayed;
    // the checker verifies per-key order of the effects.
    let (stdout, result) = soak(
        &[
            "--seconds",
            "15",
            "--rate",
            "100",
            "--fault-every",
            "2.5s",
            "--poison-every",
            "25",
            "--database",
            "outbox_soak_ci",
        ],
        &[
            "relay kill -9",
            "pg_terminate_backend (relay)",
            "consumer kill -9",
        ],
    )?;
    let poison = result["verdict"]["poison"].as_u64().unwrap_or(0);
    assert!(poison > 10, "poison events were injected: {stdout}");
    Ok(())
}

/// Several relays: three relay processes share the outbox's partitions over
/// 1,000 keys while relays are killed (-9) at random and restarted, and
/// their connections terminated. Nothing lost, no key's sequence goes
/// backwards, duplicates within the documented bound.
#[test]
fn three_relays_killed_at_random_lose_and_reorder_nothing() -> anyhow::Result<()> {
    let (stdout, _) = soak(
        &[
            "--relays",
            "3",
            "--keys",
            "1000",
            "--seconds",
            "20",
            "--rate",
            "200",
            "--fault-every",
            "2s",
            "--faults",
            "relay-kill,relay-kill,pg-terminate",
            "--lease-ttl",
            "2s",
            "--database",
            "outbox_soak_ci_relays",
        ],
        &["relay kill -9"],
    )?;
    assert!(stdout.contains("3 relay(s)"), "{stdout}");
    Ok(())
}

/// Three relays with `--exactly-once` (lease 2 s), killed (-9) at random,
/// their connections terminated, and aborting themselves right after a
/// Kafka commit (before the database side) once in `one_in` commits, then
/// `more` arguments. The checker reads the topic as `read_committed`: no
/// duplicate at all (the bound is 0), nothing lost or reordered.
fn exactly_once_soak(
    database: &str,
    one_in: &str,
    more: &[&str],
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut args = vec![
        "--relays",
        "3",
        "--seconds",
        "20",
        "--rate",
        "200",
        "--fault-every",
        "2s",
        "--faults",
        "relay-kill,pg-terminate",
        "--lease-ttl",
        "2s",
        "--exactly-once",
        "--crash-after-commit-one-in",
        one_in,
        "--database",
        database,
    ];
    args.extend_from_slice(more);
    let (stdout, result) = soak(&args, &["relay kill -9", "pg_terminate_backend (relay)"])?;
    assert_eq!(result["duplicate_bound"], 0, "{result:#}");
    assert_eq!(result["verdict"]["duplicated_in_kafka"], 0, "{stdout}");
    Ok((stdout, result))
}

#[test]
fn exactly_once_relays_killed_between_their_commits_duplicate_nothing() -> anyhow::Result<()> {
    exactly_once_soak("outbox_soak_ci_eo", "50", &[]).map(drop)
}

/// The same with the WAL source: the three relays read one slot under its
/// lease, and the next reader skips what the slot's checkpoint says is in
/// Kafka already.
#[test]
fn exactly_once_wal_relays_killed_between_their_commits_duplicate_nothing() -> anyhow::Result<()> {
    let (stdout, result) = exactly_once_soak("outbox_soak_ci_eo_wal", "30", &["--source", "wal"])?;
    assert_eq!(result["source"], "wal", "{stdout}");
    Ok(())
}

/// The WAL source: three relays with `--source wal` (one reads the slot,
/// two stand by), every other event table-less, relays killed (-9) at
/// random, their connections and the walsender terminated, the consumer
/// killed. Nothing lost, reordered or applied twice.
#[test]
fn wal_relays_killed_and_cut_off_lose_reorder_and_double_nothing() -> anyhow::Result<()> {
    let (stdout, result) = soak(
        &[
            "--relays",
            "3",
            "--seconds",
            "20",
            "--rate",
            "200",
            "--fault-every",
            "2s",
            "--faults",
            "relay-kill,pg-terminate,consumer-kill",
            "--source",
            "wal",
            "--database",
            "outbox_soak_ci_wal",
        ],
        &[
            "relay kill -9",
            "pg_terminate_backend (relay)",
            "consumer kill -9",
        ],
    )?;
    assert_eq!(result["source"], "wal", "{stdout}");
    Ok(())
}

/// Broker restarts combined with consumer kills: the soak runs its own
/// Apache Kafka broker (storage on disk), kills it -9 and restarts it,
/// between relay kills, consumer kills and terminated relay connections, at
/// the soak's usual rate. The relays' publish timeout (1.5 s) is shorter than
/// the longer outages, so batches time out and are sent again. Checkouts run
/// through the sample app's saga beside the events: every one must finish,
/// with the saga's invariants.
#[test]
fn broker_restarts_with_consumer_kills_lose_reorder_and_double_nothing() -> anyhow::Result<()> {
    let (stdout, result) = soak(
        &[
            "--sagas-per-second",
            "8",
            "--seconds",
            "25",
            "--rate",
            "300",
            "--fault-every",
            "2.5s",
            "--faults",
            // The two faults asserted below come first: a broker restart can take
            // most of the run on a loaded machine.
            "consumer-kill,broker-restart,relay-kill,broker-restart,pg-terminate,consumer-kill",
            "--database",
            "outbox_soak_ci_broker",
        ],
        &["broker kill -9 and restart", "consumer kill -9"],
    )?;
    assert!(
        stdout.contains("the soak's own Apache Kafka broker"),
        "{stdout}"
    );
    assert!(result["sagas"].is_object(), "{result:#}");
    Ok(())
}

/// A slow and erroring broker under the checker: the soak runs on
/// librdkafka's mock cluster (3 brokers) and injects produce errors, a slow
/// broker and a broker down, between relay kills and consumer kills.
#[test]
fn a_slow_and_erroring_broker_under_the_checker_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let (stdout, _) = soak(
        &[
            "--seconds",
            "20",
            "--rate",
            "100",
            "--fault-every",
            "2s",
            "--faults",
            "produce-errors,broker-slow,broker-down,relay-kill,consumer-kill",
            "--database",
            "outbox_soak_ci_mock",
        ],
        &[
            "5 produce requests failed (mock)",
            "a broker 300 ms slow for 2 s (mock)",
            "a broker down for 0.5-3 s (mock)",
        ],
    )?;
    assert!(stdout.contains("librdkafka's mock cluster"), "{stdout}");
    Ok(())
}

/// The same soak on RabbitMQ (`--sink rabbitmq`): two relays publish to the
/// run's exchange, the consumer reads its quorum queue under single active
/// consumer, poison events are dead-lettered to its `.dlq` and replayed,
/// and the soak's own RabbitMQ node is killed -9 and restarted between relay
/// kills, consumer kills and pg_terminate_backend. The checker reads a tap
/// queue bound to the exchange.
#[test]
fn rabbitmq_under_broker_relay_and_consumer_kills_loses_reorders_and_doubles_nothing(
) -> anyhow::Result<()> {
    let (stdout, result) = soak(
        &[
            "--sink",
            "rabbitmq",
            "--sagas-per-second",
            "8",
            "--seconds",
            "25",
            "--rate",
            "300",
            "--relays",
            "2",
            "--fault-every",
            "2.5s",
            "--faults",
            "consumer-kill,broker-restart,relay-kill,pg-terminate",
            "--poison-every",
            "100",
            "--database",
            "outbox_soak_ci_rabbitmq",
        ],
        &["RabbitMQ kill -9 and restart", "consumer kill -9"],
    )?;
    assert!(stdout.contains("the soak's own RabbitMQ node"), "{stdout}");
    assert_eq!(result["sink"], "rabbitmq", "{result:#}");
    assert!(result["sagas"].is_object(), "{result:#}");
    assert!(
        result["verdict"]["poison"].as_u64().unwrap_or(0) > 0,
        "{result:#}"
    );
    Ok(())
}
