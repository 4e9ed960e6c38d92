//! The service commands (`./dev status|up`) report missing or stopped
//! services clearly, without leaking credentials.

use std::process::Command;

fn dev(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("bash")
        .arg(format!("{root}/dev"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run ./dev");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn status_reports_running_services() {
    let (code, out) = dev(&["status"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("postgres: up"), "{out}");
    assert!(out.contains("pgbouncer: up"), "{out}");
    assert!(out.contains("kafka:    up"), "{out}");
}

#[test]
fn status_names_each_stopped_service_and_hides_the_password() {
    let (code, out) = dev(
        &["status"],
        &[
            ("DATABASE_URL", "postgres://app:s3cret@127.0.0.1:1/appdb"),
            ("PGBOUNCER_URL", "postgres://app:s3cret@127.0.0.1:4/appdb"),
            ("KAFKA_BROKERS", "127.0.0.1:2"),
        ],
    );
    assert!(
        out.contains("pgbouncer: DOWN") && out.contains("127.0.0.1:4"),
        "{out}"
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("postgres: DOWN") && out.contains("127.0.0.1:1"),
        "{out}"
    );
    assert!(
        out.contains("kafka:    DOWN") && out.contains("127.0.0.1:2"),
        "{out}"
    );
    assert!(out.contains("./dev up"), "says what to do: {out}");
    assert!(!out.contains("s3cret"), "password leaked: {out}");
}

#[test]
fn a_stale_broker_pid_is_reported_as_exited() {
    // A pid file left by a broker that died: status must say so.
    let dir = std::env::temp_dir().join(format!("outbox-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // Copy the script so its .services folder is private to this test.
    std::fs::copy(format!("{root}/dev"), dir.join("dev")).unwrap();
    std::fs::create_dir_all(dir.join(".services/kafka-3")).unwrap();
    std::fs::write(dir.join(".services/kafka-3/kafka.pid"), "999999\n").unwrap();
    let out = Command::new("bash")
        .arg(dir.join("dev"))
        .arg("status")
        .env("KAFKA_BROKERS", "127.0.0.1:3")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the broker started by ./dev has exited"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unknown_command_exits_2_with_usage() {
    let (code, out) = dev(&["frobnicate"], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("unknown command") && out.contains("usage"),
        "{out}"
    );
}
